"""Classic batches with a shared store (``--store``): one round trip per batch.

:class:`SharedBatch` wraps :class:`rendezvous.batch.ClassicBatch`: the batch is first
handled against this server's own table, exactly as without a store (so the own table
stays what it would be, and is ready to answer alone during an outage); then all its
registrations are written to the store and all its lookups read from it in one
pipeline, and every lookup the store answers replaces the own table's answer.

Order within a batch: the store applies the batch's writes before its reads, so a
request that asks for a key registered later *in the same batch* finds it in the store
(the own table would not have had it yet). Several servers, each with its own batches,
share the store, so no order across requests that arrive within one batch's time is
promised anyway; the exact one-by-one order holds for the own table.

When ClassicBatch declines (see its docstring) this declines too, having changed
nothing; the caller then handles the datagrams one by one with ``Service.handle``,
which does a round trip per request.
"""

from __future__ import annotations

from .batch import ClassicBatch, PackedReplies, split_keys
from .classic import REPLY_LEN, REQUEST_LEN
from .service import Service

__all__ = ["SharedBatch"]


class SharedBatch:
    def __init__(self, service: Service) -> None:
        if service.store is None:
            raise ValueError("SharedBatch needs a service with a store")
        self.service = service
        self.local = ClassicBatch(service)

    def handle(self, requests: bytes | bytearray | memoryview, sources: bytes | bytearray,
               now: float) -> PackedReplies | None:
        res = self.local.handle(requests, sources, now)
        if res is None or not res.records:
            return res
        n = len(requests) // REQUEST_LEN
        mine, theirs = split_keys(requests)
        remote = self.service.shared_lookups(mine, sources, theirs)
        if not any(r is not None for r in remote):
            return res
        records = bytearray(res.records)
        lengths = res.lengths or [REPLY_LEN] * n
        changed = 0
        for i, ep in enumerate(remote):
            if ep is None:
                continue
            if lengths[i] == 0:
                changed += 1
            lengths[i] = REPLY_LEN
            records[8 * i + 2:8 * i + 8] = ep
        c = self.service.counters
        c.found += changed
        c.not_found -= changed
        return PackedReplies(bytes(records), None if lengths.count(REPLY_LEN) == n else lengths)
