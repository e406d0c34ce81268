"""Public market data kept from durable journal entries: level-2 books, the trade tape, tickers.

:class:`MarketData` listens to the service's committed batches (it never sees an event that is
not durable) and keeps, per instrument, the aggregated book (price -> open quantity per side)
with its sequence number, the recent trades and a 24-hour ticker window. The book sequence is the
core's count of level changes for the instrument (``ExchangeCore.book_seqs``): every level change
advances it by one, so an update that changed k levels covers ``first_seq .. first_seq + k - 1``
and a client that sees ``first_seq != last_seq + 1`` knows it missed something.

Views of the top N levels (:class:`DepthView`) turn a change of the whole book into the change of
what a depth-N subscriber holds: levels that moved inside the top N, levels that entered it with
their whole size, and levels that left it as deletions. All subscribers of one (instrument, N)
share a view, so the diff is computed once however many there are.

Everything here is integers (fen per tonne, kg, UTC microseconds); api/ formats it for the wire.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import islice

from sortedcontainers import SortedDict

from exchange.history import Trade
from matching import events as E
from matching.core import ExchangeCore

TAPE = 1000  # recent trades kept per instrument in memory
WINDOW_US = 86_400_000_000  # the ticker's 24-hour window


class L2Book:
    """One instrument's aggregated book and its sequence number."""

    __slots__ = ("asks", "bids", "seq", "symbol")

    def __init__(self, symbol: str, seq: int = 0) -> None:
        self.symbol = symbol
        self.seq = seq
        self.bids: SortedDict = SortedDict()  # key -price: best bid first
        self.asks: SortedDict = SortedDict()  # key price: best ask first

    def set(self, side: int, price: int, qty: int) -> None:
        book, key = (self.bids, -price) if side == E.BID else (self.asks, price)
        if qty:
            book[key] = qty
        else:
            book.pop(key, None)

    def top(self, side: int, n: int | None) -> list[tuple[int, int]]:
        """The best `n` levels of a side (all with None) as (price, qty), best first."""
        if side == E.BID:
            return [(-k, q) for k, q in islice(self.bids.items(), n)]
        return list(islice(self.asks.items(), n))


@dataclass(slots=True)
class BookUpdate:
    """What one committed entry did to one book: ``changes`` are (side, price, qty now)."""

    symbol: str
    first_seq: int
    seq: int
    ts: int
    changes: list[tuple[int, int, int]]


class DepthView:
    """The top `depth` levels of a book as a subscriber holds them, and their changes."""

    __slots__ = ("book", "depth", "last_seq", "levels")

    def __init__(self, book: L2Book, depth: int) -> None:
        self.book = book
        self.depth = depth
        self.last_seq = book.seq
        self.levels = self._current()

    def _current(self) -> tuple[dict[int, int], dict[int, int]]:
        return dict(self.book.top(E.BID, self.depth)), dict(self.book.top(E.ASK, self.depth))

    def advance(self) -> tuple[int, list[tuple[int, int, int]]]:
        """(first_seq, changes) since the last call, as the subscriber must apply them; the range
        covers every book event since, even those outside the view (so no gap is ever seen)."""
        first = self.last_seq + 1
        self.last_seq = self.book.seq
        new = self._current()
        changes: list[tuple[int, int, int]] = []
        for side in (E.BID, E.ASK):
            old_side, new_side = self.levels[side], new[side]
            for price, qty in new_side.items():
                if old_side.get(price) != qty:
                    changes.append((side, price, qty))
            for price in old_side.keys() - new_side.keys():
                changes.append((side, price, 0))
        self.levels = new
        return first, changes


class Ticker:
    """Last, open, high, low, volume and VWAP over a sliding 24-hour window of trades."""

    __slots__ = ("last", "maxq", "minq", "pq", "qty", "trades")

    def __init__(self) -> None:
        self.trades: deque[tuple[int, int, int]] = deque()  # (ts, price, qty)
        self.maxq: deque[tuple[int, int]] = deque()  # (ts, price), prices decreasing
        self.minq: deque[tuple[int, int]] = deque()  # (ts, price), prices increasing
        self.pq = 0
        self.qty = 0
        self.last: int | None = None

    def add(self, ts: int, price: int, qty: int) -> None:
        self.trades.append((ts, price, qty))
        self.pq += price * qty
        self.qty += qty
        self.last = price
        while self.maxq and self.maxq[-1][1] <= price:
            self.maxq.pop()
        self.maxq.append((ts, price))
        while self.minq and self.minq[-1][1] >= price:
            self.minq.pop()
        self.minq.append((ts, price))

    def slide(self, now: int) -> None:
        start = now - WINDOW_US
        trades = self.trades
        while trades and trades[0][0] <= start:
            _, price, qty = trades.popleft()
            self.pq -= price * qty
            self.qty -= qty
        while self.maxq and self.maxq[0][0] <= start:
            self.maxq.popleft()
        while self.minq and self.minq[0][0] <= start:
            self.minq.popleft()

    def view(self) -> dict[str, int | None]:
        """Integers: prices in fen per tonne (VWAP half-up), volume in kg."""
        if not self.trades:
            return {"last": self.last, "open": None, "high": None, "low": None, "volume": 0, "vwap": None}
        return {"last": self.last, "open": self.trades[0][1], "high": self.maxq[0][1], "low": self.minq[0][1],
                "volume": self.qty, "vwap": (2 * self.pq + self.qty) // (2 * self.qty)}


@dataclass(slots=True)
class Published:
    """What one committed batch changed, for the feed: book updates and trades in order, and the
    instruments whose ticker moved."""

    ts: int
    updates: list[BookUpdate] = field(default_factory=list)
    trades: list[Trade] = field(default_factory=list)
    tickers: set[str] = field(default_factory=set)


class MarketData:
    """Books, tapes and tickers of every instrument, following the committed journal."""

    def __init__(self) -> None:
        self.books: dict[str, L2Book] = {}
        self.tapes: dict[str, deque[Trade]] = {}
        self.tickers: dict[str, Ticker] = {}
        self.views: dict[tuple[str, int], DepthView] = {}
        self.subscribers: list[Callable[[Published], None]] = []
        self.ts = 0

    def load(self, core: ExchangeCore, recent: Iterable[Trade] = ()) -> None:
        """Start from the core's books (the core must be exactly at the durable state) and the
        trades of the last 24 hours, oldest first."""
        for symbol in core.listings:
            book = self.books[symbol] = L2Book(symbol, core.book_seqs.get(symbol, 0))
            engine_book = core.engine.book(symbol)
            for side in (E.BID, E.ASK):
                for price, qty in engine_book.depth(side, 1 << 30):
                    book.set(side, price, qty)
            self.tapes[symbol] = deque(maxlen=TAPE)
            self.tickers[symbol] = Ticker()
        self.ts = core.ts
        for t in recent:
            if t.symbol in self.books:
                self.tapes[t.symbol].append(t)
                self.tickers[t.symbol].add(t.ts, t.price, t.qty)

    def view(self, symbol: str, depth: int) -> DepthView:
        key = (symbol, depth)
        v = self.views.get(key)
        if v is None:
            v = self.views[key] = DepthView(self.books[symbol], depth)
        return v

    def on_commit(self, entries: list) -> None:
        """The service's listener: entries are (seq, ts, command, events, folded)."""
        pub = Published(entries[-1][1] if entries else self.ts)
        books = self.books
        for _seq, ts, _command, events, folded in entries:
            current: BookUpdate | None = None
            for ev in events:
                kind = ev[0]
                if kind == E.EV_LEVEL:
                    _, symbol, side, price, qty = ev
                    book = books[symbol]
                    book.seq += 1
                    book.set(side, price, qty)
                    if current is None or current.symbol != symbol:
                        current = BookUpdate(symbol, book.seq, book.seq, ts, [])
                        pub.updates.append(current)
                    current.seq = book.seq
                    current.changes.append((side, price, qty))
                elif kind == 30:  # listed
                    self.books[ev[1]] = L2Book(ev[1])
                    self.tapes[ev[1]] = deque(maxlen=TAPE)
                    self.tickers[ev[1]] = Ticker()
            for t in folded.trades:
                self.tapes[t.symbol].append(t)
                self.tickers[t.symbol].add(t.ts, t.price, t.qty)
                pub.trades.append(t)
                pub.tickers.add(t.symbol)
            self.ts = ts
        for symbol in pub.tickers:
            self.tickers[symbol].slide(pub.ts)
        for sub in self.subscribers:
            sub(pub)

    def ticker(self, symbol: str, now: int) -> dict[str, int | None]:
        t = self.tickers[symbol]
        t.slide(now)
        return t.view()
