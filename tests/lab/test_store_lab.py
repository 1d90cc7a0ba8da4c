"""Two rendezvous servers sharing one Redis (--store), through real NATs: Alice talks to
one server, Bob to the other, and the coordinated punch still works, because the
notification for Alice leaves from *her* server's address and port, the only one her
port-restricted NAT lets in (real nftables, real wireguard-go, real wg-punch)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.lab.lablib import STATE_ROOT, Lab
from tests.lab.test_v2_lab import TIMEOUT, notified_while_waiting

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
    # Bob asks the *other* server
    state = STATE_ROOT / lab.prefix / "punch-state" / "bob"
    alice = notified_while_waiting(lab, lambda: lab.python("bob", [
        "-m", "punch", "-v", "--state-dir", str(state), "--server-key",
        lab.info["SERVER_PUBKEY"], "--timeout", TIMEOUT, "--wait",
        f"{lab.server}:{OTHER_PORT}", "wg0"]))
    assert lab.endpoint("bob") == f"{lab.info['PUB_A']}:51820"
    alice.terminate()
    assert alice.wait(10) == 0
    lab.procs.remove(alice)
    _, err1 = lab.stop(s1)
    _, err2 = lab.stop(s2)
    # s2 decided the notification and handed it over; s1, which Alice's NAT lets in, sent it
    assert "notify_published=1" in err2 and "v2_notify_remote=1" in err2, err2
    assert "notices_received=1" in err1, err1
    assert "store_failures=0" in err1 and "store_failures=0" in err2
