"""The rate limiter's token buckets (api/auth.RateLimiter), as pure functions of time: a caller is
refused exactly when its bucket is empty, a refusal says how long to wait, and the table of
buckets stays bounded without costing a sweep per new caller when many callers come at once."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from api.auth import Gate, RateLimited, RateLimiter


def test_a_bucket_refuses_when_empty_and_says_how_long_to_wait():
    r = RateLimiter(rate=4, burst=2)
    assert [r.take("a", 0.0), r.take("a", 0.0), r.take("a", 0.0)] == [True, True, False]
    assert r.retry_after_ms("a") == 250
    assert not r.take("a", 0.2)
    assert r.retry_after_ms("a") == 50  # 0.8 of a request refilled; 0.2 to go at 4 a second
    assert r.take("a", 0.25)
    assert RateLimited("x", 1).retry_after == 1 and RateLimited("x", 1001).retry_after == 2


def test_refilled_buckets_are_forgotten_first_and_others_kept():
    r = RateLimiter(rate=1, burst=2, max_buckets=4)
    for k in "abc":
        r.take(k, 0.0)  # a, b and c are down to 1 of 2
    r.take("d", 5.0)  # at 5 s a, b and c are full again; d is down to 1
    r.take("e", 5.0)  # the table is full: a, b and c go (forgetting a full bucket changes nothing)
    assert set(r.buckets) == {"d", "e"}
    assert r.take("d", 5.0) and not r.take("d", 5.0)  # d kept what it had used


def test_a_crowd_of_new_callers_keeps_the_table_bounded_and_the_sweeps_rare():
    """10,000 addresses at once, none of them refilled: the table never holds more than its
    bound, the most recent callers keep their buckets, and a sweep comes once per half table."""
    r = RateLimiter(rate=0.001, burst=2, max_buckets=100)
    sweeps = 0
    forget = r._forget

    def counted(now: float) -> None:
        nonlocal sweeps
        sweeps += 1
        forget(now)

    r._forget = counted  # type: ignore[method-assign]
    for i in range(10_000):
        assert r.take(f"addr{i}", 1.0)
        assert len(r.buckets) <= 100
    assert sweeps <= 10_000 // 50 + 1, sweeps
    assert r.take("addr9999", 1.0) and not r.take("addr9999", 1.0)  # the newest kept its count


@given(st.lists(st.tuples(st.integers(0, 30), st.sampled_from([0.0, 0.05, 0.5, 3.0])), max_size=300))
def test_a_bounded_table_answers_as_an_unbounded_one_while_it_only_forgets_refilled_buckets(ops):
    """Forgetting a refilled bucket is invisible: until a sweep has to drop a bucket still in
    use, the bounded limiter's every answer equals the unbounded one's."""
    bounded = RateLimiter(rate=1, burst=2, max_buckets=16)
    unbounded = RateLimiter(rate=1, burst=2, max_buckets=10**9)
    now = 0.0
    for key, dt in ops:
        now += dt
        in_use = sum(1 for b in bounded.buckets.values() if b.tokens + (now - b.at) * bounded.rate < bounded.burst)
        if len(bounded.buckets) >= 16 and in_use > 8 and str(key) not in bounded.buckets:
            break  # this take's sweep drops buckets in use: answers may differ from here on
        assert bounded.take(str(key), now) == unbounded.take(str(key), now)
        assert len(bounded.buckets) <= 16


def test_a_key_over_its_rate_does_not_spend_its_addresss():
    """A member past its own key's rate is refused without taking a token from its address, which
    others may share; it drained the address's bucket too (review33)."""
    gate = Gate.__new__(Gate)  # the limits only: no database
    gate.by_key, gate.by_address = RateLimiter(rate=1e-9, burst=2), RateLimiter(rate=1e-9, burst=4)
    for _ in range(2):
        gate.admit("10.0.0.1", "cx_member-key-aaaaaaaa")
    for _ in range(10):
        try:
            gate.admit("10.0.0.1", "cx_member-key-aaaaaaaa")
        except RateLimited as e:
            assert "API key" in e.message
    for _ in range(2):  # a neighbour behind the same address still has the 2 the member left
        gate.admit("10.0.0.1", "cx_neighbour-key-bbbbb")
    try:
        gate.admit("10.0.0.1", "cx_neighbour-key-bbbbb")
        raise AssertionError("the address's bucket should be empty now")
    except RateLimited as e:
        assert "from 10.0.0.1" in e.message
