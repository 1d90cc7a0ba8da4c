"""The relay's decisions (docs/PROTOCOL.md, "Relay"): which pairs have a relay, which
source addresses are bound to them, and where each relayed datagram goes.

Pure: every call takes ``now`` (monotonic seconds) and does no I/O. Sources are the
server's packed form, 6 bytes (IPv4 address + port) or 18 bytes (IPv6 address + port).
Keys are 32-byte public keys that have proved themselves: the caller allocates only for
pairs that are authenticated and mutually consenting (the v2 rule,
:meth:`rendezvous.v2.state.V2Registry.may_learn` both ways), and passes only binds that
opened (:meth:`rendezvous.v2.crypto.ServerCrypto.open_bind`).

- An **allocation** belongs to an unordered pair {A, B} and to one relay port. A client
  may be in several pairs, but never in two on the same port: its bound source toward a
  port must say which pair a datagram belongs to. No free port: refused (``busy``).
- A **bind** by A (an authentic bind datagram from A naming B, arriving at the pair's
  port) records the datagram's source as A's side. Its timestamp must be newer than A's
  last accepted bind for the pair (a replayed bind cannot move A's side elsewhere).
- **Forwarding**: a datagram arriving at port P from source S goes to the other side's
  bound source only if S is exactly one side's bound source on P and the other side is
  bound too. Everything else is dropped and counted by reason. The relay never looks
  inside the datagrams it forwards (WireGuard's encryption is end to end).
- **Limits**: per allocation a packet and a byte budget (forwarded datagrams); over it,
  datagrams are dropped (``over_limit``). At most ``max_pairs`` allocations.
- **Expiry**: an allocation with no forwarded datagram and no bind for ``idle``
  seconds is freed (lazily on lookup, and by :meth:`RelayTable.expire`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .ratelimit import RateLimiter
from .v2.wire import BIND_LEN, MsgType, WireError, header

if TYPE_CHECKING:
    from .v2.crypto import ServerCrypto

__all__ = [
    "DROP_REASONS",
    "Allocation",
    "Relay",
    "RelayConfig",
    "RelayError",
    "RelayTable",
    "parse_ports",
    "ports_text",
]

Source = bytes

DROP_REASONS = ("unbound", "peer_unbound", "over_limit", "bad_bind", "bind_no_pair",
                "bind_stale", "bind_auth", "bind_new_key_limited")
REFUSALS = ("busy", "full")


class RelayError(ValueError):
    """A bad relay setting; the message names it and its value."""


def parse_ports(text: str) -> tuple[int, ...]:
    """``"49919"`` or ``"49919-49930"`` to the ports it names (1..65535, at most 4096)."""
    low_text, sep, high_text = text.partition("-")
    try:
        low = int(low_text)
        high = int(high_text) if sep else low
    except ValueError:
        raise RelayError(f"relay port {text!r} is not PORT or LOW-HIGH") from None
    if not 1 <= low <= high <= 65535:
        raise RelayError(f"relay port {text!r} is not PORT or LOW-HIGH within 1-65535")
    if high - low >= 4096:
        raise RelayError(f"relay port range {text!r} has more than 4096 ports")
    return tuple(range(low, high + 1))


@dataclass(frozen=True)
class RelayConfig:
    ports: tuple[int, ...]
    max_pairs: int = 1024
    max_packets: int = 10_000_000   # forwarded datagrams per allocation (both ways)
    max_bytes: int = 10 << 30       # forwarded payload bytes per allocation (both ways)
    idle: float = 120.0             # free an allocation after this long without traffic

    def __post_init__(self) -> None:
        if not self.ports or len(set(self.ports)) != len(self.ports):
            raise RelayError(f"relay ports {self.ports!r} must be distinct and at least one")
        if self.max_pairs < 1:
            raise RelayError(f"relay max pairs {self.max_pairs} must be at least 1")
        if self.max_packets < 1 or self.max_bytes < 1:
            raise RelayError(f"relay limits {self.max_packets} packets, {self.max_bytes} "
                             "bytes must be positive")
        if self.idle <= 0:
            raise RelayError(f"relay idle timeout {self.idle} must be positive")


class Allocation:
    """One pair's relay: its port, each side's bound source and last bind timestamp."""

    __slots__ = ("active", "bind_ts", "bound", "bytes", "created", "keys", "packets", "port")

    def __init__(self, a: bytes, b: bytes, port: int, now: float) -> None:
        self.keys = (a, b)
        self.port = port
        self.bound: list[Source | None] = [None, None]
        self.bind_ts = [0, 0]
        self.packets = 0
        self.bytes = 0
        self.created = now
        self.active = now

    def side(self, key: bytes) -> int:
        return 0 if self.keys[0] == key else 1


def _pair(a: bytes, b: bytes) -> tuple[bytes, bytes]:
    return (a, b) if a <= b else (b, a)


class RelayTable:
    def __init__(self, config: RelayConfig) -> None:
        self.config = config
        self._pairs: OrderedDict[tuple[bytes, bytes], Allocation] = OrderedDict()  # idle first
        self._by_source: dict[tuple[int, Source], tuple[Allocation, int]] = {}
        self._load = dict.fromkeys(config.ports, 0)
        self._member: dict[tuple[bytes, int], Allocation] = {}  # (key, port) -> allocation
        self.drops = dict.fromkeys(DROP_REASONS, 0)
        self.refused = dict.fromkeys(REFUSALS, 0)
        self.allocated = 0
        self.expired = 0
        self.binds = 0
        self.forwarded = 0
        self.forwarded_bytes = 0

    def __len__(self) -> int:
        return len(self._pairs)

    # -- allocation ---------------------------------------------------------------------

    def allocate(self, a: bytes, b: bytes, now: float) -> Allocation | None:
        """The pair's allocation, made if it has none (None: no port or no room left).
        The caller has checked that A and B are authenticated and mutually consenting."""
        if a == b:
            raise RelayError("a relay pair needs two different keys")
        pair = _pair(a, b)
        alloc = self.get(a, b, now)
        if alloc is not None:
            return alloc
        if len(self._pairs) >= self.config.max_pairs:
            self.expire(now)
            if len(self._pairs) >= self.config.max_pairs:
                self.refused["full"] += 1
                return None
        free = [p for p in self.config.ports
                if (a, p) not in self._member and (b, p) not in self._member]
        if not free:
            self.refused["busy"] += 1
            return None
        port = min(free, key=lambda p: self._load[p])
        alloc = Allocation(pair[0], pair[1], port, now)
        self._pairs[pair] = alloc
        self._member[(a, port)] = self._member[(b, port)] = alloc
        self._load[port] += 1
        self.allocated += 1
        return alloc

    def get(self, a: bytes, b: bytes, now: float) -> Allocation | None:
        """The pair's live allocation, if any."""
        alloc = self._pairs.get(_pair(a, b))
        if alloc is not None and now - alloc.active >= self.config.idle:
            self._free(alloc)
            self.expired += 1
            return None
        return alloc

    def _free(self, alloc: Allocation) -> None:
        del self._pairs[alloc.keys]
        for key in alloc.keys:
            self._member.pop((key, alloc.port), None)
        for src in alloc.bound:
            if src is not None:
                self._by_source.pop((alloc.port, src), None)
        self._load[alloc.port] -= 1

    def _touch(self, alloc: Allocation, now: float) -> None:
        alloc.active = now
        self._pairs.move_to_end(alloc.keys)

    def expire(self, now: float, budget: int | None = None) -> int:
        """Free allocations idle for ``idle`` seconds, oldest first; return how many."""
        n = 0
        while self._pairs and (budget is None or n < budget):
            alloc = next(iter(self._pairs.values()))
            if now - alloc.active < self.config.idle:
                break
            self._free(alloc)
            n += 1
        self.expired += n
        return n

    # -- binds and forwarding -----------------------------------------------------------

    def bind(self, port: int, key: bytes, peer: bytes, timestamp: int, source: Source,
             now: float) -> bool:
        """An authentic bind from KEY naming PEER arrived at PORT from SOURCE."""
        alloc = self.get(key, peer, now) if key != peer else None
        if alloc is None or alloc.port != port:
            self.drops["bind_no_pair"] += 1
            return False
        side = alloc.side(key)
        if timestamp <= alloc.bind_ts[side]:
            self.drops["bind_stale"] += 1
            return False
        other = self._by_source.get((port, source))
        if other is not None and other != (alloc, side):
            # SOURCE is the other side's (or another pair's) bound source on this port:
            # one source cannot speak for two sides.
            self.drops["bad_bind"] += 1
            return False
        old = alloc.bound[side]
        if old is not None and old != source:
            self._by_source.pop((port, old), None)
        alloc.bound[side] = source
        alloc.bind_ts[side] = timestamp
        self._by_source[(port, source)] = (alloc, side)
        self._touch(alloc, now)
        self.binds += 1
        return True

    def forward(self, port: int, source: Source, size: int, now: float) -> Source | str:
        """Where a SIZE-byte datagram arriving at PORT from SOURCE goes: the other side's
        bound source, or the reason it is dropped (counted)."""
        hit = self._by_source.get((port, source))
        if hit is None:
            self.drops["unbound"] += 1
            return "unbound"
        alloc, side = hit
        if now - alloc.active >= self.config.idle:
            self._free(alloc)
            self.expired += 1
            self.drops["unbound"] += 1
            return "unbound"
        dest = alloc.bound[1 - side]
        if dest is None:
            self.drops["peer_unbound"] += 1
            return "peer_unbound"
        cfg = self.config
        if alloc.packets >= cfg.max_packets or alloc.bytes + size > cfg.max_bytes:
            self.drops["over_limit"] += 1
            return "over_limit"
        alloc.packets += 1
        alloc.bytes += size
        self.forwarded += 1
        self.forwarded_bytes += size
        self._touch(alloc, now)
        return dest

    def count_drop(self, reason: str) -> None:
        self.drops[reason] += 1

    def snapshot(self) -> dict[str, int]:
        return {"pairs_active": len(self._pairs), "allocated": self.allocated, "expired": self.expired,
                "binds": self.binds, "forwarded": self.forwarded,
                "forwarded_bytes": self.forwarded_bytes,
                **{f"refused_{k}": v for k, v in self.refused.items()},
                **{f"dropped_{k}": v for k, v in self.drops.items()}}


_HDR_BIND = header(MsgType.BIND)


class Relay:
    """One datagram that arrived at a relay port in, its destination (or None) out.

    A datagram that starts with the v2 bind header is a bind: never forwarded; opened
    with the server's key (after a per-source-address rate limit, since opening an
    unknown key costs an X25519) and handed to the table. Anything else is forwarded by
    :meth:`RelayTable.forward`, or dropped and counted.
    """

    def __init__(self, table: RelayTable, crypto: ServerCrypto, bind_rate: float = 20.0,
                 bind_burst: float = 40.0,
                 may_derive: Callable[[bytes, float], bool] | None = None) -> None:
        self.table = table
        self.crypto = crypto
        # the service's budget for keys not cached yet (None: none)
        self.may_derive = may_derive
        self.limiter = RateLimiter(bind_rate, bind_burst, max_sources=65536)

    def handle(self, port: int, data: bytes, source: Source, now: float) -> Source | None:
        if data[:8] != _HDR_BIND:
            dest = self.table.forward(port, source, len(data), now)
            return dest if isinstance(dest, bytes) else None
        self._bind(port, data, source, now)
        return None

    def _bind(self, port: int, data: bytes, source: Source, now: float) -> None:
        from .v2.crypto import AuthError

        table = self.table
        if len(data) < BIND_LEN or not self.limiter.allow(source[:-2], now):
            table.count_drop("bad_bind")
            return
        if self.may_derive is not None and not self.may_derive(data, now):
            table.count_drop("bind_new_key_limited")
            return
        try:
            key, body = self.crypto.open_bind(data)
        except (AuthError, WireError):
            table.count_drop("bind_auth")
            return
        table.bind(port, key, body.peer, body.timestamp, source, now)

    def tick(self, now: float) -> None:
        self.table.expire(now, budget=1000)

    def sweep(self, now: float) -> None:
        self.limiter.sweep(now)


def ports_text(ports: Sequence[int]) -> str:
    return str(ports[0]) if len(ports) == 1 else f"{ports[0]}-{ports[-1]}"
