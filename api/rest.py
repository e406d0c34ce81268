"""The REST API of API.md on FastAPI: public market data and registry, member order entry and
account, operator actions. It translates and delegates: the exchange service decides.

Every error is an RFC 9457 problem body (``application/problem+json``) with a stable ``code``;
every route documents the problems it can send, so /openapi.json describes exactly what is sent.
"""

# No `from __future__ import annotations`: FastAPI reads the route annotations, some of them local.
import asyncio
import hashlib
import html
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from itertools import islice
from typing import Annotated, Any
from urllib.parse import parse_qsl, unquote_to_bytes, urlencode

import asyncpg
import orjson
from fastapi import Depends, FastAPI, Header, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import URL, QueryParams
from starlette.exceptions import HTTPException as StarletteHTTPException

from api import models as M
from api import web
from api.auth import Gate, Limits, bearer, error_headers
from api.fastpath import replay
from api.orders import MAX_CASH_FEN, ORDER_FILLS, Trading, _units
from api.wire import (
    checksum,
    fill_view,
    http_status,
    iso,
    iso_datetime,
    levels,
    market_status,
    order_view,
    problem,
)
from exchange import accounts as acc
from exchange import certificates, neutrality, offsetting, registry
from exchange.accounts import Account
from exchange.errors import CarbonxError
from exchange.history import SIDE, Fill, fill_from_row, order_from_row, trade_from_row
from exchange.marketdata import MarketData
from exchange.serials import format_serial
from exchange.service import ExchangeService
from matching import events as E
from matching.core import MAX_QTY, Listing
from matching.engine import InstrumentRules
from matching.units import (
    format_cash,
    format_decimal,
    format_price,
    format_tonnes,
    parse_cash,
    parse_price,
    parse_tonnes,
)

log = logging.getLogger("carbonx.api")
PROBLEM = "application/problem+json"
MAX_DEPTH = 5000
SHANGHAI_OFFSET_US = 8 * 3_600_000_000  # UTC+8 all year
STP_MODES = ("cancel_resting", "cancel_incoming", "cancel_both")  # the core's modes 1, 2, 3
MAX_PRICE = InstrumentRules().max_price  # fen per tonne: the books' bound, which listings cannot change
# A retirement (or an offset) takes units of one project vintage, which has at most this many kg
# (ten-digit serials): more is refused here rather than overflowing the registry's bigint columns.
MAX_RETIRE_KG = registry.MAX_SERIAL - 1


@dataclass
class Context:
    service: ExchangeService
    market: MarketData
    gate: Gate
    trading: Trading
    # Where people reach this server, for certificates' verification links and QR codes (carbonx
    # serve --public-url); empty: the address each request came to, never the one listened on
    # (0.0.0.0 or loopback on a printed certificate can be opened by nobody: review30).
    public_url: str = ""
    renderers: dict[str, Callable[..., Any]] | None = None  # certificate html/pdf, when available
    feed: Any = None  # api.feed.Feed, when the websocket feed runs alongside

    def public_base(self, request: Request) -> str:
        """The base URL people reach this server at: `public_url`, else the request's own."""
        return self.public_url or str(request.base_url).rstrip("/")


class JSON(JSONResponse):
    """A JSON response encoded by orjson (FastAPI's ORJSONResponse is deprecated). A JSONResponse,
    so that FastAPI documents each route's response model as its JSON body."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


RETRY_AFTER = {"Retry-After": {"description": "whole seconds until the caller may ask again",
                               "schema": {"type": "string", "pattern": "^[1-9][0-9]*$"}}}


PROBLEM_SCHEMA = {"$ref": "#/components/schemas/Problem"}


def _problems(*codes: int) -> dict[int | str, dict[str, Any]]:
    # "model" is what puts Problem in the document's components; FastAPI documents it under the
    # routes' media type (application/json) as well, which _as_sent takes out again.
    return {c: {"model": M.Problem, "content": {PROBLEM: {"schema": PROBLEM_SCHEMA}},
                "description": "a problem (RFC 9457) with a stable code",
                **({"headers": RETRY_AFTER} if c == 429 else {})} for c in codes}


COMMON = (400, 413, 429, 503)
PUBLIC = _problems(*COMMON, 404, 422)
MEMBER = _problems(*COMMON, 401, 403, 404, 409, 422)

# The Binance-compatible routes answer their own errors as Binance does: {"code": <negative int>,
# "msg": "..."} (its spot API's error codes). What the middleware refuses before any route runs
# (a control character, the per-address rate limit, a body too large) stays a problem, as on every
# route: a 400 is either, told apart by its content type.
BINANCE_PATHS = frozenset({"/api/v3/depth"})
BINANCE_INVALID_SYMBOL = -1121
BINANCE_MANDATORY = -1102  # a mandatory parameter not sent, empty or malformed
BINANCE_ILLEGAL = -1100  # a parameter's value outside its legal range
BINANCE = {
    **_problems(413, 429),
    400: {"model": M.BinanceError,
          "description": "Binance's error shape for the request's own errors (-1121 Invalid symbol., -1102 a "
                         "mandatory parameter missing or malformed, -1100 a limit below 1); a problem "
                         "for a control character in the query",
          "content": {PROBLEM: {"schema": PROBLEM_SCHEMA}}},
}


def _as_sent(doc: dict[str, Any]) -> dict[str, Any]:
    """FastAPI's document, less what the server never sends (API.md: every documented response is
    the one sent):

    - FastAPI documents its own 422 (HTTPValidationError, {"detail": [...]}) on every route with
      parameters that documents no 422 of its own (GET /api/v3/depth). No route sends it: _invalid
      answers a 400 problem, or Binance's 400 on its routes. A 422 the route documents (a
      problem, which the server does send) stays.
    - A problem is sent as application/problem+json only, not as the application/json that
      FastAPI documents a response's "model" under."""
    for ops in doc["paths"].values():
        for op in ops.values():
            responses = op["responses"]
            default = responses.get("422", {}).get("content", {}).get("application/json", {})
            if default.get("schema") == {"$ref": "#/components/schemas/HTTPValidationError"}:
                del responses["422"]
            for response in responses.values():
                content = response.get("content", {})
                if PROBLEM in content and content.get("application/json", {}).get("schema") == PROBLEM_SCHEMA:
                    del content["application/json"]
    if "HTTPValidationError" not in str(doc["paths"]):
        for name in ("HTTPValidationError", "ValidationError"):  # the latter only used by the former
            doc.get("components", {}).get("schemas", {}).pop(name, None)
    return doc


def binance_error(code: int, msg: str, status: int = 400, headers: dict[str, str] | None = None) -> Response:
    return JSON({"code": code, "msg": msg}, status_code=status, headers=headers)


def binance_domain_error(e: CarbonxError) -> Response:
    if e.code == "unknown_instrument":
        return binance_error(BINANCE_INVALID_SYMBOL, "Invalid symbol.")
    return binance_error(-1000, e.message, http_status(e.code), error_headers(e))


def binance_invalid(first: dict[str, Any]) -> Response:
    """A query parameter FastAPI refused, in Binance's words: a missing or empty symbol is -1102,
    a symbol no instrument could have (too long) -1121, a limit that is no integer -1102 and one
    below 1 -1100."""
    loc = [str(x) for x in first.get("loc", ())]
    name = loc[-1] if loc else "?"
    kind = str(first.get("type", ""))
    if name == "symbol":
        if kind in ("missing", "string_too_short"):
            return binance_error(BINANCE_MANDATORY, "Mandatory parameter 'symbol' was not sent, was empty/null, "
                                                    "or malformed.")
        return binance_error(BINANCE_INVALID_SYMBOL, "Invalid symbol.")
    if kind.startswith("greater_than"):
        return binance_error(BINANCE_ILLEGAL, f"Illegal value in parameter '{name}': it must be at least 1.")
    return binance_error(BINANCE_MANDATORY, f"Mandatory parameter '{name}' was not sent, was empty/null, "
                                            "or malformed.")


def paged(what: str, problems: dict = MEMBER, *, page: str | None = None,
          links: dict[str, tuple[str, str]] | None = None) -> dict[int | str, dict[str, Any]]:
    """`problems` plus the Link header of a paged answer's 200 (RFC 8288). `links` maps each rel
    to its cursor parameter and what follows (default: rel="next", before=, older `what`); an
    answer with several lists carries one link-value per list that continues, in this order."""
    links = links or {"next": ("before", f"older {what}")}
    values = [f'<the same path and query with {param}=CURSOR>; rel="{rel}" when {more} follow'
              for rel, (param, more) in links.items()]
    # Every non-empty selection of the rels, in their order: what page_of can send.
    rels = list(links)
    choices = [[r for i, r in enumerate(rels) if mask >> i & 1] for mask in range(1, 1 << len(rels))]
    pattern = "|".join(", ".join(f'<[^>]+>; rel="{r}"' for r in chosen) for chosen in choices)
    description = "; ".join(values) + ("" if len(values) == 1 else "; comma-separated, in this order, when "
                                       "several lists continue (each link changes only its own cursor)")
    return {**problems, 200: {"description": page or f"a page of {what}, newest first", "headers": {"Link": {
        "description": f"{description}; absent on the last page",
        "schema": {"type": "string", "pattern": f"^{pattern}$" if len(choices) == 1 else f"^({pattern})$"}}}}}


# Retirements are for good: a retry of a request that may have reached the server must find what
# it made, not retire again (the IETF's Idempotency-Key header; Stripe's convention). An operator's
# freeze, unfreeze or cancel takes one too: its retry would otherwise be refused as already moved.
IdempotencyKey = Annotated[str | None, Header(
    alias="Idempotency-Key", min_length=1, max_length=48, pattern=r"^[!-~]+$",
    description="makes a retry safe: a repeat with the same key answers with what the first made "
                "(Idempotent-Replayed: true) and changes nothing; the same key with another request is "
                "422 idempotency_key_reused. 1-48 visible ASCII characters, per account, kept for good")]
REPLAYED = {"Idempotent-Replayed": {"description": "true when the answer is the one an earlier request with the "
                                                   "same Idempotency-Key made", "schema": {"type": "string",
                                                                                           "enum": ["true"]}}}


def request_digest(*parts: Any) -> bytes:
    """What identifies a request under an idempotency key: what it does, in parsed values, so that
    "1.0" and "1.000" tonnes, or forest-2023 and FOREST-2023, are the same request."""
    return hashlib.sha256(orjson.dumps(parts)).digest()


def idempotency_key(request: Request, key: IdempotencyKey = None) -> str | None:
    """The request's Idempotency-Key; two of them are refused (which would a retry carry?)."""
    if len(request.headers.getlist("idempotency-key")) > 1:
        raise CarbonxError("invalid_request", "give one Idempotency-Key header")
    return key


OneIdempotencyKey = Annotated[str | None, Depends(idempotency_key)]


def created(body: Any, replayed: bool) -> JSONResponse:
    return JSON(body, status_code=201, headers={"Idempotent-Replayed": "true"} if replayed else None)


def page_of(request: Request, response: Response, rows: list, limit: int, cursor: Callable[[Any], str],
            param: str = "before", rel: str = "next", url: URL | None = None) -> list:
    """The first `limit` of `rows`, which were read as `limit` + 1: a next page exists exactly when
    the one more came back. Then the answer carries RFC 8288 `rel`: this request again with
    `param`= the cursor of the page's last entry, as an absolute URL (as GitHub sends it: clients
    such as requests' `response.links` follow it as it is), built from the request's own URL, so
    it names this server as the client reached it. An answer with several paged lists calls this
    once per list; their link-values share the one header, and each changes only its own cursor.
    `url`, when given, is the request the link repeats instead of this one (another route's)."""
    if len(rows) <= limit:
        return rows
    rows = rows[:limit]
    given = request.query_params if url is None else QueryParams(url.query)
    query = [(k, v) for k, v in given.multi_items() if k != param] + [(param, cursor(rows[-1]))]
    link = f'<{(url or request.url).replace(query=urlencode(query))}>; rel="{rel}"'
    response.headers["Link"] = f'{response.headers["Link"]}, {link}' if "Link" in response.headers else link
    return rows


def problem_response(code: str, detail: str, status: int | None = None,
                     headers: dict[str, str] | None = None) -> Response:
    body = problem(code, detail, status)
    return Response(orjson.dumps(body), status_code=body["status"], media_type=PROBLEM, headers=headers)


def create_app(ctx: Context) -> FastAPI:
    app = FastAPI(
        title="carbonx", version="1.0",
        description="Exchange, clearing house and registry for certified carbon-inclusion reductions. "
                    "Prices are CNY per tonne, quantities tonnes, cash CNY, all as decimal strings.",
        default_response_class=JSON, openapi_url="/openapi.json", docs_url=None, redoc_url=None,
        # A path with a slash too many is not found rather than redirected: DELETE /v1/orders/
        # (an empty order id) was sent on to DELETE /v1/orders, cancel-all, by any client that
        # follows redirects.
        redirect_slashes=False,
    )
    app.state.ctx = ctx
    service, market, gate, trading = ctx.service, ctx.market, ctx.gate, ctx.trading

    @app.exception_handler(CarbonxError)
    async def _domain(request: Request, e: CarbonxError) -> Response:
        if request.url.path in BINANCE_PATHS:
            return binance_domain_error(e)
        return problem_response(e.code, e.message, headers=error_headers(e))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> Response:
        first = e.errors()[0] if e.errors() else {}
        if request.url.path in BINANCE_PATHS:
            return binance_invalid(first)
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return problem_response("invalid_request", f"{where}: {first.get('msg', 'invalid')}" if where else
                                str(first.get("msg", "invalid request")), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "invalid_request")
        return problem_response(code, str(e.detail), e.status_code)

    # A bug's 500 is answered by LastResort, which keeps the connection; this handler (Starlette's
    # outermost, which answers and then re-raises to the server, so uvicorn closes the
    # connection) only sees what escapes the middleware itself.
    @app.exception_handler(Exception)
    async def _crash(_: Request, e: Exception) -> Response:
        log.error("unhandled error", exc_info=e)
        return problem_response("internal_error", f"{type(e).__name__}", 500)

    app.add_middleware(LastResort)

    # ---- who is calling ----------------------------------------------------------------------

    async def caller(request: Request) -> Account:
        key = bearer(request.headers.get("authorization"))
        account = await gate.account(key)
        gate.admit(None, key)
        return account

    async def member(account: Annotated[Account, Depends(caller)]) -> Account:
        if account.role != "member":
            raise CarbonxError("forbidden", "only member accounts trade, hold and retire")
        return account

    async def operator(account: Annotated[Account, Depends(caller)]) -> Account:
        if account.role != "operator":
            raise CarbonxError("forbidden", "only the operator may do this")
        return account

    Member = Annotated[Account, Depends(member)]
    Operator = Annotated[Account, Depends(operator)]
    Symbol = Annotated[str, Path(min_length=1, max_length=40)]

    def instrument(symbol: str) -> Listing:
        listing = service.core.listings.get(symbol)
        if listing is None:
            raise CarbonxError("unknown_instrument", f"no instrument {symbol!r}")
        return listing

    def market_data(symbol: str) -> None:
        """For the routes that read the market data: the core lists an instrument when the listing
        is sequenced, the market data (books, tapes, tickers) only when that entry is durable
        (exchange/marketdata.py), so in between the instrument is listed but has no book yet. Until
        the market data knows it, it is unknown here (404), never a KeyError's 500."""
        if symbol not in market.books:
            raise CarbonxError("unknown_instrument", f"no instrument {symbol!r}")

    async def db(fn: Callable[[asyncpg.Connection], Awaitable[Any]]) -> Any:
        async with service.pool.acquire() as conn:
            return await fn(conn)

    # ---- public ------------------------------------------------------------------------------

    @app.get("/v1/health", response_model=M.Health, responses=PUBLIC, tags=["public"])
    async def health() -> Any:
        ok = service.failure is None
        return {"status": "ok" if ok else "unavailable", "seq": service.core.seq, "durable_seq": service.durable_seq,
                "instruments": len(service.core.listings), "time": iso(time.time_ns() // 1000)}

    async def instrument_view(symbol: str, projects: dict[str, Any], halted: bool | None = None) -> dict[str, Any]:
        """The instrument as it stands, or with `halted` as a halt or resume left it (another
        operator's may have been sequenced since)."""
        listing = instrument(symbol)
        rules = listing.rules
        code, _, vintage = symbol.rpartition("-")
        proj = projects.get(code)
        if halted is None:
            halted = service.core.engine.is_halted(symbol)
        # The service's clock, which order entry is held to (a test's or a replay's may not be now).
        status = market_status(rules, halted, service.clock())
        return {
            "symbol": symbol, "project": code if proj else None, "project_name": proj["name"] if proj else None,
            "vintage": int(vintage) if vintage.isdigit() else None,
            "methodology": proj["methodology"] if proj else None,
            "tick": format_price(rules.tick), "lot": format_tonnes(rules.lot),
            "min_quantity": format_tonnes(rules.min_qty),
            "price_band": status["price_band"], "band_percent": format_price(rules.band_bp),
            "reference_price": status["reference_price"], "session": status["session"],
            "maker_fee_bp": listing.maker_bp, "taker_fee_bp": listing.taker_bp,
            "resale_rule": "T+1" if listing.t1 else "T+0",
        }

    async def project_index() -> dict[str, Any]:
        rows = await service.pool.fetch("SELECT code, name, methodology FROM projects")
        return {r["code"]: r for r in rows}

    @app.get("/v1/instruments", response_model=list[M.Instrument], responses=PUBLIC, tags=["public"])
    async def instruments() -> Any:
        projects = await project_index()
        return [await instrument_view(s, projects) for s in sorted(service.core.listings)]

    @app.get("/v1/instruments/{symbol}", response_model=M.Instrument, responses=PUBLIC, tags=["public"])
    async def instrument_one(symbol: Symbol) -> Any:
        instrument(symbol)
        return await instrument_view(symbol, await project_index())

    @app.get("/v1/book/{symbol}", response_model=M.Book, responses=PUBLIC, tags=["public"])
    async def book(symbol: Symbol, depth: Annotated[int, Query(ge=1, le=MAX_DEPTH)] = 100) -> Any:
        market_data(symbol)
        b = market.books[symbol]
        bids, asks = levels(b.top(E.BID, depth)), levels(b.top(E.ASK, depth))
        # Over the top min(10, depth) levels, as the feed's depth-N messages (api/README.md).
        return {"symbol": symbol, "seq": b.seq, "bids": bids, "asks": asks, "checksum": checksum(asks, bids)}

    def trade_view(t: Any) -> dict[str, Any]:
        return {"symbol": t.symbol, "trade_id": str(t.trade_id), "price": format_price(t.price),
                "quantity": format_tonnes(t.qty), "taker_side": "buy" if t.taker_side == E.BID else "sell",
                "time": iso(t.ts)}

    @app.get("/v1/trades/{symbol}", response_model=list[M.TradeView], responses=paged("trades", PUBLIC),
             tags=["public"])
    async def trades(request: Request, response: Response, symbol: Symbol,
                     limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                     before: Annotated[M.IdInput | None, Query(
                         description="only trades with a smaller trade_id (older): the next page's cursor, as "
                                     "the Link header of the previous page gives it")] = None) -> Any:
        market_data(symbol)
        tape = market.tapes[symbol]
        # Trade ids count from 1 per instrument: the tape answers a first page when it holds one
        # more than the page, or every trade there is; older pages come from the history table.
        if before is None and (len(tape) > limit or not tape or tape[0].trade_id == 1):
            rows = list(islice(reversed(tape), limit + 1))
        else:
            await service.caught_up(orders=True)
            rows = [trade_from_row(r) for r in await service.pool.fetch(
                """SELECT symbol, trade_id, price_fen, qty_kg, taker_side, ts, seq FROM trades
                   WHERE symbol = $1 AND ($2::bigint IS NULL OR trade_id < $2) ORDER BY trade_id DESC LIMIT $3""",
                symbol, before, limit + 1)]
        return [trade_view(t) for t in page_of(request, response, rows, limit, lambda t: str(t.trade_id))]

    @app.get("/v1/ticker/{symbol}", response_model=M.Ticker, responses=PUBLIC, tags=["public"])
    async def ticker(symbol: Symbol) -> Any:
        market_data(symbol)
        v = market.ticker(symbol, time.time_ns() // 1000)
        return {"symbol": symbol, **{k: format_price(v[k]) if v[k] is not None else None
                                     for k in ("last", "open", "high", "low", "vwap")},
                "volume": format_tonnes(v["volume"]), "time": iso(market.ts)}

    @app.get("/v1/candles/{symbol}", response_model=list[M.Candle], responses=PUBLIC, tags=["public"])
    async def candles(symbol: Symbol, interval: Annotated[str, Query(pattern="^(1m|1h|1d)$")] = "1m",
                      limit: Annotated[int, Query(ge=1, le=1000)] = 500) -> Any:
        instrument(symbol)
        step = {"1m": 60_000_000, "1h": 3_600_000_000, "1d": 86_400_000_000}[interval]
        await service.caught_up(orders=True)
        # Days are Asia/Shanghai trading days (UTC+8, no DST), as the day's close and the settlement
        # report count them: a UTC day put 23:30 and 00:30 of two trading days in one candle.
        # Only the trades of the newest `limit` intervals that have any are read: their starts are
        # found newest first, one index probe each (trades_by_time), then those trades by a range
        # with both ends (a one-sided bound on a parameter planned as a third of the table, a
        # scan). Grouping every trade of the instrument took 158 ms a request over a million
        # trades, on a public endpoint (review16).
        span = await service.pool.fetchrow(
            """WITH RECURSIVE buckets(start, n) AS (
                   SELECT (max(ts) + $4) / $2 * $2 - $4, 1 FROM trades WHERE symbol = $1
                 UNION ALL
                   SELECT (SELECT (max(t.ts) + $4) / $2 * $2 - $4 FROM trades t
                           WHERE t.symbol = $1 AND t.ts < b.start), b.n + 1
                   FROM buckets b WHERE b.start IS NOT NULL AND b.n < $3)
               SELECT min(start) AS first, max(start) + $2 AS after FROM buckets""",
            symbol, step, limit, SHANGHAI_OFFSET_US)
        rows = [] if span["first"] is None else await service.pool.fetch(
            """SELECT (ts + $4) / $2 * $2 - $4 AS start,
                      (array_agg(price_fen ORDER BY trade_id))[1] AS open, max(price_fen) AS high,
                      min(price_fen) AS low, (array_agg(price_fen ORDER BY trade_id DESC))[1] AS close,
                      sum(qty_kg)::bigint AS volume, count(*)::int AS trades
               FROM trades WHERE symbol = $1 AND ts >= $5 AND ts < $6
               GROUP BY 1 ORDER BY 1 DESC LIMIT $3""", symbol, step, limit, SHANGHAI_OFFSET_US, span["first"],
            span["after"])
        return [{"start": iso(r["start"]), "open": format_price(r["open"]), "high": format_price(r["high"]),
                 "low": format_price(r["low"]), "close": format_price(r["close"]),
                 "volume": format_tonnes(r["volume"]), "trades": r["trades"]} for r in reversed(rows)]

    # ---- public registry ---------------------------------------------------------------------

    async def project_view(conn: asyncpg.Connection, p: registry.Project, detail: bool) -> dict[str, Any]:
        dev = await conn.fetchval("SELECT code FROM accounts WHERE id = $1", p.developer_account_id)
        out: dict[str, Any] = {"code": p.code, "scheme": p.scheme, "name": p.name, "methodology": p.methodology,
                               "region": p.region, "developer": dev, "status": p.status}
        if detail:
            issued = await conn.fetchval(
                "SELECT coalesce(sum(quantity_kg), 0)::bigint FROM issuances WHERE project_id = $1", p.id)
            retired = await conn.fetchval(
                """SELECT coalesce(sum(upper(b.serials) - lower(b.serials)), 0)::bigint FROM blocks b
                   JOIN issuances i ON i.id = b.issuance_id WHERE i.project_id = $1 AND b.state = 'retired'""", p.id)
            iss = await registry.list_issuances(conn, p.id)
            # Its instruments by name, each one's total kept as trades are written (migration
            # 0013): `LIKE code || '-____'` read the whole trades table each time, and summing
            # even its own took 80 ms for an instrument with a million trades (review16).
            traded = await conn.fetchval(
                "SELECT coalesce(sum(traded_kg), 0)::bigint FROM instrument_volume WHERE symbol = ANY($1)",
                sorted({f"{p.code}-{i.vintage}" for i in iss}))
            out.update(issued=format_tonnes(issued), retired=format_tonnes(retired), traded=format_tonnes(traded),
                       issuances=[{"id": str(i.id), "vintage": i.vintage, "serial": i.serial,
                                   "quantity": format_tonnes(i.quantity)} for i in iss])
        return out

    @app.get("/v1/registry/projects", response_model=list[M.ProjectView], responses=PUBLIC, tags=["registry"])
    async def projects() -> Any:
        async def q(conn: asyncpg.Connection) -> Any:
            return [await project_view(conn, p, False) for p in await registry.list_projects(conn)]
        return await db(q)

    @app.get("/v1/registry/projects/{code}", response_model=M.ProjectView, responses=PUBLIC, tags=["registry"])
    async def project(code: Annotated[str, Path(min_length=1, max_length=32)]) -> Any:
        await service.caught_up(orders=True)

        async def q(conn: asyncpg.Connection) -> Any:
            return await project_view(conn, await registry.get_project(conn, code), True)
        return await db(q)

    def block_view(iss: registry.Issuance, b: dict[str, Any]) -> dict[str, Any]:
        return {"serial": format_serial(iss.scheme, iss.project_code, iss.vintage, b["lo"], b["hi"]),
                "quantity": format_tonnes(b["hi"] - b["lo"]), "holder": b["owner"], "state": b["state"],
                "certificate_code": b.get("certificate_code")}

    RegistryLimit = Annotated[int, Query(ge=1, le=500, description="the most entries of each list in the answer")]

    async def issuance_page(request: Request, response: Response, issuance_id: int, limit: int,
                            after: int = 0, url: URL | None = None) -> dict[str, Any]:
        async def q(conn: asyncpg.Connection) -> Any:
            iss = await registry.get_issuance(conn, issuance_id)
            to = await conn.fetchval("SELECT code FROM accounts WHERE id = $1", iss.issued_to_account_id)
            return iss, to, await registry.issuance_blocks(conn, issuance_id, limit=limit + 1, after=after)
        iss, to, blocks = await db(q)
        blocks = page_of(request, response, blocks, limit, lambda b: str(b["hi"] - 1), param="after", url=url)
        return {"id": str(iss.id), "project": iss.project_code, "vintage": iss.vintage, "serial": iss.serial,
                "quantity": format_tonnes(iss.quantity), "issued_to": to,
                "blocks": [block_view(iss, b) for b in blocks]}

    ISSUANCE_LINKS = {"next": ("after", "blocks further on in serial order")}

    @app.get("/v1/registry/issuances/{issuance_id}", response_model=M.IssuanceView, tags=["registry"],
             responses=paged("blocks", PUBLIC, page="the issuance with a page of its blocks, in serial order",
                             links=ISSUANCE_LINKS))
    async def issuance(request: Request, response: Response, issuance_id: Annotated[int, Path(ge=1, le=2**62)],
                       limit: RegistryLimit = 100,
                       after: Annotated[M.SerialNumberInput | None, Query(
                           description="only units at greater serial numbers (the block holding the next one cut "
                                       "to start there): the next page's cursor, the last unit of the page before, "
                                       "as the Link header of the previous page gives it")] = None) -> Any:
        return await issuance_page(request, response, issuance_id, limit, after or 0)

    def movement_view(iss: registry.Issuance, h: dict[str, Any]) -> dict[str, Any]:
        return {"id": str(h["id"]),
                "serial": format_serial(iss.scheme, iss.project_code, iss.vintage, h["lo"], h["hi"]),
                "quantity": format_tonnes(h["hi"] - h["lo"]), "from_account": h["from_account"],
                "from_state": h["from_state"], "to_account": h["to_account"], "to_state": h["to_state"],
                "cause": h["cause"], "reference": h["cause_ref"], "time": iso_datetime(h["created_at"])}

    @app.get("/v1/registry/serials/{serial}", response_model=M.SerialView, tags=["registry"], responses=paged(
        "movements", PUBLIC, page="the range with a page of its movements (oldest first) and a page of its holders "
                                  "(in serial order)",
        links={"next": ("after", "newer movements"), "next-holders": ("holders_after", "more holders")}))
    async def serial(request: Request, response: Response, serial: Annotated[str, Path(min_length=1, max_length=120)],
                     limit: RegistryLimit = 100,
                     after: Annotated[M.IdInput | None, Query(
                         description="only movements with a greater id (newer): the next page of `history`, as the "
                                     'Link header rel="next" of the previous page gives it')] = None,
                     holders_after: Annotated[M.SerialNumberInput | None, Query(
                         description="only the range's units at greater serial numbers (blocks cut to start "
                                     'there): the next page of `holders`, as the Link header rel="next-holders" '
                                     "gives it")] = None) -> Any:
        async def q(conn: asyncpg.Connection) -> Any:
            return await registry.serial_history(conn, serial, limit=limit + 1, after=after or 0,
                                                 holders_after=holders_after or 0)
        iss, rng, hist, now = await db(q)
        # The history's link first, so that the header's order is the one /openapi.json states.
        hist = page_of(request, response, hist, limit, lambda h: str(h["id"]), param="after")
        now = page_of(request, response, now, limit, lambda b: str(b["hi"] - 1), param="holders_after",
                      rel="next-holders")
        return {"serial": format_serial(iss.scheme, iss.project_code, iss.vintage, rng.lo, rng.hi),
                "issuance_id": str(iss.id), "history": [movement_view(iss, h) for h in hist],
                "holders": [block_view(iss, b) for b in now]}

    async def retirement_views(conn: asyncpg.Connection, where: str, *args: Any, limit: int = 100) -> list:
        rows = await conn.fetch(
            f"""SELECT r.id, r.certificate_code, a.code AS account, r.beneficiary, r.purpose, r.quantity_kg,
                       r.created_at FROM retirements r JOIN accounts a ON a.id = r.account_id
                WHERE {where} ORDER BY r.id DESC LIMIT {int(limit)}""", *args)
        serials = await registry.retired_serials(conn, [r["id"] for r in rows])
        return [{"id": str(r["id"]), "certificate_code": r["certificate_code"], "account": r["account"],
                 "beneficiary": r["beneficiary"], "purpose": r["purpose"], "quantity": format_tonnes(r["quantity_kg"]),
                 "time": iso_datetime(r["created_at"]), "serials": serials[r["id"]]} for r in rows]

    @app.get("/v1/registry/retirements", response_model=list[M.RetirementView],
             responses=paged("retirements", PUBLIC), tags=["registry"])
    async def retirements(request: Request, response: Response,
                          account: Annotated[str | None, Query(max_length=40)] = None,
                          project: Annotated[str | None, Query(max_length=32)] = None,
                          limit: Annotated[int, Query(ge=1, le=500)] = 100,
                          before: Annotated[M.IdInput | None, Query(
                              description="only retirements with a smaller id (older): the next page's cursor, "
                                          "as the Link header of the previous page gives it")] = None) -> Any:
        # Only the filters asked for, each one an index can serve: `($1 IS NULL OR ...)` planned
        # once for every case read the whole table for a member with few retirements, and a
        # project's were found by testing every retirement newest first (review16: 40-65 ms a
        # page over 600,000 retirements). The clauses are this code's, the values parameters.
        where, args = ["true"], []
        # Codes are upper case (the registry's rule); a filter typed in lower case means the same.
        account, project = (None if v is None else v.strip().upper() for v in (account, project))
        if account is not None:  # by id: a subquery's value is unknown when planning, and it read them all
            args.append(await db(lambda conn: conn.fetchval("SELECT id FROM accounts WHERE code = $1", account)))
            if args[-1] is None:
                return page_of(request, response, [], limit, lambda r: r["id"])
            where.append(f"r.account_id = ${len(args)}")
        if project is not None:
            args.append(project)
            where.append(f"""r.id IN (SELECT b.retirement_id FROM blocks b JOIN issuances i ON i.id = b.issuance_id
                                      JOIN projects p ON p.id = i.project_id
                                      WHERE p.code = ${len(args)} AND b.state = 'retired')""")
        if before is not None:
            args.append(before)
            where.append(f"r.id < ${len(args)}")

        async def q(conn: asyncpg.Connection) -> Any:
            return await retirement_views(conn, " AND ".join(where), *args, limit=limit + 1)
        return page_of(request, response, await db(q), limit, lambda r: r["id"])

    async def certificate_data(code: str) -> dict[str, Any]:
        return await db(lambda conn: registry.retirement_by_code(conn, code))

    # A PDF takes a good part of a second to lay out (300 serial ranges: 0.55 s), in a thread so
    # that order entry and the feed go on meanwhile (it held the loop: review30); two at a time,
    # as more threads would only take turns at the interpreter with the loop.
    pdf_turns = asyncio.Semaphore(2)

    async def rendered(request: Request, code: str, kind: str, media: str) -> Response:
        data = await certificate_data(code)
        render = (ctx.renderers or {}).get(kind)
        if render is None:
            raise CarbonxError("not_found", f"certificates as {kind} are not available on this server")
        if kind != "pdf":
            return Response(render(data, ctx.public_base(request)), media_type=media)
        async with pdf_turns:
            return Response(await asyncio.to_thread(render, data, ctx.public_base(request)), media_type=media)

    CertCode = Annotated[str, Path(min_length=1, max_length=64)]

    @app.get("/v1/certificates/{code}.html", response_class=Response, tags=["registry"],
             responses={**PUBLIC, 200: {"content": {"text/html": {"schema": {"type": "string"}}},
                                        "description": "the certificate as a printable page"}})
    async def certificate_html(request: Request, code: CertCode) -> Response:
        return await rendered(request, code, "html", "text/html; charset=utf-8")

    @app.get("/v1/certificates/{code}.pdf", response_class=Response, tags=["registry"],
             responses={**PUBLIC, 200: {"content": {"application/pdf": {"schema": {"type": "string",
                                                                                  "format": "binary"}}},
                                        "description": "the certificate as PDF"}})
    async def certificate_pdf(request: Request, code: CertCode) -> Response:
        return await rendered(request, code, "pdf", "application/pdf")

    @app.get("/verify/{code}", include_in_schema=False)
    async def verify_page(request: Request, code: CertCode) -> Response:
        """The public verification page a certificate's QR code points to."""
        try:
            data = await certificate_data(code)
            return Response(certificates.render_certificate_html(
                data, certificates.verification_url(ctx.public_base(request), data["certificate_code"]), verified=True),
                media_type="text/html; charset=utf-8")
        except CarbonxError as e:
            if e.code != "not_found":
                raise
            body = (f"<!doctype html><meta charset=utf-8><title>Not a carbonx certificate</title>"
                    f"<h1>No certificate {html.escape(code)}</h1><p>This code was never issued by this registry: "
                    "the certificate is not genuine. / 本登记簿未签发此证书编号，证书无效。</p>")
            return Response(body, status_code=404, media_type="text/html; charset=utf-8")

    @app.get("/v1/certificates/{code}", response_model=M.Certificate, responses=PUBLIC, tags=["registry"])
    async def certificate(code: CertCode) -> Any:
        data = await certificate_data(code)
        return {"certificate_code": data["certificate_code"], "beneficiary": data["beneficiary"],
                "purpose": data["purpose"], "quantity": format_tonnes(data["quantity_kg"]),
                "account": data["account"], "time": iso_datetime(data["created_at"]),
                "ranges": [{"serial": r["serial"], "project": r["project"], "project_name": r["project_name"],
                            "methodology": r["methodology"], "vintage": r["vintage"],
                            "quantity": format_tonnes(r["hi"] - r["lo"])} for r in data["ranges"]],
                "verified": True}

    # ---- member --------------------------------------------------------------------------------

    @app.post("/v1/orders", status_code=201, response_model=M.Order, responses=MEMBER, tags=["orders"])
    async def place(req: M.OrderRequest, who: Member) -> Any:
        return JSON(await trading.place(who.id, req), status_code=201)

    @app.get("/v1/orders", response_model=list[M.Order], responses=paged("the caller's orders"), tags=["orders"])
    async def orders(request: Request, response: Response, who: Member,
                     status: Annotated[str, Query(pattern="^(open|all)$")] = "open",
                     symbol: Annotated[str | None, Query(max_length=40)] = None,
                     limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                     before: Annotated[M.IdInput | None, Query(
                         description="only orders with a smaller order_id (older): the next page's cursor, "
                                     "as the Link header of the previous page gives it")] = None) -> Any:
        if symbol is not None:
            instrument(symbol)  # as DELETE /v1/orders?symbol= does
        await service.caught_up(orders=True)
        async with service.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            rows = await conn.fetch(
                """SELECT * FROM orders WHERE account_id = $1 AND ($2 OR status IN ('new', 'partially_filled'))
                     AND ($3::text IS NULL OR symbol = $3) AND ($5::bigint IS NULL OR order_id < $5)
                   ORDER BY order_id DESC LIMIT $4""",
                who.id, status == "all", symbol, limit + 1, before)
            rows = page_of(request, response, rows, limit, lambda r: str(r["order_id"]))
            fills = await fills_of(conn, who.id, [r["order_id"] for r in rows])
        return [order_view(order_from_row(r), fills.get(r["order_id"], [])) for r in rows]

    async def fills_of(conn: asyncpg.Connection, account: int, order_ids: list[int]) -> dict[int, list[Fill]]:
        """The fills of these orders of `account`, in one query: each order's newest ORDER_FILLS,
        oldest first, as GET /v1/orders/{id} shows them (one busy order must not make the list
        unbounded)."""
        out: dict[int, list[Fill]] = {}
        if not order_ids:
            return out
        rows = await conn.fetch(
            """SELECT * FROM (SELECT f.*, row_number() OVER (PARTITION BY order_id
                                                             ORDER BY seq DESC, trade_id DESC) AS n
                                FROM fills f WHERE account_id = $1 AND order_id = ANY($2::bigint[])) newest
               WHERE n <= $3 ORDER BY seq, trade_id""", account, order_ids, ORDER_FILLS)
        for r in rows:
            out.setdefault(r["order_id"], []).append(fill_from_row(r))
        return out

    # As every id the API takes (M.IdInput): decimal digits only. A plain int parameter took
    # "12.0", "+12", " 12" and "1_2" as order 12, which the websocket refuses.
    OrderId = Annotated[M.IdInput, Path()]

    @app.get("/v1/orders/{order_id}", response_model=M.Order, responses=MEMBER, tags=["orders"])
    async def order(order_id: OrderId, who: Member) -> Any:
        return await trading.order(who.id, order_id)

    @app.delete("/v1/orders/{order_id}", response_model=M.Order, responses=MEMBER, tags=["orders"])
    async def cancel(order_id: OrderId, who: Member) -> Any:
        return await trading.cancel(who.id, order_id)

    @app.delete("/v1/orders", response_model=M.CancelAll, responses=MEMBER, tags=["orders"])
    async def cancel_all(who: Member, symbol: Annotated[str | None, Query(max_length=40)] = None) -> Any:
        return {"cancelled": await trading.cancel_all(who.id, symbol)}

    @app.patch("/v1/orders/{order_id}", response_model=M.Order, responses=MEMBER, tags=["orders"])
    async def amend(order_id: OrderId, req: M.AmendRequest, who: Member) -> Any:
        return await trading.amend(who.id, order_id, req)

    @app.get("/v1/fills", response_model=list[M.Fill], responses=paged("the caller's fills"), tags=["orders"])
    async def fills(request: Request, response: Response, who: Member,
                    symbol: Annotated[str | None, Query(max_length=40)] = None,
                    order_id: Annotated[M.IdInput | None, Query(
                        description="only the fills of this order of the caller's (404 for any other)")] = None,
                    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                    before: Annotated[M.CursorText | None, Query(
                        description="only fills older than this cursor: the next page's, as the Link header "
                                    "of the previous page gives it; opaque")] = None) -> Any:
        if symbol is not None:
            instrument(symbol)
        cursor = None
        if before is not None:
            try:
                cursor = M.fill_cursor(before)
            except ValueError as e:
                raise CarbonxError("invalid_request", f"query.before: {e}") from None
            if cursor.symbol not in service.core.listings:  # a fill's symbol is always listed
                raise CarbonxError("invalid_request", f"query.before: not a fills cursor of this exchange, "
                                                      f"got {before[:60]!r}")
        if order_id is not None and not await trading.owns(who.id, order_id):
            raise CarbonxError("not_found", f"no order {order_id}")  # as GET /v1/orders/{order_id}
        page = page_of(request, response,
                       await trading.fills(who.id, order_id=order_id, symbol=symbol, limit=limit + 1, before=cursor),
                       limit, lambda f: str(M.FillCursor(f.seq, f.symbol, f.trade_id, SIDE[f.side])))
        return [fill_view(f) for f in page]

    @app.patch("/v1/account", response_model=M.AccountView, responses=MEMBER, tags=["account"])
    async def account_settings(req: M.AccountSettings, who: Member) -> Any:
        mode = STP_MODES.index(req.self_trade_prevention) + 1
        if service.core.stp.get(who.id, E.STP_CANCEL_RESTING) != mode:  # journal a change only
            out = await service.submit({"op": "stp", "account": who.id, "mode": mode})
            if out.code is not None:
                raise CarbonxError(out.code, out.detail or out.code)
        return await account(who)

    @app.get("/v1/account", response_model=M.AccountView, responses=MEMBER, tags=["account"])
    async def account(who: Annotated[Account, Depends(caller)]) -> Any:
        core = service.core
        balance, reserved = core.cash.get(who.id, [0, 0])
        holdings = []
        now = max(service.clock(), core.ts)
        for symbol in sorted(core.credits):
            # as of now: yesterday's purchases are no longer locked (T+1), though the stored
            # position frees them only when next touched
            available, encumbered, locked = core.position(symbol, who.id, now)
            if available or encumbered or locked:
                holdings.append({"symbol": symbol, "available": format_tonnes(available),
                                 "encumbered": format_tonnes(encumbered), "locked": format_tonnes(locked)})
        # Retired and frozen credits are the registry's: the core no longer holds them (a freeze
        # takes them out of trading), yet they are the member's, and a frozen holding that simply
        # vanished from its account would be a mystery to it.
        rows = await service.pool.fetch(
            """SELECT b.state, p.code, i.vintage, sum(upper(b.serials) - lower(b.serials))::bigint AS kg
               FROM blocks b JOIN issuances i ON i.id = b.issuance_id JOIN projects p ON p.id = i.project_id
               WHERE b.owner_account_id = $1 AND b.state IN ('retired', 'frozen') GROUP BY 1, 2, 3 ORDER BY 1, 2, 3""",
            who.id)
        by_state: dict[str, list[dict[str, str]]] = {"retired": [], "frozen": []}
        for r in rows:
            by_state[r["state"]].append({"symbol": f"{r['code']}-{r['vintage']}", "quantity": format_tonnes(r["kg"])})
        return {"code": who.code, "name": who.name, "kind": who.kind, "role": who.role,
                "cash_available": format_cash(balance - reserved), "cash_reserved": format_cash(reserved),
                "holdings": holdings, "retired": by_state["retired"], "frozen": by_state["frozen"],
                "self_trade_prevention": STP_MODES[core.stp.get(who.id, E.STP_CANCEL_RESTING) - 1]}

    @app.post("/v1/retirements", status_code=201, response_model=M.RetirementView,
              responses={**MEMBER, 201: {"description": "the retirement", "headers": REPLAYED}}, tags=["registry"])
    async def retire(req: M.RetireRequest, who: Member, key: OneIdempotencyKey) -> Any:
        if (req.symbol is None) == (req.issuance_id is None):
            raise CarbonxError("invalid_request", "give exactly one of symbol or issuance_id")
        kg = _units(parse_tonnes, req.quantity, "quantity", most=MAX_RETIRE_KG)
        request = None
        if key is not None:
            # As split_symbol reads it; a bad symbol is the service's to refuse, in its usual order.
            symbol = req.symbol.strip().upper() if req.symbol is not None else None
            request = (key, request_digest("retire", symbol, req.issuance_id, kg, req.beneficiary.strip(),
                                           req.purpose.strip()))
        r = await service.retire(account=who.code, quantity_kg=kg, beneficiary=req.beneficiary,
                                 purpose=req.purpose, symbol=req.symbol, issuance_id=req.issuance_id, request=request)
        views = await db(lambda conn: retirement_views(conn, "r.id = $1", r.id))
        return created(views[0], r.replayed)

    # ---- neutrality --------------------------------------------------------------------------

    def estimate_view(e: dict[str, Any]) -> dict[str, Any]:
        per = e["per_attendee_day_g"]
        return {"factor_table_version": e["factor_table_version"], "total": format_tonnes(e["total_kg"]),
                "offset": format_tonnes(e["offset_kg"]),
                "categories": {c: format_tonnes(kg) for c, kg in e["categories_kg"].items()},
                "lines": [{k: v for k, v in line.items() if k != "g"} | {"co2e": format_decimal(line["g"], 6)}
                          for line in e["lines"]],
                "attendees": e["attendees"], "days": e["days"],
                "per_attendee_day": format_decimal(per, 6) if per is not None else None, "rounding": e["rounding"]}

    @app.post("/v1/neutrality/estimate", response_model=M.Estimate, responses=PUBLIC, tags=["neutrality"])
    async def estimate(activity: dict) -> Any:
        return estimate_view(neutrality.estimate_footprint(activity))

    @app.get("/v1/neutrality/factors", response_model=dict[str, Any], responses=PUBLIC, tags=["neutrality"])
    async def factors() -> Any:
        return neutrality.describe_factor_table()

    def offset_quantity(est: dict[str, Any] | None, quantity: str | None, lot: int) -> int:
        """Kilograms to buy and retire. A footprint is rounded up to whole lots (it is a need, not an
        order size); an explicit quantity is an order size, so one finer than the lot is refused,
        never rounded (API.md)."""
        if est is not None:
            return neutrality.quantity_to_offset(est["offset_kg"], lot)
        kg = _units(parse_tonnes, quantity, "quantity", most=MAX_RETIRE_KG)
        if kg % lot:
            raise CarbonxError("invalid_lot", f"quantity {quantity} is not a whole number of lots of "
                                              f"{format_tonnes(lot)} t")
        return kg

    @app.post("/v1/neutrality/offset", status_code=201, response_model=M.OffsetResult,
              responses={**MEMBER, 201: {"description": "what was bought and retired", "headers": REPLAYED}},
              tags=["neutrality"])
    async def offset(http: Request, req: M.OffsetRequest, who: Member, key: OneIdempotencyKey) -> Any:
        symbol = req.symbol.strip().upper()  # as a retirement reads it
        listing = instrument(symbol)
        if (req.activity is None) == (req.quantity is None):
            raise CarbonxError("invalid_request", "give exactly one of activity or quantity")
        est = neutrality.estimate_footprint(req.activity) if req.activity is not None else None
        kg = offset_quantity(est, req.quantity, listing.rules.lot)
        if kg <= 0:
            raise CarbonxError("invalid_request", "nothing to offset: the footprint is zero")
        if kg > MAX_RETIRE_KG:  # an explicit quantity is refused so already; this is a footprint's
            raise CarbonxError("invalid_request", f"the footprint, {format_tonnes(kg)} t, is more than one offset "
                                                  f"can retire ({format_tonnes(MAX_RETIRE_KG)} t)")
        cap = _units(parse_cash, req.max_cash, "max_cash", most=MAX_CASH_FEN)
        # The same offset is the same purchase and retirement: the activity behind the tonnes is not part of it.
        request = (key, request_digest("offset", symbol, kg, cap, req.beneficiary.strip(),
                                       req.purpose.strip())) if key is not None else None
        done = await offsetting.offset(service, account=who.code, symbol=symbol, quantity_kg=kg,
                                       max_cash_fen=cap, beneficiary=req.beneficiary, purpose=req.purpose,
                                       request=request)
        views = await db(lambda conn: retirement_views(conn, "r.id = $1", done.retirement.id))
        code = done.retirement.certificate_code
        return created({"estimate": estimate_view(est) if est else None, "quantity": format_tonnes(kg),
                        "order_id": str(done.order_id), "cost": format_cash(done.cost_fen), "retirement": views[0],
                        "certificate_url": f"{ctx.public_base(http)}/v1/certificates/{code}.pdf"},
                       done.retirement.replayed)

    # ---- operator ------------------------------------------------------------------------------

    @app.post("/v1/accounts", status_code=201, response_model=M.AccountCreated, responses=MEMBER, tags=["operator"])
    async def create_account(req: M.AccountRequest, _: Operator) -> Any:
        async def q(conn: asyncpg.Connection) -> Any:
            async with conn.transaction():
                a = await acc.create_account(conn, req.code, req.name, req.kind, req.role or acc.default_role(req.kind))
                key = await acc.create_api_key(conn, a.id)
            return {"code": a.code, "name": a.name, "kind": a.kind, "role": a.role, "api_key": key}
        return JSON(await db(q), status_code=201)

    async def payment(code: str, req: M.PaymentRequest, op: str) -> Any:
        amount = _units(parse_cash, req.amount, "amount", most=MAX_CASH_FEN)
        account_id = await service.account(code)
        direction = "deposit" if op == "deposit" else "withdrawal"
        # A payment recorded before this service knew it (the command line while the exchange was
        # stopped, the demo's set-up): a repeat of it answers as a repeat does, without a seq.
        earlier = await service.payment_recorded(req.reference)
        if earlier is not None:
            if earlier != (account_id, direction, amount):
                raise CarbonxError("duplicate_reference",
                                   f"payment reference {req.reference!r} was used for another payment")
            return JSON({"account": code, "direction": direction, "amount": format_cash(amount),
                         "reference": req.reference, "seq": None, "duplicate": True}, status_code=200)
        cmd = {"op": op, "account": account_id, "amount": amount, "ref": req.reference}
        out = await service.submit(cmd)  # which makes the payment's look-ups (service.prepare) first
        if out.code is not None:
            raise CarbonxError(out.code, out.detail or out.code)
        seq = out.seq
        if out.duplicate:  # the payment made the first time, not what this request says
            _account, _direction, amount, seq = service.core.payments[req.reference]
        return JSON({"account": code, "direction": direction,
                     "amount": format_cash(amount), "reference": req.reference, "seq": seq,
                     "duplicate": out.duplicate}, status_code=201 if not out.duplicate else 200)

    Code = Annotated[str, Path(min_length=1, max_length=40)]
    PAYMENT = {**MEMBER, 200: {"model": M.PaymentView, "description": "a repeat of an earlier payment"}}

    # Keys: another (a rotation, with the earlier ones revoked) or none (a leaked key). A server
    # stops honouring a revoked key within api/auth.KEY_TTL, open websockets included (review33:
    # no route or command did either; only hand-written SQL could).
    @app.post("/v1/accounts/{code}/keys", status_code=201, response_model=M.KeyIssued, responses=MEMBER,
              tags=["operator"])
    async def new_key(code: Code, req: M.KeyRequest, _: Operator) -> Any:
        async def q(conn: asyncpg.Connection) -> Any:
            key, revoked = await acc.rotate_api_key(conn, (await acc.keyed_account(conn, code)).id,
                                                    revoke_others=req.revoke_others)
            return {"account": code, "api_key": key, "revoked": revoked}
        return JSON(await db(q), status_code=201)

    @app.delete("/v1/accounts/{code}/keys", response_model=M.KeysRevoked, responses=MEMBER, tags=["operator"])
    async def revoke_keys(code: Code, _: Operator) -> Any:
        async def q(conn: asyncpg.Connection) -> Any:
            account = await acc.keyed_account(conn, code)
            return {"account": code, "revoked": await acc.revoke_api_keys(conn, account.id)}
        return await db(q)

    @app.post("/v1/accounts/{code}/deposits", status_code=201, response_model=M.PaymentView, responses=PAYMENT,
              tags=["operator"])
    async def deposit(code: Code, req: M.PaymentRequest, _: Operator) -> Any:
        return await payment(code, req, "deposit")

    @app.post("/v1/accounts/{code}/withdrawals", status_code=201, response_model=M.PaymentView, responses=PAYMENT,
              tags=["operator"])
    async def withdraw(code: Code, req: M.PaymentRequest, _: Operator) -> Any:
        return await payment(code, req, "withdraw")

    @app.post("/v1/registry/projects", status_code=201, response_model=M.ProjectView, responses=MEMBER,
              tags=["operator"])
    async def add_project(req: M.ProjectRequest, _: Operator) -> Any:
        async def q(conn: asyncpg.Connection) -> Any:
            p = await registry.add_project(conn, code=req.code, name=req.name, methodology=req.methodology,
                                           developer=req.developer, region=req.region, scheme=req.scheme)
            return await project_view(conn, p, False)
        return JSON(await db(q), status_code=201)

    @app.post("/v1/registry/issuances", status_code=201, response_model=M.IssuanceResult, tags=["operator"],
              responses={**MEMBER, 200: {"model": M.IssuanceResult, "description": "a repeat: the issuance made "
                                          "earlier with this reference (nothing issued), with the first page of its "
                                          "blocks", "headers": {
                                              "Idempotent-Replayed": {**REPLAYED["Idempotent-Replayed"],
                                                                      "description": "true: this project vintage was "
                                                                      "issued earlier under this reference; nothing "
                                                                      "new"},
                                              "Link": {**paged("blocks", links=ISSUANCE_LINKS)[200]["headers"]["Link"],
                                                       "description": "<GET /v1/registry/issuances/{id} with "
                                                       'after=CURSOR>; rel="next" when more blocks follow the '
                                                       "first page; absent otherwise"}}}})
    async def issue(request: Request, req: M.IssuanceRequest, _: Operator) -> Any:
        kg = _units(parse_tonnes, req.quantity, "quantity")
        iss = await service.issue(project=req.project, vintage=req.vintage, quantity_kg=kg, to_account=req.to_account,
                                  reference=req.reference)
        # A repeat answers as a repeated payment does: 200, what was made the first time, and says so.
        # By then the issuance may be traded into many blocks: the answer holds the first page of
        # them, and the Link header the next page of GET /v1/registry/issuances/{id}.
        links = Response()
        body = await issuance_page(request, links, iss.id, 100,
                                   url=request.url.replace(path=f"/v1/registry/issuances/{iss.id}", query=""))
        headers = {"Idempotent-Replayed": "true"} if iss.repeated else {}
        if "link" in links.headers:
            headers["Link"] = links.headers["link"]
        return JSON(body | {"replayed": iss.repeated}, status_code=200 if iss.repeated else 201,
                    headers=headers or None)

    async def serial_action(req: M.SerialRequest, fn: Callable[..., Awaitable[registry.MovementResult]],
                            who: Account, key: str | None, action: str) -> Any:
        # As parse_serial reads the serial, and the reason as the history keeps it.
        request = (who.id, key, request_digest(action, req.serial.strip().upper(), req.reason.strip())) if key else None
        res = await fn(serial=req.serial, reason=req.reason, request=request)
        async def names(conn: asyncpg.Connection) -> list[str]:
            out = []
            for p in res.pieces:
                iss = await registry.get_issuance(conn, p.issuance_id)
                out.append(format_serial(iss.scheme, iss.project_code, iss.vintage, p.lo, p.hi))
            return out
        body = {"serials": await db(names), "quantity": format_tonnes(res.quantity), "replayed": res.replayed}
        return JSON(body, headers={"Idempotent-Replayed": "true"} if res.replayed else None)

    SERIAL_ACTION = {**MEMBER, 200: {"description": "the serial ranges moved", "headers": REPLAYED}}

    @app.post("/v1/registry/freeze", response_model=M.SerialResult, responses=SERIAL_ACTION, tags=["operator"])
    async def freeze(req: M.SerialRequest, who: Operator, key: OneIdempotencyKey) -> Any:
        return await serial_action(req, service.freeze, who, key, "freeze")

    @app.post("/v1/registry/unfreeze", response_model=M.SerialResult, responses=SERIAL_ACTION, tags=["operator"])
    async def unfreeze(req: M.SerialRequest, who: Operator, key: OneIdempotencyKey) -> Any:
        return await serial_action(req, service.unfreeze, who, key, "unfreeze")

    @app.post("/v1/registry/cancel", response_model=M.SerialResult, responses=SERIAL_ACTION, tags=["operator"])
    async def cancel_serials(req: M.SerialRequest, who: Operator, key: OneIdempotencyKey) -> Any:
        return await serial_action(req, service.cancel_serials, who, key, "cancel")

    @app.post("/v1/instruments", status_code=201, response_model=M.Instrument, responses=MEMBER, tags=["operator"])
    async def list_instrument(req: M.ListingRequest, _: Operator) -> Any:
        code, vintage = registry.split_symbol(req.symbol)
        if req.symbol != f"{code}-{vintage}":
            raise CarbonxError("invalid_symbol", f"write the symbol as {code}-{vintage}")
        rules = listing_rules(req)
        await db(lambda conn: registry.get_project(conn, code))
        out = await service.list_instrument(req.symbol, {"rules": rules, "maker_bp": req.maker_fee_bp,
                                                         "taker_bp": req.taker_fee_bp, "t1": req.resale_rule == "T+1"})
        if out.code is not None:
            raise CarbonxError(out.code, out.detail or out.code)
        return JSON(await instrument_view(req.symbol, await project_index()), status_code=201)

    async def halt_or_resume(symbol: str, op: str) -> Any:
        out = await service.submit({"op": op, "symbol": symbol})
        if out.code is not None:
            raise CarbonxError(out.code, out.detail or out.code)
        # As this command left it: a resume sequenced since made a halt answer "open" (review32).
        return await instrument_view(symbol, await project_index(), halted=op == "halt")

    @app.post("/v1/instruments/{symbol}/halt", response_model=M.Instrument, responses=MEMBER, tags=["operator"])
    async def halt(symbol: Symbol, _: Operator) -> Any:
        return await halt_or_resume(symbol, "halt")

    @app.post("/v1/instruments/{symbol}/resume", response_model=M.Instrument, responses=MEMBER, tags=["operator"])
    async def resume(symbol: Symbol, _: Operator) -> Any:
        return await halt_or_resume(symbol, "resume")

    # ---- Binance-compatible depth ------------------------------------------------------------

    @app.get("/api/v3/depth", response_model=M.BinanceDepth, tags=["compatibility"], responses=BINANCE)
    async def binance_depth(symbol: Annotated[str, Query(min_length=1, max_length=40)],
                            limit: Annotated[int, Query(ge=1, description=f"levels per side; more than {MAX_DEPTH} "
                                                        f"is {MAX_DEPTH}, as Binance truncates")] = 100) -> Any:
        market_data(symbol)
        limit = min(limit, MAX_DEPTH)
        if ctx.feed is not None:
            ctx.feed.flush_binance(symbol)
        b = market.books[symbol]
        return {"lastUpdateId": b.seq, "bids": levels(b.top(E.BID, limit)), "asks": levels(b.top(E.ASK, limit))}

    web.install(app, ctx)  # the web page at / (api/web.py), not part of /openapi.json
    generate = app.openapi  # builds the document once and keeps it in app.openapi_schema

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _as_sent(generate())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def listing_rules(req: M.ListingRequest) -> dict[str, Any]:
    """The core's rules for a listing request, refused when no order could ever trade under them.

    These checks are the API's, not the core's: journals already written replay under the
    core's rules as they were, so the core keeps accepting what it accepted before."""
    rules: dict[str, Any] = {
        "tick": _units(parse_price, req.tick, "tick"), "lot": _units(parse_tonnes, req.lot, "lot"),
        "band_bp": _units(parse_price, req.band_percent, "band_percent"), "always_open": req.always_open}
    rules["min_qty"] = _units(parse_tonnes, req.min_quantity, "min_quantity") if req.min_quantity else rules["lot"]
    for key, name in (("lot", "lot"), ("min_qty", "min_quantity")):
        if rules[key] > MAX_QTY:  # then no order could ever be placed under it, and a listing stays
            raise CarbonxError("invalid_rules", f"{name} {format_tonnes(rules[key])} t is above the largest order, "
                                                f"{format_tonnes(MAX_QTY)} t")
    tick = rules["tick"]
    if tick > MAX_PRICE:
        raise CarbonxError("invalid_rules", f"tick {req.tick} is above the highest price the book takes, "
                                            f"{format_price(MAX_PRICE)}")
    if req.reference_price is not None:
        ref = rules["reference_price"] = _units(parse_price, req.reference_price, "reference_price")
        if tick > ref:
            raise CarbonxError("invalid_rules", f"tick {req.tick} is larger than the reference price "
                                                f"{req.reference_price}")
        if ref % tick:
            raise CarbonxError("invalid_rules", f"reference price {req.reference_price} is not on the tick grid "
                                                f"of {req.tick}")
        # A band asked for narrower than a tick either way is most likely a slip (0.02 for 2): the
        # book would hold orders to one tick either way (InstrumentRules.tick_floor), not to it.
        low, high = InstrumentRules(tick=tick, band_bp=rules["band_bp"], reference_price=ref).percent_band()
        if high < ref + tick and low > ref - tick:
            raise CarbonxError("invalid_rules", f"a band of {req.band_percent} % around {req.reference_price} is "
                                                f"narrower than one tick ({req.tick}) either way: only the "
                                                "reference price could trade")
    return rules


class LastResort:
    """ASGI middleware inside the app: an unhandled exception becomes a 500 problem and the request
    ends there. Starlette's own handler of last resort answers too, but then re-raises to the
    server, and uvicorn closes a connection whose application raised: the client's next request
    on that keep-alive connection met a reset. A response already under way is left to fail as
    it did (the server must close a connection that carries half a response)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watched(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception as e:
            if started:
                raise
            log.error("unhandled error", exc_info=e)
            await problem_response("internal_error", type(e).__name__, 500)(scope, receive, send)


# C0 control characters and DEL, in a percent-decoded path (a str) and query (bytes).
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_CONTROL_BYTES = re.compile(rb"[\x00-\x1f\x7f]")


def _controlled(path: str, query: bytes) -> str:
    """Where a request holds a control character, as the API names places in details: `path`, or
    `query.NAME` (the parameter's name, when it is itself clean)."""
    if _CONTROL.search(path):
        return "path"
    # latin-1 maps each byte to the code point of its value: the control bytes stay findable
    for name, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True, encoding="latin-1"):
        if _CONTROL.search(name):
            return "query"
        if _CONTROL.search(value):
            return f"query.{name}"
    return "query"


class Guard:
    """ASGI middleware in front of the app: rate limits per address, control characters in the
    path and query, and request body size."""

    def __init__(self, app: Any, gate: Gate) -> None:
        self.app = app
        self.gate = gate

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limits: Limits = self.gate.limits
        client = scope.get("client")
        try:
            self.gate.admit(client[0] if client else None)
        except CarbonxError as e:
            await _send_problem(send, e.code, e.message, error_headers(e))
            return
        query = scope.get("query_string", b"")
        if _CONTROL.search(scope["path"]) or (query and _CONTROL_BYTES.search(unquote_to_bytes(query))):
            # PostgreSQL cannot store NUL (a path or query parameter with one would end in a 500
            # wherever it reaches a query), and no name, code or cursor of the API holds a control
            # character: refused here, once for every route, before any handler sees it.
            await _send_problem(send, "invalid_request", f"{_controlled(scope['path'], query)}: must not contain "
                                                         "control characters (U+0000-U+001F, U+007F), "
                                                         "percent-encoded or not")
            return
        headers = scope.get("headers", ())
        length = next((v for k, v in headers if k == b"content-length"), None)
        if length is not None and (not length.isdigit() or int(length) > limits.max_body):
            await _too_large(send, limits)
            return
        if length is None and any(k == b"transfer-encoding" for k, _ in headers):
            # A chunked body announces no size: read it here, so that one too large is refused
            # like any other instead of failing inside the app's receive() (a 500 on the order
            # path, a 400 from FastAPI's body parsing elsewhere).
            try:
                body = await _read_body(receive, limits.max_body)
            except _TooLarge:
                await _too_large(send, limits)
                return
            if body is None:
                return  # the client went away
            receive = replay(body, receive)
        # With a Content-Length the server delivers no more than it says; without either header
        # there is no body.
        await self.app(scope, receive, send)


class _TooLarge(Exception):
    pass


async def _read_body(receive: Callable, limit: int) -> bytes | None:
    """The whole request body (None if the client went away); raises _TooLarge once it passes
    `limit` bytes, leaving the rest unread."""
    parts: list[bytes] = []
    seen = 0
    while True:
        msg = await receive()
        if msg["type"] != "http.request":
            return None
        part = msg.get("body", b"")
        seen += len(part)
        if seen > limit:
            raise _TooLarge
        parts.append(part)
        if not msg.get("more_body"):
            return b"".join(parts)


async def _too_large(send: Callable, limits: Limits) -> None:
    await _send_problem(send, "payload_too_large", f"request bodies are limited to {limits.max_body} bytes")


async def _send_problem(send: Callable, code: str, detail: str, headers: dict[str, str] | None = None) -> None:
    body = orjson.dumps(problem(code, detail))
    await send({"type": "http.response.start", "status": http_status(code),
                "headers": [(b"content-type", PROBLEM.encode()), (b"content-length", str(len(body)).encode()),
                            *((k.lower().encode(), v.encode()) for k, v in (headers or {}).items())]})
    await send({"type": "http.response.body", "body": body})
