"""The lab itself (scripts/netns_lab.sh), without wgpunch: NAT behaviours, WireGuard
through the NATs with endpoints set by hand, the rebind and drop knobs, and cleanup."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.lab.lablib import (
    PROBE, SCRIPT, STATE_ROOT, Lab, LabError, leftovers, new_prefix, script_env,
)
from tests.nstools import Netns

pytestmark = pytest.mark.lab

ECHO_PORTS = ("7001", "7002", "7003")


def _echo(lab: Lab, host: str = "server", *ports: str) -> subprocess.Popen[bytes]:
    p = lab.probe(host, "echo", *(ports or ECHO_PORTS))
    lab.wait_line(p)
    return p


def test_up_builds_the_planned_lab(make_lab) -> None:
    lab = make_lab()
    names = {p.name for p in Path("/run/netns").iterdir() if p.name.startswith(lab.prefix + "-")}
    assert names == {f"{lab.prefix}-{h}" for h in ("inet", "srv", "nat-a", "nat-b", "alice", "bob")}
    assert lab.info["NAT_A"] == "cone" and lab.info["NAT_B"] == "cone"
    for host, mine, theirs in (("alice", "ALICE", "BOB"), ("bob", "BOB", "ALICE")):
        out = lab.run(host, ["wg", "show", "wg0", "dump"]).stdout.splitlines()
        iface, peer = out[0].split("\t"), out[1].split("\t")
        assert iface[2] == "51820"
        assert peer[0] == lab.info[f"{theirs}_PUBKEY"]
        assert peer[2] == "(none)"  # no endpoint: finding it is wg-punch's job
        assert peer[3] == lab.info[f"{theirs}_TUN"] + "/32"
        addrs = lab.run(host, ["ip", "-4", "-o", "addr", "show", "dev", "wg0"]).stdout
        assert lab.info[f"{mine}_TUN"] + "/24" in addrs


def test_hosts_have_private_wireguard_runtime_dirs(make_lab) -> None:
    lab = make_lab()
    if lab.info["WG_IMPL"] != "userspace":
        pytest.skip("kernel WireGuard: no UAPI sockets")
    a = lab.run("alice", ["ls", "/run/wireguard"]).stdout.split()
    b = lab.run("bob", ["ls", "/run/wireguard"]).stdout.split()
    assert a == b == ["wg0.sock"]
    # ...and they are two different daemons
    for host, key in (("alice", "ALICE_PUBKEY"), ("bob", "BOB_PUBKEY")):
        assert lab.run(host, ["wg", "show", "wg0", "public-key"]).stdout.strip() == lab.info[key]


def test_lan_hosts_reach_the_server_but_not_each_other(make_lab) -> None:
    lab = make_lab()
    assert lab.ping("alice", lab.server, count=1)
    assert lab.ping("bob", lab.server, count=1)
    assert not lab.ping("alice", lab.info["BOB_LAN"], count=1)


@pytest.mark.parametrize("mode", ["cone", "fullcone"])
def test_cone_nats_keep_the_port_for_every_destination(make_lab, mode: str) -> None:
    lab = make_lab(nat_a=mode)
    _echo(lab)
    seen = lab.ask("alice", 40000, *(f"{lab.server}:{p}" for p in ECHO_PORTS))
    assert seen == [f"{lab.info['PUB_A']}:40000"] * 3


def test_symmetric_nat_picks_a_new_port_per_destination(make_lab) -> None:
    lab = make_lab(nat_a="symmetric")
    _echo(lab)
    seen = lab.ask("alice", 40000, *(f"{lab.server}:{p}" for p in ECHO_PORTS))
    assert all(s.startswith(lab.info["PUB_A"] + ":") for s in seen), seen
    assert len(set(seen)) > 1, f"the same public port for three destinations: {seen}"


@pytest.mark.parametrize("mode, reached", [("fullcone", True), ("cone", False)])
def test_only_fullcone_lets_a_stranger_in_on_a_mapped_port(make_lab, mode: str,
                                                            reached: bool) -> None:
    lab = make_lab(nat_a=mode)
    _echo(lab)
    # Alice maps 40000 by talking to the server; Bob, never contacted, sends to that port.
    listener = lab.probe("alice", "listen", "40000", "3", f"{lab.server}:7001")
    lab.wait_line(listener)
    time.sleep(0.2)  # let "open" cross NAT A first
    lab.ask("bob", 40001, f"{lab.info['PUB_A']}:40000")
    out, _ = lab.stop(listener)
    assert (f"{lab.info['PUB_B']}:40001" in out.split()) is reached, out


def test_udpblock_lets_udp_reach_only_the_server(make_lab) -> None:
    """udpblock: UDP from the LAN reaches the server's address on any port (rendezvous,
    probes, relay), through a cone mapping; UDP toward anyone else is dropped and
    counted, even where the other side's NAT would let it in."""
    lab = make_lab(nat_a="udpblock")
    _echo(lab)
    seen = lab.ask("alice", 40000, *(f"{lab.server}:{p}" for p in ECHO_PORTS))
    assert seen == [f"{lab.info['PUB_A']}:40000"] * 3
    # Bob opens his cone NAT toward Alice's mapping; her datagram to him never leaves NAT A
    listener = lab.probe("bob", "listen", "40001", "2", f"{lab.info['PUB_A']}:40000")
    lab.wait_line(listener)
    assert lab.ask("alice", 40000, f"{lab.info['PUB_B']}:40001") == ["-"]
    out, _ = lab.stop(listener)
    assert lab.info["PUB_A"] not in out, out
    rules = lab.run("nat-a", ["nft", "list", "chain", "ip", "wgpunch_lab", "router_fwd"]).stdout
    (line,) = [x for x in rules.splitlines() if "udp blocked" in x]
    assert int(line.split("packets ")[1].split()[0]) >= 1, line
    # the reverse direction (Bob to Alice) is just as closed: WireGuard never handshakes
    _set_endpoints_by_hand(lab, f"{lab.info['PUB_B']}:51820", f"{lab.info['PUB_A']}:51820")
    assert not lab.wait_handshake("alice", 6) and not lab.wait_handshake("bob", 1)


def test_double_nat_maps_through_two_cone_routers(make_lab) -> None:
    """double: Alice's home router has a shared address (100.64.1.2) on its WAN, behind a
    carrier NAT with the public address; both keep the port, so the server sees one cone
    mapping, both routers hold the flow, and a tunnel works with endpoints set by hand."""
    lab = make_lab(nat_a="double")
    assert Path(f"/run/netns/{lab.prefix}-cgn-a").exists()
    assert not Path(f"/run/netns/{lab.prefix}-cgn-b").exists()
    wan = lab.run("nat-a", ["ip", "-4", "-o", "addr", "show", "dev", "wan"]).stdout
    assert "100.64.1.2/24" in wan, wan
    _echo(lab)
    seen = lab.ask("alice", 40000, *(f"{lab.server}:{p}" for p in ECHO_PORTS))
    assert seen == [f"{lab.info['PUB_A']}:40000"] * 3
    assert "sport=40000" in lab.conntrack("a")  # the home router's flow...
    carrier = lab.run("cgn-a", ["conntrack", "-L", "-p", "udp"], check=False).stdout
    assert "src=100.64.1.2" in carrier and "sport=40000" in carrier, carrier  # ...and the carrier's
    _set_endpoints_by_hand(lab, f"{lab.info['PUB_B']}:51820", f"{lab.info['PUB_A']}:51820")
    assert lab.wait_handshake("alice", 15) and lab.wait_handshake("bob", 15)
    assert lab.ping("alice", lab.info["BOB_TUN"]) and lab.ping("bob", lab.info["ALICE_TUN"])


def test_routers_drop_unsolicited_packets_without_a_trace(make_lab) -> None:
    lab = make_lab()
    assert lab.ask("bob", 51000, f"{lab.info['PUB_A']}:51820") == ["-"]
    # No unreplied conntrack entry is left on NAT A for that stray packet (it would
    # push Alice's next flow to Bob onto another public port).
    assert lab.info["PUB_B"] not in lab.conntrack("a")


def _set_endpoints_by_hand(lab: Lab, alice_sees_bob: str, bob_sees_alice: str) -> None:
    lab.run("alice", ["wg", "set", "wg0", "peer", lab.info["BOB_PUBKEY"],
                      "endpoint", alice_sees_bob, "persistent-keepalive", "25"])
    lab.run("bob", ["wg", "set", "wg0", "peer", lab.info["ALICE_PUBKEY"],
                    "endpoint", bob_sees_alice, "persistent-keepalive", "25"])


@pytest.mark.parametrize("nat_a", ["cone", "fullcone"])
def test_wireguard_tunnel_through_cone_nats_with_endpoints_set_by_hand(make_lab,
                                                                        nat_a: str) -> None:
    lab = make_lab(nat_a=nat_a)
    _set_endpoints_by_hand(lab, f"{lab.info['PUB_B']}:51820", f"{lab.info['PUB_A']}:51820")
    assert lab.wait_handshake("alice", 15) and lab.wait_handshake("bob", 15)
    assert lab.ping("alice", lab.info["BOB_TUN"])
    assert lab.ping("bob", lab.info["ALICE_TUN"])


def test_rebind_moves_the_host_to_a_new_public_port(make_lab) -> None:
    lab = make_lab()
    _set_endpoints_by_hand(lab, f"{lab.info['PUB_B']}:51820", f"{lab.info['PUB_A']}:51820")
    assert lab.wait_handshake("bob", 15)
    assert lab.ping("alice", lab.info["BOB_TUN"], count=1)

    new = lab.script("rebind", "a").stdout.strip()
    assert new == f"{lab.info['PUB_A']}:40001"
    # Bob still sends to the old mapping, which NAT A has forgotten: the tunnel is down...
    assert not lab.ping("bob", lab.info["ALICE_TUN"], count=2)
    # ...Alice's packets now leave from the new port...
    lab.ping("alice", lab.info["BOB_TUN"], count=1)
    assert "dport=40001" in lab.conntrack("a")
    # ...and it works again once Bob is told the new endpoint.
    lab.run("bob", ["wg", "set", "wg0", "peer", lab.info["ALICE_PUBKEY"], "endpoint", new])
    assert lab.ping_until("bob", lab.info["ALICE_TUN"], 15)
    assert lab.script("rebind", "a").stdout.strip() == f"{lab.info['PUB_A']}:40002"


@pytest.mark.parametrize("nat, what", [("a", "request"), ("b", "reply")])
def test_drop_loses_exactly_the_next_n_rendezvous_packets(make_lab, nat: str, what: str) -> None:
    lab = make_lab()
    _echo(lab, "server", "49918")
    host = "alice" if nat == "a" else "bob"
    pub = lab.info["PUB_A" if nat == "a" else "PUB_B"]
    lab.script("drop", nat, what, "2")
    seen = lab.ask(host, 40000, *[lab.rdv] * 4)
    assert seen == ["-", "-", f"{pub}:40000", f"{pub}:40000"]
    assert lab.drops(nat) == 2
    # other UDP is untouched
    _echo(lab, "server", "7001")
    assert lab.ask(host, 40001, f"{lab.server}:7001") == [f"{pub}:40001"]


# -- IPv6: routed /64s from 2001:db8::/32, stateful firewalls on the routers, no NAT66 ----

def _v6(addr: str, port: int | str) -> str:
    return f"[{addr}]:{port}"


def test_ipv6_adds_dual_stack_without_nat66(make_lab) -> None:
    lab = make_lab(ipv6=True)
    assert lab.info["IPV6"] == "1" and lab.info["NAT_A"] == "cone"
    _echo(lab)
    # IPv4 still leaves through NAT A's public address; IPv6 leaves with Alice's own.
    assert lab.ask("alice", 40000, f"{lab.server}:7001",
                   _v6(lab.info["SRV_ADDR6"], 7001)) == [
        f"{lab.info['PUB_A']}:40000", _v6(lab.info["ALICE_ADDR6"], 40000)]
    assert lab.ask("bob", 40000, _v6(lab.info["SRV_ADDR6"], 7002)) == [
        _v6(lab.info["BOB_ADDR6"], 40000)]
    addrs = lab.run("alice", ["ip", "-6", "-o", "addr", "show", "dev", "eth0"]).stdout
    assert lab.info["ALICE_ADDR6"] + "/64" in addrs


def test_without_ipv6_the_lab_has_none(make_lab) -> None:
    lab = make_lab()
    assert lab.info["IPV6"] == "0" and "ALICE_ADDR6" not in lab.info
    assert lab.run("alice", ["ip", "-6", "-o", "addr"]).stdout.strip() == ""


def test_fw6_is_an_ipv6_only_access_network(make_lab) -> None:
    lab = make_lab("fw6", "cone")
    assert lab.info["IPV6"] == "1"  # fw6 turns IPv6 on for the whole lab
    assert lab.info["ALICE_RDV"] == _v6(lab.info["SRV_ADDR6"], lab.info["RDV_PORT"])
    assert lab.info["BOB_RDV"] == lab.rdv
    _echo(lab)
    assert lab.ask("alice", 40000, f"{lab.server}:7001",
                   _v6(lab.info["SRV_ADDR6"], 7001)) == ["-", _v6(lab.info["ALICE_ADDR6"], 40000)]
    assert lab.ask("bob", 40000, f"{lab.server}:7001",
                   _v6(lab.info["SRV_ADDR6"], 7001)) == [
        f"{lab.info['PUB_B']}:40000", _v6(lab.info["BOB_ADDR6"], 40000)]
    r = lab.script("rebind", "a", check=False)
    assert r.returncode != 0 and "fw6" in r.stderr


@pytest.mark.parametrize("modes", [("fw6", "fw6"), ("cone", "cone")], ids=["fw6", "cone-ipv6"])
def test_ipv6_firewall_drops_unsolicited_inbound_and_lets_replies_in(
        make_lab, modes: tuple[str, str]) -> None:
    lab = make_lab(*modes, ipv6=True)
    _echo(lab)
    alice, bob = lab.info["ALICE_ADDR6"], lab.info["BOB_ADDR6"]
    # Alice opens a flow to the server from 40000; the server's replies come back in.
    listener = lab.probe("alice", "listen", "40000", "3", _v6(lab.info["SRV_ADDR6"], 7001))
    lab.wait_line(listener)
    time.sleep(0.2)
    before = lab.fw6_dropped("a")
    # Bob, whom Alice never sent to, tries the same port, and a port nobody opened.
    assert lab.ask("bob", 40001, _v6(alice, 40000), _v6(alice, 40002)) == ["-", "-"]
    out, err = lab.stop(listener)
    # Only the server's echo of Alice's "open" got through: a reply to her own flow.
    assert out.split() == [_v6(lab.info["SRV_ADDR6"], 7001)], out + err
    assert lab.fw6_dropped("a") - before == 2  # both reached router A and died there
    # Replies to what Alice sent are let in.
    assert lab.ask("alice", 40003, _v6(lab.info["SRV_ADDR6"], 7002)) == [_v6(alice, 40003)]
    # The punch: once Alice has sent to Bob's address:port, Bob's datagrams from there
    # are replies to her flow and pass (her "open" itself died at Bob's firewall).
    before_b = lab.fw6_dropped("b")
    listener = lab.probe("alice", "listen", "40004", "3", _v6(bob, 40005))
    lab.wait_line(listener)
    time.sleep(0.2)
    lab.ask("bob", 40005, _v6(alice, 40004))
    out, _ = lab.stop(listener)
    assert _v6(bob, 40005) in out.split(), out
    assert lab.fw6_dropped("b") - before_b == 1


def _set_endpoint(lab: Lab, host: str, endpoint: str) -> None:
    peer = lab.info["BOB_PUBKEY" if host == "alice" else "ALICE_PUBKEY"]
    lab.run(host, ["wg", "set", "wg0", "peer", peer, "endpoint", endpoint,
                   "persistent-keepalive", "25"])


def test_wireguard_tunnel_over_ipv6_forms_when_both_send(make_lab) -> None:
    lab = make_lab("fw6", "fw6")
    a6 = _v6(lab.info["ALICE_ADDR6"], 51820)
    b6 = _v6(lab.info["BOB_ADDR6"], 51820)
    _set_endpoint(lab, "alice", b6)
    _set_endpoint(lab, "bob", a6)
    assert lab.wait_handshake("alice", 15) and lab.wait_handshake("bob", 15)
    assert lab.ping("alice", lab.info["BOB_TUN"])
    assert lab.ping("bob", lab.info["ALICE_TUN"])
    assert lab.endpoint("alice") == b6 and lab.endpoint("bob") == a6


def test_ipv6_firewall_keeps_out_a_peer_the_host_never_sent_to(make_lab) -> None:
    lab = make_lab("fw6", "fw6")
    # Only Bob knows where Alice is: his handshakes die at Alice's firewall.
    _set_endpoint(lab, "bob", _v6(lab.info["ALICE_ADDR6"], 51820))
    assert not lab.wait_handshake("bob", 6), "an unsolicited handshake crossed the firewall"
    assert lab.handshake("alice") == 0
    assert lab.fw6_dropped("a") >= 1, "Bob's handshake never reached router A: proves nothing"
    # The same two peers connect as soon as Alice sends too: it was the firewall.
    _set_endpoint(lab, "alice", _v6(lab.info["BOB_ADDR6"], 51820))
    assert lab.wait_handshake("alice", 15) and lab.wait_handshake("bob", 15)
    assert lab.ping("bob", lab.info["ALICE_TUN"])


def test_drop_also_loses_ipv6_rendezvous_packets(make_lab) -> None:
    lab = make_lab("fw6", "fw6")
    _echo(lab, "server", "49918")
    srv6 = _v6(lab.info["SRV_ADDR6"], 49918)
    lab.script("drop", "a", "request", "1")
    assert lab.ask("alice", 40000, srv6, srv6) == ["-", _v6(lab.info["ALICE_ADDR6"], 40000)]
    assert lab.drops("a") == 1


def test_exec_rejects_unknown_hosts(make_lab) -> None:
    lab = make_lab()
    r = lab.script("exec", "mallory", "true", check=False)
    assert r.returncode != 0 and "unknown host 'mallory'" in r.stderr


def test_punch_and_demo_refuse_bad_arguments() -> None:
    env = script_env(new_prefix())
    for args, want in ((["punch", "mallory"], "alice or bob, not 'mallory'"),
                       (["demo", "--stagger", "soon"], "--stagger wants seconds, not 'soon'")):
        r = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                           env=env, timeout=60)
        assert r.returncode != 0 and want in r.stderr, r.stderr


def test_up_refuses_a_bad_nat_mode_and_leaves_nothing() -> None:
    prefix = new_prefix()
    r = subprocess.run(["bash", str(SCRIPT), "up", "--nat-a", "carrier-grade"], capture_output=True,
                       text=True, env=script_env(prefix), timeout=60)
    assert r.returncode != 0 and "unknown NAT mode 'carrier-grade'" in r.stderr
    assert leftovers(prefix) == []


def test_a_second_up_fails_and_does_not_break_the_first(make_lab) -> None:
    lab = make_lab()
    with pytest.raises(LabError, match="already exists"):
        lab.script("up")
    assert lab.ping("alice", lab.server, count=1)


def test_down_removes_everything_and_is_idempotent(make_lab) -> None:
    lab = make_lab()
    stray = lab.popen("server", ["sleep", "600"])  # started through `exec`, never stopped by us
    lab.procs.remove(stray)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{stray.pid}/cmdline").read_bytes() != b"sleep\x00600\x00":
        assert time.monotonic() < deadline, "the stray process did not start"
        time.sleep(0.02)
    pids = lab.pids()
    assert len(Lab.alive(pids)) == len(pids) >= 2  # holders (+ wireguard-go)
    lab.script("down")
    assert stray.wait(10) is not None
    assert Lab.alive(pids) == []
    assert leftovers(lab.prefix) == []
    assert lab.script("down").returncode == 0


def test_down_cleans_up_a_broken_lab(make_lab) -> None:
    lab = make_lab()
    pids = lab.pids()
    subprocess.run(["ip", "netns", "del", f"{lab.prefix}-inet"], check=True)
    (STATE_ROOT / lab.prefix / "config").unlink()
    lab.script("down")
    assert Lab.alive(pids) == []
    assert leftovers(lab.prefix) == []


def test_help_teaches() -> None:
    r = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, timeout=10)
    assert r.returncode == 0
    for word in ("demo", "up", "down", "exec", "status", "rebind", "drop", "fullcone", "symmetric",
                 "fw6", "lan-nohairpin", "hairpin", "--ipv6", "--v2", "2001:db8", "LAB_PREFIX"):
        assert word in r.stdout


def test_probe_usage_is_documented() -> None:
    r = subprocess.run([sys.executable, PROBE, "nonsense"], capture_output=True, text=True,
                       timeout=10)
    assert r.returncode == 2 and "echo PORT" in r.stderr


def _kernel_wireguard_works() -> bool:
    with Netns("kwg") as ns:
        r = ns.run(["ip", "link", "add", "wgprobe", "type", "wireguard"], check=False)
        return r.returncode == 0


def test_auto_picks_kernel_wireguard_exactly_when_it_works(make_lab) -> None:
    lab = make_lab()
    assert lab.info["WG_IMPL"] == ("kernel" if _kernel_wireguard_works() else "userspace")


def test_forcing_kernel_wireguard_without_it_fails_cleanly() -> None:
    if _kernel_wireguard_works():
        pytest.skip("kernel WireGuard works here")
    prefix = new_prefix()
    r = subprocess.run(["bash", str(SCRIPT), "up"], capture_output=True, text=True, timeout=60,
                       env=script_env(prefix, LAB_WG="kernel"))
    assert r.returncode != 0 and "LAB_WG=kernel" in r.stderr
    assert leftovers(prefix) == []
