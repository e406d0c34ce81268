# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False, overflowcheck=False
"""The Cython order book: the same interface and events as matching/reference.py, on C data.

Layout, chosen so that the hot path never touches a Python object per resting order:

- orders live in one growable array of C structs (a pool) with a free list; the FIFO queue of a
  price level is an intrusive doubly linked list through that array (prev/next are pool indices),
  so cancel from the middle of a queue is O(1);
- order id -> pool index is an open-addressing hash table (linear probing, backward-shift delete);
- each side has a direct-mapped price ladder (array indexed by price, grown on demand up to
  max_price) plus a bitmap of non-empty levels, and a best-price cursor; when the best level
  empties the next one is found by scanning bitmap words with clz/ctz;
- GTD orders sit in a binary min-heap of (expire_ts, order_id) with lazy deletion;
- events are appended to a growable C array of fixed 8-int64 records; Python decodes them only when
  asked (``events()``), and ``run_batch`` executes a whole buffer of commands without returning to
  Python.

The semantics (and every event, in order) are defined by matching/reference.py; the differential
tests compare the two books on random command streams. Limits: prices 1..max_price (default
2**22-1), quantities 1..2**40, cash caps saturate at 2**50 fen, so no int64 arithmetic overflows.
"""

from libc.stdint cimport int32_t, int64_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memset
from cpython.bytes cimport PyBytes_FromStringAndSize

import hashlib
from array import array

import orjson

cdef extern from *:
    int __builtin_clzll(unsigned long long) nogil
    int __builtin_ctzll(unsigned long long) nogil

# Compile-time constants (kept in step with matching/events.py; the differential tests would
# catch any drift because every event and code is compared with the reference book).
cdef enum:
    BID = 0
    ASK = 1
    GTC = 0
    IOC = 1
    FOK = 2
    GTD = 3
    LIMIT = 0
    MARKET = 1
    STP_NONE = 0
    STP_CANCEL_RESTING = 1
    STP_CANCEL_INCOMING = 2
    STP_CANCEL_BOTH = 3
    EV_ACCEPTED = 1
    EV_REJECTED = 2
    EV_TRADE = 3
    EV_CANCELLED = 4
    EV_EXPIRED = 5
    EV_AMENDED = 6
    EV_LEVEL = 7
    REJECT_INVALID_QUANTITY = 1
    REJECT_INVALID_PRICE = 2
    REJECT_DUPLICATE_ORDER_ID = 3
    REJECT_NOT_FOUND = 4
    REJECT_POST_ONLY_WOULD_TAKE = 5
    REJECT_FOK_NOT_FILLABLE = 6
    REJECT_INVALID_EXPIRY = 7
    REJECT_INVALID_ORDER = 14
    CANCEL_USER = 0
    CANCEL_UNFILLED = 1
    CANCEL_SELF_TRADE = 2
    CANCEL_CASH_CAP = 3
    OP_SUBMIT = 1
    OP_CANCEL = 2
    OP_MOVE = 3
    OP_REDUCE = 4
    OP_AMEND = 5
    OP_EXPIRE = 6
    KG_PER_TONNE = 1000
    NIL = -1

cdef extern from *:
    """
    #define CX_MAX_QTY 1099511627776LL
    #define CX_MAX_CASH 1125899906842624LL
    """
    const long long MAX_QTY "CX_MAX_QTY"
    const long long MAX_CASH "CX_MAX_CASH"

cdef enum:
    CMD_STRIDE = 8

BATCH_STRIDE = CMD_STRIDE
"""int64 fields per command in a run_batch buffer:
(op, order_id, account, flags, price, qty, ts, extra) where
flags = side | tif << 2 | kind << 4 | post_only << 6 | stp << 8 and extra is expire_ts for a GTD
order or cash_cap for a market buy. MOVE uses price; REDUCE uses qty as reduce_by; AMEND uses
price and qty; EXPIRE uses ts only."""

OPS = {"submit": OP_SUBMIT, "cancel": OP_CANCEL, "move": OP_MOVE, "reduce": OP_REDUCE,
       "amend": OP_AMEND, "expire": OP_EXPIRE}

DEFAULT_MAX_PRICE = (1 << 22) - 1
# The ladder is indexed by price (16 bytes a level per side), so the price range is bounded.
LIMIT_MAX_PRICE = 1 << 26


cdef struct Order:
    int64_t id
    int64_t account
    int64_t price
    int64_t qty
    int64_t expire_ts
    int64_t seq
    int32_t prev
    int32_t next
    int32_t side
    int32_t tif
    int32_t stp
    int32_t post_only

cdef struct Level:
    int64_t total
    int32_t head
    int32_t tail

cdef struct Ladder:
    Level* levels
    uint64_t* bits
    int64_t cap      # levels allocated: prices 0..cap-1; a multiple of 64
    int64_t count    # non-empty levels
    int64_t best     # best price when count > 0

cdef struct Slot:
    int64_t key
    int32_t val      # NIL = empty

cdef struct Event:
    int64_t f[8]

cdef struct Gtd:
    int64_t ts
    int64_t id


cdef inline uint64_t _hash(int64_t key) noexcept nogil:
    return <uint64_t>key * <uint64_t>0x9E3779B97F4A7C15ULL


cdef inline int64_t _scan_down(const uint64_t* bits, int64_t p) noexcept nogil:
    """Highest set bit at or below p, or NIL."""
    cdef int64_t w
    cdef uint64_t word
    if p < 0:
        return NIL
    w = p >> 6
    # 2 << 63 wraps to 0 and 0 - 1 is all ones: the whole word, as wanted.
    word = bits[w] & ((<uint64_t>2 << (p & 63)) - 1)
    while word == 0:
        w -= 1
        if w < 0:
            return NIL
        word = bits[w]
    return (w << 6) + 63 - __builtin_clzll(word)


cdef inline int64_t _scan_up(const uint64_t* bits, int64_t nwords, int64_t p) noexcept nogil:
    """Lowest set bit at or above p, or NIL."""
    cdef int64_t w = p >> 6
    cdef uint64_t word
    if w >= nwords:
        return NIL
    word = bits[w] & (~<uint64_t>0 << (p & 63))
    while word == 0:
        w += 1
        if w >= nwords:
            return NIL
        word = bits[w]
    return (w << 6) + __builtin_ctzll(word)


cdef inline int64_t _trade_value(int64_t price, int64_t qty) noexcept nogil:
    # matching.units.trade_value_fen: price x qty / 1000, half-up.
    return (price * qty * 2 + KG_PER_TONNE) // (2 * KG_PER_TONNE)


cdef inline int64_t _max_qty_for_cash(int64_t price, int64_t cash, int64_t lot) noexcept nogil:
    cdef int64_t q = (2 * KG_PER_TONNE * cash + KG_PER_TONNE - 1) // (2 * price)
    return q - q % lot


cdef class CythonBook:
    """One instrument's order book in C structures; interface as in matching/reference.py."""

    cdef Order* pool
    cdef int32_t pool_cap
    cdef int32_t free_head
    cdef Slot* slots
    cdef int64_t slot_mask
    cdef int64_t slot_bits
    cdef int64_t n_orders
    cdef Ladder lad[2]
    cdef Event* ev
    cdef int64_t n_ev
    cdef int64_t ev_cap
    cdef Gtd* heap
    cdef int64_t n_heap
    cdef int64_t heap_cap
    cdef int64_t heap_compact_at
    cdef int64_t seq
    cdef readonly int64_t max_price
    cdef readonly int64_t lot
    cdef readonly bint reduce_loses_priority

    def __cinit__(self, *, int64_t max_price=DEFAULT_MAX_PRICE, int64_t lot=1,
                  bint reduce_loses_priority=False):
        if not 1 <= max_price <= LIMIT_MAX_PRICE or lot < 1:
            raise ValueError(f"need 1 <= max_price <= {LIMIT_MAX_PRICE} and lot >= 1")
        self.max_price = max_price
        self.lot = lot
        self.reduce_loses_priority = reduce_loses_priority
        self._alloc()

    def __dealloc__(self):
        self._release()

    # ---- memory ---------------------------------------------------------------------------

    cdef void _alloc(self) except *:
        cdef int i
        self.pool_cap = 1024
        self.pool = <Order*>malloc(self.pool_cap * sizeof(Order))
        self.slot_bits = 11
        self.slot_mask = (1 << self.slot_bits) - 1
        self.slots = <Slot*>malloc((self.slot_mask + 1) * sizeof(Slot))
        self.ev_cap = 4096
        self.ev = <Event*>malloc(self.ev_cap * sizeof(Event))
        self.heap_cap = 64
        self.heap_compact_at = 1024
        self.heap = <Gtd*>malloc(self.heap_cap * sizeof(Gtd))
        if not self.pool or not self.slots or not self.ev or not self.heap:
            raise MemoryError()
        for i in range(self.pool_cap):
            self.pool[i].next = i + 1
        self.pool[self.pool_cap - 1].next = NIL
        self.free_head = 0
        for i in range(self.slot_mask + 1):
            self.slots[i].val = NIL
        self.n_orders = 0
        self.n_ev = 0
        self.n_heap = 0
        self.seq = 0
        for i in range(2):
            self.lad[i].levels = NULL
            self.lad[i].bits = NULL
            self.lad[i].cap = 0
            self.lad[i].count = 0
            self.lad[i].best = NIL

    cdef void _release(self):
        free(self.pool)
        free(self.slots)
        free(self.ev)
        free(self.heap)
        for i in range(2):
            free(self.lad[i].levels)
            free(self.lad[i].bits)
        self.pool = NULL
        self.slots = NULL
        self.ev = NULL
        self.heap = NULL

    cdef int32_t _new_order(self) except -2:
        cdef int32_t i, old
        cdef Order* grown
        if self.free_head == NIL:
            old = self.pool_cap
            grown = <Order*>realloc(self.pool, 2 * old * sizeof(Order))
            if not grown:
                raise MemoryError()
            self.pool = grown
            self.pool_cap = 2 * old
            for i in range(old, self.pool_cap):
                self.pool[i].next = i + 1
            self.pool[self.pool_cap - 1].next = NIL
            self.free_head = old
        i = self.free_head
        self.free_head = self.pool[i].next
        return i

    cdef inline void _free_order(self, int32_t i) noexcept nogil:
        self.pool[i].next = self.free_head
        self.free_head = i

    cdef int _ensure_price(self, int side, int64_t price) except -1:
        cdef Ladder* L = &self.lad[side]
        cdef int64_t cap, i
        cdef Level* lv
        cdef uint64_t* bits
        if price < L.cap:
            return 0
        cap = L.cap * 2 if L.cap * 2 > price + 1 else price + 1
        cap = (cap + 63) & ~63
        lv = <Level*>realloc(L.levels, cap * sizeof(Level))
        if not lv:
            raise MemoryError()
        L.levels = lv
        bits = <uint64_t*>realloc(L.bits, (cap >> 6) * sizeof(uint64_t))
        if not bits:
            raise MemoryError()
        L.bits = bits
        for i in range(L.cap, cap):
            lv[i].total = 0
            lv[i].head = NIL
            lv[i].tail = NIL
        memset(&bits[L.cap >> 6], 0, ((cap - L.cap) >> 6) * sizeof(uint64_t))
        L.cap = cap
        return 0

    # ---- id -> pool index -------------------------------------------------------------------

    cdef inline int32_t _find(self, int64_t key) noexcept nogil:
        cdef int64_t j = <int64_t>(_hash(key) >> (64 - self.slot_bits))
        cdef Slot* s
        while True:
            s = &self.slots[j]
            if s.val == NIL:
                return NIL
            if s.key == key:
                return s.val
            j = (j + 1) & self.slot_mask

    cdef int _insert(self, int64_t key, int32_t val) except -1:
        cdef int64_t j
        if (self.n_orders + 1) * 2 > self.slot_mask + 1:
            self._rehash()
        j = <int64_t>(_hash(key) >> (64 - self.slot_bits))
        while self.slots[j].val != NIL:
            j = (j + 1) & self.slot_mask
        self.slots[j].key = key
        self.slots[j].val = val
        self.n_orders += 1
        return 0

    cdef int _rehash(self) except -1:
        cdef Slot* old = self.slots
        cdef int64_t old_n = self.slot_mask + 1
        cdef int64_t i, j
        cdef Slot* fresh = <Slot*>malloc(2 * old_n * sizeof(Slot))
        if not fresh:
            raise MemoryError()
        self.slots = fresh
        self.slot_bits += 1
        self.slot_mask = 2 * old_n - 1
        for i in range(2 * old_n):
            fresh[i].val = NIL
        for i in range(old_n):
            if old[i].val != NIL:
                j = <int64_t>(_hash(old[i].key) >> (64 - self.slot_bits))
                while fresh[j].val != NIL:
                    j = (j + 1) & self.slot_mask
                fresh[j] = old[i]
        free(old)
        return 0

    cdef void _erase(self, int64_t key) noexcept nogil:
        # Backward-shift deletion keeps probe chains intact without tombstones.
        cdef int64_t i = <int64_t>(_hash(key) >> (64 - self.slot_bits))
        cdef int64_t j, home
        while self.slots[i].key != key or self.slots[i].val == NIL:
            i = (i + 1) & self.slot_mask
        j = i
        while True:
            j = (j + 1) & self.slot_mask
            if self.slots[j].val == NIL:
                break
            home = <int64_t>(_hash(self.slots[j].key) >> (64 - self.slot_bits))
            # Move j back into the hole at i unless its home lies cyclically in (i, j].
            if (j > i and (home <= i or home > j)) or (j < i and (home <= i and home > j)):
                self.slots[i] = self.slots[j]
                i = j
        self.slots[i].val = NIL
        self.n_orders -= 1

    # ---- events -----------------------------------------------------------------------------

    cdef int _grow_events(self) except -1:
        cdef Event* grown = <Event*>realloc(self.ev, 2 * self.ev_cap * sizeof(Event))
        if not grown:
            raise MemoryError()
        self.ev = grown
        self.ev_cap *= 2
        return 0

    cdef inline int _push(self, int64_t t, int64_t a, int64_t b, int64_t c, int64_t d,
                          int64_t e, int64_t f, int64_t g) except -1:
        cdef Event* x
        if self.n_ev == self.ev_cap:
            self._grow_events()
        x = &self.ev[self.n_ev]
        x.f[0] = t
        x.f[1] = a
        x.f[2] = b
        x.f[3] = c
        x.f[4] = d
        x.f[5] = e
        x.f[6] = f
        x.f[7] = g
        self.n_ev += 1
        return 0

    # ---- levels -----------------------------------------------------------------------------

    cdef inline void _level_emptied(self, int side, int64_t price) noexcept nogil:
        cdef Ladder* L = &self.lad[side]
        L.bits[price >> 6] &= ~(<uint64_t>1 << (price & 63))
        L.count -= 1
        if L.count == 0:
            L.best = NIL
        elif price == L.best:
            if side == BID:
                L.best = _scan_down(L.bits, price - 1)
            else:
                L.best = _scan_up(L.bits, L.cap >> 6, price + 1)

    cdef int _enqueue(self, int32_t i) except -1:
        """Append pool order i at the back of its level, give it a new seq, emit LEVEL."""
        cdef Order* o = &self.pool[i]
        cdef int side = o.side
        cdef int64_t price = o.price
        cdef Ladder* L
        cdef Level* lv
        self._ensure_price(side, price)
        L = &self.lad[side]
        lv = &L.levels[price]
        o.seq = self.seq
        self.seq += 1
        o.next = NIL
        o.prev = lv.tail
        if lv.tail == NIL:
            lv.head = i
            L.bits[price >> 6] |= <uint64_t>1 << (price & 63)
            L.count += 1
            if L.count == 1 or (price > L.best if side == BID else price < L.best):
                L.best = price
        else:
            self.pool[lv.tail].next = i
        lv.tail = i
        lv.total += o.qty
        if o.tif == GTD:
            self._heap_push(o.expire_ts, o.id)
        return self._push(EV_LEVEL, side, price, lv.total, 0, 0, 0, 0)

    cdef void _unlink(self, int32_t i) noexcept nogil:
        """Take pool order i out of its level queue (it stays in the pool and the id table)."""
        cdef Order* o = &self.pool[i]
        cdef Level* lv = &self.lad[o.side].levels[o.price]
        if o.prev == NIL:
            lv.head = o.next
        else:
            self.pool[o.prev].next = o.next
        if o.next == NIL:
            lv.tail = o.prev
        else:
            self.pool[o.next].prev = o.prev
        lv.total -= o.qty
        if lv.head == NIL:
            self._level_emptied(o.side, o.price)

    cdef int _drop(self, int32_t i) except -1:
        """Remove a resting order completely (queue, id table, pool)."""
        self._unlink(i)
        self._erase(self.pool[i].id)
        self._free_order(i)
        return 0

    # ---- GTD heap ---------------------------------------------------------------------------

    cdef inline bint _gtd_less(self, int64_t a, int64_t b) noexcept nogil:
        return (self.heap[a].ts < self.heap[b].ts or
                (self.heap[a].ts == self.heap[b].ts and self.heap[a].id < self.heap[b].id))

    cdef int _heap_push(self, int64_t ts, int64_t oid) except -1:
        cdef Gtd* grown
        cdef int64_t k, parent
        cdef Gtd tmp
        if self.n_heap >= self.heap_compact_at:
            self._heap_compact()
        if self.n_heap == self.heap_cap:
            grown = <Gtd*>realloc(self.heap, 2 * self.heap_cap * sizeof(Gtd))
            if not grown:
                raise MemoryError()
            self.heap = grown
            self.heap_cap *= 2
        k = self.n_heap
        self.heap[k].ts = ts
        self.heap[k].id = oid
        self.n_heap += 1
        while k > 0:
            parent = (k - 1) >> 1
            if not self._gtd_less(k, parent):
                break
            tmp = self.heap[k]
            self.heap[k] = self.heap[parent]
            self.heap[parent] = tmp
            k = parent
        return 0

    cdef void _sift_down(self, int64_t k) noexcept nogil:
        cdef int64_t c
        cdef Gtd tmp
        while True:
            c = 2 * k + 1
            if c >= self.n_heap:
                break
            if c + 1 < self.n_heap and self._gtd_less(c + 1, c):
                c += 1
            if not self._gtd_less(c, k):
                break
            tmp = self.heap[k]
            self.heap[k] = self.heap[c]
            self.heap[c] = tmp
            k = c

    cdef void _heap_pop(self) noexcept nogil:
        self.n_heap -= 1
        self.heap[0] = self.heap[self.n_heap]
        self._sift_down(0)

    cdef void _heap_compact(self) noexcept nogil:
        """Rebuild the heap from the resting GTD orders, dropping stale entries.

        Cancels, fills and re-queues leave entries behind (lazy deletion); without this a
        long-lived book that churns GTD orders would grow the heap until their expiry times.
        Expiry order is defined by (expire_ts, order_id), not by heap layout, so compaction
        changes no event.
        """
        cdef int64_t j, k, n = 0
        cdef Order* o
        for j in range(self.slot_mask + 1):
            if self.slots[j].val != NIL:
                o = &self.pool[self.slots[j].val]
                if o.tif == GTD:
                    self.heap[n].ts = o.expire_ts
                    self.heap[n].id = o.id
                    n += 1
        self.n_heap = n
        k = n // 2 - 1
        while k >= 0:
            self._sift_down(k)
            k -= 1
        self.heap_compact_at = 2 * n if 2 * n > 1024 else 1024

    @property
    def gtd_heap_size(self):
        """Entries in the GTD heap, stale ones included (for tests and monitoring)."""
        return self.n_heap

    cdef int _expire(self, int64_t ts) except -1:
        cdef int64_t oid, ets
        cdef int32_t i
        cdef Order* o
        while self.n_heap > 0 and self.heap[0].ts <= ts:
            ets = self.heap[0].ts
            oid = self.heap[0].id
            self._heap_pop()
            i = self._find(oid)
            if i == NIL:
                continue  # filled or cancelled since: a stale entry
            o = &self.pool[i]
            if o.tif != GTD or o.expire_ts != ets:
                continue  # the id now names a different order
            self._push(EV_EXPIRED, oid, o.qty, 0, 0, 0, 0, 0)
            self._unlink(i)
            self._push(EV_LEVEL, o.side, o.price, self.lad[o.side].levels[o.price].total,
                       0, 0, 0, 0)
            self._erase(oid)
            self._free_order(i)
        return 0

    # ---- matching ---------------------------------------------------------------------------

    cdef inline bint _crosses(self, int side, int64_t price) noexcept nogil:
        cdef Ladder* L = &self.lad[1 - side]
        if L.count == 0:
            return False
        return L.best <= price if side == BID else L.best >= price

    cdef int64_t _fillable(self, int side, int64_t price, int64_t qty, int64_t account,
                           int stp) noexcept nogil:
        cdef Ladder* L = &self.lad[1 - side]
        cdef int64_t got = 0, p
        cdef int32_t j
        cdef Order* m
        if L.count == 0:
            return 0
        p = L.best
        while p != NIL and (p <= price if side == BID else p >= price):
            if stp == STP_NONE:
                got += L.levels[p].total
            else:
                j = L.levels[p].head
                while j != NIL:
                    m = &self.pool[j]
                    if m.account == account:
                        if stp != STP_CANCEL_RESTING:
                            return got
                    else:
                        got += m.qty
                        if got >= qty:
                            return got
                    j = m.next
            if got >= qty:
                return got
            if side == BID:
                p = _scan_up(L.bits, L.cap >> 6, p + 1)
            else:
                p = _scan_down(L.bits, p - 1)
        return got

    cdef int64_t _match(self, int64_t tid, int64_t tacct, int side, int64_t limit,
                        int64_t* qty_p, bint market, int stp, int64_t cash) except -2:
        """Trade an incoming order against the other side; see ReferenceBook._match.

        Returns NIL when it stopped for price or liquidity (or filled), else the cancel reason.
        """
        cdef int opp = 1 - side
        cdef Ladder* L = &self.lad[opp]
        cdef Level* lv
        cdef Order* m
        cdef int64_t qty = qty_p[0]
        cdef int64_t price, q, stop, q_cash
        cdef int32_t j, nxt
        cdef bint changed
        while qty > 0 and L.count > 0:
            price = L.best
            if not market and (price > limit if opp == ASK else price < limit):
                break
            lv = &L.levels[price]
            stop = NIL
            changed = False
            j = lv.head
            while j != NIL and qty > 0:
                m = &self.pool[j]
                nxt = m.next
                if stp != STP_NONE and m.account == tacct:
                    if stp == STP_CANCEL_INCOMING:
                        stop = CANCEL_SELF_TRADE
                        break
                    changed = True
                    self._push(EV_CANCELLED, m.id, m.qty, CANCEL_SELF_TRADE, 0, 0, 0, 0)
                    # m is the head of this level; _drop may also empty the level.
                    self._drop(j)
                    j = nxt
                    if stp == STP_CANCEL_BOTH:
                        stop = CANCEL_SELF_TRADE
                        break
                    continue
                q = qty if qty < m.qty else m.qty
                if cash >= 0:
                    q_cash = _max_qty_for_cash(price, cash, self.lot)
                    if q_cash < q:
                        q = q_cash
                    if q == 0:
                        stop = CANCEL_CASH_CAP
                        break
                    cash -= _trade_value(price, q)
                self._push(EV_TRADE, tid, m.id, tacct, m.account, side, price, q)
                changed = True
                qty -= q
                lv.total -= q
                if q == m.qty:
                    # Full fill of the head: pop it without the general unlink.
                    lv.head = nxt
                    if nxt == NIL:
                        lv.tail = NIL
                    else:
                        self.pool[nxt].prev = NIL
                    self._erase(m.id)
                    self._free_order(j)
                    j = nxt
                else:
                    m.qty -= q
            if changed:
                self._push(EV_LEVEL, opp, price, lv.total, 0, 0, 0, 0)
            # Full fills pop the head without _unlink, so an emptied level is retired here;
            # the bit test skips levels that a self-trade _drop already retired.
            if lv.head == NIL and (L.bits[price >> 6] >> (price & 63)) & 1:
                self._level_emptied(opp, price)
            if stop != NIL:
                qty_p[0] = qty
                return stop
        qty_p[0] = qty
        return NIL

    # ---- commands (C level) -------------------------------------------------------------------

    cdef int _submit(self, int64_t oid, int64_t account, int side, int64_t price, int64_t qty,
                     int tif, int64_t ts, int kind, bint post_only, int64_t expire_ts, int stp,
                     int64_t cash_cap) except -1:
        cdef bint market = kind == MARKET
        cdef int64_t reason, cash
        cdef int32_t i
        cdef Order* o
        if self.n_heap > 0 and self.heap[0].ts <= ts:
            self._expire(ts)
        if market:
            price = 0
        # Range checks first: side, tif and stp index C arrays and branch tables below.
        if side < BID or side > ASK or tif < GTC or tif > GTD or kind < LIMIT or \
                kind > MARKET or stp < STP_NONE or stp > STP_CANCEL_BOTH:
            return self._push(EV_REJECTED, oid, REJECT_INVALID_ORDER, 0, 0, 0, 0, 0)
        if qty <= 0 or qty > MAX_QTY:
            return self._push(EV_REJECTED, oid, REJECT_INVALID_QUANTITY, 0, 0, 0, 0, 0)
        if not market and (price <= 0 or price > self.max_price):
            return self._push(EV_REJECTED, oid, REJECT_INVALID_PRICE, 0, 0, 0, 0, 0)
        if self._find(oid) != NIL:
            return self._push(EV_REJECTED, oid, REJECT_DUPLICATE_ORDER_ID, 0, 0, 0, 0, 0)
        if not market and tif == GTD and expire_ts <= ts:
            return self._push(EV_REJECTED, oid, REJECT_INVALID_EXPIRY, 0, 0, 0, 0, 0)
        if not market and post_only and self._crosses(side, price):
            return self._push(EV_REJECTED, oid, REJECT_POST_ONLY_WOULD_TAKE, 0, 0, 0, 0, 0)
        if not market and tif == FOK and self._fillable(side, price, qty, account, stp) < qty:
            return self._push(EV_REJECTED, oid, REJECT_FOK_NOT_FILLABLE, 0, 0, 0, 0, 0)
        self._push(EV_ACCEPTED, oid, account, side, price, qty, 0, 0)
        cash = NIL
        if market and side == BID and cash_cap > 0:
            cash = cash_cap if cash_cap < MAX_CASH else MAX_CASH
        reason = self._match(oid, account, side, price, &qty, market, stp, cash)
        if qty > 0:
            if reason == NIL and not market and (tif == GTC or tif == GTD):
                self._rest(oid, account, side, price, qty, tif, expire_ts if tif == GTD else 0, post_only, stp)
            else:
                self._push(EV_CANCELLED, oid, qty,
                           CANCEL_UNFILLED if reason == NIL else reason, 0, 0, 0, 0)
        return 0

    cdef int _cancel(self, int64_t oid, int64_t ts) except -1:
        cdef int32_t i
        cdef Order* o
        if self.n_heap > 0 and self.heap[0].ts <= ts:
            self._expire(ts)
        i = self._find(oid)
        if i == NIL:
            return self._push(EV_REJECTED, oid, REJECT_NOT_FOUND, 0, 0, 0, 0, 0)
        return self._cancel_at(i)

    cdef int _cancel_at(self, int32_t i) except -1:
        """Cancel the resting order in slot `i` at its owner's request: the event, then its level."""
        cdef Order* o = &self.pool[i]
        self._push(EV_CANCELLED, o.id, o.qty, CANCEL_USER, 0, 0, 0, 0)
        self._drop(i)
        return self._push(EV_LEVEL, o.side, o.price, self.lad[o.side].levels[o.price].total,
                          0, 0, 0, 0)

    cdef int32_t _rest(self, int64_t oid, int64_t account, int32_t side, int64_t price, int64_t qty,
                       int32_t tif, int64_t expire_ts, int32_t post_only, int32_t stp) except -2:
        """Put an order on the book at the back of its level's queue; returns its pool slot."""
        cdef int32_t i = self._new_order()
        cdef Order* o = &self.pool[i]
        o.id = oid
        o.account = account
        o.side = side
        o.price = price
        o.qty = qty
        o.tif = tif
        o.expire_ts = expire_ts
        o.post_only = post_only
        o.stp = stp
        self._insert(oid, i)
        self._enqueue(i)
        return i

    cdef int _reduce(self, int64_t oid, int64_t by, int64_t ts) except -1:
        cdef int32_t i
        cdef Order* o
        if self.n_heap > 0 and self.heap[0].ts <= ts:
            self._expire(ts)
        i = self._find(oid)
        if i == NIL:
            return self._push(EV_REJECTED, oid, REJECT_NOT_FOUND, 0, 0, 0, 0, 0)
        if by <= 0:
            return self._push(EV_REJECTED, oid, REJECT_INVALID_QUANTITY, 0, 0, 0, 0, 0)
        o = &self.pool[i]
        if by >= o.qty:
            return self._cancel_at(i)
        return self._amend_at(i, o.price, o.qty - by)

    cdef int _amend(self, int64_t oid, int64_t new_price, int64_t new_qty, bint move,
                    int64_t ts) except -1:
        cdef int32_t i
        cdef Order* o
        if self.n_heap > 0 and self.heap[0].ts <= ts:
            self._expire(ts)
        i = self._find(oid)
        if i == NIL:
            return self._push(EV_REJECTED, oid, REJECT_NOT_FOUND, 0, 0, 0, 0, 0)
        o = &self.pool[i]
        if move:
            new_qty = o.qty
        if new_qty <= 0 or new_qty > MAX_QTY:
            return self._push(EV_REJECTED, oid, REJECT_INVALID_QUANTITY, 0, 0, 0, 0, 0)
        if new_price <= 0 or new_price > self.max_price:
            return self._push(EV_REJECTED, oid, REJECT_INVALID_PRICE, 0, 0, 0, 0, 0)
        if o.post_only and new_price != o.price and self._crosses(o.side, new_price):
            return self._push(EV_REJECTED, oid, REJECT_POST_ONLY_WOULD_TAKE, 0, 0, 0, 0, 0)
        return self._amend_at(i, new_price, new_qty)

    cdef int _amend_at(self, int32_t i, int64_t new_price, int64_t new_qty) except -1:
        cdef Order* o = &self.pool[i]
        cdef Level* lv
        cdef int64_t reason, qty, old_price = o.price
        if new_price == old_price and (
                new_qty == o.qty or (new_qty < o.qty and not self.reduce_loses_priority)):
            lv = &self.lad[o.side].levels[old_price]
            lv.total += new_qty - o.qty
            o.qty = new_qty
            self._push(EV_AMENDED, o.id, new_price, new_qty, 0, 0, 0, 0)
            return self._push(EV_LEVEL, o.side, old_price, lv.total, 0, 0, 0, 0)
        self._unlink(i)
        self._push(EV_AMENDED, o.id, new_price, new_qty, 0, 0, 0, 0)
        if new_price != old_price:
            self._push(EV_LEVEL, o.side, old_price, self.lad[o.side].levels[old_price].total,
                       0, 0, 0, 0)
        # Matching frees other pool slots but never allocates, so `o` stays valid.
        qty = new_qty
        reason = self._match(o.id, o.account, o.side, new_price, &qty, False, o.stp, NIL)
        o.price = new_price
        o.qty = qty
        if qty > 0:
            if reason == NIL:
                return self._enqueue(i)
            self._push(EV_CANCELLED, o.id, qty, reason, 0, 0, 0, 0)
        self._erase(o.id)
        self._free_order(i)
        return 0

    # ---- Python API ---------------------------------------------------------------------------

    def submit(self, int64_t order_id, int64_t account, int side, int64_t price, int64_t qty,
               int tif=GTC, int64_t ts=0, int kind=LIMIT, bint post_only=False,
               int64_t expire_ts=0, int stp=STP_NONE, int64_t cash_cap=0):
        """A new order; returns the number of events appended (see ReferenceBook.submit)."""
        cdef int64_t before = self.n_ev
        self._submit(order_id, account, side, price, qty, tif, ts, kind, post_only, expire_ts,
                     stp, cash_cap)
        return self.n_ev - before

    def cancel(self, int64_t order_id, int64_t ts=0):
        cdef int64_t before = self.n_ev
        self._cancel(order_id, ts)
        return self.n_ev - before

    def reduce(self, int64_t order_id, int64_t reduce_by, int64_t ts=0):
        cdef int64_t before = self.n_ev
        self._reduce(order_id, reduce_by, ts)
        return self.n_ev - before

    def move(self, int64_t order_id, int64_t new_price, int64_t ts=0):
        cdef int64_t before = self.n_ev
        self._amend(order_id, new_price, 0, True, ts)
        return self.n_ev - before

    def amend(self, int64_t order_id, int64_t new_price, int64_t new_qty, int64_t ts=0):
        cdef int64_t before = self.n_ev
        self._amend(order_id, new_price, new_qty, False, ts)
        return self.n_ev - before

    def expire(self, int64_t ts):
        cdef int64_t before = self.n_ev
        self._expire(ts)
        return self.n_ev - before

    def run_batch(self, const int64_t[::1] cmds not None):
        """Execute a buffer of BATCH_STRIDE-int64 commands inside C; returns events appended."""
        cdef int64_t n = cmds.shape[0] // CMD_STRIDE
        cdef int64_t k, before = self.n_ev, flags
        cdef const int64_t* c
        if cmds.shape[0] % CMD_STRIDE:
            raise ValueError("batch length is not a multiple of BATCH_STRIDE")
        for k in range(n):
            c = &cmds[k * CMD_STRIDE]
            if c[0] == OP_SUBMIT:
                flags = c[3]
                self._submit(c[1], c[2], flags & 3, c[4], c[5], (flags >> 2) & 3, c[6],
                             (flags >> 4) & 3, (flags >> 6) & 1, c[7], (flags >> 8) & 3, c[7])
            elif c[0] == OP_MOVE:
                self._amend(c[1], c[4], 0, True, c[6])
            elif c[0] == OP_CANCEL:
                self._cancel(c[1], c[6])
            elif c[0] == OP_REDUCE:
                self._reduce(c[1], c[5], c[6])
            elif c[0] == OP_AMEND:
                self._amend(c[1], c[4], c[5], False, c[6])
            elif c[0] == OP_EXPIRE:
                self._expire(c[6])
            else:
                raise ValueError(f"unknown op {c[0]} in command {k}")
        return self.n_ev - before

    # ---- events out -------------------------------------------------------------------------

    def events(self):
        """Return and clear the pending events as tuples (layouts in matching/events.py)."""
        cdef list out = []
        cdef int64_t k
        cdef Event* e
        cdef int64_t t
        for k in range(self.n_ev):
            e = &self.ev[k]
            t = e.f[0]
            if t == EV_TRADE:
                out.append((t, e.f[1], e.f[2], e.f[3], e.f[4], e.f[5], e.f[6], e.f[7]))
            elif t == EV_LEVEL or t == EV_CANCELLED or t == EV_AMENDED:
                out.append((t, e.f[1], e.f[2], e.f[3]))
            elif t == EV_ACCEPTED:
                out.append((t, e.f[1], e.f[2], e.f[3], e.f[4], e.f[5]))
            else:
                out.append((t, e.f[1], e.f[2]))
        self.n_ev = 0
        return out

    def clear_events(self):
        self.n_ev = 0

    @property
    def pending_events(self):
        return self.n_ev

    def take_trades(self):
        """Return and clear pending events, keeping only trades as a flat array('q') of
        (taker_id, maker_id, price, qty) quadruples (the replay tool's fill output)."""
        cdef int64_t k, n = 0
        for k in range(self.n_ev):
            if self.ev[k].f[0] == EV_TRADE:
                n += 1
        out = array("q", bytes(n * 4 * sizeof(int64_t)))
        cdef int64_t[::1] view = out
        n = 0
        for k in range(self.n_ev):
            if self.ev[k].f[0] == EV_TRADE:
                view[n] = self.ev[k].f[1]
                view[n + 1] = self.ev[k].f[2]
                view[n + 2] = self.ev[k].f[6]
                view[n + 3] = self.ev[k].f[7]
                n += 4
        self.n_ev = 0
        return out

    def raw_events(self):
        """Pending events as raw bytes (n x 8 little-endian int64), without clearing them."""
        return PyBytes_FromStringAndSize(<char*>self.ev, self.n_ev * sizeof(Event))

    # ---- queries ----------------------------------------------------------------------------

    def __len__(self):
        return self.n_orders

    def best_bid(self):
        return self.lad[BID].best if self.lad[BID].count else None

    def best_ask(self):
        return self.lad[ASK].best if self.lad[ASK].count else None

    cdef tuple _order_tuple(self, int32_t i):
        cdef Order* o = &self.pool[i]
        return (o.id, o.account, o.side, o.price, o.qty, o.tif, o.expire_ts,
                int(o.post_only), o.stp, o.seq)

    def order(self, int64_t order_id):
        cdef int32_t i = self._find(order_id)
        return None if i == NIL else self._order_tuple(i)

    def order_qty(self, int64_t order_id):
        """Open quantity of a resting order, 0 if it is not in the book."""
        cdef int32_t i = self._find(order_id)
        return 0 if i == NIL else self.pool[i].qty

    cdef int64_t _next_price(self, int side, int64_t p):
        cdef Ladder* L = &self.lad[side]
        if side == BID:
            return _scan_down(L.bits, p - 1)
        return _scan_up(L.bits, L.cap >> 6, p + 1)

    def depth(self, int side, int n=10):
        """Top `n` levels of one side, best first, as (price, total quantity)."""
        cdef Ladder* L
        cdef list out = []
        cdef int64_t p
        if side != BID and side != ASK:
            raise ValueError("side must be 0 (bid) or 1 (ask)")
        L = &self.lad[side]
        p = L.best if L.count else NIL
        while p != NIL and len(out) < n:
            out.append((p, L.levels[p].total))
            p = self._next_price(side, p)
        return out

    def orders(self):
        cdef list out = []
        cdef int side
        cdef int64_t p
        cdef int32_t j
        for side in range(2):
            p = self.lad[side].best if self.lad[side].count else NIL
            while p != NIL:
                j = self.lad[side].levels[p].head
                while j != NIL:
                    out.append(self._order_tuple(j))
                    j = self.pool[j].next
                p = self._next_price(side, p)
        return out

    def snapshot(self):
        """Everything needed to rebuild the book: the arrival counter and the resting orders."""
        return {"seq": self.seq, "orders": self.orders()}

    def restore(self, snapshot):
        """Rebuild from snapshot() output (replaces current contents, emits no events)."""
        cdef int32_t i
        cdef Order* o
        from matching.reference import validate_snapshot

        validate_snapshot(snapshot, self.max_price)
        self._release()
        self._alloc()
        for t in sorted(snapshot["orders"], key=lambda t: t[9]):
            oid, account, side, price, qty, tif, expire_ts, post_only, stp, seq = t
            i = self._rest(oid, account, side, price, qty, tif, expire_ts, post_only, stp)
            self.pool[i].seq = seq
        self.seq = snapshot["seq"]
        self.n_ev = 0

    def state_digest(self):
        """SHA-256 of the resting orders in priority order plus the arrival counter."""
        return hashlib.sha256(orjson.dumps([self.seq, self.orders()])).hexdigest()

    def check_invariants(self):
        """Walk every structure and raise AssertionError on any inconsistency (for tests)."""
        cdef int side
        cdef int64_t p, total, count, n = 0, last_seq
        cdef int32_t j, prev
        for side in range(2):
            count = 0
            for p in range(self.lad[side].cap):
                j = self.lad[side].levels[p].head
                bit = (self.lad[side].bits[p >> 6] >> (p & 63)) & 1
                assert bit == (j != NIL), ("bitmap", side, p)
                if j == NIL:
                    assert self.lad[side].levels[p].total == 0, ("empty total", side, p)
                    continue
                count += 1
                total = 0
                prev = NIL
                last_seq = -1
                while j != NIL:
                    assert self.pool[j].prev == prev, ("prev link", side, p)
                    assert self.pool[j].price == p and self.pool[j].side == side
                    assert self.pool[j].qty > 0
                    assert self.pool[j].seq > last_seq, ("fifo", side, p)
                    assert self._find(self.pool[j].id) == j, ("id table", self.pool[j].id)
                    last_seq = self.pool[j].seq
                    total += self.pool[j].qty
                    prev = j
                    j = self.pool[j].next
                    n += 1
                assert self.lad[side].levels[p].tail == prev, ("tail", side, p)
                assert total == self.lad[side].levels[p].total, ("total", side, p)
            assert count == self.lad[side].count, ("level count", side)
        assert n == self.n_orders, ("order count", n, self.n_orders)
        if self.lad[BID].count:
            assert self.lad[BID].best == self.depth(BID, 1)[0][0]
            assert self.lad[BID].best == max(
                p for p in range(self.lad[BID].cap) if self.lad[BID].levels[p].head != NIL)
        if self.lad[ASK].count:
            assert self.lad[ASK].best == min(
                p for p in range(self.lad[ASK].cap) if self.lad[ASK].levels[p].head != NIL)
        if self.lad[BID].count and self.lad[ASK].count:
            assert self.lad[BID].best < self.lad[ASK].best, "crossed book"
