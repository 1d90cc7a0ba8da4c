import os
import random
import sys

import pytest

from rendezvous.registry import Registry

EP1 = bytes([198, 51, 100, 1, 0xCA, 0x6C])
EP2 = bytes([198, 51, 100, 2, 0x12, 0x34])


def key(i: int) -> bytes:
    return i.to_bytes(32, "big")


def test_upsert_then_lookup():
    r = Registry(ttl=180, max_peers=10)
    assert r.lookup(key(1), 0.0) is None
    r.upsert(key(1), EP1, 0.0)
    assert r.lookup(key(1), 1.0) == EP1
    assert len(r) == 1 and r.stats.inserted == 1


def test_refresh_moves_endpoint():
    r = Registry(ttl=180, max_peers=10)
    r.upsert(key(1), EP1, 0.0)
    r.upsert(key(1), EP2, 1.0)
    assert r.lookup(key(1), 2.0) == EP2
    assert len(r) == 1 and r.stats.refreshed == 1


def test_expiry_after_ttl_without_refresh():
    r = Registry(ttl=10, max_peers=10)
    r.upsert(key(1), EP1, 0.0)
    assert r.lookup(key(1), 9.9) == EP1
    assert r.lookup(key(1), 10.0) is None
    assert key(1) not in r and r.stats.expired == 1


def test_refresh_postpones_expiry():
    r = Registry(ttl=10, max_peers=10)
    r.upsert(key(1), EP1, 0.0)
    r.upsert(key(1), EP1, 8.0)
    assert r.lookup(key(1), 17.0) == EP1
    assert r.lookup(key(1), 18.5) is None


def test_expire_sweeps_oldest_first_and_stops_at_fresh():
    r = Registry(ttl=10, max_peers=100)
    for i in range(5):
        r.upsert(key(i), EP1, float(i))
    r.upsert(key(0), EP1, 6.0)  # key 0 refreshed: now the newest
    assert r.expire(12.5) == 2  # keys 1 and 2 (refreshed at 1, 2)
    assert sorted(int.from_bytes(k, "big") for k in r._d) == [0, 3, 4]
    assert r.expire(12.5) == 0
    assert r.expire(100.0) == 3 and len(r) == 0


def test_expire_budget():
    r = Registry(ttl=10, max_peers=100)
    for i in range(10):
        r.upsert(key(i), EP1, 0.0)
    assert r.expire(15.0, budget=3) == 3
    assert len(r) == 7


def test_idle_for_three_ttl_forgets_everything():
    """Ages are kept modulo 4 ttl; after 3 ttl without any call every entry is stale."""
    r = Registry(ttl=10, max_peers=100)
    for i in range(5):
        r.upsert(key(i), EP1, 0.0)
    assert r.lookup(key(1), 30.5) is None
    assert len(r) == 0 and r.stats.expired == 5


def test_ages_stay_exact_across_tick_wraparound():
    """Refreshing for many ttl periods (the 12-bit tick wraps every 4 ttl) keeps working."""
    r = Registry(ttl=10, max_peers=100)
    t = 0.0
    for i in range(200):  # 600 s = 60 ttl: the tick wraps 15 times
        t += 3.0
        r.upsert(key(1), EP1, t)
        if i < 150:
            r.upsert(key(2), EP2, t)
            last2 = t
        assert r.lookup(key(1), t + 2.9) == EP1
        want = EP2 if t + 2.9 - last2 < 10 else None
        assert r.lookup(key(2), t + 2.9) == want, (i, t)


def test_expiry_resolution_is_ttl_over_1024():
    r = Registry(ttl=1024, max_peers=10)
    r.upsert(key(1), EP1, 0.0)
    assert r.lookup(key(1), 1023.99) == EP1
    assert r.lookup(key(1), 1024.0) is None


def test_refresh_within_one_tick_stays_in_place():
    """A key refreshed again in the tick of its last refresh keeps its place (eviction
    order is LRU at the resolution of one tick): key 1 is still the oldest, is evicted,
    and its in-place refresh did not invalidate the snapshot of the oldest keys."""
    r = Registry(ttl=1000, max_peers=2)
    r.upsert(key(1), EP1, 5.0)
    r.upsert(key(2), EP1, 5.0)
    assert r.oldest() == key(1)  # a snapshot is taken now
    r.upsert(key(1), EP2, 5.0)   # same tick (ttl/1024 = 0.98 s), another endpoint
    assert r.lookup(key(1), 5.0) == EP2 and r.stats.refreshed == 1
    assert r.oldest() == key(1)
    r.upsert(key(3), EP1, 5.0)
    assert key(1) not in r and key(2) in r and r.stats.evicted == 1


def test_refresh_in_a_later_tick_moves_to_the_back():
    r = Registry(ttl=1000, max_peers=2)
    r.upsert(key(1), EP1, 5.0)
    r.upsert(key(2), EP1, 5.0)
    assert r.oldest() == key(1)  # a snapshot is taken now
    r.upsert(key(1), EP1, 6.0)   # the next tick: the snapshot entry is stale
    assert r.oldest() == key(2)
    r.upsert(key(3), EP1, 6.0)
    assert key(2) not in r and key(1) in r


def test_eviction_is_least_recently_refreshed():
    r = Registry(ttl=1000, max_peers=3)
    r.upsert(key(1), EP1, 0.0)
    r.upsert(key(2), EP1, 1.0)
    r.upsert(key(3), EP1, 2.0)
    r.upsert(key(1), EP2, 3.0)  # refresh: key 2 is now the oldest
    assert r.oldest() == key(2)
    r.upsert(key(4), EP1, 4.0)
    assert key(2) not in r and len(r) == 3 and r.stats.evicted == 1
    r.upsert(key(5), EP1, 5.0)
    assert key(3) not in r
    assert {key(1), key(4), key(5)} == set(r._d)


def test_full_table_prefers_expiring_to_evicting():
    r = Registry(ttl=10, max_peers=2)
    r.upsert(key(1), EP1, 0.0)
    r.upsert(key(2), EP1, 5.0)
    r.upsert(key(3), EP1, 11.0)  # key 1 has expired: no eviction needed
    assert r.stats.evicted == 0 and r.stats.expired == 1
    assert key(2) in r and key(3) in r


def test_same_time_keeps_insertion_order():
    r = Registry(ttl=1000, max_peers=2)
    r.upsert(key(1), EP1, 1.0)
    r.upsert(key(2), EP1, 1.0)
    r.upsert(key(3), EP1, 1.0)
    assert key(1) not in r and key(2) in r
    r.upsert(key(2), EP1, 1.0)  # same tick: stays in place
    r.upsert(key(4), EP1, 1.0)
    assert key(2) not in r and {key(3), key(4)} == set(r._d)


def test_clock_going_backwards_does_not_break_order():
    r = Registry(ttl=1000, max_peers=2)
    r.upsert(key(1), EP1, 50.0)
    r.upsert(key(2), EP1, 10.0)
    r.upsert(key(3), EP1, 20.0)
    assert key(1) not in r


def test_capacity_one():
    r = Registry(ttl=100, max_peers=1)
    r.upsert(key(1), EP1, 0.0)
    r.upsert(key(2), EP2, 1.0)
    assert len(r) == 1 and r.lookup(key(2), 1.0) == EP2


@pytest.mark.parametrize("ttl,cap", [(0, 1), (-1, 1), (1, 0)])
def test_bad_config(ttl, cap):
    with pytest.raises(ValueError):
        Registry(ttl=ttl, max_peers=cap)


def test_matches_reference_model_under_random_churn():
    """Against a plain reference model (a list ordered by refresh), for exact LRU and TTL."""
    rng = random.Random(7)
    r = Registry(ttl=50, max_peers=40)
    model: dict[bytes, tuple[bytes, float]] = {}
    now = 0.0
    for _ in range(20_000):
        now += rng.random()
        k = key(rng.randrange(80))
        if rng.random() < 0.6:
            ep = os.urandom(6)
            r.upsert(k, ep, now)
            if k not in model:
                for old in [o for o, (_, t) in model.items() if now - t >= 50]:
                    del model[old]
                while len(model) >= 40:
                    del model[min(model, key=lambda o: model[o][1])]
            model[k] = (ep, now)
        else:
            got = r.lookup(k, now)
            want = model.get(k)
            if want is not None and now - want[1] >= 50:
                del model[k]
                want = None
            assert got == (want[0] if want else None)
        assert len(r) <= 40
    live = {k for k, (_, t) in model.items() if now - t < 50}
    assert live <= set(r._d)


def test_refresh_churn_keeps_the_table_compact():
    """Re-insertion leaves dead slots; the table must not grow past what CPython sizes
    for the live entries (the memory budget depends on it)."""
    r = Registry(ttl=1e9, max_peers=10**6)
    keys = [os.urandom(32) for _ in range(5000)]
    for k in keys:
        r.upsert(k, EP1, 0.0)
    fresh_size = sys.getsizeof(dict.fromkeys(keys, 1))
    for rnd in range(20):
        for k in keys:
            r.upsert(k, EP2, 1.0 + rnd)
    assert sys.getsizeof(r._d) <= fresh_size
    assert r.stats.compactions > 0
