"""Command line of wg-rendezvous."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import stat
import sys
from collections.abc import Callable, Sequence
from typing import Any

from . import logsetup, metrics
from .classic import DEFAULT_PORT
from .server import ListenError, Server, ServerOptions, buffer_shortfall, format_address
from .service import Config, Service

__all__ = ["main", "build_parser"]

log = logging.getLogger("wg-rendezvous")

DESCRIPTION = """\
Rendezvous server for WireGuard NAT hole punching.

Each wg-punch client sends {its public key, the peer's public key} from WireGuard's
own UDP port. The server records the address and port it saw the request come from
(the client's public NAT mapping) and answers with the peer's, so the two peers can
set each other's endpoint and talk directly. Two protocols share the port:

  classic  compatible on the wire with the example in wireguard-tools
           (contrib/nat-hole-punching): 64-byte requests, 6-byte or empty replies,
           IPv4 only, no authentication. On unless --no-classic or --require-auth.
  v2       (docs/PROTOCOL.md) on when --key gives the server a private key: every
           request proves it holds the WireGuard key it registers, replies are
           encrypted, a peer is revealed only to keys it asked for itself (mutual
           consent), IPv4 and IPv6, and when a pair becomes mutual the server
           notifies the first peer at once so that both punch together.

commands:
  wg-rendezvous genkey    print a new private key (base64, like `wg genkey`)
  wg-rendezvous pubkey    read a private key on stdin, print its public key
"""

EPILOG = """\
examples:
  wg-rendezvous                          classic only, on 0.0.0.0:49918 and [::]:49918
  wg-rendezvous --listen 203.0.113.7     one address only
  wg-rendezvous --rate 0 -v              no rate limit, log every request

  umask 077; wg-rendezvous genkey > server.key
  wg-rendezvous pubkey < server.key      the key clients pin (wg-punch --server-key)
  wg-rendezvous --key server.key         classic and v2
  wg-rendezvous --key server.key --require-auth
                                         v2 only: unauthenticated requests are refused
  wg-rendezvous --key server.key --listen 0.0.0.0 --listen 2001:db8::7
  wg-rendezvous --probe-port 49919       NAT detection too (wg-punch netcheck)
  wg-rendezvous --key server.key --store redis://10.0.0.5:6379/0
                                         one of several servers sharing a Redis
                                         (same --key on all of them)
  wg-rendezvous --store redis://127.0.0.1:6379/0 --workers 4
                                         4 processes on one port (SO_REUSEPORT)
  wg-rendezvous --listen 203.0.113.7 --probe-port 49919 --probe-address 203.0.113.8
                                         ... telling address-dependent mappings apart

The server key must be dedicated to wg-rendezvous, never a WireGuard interface's
key. Its public key is also logged at start. The host's firewall must let UDP to the
port in. Run it as an ordinary user unless the port is below 1024. SIGTERM or SIGINT
stops it cleanly (exit 0).
"""


def _address(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text.strip("[]") if text.startswith("[") else text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an IPv4 address or IPv6 address: {text!r}") from None


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
    p.add_argument("--listen", metavar="ADDR", action="append", type=_address,
                   help="IPv4 or IPv6 address to listen on; repeat for several (default "
                        "0.0.0.0 and ::, the latter skipped with a log line on a host "
                        "without IPv6)")
    p.add_argument("--port", type=_port, default=DEFAULT_PORT,
                   help=f"UDP port (default {DEFAULT_PORT}; 0 picks a free one)")
    p.add_argument("--probe-port", type=_port, metavar="PORT",
                   help="also answer on UDP PORT of every --listen address, for NAT "
                        "behaviour detection (wg-punch netcheck): only self-lookups, and "
                        "nothing is registered there (0 picks a free port)")
    p.add_argument("--probe-address", metavar="ADDR", action="append", type=_address,
                   help="a second local address that also answers on --probe-port, so "
                        "clients can tell address-dependent mappings too (a wildcard "
                        "--listen of its family already covers it); repeatable")
    p.add_argument("--ttl", type=_nonneg(float), default=180.0, metavar="S",
                   help="forget a key not refreshed for S seconds, and (v2) a request for a "
                        "peer not repeated for S seconds (default 180)")
    p.add_argument("--max-peers", type=_nonneg(int), default=1_000_000, metavar="N",
                   help="table capacity (classic and v2 each; v2 also caches this many "
                        "clients' derived keys, so a returning client costs no X25519); "
                        "when full, the least recently refreshed key is evicted "
                        "(default 1000000)")
    p.add_argument("--rate", type=_nonneg(float), default=200.0, metavar="R",
                   help="requests per second allowed per source IP (IPv6: per /64), both "
                        "protocols together; 0 = no limit (default 200, enough for a "
                        "CGNAT address with many clients)")
    p.add_argument("--burst", type=_nonneg(float), default=400.0, metavar="B",
                   help="burst allowed per source IP above --rate (default 400)")
    p.add_argument("--stats-interval", type=_nonneg(float), default=60.0, metavar="S",
                   help="log counters every S seconds; 0 = only at exit (default 60)")
    p.add_argument("--io", choices=("auto", "mmsg", "plain"), default="auto",
                   help="datagram I/O: batched recvmmsg/sendmmsg, or one call per "
                        "datagram (default auto: batched where available)")
    v2 = p.add_argument_group("protocol v2 (authenticated)")
    v2.add_argument("--key", metavar="FILE",
                    help="the server's private key (from `wg-rendezvous genkey`); enables v2")
    v2.add_argument("--classic", action=argparse.BooleanOptionalAction, default=None,
                    help="serve the unauthenticated classic protocol too (default on)")
    v2.add_argument("--require-auth", action="store_true",
                    help="v2 only: refuse classic requests (needs --key)")
    v2.add_argument("--max-skew", type=_nonneg(float), default=300.0, metavar="S",
                    help="accept a v2 request only if its timestamp is within S seconds "
                         "of the server's clock (a client whose clock is off learns the "
                         "server's time from the stale reply); each key's last timestamp "
                         "is kept for max(ttl, S) so a request cannot be replayed; 0 = "
                         "no window (default 300)")
    v2.add_argument("--notify-rate", type=_nonneg(float), default=10.0, metavar="R",
                    help="notifications per second sent to one client key; 0 = no limit "
                         "(default 10)")
    v2.add_argument("--notify-burst", type=_nonneg(float), default=20.0, metavar="B",
                    help="burst of notifications allowed per client key (default 20)")
    v2.add_argument("--new-key-rate", type=_nonneg(float), default=5000.0, metavar="R",
                    help="client keys not seen before (or forgotten) that may be opened "
                         "per second, each an X25519 + HKDF (~45 us); beyond it such "
                         "datagrams are dropped and counted (new_key_limited), so a flood "
                         "of forged keys cannot starve the clients already known; 0 = no "
                         "limit (default 5000)")
    v2.add_argument("--new-key-burst", type=_nonneg(float), default=10000.0, metavar="B",
                    help="burst of new keys allowed at once, e.g. clients coming back "
                         "after a restart (default 10000)")
    _relay_arguments(p)
    st = p.add_argument_group(
        "scale-out (docs/OPERATIONS.md)", "several servers, or several processes on one "
        "host, serving one fleet through a shared Redis: a key registered through one is "
        "found through any, and a notification reaches the server that holds the "
        "client's NAT mapping (pub/sub). If Redis is unreachable each server goes on "
        "answering from its own tables, and catches up when Redis is back")
    st.add_argument("--store", metavar="redis://HOST:PORT/DB",
                    help="keep the registry (with its ttl), the consent state and relay "
                         "allocations in this Redis too (default: only in this process)")
    st.add_argument("--store-timeout", type=_nonneg(float), default=0.25, metavar="S",
                    help="treat Redis as unavailable when a round trip takes longer than "
                         "S seconds (default 0.25)")
    st.add_argument("--server-id", metavar="ID",
                    help="this server's name in the store (letters, digits, ._:@-; "
                         "default HOSTNAME:PID)")
    st.add_argument("--workers", type=_nonneg(int), default=1, metavar="N",
                    help="run N server processes on the same port (SO_REUSEPORT); needs "
                         "--store; --metrics PORT becomes PORT..PORT+N-1 and --relay-port "
                         "ranges are split between them (default 1)")
    p.add_argument("-v", "--verbose", action="store_true", help="log every request")
    logsetup.add_argument(p)
    metrics.add_argument(p)
    return p


def _size(text: str) -> int:
    units = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    num, unit = (text[:-1], text[-1].lower()) if text[-1:].isalpha() else (text, "")
    try:
        value = int(float(num) * units[unit])
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(f"not a size (N, or N with K/M/G/T): {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte: {text!r}")
    return value


def _relay_ports(text: str) -> tuple[int, ...]:
    from .relay import RelayError, parse_ports
    try:
        return parse_ports(text)
    except RelayError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _relay_arguments(p: argparse.ArgumentParser) -> None:
    r = p.add_argument_group("relay (v2, opt-in)", "forward WireGuard datagrams between "
                             "two peers that cannot reach each other directly (both NATs "
                             "symmetric), for mutually consenting authenticated pairs only")
    r.add_argument("--relay-port", type=_relay_ports, metavar="PORT|LOW-HIGH",
                   help="serve the relay on this UDP port (or range: a client in several "
                        "pairs needs one port per pair) on every listen address; needs --key")
    r.add_argument("--relay-address", metavar="ADDR", action="append", type=_address,
                   help="the address clients reach the relay at, when --listen is a "
                        "wildcard (one per family)")
    r.add_argument("--relay-limit", type=_size, default=10 << 30, metavar="BYTES",
                   help="bytes relayed per pair before its datagrams are dropped (K/M/G "
                        "suffixes; default 10G)")
    r.add_argument("--relay-packets", type=_nonneg(int), default=10_000_000, metavar="N",
                   help="datagrams relayed per pair before they are dropped (default 1e7)")
    r.add_argument("--relay-idle", type=_nonneg(float), default=120.0, metavar="S",
                   help="free a pair's relay after S seconds without traffic (default 120)")
    r.add_argument("--relay-pairs", type=_nonneg(int), default=1024, metavar="N",
                   help="at most N relayed pairs at once (default 1024)")


def _relay_config(args: argparse.Namespace, listen: list[tuple[str, int]]) -> Any:
    """(RelayConfig or None, packed relay addresses) from the arguments; RelayError."""
    from .relay import RelayConfig, RelayError
    if args.relay_port is None:
        return None, ()
    if args.key is None:
        raise RelayError("--relay-port needs --key FILE (the relay serves v2 clients only)")
    if args.port in args.relay_port:
        raise RelayError(f"--relay-port {args.port} is the rendezvous port")
    cfg = RelayConfig(ports=args.relay_port, max_pairs=args.relay_pairs,
                      max_packets=args.relay_packets, max_bytes=args.relay_limit,
                      idle=args.relay_idle)
    addrs = args.relay_address or [a for a, _ in listen if a not in ("0.0.0.0", "::")]
    if not addrs:
        raise RelayError("--relay-port with a wildcard --listen needs --relay-address ADDR "
                         "(the address clients reach the relay at)")
    packed = tuple(ipaddress.ip_address(a).packed for a in addrs)
    return cfg, packed


def _fail(message: str, code: int = 2) -> int:
    print(f"wg-rendezvous: {message}", file=sys.stderr)
    return code


def _genkey() -> int:
    from .v2.keys import encode_key, generate_private_key
    print(encode_key(generate_private_key()))
    return 0


def _pubkey() -> int:
    from .v2.keys import KeyFormatError, decode_key, encode_key, public_key
    try:
        private = decode_key(sys.stdin.read(4096))
    except KeyFormatError as e:
        return _fail(f"pubkey: {e}", 1)
    print(encode_key(public_key(private)))
    return 0


def _read_server_key(path: str) -> tuple[bytes, bool]:
    """The server's private key, and whether others may read the file (wg warns)."""
    from .v2.keys import read_key_file
    key = read_key_file(path)
    try:
        loose = bool(os.stat(path).st_mode & (stat.S_IRWXG | stat.S_IRWXO))
    except OSError:
        loose = False
    return key, loose


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["genkey"] and len(argv) == 1:
        return _genkey()
    if argv[:1] == ["pubkey"] and len(argv) == 1:
        return _pubkey()
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
    if args.notify_rate > 0 and args.notify_burst < 1:
        return _fail("--notify-burst must be at least 1 when --notify-rate is on")
    if args.new_key_rate > 0 and args.new_key_burst < 1:
        return _fail("--new-key-burst must be at least 1 when --new-key-rate is on")
    if args.require_auth and args.key is None:
        return _fail("--require-auth needs --key FILE (the server's private key)")
    if args.require_auth and args.classic:
        return _fail("--require-auth refuses classic requests; drop --classic")
    classic = not args.require_auth and args.classic is not False
    if not classic and args.key is None:
        return _fail("--no-classic without --key leaves no protocol to serve")
    crypto = None
    loose_key = False
    if args.key is not None:
        from .v2.crypto import ServerCrypto
        from .v2.keys import KeyFormatError
        try:
            private, loose_key = _read_server_key(args.key)
            # as many clients' keys as the table holds clients (~320 B each; the
            # 4,096 most recent also keep their ready AEADs, ~4.4 KB each)
            crypto = ServerCrypto(private, cache_size=args.max_peers)
        except KeyFormatError as e:
            return _fail(f"--key: {e}")
        except OSError as e:
            return _fail(f"--key: cannot read {args.key}: {e.strerror}")
    listen = [(a, args.port) for a in (args.listen or ["0.0.0.0", "::"])]
    if args.probe_address and args.probe_port is None:
        return _fail("--probe-address needs --probe-port PORT")
    probe = []
    if args.probe_port is not None:
        if args.probe_port == args.port and args.port != 0:
            return _fail(f"--probe-port must differ from --port ({args.port})")
        addrs = args.listen or ["0.0.0.0", "::"]
        probe = [(a, args.probe_port) for a in addrs]
        # A wildcard of the address's family already answers there (and replies from it).
        probe += [(a, args.probe_port) for a in args.probe_address or ()
                  if a not in addrs and ("::" if ":" in a else "0.0.0.0") not in addrs]
    from .relay import RelayError, ports_text
    try:
        relay, relay_addresses = _relay_config(args, listen)
    except RelayError as e:
        return _fail(str(e))
    from .store import StoreError, parse_store_url, valid_server_id
    try:
        store_url = parse_store_url(args.store) if args.store is not None else None
    except StoreError as e:
        return _fail(str(e))
    if args.server_id is not None and not valid_server_id(args.server_id):
        return _fail(f"--server-id {args.server_id!r}: 1-64 letters, digits or ._:@-")
    if args.workers < 1:
        return _fail("--workers must be at least 1")
    if args.workers > 1:
        if store_url is None:
            return _fail(f"--workers {args.workers} needs --store redis://...: the workers "
                         "share no memory, only the store")
        if args.port == 0:
            return _fail("--workers needs a fixed --port (0 would give each worker its own)")
        if relay is not None and len(relay.ports) < args.workers:
            return _fail(f"--relay-port {ports_text(relay.ports)}: --workers {args.workers} "
                         "needs at least one relay port per worker")
    config = Config(ttl=args.ttl, max_peers=args.max_peers, rate=args.rate, burst=args.burst,
                    classic=classic, max_skew=args.max_skew, notify_rate=args.notify_rate,
                    notify_burst=args.notify_burst, new_key_rate=args.new_key_rate,
                    new_key_burst=args.new_key_burst, relay=relay,
                    relay_addresses=relay_addresses)

    def run(worker: int | None) -> int:
        return _serve(args, config, crypto, loose_key, listen, probe, store_url, worker,
                      args.workers)

    if args.workers > 1:
        from .workers import run_workers
        return run_workers(args.workers, run)
    return run(None)


def _serve(args: argparse.Namespace, config: Config, crypto: Any, loose_key: bool,
           listen: list[tuple[str, int]], probe: list[tuple[str, int]], store_url: Any,
           worker: int | None, workers: int) -> int:
    """Run one server (or worker WORKER of WORKERS) until stopped; its exit status."""
    import dataclasses
    import socket as _socket
    from .relay import ports_text
    relay = config.relay
    if relay is not None and worker is not None:
        relay = dataclasses.replace(relay, ports=relay.ports[worker::workers])
        config = dataclasses.replace(config, relay=relay)
    store = None
    if store_url is not None:
        from .redisstore import RedisStore
        server_id = args.server_id or f"{_socket.gethostname()[:40]}:{os.getpid()}"
        if args.server_id and worker is not None:
            server_id = f"{server_id}-w{worker}"
        store = RedisStore(store_url, server_id, timeout=args.store_timeout or 0.25)
        if store.connect():
            log.info("store %s, server id %s", store_url, server_id)
    server = Server(Service(config, crypto, store), ServerOptions(
        listen=listen, io=args.io, stats_interval=args.stats_interval, verbose=args.verbose,
        ipv6_optional=args.listen is None, probe=probe,
        relay_ports=relay.ports if relay else (), reuse_port=workers > 1))
    try:
        server.open()
    except ListenError as e:
        logsetup.fail("wg-rendezvous", str(e.strerror), args.log_format)
        if store is not None:
            store.close()
        return 1
    address = args.metrics
    if address is not None and worker is not None and address[1]:
        address = (address[0], address[1] + worker)
    try:
        exporter = metrics.start(address, server)
    except metrics.MetricsError as e:
        logsetup.fail("wg-rendezvous", str(e), args.log_format)
        server.close()
        return e.exit_code
    server.install_signal_handlers()
    addrs = ", ".join(format_address(a, p) for a, p in server.addresses)
    rate = f"{args.rate:g}/s burst {args.burst:g}" if args.rate > 0 else "off"
    protocols = ["classic"] if config.classic else []
    if crypto is not None:
        from .v2.keys import encode_key
        skew = f"{args.max_skew:g}s" if args.max_skew > 0 else "off"
        notify = (f"{args.notify_rate:g}/s burst {args.notify_burst:g}"
                  if args.notify_rate > 0 else "unlimited")
        new_keys = (f"{args.new_key_rate:g}/s burst {args.new_key_burst:g}"
                    if args.new_key_rate > 0 else "unlimited")
        protocols.append(f"v2 (max skew {skew}, notify {notify} per key, new keys {new_keys}, "
                         f"server public key {encode_key(crypto.server_public)})")
    who = f"worker {worker} (pid {os.getpid()}) " if worker is not None else ""
    log.info("%slistening on %s (ttl %gs, max peers %d, rate limit per source %s; %s)",
             who, addrs, args.ttl, args.max_peers, rate, " + ".join(protocols))
    if server.probe_sockets:
        log.info("probe port on %s (self-lookups only, nothing registered)",
                 ", ".join(format_address(a, p) for a, p in server.probe_addresses))
    for why in server.skipped:
        log.info("%s: serving IPv4 only", why)
    if relay is not None:
        log.info("relay on UDP %s (%d pairs at most, %d bytes / %d datagrams per pair, "
                 "idle %gs)", ports_text(relay.ports), relay.max_pairs, relay.max_bytes,
                 relay.max_packets, relay.idle)
    short = buffer_shortfall(server.sockets[0]) if server.sockets else []
    if short:
        log.warning("socket buffers capped by the kernel: %s; a burst of requests or "
                    "replies beyond them is dropped (raise both sysctls to 4194304: "
                    "OPERATIONS.md, Capacity)", ", ".join(short))
    if loose_key:
        log.warning("key file %s is accessible to other users (chmod 600 it)", args.key)
    try:
        server.serve()
    except KeyboardInterrupt:
        pass
    finally:
        server.log_stats()
        server.close()
        if store is not None:
            store.close()
        if exporter is not None:
            exporter.close()
    log.info("%sstopped", who)
    return 0
