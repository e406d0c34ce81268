"""Retirements are for good, so retrying one must be safe: POST /v1/retirements and POST
/v1/neutrality/offset take an Idempotency-Key header (api/README.md). Black box through the real
server on loopback, with the database read to prove what was (not) done."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from typing import Any

import asyncpg
import httpx
import pytest

from exchange.database import drop_database, ensure_database, with_database
from exchange.errors import CarbonxError
from exchange.serials import format_serial
from exchange.service import now_us
from matching import events as E
from tests.api_helpers import SYMBOL, ServerThread, World, build_world, client, db_rows, ok, operator_key, own_server

RETIRE = {"symbol": SYMBOL, "quantity": "1.000", "beneficiary": "Green tech conference 2026",
          "purpose": "Carbon neutrality of a one-day conference"}
OFFSET = {"symbol": SYMBOL, "quantity": "2.000", "max_cash": "100.00", "beneficiary": "Spring forum",
          "purpose": "Carbon neutrality of the spring forum"}


@pytest.fixture(scope="module")
def world(pg_server: str, template_db: str, run) -> Iterator[tuple[ServerThread, World]]:
    with own_server(pg_server, template_db, run, "idempotency") as server:
        w = build_world(server.http, server.ops_key)
        with w.as_("DEV") as dev:  # asks the offsets buy from
            for _ in range(12):
                ok(dev.post("/v1/orders", json={"symbol": SYMBOL, "side": "sell", "price": "36.00",
                                                "quantity": "1.000"}), 201)
        yield server, w


def q(server: ServerThread, run: Any, sql: str, *args: Any) -> list[asyncpg.Record]:
    return db_rows(run, server.dsn, sql, *args)


def retirements(server: ServerThread, run: Any, code: str) -> list[asyncpg.Record]:
    return q(server, run, """SELECT r.certificate_code, r.quantity_kg, r.request_key FROM retirements r
                             JOIN accounts a ON a.id = r.account_id WHERE a.code = $1 ORDER BY r.id""", code)


@contextmanager
def retirement_fails_once(service: Any) -> Iterator[list[int]]:
    """The service's next retirement fails as if the process stopped before it (the list says
    whether it did)."""
    real = service.retire
    failed: list[int] = []

    async def stops_once(**kw: Any) -> Any:
        if not failed:
            failed.append(1)
            raise CarbonxError("unavailable", "stopped before the retirement (the test's)")
        return await real(**kw)

    service.retire = stops_once
    try:
        yield failed
    finally:
        service.retire = real


def keyed(key: str) -> dict[str, str]:
    return {"Idempotency-Key": key}


def test_a_retried_retirement_retires_once(world, run) -> None:
    server, w = world
    with w.as_("DEV") as dev:
        before = ok(dev.get("/v1/account"))
        first = dev.post("/v1/retirements", json=RETIRE, headers=keyed("ret-1"))
        assert first.status_code == 201 and "idempotent-replayed" not in first.headers
        # The same request (1.0 t is 1.000 t) again: the first's answer, nothing retired.
        again = dev.post("/v1/retirements", json={**RETIRE, "quantity": "1.0"}, headers=keyed("ret-1"))
        assert again.status_code == 201 and again.headers["idempotent-replayed"] == "true"
        assert again.json() == first.json()
        after = ok(dev.get("/v1/account"))
    made = [r for r in retirements(server, run, "DEV") if r["request_key"] == "ret-1"]
    assert [(r["certificate_code"], r["quantity_kg"]) for r in made] == [(first.json()["certificate_code"], 1000)]
    was = {h["symbol"]: h for h in before["holdings"]}[SYMBOL]
    now = {h["symbol"]: h for h in after["holdings"]}[SYMBOL]
    assert Decimal(was["available"]) - Decimal(now["available"]) == Decimal("1.000")


def test_a_reused_key_with_another_request_is_refused_and_changes_nothing(world, run) -> None:
    server, w = world
    with w.as_("DEV") as dev:
        ok(dev.post("/v1/retirements", json=RETIRE, headers=keyed("ret-2")), 201)
        before, count = ok(dev.get("/v1/account")), len(retirements(server, run, "DEV"))
        for other in ({**RETIRE, "quantity": "2.000"}, {**RETIRE, "beneficiary": "Someone else"},
                      {**RETIRE, "purpose": "Another purpose"}):
            r = dev.post("/v1/retirements", json=other, headers=keyed("ret-2"))
            assert r.status_code == 422 and r.json()["code"] == "idempotency_key_reused", r.text
            assert r.headers["content-type"] == "application/problem+json"
        # The key is taken by a retirement: an offset under it is another request too.
        r = dev.post("/v1/neutrality/offset", json=OFFSET, headers=keyed("ret-2"))
        assert r.status_code == 422 and r.json()["code"] == "idempotency_key_reused", r.text
        assert ok(dev.get("/v1/account")) == before and len(retirements(server, run, "DEV")) == count


def test_the_same_retirement_spelled_otherwise_is_a_repeat(world, run) -> None:
    _, w = world
    with w.as_("DEV") as dev:
        first = ok(dev.post("/v1/retirements", json=RETIRE, headers=keyed("ret-spelling")), 201)
        again = dev.post("/v1/retirements", json={**RETIRE, "symbol": SYMBOL.lower(), "quantity": "1",
                                                  "beneficiary": f"  {RETIRE['beneficiary']} "},
                         headers=keyed("ret-spelling"))
        assert again.status_code == 201 and again.headers["idempotent-replayed"] == "true", again.text
        assert again.json() == first


def test_a_key_changes_no_error_of_a_bad_request(world, run) -> None:
    _, w = world
    bad = {**RETIRE, "symbol": "nonsense", "beneficiary": "   "}
    with w.as_("DEV") as dev:
        plain = dev.post("/v1/retirements", json=bad)
        keyed_ = dev.post("/v1/retirements", json=bad, headers=keyed("bad-request"))
        assert plain.status_code == keyed_.status_code == 400 and plain.json() == keyed_.json(), keyed_.text


def test_two_idempotency_key_headers_are_refused(world, run) -> None:
    server, w = world
    with w.as_("DEV") as dev:
        count = len(retirements(server, run, "DEV"))
        r = dev.post("/v1/retirements", json=RETIRE, headers=[("Idempotency-Key", "two-a"),
                                                              ("Idempotency-Key", "two-b")])
        assert r.status_code == 400 and r.json()["code"] == "invalid_request", r.text
        assert len(retirements(server, run, "DEV")) == count


def test_an_offsets_order_name_is_reserved(world, run) -> None:
    """A member's own order named offset:KEY would pass for the offset's purchase under KEY."""
    _, w = world
    with w.as_("BUY") as buy:
        order = {"symbol": SYMBOL, "side": "buy", "price": "30.00", "quantity": "1.000", "client_order_id": "offset:k"}
        r = buy.post("/v1/orders", json=order)
        assert r.status_code == 400 and r.json()["code"] == "invalid_request", r.text
        assert "offset:" in r.json()["detail"]


def test_keys_are_per_account_and_requests_without_one_are_each_done(world, run) -> None:
    server, w = world
    with w.as_("BUY") as buy, w.as_("DEV") as dev:
        ok(buy.post("/v1/orders", json={"symbol": SYMBOL, "side": "buy", "price": "36.00", "quantity": "2.000"}), 201)
        mine = ok(buy.post("/v1/retirements", json=RETIRE, headers=keyed("shared-key")), 201)
        theirs = ok(dev.post("/v1/retirements", json=RETIRE, headers=keyed("shared-key")), 201)
        assert mine["certificate_code"] != theirs["certificate_code"] and mine["account"] == "BUY"
        n = len(retirements(server, run, "DEV"))
        for _ in range(2):
            ok(dev.post("/v1/retirements", json=RETIRE), 201)
        assert len(retirements(server, run, "DEV")) == n + 2


def test_simultaneous_repeats_retire_once(world, run) -> None:
    server, w = world
    answers: list[httpx.Response] = []
    go = threading.Barrier(8)

    def send() -> None:
        with w.as_("DEV") as dev:
            go.wait()
            answers.append(dev.post("/v1/retirements", json=RETIRE, headers=keyed("ret-parallel")))

    threads = [threading.Thread(target=send) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [a.status_code for a in answers] == [201] * 8
    assert len({a.json()["certificate_code"] for a in answers}) == 1
    assert sorted(a.headers.get("idempotent-replayed", "") for a in answers) == [""] + ["true"] * 7
    assert len([r for r in retirements(server, run, "DEV") if r["request_key"] == "ret-parallel"]) == 1


@pytest.mark.parametrize("key", ["", "x" * 49, "two words", "tab\there", "é".encode("latin-1")])
def test_a_malformed_key_is_refused_and_changes_nothing(world, run, key: Any) -> None:
    server, w = world
    with w.as_("DEV") as dev:
        count = len(retirements(server, run, "DEV"))
        r = dev.post("/v1/retirements", json=RETIRE, headers={"Idempotency-Key": key})
        assert r.status_code == 400 and r.json()["code"] == "invalid_request", r.text
        assert len(retirements(server, run, "DEV")) == count


def test_a_retried_offset_buys_and_retires_once(world, run) -> None:
    server, w = world
    with w.as_("BUY2") as buy:
        before = ok(buy.get("/v1/account"))
        first = buy.post("/v1/neutrality/offset", json=OFFSET, headers=keyed("off-1"))
        assert first.status_code == 201 and "idempotent-replayed" not in first.headers, first.text
        again = buy.post("/v1/neutrality/offset", json=OFFSET, headers=keyed("off-1"))
        assert again.status_code == 201 and again.headers["idempotent-replayed"] == "true"
        assert again.json() == first.json()
        r = buy.post("/v1/neutrality/offset", json={**OFFSET, "max_cash": "200.00"}, headers=keyed("off-1"))
        assert r.status_code == 422 and r.json()["code"] == "idempotency_key_reused", r.text
        after = ok(buy.get("/v1/account"))
        orders = ok(buy.get("/v1/orders", params={"status": "all"}))
    spent = Decimal(before["cash_available"]) - Decimal(after["cash_available"])
    assert spent == Decimal(first.json()["cost"]) and spent > 0
    assert [o["client_order_id"] for o in orders] == ["offset:off-1"]
    made = [r for r in retirements(server, run, "BUY2") if r["request_key"] == "off-1"]
    assert [r["quantity_kg"] for r in made] == [2000]


def test_an_offset_retried_after_its_purchase_retires_what_was_bought(world, run) -> None:
    """The process may stop between an offset's purchase and its retirement: the retry under the
    same key buys nothing more and retires what the first bought."""
    server, w = world
    with retirement_fails_once(server.exchange.service) as failed, w.as_("BUY2") as buy:
        before = ok(buy.get("/v1/account"))
        r = buy.post("/v1/neutrality/offset", json=OFFSET, headers=keyed("off-2"))
        assert r.status_code == 503 and failed, r.text
        done = ok(buy.post("/v1/neutrality/offset", json=OFFSET, headers=keyed("off-2")), 201)
        again = buy.post("/v1/neutrality/offset", json=OFFSET, headers=keyed("off-2"))
        assert again.headers["idempotent-replayed"] == "true" and again.json() == done
        after = ok(buy.get("/v1/account"))
        offsets = [o for o in ok(buy.get("/v1/orders", params={"status": "all"}))
                   if o["client_order_id"] == "offset:off-2"]
    assert len(offsets) == 1 and offsets[0]["order_id"] == done["order_id"]
    assert Decimal(before["cash_available"]) - Decimal(after["cash_available"]) == Decimal(done["cost"])
    assert [r["quantity_kg"] for r in retirements(server, run, "BUY2") if r["request_key"] == "off-2"] == [2000]


def test_a_retry_after_the_purchase_must_be_the_same_offset(world, run) -> None:
    """Another cap (below what the purchase cost) or other tonnes under the key of a purchase that
    was never retired: refused, nothing changed, and the original request still completes."""
    server, w = world
    with retirement_fails_once(server.exchange.service) as failed, w.as_("BUY2") as buy:
        r = buy.post("/v1/neutrality/offset", json=OFFSET, headers=keyed("off-cap"))
        assert r.status_code == 503 and failed, r.text
        before = ok(buy.get("/v1/account")), len(retirements(server, run, "BUY2"))
        for other in ({**OFFSET, "max_cash": "50.00"}, {**OFFSET, "quantity": "3.000"}):
            again = buy.post("/v1/neutrality/offset", json=other, headers=keyed("off-cap"))
            assert again.status_code == 422 and again.json()["code"] == "idempotency_key_reused", again.text
        assert (ok(buy.get("/v1/account")), len(retirements(server, run, "BUY2"))) == before
        ok(buy.post("/v1/neutrality/offset", json=OFFSET, headers=keyed("off-cap")), 201)


def test_an_order_named_like_an_offsets_that_bought_nothing_is_not_its_purchase(world, run) -> None:
    """An order offset:K from before order entry reserved the prefix (an old journal replays it)
    rests unfilled: an offset under K must not take it for its purchase and retire without buying."""
    server, w = world
    service = server.exchange.service
    with w.as_("BUY") as buy:
        ok(buy.post("/v1/orders", json={"symbol": SYMBOL, "side": "buy", "price": "36.00", "quantity": "2.000"}), 201)
        account = server.call(service.account("BUY"))
        old = server.call(service.submit({"op": "place", "account": account, "symbol": SYMBOL, "side": E.BID,
                                          "kind": E.LIMIT, "price": 3200, "qty": 2000, "tif": E.GTC,
                                          "coid": "offset:legacy"}))
        assert old.code is None, old
        before = ok(buy.get("/v1/account")), len(retirements(server, run, "BUY"))
        r = buy.post("/v1/neutrality/offset", json=OFFSET, headers=keyed("legacy"))
        assert r.status_code == 422 and r.json()["code"] == "idempotency_key_reused", r.text
        assert (ok(buy.get("/v1/account")), len(retirements(server, run, "BUY"))) == before
        ok(buy.delete(f"/v1/orders/{old.order_id}"))


def test_an_offset_retried_after_its_purchase_on_the_next_day_retires_what_was_bought(world, run) -> None:
    """The day's roll moves the band the offset's price comes from: a retry the next day still
    finds the purchase (at the price it was placed at) and retires it."""
    server, w = world
    service = server.exchange.service
    clock = service.clock
    try:
        with retirement_fails_once(service) as failed, w.as_("BUY2") as buy, w.as_("DEV") as dev:
            r = buy.post("/v1/neutrality/offset", json=OFFSET, headers=keyed("off-day"))
            assert r.status_code == 503 and failed, r.text
            service.clock = lambda: now_us() + 86_400_000_000
            # Something else happens first: the roll comes with it, and the band moves.
            ok(dev.post("/v1/orders", json={"symbol": SYMBOL, "side": "sell", "price": "37.00",
                                            "quantity": "1.000"}), 201)
            done = buy.post("/v1/neutrality/offset", json=OFFSET, headers=keyed("off-day"))
            assert done.status_code == 201, done.text
            offsets = [o for o in ok(buy.get("/v1/orders", params={"status": "all"}))
                       if o["client_order_id"] == "offset:off-day"]
    finally:
        service.clock = clock
    assert len(offsets) == 1 and offsets[0]["order_id"] == done.json()["order_id"]
    assert [r["quantity_kg"] for r in retirements(server, run, "BUY2") if r["request_key"] == "off-day"] == [2000]


def test_an_issuance_repeated_with_its_reference_issues_once(world, run) -> None:
    """Over-issuing is the registry's worst error: an operator's retry with the same reference
    gets the first issuance (200, as a repeated payment), another issuance under it is refused."""
    server, w = world
    project, vintage = SYMBOL.rsplit("-", 1)
    body = {"project": project, "vintage": int(vintage), "quantity": "50.000", "reference": "VR-2026-0042"}

    def issued() -> list[asyncpg.Record]:
        return q(server, run, """SELECT i.id, upper(i.serials) - lower(i.serials) AS kg FROM issuances i
                                 JOIN projects p ON p.id = i.project_id WHERE p.code = $1 ORDER BY i.id""", project)

    with w.as_("OPS") as ops, w.as_("DEV") as dev:
        held = ok(dev.get("/v1/account"))
        first = ops.post("/v1/registry/issuances", json=body)
        assert first.status_code == 201 and "idempotent-replayed" not in first.headers, first.text
        count = len(issued())
        # A repeat: "50" is 50.000 t, and a reference is read without its surrounding spaces.
        again = ops.post("/v1/registry/issuances", json={**body, "quantity": "50", "reference": " VR-2026-0042 "})
        assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true", again.text
        assert first.json()["replayed"] is False and again.json() == first.json() | {"replayed": True}
        for other in ({**body, "quantity": "51.000"}, {**body, "to_account": "BUY"}):
            r = ops.post("/v1/registry/issuances", json=other)
            assert r.status_code == 409 and r.json()["code"] == "duplicate_reference", r.text
        assert len(issued()) == count
        now = ok(dev.get("/v1/account"))
        was = {h["symbol"]: Decimal(h["available"]) for h in held["holdings"]}[SYMBOL]
        assert {h["symbol"]: Decimal(h["available"]) for h in now["holdings"]}[SYMBOL] == was + 50
        # Without a reference (or only spaces) every issuance is made, as before.
        for blank in ("", "   "):
            ok(ops.post("/v1/registry/issuances", json={**body, "reference": blank}), 201)
        assert len(issued()) == count + 2
        # A repeat still answers once the project stopped issuing (the first answer may have been lost).
        q(server, run, "UPDATE projects SET status = 'suspended' WHERE code = $1", project)
        try:
            r = ops.post("/v1/registry/issuances", json=body)
            assert r.status_code == 200 and r.json()["id"] == first.json()["id"], r.text
            r = ops.post("/v1/registry/issuances", json={**body, "reference": "VR-2026-0043"})
            assert r.status_code == 409 and r.json()["code"] == "project_not_active", r.text
        finally:
            q(server, run, "UPDATE projects SET status = 'active' WHERE code = $1", project)
        assert len(issued()) == count + 2


def dev_range(server: ServerThread, run: Any, kg: int) -> str:
    """The top `kg` serials of DEV's highest available block (sells encumber the lowest first)."""
    [b] = q(server, run, """SELECT p.scheme, p.code, i.vintage, upper(b.serials) AS hi FROM blocks b
                            JOIN issuances i ON i.id = b.issuance_id JOIN projects p ON p.id = i.project_id
                            JOIN accounts a ON a.id = b.owner_account_id
                            WHERE a.code = 'DEV' AND b.state = 'available' AND p.code || '-' || i.vintage = $1
                            ORDER BY upper(b.serials) DESC LIMIT 1""", SYMBOL)
    return format_serial(b["scheme"], b["code"], b["vintage"], b["hi"] - kg, b["hi"])


def changes_of(server: ServerThread, run: Any, serial: str) -> list[tuple[str, int]]:
    lo, hi = (int(x) for x in serial.rsplit("-", 2)[1:])
    rows = q(server, run, """SELECT cause, upper(serials) - lower(serials) AS kg FROM transfers
                             WHERE serials && int8range($1, $2) AND cause IN ('freeze', 'unfreeze', 'cancel')
                             ORDER BY id""", lo, hi + 1)
    return [(r["cause"], r["kg"]) for r in rows]


def frozen(account: dict[str, Any]) -> Decimal:
    return sum((Decimal(f["quantity"]) for f in account["frozen"] if f["symbol"] == SYMBOL), Decimal(0))


def test_a_retried_freeze_unfreeze_or_cancel_moves_once(world, run) -> None:
    """A freeze, unfreeze or cancel whose answer was lost (a crash after its commit) is retried with
    its Idempotency-Key: the retry answers what the first moved, 200 Idempotent-Replayed, and moves
    nothing in the registry or the core; without a key it is refused as already moved (review26)."""
    server, w = world
    serial = dev_range(server, run, 3000)
    journal_end = "SELECT max(seq) AS seq FROM journal"
    with w.as_("OPS") as ops, w.as_("DEV") as dev:
        frozen_before = frozen(ok(dev.get("/v1/account")))  # other tests' freezes
        for path, key in (("freeze", "fz-1"), ("unfreeze", "uf-1"), ("freeze", "fz-2"), ("cancel", "cx-1")):
            body = {"serial": serial, "reason": f"case 17: {path}"}
            first = ops.post(f"/v1/registry/{path}", json=body, headers=keyed(key))
            assert first.status_code == 200 and "idempotent-replayed" not in first.headers, first.text
            assert first.json() == {"serials": [serial], "quantity": "3.000", "replayed": False}
            held, end = ok(dev.get("/v1/account")), q(server, run, journal_end)
            # A frozen holding stays in sight: out of trading, still the member's.
            assert frozen(held) == frozen_before + (Decimal("3.000") if path == "freeze" else 0), held
            # The same request, spelt otherwise (case, spaces): what the first moved, nothing more.
            spelt = {"serial": f" {serial.lower()}", "reason": f"{body['reason']} "}
            again = ops.post(f"/v1/registry/{path}", json=spelt, headers=keyed(key))
            assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true", again.text
            assert again.json() == first.json() | {"replayed": True}
            assert ok(dev.get("/v1/account")) == held and q(server, run, journal_end) == end
            if path != "cancel":
                plain = ops.post(f"/v1/registry/{path}", json=body)
                assert plain.status_code == 409, plain.text
                lo, hi = (int(x) for x in serial.rsplit("-", 2)[1:])
                assert f"serials {lo} to {hi} are" in plain.json()["detail"], plain.text
        assert changes_of(server, run, serial) == [("freeze", 3000), ("unfreeze", 3000), ("freeze", 3000),
                                                   ("cancel", 3000)]


def test_a_reused_registry_change_key_is_refused_and_changes_nothing(world, run) -> None:
    server, w = world
    serial = dev_range(server, run, 1000)
    with w.as_("OPS") as ops:
        ok(ops.post("/v1/registry/freeze", json={"serial": serial, "reason": "audit"}, headers=keyed("fz-reuse")))
        other = dev_range(server, run, 2000)  # below the frozen range
        before = changes_of(server, run, other)
        for path, body in (("freeze", {"serial": other, "reason": "audit"}),
                           ("freeze", {"serial": serial, "reason": "another audit"}),
                           ("unfreeze", {"serial": serial, "reason": "audit"}),
                           ("cancel", {"serial": serial, "reason": "audit"})):
            r = ops.post(f"/v1/registry/{path}", json=body, headers=keyed("fz-reuse"))
            assert r.status_code == 422 and r.json()["code"] == "idempotency_key_reused", r.text
            assert "a freeze" in r.json()["detail"]
        assert changes_of(server, run, other) == before
        assert changes_of(server, run, serial) == [("freeze", 1000)]
        # A refused change records no key: the same key makes the change once it can be made.
        r = ops.post("/v1/registry/unfreeze", json={"serial": other, "reason": "audit"}, headers=keyed("uf-early"))
        assert r.status_code == 409 and r.json()["code"] == "credits_available", r.text
        ok(ops.post("/v1/registry/freeze", json={"serial": other, "reason": "audit"}))
        r = ops.post("/v1/registry/unfreeze", json={"serial": other, "reason": "audit"}, headers=keyed("uf-early"))
        assert r.status_code == 200 and r.json()["replayed"] is False, r.text


@pytest.mark.parametrize("snapshot", [True, False], ids=["from-snapshot", "journal-only"])
def test_an_offset_retried_after_a_restart_between_purchase_and_retirement(pg_server, template_db, run,
                                                                          snapshot: bool) -> None:
    """The exchange stops between an offset's purchase and its retirement and starts again (from
    its snapshot, or replaying the whole journal): the core still knows the purchase's name, and
    the retry retires what was bought, once."""
    name = f"cx_idem_restart_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    assert run(ensure_database(pg_server, name, template=template_db))
    dsn = with_database(pg_server, name)
    try:
        server = ServerThread(dsn).start()
        try:
            w = build_world(server.http, run(operator_key(dsn)))
            with w.as_("DEV") as dev:
                for _ in range(3):
                    ok(dev.post("/v1/orders", json={"symbol": SYMBOL, "side": "sell", "price": "36.00",
                                                    "quantity": "1.000"}), 201)
            with retirement_fails_once(server.exchange.service), w.as_("BUY") as buy:
                r = buy.post("/v1/neutrality/offset", json=OFFSET, headers=keyed("restart"))
                assert r.status_code == 503, r.text
            if not snapshot:
                server.call(server.exchange.service.stop(snapshot=False))
        finally:
            server.stop()
        with ServerThread(dsn) as server, client(server.http, w.keys["BUY"]) as buy:
            done = buy.post("/v1/neutrality/offset", json=OFFSET, headers=keyed("restart"))
            assert done.status_code == 201 and "idempotent-replayed" not in done.headers, done.text
            again = buy.post("/v1/neutrality/offset", json=OFFSET, headers=keyed("restart"))
            assert again.headers["idempotent-replayed"] == "true" and again.content == done.content
            bought = [o for o in ok(buy.get("/v1/orders", params={"status": "all"}))
                      if o["client_order_id"] == "offset:restart"]
        assert [o["order_id"] for o in bought] == [done.json()["order_id"]]
        assert [r["quantity_kg"] for r in db_rows(run, dsn, "SELECT quantity_kg FROM retirements "
                                                           "WHERE request_key = 'restart'")] == [2000]
    finally:
        run(drop_database(pg_server, name))
