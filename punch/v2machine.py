"""The protocol v2 punch state machine (docs/PROTOCOL.md): which requests to send when,
which replies and notifications to believe, and which endpoints to apply.

Pure, like :mod:`punch.machine`: the I/O loop feeds it the time (monotonic seconds,
plus wall-clock nanoseconds for the request timestamps), the WireGuard device as last
read, and the *opened* bodies of the server's messages with the address family they
arrived on; it returns actions (request bodies to seal and send over a family,
endpoints to apply) and says when it next needs to be woken. Request ids come from an
injected random source, so tests are deterministic. No sockets, clocks or cryptography.

Requests. Every peer is asked over every family the client can reach the server on
(each request also registers our address for that family). Each question has its own
random non-zero 32-bit id; many are in flight at once (at most
:attr:`Timing.max_inflight`), and a reply is matched to its request by id: an id that
is not in flight (a late reply, or one never sent) is counted and ignored. A request
without a reply after ``request_timeout`` is lost: the first loss is retried at once,
then the retry delay doubles from ``poll`` up to ``backoff_max``. While the server says
"pending" (no mutual consent yet) the peer is asked again after 0.25 s, doubling to
``poll``; the daemon re-asks every peer every ``interval / 2``.

Timestamps. ``wall_ns + offset``, strictly increasing. A ``stale`` reply carries the
lowest timestamp the server accepts next: the offset moves so the next timestamp is at
least that, and the question is asked again at once (after three stale answers in a
row, with the lost-request backoff).

Endpoints. A ``found`` reply and a notify both carry the peer's endpoints (at most one
per family). The peer's IPv6 endpoint is preferred when we have IPv6 too (the server
has answered us over IPv6, so it saw an IPv6 address of ours), else its IPv4 one. While
that is not known yet and our IPv6 request is in flight, an answer over IPv4 waits for
it up to ``v6_grace`` seconds, so the endpoint does not flip from IPv4 to IPv6. An
IPv6 endpoint that gives no handshake within ``v6_fallback`` seconds gives way to the
peer's IPv4 endpoint (until the peer's IPv6 endpoint changes). Whether the chosen
answer is applied follows the classic policy, :func:`punch.policy.apply_reason`.

Spray (issue 7: one side symmetric). When our own verdict is easy (no NAT, or an
endpoint-independent mapping) and the peer's is hard (address- or address-and-port-
dependent), applying the peer's IPv4 endpoint also yields a :class:`Spray`: empty
datagrams from WireGuard's port to the peer's reported address, over a window of
``count`` ports centred on its reported port. Each opens a mapping in our NAT that
accepts the peer's handshake from whichever port its NAT picks for us, if that port is
in the window (port-block-allocating NATs keep a host's ports in one block, RFC 7422);
the peer's WireGuard initiates to our known endpoint and ours follows it (roaming).
Once per endpoint applied; an endpoint we set earlier and keep is sprayed for once
the verdicts call for it (one changed since, e.g. the peer checked its NAT again and it
is hard after all) if it has given no handshake yet; only ever toward the address the
server reported; never when either verdict is unknown; off with ``spray=None``. The
hard side, for its part, waits ``spray_hold`` seconds before it applies the easy peer's
endpoint (its WireGuard then initiates at once), so that its first handshake arrives
after the peer's spray rather than racing it and being retried by WireGuard only 5 s
later.

Notify. The server's notify is the coordinated punch: it is acted on at once, but
only if its ``server_time`` is newer than that of the last notify accepted for that
peer (an older or replayed one is counted and refused).

Relay (with a :class:`RelayTiming`; docs/PROTOCOL.md, "Relay"). A peer whose direct
endpoint gave no handshake ``after`` seconds after we first set it (or at once, when
``at_once(our NAT byte, the peer's)`` says so) is asked for again with the relay flag; so
is every later request for it while it is relayed, so the server's allocation stays
the one we use. A relay message (to our request, or because the peer asked) newer than
the last one accepted for the peer is acted on: :class:`Bind` (the shell sends a bind
to the relay from WireGuard's port, so the relay learns the very mapping WireGuard's
packets will use) and then the relay endpoint is applied. The bind is repeated every
``rebind`` seconds until a handshake is seen over the relay, then every
``keep_bound``. Answers from the server no longer move a relayed peer.

Upgrading. While relayed, the direct endpoint is tried ``upgrade_every`` seconds after
going to the relay (doubling after each failure, up to ``upgrade_max``): it is applied
for ``upgrade_window`` seconds. The try succeeds when, at its end, WireGuard still uses
that endpoint and has authenticated something from the peer since the try began (a
handshake, or received bytes: any packet that came through the relay would have moved
WireGuard's endpoint back to the relay); then the peer is direct and the relay is let
go (it expires at the server when idle). Otherwise the relay endpoint is applied again.
A relayed peer whose WireGuard roams by itself to an endpoint that is not the relay
(the peer's try reached us directly) is direct too, and so is one whose WireGuard roams
during a try to neither the relay nor the endpoint tried, having heard from the peer
(a symmetric NAT picked another port toward us than toward the server). The verdicts
shape a try as they shape the first punch: the easy side sprays with it, and the hard
side starts its try ``spray_hold`` seconds late, after the easy peer's (whose tries
keep the same pace). An offer of the relay we left is declined while WireGuard stays
on the direct endpoint (the peer's routine requests before it has heard us directly).
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

from rendezvous.nat import NatVerdict
from rendezvous.v2.wire import (
    FLAG_RELAY,
    Endpoint,
    NotifyBody,
    RelayBody,
    ReplyBody,
    RequestBody,
)
from rendezvous.v2.wire import Status as Answer

from .machine import Keepalive
from .policy import (
    DeviceView,
    PeerView,
    Status,
    Timing,
    apply_reason,
    format_endpoint,
    looks_dead,
    same_endpoint,
)

__all__ = ["Apply", "Bind", "Counters", "Keepalive", "PeerState", "PunchV2", "RelayTiming",
           "Send", "Spray", "SprayConfig"]

FAMILIES = (4, 6)
_REMEMBER_EXPIRED = 1024   # ids of expired requests kept to tell "late" from "unknown"
_STALE_AT_ONCE = 3         # stale answers in a row retried without delay


@dataclass(frozen=True)
class Send:
    """Seal BODY and send it to the server over FAMILY (4 or 6), from WireGuard's port."""

    body: RequestBody
    family: int
    peer: bytes


@dataclass(frozen=True)
class Apply:
    """Set PEER's endpoint (and keepalive) on the interface, then open our NAT toward it."""

    peer: bytes
    endpoint: Endpoint
    keepalive: int
    reason: str


@dataclass(frozen=True)
class SprayConfig:
    """Bounds of one spray: COUNT datagrams (the port window), at most RATE a second."""

    count: int = 512
    rate: float = 5000.0

    def __post_init__(self) -> None:
        if not 1 <= self.count <= 4096:
            raise ValueError(f"spray count must be 1..4096, got {self.count!r}")
        if not self.rate > 0:
            raise ValueError(f"spray rate must be positive, got {self.rate!r}")


@dataclass(frozen=True)
class Spray:
    """Send an empty datagram from WireGuard's port to IP at each of PORTS (at most
    RATE a second): PEER's NAT is hard and ours is easy."""

    peer: bytes
    ip: str
    ports: range
    rate: float



@dataclass(frozen=True)
class Bind:
    """Send a bind for PEER to RELAY from WireGuard's port (the shell seals it)."""

    peer: bytes
    relay: Endpoint


@dataclass(frozen=True)
class RelayTiming:
    after: float = 10.0          # no handshake this long after the direct endpoint: relay
    # (our NAT byte, the peer's) -> relay at once, without the deadline; None: never. For
    # the NAT verdicts of netcheck ("both symmetric"), wired where those are defined.
    at_once: Callable[[int, int], bool] | None = None
    rebind: float = 2.0          # re-send the bind this often until a handshake over it
    keep_bound: float = 20.0     # ... and then this often
    upgrade_every: float = 30.0  # first try of the direct endpoint after going relayed
    upgrade_max: float = 600.0   # the delay between tries doubles up to this
    upgrade_window: float = 5.0  # a try without proof by then goes back to the relay


Action = Apply | Keepalive | Spray | Bind


@dataclass
class _Ask:
    """One question: a peer over one family."""

    due: float = 0.0
    lost: int = 0              # consecutive lost requests
    misses: int = 0            # consecutive "pending" answers
    stale: int = 0             # consecutive "stale" answers
    inflight: int | None = None  # the request id in flight
    after_v6: bool = False     # IPv4: held back behind the IPv6 request just sent
    answered: bool = False     # the server has answered (found/pending) over this family:
                               # we are registered there, which the peer needs


# A handshake older than this, with keepalive on, means the tunnel is broken (WireGuard
# renews the session every REKEY_AFTER_TIME = 120 s while it sends; 180 s leaves room).
STALE_HANDSHAKE = 180.0
# Nothing received for this many of our keepalive periods (plus Timing.dead_margin),
# with keepalive on, also means the tunnel is broken: the peer's wg-punch sets a
# keepalive on its side too, so a working tunnel brings its keepalives at least that
# often. Sooner than STALE_HANDSHAKE (55 s at the default 25 s against 180 s).
SILENT_KEEPALIVES = 2


@dataclass
class PeerState:
    key: bytes
    status: Status = Status.ASKING
    asks: dict[int, _Ask] = field(default_factory=dict)
    endpoints: dict[int, Endpoint] = field(default_factory=dict)  # the peer's, by family
    peer_nat: int = 0
    answer: Endpoint | None = None     # the endpoint we chose from the latest answer
    applied: Endpoint | None = None    # what we last applied
    applied_at: float | None = None
    answered_at: float | None = None   # the server's latest found/pending answer (or notify)
    fallback_at: float | None = None   # when to check an applied IPv6 endpoint
    hold_until: float | None = None    # an IPv4 answer waits for the IPv6 one until then
    v6_failed: Endpoint | None = None  # an IPv6 endpoint that gave no handshake
    notified: int = -1                 # server_time of the last notify accepted
    sprayed: Endpoint | None = None    # the endpoint we last sprayed around
    spray_wait: tuple[Endpoint, float] | None = None  # hard side: apply it after that time
    view: PeerView | None = None
    view_at: float = 0.0               # when VIEW was read
    seen_at: float = 0.0               # when this run first saw the peer
    v6_before: bool = False            # WireGuard had made a handshake at the IPv6
                                       # endpoint we applied, just before we did
    rx_changed_at: float = 0.0
    applied_rx: int = 0                # WireGuard's rx bytes when we set APPLIED
    # relay fallback
    punch_since: float | None = None   # a direct endpoint set, no handshake yet, since
    relay_wanted: bool = False         # our requests for the peer carry FLAG_RELAY
    relay_why: str = "asked for by the peer"
    relay: Endpoint | None = None      # the relay endpoint we use (None: direct)
    left_relay: Endpoint | None = None  # the relay we left for a direct path that works
    relay_time: int = -1               # server_time of the last relay message accepted
    relayed_at: float = 0.0            # when we went to the relay
    next_bind: float | None = None
    upgrade_at: float | None = None
    upgrade_delay: float = 0.0
    trying: Endpoint | None = None     # the direct endpoint on trial
    trying_since: float = 0.0
    trying_rx: int = 0

    @property
    def path(self) -> str:
        """"relay", "trying direct", "direct" (an endpoint with a handshake this run) or
        "" (no endpoint yet)."""
        if self.trying is not None:
            return "trying direct"
        if self.relay is not None:
            return "relay"
        return "direct" if self.applied is not None or self.status is Status.KEPT else ""

    @property
    def resolved(self) -> bool:
        return self.status in (Status.APPLIED, Status.KEPT)

    def handshake_after(self, t: float) -> bool:
        """Did the latest handshake WireGuard reports happen after time T?"""
        age = self.view.handshake_age if self.view else None
        return age is not None and self.view_at - age > t

    def heard_since_applied(self) -> bool:
        """Has the peer been heard since we set its endpoint: a handshake after that, or
        data received while WireGuard does not use the relay we left? The second is what
        proves a direct path taken off the relay: the session the relay carried goes on
        over it, and the next handshake may be two minutes away."""
        if self.applied_at is None:
            return False
        if self.handshake_after(self.applied_at):
            return True
        view = self.view
        return (view is not None and view.rx_bytes > self.applied_rx
                and not (self.left_relay is not None
                         and same_endpoint(view.endpoint, self.left_relay)))

    @property
    def due(self) -> float:
        return min((a.due for a in self.asks.values() if a.inflight is None),
                   default=float("inf"))


@dataclass(frozen=True)
class _InFlight:
    peer: bytes
    family: int
    deadline: float
    timestamp: int
    wall_ns: int


@dataclass
class Counters:
    sent: int = 0
    replies: int = 0       # authenticated replies matched to a request
    lost: int = 0
    late: int = 0          # a reply to a request that had already timed out
    unknown: int = 0       # a reply whose id was never in flight (or the wrong family)
    stale: int = 0
    notifies: int = 0      # notifies accepted
    old_notifies: int = 0  # notifies not newer than the last accepted for the peer
    unwanted: int = 0      # notifies about a key that is not (or no longer) our peer
    applied: int = 0
    fallbacks: int = 0     # IPv6 endpoints given up for IPv4
    sprays: int = 0        # Spray actions (each a bounded burst)
    relay_asked: int = 0   # peers we asked a relay for
    relay_offers: int = 0  # relay messages accepted
    relay_old: int = 0     # relay messages not newer than the last accepted (or relay off)
    relay_declined: int = 0  # offers of the relay we left while the direct path works
    binds: int = 0
    upgrade_tries: int = 0
    upgrades: int = 0      # relayed peers moved to a direct endpoint


def _by_family(endpoints: Iterable[Endpoint]) -> dict[int, Endpoint]:
    out: dict[int, Endpoint] = {}
    for ep in endpoints:
        if ep.port and ep.family not in out:
            out[ep.family] = ep
    return out


class PunchV2:
    """Drive v2 requests for every peer of a device (or the subset ONLY) over FAMILIES."""

    def __init__(self, timing: Timing = Timing(), daemon: bool = False,
                 only: frozenset[bytes] | None = None, families: Iterable[int] = FAMILIES,
                 randbits: Callable[[int], int] = secrets.randbits, nat: int = 0,
                 spray: SprayConfig | None = SprayConfig(), spray_hold: float = 0.3,
                 relay: RelayTiming | None = None) -> None:
        self.timing = timing
        self.daemon = daemon
        self.only = only
        self.families = tuple(sorted(set(families)))
        if not self.families or not set(self.families) <= set(FAMILIES):
            raise ValueError(f"families must be a non-empty subset of {FAMILIES}: {families!r}")
        self.nat = nat
        self.spray = spray
        self.spray_hold = spray_hold
        self.relay = relay
        self._randbits = randbits
        self.my_key: bytes | None = None
        self.peers: dict[bytes, PeerState] = {}
        self.counters = Counters()
        self.replied = False            # has the server ever answered (authentically)?
        self.observed: dict[int, Endpoint] = {}  # our own endpoints as the server sees them
        self.offset = 0                 # ns added to wall_ns (learned from stale replies)
        self._min_next = 0              # the lowest timestamp we may send next
        self._inflight: dict[int, _InFlight] = {}
        self._expired: OrderedDict[int, None] = OrderedDict()

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
                st = self.peers[view.key] = PeerState(
                    view.key, asks={f: _Ask(due=now) for f in self.families}, rx_changed_at=now,
                    seen_at=now)
            elif st.view is None or view.rx_bytes != st.view.rx_bytes:
                st.rx_changed_at = now
            st.view, st.view_at = view, now
            if self.daemon and st.resolved and self._looks_dead(st, now):
                for ask in st.asks.values():
                    ask.due = min(ask.due, now)  # a dead-looking peer is polled fast
        for gone in set(self.peers) - seen:
            del self.peers[gone]
            for rid in [r for r, f in self._inflight.items() if f.peer == gone]:
                del self._inflight[rid]
                self._remember_expired(rid)

    def on_reply(self, now: float, body: ReplyBody, family: int) -> list[Action]:
        """An authenticated reply from the server that arrived over FAMILY."""
        rec = self._inflight.get(body.request_id)
        if rec is None or rec.family != family:
            if body.request_id in self._expired:
                self.counters.late += 1
            else:
                self.counters.unknown += 1
            return []
        if now > rec.deadline:  # poll() has not expired it yet: it is lost all the same
            self.counters.late += 1
            self._expire(body.request_id, now)
            return []
        del self._inflight[body.request_id]
        self.counters.replies += 1
        self.replied = True
        if body.observed is not None:
            self.observed[family] = body.observed
        st = self.peers.get(rec.peer)
        if st is None:
            return []
        ask = st.asks[family]
        ask.inflight = None
        ask.lost = 0
        t = self.timing
        held: list[Action] = []
        ask4 = st.asks.get(4)
        if family == 6 and ask4 is not None and ask4.after_v6:
            ask4.after_v6 = False
            ask4.due = min(ask4.due, now)  # the IPv6 request is in: IPv4 may follow
        if family == 6 and st.hold_until is not None and body.status != Answer.FOUND:
            held = self._release(st, now)  # we have IPv6; the peer's answer is in
        if body.status == Answer.STALE:
            self.counters.stale += 1
            self._learn_time(rec, body.server_time)
            ask.stale += 1
            extra = ask.stale - _STALE_AT_ONCE
            # Asked again even when the peer is settled: this request registered
            # nothing, and the peer needs our address for this family.
            ask.due = now if extra <= 0 else now + min(t.poll * 2 ** (extra - 1), t.backoff_max)
            return held
        ask.stale = 0
        ask.answered = True
        st.answered_at = now
        if body.status == Answer.PENDING:
            if not st.resolved:
                st.status = Status.NOT_FOUND
            self._schedule(st, ask, now + min(t.first_poll * 2 ** ask.misses, t.poll))
            ask.misses += 1
            return held
        if body.status != Answer.FOUND:  # a status from a newer server: ask again later
            self._schedule(st, ask, now + t.poll)
            return held
        ask.misses = 0
        endpoints = _by_family(body.endpoints)
        if not endpoints:  # "found" with nothing usable: treat it as pending
            self._schedule(st, ask, now + t.poll)
            return self._release(st, now) if st.hold_until is not None else []
        st.endpoints, st.peer_nat = endpoints, body.peer_nat
        ask6 = st.asks.get(6)
        if (family == 4 and 6 in endpoints and 6 not in self.observed and ask6 is not None
                and ask6.inflight is not None and ask6.lost == 0):
            # Our IPv6 request is still out: if it comes back, we have IPv6 and the
            # peer's IPv6 endpoint is the one to use. Wait for it a little rather than
            # apply IPv4 now and switch a moment later. (Not once an IPv6 request was
            # lost: IPv6 to the server may not work at all.)
            st.hold_until = min(self._inflight[ask6.inflight].deadline, now + t.v6_grace)
            actions = []
        else:
            wanted = st.relay_wanted
            actions = self._settle(st, now)
            if st.relay_wanted and not wanted:  # settling asked for the relay: ask now
                self._schedule(st, ask, now)
                return actions
        self._schedule(st, ask, now + t.recheck)
        return actions

    def on_notify(self, now: float, body: NotifyBody, family: int) -> list[Action]:
        """An authenticated notify from the server (arrived over FAMILY): a peer that
        just asked for us, with its endpoints. Acted on at once if it is newer."""
        st = self.peers.get(body.peer)
        if st is None:
            self.counters.unwanted += 1
            return []
        if body.server_time <= st.notified:
            self.counters.old_notifies += 1
            return []
        endpoints = _by_family(body.endpoints)
        if not endpoints:
            self.counters.unwanted += 1
            return []
        st.notified = body.server_time
        st.answered_at = now
        self.counters.notifies += 1
        self.replied = True
        st.endpoints, st.peer_nat = endpoints, body.peer_nat
        st.hold_until = None
        return self._settle(st, now)

    def on_relay(self, now: float, body: RelayBody) -> list[Action]:
        """An authenticated relay message: the relay endpoint for us and BODY.peer (to our
        request, or because the peer asked). Acted on if newer than the last one."""
        st = self.peers.get(body.peer)
        if st is None:
            self.counters.unwanted += 1
            return []
        if self.relay is None or body.server_time <= st.relay_time:
            self.counters.relay_old += 1
            return []
        st.relay_time = body.server_time
        view = st.view
        if (st.relay is None and st.left_relay == body.relay and view is not None
                and view.endpoint is not None and not same_endpoint(view.endpoint, body.relay)):
            # We left this relay for a direct path that works, and WireGuard still uses
            # it: the offer comes from the peer's routine requests while it is relayed
            # (it has not heard us directly yet). Packets from the peer through the relay
            # would move WireGuard to the relay, and the next offer is taken then.
            self.counters.relay_declined += 1
            return []
        self.counters.relay_offers += 1
        self.replied = True
        r = self.relay
        bind = self._bind(st, body.relay, now)
        if st.relay == body.relay:
            return [bind]  # the same relay (perhaps a new allocation): bind again; a try
            # of the direct path goes on
        why = st.relay_why if st.relay_wanted else "asked for by the peer"
        st.relay_wanted = True
        st.relay, st.relayed_at, st.trying = body.relay, now, None
        st.punch_since = None
        st.upgrade_delay = r.upgrade_every
        st.upgrade_at = now + r.upgrade_every
        return [bind, self._apply(st, body.relay, f"relay ({why})", now)]

    def stamp(self, wall_ns: int) -> int:
        """The next timestamp to send (requests and binds share one increasing clock)."""
        ts = max(wall_ns + self.offset, self._min_next)
        self._min_next = ts + 1
        return ts

    def stamped_elsewhere(self, next_ts: int) -> None:
        """Timestamps below NEXT_TS went out without us (the shell's NAT check): ours go on
        from there, so the server does not find our next request stale."""
        self._min_next = max(self._min_next, next_ts)

    def set_nat(self, nat: int, now: float) -> bool:
        """This host's verdict as checked again (the request's nat byte). A new one goes
        out at once: every peer is asked again now, so that the server has it and each
        peer gets it with its next answer (an easy peer then sprays for us, see
        :meth:`_settle`). Returns whether it changed."""
        if nat == self.nat:
            return False
        self.nat = nat
        for st in self.peers.values():
            for ask in st.asks.values():
                if ask.inflight is None:
                    ask.due = min(ask.due, now)
        return True

    def poll(self, now: float, wall_ns: int) -> list[Send | Apply | Keepalive | Spray | Bind]:
        """Expire lost requests, settle answers that waited for IPv6, fall back from
        silent IPv6 endpoints, and start the requests that are due. WALL_NS is the
        wall clock (ns since the epoch), for the request timestamps."""
        out: list[Send | Apply | Keepalive | Spray | Bind] = []
        for rid in [r for r, f in self._inflight.items() if now >= f.deadline]:
            self._expire(rid, now)
        for st in self.peers.values():
            if st.hold_until is not None and now >= st.hold_until:
                out.extend(self._release(st, now))
            if st.fallback_at is not None and now >= st.fallback_at:
                st.fallback_at = None
                action = self._fallback(st, now)
                if action is not None:
                    out.append(action)
            if self.relay is not None:
                out.extend(self._relay_poll(st, now))
        if self.my_key is None:
            return out
        room = self.timing.max_inflight - len(self._inflight)
        # IPv6 first, IPv4 a moment later: when the server notifies the peer as soon
        # as our first request arrives, that notify already carries our IPv6 endpoint
        # (the peer does not start on IPv4 only to switch to IPv6), and the two
        # requests reach the server in the order of their timestamps (sent together,
        # a server that reads its IPv4 socket first would find the IPv6 one stale).
        due = sorted(((ask.due, st.key, -fam) for st in self.peers.values()
                      for fam, ask in st.asks.items()
                      if ask.inflight is None and ask.due <= now))
        gap = self.timing.family_gap
        with_v6 = {k for _, k, f in due if f == -6 and self.peers[k].asks[6].lost == 0}
        for _, key, neg in sorted(due, key=lambda d: (d[2] == -4 and d[1] in with_v6, d)):
            st, fam = self.peers[key], -neg
            if room <= 0:
                break
            if fam == 4 and key in with_v6 and gap > 0:
                st.asks[4].due, st.asks[4].after_v6 = now + gap, True
                continue
            out.append(self._request(st, fam, now, wall_ns))
            room -= 1
        return out

    def next_wakeup(self) -> float:
        """The earliest time poll() has something to do."""
        times = [f.deadline for f in self._inflight.values()]
        times += [st.fallback_at for st in self.peers.values() if st.fallback_at is not None]
        times += [st.hold_until for st in self.peers.values() if st.hold_until is not None]
        if self.relay is not None:
            times += [t for st in self.peers.values() for t in self._relay_times(st)]
        if self.my_key is not None and len(self._inflight) < self.timing.max_inflight:
            times += [st.due for st in self.peers.values()]
        return min(times, default=float("inf"))

    # -- queries --------------------------------------------------------------------

    def pending(self) -> list[PeerState]:
        """Peers whose endpoint is not settled yet."""
        return [s for s in self.peers.values() if not s.resolved]

    def done(self) -> bool:
        return not self.pending()

    def without_handshake(self, now: float) -> list[PeerState]:
        """Peers with no handshake at all, or none during this run (for an IPv6
        endpoint on probation: none strictly after it was applied)."""
        out = []
        for st in self.peers.values():
            if st.fallback_at is not None:
                if not self._v6_proven(st):
                    out.append(st)
            elif not self._handshake_this_run(st):
                out.append(st)
        return out

    def inflight(self) -> int:
        return len(self._inflight)

    def stuck_since(self) -> float | None:
        """Since when the longest-waiting peer has had no working direct tunnel (None: no
        peer waits). What a NAT re-check waits on. A peer waits while it is relayed; when
        it has had a direct endpoint we set and has not been heard since (no handshake
        after it and no data received: :meth:`PeerState.heard_since_applied`); and (a
        tunnel that broke, e.g. because our NAT changed under it) when its keepalive is
        on and either nothing has come from it for SILENT_KEEPALIVES keepalive periods
        (plus the dead margin), or its latest handshake is more than STALE_HANDSHAKE
        seconds old: WireGuard makes a new one at least every two minutes while it
        sends, and keepalives are sent."""
        times = []
        for st in self.peers.values():
            if st.relay is not None:  # relayed: no direct tunnel yet
                times.append(st.relayed_at)
                continue
            if (st.applied is not None and st.applied_at is not None
                    and not st.heard_since_applied()):
                times.append(st.applied_at)
                continue
            view = st.view
            if view is None or not view.keepalive or view.handshake_age is None:
                continue
            silent = SILENT_KEEPALIVES * view.keepalive + self.timing.dead_margin
            if view.handshake_age > STALE_HANDSHAKE:
                times.append(st.view_at - view.handshake_age + STALE_HANDSHAKE)
            elif st.view_at - st.rx_changed_at > silent:
                times.append(st.rx_changed_at + silent)
        return min(times, default=None)

    def before_apply(self, now: float, view: PeerView) -> None:
        """WireGuard's peer as read right before the IPv6 endpoint just decided on is
        set: if WireGuard already had that endpoint and a handshake made during this
        run, that handshake was made over it (the peer reached us first)."""
        st = self.peers.get(view.key)
        if st is None or st.applied is None or st.applied.family != 6:
            return
        age = view.handshake_age
        st.v6_before = (age is not None and now - age > st.seen_at - 1.0
                        and same_endpoint(view.endpoint, st.applied))

    # -- internals ------------------------------------------------------------------

    def _request(self, st: PeerState, family: int, now: float, wall_ns: int) -> Send:
        assert self.my_key is not None
        st.asks[family].after_v6 = False
        rid = 0
        while rid == 0 or rid in self._inflight:
            rid = self._randbits(32) & 0xFFFFFFFF
        ts = self.stamp(wall_ns)
        self._inflight[rid] = _InFlight(st.key, family, now + self.timing.request_timeout, ts,
                                        wall_ns)
        self._expired.pop(rid, None)
        st.asks[family].inflight = rid
        self.counters.sent += 1
        return Send(RequestBody(timestamp=ts, request_id=rid, peer=st.key, nat=self.nat,
                                flags=FLAG_RELAY if st.relay_wanted else 0), family, st.key)

    def _expire(self, rid: int, now: float) -> None:
        rec = self._inflight.pop(rid)
        self._remember_expired(rid)
        self.counters.lost += 1
        st = self.peers.get(rec.peer)
        if st is None:
            return
        ask = st.asks[rec.family]
        ask.inflight = None
        ask.lost += 1
        t = self.timing
        # The timeout already waited once: retry the first loss at once, then back off,
        # doubling from poll up to backoff_max.
        self._schedule(st, ask, now + (0.0 if ask.lost == 1 else
                                       min(t.poll * 2 ** (ask.lost - 2), t.backoff_max)))

    def _settled(self, st: PeerState, status: Status) -> None:
        st.status = status
        if not self.daemon:  # one-shot: the answer is in; nothing more to ask, except
            # over a family not answered yet: that request registers us there, and the
            # peer needs it (a notify may settle us before our own IPv4 request left)
            for ask in st.asks.values():
                if ask.answered:
                    ask.due = float("inf")

    def _schedule(self, st: PeerState, ask: _Ask, due: float) -> None:
        """Ask again at DUE; one-shot, a settled peer is not asked again over a family
        that has been answered (unless it waits for a relay)."""
        waiting = st.relay_wanted and st.relay is None  # one-shot too: the relay is not in
        ask.due = (float("inf") if st.resolved and not self.daemon and ask.answered
                   and not waiting else due)

    def _remember_expired(self, rid: int) -> None:
        self._expired[rid] = None
        while len(self._expired) > _REMEMBER_EXPIRED:
            self._expired.popitem(last=False)

    def _learn_time(self, rec: _InFlight, server_time: int) -> None:
        """A stale reply: SERVER_TIME is the lowest timestamp the server accepts next."""
        self.offset = server_time - rec.wall_ns
        if server_time > rec.timestamp:
            # We were behind (our clock, or a newer request of ours got there first).
            self._min_next = max(self._min_next, server_time)
        else:
            # We were ahead of the server's window: follow it back.
            self._min_next = server_time

    def _looks_dead(self, st: PeerState, now: float) -> bool:
        return looks_dead(st.view, st.rx_changed_at, now, self.timing)

    def _choose(self, st: PeerState) -> Endpoint:
        v4, v6 = st.endpoints.get(4), st.endpoints.get(6)
        if v6 is not None and 6 in self.observed and v6 != st.v6_failed:
            return v6
        if v4 is not None:
            return v4
        assert v6 is not None
        return v6

    def _release(self, st: PeerState, now: float) -> list[Action]:
        """End the wait for the IPv6 answer: decide with what we know now."""
        st.hold_until = None
        return self._settle(st, now)

    def _settle(self, st: PeerState, now: float) -> list[Action]:
        st.hold_until = None
        answer = self._choose(st)
        st.answer = answer
        if st.relay is not None:  # relayed: the direct endpoint is for the upgrade tries
            return []
        wait = self._spray_wait(st, answer, now)
        if wait is not None:
            st.hold_until = wait  # poll() settles it again then
            return []
        r = self.relay
        if (r is not None and r.at_once is not None and not st.relay_wanted
                and st.applied is None and r.at_once(self.nat, st.peer_nat)):
            # Both NATs are hard: a direct endpoint can only fail, and WireGuard would
            # then hold off its next handshake for 5 s (REKEY_TIMEOUT) before trying the
            # relay. Ask for the relay straight away; the upgrade tries come later.
            self._want_relay(st, now)
            return []
        reason = apply_reason(st.view, st.applied, answer, self._looks_dead(st, now))
        if reason is None:
            if st.status is not Status.APPLIED:
                self._settled(st, Status.KEPT)
            kept: list[Action] = []
            if st.view is not None and st.view.keepalive == 0:
                # A kept endpoint still needs keepalives to hold the NATs open.
                kept.append(Keepalive(st.key, self.timing.keepalive))
            if (st.applied == answer and st.sprayed != answer and st.applied_at is not None
                    and not st.handshake_after(st.applied_at)):
                # Our endpoint stays and has given no handshake, and a verdict has changed
                # since we set it (a NAT checked again turned out hard): spray for it now.
                spray = self._spray(st, answer)
                if spray is not None:
                    kept.append(spray)
            return kept
        if st.applied is not None and st.applied.family != answer.family:
            reason = f"IPv{answer.family} preferred to {format_endpoint(st.applied)}"
        actions: list[Action] = [self._apply(st, answer, reason, now)]
        spray = self._spray(st, answer)
        if spray is not None:
            actions.append(spray)
        return actions

    def _spray_wait(self, st: PeerState, endpoint: Endpoint, now: float) -> float | None:
        """Hard side, easy peer, a new IPv4 endpoint: until when to wait for its spray."""
        if (self.spray is None or self.spray_hold <= 0 or endpoint.family != 4
                or st.applied == endpoint):
            return None
        mine = NatVerdict.from_byte(self.nat).mapping.easy
        theirs = NatVerdict.from_byte(st.peer_nat).mapping.easy
        if mine is not False or theirs is not True:
            return None
        if st.spray_wait is None or st.spray_wait[0] != endpoint:
            st.spray_wait = (endpoint, now + self.spray_hold)
        until = st.spray_wait[1]
        return until if now < until else None

    def _spray(self, st: PeerState, endpoint: Endpoint) -> Spray | None:
        """A Spray toward ENDPOINT's address if we are easy and the peer is hard. Called
        for each endpoint applied (a kept one is not), so a peer re-applied because it
        looked dead is sprayed for again: its NAT has long forgotten the old mappings."""
        cfg = self.spray
        if cfg is None or endpoint.family != 4:
            return None
        mine = NatVerdict.from_byte(self.nat).mapping.easy
        theirs = NatVerdict.from_byte(st.peer_nat).mapping.easy
        if mine is not True or theirs is not False:
            return None
        st.sprayed = endpoint
        low = min(max(1, endpoint.port - cfg.count // 2), 65536 - cfg.count)
        self.counters.sprays += 1
        return Spray(st.key, endpoint.ip, range(low, low + cfg.count), cfg.rate)

    def _apply(self, st: PeerState, endpoint: Endpoint, reason: str, now: float) -> Apply:
        self._settled(st, Status.APPLIED)
        st.applied, st.applied_at = endpoint, now
        st.applied_rx = st.view.rx_bytes if st.view is not None else 0
        relayed = st.relay is not None and st.trying is None
        st.fallback_at = (now + self.timing.v6_fallback
                          if endpoint.family == 6 and not relayed and st.trying is None else None)
        st.v6_before = False
        if not relayed and st.trying is None and st.punch_since is None:
            st.punch_since = now
        st.rx_changed_at = now  # give the new endpoint a full keepalive period
        # What WireGuard has now, until the next read of the device: a second answer
        # with the same endpoint (the reply after the notify) is then not applied again.
        st.view = replace(st.view or PeerView(st.key), endpoint=(endpoint.ip, endpoint.port),
                          keepalive=self.timing.keepalive)
        self.counters.applied += 1
        return Apply(st.key, endpoint, self.timing.keepalive, reason)

    def _fallback(self, st: PeerState, now: float) -> Apply | None:
        applied, v4 = st.applied, st.endpoints.get(4)
        if applied is None or applied.family != 6 or st.applied_at is None:
            return None
        if self._v6_proven(st):
            return None
        if v4 is None:
            # No IPv4 endpoint of the peer known yet (it may not have registered over
            # IPv4 when we were told): look again soon rather than give up for good.
            st.fallback_at = now + 1.0
            return None
        st.v6_failed = applied
        st.answer = v4
        self.counters.fallbacks += 1
        return self._apply(st, v4, f"no handshake over IPv6 within "
                                   f"{self.timing.v6_fallback:g}s", now)

    # -- relay ----------------------------------------------------------------------

    def _bind(self, st: PeerState, relay: Endpoint, now: float) -> Bind:
        assert self.relay is not None
        seen = st.handshake_after(st.relayed_at) if st.relay == relay else False
        st.next_bind = now + (self.relay.keep_bound if seen else self.relay.rebind)
        self.counters.binds += 1
        return Bind(st.key, relay)

    def _relay_times(self, st: PeerState) -> list[float]:
        r = self.relay
        assert r is not None
        if st.relay is None:
            if st.punch_since is not None and not st.relay_wanted:
                return [st.punch_since + r.after]
            return []
        times = [t for t in (st.next_bind, st.upgrade_at) if t is not None]
        if st.trying is not None:
            times.append(st.trying_since + r.upgrade_window)
        return times

    def _relay_poll(self, st: PeerState, now: float) -> list[Action]:
        r = self.relay
        assert r is not None
        if st.punch_since is not None and self._handshake_this_run(st):
            st.punch_since = None  # the direct endpoint works
        if st.relay is None:
            if not st.relay_wanted and st.endpoints and self._relay_due(st, now):
                self._want_relay(st, now)
            return []
        out: list[Action] = []
        view = st.view
        if st.trying is None and view is not None and view.endpoint is not None \
                and st.applied_at is not None and st.view_at > st.applied_at \
                and not same_endpoint(view.endpoint, st.relay):
            # WireGuard moved by itself since we set the relay (a device read after
            # that shows another endpoint): it roams only to the source of an
            # authenticated packet from the peer, which came from there, not through
            # the relay (the peer's try of the direct path reached us).
            ep = Endpoint(*view.endpoint)
            out.append(self._upgraded(st, ep, now, f"WireGuard roamed to {ep}: direct, "
                                                   "off the relay"))
            return out
        if st.next_bind is not None and now >= st.next_bind:
            out.append(self._bind(st, st.relay, now))
        if st.trying is not None:
            if view is not None and same_endpoint(view.endpoint, st.relay):
                # WireGuard roamed back: a packet came through the relay meanwhile
                out.append(self._revert(st, now, "WireGuard went back to the relay"))
            elif (view is not None and view.endpoint is not None
                  and st.view_at > st.trying_since
                  and not same_endpoint(view.endpoint, st.trying)
                  and self._try_heard(st)):
                # WireGuard roamed during the try to neither the relay nor the endpoint
                # we try: the peer's packets came straight from there (a symmetric NAT
                # picked that port for us, and our spray let them in).
                ep = Endpoint(*view.endpoint)
                out.append(self._upgraded(st, ep, now, f"WireGuard roamed to {ep} during "
                                                       "the try: direct, off the relay",
                                          st.trying_since))
            elif now >= st.trying_since + r.upgrade_window:
                if self._try_proven(st):
                    out.append(self._upgraded(st, st.trying, now,
                                              f"direct path works within "
                                              f"{r.upgrade_window:g}s: off the relay"))
                else:
                    out.append(self._revert(st, now, f"no handshake or traffic over the "
                                                     f"direct endpoint within "
                                                     f"{r.upgrade_window:g}s"))
            return out
        if st.upgrade_at is not None and now >= st.upgrade_at and st.endpoints:
            direct = self._choose(st)
            hold = self._spray_wait(st, direct, now)
            if hold is not None:  # hard side, easy peer: its spray goes first, as at start
                st.upgrade_at = hold
                return out
            st.spray_wait = None  # the next try waits again
            st.upgrade_at = None
            st.trying, st.trying_since = direct, now
            st.trying_rx = view.rx_bytes if view is not None else 0
            self.counters.upgrade_tries += 1
            out.append(self._apply(st, direct, f"trying the direct path for "
                                               f"{r.upgrade_window:g}s (relay {st.relay})", now))
            spray = self._spray(st, direct)  # easy side, hard peer: as for any endpoint set
            if spray is not None:
                out.append(spray)
        return out

    def _relay_due(self, st: PeerState, now: float) -> bool:
        r = self.relay
        assert r is not None
        if r.at_once is not None and st.applied is not None and r.at_once(self.nat, st.peer_nat):
            return True
        return (st.punch_since is not None and now >= st.punch_since + r.after
                and not self._handshake_this_run(st))

    def _want_relay(self, st: PeerState, now: float) -> None:
        r = self.relay
        assert r is not None
        st.relay_why = (f"no handshake over the direct endpoint within {r.after:g}s"
                        if st.punch_since is not None and now >= st.punch_since + r.after
                        else "both NATs need it")
        st.relay_wanted = True
        self.counters.relay_asked += 1
        fam = st.applied.family if st.applied is not None else 4
        if fam not in st.asks:
            fam = next(iter(st.asks))
        ask = st.asks[fam]
        if ask.inflight is None:
            ask.due = now

    def _try_heard(self, st: PeerState) -> bool:
        """Has WireGuard authenticated something from the peer since the try began?"""
        view = st.view
        return view is not None and (st.handshake_after(st.trying_since)
                                     or view.rx_bytes > st.trying_rx)

    def _try_proven(self, st: PeerState) -> bool:
        view = st.view
        if view is None or st.trying is None or not same_endpoint(view.endpoint, st.trying):
            return False
        return self._try_heard(st)

    def _upgraded(self, st: PeerState, endpoint: Endpoint, now: float, reason: str,
                  heard_since: float | None = None) -> Apply:
        """Direct at ENDPOINT, off the relay; HEARD_SINCE: the peer was heard directly
        after that time (it counts as when the endpoint was set, see stuck_since)."""
        tried_rx = st.trying_rx if st.trying is not None else None
        st.left_relay = st.relay
        st.relay, st.trying, st.relay_wanted = None, None, False
        st.relay_why = "asked for by the peer"
        st.next_bind = st.upgrade_at = None
        self.counters.upgrades += 1
        action = self._apply(st, endpoint, reason, now)
        st.punch_since = None
        answer = st.answer
        if answer is not None and answer != endpoint and answer.family == endpoint.family:
            # WireGuard roamed to where the peer's packets come from, not the endpoint the
            # server reports (a symmetric NAT picked another port toward us). Keep the
            # reported one as what we applied, as after a spray at start, so the next
            # answer (the same report) is not taken for a move that undoes the roam.
            st.applied = answer
        if heard_since is not None:
            st.applied_at = heard_since
        if tried_rx is not None:
            st.applied_rx = tried_rx  # the bytes that proved the try count as heard
        return action

    def _revert(self, st: PeerState, now: float, why: str) -> Apply:
        r = self.relay
        assert r is not None and st.relay is not None
        st.trying = None
        st.upgrade_delay = min(st.upgrade_delay * 2, r.upgrade_max)
        st.upgrade_at = now + st.upgrade_delay
        return self._apply(st, st.relay, f"back to the relay: {why}; next try in "
                                         f"{st.upgrade_delay:g}s", now)

    @staticmethod
    def _v6_proven(st: PeerState) -> bool:
        """Has the IPv6 endpoint we applied given a handshake? WireGuard must still use
        it, and the handshake must be newer than the endpoint, or be one WireGuard had
        made at that very endpoint just before we set it (the peer, notified first,
        reached us over IPv6). A handshake made just before we switched from IPv4 to
        IPv6 was made over IPv4 and does not count."""
        view, applied = st.view, st.applied
        if view is None or applied is None or st.applied_at is None:
            return False
        if not same_endpoint(view.endpoint, applied):
            return False
        return st.v6_before or st.handshake_after(st.applied_at)

    @staticmethod
    def _handshake_this_run(st: PeerState) -> bool:
        """A handshake at all, and (when we applied an endpoint) one made since this
        run first saw the peer: an older one may have been made at an old endpoint. A
        handshake during the run, at any endpoint we set, shows WireGuard reached the
        peer (and it follows the peer to wherever its packets come from)."""
        age = st.view.handshake_age if st.view else None
        if age is None:
            return False
        if st.status is Status.APPLIED:
            return st.handshake_after(st.seen_at - 1.0)
        return True
