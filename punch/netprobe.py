"""NAT probes, the I/O shell of :mod:`punch.netcheck`, and ``wg-punch netcheck``.

A probe is a self-lookup ("where am I?") sent from WireGuard's own port through a raw
socket, exactly like a request, to the server's usual port, to its probe port
(``wg-rendezvous --probe-port``) and, when given, to a second server address on the
probe port (``--probe-address``). Classic: the 64-byte request with both keys ours, the
6-byte reply is the observed endpoint. v2: a sealed request for our own key, whose
reply's ``observed`` field is the endpoint. The probe port registers nothing, so only
the usual port's probe counts as a registration (as any request would).

One raw socket per destination, opened for the probe and closed after it (no BPF
filter: see :func:`probe`). Every probe that has no answer is sent again each ``timeout / tries``
seconds; the whole probe takes at most ``timeout`` seconds.
"""

from __future__ import annotations

import argparse
import json
import logging
import select
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from .errors import BadInterface, BadServerKey, PunchError
from .netcheck import Addr, Observations, Verdict, advice, decide

if TYPE_CHECKING:
    from rendezvous.v2.crypto import ClientCrypto

    from .rawsock import RawChannel

__all__ = ["ClassicExchange", "ProbeConfig", "ProbeRun", "V2Exchange", "main", "probe",
           "targets"]

log = logging.getLogger("wg-punch")

EXIT_SILENT = 6
ROLES = ("primary", "port", "address")


@dataclass(frozen=True)
class ProbeConfig:
    probe_port: int
    probe_address: str | None = None  # a second server address (its family only)
    timeout: float = 1.5
    tries: int = 3


def targets(server: Addr, config: ProbeConfig) -> dict[str, Addr]:
    """Where each probe goes, by role."""
    out = {"primary": server, "port": (server[0], config.probe_port)}
    second = config.probe_address
    if second is not None and (":" in second) == (":" in server[0]) and second != server[0]:
        out["address"] = (second, config.probe_port)
    return out


class ClassicExchange:
    """Classic self-lookups: both keys are ours; a 6-byte reply is the endpoint."""

    def __init__(self, my_key: bytes) -> None:
        self.payload = my_key + my_key

    def request(self, role: str) -> bytes:
        return self.payload

    def observed(self, role: str, payload: bytes) -> Addr | None:
        if len(payload) != 6:
            return None
        ip = ".".join(str(b) for b in payload[:4])
        return ip, int.from_bytes(payload[4:], "big")


class Stamps(Protocol):
    """A running client's one increasing clock of request timestamps
    (:class:`punch.v2machine.PunchV2`)."""

    def stamp(self, wall_ns: int) -> int: ...

    def stamped_elsewhere(self, next_ts: int) -> None: ...


class V2Exchange:
    """v2 self requests; a reply to the request in flight for that role carries the
    endpoint. A ``stale`` reply moves the timestamp to what the server accepts, and
    the probe is sent again at once.

    Timestamps come from STAMPS when given: a probe that runs while the client goes on
    sending its own requests (the daemon's re-check) then never reuses or reorders one
    of theirs. Else from the wall clock (the check at start, ``wg-punch netcheck``)."""

    RETRY = ("", -1)

    def __init__(self, crypto: ClientCrypto, my_key: bytes, nat: int = 0,
                 stamps: Stamps | None = None) -> None:
        self.crypto, self.my_key, self.nat = crypto, my_key, nat
        self.stamps = stamps
        self._next_ts = 0  # without STAMPS: the lowest timestamp to use next
        self._ids: dict[str, int] = {}
        self.issued: set[int] = set()  # every request id sent (their replies may also
                                       # reach a running client's own raw socket)

    def request(self, role: str) -> bytes:
        import secrets

        from rendezvous.v2.wire import RequestBody

        if self.stamps is not None:
            ts = self.stamps.stamp(time.time_ns())
        else:
            ts = max(time.time_ns(), self._next_ts)
        self._next_ts = ts + 1
        rid = 0
        while rid == 0:
            rid = secrets.randbits(32)
        self._ids[role] = rid
        self.issued.add(rid)
        return self.crypto.seal_request(RequestBody(ts, rid, self.my_key, nat=self.nat))

    def observed(self, role: str, payload: bytes) -> Addr | None:
        from rendezvous.v2.crypto import AuthError
        from rendezvous.v2.wire import ReplyBody, Status, WireError

        try:
            body = self.crypto.open(payload)
        except (AuthError, WireError):
            return None
        if not isinstance(body, ReplyBody) or body.request_id != self._ids.get(role):
            return None
        if body.status == Status.STALE:
            self._next_ts = max(self._next_ts, body.server_time)
            if self.stamps is not None:
                self.stamps.stamped_elsewhere(body.server_time)
            return self.RETRY
        if body.observed is None:
            return None
        return body.observed.ip, body.observed.port

    @property
    def next_timestamp(self) -> int:
        """The lowest timestamp the client may use after the probe."""
        return self._next_ts


class ProbeRun:
    """One probe in progress, for an event loop that must not wait on it (the daemon's
    re-check): it opens its raw sockets and sends the first tries at once; the loop then
    polls :meth:`waiting` for reading, calls :meth:`readable` for each ready one and
    :meth:`tick` when :meth:`next_wakeup` has passed, until ``done``. Each call returns
    without blocking. :func:`probe` is the same run driven to its end.

    NotPermitted without CAP_NET_RAW; PunchError when there is no route."""

    def __init__(self, server: Addr, wg_port: int, config: ProbeConfig,
                 exchange: ClassicExchange | V2Exchange, now: float) -> None:
        from .rawsock import open_channel, source_address_for

        self.wg_port = wg_port
        self.where = targets(server, config)
        self.local = (source_address_for(server), wg_port)
        self.exchange = exchange
        self.channels: dict[str, RawChannel] = {}
        self.found: dict[str, Addr] = {}
        self.done = False
        self._step = config.timeout / max(1, config.tries)
        self._tries_left = max(1, config.tries)
        self._deadline = now
        try:
            for role, dst in self.where.items():
                # No BPF filter: the probe lasts milliseconds, every packet is checked
                # in Python anyway (RawChannel._read), and loading cffi to attach one
                # would put ~25-60 ms before the client's first request.
                self.channels[role] = open_channel(dst, wg_port)
        except BaseException:
            self.close()
            raise
        self._role_of = {ch.fileno(): role for role, ch in self.channels.items()}
        self._send(now)

    def _send(self, now: float) -> None:
        """One try for every role without an answer; the next one is due a step later."""
        for role, ch in self.channels.items():
            if role not in self.found:
                ch.send_to_server(self.exchange.request(role))
        self._tries_left -= 1
        self._deadline = now + self._step

    def waiting(self) -> list[int]:
        """The sockets whose probe has no answer yet (none once done)."""
        if self.done:
            return []
        return [fd for fd, role in self._role_of.items() if role not in self.found]

    def next_wakeup(self) -> float:
        """When :meth:`tick` has something to do: the next try, or the end."""
        return float("inf") if self.done else self._deadline

    def readable(self, fd: int) -> None:
        """Read what arrived on socket FD (one of :meth:`waiting`)."""
        role = self._role_of.get(fd)
        if self.done or role is None or role in self.found:
            return
        ch = self.channels[role]
        for payload in ch.replies():
            got = self.exchange.observed(role, payload)
            if got == V2Exchange.RETRY:
                ch.send_to_server(self.exchange.request(role))
            elif got is not None:
                self.found[role] = got
                break
        if len(self.found) == len(self.channels):
            self.done = True

    def tick(self, now: float) -> None:
        """At or after :meth:`next_wakeup`: the next try, or the end of the probe."""
        if self.done or now < self._deadline:
            return
        if self._tries_left > 0:
            self._send(now)
        else:
            self.done = True

    def observations(self) -> Observations:
        found = self.found
        return Observations(self.local, found.get("primary"), found.get("port"),
                            found.get("address"), address_probed="address" in self.where)

    def verdict(self) -> Verdict:
        return decide(self.observations())

    def close(self) -> None:
        for ch in self.channels.values():
            ch.close()


def probe(server: Addr, wg_port: int, config: ProbeConfig,
          exchange: ClassicExchange | V2Exchange) -> tuple[Observations, dict[str, Addr]]:
    """Probe from WG_PORT, waiting for the end (at most ``config.timeout`` seconds); the
    observations, and where each probe went. NotPermitted without CAP_NET_RAW;
    PunchError when there is no route."""
    clock = time.monotonic
    run = ProbeRun(server, wg_port, config, exchange, clock())
    try:
        while not run.done:
            poller = select.poll()
            for fd in run.waiting():
                poller.register(fd, select.POLLIN)
            left = run.next_wakeup() - clock()
            for fd, _ in poller.poll(max(0.0, left) * 1000 + 1):
                run.readable(fd)
            run.tick(clock())
    finally:
        run.close()
    return run.observations(), run.where


# -- wg-punch netcheck ---------------------------------------------------------------

def _fmt(a: Addr | None) -> str | None:
    if a is None:
        return None
    return f"[{a[0]}]:{a[1]}" if ":" in a[0] else f"{a[0]}:{a[1]}"


def build_parser() -> argparse.ArgumentParser:
    from .cli import _address_arg, _port_arg, _server_key, add_family_options

    p = argparse.ArgumentParser(
        prog="wg-punch netcheck",
        description="Probe this host's NAT from WireGuard's own port and say how it maps "
                    "(RFC 4787): no NAT, endpoint-independent, address-dependent or "
                    "address-and-port-dependent (symmetric), and whether it keeps "
                    "WireGuard's port; and what that means for direct tunnels. Needs a "
                    "server run with wg-rendezvous --probe-port. Needs root (raw socket).",
        epilog="exit status: 0 a verdict, 1 other error, 2 bad arguments, 3 not permitted, "
               "4 interface problem, 5 server name unresolvable, 6 no verdict (the server "
               "or its probe port did not answer)")
    p.add_argument("server", metavar="SERVER[:PORT]", help="the rendezvous server (port 49918 "
                   "by default)")
    p.add_argument("interface", metavar="INTERFACE", help="the WireGuard interface, e.g. wg0")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--server-key", type=_server_key, metavar="KEY",
                   help="probe with protocol v2 (the server's public key); else classic")
    p.add_argument("--probe-port", type=_port_arg, metavar="PORT",
                   help="the server's --probe-port (default: the server's port + 1)")
    p.add_argument("--probe-address", metavar="ADDR", type=_address_arg,
                   help="the server's --probe-address, to tell address-dependent mappings "
                        "apart too")
    p.add_argument("--timeout", type=float, default=1.5, metavar="S",
                   help="give up on a probe after S seconds (default 1.5)")
    add_family_options(p, "probe")
    return p


def _report_family(family: int, verdict: Verdict, obs: Observations,
                   where: dict[str, Addr]) -> dict[str, Any]:
    return {
        "family": family,
        "verdict": verdict.nat.token,
        "mapping": verdict.nat.mapping.token,
        "port_preserved": verdict.nat.port_preserved,
        "nat_byte": verdict.code,
        "text": str(verdict.nat),
        "public": _fmt(verdict.public),
        "local": _fmt(obs.local),
        "addresses_compared": verdict.addresses_compared,
        "probes": {role: {"to": _fmt(dst), "observed": _fmt(getattr(obs, role))}
                   for role, dst in where.items()},
        "reason": verdict.reason,
        "meaning": advice(verdict.nat),
    }


def run_netcheck(args: argparse.Namespace) -> list[dict[str, Any]]:
    from .client import resolve_server, resolve_servers, split_server
    from .status import read_device

    v2 = args.server_key is not None
    if v2:
        servers = resolve_servers(args.server, (args.family,) if args.family else (4, 6))
    else:
        servers = {4: resolve_server(args.server)}
    port = split_server(args.server)[1]
    config = ProbeConfig(args.probe_port if args.probe_port else port + 1, args.probe_address,
                         timeout=args.timeout)
    device = read_device(args.interface)
    if not device.listen_port:
        raise BadInterface(f"{args.interface} has no listen port "
                           f"(wg set {args.interface} listen-port 51820)")
    if device.public_key is None:
        raise BadInterface(f"{args.interface} has no private key "
                           f"(wg set {args.interface} private-key FILE)")
    exchange: ClassicExchange | V2Exchange
    if v2:
        from rendezvous.v2.crypto import AuthError, ClientCrypto

        if device.private_key is None:
            raise BadInterface(f"cannot read the private key of {args.interface}")
        try:
            crypto = ClientCrypto(device.private_key, args.server_key)
        except (AuthError, ValueError) as e:
            raise BadServerKey(f"--server-key is not a usable server key: {e}") from None
        exchange = V2Exchange(crypto, device.public_key)
    else:
        exchange = ClassicExchange(device.public_key)
    out = []
    errors = []
    for family, server in servers.items():
        try:
            obs, where = probe(server, device.listen_port, config, exchange)
        except PunchError as e:
            if e.exit_code == 3:
                raise
            errors.append(f"IPv{family}: {e}")
            continue
        out.append(_report_family(family, decide(obs), obs, where))
    if not out:
        raise PunchError("; ".join(errors) or "no address family to probe over")
    return out


def render_text(interface: str, server: str, results: list[dict[str, Any]]) -> str:
    lines = [f"interface: {interface}", f"server: {server}"]
    for r in results:
        lines.append("")
        lines.append(f"IPv{r['family']}: {r['text']}")
        lines.append(f"  public endpoint: {r['public'] or '(none)'} (local {r['local']})")
        for p in r["probes"].values():
            lines.append(f"  probe to {p['to']}: {p['observed'] or 'no reply'}")
        lines.append(f"  why: {r['reason']}")
        lines.append(f"  meaning: {r['meaning']}")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.timeout <= 0:
        print("wg-punch netcheck: --timeout must be positive", file=sys.stderr)
        return 2
    if args.family == 6 and args.server_key is None:
        print("wg-punch netcheck: -6 needs --server-key (the classic protocol is IPv4 only)",
              file=sys.stderr)
        return 2
    try:
        results = run_netcheck(args)
    except PunchError as e:
        print(f"wg-punch netcheck: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 1
    if args.json:
        print(json.dumps({"interface": args.interface, "server": args.server,
                          "results": results}, indent=2))
    else:
        sys.stdout.write(render_text(args.interface, args.server, results))
    if all(r["mapping"] == "unknown" for r in results):
        why = "; ".join(f"IPv{r['family']}: {r['reason']}" for r in results)
        print(f"wg-punch netcheck: no verdict: {why}", file=sys.stderr)
        return EXIT_SILENT
    return 0
