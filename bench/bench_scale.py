#!/usr/bin/env python3
"""Capacity of wg-rendezvous (issue 8): memory at 10 million peers, and throughput with
the embedded store, with Redis (--store), and with 1 and 2 workers, each against the C
reference server of bench/bench_server.py in the same run.

    sudo python3 bench/bench_scale.py                       # everything
    sudo python3 bench/bench_scale.py --skip-memory --rounds 3
    sudo python3 bench/bench_scale.py --skip-throughput --peers 10000000

Memory: bench/registry_memory.py registers N peers in a fresh process (rss per peer;
the embedded classic registry, and the whole classic service with its per-source
state). Throughput: inside one throwaway network namespace (loopback only) a private
redis-server (no persistence) is started, and bench/bench_server.py runs once per
configuration, each run with its own C reference rounds, so every ratio compares
like with like. Figures are printed, never asserted; the exit status is non-zero only
if a run lost or damaged replies or could not run.

On a 2-core machine the load generator, the server processes and Redis share two
cores: workers and Redis compete with the load generator, which the figures show.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

CONFIGS = [
    ("embedded store, 1 process", []),
    ("Redis store, 1 process", ["--store={redis}"]),
    ("Redis store, 2 workers", ["--store={redis}", "--workers=2"]),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def memory(peers: list[int]) -> int:
    print("== memory: bench/registry_memory.py", flush=True)
    rc = 0
    for what in ("registry", "service", "v2", "v2keys"):
        # v2: ~800 B a client, and ~320 B for its keys (an X25519 each to fill)
        counts = peers if not what.startswith("v2") else [min(peers)]
        cmd = [sys.executable, str(HERE / "registry_memory.py"), "--what", what,
               "--peers", *map(str, counts)]
        print("$", " ".join(cmd), flush=True)
        rc |= subprocess.call(cmd)
    return rc


def start_redis(port: int, workdir: Path) -> subprocess.Popen:
    redis = shutil.which("redis-server")
    if redis is None:
        raise SystemExit("bench_scale: redis-server is not installed (apt-get install redis-server)")
    proc = subprocess.Popen([redis, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(workdir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(8).startswith(b"+PONG"):
                    return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("bench_scale: redis-server did not start")


def throughput(args: argparse.Namespace) -> int:
    port = free_port()
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"wgpb-redis-{os.getpid()}"
    workdir.mkdir(exist_ok=True)
    redis = start_redis(port, workdir)
    url = f"redis://127.0.0.1:{port}/0"
    summary: list[str] = []
    rc = 0
    try:
        for name, extra in CONFIGS:
            print(f"== throughput: {name}", flush=True)
            subprocess.run([sys.executable, "-c", "import socket; s=socket.create_connection("
                            f"('127.0.0.1',{port})); s.sendall(b'FLUSHALL\\r\\n'); s.recv(16)"],
                           check=False)
            cmd = [sys.executable, str(HERE / "bench_server.py"), "--inside", "--small-keys", "0",
                   "--keys", str(args.keys), "--rounds", str(args.rounds), "--seconds",
                   str(args.seconds), "--no-headroom",
                   *(f"--ours-arg={a.replace('{redis}', url)}" for a in extra)]
            out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True)
            print(out.stdout, flush=True)
            rc |= out.returncode
            m = re.search(r"ratio ours / C ref at \d+ keys: ([\d.]+)x", out.stdout)
            ours = re.search(r"^ours\s+\d+\s+([\d,]+)", out.stdout, re.M)
            ref = re.search(r"^C ref\s+\d+\s+([\d,]+)", out.stdout, re.M)
            summary.append(f"  {name:28} ours {ours.group(1) if ours else '?':>9} req/s   "
                           f"C ref {ref.group(1) if ref else '?':>9} req/s   ratio "
                           f"{m.group(1) + 'x' if m else '?'}")
    finally:
        redis.terminate()
        redis.wait()
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"== summary ({args.keys} keys, {args.rounds} round(s) of {args.seconds:g}s, "
          f"{os.cpu_count()} CPUs)")
    print("\n".join(summary))
    return rc


def in_netns(argv: list[str]) -> int:
    name = f"wgpb{os.getpid()}-scale-{secrets.token_hex(2)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        print(f"running inside the throwaway network namespace {name}", flush=True)
        p = subprocess.Popen(["ip", "netns", "exec", name, sys.executable, __file__, *argv,
                              "--inside"])
        try:
            return p.wait()
        except KeyboardInterrupt:
            p.send_signal(signal.SIGINT)
            return p.wait()
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peers", type=int, nargs="+", default=[1_000_000, 10_000_000],
                   help="peer counts for the memory figures (default 1000000 10000000)")
    p.add_argument("--keys", type=int, default=60_000, help="registered keys (default 60000)")
    p.add_argument("--rounds", type=int, default=3, help="rounds per configuration (default 3)")
    p.add_argument("--seconds", type=float, default=5.0, help="per run (default 5)")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.inside:
        return throughput(args)
    rc = 0 if args.skip_memory else memory(args.peers)
    if not args.skip_throughput:
        if os.geteuid() != 0 or not shutil.which("ip"):
            print("bench_scale: the throughput part needs root (a network namespace)",
                  file=sys.stderr)
            return 2
        sys.path.insert(0, str(HERE))
        import bench_server
        bench_server.build()  # the C reference server and load generator
        rc |= in_netns([a for a in argv if a != "--skip-memory"] + ["--skip-memory"])
    return rc


if __name__ == "__main__":
    sys.exit(main())
