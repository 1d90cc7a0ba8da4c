"""The batch path against the per-datagram path: same replies, counters and state.

The rule under test (rendezvous/batch.py): whenever ``ClassicBatch.handle`` answers a
batch, the result equals ``Service.handle`` called once per request in order; when it
declines, nothing has changed. Random batches are built to hit every reason to decline
(zero keys, a key registered and looked up in one batch, stale entries, clock jumps,
evictions at a small capacity, rate-limited sources) as well as the bulk path itself.
"""

from __future__ import annotations

import copy
import random

import pytest

from rendezvous.batch import ClassicBatch, PackedReplies, split_keys
from rendezvous.classic import ZERO_KEY
from rendezvous.service import Config, Service


def state(s: Service) -> tuple:
    """Everything observable about a service (and the registry's exact order)."""
    r = s.registry
    stats = {k: v for k, v in vars(r.stats).items() if k != "compactions"}
    return (s.snapshot(), list(r._d.items()), r._now_tick, r._ops, stats,
            dict(s.limiter._tat), s.limiter.limited, s.limiter.forgotten)


def one_by_one(s: Service, requests: list[bytes], sources: list[bytes],
               now: float) -> list[bytes | None]:
    return [s.handle(q, src, now) for q, src in zip(requests, sources)]


def run(batcher: ClassicBatch, requests: list[bytes], sources: list[bytes],
        now: float) -> tuple[list[bytes | None], bool]:
    """The batch path as the server uses it: in bulk, or one by one if it declines."""
    before = copy.deepcopy(state(batcher.service))
    res = batcher.handle(b"".join(requests), b"".join(sources), now)
    if res is None:
        assert state(batcher.service) == before, "declined but changed something"
        return one_by_one(batcher.service, requests, sources, now), False
    assert isinstance(res, PackedReplies)
    replies = res.replies()
    assert len(replies) == len(requests)
    return list(replies), True


class Scenario:
    def __init__(self, rng: random.Random, keys: int, ips: int) -> None:
        self.rng = rng
        self.keys = [ZERO_KEY] + [rng.randbytes(32) for _ in range(keys)]
        self.ips = [rng.randbytes(4) for _ in range(ips)]

    def source(self) -> bytes:
        rng = self.rng
        if rng.random() < 0.002:
            return bytes(6)  # 0.0.0.0:0: stored as the value 0 at tick 0
        return rng.choice(self.ips) + rng.randrange(1 << 16).to_bytes(2, "big")

    def batch(self) -> tuple[list[bytes], list[bytes]]:
        rng = self.rng
        n = rng.choice([1, 2, 3, 5, 8, 17, 40, 64])
        # mostly: a few clients asking for many other keys (the bulk path's common case)
        clients = rng.sample(self.keys[1:], k=min(3, len(self.keys) - 1))
        others = [k for k in self.keys[1:] if k not in clients]
        reqs, srcs = [], []
        for _ in range(n):
            mine = rng.choice(clients)
            theirs = rng.choice(others)
            x = rng.random()
            if x < 0.01:
                mine = ZERO_KEY
            elif x < 0.02:
                theirs = ZERO_KEY
            elif x < 0.03:
                theirs = mine  # self lookup
            elif x < 0.04:
                theirs = rng.choice(clients)  # another client in the same batch
            elif x < 0.06:
                mine = rng.choice(self.keys)
                theirs = rng.choice(self.keys)
            reqs.append(mine + theirs)
            srcs.append(self.source())
        return reqs, srcs


CONFIGS = [
    Config(ttl=10, max_peers=1000, rate=0, burst=0),
    Config(ttl=10, max_peers=12, rate=0, burst=0),     # evictions
    Config(ttl=5, max_peers=40, rate=20, burst=30),    # rate limits
    Config(ttl=10, max_peers=3, rate=50, burst=1),     # both, burst of one
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"cap{c.max_peers}-rate{c.rate:g}")
@pytest.mark.parametrize("seed", range(4))
def test_batch_equals_one_by_one(config: Config, seed: int) -> None:
    rng = random.Random(seed * 1000 + config.max_peers)
    sc = Scenario(rng, keys=24, ips=4)
    fast, slow = ClassicBatch(Service(config)), Service(config)
    now = 100.0
    bulk = declined = 0
    for _ in range(1500):
        x = rng.random()
        now += (rng.random() * 0.05 if x < 0.9 else rng.random() * config.ttl if x < 0.995
                else 3.2 * config.ttl)
        reqs, srcs = sc.batch()
        got, in_bulk = run(fast, reqs, srcs, now)
        want = one_by_one(slow, reqs, srcs, now)
        assert got == want
        assert state(fast.service) == state(slow), (reqs, srcs, now)
        bulk += in_bulk
        declined += not in_bulk
        if rng.random() < 0.3:  # the server's housekeeping between batches
            budget = rng.choice([1, 10_000])
            fast.service.registry.expire(now, budget)
            slow.registry.expire(now, budget)
    # both paths were exercised (and the bulk one is the common one)
    assert bulk > 10 and declined > 10, (bulk, declined)


def test_replies_and_counters_of_a_plain_batch() -> None:
    s = Service(Config(rate=0))
    a, b, c = b"A" * 32, b"B" * 32, b"C" * 32
    src_a, src_b = bytes([198, 51, 100, 1, 0x9C, 0x40]), bytes([203, 0, 113, 9, 0xCA, 0x6C])
    assert s.handle(b + a, src_b, 0.0) == b""
    res = ClassicBatch(s).handle(a + b + a + c + a + b, src_a * 3, 1.0)
    assert res is not None and res.replies() == [src_b, b"", src_b]
    assert res.lengths == [6, 0, 6]
    snap = s.snapshot()
    assert (snap["requests"], snap["found"], snap["not_found"], snap["peers"]) == (4, 2, 2, 2)
    assert s.registry.stats.refreshed == 2 and s.registry.stats.inserted == 2


def test_declines_without_changing_anything() -> None:
    s = Service(Config(rate=0))
    a, b = b"A" * 32, b"B" * 32
    src = bytes([198, 51, 100, 1, 0x9C, 0x40])
    batcher = ClassicBatch(s)
    assert batcher.handle(ZERO_KEY + a, src, 0.0) is None
    assert batcher.handle(a + b + b + a, src * 2, 0.0) is None  # a and b ask for each other
    assert batcher.handle(a + a, src, 0.0) is None  # self lookup
    assert s.snapshot()["requests"] == 0 and len(s.registry) == 0


A, B, C, D, E = (bytes([x]) * 32 for x in b"ABCDE")
SRC = bytes([198, 51, 100, 1, 0x9C, 0x40])


def declines(s: Service, requests: bytes, sources: bytes, now: float) -> bool:
    before = copy.deepcopy(state(s))
    res = ClassicBatch(s).handle(requests, sources, now)
    assert state(s) == before or res is not None
    return res is None


def test_declines_when_an_entry_is_stale() -> None:
    s = Service(Config(ttl=10, rate=0))
    s.handle(A + B, SRC, 0.0)
    assert declines(s, C + D, SRC, 10.0)  # A is stale: a sweep or lookup would delete it
    s.registry.expire(10.0)
    assert not declines(s, C + D, SRC, 10.0)


def test_declines_when_the_clock_jumps_three_ttl() -> None:
    s = Service(Config(ttl=10, rate=0))
    s.handle(A + B, SRC, 0.0)
    s.registry.expire(9.0)
    assert declines(s, C + D, SRC, 30.0)


def test_declines_when_a_new_key_would_evict() -> None:
    s = Service(Config(max_peers=2, rate=0))
    s.handle(A + B, SRC, 0.0)
    assert not declines(s, B + C + B + D, SRC * 2, 1.0)  # A, B: full, no eviction
    assert declines(s, C + D, SRC, 1.0)
    assert not declines(s, A + D, SRC, 1.0)  # a refresh needs no room


def test_declines_when_a_source_would_be_limited() -> None:
    s = Service(Config(rate=1, burst=3))
    other = bytes([203, 0, 113, 9, 0, 1])
    assert declines(s, (A + B) * 4, SRC * 4, 0.0)  # the 4th would be over the burst
    assert not declines(s, (A + B) * 3 + C + D, SRC * 3 + other, 0.0)
    assert declines(s, C + D, other[:4] + b"\0\2", 0.0) is False  # another source
    assert s.limiter.limited == 0


def test_declines_when_a_value_looks_absent() -> None:
    s = Service(Config(ttl=1024, rate=0))
    s.handle(A + B, bytes(6), 0.0)  # registered at 0.0.0.0:0 at tick 0: the value 0
    assert declines(s, C + A, SRC, 0.5)
    assert s.handle(C + A, SRC, 0.5) == bytes(6)


def test_bad_sizes_are_a_caller_error() -> None:
    batcher = ClassicBatch(Service())
    with pytest.raises(ValueError, match="64 bytes per request"):
        batcher.handle(bytes(65), bytes(6), 0.0)
    with pytest.raises(ValueError, match="6 per source"):
        batcher.handle(bytes(64), bytes(4), 0.0)


def test_declines_when_classic_is_off() -> None:
    # --no-classic / --require-auth: the bulk path must not answer what the service drops
    s = Service(Config(rate=0, classic=False))
    assert declines(s, A + B + B + C, SRC * 2, 0.0)
    assert [s.handle(A + B, SRC, 0.0), s.handle(B + C, SRC, 0.0)] == [None, None]
    assert s.snapshot()["dropped_classic_off"] == 2 and len(s.registry) == 0


def test_in_place_and_moving_refreshes_leave_the_same_order() -> None:
    # ttl 1024: a tick is 1 s. A was refreshed in this tick (stays in place, even with a
    # new endpoint), B in an earlier one (moves to the back), E is new (appended); the
    # batch path must leave the registry exactly as the calls one by one do.
    src2 = bytes([203, 0, 113, 9, 0, 7])
    fast, slow = Service(Config(ttl=1024, rate=0)), Service(Config(ttl=1024, rate=0))
    for s in (fast, slow):
        s.handle(B + C, SRC, 0.5)
        s.handle(C + D, SRC, 1.2)
        s.handle(A + D, SRC, 1.3)
    reqs = [B + C, A + C, E + D, A + D, B + D]
    srcs = [SRC, src2, SRC, SRC, src2]
    got, in_bulk = run(ClassicBatch(fast), reqs, srcs, 1.7)
    assert in_bulk and got == one_by_one(slow, reqs, srcs, 1.7)
    assert state(fast) == state(slow)
    assert list(fast.registry._d) == [C, A, B, E]
    assert fast.handle(D + A, SRC, 1.7) == SRC


def test_split_keys_gives_each_request_s_two_keys_in_order():
    reqs = [(bytes([i]) * 32, bytes([100 + i]) * 32) for i in range(5)]
    mine, theirs = split_keys(b"".join(m + t for m, t in reqs))
    assert list(mine) == [m for m, _ in reqs] and list(theirs) == [t for _, t in reqs]
    assert split_keys(memoryview(bytearray(64))) == ((bytes(32),), (bytes(32),))
    assert split_keys(b"") == ((), ())
