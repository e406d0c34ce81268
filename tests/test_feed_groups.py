"""The feed keeps a depth view only while someone watches it: subscribing to many (depth,
interval) variants and leaving — by unsubscribing, resubscribing elsewhere or disconnecting —
leaves no view behind, and a view asked for again starts from the book as it is."""

from __future__ import annotations

import orjson
import pytest
from websockets.sync.client import connect

from tests.api_helpers import SYMBOL, ServerThread, build_world, client, ok, operator_key


def _ask(ws, msg: dict, snapshot: bool = False) -> dict:
    """Send `msg`; its answer (or, with `snapshot`, the book snapshot it brings)."""
    ws.send(orjson.dumps(msg).decode())
    while True:
        got = orjson.loads(ws.recv(timeout=10))
        if snapshot and got.get("ch") == "book" and got.get("type") == "snapshot":
            return got
        if not snapshot and got.get("id") == msg["id"]:
            assert got.get("type") != "error", got
            return got


def test_depth_views_are_dropped_when_nobody_watches(db, run):
    key = run(operator_key(db))
    with ServerThread(db) as server:
        w = build_world(server.http, key)
        feed = server.exchange.feed
        url = f"{server.ws}/v1/ws"
        with connect(url) as a, connect(url) as b:
            for depth in range(1, 41):  # one client walks through 40 views
                _ask(a, {"op": "subscribe", "id": depth, "channels": [{"name": "book", "symbols": [SYMBOL],
                                                                        "depth": depth}]})
            _ask(b, {"op": "subscribe", "id": 1, "channels": [{"name": "book", "symbols": [SYMBOL], "depth": 5,
                                                                "interval_ms": 100}]})
            views = lambda: set(server.call(_groups(feed)))  # noqa: E731
            assert views() == {(SYMBOL, 40, 0), (SYMBOL, 5, 100)}
            _ask(a, {"op": "unsubscribe", "id": 99, "channels": [{"name": "book", "symbols": [SYMBOL]}]})
            assert views() == {(SYMBOL, 5, 100)}
        # b disconnected: nothing is left
        for _ in range(200):
            if not server.call(_groups(feed)):
                break
            run(_sleep(0.02))
        assert server.call(_groups(feed)) == []
        # a view asked for again starts from the book as it is now
        with client(server.http, w.keys["DEV"]) as dev:
            ok(dev.post("/v1/orders", json={"symbol": SYMBOL, "side": "sell", "price": "36.00",
                                            "quantity": "2.000"}), 201)
        with connect(url) as c:
            snap = _ask(c, {"op": "subscribe", "id": 1, "channels": [{"name": "book", "symbols": [SYMBOL],
                                                                       "depth": 5}]}, snapshot=True)
            assert snap["asks"] == [["36.00", "2.000"]], snap


async def _groups(feed) -> list:
    return list(feed.groups)


async def _sleep(s: float) -> None:
    import asyncio
    await asyncio.sleep(s)


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_text_frames_are_the_librarys(size):
    """The feed frames its messages itself (api/feed.py text_frame): byte for byte what the
    websockets library would send, at each of the three length encodings' edges."""
    from websockets.frames import Frame, Opcode

    from api.feed import text_frame
    data = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    assert text_frame(data) == Frame(Opcode.TEXT, data).serialize(mask=False)
