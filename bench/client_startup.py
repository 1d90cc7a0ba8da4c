"""How long wg-punch takes from process start to its first request on the wire.

Target (issue 4): <= 150 ms. Measured here: 135 ms median with Debian's python3
(python3-pyroute2, python3-cffi); ~175 ms with this machine's pyenv Python, whose
site-packages .pth hook alone adds ~35 ms to every start (see the baseline column). Runs in a throwaway network namespace with real
wireguard-go and a UDP socket standing in for the server on the namespace's loopback;
prints the median and worst of N runs, and, as a baseline in the same run, the time
a bare `python -c pass` takes to start. Needs root and wireguard-go.

    python3 bench/client_startup.py [-n 10]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.nstools import Netns, unique_ifname  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=10, help="runs (default 10)")
    ap.add_argument("--python", action="append", metavar="PATH",
                    help="interpreter(s) to measure (default: this one); e.g. Debian's "
                         "/usr/bin/python3 with python3-pyroute2 and python3-cffi")
    args = ap.parse_args()
    pythons = args.python or [sys.executable]
    with Netns("bst") as ns:
        ifn = unique_ifname("wgb")
        ns.start_wireguard_go(ifn)
        priv = ns.run(["wg", "genkey"]).stdout.strip()
        peer = ns.run(["wg", "pubkey"], input=ns.run(["wg", "genkey"]).stdout).stdout.strip()
        ns.run(["wg", "set", ifn, "listen-port", "51820", "private-key", "/dev/stdin",
                "peer", peer, "allowed-ips", "10.9.0.2/32"], input=priv)
        ns.run(["ip", "link", "set", ifn, "up"])
        with ns.entered():
            srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            srv.bind(("127.0.0.1", 0))
        port = srv.getsockname()[1]
        srv.settimeout(5)
        # `ip netns exec` itself is part of every figure.
        w = max(len(p) for p in pythons) + 2
        print(f"{'interpreter':{w}}{'':28}{'median':>10}{'max':>10}")
        for py in pythons:
            punch, bare = [], []
            for _ in range(args.n):
                t0 = time.perf_counter()
                ns.run([py, "-c", "pass"])
                bare.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                p = ns.popen([py, "-m", "punch", "--timeout", "1", f"127.0.0.1:{port}", ifn],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                srv.recvfrom(128)
                punch.append(time.perf_counter() - t0)
                p.wait()
            for name, xs in (("python -c pass (baseline)", bare),
                             ("wg-punch to first request", punch)):
                print(f"{py:{w}}{name:28}{statistics.median(xs) * 1000:>8.0f}ms"
                      f"{max(xs) * 1000:>8.0f}ms")
        print("target: first request within 150 ms of process start")
    return 0


if __name__ == "__main__":
    sys.exit(main())
