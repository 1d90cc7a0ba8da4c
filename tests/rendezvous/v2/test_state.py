"""The v2 registry: consent, TTL, per-family endpoints, bounds."""

from __future__ import annotations

import pytest

from rendezvous.v2.state import V2Registry

A, B, C = b"A" * 32, b"B" * 32, b"C" * 32
A4 = bytes([198, 51, 100, 1]) + (40000).to_bytes(2, "big")
A4b = bytes([198, 51, 100, 1]) + (40001).to_bytes(2, "big")
A6 = bytes.fromhex("20010db8000000000000000000000001") + (40000).to_bytes(2, "big")
B4 = bytes([203, 0, 113, 9]) + (51820).to_bytes(2, "big")
B6 = bytes.fromhex("20010db8000000000000000000000002") + (51820).to_bytes(2, "big")


def reg(**kw) -> V2Registry:
    return V2Registry(kw.pop("ttl", 10.0), kw.pop("max_peers", 100), **kw)


def test_consent_needs_the_peer_to_have_asked_for_me():
    r = reg()
    r.accept(A, A4, 1, 0, B, 0.0)
    assert not r.may_learn(A, B, 0.0)  # B unknown
    r.accept(B, B4, 1, 0, C, 0.0)
    assert not r.may_learn(A, B, 0.0)  # B registered but asked for C, not A
    assert r.may_learn(B, A, 0.0)  # consent is one-way: A asked for B, so B may learn A
    r.accept(B, B4, 2, 0, A, 1.0)
    assert r.may_learn(A, B, 1.0) and r.may_learn(B, A, 1.0)
    assert r.may_learn(C, B, 1.0)  # B asked for C too (at 0.0)
    assert not r.may_learn(b"D" * 32, B, 1.0)
    assert r.mutual_peers(A, 1.0) == [B] and r.mutual_peers(B, 1.0) == [A]  # C never asked


def test_consent_is_not_transferable_to_a_third_key():
    r = reg()
    r.accept(A, A4, 1, 0, B, 0.0)
    r.accept(B, B4, 1, 0, A, 0.0)
    r.accept(C, A4b, 1, 0, B, 0.0)
    assert not r.may_learn(C, B, 0.0)
    assert r.mutual_peers(B, 0.0) == [A]


def test_self_lookup_is_consented():
    r = reg()
    r.accept(A, A4, 1, 0, A, 0.0)
    assert r.may_learn(A, A, 0.0) and r.endpoints(A, 0.0) == (A4,)
    assert r.mutual_peers(A, 0.0) == []  # never a notification to oneself


def test_ttl_of_registration_and_of_ask():
    r = reg(ttl=10.0)
    r.accept(A, A4, 1, 0, B, 0.0)
    r.accept(B, B4, 1, 0, A, 0.0)
    assert r.may_learn(A, B, 9.9)
    assert not r.may_learn(A, B, 10.0)  # B's registration and ask both expired
    assert r.endpoints(B, 10.0) == ()


def test_an_ask_expires_even_while_the_asker_stays_registered():
    r = reg(ttl=10.0)
    r.accept(A, A4, 1, 0, B, 0.0)
    r.accept(B, B4, 1, 0, A, 0.0)
    r.accept(B, B4, 2, 0, C, 8.0)  # B keeps registering, but asks for C only
    assert r.may_learn(A, B, 9.0)
    assert not r.may_learn(A, B, 10.5) and r.endpoints(B, 10.5) == (B4,)


def test_families_are_registered_apart_ipv6_first_and_expire_apart():
    r = reg(ttl=10.0)
    r.accept(A, A4, 1, 0, B, 0.0)
    assert r.endpoints(A, 0.0) == (A4,)
    r.accept(A, A6, 2, 0, B, 5.0)
    assert r.endpoints(A, 5.0) == (A6, A4)
    assert r.destinations(A, 5.0) == ((A6, None), (A4, None))
    assert r.endpoints(A, 12.0) == (A6,)  # IPv4 registration not refreshed since 0.0
    assert r.accept(A, A4b, 3, 0, B, 12.0)  # changed: IPv4 back, from another port
    assert r.endpoints(A, 12.0) == (A6, A4b)
    assert not r.accept(A, A4b, 4, 0, B, 13.0)  # same endpoints: no change


def test_accept_reports_changes_of_endpoints():
    r = reg()
    assert r.accept(A, A4, 1, 0, B, 0.0)
    assert not r.accept(A, A4, 2, 0, B, 1.0)
    assert r.accept(A, A4b, 3, 0, B, 2.0)
    assert r.accept(A, A6, 4, 0, B, 3.0)


def test_local_address_is_kept_per_family():
    r = reg()
    r.accept(A, A4, 1, 0, B, 0.0, local=bytes([10, 0, 0, 1]))
    r.accept(A, A6, 2, 0, B, 0.0, local=bytes(15) + b"\1")
    assert r.destinations(A, 0.0) == ((A6, bytes(15) + b"\1"), (A4, bytes([10, 0, 0, 1])))


def test_timestamp_nat_and_told():
    r = reg()
    assert r.last_timestamp(A, 0.0) is None
    r.accept(A, A4, 12345, 7, B, 0.0)
    assert r.last_timestamp(A, 0.0) == 12345 and r.nat(A) == 7
    assert r.told(A, B) is None
    r.set_told(A, B, (B4,))
    assert r.told(A, B) == (B4,)
    r.set_told(A, C, (B4,))  # A never asked for C: nothing recorded
    assert r.told(A, C) is None


def test_timestamp_outlives_the_ttl_for_the_retention():
    r = reg(ttl=10.0, retention=300.0)
    r.accept(A, A4, 99, 0, B, 0.0)
    assert r.endpoints(A, 20.0) == ()
    assert r.last_timestamp(A, 299.0) == 99
    assert r.last_timestamp(A, 300.0) is None and len(r) == 0


def test_capacity_evicts_least_recently_refreshed():
    r = reg(max_peers=3)
    keys = [bytes([i]) * 32 for i in range(5)]
    for i, k in enumerate(keys[:3]):
        r.accept(k, A4, 1, 0, k, float(i))
    r.accept(keys[0], A4, 2, 0, keys[0], 3.0)  # refresh: keys[1] is now the oldest
    r.accept(keys[3], A4, 1, 0, keys[3], 4.0)
    assert len(r) == 3 and keys[1] not in r and keys[0] in r
    r.accept(keys[4], A4, 1, 0, keys[4], 5.0)
    assert keys[2] not in r and r.stats.evicted == 2


def test_capacity_prefers_expiring_to_evicting():
    r = reg(max_peers=2, ttl=10.0)
    r.accept(A, A4, 1, 0, A, 0.0)
    r.accept(B, B4, 1, 0, B, 8.0)
    r.accept(C, A4b, 1, 0, C, 11.0)
    assert A not in r and B in r and C in r
    assert r.stats.expired == 1 and r.stats.evicted == 0


def test_asks_per_client_are_bounded_lru():
    r = reg(max_asks_per_client=4)
    peers = [bytes([i]) * 32 for i in range(1, 7)]
    for i, p in enumerate(peers[:4]):
        r.accept(A, A4, i + 1, 0, p, 0.0)
    r.accept(A, A4, 10, 0, peers[0], 1.0)  # re-ask: peers[1] is now the oldest ask
    r.accept(A, A4, 11, 0, peers[4], 1.0)
    assert r.asked(A, peers[0], 1.0) and not r.asked(A, peers[1], 1.0)
    assert r.asks == 4 and r.stats.asks_evicted == 1


def test_expired_asks_are_dropped_before_fresh_ones():
    r = reg(max_asks_per_client=3, ttl=10.0, retention=100.0)
    r.accept(A, A4, 1, 0, B, 0.0)
    r.accept(A, A4, 2, 0, C, 11.0)
    assert r.asks == 1 and r.stats.asks_expired == 1  # the ask for B was swept


def test_total_asks_are_bounded_by_evicting_old_clients():
    r = reg(max_peers=100, max_asks_per_client=8, max_asks=16)
    for i in range(8):
        r.accept(A, A4, i + 1, 0, bytes([i]) * 32, 0.0)
    for i in range(8):
        r.accept(B, B4, i + 1, 0, bytes([i]) * 32, 1.0)
    assert r.asks == 16 and A in r
    r.accept(C, A4b, 1, 0, A, 2.0)
    assert A not in r and r.asks == 9 and r.stats.evicted == 1


def test_flood_of_distinct_keys_stays_bounded():
    r = reg(max_peers=1000, max_asks_per_client=4, ttl=60.0)
    for i in range(50_000):
        k = i.to_bytes(32, "big")
        r.accept(k, A4, 1, 0, (i + 1).to_bytes(32, "big"), i * 1e-3)
    assert len(r) == 1000 and r.asks == 1000
    assert r.stats.evicted == 49_000


def test_expire_has_a_budget_and_goes_oldest_first():
    r = reg(ttl=10.0)
    for i in range(10):
        r.accept(bytes([i]) * 32, A4, 1, 0, A, float(i))
    assert r.expire(15.0, budget=3) == 3
    assert bytes([0]) * 32 not in r and bytes([3]) * 32 in r
    assert r.expire(15.0) == 3  # keys 3, 4, 5 (seen at 3..5); 6.. still fresh
    assert len(r) == 4 and r.asks == 4


@pytest.mark.parametrize("bad", [b"", bytes(4), bytes(16), bytes(17), bytes(19)])
def test_source_of_wrong_length_is_refused(bad):
    with pytest.raises(ValueError, match="6 or 18 bytes"):
        reg().accept(A, bad, 1, 0, B, 0.0)


def test_would_change_predicts_what_accept_returns():
    import random
    rnd = random.Random(5)
    r = V2Registry(ttl=10.0, max_peers=8)
    keys = [bytes([i]) * 32 for i in range(5)]
    sources = [bytes([198, 51, 100, i, 0, 1]) for i in range(3)] + \
              [bytes(15) + bytes([i, 0, 1]) for i in range(3)]
    now, ts = 0.0, 1
    for _ in range(2000):
        now += rnd.choice((0.0, 0.5, 3.0, 11.0))
        ts += 1
        key, src = rnd.choice(keys), rnd.choice(sources)
        predicted = r.would_change(key, src, now)
        assert r.accept(key, src, ts, 0, rnd.choice(keys), now) == predicted
