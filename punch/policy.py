"""What both punch machines (classic and v2) share: the device as they see it, their
timing, and the endpoint policy that decides whether the server's answer is applied.

Endpoint policy: the server's answer for a peer is applied when
  1. WireGuard has no endpoint for the peer, or no handshake with it yet; or
  2. the answer differs from the one we last applied (the peer's NAT rebound); or
  3. the peer looks dead (received bytes flat for longer than its keepalive plus a
     margin) and the answer differs from the endpoint WireGuard uses now.
Otherwise WireGuard keeps what it has: it may have roamed to a better endpoint than
the one the server saw.

Pure: no I/O, no clocks.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

__all__ = [
    "DeviceView", "EndpointLike", "PeerView", "Status", "Timing", "apply_reason", "format_endpoint",
    "looks_dead", "same_endpoint",
]


@dataclass(frozen=True)
class Timing:
    request_timeout: float = 1.0   # a request without a reply by then is lost
    poll: float = 1.0              # retry a peer the server does not know yet
    first_poll: float = 0.25       # ... but sooner at first (doubling up to poll): two
                                   # peers started together find each other fast
    backoff_max: float = 8.0       # cap of the doubling retry delay after lost requests
    interval: float = 20.0         # daemon: re-register at least this often

    @property
    def recheck(self) -> float:
        """Daemon: how often each peer is re-asked (every request also re-registers us).
        Half the interval, so a peer whose NAT rebinds is followed within about one
        interval: up to half of it until the peer re-registers, half until we ask."""
        return self.interval / 2
    keepalive: int = 25            # persistent keepalive applied with an endpoint
    dead_margin: float = 5.0       # flat rx for keepalive + this = looks dead
    v6_fallback: float = 4.0       # v2: an IPv6 endpoint without a handshake by then
                                   # gives way to the peer's IPv4 endpoint
    v6_grace: float = 0.5          # v2: an IPv4 answer waits this long for the IPv6
                                   # one in flight, while we do not know yet whether
                                   # we have IPv6 (no flip from IPv4 to IPv6)
    family_gap: float = 0.05       # v2: the IPv4 request follows the IPv6 one by this
                                   # much (or as soon as its answer is in), so the
                                   # server sees them in the order of their timestamps
    max_inflight: int = 32         # v2: requests in flight at once (the server rate-
                                   # limits each source: 200/s, bursts of 400, by default)


@dataclass(frozen=True)
class PeerView:
    """One peer as WireGuard reports it (endpoint and handshake age may be absent)."""

    key: bytes
    endpoint: tuple[str, int] | None = None  # may be IPv6
    handshake_age: float | None = None  # seconds since the latest handshake
    rx_bytes: int = 0
    keepalive: int = 0


@dataclass(frozen=True)
class DeviceView:
    my_key: bytes
    peers: tuple[PeerView, ...]


class Status(Enum):
    ASKING = "asking"          # no answer from the server yet
    NOT_FOUND = "not found"    # the server does not know the peer (yet) / v2: pending
    APPLIED = "applied"        # we set the server's endpoint
    KEPT = "kept"              # WireGuard's endpoint is fine as it is


class EndpointLike(Protocol):
    """An answer from the server: the classic IPv4 endpoint or a v2 one of either family."""

    @property
    def ip(self) -> str: ...

    @property
    def port(self) -> int: ...


def format_endpoint(ep: EndpointLike) -> str:
    """``ip:port``, IPv6 addresses in brackets."""
    return f"[{ep.ip}]:{ep.port}" if ":" in ep.ip else f"{ep.ip}:{ep.port}"


def same_endpoint(current: tuple[str, int] | None, answer: EndpointLike) -> bool:
    """Does WireGuard's CURRENT endpoint equal ANSWER? Addresses are compared as
    addresses, so ``2001:db8::1`` and ``2001:0db8:0::1`` are the same."""
    if current is None:
        return False
    if current[1] != answer.port:
        return False
    if current[0] == answer.ip:
        return True
    try:
        return ipaddress.ip_address(current[0]) == ipaddress.ip_address(answer.ip)
    except ValueError:
        return False


def looks_dead(view: PeerView | None, rx_changed_at: float, now: float, timing: Timing) -> bool:
    """Received bytes flat for longer than the peer's keepalive (or ours) plus a margin."""
    keepalive = view.keepalive if view and view.keepalive else timing.keepalive
    return now - rx_changed_at > keepalive + timing.dead_margin


def apply_reason(view: PeerView | None, applied: EndpointLike | None, answer: EndpointLike,
                 dead: bool) -> str | None:
    """Why ANSWER should be set on the peer (a log phrase), or None to keep WireGuard's.

    APPLIED is the answer we last set (None if never); DEAD says the peer looks dead.
    """
    current = view.endpoint if view else None
    if current is None or view is None or view.handshake_age is None:
        if same_endpoint(current, answer) and applied == answer:
            return None  # already set by us; the handshake is WireGuard's business
        return "no endpoint" if current is None else "no handshake yet"
    if applied is not None and answer != applied:
        return f"peer moved from {format_endpoint(applied)}"
    if dead and not same_endpoint(current, answer):
        return "peer looks dead"
    return None
