"""The NAT verdict (``wg-punch netcheck``), pure: from what the rendezvous server saw of
probes sent from WireGuard's own port, decide how this host's NAT maps it.

The probes (sent by :mod:`punch.netprobe`, from WireGuard's port through the raw socket,
exactly like requests) go to three places on the server:

- ``primary``: the server's address and its usual port;
- ``port``: the same address, the probe port (``wg-rendezvous --probe-port``);
- ``address``: a second address of the server, the probe port (``--probe-address``),
  when there is one.

Each reply says the public address and port the server saw (the NAT's mapping for that
destination). RFC 4787 terms:

- the server saw our own local address and WireGuard's port: **no NAT**;
- ``primary`` and ``port`` differ: the mapping depends on the destination port, hence
  **address-and-port-dependent** ("symmetric"): each peer sees a port of its own that
  nobody can tell it in advance;
- they agree but ``address`` differs: **address-dependent**, as hard as symmetric for
  hole punching;
- all agree: **endpoint-independent** (without a probe address this is "the same for two
  ports of one address": an address-dependent NAT would look the same, which is rare);
- **port preserved** when the public port (toward the server's usual port) is
  WireGuard's own port.

A missing reply from the primary port or the probe port leaves the mapping unknown.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from rendezvous.nat import Mapping, NatVerdict

__all__ = ["Addr", "Observations", "Recheck", "Verdict", "advice", "decide", "pair_advice",
           "relay_at_once", "replacing"]

Addr = tuple[str, int]  # (ip text, port)


def _norm(a: Addr | None) -> Addr | None:
    """IPv4-mapped IPv6 becomes IPv4; IPv6 is written canonically."""
    if a is None:
        return None
    ip = ipaddress.ip_address(a[0].partition("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip), int(a[1])


def _fmt(a: Addr) -> str:
    return f"[{a[0]}]:{a[1]}" if ":" in a[0] else f"{a[0]}:{a[1]}"


@dataclass(frozen=True)
class Observations:
    """LOCAL: our own address toward the server and WireGuard's port. The others: the
    endpoint the server saw for each probe (None: no reply, or not probed)."""

    local: Addr
    primary: Addr | None
    port: Addr | None = None
    address: Addr | None = None
    address_probed: bool = False  # was there a second server address to probe?


@dataclass(frozen=True)
class Verdict:
    nat: NatVerdict
    public: Addr | None    # our public endpoint toward the server's usual port
    addresses_compared: bool  # was the mapping compared across two server addresses?
    reason: str            # why, in one sentence

    @property
    def code(self) -> int:
        """The request's ``nat`` byte."""
        return self.nat.to_byte()


def decide(obs: Observations) -> Verdict:
    local, primary = _norm(obs.local), _norm(obs.primary)
    other_port, other_addr = _norm(obs.port), _norm(obs.address)
    assert local is not None
    if primary is None:
        return Verdict(NatVerdict(), None, False,
                       "no reply from the server's port to the probe")
    preserved = primary[1] == local[1]
    if primary == local:
        return Verdict(NatVerdict(Mapping.NONE, True), primary, False,
                       f"the server saw this host's own address and port {_fmt(local)}")
    if other_port is None:
        return Verdict(NatVerdict(Mapping.UNKNOWN, False), primary, False,
                       f"public endpoint {_fmt(primary)}, but no reply from the server's "
                       "probe port (is wg-rendezvous running with --probe-port?)")
    if other_port != primary:
        return Verdict(NatVerdict(Mapping.ADDRESS_AND_PORT_DEPENDENT, preserved), primary, False,
                       f"the server saw {_fmt(primary)} on its port and {_fmt(other_port)} on "
                       "its probe port: a new mapping per destination port")
    compared = obs.address_probed and other_addr is not None
    if other_addr is not None and compared and other_addr != other_port:
        return Verdict(NatVerdict(Mapping.ADDRESS_DEPENDENT, preserved), primary, True,
                       f"the server saw {_fmt(other_port)} at one address and "
                       f"{_fmt(other_addr)} at the other: a new mapping per destination "
                       "address")
    where = ("two ports and two addresses" if compared
             else "two ports" + (" (the second address did not answer)"
                                 if obs.address_probed else ""))
    return Verdict(NatVerdict(Mapping.ENDPOINT_INDEPENDENT, preserved), primary, compared,
                   f"the server saw {_fmt(primary)} at {where}")


def advice(nat: NatVerdict) -> str:
    """What a verdict means for this host's peers, in one or two sentences."""
    m = nat.mapping
    if m is Mapping.NONE:
        return ("no NAT: peers reach this host at its own address, once a stateful firewall "
                "in between lets them (the punch opens it from inside)")
    if m is Mapping.ENDPOINT_INDEPENDENT:
        text = ("endpoint-independent mapping: every peer sees the same public endpoint, so "
                "direct tunnels work with any peer that is not behind a symmetric NAT too")
        if nat.port_preserved:
            text += "; the public port is WireGuard's own"
        return text
    if m in (Mapping.ADDRESS_DEPENDENT, Mapping.ADDRESS_AND_PORT_DEPENDENT):
        kind = "symmetric" if m is Mapping.ADDRESS_AND_PORT_DEPENDENT else "address-dependent"
        return (f"{kind}: each peer sees a public port of its own that the server cannot "
                "predict; a direct tunnel needs the peer to be behind an easy NAT "
                "(endpoint-independent or none, and the spray), otherwise a relay")
    return "unknown: nothing can be said about what peers need"


def relay_at_once(mine: int, theirs: int) -> bool:
    """From two nat bytes: both NATs map per destination (neither side's endpoint is
    predictable), so no punch can work and the pair should go to a relay at once
    instead of waiting out the direct attempt (the v2 machine's RelayTiming.at_once)."""
    a = NatVerdict.from_byte(mine).mapping.easy
    b = NatVerdict.from_byte(theirs).mapping.easy
    return a is False and b is False


def pair_advice(mine: NatVerdict, peer: NatVerdict) -> str:
    """What a pair of verdicts means for a direct tunnel between the two hosts."""
    a, b = mine.mapping.easy, peer.mapping.easy
    if a is None or b is None:
        return "unknown (a verdict is missing)"
    if a and b:
        return "direct (both endpoints are predictable)"
    if a or b:
        return "direct only with the spray from the easy side, else a relay"
    return "a relay (both NATs are hard)"


def replacing(old: Verdict | None, new: Verdict | None) -> Verdict | None:
    """NEW if a check again should replace the verdict OLD, else None: a probe that
    could not run, or got no answer (mapping unknown), says nothing, and the same
    verdict is no change."""
    if new is None or new.nat.mapping is Mapping.UNKNOWN:
        return None
    return new if old is None or new.nat != old.nat else None


class Recheck:
    """When a daemon checks this host's NAT again. Pure: times in, decisions out.

    The check at start takes one sample per destination, and a verdict can go wrong
    under a running daemon: the host moves to another network (a laptop, a phone's
    hotspot), the router is replaced or reconfigured, or a symmetric NAT that allocates
    from a small port block happened to draw the same port for both probes. A hard NAT
    believed easy costs the direct tunnel, since nobody sprays for it. So:

    - while some peer has waited AFTER seconds for a working tunnel (``stuck_since``,
      see :meth:`punch.v2machine.PunchV2.stuck_since`), check again, then after 2, 4,
      8 and at most 16 x AFTER between checks while that lasts; a check that finds a
      change, or a time when no peer waits, starts the spacing from AFTER again;
    - and every EVERY seconds in any case.
    """

    def __init__(self, after: float = 30.0, every: float = 1800.0) -> None:
        if after <= 0 or every <= 0:
            raise ValueError(f"re-check times must be positive, got {after} and {every}")
        self.after, self.every = after, every
        self.gap = after
        self.last: float | None = None  # the latest check (or the start)

    def start(self, now: float) -> None:
        """The check at start happened (or was skipped) at NOW."""
        self.last = now

    def due(self, now: float, stuck_since: float | None) -> bool:
        """Is a check due at NOW? STUCK_SINCE: since when the longest-waiting peer has
        waited for a working tunnel (None: no peer waits)."""
        if self.last is None:
            return False
        if now - self.last >= self.every:
            return True
        if stuck_since is None:
            self.gap = self.after
            return False
        return now - stuck_since >= self.after and now - self.last >= self.gap

    def checked(self, now: float, changed: bool) -> None:
        """A check ran at NOW; CHANGED: it found another verdict than before."""
        self.last = now
        self.gap = self.after if changed else min(self.gap * 2, self.after * 16)
