"""--metrics: the key-to-metric rules, then the real server process scraped over HTTP
and parsed with prometheus_client's own parser, against traffic the test sent."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from rendezvous.metrics import (
    Sample,
    ServiceCollector,
    metric_for,
    parse_address,
    start_exporter,
)
from tests.nstools import py_env
from tests.rendezvous.test_server import RunningServer, ask, client

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

A, B, C = b"A" * 32, b"B" * 32, b"C" * 32


@pytest.mark.parametrize("key,sample", [
    ("found", Sample("requests", "counter", (("type", "classic"), ("result", "found")))),
    ("not_found", Sample("requests", "counter", (("type", "classic"), ("result", "not_found")))),
    ("v2_found", Sample("requests", "counter", (("type", "v2"), ("result", "found")))),
    ("v2_not_found", Sample("requests", "counter", (("type", "v2"), ("result", "not_found")))),
    ("dropped_length", Sample("dropped", "counter", (("reason", "length"),))),
    ("dropped_auth_failed", Sample("dropped", "counter", (("reason", "auth_failed"),))),
    ("notify_sent", Sample("notifications", "counter", (("result", "sent"),))),
    ("notify_not_found", Sample("notifications", "counter", (("result", "not_found"),))),
    ("rate_limited", Sample("rate_limited", "counter")),
    ("evicted", Sample("evictions", "counter")),
    ("expired", Sample("expiries", "counter")),
    ("send_failed", Sample("send_failures", "counter")),
    ("peers", Sample("peers", "gauge")),
    # table sizes of v2: gauges, though prefixed (they were counters, which go down)
    ("v2_peers", Sample("v2_peers", "gauge")),
    ("v2_asks", Sample("v2_asks", "gauge")),
    ("v2_keys_cached", Sample("v2_keys_cached", "gauge")),
    ("v2_keys_ready", Sample("v2_keys_ready", "gauge")),
    ("v2_evicted", Sample("v2_evicted", "counter")),
    ("relays_active", Sample("relays_active", "gauge")),
    ("relay_bytes", Sample("relay_bytes", "counter")),  # a new key: exported as it is
    ("requests", None),  # the sum of requests_total: not exported twice
])
def test_metric_for(key, sample):
    assert metric_for(key) == sample


@pytest.mark.parametrize("text,expected", [
    ("127.0.0.1:9477", ("127.0.0.1", 9477)),
    ("0.0.0.0:0", ("0.0.0.0", 0)),
    ("[::1]:9477", ("::1", 9477)),
])
def test_parse_address(text, expected):
    assert parse_address(text) == expected


@pytest.mark.parametrize("text,msg", [
    ("9477", "metrics address must be ADDR:PORT, got '9477'"),
    ("localhost:9477", "metrics address 'localhost' is not an IP address"),
    ("127.0.0.1:70000", "metrics port must be 0..65535, got '70000'"),
    ("127.0.0.1:x", "metrics port must be 0..65535, got 'x'"),
])
def test_parse_address_errors(text, msg):
    with pytest.raises(ValueError) as e:
        parse_address(text)
    assert str(e.value) == msg


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_collector_follows_the_source_without_code_changes():
    stats = {"found": 1, "notify_sent": 4, "brand_new": 9}
    exporter = start_exporter(("127.0.0.1", 0), [ServiceCollector(lambda: stats)], process=False)
    try:
        got = scrape(exporter.url)
        stats["notify_sent"] = 5
        again = scrape(exporter.url)
    finally:
        exporter.close()
    assert got == {
        ("wgpunch_rendezvous_requests_total", (("result", "found"), ("type", "classic"))): 1,
        ("wgpunch_rendezvous_notifications_total", (("result", "sent"),)): 4,
        ("wgpunch_rendezvous_brand_new_total", ()): 9,
    }
    assert again[("wgpunch_rendezvous_notifications_total", (("result", "sent"),))] == 5


def _metrics_url(lines: list[str]) -> str:
    for line in lines:
        m = re.search(r"metrics on (http://[\d.]+:\d+/metrics)", line)
        if m:
            return m.group(1)
    raise AssertionError("no metrics line: " + "".join(lines))


def _server_metrics(got: dict) -> dict:
    return {k: v for k, v in got.items() if k[0].startswith("wgpunch_rendezvous_")}


@pytest.mark.parametrize("io", ["mmsg", "plain"])
def test_real_server_metrics_match_the_traffic(io):
    s = RunningServer("--listen", "127.0.0.1", "--rate", "0", "--io", io,
                      "--metrics", "127.0.0.1:0", "--max-peers", "2")
    try:
        url = _metrics_url(s.lines)
        before = _server_metrics(scrape(url))
        assert before[("wgpunch_rendezvous_peers", ())] == 0
        a, b, c = client(), client(), client()
        assert ask(a, s.addr, A, B) == b""           # not found
        assert ask(b, s.addr, B, A) != b""           # found
        assert ask(a, s.addr, A, B) != b""           # found
        # C evicts A or B (max 2; all three in one tick, where the eviction order is
        # the registry's, see rendezvous/registry.py) and asks for a key nobody has
        assert ask(c, s.addr, C, b"D" * 32) == b""   # not found
        a.sendto(b"x" * 10, s.addr)                  # dropped: length
        a.sendto(bytes(32) + B, s.addr)              # dropped: zero key
        deadline = time.monotonic() + 5
        while True:
            got = _server_metrics(scrape(url))
            if got.get(("wgpunch_rendezvous_dropped_total", (("reason", "zero_key"),))) == 1 \
                    or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    finally:
        code, err = s.finish()
    assert code == 0, err
    assert got == {
        ("wgpunch_rendezvous_requests_total", (("result", "found"), ("type", "classic"))): 2,
        ("wgpunch_rendezvous_requests_total", (("result", "not_found"), ("type", "classic"))): 2,
        ("wgpunch_rendezvous_dropped_total", (("reason", "length"),)): 1,
        ("wgpunch_rendezvous_dropped_total", (("reason", "zero_key"),)): 1,
        # the dispatcher's reasons (no v2 key, classic turned off, classic over IPv6)
        # appear without any code in the collector: none happened here
        ("wgpunch_rendezvous_dropped_total", (("reason", "v2_off"),)): 0,
        ("wgpunch_rendezvous_dropped_total", (("reason", "classic_off"),)): 0,
        ("wgpunch_rendezvous_dropped_total", (("reason", "classic_ipv6"),)): 0,
        ("wgpunch_rendezvous_probes_total", ()): 0,  # --probe-port (none here)
        ("wgpunch_rendezvous_probe_refused_total", ()): 0,
        ("wgpunch_rendezvous_rate_limited_total", ()): 0,
        ("wgpunch_rendezvous_evictions_total", ()): 1,
        ("wgpunch_rendezvous_expiries_total", ()): 0,
        ("wgpunch_rendezvous_send_failures_total", ()): 0,
        ("wgpunch_rendezvous_peers", ()): 2,
    }
    # The stats log at exit says the same.
    for part in ("requests=4 found=2 not_found=2 dropped_length=1 dropped_zero_key=1 ",
                 "rate_limited=0 evicted=1 expired=0 peers=2 send_failed=0"):
        assert part in err


def test_rate_limited_and_expired_are_counted():
    s = RunningServer("--listen", "127.0.0.1", "--rate", "1", "--burst", "1", "--ttl", "0.2",
                      "--metrics", "127.0.0.1:0")
    try:
        url = _metrics_url(s.lines)
        a = client()
        assert ask(a, s.addr, A, B) == b""
        for _ in range(5):
            a.sendto(A + B, s.addr)  # over the limit: no reply, counted
        deadline = time.monotonic() + 5
        while True:  # the entry expires within a second of housekeeping
            got = _server_metrics(scrape(url))
            if (got[("wgpunch_rendezvous_expiries_total", ())] == 1
                    and got[("wgpunch_rendezvous_rate_limited_total", ())] == 5) \
                    or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    finally:
        s.finish()
    assert got[("wgpunch_rendezvous_rate_limited_total", ())] == 5
    assert got[("wgpunch_rendezvous_expiries_total", ())] == 1
    assert got[("wgpunch_rendezvous_peers", ())] == 0


def test_process_metrics_are_served_too():
    s = RunningServer("--listen", "127.0.0.1", "--metrics", "127.0.0.1:0")
    try:
        ask(client(), s.addr, A, B)  # the loop runs (a SIGTERM before it would be lost)
        got = scrape(_metrics_url(s.lines))
    finally:
        s.finish()
    assert got[("process_resident_memory_bytes", ())] > 1e6


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rendezvous", "--listen", "127.0.0.1",
                           "--port", "0", *args], capture_output=True, text=True,
                          env=env or py_env(), timeout=30)


def test_metrics_without_prometheus_client_exits_2(tmp_path):
    fake = tmp_path / "prometheus_client"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('not installed (test)')\n")
    env = py_env()
    env["PYTHONPATH"] = f"{tmp_path}:{env['PYTHONPATH']}"
    r = _run("--metrics", "127.0.0.1:0", env=env)
    assert r.returncode == 2
    assert r.stderr.splitlines()[-1] == ("wg-rendezvous: --metrics needs the prometheus-client "
                                         "package (pip install prometheus-client)")
    # ... and without --metrics the server does not need it: it serves.
    p = subprocess.Popen([sys.executable, "-m", "rendezvous", "--listen", "127.0.0.1", "--port",
                          "0"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert p.stderr is not None
        m = re.search(r"listening on 127.0.0.1:(\d+)", p.stderr.readline())
        assert m
        assert ask(client(), ("127.0.0.1", int(m.group(1))), A, B) == b""
    finally:
        p.terminate()
        p.wait(10)
        p.stderr.close()  # type: ignore[union-attr]


def test_metrics_port_in_use_exits_1():
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        r = _run("--metrics", f"127.0.0.1:{port}")
    finally:
        busy.close()
    assert r.returncode == 1
    assert r.stderr.splitlines()[-1] == (f"wg-rendezvous: cannot serve metrics on "
                                         f"127.0.0.1:{port}: Address already in use")


def test_bad_metrics_address_exits_2():
    r = _run("--metrics", "nowhere")
    assert r.returncode == 2 and "metrics address must be ADDR:PORT, got 'nowhere'" in r.stderr


def test_store_state_is_a_gauge_and_outages_are_counted(tmp_path):
    from tests.rendezvous.redislib import RedisServer
    r = RedisServer(tmp_path).start()
    s = RunningServer("--listen", "127.0.0.1", "--rate", "0", "--metrics", "127.0.0.1:0",
                      "--store", r.url)
    try:
        url = _metrics_url(s.lines)
        a = client()
        assert ask(a, s.addr, A, A) != b""
        got = _server_metrics(scrape(url))
        assert got[("wgpunch_rendezvous_store_up", ())] == 1
        assert got[("wgpunch_rendezvous_store_roundtrips_total", ())] >= 1
        r.stop()
        assert ask(a, s.addr, A, A) != b""  # answered from the own table
        got = _server_metrics(scrape(url))
        assert got[("wgpunch_rendezvous_store_up", ())] == 0
        assert got[("wgpunch_rendezvous_store_outages_total", ())] == 1
        assert got[("wgpunch_rendezvous_store_unavailable_total", ())] == 1
        assert got[("wgpunch_rendezvous_notices_received_total", ())] == 0
    finally:
        code, err = s.finish()
        r.stop()
    assert code == 0, err
