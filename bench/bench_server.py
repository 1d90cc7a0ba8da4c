"""Throughput and latency of wg-rendezvous against a plain C reference server.

Run as root from the repository root::

    /root/.pyenv/versions/3.11.7/bin/python3 bench/bench_server.py [--keys 60000] [--seconds 5]

What it does:

1. compiles bench/ref_server.c and bench/loadgen.c with ``cc -O2`` into bench/out/;
2. creates a throwaway network namespace (``wgpb<pid>-bench-<hex>``), brings its
   loopback up and re-runs itself inside it, so nothing else on the host shares the
   loopback or its ports; the namespace is deleted at the end, also on failure;
3. per configuration (``--keys``, then ``--small-keys``), starts the servers:
   ``C ref`` (one recvfrom/sendto per datagram: the yardstick), ``ours``
   (``python -m rendezvous --rate 0``), and ``C mmsg`` (the same C server with
   recvmmsg/sendmmsg batches: it only shows how much load the generator can offer);
4. runs the load generator against each server in turn, ``--rounds`` times
   alternating (the order rotates each round, so no server always runs right after
   the same one), and prints the median round of each (req/s, p50/p99 latency, lost,
   wrong, CPU used by the server and by the load generator) and the ratio ours / C.

The exit status is 1 if any reply was lost or wrong, or a run failed; speed never
changes the exit status. Without root (no namespaces), ``--no-netns`` runs on the
host's loopback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["main"]

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
OUT = BENCH / "out"
HOST = "127.0.0.1"
PROBE_KEY = b"wgpunch-bench-probe".ljust(32, b"\0")
NOBODY_KEY = b"wgpunch-bench-nobody".ljust(32, b"\0")


class BenchError(RuntimeError):
    """The benchmark could not run (build failed, a server did not start, ...)."""


# ---- build ---------------------------------------------------------------------------


def build() -> None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise BenchError("no C compiler (cc) found")
    OUT.mkdir(exist_ok=True)
    for name in ("ref_server", "loadgen"):
        cmd = [cc, "-O2", "-Wall", "-o", str(OUT / name), str(BENCH / f"{name}.c")]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise BenchError(f"{' '.join(cmd)} failed:\n{r.stderr}")


# ---- processes -------------------------------------------------------------------------


def process_tree(pid: int) -> list[int]:
    """PID and its live descendants (a server may fork workers)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


def probe(port: int, timeout: float) -> bool:
    """Send one classic request to HOST:PORT; True once any reply comes back."""
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.254", 0))
        s.settimeout(0.1)
        while time.monotonic() < deadline:
            with contextlib.suppress(ConnectionRefusedError):
                s.sendto(PROBE_KEY + NOBODY_KEY, (HOST, port))
            try:
                s.recvfrom(64)
                return True
            except (TimeoutError, ConnectionRefusedError):
                continue
    return False


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    """One server under test, started by us and ended by PID."""

    name: str
    argv: list[str]
    env: dict[str, str] | None = None
    cwd: str | None = None  # `python -m` puts the working directory first on sys.path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None

    def start(self) -> None:
        self.port = free_port()
        argv = [a.replace("{port}", str(self.port)) for a in self.argv]
        self.log = OUT / f"{self.name.replace(' ', '_')}.log"
        with open(self.log, "wb") as logf:
            self.proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT,
                                         env=self.env, cwd=self.cwd)
        if not probe(self.port, timeout=15):
            self.stop()
            raise BenchError(f"{self.name} did not answer on {HOST}:{self.port}; "
                             f"log:\n{self.log.read_text(errors='replace')[-2000:]}")

    def stop(self) -> None:
        p = self.proc
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def ours_available(env: dict[str, str]) -> bool:
    r = subprocess.run([sys.executable, "-m", "rendezvous", "--help"], env=env,
                       capture_output=True, text=True)
    return r.returncode == 0 and "--max-peers" in r.stdout and "--rate" in r.stdout


# ---- load ----------------------------------------------------------------------------


@dataclass
class Result:
    server: str
    keys: int
    data: dict[str, float] = field(default_factory=dict)
    error: str = ""

    @property
    def reqps(self) -> float:
        return float(self.data.get("reqps", 0.0))

    @property
    def lost(self) -> int:
        return int(self.data.get("lost", 0)) + int(self.data.get("reg_lost", 0))

    @property
    def wrong(self) -> int:
        return int(self.data.get("wrong", 0)) + int(self.data.get("reg_wrong", 0))

    @property
    def failed(self) -> bool:
        return bool(self.error) or self.lost > 0 or self.wrong > 0


def run_load(server: Server, args: argparse.Namespace, keys: int) -> Result:
    argv = [str(OUT / "loadgen"), "--server", f"{HOST}:{server.port}", "--keys", str(keys),
            "--sockets", str(args.sockets), "--window", str(args.window),
            "--seconds", str(args.seconds), "--warmup", str(args.warmup),
            "--timeout", str(args.timeout), "--unknown-pct", str(args.unknown_pct),
            "--seed", str(args.seed)]
    assert server.proc is not None
    for pid in process_tree(server.proc.pid)[:8]:
        argv += ["--watch-pid", str(pid)]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = p.communicate(timeout=args.seconds + 4 * args.timeout + keys / 5000 + 60)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        return Result(server.name, keys, error="load generator did not stop")
    res = Result(server.name, keys)
    lines = [ln for ln in out.decode().splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        res.error = f"loadgen exit {p.returncode}: {err.decode().strip()[-500:]}"
        if lines:
            res.data = json.loads(lines[-1])
        return res
    res.data = json.loads(lines[-1])
    if server.proc.poll() is not None:
        res.error = f"{server.name} exited with {server.proc.returncode} during the run"
    return res


# ---- report --------------------------------------------------------------------------


def median_result(results: list[Result]) -> Result:
    ok = sorted((r for r in results if not r.error), key=lambda r: r.reqps)
    if not ok:
        return results[-1]
    return ok[(len(ok) - 1) // 2]


def fmt_row(cols: list[str], widths: list[int]) -> str:
    return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cols, widths)))


def cpu_shares(data: dict[str, float]) -> tuple[float, float, float]:
    """Cores busy in the measured window: the server, the load generator, the machine.

    Process times include the softirq work done on their behalf (delivering datagrams
    over loopback); ``machine`` is every CPU's busy time, so machine - server - loadgen
    is what the kernel threads and other users' processes took.
    """
    return (max(0.0, data.get("server_cpu", 0.0)), data.get("loadgen_cpu", 0.0),
            data.get("machine_cpu", 0.0))


def cpu_per_request(r: Result, what: str = "server_cpu") -> float:
    """Server CPU microseconds per answered request: barely moved by other load.
    WHAT = "server_sys_cpu": only the part spent in the kernel."""
    return 1e6 * max(0.0, r.data.get(what, 0.0)) / r.reqps if r.reqps > 0 else 0.0


def report(config_keys: int, rounds: dict[str, list[Result]]) -> tuple[list[str], float | None]:
    header = ["server", "keys", "req/s", "best req/s", "p50 us", "p99 us", "lost", "wrong",
              "cpu: server", "loadgen", f"all {os.cpu_count()}", "srv us/req", "of it sys"]
    widths = [8, 7, 9, 10, 7, 7, 5, 5, 11, 7, 6, 10, 9]
    lines = [fmt_row(header, widths)]
    med: dict[str, Result] = {}
    for name, results in rounds.items():
        m = median_result(results)
        med[name] = m
        best = max((r.reqps for r in results), default=0.0)
        lost = sum(r.lost for r in results)
        wrong = sum(r.wrong for r in results)
        lines.append(fmt_row([
            name, str(config_keys), f"{m.reqps:,.0f}", f"{best:,.0f}",
            f"{m.data.get('p50_us', 0):.0f}", f"{m.data.get('p99_us', 0):.0f}",
            str(lost), str(wrong), *(f"{100 * c:.0f}%" for c in cpu_shares(m.data)),
            f"{cpu_per_request(m):.2f}", f"{cpu_per_request(m, 'server_sys_cpu'):.2f}"],
            widths))
        for r in results:
            if r.error:
                lines.append(f"  ! {name}: {r.error}")
    ncpu = os.cpu_count() or 1
    for name, m in med.items():
        srv, lg, machine = cpu_shares(m.data)
        if name == "C mmsg" or not 0 < srv < 0.9 or m.reqps <= 0:
            continue
        if machine > 0.9 * ncpu:
            lines.append(f"note: {name} got {100 * srv:.0f}% of a core while all CPUs were busy "
                         f"(load generator {100 * lg:.0f}%, everything else "
                         f"{100 * max(0.0, machine - srv - lg):.0f}%): it was short of CPU")
        else:
            lines.append(f"note: {name} used {100 * srv:.0f}% of a core with CPU to spare: "
                         f"the load generator did not offer enough load (raise --window)")
    ratio = None
    if "ours" in med and "C ref" in med and med["C ref"].reqps > 0:
        ratio = med["ours"].reqps / med["C ref"].reqps
        paired = [o.reqps / c.reqps for o, c in zip(rounds["ours"], rounds["C ref"])
                  if c.reqps > 0 and not (o.error or c.error)]
        extra = f" (per-round ratios: {', '.join(f'{x:.2f}' for x in paired)})" if paired else ""
        lines.append(f"ratio ours / C ref at {config_keys} keys: {ratio:.2f}x "
                     f"(target >= 1.0){extra}")
        c_us, o_us = cpu_per_request(med["C ref"]), cpu_per_request(med["ours"])
        if c_us > 0 and o_us > 0:
            lines.append(f"CPU per request: C ref {c_us:.2f} us, ours {o_us:.2f} us "
                         f"(C ref / ours = {c_us / o_us:.2f}x; less sensitive to other load)")
    if "baseline" in med and "ours" in med and med["baseline"].reqps > 0:
        paired = [o.reqps / b.reqps for o, b in zip(rounds["ours"], rounds["baseline"])
                  if b.reqps > 0 and not (o.error or b.error)]
        b_us, o_us = cpu_per_request(med["baseline"]), cpu_per_request(med["ours"])
        lines.append(f"ours / baseline at {config_keys} keys: "
                     f"{med['ours'].reqps / med['baseline'].reqps:.2f}x (per-round ratios: "
                     f"{', '.join(f'{x:.2f}' for x in paired)}); CPU per request: baseline "
                     f"{b_us:.2f} us, ours {o_us:.2f} us")
    if "C mmsg" in med and "C ref" in med and med["C ref"].reqps > 0:
        lines.append(f"load generator headroom: it drove the batched C server at "
                     f"{med['C mmsg'].reqps:,.0f} req/s = "
                     f"{med['C mmsg'].reqps / med['C ref'].reqps:.2f}x the plain C server")
    return lines, ratio


def environment() -> str:
    load = os.getloadavg()
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return (f"{os.cpu_count()} CPUs ({model}), kernel {os.uname().release}, "
            f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


# ---- main ----------------------------------------------------------------------------


def self_check(args: argparse.Namespace) -> bool:
    """Prove the load generator's checks can fail: run it against C servers that drop or
    damage every 1000th reply, and against a correct one."""
    quick = argparse.Namespace(**{**vars(args), "seconds": 1.0, "warmup": 0.2, "timeout": 0.5})
    cases = [("correct", [], lambda r: r.lost == 0 and r.wrong == 0),
             ("drops", ["--drop-every", "1000"], lambda r: r.lost > 0),
             ("corrupts", ["--corrupt-every", "1000"], lambda r: r.wrong > 0)]
    ok = True
    for label, extra, expect in cases:
        server = Server(f"C {label}", [str(OUT / "ref_server"), HOST, "{port}", *extra])
        try:
            server.start()
            res = run_load(server, quick, 1000)
        finally:
            server.stop()
        good = not res.error and expect(res)
        ok = ok and good
        print(f"self-check: server that {'is ' if label == 'correct' else ''}{label}: "
              f"lost {res.lost}, wrong {res.wrong} -> {'as expected' if good else 'NOT DETECTED'}"
              f"{' ' + res.error if res.error else ''}")
    return ok


def run_configs(args: argparse.Namespace) -> int:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    print(f"machine: {environment()}")
    if os.getloadavg()[0] > 0.5:
        print("note: the machine is not idle; figures are noisy (the ratio, measured in "
              "alternating rounds, less so)")
    print(f"load: {args.sockets} sockets x {args.window} in flight, {args.seconds}s per run "
          f"({args.warmup}s warm-up), {args.rounds} round(s), unknown keys "
          f"{args.unknown_pct}%")
    have_ours = not args.no_ours and ours_available(env)
    if not args.no_ours and not have_ours:
        print("ours: `python -m rendezvous` is not available; measuring the C servers only")
    failed = False
    if args.self_check and not self_check(args):
        print("FAILED: the load generator did not notice a faulty server")
        return 1
    configs = [k for k in (args.keys, args.small_keys) if k > 0]
    for keys in configs:
        servers = [Server("C ref", [str(OUT / "ref_server"), HOST, "{port}"])]
        if have_ours:
            max_peers = max(1_000_000, 2 * (keys + args.sockets))
            servers.append(Server("ours", [sys.executable, "-m", "rendezvous", "--listen", HOST,
                                           "--port", "{port}", "--rate", "0",
                                           "--max-peers", str(max_peers),
                                           "--stats-interval", "0", *args.ours_arg],
                                  env=env))
        if have_ours and args.baseline:
            base = str(Path(args.baseline).resolve())
            base_env = dict(env, PYTHONPATH=os.pathsep.join(
                filter(None, [base, os.environ.get("PYTHONPATH")])))
            servers.append(Server("baseline", [*servers[1].argv], env=base_env, cwd=base))
        if not args.no_headroom:
            servers.append(Server("C mmsg", [str(OUT / "ref_server"), HOST, "{port}",
                                             "--mmsg", "64"]))
        rounds: dict[str, list[Result]] = {s.name: [] for s in servers}
        try:
            for s in servers:
                s.start()
            for i in range(args.rounds):
                # Rotate the order every round: whichever server runs right after another
                # inherits its warm (or thrashed) caches and the kernel's state, so a
                # fixed order favours one position.
                k = i % len(servers)
                for s in servers[k:] + servers[:k]:
                    res = run_load(s, args, keys)
                    rounds[s.name].append(res)
                    print(f"  round {i + 1} {s.name:6} {keys:>7} keys: {res.reqps:>10,.0f} req/s"
                          f"  p50 {res.data.get('p50_us', 0):>6.0f} us  p99 "
                          f"{res.data.get('p99_us', 0):>6.0f} us  lost {res.lost}  wrong "
                          f"{res.wrong}{'  ERROR ' + res.error if res.error else ''}",
                          flush=True)
        except BenchError as e:
            print(f"error: {e}")
            failed = True
        finally:
            for s in servers:
                s.stop()
        lines, _ = report(keys, {k: v for k, v in rounds.items() if v})
        print()
        print("\n".join(lines))
        print()
        failed = failed or any(r.failed for v in rounds.values() for r in v)
    if failed:
        print("FAILED: some replies were lost or wrong, or a run failed (see above)")
    return 1 if failed else 0


def run_in_netns(argv: list[str]) -> int:
    name = f"wgpb{os.getpid()}-bench-{secrets.token_hex(2)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"],
                       check=True)
        print(f"running inside the throwaway network namespace {name}", flush=True)
        cmd = ["ip", "netns", "exec", name, sys.executable, str(Path(__file__).resolve()),
               *argv, "--inside"]
        p = subprocess.Popen(cmd)
        try:
            return p.wait()
        except KeyboardInterrupt:
            p.send_signal(signal.SIGINT)
            p.wait()
            return 130
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--keys", type=int, default=60_000, help="registered keys (default 60000)")
    p.add_argument("--small-keys", type=int, default=1_000,
                   help="second configuration's key count; 0 skips it (default 1000)")
    p.add_argument("--seconds", type=float, default=5.0, help="per run (default 5)")
    p.add_argument("--warmup", type=float, default=0.5,
                   help="not measured at the start of each run (default 0.5)")
    p.add_argument("--rounds", type=int, default=3,
                   help="alternating rounds per server; the median is reported (default 3)")
    p.add_argument("--sockets", type=int, default=128,
                   help="load generator source ports (default 128)")
    p.add_argument("--window", type=int, default=4,
                   help="requests in flight per source port (default 4)")
    p.add_argument("--timeout", type=float, default=2.0,
                   help="a request unanswered this long is lost (default 2)")
    p.add_argument("--unknown-pct", type=int, default=0,
                   help="percent of lookups for never-registered keys (default 0)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--no-ours", action="store_true", help="measure the C servers only")
    p.add_argument("--no-headroom", action="store_true",
                   help="skip the batched C server (the load generator's headroom)")
    p.add_argument("--ours-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for our server, e.g. --ours-arg=--io=plain")
    p.add_argument("--baseline", metavar="DIR",
                   help="also run `python -m rendezvous` from the source tree DIR (e.g. a "
                        "git worktree of the previous commit) and compare ours against it")
    p.add_argument("--smoke", action="store_true",
                   help="quick check: --self-check, then 2 s runs, 1 round, 60000 keys only")
    p.add_argument("--self-check", action="store_true",
                   help="first show that lost and wrong replies are detected (C servers "
                        "that drop or damage every 1000th reply)")
    p.add_argument("--no-netns", action="store_true",
                   help="use the host's loopback instead of a throwaway namespace")
    p.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.smoke:
        args.seconds, args.rounds, args.warmup, args.small_keys = 2.0, 1, 0.5, 0
        args.self_check = True
    try:
        if not args.inside:
            build()
        if args.inside or args.no_netns:
            return run_configs(args)
        if os.geteuid() != 0 or not shutil.which("ip"):
            print("network namespaces need root and iproute2; rerun as root or pass "
                  "--no-netns", file=sys.stderr)
            return 2
        return run_in_netns(argv)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
