"""bench/batch_cost.py runs, alone and against a baseline tree (here: this tree twice)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run(*args: str) -> str:
    r = subprocess.run([sys.executable, str(REPO / "bench" / "batch_cost.py"), "--keys",
                        "1000", "--batch", "32", "--batches", "20", "--seconds", "0.3", *args],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_alone_prints_the_cost_per_request() -> None:
    out = run()
    assert re.search(r"this tree: 1000 keys, batches of 32, .* (\d+) ns per request", out)
    assert "baseline" not in out


def test_against_a_baseline_tree_prints_both_and_the_ratio() -> None:
    out = run("--baseline", str(REPO))
    costs = [int(x) for x in re.findall(r"(\d+) ns per request", out)]
    assert len(costs) == 2 and all(c > 0 for c in costs), out
    ratio = float(re.search(r"this tree / baseline: ([\d.]+)", out).group(1))
    assert abs(ratio - costs[0] / costs[1]) < 0.05, out


def test_a_directory_without_the_package_is_a_clear_error() -> None:
    r = subprocess.run([sys.executable, str(REPO / "bench" / "batch_cost.py"), "--baseline",
                        "/nonexistent-tree", "--seconds", "0.1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "no rendezvous package in /nonexistent-tree" in r.stderr, r.stderr
