"""Load generator for the carbonx network API, run as a process of its own (so that its CPU is
not the server's): drives one kind of load and prints one JSON object with the results.

    python bench/loadgen.py ws     --ws ws://127.0.0.1:8701 --http http://127.0.0.1:8700 --key KEY --orders 20000
    python bench/loadgen.py rest   --ws ... --http ... --key KEY --orders 5000 --connections 16
    python bench/loadgen.py fanout --ws ... --http ... --key KEY --subscribers 1000 --duration 10 --rate 1000

Modes:

- ``ws``: one websocket connection, ``auth`` with the key, then ``order.place`` messages pipelined
  (up to ``--window`` unanswered at a time; the answers are matched to the requests by ``id``).
  Each answer (``{"type":"result"}``) comes after the order is durable. Latency is answer time
  minus send time. With ``--side sell --cross-fraction 0`` it also seeds resting liquidity.
- ``rest``: ``POST /v1/orders`` from ``--connections`` concurrent HTTP/1.1 keep-alive connections
  (a minimal HTTP/1.1 client per connection, one worker each; httpx cost more CPU than the server).
- ``fanout``: ``--subscribers`` websocket connections subscribe to the book (depth 10) and trades
  of the symbol; then one more connection places orders open loop at ``--rate`` orders/s for
  ``--duration`` seconds. Counted: book updates and trades received by the subscribers
  (deliveries), sequence gaps (``first_seq != last seq + 1``; trade ids not contiguous), errors
  and closes. Delay is receipt time minus the message's ``ts`` (server clock, microseconds; the
  same machine's clock here).

The ``ws`` connection and the fan-out's subscribers use a minimal websocket client (an asyncio
Protocol parsing frames, ``RawWebsocket``): the websockets library's client cost several times the
CPU per message, and the load generator shares the machine's two cores with the server it measures.

The order flow (seeded, the same every run): a fraction ``--cross-fraction`` of the orders are
limit orders at ``--cross-price`` (they trade against resting liquidity on the other side when
there is some), the rest rest at a random tick between ``--rest-low`` and ``--rest-high``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import math
import os
import random
import resource
import struct
import sys
import time
from collections import Counter
from typing import Any
from urllib.parse import urlsplit

import orjson
from websockets.asyncio.client import connect


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return None
    k = max(0, min(len(sorted_values) - 1, math.ceil(q / 100 * len(sorted_values)) - 1))
    return sorted_values[k]


def latency_summary(seconds: list[float]) -> dict[str, float | None]:
    ms = sorted(x * 1e3 for x in seconds)

    def r(x: float | None) -> float | None:
        return None if x is None else round(x, 3)
    return {"p50_ms": r(percentile(ms, 50)), "p90_ms": r(percentile(ms, 90)), "p99_ms": r(percentile(ms, 99)),
            "max_ms": r(ms[-1] if ms else None)}


class Flow:
    """The seeded order requests (REST body shape; the websocket adds op and id)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.rng = random.Random(args.seed)
        self.args = args
        lo, hi = round(float(args.rest_low) * 100), round(float(args.rest_high) * 100)
        self.ticks = (lo, hi)

    def order(self) -> dict[str, Any]:
        a, rng = self.args, self.rng
        if rng.random() < a.cross_fraction:
            price = a.cross_price
        else:
            fen = rng.randint(*self.ticks)
            price = f"{fen // 100}.{fen % 100:02d}"
        return {"symbol": a.symbol, "side": a.side, "type": "limit", "price": price, "quantity": a.quantity}


def tally(order: dict[str, Any], statuses: Counter, counts: Counter) -> None:
    statuses[order.get("status")] += 1
    if order.get("fills"):
        counts["orders_with_fills"] += 1
        counts["fills"] += len(order["fills"])


# ------------------------------------------------------------------------------------------------
# a minimal websocket client
# ------------------------------------------------------------------------------------------------
def masked_frame(payload: bytes, opcode: int = 1) -> bytes:
    """One final client frame: a client masks what it sends (RFC 6455 5.3), with a fresh key."""
    mask = os.urandom(4)
    n = len(payload)
    head = bytes([0x80 | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack(">H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack(">Q", n)
    # XOR as one big integer: a byte at a time costs about 50 ns a byte in Python.
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
    return head + mask + (int.from_bytes(payload, "big") ^ key).to_bytes(n, "big")


def ws_address(base: str, path: str) -> tuple[str, int, str]:
    """Host, port and request path of `path` under the feed's base URL (plain ws:// only: the
    minimal client speaks no TLS)."""
    url = urlsplit(base)
    if url.scheme != "ws" or not url.hostname:
        raise SystemExit(f"--ws must be a ws://host:port URL, got {base!r}")
    return url.hostname, url.port or 80, url.path.rstrip("/") + path


class RawWebsocket(asyncio.Protocol):
    """A minimal websocket client: the upgrade, then unmasked server frames parsed in place (text,
    ping answered with pong, close). Subclasses say what to send once open (`opened`), what a
    message means (`message`), and what to do after each read (`received`). The websockets
    library's client costs several times the CPU per message, and the load generator shares the
    machine with the server it measures."""

    def __init__(self, host: str, path: str) -> None:
        self.host, self.path = host, path
        self.buf = bytearray()
        self.upgraded = False
        self.fragments = bytearray()
        self.transport: asyncio.Transport | None = None
        self.now = 0.0  # perf_counter at the read being parsed

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        key = base64.b64encode(os.urandom(16)).decode()
        self.transport.write(
            f"GET {self.path} HTTP/1.1\r\nHost: {self.host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())

    def send_frame(self, payload: bytes, opcode: int = 1) -> None:
        self.transport.write(masked_frame(payload, opcode))

    def opened(self) -> None:
        """The upgrade succeeded."""

    def received(self) -> None:
        """Every complete message of one read has been handled."""

    def message(self, payload: bytes) -> None:
        raise NotImplementedError

    def fail(self, why: str) -> None:
        raise NotImplementedError

    def closed(self, code: int | str) -> None:
        """The server sent a close frame."""

    def data_received(self, data: bytes) -> None:
        self.now = time.perf_counter()
        buf = self.buf
        buf += data
        pos = 0
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            if not buf.startswith(b"HTTP/1.1 101"):
                self.fail(f"upgrade refused: {bytes(buf[:60])!r}")
                return
            self.upgraded = True
            pos = end + 4
            self.opened()
        size = len(buf)
        while size - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            n = b1 & 0x7F
            off = pos + 2
            if n == 126:
                if size - pos < 4:
                    break
                n = struct.unpack_from(">H", buf, off)[0]
                off += 2
            elif n == 127:
                if size - pos < 10:
                    break
                n = struct.unpack_from(">Q", buf, off)[0]
                off += 8
            if size - off < n:
                break
            payload = bytes(buf[off:off + n])
            pos = off + n
            opcode = b0 & 0x0F
            if not b0 & 0x80:  # a fragment: keep until the final frame
                self.fragments += payload
                continue
            if opcode == 0:
                payload, self.fragments = bytes(self.fragments + payload), bytearray()
                opcode = 1
            if opcode in (1, 2):
                self.message(payload)
            elif opcode == 9:
                self.send_frame(payload, 10)
            elif opcode == 8:
                self.transport.write(masked_frame(payload[:2], 8))  # the closing handshake's answer
                self.closed(struct.unpack_from(">H", payload)[0] if len(payload) >= 2 else "")
        del buf[:pos]
        self.received()


# ------------------------------------------------------------------------------------------------
# ws: pipelined order entry over one websocket
# ------------------------------------------------------------------------------------------------
class OrderEntry:
    """The ``ws`` mode's connection: ``auth``, then the pre-built ``order.place`` frames, up to
    ``window`` unanswered, each further one sent as an answer frees its place. Answers that arrive
    together free their places together, and the frames those places admit go in one write."""

    def __init__(self, frames: list[bytes], window: int) -> None:
        self.frames, self.window = frames, window
        n = len(frames)
        self.sent = [0.0] * n
        self.latency = [0.0] * n
        self.next = self.in_flight = 0
        self.left = n
        self.statuses: Counter = Counter()
        self.counts: Counter = Counter()
        self.errors: Counter = Counter()
        self.done = asyncio.get_running_loop().create_future()
        self.t0 = 0.0

    def authed(self, ws: RawWebsocket) -> None:
        self.t0 = time.perf_counter()
        self.pump(ws)

    def answer(self, msg: dict[str, Any], now: float) -> None:
        kind = msg.get("type")
        if kind == "result":
            tally(msg["order"], self.statuses, self.counts)
        elif kind == "error" and isinstance(msg.get("id"), int):
            self.errors[msg.get("code")] += 1
        else:
            return  # heartbeats
        i = msg["id"]
        self.latency[i] = now - self.sent[i]
        self.in_flight -= 1
        self.left -= 1
        if not self.left and not self.done.done():
            self.done.set_result(time.perf_counter())

    def pump(self, ws: RawWebsocket) -> None:
        k = min(self.window - self.in_flight, len(self.frames) - self.next)
        if k <= 0:
            return
        start, now = self.next, time.perf_counter()
        sent = self.sent
        for i in range(start, start + k):
            sent[i] = now
        ws.transport.write(b"".join(self.frames[start:start + k]))
        self.next += k
        self.in_flight += k


class OrderConnection(RawWebsocket):
    """A RawWebsocket that authenticates and then feeds an OrderEntry."""

    def __init__(self, host: str, path: str, key: str, entry: OrderEntry) -> None:
        super().__init__(host, path)
        self.key, self.entry = key, entry
        self.is_authed = False

    def opened(self) -> None:
        self.send_frame(orjson.dumps({"op": "auth", "id": "auth", "api_key": self.key}))

    def received(self) -> None:
        if self.is_authed:
            self.entry.pump(self)

    def message(self, payload: bytes) -> None:
        msg = orjson.loads(payload)
        if self.is_authed:
            self.entry.answer(msg, self.now)
        elif msg.get("id") == "auth":
            if msg.get("type") != "ack":
                self.fail(f"auth refused: {msg}")
                return
            self.is_authed = True
            self.entry.authed(self)

    def fail(self, why: str) -> None:
        if not self.entry.done.done():
            self.entry.done.set_exception(ConnectionError(why))
        self.transport.close()

    def closed(self, code: int | str) -> None:
        self.fail(f"the server closed the connection ({code})")

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.entry.done.done():
            self.entry.done.set_exception(ConnectionError(f"connection lost: {exc}"))


async def ws_orders(args: argparse.Namespace) -> dict[str, Any]:
    flow = Flow(args)
    n = args.orders
    # Built before the clock starts, as a client that has its orders ready would.
    frames = [masked_frame(orjson.dumps({"op": "order.place", "id": i, **flow.order()})) for i in range(n)]
    host, port, path = ws_address(args.ws, "/v1/ws")
    entry = OrderEntry(frames, args.window)
    transport, _ = await asyncio.get_running_loop().create_connection(
        lambda: OrderConnection(f"{host}:{port}", path, args.key, entry), host, port)
    try:
        end = await asyncio.wait_for(entry.done, args.timeout)
    finally:
        transport.close()
    elapsed = end - entry.t0
    return {"mode": "ws", "orders": n, "window": args.window, "seconds": round(elapsed, 3),
            "orders_per_s": round(n / elapsed), **latency_summary(entry.latency), "statuses": dict(entry.statuses),
            "errors": dict(entry.errors), **entry.counts}


# ------------------------------------------------------------------------------------------------
# rest: POST /v1/orders over a pool of keep-alive connections
# ------------------------------------------------------------------------------------------------
class KeepAlive:
    """One HTTP/1.1 keep-alive connection that sends a request and reads its answer, nothing more:
    httpx spends some 1.3 ms of client CPU per request, which made the load generator, not the
    server, the bottleneck. Responses must carry Content-Length (uvicorn's JSON answers do)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, key: str) -> None:
        self.reader, self.writer = reader, writer
        self.head = (f"Host: {host}\r\nAuthorization: Bearer {key}\r\n"
                     "Content-Type: application/json\r\nConnection: keep-alive\r\n").encode()

    @classmethod
    async def open(cls, url: str, key: str) -> KeepAlive:
        u = urlsplit(url)
        reader, writer = await asyncio.open_connection(u.hostname, u.port)
        return cls(reader, writer, u.netloc, key)

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        self.writer.write(b"%s %s HTTP/1.1\r\n%sContent-Length: %d\r\n\r\n%s"
                          % (method.encode(), path.encode(), self.head, len(body), body))
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
                break
        else:
            raise RuntimeError(f"no Content-Length in {head!r}")
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


async def rest_orders(args: argparse.Namespace) -> dict[str, Any]:
    flow = Flow(args)
    n = args.orders
    bodies = [orjson.dumps(flow.order()) for _ in range(n)]
    latency: list[float] = []
    codes: Counter = Counter()
    statuses: Counter = Counter()
    counts: Counter = Counter()
    errors: Counter = Counter()
    clock = time.perf_counter
    it = iter(bodies)
    # Connections opened and used once before the clock starts.
    conns = [await KeepAlive.open(args.http, args.key) for _ in range(args.connections)]
    for c in conns:
        status, _ = await c.request("GET", "/v1/health")
        assert status == 200, status

    async def worker(c: KeepAlive) -> None:
        for body in it:
            t = clock()
            status, answer = await c.request("POST", "/v1/orders", body)
            latency.append(clock() - t)
            codes[status] += 1
            if status == 201:
                tally(orjson.loads(answer), statuses, counts)
            else:
                errors[orjson.loads(answer).get("code")] += 1

    t0 = clock()
    try:
        await asyncio.wait_for(asyncio.gather(*(worker(c) for c in conns)), args.timeout)
    finally:
        elapsed = clock() - t0
        for c in conns:
            c.close()
    return {"mode": "rest", "orders": n, "connections": args.connections, "seconds": round(elapsed, 3),
            "orders_per_s": round(n / elapsed), **latency_summary(latency),
            "http_status": {str(k): v for k, v in codes.items()},
            "statuses": dict(statuses), "errors": dict(errors), **counts}


# ------------------------------------------------------------------------------------------------
# fanout: many subscribers of one book and its trades
# ------------------------------------------------------------------------------------------------
class FanStats:
    def __init__(self) -> None:
        self.delays: list[int] = []  # microseconds, receipt - ts
        self.book = self.trades = self.heartbeats = 0
        self.gaps = self.trade_gaps = 0
        self.errors: Counter = Counter()
        self.closed = 0
        self.first_at: float | None = None
        self.last_at = 0.0
        self.counting = False


class Subscriber(RawWebsocket):
    """A fan-out subscriber: one subscribe message, then book updates and trades counted."""

    def __init__(self, host: str, path: str, subscribe: bytes, stats: FanStats) -> None:
        super().__init__(host, path)
        self.subscribe, self.stats = subscribe, stats
        self.ready = asyncio.get_running_loop().create_future()  # acked and snapshot seen
        self.acked = False
        self.last_seq: int | None = None
        self.last_trade: int | None = None

    def opened(self) -> None:
        self.send_frame(self.subscribe)

    def closed(self, code: int | str) -> None:
        self.stats.errors[f"close:{code}"] += 1

    def message(self, payload: bytes) -> None:
        now = time.time_ns() // 1000
        st = self.stats
        msg = orjson.loads(payload)
        ch = msg.get("ch")
        if ch == "book":
            if msg["type"] == "snapshot":
                self.last_seq = msg["seq"]
                if self.acked and not self.ready.done():
                    self.ready.set_result(None)
                return
            if self.last_seq is not None and msg["first_seq"] != self.last_seq + 1:
                st.gaps += 1
            self.last_seq = msg["seq"]
            st.book += 1
        elif ch == "trades":
            tid = int(msg["trade_id"])
            if self.last_trade is not None and tid != self.last_trade + 1:
                st.trade_gaps += 1
            self.last_trade = tid
            st.trades += 1
        elif ch == "heartbeat":
            st.heartbeats += 1
            return
        elif msg.get("type") == "ack":
            self.acked = True
            return
        else:
            st.errors[str(msg.get("code") or msg.get("type"))] += 1
            return
        if st.counting:
            st.delays.append(now - msg["ts"])
            t = time.perf_counter()
            if st.first_at is None:
                st.first_at = t
            st.last_at = t

    def fail(self, why: str) -> None:
        self.stats.errors[why] += 1
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(why))
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.stats.closed += 1
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"closed before the snapshot: {exc}"))


async def auth(ws: Any, key: str) -> None:
    """Authenticate the fan-out's order connection (the websockets library: it sends 100 orders/s)."""
    await ws.send(orjson.dumps({"op": "auth", "id": "auth", "api_key": key}).decode())
    while True:
        msg = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
        if msg.get("id") == "auth":
            if msg.get("type") != "ack":
                raise SystemExit(f"auth refused: {msg}")
            return


async def fanout(args: argparse.Namespace) -> dict[str, Any]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < args.subscribers + 100:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, args.subscribers + 1000), hard))
    loop = asyncio.get_running_loop()
    host, port, path = ws_address(args.ws, "/v1/ws")
    subscribe = orjson.dumps({"op": "subscribe", "id": 1, "channels": [
        {"name": "book", "symbols": [args.symbol], "depth": 10}, {"name": "trades", "symbols": [args.symbol]}]})
    stats = FanStats()
    subs: list[Subscriber] = []
    t_connect = time.perf_counter()
    for k in range(0, args.subscribers, 100):  # in steps, not to overflow the listen backlog
        batch = [loop.create_connection(lambda: Subscriber(f"{host}:{port}", path, subscribe, stats), host, port)
                 for _ in range(min(100, args.subscribers - k))]
        for _transport, proto in await asyncio.gather(*batch):
            subs.append(proto)
    await asyncio.wait_for(asyncio.gather(*(s.ready for s in subs)), 60)
    connect_s = time.perf_counter() - t_connect

    flow = Flow(args)
    n = int(args.rate * args.duration)
    statuses: Counter = Counter()
    counts: Counter = Counter()
    errors: Counter = Counter()
    late: list[float] = []
    async with connect(f"{args.ws}/v1/ws", max_size=None, compression=None, max_queue=None) as ws:
        await auth(ws, args.key)
        left = [n]
        done = loop.create_future()

        async def receiver() -> None:
            async for raw in ws:
                msg = orjson.loads(raw)
                if msg.get("type") == "result":
                    tally(msg["order"], statuses, counts)
                elif msg.get("type") == "error" and isinstance(msg.get("id"), int):
                    errors[msg.get("code")] += 1
                else:
                    continue
                left[0] -= 1
                if not left[0]:
                    done.set_result(None)
                    return

        reader = asyncio.create_task(receiver())
        stats.counting = True
        clock = time.perf_counter
        t0 = clock() + 0.01
        i = 0
        while i < n:  # open loop: order i goes at t0 + i / rate, whatever happened before
            now = clock()
            while i < n and t0 + i / args.rate <= now:
                late.append(now - (t0 + i / args.rate))
                await ws.send(orjson.dumps({"op": "order.place", "id": i, **flow.order()}).decode())
                i += 1
            await asyncio.sleep(max(0.0, t0 + i / args.rate - clock()))
        sent_s = clock() - t0
        await asyncio.wait_for(done, args.timeout)
        reader.cancel()
    await asyncio.sleep(args.drain)  # the last batches reach the subscribers
    stats.counting = False
    closed_early = stats.closed
    for s in subs:
        s.transport.close()
    delays = sorted(stats.delays)
    span = (stats.last_at - t0) if stats.first_at is not None else float("nan")
    deliveries = stats.book + stats.trades
    ms = [d / 1000 for d in delays]
    late_ms = sorted(x * 1e3 for x in late)
    return {"mode": "fanout", "subscribers": args.subscribers, "orders": n, "offered_per_s": args.rate,
            "send_seconds": round(sent_s, 3), "connect_seconds": round(connect_s, 3),
            "deliveries": deliveries, "book_updates": stats.book, "trade_messages": stats.trades,
            "seconds": round(span, 3), "deliveries_per_s": round(deliveries / span) if span == span else None,
            "delay_p50_ms": percentile(ms, 50), "delay_p99_ms": percentile(ms, 99),
            "delay_max_ms": ms[-1] if ms else None, "sender_late_p99_ms": percentile(late_ms, 99),
            "gaps": stats.gaps, "trade_gaps": stats.trade_gaps, "subscriber_errors": dict(stats.errors),
            "subscribers_closed_early": closed_early, "statuses": dict(statuses), "errors": dict(errors),
            **counts}


def positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("mode", choices=["ws", "rest", "fanout"])
    p.add_argument("--ws", required=True, help="feed base URL, e.g. ws://127.0.0.1:8701")
    p.add_argument("--http", required=True, help="REST base URL, e.g. http://127.0.0.1:8700")
    p.add_argument("--key", required=True, help="a member's API key (places the orders)")
    p.add_argument("--symbol", default="FOREST-2023")
    p.add_argument("--orders", type=int, default=10_000, help="ws, rest: orders to place")
    p.add_argument("--window", type=positive, default=2_000, help="ws: most unanswered orders at a time")
    p.add_argument("--connections", type=int, default=16, help="rest: concurrent keep-alive connections")
    p.add_argument("--subscribers", type=int, default=1_000, help="fanout: subscriber connections")
    p.add_argument("--duration", type=float, default=5.0, help="fanout: seconds of order flow")
    p.add_argument("--rate", type=float, default=1_000.0, help="fanout: orders/s offered (open loop)")
    p.add_argument("--drain", type=float, default=1.0, help="fanout: seconds to wait for the last messages")
    p.add_argument("--side", choices=["buy", "sell"], default="buy")
    p.add_argument("--cross-fraction", type=float, default=0.5, help="share of orders at --cross-price")
    p.add_argument("--cross-price", default="35.50")
    p.add_argument("--rest-low", default="32.00")
    p.add_argument("--rest-high", default="34.99")
    p.add_argument("--quantity", default="1.000")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--timeout", type=float, default=600.0)
    args = p.parse_args(argv)
    fn = {"ws": ws_orders, "rest": rest_orders, "fanout": fanout}[args.mode]
    result = asyncio.run(fn(args))
    use = resource.getrusage(resource.RUSAGE_SELF)
    result["loadgen_cpu_s"] = round(use.ru_utime + use.ru_stime, 2)  # is the client the bottleneck?
    with open("/proc/self/schedstat") as f:
        result["loadgen_ran_s"], result["loadgen_waited_s"] = (round(int(x) / 1e9, 3) for x in f.read().split()[:2])
    sys.stdout.write(orjson.dumps(result).decode() + "\n")


if __name__ == "__main__":
    main()
