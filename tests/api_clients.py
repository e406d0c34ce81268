"""Real clients of the network API for black-box tests: a feed client that rebuilds books from
snapshot + updates (checking sequence numbers and checksums on every message), a Binance-style
depth client, a websocket order-entry client, and a seeded random trader that drives REST.

Everything here speaks only the wire protocol of /work/shared/API.md (httpx, websockets).
"""

from __future__ import annotations

import random
import socket
import threading
import time
import zlib
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import httpx
import orjson
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from tests.api_helpers import client, ok


def crc(asks: list[list[str]], bids: list[list[str]]) -> int:
    """API.md's checksum, written from the contract (not imported from the product)."""
    parts = [f"{p}:{q}" for p, q in asks[:10]] + [f"{p}:{q}" for p, q in bids[:10]]
    return zlib.crc32(":".join(parts).encode()) & 0xFFFFFFFF


def sorted_side(levels: dict[str, str], bids: bool) -> list[list[str]]:
    return [[p, levels[p]] for p in sorted(levels, key=Decimal, reverse=bids)]


def wait_for(pred: Callable[[], Any], timeout: float = 10.0, step: float = 0.02, what: str = "condition") -> Any:
    end = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(step)


class LocalBook:
    __slots__ = ("asks", "bids", "depth", "seq")

    def __init__(self, depth: int) -> None:
        self.depth = depth
        self.seq = -1
        self.bids: dict[str, str] = {}
        self.asks: dict[str, str] = {}

    def load(self, msg: dict) -> None:
        self.seq = msg["seq"]
        self.bids = {p: q for p, q in msg["bids"]}
        self.asks = {p: q for p, q in msg["asks"]}

    def apply(self, msg: dict) -> None:
        for side, levels in ((self.bids, msg["bids"]), (self.asks, msg["asks"])):
            for p, q in levels:
                if Decimal(q) == 0:
                    side.pop(p, None)
                else:
                    side[p] = q
        self.seq = msg["seq"]

    def view(self) -> tuple[list[list[str]], list[list[str]]]:
        """(bids best first, asks best first)."""
        return sorted_side(self.bids, True), sorted_side(self.asks, False)

    def checksum(self) -> int:
        bids, asks = self.view()
        return crc(asks, bids)


class FeedClient:
    """A /v1/ws subscriber on a thread of its own: rebuilds every subscribed book, resyncs on a
    gap, verifies every book message's checksum, and keeps every other message it receives."""

    def __init__(self, ws_url: str, book_symbols: list[str] = (), depth: int = 10, interval_ms: int = 0,
                 channels: list[dict] | None = None, sock: socket.socket | None = None) -> None:
        self.url = f"{ws_url}/v1/ws"
        self.book_symbols = list(book_symbols)
        self.depth = depth
        self.interval_ms = interval_ms
        self.extra = channels or []
        self.books: dict[str, LocalBook] = {}
        self.resyncing: set[str] = set()
        self.gaps: list[tuple[str, int, int]] = []  # (symbol, expected first_seq, got first_seq)
        self.bad_checksums: list[tuple[str, int, int, int]] = []  # (symbol, seq, sent, computed)
        self.bad_messages: list[str] = []
        self.messages: list[dict] = []  # everything but book messages
        self.book_messages = 0
        self.closed: tuple[int | None, str] | None = None
        self.lock = threading.Lock()
        self.ws: ClientConnection = connect(self.url, sock=sock, max_size=None, open_timeout=10, legacy=True)
        self._ids = iter(range(1, 1 << 30))
        self.thread: threading.Thread | None = None

    def next_id(self) -> int:
        return next(self._ids)

    def send(self, obj: dict) -> None:
        self.ws.send(orjson.dumps(obj).decode())

    def subscribe(self) -> FeedClient:
        chans: list[dict] = list(self.extra)
        if self.book_symbols:
            ch: dict[str, Any] = {"name": "book", "symbols": self.book_symbols, "depth": self.depth}
            if self.interval_ms:
                ch["interval_ms"] = self.interval_ms
            chans.append(ch)
        ident = self.next_id()
        self.send({"op": "subscribe", "id": ident, "channels": chans})
        ack = orjson.loads(self.ws.recv(10))
        assert ack == {"type": "ack", "id": ident}, ack
        for s in self.book_symbols:
            self.books[s] = LocalBook(self.depth)
            self.resyncing.add(s)  # until its snapshot arrives
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        try:
            while True:
                raw = self.ws.recv()
                self.handle(orjson.loads(raw))
        except ConnectionClosed as e:
            rcvd = e.rcvd
            self.closed = (rcvd.code if rcvd else None, rcvd.reason if rcvd else "")
        except Exception as e:
            self.bad_messages.append(f"{type(e).__name__}: {e}")
            self.closed = (None, repr(e))

    def handle(self, m: dict) -> None:
        with self.lock:
            if m.get("ch") != "book":
                self.messages.append(m)
                return
            self.book_messages += 1
            sym = m["symbol"]
            book = self.books.get(sym)
            if book is None:
                self.bad_messages.append(f"book message for unsubscribed {sym}")
                return
            if m["type"] == "snapshot":
                book.load(m)
                self.resyncing.discard(sym)
            elif m["type"] == "update":
                if sym in self.resyncing:
                    return  # waiting for the snapshot we asked for
                if m["seq"] <= book.seq:
                    return  # already covered by a snapshot
                if m["first_seq"] != book.seq + 1:
                    self.gaps.append((sym, book.seq + 1, m["first_seq"]))
                    self.resyncing.add(sym)
                    self.send({"op": "resync", "ch": "book", "symbol": sym})
                    return
                if m["seq"] < m["first_seq"]:
                    self.bad_messages.append(f"seq {m['seq']} < first_seq {m['first_seq']}")
                book.apply(m)
            else:
                self.bad_messages.append(f"unknown book message {m}")
                return
            bids, asks = book.view()
            if len(bids) > book.depth or len(asks) > book.depth:
                self.bad_messages.append(f"{sym}@{book.seq}: more than {book.depth} levels held")
            mine = crc(asks, bids)
            if m["checksum"] != mine:
                self.bad_checksums.append((sym, m["seq"], m["checksum"], mine))

    def of(self, pred: Callable[[dict], bool]) -> list[dict]:
        with self.lock:
            return [m for m in self.messages if pred(m)]

    def state(self, symbol: str) -> tuple[int, list[list[str]], list[list[str]]]:
        with self.lock:
            b = self.books[symbol]
            bids, asks = b.view()
            return b.seq, bids, asks

    def close(self) -> None:
        self.ws.close()
        if self.thread is not None:
            self.thread.join(5)


class BinanceDepthClient:
    """The Binance 'how to manage a local order book' procedure, to the letter of API.md: buffer
    the stream, fetch /api/v3/depth, drop events with u <= lastUpdateId, then apply events whose
    U == last + 1 (anything else is a failure this client records)."""

    def __init__(self, ws_url: str, http: str, symbol: str, suffix: str = "@depth@100ms") -> None:
        self.symbol = symbol
        self.http = http
        self.ws = connect(f"{ws_url}/ws", max_size=None, open_timeout=10, legacy=True)
        self.ws.send(orjson.dumps({"method": "SUBSCRIBE", "params": [f"{symbol.lower()}{suffix}"], "id": 1}).decode())
        ack = orjson.loads(self.ws.recv(10))
        assert ack == {"result": None, "id": 1}, ack
        self.buffer: list[dict] = []
        self.bids: dict[str, str] = {}
        self.asks: dict[str, str] = {}
        self.last: int | None = None
        self.problems: list[str] = []
        self.applied = 0
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while True:
                m = orjson.loads(self.ws.recv())
                with self.lock:
                    if m.get("e") != "depthUpdate" or m.get("s") != self.symbol:
                        self.problems.append(f"unexpected message {m}")
                    elif self.last is None:
                        self.buffer.append(m)
                    else:
                        self._event(m)
        except ConnectionClosed:
            pass

    def sync(self) -> None:
        """Fetch the snapshot and replay the buffer on top of it."""
        with httpx.Client(base_url=self.http, timeout=30) as h:
            snap = ok(h.get("/api/v3/depth", params={"symbol": self.symbol, "limit": 1000}), 200)
        with self.lock:
            self.last = snap["lastUpdateId"]
            self.bids = {p: q for p, q in snap["bids"]}
            self.asks = {p: q for p, q in snap["asks"]}
            buffered, self.buffer = self.buffer, []
            for m in buffered:
                self._event(m)

    def _event(self, m: dict) -> None:
        if m["u"] <= self.last:
            return
        if m["U"] != self.last + 1:
            self.problems.append(f"event U={m['U']} u={m['u']} after last={self.last}")
            return
        for side, levels in ((self.bids, m["b"]), (self.asks, m["a"])):
            for p, q in levels:
                if Decimal(q) == 0:
                    if q != "0":  # API.md: "0" deletes (the native feed's "0.000" is not the adapter's)
                        self.problems.append(f"deletion of {p} sent as {q!r}, not \"0\"")
                    side.pop(p, None)
                else:
                    side[p] = q
        self.last = m["u"]
        self.applied += 1

    def view(self) -> tuple[int | None, list[list[str]], list[list[str]]]:
        with self.lock:
            return self.last, sorted_side(self.bids, True), sorted_side(self.asks, False)

    def close(self) -> None:
        self.ws.close()
        self.thread.join(5)


class WsTrader:
    """Order entry and the private orders channel on one authenticated /v1/ws connection."""

    def __init__(self, ws_url: str, api_key: str, orders_channel: bool = True) -> None:
        self.ws = connect(f"{ws_url}/v1/ws", max_size=None, open_timeout=10, legacy=True)
        self._ids = iter(range(1, 1 << 30))
        self.pending: list[dict] = []  # messages read while waiting for something else
        r = self.request({"op": "auth", "api_key": api_key})
        assert r["type"] == "ack", r
        self.account = r["account"]
        if orders_channel:
            r = self.request({"op": "subscribe", "channels": [{"name": "orders"}]})
            assert r == {"type": "ack", "id": r["id"]}, r

    def send(self, obj: dict) -> int:
        ident = next(self._ids)
        self.ws.send(orjson.dumps({**obj, "id": ident}).decode())
        return ident

    def wait_id(self, ident: int, timeout: float = 10) -> dict:
        for i, m in enumerate(self.pending):
            if m.get("id") == ident and m.get("type") in ("ack", "error", "result"):
                return self.pending.pop(i)
        end = time.monotonic() + timeout
        while True:
            m = orjson.loads(self.ws.recv(max(0.01, end - time.monotonic())))
            if m.get("id") == ident and m.get("type") in ("ack", "error", "result"):
                return m
            self.pending.append(m)

    def request(self, obj: dict, timeout: float = 10) -> dict:
        return self.wait_id(self.send(obj), timeout)

    def place_many(self, bodies: list[dict], chunk: int = 30) -> list[dict]:
        """Pipelined order.place, `chunk` at a time; the answers in order (pending is cleared)."""
        out = []
        for i in range(0, len(bodies), chunk):
            ids = [self.send({"op": "order.place", **b}) for b in bodies[i:i + chunk]]
            out.extend(self.wait_id(ident, 30) for ident in ids)
            self.pending.clear()
        return out

    def drain(self, seconds: float = 0.3) -> list[dict]:
        end = time.monotonic() + seconds
        while True:
            left = end - time.monotonic()
            if left <= 0:
                break
            try:
                self.pending.append(orjson.loads(self.ws.recv(left)))
            except TimeoutError:
                break
        return self.pending

    def close(self) -> None:
        self.ws.close()


# ---- a seeded random market ----------------------------------------------------------------------

def add_listing(ops: httpx.Client, ops_key_holder: dict[str, str], project: str, developer: str,
                vintage: int = 2024, quantity: str = "1000.000", listing: dict | None = None) -> str:
    """A second project with its developer account (funded), an issuance and a listing, through the
    operator REST endpoints. Returns the symbol; the developer's key goes into ops_key_holder."""
    symbol = f"{project}-{vintage}"
    ops_key_holder[developer] = ok(ops.post("/v1/accounts", json={"code": developer, "kind": "project_developer"}),
                                   201)["api_key"]
    ok(ops.post("/v1/registry/projects", json={"code": project, "name": "Rural biogas programme",
                                               "methodology": "forest_carbon_sink", "developer": developer}), 201)
    ok(ops.post("/v1/registry/issuances", json={"project": project, "vintage": vintage, "quantity": quantity}), 201)
    ok(ops.post("/v1/instruments", json={"symbol": symbol, "reference_price": "35.00", "always_open": True,
                                         "resale_rule": "T+0", **(listing or {})}), 201)
    ok(ops.post(f"/v1/accounts/{developer}/deposits", json={"amount": "1000000.00", "reference": f"seed-{developer}"}),
       201)
    return symbol


class RandomTrader:
    """Random limit/market orders, cancels and amends from several member accounts over REST."""

    def __init__(self, base: str, keys: dict[str, str], symbols: list[str], seed: int) -> None:
        self.rng = random.Random(seed)
        self.clients = {code: client(base, key) for code, key in keys.items()}
        self.symbols = symbols
        self.open: dict[str, list[str]] = {code: [] for code in keys}
        self.counts: dict[str, int] = {}

    def _count(self, what: str, r: httpx.Response) -> None:
        key = f"{what}:{r.status_code}"
        self.counts[key] = self.counts.get(key, 0) + 1
        assert r.status_code < 500, f"{what}: {r.status_code} {r.text}"

    def price(self) -> str:
        return f"{Decimal(self.rng.randint(3380, 3620)) / 100:.2f}"

    def step(self) -> None:
        rng = self.rng
        code = rng.choice(list(self.clients))
        c = self.clients[code]
        mine = self.open[code]
        roll = rng.random()
        if mine and roll < 0.15:
            oid = mine.pop(rng.randrange(len(mine)))
            self._count("cancel", c.delete(f"/v1/orders/{oid}"))
        elif mine and roll < 0.27:
            oid = rng.choice(mine)
            body = rng.choice([{"quantity": f"{rng.randint(1, 5)}.000"}, {"price": self.price()},
                               {"quantity": f"{rng.randint(1, 30)}.000", "price": self.price()}])
            r = c.patch(f"/v1/orders/{oid}", json=body)
            self._count("amend", r)
            if r.status_code == 200 and r.json()["status"] not in ("new", "partially_filled"):
                mine.remove(oid)
        else:
            symbol = rng.choice(self.symbols)
            side = rng.choice(["buy", "sell"])
            qty = f"{rng.randint(1, 25)}.000"
            if roll < 0.37:
                body = {"symbol": symbol, "side": side, "type": "market", "quantity": qty}
                if side == "buy":
                    body["max_cash"] = "2000.00"
            else:
                body = {"symbol": symbol, "side": side, "price": self.price(), "quantity": qty}
                if roll > 0.95:
                    body["time_in_force"] = rng.choice(["IOC", "FOK"])
            r = c.post("/v1/orders", json=body)
            self._count(f"place-{body.get('type', 'limit')}", r)
            if r.status_code == 201 and r.json()["status"] in ("new", "partially_filled"):
                mine.append(r.json()["order_id"])
        # forget orders that filled meanwhile (cancelling them then gives not_found, which is fine)

    def run(self, n: int) -> None:
        for _ in range(n):
            self.step()

    def close(self) -> None:
        for c in self.clients.values():
            c.close()


def rest_book(http: str, symbol: str, depth: int) -> dict:
    with httpx.Client(base_url=http, timeout=30) as h:
        return ok(h.get(f"/v1/book/{symbol}", params={"depth": depth}), 200)


def quiesce(http: str, symbols: list[str], timeout: float = 10) -> dict[str, dict]:
    """Wait until the books stop moving (two equal reads 150 ms apart); returns the REST books."""
    end = time.monotonic() + timeout
    prev = None
    while True:
        cur = {s: rest_book(http, s, 1000) for s in symbols}
        if prev is not None and all(cur[s]["seq"] == prev[s]["seq"] for s in symbols):
            return cur
        if time.monotonic() > end:
            raise AssertionError("books never stopped moving")
        prev = cur
        time.sleep(0.15)


def raw_ws(sock: socket.socket, ws_url: str, first: dict, path: str = "/v1/ws") -> None:
    """A websocket handshake and one client message on a plain socket, by hand (RFC 6455), so
    that the test decides exactly when (if ever) anything is read from the socket again."""
    import base64
    import os

    host = ws_url.removeprefix("ws://")
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)  # byte by byte: nothing after the headers is consumed
    assert head.startswith(b"HTTP/1.1 101"), head
    sock.sendall(ws_frame(orjson.dumps(first)))


def ws_frame(payload: bytes, opcode: int = 1) -> bytes:
    """One masked client frame."""
    import os
    import struct

    mask = os.urandom(4)
    n = len(payload)
    head = bytes([0x80 | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def read_frames(sock: socket.socket, timeout: float = 20.0) -> tuple[list[dict], int | None]:
    """Read server frames from a raw websocket until a close frame (or EOF/timeout): the JSON
    messages in order and the close code (None when the connection ended without one)."""
    import struct

    sock.settimeout(timeout)
    buf = bytearray()
    msgs: list[dict] = []

    def need(n: int) -> bool:
        while len(buf) < n:
            try:
                chunk = sock.recv(1 << 20)
            except (TimeoutError, ConnectionError):
                return False
            if not chunk:
                return False
            buf.extend(chunk)
        return True

    while True:
        if not need(2):
            return msgs, None
        opcode, n = buf[0] & 0x0F, buf[1] & 0x7F
        at = 2
        if n == 126:
            if not need(4):
                return msgs, None
            n, at = struct.unpack("!H", buf[2:4])[0], 4
        elif n == 127:
            if not need(10):
                return msgs, None
            n, at = struct.unpack("!Q", buf[2:10])[0], 10
        if not need(at + n):
            return msgs, None
        payload = bytes(buf[at:at + n])
        del buf[:at + n]
        if opcode == 8:
            return msgs, struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
        if opcode == 1:
            msgs.append(orjson.loads(payload))


def ask(ws, msg: dict, timeout: float = 5) -> dict:
    """Send `msg` and return its answer (the message with its id), skipping anything else."""
    ws.send(orjson.dumps(msg).decode())
    end = time.monotonic() + timeout
    while True:
        m = orjson.loads(ws.recv(max(0.01, end - time.monotonic())))
        if m.get("id") == msg["id"]:
            return m
