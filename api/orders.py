"""Order entry shared by REST and the websocket: requests become core commands, outcomes views.

A request is checked for form by api/models.py; here its decimal strings become integers
(refusing more decimals than the unit has) and it becomes a core command for the caller's
account. The exchange decides everything else (tick, lot, band, funds, credits), and its
rejection codes travel back unchanged. Every answer is given only after the command is durable.

Commands are sequenced synchronously (:meth:`Trading.place_now` and friends return the outcome
and an awaitable of durability), so a websocket connection's orders are sequenced in the order
they arrived even though their answers are awaited concurrently.
"""

from __future__ import annotations

from collections.abc import Awaitable
from datetime import datetime, timedelta
from typing import Any

from api.models import AmendRequest, FillCursor, OrderRequest
from api.wire import EPOCH, fill_view, order_view
from exchange.errors import CarbonxError
from exchange.history import VIEW_FILLS, Fill, OrderState, fill_from_row, fills_known, order_from_row
from exchange.offsetting import OFFSET_COID
from exchange.service import ExchangeService
from matching import events as E
from matching.core import O_ACCOUNT, O_PRICE, O_REMAINING, O_SYMBOL, Outcome
from matching.reference import LIMIT_MAX_PRICE, MAX_CASH, MAX_QTY
from matching.units import UnitError, format_cash, format_price, format_tonnes, parse_cash, parse_price, parse_tonnes

TIFS = {"GTC": E.GTC, "IOC": E.IOC, "FOK": E.FOK, "GTD": E.GTD}
ORDER_FILLS = VIEW_FILLS  # the newest fills an order view carries, however it is read (all of them: GET /v1/fills)
# A member's fills, newest first, in a total order (FillCursor): the key (symbol, trade_id, side)
# breaks ties between the fills of one command.
FILL_ORDER = "seq DESC, symbol DESC, trade_id DESC, side DESC"


# The largest amounts the core takes in a command (matching/reference.py): larger ones are refused
# here, in the client's units and with the API's codes, instead of by the core in kg or fen with
# its own invalid_command.
MAX_QUANTITY_KG = MAX_QTY
MAX_CASH_FEN = MAX_CASH
_SHOWN = {parse_tonnes: (format_tonnes, "t"), parse_price: (format_price, "CNY/t"), parse_cash: (format_cash, "CNY")}


def _units(fn: Any, text: str, what: str, positive: bool = True, most: int | None = None,
           code: str = "invalid_request") -> int:
    """`text` in the integer units `fn` reads (kg, fen per tonne, fen); with `most`, refused above
    it with `code` and a message in the client's units."""
    try:
        value = fn(text, what)
    except UnitError as e:
        raise CarbonxError(e.code if e.code == "too_many_decimals" else "invalid_request", str(e)) from None
    if positive and value <= 0:
        raise CarbonxError("invalid_request", f"{what} must be positive")
    if most is not None and value > most:
        show, unit = _SHOWN[fn]
        raise CarbonxError(code, f"{what} must be at most {show(most)} {unit}, got {text}")
    return value


def parse_time(text: str, what: str = "expire_time") -> int:
    """ISO 8601 (with an offset or Z) to UTC microseconds, without floats."""
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise CarbonxError("invalid_request", f"{what} must be an ISO 8601 time, got {text!r}") from None
    if dt.tzinfo is None:
        raise CarbonxError("invalid_request", f"{what} needs a time zone (e.g. Z)")
    if dt < EPOCH:  # the exchange counts time from the epoch; earlier is no time it can name
        raise CarbonxError("invalid_request", f"{what} must not be before 1970-01-01T00:00:00Z, got {text!r}")
    return (dt - EPOCH) // timedelta(microseconds=1)


def place_command(account: int, req: OrderRequest, max_price: int = LIMIT_MAX_PRICE) -> dict[str, Any]:
    """The core command for an order request (form and units only; the core checks the rules).
    `max_price` is the instrument's book's bound (fen per tonne): a price above it is out of band."""
    side = E.BID if req.side == "buy" else E.ASK
    cmd: dict[str, Any] = {"op": "place", "account": account, "symbol": req.symbol, "side": side,
                           "qty": _units(parse_tonnes, req.quantity, "quantity", most=MAX_QUANTITY_KG)}
    if req.type == "limit":
        if req.price is None:
            raise CarbonxError("invalid_request", "a limit order needs a price")
        if req.max_cash is not None:
            raise CarbonxError("invalid_request", "max_cash is for market buys")
        cmd["kind"] = E.LIMIT
        cmd["price"] = _units(parse_price, req.price, "price", most=max_price, code="price_out_of_band")
        tif = req.time_in_force or "GTC"
    else:
        if req.price is not None:
            raise CarbonxError("invalid_request", "a market order takes no price")
        if req.post_only:
            raise CarbonxError("invalid_request", "a market order cannot be post-only")
        if req.time_in_force not in (None, "IOC"):
            raise CarbonxError("invalid_request", "a market order is always IOC")
        cmd["kind"] = E.MARKET
        tif = "IOC"
        if side == E.BID:
            if req.max_cash is None:
                raise CarbonxError("invalid_request", "a market buy needs max_cash, the most it may spend")
            cmd["cash_cap"] = _units(parse_cash, req.max_cash, "max_cash", most=MAX_CASH_FEN)
        elif req.max_cash is not None:
            raise CarbonxError("invalid_request", "max_cash is for market buys")
    cmd["tif"] = TIFS[tif]
    if tif == "GTD":
        if req.expire_time is None:
            raise CarbonxError("invalid_request", "a GTD order needs expire_time")
        cmd["expire_ts"] = parse_time(req.expire_time)
    elif req.expire_time is not None:
        raise CarbonxError("invalid_request", "expire_time is only for GTD orders")
    if req.post_only:
        # Post-only means "rest, never take": an IOC order never rests and a FOK order must take,
        # so either would only ever be cancelled or refused.
        if tif in ("IOC", "FOK"):
            raise CarbonxError("invalid_request", f"a post-only order rests on the book: GTC or GTD, not {tif}")
        cmd["post_only"] = True
    if req.client_order_id is not None:
        if not req.client_order_id.isprintable():
            raise CarbonxError("invalid_request", "client_order_id must be printable characters")
        if req.client_order_id.startswith(OFFSET_COID):
            raise CarbonxError("invalid_request", f"client_order_ids beginning {OFFSET_COID!r} are the offsets' own "
                                                  "(POST /v1/neutrality/offset with an Idempotency-Key)")
        cmd["coid"] = req.client_order_id
    return cmd


# The core's reject codes that a new order's checks give before min_quantity (engine._check_order):
# an amend that also breaks one of these is answered with it, as that order would be.
_BEFORE_MIN = frozenset({E.REJECT_HALTED, E.REJECT_MARKET_CLOSED, E.REJECT_INVALID_QUANTITY, E.REJECT_INVALID_LOT,
                         E.REJECT_UNKNOWN_INSTRUMENT})


def refused(out: Outcome) -> None:
    if out.code is not None:
        raise CarbonxError(out.code, out.detail or out.code.replace("_", " "))


class Trading:
    """A member's order entry against one service."""

    def __init__(self, service: ExchangeService) -> None:
        self.service = service

    # ---- sequencing now, answering later ----------------------------------------------------

    # With `shared`, the awaitable is the commit's future shared by all its commands, or None
    # (ExchangeService.apply_shared): for answering by callback, never to be awaited bare.

    def place_now(self, account: int, req: OrderRequest, shared: bool = False) -> tuple[Outcome, Any]:
        apply = self.service.apply_shared if shared else self.service.apply
        listing = self.service.core.listings.get(req.symbol)  # none: the core says unknown_instrument
        return apply(place_command(account, req, listing.rules.max_price if listing is not None else LIMIT_MAX_PRICE))

    def cancel_now(self, account: int, order_id: int, shared: bool = False) -> tuple[Outcome, Any]:
        apply = self.service.apply_shared if shared else self.service.apply
        return apply({"op": "cancel", "account": account, "order_id": order_id})

    def amend_now(self, account: int, order_id: int, req: AmendRequest, shared: bool = False
                  ) -> tuple[Outcome, Any]:
        if req.quantity is None and req.price is None:
            raise CarbonxError("invalid_request", "give a new quantity, a new price, or both")
        o = self.service.core.orders.get(order_id)
        if o is None or o[O_ACCOUNT] != account:
            return self._refused("not_found", f"no open order {order_id}", shared)
        max_price = self.service.core.listings[o[O_SYMBOL]].rules.max_price
        qty = (_units(parse_tonnes, req.quantity, "quantity", most=MAX_QUANTITY_KG) if req.quantity is not None
               else o[O_REMAINING])
        price = (_units(parse_price, req.price, "price", most=max_price, code="price_out_of_band")
                 if req.price is not None else o[O_PRICE])
        try:
            self._check_amend_min(o, price, qty)
        except CarbonxError as e:
            return self._refused(e.code, e.message, shared)
        apply = self.service.apply_shared if shared else self.service.apply
        return apply({"op": "amend", "account": account, "order_id": order_id, "price": price, "qty": qty})

    def _refused(self, code: str, detail: str, shared: bool) -> tuple[Outcome, Any]:
        """A refusal read from the orders as the commands sequenced so far left them, answered as
        the core's own refusals are: once those commands are durable. Answered at once, an amend's
        not_found overtook the cancel it followed, and a crash before that cancel's commit left
        the order open after the client was told it was gone (review33)."""
        return Outcome(None, [], code=code, detail=detail), self.service.after_sequenced(shared)

    def _check_amend_min(self, o: list, price: int, qty: int) -> None:
        """Refuse, as a new order of that size is refused, an amend to below the instrument's
        minimum quantity, unless it only reprices or reduces a remainder already below it.

        The core takes any amended quantity (matching/engine.py, check_amend): a partly filled
        order's remainder may be below the minimum and must stay repriceable and reducible, and
        journals written under that rule replay under it. Without this check a client could rest
        1 t on a 10 t minimum by placing 10 t and amending to 1 t. Sequenced synchronously with
        the amend itself (no await in between), so the remainder read here is the one amended."""
        core = self.service.core
        rules = core.listings[o[O_SYMBOL]].rules
        remaining = o[O_REMAINING]
        if qty >= rules.min_qty or qty <= remaining < rules.min_qty:
            return
        # What a new order's checks put before the minimum (halted, market closed, a zero or
        # off-lot quantity) keeps its own code: the core gives it. The clock is the one the
        # service will sequence the amend at.
        ts = max(self.service.clock(), core.ts)
        if core.engine.check_amend(o[O_SYMBOL], ts, price, qty) in _BEFORE_MIN:
            return
        raise CarbonxError("min_quantity", f"quantity {format_tonnes(qty)} t is below the instrument's minimum of "
                                           f"{format_tonnes(rules.min_qty)} t (an open quantity already below it "
                                           "may be repriced or reduced, not raised)")

    async def answer(self, account: int, out: Outcome, durable: Awaitable[None]) -> dict[str, Any]:
        """The order's view once the command is durable (raises the rejection, if any)."""
        await durable
        refused(out)
        return await self.order(account, out.order_id, out.seq)

    def answer_now(self, account: int, out: Outcome) -> dict[str, Any] | None:
        """:meth:`answer` for a durable command without I/O: the view from the tracker, the
        rejection raised, or None when only the history tables can tell (then use :meth:`order`)."""
        refused(out)
        return self._tracked(account, out.order_id, out.seq)

    def _state(self, account: int, order_id: int | None, seq: int | None) -> tuple[OrderState | None, bool]:
        """The tracker's order of `account`, and whether it is as entry `seq` left it (a command's
        answer, while its commit is the last one) rather than as it stands now."""
        if order_id is None:
            return None, False
        tracker = self.service.orders
        o = tracker.as_of(seq, order_id) if seq is not None else None
        exact = o is not None
        o = o or tracker.get(order_id)
        return (o, exact) if o is not None and o.account == account else (None, False)

    def _tracked(self, account: int, order_id: int | None, seq: int | None = None) -> dict[str, Any] | None:
        """The tracker's view of the order (see :meth:`_state`), if it has the order's newest fills."""
        o, _ = self._state(account, order_id, seq)
        return order_view(o, o.fills[-ORDER_FILLS:]) if o is not None and fills_known(o) else None

    # ---- whole requests ------------------------------------------------------------------------

    async def place(self, account: int, req: OrderRequest) -> dict[str, Any]:
        out, durable = self.place_now(account, req)
        return await self.answer(account, out, durable)

    async def cancel(self, account: int, order_id: int) -> dict[str, Any]:
        out, durable = self.cancel_now(account, order_id)
        return await self.answer(account, out, durable)

    async def amend(self, account: int, order_id: int, req: AmendRequest) -> dict[str, Any]:
        out, durable = self.amend_now(account, order_id, req)
        return await self.answer(account, out, durable)

    async def cancel_all(self, account: int, symbol: str | None) -> list[dict[str, Any]]:
        if symbol is not None and symbol not in self.service.core.listings:
            raise CarbonxError("unknown_instrument", f"no instrument {symbol!r}")
        ids = sorted(oid for oid, o in self.service.core.orders.items()
                     if o[O_ACCOUNT] == account and (symbol is None or o[O_SYMBOL] == symbol))
        done = []
        for oid in ids:
            out, durable = self.cancel_now(account, oid)
            done.append((out, durable))
        views = []
        for out, durable in done:
            await durable
            if out.code is None:
                views.append(await self.order(account, out.order_id, out.seq))
        return views

    # ---- reading -----------------------------------------------------------------------------

    async def order(self, account: int, order_id: int | None, seq: int | None = None) -> dict[str, Any]:
        """An order of `account` (another account's order is "not found"), as entry `seq` left
        it when the tracker still knows (a command's answer)."""
        if order_id is None:
            raise CarbonxError("not_found", "no such order")
        o, exact = self._state(account, order_id, seq)
        if o is not None and fills_known(o):
            return order_view(o, o.fills[-ORDER_FILLS:])
        if exact:
            # A command's answer on an order with fills from before this process: the order as
            # the command left it, taken now (it changes on), and its newest fills up to that
            # entry from the history tables (their row would be the order as it is by then).
            view = order_view(o, [])
            fills = await self.fills(account, order_id=order_id, limit=ORDER_FILLS, upto=seq)
            view["fills"] = [fill_view(f) for f in reversed(fills)]
            return view
        # Older than this process, or with fills from before it: the history tables have them all.
        await self.service.caught_up(orders=True)
        row = await self.service.pool.fetchrow(
            "SELECT * FROM orders WHERE order_id = $1 AND account_id = $2", order_id, account)
        if row is None:
            raise CarbonxError("not_found", f"no order {order_id}")
        fills = await self.fills(account, order_id=order_id, limit=ORDER_FILLS)
        return order_view(order_from_row(row), fills[::-1])

    async def fills(self, account: int, order_id: int | None = None, symbol: str | None = None,
                    limit: int = 100, before: FillCursor | None = None, upto: int | None = None) -> list[Fill]:
        """The account's fills, newest first, after `before` when given (GET /v1/fills's pages),
        of journal entries up to `upto` when given."""
        await self.service.caught_up(orders=True)
        if before is None:
            rows = await self.service.pool.fetch(
                f"""SELECT * FROM fills WHERE account_id = $1 AND ($2::bigint IS NULL OR order_id = $2)
                      AND ($3::text IS NULL OR symbol = $3) AND ($5::bigint IS NULL OR seq <= $5)
                    ORDER BY {FILL_ORDER} LIMIT $4""",
                account, order_id, symbol, limit, upto)
        else:
            # `seq <= $5` repeats what the row comparison implies, so that the account's index on
            # (account_id, seq DESC) bounds the scan; the row comparison alone it cannot use.
            rows = await self.service.pool.fetch(
                f"""SELECT * FROM fills WHERE account_id = $1 AND ($2::bigint IS NULL OR order_id = $2)
                      AND ($3::text IS NULL OR symbol = $3) AND seq <= $5
                      AND (seq, symbol, trade_id, side) < ($5, $6::text, $7, $8::text)
                    ORDER BY {FILL_ORDER} LIMIT $4""",
                account, order_id, symbol, limit, before.seq, before.symbol, before.trade_id, before.side)
        return [fill_from_row(r) for r in rows]

    async def owns(self, account: int, order_id: int) -> bool:
        """Whether `order_id` is an order of `account` (placed and acknowledged: the history has it)."""
        o = self.service.orders.get(order_id)
        if o is not None:
            return o.account == account
        await self.service.caught_up(orders=True)
        return bool(await self.service.pool.fetchval(
            "SELECT EXISTS (SELECT 1 FROM orders WHERE order_id = $1 AND account_id = $2)", order_id, account))
