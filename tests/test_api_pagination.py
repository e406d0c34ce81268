"""Cursor pagination of a member's orders and fills, black box: the real server on loopback, an
httpx client that follows RFC 8288 `Link: <...>; rel="next"` headers as a client would.

Walking every page, at every small page size, gives exactly the account's rows in the history
tables, newest first, with no repeat and no gap, also where one command filled many times (one
seq, many fills: the page boundaries fall inside it); the Link header is there exactly when a
next page exists; `order_id=` reaches every fill of an order with more than an order view's 100;
another account's order is not found; a malformed `before` is refused like any bad query
parameter.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import asyncpg
import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from api.orders import ORDER_FILLS
from tests.api_clients import add_listing
from tests.api_helpers import SYMBOL, ServerThread, World, build_world, client, db_rows, ok, own_server

LINK = re.compile(r'<([^>]+)>; rel="next"')
PROBLEM_KEYS = {"type", "title", "status", "detail", "code"}
BIG = ORDER_FILLS + 5  # fills of one order, and of one command
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]


def limit(side: str, price: str, qty: str, symbol: str = SYMBOL) -> dict[str, str]:
    return {"symbol": symbol, "side": side, "price": price, "quantity": qty}


class Traded:
    """The server, the world, and what the scenario made (see the `traded` fixture)."""

    def __init__(self, server: ServerThread, w: World, dsn: str, other: str, big_order: str, quiet_order: str,
                 run: Any) -> None:
        self.server, self.w, self.dsn, self.other = server, w, dsn, other
        self.big_order, self.quiet_order = big_order, quiet_order
        self.run = run

    def query(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        return db_rows(self.run, self.dsn, sql, *args)

    def db_fills(self, code: str, symbol: str | None = None, order_id: str | None = None) -> list[tuple]:
        """The account's fills as the fills table has them, newest first by (seq, symbol,
        trade_id, side): written here from the table's key, not taken from the product."""
        rows = self.query(
            """SELECT f.symbol, f.trade_id, f.side, f.order_id FROM fills f JOIN accounts a ON a.id = f.account_id
               WHERE a.code = $1 AND ($2::text IS NULL OR f.symbol = $2) AND ($3::bigint IS NULL OR f.order_id = $3)
               ORDER BY f.seq DESC, f.symbol DESC, f.trade_id DESC, f.side DESC""",
            code, symbol, int(order_id) if order_id else None)
        return [(r["symbol"], str(r["trade_id"]), r["side"], str(r["order_id"])) for r in rows]

    def db_orders(self, code: str, status: str = "all") -> list[str]:
        rows = self.query(
            """SELECT o.order_id FROM orders o JOIN accounts a ON a.id = o.account_id
               WHERE a.code = $1 AND ($2 OR o.status IN ('new', 'partially_filled')) ORDER BY o.order_id DESC""",
            code, status == "all")
        return [str(r["order_id"]) for r in rows]


@pytest.fixture(scope="module")
def traded(pg_server: str, template_db: str, run) -> Iterator[Traded]:
    """A world where:

    - BUY2 sweeps several resting sells in one command on SYMBOL (one seq, five fills over four
      price levels), is the maker of two later fills, and buys and sells on a second (T+0)
      instrument, where a sell of its sweeps three bids at once; it also has orders that never
      traded (open and cancelled);
    - BUY takes BIG resting one-tonne sells of DEV's with one buy: one order, one seq, BIG
      fills (DEV has BIG fills in that seq too, one per order); DEV then rests a few sells.
    """
    with own_server(pg_server, template_db, run, "test_pagination") as server:
        w = build_world(server.http, server.ops_key)
        with client(server.http, server.ops_key) as ops:
            other = add_listing(ops, w.keys, "BIOGAS", "DEV2")
        with w.as_("DEV") as dev, w.as_("DEV2") as dev2, w.as_("BUY") as buy, w.as_("BUY2") as buy2:
            for price, qty in (("35.10", "1.000"), ("35.20", "2.000"), ("35.20", "1.000"), ("35.30", "1.000"),
                               ("35.40", "1.000")):
                ok(dev.post("/v1/orders", json=limit("sell", price, qty)), 201)
            sweep = ok(buy2.post("/v1/orders", json=limit("buy", "35.40", "6.000")), 201)
            assert len(sweep["fills"]) == 5, sweep
            resting = ok(buy2.post("/v1/orders", json=limit("buy", "34.90", "2.000")), 201)
            for _ in range(2):
                ok(dev.post("/v1/orders", json=limit("sell", "34.90", "1.000")), 201)
            assert ok(buy2.get(f"/v1/orders/{resting['order_id']}"))["status"] == "filled"
            quiet = ok(buy2.post("/v1/orders", json=limit("buy", "33.00", "1.000")), 201)
            for price in ("33.10", "33.20", "33.30", "33.40"):
                gone = ok(buy2.post("/v1/orders", json=limit("buy", price, "1.000")), 201)
                ok(buy2.delete(f"/v1/orders/{gone['order_id']}"))
            for price in ("35.00", "35.05", "35.10"):
                ok(dev2.post("/v1/orders", json=limit("sell", price, "2.000", other)), 201)
            ok(buy2.post("/v1/orders", json=limit("buy", "35.10", "6.000", other)), 201)
            for price in ("34.80", "34.90", "35.00"):
                ok(dev2.post("/v1/orders", json=limit("buy", price, "1.000", other)), 201)
            ok(buy2.post("/v1/orders", json=limit("sell", "34.80", "3.000", other)), 201)
            for _ in range(BIG):
                ok(dev.post("/v1/orders", json=limit("sell", "36.00", "1.000")), 201)
            big = ok(buy.post("/v1/orders", json=limit("buy", "36.00", f"{BIG}.000")), 201)
            assert big["status"] == "filled", big
            for price in ("37.50", "37.60", "37.70"):  # open orders of DEV's to page through
                ok(dev.post("/v1/orders", json=limit("sell", price, "1.000")), 201)
        yield Traded(server, w, server.dsn, other, big["order_id"], quiet["order_id"], run)


def walk(c: httpx.Client, path: str, params: dict[str, Any]) -> list[list[dict]]:
    """Every page, following rel="next" as a client would, checking the Link header on the way:
    a page with one is full and is followed by a page that is not empty; the last has none."""
    pages: list[list[dict]] = []
    r = c.get(path, params=params)
    while True:
        page = ok(r)
        pages.append(page)
        link = r.headers.get("link")
        assert len(pages) <= 2000, "paging does not end"
        if link is None:
            assert len(page) <= params["limit"], page
            return pages
        m = LINK.fullmatch(link)
        assert m, link
        url = httpx.URL(m[1])
        assert url.is_absolute_url and url.copy_with(path="/", query=None) == c.base_url.copy_with(path="/"), link
        assert url.path == path, link
        query = dict(url.params)
        assert {k: v for k, v in query.items() if k != "before"} == {k: str(v) for k, v in params.items()}, link
        assert len(page) == params["limit"], (link, page)
        r = c.get(m[1])
        assert ok(r), f"{link} led to an empty page"


def fill_key(f: dict) -> tuple:
    return (f["symbol"], f["trade_id"], f["side"], f["order_id"])


@pytest.mark.parametrize("size", range(1, 8))
def test_walking_the_fills_pages_gives_every_fill_once(traded: Traded, size: int) -> None:
    t = traded
    for code, symbol in (("BUY2", None), ("BUY2", SYMBOL), ("BUY2", t.other), ("DEV", None)):
        params: dict[str, Any] = {"limit": size} | ({"symbol": symbol} if symbol else {})
        with t.w.as_(code) as c:
            pages = walk(c, "/v1/fills", params)
            whole = ok(c.get("/v1/fills", params={**params, "limit": 1000}))
        got = [fill_key(f) for p in pages for f in p]
        expected = t.db_fills(code, symbol)
        assert got == expected, (code, symbol, size)
        assert len(set(got)) == len(got)
        assert [fill_key(f) for f in whole] == expected
        assert [f for p in pages for f in p] == whole
    # The scenario has what the walk must get through: page boundaries inside one command's fills.
    per_seq = t.query("""SELECT count(*) AS n FROM fills f JOIN accounts a ON a.id = f.account_id
                         WHERE a.code = $1 GROUP BY f.seq ORDER BY 1 DESC LIMIT 1""", "BUY2")
    assert per_seq[0]["n"] >= 5


@pytest.mark.parametrize("size", range(1, 8))
def test_walking_the_order_pages_gives_every_order_once(traded: Traded, size: int) -> None:
    t = traded
    for code, status in (("BUY2", "all"), ("BUY2", "open"), ("DEV", "all"), ("DEV", "open")):
        params = {"status": status, "limit": size}
        with t.w.as_(code) as c:
            pages = walk(c, "/v1/orders", params)
            whole = ok(c.get("/v1/orders", params={**params, "limit": 1000}))
        got = [o["order_id"] for p in pages for o in p]
        assert got == t.db_orders(code, status), (code, status, size)
        assert [o for p in pages for o in p] == whole


def test_walking_the_public_retirements_gives_each_once(traded: Traded) -> None:
    """GET /v1/registry/retirements pages the same way (public: no key), with its filters kept."""
    t = traded
    with t.w.as_("DEV") as dev:
        for i in range(7):
            ok(dev.post("/v1/retirements", json={"symbol": SYMBOL, "quantity": "1.000", "beneficiary": f"Event {i}",
                                                 "purpose": "Carbon neutrality"}), 201)
    db = [str(r["id"]) for r in t.query("""SELECT r.id FROM retirements r JOIN accounts a ON a.id = r.account_id
                                           WHERE a.code = 'DEV' ORDER BY r.id DESC""")]
    assert len(db) >= 7
    with client(t.server.http) as anon:
        for size in (1, 2, 3, 7):
            pages = walk(anon, "/v1/registry/retirements", {"account": "DEV", "limit": size})
            assert [r["id"] for p in pages for r in p] == db, size
        r = anon.get("/v1/registry/retirements", params={"account": "DEV", "limit": len(db)})
        assert len(ok(r)) == len(db) and "link" not in r.headers
        # Codes are upper case; a filter in any case finds the same (it found none: review30).
        project = t.query("SELECT p.code FROM projects p JOIN issuances i ON i.project_id = p.id "
                          "JOIN blocks b ON b.issuance_id = i.id JOIN retirements r ON r.id = b.retirement_id "
                          "JOIN accounts a ON a.id = r.account_id WHERE a.code = 'DEV' LIMIT 1")[0]["code"]
        for params in ({"account": " dev "}, {"account": "Dev", "project": project.lower()}):
            assert [x["id"] for x in ok(anon.get("/v1/registry/retirements", params={**params, "limit": 500}))] == db
        assert ok(anon.get(f"/v1/registry/projects/{project.lower()}"))["code"] == project


def test_walking_the_public_trades_gives_each_once(traded: Traded) -> None:
    """GET /v1/trades/{symbol} pages back to the first trade: the first page from the in-memory
    tape, older ones from the history table; also when the tape holds fewer than the page (as
    after a restart of an instrument with more trades than the tape keeps)."""
    t = traded
    db = [str(r["trade_id"]) for r in t.query("SELECT trade_id FROM trades WHERE symbol = $1 ORDER BY trade_id DESC",
                                             SYMBOL)]
    assert len(db) > 8 and db[-1] == "1"
    with client(t.server.http) as anon:
        for size in (1, 3, 7, len(db)):
            pages = walk(anon, f"/v1/trades/{SYMBOL}", {"limit": size})
            assert [x["trade_id"] for p in pages for x in p] == db, size
        tape = t.server.exchange.market.tapes[SYMBOL]
        kept = list(tape)
        try:
            while len(tape) > 2:
                tape.popleft()
            pages = walk(anon, f"/v1/trades/{SYMBOL}", {"limit": 5})
            assert [x["trade_id"] for p in pages for x in p] == db
        finally:
            tape.clear()
            tape.extend(kept)


def test_a_page_that_is_full_but_last_has_no_link(traded: Traded) -> None:
    """The Link header means "there is more", not "this page is full"."""
    t = traded
    with t.w.as_("BUY2") as c:
        n_fills = len(t.db_fills("BUY2"))
        r = c.get("/v1/fills", params={"limit": n_fills})
        assert len(ok(r)) == n_fills and "link" not in r.headers
        assert "link" in c.get("/v1/fills", params={"limit": n_fills - 1}).headers
        n_orders = len(t.db_orders("BUY2"))
        r = c.get("/v1/orders", params={"status": "all", "limit": n_orders})
        assert len(ok(r)) == n_orders and "link" not in r.headers
        r = c.get("/v1/orders", params={"status": "all", "limit": n_orders - 1})
        assert "link" in r.headers
        # The next page of orders is what the cursor says: the orders older than the last one.
        last = ok(r)[-1]["order_id"]
        rest = ok(c.get("/v1/orders", params={"status": "all", "before": last}))
        assert [o["order_id"] for o in rest] == t.db_orders("BUY2")[n_orders - 1:]


def test_an_orders_fills_beyond_its_view_are_all_reachable(traded: Traded) -> None:
    """An order view carries its newest ORDER_FILLS fills; order_id= on GET /v1/fills has them all,
    in one page or in many."""
    t = traded
    with t.w.as_("BUY") as c:
        view = ok(c.get(f"/v1/orders/{t.big_order}"))
        assert view["filled_quantity"] == f"{BIG}.000" and len(view["fills"]) == ORDER_FILLS
        whole = ok(c.get("/v1/fills", params={"order_id": t.big_order, "limit": 1000}))
        pages = walk(c, "/v1/fills", {"order_id": t.big_order, "limit": 40})
        whole_by_int = ok(c.get("/v1/fills", params={"order_id": int(t.big_order), "limit": 1000}))
    expected = t.db_fills("BUY", order_id=t.big_order)
    assert len(expected) == BIG
    assert [fill_key(f) for f in whole] == expected
    assert [f for p in pages for f in p] == whole == whole_by_int
    assert {f["order_id"] for f in whole} == {t.big_order}
    # The view's fills are the newest of them, oldest first.
    assert [f["trade_id"] for f in view["fills"]] == [f["trade_id"] for f in whole[:ORDER_FILLS]][::-1]
    # The filter narrows: an order of BUY2's that never traded has no fills.
    with t.w.as_("BUY2") as c:
        assert ok(c.get("/v1/fills", params={"order_id": t.quiet_order})) == []


def problem(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, f"{r.request.url}: {r.status_code} {r.text}"
    assert r.headers["content-type"].split(";")[0] == "application/problem+json", r.headers["content-type"]
    body = r.json()
    assert set(body) == PROBLEM_KEYS and body["code"] == code and body["status"] == status, body
    return body


def test_another_accounts_order_gives_none_of_its_fills(traded: Traded) -> None:
    """order_id= naming an order that is not the caller's is not found, as GET /v1/orders/{id} says."""
    t = traded
    with t.w.as_("BUY2") as c:
        problem(c.get(f"/v1/orders/{t.big_order}"), 404, "not_found")
        body = problem(c.get("/v1/fills", params={"order_id": t.big_order}), 404, "not_found")
        assert "fill" not in body["detail"]  # says nothing of the other account's order
        problem(c.get("/v1/fills", params={"order_id": str(2**62)}), 404, "not_found")
    with t.w.as_("DEV") as c:  # the maker of every one of those fills, on other orders of its own
        problem(c.get("/v1/fills", params={"order_id": t.big_order}), 404, "not_found")


def _fill_cursor(t: Traded) -> str:
    with t.w.as_("BUY2") as c:
        r = c.get("/v1/fills", params={"limit": 1})
    return dict(httpx.URL(LINK.fullmatch(r.headers["link"])[1]).params)["before"]


BAD_IDS = ["abc", "-1", "0", "9" * 30, str(2**62 + 1), "\u00b2", " 5", "1.5", ""]


def test_malformed_before_is_refused_like_any_bad_query_parameter(traded: Traded) -> None:
    t = traded
    cursor = _fill_cursor(t)
    seq, trade_id, side, symbol = cursor.split(".", 3)
    assert symbol == t.other and side == "sell"  # BUY2's newest fill
    bad_cursors = [
        *BAD_IDS,
        cursor[:-1], cursor.rsplit(".", 1)[0], f"{seq}.{trade_id}", seq,  # truncated
        f"{cursor}.1", f"{cursor}.{SYMBOL}",  # a part too many
        f"0{cursor}", f"{seq}.0{trade_id}.{side}.{symbol}", f"+{cursor}", f"{seq}.{trade_id}.bid.{symbol}",
        f"{2**62 + 1}.{trade_id}.{side}.{symbol}", f"{seq}.{trade_id}.{side}.NOPE-2023", cursor.replace(".", ","),
        "\u00b2.1.buy." + SYMBOL, cursor + "\n", "x" * 200,
    ]
    with t.w.as_("BUY2") as c:
        # What the API answers for any bad query parameter: this is what `before` must match.
        reference = c.get("/v1/fills", params={"limit": 0})
        status = reference.status_code
        problem(reference, status, "invalid_request")
        assert ok(c.get("/v1/fills", params={"before": cursor}))  # the good one is taken
        for bad in bad_cursors:
            body = problem(c.get("/v1/fills", params={"before": bad}), status, "invalid_request")
            assert "before" in body["detail"], (bad, body)
        for bad in BAD_IDS:
            body = problem(c.get("/v1/orders", params={"before": bad, "status": "all"}), status, "invalid_request")
            assert "before" in body["detail"], (bad, body)
            problem(c.get("/v1/fills", params={"order_id": bad}), status, "invalid_request")
        # An order id is not a fills cursor, nor the other way round.
        some_order = t.db_orders("BUY2")[0]
        problem(c.get("/v1/fills", params={"before": some_order}), status, "invalid_request")
        problem(c.get("/v1/orders", params={"before": cursor}), status, "invalid_request")


def test_the_document_describes_the_cursors_and_the_link_header(traded: Traded) -> None:
    """/openapi.json documents `before` on both lists, `order_id` on fills, and the Link header of
    their 200s; a cursor the server sends matches the pattern it documents."""
    t = traded
    with client(t.server.http) as anon:
        doc = ok(anon.get("/openapi.json"))
    cursor = _fill_cursor(t)
    for path, names in (("/v1/fills", {"before", "order_id", "symbol", "limit"}),
                        ("/v1/orders", {"before", "status", "symbol", "limit"})):
        op = doc["paths"][path]["get"]
        params = {p["name"]: p for p in op["parameters"]}
        assert names <= set(params), params
        assert params["before"]["in"] == "query" and params["before"]["description"]
        link = op["responses"]["200"]["headers"]["Link"]
        assert 'rel="next"' in link["description"]
        assert re.search(link["schema"]["pattern"], '</v1/x?before=1>; rel="next"')
    schema = doc["paths"]["/v1/fills"]["get"]["parameters"]
    before = next(p for p in schema if p["name"] == "before")["schema"]["anyOf"][0]
    assert re.fullmatch(before["pattern"].strip("^$"), cursor) and len(cursor) <= before["maxLength"]


def test_schemathesis_finds_the_link_header_as_documented(traded: Traded) -> None:
    """Generated requests to both lists, plus one small page of each, checked against the live
    document with the response-header check too (the module-wide schema test does not run it)."""
    t = traded
    schema = schemathesis.openapi.from_url(f"{t.server.http}/openapi.json")
    headers = {"Authorization": f"Bearer {t.w.keys['BUY2']}"}
    linked: list[str] = []
    with requests.Session() as session:
        for path, small in (("/v1/fills", {"limit": 2}), ("/v1/orders", {"status": "all", "limit": 2})):
            operation = schema[path]["GET"]

            def call(case: schemathesis.Case) -> None:
                r = case.call_and_validate(base_url=t.server.http, session=session, headers=headers, checks=CHECKS,
                                           timeout=30)
                if "link" in r.headers:
                    linked.append(r.headers["link"])

            @settings(max_examples=25, derandomize=True, database=None, deadline=None,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(GenerationMode.POSITIVE))
            def generated(case: schemathesis.Case) -> None:
                call(case)

            generated()
            before = len(linked)
            call(operation.Case(query=small))
            assert len(linked) == before + 1, f"{path} sent no Link header for a first page of 2"
