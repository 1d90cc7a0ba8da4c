#!/usr/bin/env python3
"""Which NAT pairs get a tunnel, and how: direct, through the relay, or not at all.

For each pair of the lab's NAT modes this runs `netns_lab.sh demo --v2` N times, with
everything v2 has switched on: the server answers NAT probes (--probe-port) and relays
(--relay-port); both clients run one-shot with --wait, --probe-port (via the lab's
LAB_PROBE_PORT) and a short --relay-after; a symmetric NAT maps into a port block
(LAB_SYM_PORTS), so the spray can reach it. Each run is classified from the endpoints
both WireGuard interfaces have at the end (the demo's RESULT line):

    direct   each side's endpoint is the other side's public address
             (its NAT's public address, or behind fw6 the host's own IPv6 address);
             on one LAN (lan, lan-nohairpin: both behind one router) exactly the
             other side's public mapping: the router's address and the port it maps
             the other's WireGuard port to (through the router's hairpin)
    relayed  each side's endpoint is the relay (the server's address, --relay-port)
    failed   no handshake within the timeout, or no ping through the tunnel
    mixed    a tunnel, but anything else (e.g. one side direct, the other relayed)

and timed (the demo's time from the second client's start to the first handshake). It
writes a Markdown report (docs/CONNECTIVITY.md by default): a row per pair with the
counts and median times, each run's endpoints, the date, the machine and the command.
With --merge it replaces (or adds) only the rows of the pairs it ran in an existing
report, keeps every other row as it was, and says which rows came from which run.
Needs root, like the lab.

    sudo scripts/connectivity_grid.py                  # every pair, 3 runs each
    sudo scripts/connectivity_grid.py -n 1 --pair cone/cone --output /tmp/grid.md
    sudo scripts/connectivity_grid.py -n 3 --pair lan/lan --merge   # one row, in place
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = [
    "OUTCOMES", "GridRun", "MergeError", "Pair", "ResultLineError", "classify",
    "default_pairs", "main", "merge", "merge_note", "parse_pair", "parse_run", "report",
    "split_endpoint",
]

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "netns_lab.sh"
CLASSIC_MODES = ("cone", "fullcone", "symmetric")
EXTRA_MODES = ("udpblock", "double")  # each paired with cone, symmetric and itself
SAME_LAN_MODES = ("lan", "lan-nohairpin")  # one LAN, one router: a layout, paired with itself
MODES = (*CLASSIC_MODES, *EXTRA_MODES, "fw6", *SAME_LAN_MODES)
OUTCOMES = ("direct", "relayed", "failed", "mixed")
PROBE_PORT = 49919
RELAY_PORT = 49920
SYM_PORTS = "40000-40255"


class ResultLineError(ValueError):
    """The demo's output has no usable RESULT line."""


class MergeError(ValueError):
    """The report to merge into is not one this script wrote (a table is missing)."""


@dataclass(frozen=True)
class Pair:
    nat_a: str
    nat_b: str

    def __str__(self) -> str:
        return f"{self.nat_a}/{self.nat_b}"


@dataclass(frozen=True)
class GridRun:
    pair: Pair
    outcome: str  # one of OUTCOMES
    ttt_ms: int | None  # None when no handshake came
    alice_endpoint: str  # where Alice's WireGuard sends to Bob at the end ("(none)": nowhere)
    bob_endpoint: str
    wg: str


def parse_pair(text: str) -> Pair:
    parts = text.split("/")
    if len(parts) != 2 or not set(parts) <= set(MODES):
        raise ValueError(f"pair {text!r}: want A/B with A and B in {', '.join(MODES)}")
    if ("fw6" in parts) and parts != ["fw6", "fw6"]:
        # an IPv6-only host and an IPv4-only one have no address family in common
        raise ValueError(f"pair {text!r}: fw6 pairs only with fw6 (IPv6 only on that side)")
    for mode in SAME_LAN_MODES:
        if mode in parts and parts != [mode, mode]:
            # both hosts behind the one router: the mode is the whole lab's layout
            raise ValueError(f"pair {text!r}: {mode} pairs only with itself "
                             "(both hosts on one LAN behind one router)")
    return Pair(*parts)


def default_pairs() -> list[Pair]:
    """Every unordered pair of cone, fullcone and symmetric; udpblock and double each with
    cone, symmetric and itself; then fw6/fw6, lan/lan and lan-nohairpin/lan-nohairpin."""
    pairs = [Pair(a, b) for a, b in itertools.combinations_with_replacement(CLASSIC_MODES, 2)]
    pairs += [Pair(other, mode) for mode in EXTRA_MODES for other in ("cone", "symmetric", mode)]
    return [*pairs, Pair("fw6", "fw6"), *(Pair(mode, mode) for mode in SAME_LAN_MODES)]


def split_endpoint(endpoint: str) -> tuple[str, int] | None:
    """'192.0.2.2:51820' or '[2001:db8::2]:51820' -> (host, port); None for '(none)'."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def classify(*, ok: bool, alice_endpoint: str, bob_endpoint: str, pub_a: Sequence[str],
             pub_b: Sequence[str], server: Sequence[str], relay_port: int,
             mapped_a: str | None = None, mapped_b: str | None = None) -> str:
    """One run's outcome (see the module docstring) from the final endpoints: Alice's
    endpoint (for Bob) against Bob's public addresses, and Bob's against Alice's. On one
    LAN both public addresses are the router's, so MAPPED_A / MAPPED_B (each host's
    public address:port, from the router) are given and direct means exactly those."""
    if not ok:
        return "failed"
    a, b = split_endpoint(alice_endpoint), split_endpoint(bob_endpoint)
    if a is None or b is None:
        return "mixed"
    if mapped_a is not None or mapped_b is not None:
        if (a, b) == (split_endpoint(mapped_b or ""), split_endpoint(mapped_a or "")):
            return "direct"
    elif a[0] in pub_b and b[0] in pub_a:
        return "direct"
    relay = {(host, relay_port) for host in server}
    if a in relay and b in relay:
        return "relayed"
    return "mixed"


def _addresses(value: str) -> list[str]:
    return [x for x in value.split(",") if x]


def parse_run(stdout: str, relay_port: int) -> GridRun:
    """The demo's RESULT line (``RESULT nat_a=.. ok=1 ttt_ms=.. alice_endpoint=..``), classified."""
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise ResultLineError("no RESULT line in the demo's output")
    kv: dict[str, str] = {}
    for item in lines[-1].split()[1:]:
        key, sep, value = item.partition("=")
        if not sep:
            raise ResultLineError(f"RESULT item {item!r} is not KEY=VALUE")
        kv[key] = value
    missing = [k for k in ("nat_a", "nat_b", "ok", "ttt_ms", "alice_endpoint", "bob_endpoint",
                           "pub_a", "pub_b", "server") if k not in kv]
    if missing:
        raise ResultLineError(f"RESULT line lacks {', '.join(missing)} (an older netns_lab.sh?)")
    try:
        ttt = int(kv["ttt_ms"])
    except ValueError:
        raise ResultLineError(f"RESULT ttt_ms={kv['ttt_ms']!r} is not an integer") from None
    ok = kv["ok"] == "1" and ttt >= 0
    outcome = classify(ok=ok, alice_endpoint=kv["alice_endpoint"],
                       bob_endpoint=kv["bob_endpoint"], pub_a=_addresses(kv["pub_a"]),
                       pub_b=_addresses(kv["pub_b"]), server=_addresses(kv["server"]),
                       relay_port=relay_port, mapped_a=kv.get("mapped_a"),
                       mapped_b=kv.get("mapped_b"))
    return GridRun(pair=Pair(kv["nat_a"], kv["nat_b"]), outcome=outcome,
                   ttt_ms=ttt if ttt >= 0 else None, alice_endpoint=kv["alice_endpoint"],
                   bob_endpoint=kv["bob_endpoint"], wg=kv.get("wg", "?"))


def _s(ms: float | None) -> str:
    return "-" if ms is None else f"{ms / 1000:.2f}"


def _median(runs: Sequence[GridRun], outcomes: Sequence[str]) -> float | None:
    times = [r.ttt_ms for r in runs if r.outcome in outcomes and r.ttt_ms is not None]
    return statistics.median(times) if times else None


def report(results: Mapping[Pair, Sequence[GridRun]], errors: Mapping[Pair, int], *,
           when: str, machine: str, command: str, timeout: float, relay_after: float) -> str:
    """The Markdown report: a row per pair, then each run's endpoints."""
    out = [
        "# Connectivity grid",
        "",
        "Which NAT pairs of the netns lab (`scripts/netns_lab.sh`) get a WireGuard tunnel",
        "with protocol v2 and everything switched on (NAT probes, the spray for one",
        "symmetric side, the relay fallback), and how. Written by",
        "`scripts/connectivity_grid.py`; rerun it to refresh.",
        "",
        f"- date: {when}",
        f"- machine: {machine}",
        f"- command: `{command}`",
        (f"- each run: a fresh lab, `wg-rendezvous --probe-port {PROBE_PORT} --relay-port "
        f"{RELAY_PORT}`, both clients `wg-punch --server-key .. --probe-port {PROBE_PORT} "
        f"--wait --relay-after {relay_after:g} --timeout {timeout:g}`, symmetric NATs map "
        f"into the port block {SYM_PORTS}"),
        "",
        "Outcome of a run, from the endpoints both WireGuard interfaces have at the end:",
        "**direct**: each side's endpoint is the other's public address (lan, lan-nohairpin:",
        "both hosts on one LAN behind one router; there exactly the other's public mapping,",
        "the router's address and the port it maps the other's WireGuard port to, reached",
        "through the router's hairpin); **relayed**: both are the relay; **failed**: no",
        "handshake within the timeout (or no ping through the tunnel); **mixed**: a tunnel,",
        "but neither of those. Time to tunnel: from the second client's start to the first",
        "handshake (median over the runs with that outcome).",
        "",
        ("| NAT A | NAT B | runs | direct | relayed | failed | mixed | median s (direct) "
        "| median s (relayed) |"),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for pair, runs in results.items():
        counts = {o: sum(r.outcome == o for r in runs) for o in OUTCOMES}
        n = len(runs) + errors.get(pair, 0)
        out.append(f"| {pair.nat_a} | {pair.nat_b} | {n} | " + " | ".join(
            str(counts[o]) for o in OUTCOMES)
            + f" | {_s(_median(runs, ['direct']))} | {_s(_median(runs, ['relayed']))} |")
    if any(errors.values()):
        out += ["", "Runs that crashed before measuring (counted in runs, in no outcome): "
                + ", ".join(f"{p} {k}" for p, k in errors.items() if k) + "."]
    out += ["", "## Runs", "",
            ("| NAT A | NAT B | outcome | time s | Alice's endpoint for Bob "
            "| Bob's endpoint for Alice | WireGuard |"),
            "|---|---|---|---:|---|---|---|"]
    for pair, runs in results.items():
        for r in runs:
            out.append(f"| {pair.nat_a} | {pair.nat_b} | {r.outcome} | {_s(r.ttt_ms)} "
                       f"| `{r.alice_endpoint}` | `{r.bob_endpoint}` | {r.wg} |")
    return "\n".join(out) + "\n"


_SUMMARY_HEAD = "| NAT A | NAT B | runs |"
_RUNS_HEAD = "| NAT A | NAT B | outcome |"
_DEFINITION = "Outcome of a run"
_MERGED = "- rows "


def _table(lines: Sequence[str], head: str) -> tuple[int, int]:
    """(first row, one past the last row) of the table whose header line starts with HEAD."""
    for i, line in enumerate(lines):
        if line.startswith(head):
            end = i + 2  # past the header and the |---| line
            while end < len(lines) and lines[end].startswith("|"):
                end += 1
            return i + 2, end
    raise MergeError(f"no table with the header {head!r}: not a report of this script?")


def _row_pair(row: str) -> Pair:
    cells = [c.strip() for c in row.strip().strip("|").split("|")]
    return Pair(cells[0], cells[1])


def _paragraph(lines: Sequence[str], first: str) -> tuple[int, int]:
    for i, line in enumerate(lines):
        if line.startswith(first):
            end = i
            while end < len(lines) and lines[end].strip():
                end += 1
            return i, end
    raise MergeError(f"no paragraph starting {first!r}: not a report of this script?")


def _noted_pairs(bullet: str) -> set[Pair] | None:
    """The pairs a merge note names ("- rows A/B, C/D: ..."); None for any other line."""
    if not bullet.startswith(_MERGED):
        return None
    try:
        return {parse_pair(p) for p in bullet[len(_MERGED):].split(":", 1)[0].split(", ")}
    except ValueError:
        return None


def merge(old: str, new: str, note: str) -> str:
    """OLD (a report) with the rows of NEW's pairs in both tables replaced by NEW's (or,
    for pairs OLD lacks, added at the end), every other row kept as it was, NEW's
    definition of the outcomes, and NOTE (a bullet saying where the new rows came from)
    after OLD's header bullets, in place of an earlier note about the same pairs."""
    lines, fresh = old.splitlines(), new.splitlines()
    start, end = _table(fresh, _SUMMARY_HEAD)
    pairs = {_row_pair(row) for row in fresh[start:end]}
    for head in (_RUNS_HEAD, _SUMMARY_HEAD):  # the later table first: indices above hold
        start, end = _table(fresh, head)
        o_start, o_end = _table(lines, head)
        kept = [row for row in lines[o_start:o_end] if _row_pair(row) not in pairs]
        lines[o_start:o_end] = kept + fresh[start:end]
    start, end = _paragraph(fresh, _DEFINITION)
    o_start, o_end = _paragraph(lines, _DEFINITION)
    lines[o_start:o_end] = fresh[start:end]
    bullets = [i for i, line in enumerate(lines[:o_start]) if line.startswith("- ")]
    if not bullets:
        raise MergeError("no header bullets (date, command) to add the note to")
    stale = {i for i in bullets if (noted := _noted_pairs(lines[i])) is not None and noted <= pairs}
    lines.insert(bullets[-1] + 1, note)
    lines = [line for i, line in enumerate(lines) if i not in stale]
    return "\n".join(lines) + "\n"


def merge_note(pairs: Sequence[Pair], errors: Mapping[Pair, int], *, when: str,
               machine: str, command: str) -> str:
    """The header bullet that says which rows a merge brought in, and from which run."""
    crashed = ", ".join(f"{p} {k}" for p, k in errors.items() if k)
    return (f"{_MERGED}{', '.join(map(str, pairs))}: measured {when} with `{command}`"
            f" ({machine}) and merged in (--merge); every other row is from the run above"
            + (f"; crashed before measuring (counted in runs, in no outcome): {crashed}"
               if crashed else ""))


def _machine() -> str:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{platform.system()} {platform.release()} {platform.machine()}, {cpu}, "
            f"{os.cpu_count()} CPUs, Python {platform.python_version()}")


def run_demo(pair: Pair, *, timeout: float, relay_after: float, prefix: str,
             python: str) -> tuple[GridRun | None, str]:
    env = dict(os.environ, LAB_TIMEOUT=str(int(timeout)), LAB_PREFIX=prefix,
               LAB_PROBE_PORT=str(PROBE_PORT), LAB_SYM_PORTS=SYM_PORTS)
    env.setdefault("PYTHON", python)
    argv = ["bash", str(SCRIPT), "demo", "--v2", "--nat-a", pair.nat_a, "--nat-b", pair.nat_b,
            "--server-arg", "--relay-port", "--server-arg", str(RELAY_PORT)]
    for arg in ("--wait", "--relay-after", f"{relay_after:g}"):
        argv += ["--punch-arg", arg]
    try:
        r = subprocess.run(argv, check=False, capture_output=True, text=True, env=env, timeout=timeout + 120)
    except subprocess.TimeoutExpired as e:
        return None, f"the demo hung past {timeout + 120:g} s: {e}"
    text = r.stdout + r.stderr
    try:
        return parse_run(r.stdout, RELAY_PORT), text
    except ResultLineError as e:
        return None, f"{e}\n{text}"


def _pair_arg(text: str) -> Pair:
    try:
        return parse_pair(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--runs", type=int, default=3, help="demo runs per pair (default 3)")
    p.add_argument("--pair", action="append", type=_pair_arg, metavar="A/B",
                   help="NAT modes of A and B (repeatable; default: "
                        + " ".join(map(str, default_pairs())) + ")")
    p.add_argument("--timeout", type=float, default=20,
                   help="seconds each run waits for a handshake (default 20)")
    p.add_argument("--relay-after", type=float, default=3,
                   help="wg-punch --relay-after (default 3)")
    p.add_argument("--output", type=Path, default=REPO / "docs" / "CONNECTIVITY.md",
                   help="the Markdown report (default docs/CONNECTIVITY.md)")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write every run as JSON")
    p.add_argument("--merge", action="store_true",
                   help="keep the other pairs' rows of an existing --output report and replace "
                        "(or add) only the rows of the pairs run now, with a note on when and "
                        "how they were measured")
    p.add_argument("--prefix", default=f"wgplg{os.getpid()}",
                   help="lab name prefix; run k is PREFIX-k (default wgplg<pid>)")
    p.add_argument("-v", "--verbose", action="store_true", help="print each run's outcome")
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error("-n must be at least 1")
    if args.timeout < 1 or args.relay_after <= 0:
        p.error("--timeout must be >= 1 and --relay-after > 0")
    if os.geteuid() != 0:
        p.error("needs root (the lab builds network namespaces)")
    pairs = args.pair or default_pairs()
    results: dict[Pair, list[GridRun]] = {pair: [] for pair in pairs}
    errors: dict[Pair, int] = {pair: 0 for pair in pairs}
    index = 0
    for pair in pairs:
        for i in range(args.runs):
            index += 1
            run, out = run_demo(pair, timeout=args.timeout, relay_after=args.relay_after,
                                prefix=f"{args.prefix}-{index}", python=sys.executable)
            if run is None:
                errors[pair] += 1
                print(f"{pair} run {i + 1}: the demo failed before measuring:\n{out[-2000:]}",
                      file=sys.stderr)
                continue
            results[pair].append(run)
            if args.verbose:
                print(f"{pair} run {i + 1}: {run.outcome} in {_s(run.ttt_ms)} s "
                      f"(alice -> {run.alice_endpoint}, bob -> {run.bob_endpoint})",
                      file=sys.stderr)
    command = shlex.join(["scripts/connectivity_grid.py",
                          *(sys.argv[1:] if argv is None else argv)])
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    machine = _machine()
    text = report(results, errors, when=when, machine=machine, command=command,
                  timeout=args.timeout, relay_after=args.relay_after)
    if args.merge and args.output.exists():
        note = merge_note(pairs, errors, when=when, machine=machine, command=command)
        try:
            text = merge(args.output.read_text(), text, note)
        except MergeError as e:
            print(f"connectivity_grid: --merge: {args.output}: {e}", file=sys.stderr)
            return 1
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(
            [dict(asdict(r), pair=str(r.pair)) for runs in results.values() for r in runs],
            indent=1) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
