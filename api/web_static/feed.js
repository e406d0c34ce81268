// The websocket feed (API.md): one connection, resubscribed after a reconnect, and a local order
// book kept exactly as the contract says — a snapshot, then updates applied only when
// first_seq == last seq + 1, each checked against the server's checksum; a gap or a checksum that
// does not match asks for a fresh snapshot ({"op":"resync"}) instead of showing a wrong book.

const CRC_TABLE = (() => {
  const table = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    table[n] = c >>> 0;
  }
  return table;
})();

/** zlib.crc32 of a string's UTF-8 bytes, as an unsigned 32-bit integer. */
export function crc32(text) {
  const bytes = new TextEncoder().encode(text);
  let c = 0xffffffff;
  for (const b of bytes) c = CRC_TABLE[(c ^ b) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

/** One instrument's book as the feed describes it: price string -> quantity string per side. */
export class Book {
  constructor(symbol) {
    this.symbol = symbol;
    this.bids = new Map();
    this.asks = new Map();
    this.seq = null; // null until a snapshot arrived (or while a resync is awaited)
  }

  snapshot(msg) {
    this.bids = new Map(msg.bids);
    this.asks = new Map(msg.asks);
    this.seq = msg.seq;
    return this.checksum() === msg.checksum;
  }

  /** 'applied', 'stale' (already covered), or 'gap' / 'checksum' (the caller must resync). */
  update(msg) {
    if (this.seq === null) return 'stale'; // waiting for a snapshot: it will cover this
    if (msg.seq <= this.seq) return 'stale';
    if (msg.first_seq !== this.seq + 1) return 'gap';
    for (const [side, levels] of [[this.bids, msg.bids], [this.asks, msg.asks]]) {
      for (const [price, qty] of levels) {
        if (Number(qty) === 0) side.delete(price);
        else side.set(price, qty);
      }
    }
    this.seq = msg.seq;
    return this.checksum() === msg.checksum ? 'applied' : 'checksum';
  }

  sorted(side, n = Infinity) {
    const m = side === 'bid' ? this.bids : this.asks;
    const levels = [...m.entries()].sort((a, b) => (side === 'bid' ? Number(b[0]) - Number(a[0]) : Number(a[0]) - Number(b[0])));
    return levels.slice(0, n);
  }

  checksum() {
    const parts = [...this.sorted('ask', 10), ...this.sorted('bid', 10)].map(([p, q]) => `${p}:${q}`);
    return crc32(parts.join(':'));
  }
}

/**
 * The feed connection. `handlers`: {status(state), book(book, changed), trade(msg), ticker(msg),
 * heartbeat(msg)}. Subscriptions are per symbol (book at `depth`, trades, ticker).
 */
export class Feed {
  constructor(url, handlers, depth = 10) {
    this.url = url;
    this.handlers = handlers;
    this.depth = depth;
    this.symbols = new Set();
    this.books = new Map();
    this.lag = new Map(); // symbol -> heartbeats in a row that saw the book ahead of us
    this.nextId = 1;
    this.ws = null;
    this.retry = 500;
    this.stopped = false;
    this.resyncs = 0;
  }

  start() {
    this.stopped = false;
    this.connect();
  }

  connect() {
    this.handlers.status?.('connecting');
    const ws = new WebSocket(this.url);
    this.ws = ws;
    ws.onopen = () => {
      this.retry = 500;
      this.handlers.status?.('live');
      for (const s of this.symbols) this.send('subscribe', s);
    };
    ws.onmessage = (ev) => this.message(JSON.parse(ev.data));
    ws.onclose = () => {
      if (this.ws !== ws) return;
      this.ws = null;
      for (const b of this.books.values()) b.seq = null;
      this.handlers.status?.('offline');
      if (!this.stopped) {
        setTimeout(() => this.connect(), this.retry);
        this.retry = Math.min(this.retry * 2, 8000);
      }
    };
  }

  channels(symbol) {
    return [{ name: 'book', symbols: [symbol], depth: this.depth },
      { name: 'trades', symbols: [symbol] }, { name: 'ticker', symbols: [symbol] }];
  }

  send(op, symbol) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) {
      this.ws.send(JSON.stringify({ op, id: this.nextId++, channels: this.channels(symbol) }));
    }
  }

  watch(symbol) {
    if (this.symbols.has(symbol)) return this.books.get(symbol);
    this.symbols.add(symbol);
    const book = new Book(symbol);
    this.books.set(symbol, book);
    this.send('subscribe', symbol);
    return book;
  }

  unwatch(symbol) {
    if (!this.symbols.delete(symbol)) return;
    this.books.delete(symbol);
    this.send('unsubscribe', symbol);
  }

  resync(book) {
    book.seq = null;
    this.resyncs += 1;
    this.handlers.status?.('resync');
    // At most one request a second per book: a client that keeps disagreeing with the server
    // (a bug) must not turn into a flood of snapshots.
    const now = Date.now();
    const wait = Math.max(0, (book.lastResync || 0) + 1000 - now);
    book.lastResync = now + wait;
    setTimeout(() => {
      if (this.books.get(book.symbol) === book && this.ws && this.ws.readyState === WebSocket.OPEN) {
        this.ws.send(JSON.stringify({ op: 'resync', ch: 'book', symbol: book.symbol }));
      }
    }, wait);
  }

  message(msg) {
    if (msg.ch === 'book') {
      const book = this.books.get(msg.symbol);
      if (!book) return;
      if (msg.type === 'snapshot') {
        if (!book.snapshot(msg)) { this.resync(book); return; }
        this.handlers.status?.('live');
        this.handlers.book?.(book, null);
      } else {
        const outcome = book.update(msg);
        if (outcome === 'applied') this.handlers.book?.(book, msg);
        else if (outcome !== 'stale') this.resync(book);
      }
    } else if (msg.ch === 'trades') {
      if (this.symbols.has(msg.symbol)) this.handlers.trade?.(msg);
    } else if (msg.ch === 'ticker') {
      if (this.symbols.has(msg.symbol)) this.handlers.ticker?.(msg);
    } else if (msg.ch === 'heartbeat') {
      // Updates are queued before the heartbeat that reports their seq; a book still behind on two
      // heartbeats in a row has missed something.
      for (const [symbol, book] of this.books) {
        const seq = msg.seqs?.[symbol];
        if (book.seq !== null && seq !== undefined && seq > book.seq) {
          const n = (this.lag.get(symbol) || 0) + 1;
          this.lag.set(symbol, n);
          if (n >= 2) { this.lag.set(symbol, 0); this.resync(book); }
        } else {
          this.lag.set(symbol, 0);
        }
      }
      this.handlers.heartbeat?.(msg);
    } else if (msg.type === 'server_shutdown') {
      this.handlers.status?.('offline');
    }
  }
}
