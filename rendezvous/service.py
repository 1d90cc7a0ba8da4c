"""The rendezvous service: one datagram in, at most one reply out.

Pure: ``handle(data, source, now)`` takes the request bytes, the packed source endpoint
(4-byte IPv4 + 2-byte port, network order, exactly as it sits in a ``sockaddr_in``; or
16-byte IPv6 + 2-byte port) and the time, and returns the reply bytes or ``None`` for no
reply. All policy lives here; the socket code only moves bytes.

Dispatch: a datagram of exactly 64 bytes is classic (when classic is on and the source
is IPv4; classic over IPv6 is dropped and counted); one that looks like v2 goes to
:class:`rendezvous.v2.service.V2Service` when the server has a key; anything else is
dropped and counted by reason. The per-source rate limit comes after these length and
header checks and before any table lookup or cryptography (IPv6 sources are limited per
/64, the smallest block one host gets). v2 may queue notifications for other clients:
the shell takes them with :meth:`Service.drain_notifications` after each call or batch.

Differences from the upstream example, on purpose:
- an all-zero ``my_pubkey`` registers nothing and gets no reply;
- a datagram that is not exactly 64 bytes is dropped (and counted);
- sources over their rate limit are dropped (and counted);
- a reply is never longer than the request (6 or 0 bytes for a 64-byte request).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from .classic import KEY_LEN, REQUEST_LEN, ZERO_KEY
from .ratelimit import RateLimiter
from .registry import Registry
from .relay import RelayConfig
from .store import ScriptMissing, SharedStore, StoreError, classic_payload, classic_values, script_load
from .v2.crypto import ServerCrypto
from .v2.service import Notification, V2Config, V2Service
from .v2.wire import looks_like_v2

__all__ = ["Config", "Counters", "Notification", "Service"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Config:
    ttl: float = 180.0
    max_peers: int = 1_000_000
    rate: float = 200.0
    burst: float = 400.0
    classic: bool = True
    max_skew: float = 300.0  # v2 timestamp window, seconds; 0 = none
    notify_rate: float = 10.0  # v2 notifications per second per notified key; 0 = no limit
    notify_burst: float = 20.0
    new_key_rate: float = 5000.0  # v2 keys not cached, derived per second; 0 = no limit
    new_key_burst: float = 10000.0
    relay: RelayConfig | None = None  # v2 relay fallback; None = off
    relay_addresses: tuple[bytes, ...] = ()  # where clients reach the relay (packed)


@dataclass
class Counters:
    requests: int = 0
    found: int = 0
    not_found: int = 0
    probes: int = 0          # self-lookups answered on the probe port(s)
    probe_refused: int = 0   # probe-port datagrams that were not a self-lookup
    store_unavailable: int = 0  # requests answered from the own table: store down
    store_errors: int = 0       # store replies that made no sense (logged)
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("length", "zero_key", "classic_off", "classic_ipv6", "v2_off"), 0))


class Service:
    """CRYPTO (the server's key) enables v2; ``config.classic`` the classic protocol.

    STORE (``--store``, :mod:`rendezvous.store`) shares the tables with other servers:
    every registration is also written there and lookups are answered from there first
    (then from this server's own table, which also answers alone while the store is
    unavailable). Without a store the service is pure; with one, :meth:`handle` does one
    round trip to the store per admitted request (batches: :mod:`rendezvous.sharedbatch`).
    """

    def __init__(self, config: Config = Config(), crypto: ServerCrypto | None = None,
                 store: SharedStore | None = None) -> None:
        self.config = config
        self.store = store
        self._ttl_ms = max(1, int(config.ttl * 1000))
        self.registry = Registry(config.ttl, config.max_peers)
        self.limiter = RateLimiter(config.rate, config.burst)
        self.counters = Counters()
        self.classic = config.classic
        self.v2 = None if crypto is None else V2Service(V2Config(
            ttl=config.ttl, max_peers=config.max_peers, max_skew=config.max_skew,
            notify_rate=config.notify_rate, notify_burst=config.notify_burst,
            new_key_rate=config.new_key_rate, new_key_burst=config.new_key_burst,
            relay=config.relay, relay_addresses=config.relay_addresses), crypto, store)
        self.wall_offset_ns = 0  # wall clock minus ``now``, in ns: see set_wall_clock

    def set_wall_clock(self, now: float, wall_ns: int) -> None:
        """Tell the service the wall-clock time (ns since the epoch) at monotonic NOW,
        for calls of :meth:`handle` that do not pass ``wall_ns``."""
        self.wall_offset_ns = wall_ns - int(now * 1e9)

    def handle(self, data: bytes, source: bytes, now: float, local: bytes | None = None,
               wall_ns: int | None = None) -> bytes | None:
        """LOCAL: the server address the datagram arrived at (4 or 16 bytes), if known;
        WALL_NS: the wall-clock time (default: from :meth:`set_wall_clock`)."""
        c = self.counters
        if len(data) != REQUEST_LEN:
            return self._other(data, source, now, local, wall_ns)
        if not self._classic_admitted(source, now):
            return None
        my_key = data[:KEY_LEN]
        if my_key == ZERO_KEY:
            c.dropped["zero_key"] += 1
            return None
        c.requests += 1
        self.registry.upsert(my_key, source, now)
        endpoint = None
        if self.store is not None:
            endpoint = self.shared_lookups([my_key], source, [data[KEY_LEN:]])[0]
        if endpoint is None:
            endpoint = self.registry.lookup(data[KEY_LEN:], now)
        if endpoint is None:
            c.not_found += 1
            return b""
        c.found += 1
        return endpoint

    def shared_lookups(self, keys: Sequence[bytes], endpoints: bytes | bytearray,
                       lookups: Sequence[bytes]) -> list[bytes | None]:
        """Write KEYS at ENDPOINTS (6 bytes each, back to back) to the store and read
        LOOKUPS from it, in one round trip; None for a key the store does not hold, or
        for all of them when the store is unavailable or answers nonsense (counted; the
        caller then uses the own table)."""
        store = self.store
        assert store is not None
        payload = classic_payload(store.keys, keys, endpoints, lookups, self._ttl_ms)
        for attempt in (0, 1):
            replies = store.execute_raw(payload, 1)
            if replies is None:
                self.counters.store_unavailable += 1
                return [None] * len(lookups)
            try:
                return classic_values(replies[0], len(lookups))
            except ScriptMissing:
                if attempt or store.execute([script_load()]) is None:
                    break  # loaded, and still missing (or the store went away)
            except StoreError as e:
                log.warning("store: %s", e)
                break
        self.counters.store_errors += 1
        return [None] * len(lookups)

    def _classic_admitted(self, source: bytes, now: float) -> bool:
        """May a classic request from SOURCE go on? Classic must be on, the source IPv4
        (a classic reply cannot carry IPv6), and the source within its rate limit; each
        refusal is counted."""
        if not self.classic:
            self.counters.dropped["classic_off"] += 1
            return False
        if len(source) != 6:
            self.counters.dropped["classic_ipv6"] += 1
            return False
        return self.limiter.allow(source[:4], now)

    def probe(self, data: bytes, source: bytes, now: float, local: bytes | None = None,
              wall_ns: int | None = None) -> bytes | None:
        """A datagram that arrived at a probe port (``wg-rendezvous --probe-port``): only
        self-lookups are answered, with the source as observed here, and nothing is
        registered, so a mapping a client's NAT made just for the probe never reaches
        its peers. Classic: a 64-byte request whose two keys are equal gets the 6-byte
        source back. v2: see :meth:`rendezvous.v2.service.V2Service.probe`. The same
        per-source rate limit applies."""
        c = self.counters
        if len(data) == REQUEST_LEN:
            if not self._classic_admitted(source, now):
                return None
            if data[:KEY_LEN] == ZERO_KEY or data[:KEY_LEN] != data[KEY_LEN:]:
                c.probe_refused += 1
                return None
            c.probes += 1
            return source
        wall_ns = self._v2_admitted(data, source, now, wall_ns)
        if wall_ns is None:
            return None
        reply = self.v2.probe(data, source, wall_ns, now)
        if reply is None:
            c.probe_refused += 1
        else:
            c.probes += 1
        return reply

    def _other(self, data: bytes, source: bytes, now: float, local: bytes | None,
               wall_ns: int | None) -> bytes | None:
        wall_ns = self._v2_admitted(data, source, now, wall_ns)
        if wall_ns is None:
            return None
        return self.v2.handle(data, source, now, wall_ns, local)

    def _v2_admitted(self, data: bytes, source: bytes, now: float,
                     wall_ns: int | None) -> int | None:
        """May a datagram that is not a classic request go on to v2? It must look like
        v2, v2 must be on and SOURCE within its rate limit (IPv6: per /64); each refusal
        is counted. Returns the wall-clock time to use (None: refused)."""
        c = self.counters
        if not looks_like_v2(data):
            c.dropped["length"] += 1
            return None
        if self.v2 is None:
            c.dropped["v2_off"] += 1
            return None
        if not self.limiter.allow(source[:4] if len(source) == 6 else source[:8], now):
            return None
        return int(now * 1e9) + self.wall_offset_ns if wall_ns is None else wall_ns

    def drain_notifications(self) -> list[Notification]:
        """v2 notifications queued since the last call, for the shell to send."""
        return self.v2.drain() if self.v2 is not None and self.v2.outbox else []

    def tick(self, now: float) -> None:
        """Housekeeping between batches: expire a bounded number of stale entries."""
        self.registry.expire(now, budget=10_000)
        if self.v2 is not None:
            self.v2.tick(now)

    def sweep(self, now: float) -> None:
        """Occasional housekeeping: forget idle rate-limit buckets."""
        self.limiter.sweep(now)
        if self.v2 is not None:
            self.v2.sweep(now)

    def snapshot(self) -> dict[str, int]:
        c, r = self.counters, self.registry.stats
        return {
            "requests": c.requests,
            "found": c.found,
            "not_found": c.not_found,
            **{f"dropped_{k}": v for k, v in c.dropped.items()},
            "probes": c.probes,
            "probe_refused": c.probe_refused,
            "rate_limited": self.limiter.limited,
            "evicted": r.evicted,
            "expired": r.expired,
            "peers": len(self.registry),
            **({"store_unavailable": c.store_unavailable, "store_errors": c.store_errors,
                **self.store.snapshot()} if self.store is not None else {}),
            **({f"v2_{k}": v for k, v in self.v2.snapshot().items()} if self.v2 else {}),
        }
