"""``python -m bpf``: print the socket filter the punch client would attach."""

from __future__ import annotations

import argparse
import ipaddress
import sys
from collections.abc import Sequence

from rendezvous.classic import DEFAULT_PORT

from .disasm import disassemble, format_c, format_decimal
from .errors import BpfError
from .insn import Program, encode
from .programs import DEFAULT_MAX_PAYLOAD, ipv4_reply_filter, ipv6_reply_filter
from .validate import validate

__all__ = ["main"]

DESCRIPTION = """\
Print the classic BPF filter that wg-punch attaches to its raw socket.

wg-punch owns no UDP socket (WireGuard does), so it reads the rendezvous server's
reply from a raw socket that sees every UDP packet the host receives. The filter
lets through only UDP from the server's address and port to WireGuard's port, and
keeps just the headers plus --max-payload bytes of payload.

  ipv4  for AF_INET/SOCK_RAW/IPPROTO_UDP: the filter sees the IPv4 header first;
        it checks version, protocol 17, source address, fragment offset 0, the
        header length (IPv4 options honoured via 'ldxb 4*([0]&0xf)'), the ports
        and that a whole UDP header is present; it returns IHL + 8 + max-payload.
  ipv6  for AF_INET6/SOCK_RAW/IPPROTO_UDP: the filter sees the UDP header first;
        the source address is read from the IPv6 header at SKF_NET_OFF+8
        (printed as [-1048568] .. [-1048556]); it returns 8 + max-payload.

The default output is 'tcpdump -d' style: '(NNN) op operand', conditional jumps
with absolute targets 'jt T jf F', so the output diffs against tcpdump's own.
"""

EPILOG = f"""\
examples:
  python -m bpf ipv4 --server 198.51.100.7 --wg-port 51820
  python -m bpf ipv4 --server 198.51.100.7:{DEFAULT_PORT} --wg-port 51820 --c
  python -m bpf ipv6 --server '[2001:db8::7]:{DEFAULT_PORT}' --wg-port 51820 --hex
"""


def _split_server(text: str, family: str) -> tuple[str, int]:
    """``IP``, ``IP:PORT`` (IPv4) or ``IP``, ``[IP]:PORT`` (IPv6)."""
    host, port = text, DEFAULT_PORT
    if family == "ipv6":
        if text.startswith("["):
            host, sep, rest = text[1:].partition("]")
            if not sep or (rest and not rest.startswith(":")):
                raise ValueError(f"bad server {text!r}: expected [IPv6]:PORT")
            if rest:
                port = int(rest[1:])
        ipaddress.IPv6Address(host)
    else:
        if ":" in text:
            host, _, p = text.rpartition(":")
            port = int(p)
        ipaddress.IPv4Address(host)
    return host, port


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bpf", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="family", required=True, metavar="{ipv4,ipv6}")
    for family, metavar, example in (("ipv4", "IP[:PORT]", "198.51.100.7:49918"),
                                     ("ipv6", "[IP]:PORT", "'[2001:db8::7]:49918'")):
        p = sub.add_parser(family, help=f"the filter for an {family.upper()} raw UDP socket",
                           description=f"Print the {family} reply filter.")
        p.add_argument("--server", required=True, metavar=metavar,
                       help=f"rendezvous server address, e.g. {example} "
                            f"(port defaults to {DEFAULT_PORT})")
        p.add_argument("--wg-port", required=True, type=int, metavar="PORT",
                       help="WireGuard's listen port (the replies' destination port)")
        p.add_argument("--max-payload", type=int, default=DEFAULT_MAX_PAYLOAD, metavar="N",
                       help=f"payload bytes kept per reply (default {DEFAULT_MAX_PAYLOAD}; "
                            "a classic reply is 0 or 6 bytes)")
        fmt = p.add_mutually_exclusive_group()
        fmt.add_argument("--c", dest="fmt", action="store_const", const="c",
                         help="a C array of struct sock_filter (like tcpdump -dd)")
        fmt.add_argument("--decimal", dest="fmt", action="store_const", const="decimal",
                         help="count, then 'code jt jf k' lines (like tcpdump -ddd; "
                              "what tc and iptables -m bpf take)")
        fmt.add_argument("--hex", dest="fmt", action="store_const", const="hex",
                         help="the sock_filter array as attached, in hex (native byte order)")
    return parser


def render(program: Program, fmt: str | None) -> str:
    if fmt == "c":
        return format_c(program)
    if fmt == "decimal":
        return format_decimal(program)
    if fmt == "hex":
        return encode(program).hex() + "\n"
    return disassemble(program)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        host, port = _split_server(args.server, args.family)
    except ValueError as e:
        parser.error(f"--server {args.server!r}: {e}")
    build = ipv4_reply_filter if args.family == "ipv4" else ipv6_reply_filter
    try:
        program = build(host, port, args.wg_port, args.max_payload)
        validate(program)
    except BpfError as e:
        parser.error(str(e))
    sys.stdout.write(render(program, args.fmt))
    return 0


if __name__ == "__main__":
    sys.exit(main())
