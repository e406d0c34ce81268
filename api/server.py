"""One process: the exchange service, clearing, the REST API and the websocket feed together.

:class:`Exchange` starts them in order (database, service with recovery, market data from the
recovered core, REST on uvicorn, the feed on its own port) and stops them in reverse, telling
websocket clients ``server_shutdown`` first. Tests and `carbonx serve` both use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Any

import uvicorn

from api.auth import Gate, Limits
from api.fastpath import FastOrders
from api.feed import Feed
from api.orders import Trading
from api.rest import Context, Guard, create_app, problem_response
from exchange import certificates, gcpolicy
from exchange.history import Trade, trade_from_row
from exchange.marketdata import TAPE, WINDOW_US, MarketData
from exchange.service import ExchangeService, now_us

log = logging.getLogger("carbonx.server")


class _Uvicorn(uvicorn.Server):
    """uvicorn inside our own event loop; the caller handles signals."""

    @contextlib.contextmanager
    def capture_signals(self):  # type: ignore[override]
        yield


def _renderers() -> dict[str, Any]:
    """Certificate renderers: (retirement record, public base URL) -> bytes or text."""
    return {
        "html": lambda data, base: certificates.render_certificate_html(
            data, certificates.verification_url(base, data["certificate_code"])),
        "pdf": lambda data, base: certificates.render_certificate_pdf(
            data, certificates.verification_url(base, data["certificate_code"])),
    }


# Per instrument, the trades the tape keeps (the last TAPE, however old: the trade history must
# not vanish with a restart) and those the ticker's 24 h window needs (maybe more than TAPE).
_RECENT_TRADES = """
    SELECT t.* FROM unnest($1::text[]) AS s(symbol), LATERAL (
        (SELECT symbol, trade_id, price_fen, qty_kg, taker_side, ts, seq FROM trades
         WHERE symbol = s.symbol ORDER BY trade_id DESC LIMIT $2)
        UNION
        (SELECT symbol, trade_id, price_fen, qty_kg, taker_side, ts, seq FROM trades
         WHERE symbol = s.symbol AND ts > $3)) AS t
    ORDER BY t.seq, t.trade_id"""


async def _recent_trades(service: ExchangeService, symbols: list[str]) -> list[Trade]:
    """The trades market data starts from, oldest first."""
    rows = await service.pool.fetch(_RECENT_TRADES, symbols, TAPE, now_us() - WINDOW_US)
    return [trade_from_row(r) for r in rows]


def _listening(host: str, port: int) -> socket.socket:
    """A socket bound to `host`:`port` (0: a free port) for a server to accept on.

    Made as the event loop makes its own (getaddrinfo's protocol, IPPROTO_TCP): asyncio sets
    TCP_NODELAY only on connections whose socket says TCP, and socket.create_server's say 0. REST
    then answered in 48 ms instead of 3 (Nagle's wait for the client's delayed ACK)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(socket.SOMAXCONN)
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


class Exchange:
    """The whole exchange on loopback (or `host`) ports; 0 picks free ports."""

    def __init__(self, dsn: str, *, host: str = "127.0.0.1", http_port: int = 8700, ws_port: int = 8701,
                 limits: Limits | None = None, max_buffer: int = 4 << 20, heartbeat: float = 1.0,
                 service_options: dict[str, Any] | None = None, fast_orders: bool = True,
                 gc_policy: bool = True, public_url: str = "") -> None:
        self.dsn = dsn
        self.public_url = public_url  # certificates' links; empty: each request's own address
        self.host = host
        self.http_port = http_port
        self.ws_port = ws_port
        self.limits = limits or Limits()
        self.max_buffer = max_buffer
        self.heartbeat = heartbeat
        self.gc_policy = gc_policy  # exchange/gcpolicy.py, process-wide
        self._gc_before: tuple[int, int, int] | None = None  # the thresholds to restore on stop
        self.fast_orders = fast_orders  # POST /v1/orders below FastAPI (api/fastpath.py)
        self.orders_path: FastOrders | None = None
        # The journal consumers get a process of their own: this loop serves orders and the feed.
        self.service = ExchangeService(dsn, **{"consumers": "process", **(service_options or {})})
        self.market = MarketData()
        self.feed: Feed | None = None
        self._http: _Uvicorn | None = None
        self._http_task: asyncio.Task | None = None
        self._sockets: list[socket.socket] = []  # bound before the service starts, until served

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.ws_port}"

    async def start(self) -> None:
        """Take both ports, then start the service, the feed and HTTP; a start that fails
        part-way stops what it had started (a port already taken used to leave the exchange
        serving the feed). A port taken is found before the service starts: its recovery
        journals (outside changes, a snapshot) and the consumers' process are for a start that
        can serve (review27)."""
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise
        finally:
            for sock in self._sockets:
                sock.close()  # taken, but no server came to listen on it
            self._sockets = []

    async def _start(self) -> None:
        http_sock = _listening(self.host, self.http_port)
        self._sockets.append(http_sock)
        ws_sock = _listening(self.host, self.ws_port)
        self._sockets.append(ws_sock)
        service = self.service
        await service.start()
        self.market.load(service.core, await _recent_trades(service, list(service.core.listings)))
        service.listeners.append(self.market.on_commit)
        gate = Gate(service.pool, self.limits)
        trading = Trading(service)
        self.feed = Feed(service, self.market, gate, trading, max_buffer=self.max_buffer, heartbeat=self.heartbeat)
        await self.feed.start(sock=ws_sock)
        self._sockets.remove(ws_sock)  # the feed's now: it closes it when it stops
        self.ws_port = self.feed.port
        ctx = Context(service, self.market, gate, trading, renderers=_renderers(), feed=self.feed)
        app = create_app(ctx)
        if self.fast_orders:
            app = self.orders_path = FastOrders(app, gate, trading, problem_response)
        app = Guard(app, gate)
        # proxy_headers=False: uvicorn otherwise believes X-Forwarded-For from loopback peers, and
        # any client through a local tunnel or TCP proxy named a new address per request, past
        # the per-address rate limit (review16); the feed counts the real peer too.
        config = uvicorn.Config(app, host=self.host, port=self.http_port, log_level="warning", lifespan="off",
                                proxy_headers=False,
                                access_log=False, loop="none", timeout_graceful_shutdown=5)
        self._http = _Uvicorn(config)
        self._http_task = asyncio.create_task(self._serve_http(http_sock), name="carbonx-http")
        while not self._http.started:
            if self._http_task.done():
                await self._http_task  # raises why it could not start
                raise OSError(f"the HTTP server could not listen on {self.host}:{self.http_port}")
            await asyncio.sleep(0.01)
        self._sockets.remove(http_sock)
        self.http_port = self._http.servers[0].sockets[0].getsockname()[1]
        ctx.public_url = self.public_url
        if self.gc_policy:
            self._gc_before = gcpolicy.apply()  # the recovered core and loaded views are start-up's: freeze

    async def _serve_http(self, sock: socket.socket) -> None:
        # uvicorn logs why it cannot listen and calls sys.exit: raised in a task, that would end
        # the whole event loop, so it becomes the error it stands for.
        try:
            await self._http.serve(sockets=[sock])
        except SystemExit as e:
            raise OSError(f"the HTTP server could not listen on {self.host}:{self.http_port}") from e

    async def stop(self) -> None:
        try:
            if self.feed is not None:
                await self.feed.stop()
            if self._http is not None:
                self._http.should_exit = True
                if self._http_task is not None:
                    await asyncio.gather(self._http_task, return_exceptions=True)
            await self.service.stop()
        finally:
            if self._gc_before is not None:
                gcpolicy.undo(self._gc_before)
                self._gc_before = None

    async def __aenter__(self) -> Exchange:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
