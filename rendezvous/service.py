"""The classic rendezvous service: one datagram in, at most one reply out.

Pure: ``handle(data, source, now)`` takes the request bytes, the packed source endpoint
(4-byte IPv4 + 2-byte port, network order, exactly as it sits in a ``sockaddr_in``) and
the time, and returns the reply bytes or ``None`` for no reply. All policy lives here;
the socket code only moves bytes.

Differences from the upstream example, on purpose:
- an all-zero ``my_pubkey`` registers nothing and gets no reply;
- a datagram that is not exactly 64 bytes is dropped (and counted);
- sources over their rate limit are dropped (and counted);
- a reply is never longer than the request (6 or 0 bytes for a 64-byte request).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .classic import KEY_LEN, REQUEST_LEN, ZERO_KEY
from .ratelimit import RateLimiter
from .registry import Registry

__all__ = ["Config", "Counters", "Service"]


@dataclass(frozen=True)
class Config:
    ttl: float = 180.0
    max_peers: int = 1_000_000
    rate: float = 200.0
    burst: float = 400.0


@dataclass
class Counters:
    requests: int = 0
    found: int = 0
    not_found: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: {"length": 0, "zero_key": 0})


class Service:
    def __init__(self, config: Config = Config()) -> None:
        self.config = config
        self.registry = Registry(config.ttl, config.max_peers)
        self.limiter = RateLimiter(config.rate, config.burst)
        self.counters = Counters()

    def handle(self, data: bytes, source: bytes, now: float) -> bytes | None:
        c = self.counters
        if len(data) != REQUEST_LEN:
            c.dropped["length"] += 1
            return None
        if not self.limiter.allow(source[:4], now):
            return None
        my_key = data[:KEY_LEN]
        if my_key == ZERO_KEY:
            c.dropped["zero_key"] += 1
            return None
        c.requests += 1
        self.registry.upsert(my_key, source, now)
        endpoint = self.registry.lookup(data[KEY_LEN:], now)
        if endpoint is None:
            c.not_found += 1
            return b""
        c.found += 1
        return endpoint

    def tick(self, now: float) -> None:
        """Housekeeping between batches: expire a bounded number of stale entries."""
        self.registry.expire(now, budget=10_000)

    def sweep(self, now: float) -> None:
        """Occasional housekeeping: forget idle rate-limit buckets."""
        self.limiter.sweep(now)

    def snapshot(self) -> dict[str, int]:
        c, r = self.counters, self.registry.stats
        return {
            "requests": c.requests,
            "found": c.found,
            "not_found": c.not_found,
            **{f"dropped_{k}": v for k, v in c.dropped.items()},
            "rate_limited": self.limiter.limited,
            "evicted": r.evicted,
            "expired": r.expired,
            "peers": len(self.registry),
        }
