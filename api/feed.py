"""The websocket feed of API.md (path /v1/ws) and the Binance-compatible depth streams (paths /ws,
/ws/<stream> and /stream?streams=<stream>/<stream>, as Binance has them).

The feed hears every committed batch from exchange/marketdata.py (so it only ever shows durable
events) and fans it out. Work is shared wherever subscribers want the same thing: one depth view
per (instrument, depth, coalescing interval) computes each change once, and each message is
encoded once and queued as the same bytes for every subscriber.

Each connection has one ordered outgoing queue. When the bytes queued for a connection pass
``max_buffer`` (the peer does not read fast enough), it gets ``{"type":"error","code":
"slow_consumer"}`` and a close with code 1008; the others are not held up and never see a gap.
A planned stop sends what is queued, then ``{"type":"server_shutdown"}``, then closes.

What one message may cost is bounded: a subscribe takes each (channel, symbol) once, and a
connection holds at most MAX_SUBSCRIPTIONS of them (MAX_STREAMS Binance streams).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import socket
import struct
import time
from collections import deque
from dataclasses import replace
from typing import Any
from urllib.parse import parse_qs, unquote

import orjson
from pydantic import ValidationError
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

from api import auth
from api.auth import Gate, RateLimited
from api.models import MAX_ID, AmendRequest, OrderRequest, id_input
from api.orders import Trading
from api.wire import checksum, fill_view, levels, market_status, order_view, problem
from exchange.accounts import Account
from exchange.errors import CarbonxError
from exchange.marketdata import DepthView, MarketData, Published
from exchange.service import ExchangeService
from matching import events as E
from matching.core import EV_CLOSE, EV_HALTED, EV_LISTED, EV_RESUMED
from matching.units import format_price, format_tonnes

log = logging.getLogger("carbonx.feed")

MAX_DEPTH = 1000
MAX_INTERVAL_MS = 10_000
# Channels one connection may hold at once, counting each (channel, symbol) once (native feed), and
# Binance streams (Binance's own limit per connection). A subscribe that would pass it is refused
# whole: what one message costs is bounded by what a connection may hold.
MAX_SUBSCRIPTIONS = 1024
# A message longer than MAX_MESSAGE is answered payload_too_large and the connection goes on, as
# REST answers a body too large (review33: the library's own bound closed it 1009, and the answers
# of the orders it had taken were lost). Past MAX_FRAME the library still closes it; with
# MAX_QUEUE frames held at most, a connection buffers at most 8 MiB (4 MiB before). A queue of 16
# would keep 4 MiB with 256 KiB frames, but cost pipelined order entry about 5 % (bench_api).
MAX_MESSAGE = 64 * 1024
MAX_FRAME = 128 * 1024
MAX_QUEUE = 64
MAX_STREAMS = 1024
# How long a planned stop lets each connection's writer send what is queued for it, all together.
SHUTDOWN_DRAIN_S = 2.0
# What one write hands the transport: the rest stays queued, where a cut can drop it, so that the
# slow_consumer error is behind little more than this and the socket's buffers (review29).
WRITE_CHUNK = 64 * 1024
# The kernel's send buffer per connection (Linux doubles it): fixed rather than grown up to 4 MiB
# by autotuning, for the same reason; ample for a reader that keeps up.
SEND_BUFFER = 256 * 1024
# A cut connection reads what was ahead of its slow_consumer error (the socket's buffers and its
# own receive buffer: megabytes, at a slow reader's pace) and then answers the close, within
# CUT_CLOSE_S; it is dropped sooner if data waits on this side and none of it is taken for
# CUT_PROGRESS_S (a peer gone or stuck). Dropped, it loses what its receive buffer held.
CUT_PROGRESS_S = 10.0
CUT_CLOSE_S = 120.0
# The keepalive: a ping every PING_INTERVAL_S; a connection that neither answers nor takes any of
# its data for PING_TIMEOUT_S is stuck or gone (a pong queued behind data the peer is still
# reading is no reason to end it: that is the buffer bound's to judge).
PING_INTERVAL_S = 20.0
PING_TIMEOUT_S = 20.0
# The fields each channel of a subscribe takes: a misspelt one is refused, not served with defaults.
CHANNEL_FIELDS = {"book": {"name", "symbols", "depth", "interval_ms"}, "trades": {"name", "symbols"},
                  "ticker": {"name", "symbols"}, "registry": {"name"}, "orders": {"name"}, "instruments": {"name"}}
# The core's instrument events the `instruments` channel announces, by the type it gives them.
STATUS_EVENTS = {EV_LISTED: "listed", EV_HALTED: "halted", EV_RESUMED: "resumed", EV_CLOSE: "close"}
BINANCE_INTERVALS = {"": 1000, "@100ms": 100, "@1000ms": 1000}
# A tuple, not a set: `op` is whatever JSON the client sent, and an unhashable one (a list) must
# get "unknown op", not a TypeError that closes the connection.
ORDER_OPS = ("order.place", "order.cancel", "order.amend")
try:  # Linux: a socket's bytes not yet acknowledged by the peer
    import fcntl
    import termios
    _OUTQ: int | None = termios.TIOCOUTQ
except (ImportError, AttributeError):  # pragma: no cover - not Linux
    _OUTQ = None


def now_us() -> int:
    return time.time_ns() // 1000


def binance_stream(symbol: str, interval_ms: int) -> str:
    """The stream's name as LIST_SUBSCRIPTIONS gives it (`@depth` and `@depth@1000ms` are one stream)."""
    return f"{symbol.lower()}@depth" + ("@100ms" if interval_ms == 100 else "")


def _binance_code(code: str) -> int:
    """Binance's error code for one of ours on its websocket: 3 invalid JSON, 2 invalid request
    (its stream API's codes), -1003 too many requests (its REST code: the streams have none)."""
    return {"invalid_json": 3, "rate_limited": -1003}.get(code, 2)


def _ident(raw: str | bytes) -> Any:
    """The id of a message refused before it was read (rate limited, or not strict JSON), for the
    error to carry it as it would otherwise: a JSON object's "id", else None. Python's own parser
    is the fallback: it reads what orjson refuses (NaN, 1e400, a lone surrogate) around an id a
    pipelining client needs back."""
    try:
        msg = orjson.loads(raw)
    except orjson.JSONDecodeError:
        try:
            msg = json.loads(raw)
        except ValueError:
            return None
    ident = msg.get("id") if isinstance(msg, dict) else None
    return ident if isinstance(ident, (str, int)) and not isinstance(ident, bool) else None


def text_frame(data: bytes) -> bytes:
    """One final, unmasked text frame (RFC 6455 5.2) as a server sends it. The feed negotiates
    no extension (compression=None), so a frame is its header and the payload: the library's
    frame objects cost a tenth of the server's time per answered order (py-spy)."""
    n = len(data)
    if n < 126:
        return b"\x81%c%b" % (n, data)
    if n < 65536:
        return b"\x81\x7e%b%b" % (n.to_bytes(2, "big"), data)
    return b"\x81\x7f%b%b" % (n.to_bytes(8, "big"), data)


class Client:
    """One connection: its subscriptions and its bounded, ordered outgoing queue."""

    def __init__(self, feed: Feed, ws: ServerConnection, binance: bool, combined: bool = False) -> None:
        self.feed = feed
        self.ws = ws
        self.binance = binance
        self.combined = combined  # Binance's /stream: events wrapped as {"stream": name, "data": event}
        self.address = ws.remote_address[0] if ws.remote_address else None
        self.queue: deque[bytes] = deque()
        self.pending = 0
        self.ready = asyncio.Event()
        self.closed = False
        # A planned stop: server_shutdown is queued, nothing more is; the writer sends the queue
        # and returns, and only then is the connection closed: the close never overtakes it.
        self.ending = False
        self.writer_task: asyncio.Task | None = None
        self.written = 0  # bytes handed to the transport (the keepalive's count of what the peer took)
        self.account: Account | None = None
        self.key: str | None = None
        # When the key must be asked about again before it is used (monotonic; never while unauthenticated).
        self.key_expires = math.inf
        self.private: int | None = None  # the account whose order updates this connection receives
        self.books: dict[str, tuple[int, int]] = {}  # symbol -> (depth, interval_ms)
        self.channels: set[tuple[str, str]] = set()  # (trades|ticker, symbol), (registry, "")
        self.streams: set[tuple[str, int]] = set()  # Binance depth streams: (symbol, interval_ms)
        self.tasks: set[asyncio.Task] = set()  # answers waiting for durability (strong references)

    def push(self, data: bytes) -> None:
        if self.closed or self.ending:
            return
        self.queue.append(data)
        self.pending += len(data)
        if self.pending > self.feed.max_buffer:
            self.cut()
            return
        self.ready.set()

    def cut(self, detail: str | None = None) -> None:
        """Too slow: drop what is queued, say why, close with 1008."""
        self.closed = True
        self.queue.clear()
        self.pending = 0
        self.ready.set()  # the writer ends
        self.feed.slow_consumers += 1
        loop = asyncio.get_running_loop()
        loop.call_soon(self.feed.forget, self)  # not now: the caller may be iterating a subscriber set
        self.tasks.add(loop.create_task(self._close_slow(CUT_PROGRESS_S, detail, CUT_CLOSE_S)))

    async def _close_slow(self, timeout: float, detail: str | None = None, longest: float = 0.0) -> None:
        """The error and the close, after whatever was already handed to the socket. The peer has
        `timeout` seconds, and more while it goes on taking data (up to `longest` in all); a
        connection that takes nothing for `timeout` is dropped."""
        detail = detail or f"more than {self.feed.max_buffer} bytes waited for this connection"
        if self.binance:  # the error in Binance's shape, as every other on its streams
            err = orjson.dumps({"error": {"code": _binance_code("slow_consumer"), "msg": f"slow_consumer: {detail}"},
                                "id": None})
        else:
            err = orjson.dumps({"type": "error", "code": "slow_consumer", "detail": detail})
        loop = asyncio.get_running_loop()
        until = loop.time() + max(timeout, longest)
        # The library drops a connection whose close is not answered within close_timeout: the
        # peer may need all of it to read up to the close.
        self.ws.close_timeout = max(timeout, longest)
        closing = asyncio.ensure_future(self._say_and_close(err, 1008, "slow consumer"))
        try:
            while True:
                taken = self.delivered()
                done, _ = await asyncio.wait({closing}, timeout=min(timeout, max(0.0, until - loop.time())))
                if done:
                    closing.result()
                    return
                # Stuck: data waits on this side and none was taken. All of it taken, the peer is
                # reading up to the close (its receive buffer is out of sight): it is waited for.
                stuck = self.delivered() <= taken and self.held() > 0
                if stuck or loop.time() >= until:
                    closing.cancel()
                    self.ws.transport.abort()
                    return
        except (ConnectionClosed, OSError):
            self.ws.transport.abort()
        except asyncio.CancelledError:
            closing.cancel()
            self.ws.transport.abort()
            raise

    async def _say_and_close(self, data: bytes, code: int, reason: str) -> None:
        await self.ws.send(data, text=True)
        await self.ws.close(code, reason)

    async def writer(self) -> None:
        """Send what is queued, up to WRITE_CHUNK bytes a write: a frame per message, but one
        system call per chunk instead of one per message. With 1,000 subscribers the per-message
        send path was over half the server's time (py-spy on the fan-out bench), most of it in
        socket writes. Back-pressure is the library's own: ``drain`` waits while the socket's
        buffer is full, and meanwhile the queue grows towards the slow-consumer cut-off."""
        ws, queue = self.ws, self.queue
        protocol, transport = ws.protocol, ws.transport
        try:
            while not self.closed:
                await self.ready.wait()
                self.ready.clear()
                while queue and not self.closed:
                    if protocol.state is not State.OPEN or transport.is_closing():
                        return
                    frames, size = [], 0
                    while queue and (not frames or size + len(queue[0]) <= WRITE_CHUNK):
                        data = queue.popleft()
                        frames.append(text_frame(data))
                        size += len(data)
                    self.pending -= size
                    chunk = b"".join(frames)
                    self.written += len(chunk)
                    transport.write(chunk)
                    await ws.drain()
                if self.closed:
                    return
                if self.ending and not queue:
                    # Everything queued, server_shutdown last, is in the socket's buffer: Feed.stop
                    # may close now, the close frame after it.
                    return
        except (ConnectionClosed, OSError):  # drain() raises the transport's error once the peer is gone
            pass

    def delivered(self) -> int:
        """About how many bytes the peer's TCP has acknowledged: what was handed to the transport,
        less what the transport and the socket still hold (Linux's unacknowledged bytes, TIOCOUTQ).
        Where the socket cannot say, what the transport has passed on."""
        return self.written - self.held()

    def held(self) -> int:
        """Bytes sent that the peer has not acknowledged yet: in the transport, and in the socket
        (Linux; elsewhere only the transport's)."""
        transport = self.ws.transport
        held = transport.get_write_buffer_size()
        if _OUTQ is not None:
            try:
                sock = transport.get_extra_info("socket")
                held += struct.unpack("i", fcntl.ioctl(sock.fileno(), _OUTQ, b"\0\0\0\0"))[0]
            except (OSError, AttributeError, ValueError):
                pass
        return held

    async def keepalive(self) -> None:
        """Ping every PING_INTERVAL_S. No pong, and none of the connection's data taken either, for
        PING_TIMEOUT_S: stuck or gone, ended as a slow consumer (the error is there for a peer
        that reads again). A pong late behind data the peer is still reading is waited for."""
        while not self.closed:
            await asyncio.sleep(PING_INTERVAL_S)
            if self.closed:
                return
            # The ping itself may wait (the library sends it only once the socket's buffer has
            # room): that wait counts as not answered.
            answered = asyncio.ensure_future(self._ping())
            try:
                while True:
                    taken = self.delivered()
                    done, _ = await asyncio.wait({answered}, timeout=PING_TIMEOUT_S)
                    if done:
                        if answered.exception() is not None:  # closed meanwhile
                            return
                        break
                    if self.closed:
                        return
                    if self.delivered() <= taken:
                        self.cut(f"no answer to a ping, and none of the data sent taken, for {PING_TIMEOUT_S:g} s")
                        return
            finally:
                answered.cancel()

    async def _ping(self) -> None:
        pong = await self.ws.ping()
        await pong


class BookGroup:
    """Subscribers sharing one depth view of one instrument, updated every batch or every
    `interval_ms` (coalesced)."""

    def __init__(self, view: DepthView, interval_ms: int) -> None:
        self.view = view
        self.interval_ms = interval_ms
        self.clients: set[Client] = set()

    def snapshot(self, ts: int) -> bytes:
        v = self.view
        bids = levels(sorted(v.levels[E.BID].items(), reverse=True))
        asks = levels(sorted(v.levels[E.ASK].items()))
        return orjson.dumps({"ch": "book", "type": "snapshot", "symbol": v.book.symbol, "seq": v.last_seq, "ts": ts,
                             "bids": bids, "asks": asks, "checksum": checksum(asks, bids)})

    def update(self, ts: int) -> bytes | None:
        v = self.view
        if v.last_seq == v.book.seq:
            return None
        # An update even when nothing the view holds changed (empty bids and asks): the subscriber's
        # seq then always reaches the book's, as REST and the heartbeat report it.
        first, changes = v.advance()
        bids = levels(sorted(((p, q) for s, p, q in changes if s == E.BID), reverse=True))
        asks = levels(sorted((p, q) for s, p, q in changes if s == E.ASK))
        n = min(10, v.depth)
        top_b, top_a = levels(v.book.top(E.BID, n)), levels(v.book.top(E.ASK, n))
        return orjson.dumps({"ch": "book", "type": "update", "symbol": v.book.symbol, "first_seq": first,
                             "seq": v.last_seq, "ts": ts, "bids": bids, "asks": asks,
                             "checksum": checksum(top_a, top_b)})


def binance_levels(pairs: list[tuple[int, int]]) -> list[list[str]]:
    """Levels as the Binance adapter sends them: a deleted level's size is "0" (API.md), where the
    native feed sends "0.000"."""
    return [[format_price(p), format_tonnes(q) if q else "0"] for p, q in pairs]


class BinanceGroup:
    """Full-depth changes of one instrument for Binance-style clients, every `interval_ms`."""

    def __init__(self, symbol: str, interval_ms: int, seq: int) -> None:
        self.symbol = symbol
        self.interval_ms = interval_ms
        self.name = orjson.dumps(binance_stream(symbol, interval_ms))  # for /stream's wrapper
        self.clients: set[Client] = set()
        self.first: int | None = None
        self.last = seq
        self.changes: dict[tuple[int, int], int] = {}

    def add(self, first: int, last: int, changes: list[tuple[int, int, int]]) -> None:
        if self.first is None:
            self.first = first
        self.last = last
        for side, price, qty in changes:
            self.changes[(side, price)] = qty

    def flush(self) -> bytes | None:
        if self.first is None:
            return None
        ch = self.changes
        bids = binance_levels(sorted(((p, q) for (s, p), q in ch.items() if s == E.BID), reverse=True))
        asks = binance_levels(sorted((p, q) for (s, p), q in ch.items() if s == E.ASK))
        msg = orjson.dumps({"e": "depthUpdate", "E": time.time_ns() // 1_000_000, "s": self.symbol,
                            "U": self.first, "u": self.last, "b": bids, "a": asks})
        self.first, self.changes = None, {}
        return msg


class Feed:
    """All connections, their subscriptions, and the fan-out of every committed batch."""

    def __init__(self, service: ExchangeService, market: MarketData, gate: Gate, trading: Trading, *,
                 max_buffer: int = 4 << 20, heartbeat: float = 1.0) -> None:
        self.service = service
        self.market = market
        self.gate = gate
        self.trading = trading
        self.max_buffer = max_buffer
        self.heartbeat = heartbeat
        self.clients: set[Client] = set()
        self.groups: dict[tuple[str, int, int], BookGroup] = {}
        self.binance: dict[tuple[str, int], BinanceGroup] = {}
        self.subs: dict[tuple[str, str], set[Client]] = {}
        self.orders: dict[int, set[Client]] = {}
        service.orders.watched = self.orders  # the tracker keeps each entry's state of their orders
        self.deliveries = 0
        self.slow_consumers = 0
        self.server: Server | None = None
        self._tasks: list[asyncio.Task] = []
        market.subscribers.append(self.on_publish)
        service.listeners.append(self.on_entries)  # after MarketData's: private updates follow the public
        service.registry_listeners.append(self.on_registry)

    # ---- life cycle --------------------------------------------------------------------------

    async def start(self, host: str | None = None, port: int | None = None, *, sock: socket.socket | None = None
                    ) -> Server:
        """Listen on `host`:`port`, or on `sock`, already bound."""
        # The library's keepalive is off: its ping waits behind the data queued for the peer,
        # and a reader still taking its data was closed 1011 (review29); Client.keepalive instead.
        self.server = await serve(self.handle, host, port, sock=sock, process_request=self._route, max_size=MAX_FRAME,
                                  max_queue=MAX_QUEUE, compression=None, ping_interval=None)
        self._tasks = [asyncio.create_task(self._heartbeats(), name="carbonx-heartbeat"),
                       asyncio.create_task(self._coalesce(), name="carbonx-coalesce"),
                       asyncio.create_task(self._key_checks(), name="carbonx-key-checks")]
        return self.server

    @property
    def port(self) -> int:
        return self.server.sockets[0].getsockname()[1]

    async def stop(self, drain: float = SHUTDOWN_DRAIN_S) -> None:
        """Tell every client, then close: each connection gets what is queued for it, then
        server_shutdown, then close 1001, in this order (the close only once its writer has written
        the queue; a close frame sent earlier overtook the queue, which was then dropped). A connection that
        cannot take its queue within `drain` seconds (all connections together) is a slow
        consumer: slow_consumer and 1008, as it would have been had the exchange gone on."""
        for t in self._tasks:
            t.cancel()
        if self.server is not None:
            # No new connections (an opening one is refused with 503) while these drain.
            self.server.close(close_connections=False)
        bye = orjson.dumps({"type": "server_shutdown", "ts": now_us()})
        clients = [c for c in self.clients if not c.closed]
        for c in clients:
            self.forget(c)  # no more market data: nothing may follow the bye
            c.push(bye)
            c.ending = True
        writers = {c.writer_task: c for c in clients if c.writer_task is not None and not c.writer_task.done()}
        if writers:  # each returns once its queue, server_shutdown last, is written
            _, late = await asyncio.wait(writers, timeout=drain)
            slow = [writers[t] for t in late if not writers[t].closed]
            for c in slow:
                c.closed = True
                c.queue.clear()
                c.pending = 0
                c.ready.set()
                self.slow_consumers += 1
            await asyncio.gather(*(c._close_slow(1, f"the server is stopping and this connection did not take "
                                                    f"what was queued for it within {drain:g} s") for c in slow),
                                 return_exceptions=True)
        await asyncio.gather(*(self._close(c.ws) for c in clients if not c.closed), return_exceptions=True)
        if self.server is not None:
            # Opened but never a client (its handler had not run): nothing was queued for it.
            await asyncio.gather(*(self._close(ws) for ws in list(self.server.connections)),
                                 return_exceptions=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.server.wait_closed(), drain)

    async def _close(self, ws: ServerConnection) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(ws.close(1001, "server shutdown"), 2)

    def _route(self, conn: ServerConnection, request: Request) -> Response | None:
        # An opening counts against its address's limit as a REST request does: each connection
        # holds tasks and is sent a heartbeat a second, and openings were free (review33).
        try:
            self.gate.admit(conn.remote_address[0] if conn.remote_address else None)
        except RateLimited as e:
            headers = Headers([("Content-Type", "application/problem+json"), ("Retry-After", str(e.retry_after))])
            return Response(429, "Too Many Requests", headers, orjson.dumps(problem(e.code, e.message, 429)))
        path = request.path.split("?", 1)[0]
        if path in ("/v1/ws", "/ws"):
            return None
        if path.startswith("/ws/") or path == "/stream":
            names = self._url_streams(request.path)
            bad = [n for n in names if self.parse_stream(n) is None]
            if bad or (path != "/stream" and not names) or len(names) > MAX_STREAMS:
                what = (f"unknown stream {bad[0]!r}" if bad else
                        f"more than {MAX_STREAMS} streams" if names else "no stream named")
                return Response(400, "Bad Request", Headers([("Content-Type", "text/plain")]),
                                f"{what}: streams are <symbol in lower case>@depth, @depth@100ms or "
                                f"@depth@1000ms of a listed instrument\n".encode())
            return None
        return Response(404, "Not Found", Headers([("Content-Type", "text/plain")]),
                        b"websocket paths: /v1/ws (carbonx feed); Binance-compatible depth: /ws, "
                        b"/ws/<stream>, /stream?streams=<stream>/<stream>\n")

    @staticmethod
    def _url_streams(target: str) -> list[str]:
        """The streams a Binance URL names: /ws/<a>[/<b>...] (raw) or /stream?streams=<a>/<b>
        (combined)."""
        path, _, query = target.partition("?")
        joined = parse_qs(query).get("streams", [""])[0] if path == "/stream" else unquote(path[len("/ws/"):])
        return [n for n in joined.split("/") if n]

    def parse_stream(self, name: Any) -> tuple[str, int] | None:
        """(SYMBOL, interval_ms) of a Binance depth stream name, None unless it is one of a listed
        instrument (the symbol is matched in upper case: Binance writes it in lower case)."""
        if not isinstance(name, str):
            return None
        stream, at, rest = name.partition("@depth")
        symbol = stream.upper()
        if not at or rest not in BINANCE_INTERVALS or symbol not in self.market.books:
            return None
        return symbol, BINANCE_INTERVALS[rest]

    # ---- connections -------------------------------------------------------------------------

    async def handle(self, ws: ServerConnection) -> None:
        path = ws.request.path.split("?", 1)[0]
        binance = path == "/ws" or path.startswith("/ws/") or path == "/stream"
        client = Client(self, ws, binance=binance, combined=path == "/stream")
        self.clients.add(client)
        with contextlib.suppress(OSError, AttributeError):  # not a TCP socket (a test's transport)
            ws.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        writer = client.writer_task = asyncio.create_task(client.writer())
        keepalive = asyncio.create_task(client.keepalive())
        if binance and path != "/ws":  # the streams the URL names (checked in _route)
            for name in self._url_streams(ws.request.path):
                key = self.parse_stream(name)
                if key is not None:
                    self._join_binance(key, client)
        try:
            async for raw in ws:
                if client.closed:
                    # Cut off: keep reading (and dropping) so a peer blocked in writing to us can
                    # finish and read the error and the close.
                    continue
                # Every message counts against the limits, also one that turns out not to be JSON:
                # admitted before it is parsed, or unparsable messages would be free.
                try:
                    self.gate.admit(client.address, client.key)
                except RateLimited as e:
                    if client.binance:
                        self._error(client, _ident(raw), e.code, e.message)
                    else:
                        self._send(client, {"type": "error", "id": _ident(raw), "code": e.code,
                                            "detail": e.message, "retry_after_ms": e.retry_after_ms})
                    continue
                if len(raw) > MAX_MESSAGE // 4 and (size := len(raw if isinstance(raw, bytes) else raw.encode())
                                                    ) > MAX_MESSAGE:  # (bytes, not characters)
                    self._error(client, _ident(raw), "payload_too_large",
                                f"a message is at most {MAX_MESSAGE} bytes, this one {size}")
                    continue
                try:
                    msg = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    self._error(client, _ident(raw), "invalid_json", "messages are JSON objects")
                    continue
                if not isinstance(msg, dict):
                    self._error(client, None, "invalid_request", "messages are JSON objects")
                    continue
                ident = msg.get("id")  # before order entry takes it out of the message
                try:
                    if time.monotonic() >= client.key_expires:  # one comparison per order otherwise
                        await self._recheck(client)
                    if client.binance:
                        self._binance_message(client, msg)
                    elif msg.get("op") in ORDER_OPS:  # without a coroutine per order
                        self._order(client, msg["op"], ident, msg)
                    else:
                        await self._message(client, msg)
                except CarbonxError as e:
                    self._error(client, ident, e.code, e.message)
        except ConnectionClosed:
            pass
        finally:
            client.closed = True
            self.forget(client)
            client.ready.set()
            writer.cancel()
            keepalive.cancel()
            # A slow consumer's error and 1008 close are under way: returning now would close 1000.
            if client.tasks:
                await asyncio.gather(*client.tasks, return_exceptions=True)

    def forget(self, c: Client) -> None:
        """Take a closed connection out of every fan-out set it is in: anything left behind is
        memory held for good and a push to nobody on every batch. Safe to call twice (a cut
        connection is forgotten when cut and again when its handler ends)."""
        self.clients.discard(c)
        for symbol, (depth, interval) in c.books.items():
            self._leave((symbol, depth, interval), c)
        c.books.clear()
        for key in c.channels:
            self._drop(self.subs, key, c)
        c.channels.clear()
        for stream in c.streams:
            self._leave_binance(stream, c)
        c.streams.clear()
        self._unwatch_orders(c)

    @staticmethod
    def _drop(sets: dict[Any, set[Client]], key: Any, c: Client) -> None:
        """`c` leaves the fan-out set under `key`; an emptied set goes, so that the map stays as
        small as what is watched (and on_entries' `if not self.orders` shortcut keeps working)."""
        members = sets.get(key)
        if members is not None:
            members.discard(c)
            if not members:
                del sets[key]

    def _watch_orders(self, c: Client) -> None:
        self._unwatch_orders(c)
        self.orders.setdefault(c.account.id, set()).add(c)
        c.private = c.account.id

    def _unwatch_orders(self, c: Client) -> None:
        if c.private is not None:
            self._drop(self.orders, c.private, c)
            c.private = None

    def _send(self, c: Client, obj: dict[str, Any]) -> None:
        c.push(orjson.dumps(obj))

    def _error(self, c: Client, ident: Any, code: str, detail: str) -> None:
        if c.binance:  # a Binance client reads Binance's shape
            self._send(c, {"error": {"code": _binance_code(code), "msg": detail}, "id": ident})
            return
        self._send(c, {"type": "error", "id": ident, "code": code, "detail": detail})

    async def _message(self, c: Client, msg: dict[str, Any]) -> None:
        """Every op but order entry (:meth:`handle` sends those to :meth:`_order` directly)."""
        op, ident = msg.get("op"), msg.get("id")
        if op == "subscribe" or op == "unsubscribe":
            channels = msg.get("channels")
            if not isinstance(channels, list) or not channels or len(channels) > 50:
                raise CarbonxError("invalid_request", "channels must be a list of 1..50 channel objects")
            plan = [self._channel(c, ch) for ch in channels]  # validate all before changing any
            # Each (channel, symbol) once, whatever the message repeats: the last depth and
            # interval named win. 50 channels of 100 symbols each would otherwise be 5,000
            # snapshots (at depth 1000, seconds of the event loop that REST and order entry share).
            wanted: dict[tuple[str, str], tuple[int, int]] = {}
            for name, symbols, depth, interval in plan:
                for symbol in symbols:
                    wanted[(name, symbol)] = (depth, interval)
            if op == "subscribe":
                held = {("book", s) for s in c.books} | c.channels
                if c.private is not None:
                    held.add(("orders", ""))
                if len(held | wanted.keys()) > MAX_SUBSCRIPTIONS:
                    raise CarbonxError("too_many_subscriptions",
                                       f"a connection holds at most {MAX_SUBSCRIPTIONS} subscriptions (a channel "
                                       f"of one symbol each); this one holds {len(held)} and the message asks for "
                                       f"{len(wanted.keys() - held)} more")
            snapshots: list[bytes] = []
            for (name, symbol), (depth, interval) in wanted.items():
                snap = (self._subscribe if op == "subscribe" else self._unsubscribe)(c, name, symbol, depth,
                                                                                   interval)
                if snap is not None:
                    snapshots.append(snap)
            self._send(c, {"type": "ack", "id": ident})
            for s in snapshots:
                c.push(s)
        elif op == "resync":
            symbol = msg.get("symbol")
            if msg.get("ch") != "book" or symbol not in c.books:
                raise CarbonxError("invalid_request", "resync takes ch \"book\" and a symbol you subscribed to")
            depth, interval = c.books[symbol]
            c.push(self.groups[(symbol, depth, interval)].snapshot(now_us()))
        elif op == "auth":
            key = msg.get("api_key")
            await self._auth(c, ident, key if isinstance(key, str) else None)
        elif op == "ping":
            self._send(c, {"type": "pong", "id": ident, "ts": now_us()})
        else:
            raise CarbonxError("invalid_request", f"unknown op {op!r}")

    async def _auth(self, c: Client, ident: Any, key: str | None) -> None:
        """Auth replaces the connection's identity. The old account's private stream ends when the
        account changes (it would otherwise go on to whoever holds the socket now), and a refused
        key leaves no identity at all rather than silently keeping the previous one."""
        try:
            account = await self.gate.account(key)
        except CarbonxError:
            self._deauth(c)
            raise
        if c.private is not None and c.private != account.id:
            self._unwatch_orders(c)
        c.account, c.key, c.key_expires = account, key, self.gate.fresh_until(key)
        self._send(c, {"type": "ack", "id": ident, "account": account.code, "role": account.role})

    async def _recheck(self, c: Client) -> None:
        """Ask the gate about the connection's key again (the database only when the gate's own
        answer is stale too); a revoked key de-authenticates the connection."""
        key = c.key
        if key is None:  # de-authenticated meanwhile
            return
        try:
            account = await self.gate.account(key)
        except CarbonxError:
            if c.key == key:  # not re-authenticated meanwhile
                self._deauth(c)
                self._error(c, None, "unauthorized",
                            "the API key was revoked: this connection is no longer authenticated and its orders "
                            "channel has ended; send auth with a valid key")
            return
        except Exception as e:
            log.warning("could not check an API key: %r", e)
            raise CarbonxError("unavailable", "the API key could not be checked; try again") from None
        if c.key == key:
            c.account, c.key_expires = account, self.gate.fresh_until(key)

    def _deauth(self, c: Client) -> None:
        self._unwatch_orders(c)
        c.account, c.key, c.key_expires = None, None, math.inf

    async def _key_checks(self) -> None:
        """A connection that only listens to its orders channel sends nothing that would make it
        check its key: check such keys when they go stale, so that a revoked key's private stream
        stops within KEY_TTL plus this loop's period. One gate call per key, not per connection
        (the gate caches the answer for the others)."""
        while True:
            await asyncio.sleep(min(1.0, auth.KEY_TTL / 4))
            now = time.monotonic()
            due = [c for c in self.clients if c.private is not None and now >= c.key_expires]
            for c in due:
                with contextlib.suppress(CarbonxError):  # logged; the next round tries again
                    await self._recheck(c)

    def _channel(self, c: Client, ch: Any) -> tuple[str, list[str], int, int]:
        if not isinstance(ch, dict):
            raise CarbonxError("invalid_request", "a channel is an object with a name")
        name = ch.get("name")
        if name in CHANNEL_FIELDS and (extra := set(ch) - CHANNEL_FIELDS[name]):
            raise CarbonxError("invalid_request", f"channel {name} has no {', '.join(sorted(map(repr, extra)))}; "
                                                  f"it takes {', '.join(sorted(CHANNEL_FIELDS[name]))}")
        if name in ("registry", "orders", "instruments"):
            if name == "orders" and c.account is None:
                raise CarbonxError("unauthorized", "the orders channel needs auth with a member's API key first")
            if name == "orders" and c.account.role != "member":
                raise CarbonxError("forbidden", "only member accounts have orders")
            return name, [""], 0, 0
        if name not in ("book", "trades", "ticker"):
            raise CarbonxError("invalid_request", f"unknown channel {name!r}")
        symbols = ch.get("symbols")
        if not isinstance(symbols, list) or not symbols or len(symbols) > 100:
            raise CarbonxError("invalid_request", f"channel {name} needs symbols: a list of 1..100 instruments")
        for s in symbols:
            if not isinstance(s, str) or s not in self.market.books:
                raise CarbonxError("unknown_instrument", f"no instrument {s!r}")
        depth, interval = ch.get("depth", 10), ch.get("interval_ms", 0)
        if type(depth) is not int or not 1 <= depth <= MAX_DEPTH:
            raise CarbonxError("invalid_request", f"depth must be an integer in 1..{MAX_DEPTH}")
        if type(interval) is not int or not 0 <= interval <= MAX_INTERVAL_MS:
            raise CarbonxError("invalid_request", f"interval_ms must be an integer in 0..{MAX_INTERVAL_MS}")
        return name, symbols, depth, interval

    def _subscribe(self, c: Client, name: str, symbol: str, depth: int, interval: int) -> bytes | None:
        if name == "book":
            old = c.books.get(symbol)
            if old == (depth, interval):  # the same again: the same view, a fresh snapshot (as resync)
                return self.groups[(symbol, depth, interval)].snapshot(now_us())
            if old is not None:
                self._leave((symbol, *old), c)
            key = (symbol, depth, interval)
            g = self.groups.get(key)
            if g is None:
                g = self.groups[key] = BookGroup(DepthView(self.market.books[symbol], depth), interval)
            g.clients.add(c)
            c.books[symbol] = (depth, interval)
            return g.snapshot(now_us())
        if name == "orders":
            self._watch_orders(c)
            return None
        key = (name, symbol)
        self.subs.setdefault(key, set()).add(c)
        c.channels.add(key)
        if name == "ticker":
            return self._current_ticker(symbol)
        return None

    def _current_ticker(self, symbol: str) -> bytes | None:
        """What a new ticker subscriber starts from (as a book subscriber starts from a snapshot):
        otherwise it knows nothing until the next trade, which on a quiet instrument is hours. None
        for an instrument that never traded."""
        ts = now_us()
        v = self.market.ticker(symbol, ts)
        return None if v["last"] is None else self._ticker_message(symbol, v, ts)

    def _leave(self, key: tuple[str, int, int], c: Client) -> None:
        """`c` leaves a depth view; the last one out drops it. Each (symbol, depth, interval) a
        client ever asked for would otherwise stay, and every commit walks them all."""
        g = self.groups.get(key)
        if g is not None:
            g.clients.discard(c)
            if not g.clients:
                del self.groups[key]

    def _unsubscribe(self, c: Client, name: str, symbol: str, depth: int, interval: int) -> None:
        if name == "book":
            old = c.books.pop(symbol, None)
            if old is not None:
                self._leave((symbol, *old), c)
            return
        if name == "orders":
            self._unwatch_orders(c)
            return
        self._drop(self.subs, (name, symbol), c)
        c.channels.discard((name, symbol))

    # ---- order entry on the socket -----------------------------------------------------------

    def _order(self, c: Client, op: str, ident: Any, msg: dict[str, Any]) -> None:
        if c.account is None:
            raise CarbonxError("unauthorized", "send {\"op\":\"auth\",\"api_key\":...} first")
        if c.account.role != "member":
            raise CarbonxError("forbidden", "only member accounts trade")
        fields = msg  # the message is this call's own (parsed for it): take op and id out of it
        fields.pop("op", None)
        fields.pop("id", None)
        account = c.account.id
        try:
            if op == "order.place":
                out, durable = self.trading.place_now(account, OrderRequest.model_validate(fields), shared=True)
            else:
                try:  # REST's rule for ids: "²" or 5,000 digits must not reach int() and drop the connection
                    order_id = id_input(fields.pop("order_id", None))
                except ValueError:
                    order_id = None
                if order_id is None or not 0 < order_id <= MAX_ID:  # REST's bound (api/models.IdInput)
                    raise CarbonxError("invalid_request", "order_id must be an order id")
                if op == "order.cancel":
                    if fields:
                        raise CarbonxError("invalid_request", f"unknown fields {sorted(fields)}")
                    out, durable = self.trading.cancel_now(account, order_id, shared=True)
                else:
                    out, durable = self.trading.amend_now(account, order_id, AmendRequest.model_validate(fields),
                                                          shared=True)
        except ValidationError as e:
            first = e.errors()[0]
            raise CarbonxError("invalid_request",
                               f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
        # One callback per order on the commit's shared future, not a task and a future per
        # order: at pipelined rates those were a tenth of the server's time (py-spy).
        if durable is None:
            self._respond(c, ident, account, out)
        else:
            durable.add_done_callback(functools.partial(self._durable, c, ident, account, out))

    def _durable(self, c: Client, ident: Any, account: int, out: Any, commit: asyncio.Future) -> None:
        if commit.cancelled() or commit.exception() is not None:
            e = commit.exception() if not commit.cancelled() else None
            if isinstance(e, CarbonxError):
                self._error(c, ident, e.code, e.message)
            else:
                self._error(c, ident, "unavailable", "the exchange stopped before the command was durable")
            return
        self._respond(c, ident, account, out)

    def _respond(self, c: Client, ident: Any, account: int, out: Any) -> None:
        try:
            order = self.trading.answer_now(account, out)
        except CarbonxError as e:
            self._error(c, ident, e.code, e.message)
            return
        if order is not None:
            c.push(orjson.dumps({"type": "result", "id": ident, "order": order}))
            return
        task = asyncio.get_running_loop().create_task(self._answer(c, ident, account, out))
        c.tasks.add(task)
        task.add_done_callback(c.tasks.discard)

    async def _answer(self, c: Client, ident: Any, account: int, out: Any) -> None:
        """An answer that needs the history tables (fills from before this process)."""
        try:
            order = await self.trading.order(account, out.order_id, out.seq)
        except CarbonxError as e:
            self._error(c, ident, e.code, e.message)
            return
        c.push(orjson.dumps({"type": "result", "id": ident, "order": order}))

    # ---- Binance-compatible ------------------------------------------------------------------

    def _binance_message(self, c: Client, msg: dict[str, Any]) -> None:
        method, params, ident = msg.get("method"), msg.get("params", []), msg.get("id")
        if method == "LIST_SUBSCRIPTIONS":
            self._send(c, {"result": sorted(binance_stream(s, i) for s, i in c.streams), "id": ident})
            return
        if method not in ("SUBSCRIBE", "UNSUBSCRIBE") or not isinstance(params, list):
            self._send(c, {"error": {"code": 2, "msg": "Invalid request: method must be SUBSCRIBE or UNSUBSCRIBE"},
                           "id": ident})
            return
        wanted: dict[tuple[str, int], None] = {}  # each stream once, in order
        for p in params:
            key = self.parse_stream(p)
            if key is None:
                self._send(c, {"error": {"code": 2, "msg": f"Invalid stream {p!r}"}, "id": ident})
                return
            wanted[key] = None
        if method == "SUBSCRIBE" and len(c.streams | wanted.keys()) > MAX_STREAMS:
            self._send(c, {"error": {"code": 2, "msg": f"Invalid request: a connection listens to at most "
                                                       f"{MAX_STREAMS} streams"}, "id": ident})
            return
        for key in wanted:
            if method == "SUBSCRIBE":
                self._join_binance(key, c)
            else:
                self._leave_binance(key, c)
                c.streams.discard(key)
        self._send(c, {"result": None, "id": ident})

    def _join_binance(self, key: tuple[str, int], c: Client) -> None:
        g = self.binance.get(key)
        if g is None:
            symbol, interval = key
            g = self.binance[key] = BinanceGroup(symbol, interval, self.market.books[symbol].seq)
        g.clients.add(c)
        c.streams.add(key)

    def _leave_binance(self, key: tuple[str, int], c: Client) -> None:
        """`c` leaves one (symbol, interval) stream, and only that one; the last one out drops the
        group, which a later subscriber starts afresh from the book's current seq."""
        g = self.binance.get(key)
        if g is not None:
            g.clients.discard(c)
            if not g.clients:
                del self.binance[key]

    # ---- fan-out -----------------------------------------------------------------------------

    def _fan(self, clients: set[Client], data: bytes) -> None:
        for c in clients:
            c.push(data)
        self.deliveries += len(clients)

    def on_publish(self, pub: Published) -> None:
        ts = pub.ts
        changed = {u.symbol for u in pub.updates}
        for (symbol, _depth, interval), g in self.groups.items():
            if interval == 0 and g.clients and symbol in changed:
                data = g.update(ts)
                if data is not None:
                    self._fan(g.clients, data)
        if self.binance:
            for u in pub.updates:
                for (symbol, _), g in self.binance.items():
                    if symbol == u.symbol:
                        g.add(u.first_seq, u.seq, u.changes)
        for t in pub.trades:
            subs = self.subs.get(("trades", t.symbol))
            if subs:
                self._fan(subs, orjson.dumps({
                    "ch": "trades", "symbol": t.symbol, "trade_id": str(t.trade_id), "price": format_price(t.price),
                    "quantity": format_tonnes(t.qty), "taker_side": "buy" if t.taker_side == E.BID else "sell",
                    "seq": t.seq, "ts": t.ts}))
        for symbol in pub.tickers:
            subs = self.subs.get(("ticker", symbol))
            if subs:
                self._fan(subs, self._ticker(symbol, ts))

    def on_entries(self, entries: list) -> None:
        """Instrument status changes to the `instruments` channel; private order updates and fills
        to their owners' connections."""
        if self.subs.get(("instruments", "")):
            self._instrument_status(entries)
        if not self.orders:
            return
        # `ts` (microseconds, as every feed message carries) beside the views' ISO times, which
        # are REST's order and fill as clients already parse them.
        for _seq, ts, _cmd, _events, folded in entries:
            for f in folded.fills:
                subs = self.orders.get(f.account)
                if subs:
                    self._fan(subs, orjson.dumps({"ch": "orders", "type": "fill", **fill_view(f), "ts": ts}))
            for o in folded.orders.values():
                subs = self.orders.get(o.account)
                if subs:
                    self._fan(subs, orjson.dumps({"ch": "orders", "type": "order", "order": order_view(o, []),
                                                  "ts": ts}))

    def _instrument_status(self, entries: list) -> None:
        """A listing, halt, resume or day's close as it happened, with the session it left and the
        reference price and band in force after it: clients learnt of a halt only from a refused
        order, and of a close's new band only by polling (review32)."""
        subs = self.subs[("instruments", "")]
        listings, engine = self.service.core.listings, self.service.core.engine
        for _seq, ts, _cmd, events, _folded in entries:
            for ev in events:
                kind = STATUS_EVENTS.get(ev[0])
                if kind is None or ev[1] not in listings:
                    continue
                rules = listings[ev[1]].rules
                if kind == "close":
                    rules = replace(rules, reference_price=ev[3])
                halted = kind == "halted" or (kind != "resumed" and engine.is_halted(ev[1]))
                self._fan(subs, orjson.dumps({"ch": "instruments", "type": kind, "symbol": ev[1],
                                              **market_status(rules, halted, ts), "ts": ts}))

    def _ticker(self, symbol: str, ts: int) -> bytes:
        return self._ticker_message(symbol, self.market.ticker(symbol, ts), ts)

    @staticmethod
    def _ticker_message(symbol: str, v: dict[str, int | None], ts: int) -> bytes:
        return orjson.dumps({"ch": "ticker", "symbol": symbol,
                             **{k: format_price(v[k]) if v[k] is not None else None
                                for k in ("last", "open", "high", "low", "vwap")},
                             "volume": format_tonnes(v["volume"]), "ts": ts})

    def on_registry(self, kind: str, d: dict[str, Any]) -> None:
        subs = self.subs.get(("registry", ""))
        if not subs:
            return
        body = {"ch": "registry", "type": kind, "id": str(d["id"]), "symbol": d.get("symbol"),
                "quantity": format_tonnes(d["quantity_kg"]), "ts": now_us()}
        if kind == "issuance":
            body["serial"] = d["serial"]
        else:
            body.update(beneficiary=d["beneficiary"], purpose=d["purpose"], certificate_code=d["certificate_code"],
                        serials=d["serials"])
        self._fan(subs, orjson.dumps(body))

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat)
            if self.clients:
                data = orjson.dumps({"ch": "heartbeat", "ts": now_us(),
                                     "seqs": {s: b.seq for s, b in self.market.books.items()}})
                self._fan({c for c in self.clients if not c.binance}, data)

    async def _coalesce(self) -> None:
        """Flush coalesced book views and Binance streams when their interval is due."""
        loop = asyncio.get_running_loop()
        due: dict[int, float] = {}
        while True:
            await asyncio.sleep(0.01)
            now, ts = loop.time(), now_us()
            if len(due) > 2 * (len(self.groups) + len(self.binance)) + 64:  # dropped groups' entries
                alive = {id(g) for g in (*self.groups.values(), *self.binance.values())}
                due = {k: v for k, v in due.items() if k in alive}
            for g in list(self.groups.values()):
                if g.interval_ms and g.clients and now >= due.get(id(g), 0):
                    due[id(g)] = now + g.interval_ms / 1000
                    data = g.update(ts)
                    if data is not None:
                        self._fan(g.clients, data)
            for g in list(self.binance.values()):
                if not g.clients:
                    g.first, g.changes = None, {}
                elif now >= due.get(id(g), 0):
                    due[id(g)] = now + g.interval_ms / 1000
                    self.flush_binance_group(g)

    def flush_binance_group(self, g: BinanceGroup) -> None:
        data = g.flush()
        if data is None:
            return
        wrapped = None  # for /stream's clients, built once per flush when one listens
        for c in g.clients:
            if c.combined:
                if wrapped is None:
                    wrapped = b'{"stream":' + g.name + b',"data":' + data + b"}"
                c.push(wrapped)
            else:
                c.push(data)
        self.deliveries += len(g.clients)

    def flush_binance(self, symbol: str) -> None:
        """Send what the Binance streams of `symbol` hold now, so that a REST depth snapshot taken
        next has lastUpdateId equal to the last event sent, and the next event starts right after."""
        for (s, _), g in self.binance.items():
            if s == symbol and g.clients:
                self.flush_binance_group(g)


