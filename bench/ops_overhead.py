"""What the ops features cost: a metrics scrape of the real server, and one state file
write of wg-punch, as a function of the table or peer count. Prints figures, asserts
nothing. Run from the repository root:

    python bench/ops_overhead.py [--scrapes 200]

The server's hot path is not touched by --metrics (the collector reads counters at
scrape time), so what matters is how long a scrape holds the GIL away from the loop.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from punch.statefile import InterfaceState, PeerRecord, encode, write_atomic  # noqa: E402


def scrape_server(scrapes: int, keys: int) -> tuple[float, float]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    p = subprocess.Popen([sys.executable, "-m", "rendezvous", "--listen", "127.0.0.1", "--port",
                          "0", "--rate", "0", "--metrics", "127.0.0.1:0", "--stats-interval", "0"],
                         stderr=subprocess.PIPE, text=True, env=env)
    assert p.stderr is not None
    url = addr = None
    while url is None or addr is None:
        line = p.stderr.readline()
        if not line:
            raise SystemExit("server did not start")
        if m := re.search(r"metrics on (\S+)", line):
            url = m.group(1)
        if m := re.search(r"listening on ([\d.]+):(\d+)", line):
            addr = (m.group(1), int(m.group(2)))
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(2)
        for i in range(keys):  # register KEYS keys, waiting for each reply
            s.sendto((i + 1).to_bytes(32, "big") + bytes(31) + b"\1", addr)
            s.recv(64)
        times = []
        for _ in range(scrapes):
            t = time.perf_counter()
            with urllib.request.urlopen(url, timeout=5) as r:
                r.read()
            times.append(time.perf_counter() - t)
        return statistics.median(times) * 1e3, max(times) * 1e3
    finally:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        p.stderr.close()


def state_write(peers: int, durable: bool, rounds: int = 200) -> float:
    recs = {i.to_bytes(32, "big"): PeerRecord("applied", "198.51.100.4:51820", True, 1.0,
                                             "198.51.100.4:51820", 1.0) for i in range(peers)}
    state = InterfaceState("wg0", 1, "daemon", "203.0.113.7:49918", 1.0, 2.0, peers=recs)
    base = "/run" if os.access("/run", os.W_OK) else None
    with tempfile.TemporaryDirectory(dir=base) as d:
        path = Path(d) / "wg0.json"
        t = time.perf_counter()
        for _ in range(rounds):
            write_atomic(path, encode(state), durable=durable)
        return (time.perf_counter() - t) / rounds * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scrapes", type=int, default=200)
    args = ap.parse_args()
    for keys in (0, 10_000):
        med, worst = scrape_server(args.scrapes, keys)
        print(f"server scrape, {keys:>6} keys: median {med:.2f} ms, max {worst:.2f} ms "
              f"({args.scrapes} scrapes over HTTP on loopback)")
    where = "/run" if os.access("/run", os.W_OK) else tempfile.gettempdir()
    for peers in (1, 10, 100, 1000):
        print(f"state file write in {where}, {peers:>4} peers: "
              f"{state_write(peers, False):.3f} ms (encode + write + rename), "
              f"{state_write(peers, True):.3f} ms with fsync")
    return 0


if __name__ == "__main__":
    sys.exit(main())
