"""Replay protection for v2 request timestamps, with room for reordering.

A client sends its IPv4 and IPv6 requests back to back, and the two paths may deliver
them in either order. A strictly-increasing rule would call the later-arriving (older)
one a replay and leave that family unregistered, so the peers could end up pointing at
each other over different families. Like IPsec's anti-replay window (RFC 4303, 3.4.3),
a timestamp is accepted if it is

- newer than the newest one accepted so far, or
- no more than :data:`REORDER_WINDOW_NS` older than it, above the window's floor, and
  not one of the (at most :data:`RECENT_MAX`) timestamps already accepted in the window.

When more than RECENT_MAX timestamps fall inside the window, the oldest ones are
forgotten and the floor rises to the newest forgotten one, so a forgotten timestamp can
never be accepted again. Pure functions on ints and tuples; the registry stores the
three values per client.
"""

from __future__ import annotations

__all__ = ["RECENT_MAX", "REORDER_WINDOW_NS", "Window", "accepts", "record"]

REORDER_WINDOW_NS = 1_000_000_000  # 1 s: far more than two back-to-back sends can drift
RECENT_MAX = 8

Window = tuple[int, tuple[int, ...], int]  # (newest, accepted below it in the window, floor)

EMPTY: Window = (0, (), 0)


def accepts(window: Window, ts: int, span: int = REORDER_WINDOW_NS) -> bool:
    """Would a request with timestamp TS be fresh (not a replay)?"""
    newest, recent, floor = window
    if ts > newest:
        return True
    return ts != newest and ts > floor and ts > newest - span and ts not in recent


def record(window: Window, ts: int, span: int = REORDER_WINDOW_NS) -> Window:
    """The window after accepting TS (the caller checked :func:`accepts`)."""
    newest, recent, floor = window
    if ts > newest:
        if newest:
            recent = recent + (newest,)
        newest = ts
    else:
        recent = recent + (ts,)
    low = newest - span
    kept = tuple(sorted(t for t in recent if t > low))
    if len(kept) > RECENT_MAX:
        floor = max(floor, kept[-RECENT_MAX - 1])
        kept = kept[-RECENT_MAX:]
    return newest, kept, floor
