"""wg-punch status: the pure merge, then the real command against wireguard-go after a
real wg-punch run (the harness of test_client.py: two devices in one namespace and
wg-rendezvous on its loopback)."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time

import pytest

from punch.statefile import InterfaceState, PeerRecord, encode
from punch.status import build, endpoint_source, render_text, to_json
from punch.wg import Device, Peer
from tests.nstools import Netns, py_env
from tests.punch.test_client import Pair, start_server

KEY_A, KEY_B = bytes(range(32)), bytes(range(1, 33))


@pytest.mark.parametrize("current,record,have_state,expected", [
    (None, None, True, "none"),
    ("1.2.3.4:5", None, False, "unknown"),
    ("1.2.3.4:5", PeerRecord(applied="1.2.3.4:5"), True, "server"),
    ("1.2.3.4:6", PeerRecord(applied="1.2.3.4:5"), True, "roaming"),
    ("1.2.3.4:5", PeerRecord(answer="1.2.3.4:5", answer_found=True), True, "server"),
    ("1.2.3.4:6", PeerRecord(answer="1.2.3.4:5", answer_found=True), True, "other"),
    # The latest answer said "not found": an endpoint equal to an older answer is not
    # attributed to the server.
    ("1.2.3.4:5", PeerRecord(answer="1.2.3.4:5", answer_found=False), True, "other"),
    ("1.2.3.4:5", None, True, "other"),  # state exists but has no record of this peer
])
def test_endpoint_source(current, record, have_state, expected):
    assert endpoint_source(current, record, have_state) == expected


def _state(**peers: PeerRecord) -> InterfaceState:
    keys = {"a": KEY_A, "b": KEY_B}
    return InterfaceState("wg9", 42, "daemon", "192.0.2.1:49918", started=1000.0,
                          updated=1090.0, last_reply=1089.0,
                          peers={keys[k]: r for k, r in peers.items()})


def test_merge_and_render_without_a_device_call():
    device = Device("wg9", public_key=KEY_A, listen_port=51820, peers=(
        Peer(KEY_A, endpoint=("198.51.100.1", 4000), last_handshake=1095.0),
        Peer(KEY_B, endpoint=("2001:db8::1", 51820))))
    state = _state(a=PeerRecord("applied", "198.51.100.1:4000", True, 1089.0,
                                "198.51.100.1:4000", 1001.0),
                   b=PeerRecord("not found", None, False, 1088.0))
    report = build(device, state, "/x/wg9.json")
    assert [p.source for p in report.peers] == ["server", "other"]
    text = render_text(report, now=1100.0)
    assert "  wg-punch: daemon, pid 42, server 192.0.2.1:49918, started 100s ago, " \
           "running, state updated 10s ago" in text
    assert "  endpoint: 198.51.100.1:4000 (from the server)\n  latest handshake: 5s ago\n" \
           "  server answer: 198.51.100.1:4000, 11s ago\n" \
           "  set by wg-punch: 198.51.100.1:4000, 99s ago\n  NAT: unknown" in text
    assert "  endpoint: [2001:db8::1]:51820 (set by hand or unknown)\n" \
           "  latest handshake: never\n" \
           "  server answer: peer not known to the server, 12s ago" in text
    doc = to_json(report, now=1100.0)
    assert doc["state"]["running"] is True and doc["state"]["last_reply_age"] == 11.0
    a, b = doc["peers"]
    assert a["endpoint_source"] == "server" and a["handshake_age"] == 5.0
    assert a["server_answer"] == {"endpoint": "198.51.100.1:4000", "found": True, "at": 1089.0,
                                  "age": 11.0}
    assert b["server_answer"]["found"] is False and b["server_answer"]["endpoint"] is None
    assert b["latest_handshake"] is None and b["nat"] == "unknown"


def test_a_state_whose_writer_is_gone_is_not_running():
    device = Device("wg9", public_key=KEY_A, listen_port=1, peers=())
    report = build(device, _state(), "p", writer_alive=False)
    assert "not running (pid 42 is gone), state updated 10s ago" in render_text(report, 1100.0)
    assert to_json(report, 1100.0)["state"]["running"] is False


def test_render_without_state_says_so():
    device = Device("wg9", public_key=KEY_A, listen_port=1, peers=(Peer(KEY_B, ("10.0.0.1", 2)),))
    report = build(device, None, "/run/wg-punch/wg9.json")
    text = render_text(report, now=0.0)
    assert "no wg-punch state found (/run/wg-punch/wg9.json does not exist)" in text
    assert "(origin unknown: no wg-punch state)" in text and "server answer" not in text
    assert to_json(report, 0.0)["peers"][0]["endpoint_source"] == "unknown"


# -- the real thing -------------------------------------------------------------------


@pytest.fixture
def ns():
    with Netns("st") as n:
        yield n


def status(ns: Netns, *args: str):
    return ns.run([sys.executable, "-m", "punch", "status", *args], check=False)


@pytest.mark.root
@pytest.mark.usefixtures("needs_wireguard_go")
def test_status_after_a_real_run(ns, state_dir):
    pair = Pair(ns)
    port = start_server(ns)
    server = f"127.0.0.1:{port}"
    a = ns.popen([sys.executable, "-m", "punch", "--wait", "--timeout", "20", server, pair.ifs[0]])
    time.sleep(0.3)
    b = ns.run([sys.executable, "-m", "punch", "--wait", "--timeout", "20", server, pair.ifs[1]],
               check=False)
    assert b.returncode == 0, b.stderr
    assert a.wait(25) == 0
    assert (state_dir / f"{pair.ifs[1]}.json").exists()
    alice_pub = pair.keys[0][1]

    r = status(ns, pair.ifs[1])
    assert r.returncode == 0, r.stderr
    text = r.stdout
    assert f"interface: {pair.ifs[1]}\n" in text
    assert f"  public key: {pair.keys[1][1]}\n  listening port: 51821\n" in text
    assert f"  wg-punch: once, pid {_pid(state_dir, pair.ifs[1])}, server {server}, " in text
    assert "ended " in text and "last server reply: " in text
    assert f"peer: {alice_pub}\n  endpoint: 127.0.0.1:51820 (from the server)\n" in text
    assert "  latest handshake: never" not in text
    assert "  server answer: 127.0.0.1:51820, " in text
    assert "  set by wg-punch: 127.0.0.1:51820, " in text and "  NAT: unknown" in text

    r = status(ns, "--json", pair.ifs[1])
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["interface"] == pair.ifs[1] and doc["listen_port"] == 51821
    assert doc["state"]["mode"] == "once" and doc["state"]["running"] is False
    assert doc["state"]["server"] == server and doc["state_error"] is None
    [peer] = doc["peers"]
    assert peer["public_key"] == alice_pub and peer["peer"] == alice_pub[:8] + "…"
    assert peer["endpoint"] == "127.0.0.1:51820" and peer["endpoint_source"] == "server"
    assert peer["server_answer"]["endpoint"] == "127.0.0.1:51820"
    assert peer["server_answer"]["found"] is True
    assert peer["applied"]["endpoint"] == "127.0.0.1:51820"
    now = time.time()
    assert 0 <= peer["handshake_age"] < 30 and abs(now - peer["latest_handshake"]
                                                  - peer["handshake_age"]) < 5
    assert 0 <= peer["server_answer"]["age"] < 30
    assert peer["status"] == "applied" and peer["nat"] == "unknown"

    # WireGuard roams (here: set by hand to another port): status tells it apart.
    ns.run(["wg", "set", pair.ifs[1], "peer", alice_pub, "endpoint", "127.0.0.1:40999"])
    doc = json.loads(status(ns, "--json", pair.ifs[1]).stdout)
    assert doc["peers"][0]["endpoint_source"] == "roaming"


def _pid(state_dir, ifname: str) -> int:
    return json.loads((state_dir / f"{ifname}.json").read_text())["pid"]


@pytest.mark.root
@pytest.mark.usefixtures("needs_wireguard_go")
def test_status_without_state_shows_the_device(ns, state_dir):
    pair = Pair(ns)
    r = status(ns, pair.ifs[0])
    assert r.returncode == 0, r.stderr
    assert "no wg-punch state found" in r.stdout and str(state_dir) in r.stdout
    assert f"peer: {pair.keys[1][1]}\n  endpoint: (none)\n  latest handshake: never\n" \
           "  NAT: unknown" in r.stdout
    doc = json.loads(status(ns, "--json", pair.ifs[0]).stdout)
    assert doc["state"] is None and doc["peers"][0]["endpoint_source"] == "none"


@pytest.mark.root
@pytest.mark.usefixtures("needs_wireguard_go")
def test_status_with_a_corrupt_state_file_says_which_field(ns, state_dir):
    pair = Pair(ns)
    state_dir.mkdir()
    good = encode(InterfaceState(pair.ifs[0], 1, "once", "x", 1.0, 2.0))
    (state_dir / f"{pair.ifs[0]}.json").write_bytes(good.replace(b'"once"', b'"sometimes"'))
    r = status(ns, pair.ifs[0])
    assert r.returncode == 0, r.stderr
    assert "unreadable: state: field 'mode' must be one of daemon, once, got 'sometimes'" \
        in r.stdout


@pytest.mark.root
def test_status_of_a_missing_interface_exits_4(ns):
    r = status(ns, "wgnothere0")
    assert r.returncode == 4
    assert r.stderr.strip() == "wg-punch status: interface wgnothere0 does not exist"


def test_status_bad_arguments_exit_2():
    r = subprocess.run([sys.executable, "-m", "punch", "status"], capture_output=True,
                       text=True, env=py_env(), timeout=30)
    assert r.returncode == 2 and "the following arguments are required: INTERFACE" in r.stderr
    r = subprocess.run([sys.executable, "-m", "punch", "status", "a/b"], capture_output=True,
                       text=True, env=py_env(), timeout=30)
    assert r.returncode == 2 and r.stderr.strip() == \
        "wg-punch status: interface name 'a/b' cannot name a state file"


def test_base64_keys_in_doc_are_valid():
    device = Device("wg9", public_key=KEY_A, listen_port=1, peers=(Peer(KEY_B),))
    doc = to_json(build(device, None, "p"), 0.0)
    assert base64.b64decode(doc["peers"][0]["public_key"]) == KEY_B


@pytest.mark.root
@pytest.mark.usefixtures("needs_wireguard_go")
def test_status_of_a_killed_daemon_says_it_is_not_running(ns, state_dir):
    pair = Pair(ns)
    port = start_server(ns)
    d = ns.popen([sys.executable, "-m", "punch", "--daemon", f"127.0.0.1:{port}", pair.ifs[0]])
    path = state_dir / f"{pair.ifs[0]}.json"
    deadline = time.monotonic() + 15
    while not path.exists():
        assert time.monotonic() < deadline and d.poll() is None, "no state file"
        time.sleep(0.1)
    doc = json.loads(status(ns, "--json", pair.ifs[0]).stdout)
    assert doc["state"]["mode"] == "daemon" and doc["state"]["running"] is True
    pid = doc["state"]["pid"]
    d.kill()  # no chance to write "ended"
    d.wait(10)
    r = status(ns, pair.ifs[0])
    assert f"not running (pid {pid} is gone)" in r.stdout, r.stdout
    assert json.loads(status(ns, "--json", pair.ifs[0]).stdout)["state"]["running"] is False


def test_render_shows_both_verdicts_and_what_they_mean_together():
    device = Device("wg9", public_key=KEY_A, listen_port=51820, peers=(
        Peer(KEY_A, endpoint=("198.51.100.1", 4000)), Peer(KEY_B)))
    state = InterfaceState(
        "wg9", 42, "daemon", "192.0.2.1:49918", started=1000.0, updated=1090.0,
        nat="address-and-port-dependent",
        peers={KEY_A: PeerRecord("applied", nat="endpoint-independent+port-preserved"),
               KEY_B: PeerRecord("asking")})
    report = build(device, state, "/x/wg9.json")
    text = render_text(report, now=1100.0)
    assert "  NAT (this host): address-and-port-dependent\n" in text
    assert ("  NAT: endpoint-independent+port-preserved\n  direct tunnel: direct only with "
            "the spray from the easy side, else a relay\n") in text
    assert text.endswith("  NAT: unknown\n")  # no verdict, no advice
    doc = to_json(report, now=1100.0)
    assert doc["state"]["nat"] == "address-and-port-dependent"
    assert [p["nat"] for p in doc["peers"]] == ["endpoint-independent+port-preserved", "unknown"]


def test_render_says_when_our_nat_was_checked_and_what_the_checks_again_found():
    device = Device("wg9", public_key=KEY_A, listen_port=51820, peers=())
    state = InterfaceState("wg9", 42, "daemon", "192.0.2.1:49918", started=1000.0,
                           updated=1090.0, nat="address-and-port-dependent",
                           nat_checked=1070.0, nat_checks=3, nat_changes=1)
    report = build(device, state, "/x/wg9.json")
    assert ("  NAT (this host): address-and-port-dependent (checked 30s ago; checked again "
            "3 times, 1 changed it)\n") in render_text(report, now=1100.0)
    doc = to_json(report, now=1100.0)["state"]
    assert (doc["nat_checked"], doc["nat_checks"], doc["nat_changes"]) == (1070.0, 3, 1)
    once = InterfaceState("wg9", 42, "daemon", "192.0.2.1:49918", started=1000.0,
                          updated=1090.0, nat="endpoint-independent", nat_checked=1001.0)
    assert "  NAT (this host): endpoint-independent (checked 99s ago)\n" in render_text(
        build(device, once, "/x/wg9.json"), now=1100.0)
    never = InterfaceState("wg9", 42, "daemon", "192.0.2.1:49918", started=1000.0,
                           updated=1090.0)
    assert "  NAT (this host): unknown\n" in render_text(build(device, never, "/x/wg9.json"),
                                                          now=1100.0)
