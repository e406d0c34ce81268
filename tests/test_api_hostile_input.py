"""A careless or hostile client, through a real server: every bad input gets a clear 4xx problem
and leaves no trace (balances, reservations, holdings, orders, the book, the journal and the
registry's tables), never a 500.

Covers: control characters in paths and queries (refused by api/rest.py's Guard for every route).
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.api_helpers import SYMBOL, build_world, client, db_rows, ok, own_server

TABLES = ("accounts", "api_keys", "projects", "issuances", "blocks", "transfers", "retirements", "payments",
          "journal", "orders")
# One of each kind the text rule refuses: NUL (PostgreSQL cannot store it), a line break, a tab,
# DEL, a C1 control, a right-to-left override and a right-to-left isolate.
BAD_CHARS = ["\x00", "\n", "\t", "\x7f", "\x85", "\u202e", "\u2067"]


@pytest.fixture(scope="module")
def world(pg_server, template_db, run):
    with own_server(pg_server, template_db, run, "hostile") as server:
        w = build_world(server.http, server.ops_key)
        with w.as_("DEV") as dev:  # an offer, so that an offset that got through would buy
            ok(dev.post("/v1/orders", json={"symbol": SYMBOL, "side": "sell", "price": "35.00",
                                            "quantity": "20.000"}), 201)
        yield server, w


def trace(server, w, run) -> dict[str, Any]:
    """Everything a refused request must leave alone, as clients see it and in the tables."""
    out: dict[str, Any] = {}
    for code in ("DEV", "BUY", "BUY2"):
        with w.as_(code) as c:
            out[code] = (ok(c.get("/v1/account")), ok(c.get("/v1/orders", params={"status": "all"})),
                         ok(c.get("/v1/fills")))
    with client(w.base) as anon:
        out["book"] = ok(anon.get(f"/v1/book/{SYMBOL}"))
        out["seq"] = ok(anon.get("/v1/health"))["seq"]
    for table in TABLES:
        out[table] = db_rows(run, server.dsn, f"SELECT count(*) AS n FROM {table}")[0]["n"]
    return out


def problem(r, status: int, code: str, *words: str) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json"), r.headers
    body = r.json()
    assert body["code"] == code, body
    for word in words:
        assert word in body["detail"], body
    return body


# ---- 1. control characters ----------------------------------------------------------------------

PATHS = [
    ("anon", "GET", "/v1/registry/projects/{v}"), ("anon", "GET", "/v1/certificates/{v}"),
    ("anon", "GET", "/v1/certificates/{v}.html"), ("anon", "GET", "/v1/certificates/{v}.pdf"),
    ("anon", "GET", "/verify/{v}"), ("anon", "GET", "/v1/registry/serials/{v}"),
    ("anon", "GET", "/v1/instruments/{v}"), ("anon", "GET", "/v1/book/{v}"),
    ("anon", "GET", "/v1/registry/retirements?account={v}"), ("anon", "GET", "/v1/registry/retirements?project={v}"),
    ("anon", "GET", "/api/v3/depth?symbol={v}"), ("anon", "GET", "/web/{v}"),
    ("BUY", "GET", "/v1/orders?symbol={v}"), ("BUY", "GET", "/v1/fills?before=1.1.buy.{v}"),
    ("BUY", "DELETE", "/v1/orders?symbol={v}"),
    ("OPS", "POST", "/v1/accounts/{v}/deposits"), ("OPS", "POST", "/v1/accounts/{v}/withdrawals"),
    ("OPS", "POST", "/v1/instruments/{v}/halt"),
]


def test_control_characters_in_paths_and_queries_are_refused_for_every_route(world, run):
    server, w = world
    before = trace(server, w, run)
    for who, method, path in PATHS:
        for v in ("%00", "FOREST%00", "a%0Ab", "%1F", "x%7F", "%0d%0a"):
            key = None if who == "anon" else w.keys[who]
            body = {"amount": "1.00", "reference": "r-ctl"} if method == "POST" else None
            with client(server.http, key) as c:
                r = c.request(method, path.format(v=v), json=body)
                where = f"query.{path.split('?')[1].split('=')[0]}:" if "?" in path else "path:"
                assert problem(r, 400, "invalid_request", "control characters")["detail"].startswith(where)
                # the connection goes on serving
                assert c.get("/v1/health").status_code == 200
    assert trace(server, w, run) == before


def test_odd_but_harmless_path_characters_still_reach_the_routes(world):
    server, _ = world
    with client(server.http) as anon:
        # a space and a non-ASCII letter are no control characters: the route answers
        problem(anon.get("/v1/registry/projects/%20FOREST"), 404, "not_found")
        problem(anon.get("/v1/registry/projects/%C3%84"), 404, "not_found")
        assert ok(anon.get("/v1/registry/retirements", params={"account": "DEV BUY"})) == []
