"""The v2 rendezvous service: one authenticated request in, at most one reply out, and
possibly notifications to other clients (docs/PROTOCOL.md, "Server checks, in order" and
"The coordinated punch").

Pure: ``handle(data, source, now, wall_ns, local)`` takes the datagram, its packed source
(6 bytes IPv4 or 18 bytes IPv6: address || port), the monotonic time in seconds, the
wall-clock time in ns since the epoch, and optionally the local server address the
datagram arrived at (4 or 16 bytes). It returns the reply bytes or ``None`` and queues
:class:`Notification` s that the I/O shell takes with :meth:`V2Service.drain` after
each call or batch. Length, header and the per-source rate limit are checked by the
dispatcher (:class:`rendezvous.service.Service`) before this runs.

Never answered, only counted: datagrams that do not authenticate (``auth_failed``) or
that authenticate but are malformed (``malformed``). Every reply and notification is
checked to be no longer than the request that caused it (``oversize`` counts any that
would have been, and drops them; it stays 0 unless the codec changes).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..ratelimit import RateLimiter
from ..relay import Relay, RelayConfig, RelayTable
from ..store import V2_SCRIPT, ScriptMissing, SharedStore, StoreError, script_load
from .crypto import AuthError, ServerCrypto
from .directory import LocalDirectory, SharedDirectory
from .state import V2Registry
from .wire import (
    FLAG_RELAY,
    Endpoint,
    NotifyBody,
    RelayBody,
    ReplyBody,
    RequestBody,
    Status,
    WireError,
)

__all__ = ["Notification", "V2Config", "V2Service", "COUNTERS"]

log = logging.getLogger(__name__)

COUNTERS = ("requests", "found", "pending", "stale_replay", "stale_skew", "auth_failed",
            "malformed", "bad_source", "notifications", "notify_limited", "notify_dropped",
            "oversize", "relay_offered", "relay_off", "relay_no_consent", "relay_refused",
            "relay_no_address", "store_unavailable", "store_errors", "notify_remote",
            "relay_remote", "stale_replay_shared", "new_key_limited")

_MAX_OUTBOX = 4096


@dataclass(frozen=True)
class V2Config:
    ttl: float = 180.0
    max_peers: int = 1_000_000
    max_skew: float = 300.0  # seconds; 0 = no window
    notify_rate: float = 10.0  # notifications per second per notified key; 0 = no limit
    notify_burst: float = 20.0
    max_asks_per_client: int = 1024
    # keys not in the cache, derived (an X25519 + HKDF each) per second; 0 = no limit
    new_key_rate: float = 5000.0
    new_key_burst: float = 10000.0
    relay: RelayConfig | None = None  # None: no relay (requests with FLAG_RELAY counted)
    relay_addresses: tuple[bytes, ...] = ()  # 4- or 16-byte addresses the relay is at,
    # used when the request's local address is unknown (at most one per family)


@dataclass(frozen=True)
class Notification:
    """A datagram to send to DESTINATION (packed source form), from LOCAL if known; by
    the server SERVER (its id in the shared store) when another one holds the
    destination's NAT mapping, else (None) by this one."""

    destination: bytes
    datagram: bytes
    local: bytes | None = None
    server: str | None = None


class V2Service:
    def __init__(self, config: V2Config, crypto: ServerCrypto,
                 store: SharedStore | None = None) -> None:
        self.config = config
        self.crypto = crypto
        self.store = store
        self._ttl_ms = max(1, int(config.ttl * 1000))
        # how long the store keeps a client's replay window: as long as the registry
        # keeps the client's record (its retention), so both forget it together
        self._retention_ms = max(1, int(max(config.ttl, config.max_skew) * 1000))
        self._skew_ns = int(config.max_skew * 1e9)
        self.registry = V2Registry(config.ttl, config.max_peers,
                                   max_asks_per_client=config.max_asks_per_client,
                                   retention=config.max_skew)
        self.notify_limiter = RateLimiter(config.notify_rate, config.notify_burst,
                                          max_sources=max(1024, config.max_peers))
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.outbox: list[Notification] = []
        self._last_time = 0
        # One bucket for the whole server: what a flood of unknown (or forged) keys may
        # cost, so that the clients already known are still answered during one.
        self.new_keys = RateLimiter(config.new_key_rate, config.new_key_burst, max_sources=1)
        self.relay = None if config.relay is None else Relay(RelayTable(config.relay), crypto,
                                                             may_derive=self.may_derive)

    def may_derive(self, datagram: bytes, now: float) -> bool:
        """Whether DATAGRAM (a request or a bind: the client key at bytes 8-40) may be
        opened at NOW: its key is cached, or the budget for new keys allows one more."""
        return self.crypto.sender_cached(datagram) or self.new_keys.allow(b"", now)

    def _server_time(self, wall_ns: int) -> int:
        """The wall clock, made strictly increasing: a client accepts a notify only if
        its server_time is newer than the last one it accepted for that peer."""
        t = max(wall_ns, self._last_time + 1)
        self._last_time = t
        return t

    def handle(self, data: bytes, source: bytes, now: float, wall_ns: int,
               local: bytes | None = None) -> bytes | None:
        c = self.counters
        opened = self._open(data, source, now)
        if opened is None:
            return None
        observed, client, body = opened
        c["requests"] += 1
        reg = self.registry
        last = reg.last_timestamp(client, now)
        ts = body.timestamp
        skew = self._skew_ns
        replayed = not reg.timestamp_fresh(client, ts, now)
        if replayed or (skew and abs(ts - wall_ns) > skew):
            c["stale_replay" if replayed else "stale_skew"] += 1
            return self._stale(client, body, observed, last, wall_ns, len(data))

        peer = body.peer
        relay_peer = peer if body.flags & FLAG_RELAY and peer != client else None
        if self.store is None:
            d: LocalDirectory = LocalDirectory(reg, now)
        else:  # the store admits the timestamp too: a replay to another server is refused
            will_change = reg.would_change(client, source, now)
            candidates = reg.asked_peers(client, now) if will_change else []
            shared = self._directory(client, source, local, body.nat, peer, candidates, now,
                                     ts, relay_peer)
            if shared is False:
                c["stale_replay"] += 1
                c["stale_replay_shared"] += 1
                return self._stale(client, body, observed, last, wall_ns, len(data))
            d = shared
        changed = reg.accept(client, source, ts, body.nat, peer, now, local)
        if not isinstance(d, SharedDirectory):  # no store, or it was unavailable
            candidates = reg.asked_peers(client, now) if changed else []
        server_time = self._server_time(wall_ns)
        if d.asked(peer, client) and d.endpoints(peer):  # CLIENT may learn PEER
            eps = d.endpoints(peer)
            d.set_told(client, peer, eps)
            c["found"] += 1
            reply = ReplyBody(body.request_id, Status.FOUND, server_time, observed,
                              tuple(Endpoint.from_source(e) for e in eps), d.nat(peer))
            concerned = [peer] if peer != client else []
        else:
            c["pending"] += 1
            reply = ReplyBody(body.request_id, Status.PENDING, server_time, observed)
            concerned = []
        if changed:  # the mutual peers: those a change of CLIENT's endpoint concerns
            concerned += [p for p in candidates
                          if p != peer and d.asked(p, client) and d.endpoints(p)]
        if concerned:
            self._notify(client, concerned, now, server_time, len(data), d)
        out = self._reply(client, reply, len(data))
        if relay_peer is not None:
            self._offer_relay(client, peer, body.request_id, source, local, now, server_time,
                              len(data), d)
        if isinstance(d, SharedDirectory) and d.writes and self.store is not None:
            self.store.send(d.writes)
        return out

    def _stale(self, client: bytes, body: RequestBody, observed: Endpoint, last: int | None,
               wall_ns: int, limit: int) -> bytes | None:
        """The "stale" reply: the lowest timestamp the server would accept now, and still
        after a round trip (docs/PROTOCOL.md, "Replay and clocks")."""
        lowest = (last or 0) + 1
        if self._skew_ns:
            lowest = max(lowest, wall_ns)
        return self._reply(client, ReplyBody(body.request_id, Status.STALE, lowest, observed),
                           limit)

    def _directory(self, client: bytes, source: bytes, local: bytes | None, nat: int,
                   peer: bytes, candidates: list[bytes], now: float, timestamp: int,
                   relay_peer: bytes | None) -> LocalDirectory | bool:
        """With a store: one round trip that admits TIMESTAMP against CLIENT's replay
        window there and, if fresh, writes CLIENT's registration and ask, then reads the
        facts about PEER and CANDIDATES. False: the store saw this timestamp already (a
        replay, possibly to another server). The own registry if the store is
        unavailable or answers nonsense."""
        store = self.store
        assert store is not None
        local_dir = LocalDirectory(self.registry, now)
        peers = [peer] + candidates if peer != client else candidates
        d = SharedDirectory(self.registry, now, store.keys, store.server_id, self._ttl_ms,
                            client, peers, relay_peer)
        cmds = d.commands(source, local, nat, peer, timestamp, self._retention_ms)
        for attempt in (0, 1):
            replies = store.execute(cmds)
            if replies is None:
                self.counters["store_unavailable"] += 1
                return local_dir
            try:
                return d if d.load(replies) else False
            except ScriptMissing:
                if attempt or store.execute([script_load(V2_SCRIPT)]) is None:
                    break
            except StoreError as e:
                log.warning("store: %s", e)
                break
        self.counters["store_errors"] += 1
        return local_dir

    def _offer_relay(self, client: bytes, peer: bytes, request_id: int, source: bytes,
                     local: bytes | None, now: float, server_time: int, limit: int,
                     d: LocalDirectory) -> None:
        """CLIENT asked for a relay for (CLIENT, PEER): allocate one only if the pair is
        mutual (both authenticated, each asked for the other within the ttl), then tell
        CLIENT (at the request's source) and PEER (at its registrations) where it is."""
        c = self.counters
        shared = d if isinstance(d, SharedDirectory) else None
        claim = shared.relay_claim if shared is not None else None
        if claim is not None and (claim.server == shared.server_id or
                                  len(claim.relay) != len(source)):
            claim = None  # ours (the table has it), or of the other family
        if self.relay is None and claim is None:
            c["relay_off"] += 1
            return
        if not (d.asked(peer, client) and d.endpoints(peer)):  # CLIENT has just asked for PEER
            c["relay_no_consent"] += 1
            return
        if claim is not None:  # another server relays this pair: the same relay for both
            relay = Endpoint.from_source(claim.relay)
            c["relay_remote"] += 1
        else:
            addr_len = 4 if len(source) == 6 else 16
            addr = local if local is not None and len(local) == addr_len else next(
                (a for a in self.config.relay_addresses if len(a) == addr_len), None)
            if addr is None:
                c["relay_no_address"] += 1
                return
            alloc = self.relay.table.allocate(client, peer, now)
            if alloc is None:
                c["relay_refused"] += 1
                return
            where = addr + alloc.port.to_bytes(2, "big")
            relay = Endpoint.from_source(where)
            if shared is not None:
                shared.claim_relay(peer, where, max(1, int(self.relay.table.config.idle * 1000)))
        mine = self.crypto.seal_relay(client, RelayBody(server_time, request_id, peer, relay))
        theirs = None
        if self.notify_limiter.allow(peer, now):
            theirs = self.crypto.seal_relay(peer, RelayBody(server_time, 0, client, relay))
        else:
            c["notify_limited"] += 1
        if len(mine) > limit:
            c["oversize"] += 1
            return
        c["relay_offered"] += 1
        self._queue(Notification(source, mine, local))
        if theirs is not None:
            for dest, dest_local, server in d.destinations(peer):
                if len(dest) == len(source):  # the relay's family
                    self._queue(Notification(dest, theirs, dest_local, server))

    def _queue(self, n: Notification) -> None:
        if len(self.outbox) >= _MAX_OUTBOX:
            self.counters["notify_dropped"] += 1
            return
        self.outbox.append(n)
        self.counters["notifications"] += 1

    def _open(self, data: bytes, source: bytes,
              now: float) -> tuple[Endpoint, bytes, RequestBody] | None:
        """The source as an endpoint, the client's key and the request, or None (counted:
        an unusable source, a new key over the budget, a datagram that does not
        authenticate, a malformed one)."""
        c = self.counters
        try:
            observed = Endpoint.from_source(source)
        except WireError:
            observed = None
        if observed is None or not observed.usable:
            c["bad_source"] += 1
            return None
        if not self.may_derive(data, now):
            c["new_key_limited"] += 1
            return None
        try:
            client, body = self.crypto.open_request(data)
        except AuthError:
            c["auth_failed"] += 1
            return None
        except WireError:
            c["malformed"] += 1
            return None
        return observed, client, body

    def probe(self, data: bytes, source: bytes, wall_ns: int, now: float) -> bytes | None:
        """A request at a probe port: if it authenticates and asks for the client itself
        (``peer_public == client_public``), a ``pending`` reply whose ``observed`` is the
        source as seen here. Nothing is registered or remembered (not even the
        timestamp, which is not checked: a replayed probe changes nothing and its reply
        is sealed to the real client). Anything else is counted and dropped."""
        opened = self._open(data, source, now)
        if opened is None:
            return None
        observed, client, body = opened
        if body.peer != client:
            return None
        reply = ReplyBody(body.request_id, Status.PENDING, self._server_time(wall_ns), observed)
        return self._reply(client, reply, len(data))

    def _reply(self, client: bytes, body: ReplyBody, limit: int) -> bytes | None:
        out = self.crypto.seal_reply(client, body)
        if len(out) > limit:
            self.counters["oversize"] += 1
            return None
        return out

    def _notify(self, client: bytes, peers: list[bytes], now: float, server_time: int,
                limit: int, d: LocalDirectory) -> None:
        """Tell each of PEERS (all mutual with CLIENT) CLIENT's endpoints, unless it was
        last told exactly those."""
        reg, c = self.registry, self.counters
        mine = reg.endpoints(client, now)
        body: NotifyBody | None = None
        for p in peers:
            if d.told(p, client) == mine:
                continue
            if not self.notify_limiter.allow(p, now):
                c["notify_limited"] += 1
                continue  # not marked as told: the next request of CLIENT tries again
            if body is None:
                body = NotifyBody(server_time, client, tuple(Endpoint.from_source(e) for e in mine),
                                  reg.nat(client))
            datagram = self.crypto.seal_notify(p, body)
            if len(datagram) > limit:
                c["oversize"] += 1
                continue
            d.set_told(p, client, mine)
            for dest, local, server in d.destinations(p):
                if len(self.outbox) >= _MAX_OUTBOX:
                    c["notify_dropped"] += 1
                    continue
                self.outbox.append(Notification(dest, datagram, local, server))
                c["notifications"] += 1
                if server is not None:
                    c["notify_remote"] += 1

    def drain(self) -> list[Notification]:
        """The notifications queued since the last call (the shell sends them)."""
        out, self.outbox = self.outbox, []
        return out

    def tick(self, now: float) -> None:
        self.registry.expire(now, budget=10_000)
        if self.relay is not None:
            self.relay.tick(now)

    def sweep(self, now: float) -> None:
        self.notify_limiter.sweep(now)
        if self.relay is not None:
            self.relay.sweep(now)

    def snapshot(self) -> dict[str, int]:
        r = self.registry
        c = self.counters
        return {**c, "stale": c["stale_replay"] + c["stale_skew"], "peers": len(r),
                "asks": r.asks, "evicted": r.stats.evicted, "expired": r.stats.expired,
                "keys_cached": len(self.crypto), "keys_ready": self.crypto.ready,
                **({f"relay_{k}": v for k, v in self.relay.table.snapshot().items()}
                   if self.relay is not None else {})}
