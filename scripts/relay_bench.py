#!/usr/bin/env python3
"""Throughput through the tunnel, direct vs through the relay, in the netns lab.

For each path, a fresh lab (v2, wg-rendezvous with --relay-port): cone/cone NATs for the
direct path, symmetric/symmetric for the relayed one (the only way through). wg-punch
--wait forms the tunnel; then a bulk TCP transfer runs inside the tunnel from Alice to
Bob for --seconds (the sender and receiver are this script, run on the lab hosts), and
a flood of --udp-size UDP datagrams measures packets per second the other way round.
Prints one line per path and run; nothing is asserted. Needs root, like the lab.

    sudo scripts/relay_bench.py                 # 2 runs of 5 s per path
    sudo scripts/relay_bench.py -n 3 --seconds 10

"tunnel in" is the time from starting both wg-punch --wait --relay-after 3 clients to
both having seen a handshake (through the relay: the 3 s deadline, then one round trip).

The figures are those of this machine: wireguard-go in userspace on both ends, the
relay a single-threaded Python loop, every namespace on the same (shared) cores.
"""

from __future__ import annotations

import argparse
import re
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PORT = 5201
RELAY_PORT = "49919"


# -- the transfer ends, run on lab hosts ----------------------------------------------------

def _recv(port: int, proto: str, seconds: float) -> int:
    if proto == "tcp":
        srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("0.0.0.0", port))
        srv.listen(1)
        print("ready", flush=True)
        conn, _ = srv.accept()
        total, start = 0, time.monotonic()
        while chunk := conn.recv(1 << 16):
            total += len(chunk)
        print(f"bytes={total} seconds={time.monotonic() - start:.3f}", flush=True)
        return 0
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind(("0.0.0.0", port))
    print("ready", flush=True)
    sock.settimeout(seconds + 5)
    count = total = 0
    first = last = 0.0
    try:
        while True:
            data = sock.recv(65535)
            if data == b"end":
                break
            last = time.monotonic()
            if not count:
                first = last
            count += 1
            total += len(data)
            sock.settimeout(2)
    except TimeoutError:
        pass
    print(f"packets={count} bytes={total} seconds={max(last - first, 1e-9):.3f}", flush=True)
    return 0


def _send(host: str, port: int, proto: str, seconds: float, size: int) -> int:
    end = time.monotonic() + seconds
    if proto == "tcp":
        sock = socket.create_connection((host, port), timeout=10)
        block = bytes(1 << 16)
        total = 0
        while time.monotonic() < end:
            sock.sendall(block)
            total += len(block)
        sock.close()
        print(f"sent={total}", flush=True)
        return 0
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    payload = bytes(size)
    sent = 0
    while time.monotonic() < end:
        for _ in range(64):
            try:
                sock.sendto(payload, (host, port))
                sent += 1
            except OSError:  # ENOBUFS under load: the queue is full, go on
                pass
    for _ in range(5):
        sock.sendto(b"end", (host, port))
        time.sleep(0.05)
    print(f"sent={sent}", flush=True)
    return 0


# -- the driver -----------------------------------------------------------------------------

def _measure(lab, proto: str, src: str, dst_ip: str, dst: str, seconds: float,
             size: int) -> dict[str, float]:
    me = str(Path(__file__).resolve())
    recv = lab.python(dst, [me, "recv", str(PORT), proto, str(seconds)])
    lab.wait_line(recv)
    sender = lab.run(src, [sys.executable, me, "send", dst_ip, str(PORT), proto, str(seconds),
                           str(size)], timeout=seconds + 60)
    out, _ = lab.stop(recv) if recv.poll() is None and proto == "udp" else (
        recv.communicate(timeout=30)[0].decode(), "")
    lab.procs.remove(recv)
    fields = dict(re.findall(r"(\w+)=([\d.]+)", out + " " + sender.stdout))
    return {k: float(v) for k, v in fields.items()}


def _run_path(path: str, seconds: float, size: int) -> str:
    sys.path.insert(0, str(REPO))
    from tests.lab.lablib import Lab

    modes = ("cone", "cone") if path == "direct" else ("symmetric", "symmetric")
    lab = Lab(*modes, v2=True)
    try:
        lab.up()
        server = lab.start_server("--relay-port", RELAY_PORT)
        t0 = time.monotonic()
        clients = [lab.punch(h, "--wait", "--timeout", "40", "--relay-after", "3")
                   for h in ("alice", "bob")]
        for c in clients:
            c.communicate(timeout=60)
            if c.returncode != 0:
                return f"{path}: wg-punch exited {c.returncode}"
        ttt = time.monotonic() - t0  # both --wait clients saw their handshake
        lab.procs[:] = [p for p in lab.procs if p not in clients]
        endpoint = lab.endpoint("alice")
        if not lab.ping_until("alice", lab.info["BOB_TUN"], 15):
            return f"{path}: no ping through the tunnel"
        tcp = _measure(lab, "tcp", "alice", lab.info["BOB_TUN"], "bob", seconds, size)
        udp = _measure(lab, "udp", "bob", lab.info["ALICE_TUN"], "alice", seconds, size)
        _, err = lab.stop(server)
        stats = [line for line in err.splitlines() if " stats: " in line]
        relayed = dict(re.findall(r"(v2_relay_forwarded\w*)=(\d+)", stats[-1] if stats else ""))
        mbit = tcp.get("bytes", 0) * 8 / max(tcp.get("seconds", 1), 1e-9) / 1e6
        pps = udp.get("packets", 0) / max(udp.get("seconds", 1), 1e-9)
        sent = udp.get("sent", 0)
        return (f"{path:6} endpoint={endpoint:22} tunnel in {ttt:4.1f}s  tcp={mbit:6.1f} Mbit/s  "
                f"udp {size} B: "
                f"{pps:8.0f} pkt/s received ({udp.get('packets', 0):.0f} of {sent:.0f} sent)   "
                f"relay forwarded={relayed.get('v2_relay_forwarded', '0')} datagrams, "
                f"{int(relayed.get('v2_relay_forwarded_bytes', '0')) / 1e6:.1f} MB")
    finally:
        lab.down()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["recv"]:
        return _recv(int(argv[1]), argv[2], float(argv[3]))
    if argv[:1] == ["send"]:
        return _send(argv[1], int(argv[2]), argv[3], float(argv[4]), int(argv[5]))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", type=int, default=2, help="runs per path (default 2)")
    p.add_argument("--seconds", type=float, default=5.0, help="length of each transfer")
    p.add_argument("--udp-size", type=int, default=1200, help="UDP payload size (bytes)")
    p.add_argument("--path", action="append", choices=("direct", "relay"),
                   help="only this path (default both)")
    args = p.parse_args(argv)
    for i in range(args.n):
        for path in args.path or ("direct", "relay"):
            try:
                print(f"run {i + 1}: {_run_path(path, args.seconds, args.udp_size)}", flush=True)
            except (subprocess.SubprocessError, AssertionError, OSError) as e:
                print(f"run {i + 1}: {path}: failed: {e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
