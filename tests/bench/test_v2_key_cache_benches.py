"""The figures behind the v2 key cache's documented costs can be reproduced: the memory
benchmark measures the cache (bench/registry_memory.py --what v2keys) and the crypto
benchmark prints the cost of each of its levels; bench/v2_cost.py the cost of a whole v2
request. Figures are printed, not asserted."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.nstools import py_env

REPO = Path(__file__).resolve().parents[2]


def test_memory_of_the_v2_key_cache_is_measured() -> None:
    r = subprocess.run([sys.executable, str(REPO / "bench" / "registry_memory.py"), "--what",
                        "v2keys", "--peers", "2000"], check=False, capture_output=True, text=True,
                       timeout=300, cwd=REPO, env=py_env())
    assert r.returncode == 0, r.stderr
    row = re.search(r"^\s+2,000\s+([\d.]+)\s", r.stdout, re.MULTILINE)
    assert row and float(row.group(1)) > 0, r.stdout


def test_crypto_bench_prints_each_level_of_the_cache() -> None:
    r = subprocess.run([sys.executable, "-m", "tests.rendezvous.v2.bench_crypto", "-n", "200"],
                       check=False, capture_output=True, text=True, timeout=300, cwd=REPO, env=py_env())
    assert r.returncode == 0, r.stderr
    for what in ("cached key", "kept key", "fresh key"):
        assert re.search(rf"open_request, {what}:\s+[\d.]+ us", r.stdout), r.stdout


def test_v2_request_cost_is_printed_for_each_case() -> None:
    r = subprocess.run([sys.executable, str(REPO / "bench" / "v2_cost.py"), "--clients", "20",
                        "--requests", "100"], check=False, capture_output=True, text=True,
                       timeout=300, cwd=REPO, env=py_env())
    assert r.returncode == 0, r.stderr
    for case in ("known clients", "key derived"):
        assert re.search(rf"^\s+20\s+{case}\s+[\d.]+\s+[\d,]+$", r.stdout, re.MULTILINE), r.stdout
