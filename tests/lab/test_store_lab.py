"""Two rendezvous servers sharing one Redis (--store), through real NATs: Alice talks to
one server, Bob to the other, and the coordinated punch still works, because the
notification for Alice leaves from *her* server's address and port, the only one her
port-restricted NAT lets in (real nftables, real wireguard-go, real wg-punch)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest

from tests.lab.lablib import STATE_ROOT, Lab
from tests.lab.test_v2_lab import TIMEOUT, _assert_tunnel, _LogReader

pytestmark = pytest.mark.lab

OTHER_PORT = 49928  # the second server, on the same public host


def _redis(lab: Lab, tmp_path) -> str:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    p = lab.popen("server", ["redis-server", "--port", "6379", "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--dir", str(tmp_path)])
    for _ in range(100):
        r = lab.run("server", ["ss", "-Hltn", "sport = :6379"])
        if r.stdout.strip():
            return "redis://127.0.0.1:6379/0"
        assert p.poll() is None, "redis-server exited"
        subprocess.run(["sleep", "0.05"])
    raise AssertionError("redis-server did not listen")


def test_coordinated_punch_across_two_servers_sharing_redis(make_lab, tmp_path) -> None:
    lab = make_lab(v2=True)
    url = _redis(lab, tmp_path)
    s1 = lab.start_server("--store", url, "--stats-interval", "0")
    s2 = lab.script_popen("server", "--port", str(OTHER_PORT), "--store", url,
                          "--stats-interval", "0")
    lab.wait_listening("server", OTHER_PORT, s2)
    bob_key = lab.info["BOB_PUBKEY"][:8]
    # Alice: her server's "pending", then a long wait before she asks again
    alice = lab.punch("alice", "--daemon", "--poll", "30", "--interval", "120")
    log = _LogReader(alice)
    log.wait_for(r"reply over IPv4: id \w+ pending", 20, count=5)
    # Bob asks the *other* server
    state = STATE_ROOT / lab.prefix / "punch-state" / "bob"
    bob = lab.python("bob", ["-m", "punch", "-v", "--state-dir", str(state),
                             "--server-key", lab.info["SERVER_PUBKEY"], "--timeout", TIMEOUT,
                             "--wait", f"{lab.server}:{OTHER_PORT}", "wg0"])
    try:
        _, err_b = bob.communicate(timeout=float(TIMEOUT) + 15)
    except subprocess.TimeoutExpired:
        pytest.fail(f"wg-punch on bob hung: {lab.stop(bob)[1]}")
    assert bob.returncode == 0, err_b.decode()
    line = log.wait_for(rf"peer {re.escape(bob_key)}\S*: endpoint ", 10)
    before = log.text[: log.text.index(line)]
    assert re.search(rf"notify over IPv4: peer {re.escape(bob_key)}", before), log.text
    assert not re.search(r"reply over IPv\d: id \w+ found", before), log.text
    assert lab.endpoint("alice") == f"{lab.info['PUB_B']}:51820"
    assert lab.endpoint("bob") == f"{lab.info['PUB_A']}:51820"
    _assert_tunnel(lab)
    alice.terminate()
    assert alice.wait(10) == 0
    lab.procs.remove(alice)
    _, err1 = lab.stop(s1)
    _, err2 = lab.stop(s2)
    # s2 decided the notification and handed it over; s1, which Alice's NAT lets in, sent it
    assert "notify_published=1" in err2 and "v2_notify_remote=1" in err2, err2
    assert "notices_received=1" in err1, err1
    assert "store_failures=0" in err1 and "store_failures=0" in err2
