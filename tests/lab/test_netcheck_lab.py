"""NAT behaviour detection in the netns lab: ``wg-punch netcheck`` behind each NAT mode
(the lab's server started with --probe-port through LAB_PROBE_PORT), classic and v2,
IPv6 through fw6; and the verdicts exchanged through a v2 server: each side's log,
status and metrics show the other's."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest

from tests.lab.lablib import Lab

pytestmark = pytest.mark.lab

PROBE_PORT = 49919


def netcheck(lab: Lab, host: str, *extra: str) -> dict:
    server = lab.info[f"{host.upper()}_RDV"]
    key = ["--server-key", lab.info["SERVER_PUBKEY"]] if lab.v2 else []
    r = lab.run(host, [sys.executable, "-m", "punch", "netcheck", server, "wg0", "--json",
                       *key, *extra], check=False)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.parametrize(("mode", "verdict"), [
    ("cone", "endpoint-independent+port-preserved"),
    # fullcone's masquerade keeps the port as cone's does; its difference is filtering
    ("fullcone", "endpoint-independent+port-preserved"),
    ("symmetric", "address-and-port-dependent"),
])
def test_classic_netcheck_behind_each_nat(make_lab, mode: str, verdict: str) -> None:
    lab = make_lab(mode, "cone", probe_port=PROBE_PORT)
    lab.start_server()
    [res] = netcheck(lab, "alice")["results"]
    pub_a = lab.info["PUB_A"]
    assert res["local"] == f"{lab.info['ALICE_LAN']}:51820"
    assert res["public"].startswith(pub_a + ":")
    assert res["mapping"] == verdict.split("+")[0], res
    if mode == "symmetric":
        primary = res["probes"]["primary"]["observed"]
        other = res["probes"]["port"]["observed"]
        assert primary != other and other.startswith(pub_a + ":"), res
    else:
        assert res["verdict"] == verdict and res["public"] == f"{pub_a}:51820"
        assert res["probes"]["port"]["observed"] == res["public"]
    # Bob (behind a cone NAT in every case) is unaffected by Alice's NAT.
    [bob] = netcheck(lab, "bob")["results"]
    assert bob["verdict"] == "endpoint-independent+port-preserved"


def test_v2_netcheck_symmetric_and_ipv6_through_fw6(make_lab) -> None:
    lab = make_lab("symmetric", "fw6", v2=True, probe_port=PROBE_PORT)
    lab.start_server()
    # Alice is dual stack (the lab has IPv6): IPv4 through the symmetric NAT, IPv6
    # routed through a firewall. One verdict per family.
    alice = {r["family"]: r for r in netcheck(lab, "alice")["results"]}
    assert alice[4]["mapping"] == "address-and-port-dependent", alice
    assert alice[6]["verdict"] == "none" and alice[6]["public"] == alice[6]["local"]
    # Bob has IPv6 only, routed, behind a stateful firewall: no NAT.
    [bob] = netcheck(lab, "bob")["results"]
    assert bob["family"] == 6 and bob["verdict"] == "none", bob
    assert bob["public"] == bob["local"] == f"[{lab.info['BOB_ADDR6']}]:51820"


def _short(b64: str) -> str:
    return b64[:8] + "…"


def _scrape(lab: Lab, host: str, url: str) -> str:
    code = f"import urllib.request; print(urllib.request.urlopen({url!r}, timeout=5).read().decode())"
    return lab.run(host, [sys.executable, "-c", code]).stdout


def test_v2_clients_exchange_their_verdicts(make_lab, tmp_path: Path) -> None:
    lab = make_lab("symmetric", "cone", v2=True, probe_port=PROBE_PORT)
    lab.start_server()
    dirs = {h: tmp_path / h for h in ("alice", "bob")}
    alice = lab.punch("alice", "--daemon", "--interval", "2", "--metrics", "127.0.0.1:0",
                      "--state-dir", str(dirs["alice"]))
    assert alice.stderr is not None
    url = None
    seen = []
    for raw in alice.stderr:
        seen.append(raw.decode(errors="replace"))
        m = re.search(r"metrics on (http://127\.0\.0\.1:\d+/metrics)", seen[-1])
        if m:
            url = m.group(1)
            break
    assert url, "".join(seen)
    b = lab.punch("bob", "--timeout", "20", "--state-dir", str(dirs["bob"]))
    _, b_err = b.communicate(timeout=40)
    b_log = b_err.decode()
    assert b.returncode == 0, b_log
    a_short, b_short = _short(lab.info["ALICE_PUBKEY"]), _short(lab.info["BOB_PUBKEY"])
    assert "NAT (this host, IPv4): endpoint-independent mapping, port preserved" in b_log
    assert (f"peer {a_short}: NAT address-and-port-dependent mapping (symmetric), port not "
            "preserved; between us: direct only with the spray") in b_log, b_log
    bob_status = json.loads(lab.run("bob", [sys.executable, "-m", "punch", "status", "wg0",
                                            "--json", "--state-dir", str(dirs["bob"])]).stdout)
    assert bob_status["state"]["nat"] == "endpoint-independent+port-preserved"
    assert bob_status["peers"][0]["nat"] == "address-and-port-dependent"

    want = f'wgpunch_punch_nat_verdict{{peer="{b_short}",verdict="endpoint-independent+port-preserved"}} 1.0'
    deadline = time.monotonic() + 15
    while want not in (metrics := _scrape(lab, "alice", url)):
        assert time.monotonic() < deadline, metrics
        time.sleep(0.3)
    assert 'wgpunch_punch_local_nat_verdict{verdict="address-and-port-dependent"} 1.0' in metrics
    # The daemon writes its state file at most once a second: wait for the write.
    while True:
        a_status = json.loads(lab.run("alice", [sys.executable, "-m", "punch", "status", "wg0",
                                                "--json", "--state-dir",
                                                str(dirs["alice"])]).stdout)
        if a_status["peers"][0]["nat"] != "unknown" or time.monotonic() > deadline + 5:
            break
        time.sleep(0.3)
    assert a_status["state"]["nat"] == "address-and-port-dependent"
    assert a_status["peers"][0]["nat"] == "endpoint-independent+port-preserved"
    _, a_err = lab.stop(alice)
    a_log = "".join(seen) + a_err
    assert "NAT (this host, IPv4): address-and-port-dependent mapping (symmetric)" in a_log
    assert f"peer {b_short}: NAT endpoint-independent mapping, port preserved" in a_log, a_log
