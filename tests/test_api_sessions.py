"""Operator administration and market sessions through the network API (review32): the day's
close never narrows a band to one price, listings under which no order could be placed are
refused, payment references are read without surrounding spaces, a repeat of a payment made
while the exchange was stopped answers as a repeat, and a halt's or resume's answer is the state
its own command left."""

from __future__ import annotations

import time
from decimal import Decimal

import pytest

from exchange.service import now_us
from tests.api_clients import FeedClient
from tests.api_helpers import SYMBOL, ServerThread, build_world, client, ok, operator_key
from tests.test_api_rest import problem

DAY = 86_400_000_000


@pytest.fixture
def server(db, run):
    with ServerThread(db) as s:
        s.ops_key = run(operator_key(db))
        yield s


def _limit(side: str, price: str, quantity: str = "1.000") -> dict:
    return {"symbol": SYMBOL, "side": side, "type": "limit", "price": price, "quantity": quantity}


def test_the_days_close_never_pins_the_band_to_one_price(db, run):
    """Tick 1.00, reference 10.00, band 10 % (9.00 to 11.00): the day trades at 9.00, and 9.00
    +-10 % holds no price on the grid but 9.00. The close keeps a tick either way (8.00 to
    10.00), day after day; it used to leave only 9.00, for good (review32)."""
    key = run(operator_key(db))
    shift = [0]
    with ServerThread(db, service_options={"clock": lambda: now_us() + shift[0]}) as s:
        w = build_world(s.http, key, listing={"tick": "1.00", "reference_price": "10.00", "band_percent": "10"})
        fc = FeedClient(s.ws, channels=[{"name": "instruments"}]).subscribe()
        with w.as_("DEV") as dev, w.as_("BUY") as buy, client(s.http) as anon:
            for day in (0, 1, 2):
                shift[0] = day * DAY
                inst = ok(anon.get(f"/v1/instruments/{SYMBOL}"))
                for _ in range(100):  # the timer applies the close within a second of its time
                    if not day or inst["reference_price"] == "9.00":
                        break
                    time.sleep(0.05)
                    inst = ok(anon.get(f"/v1/instruments/{SYMBOL}"))
                if day:
                    assert (inst["reference_price"], inst["price_band"]) == (
                        "9.00", {"low": "8.00", "high": "10.00"}), (day, inst)
                    for price, status in (("7.00", 422), ("8.00", 201), ("10.00", 201), ("11.00", 422)):
                        r = dev.post("/v1/orders", json=_limit("sell", price))
                        assert r.status_code == status, (day, price, r.text)
                        if status == 201:
                            ok(dev.delete(f"/v1/orders/{r.json()['order_id']}"))
                ok(dev.post("/v1/orders", json=_limit("sell", "9.00")), 201)
                ok(buy.post("/v1/orders", json=_limit("buy", "9.00")), 201)
        # The feed's instruments channel announced the close with the band it set.
        closes = fc.of(lambda m: m.get("ch") == "instruments" and m["type"] == "close")
        fc.close()
        assert closes and closes[0]["symbol"] == SYMBOL, fc.messages
        assert (closes[0]["reference_price"], closes[0]["price_band"]) == ("9.00", {"low": "8.00", "high": "10.00"})


def test_listings_no_order_could_be_placed_under_are_refused(server):
    """A lot or a minimum quantity above the largest order (1099511627.776 t) is refused with
    invalid_rules and lists nothing; it was listed, and every order on it refused (review32)."""
    build_world(server.http, server.ops_key)
    with client(server.http, server.ops_key) as ops, client(server.http) as anon:
        before = ok(anon.get("/v1/instruments"))
        for i, extra in enumerate([{"lot": "99999999999.000"},
                                   {"lot": "1.000", "min_quantity": "99999999999999.000"},
                                   {"lot": "1099511627.777"}]):
            body = {"symbol": f"FOREST-{2060 + i}", "reference_price": "35.00", "always_open": True, **extra}
            out = problem(ops.post("/v1/instruments", json=body), 400, "invalid_rules")
            assert "1099511627.776" in out["detail"], out
        assert ok(anon.get("/v1/instruments")) == before
        biggest = ok(ops.post("/v1/instruments", json={"symbol": "FOREST-2070", "reference_price": "35.00",
                                                       "lot": "1099511627.776", "always_open": True}), 201)
        assert biggest["lot"] == "1099511627.776"


def test_payment_references_are_read_without_surrounding_spaces(server):
    """"ref", " ref" and "ref " are one payment: a retry whose reference gained or lost a space
    is a repeat; they were three deposits (review32)."""
    w = build_world(server.http, server.ops_key)
    with client(server.http, server.ops_key) as ops, w.as_("BUY") as buy:
        cash = ok(buy.get("/v1/account"))["cash_available"]
        first = ok(ops.post("/v1/accounts/BUY/deposits", json={"amount": "100.00", "reference": "pay-7"}), 201)
        for ref in (" pay-7", "pay-7 ", "  pay-7  "):
            again = ok(ops.post("/v1/accounts/BUY/deposits", json={"amount": "100.00", "reference": ref}), 200)
            assert again == {**first, "duplicate": True}
        spent = ok(ops.post("/v1/accounts/BUY/withdrawals", json={"amount": "1.00", "reference": " out-1 "}), 201)
        assert spent["reference"] == "out-1"
        assert Decimal(ok(buy.get("/v1/account"))["cash_available"]) == Decimal(cash) + 99


def test_a_repeat_of_a_payment_made_while_stopped_answers_as_a_repeat(db, run):
    """A deposit made from the command line while the exchange was stopped, repeated through the
    API with the same terms, answers 200 "duplicate" (without a seq: it has no journal entry of
    its own), and with other terms 409 duplicate_reference; it was 409 either way (review32)."""
    from exchange import ledger

    key = run(operator_key(db))
    with ServerThread(db) as s:
        build_world(s.http, key)

    async def by_hand() -> None:
        import asyncpg
        conn = await asyncpg.connect(db)
        try:
            await ledger.deposit(conn, account="BUY", amount_fen=50_000, reference="bank-2026-11-22-001")
        finally:
            await conn.close()
    run(by_hand())
    with ServerThread(db) as s, client(s.http, key) as ops:
        body = {"amount": "500.00", "reference": "bank-2026-11-22-001"}
        seq = s.exchange.service.core.seq
        again = ok(ops.post("/v1/accounts/BUY/deposits", json=body), 200)
        assert again == {"account": "BUY", "direction": "deposit", "amount": "500.00",
                         "reference": "bank-2026-11-22-001", "seq": None, "duplicate": True}
        for path, other in (("deposits", {"amount": "500.01"}), ("withdrawals", {}),):
            problem(ops.post(f"/v1/accounts/BUY/{path}", json={**body, **other}), 409, "duplicate_reference")
        problem(ops.post("/v1/accounts/BUY2/deposits", json=body), 409, "duplicate_reference")
        assert s.exchange.service.core.seq == seq  # nothing journaled


def test_a_halt_or_resume_answers_with_the_state_it_left(server, run):
    """Halts and resumes sent at once: each successful answer names the state its own command
    left; a resume sequenced between a halt and its answer made the halt answer "open" (review32)."""
    import asyncio

    import httpx

    build_world(server.http, server.ops_key)

    async def rounds() -> list:
        wrong = []
        async with httpx.AsyncClient(base_url=server.http, timeout=30,
                                     headers={"Authorization": f"Bearer {server.ops_key}"}) as ops:
            for _ in range(15):
                answers = await asyncio.gather(*(ops.post(f"/v1/instruments/{SYMBOL}/{op}")
                                                 for op in ("halt", "resume") * 3))
                for r in answers:
                    op = r.url.path.rsplit("/", 1)[1]
                    assert r.status_code in (200, 409), r.text
                    if r.status_code == 200 and r.json()["session"] != {"halt": "halted", "resume": "open"}[op]:
                        wrong.append((op, r.json()["session"]))
        return wrong
    assert run(rounds()) == []


def test_an_account_is_the_operator_in_kind_and_role_or_a_member_in_both(server):
    """kind operator with role member (an operator that trades) and another kind with role
    operator (a member that runs the registry) are refused and create nothing; they were created
    (review32). Without a role, kind operator is the operator and every other kind a member."""
    with client(server.http, server.ops_key) as ops:
        for kind, role in (("operator", "member"), ("enterprise", "operator"), ("individual", "operator")):
            problem(ops.post("/v1/accounts", json={"code": f"ODD-{kind.upper()}", "kind": kind, "role": role}),
                    400, "invalid_role")
            problem(ops.post(f"/v1/accounts/ODD-{kind.upper()}/deposits", json={"amount": "1.00", "reference": "x"}),
                    404, "unknown_account")
        made = ok(ops.post("/v1/accounts", json={"code": "OPS2", "kind": "operator"}), 201)
        assert made["role"] == "operator", made
        made = ok(ops.post("/v1/accounts", json={"code": "FIRM", "kind": "enterprise"}), 201)
        assert made["role"] == "member", made


def test_the_operator_rotates_and_revokes_a_members_keys(server, monkeypatch):
    """POST /v1/accounts/{code}/keys issues another key, with revoke_others the earlier ones stop
    working (within KEY_TTL, shortened here); DELETE revokes every one. Only the operator may, and
    the exchange's own accounts have no keys. No route or command did either (review33)."""
    from api import auth

    monkeypatch.setattr(auth, "KEY_TTL", 0.2)
    w = build_world(server.http, server.ops_key)
    old = w.keys["BUY"]
    with client(server.http, server.ops_key) as ops, client(server.http, old) as member:
        ok(member.get("/v1/account"))
        problem(member.post("/v1/accounts/BUY/keys", json={}), 403, "forbidden")
        problem(ops.post("/v1/accounts/CX-CUSTODY/keys", json={}), 403, "forbidden")
        problem(ops.post("/v1/accounts/NOBODY/keys", json={}), 404, "not_found")
        kept = ok(ops.post("/v1/accounts/BUY/keys", json={}), 201)
        assert (kept["account"], kept["revoked"]) == ("BUY", 0) and kept["api_key"].startswith("cx_")
        fresh = ok(ops.post("/v1/accounts/BUY/keys", json={"revoke_others": True}), 201)
        assert fresh["revoked"] == 2, fresh
        time.sleep(0.3)
        problem(member.get("/v1/account"), 401, "unauthorized")
        with client(server.http, kept["api_key"]) as second:
            problem(second.get("/v1/account"), 401, "unauthorized")
        with client(server.http, fresh["api_key"]) as new:
            assert ok(new.get("/v1/account"))["code"] == "BUY"
            assert ok(ops.delete("/v1/accounts/BUY/keys")) == {"account": "BUY", "revoked": 1}
            time.sleep(0.3)
            problem(new.get("/v1/account"), 401, "unauthorized")
