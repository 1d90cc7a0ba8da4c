"""The punch state machine: which request to send when, and which endpoints to apply.

Pure: the I/O loop feeds it the time, the WireGuard device as last read, and the
payloads of the server's replies; it returns actions (datagrams to send to the server,
endpoints to apply) and says when it next needs to be woken. No sockets, no clocks.

Classic replies do not say which peer they answer, so at most one request is in flight
at a time; a reply that arrives when none is in flight (a late one) is discarded.

The endpoint policy (when the server's answer is applied) is :mod:`punch.policy`,
shared with the v2 machine.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from rendezvous.classic import REPLY_LEN, ClassicError, Endpoint, Request, decode_reply

from .policy import DeviceView, PeerView, Status, Timing, apply_reason, looks_dead

__all__ = [
    "Apply", "DeviceView", "Keepalive", "PeerState", "PeerView", "Punch", "Send", "Status", "Timing",
]


@dataclass(frozen=True)
class Send:
    """Send PAYLOAD to the rendezvous server from WireGuard's port."""

    payload: bytes
    peer: bytes


@dataclass(frozen=True)
class Apply:
    """Set PEER's endpoint (and keepalive) on the interface, then open our NAT toward it."""

    peer: bytes
    endpoint: Endpoint
    keepalive: int
    reason: str


@dataclass(frozen=True)
class Keepalive:
    """Turn PEER's persistent keepalive on (its endpoint is kept as it is)."""

    peer: bytes
    keepalive: int


Action = Apply | Keepalive


@dataclass
class PeerState:
    key: bytes
    status: Status = Status.ASKING
    due: float = 0.0
    lost: int = 0              # consecutive lost requests
    misses: int = 0            # consecutive "not found" answers
    answer: Endpoint | None = None   # the server's latest answer
    applied: Endpoint | None = None  # what we last applied
    applied_at: float | None = None
    answered_at: float | None = None  # when the server last answered for this peer
    view: PeerView | None = None
    rx_changed_at: float = 0.0

    @property
    def resolved(self) -> bool:
        return self.status in (Status.APPLIED, Status.KEPT)


@dataclass
class _InFlight:
    peer: bytes
    deadline: float


@dataclass
class Counters:
    sent: int = 0
    replies: int = 0
    lost: int = 0
    late: int = 0
    malformed: int = 0
    applied: int = 0


class Punch:
    """Drive requests for every peer of a device (or the subset ONLY)."""

    def __init__(self, timing: Timing = Timing(), daemon: bool = False,
                 only: frozenset[bytes] | None = None) -> None:
        self.timing = timing
        self.daemon = daemon
        self.only = only
        self.my_key: bytes | None = None
        self.peers: dict[bytes, PeerState] = {}
        self.counters = Counters()
        self.replied = False  # has the server ever answered?
        self._inflight: _InFlight | None = None
        # After a timeout, a late reply may still come; until then only the lost peer
        # is asked again (the same question), never another peer (a misattribution).
        self._quiet: tuple[bytes, float] | None = None

    # -- inputs ---------------------------------------------------------------------

    def update_device(self, now: float, device: DeviceView) -> None:
        """The device as just read: picks up added and removed peers and rx progress."""
        self.my_key = device.my_key
        seen = set()
        for view in device.peers:
            if self.only is not None and view.key not in self.only:
                continue
            seen.add(view.key)
            st = self.peers.get(view.key)
            if st is None:
                st = self.peers[view.key] = PeerState(view.key, due=now, rx_changed_at=now)
            elif st.view is None or view.rx_bytes != st.view.rx_bytes:
                st.rx_changed_at = now
            st.view = view
            if self.daemon and st.resolved and self._looks_dead(st, now) and st.due > now + self.timing.poll:
                st.due = now  # a dead-looking peer is polled fast
        for gone in set(self.peers) - seen:
            del self.peers[gone]
            if self._inflight and self._inflight.peer == gone:
                self._inflight = None

    def on_reply(self, now: float, payload: bytes) -> list[Action]:
        """A datagram from the server (already checked to come from it, to our port)."""
        if len(payload) not in (0, REPLY_LEN):
            self.counters.malformed += 1
            return []
        inflight = self._inflight
        if inflight is None or now > inflight.deadline:
            self.counters.late += 1
            return []
        self._inflight = None
        self.counters.replies += 1
        self.replied = True
        st = self.peers.get(inflight.peer)
        if st is None:
            return []
        st.lost = 0
        try:
            answer = decode_reply(payload)
        except ClassicError:
            self.counters.malformed += 1
            return []
        st.answered_at = now
        if answer is None:
            if not st.resolved:
                st.status = Status.NOT_FOUND
            t = self.timing
            st.due = now + min(t.first_poll * 2 ** st.misses, t.poll)
            st.misses += 1
            return []
        st.misses = 0
        action = self._decide(st, answer, now)
        st.answer = answer
        st.due = now + (self.timing.recheck if self.daemon else float("inf"))
        if action is None:
            if st.status is not Status.APPLIED:
                st.status = Status.KEPT
            if st.view is not None and st.view.keepalive == 0:
                # A kept endpoint still needs keepalives to hold the NATs open.
                return [Keepalive(st.key, self.timing.keepalive)]
            return []
        st.status = Status.APPLIED
        st.applied, st.applied_at = answer, now
        st.rx_changed_at = now  # give the new endpoint a full keepalive period
        # What WireGuard has now, until the next read of the device: a second answer
        # with the same endpoint before that read is then not applied again.
        st.view = replace(st.view or PeerView(st.key), endpoint=(answer.ip, answer.port),
                          keepalive=self.timing.keepalive)
        self.counters.applied += 1
        return [action]

    def poll(self, now: float) -> list[Send]:
        """Expire a lost request and start the next one that is due."""
        out: list[Send] = []
        inflight = self._inflight
        if inflight is not None and now >= inflight.deadline:
            self._inflight = None
            self.counters.lost += 1
            self._quiet = (inflight.peer, now + self.timing.request_timeout / 2)
            st = self.peers.get(inflight.peer)
            if st is not None:
                st.lost += 1
                # The timeout already waited once: retry the first loss at once, then
                # back off, doubling from poll up to backoff_max.
                delay = 0.0 if st.lost == 1 else min(self.timing.poll * 2 ** (st.lost - 2),
                                                     self.timing.backoff_max)
                st.due = now + delay
        if self._inflight is None and self.my_key is not None:
            candidates: Iterable[PeerState] = self.peers.values()
            if self._quiet is not None:
                if now < self._quiet[1]:
                    candidates = [s for s in candidates if s.key == self._quiet[0]]
                else:
                    self._quiet = None
            st = min(candidates, key=lambda s: s.due, default=None)
            if st is not None and st.due <= now:
                self._inflight = _InFlight(st.key, now + self.timing.request_timeout)
                self.counters.sent += 1
                out.append(Send(Request(self.my_key, st.key).to_bytes(), st.key))
        return out

    def next_wakeup(self) -> float:
        """The earliest time poll() has something to do."""
        if self._inflight is not None:
            return self._inflight.deadline
        due = min((s.due for s in self.peers.values()), default=float("inf"))
        if self._quiet is not None:
            lost = self.peers.get(self._quiet[0])
            due = min(max(due, self._quiet[1]), lost.due if lost else float("inf"))
        return due

    # -- queries --------------------------------------------------------------------

    def pending(self) -> list[PeerState]:
        """Peers whose endpoint is not settled yet."""
        return [s for s in self.peers.values() if not s.resolved]

    def done(self) -> bool:
        return not self.pending()

    def without_handshake(self, now: float) -> list[PeerState]:
        """Peers with no handshake at all, or none since we applied their endpoint
        (a handshake older than our change was made at the old endpoint)."""
        out = []
        for st in self.peers.values():
            age = st.view.handshake_age if st.view else None
            if age is None:
                out.append(st)
            elif (st.status is Status.APPLIED and st.applied_at is not None
                  and age > now - st.applied_at + 1.0):
                out.append(st)
        return out

    # -- policy ---------------------------------------------------------------------

    def _looks_dead(self, st: PeerState, now: float) -> bool:
        return looks_dead(st.view, st.rx_changed_at, now, self.timing)

    def _decide(self, st: PeerState, answer: Endpoint, now: float) -> Apply | None:
        reason = apply_reason(st.view, st.applied, answer, self._looks_dead(st, now))
        return None if reason is None else Apply(st.key, answer, self.timing.keepalive, reason)
