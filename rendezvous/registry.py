"""The registry: public key -> last observed public endpoint, with expiry and a capacity.

Pure: every call takes ``now`` (seconds, any monotonic clock) and does no I/O.

Design, and why (the budget is 160 bytes per peer at 1,000,000 peers, measured as RSS):
- One ``dict`` maps the 32-byte key (an 80-byte object once pymalloc rounds it) to one
  ``int`` packing a 12-bit *tick* (the refresh time in units of ttl/1024, modulo 4096)
  above the 48-bit endpoint: ``tick << 48 | ip << 16 | port``. A 60-bit int takes 32
  bytes; one more bit (or a tuple, or an object) costs 16 to 60 bytes more per peer.
  The endpoint sits in the low bits so that a value packed as a big-endian 64-bit word
  ends with the classic 6-byte reply: the batch path builds all its replies with one
  ``struct.pack`` (see :meth:`Registry.get_many`). Ages are computed modulo 4096 ticks, which
  is exact while no entry outlives 4 x ttl unswept: :meth:`Registry.expire` must run
  regularly (the server calls it every loop, and upserts sweep a little too), and a
  registry left untouched for 3 x ttl forgets everything at once.
- The dict's insertion order is the refresh order *at the resolution of one tick*: a
  refresh of a key stored in an earlier tick deletes and re-inserts it, so the dict
  stays sorted by tick and the least recently refreshed entry is always the first one.
  That gives LRU eviction and oldest-first expiry in O(1) amortised.
- A refresh of a key already refreshed in the current tick updates its value *in
  place* (``d[key] = value`` keeps the position). Every entry after it has the current
  tick too (ticks never go backwards), so the dict stays sorted by tick, which is all
  expiry needs; only the eviction order among entries of one tick changes (a key keeps
  the place of its first refresh in the tick). Ticks are compared modulo 4096, so like
  the ages this relies on no entry outliving 4 x ttl unswept. Why: an active peer
  refreshes many times per tick (a tick is ttl/1024, 0.18 s at the default ttl), and
  moving it every time cost a delete, an insert and a dead slot each (and, at 60,000
  keys, a table rebuild every ~27,000 refreshes); in place it costs one store, and the
  batch path (:meth:`Registry.upsert_lookup_many`) can apply a whole batch with one
  ``dict.update`` and still leave exactly what the calls one by one leave.
- Re-inserting leaves dead slots behind; when they fill the table CPython resizes to
  4x the live entries (measured: 185 B/peer at 1M). We notice the resize (the dict's
  size changes) and rebuild the dict at once, which sizes it for the live entries.
- Iterating a dict from its start walks over dead slots, so we do not call
  ``next(iter(d))`` per eviction. We take a snapshot of the first few keys, with their
  value objects, and pop from it; a key whose tick changed since has moved to the back
  (or left) and is skipped. An in-place refresh keeps the tick, and the position.
"""

from __future__ import annotations

import itertools
import struct
import sys
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import compress, repeat
from operator import ge, lt

__all__ = ["Registry", "RegistryStats"]

_TICK_BITS = 12
_TICK_MASK = (1 << _TICK_BITS) - 1
_TICKS_PER_TTL = 1024  # ages up to 4 ttl are unambiguous modulo 4096
_EP_BITS = 48  # the endpoint: 4-byte IPv4 + 2-byte port, big-endian, in the low bits
_EP_MASK = (1 << _EP_BITS) - 1


@dataclass
class RegistryStats:
    inserted: int = 0
    refreshed: int = 0
    evicted: int = 0
    expired: int = 0
    compactions: int = 0


_WORDS: dict[int, struct.Struct] = {}


def _words(n: int) -> struct.Struct:
    """n big-endian unsigned 64-bit words (cached)."""
    w = _WORDS[n] = struct.Struct(f">{n}Q")
    return w


class Registry:
    """Map public keys to packed endpoints (4-byte IPv4 + 2-byte port, network order)."""

    def __init__(self, ttl: float, max_peers: int) -> None:
        if ttl <= 0:
            raise ValueError(f"ttl must be positive, got {ttl}")
        if max_peers < 1:
            raise ValueError(f"max_peers must be at least 1, got {max_peers}")
        self.ttl = ttl
        self.max_peers = max_peers
        self.stats = RegistryStats()
        self._d: dict[bytes, int] = {}
        self._per_second = _TICKS_PER_TTL / ttl
        self._now_tick = 0  # the registry's clock: never goes backwards
        self._ops = 0
        self._size = sys.getsizeof(self._d)
        self._front: deque[bytes] = deque()
        self._front_values: deque[int] = deque()

    def __len__(self) -> int:
        return len(self._d)

    def __contains__(self, key: object) -> bool:
        return key in self._d

    def _clock(self, now: float) -> int:
        """The current tick; a jump of 3 ttl or more forgets every entry at once."""
        t = int(now * self._per_second)
        if t > self._now_tick:
            if t - self._now_tick >= 3 * _TICKS_PER_TTL and self._d:
                self.stats.expired += len(self._d)
                self._d = {}
                self._size = sys.getsizeof(self._d)
                self._front.clear()
                self._front_values.clear()
            self._now_tick = t
        return self._now_tick

    def upsert(self, key: bytes, endpoint: bytes, now: float) -> None:
        """Record (or refresh) KEY at ENDPOINT; evicts the LRU entry when full. A key
        already refreshed in this tick is updated in place (see the module docstring)."""
        tick = int(now * self._per_second)
        if tick > self._now_tick:
            self._clock(now)  # first: after a long idle gap it empties the table
        tick = self._now_tick
        d = self._d
        self._ops += 1
        if not self._ops & 63:
            # Every 64 operations: sweep a little, and notice a resize (CPython grows the
            # table 4x when re-insertions fill it; we rebuild it for the live entries).
            self.expire(now, budget=128)
            if sys.getsizeof(d) != self._size:
                self._resized()
                d = self._d
        tick &= _TICK_MASK
        value = (tick << _EP_BITS) | int.from_bytes(endpoint, "big")
        old = d.get(key)
        if old is not None:
            self.stats.refreshed += 1
            if old >> _EP_BITS != tick:
                del d[key]  # refreshed in an earlier tick: moves to the back
        else:
            if len(d) >= self.max_peers:
                self.expire(now)
                while len(d) >= self.max_peers:
                    self._pop_oldest()
                    self.stats.evicted += 1
            self.stats.inserted += 1
        d[key] = value

    def lookup(self, key: bytes, now: float) -> bytes | None:
        """The packed endpoint of KEY, or None if unknown or expired."""
        tick = int(now * self._per_second)
        tick = self._clock(now) if tick > self._now_tick else self._now_tick
        value = self._d.get(key)
        if value is None:
            return None
        if (tick - (value >> _EP_BITS)) & _TICK_MASK >= _TICKS_PER_TTL:
            del self._d[key]
            self.stats.expired += 1
            return None
        return (value & _EP_MASK).to_bytes(6, "big")

    def expire(self, now: float, budget: int | None = None) -> int:
        """Drop entries not refreshed for ``ttl`` seconds, oldest first; return how many."""
        before = self.stats.expired
        tick = self._clock(now)
        d = self._d
        n = 0
        while d and (budget is None or n < budget):
            key = self._peek_oldest()
            if (tick - (d[key] >> _EP_BITS)) & _TICK_MASK < _TICKS_PER_TTL:
                break
            self._front.popleft()
            self._front_values.popleft()
            del d[key]
            n += 1
        self.stats.expired += n
        return self.stats.expired - before

    # ---- batches -----------------------------------------------------------------------
    #
    def upsert_lookup_many(self, keys: Sequence[bytes], endpoints: bytes | bytearray,
                           lookups: Sequence[bytes],
                           now: float) -> tuple[list[int], int] | None:
        """``upsert(keys[i], endpoints[6 * i:6 * i + 6], now)`` then ``lookup(lookups[i],
        now)`` for every i, in order, with a few C-level passes over all of them.

        Returns the looked-up values and how many were absent: value i packed as a
        big-endian 64-bit word ends with the 6-byte endpoint lookup i would return; an
        absent key gives 0. Returns None, having changed nothing, unless the result (the
        dict's keys, values and order, the stats, the replies) is exactly that of the
        calls one by one, i.e. unless all of these hold at NOW:

        - no key is both upserted and looked up (the order would matter);
        - no entry is stale, so no lookup deletes one and the sweeps inside ``upsert``
          find nothing (the dict is sorted by tick: checking the oldest is enough);
        - the clock does not jump 3 ttl (which forgets every entry first);
        - the new keys fit without an eviction;
        - no looked-up entry stores the value 0 (0.0.0.0:0 at tick 0), which would read
          as absent.

        Why one ``dict.update`` is exact: every upsert of the batch is at the same tick,
        so one by one, a key's first upsert in the batch moves it to the back (or inserts
        it) unless it was already refreshed in this tick, and every later one updates it
        in place. ``dict(zip(keys, values))`` holds each key once, in the order of its
        first upsert, with the value of its last: after popping the keys that move,
        ``d.update`` of it leaves exactly that.

        Unobservable bookkeeping may differ: when the dict is rebuilt after CPython
        resized it (``stats.compactions``), how many dead slots it holds.
        """
        n = len(keys)
        if len(endpoints) != 6 * n or len(lookups) != n:
            raise ValueError(f"need 6 bytes of endpoint and one lookup per key: {n} keys, "
                             f"{len(endpoints)} bytes, {len(lookups)} lookups")
        d = self._d
        tick = max(int(now * self._per_second), self._now_tick)
        if d:
            if tick - self._now_tick >= 3 * _TICKS_PER_TTL:
                return None  # _clock would forget every entry first
            oldest = d[self._peek_oldest()]
            if (tick - (oldest >> _EP_BITS)) & _TICK_MASK >= _TICKS_PER_TTL:
                return None  # an entry is stale; the dict is sorted by tick
        t = tick & _TICK_MASK
        # n big-endian 64-bit values: 2 bytes of tick, then the 6-byte endpoint
        rec = bytearray(8 * n)
        rec[0::8] = bytes((t >> 8,)) * n
        rec[1::8] = bytes((t & 0xFF,)) * n
        rec[2::8] = endpoints[0::6]
        rec[3::8] = endpoints[1::6]
        rec[4::8] = endpoints[2::6]
        rec[5::8] = endpoints[3::6]
        rec[6::8] = endpoints[4::6]
        rec[7::8] = endpoints[5::6]
        # each key once, in the order of its first upsert, with its last upsert's value
        latest = dict(zip(keys, (_WORDS.get(n) or _words(n)).unpack(rec)))
        if not latest.keys().isdisjoint(lookups):
            return None
        if len(d) + len(latest) > self.max_peers and (
                len(d) + len(latest) - sum(map(d.__contains__, latest)) > self.max_peers):
            return None  # a new key would need an eviction
        found = list(map(d.get, lookups, repeat(0)))
        absent = found.count(0)
        if absent and n - sum(map(d.__contains__, lookups)) != absent:
            return None

        self._now_tick = tick  # what _clock(now) does when it forgets nothing
        before = len(d)
        # The keys that move are those not stored at tick t: absent (-1), or stored in
        # an earlier tick (below lo, or at or above hi once the 12-bit tick wrapped).
        lo, hi = t << _EP_BITS, (t + 1) << _EP_BITS
        stored = list(map(d.get, latest, repeat(-1)))
        if min(stored) < lo:
            deque(map(d.pop, compress(latest, map(lt, stored, repeat(lo))), repeat(None)), 0)
        if max(stored) >= hi:
            deque(map(d.pop, compress(latest, map(ge, stored, repeat(hi))), repeat(None)), 0)
        d.update(latest)
        new = len(d) - before
        self.stats.inserted += new
        self.stats.refreshed += n - new
        ops, self._ops = self._ops, self._ops + n
        if ops >> 6 != self._ops >> 6 and sys.getsizeof(d) != self._size:
            self._resized()  # upsert() would have noticed it at its next 64th operation
        return found, absent

    def oldest(self) -> bytes | None:
        """The least recently refreshed key (the next to be evicted)."""
        return self._peek_oldest() if self._d else None

    def _peek_oldest(self) -> bytes:
        d, front, values = self._d, self._front, self._front_values
        while True:
            while front:
                key = front[0]
                value = d.get(key)
                if value is not None and value >> _EP_BITS == values[0] >> _EP_BITS:
                    return key
                front.popleft()  # gone, or moved to the back (a later tick) since then
                values.popleft()
            keys = list(itertools.islice(d, max(64, len(d) >> 4)))
            front.extend(keys)
            values.extend(map(d.__getitem__, keys))

    def _pop_oldest(self) -> None:
        key = self._peek_oldest()
        self._front.popleft()
        self._front_values.popleft()
        del self._d[key]

    def _resized(self) -> None:
        """CPython resized the table; rebuild it sized for the live entries. The copy
        holds the same value objects, so the snapshot of the oldest keys stays valid."""
        self._d = dict(self._d)
        self._size = sys.getsizeof(self._d)
        self.stats.compactions += 1
