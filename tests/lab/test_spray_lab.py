"""The spray (issue 7: one side symmetric) in the netns lab, protocol v2 with NAT
verdicts: the symmetric NAT allocates from a port block (LAB_SYM_PORTS, as
port-block-allocating CGNATs do, RFC 7422; the lab's plain symmetric NAT picks from
1024-65535, which no bounded spray covers). The easy side sprays empty datagrams over a
port window toward the symmetric side's reported address; the symmetric side's
WireGuard initiates to the easy side's endpoint; roaming does the rest.

Each direction runs several times in one lab (the server restarted, the peers re-added
and both NATs' conntrack flushed between runs). The router counts the spray: exactly
the configured number of empty datagrams (plus the one empty "poke" every endpoint set
sends) leave the easy side toward the symmetric side's address, and none toward any
other address."""

from __future__ import annotations

import re
import time

import pytest

from tests.lab.lablib import Lab

pytestmark = pytest.mark.lab

PROBE_PORT = 49919
RELAY_PORT = "49920"
BLOCK = (40000, 40255)
RUNS = 3
LIMIT = 10.0  # seconds from the second client's start to a handshake on both sides


def _count_rule(lab: Lab, nat: str, hard_pub: str) -> None:
    """Count empty UDP datagrams from WireGuard's port leaving NAT's LAN, by destination."""
    for match in (f"ip daddr {hard_pub}", f"ip daddr != {hard_pub}"):
        lab.run(f"nat-{nat}", ["nft", "add", "rule", "ip", "wgpunch_lab", "drops",
                               "iifname", "lan", *match.split(), "udp", "sport", "51820",
                               "udp", "length", "8", "counter"])


def _counts(lab: Lab, nat: str) -> list[int]:
    out = lab.run(f"nat-{nat}", ["nft", "list", "chain", "ip", "wgpunch_lab", "drops"]).stdout
    return [int(n) for n in re.findall(r"counter packets (\d+)", out)]


def _drew_the_same_port(log: str) -> bool:
    """Did this side's NAT check see one public port from both of the server's ports,
    although the port is not WireGuard's own (a symmetric NAT's chance collision)?"""
    return re.search(r"NAT \(this host, IPv4\): endpoint-independent mapping, port not "
                     r"preserved;.*\(the server saw \S+ at two ports\)", log) is not None


def _reset(lab: Lab) -> None:
    """Forget the last run: peers re-added without endpoints, both NATs' mappings gone."""
    for host, peer, tun in (("alice", "BOB", "BOB_TUN"), ("bob", "ALICE", "ALICE_TUN")):
        key = lab.info[f"{peer}_PUBKEY"]
        lab.run(host, ["wg", "set", "wg0", "peer", key, "remove"])
        lab.run(host, ["wg", "set", "wg0", "peer", key, "allowed-ips", f"{lab.info[tun]}/32"])
    for nat in ("a", "b"):
        lab.run(f"nat-{nat}", ["conntrack", "-F"], check=False)


@pytest.mark.parametrize(("nat_a", "nat_b"), [("symmetric", "cone"), ("cone", "symmetric")])
def test_spray_gets_a_direct_tunnel_through_one_symmetric_nat(make_lab, tmp_path,
                                                              nat_a: str, nat_b: str) -> None:
    lab = make_lab(nat_a, nat_b, v2=True, probe_port=PROBE_PORT,
                   sym_ports=f"{BLOCK[0]}-{BLOCK[1]}")
    hard, easy = ("alice", "bob") if nat_a == "symmetric" else ("bob", "alice")
    hard_nat, easy_nat = ("a", "b") if hard == "alice" else ("b", "a")
    hard_pub, easy_pub = lab.info[f"PUB_{hard_nat.upper()}"], lab.info[f"PUB_{easy_nat.upper()}"]
    _count_rule(lab, easy_nat, hard_pub)
    times = []
    run = collisions = 0
    while run < RUNS:
        server = lab.start_server()
        a = lab.punch("alice", "--wait", "--timeout", "15", "--state-dir", str(tmp_path / "a"))
        time.sleep(0.3)  # Alice is waiting when Bob starts, as in real life
        start = time.monotonic()
        b = lab.punch("bob", "--wait", "--timeout", "15", "--state-dir", str(tmp_path / "b"))
        logs, codes = {}, {}
        for p, who in ((a, "alice"), (b, "bob")):
            _, err = p.communicate(timeout=30)
            logs[who], codes[who] = err.decode(), p.returncode
        if _drew_the_same_port(logs[hard]):
            # The symmetric NAT drew the same one of its 256 ports for both probes (1 in
            # 256): two samples cannot tell that from an endpoint-independent NAT, so the
            # verdict says so and nobody sprays. Not what this test is about: redo the run.
            collisions += 1
            assert collisions < 3, logs[hard]
            lab.stop(server)
            _reset(lab)
            continue
        for who in ("alice", "bob"):
            assert codes[who] == 0, f"run {run}: wg-punch on {who} exited {codes[who]}:\n" \
                                    f"{logs[who]}"
        assert lab.wait_handshake("alice", LIMIT) and lab.wait_handshake("bob", LIMIT)
        times.append(time.monotonic() - start)
        assert f"sprayed 512 empty datagrams to {hard_pub} ports" in logs[easy], logs[easy]
        assert "sprayed" not in logs[hard].replace("sprayed=0", ""), logs[hard]
        # The hard side set the easy side's endpoint; the easy side's WireGuard followed
        # the hard side's handshake to the port its NAT picked, inside the block.
        assert lab.endpoint(hard) == f"{easy_pub}:51820"
        ip, port = lab.endpoint(easy).rsplit(":", 1)
        assert ip == hard_pub and BLOCK[0] <= int(port) <= BLOCK[1], lab.endpoint(easy)
        assert lab.ping(hard, lab.info[f"{easy.upper()}_TUN"], count=1)
        # Counted at the router: the spray plus one poke, only toward the reported address.
        to_hard, elsewhere = _counts(lab, easy_nat)
        assert (to_hard, elsewhere) == (513 * (run + 1), 0), (
            f"run {run}: {to_hard} empty datagrams toward {hard_pub}, {elsewhere} "
            f"elsewhere; {easy}'s log:\n{logs[easy]}\n{hard}'s log:\n{logs[hard]}")
        lab.stop(server)
        _reset(lab)
        run += 1
    print(f"{nat_a}/{nat_b}: seconds to a handshake on both sides: "
          + ", ".join(f"{t:.2f}" for t in times))
    assert max(times) < LIMIT


def test_without_the_spray_no_direct_tunnel(make_lab, tmp_path) -> None:
    """The control: the same lab with --no-spray on the easy side gives no handshake,
    unless Alice's symmetric NAT happens to pick, toward Bob, the very port it picked
    toward the server (1 in 256; seen once in CI): then the endpoint the server reported
    is right, and Bob's WireGuard never roams from it. Such a run is redone."""
    lab = make_lab("symmetric", "cone", v2=True, probe_port=PROBE_PORT,
                   sym_ports=f"{BLOCK[0]}-{BLOCK[1]}")
    for _ in range(3):
        server = lab.start_server()
        a = lab.punch("alice", "--wait", "--timeout", "7", "--state-dir", str(tmp_path / "a"))
        time.sleep(0.3)
        b = lab.punch("bob", "--wait", "--timeout", "7", "--no-spray", "--state-dir",
                      str(tmp_path / "b"))
        runs = {}
        for p, who in ((a, "alice"), (b, "bob")):
            _, err = p.communicate(timeout=30)
            runs[who] = (p.returncode, err.decode())
        if runs["alice"][0] == runs["bob"][0] == 8:  # no handshake
            return
        told = re.search(r"peer \S+: endpoint (\S+) \(", runs["bob"][1])
        assert told and lab.endpoint("bob") == told.group(1), runs  # else a real tunnel
        lab.stop(server)
        _reset(lab)
    pytest.fail("a direct tunnel without the spray three times in a row")


def test_daemons_keep_the_sprayed_tunnel_across_re_asks(make_lab, tmp_path) -> None:
    """--daemon on both sides: the server keeps reporting the hard side's registered
    port, while the easy side's WireGuard has roamed to the port the hard NAT picked for
    it; re-asking must keep the roamed endpoint (the tunnel works), not undo it."""
    lab = make_lab("symmetric", "cone", v2=True, probe_port=PROBE_PORT,
                   sym_ports=f"{BLOCK[0]}-{BLOCK[1]}")
    for attempt in range(3):
        server = lab.start_server()
        a = lab.punch("alice", "--daemon", "--interval", "2", "--state-dir",
                      str(tmp_path / "a"))
        time.sleep(0.3)
        b = lab.punch("bob", "--daemon", "--interval", "2", "--state-dir", str(tmp_path / "b"))
        if lab.wait_handshake("alice", LIMIT) and lab.wait_handshake("bob", LIMIT):
            break
        lab.stop(b)
        _, a_err = lab.stop(a)
        assert _drew_the_same_port(a_err), a_err  # else a real failure (see the test above)
        lab.stop(server)
        _reset(lab)
    else:
        raise AssertionError("three chance collisions in a row")
    roamed = lab.endpoint("bob")
    time.sleep(5)  # two and a half intervals: each side re-asked a few times
    assert lab.endpoint("bob") == roamed and lab.endpoint("alice") == f"{lab.info['PUB_B']}:51820"
    assert lab.ping("alice", lab.info["BOB_TUN"]) and lab.ping("bob", lab.info["ALICE_TUN"])
    _, b_err = lab.stop(b)
    lab.stop(a)
    assert b_err.count("sprayed 512 empty datagrams") == 1, b_err


def _turn_symmetric(lab: Lab, nat: str) -> None:
    """Make router NAT's source NAT what `up --nat-? symmetric` with LAB_SYM_PORTS makes
    it, under the running hosts, and forget its mappings: the host has moved to a
    network behind a port-block-allocating symmetric NAT."""
    lab.run(f"nat-{nat}", ["nft", "flush", "chain", "ip", "wgpunch_lab", "nat_post"])
    for rule in (["meta", "l4proto", "udp", "masquerade", "to", f":{BLOCK[0]}-{BLOCK[1]}",
                  "fully-random"], ["masquerade", "fully-random"]):
        lab.run(f"nat-{nat}", ["nft", "add", "rule", "ip", "wgpunch_lab", "nat_post",
                               "oifname", "wan", *rule])
    lab.run(f"nat-{nat}", ["conntrack", "-F"], check=False)


def test_a_daemon_whose_nat_turned_symmetric_checks_again_and_gets_its_tunnel(
        make_lab, tmp_path) -> None:
    """Bob's daemon checks its NAT at start (cone: easy), then his router turns into a
    symmetric NAT. Alice (cone) sets his new endpoint and nobody sprays: two easy NATs,
    as far as anybody knows, and no handshake gets through. Bob's daemon notices (a peer
    with our endpoint and no handshake for --nat-recheck seconds), checks again, finds
    the NAT hard and says so in its next requests; Alice's next answer carries it, and
    she sprays for the endpoint she kept. Bob's WireGuard, retrying, gets through."""
    lab = make_lab("cone", "cone", v2=True, probe_port=PROBE_PORT)
    server = lab.start_server()
    b = lab.punch("bob", "--daemon", "--interval", "4", "--nat-recheck", "4",
                  "--state-dir", str(tmp_path / "b"))
    time.sleep(2)  # Bob's check at start is done
    _turn_symmetric(lab, "b")
    a = lab.punch("alice", "--daemon", "--interval", "4", "--nat-recheck", "4",
                  "--state-dir", str(tmp_path / "a"))
    start = time.monotonic()
    up = lab.wait_handshake("alice", 60) and lab.wait_handshake("bob", 10)
    took = time.monotonic() - start
    _, b_err = lab.stop(b)
    _, a_err = lab.stop(a)
    lab.stop(server)
    assert up, f"no handshake:\n--- bob\n{b_err}\n--- alice\n{a_err}"
    print(f"seconds from Alice's start to a handshake on both sides: {took:.1f}")
    assert "NAT (this host, IPv4): endpoint-independent mapping, port preserved" in b_err
    assert re.search(r"NAT \(this host, IPv4\) checked again \(a peer has waited \d+ s for a "
                     r"working tunnel\): now address-and-port-dependent", b_err), b_err
    # the check's reply that also reached Bob's own raw socket is not an unknown reply
    assert re.search(r"counters: .* unknown=0 .*nat_checks=[1-9]\d* nat_changes=1 ", b_err), \
        b_err
    hard_pub = lab.info["PUB_B"]
    assert f"sprayed 512 empty datagrams to {hard_pub} ports" in a_err, a_err
    # Alice's WireGuard followed Bob's handshake to the port his NAT picked for her
    ip, port = lab.endpoint("alice").rsplit(":", 1)
    assert ip == hard_pub and BLOCK[0] <= int(port) <= BLOCK[1]
    assert "checked again" not in a_err.replace("NAT checked again", "")  # hers: unchanged
    assert lab.ping("bob", lab.info["ALICE_TUN"], count=1)


def test_a_tunnel_broken_by_a_nat_change_under_it_is_mended_by_the_re_check(
        make_lab) -> None:
    """The tunnel is up (two cone NATs); then Bob's host moves behind a symmetric NAT
    (his router turns into one and forgets its mappings). Nothing gets through either
    way now: Bob's packets come from a new port, which Alice's port-restricted NAT does
    not let in. Both daemons see nothing arrive for two keepalive periods and check
    their NATs again; Bob's is hard now, Alice learns it with her next answer and
    sprays; Bob's WireGuard, sending (a ping: a user's traffic), gets through."""
    lab = make_lab("cone", "cone", v2=True, probe_port=PROBE_PORT)
    server = lab.start_server()
    args = ("--daemon", "--interval", "4", "--nat-recheck", "4", "--keepalive", "5")
    b = lab.punch("bob", *args)
    a = lab.punch("alice", *args)
    hard_pub, alice_tun = lab.info["PUB_B"], lab.info["ALICE_TUN"]
    up = lab.wait_handshake("alice", 30) and lab.ping_until("bob", alice_tun, 10)
    before = lab.endpoint("alice")
    _turn_symmetric(lab, "b")
    broke = time.monotonic()
    mended = False
    deadline = broke + 100
    while up and time.monotonic() < deadline and not mended:
        ip, port = lab.endpoint("alice").rsplit(":", 1)
        mended = (ip == hard_pub and BLOCK[0] <= int(port) <= BLOCK[1]
                  and lab.ping("bob", alice_tun, count=1))
        if not mended:
            lab.ping("bob", alice_tun, count=1)  # traffic, as a user's (answered or not)
            time.sleep(1)
    took = time.monotonic() - broke
    # wg-punch status on Bob's host shows the check that found the change
    deadline = time.monotonic() + 5
    while True:
        state = lab.status("bob")["state"]
        if state["nat_changes"] or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    _, b_err = lab.stop(b)
    _, a_err = lab.stop(a)
    lab.stop(server)
    assert up, f"no tunnel before the change:\n--- bob\n{b_err}\n--- alice\n{a_err}"
    assert before == f"{hard_pub}:51820"  # the cone NAT kept WireGuard's port
    assert mended, f"not mended:\n--- bob\n{b_err}\n--- alice\n{a_err}"
    print(f"seconds from the NAT change to a mended tunnel: {took:.1f}")
    assert re.search(r"NAT \(this host, IPv4\) checked again \(a peer has waited \d+ s for a "
                     r"working tunnel\): now address-and-port-dependent", b_err), b_err
    assert f"sprayed 512 empty datagrams to {hard_pub} ports" in a_err, a_err
    assert "checked again" not in a_err.replace("NAT checked again", "")  # hers: unchanged
    assert state["nat"] == "address-and-port-dependent" and state["nat_changes"] == 1
    assert state["nat_checks"] >= 1 and state["nat_checked"] > state["started"]


def test_with_a_relay_the_pair_goes_direct_once_the_re_check_finds_the_nat_hard(
        make_lab, tmp_path) -> None:
    """The same turn of Bob's NAT, with a relay at the server: with no handshake after
    --relay-after, both sides go to the relay. Bob's re-check finds his NAT hard (a
    relayed peer has no direct tunnel yet, so it counts as waiting); on her next try of
    the direct path Alice sprays, and Bob starts his try after hers: the pair leaves the
    relay for the direct path."""
    lab = make_lab("cone", "cone", v2=True, probe_port=PROBE_PORT)
    server = lab.start_server("--relay-port", RELAY_PORT)
    args = ("--daemon", "--interval", "4", "--nat-recheck", "4", "--relay-after", "3",
            "--relay-upgrade", "5")
    b = lab.punch("bob", *args, "--state-dir", str(tmp_path / "b"))
    time.sleep(2)  # Bob's check at start is done
    _turn_symmetric(lab, "b")
    a = lab.punch("alice", *args, "--state-dir", str(tmp_path / "a"))
    relay = f"{lab.server}:{RELAY_PORT}"
    hard_pub = lab.info["PUB_B"]
    deadline = time.monotonic() + 60
    direct = False
    while time.monotonic() < deadline and not direct:
        time.sleep(1)
        ip, port = lab.endpoint("alice").rsplit(":", 1)
        if (ip == hard_pub and BLOCK[0] <= int(port) <= BLOCK[1]
                and lab.endpoint("bob") == f"{lab.info['PUB_A']}:51820"):
            # each at the other's public address: a ping through the tunnel now can
            # only go the direct way (a packet through the relay moves WireGuard back)
            direct = lab.ping("alice", lab.info["BOB_TUN"], count=1)
    time.sleep(6)  # past the try's window: the try is judged
    _, b_err = lab.stop(b)
    _, a_err = lab.stop(a)
    lab.stop(server)
    assert direct, f"not direct:\n--- bob\n{b_err}\n--- alice\n{a_err}"
    for err in (a_err, b_err):
        assert f"endpoint {relay} (relay (" in err, err  # relayed first
    assert "off the relay" in a_err + b_err, a_err + b_err  # then direct
    # and it stays so: no relay offer pulls a side back, no re-ask undoes a roam
    for err in (a_err, b_err):
        tail = err[err.rindex("off the relay"):]
        assert "(relay (" not in tail and "peer moved" not in tail, err
    assert re.search(r"checked again \(a peer has waited \d+ s for a working tunnel\): now "
                     r"address-and-port-dependent", b_err), b_err
    assert f"sprayed 512 empty datagrams to {hard_pub} ports" in a_err, a_err
    assert lab.ping("alice", lab.info["BOB_TUN"], count=1)
