"""The feed and the Binance-compatible adapter, black box, for what review 7 found: one subscribe
message that names a symbol many times costs one snapshot, and a connection holds a bounded number
of subscriptions; a planned stop sends everything queued, then server_shutdown, then 1001, also to a
connection that is behind; market-data routes answer 404, never 500, while an instrument is being
listed; Binance's raw (/ws/<stream>) and combined (/stream?streams=) URLs; Binance's error shapes on
/api/v3/depth and on its websocket.
"""

from __future__ import annotations

import socket
import threading
import time

import httpx
import orjson
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from api import auth
from api import feed as feed_module
from tests.api_clients import ask, raw_ws, read_frames, ws_frame
from tests.api_helpers import (
    SYMBOL,
    ServerThread,
    build_world,
    cancel_left_orders,
    client,
    ok,
    operator_key,
    own_server,
)


@pytest.fixture(scope="module")
def market(pg_server, template_db, run):
    """One server and world for the tests that keep to prices of their own."""
    with own_server(pg_server, template_db, run, "feed_review") as s:
        s.world = build_world(s.http, s.ops_key)
        yield s


@pytest.fixture
def shared(market):
    """The shared server; orders a test leaves resting are cancelled after it."""
    yield market
    cancel_left_orders(market.world)


def rest(ws, seconds: float = 0.5) -> list[dict]:
    """Whatever arrives within `seconds`."""
    got = []
    end = time.monotonic() + seconds
    while True:
        try:
            got.append(orjson.loads(ws.recv(max(0.01, end - time.monotonic()))))
        except TimeoutError:
            return got


def asks(shared, n: int, first: int = 3700) -> None:
    with shared.world.as_("DEV") as dev:
        for i in range(n):
            ok(dev.post("/v1/orders", json={"symbol": SYMBOL, "side": "sell", "price": f"{(first + i) / 100:.2f}",
                                            "quantity": "1.000"}), 201)


# ---- F1: what one subscribe message costs -------------------------------------------------------

def test_a_symbol_named_many_times_in_one_subscribe_is_one_subscription_and_one_snapshot(shared):
    """35 book channels of the same symbol 100 times at depth 1000 were 3,500 snapshots, seconds of
    the event loop that REST and order entry share. Now each (channel, symbol) counts once."""
    asks(shared, 3)
    big = {"op": "subscribe", "id": 1,
           "channels": [{"name": "book", "symbols": [SYMBOL] * 100, "depth": 1000}] * 35
           + [{"name": "ticker", "symbols": [SYMBOL] * 100}] * 10}
    with connect(f"{shared.ws}/v1/ws", max_size=None) as ws:
        t0 = time.monotonic()
        assert ask(ws, big) == {"type": "ack", "id": 1}
        after = rest(ws)
        took = time.monotonic() - t0
    snapshots = [m for m in after if m.get("type") == "snapshot"]
    assert len(snapshots) == 1, len(snapshots)
    assert ["37.00", "1.000"] in snapshots[0]["asks"]
    assert len([m for m in after if m.get("ch") == "ticker"]) <= 1
    assert took < 2, took


def test_the_last_depth_named_for_a_symbol_wins(shared):
    asks(shared, 8)
    with connect(f"{shared.ws}/v1/ws") as ws:
        sub = {"op": "subscribe", "id": 1, "channels": [{"name": "book", "symbols": [SYMBOL], "depth": 20},
                                                         {"name": "book", "symbols": [SYMBOL], "depth": 5}]}
        assert ask(ws, sub)["type"] == "ack"
        snapshots = [m for m in rest(ws, 0.3) if m.get("type") == "snapshot"]
        assert len(snapshots) == 1 and len(snapshots[0]["asks"]) == 5, snapshots
        ws.send(orjson.dumps({"op": "resync", "ch": "book", "symbol": SYMBOL}).decode())
        again = [m for m in rest(ws, 0.3) if m.get("type") == "snapshot"]
        assert len(again) == 1 and len(again[0]["asks"]) == 5


def test_an_identical_resubscribe_keeps_the_view_and_sends_a_snapshot(shared):
    feed = shared.exchange.feed
    sub = {"op": "subscribe", "id": 1, "channels": [{"name": "book", "symbols": [SYMBOL], "depth": 777}]}
    with connect(f"{shared.ws}/v1/ws") as ws:
        assert ask(ws, sub)["type"] == "ack"
        group = feed.groups[(SYMBOL, 777, 0)]
        assert len([m for m in rest(ws, 0.2) if m.get("type") == "snapshot"]) == 1
        assert ask(ws, {**sub, "id": 2})["type"] == "ack"
        assert len([m for m in rest(ws, 0.2) if m.get("type") == "snapshot"]) == 1
        assert feed.groups[(SYMBOL, 777, 0)] is group  # not left and built again


def test_a_connection_holds_a_bounded_number_of_subscriptions(shared, monkeypatch):
    """The bound is 1,024 (channel, symbol) pairs; lowered here, since the world lists one
    instrument. A subscribe past it is refused whole and changes nothing."""
    monkeypatch.setattr(feed_module, "MAX_SUBSCRIPTIONS", 2)
    with connect(f"{shared.ws}/v1/ws") as ws:
        assert ask(ws, {"op": "subscribe", "id": 1, "channels": [
            {"name": "book", "symbols": [SYMBOL] * 3}, {"name": "trades", "symbols": [SYMBOL]}]})["type"] == "ack"
        refused = ask(ws, {"op": "subscribe", "id": 2, "channels": [{"name": "ticker", "symbols": [SYMBOL]}]})
        assert refused["type"] == "error" and refused["code"] == "too_many_subscriptions", refused
        assert "at most 2" in refused["detail"]
        # What it already holds may be asked for again; leaving one makes room.
        assert ask(ws, {"op": "subscribe", "id": 3, "channels": [{"name": "trades", "symbols": [SYMBOL]}]})[
            "type"] == "ack"
        assert ask(ws, {"op": "unsubscribe", "id": 4, "channels": [{"name": "trades", "symbols": [SYMBOL]}]})[
            "type"] == "ack"
        assert ask(ws, {"op": "subscribe", "id": 5, "channels": [{"name": "ticker", "symbols": [SYMBOL]}]})[
            "type"] == "ack"


# ---- F2: a planned stop reaches a connection that is behind -------------------------------------

def test_server_shutdown_follows_everything_queued_for_a_connection_that_is_behind(db, run):
    """A client that reads slowly (but is no slow consumer) at a planned stop: the close overtook
    its queue, so it got neither the rest of its snapshots nor server_shutdown. Now it gets every
    snapshot it asked for, in order, then server_shutdown, then close 1001."""
    key = run(operator_key(db))
    s = ServerThread(db, max_buffer=16 << 20).start()
    sock = socket.socket()
    stopper = None
    try:
        w = build_world(s.http, key, issue_tonnes="10000.000")
        with w.as_("DEV") as dev:
            for i in range(300):
                ok(dev.post("/v1/orders", json={"symbol": SYMBOL, "side": "sell",
                                                "price": f"{(3400 + i) / 100:.2f}", "quantity": "1.000"}), 201)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", int(s.ws.rsplit(":", 1)[1])))
        raw_ws(sock, s.ws, {"op": "subscribe", "id": 1, "channels": [
            {"name": "book", "symbols": [SYMBOL], "depth": 1000}]})
        resync = ws_frame(orjson.dumps({"op": "resync", "ch": "book", "symbol": SYMBOL}))
        # The first resyncs fill the socket's buffers (the kernel's take a few MB), where the
        # writer's batch waits; the next ones wait in the connection's queue, which is what the
        # close used to overtake. About 5.5 MB in all, the queue well under max_buffer.
        resyncs = 0
        for batch in (800, 200):
            for _ in range(batch):
                sock.sendall(resync)
            resyncs += batch
            time.sleep(0.5)
        feed = s.exchange.feed
        assert feed.slow_consumers == 0
        behind = sum(c.pending for c in feed.clients)
        print("queued at the stop", behind)
        assert behind, "the connection should be behind when the stop begins"
        stopper = threading.Thread(target=s.stop)
        stopper.start()
        time.sleep(0.3)  # the planned stop is under way; now the client reads, as fast as it can
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        got, code = read_frames(sock, timeout=20)
        stopper.join(30)
    finally:
        sock.close()
        if stopper is None:
            s.stop()
    assert feed.slow_consumers == 0
    kinds = [m.get("type") for m in got]
    assert kinds[0] == "ack" and kinds.count("snapshot") == 1 + resyncs, (len(got), kinds[-3:])
    assert kinds[-1] == "server_shutdown" and code == 1001, (kinds[-3:], code)


# ---- F4: reading market data while an instrument is being listed ---------------------------------

def test_market_data_routes_answer_404_then_200_while_an_instrument_is_listed(db, run):
    key = run(operator_key(db))
    with ServerThread(db) as s:
        build_world(s.http, key)
        statuses: dict[int, int] = {}
        errors: list[tuple[str, str]] = []
        stop = threading.Event()
        target: dict[str, str | None] = {"sym": None}

        def poll() -> None:
            with httpx.Client(base_url=s.http, timeout=30) as h:
                while not stop.is_set():
                    sym = target["sym"]
                    if sym is None:
                        stop.wait(0.001)
                        continue
                    for path in (f"/api/v3/depth?symbol={sym}", f"/v1/book/{sym}", f"/v1/ticker/{sym}",
                                 f"/v1/trades/{sym}"):
                        r = h.get(path)
                        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                        if r.status_code not in (200, 400, 404):
                            errors.append((path, f"{r.status_code} {r.text[:200]}"))
        threads = [threading.Thread(target=poll) for _ in range(3)]
        for t in threads:
            t.start()
        try:
            with client(s.http, key) as ops:
                for i in range(20):
                    proj = f"RACE{i}"
                    ok(ops.post("/v1/registry/projects", json={"code": proj, "name": "x",
                                                               "methodology": "forest_carbon_sink",
                                                               "developer": "DEV"}), 201)
                    ok(ops.post("/v1/registry/issuances", json={"project": proj, "vintage": 2024,
                                                                "quantity": "10.000"}), 201)
                    target["sym"] = f"{proj}-2024"
                    ok(ops.post("/v1/instruments", json={"symbol": f"{proj}-2024", "reference_price": "35.00",
                                                         "always_open": True}), 201)
                    for path in (f"/v1/book/{proj}-2024", f"/v1/ticker/{proj}-2024", f"/v1/trades/{proj}-2024",
                                 f"/api/v3/depth?symbol={proj}-2024"):
                        ok(ops.get(path), 200)  # once the listing is answered, its market data is there
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert not errors, errors[:3]
        assert statuses.get(200), statuses


# ---- F5: Binance's raw and combined stream URLs --------------------------------------------------

def test_binance_raw_stream_url(shared):
    """Binance: raw streams are at /ws/<streamName> (python-binance's depth cache uses it)."""
    with connect(f"{shared.ws}/ws/{SYMBOL.lower()}@depth@100ms", open_timeout=5) as ws:
        with shared.world.as_("BUY") as b:
            ok(b.post("/v1/orders", json={"symbol": SYMBOL, "side": "buy", "price": "33.50", "quantity": "1.000"}), 201)
        m = orjson.loads(ws.recv(3))
        assert m["e"] == "depthUpdate" and m["s"] == SYMBOL and ["33.50", "1.000"] in m["b"], m
        assert ask(ws, {"method": "LIST_SUBSCRIPTIONS", "id": 1}) == {"result": [f"{SYMBOL.lower()}@depth@100ms"],
                                                                     "id": 1}


def test_binance_combined_stream_url_wraps_each_event(shared):
    """Binance: combined streams are at /stream?streams=<a>/<b>, each event as {"stream","data"}."""
    s = SYMBOL.lower()
    with connect(f"{shared.ws}/stream?streams={s}@depth@100ms/{s}@depth", open_timeout=5) as ws:
        with shared.world.as_("BUY") as b:
            ok(b.post("/v1/orders", json={"symbol": SYMBOL, "side": "buy", "price": "33.40", "quantity": "1.000"}), 201)
        got = [orjson.loads(ws.recv(3)), orjson.loads(ws.recv(3))]
        assert sorted(m["stream"] for m in got) == [f"{s}@depth", f"{s}@depth@100ms"], got
        for m in got:
            assert set(m) == {"stream", "data"} and m["data"]["e"] == "depthUpdate", m
            assert ["33.40", "1.000"] in m["data"]["b"]
    with connect(f"{shared.ws}/stream", open_timeout=5) as ws:  # no stream yet: SUBSCRIBE later
        assert ask(ws, {"method": "SUBSCRIBE", "params": [f"{s}@depth@100ms"], "id": 7}) == {"result": None, "id": 7}
        with shared.world.as_("BUY") as b:
            ok(b.post("/v1/orders", json={"symbol": SYMBOL, "side": "buy", "price": "33.30", "quantity": "1.000"}), 201)
        m = orjson.loads(ws.recv(3))
        assert m["stream"] == f"{s}@depth@100ms" and ["33.30", "1.000"] in m["data"]["b"], m


@pytest.mark.parametrize("path", ["/ws/nope-2023@depth", f"/ws/{SYMBOL.lower()}@trade",
                                  f"/stream?streams={SYMBOL.lower()}@depth/nope@depth", "/ws/"])
def test_binance_urls_naming_an_unknown_stream_are_refused_with_400(shared, path):
    with pytest.raises(InvalidStatus) as e:
        connect(f"{shared.ws}{path}", open_timeout=5)
    assert e.value.response.status_code == 400
    assert b"stream" in e.value.response.body


# ---- F6: Binance's error shapes ------------------------------------------------------------------

def test_binance_rest_depth_errors_are_binances(shared):
    with httpx.Client(base_url=shared.http) as h:
        bad = h.get("/api/v3/depth", params={"symbol": "NOPE-2023"})
        assert (bad.status_code, bad.json()) == (400, {"code": -1121, "msg": "Invalid symbol."})
        assert bad.headers["content-type"].startswith("application/json")
        missing = h.get("/api/v3/depth")
        assert missing.status_code == 400 and missing.json()["code"] == -1102, missing.text
        assert "symbol" in missing.json()["msg"]
        empty = h.get("/api/v3/depth", params={"symbol": ""})
        assert empty.status_code == 400 and empty.json()["code"] == -1102, empty.text
        word = h.get("/api/v3/depth", params={"symbol": SYMBOL, "limit": "ten"})
        assert word.status_code == 400 and word.json()["code"] == -1102 and "limit" in word.json()["msg"], word.text
        zero = h.get("/api/v3/depth", params={"symbol": SYMBOL, "limit": 0})
        assert zero.status_code == 400 and zero.json()["code"] == -1100 and "limit" in zero.json()["msg"], zero.text
        # The native routes keep their problems.
        native = h.get("/v1/book/NOPE-2023")
        assert native.status_code == 404 and native.json()["code"] == "unknown_instrument"


def test_binance_websocket_errors_are_binances(db):
    """Binance's websocket errors are {"error": {"code", "msg"}, "id"}: 3 for invalid JSON, 2 for an
    invalid request; rate limited (no stream code for it) is -1003, its REST code."""
    with ServerThread(db, limits=auth.Limits(address_rate=3, address_burst=4)) as s, \
            connect(f"{s.ws}/ws", open_timeout=5) as ws:  # (the opening takes one of the 4)
        ws.send("{not json")
        assert orjson.loads(ws.recv(2)) == {"error": {"code": 3, "msg": "messages are JSON objects"}, "id": None}
        ws.send("[1, 2]")
        assert orjson.loads(ws.recv(2))["error"]["code"] == 2
        ws.send(orjson.dumps({"method": "PING", "id": 4}).decode())
        m = orjson.loads(ws.recv(2))
        assert m["id"] == 4 and m["error"]["code"] == 2, m
        answers = []
        for i in range(3):
            ws.send(orjson.dumps({"method": "LIST_SUBSCRIPTIONS", "id": 10 + i}).decode())
            answers.append(orjson.loads(ws.recv(2)))
        limited = [m for m in answers if "error" in m]
        assert limited and all(m["error"]["code"] == -1003 and m["error"]["msg"] for m in limited), answers
        assert all(m["id"] in (10, 11, 12) and set(m) <= {"result", "error", "id"} for m in answers), answers
