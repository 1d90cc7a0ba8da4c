"""The pure parts of scripts/lab_bench.py: reading the demo's RESULT line and the table."""

from __future__ import annotations

import importlib.util
import sys

from tests.nstools import REPO

_spec = importlib.util.spec_from_file_location("lab_bench", REPO / "scripts" / "lab_bench.py")
assert _spec and _spec.loader
bench = importlib.util.module_from_spec(_spec)
sys.modules["lab_bench"] = bench  # dataclasses look their module up here
_spec.loader.exec_module(bench)


def test_parse_result_reads_the_demo_summary_line() -> None:
    out = ("ping through the tunnel works both ways\n"
           "RESULT nat_a=cone nat_b=cone wg=userspace ok=1 ttt_ms=812 punch_alice=0 punch_bob=0\n")
    assert bench.parse_result(out) == bench.Run(ok=True, ttt_ms=812, wg="userspace")


def test_parse_result_reads_protocol_and_phases() -> None:
    out = ("RESULT nat_a=cone nat_b=cone wg=userspace ok=1 ttt_ms=280 punch_alice=0 punch_bob=0 "
           "proto=v2 ipv6=0 bob_ask_ms=150 bob_set_ms=260 alice_set_ms=-1\n")
    assert bench.parse_result(out) == bench.Run(
        ok=True, ttt_ms=280, wg="userspace", proto="v2",
        phases=(("bob_ask", 150), ("bob_set", 260)))  # -1: not in the log


def test_parse_result_of_a_failed_run_has_no_time() -> None:
    out = "RESULT nat_a=symmetric nat_b=cone wg=kernel ok=0 ttt_ms=-1 punch_alice=0 punch_bob=0"
    assert bench.parse_result(out) == bench.Run(ok=False, ttt_ms=None, wg="kernel")


def test_parse_result_without_a_result_line() -> None:
    assert bench.parse_result("netns_lab: needs root\n") is None


def test_percentile_is_nearest_rank() -> None:
    values = list(range(1, 11))
    assert bench.percentile(values, 50) == 5
    assert bench.percentile(values, 90) == 9
    assert bench.percentile(values, 100) == 10
    assert bench.percentile([7], 90) == 7


def test_table_counts_tunnels_and_summarises_times() -> None:
    ok = bench.Row("cone/cone", [bench.Run(True, t, "userspace", phases=(("bob_ask", t // 10),))
                                 for t in (1000, 3000, 2000)])
    bad = bench.Row("symmetric/cone", [bench.Run(False, None, "userspace")], errors=1)
    v2 = bench.Row("cone/cone", [bench.Run(True, 250, "userspace", "v2")], proto="v2")
    lines = bench.table([ok, bad, v2]).splitlines()
    assert lines[2].split() == ["cone/cone", "classic", "3/3", "2.000", "3.000", "1.000", "3.000",
                                "0.200", "-", "-", "userspace"]
    assert lines[3].split() == ["symmetric/cone", "classic", "0/2", "-", "-", "-", "-",
                                "-", "-", "-", "userspace"]
    assert lines[4].split() == ["cone/cone", "v2", "1/1", "0.250", "0.250", "0.250", "0.250",
                                "-", "-", "-", "userspace"]
