"""Command line of wg-punch."""

from __future__ import annotations

import argparse
import base64
import binascii
import logging
import sys
from collections.abc import Sequence

from rendezvous import logsetup, metrics

from . import observe
from .errors import BadInterface, PunchError
from .machine import Timing

__all__ = ["main", "build_parser"]

log = logging.getLogger("wg-punch")

DESCRIPTION = """\
Find your WireGuard peers behind NATs through a rendezvous server, and point the
interface at them directly.

wg-punch asks the server (wg-rendezvous, or the example server from wireguard-tools)
for each peer's public address and port. It sends its requests from WireGuard's own
listen port through a raw socket, so the server sees the public mapping WireGuard's
traffic uses, and tells it to the peers. Each endpoint found is set on the interface
with a persistent keepalive, which keeps the NAT mappings open. Needs root
(CAP_NET_RAW and CAP_NET_ADMIN). Works with kernel WireGuard and with wireguard-go.

Two protocols. Without --server-key: the classic one of the wireguard-tools example
(IPv4 only, unauthenticated: anyone can read or overwrite any key's address). With
--server-key: protocol v2 (wg-rendezvous --key), authenticated with the interface's
own private key and encrypted; the server answers only peers that ask for each other,
tells the first peer as soon as the second one asks (both punch at once), and speaks
IPv4 and IPv6. Over v2 wg-punch asks over each family the server has an address of
(and this host a route to), and prefers a peer's IPv6 endpoint when both sides have
IPv6, falling back to IPv4 when it gives no handshake within a few seconds.
"""

EPILOG = """\
examples:
  wg-punch demo.example.net wg0            one pass over every peer of wg0
  wg-punch --wait 203.0.113.7:49918 wg0    ... and wait for each peer's handshake
  wg-punch --daemon rendezvous.example wg0 keep endpoints fresh when NATs rebind
  wg-punch --server-key "$(cat server.pub)" rendezvous.example wg0
                                           protocol v2; server.pub is the output of
                                           `wg-rendezvous pubkey < server.key`
  wg-punch --server-key KEY -6 '[2001:db8::7]:49918' wg0
                                           v2 over IPv6 only
  wg-punch status wg0 [--json]             per peer: endpoint, where it came from,
                                           handshake, last server answer, NAT verdicts
  wg-punch netcheck SERVER wg0 [--json] [--server-key KEY] [--probe-port P]
                                           how this host's NAT maps WireGuard's port
                                           (needs wg-rendezvous --probe-port)
  wg-punch --server-key KEY --probe-port 49919 --daemon SERVER wg0
                                           ... and tell the peers the verdict

exit status:
  0 every endpoint applied (and, with --wait, every handshake seen)
  1 other error           2 bad arguments             3 not permitted (run as root)
  4 interface problem     5 server name unresolvable  6 server silent
  7 peer(s) unknown to the server                      8 no handshake (--wait)
"""


def _key(text: str) -> bytes:
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise argparse.ArgumentTypeError(f"not a WireGuard public key (base64 of 32 bytes): {text!r}")
    return raw


def _server_key(text: str) -> bytes:
    from rendezvous.v2.keys import KeyFormatError, decode_key

    try:
        return decode_key(text)
    except KeyFormatError as e:
        raise argparse.ArgumentTypeError(f"not a server public key: {e}") from None


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number: {text!r}")
    return value


def _port_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"not a UDP port (1-65535): {text!r}")
    return value


def _address_arg(text: str) -> str:
    import ipaddress

    try:
        return str(ipaddress.ip_address(text.strip("[]")))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an IPv4 or IPv6 address: {text!r}") from None


def _spray_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 1 <= value <= 4096:
        raise argparse.ArgumentTypeError(f"spray count must be 1..4096: {text!r}")
    return value


def _nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds, 0 or more: {text!r}")
    return value


def _keepalive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"keepalive must be 1..65535 seconds: {text!r}")
    return value


def add_family_options(p: argparse.ArgumentParser, what: str) -> None:
    """-4/--ipv4-only and -6/--ipv6-only (into ``family``; None: both), for wg-punch
    and wg-punch netcheck."""
    fam = p.add_mutually_exclusive_group()
    fam.add_argument("-4", "--ipv4-only", dest="family", action="store_const", const=4,
                     help=f"v2: {what} over IPv4 only")
    fam.add_argument("-6", "--ipv6-only", dest="family", action="store_const", const=6,
                     help=f"v2: {what} over IPv6 only")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wg-punch", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("server", metavar="SERVER[:PORT]",
                   help="the rendezvous server: a name, an IPv4 address, or (v2) an IPv6 one "
                        "written [IPV6]:PORT or bare; port 49918 by default")
    p.add_argument("interface", metavar="INTERFACE", help="the WireGuard interface, e.g. wg0")
    p.add_argument("--daemon", action="store_true",
                   help="keep running: re-register every --interval, pick up added and "
                        "removed peers, follow peers whose NAT rebinds")
    p.add_argument("--wait", action="store_true",
                   help="one-shot: also wait for a handshake with each peer")
    p.add_argument("--timeout", type=_positive, default=60.0, metavar="S",
                   help="one-shot: give up after S seconds (default 60)")
    p.add_argument("--keepalive", type=_keepalive, default=25, metavar="S",
                   help="persistent keepalive set with each endpoint (default 25)")
    p.add_argument("--interval", type=_positive, default=20.0, metavar="S",
                   help="daemon: re-register at least every S seconds (default 20, below "
                        "the ~30 s UDP timeout of many NATs); each peer is re-asked every "
                        "S/2, so a peer whose NAT rebinds is followed within about S")
    p.add_argument("--poll", type=_positive, default=1.0, metavar="S",
                   help="how often to ask again for a peer the server does not know yet "
                        "(default 1)")
    p.add_argument("--peer", type=_key, action="append", metavar="KEY",
                   help="only this peer (base64 public key); repeat for several")
    p.add_argument("--server-key", type=_server_key, metavar="KEY",
                   help="speak protocol v2 to a server with this public key (base64, what "
                        "`wg-rendezvous pubkey` prints); without it, the classic protocol")
    p.add_argument("--probe-port", type=_port_arg, metavar="PORT",
                   help="v2: the server's probe port (wg-rendezvous --probe-port): at start, "
                        "detect this host's NAT behaviour as `wg-punch netcheck` does and "
                        "send the verdict to the peers through the server")
    p.add_argument("--probe-address", type=_address_arg, metavar="ADDR",
                   help="v2: the server's second address (wg-rendezvous --probe-address), "
                        "to tell address-dependent mappings apart too")
    p.add_argument("--nat-recheck", type=_nonneg_float, default=30.0, metavar="S",
                   help="v2 --daemon with --probe-port: check this host's NAT again when a "
                        "peer has waited S seconds for a handshake (or data) after we set "
                        "its endpoint, or since its tunnel broke (keepalive on, and nothing "
                        "received for 2 keepalive periods + 5 s, or the last handshake over "
                        "3 minutes old); then at 2x, 4x ... at most 16x S apart while that "
                        "lasts, and every 30 minutes anyway; tell the peers a verdict that "
                        "changed (the host moved, or one check was fooled); 0: never "
                        "(default 30)")
    p.add_argument("--no-spray", dest="spray", action="store_false",
                   help="v2: never spray (see --spray-count)")
    p.add_argument("--spray-count", type=_spray_count, default=512, metavar="N",
                   help="v2 with --probe-port: when this host's NAT is easy and a peer's "
                        "is hard (symmetric), send N empty datagrams from WireGuard's port "
                        "to the peer's reported address, ports centred on its reported "
                        "port, so its handshake gets in from the port its NAT picks; once "
                        "per endpoint applied (default 512, at most 4096)")
    p.add_argument("--spray-rate", type=_positive, default=5000.0, metavar="R",
                   help="at most R spray datagrams per second (default 5000)")
    add_family_options(p, "reach the server")
    relay = p.add_argument_group("relay fallback (v2)")
    relay.add_argument("--relay-after", type=_positive, default=10.0, metavar="S",
                       help="ask the server for a relay for a peer whose direct endpoint gave "
                            "no handshake within S seconds (default 10; the server must run "
                            "--relay-port); with --wait or --daemon, since a one-shot run ends "
                            "once endpoints are set")
    relay.add_argument("--relay-upgrade", type=_positive, default=30.0, metavar="S",
                       help="while relayed, try the direct endpoint after S seconds (doubling "
                            "after each failed try, up to 600); a try lasts 5 s (default 30)")
    relay.add_argument("--no-relay", action="store_true",
                       help="never ask for a relay, and ignore relays offered for a peer")
    p.add_argument("-v", "--verbose", action="store_true", help="log every request and reply")
    logsetup.add_argument(p)
    metrics.add_argument(p, default_port=9478)
    observe.add_arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["status"]:  # wg-punch status INTERFACE: before the normal parser
        from .status import main as status_main

        return status_main(argv[1:])
    if argv[:1] == ["netcheck"]:  # wg-punch netcheck SERVER INTERFACE
        from .netprobe import main as netcheck_main

        return netcheck_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.family == 6 and args.server_key is None:
        parser.error("-6/--ipv6-only needs --server-key (the classic protocol is IPv4 only)")
    if args.probe_port is None and args.probe_address is not None:
        parser.error("--probe-address needs --probe-port")
    if args.probe_port is not None and args.server_key is None:
        parser.error("--probe-port needs --server-key (NAT verdicts are exchanged over v2; "
                     "`wg-punch netcheck` probes over classic too)")
    logsetup.configure(args.log_format, args.verbose)
    logging.getLogger("pyroute2").setLevel(logging.WARNING)  # -v is about wg-punch's traffic
    from .client import Options, run

    try:
        observers = observe.from_args(args)
    except metrics.MetricsError as e:
        logsetup.fail("wg-punch", str(e), args.log_format)
        return e.exit_code

    timing = Timing(poll=args.poll, interval=args.interval, keepalive=args.keepalive)
    relay = None
    if args.server_key is not None and not args.no_relay:
        from .netcheck import relay_at_once
        from .v2machine import RelayTiming

        relay = RelayTiming(after=args.relay_after, upgrade_every=args.relay_upgrade,
                            at_once=relay_at_once)
    opts = Options(server=args.server, interface=args.interface, timeout=args.timeout,
                   wait=args.wait, daemon=args.daemon,
                   peers=frozenset(args.peer) if args.peer else None, timing=timing,
                   server_key=args.server_key,
                   families=(args.family,) if args.family else (4, 6),
                   probe_port=args.probe_port, probe_address=args.probe_address,
                   spray=args.spray, spray_count=args.spray_count, spray_rate=args.spray_rate,
                   observers=observers, relay=relay, nat_recheck=args.nat_recheck)
    from .wg.errors import WgError

    try:
        result = run(opts)
    except PunchError as e:
        logsetup.fail("wg-punch", str(e), args.log_format)
        return e.exit_code
    except WgError as e:  # the interface failed under a running client: one line too
        logsetup.fail("wg-punch", str(e), args.log_format)
        return BadInterface.exit_code
    except KeyboardInterrupt:
        return 0
    if result.message and result.code:
        logsetup.fail("wg-punch", result.message, args.log_format)
    elif result.code == 0 and not args.daemon:
        log.info("done: every endpoint is set")
    return result.code
