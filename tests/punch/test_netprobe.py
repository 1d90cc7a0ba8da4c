"""``wg-punch netcheck`` as a real process: raw-socket probes from a real wireguard-go
device's port to the real wg-rendezvous with --probe-port on a namespace's loopback
(no NAT there: the verdict is "none"; the lab tests each NAT mode), classic and v2;
and its one-line errors and exit statuses. Also the probe as the daemon's loop drives
it (:class:`punch.netprobe.ProbeRun`, in this process inside the namespace), and where
a v2 probe's timestamps come from."""

from __future__ import annotations

import json
import select
import socket
import sys
import time
from collections import Counter

import pytest

from punch.netprobe import ClassicExchange, ProbeConfig, ProbeRun, V2Exchange
from punch.policy import Timing
from punch.v2machine import PunchV2
from tests.nstools import Netns
from tests.punch.test_client import Pair, punch, start_server
from tests.punch.test_client_v2 import server_keys


@pytest.fixture
def ns():
    with Netns("nc") as n:
        yield n


@pytest.mark.root
@pytest.mark.usefixtures("needs_wireguard_go")
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


@pytest.mark.root
@pytest.mark.usefixtures("needs_wireguard_go")
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


@pytest.mark.root
@pytest.mark.usefixtures("needs_wireguard_go")
def test_a_silent_server_gives_no_verdict_and_exit_6(ns):
    pair = Pair(ns)
    r = punch(ns, "netcheck", "--timeout", "0.6", "127.0.0.1:9", pair.ifs[0])
    assert r.returncode == 6
    assert r.stderr.strip().splitlines() == [
        "wg-punch netcheck: no verdict: IPv4: no reply from the server's port to the probe"]
    assert "IPv4: unknown" in r.stdout and "probe to 127.0.0.1:10: no reply" in r.stdout


@pytest.mark.root
@pytest.mark.usefixtures("needs_wireguard_go")
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


class Counting(ClassicExchange):
    """Classic self-lookups, counting the tries sent per role."""

    def __init__(self, key: bytes) -> None:
        super().__init__(key)
        self.sent: Counter[str] = Counter()

    def request(self, role: str) -> bytes:
        self.sent[role] += 1
        return super().request(role)


def drive(run: ProbeRun) -> list[float]:
    """Drive RUN to its end as the daemon's loop does; the wake-up times it asked for."""
    wakeups = []
    while not run.done:
        wakeups.append(run.next_wakeup())
        poller = select.poll()
        for fd in run.waiting():
            poller.register(fd, select.POLLIN)
        for fd, _ in poller.poll(max(0.0, run.next_wakeup() - time.monotonic()) * 1000 + 1):
            run.readable(fd)
        run.tick(time.monotonic())
    return wakeups


WG_PORT = 51999  # "WireGuard's" port: a plain socket holds it, as WireGuard would


@pytest.mark.root
def test_a_probe_run_driven_by_a_loop_gets_both_answers(ns):
    start_server(ns, "--port", "49918", "--probe-port", "49919")
    with ns.entered(), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as wg:
        wg.bind(("127.0.0.1", WG_PORT))
        ex = Counting(b"K" * 32)
        run = ProbeRun(("127.0.0.1", 49918), WG_PORT, ProbeConfig(49919, timeout=3.0), ex,
                       time.monotonic())
        try:
            assert not run.done and len(run.waiting()) == 2  # sent at once, not answered
            assert ex.sent == {"primary": 1, "port": 1}
            drive(run)
        finally:
            run.close()
    assert run.found == {"primary": ("127.0.0.1", WG_PORT), "port": ("127.0.0.1", WG_PORT)}
    assert run.waiting() == [] and run.next_wakeup() == float("inf")
    assert run.verdict().nat.token == "none"


@pytest.mark.root
def test_a_probe_run_tries_a_silent_port_again_and_ends_after_its_last_try(ns):
    start_server(ns, "--port", "49918")  # no --probe-port: 49919 stays silent
    with ns.entered(), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as wg:
        wg.bind(("127.0.0.1", WG_PORT))
        ex = Counting(b"K" * 32)
        run = ProbeRun(("127.0.0.1", 49918), WG_PORT,
                       ProbeConfig(49919, timeout=0.6, tries=3), ex, time.monotonic())
        try:
            wakeups = drive(run)
        finally:
            run.close()
    assert run.found == {"primary": ("127.0.0.1", WG_PORT)}
    assert ex.sent == {"primary": 1, "port": 3}
    assert len(set(wakeups)) == 3  # one wake-up per try: the second, the third, the end
    assert run.verdict().public == ("127.0.0.1", WG_PORT)


def test_v2_probe_timestamps_come_from_the_running_client_s_clock():
    """During the daemon's re-check the client goes on sending requests: the probe's
    timestamps come from the machine's one clock, and a stale answer moves that clock."""
    from rendezvous.v2.crypto import ClientCrypto, ServerCrypto
    from rendezvous.v2.keys import generate_private_key, public_key
    from rendezvous.v2.wire import ReplyBody, Status

    server_priv, client_priv = generate_private_key(), generate_private_key()
    me = public_key(client_priv)
    client, server = ClientCrypto(client_priv, public_key(server_priv)), ServerCrypto(server_priv)
    machine = PunchV2(Timing(), daemon=True, families=(4,))
    wall = time.time_ns()
    before = machine.stamp(wall)
    ex = V2Exchange(client, me, stamps=machine)
    bodies = [server.open_request(ex.request(role))[1] for role in ("primary", "port")]
    after = machine.stamp(wall)
    assert before < bodies[0].timestamp < bodies[1].timestamp < after
    lowest = after + 10**12  # the server accepts from here on
    stale = server.seal_reply(me, ReplyBody(bodies[1].request_id, Status.STALE, lowest, None))
    assert ex.observed("port", stale) == V2Exchange.RETRY
    assert machine.stamp(wall) >= lowest
    again = server.open_request(ex.request("port"))[1]
    assert again.timestamp > lowest
