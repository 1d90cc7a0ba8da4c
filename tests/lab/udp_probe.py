"""Tiny UDP probes the lab tests run on lab hosts (standard library only).

    udp_probe.py echo PORT...           answer every datagram with "ip:port" of its sender
                                        (and print that line); prints "ready" first
    udp_probe.py ask SRCPORT DST...     from SRCPORT, send to each DST (ip:port) in turn and
                                        print what it answered, or "-" after 0.7 s
    udp_probe.py listen PORT SECONDS [FIRST]
                                        on PORT, first send one datagram to FIRST (opening
                                        the NAT toward it), print "ready", then print the
                                        sender of every datagram from anyone else until
                                        SECONDS pass
"""

from __future__ import annotations

import select
import socket
import sys
import time
from collections.abc import Sequence

__all__ = ["main"]


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def _bound(port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", port))
    return s


def echo(ports: Sequence[int]) -> None:
    socks = [_bound(p) for p in ports]
    print("ready", flush=True)
    while True:
        ready, _, _ = select.select(socks, [], [])
        for s in ready:
            _, (ip, port) = s.recvfrom(2048)
            line = f"{ip}:{port}"
            s.sendto(line.encode(), (ip, port))
            print(line, flush=True)


def ask(src: int, dsts: Sequence[str]) -> None:
    s = _bound(src)
    s.settimeout(0.7)
    for dst in dsts:
        s.sendto(b"probe", _addr(dst))
        try:
            print(s.recvfrom(2048)[0].decode(), flush=True)
        except socket.timeout:
            print("-", flush=True)


def listen(port: int, seconds: float, first: str | None) -> None:
    s = _bound(port)
    skip = None
    if first:
        skip = _addr(first)
        s.sendto(b"open", skip)
    print("ready", flush=True)
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        if not select.select([s], [], [], left)[0]:
            break
        _, sender = s.recvfrom(2048)
        if sender != skip:
            print(f"{sender[0]}:{sender[1]}", flush=True)


def main(argv: Sequence[str]) -> int:
    cmd, *args = argv
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
