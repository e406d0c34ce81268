"""The REST order-entry fast path (api/fastpath.py) against the FastAPI route it stands in for.

Two exchanges built the same way, one with the fast path and one without, get the same sequence
of ``POST /v1/orders`` requests — good orders, resent client order ids, every kind of bad input,
other callers, the exchange's own refusals — and must give the same status, content type and
body to each, up to the times. The fast server must have answered the good ones itself, so the
comparison is between two different code paths and not the same one twice.
"""

from __future__ import annotations

import os
import re
from typing import Any

import httpx
import pytest

from exchange.database import drop_database, ensure_database, with_database
from tests.api_helpers import SYMBOL, ServerThread, build_world, operator_key

TIME = re.compile(r'"(time|created_at|updated_at)":"[^"]*"')


def requests(keys: dict[str, str]) -> list[tuple[str, Any, bytes]]:
    """(name, headers, body) of the requests both servers get, in this order."""
    member = {"authorization": f"Bearer {keys['BUY']}", "content-type": "application/json"}
    seller = {"authorization": f"Bearer {keys['DEV']}", "content-type": "application/json"}
    ops = {"authorization": f"Bearer {keys['OPS']}", "content-type": "application/json"}
    return [
        ("resting ask", seller, b'{"symbol":"%s","side":"sell","price":"36.00","quantity":"5.000"}' % SYMBOL.encode()),
        ("crossing bid", member, b'{"symbol":"%s","side":"buy","price":"36.00","quantity":"2.000",'
                                 b'"client_order_id":"c-1"}' % SYMBOL.encode()),
        ("coid resend", member, b'{"symbol":"%s","side":"buy","price":"36.00","quantity":"2.000",'
                                b'"client_order_id":"c-1"}' % SYMBOL.encode()),
        ("resting bid, charset", {**member, "content-type": "application/json; charset=utf-8"},
         b'{"symbol":"%s","side":"buy","price":"34.00","quantity":"1.000","time_in_force":"GTC"}' % SYMBOL.encode()),
        ("market buy", member, b'{"symbol":"%s","side":"buy","type":"market","quantity":"1.000",'
                               b'"max_cash":"100.00"}' % SYMBOL.encode()),
        ("no content type", {"authorization": member["authorization"]},
         b'{"symbol":"%s","side":"buy","price":"33.00","quantity":"1.000"}' % SYMBOL.encode()),
        ("too many decimals", member, b'{"symbol":"%s","side":"buy","price":"35.001","quantity":"1.000"}'
         % SYMBOL.encode()),
        ("off band", member, b'{"symbol":"%s","side":"buy","price":"99.00","quantity":"1.000"}' % SYMBOL.encode()),
        ("unknown instrument", member, b'{"symbol":"NOPE-2020","side":"buy","price":"35.00","quantity":"1.000"}'),
        ("no funds", member, b'{"symbol":"%s","side":"buy","price":"35.00","quantity":"900000.000"}'
         % SYMBOL.encode()),
        ("no credits", member, b'{"symbol":"%s","side":"sell","price":"35.00","quantity":"1.000"}' % SYMBOL.encode()),
        ("limit without price", member, b'{"symbol":"%s","side":"buy","quantity":"1.000"}' % SYMBOL.encode()),
        ("bad json", member, b'{"symbol": '),
        ("json array", member, b'[1, 2]'),
        ("missing side", member, b'{"symbol":"%s","price":"35.00","quantity":"1.000"}' % SYMBOL.encode()),
        ("extra field", member, b'{"symbol":"%s","side":"buy","price":"35.00","quantity":"1.000","x":1}'
         % SYMBOL.encode()),
        ("number quantity", member, b'{"symbol":"%s","side":"buy","price":"35.00","quantity":1.5}' % SYMBOL.encode()),
        ("text body", {**member, "content-type": "text/plain"},
         b'{"symbol":"%s","side":"buy","price":"35.00","quantity":"1.000"}' % SYMBOL.encode()),
        ("no key", {"content-type": "application/json"},
         b'{"symbol":"%s","side":"buy","price":"35.00","quantity":"1.000"}' % SYMBOL.encode()),
        ("unknown key", {"authorization": "Bearer cx_not_a_key", "content-type": "application/json"},
         b'{"symbol":"%s","side":"buy","price":"35.00","quantity":"1.000"}' % SYMBOL.encode()),
        ("operator", ops, b'{"symbol":"%s","side":"buy","price":"35.00","quantity":"1.000"}' % SYMBOL.encode()),
        ("bad key and bad body", {"authorization": "Bearer nope", "content-type": "application/json"}, b"{"),
        ("two keys, the first unknown", [("authorization", "Bearer cx_not_a_key"), *member.items()],
         b'{"symbol":"%s","side":"buy","price":"33.00","quantity":"1.000"}' % SYMBOL.encode()),
    ]


def answers(server: ServerThread, keys: dict[str, str]) -> list[tuple[str, int, str, str]]:
    out = []
    with httpx.Client(base_url=server.http, timeout=30) as http:
        for name, headers, body in requests(keys):
            r = http.post("/v1/orders", content=body, headers=headers)
            out.append((name, r.status_code, r.headers["content-type"], TIME.sub(r'"\1":"…"', r.text)))
    return out


@pytest.fixture
def two_worlds(pg_server, template_db, run):
    names = [f"cx_fastpath_{os.getpid()}_{i}" for i in (0, 1)]
    try:
        dsns = []
        for name in names:
            run(ensure_database(pg_server, name, template=template_db))
            dsns.append(with_database(pg_server, name))
        yield dsns
    finally:
        for name in names:
            run(drop_database(pg_server, name))


def test_fast_path_answers_exactly_as_the_fastapi_route(two_worlds, run):
    got = {}
    answered = {}
    for dsn, fast in zip(two_worlds, (True, False), strict=True):
        ops = run(operator_key(dsn))
        with ServerThread(dsn, fast_orders=fast) as server:
            world = build_world(server.http, ops)
            got[fast] = answers(server, world.keys)
            path = server.exchange.orders_path
            answered[fast] = path.answered if path is not None else None
    # Both worlds were built by the same requests, so ids and sequence numbers agree too.
    for fast, slow in zip(got[True], got[False], strict=True):
        assert fast == slow, f"{fast[0]}:\n fast path {fast[1:]}\n FastAPI   {slow[1:]}"
    statuses = {name: status for name, status, *_ in got[True]}
    assert statuses["crossing bid"] == statuses["coid resend"] == 201
    assert statuses["bad json"] == statuses["missing side"] == 400
    assert statuses["no key"] == statuses["unknown key"] == 401 and statuses["operator"] == 403
    assert statuses["two keys, the first unknown"] == 401
    assert statuses["no funds"] == 422 and statuses["no content type"] == 400
    # Answered by the fast path itself: every request from the member with a well-formed body.
    plain = {"crossing bid", "coid resend", "resting bid, charset", "market buy",
             "too many decimals", "off band", "unknown instrument", "no funds", "no credits",
             "limit without price", "resting ask"}
    assert answered == {True: len(plain), False: None}
