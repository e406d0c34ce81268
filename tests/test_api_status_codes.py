"""HTTP statuses of the stable error codes (api/wire.py), and amends below the minimum quantity.

Every code the code base can raise has an explicit status (a scan of the sources): a new code
must be given one, not fall to a default. State conflicts are 409 (api/README.md): registry
operations on credits in the wrong state and issuing for a project that is not active. An amend
cannot take an order below the instrument's minimum quantity, which a new order of that size
could not have, over REST and the websocket alike; a partly filled remainder already below it
may still be repriced and reduced.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

from api.wire import _BY_STATUS, FEED_ONLY, STATUS
from exchange.blockplan import STATES
from matching import events as E
from tests.api_clients import WsTrader, add_listing
from tests.api_helpers import SYMBOL, build_world, client, db_rows, ok, own_server
from tests.test_api_rest import problem, state

ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCES = ("exchange", "matching", "api", "clearing")
# Calls whose argument (the first, or `code=`) is an error code.
RAISERS = {"CarbonxError", "Rejected", "StepsFailed", "problem", "problem_response", "_send_problem", "_error"}
CODE_AT = {"_send_problem": 1, "_error": 2}  # (send, code, ...) and the feed's (client, ident, code, ...)
CODE_KEYWORD = {"UnitError", "_units"}


def _code_args(call: ast.Call) -> list[ast.expr]:
    f = call.func
    name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
    args = [kw.value for kw in call.keywords if kw.arg == "code"] if name in RAISERS | CODE_KEYWORD else []
    at = CODE_AT.get(name, 0)
    if name in RAISERS and len(call.args) > at:
        args.append(call.args[at])
    return args


def _codes_of(expr: ast.expr, where: str, codes: dict[str, str], odd: list[str]) -> None:
    if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
        codes.setdefault(expr.value, where)
    elif isinstance(expr, ast.IfExp):
        _codes_of(expr.body, where, codes, odd)
        _codes_of(expr.orelse, where, codes, odd)
    elif isinstance(expr, ast.JoinedStr) and ast.unparse(expr) == "f'credits_{b.state}'":
        for s in STATES:  # exchange/blockplan.py take_range: the state the credits are in
            codes.setdefault(f"credits_{s}", where)
    elif isinstance(expr, ast.Subscript) and ast.unparse(expr.value) == "E.REJECT_NAMES":
        pass  # the core's reject codes by number: all of REJECT_NAMES is added below
    elif not isinstance(expr, ast.Name | ast.Attribute):
        # A name or attribute passes on a code raised elsewhere (e.code, out.code): found there.
        odd.append(f"{where}: {ast.unparse(expr)}")


def raised_codes() -> tuple[dict[str, str], list[str]]:
    """Every error code in the sources, with one place that raises it; and code expressions the
    scan cannot read (a new kind of dynamic code: teach the scan, and give each code a status)."""
    codes: dict[str, str] = {}
    odd: list[str] = []
    for top in SOURCES:
        for path in sorted((ROOT / top).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
                if isinstance(node, ast.Call):
                    for arg in _code_args(node):
                        _codes_of(arg, where, codes, odd)
                    # A CarbonxError subclass's fixed code: super().__init__("rate_limited", ...)
                    f = node.func
                    if (isinstance(f, ast.Attribute) and f.attr == "__init__" and node.args
                            and isinstance(f.value, ast.Call) and getattr(f.value.func, "id", "") == "super"):
                        _codes_of(node.args[0], where, codes, odd)
                elif isinstance(node, ast.Dict):  # {"type": "error", "code": "slow_consumer", ...}
                    for k, v in zip(node.keys, node.values, strict=True):
                        if (isinstance(k, ast.Constant) and k.value == "code" and isinstance(v, ast.Constant)
                                and isinstance(v.value, str)):
                            codes.setdefault(v.value, where)
    for name in E.REJECT_NAMES.values():  # the core's reject codes, by number in journal events
        codes.setdefault(name, "matching/events.py REJECT_NAMES")
    return codes, odd


def test_every_code_raised_anywhere_has_an_explicit_status() -> None:
    codes, odd = raised_codes()
    assert not odd, f"error codes the scan cannot read: {odd}"
    # The scan must find what it is for (a broken scan would find nothing and pass).
    assert {"credits_encumbered", "project_not_active", "min_quantity", "invalid_activity", "rate_limited",
            "slow_consumer", "payload_too_large", "invalid_command"} <= set(codes)
    missing = {c: where for c, where in codes.items() if c not in STATUS and c not in FEED_ONLY}
    assert not missing, f"codes without an HTTP status in api/wire.py: {missing}"
    assert not FEED_ONLY & set(STATUS)
    assert sum(len(c) for c in _BY_STATUS.values()) == len(STATUS), "a code listed under two statuses"


@pytest.mark.parametrize(("code", "status"), [
    ("credits_encumbered", 409), ("credits_available", 409), ("credits_frozen", 409), ("credits_retired", 409),
    ("credits_cancelled", 409), ("project_not_active", 409), ("busy", 409), ("halted", 409),
    ("market_closed", 409), ("invalid_state", 400), ("invalid_serial", 400), ("ambiguous_serial", 400),
    ("min_quantity", 422), ("unknown_account", 404), ("unauthorized", 401), ("forbidden", 403),
])
def test_statuses_by_meaning(code: str, status: int) -> None:
    assert STATUS[code] == status


# ---- black box -------------------------------------------------------------------------------------

SER = "CDHF-FOREST-2023-{:010d}-{:010d}"


@pytest.fixture(scope="module")
def world(pg_server, template_db, run):
    with own_server(pg_server, template_db, run, "status") as server:
        yield server, build_world(server.http, server.ops_key, issue_tonnes="100.000")


def test_registry_state_conflicts_are_409_and_change_nothing(world, run) -> None:
    server, w = world
    with w.as_("OPS") as ops, w.as_("DEV") as dev:
        # 60 t offered: serials 1-60000 (lowest first) are encumbered by the resting order.
        ok(dev.post("/v1/orders", json={"symbol": SYMBOL, "side": "sell", "price": "35.00", "quantity": "60.000"}),
           201)
        ok(ops.post("/v1/registry/freeze", json={"serial": SER.format(90001, 100000), "reason": "audit"}))
        # Another issuance of the same vintage, held by BUY2: DEV holds none of it.
        other = ok(ops.post("/v1/registry/issuances", json={"project": "FOREST", "vintage": 2023,
                                                             "quantity": "1.000", "to_account": "BUY2"}), 201)["id"]
        before = state(w)
        journal_end = db_rows(run, server.dsn, "SELECT max(seq) FROM journal")[0][0]
        problem(ops.post("/v1/registry/freeze", json={"serial": SER.format(1, 10000), "reason": "audit"}),
                409, "credits_encumbered")
        problem(ops.post("/v1/registry/cancel", json={"serial": SER.format(1, 10000), "reason": "audit"}),
                409, "credits_encumbered")
        # Partly available: the available part would be taken from the exchange's core before the
        # registry refused the rest, and given back, two journal entries for nothing (review21).
        for path in ("/v1/registry/freeze", "/v1/registry/cancel"):
            problem(ops.post(path, json={"serial": SER.format(59991, 60100), "reason": "audit"}),
                    409, "credits_encumbered")
        problem(ops.post("/v1/registry/freeze", json={"serial": SER.format(89991, 90100), "reason": "audit"}),
                409, "credits_frozen")
        problem(dev.post("/v1/retirements", json={"issuance_id": other, "quantity": "1.000", "beneficiary": "B",
                                                  "purpose": "p"}), 422, "insufficient_credits")
        problem(ops.post("/v1/registry/unfreeze", json={"serial": SER.format(60001, 70000), "reason": "audit"}),
                409, "credits_available")
        problem(ops.post("/v1/registry/freeze", json={"serial": SER.format(95001, 96000), "reason": "again"}),
                409, "credits_frozen")
        issuances = db_rows(run, server.dsn, "SELECT count(*) FROM issuances")[0][0]
        db_rows(run, server.dsn, "UPDATE projects SET status = 'suspended' WHERE code = 'FOREST'")
        try:
            problem(ops.post("/v1/registry/issuances", json={"project": "FOREST", "vintage": 2023,
                                                             "quantity": "5.000"}), 409, "project_not_active")
        finally:
            db_rows(run, server.dsn, "UPDATE projects SET status = 'active' WHERE code = 'FOREST'")
        assert db_rows(run, server.dsn, "SELECT count(*) FROM issuances")[0][0] == issuances
        assert state(w) == before
        assert db_rows(run, server.dsn, "SELECT max(seq) FROM journal")[0][0] == journal_end, "a refusal journaled"
        ok(ops.post("/v1/registry/unfreeze", json={"serial": SER.format(90001, 100000), "reason": "cleared"}))
        ok(dev.delete("/v1/orders"))
        # /openapi.json says so: these routes document 409.
        paths = ok(client(server.http).get("/openapi.json"))["paths"]
        for path in ("/v1/registry/freeze", "/v1/registry/unfreeze", "/v1/registry/cancel", "/v1/registry/issuances"):
            assert "409" in paths[path]["post"]["responses"], path
        assert {"409", "422"} <= set(paths["/v1/orders/{order_id}"]["patch"]["responses"])


def sell(symbol: str, qty: str, price: str = "35.00") -> dict:
    return {"symbol": symbol, "side": "sell", "type": "limit", "price": price, "quantity": qty}


@pytest.fixture(scope="module")
def min10(world):
    """A listing whose orders must be at least 10 t (lot 1 t), its developer (MINDEV) selling."""
    _server, w = world
    with w.as_("OPS") as ops:
        return add_listing(ops, w.keys, "MINQ", "MINDEV", listing={"min_quantity": "10.000"})


def test_amend_below_the_minimum_is_refused_as_a_new_order_is(world, min10) -> None:
    _server, w = world
    sym = min10
    with w.as_("MINDEV") as dev, w.as_("OPS") as ops:
        problem(dev.post("/v1/orders", json=sell(sym, "1.000")), 422, "min_quantity")
        o = ok(dev.post("/v1/orders", json=sell(sym, "10.000")), 201)
        oid = o["order_id"]
        before = state(w, codes=("MINDEV", "BUY"), symbols=(sym,))
        for body in ({"quantity": "1.000"}, {"quantity": "9.000"}, {"quantity": "9.000", "price": "35.10"}):
            problem(dev.patch(f"/v1/orders/{oid}", json=body), 422, "min_quantity")
        # What a new order is refused for before the minimum keeps its code.
        problem(dev.patch(f"/v1/orders/{oid}", json={"quantity": "1.500"}), 422, "invalid_lot")
        ok(ops.post(f"/v1/instruments/{sym}/halt"))
        try:
            problem(dev.patch(f"/v1/orders/{oid}", json={"quantity": "1.000"}), 409, "halted")
        finally:
            ok(ops.post(f"/v1/instruments/{sym}/resume"))
        assert state(w, codes=("MINDEV", "BUY"), symbols=(sym,)) == before
        # At or above the minimum an amend is an amend.
        a = ok(dev.patch(f"/v1/orders/{oid}", json={"quantity": "12.000"}))
        assert a["remaining_quantity"] == "12.000"
        ok(dev.delete(f"/v1/orders/{oid}"))


def test_a_remainder_below_the_minimum_may_be_repriced_and_reduced_not_raised(world, min10) -> None:
    _server, w = world
    sym = min10
    with w.as_("MINDEV") as dev, w.as_("BUY") as buy:
        oid = ok(dev.post("/v1/orders", json=sell(sym, "12.000")), 201)["order_id"]
        ok(buy.post("/v1/orders", json={"symbol": sym, "side": "buy", "type": "limit", "price": "35.00",
                                        "quantity": "10.000"}), 201)
        assert ok(dev.get(f"/v1/orders/{oid}"))["remaining_quantity"] == "2.000"
        a = ok(dev.patch(f"/v1/orders/{oid}", json={"price": "35.20"}))
        assert (a["price"], a["remaining_quantity"]) == ("35.20", "2.000")
        a = ok(dev.patch(f"/v1/orders/{oid}", json={"quantity": "2.000", "price": "35.30"}))
        assert (a["price"], a["remaining_quantity"]) == ("35.30", "2.000")
        a = ok(dev.patch(f"/v1/orders/{oid}", json={"quantity": "1.000"}))
        assert a["remaining_quantity"] == "1.000"
        before = state(w, codes=("MINDEV", "BUY"), symbols=(sym,))
        problem(dev.patch(f"/v1/orders/{oid}", json={"quantity": "2.000"}), 422, "min_quantity")
        problem(dev.patch(f"/v1/orders/{oid}", json={"quantity": "9.000", "price": "35.00"}), 422, "min_quantity")
        assert state(w, codes=("MINDEV", "BUY"), symbols=(sym,)) == before
        a = ok(dev.patch(f"/v1/orders/{oid}", json={"quantity": "10.000"}))
        assert a["remaining_quantity"] == "10.000"
        ok(dev.delete(f"/v1/orders/{oid}"))


def test_websocket_amend_below_the_minimum(world, min10) -> None:
    server, w = world
    sym = min10
    t = WsTrader(server.ws, w.keys["MINDEV"], orders_channel=False)
    try:
        r = t.request({"op": "order.place", **sell(sym, "1.000")})
        assert (r["type"], r["code"]) == ("error", "min_quantity"), r
        oid = t.request({"op": "order.place", **sell(sym, "12.000")})["order"]["order_id"]
        with w.as_("MINDEV") as dev:
            before = state(w, codes=("MINDEV",), symbols=(sym,))
            r = t.request({"op": "order.amend", "order_id": oid, "quantity": "1.000"})
            assert (r["type"], r["code"]) == ("error", "min_quantity"), r
            assert state(w, codes=("MINDEV",), symbols=(sym,)) == before
            with w.as_("BUY") as buy:
                ok(buy.post("/v1/orders", json={"symbol": sym, "side": "buy", "type": "limit", "price": "35.00",
                                                "quantity": "10.000"}), 201)
            r = t.request({"op": "order.amend", "order_id": oid, "quantity": "2.000", "price": "35.40"})
            assert r["type"] == "result" and r["order"]["remaining_quantity"] == "2.000", r
            r = t.request({"op": "order.amend", "order_id": oid, "quantity": "3.000"})
            assert (r["type"], r["code"]) == ("error", "min_quantity"), r
            ok(dev.delete(f"/v1/orders/{oid}"))
    finally:
        t.close()
