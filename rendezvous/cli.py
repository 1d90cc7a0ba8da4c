"""Command line of wg-rendezvous."""

from __future__ import annotations

import argparse
import ipaddress
import logging
from collections.abc import Callable, Sequence
from typing import Any

from . import logsetup, metrics
from .classic import DEFAULT_PORT
from .server import ListenError, Server, ServerOptions
from .service import Config, Service

__all__ = ["main", "build_parser"]

log = logging.getLogger("wg-rendezvous")

DESCRIPTION = """\
Rendezvous server for WireGuard NAT hole punching.

Each wg-punch client sends {its public key, the peer's public key} from WireGuard's
own UDP port. The server records the address and port it saw the request come from
(the client's public NAT mapping) and answers with the peer's, so the two peers can
set each other's endpoint and talk directly. Compatible on the wire with the example
in wireguard-tools (contrib/nat-hole-punching): 64-byte requests, 6-byte or empty
replies, UDP port 49918.
"""

EPILOG = """\
examples:
  wg-rendezvous                          listen on 0.0.0.0:49918
  wg-rendezvous --listen 203.0.113.7     one address only
  wg-rendezvous --rate 0 -v              no rate limit, log every request

The host's firewall must let UDP to the port in. Run it as an ordinary user unless
the port is below 1024. SIGTERM or SIGINT stops it cleanly (exit 0).
"""


def _ipv4(text: str) -> str:
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an IPv4 address: {text!r}") from None


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"not a UDP port (0-65535): {text!r}")
    return port


def _nonneg(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value < 0:
            raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
        return value
    parse.__name__ = kind.__name__
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="wg-rendezvous", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--listen", metavar="ADDR", action="append", type=_ipv4,
                   help="IPv4 address to listen on; repeat for several (default 0.0.0.0)")
    p.add_argument("--port", type=_port, default=DEFAULT_PORT,
                   help=f"UDP port (default {DEFAULT_PORT}; 0 picks a free one)")
    p.add_argument("--ttl", type=_nonneg(float), default=180.0, metavar="S",
                   help="forget a key not refreshed for S seconds (default 180)")
    p.add_argument("--max-peers", type=_nonneg(int), default=1_000_000, metavar="N",
                   help="table capacity; when full, the least recently refreshed key "
                        "is evicted (default 1000000)")
    p.add_argument("--rate", type=_nonneg(float), default=200.0, metavar="R",
                   help="requests per second allowed per source IP; 0 = no limit "
                        "(default 200, enough for a CGNAT address with many clients)")
    p.add_argument("--burst", type=_nonneg(float), default=400.0, metavar="B",
                   help="burst allowed per source IP above --rate (default 400)")
    p.add_argument("--stats-interval", type=_nonneg(float), default=60.0, metavar="S",
                   help="log counters every S seconds; 0 = only at exit (default 60)")
    p.add_argument("--io", choices=("auto", "mmsg", "plain"), default="auto",
                   help="datagram I/O: batched recvmmsg/sendmmsg, or one call per "
                        "datagram (default auto: batched where available)")
    p.add_argument("-v", "--verbose", action="store_true", help="log every request")
    logsetup.add_argument(p)
    metrics.add_argument(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logsetup.configure(args.log_format, args.verbose)
    if args.ttl <= 0:
        log.error("--ttl must be positive")
        return 2
    if args.max_peers < 1:
        log.error("--max-peers must be at least 1")
        return 2
    if args.rate > 0 and args.burst < 1:
        log.error("--burst must be at least 1 when --rate is on")
        return 2
    listen = [(a, args.port) for a in (args.listen or ["0.0.0.0"])]
    config = Config(ttl=args.ttl, max_peers=args.max_peers, rate=args.rate, burst=args.burst)
    server = Server(Service(config), ServerOptions(
        listen=listen, io=args.io, stats_interval=args.stats_interval, verbose=args.verbose))
    try:
        server.open()
    except ListenError as e:
        logsetup.fail("wg-rendezvous", str(e.strerror), args.log_format)
        return 1
    try:
        exporter = metrics.start(args.metrics, server)
    except metrics.MetricsError as e:
        logsetup.fail("wg-rendezvous", str(e), args.log_format)
        server.close()
        return e.exit_code
    server.install_signal_handlers()
    addrs = ", ".join(f"{a}:{p}" for a, p in server.addresses)
    rate = f"{args.rate:g}/s burst {args.burst:g}" if args.rate > 0 else "off"
    log.info("listening on %s (ttl %gs, max peers %d, rate limit per source %s)",
             addrs, args.ttl, args.max_peers, rate)
    try:
        server.serve()
    except KeyboardInterrupt:
        pass
    finally:
        server.log_stats()
        server.close()
        if exporter is not None:
            exporter.close()
    log.info("stopped")
    return 0
