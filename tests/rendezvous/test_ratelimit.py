import pytest

from rendezvous.ratelimit import RateLimiter

SRC = b"\x0a\x00\x00\x01"


def test_burst_then_rate():
    rl = RateLimiter(rate=10, burst=5)
    assert all(rl.allow(SRC, 0.0) for _ in range(5))
    assert not rl.allow(SRC, 0.0)
    assert rl.limited == 1
    assert rl.allow(SRC, 0.1)  # one token back after 1/rate
    assert not rl.allow(SRC, 0.1)


def test_sustained_rate_is_enforced():
    rl = RateLimiter(rate=100, burst=10)
    allowed = sum(rl.allow(SRC, i / 1000) for i in range(10_000))  # 1000/s for 10 s
    assert 1000 <= allowed <= 1011


def test_sources_are_independent():
    rl = RateLimiter(rate=1, burst=1)
    assert rl.allow(b"a", 0.0) and rl.allow(b"b", 0.0)
    assert not rl.allow(b"a", 0.0)


def test_disabled():
    rl = RateLimiter(rate=0, burst=0)
    assert all(rl.allow(SRC, 0.0) for _ in range(10_000))
    assert len(rl) == 0


def test_sweep_forgets_idle_sources_only():
    rl = RateLimiter(rate=1, burst=3)
    rl.allow(b"idle", 0.0)
    for _ in range(3):
        rl.allow(b"busy", 10.0)
    assert rl.sweep(10.0) == 1
    assert len(rl) == 1 and not rl.allow(b"busy", 10.0)


def test_bounded_memory_under_spoofed_flood():
    rl = RateLimiter(rate=1, burst=1, max_sources=100)
    for i in range(10_000):
        assert rl.allow(i.to_bytes(4, "big"), 0.0)
    assert len(rl) <= 100


@pytest.mark.parametrize("rate,burst", [(-1, 1), (1, -1), (1, 0.5)])
def test_bad_config(rate, burst):
    with pytest.raises(ValueError):
        RateLimiter(rate, burst)


def test_plan_all_matches_allow_one_by_one():
    """plan_all + commit leaves the same buckets as allow() per request, or changes
    nothing when some request would be limited."""
    import random
    rng = random.Random(5)
    srcs = [bytes([10, 0, 0, i]) for i in range(4)]
    bulk, one = RateLimiter(rate=50, burst=6), RateLimiter(rate=50, burst=6)
    now = 0.0
    planned = refused = 0
    for _ in range(3000):
        now += rng.random() * 0.05
        counts: dict[bytes, int] = {}
        for _ in range(rng.randrange(1, 8)):
            s = rng.choice(srcs)
            counts[s] = counts.get(s, 0) + 1
        before = dict(bulk._tat)
        plan = bulk.plan_all(counts, now)
        if plan is None:
            refused += 1
            assert bulk._tat == before and bulk.limited == 0
            probe = RateLimiter(rate=50, burst=6)
            probe._tat = dict(one._tat)
            assert not all(probe.allow(s, now) for s, c in counts.items() for _ in range(c))
            continue
        planned += 1
        bulk.commit(plan)
        assert all(one.allow(s, now) for s, c in counts.items() for _ in range(c))
        assert bulk._tat == one._tat
    assert planned > 500 and refused > 100


def test_plan_all_refuses_what_would_clear_the_table():
    rl = RateLimiter(rate=10, burst=5, max_sources=2)
    assert rl.plan_all({b"a": 1, b"b": 1}, 0.0) is not None
    assert rl.plan_all({b"a": 1, b"b": 1, b"c": 1}, 0.0) is None
