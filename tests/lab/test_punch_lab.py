"""wg-rendezvous and wg-punch end to end: real NATs (nftables), real WireGuard, real
processes, in the netns lab (scripts/netns_lab.sh)."""

from __future__ import annotations

import subprocess
import time

import pytest

from tests.lab.lablib import SCRIPT, Lab, leftovers, new_prefix, script_env

pytestmark = pytest.mark.lab

TIMEOUT = "20"  # the clients' own --timeout: generous, they normally need a second or two


def _both_one_shot(lab: Lab, *extra: str) -> tuple[tuple[int, str], tuple[int, str]]:
    """Run the one-shot client on Alice, then on Bob; return (exit code, stderr) of each."""
    a = lab.punch("alice", "--timeout", TIMEOUT, *extra)
    b = lab.punch("bob", "--timeout", TIMEOUT, *extra)
    results = []
    for p in (a, b):
        try:
            _, err = p.communicate(timeout=float(TIMEOUT) + 15)
        except subprocess.TimeoutExpired:
            pytest.fail(f"wg-punch hung past its own --timeout: {lab.stop(p)[1]}")
        results.append((p.returncode, err.decode(errors="replace")))
    return results[0], results[1]


def _assert_tunnel(lab: Lab) -> None:
    assert lab.wait_handshake("alice", 15), "no handshake on alice"
    assert lab.wait_handshake("bob", 15), "no handshake on bob"
    assert lab.ping("alice", lab.info["BOB_TUN"]), "alice cannot ping bob through the tunnel"
    assert lab.ping("bob", lab.info["ALICE_TUN"]), "bob cannot ping alice through the tunnel"


@pytest.mark.parametrize("nat_a, nat_b", [("cone", "cone"), ("fullcone", "cone")])
def test_one_shot_clients_build_a_direct_tunnel(make_lab, nat_a: str, nat_b: str) -> None:
    lab = make_lab(nat_a, nat_b)
    lab.start_server()
    (ra, ea), (rb, eb) = _both_one_shot(lab)
    assert ra == 0, ea
    assert rb == 0, eb
    # Each side's endpoint is the other NAT's public address, at WireGuard's own port.
    assert lab.endpoint("alice") == f"{lab.info['PUB_B']}:51820"
    assert lab.endpoint("bob") == f"{lab.info['PUB_A']}:51820"
    assert lab.wg_show("alice", "persistent-keepalive") == ["25"]
    _assert_tunnel(lab)
    # wg-punch status on each side tells the same story from the state file + device.
    for host, other in (("alice", "PUB_B"), ("bob", "PUB_A")):
        doc = lab.status(host)
        assert doc["state"]["mode"] == "once" and doc["state"]["running"] is False
        (peer,) = doc["peers"]
        assert peer["endpoint"] == f"{lab.info[other]}:51820"
        assert peer["endpoint_source"] == "server", peer
        assert peer["server_answer"]["found"] is True, peer
        assert peer["latest_handshake"] is not None, peer


def test_classic_in_a_dual_stack_lab_still_punches_over_ipv4(make_lab) -> None:
    lab = make_lab(ipv6=True)
    lab.start_server()
    (ra, ea), (rb, eb) = _both_one_shot(lab)
    assert ra == 0, ea
    assert rb == 0, eb
    assert lab.endpoint("alice") == f"{lab.info['PUB_B']}:51820"
    assert lab.endpoint("bob") == f"{lab.info['PUB_A']}:51820"
    _assert_tunnel(lab)


@pytest.mark.parametrize("nat", ["a", "b"])
@pytest.mark.parametrize("what", ["request", "reply"])
def test_one_lost_rendezvous_packet_does_not_stop_the_tunnel(make_lab, nat: str, what: str) -> None:
    lab = make_lab()
    lab.start_server()
    lab.script("drop", nat, what, "1")
    (ra, ea), (rb, eb) = _both_one_shot(lab, "--wait")
    assert lab.drops(nat) == 1, "the packet was not lost: the test proves nothing"
    assert ra == 0, ea
    assert rb == 0, eb
    _assert_tunnel(lab)


def test_daemon_follows_a_nat_rebind(make_lab) -> None:
    lab = make_lab()
    lab.start_server()
    # Default settings: the 30 s target is for what users run.
    a = lab.punch("alice", "--daemon")
    b = lab.punch("bob", "--daemon")
    _assert_tunnel(lab)

    new = lab.script("rebind", "a").stdout.strip()
    # Within 30 s, with nothing restarted, Bob must be pointed at Alice's new mapping and
    # the tunnel must carry traffic again.
    ok = lab.ping_until("bob", lab.info["ALICE_TUN"], 30)
    for p in (a, b):
        assert p.poll() is None, f"the daemon exited: {lab.stop(p)[1]}"
    assert ok, f"tunnel not back within 30 s; bob's log:\n{lab.stop(b)[1][-3000:]}"
    assert lab.endpoint("bob") == new
    assert lab.ping("alice", lab.info["BOB_TUN"])

    # SIGTERM ends the daemons cleanly.
    for p in (a, b):
        p.terminate()
        assert p.wait(10) == 0
    lab.procs.remove(a)
    lab.procs.remove(b)


def test_symmetric_nat_one_shot_says_why_there_is_no_tunnel(make_lab) -> None:
    lab = make_lab("symmetric", "cone")
    lab.start_server()
    a = lab.punch("alice", "--timeout", "6", "--wait")
    b = lab.punch("bob", "--timeout", "6", "--wait")
    for p, who in ((a, "alice"), (b, "bob")):
        try:
            _, err = p.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"wg-punch on {who} hung behind a symmetric NAT: {lab.stop(p)[1]}")
        text = err.decode(errors="replace")
        assert p.returncode not in (0, None), f"{who} claims success: {text}"
        assert "no handshake" in text, text
        assert "symmetric" in text and "destination-dependent" in text, text


def test_symmetric_nat_one_shot_without_wait_does_not_hang(make_lab) -> None:
    lab = make_lab("symmetric", "cone")
    lab.start_server()
    (ra, ea), (rb, eb) = _both_one_shot(lab)
    # Without --wait the client only promises that endpoints were set, which it can.
    assert ra == 0, ea
    assert rb == 0, eb
    assert lab.endpoint("bob").startswith(lab.info["PUB_A"] + ":")


def test_demo_runs_and_leaves_nothing_behind() -> None:
    from tests.nstools import is_root

    if not is_root():
        pytest.skip("needs root")
    prefix = new_prefix()
    r = subprocess.run(["bash", str(SCRIPT), "demo"], capture_output=True, text=True, timeout=120,
                       env=script_env(prefix, LAB_TIMEOUT="20"))
    if r.returncode != 0 and "missing tools" in r.stderr:
        pytest.skip(r.stderr)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ping through the tunnel works both ways" in r.stdout
    assert "time from the second client start to the first handshake" in r.stdout
    assert " ok=1 " in r.stdout
    assert leftovers(prefix) == []


def test_a_daemon_outlives_a_lost_route_and_carries_on_once_it_is_back(make_lab) -> None:
    """Alice's host loses its default route for a while (the Wi-Fi drops, the network
    is being reconfigured): her daemon's requests cannot leave. It must not exit: it
    says so and carries on, and once the route is back its requests get answers again
    and the tunnel is there."""
    lab = make_lab()
    lab.start_server()
    a = lab.punch("alice", "--daemon", "--interval", "2")
    b = lab.punch("bob", "--daemon", "--interval", "2")
    _assert_tunnel(lab)
    route = lab.run("alice", ["ip", "-4", "route", "show", "default"]).stdout.split()
    assert route[:2] == ["default", "via"], route
    lab.run("alice", ["ip", "-4", "route", "del", "default"])
    time.sleep(7)  # a few of her requests come due meanwhile
    alive = a.poll() is None
    lab.run("alice", ["ip", "-4", "route", "add", *route])
    before = lab.status("alice")["state"]["last_reply"]
    deadline = time.monotonic() + 15
    answered = False
    while alive and not answered and time.monotonic() < deadline:
        time.sleep(0.5)
        answered = (lab.status("alice")["state"]["last_reply"] or 0) > before
    _, a_err = lab.stop(a)
    lab.stop(b)
    assert alive, f"the daemon exited without its route:\n{a_err}"
    assert answered, f"no reply once the route was back:\n{a_err}"
    assert lab.ping("alice", lab.info["BOB_TUN"])
    assert "no reply from the server for" in a_err, a_err  # it said so meanwhile
