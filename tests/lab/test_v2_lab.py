"""Protocol v2 end to end in the netns lab: wg-rendezvous --key --require-auth and
wg-punch --server-key, through real NATs (IPv4) and real stateful IPv6 firewalls (fw6),
with real wireguard-go; and the coordinated punch (the server's notify)."""

from __future__ import annotations

import os
import re
import select
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.lab.lablib import SCRIPT, Lab, leftovers, new_prefix, script_env

pytestmark = pytest.mark.lab

TIMEOUT = "20"  # the clients' own --timeout: generous, they normally need well under a second
SERVER_SILENT = 6  # wg-punch's exit status when the server never answers


def _both_one_shot(lab: Lab, *extra: str) -> None:
    """The one-shot client on Alice, then on Bob; both must succeed."""
    a = lab.punch("alice", "--timeout", TIMEOUT, *extra)
    b = lab.punch("bob", "--timeout", TIMEOUT, *extra)
    for p, who in ((a, "alice"), (b, "bob")):
        try:
            _, err = p.communicate(timeout=float(TIMEOUT) + 15)
        except subprocess.TimeoutExpired:
            pytest.fail(f"wg-punch on {who} hung past its own --timeout: {lab.stop(p)[1]}")
        assert p.returncode == 0, f"wg-punch on {who} exited {p.returncode}:\n{err.decode()}"


def _assert_tunnel(lab: Lab) -> None:
    assert lab.wait_handshake("alice", 15), "no handshake on alice"
    assert lab.wait_handshake("bob", 15), "no handshake on bob"
    assert lab.ping("alice", lab.info["BOB_TUN"]), "alice cannot ping bob through the tunnel"
    assert lab.ping("bob", lab.info["ALICE_TUN"]), "bob cannot ping alice through the tunnel"


def _rdv_tool(*args: str, stdin: str | None = None) -> str:
    r = subprocess.run([sys.executable, "-m", "rendezvous", *args], input=stdin, text=True,
                       capture_output=True, check=True, env=script_env("unused"), timeout=30)
    return r.stdout.strip()


def test_v2_lab_makes_a_server_key_pair_and_the_server_uses_it(make_lab) -> None:
    lab = make_lab(v2=True)
    assert lab.info["PROTOCOL"] == "v2"
    key = Path(lab.info["SERVER_KEY_FILE"])
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert _rdv_tool("pubkey", stdin=key.read_text()) == lab.info["SERVER_PUBKEY"]
    server = lab.start_server()
    _, err = lab.stop(server)
    # The server logs the public key it runs with: the one the clients are given.
    assert lab.info["SERVER_PUBKEY"] in err, err


def test_v2_through_cone_nats_with_require_auth(make_lab) -> None:
    lab = make_lab(v2=True)
    lab.start_server()
    _both_one_shot(lab)
    assert lab.endpoint("alice") == f"{lab.info['PUB_B']}:51820"
    assert lab.endpoint("bob") == f"{lab.info['PUB_A']}:51820"
    _assert_tunnel(lab)
    for host, other in (("alice", "PUB_B"), ("bob", "PUB_A")):
        (peer,) = lab.status(host)["peers"]
        assert peer["endpoint"] == f"{lab.info[other]}:51820"
        assert peer["endpoint_source"] == "server", peer
        assert peer["server_answer"]["found"] is True, peer


def test_v2_over_ipv6_through_fw6_firewalls(make_lab) -> None:
    lab = make_lab("fw6", "fw6", v2=True)
    assert lab.info["ALICE_RDV"] == lab.rdv6  # IPv6-only hosts are given the IPv6 address
    lab.start_server()
    _both_one_shot(lab)
    # No NAT66: each side's endpoint is the other's own IPv6 address, at WireGuard's port.
    assert lab.endpoint("alice") == f"[{lab.info['BOB_ADDR6']}]:51820"
    assert lab.endpoint("bob") == f"[{lab.info['ALICE_ADDR6']}]:51820"
    _assert_tunnel(lab)


def test_v2_dual_stack_prefers_ipv6(make_lab) -> None:
    lab = make_lab(ipv6=True, v2=True)
    assert lab.info["ALICE_RDV"].startswith("rendezvous.lab:")  # one name, both addresses
    lab.start_server()
    # Alice first, until the server has told her "pending" over both families; then Bob.
    alice = lab.punch("alice", "--timeout", TIMEOUT, "--wait")
    log = _LogReader(alice)
    log.wait_for(r"reply over IPv6: id \w+ pending", 20)
    bob = lab.punch("bob", "--timeout", TIMEOUT, "--wait")
    for p, who in ((bob, "bob"), (alice, "alice")):
        try:
            _, err = p.communicate(timeout=float(TIMEOUT) + 15)
        except subprocess.TimeoutExpired:
            pytest.fail(f"wg-punch on {who} hung past its own --timeout: {lab.stop(p)[1]}")
        text = (log.text if p is alice else "") + err.decode(errors="replace")
        assert p.returncode == 0, f"wg-punch on {who} exited {p.returncode}:\n{text}"
    assert lab.endpoint("alice") == f"[{lab.info['BOB_ADDR6']}]:51820"
    assert lab.endpoint("bob") == f"[{lab.info['ALICE_ADDR6']}]:51820"
    _assert_tunnel(lab)


@pytest.mark.parametrize("how", ["classic", "wrong-key"])
def test_require_auth_server_does_not_answer_unauthenticated_clients(make_lab, how: str) -> None:
    lab = make_lab(v2=True)
    lab.start_server()
    if how == "classic":  # a classic client: its 64-byte requests are refused
        p = lab.punch_classic("alice", "--timeout", "4")
    else:  # a v2 client pinning another key: the server cannot open its requests
        other_pub = _rdv_tool("pubkey", stdin=_rdv_tool("genkey"))
        assert other_pub != lab.info["SERVER_PUBKEY"]
        p = lab.python("alice", ["-m", "punch", "--server-key", other_pub, lab.rdv, "wg0",
                                 "-v", "--timeout", "4"])
    try:
        _, err = p.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"wg-punch hung: {lab.stop(p)[1]}")
    text = err.decode(errors="replace")
    assert p.returncode == SERVER_SILENT, text
    assert "no reply from the server" in text, text
    assert lab.endpoint("alice") == "(none)"


def test_coordinated_punch_the_notify_sets_the_waiting_peer(make_lab) -> None:
    """Alice's daemon asks and is told "pending"; Bob's one-shot client completes the
    pair, and the server's notify, not Alice's next ask, points her at Bob."""
    lab = make_lab(v2=True)
    lab.start_server()
    alice = notified_while_waiting(lab, lambda: lab.punch("bob", "--timeout", TIMEOUT, "--wait"))
    assert alice.poll() is None, "the daemon exited"
    alice.terminate()
    assert alice.wait(10) == 0
    lab.procs.remove(alice)


def notified_while_waiting(lab: Lab, start_bob) -> subprocess.Popen[bytes]:
    """Alice's daemon asks and is told "pending"; START_BOB() starts Bob's client, which
    must succeed; then the server's notify, not Alice's next ask, points her at Bob, and
    the tunnel works. Returns Alice's (running) daemon."""
    bob_key = lab.info["BOB_PUBKEY"][:8]
    # Alice re-asks after 0.25 s, doubling up to --poll: after her fifth "pending" her
    # next ask is 4 s away, while Bob's client needs well under a second.
    alice = lab.punch("alice", "--daemon", "--poll", "30", "--interval", "120")
    log = _LogReader(alice)
    log.wait_for(r"reply over IPv4: id \w+ pending", 20, count=5)
    bob = start_bob()
    try:
        _, err_b = bob.communicate(timeout=float(TIMEOUT) + 15)
    except subprocess.TimeoutExpired:
        pytest.fail(f"wg-punch on bob hung: {lab.stop(bob)[1]}")
    assert bob.returncode == 0, err_b.decode()
    line = log.wait_for(rf"peer {re.escape(bob_key)}\S*: endpoint ", 10)
    # What Alice logged before setting the endpoint: the notify, and no "found" reply.
    before = log.text[: log.text.index(line)]
    assert re.search(rf"notify over IPv4: peer {re.escape(bob_key)}", before), log.text
    assert not re.search(r"reply over IPv\d: id \w+ found", before), log.text
    assert lab.endpoint("alice") == f"{lab.info['PUB_B']}:51820"
    _assert_tunnel(lab)
    return alice


def test_v2_daemon_is_told_at_once_when_its_peer_rebinds(make_lab) -> None:
    """NAT A moves Alice to a new public port; Alice's next request registers it and the
    server notifies Bob, whose own next ask is 30 s away (--interval 60)."""
    lab = make_lab(v2=True)
    lab.start_server()
    alice_key = lab.info["ALICE_PUBKEY"][:8]
    a = lab.punch("alice", "--daemon", "--interval", "6")
    b = lab.punch("bob", "--daemon", "--interval", "60")
    log = _LogReader(b)
    _assert_tunnel(lab)
    log.wait_for(rf"peer {re.escape(alice_key)}\S*: endpoint ", 10)
    mark = len(log.text)

    new = lab.script("rebind", "a").stdout.strip()
    line = log.wait_for(rf"peer {re.escape(alice_key)}\S*: endpoint {re.escape(new)} ", 20)
    between = log.text[mark: log.text.index(line)]
    assert re.search(rf"notify over IPv4: peer {re.escape(alice_key)}", between), log.text
    assert "asking for" not in between, log.text  # Bob did not ask: the server told him
    assert lab.endpoint("bob") == new
    assert lab.ping_until("bob", lab.info["ALICE_TUN"], 30), "tunnel not back"
    for p in (a, b):
        assert p.poll() is None, "a daemon exited"


class _LogReader:
    """Read a process's stderr as it comes, without blocking past a deadline."""

    def __init__(self, p: subprocess.Popen[bytes]) -> None:
        assert p.stderr is not None
        self.p, self.fd, self.text = p, p.stderr.fileno(), ""
        os.set_blocking(self.fd, False)

    def wait_for(self, pattern: str, timeout: float, count: int = 1) -> str:
        """The COUNTth line matching PATTERN (read so far or arriving within TIMEOUT)."""
        deadline = time.monotonic() + timeout
        while True:
            found = [line for line in self.text.splitlines() if re.search(pattern, line)]
            if len(found) >= count:
                return found[count - 1]
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no line matching {pattern!r} within {timeout} s:\n"
                                     f"{self.text[-4000:]}")
            if select.select([self.fd], [], [], min(left, 0.2))[0]:
                chunk = os.read(self.fd, 65536)
                if not chunk:  # the process closed stderr (exited)
                    raise AssertionError(f"no line matching {pattern!r}; the process "
                                         f"exited:\n{self.text[-4000:]}")
                self.text += chunk.decode(errors="replace")


@pytest.mark.parametrize("modes, extra", [(("cone", "cone"), ()),
                                          (("fw6", "fw6"), ("--stagger", "0.5"))],
                         ids=["cone", "fw6-staggered"])
def test_v2_demo_runs_and_leaves_nothing_behind(modes: tuple[str, str],
                                                extra: tuple[str, ...]) -> None:
    from tests.nstools import is_root

    if not is_root():
        pytest.skip("needs root")
    prefix = new_prefix()
    r = subprocess.run(["bash", str(SCRIPT), "demo", "--v2", "--nat-a", modes[0],
                        "--nat-b", modes[1], *extra], capture_output=True, text=True,
                       timeout=120, env=script_env(prefix, LAB_TIMEOUT="20"))
    if r.returncode != 0 and "missing tools" in r.stderr:
        pytest.skip(r.stderr)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ping through the tunnel works both ways" in r.stdout
    assert " ok=1 " in r.stdout and " proto=v2 " in r.stdout
    # The timeline names where the time went; every phase was found in the logs.
    (line,) = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    kv = dict(item.split("=", 1) for item in line.split()[1:])
    assert all(int(kv[k]) >= 0 for k in ("bob_ask_ms", "bob_set_ms", "alice_set_ms")), line
    assert leftovers(prefix) == []
