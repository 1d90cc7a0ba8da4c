"""The real wg-punch process speaking protocol v2 to the real v2 server (run with
--require-auth, so classic is refused), with real wireguard-go, in namespaces.

- IPv4 on one namespace's loopback: two peers find each other (the second one's
  request completes the pair and the server notifies the first) and handshake.
- Dual stack: the server's name resolves to an IPv4 and an IPv6 address; both clients
  ask over both and set each other's IPv6 endpoint.
- IPv6 between two namespaces joined by a veth pair, no NAT.
- IPv6 that carries the rendezvous but not the tunnel: the IPv6 endpoint gives no
  handshake, and the client falls back to IPv4.
- A wrong --server-key: the server drops every request; the client says so in one
  line with the "server silent" status.
"""

from __future__ import annotations

import base64
import contextlib
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.nstools import Netns, py_env, unique_ifname, veth
from tests.punch.test_client import Pair, keypair, punch

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("needs_wireguard_go")]

PORT = 49918


def server_keys(ns: Netns, tmp_path: Path) -> tuple[Path, str]:
    """A server private key file and its public key, made by wg-rendezvous itself."""
    key = tmp_path / "server.key"
    priv = ns.run([sys.executable, "-m", "rendezvous", "genkey"]).stdout
    key.write_text(priv)
    key.chmod(0o600)
    pub = ns.run([sys.executable, "-m", "rendezvous", "pubkey"], input=priv).stdout.strip()
    return key, pub


def start_server(ns: Netns, key: Path, *listen: str) -> subprocess.Popen[bytes]:
    args = ["-m", "rendezvous", "--port", str(PORT), "--rate", "0", "--key", str(key),
            "--require-auth"]
    for addr in listen:
        args += ["--listen", addr]
    p = ns.python(args)
    assert p.stderr is not None
    for line in p.stderr:
        if b"listening on" in line:
            assert b"v2" in line, line
            return p
    raise AssertionError("the server did not start")


@pytest.fixture
def ns():
    with Netns("c2") as n:
        yield n


@contextlib.contextmanager
def hosts_file(ns: Netns, text: str) -> Iterator[None]:
    """/etc/hosts as seen inside NS (`ip netns exec` bind-mounts /etc/netns/NAME/)."""
    d = Path("/etc/netns") / ns.name
    d.mkdir(parents=True)
    try:
        (d / "hosts").write_text(text)
        yield
    finally:
        shutil.rmtree(d, ignore_errors=True)


def both_punch(ns_a: Netns, ns_b: Netns, server_a: str, server_b: str, ifs: list[str],
               pub: str, *extra: str, timeout: int = 20) -> tuple[str, str]:
    """Alice starts, Bob 0.3 s later; both --wait; both must exit 0. Their logs."""
    a = ns_a.popen([sys.executable, "-m", "punch", "--wait", "--timeout", str(timeout),
                    "--server-key", pub, *extra, server_a, ifs[0]])
    time.sleep(0.3)
    b = ns_b.run([sys.executable, "-m", "punch", "--wait", "--timeout", str(timeout),
                  "--server-key", pub, *extra, server_b, ifs[1]], check=False,
                 timeout=timeout + 10)
    assert a.wait(timeout + 10) == 0, a.stderr.read().decode() if a.stderr else ""
    assert a.stderr is not None
    a_err = a.stderr.read().decode()
    assert b.returncode == 0, (a_err, b.stderr)
    return a_err, b.stderr


def counters(log: str) -> dict[str, str]:
    line = [x for x in log.splitlines() if "counters:" in x][-1]
    return dict(kv.split("=", 1) for kv in line.split("counters: ", 1)[1].split())


def test_ipv4_two_peers_find_each_other_and_handshake(ns, tmp_path):
    pair = Pair(ns)
    key, pub = server_keys(ns, tmp_path)
    start_server(ns, key, "127.0.0.1")
    server = f"127.0.0.1:{PORT}"
    a_err, b_err = both_punch(ns, ns, server, server, pair.ifs, pub)
    peer_of_a, peer_of_b = pair.dump(0)[0], pair.dump(1)[0]
    assert peer_of_a[2] == "127.0.0.1:51821" and peer_of_b[2] == "127.0.0.1:51820"
    assert peer_of_a[7] == "25" and peer_of_b[7] == "25"
    assert int(peer_of_a[4]) > 0 and int(peer_of_b[4]) > 0
    assert "(v2)" in a_err and "endpoint 127.0.0.1:51820 (no endpoint)" in b_err
    ca, cb = counters(a_err), counters(b_err)
    # Bob's first request completed the pair: found at once, and Alice was notified.
    assert cb["requests"] == "1" and cb["replies"] == "1" and cb["applied"] == "1", b_err
    assert int(ca["notifies"]) >= 1 and ca["applied"] == "1", a_err
    for c in (ca, cb):
        assert c["auth_failed"] == c["malformed"] == c["unknown"] == "0"
        assert c["families"] == "4"


def test_dual_stack_prefers_ipv6(ns, tmp_path):
    pair = Pair(ns)
    key, pub = server_keys(ns, tmp_path)
    start_server(ns, key, "127.0.0.1", "::1")
    with hosts_file(ns, "127.0.0.1 rdv.test\n::1 rdv.test\n"):
        a_err, b_err = both_punch(ns, ns, "rdv.test", "rdv.test", pair.ifs, pub)
    assert (pair.dump(0)[0][2], pair.dump(1)[0][2]) == ("[::1]:51821", "[::1]:51820"), a_err + b_err
    assert int(pair.dump(0)[0][4]) > 0 and int(pair.dump(1)[0][4]) > 0
    for log in (a_err, b_err):
        assert counters(log)["families"] == "4,6", log
        assert "server 127.0.0.1:49918, [::1]:49918 (v2)" in log


@pytest.fixture
def two_hosts():
    """Two namespaces joined by a veth pair, IPv4 and IPv6, no NAT; the server runs in
    the first, on its veth addresses."""
    with Netns("h6a") as a, Netns("h6b") as b:
        veth(a, "va", "10.67.0.1/24", b, "vb", "10.67.0.2/24")
        a.run(["ip", "-6", "addr", "add", "fd00:67::1/64", "dev", "va", "nodad"])
        b.run(["ip", "-6", "addr", "add", "fd00:67::2/64", "dev", "vb", "nodad"])
        yield a, b


def host_pair(a: Netns, b: Netns) -> list[str]:
    """One wireguard-go device per namespace, each the other's peer, no endpoints."""
    ifs = [unique_ifname("wqa"), unique_ifname("wqb")]
    keys = [keypair(a), keypair(b)]
    for i, (ns, ifn) in enumerate(((a, ifs[0]), (b, ifs[1]))):
        ns.start_wireguard_go(ifn)
        ns.run(["wg", "set", ifn, "listen-port", str(51820 + i), "private-key", "/dev/stdin",
                "peer", keys[1 - i][1], "allowed-ips", f"10.78.0.{2 - i}/32"], input=keys[i][0])
        ns.run(["ip", "addr", "add", f"10.78.0.{i + 1}/24", "dev", ifn])
    return ifs


def dump(ns: Netns, ifn: str) -> list[str]:
    return ns.run(["wg", "show", ifn, "dump"]).stdout.strip().splitlines()[1].split("\t")


def test_ipv6_between_namespaces(two_hosts, tmp_path):
    a, b = two_hosts
    ifs = host_pair(a, b)
    key, pub = server_keys(a, tmp_path)
    start_server(a, key, "fd00:67::1")
    server = f"[fd00:67::1]:{PORT}"
    a_err, b_err = both_punch(a, b, server, server, ifs, pub, "-6")
    assert dump(a, ifs[0])[2] == "[fd00:67::2]:51821", a_err
    assert dump(b, ifs[1])[2] == "[fd00:67::1]:51820", b_err
    assert int(dump(a, ifs[0])[4]) > 0 and int(dump(b, ifs[1])[4]) > 0
    assert counters(a_err)["families"] == counters(b_err)["families"] == "6"
    # and the tunnel carries traffic
    a.run(["ping", "-c", "1", "-W", "2", "10.78.0.2"])


def test_ipv6_without_a_tunnel_falls_back_to_ipv4(two_hosts, tmp_path):
    """IPv6 reaches the server, but a firewall drops IPv6 between the WireGuard ports:
    the IPv6 endpoint gives no handshake and both sides fall back to IPv4. (The rule
    names the WireGuard ports. Measured: this nft merges two adjacent "udp sport !=
    P udp dport != P" matches into one compare of both ports, "not both equal", so
    such a rule would drop the requests to the server too.)"""
    a, b = two_hosts
    if not shutil.which("nft"):
        pytest.skip("nft is not installed")
    ifs = host_pair(a, b)
    key, pub = server_keys(a, tmp_path)
    start_server(a, key, "10.67.0.1", "fd00:67::1")
    for ns in (a, b):
        ns.run(["nft", "-f", "-"], input="""
table ip6 wgtest {
  chain out {
    type filter hook output priority 0; policy accept;
    udp sport { 51820, 51821 } udp dport { 51820, 51821 } drop
  }
}
""")
    with hosts_file(a, "10.67.0.1 rdv.test\nfd00:67::1 rdv.test\n"), \
            hosts_file(b, "10.67.0.1 rdv.test\nfd00:67::1 rdv.test\n"):
        a_err, b_err = both_punch(a, b, "rdv.test", "rdv.test", ifs, pub, timeout=25)
    assert dump(a, ifs[0])[2] == "10.67.0.2:51821", a_err
    assert dump(b, ifs[1])[2] == "10.67.0.1:51820", b_err
    assert "no handshake over IPv6 within 4s" in a_err + b_err, a_err + b_err
    assert int(dump(a, ifs[0])[4]) > 0


def test_wrong_server_key_is_silence_and_one_line(ns, tmp_path):
    pair = Pair(ns)
    key, _ = server_keys(ns, tmp_path)
    start_server(ns, key, "127.0.0.1")
    other = keypair(ns)[1]  # a well-formed key that is not the server's
    r = punch(ns, "--timeout", "2", "--server-key", other, f"127.0.0.1:{PORT}", pair.ifs[0])
    assert r.returncode == 6, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("wg-punch: no reply from the server 127.0.0.1:49918 within 2s")
    assert "--server-key" in last
    assert "auth_failed=0" in r.stderr and "replies=0" in r.stderr


def test_classic_client_is_refused_by_require_auth(ns, tmp_path):
    pair = Pair(ns)
    key, _ = server_keys(ns, tmp_path)
    start_server(ns, key, "127.0.0.1")
    r = punch(ns, "--timeout", "2", f"127.0.0.1:{PORT}", pair.ifs[0])
    assert r.returncode == 6, r.stderr


def test_v2_peer_that_never_asks_exits_7(ns, tmp_path):
    pair = Pair(ns)
    key, pub = server_keys(ns, tmp_path)
    start_server(ns, key, "127.0.0.1")
    r = punch(ns, "--timeout", "2", "--server-key", pub, f"127.0.0.1:{PORT}", pair.ifs[0])
    assert r.returncode == 7, r.stderr
    assert f"no answer yet for peer(s) {pair.keys[1][1][:8]}…" in r.stderr


@pytest.mark.parametrize("args,msg", [
    (["--server-key", "abc", "s", "wg0"], "not a server public key"),
    (["--server-key", base64.b64encode(bytes(31)).decode(), "s", "wg0"],
     "not a server public key"),
    (["-6", "s", "wg0"], "-6/--ipv6-only needs --server-key"),
    (["-4", "-6", "s", "wg0"], "not allowed with argument"),
])
def test_bad_v2_arguments_exit_2(args, msg):
    r = subprocess.run([sys.executable, "-m", "punch", *args], capture_output=True, text=True,
                       env=py_env(), timeout=30)
    assert r.returncode == 2 and msg in r.stderr, r.stderr


def test_low_order_server_key_is_a_bad_argument(ns):
    pair = Pair(ns)
    r = punch(ns, "--server-key", base64.b64encode(bytes(32)).decode(), f"127.0.0.1:{PORT}",
              pair.ifs[0])
    assert r.returncode == 2, r.stderr
    assert re.fullmatch(r"wg-punch: --server-key is not a usable server key: .*",
                        r.stderr.strip().splitlines()[-1]), r.stderr


def test_ipv6_only_with_an_ipv4_server_is_one_line(ns):
    pair = Pair(ns)
    r = punch(ns, "--server-key", keypair(ns)[1], "-6", f"127.0.0.1:{PORT}", pair.ifs[0])
    assert r.returncode == 5
    assert r.stderr.strip() == "wg-punch: server '127.0.0.1' has no IPv6 address"


def test_no_route_to_any_server_address_is_one_line(ns):
    pair = Pair(ns)
    r = punch(ns, "--server-key", keypair(ns)[1], f"[2001:db8::1]:{PORT}", pair.ifs[0])
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines()[-1] == \
        f"wg-punch: no route to the server [2001:db8::1]:{PORT}"


def test_daemon_finds_a_peer_that_starts_later_and_stops_cleanly(ns, tmp_path):
    """Alice's daemon asks first (pending); Bob's one-shot run completes the pair, the
    server notifies Alice's daemon at once, and a SIGTERM ends it with status 0."""
    import signal

    pair = Pair(ns)
    key, pub = server_keys(ns, tmp_path)
    start_server(ns, key, "127.0.0.1")
    server = f"127.0.0.1:{PORT}"
    d = ns.popen([sys.executable, "-m", "punch", "--daemon", "--interval", "2",
                  "--server-key", pub, server, pair.ifs[0]])
    time.sleep(1.0)
    b = punch(ns, "--wait", "--timeout", "15", "--server-key", pub, server, pair.ifs[1])
    assert b.returncode == 0, b.stderr
    deadline = time.monotonic() + 10
    while pair.dump(0)[0][2] != "127.0.0.1:51821":
        assert time.monotonic() < deadline, pair.dump(0)
        time.sleep(0.1)
    time.sleep(2.5)  # at least one re-ask of the daemon (every interval / 2)
    d.send_signal(signal.SIGTERM)
    assert d.wait(10) == 0
    assert d.stderr is not None
    log = d.stderr.read().decode()
    c = counters(log)
    assert "(v2) (daemon)" in log and int(c["notifies"]) >= 1 and c["applied"] == "1", log
    assert int(c["requests"]) >= 3 and c["lost"] == "0" and c["auth_failed"] == "0", log


def test_a_server_address_without_a_route_is_counted_and_skipped(ns, tmp_path):
    """The name also has an IPv6 address this host cannot reach: IPv4 alone is used."""
    pair = Pair(ns)
    key, pub = server_keys(ns, tmp_path)
    start_server(ns, key, "127.0.0.1")
    with hosts_file(ns, "127.0.0.1 rdv.test\n2001:db8::1 rdv.test\n"):
        a_err, b_err = both_punch(ns, ns, "rdv.test", "rdv.test", pair.ifs, pub)
    for log in (a_err, b_err):
        c = counters(log)
        assert c["families"] == "4" and c["failed_channels"] == "1", log
        assert "IPv6: not using the server at 2001:db8::1: no route to 2001:db8::1" in log
    assert pair.dump(0)[0][2] == "127.0.0.1:51821"


def test_interface_without_a_private_key_exits_4(ns):
    ifn = unique_ifname("wpk")
    ns.start_wireguard_go(ifn)
    ns.run(["wg", "set", ifn, "listen-port", "51840", "peer", keypair(ns)[1],
            "allowed-ips", "10.79.0.2/32"])
    r = punch(ns, "--server-key", keypair(ns)[1], f"127.0.0.1:{PORT}", ifn)
    assert r.returncode == 4, r.stderr
    assert r.stderr.strip().splitlines()[-1] == \
        f"wg-punch: {ifn} has no private key (wg set {ifn} private-key FILE)"


def test_only_the_v2_path_imports_cryptography(ns):
    """Start-up matters (bench/client_startup.py): the classic client never loads the
    AEAD library or the v2 codec; the v2 client does."""
    pair = Pair(ns)

    def imported(*args: str) -> set[str]:
        r = ns.run([sys.executable, "-X", "importtime", "-m", "punch", "--timeout", "0.5", *args,
                    "127.0.0.1:9", pair.ifs[0]], check=False)
        assert r.returncode == 6, r.stderr
        return {line.rsplit("|", 1)[1].strip() for line in r.stderr.splitlines()
                if line.startswith("import time:") and "|" in line}

    classic = imported()
    v2 = imported("--server-key", keypair(ns)[1])
    for mod in ("cryptography", "rendezvous.v2.crypto", "rendezvous.v2.wire", "punch.v2client"):
        assert mod not in classic and mod in v2, mod
