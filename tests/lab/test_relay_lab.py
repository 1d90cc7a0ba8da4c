"""The relay fallback end to end in the netns lab: two symmetric NATs (no direct path
can form), wg-rendezvous --key --relay-port, wg-punch --server-key on both sides, real
wireguard-go. The tunnel forms through the relay, pings work both ways, the server
counts what it relayed, and a datagram to the relay port from a source nobody bound
(the inet router) is not forwarded but counted."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.lab.lablib import PROBE, Lab

pytestmark = pytest.mark.lab

RELAY_PORT = "49919"


def _final_stats(err: str) -> dict[str, int]:
    lines = [line for line in err.splitlines() if " stats: " in line]
    assert lines, err[-3000:]
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", lines[-1])}


def _one_shot(lab: Lab, state: Path, *extra: str) -> dict[str, str]:
    procs = {h: lab.punch(h, "--wait", "--timeout", "40", "--relay-after", "3",
                          "--state-dir", str(state / h), *extra)
             for h in ("alice", "bob")}
    logs = {}
    for who, p in procs.items():
        try:
            _, err = p.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"wg-punch on {who} hung past its own --timeout: {lab.stop(p)[1]}")
        logs[who] = err.decode(errors="replace")
        assert p.returncode == 0, f"wg-punch on {who} exited {p.returncode}:\n{logs[who]}"
    return logs


def test_symmetric_pair_tunnels_through_the_relay(make_lab, tmp_path) -> None:
    lab = make_lab("symmetric", "symmetric", v2=True)
    server = lab.start_server("--relay-port", RELAY_PORT)
    logs = _one_shot(lab, tmp_path)
    relay = f"{lab.server}:{RELAY_PORT}"
    assert lab.endpoint("alice") == relay
    assert lab.endpoint("bob") == relay
    for who, text in logs.items():
        assert re.search(rf"endpoint {re.escape(relay)} \(relay \(", text), text
        assert re.search(r"paths=\S+:relay", text), text
        status = lab.run(who, [sys.executable, "-m", "punch", "status", "wg0", "--json",
                               "--state-dir", str(tmp_path / who)]).stdout
        (peer,) = json.loads(status)["peers"]
        assert peer["path"] == "relay" and peer["endpoint"] == relay, status
    assert lab.wait_handshake("alice", 15) and lab.wait_handshake("bob", 15)
    assert lab.ping("alice", lab.info["BOB_TUN"]), "alice cannot ping bob through the relay"
    assert lab.ping("bob", lab.info["ALICE_TUN"]), "bob cannot ping alice through the relay"
    # A stranger (the inet router, which registered nothing) sends to the relay port:
    # nothing comes back, nothing is forwarded, and the server counts it.
    answers = lab.run("inet", [sys.executable, PROBE, "ask", "40000", relay, relay, relay]).stdout
    assert answers.split() == ["-", "-", "-"], answers
    _, err = lab.stop(server)
    stats = _final_stats(err)
    assert stats["v2_relay_allocated"] == 1, stats
    assert stats["v2_relay_binds"] >= 2, stats
    # the pings (3 + 3 echo requests and as many replies) and the handshake went through it
    assert stats["v2_relay_forwarded"] >= 14, stats
    assert stats["v2_relay_forwarded_bytes"] > 12 * 84, stats
    assert stats["v2_relay_dropped_unbound"] >= 3, stats
    assert stats["relay_send_failed"] == 0, stats


def test_without_the_relay_the_symmetric_pair_fails_and_says_so(make_lab) -> None:
    """The control: the same lab with --no-relay never forms a tunnel."""
    lab = make_lab("symmetric", "symmetric", v2=True)
    lab.start_server("--relay-port", RELAY_PORT)
    p = lab.punch("alice", "--wait", "--timeout", "8", "--no-relay")
    q = lab.punch("bob", "--wait", "--timeout", "8", "--no-relay")
    for proc in (p, q):
        _, err = proc.communicate(timeout=40)
        assert proc.returncode == 8, err.decode()  # no handshake
    assert lab.endpoint("alice") != f"{lab.server}:{RELAY_PORT}"


def test_daemon_on_the_relay_tries_the_direct_path_and_comes_back(make_lab) -> None:
    """Daemons relay, then try the (impossible) direct path after --relay-upgrade
    seconds for a bounded window, log it, go back to the relay, and the tunnel still
    works."""
    lab = make_lab("symmetric", "symmetric", v2=True)
    lab.start_server("--relay-port", RELAY_PORT)
    args = ("--daemon", "--relay-after", "3", "--relay-upgrade", "4", "--interval", "10")
    a, b = lab.punch("alice", *args), lab.punch("bob", *args)
    from tests.lab.test_v2_lab import _LogReader

    log = _LogReader(a)
    relay = f"{lab.server}:{RELAY_PORT}"
    log.wait_for(rf"endpoint {re.escape(relay)} \(relay \(", 30)
    log.wait_for(r"\(trying the direct path for 5s", 30)
    back = log.wait_for(r"\(back to the relay: ", 30)
    assert "next try in 8s" in back, back
    assert lab.endpoint("alice") == relay
    assert lab.ping_until("alice", lab.info["BOB_TUN"], 15)
    assert lab.ping("bob", lab.info["ALICE_TUN"])
    for p in (a, b):
        assert p.poll() is None, "a daemon exited"
        p.terminate()
        assert p.wait(10) == 0
        lab.procs.remove(p)


def test_relayed_pair_moves_to_the_direct_path_when_it_works(make_lab) -> None:
    """Cone NATs with an (absurdly) short --relay-after: the pair goes to the relay before
    its direct handshake, then leaves it, logged, with the tunnel up all along: each side
    either by its bounded try of the direct endpoint (traffic flowing) or because its
    WireGuard roamed to the peer's direct endpoint (the peer's try, or the peer's early
    direct handshake, reached it)."""
    lab = make_lab("cone", "cone", v2=True)
    lab.start_server("--relay-port", RELAY_PORT)
    args = ("--daemon", "--relay-after", "0.01", "--relay-upgrade", "3", "--interval", "10")
    a, b = lab.punch("alice", *args), lab.punch("bob", *args)
    from tests.lab.test_v2_lab import _LogReader

    logs = {"alice": _LogReader(a), "bob": _LogReader(b)}
    relay = f"{lab.server}:{RELAY_PORT}"
    for log in logs.values():
        log.wait_for(rf"endpoint {re.escape(relay)} \(relay \(", 20)
    # traffic through the tunnel while the tries run (the try's proof is the peer's
    # packets arriving over the direct endpoint)
    deadline = time.monotonic() + 45  # tries at +3 s, then 6 and 12 s after failed ones
    while time.monotonic() < deadline and not all(
            "off the relay" in log.text for log in logs.values()):
        lab.ping("alice", lab.info["BOB_TUN"], count=2)
        for log in logs.values():
            try:
                log.wait_for(r"off the relay", 0.1)
            except AssertionError:
                pass
    for log in logs.values():
        line = log.wait_for(r"\((direct path works within 5s: |WireGuard roamed to \S+: "
                            r"direct, )off the relay\)", 1)
        assert relay not in line.split("(")[0], line
    assert lab.endpoint("alice") == f"{lab.info['PUB_B']}:51820"
    assert lab.endpoint("bob") == f"{lab.info['PUB_A']}:51820"
    assert lab.ping("alice", lab.info["BOB_TUN"]) and lab.ping("bob", lab.info["ALICE_TUN"])
    for p in (a, b):
        p.terminate()
        assert p.wait(10) == 0
        lab.procs.remove(p)
