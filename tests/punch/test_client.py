"""The real wg-punch process against real wireguard-go and a real server, in a namespace.

Two WireGuard devices in one namespace, each with the other as a peer and no endpoint,
and wg-rendezvous on the namespace's loopback: after wg-punch ran for both, each has
the other's endpoint and they complete a handshake. No NAT here (the lab tests that).
"""

from __future__ import annotations

import base64
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.nstools import Netns, py_env, unique_ifname

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("needs_wireguard_go")]


def keypair(ns: Netns) -> tuple[str, str]:
    priv = ns.run(["wg", "genkey"]).stdout.strip()
    pub = ns.run(["wg", "pubkey"], input=priv).stdout.strip()
    return priv, pub


class Pair:
    """Alice and Bob: two wireguard-go devices in NS, peers of each other, no endpoints."""

    def __init__(self, ns: Netns, ports=(51820, 51821)) -> None:
        self.ns = ns
        self.ifs = [unique_ifname("wpa"), unique_ifname("wpb")]
        self.keys = [keypair(ns), keypair(ns)]
        self.ports = ports
        for i, ifn in enumerate(self.ifs):
            ns.start_wireguard_go(ifn)
            priv, _ = self.keys[i]
            _, peer_pub = self.keys[1 - i]
            ns.run(["wg", "set", ifn, "listen-port", str(ports[i]), "private-key", "/dev/stdin",
                    "peer", peer_pub, "allowed-ips", f"10.77.0.{2 - i}/32"], input=priv)
            ns.run(["ip", "addr", "add", f"10.77.0.{i + 1}/24", "dev", ifn])

    def dump(self, i: int) -> list[list[str]]:
        out = self.ns.run(["wg", "show", self.ifs[i], "dump"]).stdout.strip().splitlines()
        return [line.split("\t") for line in out[1:]]


@pytest.fixture
def ns():
    with Netns("cl") as n:
        yield n


def start_server(ns: Netns, *args: str) -> int:
    p = ns.python(["-m", "rendezvous", "--listen", "127.0.0.1", "--port", "0", "--rate", "0", *args],
                  text=True)
    for line in p.stderr:
        m = re.search(r"listening on [\d.]+:(\d+)", line)
        if m:
            return int(m.group(1))
    raise AssertionError("server did not start")


def punch(ns: Netns, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return ns.run([sys.executable, "-m", "punch", *args], check=False, timeout=timeout)


def registered_at(ns: Netns, port: int, pub: str) -> int | None:
    """The port the server at 127.0.0.1:PORT holds for key PUB (a classic lookup from
    an unregistered key), or None if it holds none or does not answer."""
    with ns.entered():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with s:
        s.settimeout(1)
        s.sendto(bytes(range(1, 33)) + base64.b64decode(pub), ("127.0.0.1", port))
        try:
            reply = s.recv(64)
        except TimeoutError:
            return None
    return int.from_bytes(reply[4:6], "big") if len(reply) == 6 else None


def register_from_elsewhere(ns: Netns, port: int, pub: str) -> int:
    """Register key PUB at the server 127.0.0.1:PORT from a fresh UDP port (as a client
    behind a NAT that rebinds would); return that port once the server holds it."""
    with ns.entered():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with s:
        s.settimeout(1)
        s.bind(("127.0.0.1", 0))
        s.sendto(base64.b64decode(pub) * 2, ("127.0.0.1", port))  # a self lookup
        reply = s.recv(64)
        mine = s.getsockname()[1]
    assert reply == socket.inet_aton("127.0.0.1") + mine.to_bytes(2, "big"), reply
    return mine


def test_two_peers_find_each_other_and_handshake(ns):
    pair = Pair(ns)
    port = start_server(ns)
    server = f"127.0.0.1:{port}"
    a = ns.popen([sys.executable, "-m", "punch", "--wait", "--timeout", "20", server, pair.ifs[0]])
    time.sleep(0.3)
    b = punch(ns, "--wait", "--timeout", "20", server, pair.ifs[1])
    assert b.returncode == 0, b.stderr
    assert a.wait(25) == 0
    a_err = a.stderr.read().decode()
    peer_of_a, peer_of_b = pair.dump(0)[0], pair.dump(1)[0]
    assert peer_of_a[2] == "127.0.0.1:51821" and peer_of_b[2] == "127.0.0.1:51820"
    assert peer_of_a[7] == "25" and peer_of_b[7] == "25", (a_err, b.stderr)  # persistent keepalive
    assert int(peer_of_a[4]) > 0 and int(peer_of_b[4]) > 0  # latest handshake
    assert "endpoint 127.0.0.1:51820 (no endpoint)" in b.stderr
    assert re.search(r"counters: requests=1 replies=1 lost=0 late=0 malformed=0 applied=1 "
                     r"ignored_packets=\d+", b.stderr), b.stderr


def test_unknown_peer_exits_7_and_names_it(ns):
    pair = Pair(ns)
    port = start_server(ns)
    r = punch(ns, "--timeout", "2", f"127.0.0.1:{port}", pair.ifs[0])
    assert r.returncode == 7, r.stderr
    short = pair.keys[1][1][:8]
    assert f"the server does not know peer(s) {short}…" in r.stderr


def test_silent_server_exits_6(ns):
    pair = Pair(ns)
    r = punch(ns, "--timeout", "2", "127.0.0.1:9", pair.ifs[0])
    assert r.returncode == 6
    assert "no reply from the server 127.0.0.1:9 within 2s" in r.stderr.splitlines()[-1]


def test_no_handshake_with_wait_exits_8(ns):
    """The server reports an endpoint where nobody answers: --wait says so and why."""
    pair = Pair(ns)
    port = start_server(ns)
    # Register Bob's key from a port where no WireGuard listens.
    ns.run([sys.executable, "-c", f"""
import socket, base64
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 40404))
k = base64.b64decode("{pair.keys[1][1]}")
s.sendto(k + k, ("127.0.0.1", {port})); s.settimeout(2); s.recv(64)
"""])
    r = punch(ns, "--wait", "--timeout", "4", f"127.0.0.1:{port}", pair.ifs[0])
    assert r.returncode == 8, r.stderr
    assert "no handshake with" in r.stderr and "127.0.0.1:40404" in r.stderr
    assert "symmetric" in r.stderr


def test_peer_option_limits_the_set(ns):
    pair = Pair(ns)
    port = start_server(ns)
    other = base64.b64encode(bytes(range(32))).decode()
    r = punch(ns, "--timeout", "2", "--peer", other, f"127.0.0.1:{port}", pair.ifs[0])
    assert r.returncode == 4 and "has no peer" in r.stderr


def test_missing_interface_exits_4(ns):
    r = punch(ns, "127.0.0.1", "wgnothere0")
    assert r.returncode == 4
    assert r.stderr.strip() == "wg-punch: interface wgnothere0 does not exist"


def test_interface_without_peers_exits_4(ns):
    ifn = unique_ifname("wpe")
    ns.start_wireguard_go(ifn)
    priv, _ = keypair(ns)
    ns.run(["wg", "set", ifn, "listen-port", "51830", "private-key", "/dev/stdin"], input=priv)
    r = punch(ns, "127.0.0.1", ifn)
    assert r.returncode == 4 and r.stderr.strip() == f"wg-punch: {ifn} has no peers"


def test_without_cap_net_raw_exits_3(ns):
    pair = Pair(ns)
    r = ns.run(["setpriv", "--bounding-set=-net_raw", sys.executable, "-m", "punch",
                "127.0.0.1", pair.ifs[0]], check=False)
    assert r.returncode == 3
    assert r.stderr.strip() == "wg-punch: opening a raw socket needs root (CAP_NET_RAW)"


def test_unresolvable_server_exits_5():
    r = subprocess.run([sys.executable, "-m", "punch", "no-such-host.invalid", "wg0"],
                       capture_output=True, text=True, timeout=30, env=py_env())
    assert r.returncode == 5 and "cannot resolve server 'no-such-host.invalid'" in r.stderr


@pytest.mark.parametrize("args,msg", [
    (["--peer", "abc", "s", "wg0"], "not a WireGuard public key"),
    (["--timeout", "0", "s", "wg0"], "must be a positive number"),
    (["--keepalive", "0", "s", "wg0"], "keepalive must be 1..65535"),
    (["s"], "the following arguments are required"),
])
def test_bad_arguments_exit_2(args, msg):
    r = subprocess.run([sys.executable, "-m", "punch", *args], capture_output=True, text=True, env=py_env(),
                       timeout=30)
    assert r.returncode == 2 and msg in r.stderr


def test_daemon_picks_up_a_new_peer_and_stops_cleanly(ns):
    pair = Pair(ns)
    port = start_server(ns)
    server = f"127.0.0.1:{port}"
    # Bob registers once; Alice's daemon starts with no peers but Bob... then Bob is added.
    c = ns.run([sys.executable, "-m", "punch", "--timeout", "5", server, pair.ifs[1]], check=False)
    assert c.returncode == 7  # Alice unknown yet; Bob is registered now
    bob_pub = pair.keys[1][1]
    carol_priv, carol_pub = keypair(ns)
    ns.run(["wg", "set", pair.ifs[0], "peer", bob_pub, "remove", "peer", carol_pub,
            "allowed-ips", "10.77.0.9/32"])
    d = ns.popen([sys.executable, "-m", "punch", "--daemon", "--interval", "2", server,
                  pair.ifs[0]])
    time.sleep(1.5)
    ns.run(["wg", "set", pair.ifs[0], "peer", bob_pub, "allowed-ips", "10.77.0.2/32"])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        peers = {row[0]: row for row in pair.dump(0)}
        if peers.get(bob_pub, [""] * 3)[2] == "127.0.0.1:51821":
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"the daemon did not pick up the new peer: {pair.dump(0)}")
    d.send_signal(signal.SIGTERM)
    assert d.wait(10) == 0
    log = d.stderr.read().decode()
    assert "(daemon)" in log and "endpoint 127.0.0.1:51821" in log


def test_a_daemon_follows_a_new_listen_port_even_when_the_first_reopen_fails(ns):
    """WireGuard's listen port changes under a running daemon, at a moment when its new
    raw socket cannot take the reply filter (the namespace's option memory,
    net.core.optmem_max, is cut to 64 bytes). The daemon keeps its old channel, says so
    once, and tries again at each device read; once the filter fits again it sends from
    the new port, so the server, and then Bob, learn Alice's new endpoint."""
    pair = Pair(ns)
    port = start_server(ns)
    server = f"127.0.0.1:{port}"
    alice, bob = pair.ifs
    d = ns.popen([sys.executable, "-m", "punch", "--daemon", "--interval", "1", server, alice])
    _, alice_pub = pair.keys[0]
    deadline = time.monotonic() + 15
    while registered_at(ns, port, alice_pub) != 51820 and time.monotonic() < deadline:
        time.sleep(0.2)
    # The first request leaves before the daemon arms its filter. Move Alice's entry
    # away and wait for a later request to move it back: that one comes from the
    # daemon's loop, so its filter is on before the option memory is cut.
    elsewhere = register_from_elsewhere(ns, port, alice_pub)
    assert elsewhere != 51820
    while registered_at(ns, port, alice_pub) != 51820 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert d.poll() is None, d.stderr.read().decode() if d.stderr else ""
    optmem = ns.run(["sysctl", "-n", "net.core.optmem_max"]).stdout.strip()
    ns.run(["sysctl", "-qw", "net.core.optmem_max=64"])
    try:
        ns.run(["wg", "set", alice, "listen-port", "51840"])
        time.sleep(3)  # three device reads, three failed reopens
        alive = d.poll() is None
        stale = registered_at(ns, port, alice_pub)
    finally:
        ns.run(["sysctl", "-qw", f"net.core.optmem_max={optmem}"])
    deadline = time.monotonic() + 10
    while alive and registered_at(ns, port, alice_pub) != 51840 and time.monotonic() < deadline:
        time.sleep(0.2)
    moved = registered_at(ns, port, alice_pub)
    r = punch(ns, "--timeout", "5", server, bob)
    d.send_signal(signal.SIGTERM)
    code = d.wait(10)
    assert d.stderr is not None
    err = d.stderr.read().decode()
    assert alive, f"the daemon exited when it could not reopen its channel:\n{err}"
    assert stale == 51820, err  # meanwhile it went on from the old port
    assert moved == 51840, err
    assert r.returncode == 0 and pair.dump(1)[0][2] == "127.0.0.1:51840", r.stderr
    assert code == 0, err
    assert err.count("cannot reopen the channels on port 51840") == 1, err
    assert "reopened the channels on port 51840" in err, err


def test_a_filter_the_kernel_refuses_at_start_is_one_line_and_exit_1(ns):
    """The reply filter does not fit the socket's option memory (net.core.optmem_max cut
    to 64 bytes in the namespace): wg-punch says why in one line and exits 1, with no
    traceback, whether one-shot or a daemon."""
    pair = Pair(ns)
    port = start_server(ns)
    optmem = ns.run(["sysctl", "-n", "net.core.optmem_max"]).stdout.strip()
    ns.run(["sysctl", "-qw", "net.core.optmem_max=64"])
    try:
        runs = [punch(ns, *mode, f"127.0.0.1:{port}", pair.ifs[0])
                for mode in (("--timeout", "5"), ("--daemon",))]
    finally:
        ns.run(["sysctl", "-qw", f"net.core.optmem_max={optmem}"])
    for r in runs:
        assert r.returncode == 1, r.stderr
        errors = [line for line in r.stderr.splitlines() if "ERROR" in line or
                  line.startswith("wg-punch:")]
        assert len(errors) == 1, r.stderr
        assert "cannot attach the reply filter" in errors[0], r.stderr
        assert "optmem_max" in errors[0], r.stderr
        assert "Traceback" not in r.stderr, r.stderr


def test_a_daemon_outlives_its_interface_going_away_and_coming_back(ns):
    """wg-quick down/up, or wireguard-go restarted, while the daemon runs: the interface
    is gone when the daemon has an endpoint to set (the peer moved meanwhile). The
    daemon says so and carries on; once the interface is back (the same key and port,
    the peer without an endpoint, as a config file makes it) it sets the peer's
    endpoint there."""
    pair = Pair(ns)
    port = start_server(ns)
    server = f"127.0.0.1:{port}"
    d = ns.popen([sys.executable, "-m", "punch", "--daemon", "--interval", "1", server,
                  pair.ifs[0]])
    r = punch(ns, "--wait", "--timeout", "20", server, pair.ifs[1])
    assert r.returncode == 0, r.stderr
    alice, bob = pair.ifs
    _, bob_pub = pair.keys[1]
    deadline = time.monotonic() + 10
    while pair.dump(0)[0][2] != "127.0.0.1:51821" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert pair.dump(0)[0][2] == "127.0.0.1:51821"
    ns.run(["ip", "link", "del", alice])  # wireguard-go ends with its interface
    ns.run(["wg", "set", bob, "listen-port", "51831"])
    r = punch(ns, "--timeout", "10", server, bob)  # Bob registers from his new port
    assert r.returncode == 0, r.stderr
    time.sleep(3)  # Alice's daemon re-asks each second: Bob moved, and there is no wg0
    alive = d.poll() is None
    ns.start_wireguard_go(alice)
    priv, _ = pair.keys[0]
    ns.run(["wg", "set", alice, "listen-port", "51820", "private-key", "/dev/stdin",
            "peer", bob_pub, "allowed-ips", "10.77.0.2/32"], input=priv)
    deadline = time.monotonic() + 15
    while alive and pair.dump(0)[0][2] != "127.0.0.1:51831" and time.monotonic() < deadline:
        time.sleep(0.3)
    back = pair.dump(0)[0][2]
    d.send_signal(signal.SIGTERM)
    code = d.wait(10)
    assert d.stderr is not None
    err = d.stderr.read().decode()
    assert alive, f"the daemon exited without its interface:\n{err}"
    assert back == "127.0.0.1:51831", err
    assert code == 0, err
    assert re.search(rf"cannot set peer \S+ on {alice}: ", err), err
