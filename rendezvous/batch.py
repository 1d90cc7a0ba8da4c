"""Classic requests a batch at a time: the service's hot path without a Python loop.

Pure, like :mod:`rendezvous.service`: :meth:`ClassicBatch.handle` takes ``n`` classic
requests back to back (``64 * n`` bytes), their ``n`` packed source endpoints back to
back (``6 * n`` bytes, 4-byte IPv4 + 2-byte port each, as ``Service.handle`` takes
them) and ``now``, and answers every request at once with a handful of C-level passes
(``struct``, ``map``, ``dict.update``, ``collections.Counter``) over the whole batch.

Semantics, exactly: when ``handle`` returns replies, the service's state afterwards
(registry contents *and their order*, every counter of ``Service.snapshot()``, the rate
limiter's buckets) and the replies are identical to calling
``service.handle(request_i, source_i, now)`` for i = 0, 1, ..., n-1 in order. There is no
"all registrations first" relaxation: a batch is only taken in bulk when the order of its
requests cannot matter, and otherwise ``handle`` returns None and changes nothing, so
the caller handles that batch one datagram at a time through ``Service.handle``. It
declines (returns None) when any of these holds:

- a ``my_pubkey`` is all zero (that request is dropped and counted, not registered);
- a key is both registered and looked up in the batch (A asks for B while B registers:
  the answer depends on which came first), including a self lookup;
- the registry is not ready for a bulk update at ``now`` (an entry is stale, so a lookup
  or sweep would delete it; the clock jumped 3 ttl; a new key would need an eviction;
  see :meth:`rendezvous.registry.Registry.upsert_lookup_many`), or a looked-up entry
  stores the value 0 (0.0.0.0:0 at tick 0), which the bulk lookup cannot tell from
  "absent";
- a source would be rate limited for any of its requests in the batch, or would need
  the limiter's table to be swept (see :meth:`RateLimiter.plan_all`);
- the classic protocol is off (``--no-classic``, ``--require-auth``).

Internal bookkeeping that no caller can observe may differ: when the registry rebuilds
its dict after CPython resized it (``stats.compactions``), and its oldest-key cache.

Datagrams that are not exactly 64 bytes are never given to this module: they go to
``Service.handle`` (which drops them today, and will dispatch protocol v2).
"""

from __future__ import annotations

import struct
from collections import Counter
from itertools import repeat
from typing import NamedTuple

from .classic import KEY_LEN, REPLY_LEN, REQUEST_LEN, ZERO_KEY
from .service import Service

__all__ = ["ClassicBatch", "PackedReplies", "split_keys"]

_RECORD = 8  # one reply: a big-endian 64-bit word whose last 6 bytes are the endpoint
_FOUND_LEN = {0: 0}.get  # value -> reply length: 0 for an absent key (value 0), else 6


class PackedReplies(NamedTuple):
    """One reply per request: reply i is ``records[8 * i + 2:8 * i + 2 + lengths[i]]``,
    i.e. the 6-byte endpoint, or empty (not found); ``lengths`` None means all are 6."""

    records: bytes
    lengths: list[int] | None

    def replies(self) -> list[bytes]:
        """The replies as separate byte strings (for tests and slow paths)."""
        lengths = self.lengths or [REPLY_LEN] * (len(self.records) // _RECORD)
        return [self.records[_RECORD * i + 2:_RECORD * i + 2 + n]
                for i, n in enumerate(lengths)]


_Formats = tuple[struct.Struct, struct.Struct, struct.Struct, struct.Struct]
_FORMATS: dict[int, _Formats] = {}


def _formats(n: int) -> _Formats:
    """For n requests: my keys, their keys, source IPs, n big-endian 64-bit words."""
    f = _FORMATS[n] = (struct.Struct(f"{KEY_LEN}s{KEY_LEN}x" * n),
                       struct.Struct(f"{KEY_LEN}x{KEY_LEN}s" * n),
                       struct.Struct("4s2x" * n),
                       struct.Struct(f">{n}Q"))
    return f


def split_keys(requests: bytes | bytearray | memoryview) -> tuple[tuple[bytes, ...],
                                                               tuple[bytes, ...]]:
    """The ``my_pubkey`` and the ``their_pubkey`` of each of the ``len(requests) // 64``
    classic requests back to back, with one C-level pass each."""
    n = len(requests) // REQUEST_LEN
    mine_fmt, theirs_fmt, _, _ = _FORMATS.get(n) or _formats(n)
    return mine_fmt.unpack_from(requests), theirs_fmt.unpack_from(requests)


class ClassicBatch:
    """Answers whole batches of classic requests for SERVICE (see the module docstring)."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def handle(self, requests: bytes | bytearray | memoryview, sources: bytes | bytearray,
               now: float) -> PackedReplies | None:
        """Replies to the ``len(requests) // 64`` requests, or None (nothing changed):
        then handle them one by one with ``Service.handle``."""
        n, rest = divmod(len(requests), REQUEST_LEN)
        if rest or len(sources) != REPLY_LEN * n:
            raise ValueError(f"a batch is 64 bytes per request and 6 per source, got "
                             f"{len(requests)} and {len(sources)} bytes")
        if not n:
            return PackedReplies(b"", None)
        svc = self.service
        if not svc.classic:  # --no-classic / --require-auth: each is dropped and counted
            return None
        mine_fmt, theirs_fmt, ips_fmt, words = _FORMATS.get(n) or _formats(n)
        mine = mine_fmt.unpack_from(requests)
        if ZERO_KEY in mine:  # a scan that mostly stops at the first byte: no hashing
            return None
        limiter, plan = svc.limiter, None
        if limiter.enabled:
            plan = limiter.plan_all(Counter(ips_fmt.unpack_from(sources)), now)
            if plan is None:
                return None
        got = svc.registry.upsert_lookup_many(mine, sources, theirs_fmt.unpack_from(requests),
                                              now)
        if got is None:
            return None
        if plan is not None:
            limiter.commit(plan)
        values, absent = got
        c = svc.counters
        c.requests += n
        c.found += n - absent
        c.not_found += absent
        lengths = list(map(_FOUND_LEN, values, repeat(REPLY_LEN))) if absent else None
        return PackedReplies(words.pack(*values), lengths)
