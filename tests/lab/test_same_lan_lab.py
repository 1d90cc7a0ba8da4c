"""Both peers on one LAN behind one NAT (netns_lab.sh modes lan and lan-nohairpin):
the layout, the router's endpoint-independent mapping and its hairpinning (RFC 4787
REQ-1, REQ-9) with udp_probe, then the classic and the v2 client through the hairpin
(direct: each side's endpoint is the other's public mapping on the router) and, on a
router without hairpinning, the v2 client on the relay."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.lab.lablib import SCRIPT, Lab, leftovers, new_prefix, script_env

pytestmark = pytest.mark.lab

TIMEOUT = "20"  # the clients' own --timeout
RELAY_PORT = "49920"
ECHO_PORTS = ("7001", "7002")


def _echo(lab: Lab, host: str, *ports: str) -> subprocess.Popen[bytes]:
    p = lab.probe(host, "echo", *ports)
    lab.wait_line(p)
    return p


def _one_shot(lab: Lab, *extra: str) -> dict[str, str]:
    """The one-shot client on Alice, then on Bob; both must exit 0. Their logs."""
    procs = {h: lab.punch(h, "--timeout", TIMEOUT, *extra) for h in ("alice", "bob")}
    logs = {}
    for who, p in procs.items():
        try:
            _, err = p.communicate(timeout=float(TIMEOUT) + 25)
        except subprocess.TimeoutExpired:
            pytest.fail(f"wg-punch on {who} hung past its own --timeout: {lab.stop(p)[1]}")
        logs[who] = err.decode(errors="replace")
    for who, p in procs.items():  # both logs on a failure: the other side may be the cause
        assert p.returncode == 0, (f"wg-punch on {who} exited {p.returncode}:\n"
                                   + "\n".join(f"--- {h}:\n{t}" for h, t in logs.items()))
    return logs


def _assert_tunnel(lab: Lab) -> None:
    assert lab.wait_handshake("alice", 15), "no handshake on alice"
    assert lab.wait_handshake("bob", 15), "no handshake on bob"
    assert lab.ping("alice", lab.info["BOB_TUN"]), "alice cannot ping bob through the tunnel"
    assert lab.ping("bob", lab.info["ALICE_TUN"]), "bob cannot ping alice through the tunnel"


def _assert_direct_through_the_hairpin(lab: Lab) -> None:
    """Each side's endpoint is the other's public mapping on the one router, traffic
    crosses the hairpin, and the tunnel carries pings."""
    maps = lab.mappings()
    pub = lab.info["PUB_A"]
    alice_pub, bob_pub = maps[f"{lab.info['ALICE_LAN']}:51820"], maps[f"{lab.info['BOB_LAN']}:51820"]
    assert alice_pub.startswith(pub + ":") and bob_pub.startswith(pub + ":"), maps
    assert alice_pub != bob_pub, maps  # one of them could not keep WireGuard's port
    assert lab.endpoint("alice") == bob_pub
    assert lab.endpoint("bob") == alice_pub
    before = lab.rule_packets("a", "hairpin")
    _assert_tunnel(lab)
    # 3 + 3 echo requests and as many replies, each hairpinned once by the router
    assert lab.rule_packets("a", "hairpin") - before >= 12


def test_same_lan_layout_has_one_router_and_one_lan(make_lab) -> None:
    lab = make_lab("lan", "lan")
    names = {p.name for p in Path("/run/netns").iterdir() if p.name.startswith(lab.prefix + "-")}
    assert names == {f"{lab.prefix}-{h}" for h in ("inet", "srv", "nat-a", "alice", "bob")}
    assert lab.info["SAME_LAN"] == "1" and lab.info["BOB_LAN"] == "192.168.1.3"
    assert lab.info["PUB_B"] == lab.info["PUB_A"]  # Bob is seen at the same router
    # one LAN: the hosts reach each other directly, and the server through the router
    assert lab.ping("alice", lab.info["BOB_LAN"], count=1)
    assert lab.ping("bob", lab.server, count=1)
    ports = lab.run("nat-a", ["bridge", "link", "show"]).stdout
    assert "lan-alice" in ports and "lan-bob" in ports, ports
    # the knobs that name a router: there is no b
    for args in (["rebind", "b"], ["drop", "b", "request", "1"]):
        r = lab.script(*args, check=False)
        assert r.returncode != 0 and "one router, nat-a" in r.stderr, r.stderr


@pytest.mark.parametrize("args, want", [
    (["--nat-a", "lan", "--nat-b", "cone"], "must be the same (lan, cone)"),
    (["--nat-a", "lan-nohairpin", "--ipv6"], "IPv4 only"),
])
def test_same_lan_modes_refuse_a_second_router_or_ipv6(args: list[str], want: str) -> None:
    prefix = new_prefix()
    r = subprocess.run(["bash", str(SCRIPT), "up", *args], check=False, capture_output=True,
                       text=True, env=script_env(prefix), timeout=60)
    assert r.returncode != 0 and want in r.stderr, r.stderr
    assert leftovers(prefix) == []


def test_lan_router_maps_each_host_once_and_hairpins(make_lab) -> None:
    """Both hosts use one source port: Alice keeps it, Bob gets another public port, the
    same for every destination (REQ-1). A datagram from Bob to the router's public address
    and Alice's mapped port reaches Alice from Bob's public mapping, and her answer
    returns to Bob through the router (REQ-9); the router counts both."""
    lab = make_lab("lan", "lan")
    _echo(lab, "server", *ECHO_PORTS)
    pub = lab.info["PUB_A"]
    servers = [f"{lab.server}:{p}" for p in ECHO_PORTS]
    assert lab.ask("alice", 40000, *servers) == [f"{pub}:40000"] * 2
    bob_seen = lab.ask("bob", 40000, *servers)
    assert bob_seen[0] == bob_seen[1] != f"{pub}:40000", bob_seen
    assert bob_seen[0].startswith(pub + ":"), bob_seen
    assert lab.mappings() == {f"{lab.info['ALICE_LAN']}:40000": f"{pub}:40000",
                              f"{lab.info['BOB_LAN']}:40000": bob_seen[0]}
    before = lab.rule_packets("a", "hairpin")
    echo = _echo(lab, "alice", "40000")
    # Bob to Alice's public mapping: Alice's echo says who it saw, and Bob gets it back
    assert lab.ask("bob", 40000, f"{pub}:40000") == bob_seen[:1]
    out, _ = lab.stop(echo)
    assert out.split() == bob_seen[:1], out
    assert lab.rule_packets("a", "hairpin") - before == 2  # there and back
    # ...and the other way round, from Alice to Bob's mapping (a listener on Bob's port)
    listener = lab.probe("bob", "listen", "40000", "2")
    lab.wait_line(listener)
    assert lab.ask("alice", 40000, bob_seen[0]) == ["-"]  # listen does not answer
    out, _ = lab.stop(listener)
    assert out.split() == [f"{pub}:40000"], out
    # a public port nobody holds: dropped at the router, counted, no conntrack entry left
    unmapped = lab.rule_packets("a", "hairpin: no mapping")
    assert lab.ask("alice", 40001, f"{pub}:40999") == ["-"]
    assert lab.rule_packets("a", "hairpin: no mapping") - unmapped == 1
    assert "dport=40999" not in lab.conntrack("a")


def test_nohairpin_router_drops_lan_packets_to_its_public_address(make_lab) -> None:
    lab = make_lab("lan-nohairpin", "lan-nohairpin")
    _echo(lab, "server", *ECHO_PORTS)
    pub = lab.info["PUB_A"]
    assert lab.ask("alice", 40000, f"{lab.server}:7001") == [f"{pub}:40000"]
    bob_pub = lab.ask("bob", 40000, f"{lab.server}:7001")[0]
    assert bob_pub.startswith(pub + ":") and bob_pub != f"{pub}:40000"  # still one mapping each
    echo = _echo(lab, "alice", "40000")
    before = lab.rule_packets("a", "no hairpin")
    assert lab.ask("bob", 40000, f"{pub}:40000") == ["-"]
    out, _ = lab.stop(echo)
    assert out.split() == [], out  # nothing reached Alice
    assert lab.rule_packets("a", "no hairpin") - before == 1
    assert "hairpin" not in lab.run("nat-a", ["nft", "list", "chain", "ip", "wgpunch_lab",
                                              "nat_pre"]).stdout


def test_classic_punch_goes_direct_through_the_hairpin(make_lab) -> None:
    lab = make_lab("lan", "lan")
    lab.start_server()
    _one_shot(lab)
    _assert_direct_through_the_hairpin(lab)


def test_v2_punch_goes_direct_through_the_hairpin(make_lab) -> None:
    lab = make_lab("lan", "lan", v2=True)
    lab.start_server()
    _one_shot(lab, "--wait")
    _assert_direct_through_the_hairpin(lab)
    for host in ("alice", "bob"):
        (peer,) = lab.status(host)["peers"]
        assert peer["endpoint"] == lab.endpoint(host), peer
        assert peer.get("path") != "relay", peer


def test_v2_without_hairpin_ends_on_the_relay(make_lab) -> None:
    """No hairpin: the public endpoints the server hands out are dead from inside the
    LAN (the router drops and counts the tries), so after --relay-after both clients
    move to the relay, and the tunnel works there."""
    lab = make_lab("lan-nohairpin", "lan-nohairpin", v2=True)
    lab.start_server("--relay-port", RELAY_PORT)
    t0 = time.monotonic()
    logs = _one_shot(lab, "--wait", "--relay-after", "3")
    relay = f"{lab.server}:{RELAY_PORT}"
    assert lab.endpoint("alice") == relay and lab.endpoint("bob") == relay
    for text in logs.values():
        assert re.search(rf"endpoint {re.escape(relay)} \(relay \(", text), text
    assert time.monotonic() - t0 >= 3  # it did wait for the direct path first
    assert lab.rule_packets("a", "no hairpin") >= 2  # each side's direct tries died there
    _assert_tunnel(lab)
