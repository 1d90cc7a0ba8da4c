"""The real wg-rendezvous process with --relay-port on loopback: two plain UDP sockets
(standing in for two WireGuards) get a relay, bind to it with v2 bind datagrams, and
talk through it; a third socket is refused; the exit stats count both."""

from __future__ import annotations

import re
import socket
import time

import pytest

from rendezvous.v2.wire import FLAG_RELAY, BindBody, Endpoint, RelayBody, RequestBody
from tests.rendezvous.v2.test_server_v2 import Peer, V2Server, quiet, udp


def _free_port() -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _ask(peer: Peer, sock: socket.socket, other: Peer, flags: int) -> None:
    peer.ts = max(peer.ts + 1, time.time_ns())
    peer.rid += 1
    sock.sendto(peer.crypto.seal_request(RequestBody(peer.ts, peer.rid, other.pub, flags=flags)),
                ("127.0.0.1", peer.server.port))


def _relay_message(peer: Peer, sock: socket.socket) -> RelayBody:
    """Read SOCK until a relay message arrives (replies and notifies come first)."""
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        data, _ = sock.recvfrom(2048)
        body = peer.crypto.open(data)
        if isinstance(body, RelayBody):
            assert len(data) <= 116
            return body
    raise AssertionError("no relay message")


@pytest.fixture(params=[("mmsg", "listen"), ("plain", "listen"), ("mmsg", "wildcard"),
                        ("plain", "wildcard")], ids="-".join)
def relay_server(request, tmp_path):
    io, where = request.param
    port = _free_port()
    # a specific listen address is the relay's; on a wildcard one, --relay-address is
    where_args = (["--listen", "127.0.0.1"] if where == "listen"
                  else ["--relay-address", "127.0.0.1"])
    s = V2Server(tmp_path, *where_args, "--io", io, "--relay-port", str(port))
    s.relay_port = port
    yield s
    s.finish()


def test_relay_forwards_between_the_two_bound_sockets_only(relay_server) -> None:
    srv = relay_server
    a, b = Peer(srv), Peer(srv)
    sa, sb, sx = udp("127.0.0.1"), udp("127.0.0.1"), udp("127.0.0.1")
    _ask(a, sa, b, FLAG_RELAY)  # pending: A alone does not get a relay
    _ask(b, sb, a, FLAG_RELAY)  # mutual now: both are told the relay
    rb = _relay_message(b, sb)
    ra = _relay_message(a, sa)
    relay = Endpoint("127.0.0.1", srv.relay_port)
    assert ra.relay == rb.relay == relay
    assert ra.peer == b.pub and rb.peer == a.pub and rb.request_id == b.rid
    to = (relay.ip, relay.port)
    # A third socket sends before anyone is bound, and after: never forwarded
    sx.sendto(b"\x01\0\0\0early stranger", to)
    bind_a = a.crypto.seal_bind(BindBody(time.time_ns(), b.pub))
    sa.sendto(bind_a, to)
    sb.sendto(b.crypto.seal_bind(BindBody(time.time_ns(), a.pub)), to)
    time.sleep(0.2)
    sa.sendto(b"\x04\0\0\0to bob", to)
    data, src = sb.recvfrom(2048)
    assert data == b"\x04\0\0\0to bob" and src == to
    sb.sendto(b"\x04\0\0\0to alice", to)
    data, src = sa.recvfrom(2048)
    assert data == b"\x04\0\0\0to alice" and src == to
    # the stranger replays A's bind (stale) and sends data: nobody hears it
    sx.sendto(bind_a, to)
    sx.sendto(b"\x04\0\0\0stranger", to)
    assert quiet(sa) and quiet(sb)
    sa.sendto(b"\x04\0\0\0still bob", to)  # A's side was not moved by the replay
    assert sb.recvfrom(2048)[0] == b"\x04\0\0\0still bob"
    code, text = srv.finish()
    assert code == 0
    (stats,) = [line for line in text.splitlines() if "stats:" in line][-1:]
    counts = dict(re.findall(r"(\w+)=(\d+)", stats))
    assert counts["v2_relay_forwarded"] == "3", stats
    assert counts["v2_relay_binds"] == "2", stats
    assert int(counts["v2_relay_dropped_unbound"]) == 2, stats
    assert counts["v2_relay_dropped_bind_stale"] == "1", stats


@pytest.mark.parametrize("args, msg", [
    (["--relay-port", "70000"], "relay port"),
    (["--relay-port", "5000"], "needs --key"),
])
def test_relay_arguments(args, msg) -> None:
    import subprocess
    import sys

    from tests.nstools import py_env

    r = subprocess.run([sys.executable, "-m", "rendezvous", "--port", "0", *args],
                       check=False, capture_output=True, text=True, env=py_env(), timeout=30)
    assert r.returncode == 2 and msg in r.stderr, r.stderr


def test_relay_with_a_wildcard_listen_needs_an_address(tmp_path) -> None:
    with pytest.raises(AssertionError, match="relay-address"):
        V2Server(tmp_path, "--relay-port", str(_free_port()))
