"""Tiny UDP probes the lab tests run on lab hosts (standard library only).

Addresses are ``a.b.c.d:port`` or ``[v6addr]:port``, in arguments and in output.

    udp_probe.py echo PORT...           answer every datagram with "ip:port" of its sender
                                        (and print that line), over IPv4 and, where the
                                        host has it, IPv6; prints "ready" first
    udp_probe.py ask SRCPORT DST...     from SRCPORT, send to each DST in turn and print
                                        what it answered, or "-" after 0.7 s
    udp_probe.py listen PORT SECONDS [FIRST]
                                        on PORT (IPv4 and IPv6), first send one datagram to
                                        FIRST (opening the NAT or firewall toward it),
                                        print "ready", then print the sender of every
                                        datagram that arrives until SECONDS pass
"""

from __future__ import annotations

import select
import socket
import sys
import time
from collections.abc import Sequence

__all__ = ["main"]

Addr = tuple[str, int]


def _addr(text: str) -> tuple[int, Addr]:
    host, _, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        return socket.AF_INET6, (host[1:-1], int(port))
    return socket.AF_INET, (host, int(port))


def _fmt(sender: tuple[object, ...]) -> str:
    host, port = str(sender[0]), int(sender[1])  # type: ignore[call-overload]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _bound(port: int, family: int = socket.AF_INET) -> socket.socket:
    s = socket.socket(family, socket.SOCK_DGRAM)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind(("::", port))
    else:
        s.bind(("0.0.0.0", port))
    return s


def _both(port: int) -> list[socket.socket]:
    """An IPv4 socket on PORT, and an IPv6 one if this host has IPv6."""
    socks = [_bound(port)]
    try:
        socks.append(_bound(port, socket.AF_INET6))
    except OSError:  # IPv6 disabled in this namespace
        pass
    return socks


def echo(ports: Sequence[int]) -> None:
    socks = [s for p in ports for s in _both(p)]
    print("ready", flush=True)
    while True:
        ready, _, _ = select.select(socks, [], [])
        for s in ready:
            _, sender = s.recvfrom(2048)
            line = _fmt(sender)
            s.sendto(line.encode(), sender)
            print(line, flush=True)


def ask(src: int, dsts: Sequence[str]) -> None:
    socks: dict[int, socket.socket] = {}
    for dst in dsts:
        family, addr = _addr(dst)
        if family not in socks:
            socks[family] = _bound(src, family)
            socks[family].settimeout(0.7)
        s = socks[family]
        try:
            s.sendto(b"probe", addr)
            print(s.recvfrom(2048)[0].decode(), flush=True)
        except socket.timeout:
            print("-", flush=True)
        except OSError as e:  # e.g. no route for this family: no answer either
            print(f"{dst}: {e.strerror}", file=sys.stderr, flush=True)
            print("-", flush=True)


def listen(port: int, seconds: float, first: str | None) -> None:
    socks = _both(port)
    if first:
        family, addr = _addr(first)
        next(s for s in socks if s.family == family).sendto(b"open", addr)
    print("ready", flush=True)
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        ready = select.select(socks, [], [], left)[0]
        if not ready:
            break
        for s in ready:
            _, sender = s.recvfrom(2048)
            print(_fmt(sender), flush=True)


def main(argv: Sequence[str]) -> int:
    cmd, *args = argv or ["help"]
    if cmd == "echo":
        echo([int(p) for p in args])
    elif cmd == "ask":
        ask(int(args[0]), args[1:])
    elif cmd == "listen":
        listen(int(args[0]), float(args[1]), args[2] if len(args) > 2 else None)
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
