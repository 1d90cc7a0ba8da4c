"""wg-punch --daemon --metrics against wireguard-go in a namespace: the listener lives
in the namespace, so the scrape runs there too (ip netns exec), and its figures are
checked against the daemon's own counters and the device."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.nstools import Netns, py_env
from tests.punch.test_client import Pair, start_server

pytest.importorskip("prometheus_client")

SCRAPE = """
import sys, urllib.request
from prometheus_client.parser import text_string_to_metric_families
text = urllib.request.urlopen(sys.argv[1], timeout=5).read().decode()
for fam in text_string_to_metric_families(text):
    for s in fam.samples:
        if s.name.startswith("wgpunch_punch_"):
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            print(f"{s.name}|{labels}|{s.value!r}")
"""


def scrape(ns: Netns, url: str) -> dict[tuple[str, str], float]:
    out = ns.run([sys.executable, "-c", SCRAPE, url]).stdout
    got = {}
    for line in out.splitlines():
        name, labels, value = line.split("|")
        got[(name, labels)] = float(value)
    return got


@pytest.mark.root
@pytest.mark.usefixtures("needs_wireguard_go")
def test_daemon_metrics_and_status_while_running(state_dir):
    with Netns("pm") as ns:
        pair = Pair(ns)
        port = start_server(ns)
        server = f"127.0.0.1:{port}"
        d = ns.popen([sys.executable, "-m", "punch", "--daemon", "--interval", "2",
                      "--metrics", "127.0.0.1:0", server, pair.ifs[0]])
        assert d.stderr is not None
        url = None
        for raw in d.stderr:
            m = re.search(r"metrics on (http://127\.0\.0\.1:\d+/metrics)", raw.decode())
            if m:
                url = m.group(1)
                break
        assert url, "no metrics line"
        b = ns.run([sys.executable, "-m", "punch", "--wait", "--timeout", "20", server,
                    pair.ifs[1]], check=False)
        assert b.returncode == 0, b.stderr
        bob = pair.keys[1][1]
        bob_short = f"peer={bob[:8]}…"
        deadline = time.monotonic() + 15
        while True:
            got = scrape(ns, url)
            if got.get(("wgpunch_punch_endpoints_applied_total", ""), 0) >= 1 and \
                    ("wgpunch_punch_handshake_age_seconds", bob_short) in got:
                break
            assert time.monotonic() < deadline, got
            time.sleep(0.3)
        assert got[("wgpunch_punch_peers", "")] == 1
        assert got[("wgpunch_punch_endpoints_applied_total", "")] == 1
        sent = got[("wgpunch_punch_requests_total", "")]
        replies = got[("wgpunch_punch_replies_total", "")]
        lost = got[("wgpunch_punch_lost_total", "")]
        assert replies >= 1 and sent >= replies and sent - replies - lost <= 1  # one in flight
        assert got[("wgpunch_punch_malformed_total", "")] == 0
        assert 0 <= got[("wgpunch_punch_handshake_age_seconds", bob_short)] < 30
        assert 0 <= got[("wgpunch_punch_server_last_reply_age_seconds", "")] < 10
        assert got[("wgpunch_punch_nat_verdict", f"{bob_short},verdict=unknown")] == 1

        # status sees the running daemon's state file, which the daemon rewrites at most
        # once a second (StateWriter.min_gap): it may lag the metrics by that much.
        deadline = time.monotonic() + 10
        while True:
            r = ns.run([sys.executable, "-m", "punch", "status", "--json", pair.ifs[0]])
            doc = json.loads(r.stdout)
            if doc["peers"][0]["endpoint_source"] == "server" or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert doc["state"]["mode"] == "daemon" and doc["state"]["running"] is True
        assert doc["peers"][0]["endpoint_source"] == "server"
        assert doc["peers"][0]["server_answer"]["endpoint"] == "127.0.0.1:51821"

        d.send_signal(signal.SIGTERM)
        assert d.wait(10) == 0
        rest = d.stderr.read().decode()
        m = re.search(r"counters: requests=(\d+) replies=(\d+) lost=(\d+) late=\d+ "
                      r"malformed=0 applied=1 ", rest)
        assert m, rest
        assert int(m.group(1)) >= sent and int(m.group(2)) >= replies
        doc = json.loads((state_dir / f"{pair.ifs[0]}.json").read_text())
        assert doc["ended"] is not None and doc["mode"] == "daemon"


def test_punch_metrics_without_prometheus_client_exits_2(tmp_path):
    fake = tmp_path / "prometheus_client"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('not installed (test)')\n")
    env = py_env()
    env["PYTHONPATH"] = f"{tmp_path}:{env['PYTHONPATH']}"
    r = subprocess.run([sys.executable, "-m", "punch", "--metrics", "127.0.0.1:0",
                        "127.0.0.1", "wg0"], capture_output=True, text=True, env=env, timeout=30)
    assert r.returncode == 2
    assert r.stderr.strip() == ("wg-punch: --metrics needs the prometheus-client package "
                                "(pip install prometheus-client)")


def test_the_daemon_s_nat_checks_are_counted():
    """Collected from a v2 client whose NAT re-checks ran (the probe scripted, as in
    test_v2client_recheck.py): one that found a change, one that did not."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from punch.metrics import ClientCollector
    from tests.punch.test_v2client_recheck import EASY, HARD, stuck_client

    c = stuck_client([HARD, HARD])
    c._maybe_recheck(31.0)   # changed: easy -> hard
    c._maybe_recheck(92.0)   # 60 s later (backed off): the same again
    c.device = None          # no device read yet: no per-peer metrics
    collector = ClientCollector()
    collector.client = c
    registry = CollectorRegistry()
    registry.register(collector)
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for fam in text_string_to_metric_families(generate_latest(registry).decode())
           for s in fam.samples}
    assert got[("wgpunch_punch_nat_checks_total", ())] == 2
    assert got[("wgpunch_punch_nat_changes_total", ())] == 1
    assert got[("wgpunch_punch_local_nat_verdict", (("verdict", HARD.nat.token),))] == 1
    assert got[("wgpunch_punch_ignored_packets_total", ())] == 0  # no channel open yet
    assert EASY.nat.token != HARD.nat.token
