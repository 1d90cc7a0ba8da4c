"""What a v2 request may learn about *other* clients: this server's own registry, or
the shared store (``--store``) with the own registry as the fallback.

:class:`LocalDirectory` answers from :class:`rendezvous.v2.state.V2Registry` (pure).
:class:`SharedDirectory` answers from facts read from the store in the request's single
round trip (:meth:`SharedDirectory.commands` builds it: the request's timestamp is admitted
against the client's replay window kept in the store, and only then are the client's
registration and ask written, atomically; then the facts about the peer and, when this
client's endpoint changes, about the peers it asked for are read); what it learns to tell others (``told``) is
written back without waiting (``writes``, which the service sends). A peer of which the store
holds no registration is answered from the own registry, so that a server that has
seen a peer itself still knows it when the store was emptied (e.g. Redis restarted
without persistence) until the peer refreshes.

Destinations carry the id of the server holding the client's NAT mapping (None: this
server), so that a notification for a client registered through another server goes
to that server (pub/sub) and leaves from the address the client's NAT expects.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..store import (
    V2_SHA,
    Keys,
    RelayClaim,
    ScriptMissing,
    SharedRegistration,
    StoreError,
    decode_endpoints,
    encode_endpoints,
    window_args,
)
from .replay import RECENT_MAX, REORDER_WINDOW_NS
from .state import Endpoints, V2Registry, family

__all__ = ["Destination", "LocalDirectory", "SharedDirectory"]

Destination = tuple[bytes, bytes | None, str | None]  # source, local address, server id


class LocalDirectory:
    """Other clients as this server's own registry knows them, at NOW."""

    def __init__(self, registry: V2Registry, now: float) -> None:
        self.registry = registry
        self.now = now

    def asked(self, key: bytes, peer: bytes) -> bool:
        return self.registry.asked(key, peer, self.now)

    def endpoints(self, key: bytes) -> Endpoints:
        return self.registry.endpoints(key, self.now)

    def destinations(self, key: bytes) -> tuple[Destination, ...]:
        return tuple((s, lo, None) for s, lo in self.registry.destinations(key, self.now))

    def nat(self, key: bytes) -> int:
        return self.registry.nat(key)

    def told(self, key: bytes, peer: bytes) -> Endpoints | None:
        return self.registry.told(key, peer)

    def set_told(self, key: bytes, peer: bytes, endpoints: Endpoints) -> None:
        self.registry.set_told(key, peer, endpoints)


class _Facts:
    __slots__ = ("asked", "regs", "told")

    def __init__(self, asked: bool, regs: tuple[SharedRegistration, ...],
                 told: Endpoints | None) -> None:
        self.asked = asked  # the peer asked for the client
        self.regs = regs  # IPv6 first
        self.told = told  # what the peer was last told about the client


class SharedDirectory(LocalDirectory):
    """Facts about PEERS' relation to CLIENT from the store, the own registry otherwise."""

    _PER_PEER = 4  # reads per peer: its ask of the client, r6, r4, what it was told

    def __init__(self, registry: V2Registry, now: float, keys: Keys, server_id: str,
                 ttl_ms: int, client: bytes, peers: Sequence[bytes],
                 relay_peer: bytes | None = None) -> None:
        super().__init__(registry, now)
        self.relay_peer = relay_peer  # the request asks for a relay with this peer
        self.relay_claim: RelayClaim | None = None  # the pair's relay, if any server has one
        self.keys = keys
        self.server_id = server_id
        self.ttl_ms = ttl_ms
        self.client = client
        self.peers = list(dict.fromkeys(peers))
        self.facts: dict[bytes, _Facts] = {}
        self.writes: list[list[bytes | int]] = []

    def commands(self, source: bytes, local: bytes | None, nat: int, peer: bytes,
                 timestamp: int, retention_ms: int) -> list[list[bytes | int]]:
        """The round trip: admit TIMESTAMP against CLIENT's replay window in the store
        and, if it is fresh, write CLIENT's registration (at SOURCE, via LOCAL) and its
        ask for PEER (:data:`rendezvous.store.V2_SCRIPT`, atomically); then read what
        the store knows of ``self.peers``."""
        k, c, px = self.keys, self.client, self.ttl_ms
        reg = SharedRegistration(source, local, nat, self.server_id).encode()
        cmds: list[list[bytes | int]] = [
            [b"EVALSHA", V2_SHA, 3, k.window(c), k.reg(c, family(source)), k.ask(c, peer),
             *window_args(timestamp, REORDER_WINDOW_NS), retention_ms, RECENT_MAX, reg, px],
        ]
        for p in self.peers:
            cmds += [[b"EXISTS", k.ask(p, c)], [b"GET", k.reg(p, 6)], [b"GET", k.reg(p, 4)],
                     [b"GET", k.told(p, c)]]
        if self.relay_peer is not None:
            cmds.append([b"GET", k.relay(c, self.relay_peer)])
        return cmds

    def load(self, replies: Sequence[object]) -> bool:
        """Take the round trip's replies; whether the store found the timestamp fresh
        (False: a replay, through this server or another). ScriptMissing (load it and
        retry) or StoreError if they make no sense."""
        want = 1 + self._PER_PEER * len(self.peers) + (self.relay_peer is not None)
        if replies and isinstance(replies[0], Exception) and \
                str(replies[0]).startswith("NOSCRIPT"):
            raise ScriptMissing(str(replies[0]))
        if len(replies) != want or replies[0] not in (0, 1):
            raise StoreError(f"unexpected replies to a v2 round trip: {replies[:2]!r:.120}")
        if self.relay_peer is not None:
            claim = replies[-1]
            if claim is not None:
                if not isinstance(claim, bytes):
                    raise StoreError(f"GET returned {claim!r:.40}")
                self.relay_claim = RelayClaim.decode(claim)
        for i, p in enumerate(self.peers):
            asked, r6, r4, told = replies[1 + self._PER_PEER * i:1 + self._PER_PEER * (i + 1)]
            if not isinstance(asked, int):
                raise StoreError(f"EXISTS returned {asked!r:.40}")
            regs = []
            for raw, fam in ((r6, 6), (r4, 4)):
                if raw is None:
                    continue
                if not isinstance(raw, bytes):
                    raise StoreError(f"GET returned {raw!r:.40}")
                r = SharedRegistration.decode(raw)
                if family(r.source) != fam:
                    raise StoreError(f"an IPv{family(r.source)} registration under IPv{fam}")
                regs.append(r)
            if told is not None and not isinstance(told, bytes):
                raise StoreError(f"GET returned {told!r:.40}")
            self.facts[p] = _Facts(bool(asked), tuple(regs),
                                   None if told is None else decode_endpoints(told))
        return replies[0] == 1

    def _of(self, key: bytes) -> _Facts | None:
        f = self.facts.get(key)
        return f if f is not None and f.regs else None  # nothing stored: the own registry

    def asked(self, key: bytes, peer: bytes) -> bool:
        f = self._of(key)
        if f is not None and peer == self.client:
            return f.asked
        return super().asked(key, peer)

    def endpoints(self, key: bytes) -> Endpoints:
        f = self._of(key)
        return super().endpoints(key) if f is None else tuple(r.source for r in f.regs)

    def destinations(self, key: bytes) -> tuple[Destination, ...]:
        f = self._of(key)
        if f is None:
            return super().destinations(key)
        return tuple((r.source, r.local, None if r.server == self.server_id else r.server)
                     for r in f.regs)

    def nat(self, key: bytes) -> int:
        f = self._of(key)
        return super().nat(key) if f is None else f.regs[0].nat

    def told(self, key: bytes, peer: bytes) -> Endpoints | None:
        f = self._of(key)
        if f is not None and peer == self.client:
            return f.told
        return super().told(key, peer)

    def claim_relay(self, peer: bytes, relay: bytes, idle_ms: int) -> None:
        """This server relays (client, PEER) at RELAY: say so in the store (the first
        claim wins; the owner refreshes its own)."""
        cmd: list[bytes | int] = [b"SET", self.keys.relay(self.client, peer),
                                  RelayClaim(relay, self.server_id).encode(), b"PX", idle_ms]
        if self.relay_claim is None:
            cmd.append(b"NX")
        self.writes.append(cmd)

    def set_told(self, key: bytes, peer: bytes, endpoints: Endpoints) -> None:
        super().set_told(key, peer, endpoints)
        self.writes.append([b"SET", self.keys.told(key, peer), encode_endpoints(endpoints),
                            b"PX", self.ttl_ms])
        f = self.facts.get(key)
        if f is not None and peer == self.client:
            f.told = endpoints
