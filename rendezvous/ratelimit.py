"""Per-source rate limiting: a token bucket per source address, stored as one float.

The bucket is kept in its GCRA form (the "theoretical arrival time", TAT): a request at
``now`` conforms when ``TAT - now <= burst_window``; it then pushes TAT forward by one
emission interval. That is exactly a token bucket of ``burst`` tokens refilled at
``rate`` per second, but it needs one float per source instead of two numbers, and a
source whose TAT lies in the past is indistinguishable from a fresh one, so it can be
forgotten. Pure: ``now`` comes from the caller.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["Plan", "RateLimiter"]

Plan = list[tuple[bytes, float]]


class RateLimiter:
    """Allow ``rate`` requests per second per source, with bursts of up to ``burst``.

    ``rate == 0`` disables limiting. ``max_sources`` bounds memory under a flood of
    spoofed sources: when it is reached, idle sources are forgotten first and, if that
    is not enough, the table is cleared (every source then starts with a full bucket).
    """

    def __init__(self, rate: float, burst: float, max_sources: int = 1_000_000) -> None:
        if rate < 0 or burst < 0:
            raise ValueError("rate and burst must not be negative")
        if rate > 0 and burst < 1:
            raise ValueError("burst must be at least 1 when rate limiting is on")
        self.enabled = rate > 0
        self._interval = 1.0 / rate if rate > 0 else 0.0
        self._window = (burst - 1) * self._interval
        self._max_sources = max_sources
        self._tat: dict[bytes, float] = {}
        self.limited = 0
        self.forgotten = 0

    def __len__(self) -> int:
        return len(self._tat)

    def allow(self, source: bytes, now: float) -> bool:
        """Whether a request from SOURCE (any hashable bytes, e.g. a packed IP) conforms."""
        if not self.enabled:
            return True
        tat = self._tat.get(source)
        if tat is None or tat < now:
            tat = now
        elif tat - now > self._window:
            self.limited += 1
            return False
        if source not in self._tat and len(self._tat) >= self._max_sources:
            self.sweep(now)
            if len(self._tat) >= self._max_sources:
                self.forgotten += len(self._tat)
                self._tat.clear()
        self._tat[source] = tat + self._interval
        return True

    def plan_all(self, counts: Mapping[bytes, int], now: float) -> Plan | None:
        """If ``allow(source, now)`` would be true for every one of ``counts[source]``
        requests of every source, the new bucket states those calls would leave (the
        same float additions in the same order), to :meth:`commit`; else None. Also None
        when the calls would sweep or clear the table on the way. Changes nothing."""
        if not self.enabled:
            return []
        get, interval, window = self._tat.get, self._interval, self._window
        plan: Plan = []
        fresh = 0
        for source, count in counts.items():
            tat = get(source)
            if tat is None:
                fresh += 1
                tat = now
            elif tat < now:
                tat = now
            for _ in range(count):
                if tat - now > window:
                    return None
                tat += interval
            plan.append((source, tat))
        if fresh and len(self._tat) + fresh > self._max_sources:
            return None
        return plan

    def commit(self, plan: Plan) -> None:
        """Apply a plan from :meth:`plan_all` (nothing may have changed since)."""
        self._tat.update(plan)

    def sweep(self, now: float) -> int:
        """Forget sources whose bucket is full again; return how many were forgotten."""
        idle = [s for s, tat in self._tat.items() if tat <= now]
        for s in idle:
            del self._tat[s]
        self.forgotten += len(idle)
        return len(idle)
