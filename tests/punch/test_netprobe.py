"""``wg-punch netcheck`` as a real process: raw-socket probes from a real wireguard-go
device's port to the real wg-rendezvous with --probe-port on a namespace's loopback
(no NAT there: the verdict is "none"; the lab tests each NAT mode), classic and v2;
and its one-line errors and exit statuses."""

from __future__ import annotations

import json
import sys

import pytest

from tests.nstools import Netns
from tests.punch.test_client import Pair, punch, start_server
from tests.punch.test_client_v2 import server_keys

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("needs_wireguard_go")]


@pytest.fixture
def ns():
    with Netns("nc") as n:
        yield n


def test_classic_netcheck_without_nat_says_none(ns):
    pair = Pair(ns)
    start_server(ns, "--port", "49918", "--probe-port", "49919")
    r = punch(ns, "netcheck", "127.0.0.1", pair.ifs[0], "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    [res] = doc["results"]
    assert res["family"] == 4 and res["verdict"] == "none" and res["nat_byte"] == 0x11
    assert res["public"] == res["local"] == "127.0.0.1:51820"
    assert res["probes"] == {"primary": {"to": "127.0.0.1:49918", "observed": "127.0.0.1:51820"},
                             "port": {"to": "127.0.0.1:49919", "observed": "127.0.0.1:51820"}}
    text = punch(ns, "netcheck", "127.0.0.1", pair.ifs[1])
    assert text.returncode == 0, text.stderr
    assert "IPv4: no NAT\n  public endpoint: 127.0.0.1:51821 (local 127.0.0.1:51821)" in text.stdout
    assert "  meaning: no NAT: peers reach this host" in text.stdout


def test_v2_netcheck_over_both_families_with_a_probe_address(ns, tmp_path):
    pair = Pair(ns)
    key, pub = server_keys(ns, tmp_path)
    ns.run(["ip", "addr", "add", "127.0.0.2/8", "dev", "lo"], check=False)
    p = ns.python(["-m", "rendezvous", "--listen", "127.0.0.1", "--listen", "::1", "--port",
                   "4000", "--probe-port", "4001", "--probe-address", "127.0.0.2", "--rate", "0",
                   "--key", str(key), "--require-auth"], text=True)
    assert p.stderr is not None
    for line in p.stderr:
        if "probe port on" in line:
            assert "127.0.0.1:4001, [::1]:4001, 127.0.0.2:4001" in line, line
            break
    r = ns.run([sys.executable, "-m", "punch", "netcheck", "localhost:4000", pair.ifs[0],
                "--server-key", pub, "--probe-port", "4001", "--probe-address", "127.0.0.2",
                "--json"], check=False)
    assert r.returncode == 0, r.stderr
    res = {x["family"]: x for x in json.loads(r.stdout)["results"]}
    assert res[4]["verdict"] == "none" and res[4]["public"] == "127.0.0.1:51820"
    assert res[4]["probes"]["address"] == {"to": "127.0.0.2:4001",
                                           "observed": "127.0.0.1:51820"}
    if 6 in res:  # localhost resolves to ::1 too where /etc/hosts says so
        assert res[6]["verdict"] == "none" and res[6]["public"] == "[::1]:51820"


def test_a_silent_server_gives_no_verdict_and_exit_6(ns):
    pair = Pair(ns)
    r = punch(ns, "netcheck", "--timeout", "0.6", "127.0.0.1:9", pair.ifs[0])
    assert r.returncode == 6
    assert r.stderr.strip().splitlines() == [
        "wg-punch netcheck: no verdict: IPv4: no reply from the server's port to the probe"]
    assert "IPv4: unknown" in r.stdout and "probe to 127.0.0.1:10: no reply" in r.stdout


def test_errors_are_one_line_with_the_main_command_s_statuses(ns):
    r = punch(ns, "netcheck", "127.0.0.1", "nosuchwg0")
    assert r.returncode == 4 and r.stderr.strip() == (
        "wg-punch netcheck: interface nosuchwg0 does not exist")
    r = punch(ns, "netcheck", "no.such.host.invalid", "nosuchwg0")
    assert r.returncode == 5 and r.stderr.startswith("wg-punch netcheck: cannot resolve server")
    r = punch(ns, "netcheck", "-6", "::1", "wg0")
    assert r.returncode == 2 and "-6 needs --server-key" in r.stderr
    r = punch(ns, "netcheck", "--probe-port", "70000", "127.0.0.1", "wg0")
    assert r.returncode == 2 and "not a UDP port (1-65535): '70000'" in r.stderr
    r = punch(ns, "netcheck", "--probe-address", "foo", "127.0.0.1", "wg0")
    assert r.returncode == 2 and "not an IPv4 or IPv6 address: 'foo'" in r.stderr
    r = punch(ns, "--probe-port", "49919", "127.0.0.1", "wg0")
    assert r.returncode == 2 and "--probe-port needs --server-key" in r.stderr
