"""Who is calling, and how fast they may: API keys, roles, rate limits, request size limits.

API keys are stored as SHA-256 hashes (exchange/accounts.py); a key seen recently is kept in a
short-lived cache so that order entry does not pay a database round trip per request (a revoked
key stops working within ``KEY_TTL`` seconds). Rate limits are token buckets per API key and per
client address, shared by REST and the websocket; a request over either gets ``rate_limited``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import asyncpg

from exchange.accounts import Account, account_for_key
from exchange.errors import CarbonxError

KEY_TTL = 10.0


@dataclass(frozen=True)
class Limits:
    """Requests per second and burst, per API key and per client address; body bytes."""

    key_rate: float = 5_000.0
    key_burst: float = 10_000.0
    address_rate: float = 10_000.0
    address_burst: float = 20_000.0
    max_body: int = 64 * 1024


class Bucket:
    __slots__ = ("at", "tokens")

    def __init__(self, tokens: float, at: float) -> None:
        self.tokens = tokens
        self.at = at


class RateLimiter:
    """Token buckets keyed by name; `take` says whether one more request fits."""

    def __init__(self, rate: float, burst: float, max_buckets: int = 100_000) -> None:
        self.rate = rate
        self.burst = burst
        self.max_buckets = max_buckets
        self.buckets: dict[str, Bucket] = {}

    def take(self, key: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        b = self.buckets.get(key)
        if b is None:
            if len(self.buckets) >= self.max_buckets:
                self._forget(now)
            b = self.buckets[key] = Bucket(self.burst, now)
        else:
            b.tokens = min(self.burst, b.tokens + (now - b.at) * self.rate)
            b.at = now
        if b.tokens < 1:
            return False
        b.tokens -= 1
        return True

    def give_back(self, key: str) -> None:
        """Return the token `take` just took (the request was refused for another reason)."""
        b = self.buckets.get(key)
        if b is not None:
            b.tokens = min(self.burst, b.tokens + 1)

    def _forget(self, now: float) -> None:
        """Make room: first the buckets that have refilled (forgetting one changes nothing: a new
        caller starts full), then, if callers still crowd it (many addresses at once, as an IPv6
        range can make), the least recently seen, down to half. Half, so that a crowd pays for a
        sweep once per max_buckets/2 newcomers, not on every newcomer (a sweep that kept the
        table full ran on each new address)."""
        left = {k: v for k, v in self.buckets.items() if v.tokens + (now - v.at) * self.rate < self.burst}
        if len(left) > self.max_buckets // 2:
            recent = sorted(left.items(), key=lambda kv: kv[1].at)[len(left) - self.max_buckets // 2:]
            left = dict(recent)
        self.buckets = left

    def retry_after_ms(self, key: str) -> int:
        """Milliseconds until `key` has a request again (after `take` refused it; at least 1)."""
        b = self.buckets.get(key)
        return max(1, math.ceil((1 - b.tokens) * 1000 / self.rate)) if b is not None else 1


class RateLimited(CarbonxError):
    """`rate_limited`, with the time until the caller may ask again: whole seconds for HTTP's
    Retry-After, milliseconds on the websocket, where a bucket refilling thousands of times a
    second makes "1 s" a needlessly long wait."""

    def __init__(self, message: str, retry_after_ms: int) -> None:
        super().__init__("rate_limited", message)
        self.retry_after_ms = retry_after_ms

    @property
    def retry_after(self) -> int:
        """Whole seconds, at least 1, as HTTP's Retry-After counts."""
        return max(1, math.ceil(self.retry_after_ms / 1000))


def error_headers(e: CarbonxError) -> dict[str, str] | None:
    """The headers a refusal's answer carries besides its problem body."""
    return {"Retry-After": str(e.retry_after)} if isinstance(e, RateLimited) else None


class Gate:
    """Authentication and rate limits for one server."""

    def __init__(self, pool: asyncpg.Pool, limits: Limits) -> None:
        self.pool = pool
        self.limits = limits
        self.by_key = RateLimiter(limits.key_rate, limits.key_burst)
        self.by_address = RateLimiter(limits.address_rate, limits.address_burst)
        self._cache: dict[str, tuple[Account, float]] = {}

    def admit(self, address: str | None, key: str | None = None) -> None:
        """Raise `rate_limited` when the address or the key is over its rate."""
        if address is not None and not self.by_address.take(address):
            raise RateLimited(f"too many requests from {address}; slow down",
                              self.by_address.retry_after_ms(address))
        if key is not None and not self.by_key.take(key[:16]):
            # A key over its own rate does not also spend its address's, which others may share
            # (a NAT, a broker, the web page's host): the address's token goes back (review33).
            if address is not None:
                self.by_address.give_back(address)
            raise RateLimited("too many requests with this API key; slow down", self.by_key.retry_after_ms(key[:16]))

    def fresh_until(self, key: str) -> float:
        """When the gate's answer about `key` goes stale (time.monotonic): a connection that keeps
        its account between requests must ask again by then to honour KEY_TTL. Counting KEY_TTL
        from its own auth instead would let a revoked key work for up to twice KEY_TTL."""
        hit = self._cache.get(key)
        return (hit[1] if hit is not None else time.monotonic()) + KEY_TTL

    async def account(self, key: str | None) -> Account:
        """The account of an API key; `unauthorized` without a valid one."""
        if not key:
            raise CarbonxError("unauthorized", "this endpoint needs an API key: Authorization: Bearer <key>")
        hit = self._cache.get(key)
        now = time.monotonic()
        if hit is not None and now - hit[1] < KEY_TTL:
            return hit[0]
        if len(key) > 200:
            raise CarbonxError("unauthorized", "unknown or revoked API key")
        async with self.pool.acquire() as conn:
            acct = await account_for_key(conn, key)
        if acct is None:
            self._cache.pop(key, None)
            raise CarbonxError("unauthorized", "unknown or revoked API key")
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[key] = (acct, now)
        return acct


def bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None
