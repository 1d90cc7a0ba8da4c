"""scripts/connectivity_grid.py: its pure parts (the demo's RESULT line, the
classification, the report) without the lab, then the script itself on two pairs of
the real lab, its verdicts checked against the endpoints WireGuard actually had."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys

import pytest

from tests.lab.lablib import RUN_PREFIX, SCRIPT, leftovers, script_env
from tests.nstools import REPO, is_root

_spec = importlib.util.spec_from_file_location(
    "connectivity_grid", REPO / "scripts" / "connectivity_grid.py")
assert _spec and _spec.loader
grid = importlib.util.module_from_spec(_spec)
sys.modules["connectivity_grid"] = grid  # dataclasses look their module up here
_spec.loader.exec_module(grid)

GRID = str(REPO / "scripts" / "connectivity_grid.py")
RELAY = grid.RELAY_PORT
BASE = ("RESULT nat_a={a} nat_b={b} wg=userspace ok={ok} ttt_ms={ttt} punch_alice=0 "
        "punch_bob=0 proto=v2 ipv6={v6} bob_ask_ms=150 bob_set_ms=260 alice_set_ms=270 "
        "alice_endpoint={ae} bob_endpoint={be} pub_a={pa} pub_b={pb} server={srv}")


def _line(a: str = "cone", b: str = "cone", ok: int = 1, ttt: int = 420, v6: int = 0,
          ae: str = "192.0.2.2:51820", be: str = "203.0.113.2:51820",
          pa: str = "203.0.113.2", pb: str = "192.0.2.2", srv: str = "198.51.100.2") -> str:
    return "ping through the tunnel works both ways\n" + BASE.format(
        a=a, b=b, ok=ok, ttt=ttt, v6=v6, ae=ae, be=be, pa=pa, pb=pb, srv=srv) + "\n"


def test_direct_run_is_each_side_at_the_others_public_address() -> None:
    run = grid.parse_run(_line(), RELAY)
    assert run == grid.GridRun(grid.Pair("cone", "cone"), "direct", 420, "192.0.2.2:51820",
                               "203.0.113.2:51820", "userspace")


def test_direct_through_a_symmetric_nat_has_any_public_port() -> None:
    run = grid.parse_run(_line("symmetric", "cone", ae="192.0.2.2:51820",
                               be="203.0.113.2:40117"), RELAY)
    assert run.outcome == "direct"


def test_relayed_run_is_both_sides_at_the_relay() -> None:
    ep = f"198.51.100.2:{RELAY}"
    run = grid.parse_run(_line("symmetric", "symmetric", ttt=5490, ae=ep, be=ep), RELAY)
    assert (run.outcome, run.ttt_ms) == ("relayed", 5490)


def test_the_servers_address_on_another_port_is_not_the_relay() -> None:
    ep = "198.51.100.2:49918"  # the rendezvous port
    assert grid.parse_run(_line(ae=ep, be=ep), RELAY).outcome == "mixed"


def test_one_side_direct_the_other_relayed_is_mixed() -> None:
    run = grid.parse_run(_line(be=f"198.51.100.2:{RELAY}"), RELAY)
    assert run.outcome == "mixed"


def test_no_handshake_or_no_ping_is_failed() -> None:
    none = grid.parse_run(_line(ok=0, ttt=-1, ae="(none)", be="(none)"), RELAY)
    assert (none.outcome, none.ttt_ms) == ("failed", None)
    # a handshake, but the ping through the tunnel failed (the demo's ok=0)
    assert grid.parse_run(_line(ok=0, ttt=900), RELAY).outcome == "failed"


def test_fw6_direct_is_the_hosts_own_ipv6_address() -> None:
    out = _line("fw6", "fw6", v6=1, ae="[2001:db8:b::2]:51820", be="[2001:db8:a::2]:51820",
                pa="2001:db8:a::2", pb="2001:db8:b::2", srv="2001:db8:5::2")
    assert grid.parse_run(out, RELAY).outcome == "direct"
    relay = f"[2001:db8:5::2]:{RELAY}"
    out = _line("fw6", "fw6", v6=1, ae=relay, be=relay, pa="2001:db8:a::2",
                pb="2001:db8:b::2", srv="198.51.100.2,2001:db8:5::2")
    assert grid.parse_run(out, RELAY).outcome == "relayed"


SAME_LAN = {"a": "lan", "b": "lan", "pa": "203.0.113.2", "pb": "203.0.113.2"}


def test_same_lan_direct_is_exactly_the_others_public_mapping() -> None:
    mapped = " mapped_a=203.0.113.2:51820 mapped_b=203.0.113.2:23124"
    line = _line(ae="203.0.113.2:23124", be="203.0.113.2:51820", **SAME_LAN).rstrip()
    assert grid.parse_run(line + mapped, RELAY).outcome == "direct"
    # the router's address, but not the other's mapping (e.g. one's own, or a stale port)
    for ae, be in (("203.0.113.2:51820", "203.0.113.2:23124"),
                   ("203.0.113.2:23124", "203.0.113.2:40000")):
        line = _line(ae=ae, be=be, **SAME_LAN).rstrip()
        assert grid.parse_run(line + mapped, RELAY).outcome == "mixed", (ae, be)
    # a host's LAN address is no public mapping either
    line = _line(ae="192.168.1.3:51820", be="192.168.1.2:51820", **SAME_LAN).rstrip()
    assert grid.parse_run(line + mapped, RELAY).outcome == "mixed"
    ep = f"198.51.100.2:{RELAY}"
    line = _line("lan-nohairpin", "lan-nohairpin", ttt=5800, ae=ep, be=ep, pa="203.0.113.2",
                 pb="203.0.113.2").rstrip()
    run = grid.parse_run(line + mapped, RELAY)
    assert (run.pair, run.outcome) == (grid.Pair("lan-nohairpin", "lan-nohairpin"), "relayed")
    # the router knew no mapping for a host: nothing can be direct
    line = _line(ae="203.0.113.2:23124", be="203.0.113.2:51820", **SAME_LAN).rstrip()
    assert grid.parse_run(line + " mapped_a=none mapped_b=203.0.113.2:51820",
                          RELAY).outcome == "mixed"


def test_split_endpoint() -> None:
    assert grid.split_endpoint("192.0.2.2:51820") == ("192.0.2.2", 51820)
    assert grid.split_endpoint("[2001:db8::2]:9") == ("2001:db8::2", 9)
    assert grid.split_endpoint("(none)") is None
    assert grid.split_endpoint(":51820") is None


def test_parse_run_errors_say_what_is_missing() -> None:
    with pytest.raises(grid.ResultLineError, match="no RESULT line"):
        grid.parse_run("netns_lab: needs root\n", RELAY)
    old = "RESULT nat_a=cone nat_b=cone wg=userspace ok=1 ttt_ms=812 punch_alice=0 punch_bob=0"
    with pytest.raises(grid.ResultLineError, match="alice_endpoint, bob_endpoint"):
        grid.parse_run(old, RELAY)
    with pytest.raises(grid.ResultLineError, match="ttt_ms='soon'"):
        grid.parse_run(_line().replace("ttt_ms=420", "ttt_ms=soon"), RELAY)


def test_parse_pair_and_default_pairs() -> None:
    assert grid.parse_pair("symmetric/cone") == grid.Pair("symmetric", "cone")
    assert grid.parse_pair("lan/lan") == grid.Pair("lan", "lan")
    for bad in ("cone", "cone/nat", "fw6/cone", "a/b/c", "lan/cone", "lan/lan-nohairpin"):
        with pytest.raises(ValueError, match=re.escape(repr(bad))):
            grid.parse_pair(bad)
    pairs = [str(p) for p in grid.default_pairs()]
    assert pairs == ["cone/cone", "cone/fullcone", "cone/symmetric", "fullcone/fullcone",
                     "fullcone/symmetric", "symmetric/symmetric",
                     "cone/udpblock", "symmetric/udpblock", "udpblock/udpblock",
                     "cone/double", "symmetric/double", "double/double", "fw6/fw6",
                     "lan/lan", "lan-nohairpin/lan-nohairpin"]


def test_report_counts_outcomes_and_medians_per_pair() -> None:
    cc, ss = grid.Pair("cone", "cone"), grid.Pair("symmetric", "symmetric")
    ep = f"198.51.100.2:{RELAY}"
    runs = {
        cc: [grid.GridRun(cc, "direct", t, "x:1", "y:2", "userspace") for t in (400, 600, 500)],
        ss: [grid.GridRun(ss, "relayed", 5000, ep, ep, "userspace"),
             grid.GridRun(ss, "failed", None, "(none)", "(none)", "userspace")],
    }
    text = grid.report(runs, {cc: 0, ss: 1}, when="2026-12-01 22:00 UTC", machine="box",
                       command="scripts/connectivity_grid.py -n 3", timeout=20, relay_after=3)
    rows = [line for line in text.splitlines() if line.startswith(("| cone | cone | 3",
                                                                  "| symmetric | symmetric | 3"))]
    assert rows == ["| cone | cone | 3 | 3 | 0 | 0 | 0 | 0.50 | - |",
                    "| symmetric | symmetric | 3 | 0 | 1 | 1 | 0 | - | 5.00 |"]
    assert "- date: 2026-12-01 22:00 UTC" in text and "- machine: box" in text
    assert "`scripts/connectivity_grid.py -n 3`" in text
    assert "crashed before measuring" in text and "symmetric/symmetric 1" in text
    assert f"| symmetric | symmetric | relayed | 5.00 | `{ep}` | `{ep}` | userspace |" in text


def _report(runs: dict, errors: dict | None = None, when: str = "2026-12-01 22:00 UTC",
            command: str = "scripts/connectivity_grid.py -n 3") -> str:
    return grid.report(runs, errors or {}, when=when, machine="box", command=command,
                       timeout=20, relay_after=3)


def test_merge_replaces_and_adds_only_the_rows_of_the_pairs_run_now() -> None:
    cc, ss, ll = grid.Pair("cone", "cone"), grid.Pair("symmetric", "symmetric"), \
        grid.Pair("lan", "lan")
    ep = f"198.51.100.2:{RELAY}"
    old = _report({
        cc: [grid.GridRun(cc, "direct", 300, "a:1", "b:2", "userspace")],
        ss: [grid.GridRun(ss, "relayed", 320, ep, ep, "userspace")],
    })
    new_ss = [grid.GridRun(ss, "failed", None, "(none)", "(none)", "userspace")]
    new_ll = [grid.GridRun(ll, "direct", t, "203.0.113.2:9", "203.0.113.2:51820", "userspace")
              for t in (600, 700)]
    new = _report({ss: new_ss, ll: new_ll}, {ss: 1}, when="2026-12-02 00:30 UTC",
                  command="scripts/connectivity_grid.py --pair symmetric/symmetric --merge")
    note = grid.merge_note([ss, ll], {ss: 1}, when="2026-12-02 00:30 UTC", machine="box2",
                           command="scripts/connectivity_grid.py --merge")
    text = grid.merge(old, new, note)
    rows = [line for line in text.splitlines() if line.startswith("| ") and "NAT A" not in line]
    assert rows == [
        "| cone | cone | 1 | 1 | 0 | 0 | 0 | 0.30 | - |",  # kept as it was
        "| symmetric | symmetric | 2 | 0 | 0 | 1 | 0 | - | - |",  # replaced
        "| lan | lan | 2 | 2 | 0 | 0 | 0 | 0.65 | - |",  # added
        "| cone | cone | direct | 0.30 | `a:1` | `b:2` | userspace |",
        "| symmetric | symmetric | failed | - | `(none)` | `(none)` | userspace |",
        "| lan | lan | direct | 0.60 | `203.0.113.2:9` | `203.0.113.2:51820` | userspace |",
        "| lan | lan | direct | 0.70 | `203.0.113.2:9` | `203.0.113.2:51820` | userspace |",
    ]
    # the old run's provenance stays, the note says where the merged rows came from
    assert "- date: 2026-12-01 22:00 UTC" in text and "- date: 2026-12-02" not in text
    assert ("- rows symmetric/symmetric, lan/lan: measured 2026-12-02 00:30 UTC with "
            "`scripts/connectivity_grid.py --merge` (box2)") in text
    assert "crashed before measuring (counted in runs, in no outcome): symmetric/symmetric 1" in text
    assert text.index("- rows symmetric") > text.index("- each run:")
    assert text.index("- rows symmetric") < text.index("Outcome of a run")
    # merging the same pairs again replaces that note instead of piling up another
    again = grid.merge(text, new, note.replace("00:30", "00:45"))
    assert again.count("- rows symmetric/symmetric, lan/lan") == 1 and "00:45" in again
    assert again.count("| lan | lan | 2 |") == 1
    with pytest.raises(grid.MergeError, match="no table"):
        grid.merge("# notes\n\nnothing here\n", new, note)


def _plan(name: str) -> str:
    """An address of the lab's fixed plan, as netns_lab.sh defines it."""
    m = re.search(rf"\b{name}=(\S+)", SCRIPT.read_text())
    assert m, name
    return m.group(1)


def _lab_prefix(name: str) -> str:
    """A lab prefix for a real grid run, or skip: not root, or the lab's tools missing."""
    if not is_root():
        pytest.skip("needs root")
    prefix = RUN_PREFIX + name
    check = subprocess.run(["bash", str(SCRIPT), "check"], check=False, capture_output=True,
                           text=True, env=script_env(prefix + "chk"), timeout=60)
    if check.returncode:
        pytest.skip(check.stderr.strip() or "lab tools missing")
    return prefix


@pytest.mark.lab
def test_grid_classifies_real_runs_by_their_endpoints(tmp_path) -> None:
    prefix = _lab_prefix("grid")
    md, js = tmp_path / "grid.md", tmp_path / "grid.json"
    r = subprocess.run([sys.executable, GRID, "-n", "1", "--pair", "cone/cone",
                        "--pair", "symmetric/symmetric", "--timeout", "20", "--output", str(md),
                        "--json", str(js), "--prefix", prefix],
                       check=False, capture_output=True, text=True, env=script_env(prefix),
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not leftovers(prefix), leftovers(prefix)
    runs = {run["pair"]: run for run in json.loads(js.read_text())}
    assert set(runs) == {"cone/cone", "symmetric/symmetric"}, r.stderr[-3000:]
    pub_a, pub_b, srv = _plan("PUB_A"), _plan("PUB_B"), _plan("SRV_ADDR")
    # cone NATs keep WireGuard's port: each side ends at the other's public address
    cone = runs["cone/cone"]
    assert cone["alice_endpoint"] == f"{pub_b}:51820", cone
    assert cone["bob_endpoint"] == f"{pub_a}:51820", cone
    assert cone["outcome"] == "direct" and cone["ttt_ms"] is not None, cone
    # two symmetric NATs: no direct path, both ends at the relay
    sym = runs["symmetric/symmetric"]
    assert sym["alice_endpoint"] == sym["bob_endpoint"] == f"{srv}:{RELAY}", sym
    assert sym["outcome"] == "relayed" and sym["ttt_ms"] is not None, sym
    text = md.read_text()
    assert "| cone | cone | 1 | 1 | 0 | 0 | 0 |" in text, text
    assert "| symmetric | symmetric | 1 | 0 | 1 | 0 | 0 |" in text, text


@pytest.mark.lab
def test_grid_merges_a_real_same_lan_run_into_a_report(tmp_path) -> None:
    """One lan/lan run merged into a copy of the committed report: it is direct, each side
    at the other's public mapping on the one router, and every other row is untouched."""
    prefix = _lab_prefix("gridlan")
    committed = (REPO / "docs" / "CONNECTIVITY.md").read_text()
    md, js = tmp_path / "grid.md", tmp_path / "grid.json"
    md.write_text(committed)
    # --relay-after 10, not the grid's 3: this test is about the merge and the hairpin,
    # and on a loaded CI machine the hairpin handshake once took longer than 3 s.
    r = subprocess.run([sys.executable, GRID, "-n", "1", "--pair", "lan/lan", "--merge",
                        "--relay-after", "10", "--output", str(md), "--json", str(js),
                        "--prefix", prefix],
                       check=False, capture_output=True, text=True, env=script_env(prefix),
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not leftovers(prefix), leftovers(prefix)
    (run,) = json.loads(js.read_text())
    pub = _plan("PUB_A")
    assert run["outcome"] == "direct", run
    assert run["alice_endpoint"].startswith(pub + ":"), run
    assert run["bob_endpoint"].startswith(pub + ":"), run
    assert run["alice_endpoint"] != run["bob_endpoint"], run  # two mappings, one router
    text = md.read_text()
    assert "| lan | lan | 1 | 1 | 0 | 0 | 0 |" in text, text
    assert "- rows lan/lan: measured " in text, text
    old_rows = [line for line in committed.splitlines()
                if line.startswith("| ") and not line.startswith("| lan |")]
    new_rows = [line for line in text.splitlines()
                if line.startswith("| ") and not line.startswith("| lan |")]
    assert new_rows == old_rows
