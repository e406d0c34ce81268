"""The feed's one way of ending a connection that falls behind (API.md: every update in order, or
an explicit slow_consumer error followed by close 1008, never a silent gap), against readers that
keep reading, only too slowly, and against peers that stop (review29):

- a steady slow reader gets the error and the 1008 close after what was ahead of it in the socket,
  rather than a dropped connection (the error used to sit behind megabytes and the connection was
  dropped after 5 s);
- the keepalive does not end a reader whose pong is late behind data it is still taking (it used
  to close 1011 "keepalive ping timeout"), and ends a peer that takes nothing as a slow consumer;
- a Binance-protocol client is told in Binance's error shape;
- a subscribe with a field its channel does not take is refused and subscribes nothing.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import orjson
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from api import feed as feed_module
from api.auth import Limits
from tests.api_clients import raw_ws, read_frames, ws_frame
from tests.api_helpers import SYMBOL, ServerThread, build_world, ok, operator_key, own_server

FAST = Limits(key_rate=1e6, key_burst=1e6, address_rate=1e6, address_burst=1e6)


def _levels(base: str, key: str, n: int) -> dict[str, str]:
    """DEV rests `n` one-tonne asks: a book snapshot of about 35 bytes a level."""
    w = build_world(base, key, issue_tonnes="10000.000")
    with w.as_("DEV") as dev:
        for i in range(n):
            ok(dev.post("/v1/orders", json={"symbol": SYMBOL, "side": "sell", "price": f"{(3400 + i) / 100:.2f}",
                                            "quantity": "1.000"}), 201)
    return w.keys


def _reader(s: ServerThread, per_second: float, asks_per_second: float, seconds: float) -> tuple[list, tuple]:
    """A client that asks for book snapshots (resync) at one rate and reads at a slower, steady
    one, with a small receive buffer and its own keepalive off: (messages read, how it ended:
    closed with its code, or still open with the server's count of slow consumers then)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
    sock.connect(("127.0.0.1", s.exchange.ws_port))
    ws = connect(f"{s.ws}/v1/ws", sock=sock, max_size=None, max_queue=4, ping_interval=None, close_timeout=30)
    ws.send(orjson.dumps({"op": "subscribe", "id": 1, "channels": [
        {"name": "book", "symbols": [SYMBOL], "depth": 1000}]}).decode())
    stop = threading.Event()

    def ask() -> None:
        resync = orjson.dumps({"op": "resync", "ch": "book", "symbol": SYMBOL}).decode()
        while not stop.is_set():
            try:
                ws.send(resync)
            except Exception:
                return
            time.sleep(1 / asks_per_second)

    threading.Thread(target=ask, daemon=True).start()
    got: list = []
    ended: tuple = ()
    began = time.monotonic()
    try:
        while time.monotonic() - began < seconds:
            try:
                got.append(orjson.loads(ws.recv(30)))
            except ConnectionClosed as e:
                ended = ("closed", e.rcvd.code if e.rcvd else None)
                break
            time.sleep(1 / per_second)
        else:
            ended = ("still open", s.exchange.feed.slow_consumers)
    finally:
        stop.set()
        # No closing handshake: it would wait behind the backlog, and whatever ends it then (a
        # cut, the library's timeout) is not what this reader was there to show.
        with contextlib.suppress(OSError):  # closed already (by the server)
            sock.shutdown(socket.SHUT_RDWR)
        ws.close()
    return got, ended


def test_a_steady_slow_reader_is_told_slow_consumer_then_1008(db, run):
    """About 1.4 MB/s of snapshots asked for, 20 messages (about 200 kB) a second read, a 256 KiB
    bound: cut within seconds, and the reader, still reading at its pace, gets slow_consumer and
    close 1008 after what was already in the socket."""
    key = run(operator_key(db))
    with ServerThread(db, max_buffer=256 * 1024, limits=FAST) as s:
        _levels(s.http, key, 300)  # a depth-1000 snapshot: about 10 kB
        got, ended = _reader(s, per_second=20, asks_per_second=140, seconds=90)
        assert s.exchange.feed.slow_consumers == 1
    assert ended == ("closed", 1008), (ended, len(got))
    assert got[-1].get("code") == "slow_consumer", got[-1]


def test_the_keepalive_waits_for_a_reader_behind_and_ends_one_that_takes_nothing(db, run, monkeypatch):
    """Pings every 0.5 s, answered within 1 s or else: a reader seconds behind (its pong queued
    behind the snapshots it is still reading) is not ended by them; a peer that reads nothing is,
    as a slow consumer, before its buffer bound (64 MiB here) is reached."""
    monkeypatch.setattr(feed_module, "PING_INTERVAL_S", 0.5)
    monkeypatch.setattr(feed_module, "PING_TIMEOUT_S", 1.0)
    key = run(operator_key(db))
    with ServerThread(db, max_buffer=64 << 20, limits=FAST) as s:
        _levels(s.http, key, 300)
        got, ended = _reader(s, per_second=20, asks_per_second=60, seconds=8)
        assert ended == ("still open", 0), (ended, len(got), got[-1:])
        made = [m["ts"] for m in got if m.get("type") == "snapshot"]
        assert made[-1] < made[0] + 6_000_000  # behind: read over 8 s, made in under 6
        deadline = time.monotonic() + 10
        while s.exchange.feed.clients and time.monotonic() < deadline:  # that reader is gone
            time.sleep(0.05)
        assert not s.exchange.feed.clients and s.exchange.feed.slow_consumers == 0

        sock = socket.socket()  # subscribes, then reads nothing: its buffers fill, then nothing moves
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", s.exchange.ws_port))
        try:
            raw_ws(sock, s.ws, {"op": "subscribe", "id": 1, "channels": [
                {"name": "book", "symbols": [SYMBOL], "depth": 1000}]})
            frame = ws_frame(orjson.dumps({"op": "resync", "ch": "book", "symbol": SYMBOL}))
            deadline = time.monotonic() + 30
            while not s.exchange.feed.slow_consumers and time.monotonic() < deadline:
                sock.sendall(frame * 20)
                time.sleep(0.05)
            assert s.exchange.feed.slow_consumers == 1
            got, code = read_frames(sock)
        finally:
            sock.close()
    assert code == 1008 and got[-1]["code"] == "slow_consumer", (code, got[-1:])
    assert "no answer to a ping" in got[-1]["detail"], got[-1]


def test_a_binance_slow_consumer_is_told_in_binances_error_shape(db, run):
    key = run(operator_key(db))
    with ServerThread(db, max_buffer=64 * 1024, limits=FAST) as s:
        build_world(s.http, key)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", s.exchange.ws_port))
        try:
            raw_ws(sock, s.ws, {"method": "SUBSCRIBE", "params": [f"{SYMBOL.lower()}@depth@100ms"], "id": 1},
                   path="/ws")
            frame = ws_frame(orjson.dumps({"method": "LIST_SUBSCRIPTIONS", "id": 2}))  # answers never read
            deadline = time.monotonic() + 60
            while not s.exchange.feed.slow_consumers and time.monotonic() < deadline:
                sock.sendall(frame * 200)
            assert s.exchange.feed.slow_consumers == 1
            got, code = read_frames(sock)
        finally:
            sock.close()
    assert code == 1008
    assert got[-1]["id"] is None and got[-1]["error"]["code"] == 2, got[-1]
    assert got[-1]["error"]["msg"].startswith("slow_consumer: "), got[-1]


@pytest.fixture(scope="module")
def served(pg_server, template_db, run):
    with own_server(pg_server, template_db, run, "slowreaders") as s:
        build_world(s.http, s.ops_key)
        yield s


@pytest.mark.parametrize("channel", [
    {"name": "book", "symbols": [SYMBOL], "dpeth": 5},
    {"name": "book", "symbols": [SYMBOL], "interval": 500},
    {"name": "trades", "symbols": [SYMBOL], "depth": 5},
    {"name": "registry", "symbols": [SYMBOL]},
])
def test_a_channel_field_it_does_not_take_is_refused_and_subscribes_nothing(served, channel):
    with connect(f"{served.ws}/v1/ws") as ws:
        ws.send(orjson.dumps({"op": "subscribe", "id": 1, "channels": [
            {"name": "ticker", "symbols": [SYMBOL]}, channel]}).decode())
        first = orjson.loads(ws.recv(5))
        while first.get("ch") == "heartbeat":
            first = orjson.loads(ws.recv(5))
        assert first["type"] == "error" and first["code"] == "invalid_request" and first["id"] == 1, first
        assert "takes" in first["detail"], first
        ws.send(orjson.dumps({"op": "resync", "id": 2, "ch": "book", "symbol": SYMBOL}).decode())
        answer = orjson.loads(ws.recv(5))
        while answer.get("ch") == "heartbeat":
            answer = orjson.loads(ws.recv(5))
        assert answer.get("type") == "error" and answer["id"] == 2, answer  # nothing was subscribed
