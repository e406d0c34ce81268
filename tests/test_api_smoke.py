"""The network API end to end, as a client sees it: a world built through REST, orders placed and
answered after durability, the feed's book and trades, the account, a retirement and its
certificate, and a restart that keeps it all."""

from __future__ import annotations

import asyncio
import socket

import asyncpg
import orjson
import pytest
from websockets.sync.client import connect

from api.server import Exchange, _listening
from tests.api_helpers import SYMBOL, ServerThread, build_world, ok, operator_key


@pytest.fixture
def server(db, run):
    key = run(operator_key(db))
    with ServerThread(db) as s:
        s.ops_key = key
        yield s


def recv(ws, timeout: float = 5.0) -> dict:
    return orjson.loads(ws.recv(timeout))


def test_trade_through_rest_and_feed(server, db):
    w = build_world(server.http, server.ops_key)
    with connect(f"{server.ws}/v1/ws") as ws, w.as_("DEV") as dev, w.as_("BUY") as buy:
        ws.send(orjson.dumps({"op": "subscribe", "id": 1, "channels": [
            {"name": "book", "symbols": [SYMBOL], "depth": 10}, {"name": "trades", "symbols": [SYMBOL]}]}).decode())
        assert recv(ws) == {"type": "ack", "id": 1}
        snap = recv(ws)
        assert snap["type"] == "snapshot" and snap["bids"] == [] and snap["asks"] == []

        sell = ok(dev.post("/v1/orders", json={"symbol": SYMBOL, "side": "sell", "price": "35.00",
                                               "quantity": "10.000", "client_order_id": "s1"}), 201)
        assert sell["status"] == "new" and sell["remaining_quantity"] == "10.000"
        again = ok(dev.post("/v1/orders", json={"symbol": SYMBOL, "side": "sell", "price": "35.00",
                                                "quantity": "10.000", "client_order_id": "s1"}))
        assert again["order_id"] == sell["order_id"]
        buy_order = ok(buy.post("/v1/orders", json={"symbol": SYMBOL, "side": "buy", "price": "35.50",
                                                    "quantity": "4.000"}), 201)
        assert buy_order["status"] == "filled" and buy_order["average_price"] == "35.00"
        assert buy_order["fills"][0]["fee"] == "0.14"  # 140.00 CNY at 10 bp

        msgs = [recv(ws) for _ in range(4)]
        kinds = [(m.get("ch"), m.get("type")) for m in msgs if m.get("ch") != "heartbeat"]
        assert ("trades", None) in kinds
        book = ok(buy.get(f"/v1/book/{SYMBOL}"))
        assert book["asks"] == [["35.00", "6.000"]] and book["bids"] == []

        acct = ok(buy.get("/v1/account"))
        assert acct["holdings"] == [{"symbol": SYMBOL, "available": "0.000", "encumbered": "0.000",
                                     "locked": "4.000"}]
        r = buy.get(f"/v1/orders/{sell['order_id']}")
        assert r.status_code == 404 and r.json()["code"] == "not_found"
        assert ok(dev.get(f"/v1/orders/{sell['order_id']}"))["filled_quantity"] == "4.000"
        assert [f["trade_id"] for f in ok(buy.get("/v1/fills"))] == ["1"]

        ret = ok(buy.post("/v1/retirements", json={"symbol": SYMBOL, "quantity": "1.200",
                                                   "beneficiary": "Launch event", "purpose": "neutrality"}), 201)
        cert = ok(buy.get(f"/v1/certificates/{ret['certificate_code']}"))
        assert cert["quantity"] == "1.200" and cert["verified"]
        assert buy.get(f"/v1/certificates/{ret['certificate_code']}.pdf").content.startswith(b"%PDF")
        acct = ok(buy.get("/v1/account"))
        assert acct["holdings"][0]["locked"] == "2.800"
        assert acct["retired"] == [{"symbol": SYMBOL, "quantity": "1.200"}]


CONFERENCE = {"attendees": 300, "days": 1, "electricity": [{"kwh": "10000", "region": "sichuan", "year": 2022}],
              "travel": [{"mode": "metro", "people": 150, "km_per_person": "15", "round_trip": True}],
              "meals": [{"kind": "standard", "count": 300}]}


def test_estimate_then_offset_in_one_step(server):
    w = build_world(server.http, server.ops_key)
    with w.as_("DEV") as dev, w.as_("BUY") as buy:
        est = ok(buy.post("/v1/neutrality/estimate", json=CONFERENCE))
        need = est["total"]
        assert est["factor_table_version"] and "1.000" < need < "5.000"  # needs more than the first offer
        # Not enough offered: nothing is bought or retired, and the answer says what is missing.
        ok(dev.post("/v1/orders", json={"symbol": SYMBOL, "side": "sell", "price": "35.00", "quantity": "1.000"}))
        before = ok(buy.get("/v1/account"))
        r = buy.post("/v1/neutrality/offset", json={"symbol": SYMBOL, "activity": CONFERENCE, "max_cash": "500.00",
                                                    "beneficiary": "Green conference", "purpose": "one-day event"})
        assert r.status_code == 422 and r.json()["code"] == "offset_not_filled", r.text
        assert "missing" in r.json()["detail"]
        assert ok(buy.get("/v1/account")) == before
        # Enough offered: bought with one fill-or-kill order, retired, certificate.
        ok(dev.post("/v1/orders", json={"symbol": SYMBOL, "side": "sell", "price": "36.00", "quantity": "5.000"}))
        done = ok(buy.post("/v1/neutrality/offset", json={"symbol": SYMBOL, "activity": CONFERENCE,
                                                          "max_cash": "500.00", "beneficiary": "Green conference",
                                                          "purpose": "one-day event"}), 201)
        whole_tonnes = -(-int(need.replace(".", "")) // 1000)
        assert done["quantity"] == f"{whole_tonnes}.000"
        assert done["retirement"]["quantity"] == done["quantity"]
        cert = ok(buy.get(f"/v1/certificates/{done['retirement']['certificate_code']}"))
        assert cert["beneficiary"] == "Green conference"
        page = buy.get(f"/v1/certificates/{done['retirement']['certificate_code']}.html")
        assert page.status_code == 200 and done["retirement"]["certificate_code"] in page.text


def test_verification_page(server):
    w = build_world(server.http, server.ops_key)
    with w.as_("DEV") as dev, w.as_("BUY") as buy:
        ok(dev.post("/v1/orders", json={"symbol": SYMBOL, "side": "sell", "price": "35.00", "quantity": "2.000"}))
        ok(buy.post("/v1/orders", json={"symbol": SYMBOL, "side": "buy", "price": "35.00", "quantity": "2.000"}))
        ret = ok(buy.post("/v1/retirements", json={"symbol": SYMBOL, "quantity": "2.000", "beneficiary": "西岭雪山景区",
                                                   "purpose": "零碳景区 2026"}), 201)
        page = buy.get(f"/verify/{ret['certificate_code']}")
        assert page.status_code == 200 and "西岭雪山景区" in page.text and ret["serials"][0] in page.text
        assert f"Genuine: this registry issued certificate {ret['certificate_code']}" in page.text
        plain = buy.get(f"/v1/certificates/{ret['certificate_code']}.html")  # the printable one has no verdict
        assert plain.status_code == 200 and "Genuine:" not in plain.text
        fake = buy.get("/verify/CX-FAKE-FAKE-FAKE")
        assert fake.status_code == 404 and "not genuine" in fake.text


def test_a_port_already_taken_stops_what_the_start_began(db, run):
    """The HTTP port, or the feed's, in use: the start fails with the address in its message
    before the service starts, so it journals nothing (no snapshot, no adjust) and leaves no port
    or lock held (the feed's port and the service's lock stayed held until the process ended,
    and the service's recovery journaled before the failure: review27)."""
    async def journaled() -> tuple:
        conn = await asyncpg.connect(db)
        try:
            return (await conn.fetchval("SELECT count(*) FROM journal"),
                    await conn.fetchval("SELECT count(*) FROM snapshots"))
        finally:
            await conn.close()

    async def main() -> None:
        first = Exchange(db, http_port=0, ws_port=0)  # a journal with a listing to recover
        await first.start()
        assert (await first.service.list_instrument(SYMBOL, {"rules": {"always_open": True}})).accepted
        await first.stop()
        before = await journaled()
        for which in ("http", "ws"):
            with socket.socket() as taken:
                taken.bind(("127.0.0.1", 0))
                taken.listen()
                port = taken.getsockname()[1]
                ex = Exchange(db, **{"http_port": 0, "ws_port": 0, f"{which}_port": port})
                with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
                    await ex.start()
                other = ex.ws_port if which == "http" else ex.http_port
            assert await journaled() == before, which
            if other:
                with socket.socket() as probe:  # the other port is free again
                    probe.bind(("127.0.0.1", other))
        again = Exchange(db, http_port=0, ws_port=0)
        await again.start()  # not service_running
        await again.stop()

    run(main())



def test_the_ports_are_taken_as_tcp_so_answers_are_not_held_back(run):
    """The listening sockets are made before the service starts (api.server._listening). asyncio
    sets TCP_NODELAY only on connections whose socket says it is TCP: made with protocol 0, every
    REST answer waited for the client's delayed ACK (p50 48 ms instead of 3 on the REST bench)."""
    async def main() -> None:
        nodelay: list[int] = []

        class Probe(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                sock = transport.get_extra_info("socket")
                nodelay.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        server = await asyncio.get_running_loop().create_server(Probe, sock=_listening("127.0.0.1", 0))
        async with server:
            _, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
            for _ in range(200):
                if nodelay:
                    break
                await asyncio.sleep(0.01)
            writer.close()
        assert nodelay and nodelay[0], nodelay

    run(main())
