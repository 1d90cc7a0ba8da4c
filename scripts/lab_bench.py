#!/usr/bin/env python3
"""Time-to-tunnel through the netns lab: run `netns_lab.sh demo` N times per NAT pair.

Each run builds a fresh lab, starts wg-rendezvous and then wg-punch on Alice and Bob, and
measures the time from the second client's (Bob's) start to the first WireGuard handshake
(see netns_lab.sh). This prints, per NAT pair and protocol, how many runs formed a tunnel
and the median and 90th percentile of that time, and where the time went (medians, from
the clients' logs): Bob's first request on the wire (start-up), Bob's endpoint set (his
answer), Alice's endpoint set (her poll, or with v2 the server's notify). Needs root,
like the lab.

    sudo scripts/lab_bench.py -n 10
    sudo scripts/lab_bench.py -n 5 --pair cone/cone --pair symmetric/cone --timeout 8
    sudo scripts/lab_bench.py -n 6 --pair cone/cone --compare     # classic and v2, one run
    sudo scripts/lab_bench.py -n 6 --pair fw6/fw6 --v2            # v2 over IPv6 firewalls
    sudo scripts/lab_bench.py -n 6 --pair cone/cone --compare --stagger 1
                                         # Bob 1 s after Alice's first request: she waits

With --compare the two protocols alternate run by run (classic first on odd runs, v2
first on even ones), so both see the same machine load.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Run", "Row", "main", "parse_result", "percentile", "table"]

SCRIPT = Path(__file__).resolve().with_name("netns_lab.sh")
DEFAULT_PAIRS = ("cone/cone", "fullcone/cone", "fullcone/fullcone", "symmetric/cone")
MODES = ("cone", "fullcone", "symmetric", "fw6")
PROTOCOLS = ("classic", "v2")
RESULT = re.compile(r"^RESULT (.*)$", re.MULTILINE)


@dataclass(frozen=True)
class Run:
    ok: bool
    ttt_ms: int | None  # None when no handshake came
    wg: str
    proto: str = "classic"
    phases: tuple[tuple[str, int], ...] = ()  # ("bob_ask", ms), ... when the demo knew them


@dataclass
class Row:
    pair: str
    runs: list[Run] = field(default_factory=list)
    errors: int = 0  # demo crashed before printing a RESULT line
    proto: str = "classic"


PHASES = (("bob_ask", "req s"), ("bob_set", "B set s"), ("alice_set", "A set s"))


def parse_result(stdout: str) -> Run | None:
    """The demo's last line: ``RESULT nat_a=.. nat_b=.. wg=.. ok=1 ttt_ms=812 ...``."""
    m = RESULT.search(stdout)
    if not m:
        return None
    kv = dict(item.split("=", 1) for item in m.group(1).split())
    ttt = int(kv.get("ttt_ms", "-1"))
    phases = tuple((name, int(kv[f"{name}_ms"])) for name, _ in PHASES
                   if int(kv.get(f"{name}_ms", "-1")) >= 0)
    return Run(ok=kv.get("ok") == "1", ttt_ms=ttt if ttt >= 0 else None, wg=kv.get("wg", "?"),
               proto=kv.get("proto", "classic"), phases=phases)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def run_demo(pair: str, timeout: float, index: int, proto: str = "classic",
             ipv6: bool = False, stagger: float | None = None) -> tuple[Run | None, str]:
    nat_a, nat_b = pair.split("/")
    env = dict(os.environ, LAB_TIMEOUT=str(int(timeout)),
               LAB_PREFIX=f"wgplb{os.getpid()}-{index}")
    env.setdefault("PYTHON", sys.executable)
    argv = ["bash", str(SCRIPT), "demo", "--nat-a", nat_a, "--nat-b", nat_b]
    argv += ["--v2"] if proto == "v2" else []
    argv += ["--ipv6"] if ipv6 else []
    argv += ["--stagger", f"{stagger:g}"] if stagger is not None else []
    r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout + 120)
    return parse_result(r.stdout), r.stdout + r.stderr


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v / 1000:.3f}"


def table(rows: Sequence[Row]) -> str:
    head = (f"{'NAT A/NAT B':<20} {'proto':<7} {'tunnels':>7} {'median s':>8} {'p90 s':>6} "
            f"{'min s':>6} {'max s':>6}  " + " ".join(f"{h:>7}" for _, h in PHASES) + "  wg")
    lines = [head, "-" * len(head)]
    for row in rows:
        good = [r for r in row.runs if r.ok and r.ttt_ms is not None]
        times = [r.ttt_ms for r in good if r.ttt_ms is not None]
        total = len(row.runs) + row.errors
        wg = ",".join(sorted({r.wg for r in row.runs})) or "?"
        med, p90, lo, hi = ((statistics.median(times), percentile(times, 90), min(times),
                             max(times)) if times else (None, None, None, None))
        phase_cols = []
        for name, _ in PHASES:
            vals = [dict(r.phases)[name] for r in good if name in dict(r.phases)]
            phase_cols.append(f"{_ms(statistics.median(vals) if vals else None):>7}")
        lines.append(f"{row.pair:<20} {row.proto:<7} {f'{len(good)}/{total}':>7} "
                     f"{_ms(med):>8} {_ms(p90):>6} {_ms(lo):>6} {_ms(hi):>6}  "
                     + " ".join(phase_cols) + f"  {wg}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--runs", type=int, default=5, help="demo runs per NAT pair (default 5)")
    p.add_argument("--pair", action="append", metavar="A/B",
                   help=f"NAT modes of A and B (repeatable; default: {' '.join(DEFAULT_PAIRS)})")
    p.add_argument("--timeout", type=float, default=10,
                   help="seconds each run waits for the tunnel (default 10)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--v2", action="store_true",
                     help="protocol v2 (wg-rendezvous --key --require-auth, wg-punch --server-key)")
    how.add_argument("--compare", action="store_true",
                     help="classic and v2 side by side, alternating run by run")
    p.add_argument("--ipv6", action="store_true",
                   help="dual-stack labs (netns_lab.sh --ipv6; fw6 pairs have IPv6 anyway)")
    p.add_argument("--stagger", type=float, metavar="S",
                   help="start Bob S seconds after Alice's first request is out (default: "
                        "both at once); Alice is then already waiting, as the coordinated "
                        "punch assumes")
    p.add_argument("-v", "--verbose", action="store_true", help="print each run's result")
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error("-n must be at least 1")
    if args.stagger is not None and args.stagger < 0:
        p.error("--stagger must be >= 0")
    if os.geteuid() != 0:
        p.error("needs root (the lab builds network namespaces)")
    if os.environ.get("PYTHONDONTWRITEBYTECODE"):
        # Installed programs start from compiled bytecode; with this set, every start
        # of wg-punch recompiles its modules first (measured: ~0.1 s more for v2).
        print("note: PYTHONDONTWRITEBYTECODE is set, so every client start recompiles "
              "its source; run with `env -u PYTHONDONTWRITEBYTECODE` to measure start-up "
              "as installed", file=sys.stderr)
    pairs = args.pair or list(DEFAULT_PAIRS)
    for pair in pairs:
        if pair.count("/") != 1 or not set(pair.split("/")) <= set(MODES):
            p.error(f"bad pair {pair!r}: want A/B with A, B in {list(MODES)}")
    protos = list(PROTOCOLS) if args.compare else ["v2" if args.v2 else "classic"]
    rows: list[Row] = []
    index = 0
    for pair in pairs:
        by_proto = {proto: Row(pair, proto=proto) for proto in protos}
        for i in range(args.runs):
            for proto in (protos if i % 2 == 0 else protos[::-1]):
                index += 1
                row = by_proto[proto]
                run, out = run_demo(pair, args.timeout, index, proto, args.ipv6, args.stagger)
                if run is None:
                    row.errors += 1
                    print(f"{pair} {proto} run {i + 1}: the demo failed before measuring:\n"
                          f"{out[-2000:]}", file=sys.stderr)
                    continue
                row.runs.append(run)
                if args.verbose:
                    phases = " ".join(f"{k}={_ms(v)}" for k, v in run.phases)
                    print(f"{pair} {proto} run {i + 1}: ok={int(run.ok)} "
                          f"time={_ms(run.ttt_ms)} s {phases}", file=sys.stderr)
        rows.extend(by_proto.values())
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
