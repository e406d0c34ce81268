"""The websocket feed of API.md, black box: real servers on loopback, real websocket clients.

Books rebuilt from snapshot + updates under long seeded random trading on two instruments (with
reconnects, depth 5 and 10, a coalescing subscription) always equal GET /v1/book and every
checksum; the Binance-compatible depth procedure holds the true book; trades, tickers, heartbeats
and the registry channel; a slow consumer is cut with slow_consumer + 1008 while a reader stays
gapless; a planned stop says server_shutdown before closing; malformed messages get errors and
leave the connection working. On one shared server: a revoked key stops working on a socket that
authenticated before, re-auth ends the previous account's private stream, closed connections leave
nothing in the fan-out sets, Binance intervals are separate streams, registry ids are strings, an
operator asking for orders is forbidden, and a ticker subscriber starts from the current ticker.
"""

from __future__ import annotations

import itertools
import socket
import time
from decimal import Decimal

import orjson
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from api import auth
from tests.api_clients import (
    BinanceDepthClient,
    FeedClient,
    RandomTrader,
    WsTrader,
    add_listing,
    ask,
    crc,
    quiesce,
    raw_ws,
    read_frames,
    rest_book,
    wait_for,
    ws_frame,
)
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

SYMBOL2 = "BIOGAS-2024"


@pytest.fixture
def server(db, run):
    key = run(operator_key(db))
    with ServerThread(db) as s:
        s.ops_key = key
        yield s


def two_markets(server) -> tuple[dict[str, str], list[str]]:
    """Two instruments (T+0 so that buyers resell), four trading members."""
    w = build_world(server.http, server.ops_key, issue_tonnes="5000.000", listing={"resale_rule": "T+0"})
    keys = dict(w.keys)
    with client(server.http, server.ops_key) as ops:
        add_listing(ops, keys, "BIOGAS", "DEV2", quantity="5000.000")
    keys.pop("OPS")
    return keys, [SYMBOL, SYMBOL2]


def assert_client_matches(fc: FeedClient, http: str, symbols: list[str], same_seq: bool = True) -> None:
    """The client's rebuilt books equal GET /v1/book at its depth (and, with same_seq, at the same
    seq); every book message it got had the right checksum and no gap."""
    for s in symbols:
        rest = rest_book(http, s, fc.depth)
        if same_seq:
            wait_for(lambda s=s, rest=rest: fc.state(s)[0] == rest["seq"], 5,
                     what=f"{s} depth {fc.depth}/{fc.interval_ms}ms at seq {rest['seq']} (has {fc.state(s)[0]})")
        else:
            wait_for(lambda s=s, rest=rest: fc.state(s)[1:] == (rest["bids"], rest["asks"]), 5,
                     what=f"{s} depth {fc.depth}/{fc.interval_ms}ms levels")
        _seq, bids, asks = fc.state(s)
        assert (bids, asks) == (rest["bids"], rest["asks"]), f"{s} depth {fc.depth} interval {fc.interval_ms}"
        if fc.depth >= 10:
            assert crc(asks, bids) == rest["checksum"]
    assert fc.gaps == [] and fc.bad_checksums == [] and fc.bad_messages == []


# ---- 1. books rebuilt from the feed ----------------------------------------------------------------

@pytest.mark.parametrize("seed", [11, 29])
def test_rebuilt_books_equal_rest_under_random_trading(server, seed):
    keys, symbols = two_markets(server)
    trader = RandomTrader(server.http, keys, symbols, seed)
    ws = server.ws
    stay10 = FeedClient(ws, symbols, depth=10).subscribe()
    stay5 = FeedClient(ws, symbols, depth=5).subscribe()
    coalesced = FeedClient(ws, symbols, depth=10, interval_ms=100).subscribe()
    deep = FeedClient(ws, symbols, depth=1000).subscribe()
    hopper = FeedClient(ws, symbols, depth=10).subscribe()
    hoppers = [hopper]
    try:
        for round_ in range(3):
            trader.run(150)
            # reconnect in the middle of the stream, alternately at depth 5 and 10
            hopper.close()
            assert hopper.gaps == [] and hopper.bad_checksums == [] and hopper.bad_messages == []
            hopper = FeedClient(ws, symbols, depth=5 if round_ % 2 == 0 else 10).subscribe()
            hoppers.append(hopper)
            # an explicit resync mid-stream is applied in order, too
            stay10.send({"op": "resync", "ch": "book", "symbol": symbols[round_ % 2]})
        trader.run(100)
        placed = sum(v for k, v in trader.counts.items() if k.startswith("place") and k.endswith(":201"))
        trades = sum(len(ok(server_get(server, f"/v1/trades/{s}?limit=1000"))) for s in symbols)
        assert placed > 250 and trades > 50, (trader.counts, trades)
        quiesce(server.http, symbols)
        # Same levels and checksum for all; the same seq as REST for the one that holds the whole
        # book (for the others see test_depth_limited_subscribers_reach_the_rest_seq_when_quiescent).
        assert_client_matches(deep, server.http, symbols)
        for fc in (stay10, stay5, coalesced, hopper):
            assert_client_matches(fc, server.http, symbols, same_seq=False)
    finally:
        trader.close()
        for fc in (stay10, stay5, coalesced, deep, hopper):
            fc.close()


def server_get(server, path: str):
    with client(server.http) as h:
        return h.get(path)


def test_depth_limited_subscribers_reach_the_rest_seq_when_quiescent(server):
    """API.md: GET /book has 'the same seq and checksum as the feed', heartbeats carry the last seq
    per symbol, and a client detects a gap when first_seq != last_seq + 1."""
    w = build_world(server.http, server.ops_key)
    clients = [FeedClient(server.ws, [SYMBOL], depth=d, interval_ms=i).subscribe()
               for d, i in ((5, 0), (10, 0), (10, 100), (1000, 0))]
    try:
        with w.as_("BUY") as buy:
            for i in range(12):  # 12 bid levels: 35.00, 34.99, ... 34.89
                ok(buy.post("/v1/orders", json={"symbol": SYMBOL, "side": "buy", "price": f"{(3500 - i) / 100:.2f}",
                                                "quantity": "1.000"}), 201)
            ok(buy.post("/v1/orders", json={"symbol": SYMBOL, "side": "buy", "price": "34.89",
                                            "quantity": "2.000"}), 201)  # the 12th level: below depth 10
        rest = quiesce(server.http, [SYMBOL])[SYMBOL]
        time.sleep(1.3)  # a heartbeat
        behind = []
        for fc in clients:
            hb = fc.of(lambda m: m.get("ch") == "heartbeat")[-1]
            assert hb["seqs"][SYMBOL] == rest["seq"]
            seq, bids, _ = fc.state(SYMBOL)
            assert bids == rest["bids"][:fc.depth]
            assert fc.gaps == [] and fc.bad_checksums == []
            if seq != rest["seq"]:
                behind.append((fc.depth, fc.interval_ms, seq))
        assert behind == [], f"REST and heartbeat at seq {rest['seq']}; (depth, interval_ms, seq) behind: {behind}"
    finally:
        for fc in clients:
            fc.close()


# ---- 2. the Binance-compatible depth protocol -------------------------------------------------------

def test_binance_depth_client_holds_the_true_book(server):
    keys, symbols = two_markets(server)
    trader = RandomTrader(server.http, keys, symbols, seed=5)
    early = BinanceDepthClient(server.ws, server.http, SYMBOL)
    early_plain = BinanceDepthClient(server.ws, server.http, SYMBOL2, suffix="@depth")
    try:
        trader.run(60)
        late = BinanceDepthClient(server.ws, server.http, SYMBOL, suffix="@depth@1000ms")
        early.sync()
        trader.run(60)
        late.sync()  # snapshot taken while events keep arriving
        early_plain.sync()
        trader.run(150)
        quiesce(server.http, symbols)
        for bc in (early, late, early_plain):
            depth = ok(server_get(server, f"/api/v3/depth?symbol={bc.symbol}&limit=1000"))
            native = rest_book(server.http, bc.symbol, 1000)
            assert depth["lastUpdateId"] == native["seq"]
            assert (depth["bids"], depth["asks"]) == (native["bids"], native["asks"])
            wait_for(lambda bc=bc, depth=depth: bc.view()[0] == depth["lastUpdateId"], 5,
                     what=f"binance client {bc.symbol} at {depth['lastUpdateId']}")
            _last, bids, asks = bc.view()
            assert bc.problems == []
            assert bc.applied > 0
            assert (bids, asks) == (depth["bids"], depth["asks"])
    finally:
        trader.close()
        for bc in (early, early_plain):
            bc.close()


# ---- 3. trades, ticker, heartbeat, registry ---------------------------------------------------------

def test_trades_ticker_heartbeat_and_registry(server):
    keys, symbols = two_markets(server)
    fc = FeedClient(server.ws, channels=[{"name": "trades", "symbols": symbols}, {"name": "ticker", "symbols": symbols},
                                         {"name": "registry"}]).subscribe()
    trader = RandomTrader(server.http, keys, symbols, seed=3)
    try:
        trader.run(250)
        quiesce(server.http, symbols)
        with client(server.http, server.ops_key) as ops, client(server.http, keys["BUY"]) as buy:
            iss = ok(ops.post("/v1/registry/issuances", json={"project": "BIOGAS", "vintage": 2024,
                                                              "quantity": "12.000"}), 201)
            held = [h for h in ok(buy.get("/v1/account"))["holdings"] if Decimal(h["available"]) >= 1]
            assert held, "BUY bought nothing it can retire"
            ret = ok(buy.post("/v1/retirements", json={"symbol": held[0]["symbol"], "quantity": "1.000",
                                                       "beneficiary": "Feed test", "purpose": "neutrality"}), 201)
        time.sleep(2.3)  # at least two heartbeats
        for s in symbols:
            feed_trades = fc.of(lambda m, s=s: m.get("ch") == "trades" and m["symbol"] == s)
            ids = [int(t["trade_id"]) for t in feed_trades]
            assert ids and ids == list(range(1, len(ids) + 1)), f"{s}: trade ids {ids[:20]}..."
            rest_trades = ok(server_get(server, f"/v1/trades/{s}?limit=1000"))[::-1]
            assert [(t["trade_id"], t["price"], t["quantity"], t["taker_side"]) for t in rest_trades] == \
                [(t["trade_id"], t["price"], t["quantity"], t["taker_side"]) for t in feed_trades]
            seqs = [t["seq"] for t in feed_trades]
            assert seqs == sorted(seqs)
            tickers = fc.of(lambda m, s=s: m.get("ch") == "ticker" and m["symbol"] == s)
            rest_ticker = ok(server_get(server, f"/v1/ticker/{s}"))
            assert tickers, s
            fields = ("last", "open", "high", "low", "volume", "vwap")
            assert {k: tickers[-1][k] for k in fields} == {k: rest_ticker[k] for k in fields}
            assert tickers[-1]["last"] == feed_trades[-1]["price"]
            prices = [Decimal(t["price"]) for t in feed_trades]
            assert Decimal(rest_ticker["high"]) == max(prices) and Decimal(rest_ticker["low"]) == min(prices)
            vol = sum(Decimal(t["quantity"]) for t in feed_trades)
            assert Decimal(rest_ticker["volume"]) == vol
        beats = fc.of(lambda m: m.get("ch") == "heartbeat")
        assert len(beats) >= 3
        gaps = [(b["ts"] - a["ts"]) / 1e6 for a, b in itertools.pairwise(beats)]
        assert all(0.7 < g < 1.6 for g in gaps), gaps
        for s in symbols:
            assert beats[-1]["seqs"][s] == rest_book(server.http, s, 1)["seq"]
        reg = fc.of(lambda m: m.get("ch") == "registry")
        issuances = [m for m in reg if m["type"] == "issuance"]
        retirements = [m for m in reg if m["type"] == "retirement"]
        assert [(m["id"], m["quantity"], m["serial"]) for m in issuances] == \
            [(str(iss["id"]), "12.000", iss["serial"])]
        assert len(retirements) == 1
        r = retirements[0]
        assert (r["quantity"], r["beneficiary"], r["purpose"], r["certificate_code"]) == \
            ("1.000", "Feed test", "neutrality", ret["certificate_code"])
        assert fc.bad_messages == []
    finally:
        trader.close()
        fc.close()


# ---- 4. slow consumers ------------------------------------------------------------------------------

def check_in_order(books: list[dict]) -> None:
    """Book messages as one subscriber got them: a snapshot first, then no gap."""
    assert books and books[0]["type"] == "snapshot"
    last = None
    for m in books:
        if m["type"] == "snapshot":
            assert last is None or m["seq"] >= last
        else:
            assert m["first_seq"] == last + 1, (last, m["first_seq"])
        last = m["seq"]


def sweep_cycle(dev: WsTrader, buy: WsTrader, levels: int = 300) -> None:
    """`levels` one-tonne asks at distinct prices, then a market buy that takes them all: a book
    update per batch and a trade message per level for every subscriber."""
    answers = dev.place_many([{"symbol": SYMBOL, "side": "sell", "price": f"{(3400 + i) / 100:.2f}",
                               "quantity": "1.000"} for i in range(levels)], chunk=50)
    assert all(a["type"] == "result" for a in answers)
    [a] = buy.place_many([{"symbol": SYMBOL, "side": "buy", "type": "market", "quantity": f"{levels}.000",
                           "max_cash": "20000.00"}])
    assert a["type"] == "result" and a["order"]["filled_quantity"] == f"{levels}.000", a


def test_slow_consumer_is_cut_and_the_reader_stays_gapless(db, run):
    key = run(operator_key(db))
    with ServerThread(db, max_buffer=64 * 1024) as s:
        w = build_world(s.http, key, issue_tonnes="100000.000")
        reader = FeedClient(s.ws, [SYMBOL], depth=1000, channels=[{"name": "trades", "symbols": [SYMBOL]}]).subscribe()
        # The slow one: a raw socket with a small receive window that subscribes and then reads
        # nothing at all until the test decides.
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", int(s.ws.rsplit(":", 1)[1])))
        raw_ws(sock, s.ws, {"op": "subscribe", "id": 1, "channels": [
            {"name": "book", "symbols": [SYMBOL], "depth": 1000}, {"name": "trades", "symbols": [SYMBOL]}]})
        dev = WsTrader(s.ws, w.keys["DEV"], orders_channel=False)
        buy = WsTrader(s.ws, w.keys["BUY"], orders_channel=False)
        try:
            # Volume until the server gives up on the slow one: the socket's buffers take some
            # hundreds of kB first (the feed fixes a connection's send buffer at SEND_BUFFER). (The
            # counter only tells the test when to stop producing; the verdict comes from what the
            # clients receive.)
            for _ in range(150):
                sweep_cycle(dev, buy)
                if s.exchange.feed.slow_consumers:
                    break
            # The slow consumer now reads: an in-order prefix, the error, then close code 1008.
            got, code = read_frames(sock)
            assert got[0] == {"type": "ack", "id": 1}
            assert got[-1]["type"] == "error" and got[-1]["code"] == "slow_consumer", got[-1]
            assert code == 1008
            check_in_order([m for m in got if m.get("ch") == "book"])
            ids = [int(m["trade_id"]) for m in got if m.get("ch") == "trades"]
            assert ids == list(range(1, len(ids) + 1))

            sweep_cycle(dev, buy, 50)  # the market goes on after the cut
            quiesce(s.http, [SYMBOL])
            assert reader.closed is None
            assert_client_matches(reader, s.http, [SYMBOL])
            ids = [int(m["trade_id"]) for m in reader.of(lambda m: m.get("ch") == "trades")]
            assert ids == list(range(1, len(ids) + 1)) and len(ids) > 2_000
        finally:
            for c in (dev, buy):
                c.close()
            reader.close()
            sock.close()


def test_slow_consumer_that_keeps_asking_gets_slow_consumer_and_1008(db, run):
    key = run(operator_key(db))
    with ServerThread(db, max_buffer=64 * 1024) as s:
        w = build_world(s.http, key, issue_tonnes="10000.000")
        with w.as_("DEV") as dev:  # a book of 300 levels: a snapshot is ~10 kB
            for i in range(300):
                ok(dev.post("/v1/orders", json={"symbol": SYMBOL, "side": "sell", "price": f"{(3400 + i) / 100:.2f}",
                                                "quantity": "1.000"}), 201)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", int(s.ws.rsplit(":", 1)[1])))
        try:
            raw_ws(sock, s.ws, {"op": "subscribe", "id": 1, "channels": [
                {"name": "book", "symbols": [SYMBOL], "depth": 1000}]})
            resync = ws_frame(orjson.dumps({"op": "resync", "ch": "book", "symbol": SYMBOL}))
            for _ in range(800):  # ~8 MB of snapshots asked for, none read
                sock.sendall(resync)
            wait_for(lambda: s.exchange.feed.slow_consumers, 10, what="the cut")
            got, code = read_frames(sock)
            # What was still queued at the cut is dropped (that is what bounds memory); what did go
            # out is an in-order prefix of the stream, and the error says the rest will not come.
            assert len(got) == 1 or got[0] == {"type": "ack", "id": 1}
            if any(m.get("ch") == "book" for m in got):
                check_in_order([m for m in got if m.get("ch") == "book"])
            assert got[-1].get("code") == "slow_consumer", got[-1]
            assert code == 1008
        finally:
            sock.close()


# ---- 5. planned stop ------------------------------------------------------------------------------

def test_server_shutdown_precedes_the_close(db, run):
    key = run(operator_key(db))
    s = ServerThread(db).start()
    try:
        build_world(s.http, key)
        fc = FeedClient(s.ws, [SYMBOL], channels=[{"name": "registry"}]).subscribe()
        bc = connect(f"{s.ws}/ws", legacy=True)
        bc.send(orjson.dumps({"method": "SUBSCRIBE", "params": [f"{SYMBOL.lower()}@depth"], "id": 1}).decode())
        assert orjson.loads(bc.recv(5)) == {"result": None, "id": 1}
    finally:
        s.stop()
    fc.thread.join(5)
    assert fc.closed is not None and fc.closed[0] == 1001, fc.closed
    assert fc.messages and fc.messages[-1]["type"] == "server_shutdown", fc.messages[-3:]
    got = []
    with pytest.raises(ConnectionClosed):
        while True:
            got.append(orjson.loads(bc.recv(5)))
    assert got and got[-1]["type"] == "server_shutdown"


def test_malformed_messages_get_errors_and_the_connection_stays(server):
    """Whatever JSON a client sends on the feed, it gets an error naming its id (when it had one)
    and the connection keeps working: not JSON, not an object, an op that is no string (a list
    is unhashable: it must be an unknown op, not a dropped connection), an unknown op, order
    entry before auth."""
    with connect(f"{server.ws}/v1/ws") as ws:
        cases = [
            (b"{not json", None, "invalid_json"),
            (b"[1, 2]", None, "invalid_request"),
            (orjson.dumps({"op": [], "id": 1}), 1, "invalid_request"),
            (orjson.dumps({"op": {"place": 1}, "id": "two"}), "two", "invalid_request"),
            (orjson.dumps({"op": None, "id": 3}), 3, "invalid_request"),
            (orjson.dumps({"op": "nope", "id": [4]}), [4], "invalid_request"),
            (orjson.dumps({"op": "order.place", "id": 5, "symbol": SYMBOL}), 5, "unauthorized"),
            (orjson.dumps({"op": "order.cancel", "id": 6, "order_id": 1}), 6, "unauthorized"),
        ]
        for raw, ident, code in cases:
            ws.send(raw.decode())
            e = orjson.loads(ws.recv(5))
            assert (e["type"], e["id"], e["code"]) == ("error", ident, code), (raw, e)
        ws.send(orjson.dumps({"op": "ping", "id": 9}).decode())
        pong = orjson.loads(ws.recv(5))
        assert (pong["type"], pong["id"]) == ("pong", 9)


def test_rate_limited_on_the_socket_says_when_to_retry(db):
    """A message over the rate gets rate_limited with retry_after_ms, the wait until the bucket has
    a request again (REST says it in Retry-After's whole seconds); after that wait a message is
    answered again, and the connection stays."""
    # A burst of 4: the opening takes one (it counts as a request does), the messages the other 3.
    with ServerThread(db, limits=auth.Limits(address_rate=4, address_burst=4)) as s, \
            connect(f"{s.ws}/v1/ws") as ws:
        answers = []
        for i in range(5):
            ws.send(orjson.dumps({"op": "ping", "id": i}).decode())
            answers.append(orjson.loads(ws.recv(5)))
        assert [a["type"] for a in answers[:3]] == ["pong"] * 3, answers
        refused = answers[3]
        assert (refused["type"], refused["id"], refused["code"]) == ("error", 3, "rate_limited"), refused
        # 4 a second: a request is due within 250 ms (less what refilled since the burst began)
        assert 1 <= refused["retry_after_ms"] <= 250, refused
        # the last answer's own wait; a full refill period if a slow machine let it through
        wait = answers[4]["retry_after_ms"] if answers[4]["type"] == "error" else 250
        time.sleep(wait / 1000 + 0.01)
        ws.send(orjson.dumps({"op": "ping", "id": 9}).decode())
        pong = orjson.loads(ws.recv(5))
        assert (pong["type"], pong["id"]) == ("pong", 9), pong


# ---- 6. one shared server: auth on the socket, private streams, subscriptions' bookkeeping ----------

@pytest.fixture(scope="module")
def market(pg_server, template_db, run):
    """One server and world for the tests below, which keep to accounts and prices of their own: a
    server and world per test would cost a second or more each."""
    with own_server(pg_server, template_db, run, "feed_shared") as s:
        s.world = build_world(s.http, s.ops_key, buyers=("BUY", "BUY2", "BUY3"))
        with client(s.http, s.ops_key) as ops:
            add_listing(ops, s.world.keys, "BIOGAS", "DEV2")  # SYMBOL2: never traded here
        yield s


@pytest.fixture
def shared(market):
    """The shared server; orders a test leaves resting are cancelled after it."""
    yield market
    cancel_left_orders(market.world)


def limit(side: str, price: str, quantity: str = "1.000") -> dict:
    return {"symbol": SYMBOL, "side": side, "price": price, "quantity": quantity}


def private(t: WsTrader, seconds: float = 0.4) -> list[dict]:
    """The orders-channel messages `t` got, waiting `seconds` for stragglers."""
    return [m for m in t.drain(seconds) if m.get("ch") == "orders"]


def test_a_revoked_key_stops_working_on_a_socket_authenticated_before(shared, run, monkeypatch):
    """auth.py: a revoked key stops working within KEY_TTL seconds (shortened here), as REST has it.
    A socket that only listens to its orders channel is told and its stream ends; one that enters
    orders gets unauthorized for them."""
    monkeypatch.setattr(auth, "KEY_TTL", 0.3)
    w = shared.world
    listener = WsTrader(shared.ws, w.keys["BUY3"])
    trader = WsTrader(shared.ws, w.keys["BUY3"], orders_channel=False)
    try:
        placed = trader.request({"op": "order.place", **limit("buy", "33.00")})
        assert placed["type"] == "result", placed
        assert private(listener, 0.2), "the orders channel works before the revocation"
        with client(shared.http, shared.ops_key) as ops:  # the operator revokes every key of BUY3
            assert ok(ops.delete("/v1/accounts/BUY3/keys")) == {"account": "BUY3", "revoked": 1}
        notices = wait_for(lambda: [m for m in listener.drain(0.05) if m.get("type") == "error"], 3,
                           what="the revoked key's listener to be told")
        assert [(m["code"], m["id"]) for m in notices] == [("unauthorized", None)], notices
        listener.pending.clear()
        with w.as_("DEV") as dev:  # fills BUY3's resting bid: a private fill nobody may receive now
            sold = ok(dev.post("/v1/orders", json=limit("sell", "33.00")), 201)
        assert sold["status"] == "filled", sold
        assert private(listener) == []
        refused = trader.request({"op": "order.place", **limit("buy", "33.00")})
        assert (refused["type"], refused["code"]) == ("error", "unauthorized"), refused
        refused = listener.request({"op": "order.cancel", "order_id": placed["order"]["order_id"]})
        assert (refused["type"], refused["code"]) == ("error", "unauthorized"), refused
        with w.as_("BUY3") as rest:
            assert rest.get("/v1/account").status_code == 401
    finally:
        listener.close()
        trader.close()


def test_reauth_as_another_member_ends_the_first_accounts_private_stream(shared):
    """API.md: the orders channel is the caller's own orders. After auth as BUY2 on a socket that
    had BUY's orders channel, BUY's orders no longer arrive there; BUY2's do once it subscribes."""
    w = shared.world
    t = WsTrader(shared.ws, w.keys["BUY"])
    try:
        ack = t.request({"op": "auth", "api_key": w.keys["BUY2"]})
        assert (ack["type"], ack["account"]) == ("ack", "BUY2"), ack
        assert t.request({"op": "subscribe", "channels": [{"name": "orders"}]})["type"] == "ack"
        t.pending.clear()
        with w.as_("BUY") as buy, w.as_("BUY2") as buy2:
            theirs = ok(buy.post("/v1/orders", json=limit("buy", "33.50")), 201)
            mine = ok(buy2.post("/v1/orders", json=limit("buy", "33.25")), 201)
        got = {m["order"]["order_id"] for m in private(t) if m["type"] == "order"}
        assert mine["order_id"] in got and theirs["order_id"] not in got, (mine["order_id"], theirs["order_id"], got)
    finally:
        t.close()


def test_binance_unsubscribing_one_interval_keeps_the_other(shared):
    s = SYMBOL.lower()
    with connect(f"{shared.ws}/ws") as ws:
        sub = {"method": "SUBSCRIBE", "params": [f"{s}@depth@100ms", f"{s}@depth"], "id": 1}
        assert ask(ws, sub) == {"result": None, "id": 1}
        assert ask(ws, {"method": "UNSUBSCRIBE", "params": [f"{s}@depth"], "id": 2}) == {"result": None, "id": 2}
        assert ask(ws, {"method": "LIST_SUBSCRIPTIONS", "id": 3}) == {"result": [f"{s}@depth@100ms"], "id": 3}
        with shared.world.as_("DEV") as dev:
            ok(dev.post("/v1/orders", json=limit("sell", "38.00")), 201)
        event = orjson.loads(ws.recv(3))  # the 100 ms stream goes on
        assert event["e"] == "depthUpdate" and ["38.00", "1.000"] in event["a"], event


async def _fanout(feed) -> dict[str, int]:
    """How many entries each fan-out map of the feed holds, and how many closed connections they hold."""
    sets = {"orders": list(feed.orders.values()), "subs": list(feed.subs.values()),
            "binance": [g.clients for g in feed.binance.values()], "books": [g.clients for g in feed.groups.values()]}
    return {**{k: len(v) for k, v in sets.items()},
            "closed": sum(1 for v in sets.values() for members in v for c in members if c.closed)}


def test_closed_connections_leave_nothing_in_the_fanout_sets(shared):
    """API.md: never unbounded memory. Once every connection is closed, whatever they subscribed
    to — orders before and after a re-auth, one of two Binance intervals left, public channels —
    the feed's fan-out maps are empty."""
    w, feed = shared.world, shared.exchange.feed
    t = WsTrader(shared.ws, w.keys["BUY"])
    fc = FeedClient(shared.ws, [SYMBOL], channels=[{"name": "trades", "symbols": [SYMBOL]},
                                                   {"name": "ticker", "symbols": [SYMBOL]}, {"name": "registry"}])
    bc = connect(f"{shared.ws}/ws", legacy=True)
    try:
        assert t.request({"op": "auth", "api_key": w.keys["BUY2"]})["type"] == "ack"
        assert t.request({"op": "subscribe", "channels": [{"name": "orders"}]})["type"] == "ack"
        fc.subscribe()
        s = SYMBOL.lower()
        ask(bc, {"method": "SUBSCRIBE", "params": [f"{s}@depth@100ms", f"{s}@depth@1000ms"], "id": 1})
        ask(bc, {"method": "UNSUBSCRIBE", "params": [f"{s}@depth@100ms"], "id": 2})
        held = shared.call(_fanout(feed))
        assert all(held[k] for k in ("orders", "subs", "binance", "books")), held
    finally:
        t.close()
        fc.close()
        bc.close()
    empty = {"orders": 0, "subs": 0, "binance": 0, "books": 0, "closed": 0}
    wait_for(lambda: shared.call(_fanout(feed)) == empty, 3, what=f"empty fan-out maps ({shared.call(_fanout(feed))})")


def test_registry_events_carry_ids_as_strings(shared):
    """API.md: the exchange's ids are strings — on the feed too, the same id REST gives."""
    w = shared.world
    fc = FeedClient(shared.ws, channels=[{"name": "registry"}]).subscribe()
    try:
        with client(shared.http, shared.ops_key) as ops, w.as_("DEV") as dev:
            iss = ok(ops.post("/v1/registry/issuances", json={"project": "FOREST", "vintage": 2023,
                                                              "quantity": "2.000"}), 201)
            ret = ok(dev.post("/v1/retirements", json={"symbol": SYMBOL, "quantity": "1.000", "beneficiary": "Feed",
                                                       "purpose": "ids"}), 201)
        events = wait_for(lambda: len(got := fc.of(lambda m: m.get("ch") == "registry")) == 2 and got, 3,
                          what="an issuance and a retirement on the feed")
        assert [(m["type"], m["id"]) for m in events] == [("issuance", str(iss["id"])), ("retirement", str(ret["id"]))]
    finally:
        fc.close()


def test_instruments_channel_announces_listings_halts_and_resumes(shared):
    """{"name":"instruments"}: a listing, a halt and a resume as they commit, each with the
    session it left and the band in force; clients learnt of a halt only from a refused order
    (review32). The day's close is in tests/test_api_sessions.py."""
    fc = FeedClient(shared.ws, channels=[{"name": "instruments"}]).subscribe()
    try:
        with client(shared.http, shared.ops_key) as ops:
            ok(ops.post("/v1/instruments", json={"symbol": "FOREST-2031", "reference_price": "35.00",
                                                 "always_open": True}), 201)
            ok(ops.post(f"/v1/instruments/{SYMBOL}/halt"))
            ok(ops.post(f"/v1/instruments/{SYMBOL}/resume"))
            rest = ok(ops.get(f"/v1/instruments/{SYMBOL}"))
        got = wait_for(lambda: len(m := fc.of(lambda m: m.get("ch") == "instruments")) == 3 and m, 3,
                       what="a listing, a halt and a resume on the feed")
        assert [(m["type"], m["symbol"], m["session"]) for m in got] == [
            ("listed", "FOREST-2031", "open"), ("halted", SYMBOL, "halted"), ("resumed", SYMBOL, rest["session"])]
        assert got[0]["reference_price"] == "35.00" and got[0]["price_band"] == {"low": "31.50", "high": "38.50"}
        assert {k: got[2][k] for k in ("reference_price", "price_band")} == {
            k: rest[k] for k in ("reference_price", "price_band")}
        assert all(isinstance(m["ts"], int) for m in got)
    finally:
        fc.close()
    with connect(f"{shared.ws}/v1/ws") as ws:
        e = ask(ws, {"op": "subscribe", "id": 1, "channels": [{"name": "instruments", "symbols": [SYMBOL]}]})
        assert (e["type"], e["code"]) == ("error", "invalid_request"), e


def test_orders_channel_is_forbidden_to_an_operator_and_unauthorized_without_auth(shared):
    """API.md's codes: unauthorized without a key, forbidden with a key of the wrong role."""
    with connect(f"{shared.ws}/v1/ws") as ws:
        orders = [{"name": "orders"}]
        e = ask(ws, {"op": "subscribe", "id": 1, "channels": orders})
        assert (e["type"], e["code"]) == ("error", "unauthorized"), e
        assert ask(ws, {"op": "auth", "id": 2, "api_key": shared.ops_key})["role"] == "operator"
        e = ask(ws, {"op": "subscribe", "id": 3, "channels": orders})
        assert (e["type"], e["code"]) == ("error", "forbidden"), e


def test_a_ticker_subscriber_starts_from_the_current_ticker(shared):
    """As a book subscriber starts from a snapshot, a ticker subscriber gets the current ticker of
    each instrument that has one right after the ack (SYMBOL2 never traded: none for it)."""
    w = shared.world
    with w.as_("DEV") as dev, w.as_("BUY") as buy:
        ok(dev.post("/v1/orders", json=limit("sell", "35.00")), 201)
        assert ok(buy.post("/v1/orders", json=limit("buy", "35.00")), 201)["status"] == "filled"
    with client(shared.http) as anon:
        rest = ok(anon.get(f"/v1/ticker/{SYMBOL}"))
    with connect(f"{shared.ws}/v1/ws") as ws:
        ws.send(orjson.dumps({"op": "subscribe", "id": 1, "channels": [{"name": "ticker",
                                                                        "symbols": [SYMBOL2, SYMBOL]}]}).decode())
        assert orjson.loads(ws.recv(5)) == {"type": "ack", "id": 1}
        first = orjson.loads(ws.recv(5))
    fields = ("symbol", "last", "open", "high", "low", "volume", "vwap")
    assert first.get("ch") == "ticker", first
    assert {k: first[k] for k in fields} == {k: rest[k] for k in fields}


def test_order_ids_no_integer_can_be_made_of_get_errors_and_the_connection_stays(shared):
    """An order_id that str.isdigit() takes but int() refuses ("²", 5,000 digits) is an
    invalid_request like any other bad id, and the connection goes on (it was dropped)."""
    with connect(f"{shared.ws}/v1/ws") as ws:
        ws.send(orjson.dumps({"op": "auth", "id": 0, "api_key": shared.world.keys["BUY"]}).decode())
        assert orjson.loads(ws.recv(5))["type"] == "ack"
        for i, bad in enumerate(("\u00b2", "1" * 5000, "\u0661", "12345678901234567890", "-1", "")):
            ws.send(orjson.dumps({"op": "order.cancel", "id": i + 1, "order_id": bad}).decode())
            e = orjson.loads(ws.recv(5))
            assert (e["type"], e["id"], e["code"]) == ("error", i + 1, "invalid_request"), (bad[:20], e)
        ws.send(orjson.dumps({"op": "ping", "id": 99}).decode())
        assert orjson.loads(ws.recv(5))["id"] == 99


def test_pipelined_commands_are_answered_as_each_left_the_order(shared):
    """An amend and a cancel of one order in one write land in one commit. The amend's result used
    to be the order as the whole commit left it ("cancelled"), and the orders channel sent that
    final state twice; each now shows what its own command did, with the feed's integer `ts`."""
    w = shared.world
    t = WsTrader(shared.ws, w.keys["BUY"])
    try:
        placed = t.request({"op": "order.place", **limit("buy", "33.00")})
        assert placed["type"] == "result" and placed["order"]["status"] == "new", placed
        oid = placed["order"]["order_id"]
        t.pending.clear()
        amend = {"op": "order.amend", "id": 100, "order_id": oid, "quantity": "2.000"}
        cancel = {"op": "order.cancel", "id": 101, "order_id": oid}
        t.ws.socket.sendall(ws_frame(orjson.dumps(amend)) + ws_frame(orjson.dumps(cancel)))
        amended, cancelled = t.wait_id(100), t.wait_id(101)
        assert (amended["type"], amended["order"]["status"], amended["order"]["remaining_quantity"]) == \
            ("result", "new", "2.000"), amended
        assert (cancelled["order"]["status"], cancelled["order"]["remaining_quantity"]) == ("cancelled", "0.000")
        updates = [m for m in private(t) if m["type"] == "order" and m["order"]["order_id"] == oid]
        assert [(m["order"]["status"], m["order"]["remaining_quantity"]) for m in updates] == \
            [("new", "2.000"), ("cancelled", "0.000")], updates
        assert all(isinstance(m["ts"], int) and m["ts"] > 0 for m in updates), updates
        with w.as_("BUY") as me:
            assert ok(me.get(f"/v1/orders/{oid}"))["status"] == "cancelled"
    finally:
        t.close()


def test_a_maker_filled_twice_in_one_commit_is_answered_per_command(shared):
    """Two buys pipelined against one resting 2 t ask: each buy's answer is its own fill; the
    seller's orders channel gets the ask as each trade left it (1 t left, then filled), with a
    fill message (integer `ts`) before each."""
    w = shared.world
    seller = WsTrader(shared.ws, w.keys["DEV"])
    buyer = WsTrader(shared.ws, w.keys["BUY2"], orders_channel=False)
    try:
        ask_ = seller.request({"op": "order.place", **limit("sell", "33.75", "2.000")})
        assert ask_["order"]["status"] == "new", ask_
        seller.pending.clear()
        buys = [{"op": "order.place", "id": 200 + i, **limit("buy", "33.75")} for i in range(2)]
        buyer.ws.socket.sendall(b"".join(ws_frame(orjson.dumps(b)) for b in buys))
        answers = [buyer.wait_id(200), buyer.wait_id(201)]
        assert [(a["order"]["status"], len(a["order"]["fills"])) for a in answers] == [("filled", 1)] * 2, answers
        mine = [m for m in private(seller) if m.get("order", m).get("order_id") == ask_["order"]["order_id"]]
        assert [(m["type"], m["order"]["remaining_quantity"] if m["type"] == "order" else m["quantity"])
                for m in mine] == [("fill", "1.000"), ("order", "1.000"), ("fill", "1.000"), ("order", "0.000")], mine
        assert all(isinstance(m["ts"], int) for m in mine), mine
    finally:
        seller.close()
        buyer.close()
