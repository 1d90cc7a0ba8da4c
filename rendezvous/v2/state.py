"""The v2 registry: what the server knows about authenticated clients.

Pure: every call takes ``now`` (seconds on any monotonic clock) and does no I/O. Keys are
32-byte public keys that have already proved themselves (the AEAD opened); endpoints are
the server's packed source form, 6 bytes (IPv4 address + port) or 18 bytes (IPv6
address + port), so the family is the length.

Per client key it keeps:
- one registration per address family (IPv4 and IPv6 apart): the source endpoint, the
  local server address the request arrived at (when the shell knows it, for sending
  notifications from that address) and when it was refreshed;
- the last accepted request timestamp and the client's NAT verdict byte;
- what it asked for: peer key -> (when it asked, the peer endpoints it was last told).

Rules (docs/PROTOCOL.md):
- A registration is fresh for ``ttl`` seconds after its refresh; so is an ask.
- A may learn B (:meth:`V2Registry.may_learn`) only if B has a fresh registration and
  B asked for A within the ttl (mutual consent is that plus A asking for B).
- A client record (and with it the last accepted timestamp, which replay protection
  needs) is kept for ``retention`` seconds after its last accepted request: at least the
  ttl, and the server makes it at least the timestamp window too, so that a captured
  request cannot be replayed as soon as its key was forgotten.

Bounds, so that memory and time stay bounded under a flood of distinct keys:
- at most ``max_peers`` client records; the least recently refreshed one is evicted;
- at most ``max_asks_per_client`` asks per client (least recently asked evicted) and at
  most ``max_asks`` in total (least recently refreshed clients evicted);
- expiry walks records oldest first with a budget; every operation is O(1) amortised
  except :meth:`V2Registry.mutual_peers`, which is O(asks of one client).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from .replay import EMPTY, Window, accepts, record

__all__ = ["Ask", "ClientRecord", "Registration", "RegistryStats", "V2Registry"]

Source = bytes  # 6 (IPv4) or 18 (IPv6) bytes: address || port
Endpoints = tuple[Source, ...]  # fresh registrations, IPv6 first


def family(source: Source) -> int:
    """4 or 6, from the packed source's length."""
    if len(source) == 6:
        return 4
    if len(source) == 18:
        return 6
    raise ValueError(f"packed source must be 6 or 18 bytes, got {len(source)}")


class Registration:
    """One family's registered endpoint."""

    __slots__ = ("source", "local", "refreshed")

    def __init__(self, source: Source, local: bytes | None, refreshed: float) -> None:
        self.source = source
        self.local = local
        self.refreshed = refreshed


class Ask:
    """One peer a client asked for: when, and what it was last told about that peer."""

    __slots__ = ("asked", "told")

    def __init__(self, asked: float) -> None:
        self.asked = asked
        self.told: Endpoints | None = None


class ClientRecord:
    __slots__ = ("v4", "v6", "replay", "nat", "asks", "seen")

    def __init__(self, now: float) -> None:
        self.v4: Registration | None = None
        self.v6: Registration | None = None
        self.replay: Window = EMPTY  # newest accepted timestamp and its reorder window
        self.nat = 0
        self.asks: dict[bytes, Ask] = {}  # least recently asked first (a plain dict is
        # ordered too, and costs half an OrderedDict: asks are small, so walking over
        # the dead slots re-asking leaves at their front stays cheap)
        self.seen = now


@dataclass
class RegistryStats:
    inserted: int = 0
    evicted: int = 0
    expired: int = 0
    asks_evicted: int = 0
    asks_expired: int = 0


class V2Registry:
    def __init__(self, ttl: float, max_peers: int, *, max_asks_per_client: int = 1024,
                 max_asks: int | None = None, retention: float | None = None) -> None:
        if ttl <= 0:
            raise ValueError(f"ttl must be positive, got {ttl}")
        if max_peers < 1:
            raise ValueError(f"max_peers must be at least 1, got {max_peers}")
        if max_asks_per_client < 1:
            raise ValueError(f"max_asks_per_client must be at least 1, got {max_asks_per_client}")
        self.ttl = ttl
        self.max_peers = max_peers
        self.max_asks_per_client = max_asks_per_client
        self.max_asks = max(max_asks_per_client, 4 * max_peers) if max_asks is None else max_asks
        if self.max_asks < max_asks_per_client:
            raise ValueError(f"max_asks {self.max_asks} is below max_asks_per_client "
                             f"{max_asks_per_client}")
        self.retention = max(ttl, retention or 0.0)
        self.stats = RegistryStats()
        self._clients: OrderedDict[bytes, ClientRecord] = OrderedDict()  # least recent first
        self._asks = 0

    def __len__(self) -> int:
        return len(self._clients)

    def __contains__(self, key: object) -> bool:
        return key in self._clients

    @property
    def asks(self) -> int:
        """Asks held in total (fresh or not yet swept)."""
        return self._asks

    # -- reading ---------------------------------------------------------------------

    def _get(self, key: bytes, now: float) -> ClientRecord | None:
        rec = self._clients.get(key)
        if rec is not None and now - rec.seen >= self.retention:
            self._drop(key, rec)
            self.stats.expired += 1
            return None
        return rec

    def last_timestamp(self, key: bytes, now: float) -> int | None:
        """The last accepted timestamp of KEY, or None if the server has forgotten KEY."""
        rec = self._get(key, now)
        return None if rec is None else rec.replay[0]

    def timestamp_fresh(self, key: bytes, timestamp: int, now: float) -> bool:
        """Is TIMESTAMP acceptable for KEY: newer than the newest accepted, or a request
        reordered within the window that was not accepted before (rendezvous.v2.replay)?
        An unknown (or forgotten) key accepts any timestamp."""
        rec = self._get(key, now)
        return rec is None or accepts(rec.replay, timestamp)

    def _fresh(self, reg: Registration | None, now: float) -> bool:
        return reg is not None and now - reg.refreshed < self.ttl

    def endpoints(self, key: bytes, now: float) -> Endpoints:
        """KEY's fresh registered endpoints, IPv6 first (empty if none)."""
        rec = self._get(key, now)
        if rec is None:
            return ()
        return tuple(r.source for r in (rec.v6, rec.v4) if r is not None and self._fresh(r, now))

    def destinations(self, key: bytes, now: float) -> tuple[tuple[Source, bytes | None], ...]:
        """(endpoint, local server address or None) of KEY's fresh registrations."""
        rec = self._get(key, now)
        if rec is None:
            return ()
        return tuple((r.source, r.local) for r in (rec.v6, rec.v4)
                     if r is not None and self._fresh(r, now))

    def nat(self, key: bytes) -> int:
        rec = self._clients.get(key)
        return 0 if rec is None else rec.nat

    def asked(self, key: bytes, peer: bytes, now: float) -> bool:
        """Whether KEY asked for PEER within the ttl."""
        rec = self._get(key, now)
        if rec is None:
            return False
        ask = rec.asks.get(peer)
        return ask is not None and now - ask.asked < self.ttl

    def may_learn(self, key: bytes, peer: bytes, now: float) -> bool:
        """Whether KEY may be told PEER's endpoints: PEER is registered (fresh) and PEER
        asked for KEY within the ttl."""
        return self.asked(peer, key, now) and bool(self.endpoints(peer, now))

    def told(self, key: bytes, peer: bytes) -> Endpoints | None:
        """What KEY was last told about PEER's endpoints (None: never, or not asked)."""
        rec = self._clients.get(key)
        ask = None if rec is None else rec.asks.get(peer)
        return None if ask is None else ask.told

    def set_told(self, key: bytes, peer: bytes, endpoints: Endpoints) -> None:
        """Record that KEY was told ENDPOINTS of PEER (only where KEY asked for PEER)."""
        rec = self._clients.get(key)
        ask = None if rec is None else rec.asks.get(peer)
        if ask is not None:
            ask.told = endpoints

    def would_change(self, key: bytes, source: Source, now: float) -> bool:
        """Whether accepting a request of KEY from SOURCE would change KEY's fresh
        endpoints (what :meth:`accept` returns), without accepting it."""
        before = self.endpoints(key, now)
        rec = self._get(key, now)
        other = None if rec is None else (rec.v6 if family(source) == 4 else rec.v4)
        kept = other.source if other is not None and self._fresh(other, now) else None
        after = tuple(e for e in ((source, kept) if family(source) == 6 else (kept, source))
                      if e is not None)
        return after != before

    def asked_peers(self, key: bytes, now: float, limit: int = 64) -> list[bytes]:
        """Up to LIMIT peers (other than KEY) that KEY asked for within the ttl, most
        recent first."""
        rec = self._get(key, now)
        if rec is None:
            return []
        out = []
        for peer, ask in reversed(rec.asks.items()):
            if now - ask.asked >= self.ttl or len(out) >= limit:
                break
            if peer != key:
                out.append(peer)
        return out

    def mutual_peers(self, key: bytes, now: float) -> list[bytes]:
        """Peers (other than KEY) that KEY asked for and that asked for KEY, both within
        the ttl, and that have a fresh registration: those a change of KEY's endpoint
        concerns."""
        rec = self._get(key, now)
        if rec is None:
            return []
        ttl = self.ttl
        out = []
        for peer, ask in reversed(rec.asks.items()):  # most recent first; stop at stale
            if now - ask.asked >= ttl:
                break
            if peer != key and self.asked(peer, key, now) and self.endpoints(peer, now):
                out.append(peer)
        return out

    # -- writing ---------------------------------------------------------------------

    def accept(self, key: bytes, source: Source, timestamp: int, nat: int, peer: bytes,
               now: float, local: bytes | None = None) -> bool:
        """Record an accepted request: KEY at SOURCE (its family), its timestamp and NAT
        verdict, and that it asked for PEER. Returns whether KEY's fresh endpoints changed.
        The caller has checked the timestamp (:meth:`timestamp_fresh`)."""
        fam = family(source)
        clients = self._clients
        rec = self._get(key, now)
        if rec is None:
            if len(clients) >= self.max_peers:
                self.expire(now)
                while len(clients) >= self.max_peers:
                    self._evict_oldest()
            rec = ClientRecord(now)
            clients[key] = rec
            self.stats.inserted += 1
            before: Endpoints = ()
        else:
            before = self.endpoints(key, now)
            clients.move_to_end(key)
        rec.seen = now
        rec.replay = record(rec.replay, timestamp)
        rec.nat = nat
        reg = Registration(source, local, now)
        if fam == 4:
            rec.v4 = reg
        else:
            rec.v6 = reg
        self._record_ask(rec, peer, now)
        if self._asks > self.max_asks:
            while self._asks > self.max_asks and next(iter(clients)) != key:
                self._evict_oldest()
        return self.endpoints(key, now) != before

    def _record_ask(self, rec: ClientRecord, peer: bytes, now: float) -> None:
        asks = rec.asks
        ask = asks.get(peer)
        if ask is not None:
            ask.asked = now
            del asks[peer]  # re-insert: to the back
            asks[peer] = ask
            return
        while asks:  # drop expired asks from the front (amortised O(1))
            first = next(iter(asks))
            if now - asks[first].asked < self.ttl:
                break
            del asks[first]
            self._asks -= 1
            self.stats.asks_expired += 1
        if len(asks) >= self.max_asks_per_client:
            del asks[next(iter(asks))]
            self._asks -= 1
            self.stats.asks_evicted += 1
        asks[peer] = Ask(now)
        self._asks += 1

    def _drop(self, key: bytes, rec: ClientRecord) -> None:
        del self._clients[key]
        self._asks -= len(rec.asks)

    def _evict_oldest(self) -> None:
        key, rec = self._clients.popitem(last=False)
        self._asks -= len(rec.asks)
        self.stats.evicted += 1

    def expire(self, now: float, budget: int | None = None) -> int:
        """Forget clients not heard from for ``retention`` seconds, oldest first, at most
        BUDGET of them; return how many."""
        clients = self._clients
        n = 0
        while clients and (budget is None or n < budget):
            key = next(iter(clients))
            rec = clients[key]
            if now - rec.seen < self.retention:
                break
            self._drop(key, rec)
            n += 1
        self.stats.expired += n
        return n
