#!/usr/bin/env python3
"""Time-to-tunnel through the netns lab: run `netns_lab.sh demo` N times per NAT pair.

Each run builds a fresh lab, starts wg-rendezvous and then wg-punch on Alice and Bob, and
measures the time from the second client's start to the first WireGuard handshake (see
netns_lab.sh). This prints, per NAT pair, how many runs formed a tunnel and the median and
90th percentile of that time. Needs root, like the lab.

    sudo scripts/lab_bench.py -n 10
    sudo scripts/lab_bench.py -n 5 --pair cone/cone --pair symmetric/cone --timeout 8
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

__all__ = ["Run", "Row", "main", "parse_result", "percentile"]

SCRIPT = Path(__file__).resolve().with_name("netns_lab.sh")
DEFAULT_PAIRS = ("cone/cone", "fullcone/cone", "fullcone/fullcone", "symmetric/cone")
RESULT = re.compile(r"^RESULT (.*)$", re.MULTILINE)


@dataclass(frozen=True)
class Run:
    ok: bool
    ttt_ms: int | None  # None when no handshake came
    wg: str


@dataclass
class Row:
    pair: str
    runs: list[Run] = field(default_factory=list)
    errors: int = 0  # demo crashed before printing a RESULT line


def parse_result(stdout: str) -> Run | None:
    """The demo's last line: ``RESULT nat_a=.. nat_b=.. wg=.. ok=1 ttt_ms=812 ...``."""
    m = RESULT.search(stdout)
    if not m:
        return None
    kv = dict(item.split("=", 1) for item in m.group(1).split())
    ttt = int(kv.get("ttt_ms", "-1"))
    return Run(ok=kv.get("ok") == "1", ttt_ms=ttt if ttt >= 0 else None, wg=kv.get("wg", "?"))


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def run_demo(pair: str, timeout: float, index: int) -> tuple[Run | None, str]:
    nat_a, nat_b = pair.split("/")
    env = dict(os.environ, LAB_TIMEOUT=str(int(timeout)),
               LAB_PREFIX=f"wgplb{os.getpid()}-{index}")
    env.setdefault("PYTHON", sys.executable)
    r = subprocess.run(["bash", str(SCRIPT), "demo", "--nat-a", nat_a, "--nat-b", nat_b],
                       capture_output=True, text=True, env=env, timeout=timeout + 120)
    return parse_result(r.stdout), r.stdout + r.stderr


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v / 1000:.3f}"


def table(rows: Sequence[Row]) -> str:
    head = (f"{'NAT A/NAT B':<20} {'tunnels':>9} {'median s':>9} {'p90 s':>8} "
            f"{'min s':>7} {'max s':>7}  wg")
    lines = [head, "-" * len(head)]
    for row in rows:
        times = [r.ttt_ms for r in row.runs if r.ok and r.ttt_ms is not None]
        total = len(row.runs) + row.errors
        ok = sum(r.ok for r in row.runs)
        wg = ",".join(sorted({r.wg for r in row.runs})) or "?"
        med, p90, lo, hi = ((statistics.median(times), percentile(times, 90), min(times),
                             max(times)) if times else (None, None, None, None))
        lines.append(f"{row.pair:<20} {f'{ok}/{total}':>9} {_ms(med):>9} {_ms(p90):>8} "
                     f"{_ms(lo):>7} {_ms(hi):>7}  {wg}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--runs", type=int, default=5, help="demo runs per NAT pair (default 5)")
    p.add_argument("--pair", action="append", metavar="A/B",
                   help=f"NAT modes of A and B (repeatable; default: {' '.join(DEFAULT_PAIRS)})")
    p.add_argument("--timeout", type=float, default=10,
                   help="seconds each run waits for the tunnel (default 10)")
    p.add_argument("-v", "--verbose", action="store_true", help="print each run's result")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        p.error("needs root (the lab builds network namespaces)")
    modes = {"cone", "fullcone", "symmetric"}
    pairs = args.pair or list(DEFAULT_PAIRS)
    for pair in pairs:
        if pair.count("/") != 1 or not set(pair.split("/")) <= modes:
            p.error(f"bad pair {pair!r}: want A/B with A, B in {sorted(modes)}")
    rows = []
    index = 0
    for pair in pairs:
        row = Row(pair)
        for i in range(args.runs):
            index += 1
            run, out = run_demo(pair, args.timeout, index)
            if run is None:
                row.errors += 1
                print(f"{pair} run {i + 1}: the demo failed before measuring:\n{out[-2000:]}",
                      file=sys.stderr)
                continue
            row.runs.append(run)
            if args.verbose:
                print(f"{pair} run {i + 1}: ok={int(run.ok)} time={_ms(run.ttt_ms)} s",
                      file=sys.stderr)
        rows.append(row)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
