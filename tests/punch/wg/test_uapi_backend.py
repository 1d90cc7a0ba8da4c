"""The UAPI socket shell: against real wireguard-go in a namespace (root), and against
small scripted unix-socket servers for the failure modes."""

from __future__ import annotations

import base64
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from punch.wg import (
    BackendTimeout,
    BackendUnavailable,
    DeviceNotFound,
    Peer,
    ProtocolError,
    UapiBackend,
    UapiError,
    link_exists,
    link_up,
    open_backend,
)
from tests.kernel.wgpair import genkey
from tests.nstools import Netns, unique_ifname
from tests.punch.wg.wgdump import comparable, wg_dump

KEY = bytes(range(32))

Handler = Callable[[socket.socket], None]


@pytest.fixture
def uapi_server(tmp_path: Path) -> Iterator[Callable[[Handler], Path]]:
    """Serve one scripted connection per request on tmp_path/wgs0.sock."""
    servers: list[socket.socket] = []
    threads: list[threading.Thread] = []

    def serve(handler: Handler) -> Path:
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(str(tmp_path / "wgs0.sock"))
        srv.listen(1)
        servers.append(srv)

        def run() -> None:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                request = b""
                while not request.endswith(b"\n\n"):
                    chunk = conn.recv(4096)
                    if not chunk:
                        return
                    request += chunk
                handler(conn)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        threads.append(t)
        return tmp_path

    yield serve
    for srv in servers:
        srv.close()
    for t in threads:
        t.join(5)


def replying(data: bytes, chunk: int = 1 << 16) -> Handler:
    def handler(conn: socket.socket) -> None:
        for i in range(0, len(data), chunk):
            conn.sendall(data[i:i + chunk])
    return handler


def test_reply_in_one_byte_chunks(uapi_server) -> None:  # type: ignore[no-untyped-def]
    reply = f"listen_port=7\npublic_key={KEY.hex()}\nallowed_ip=10.0.0.1/32\nerrno=0\n\n"
    d = uapi_server(replying(reply.encode(), chunk=1))
    with UapiBackend("wgs0", uapi_dir=d) as backend:
        dev = backend.get_device()
    assert dev.listen_port == 7 and dev.peers == (Peer(KEY, allowed_ips=("10.0.0.1/32",)),)


def test_errno_reply(uapi_server) -> None:  # type: ignore[no-untyped-def]
    d = uapi_server(replying(b"errno=-22\n\n"))
    with pytest.raises(UapiError, match="wgs0: UAPI set failed: errno=-22") as e:
        UapiBackend("wgs0", uapi_dir=d).set_peer(KEY, keepalive=1)
    assert e.value.errno == 22


def test_garbage_reply(uapi_server) -> None:  # type: ignore[no-untyped-def]
    d = uapi_server(replying(b"HTTP/1.1 400 Bad Request\n\n"))
    with pytest.raises(ProtocolError, match="wgs0: UAPI get reply: malformed line"):
        UapiBackend("wgs0", uapi_dir=d).get_device()


def test_non_ascii_reply(uapi_server) -> None:  # type: ignore[no-untyped-def]
    d = uapi_server(replying(b"listen_port=\xff\nerrno=0\n\n"))
    with pytest.raises(ProtocolError, match="non-ASCII"):
        UapiBackend("wgs0", uapi_dir=d).get_device()


def test_connection_closed_early(uapi_server) -> None:  # type: ignore[no-untyped-def]
    d = uapi_server(replying(b"listen_port=1\n"))
    with pytest.raises(ProtocolError, match="closed the connection before the end"):
        UapiBackend("wgs0", uapi_dir=d).get_device()


def test_timeout(uapi_server) -> None:  # type: ignore[no-untyped-def]
    release = threading.Event()
    d = uapi_server(lambda conn: (conn.sendall(b"listen_port=1\n"), release.wait(10)))
    try:
        with pytest.raises(BackendTimeout, match=r"wgs0: no complete UAPI get reply .* 0.2 s"):
            UapiBackend("wgs0", uapi_dir=d, timeout=0.2).get_device()
    finally:
        release.set()


def test_missing_socket(tmp_path: Path) -> None:
    with pytest.raises(DeviceNotFound, match=f"wgs0: no userspace WireGuard socket at "
                                             f"{tmp_path}/wgs0.sock"):
        UapiBackend("wgs0", uapi_dir=tmp_path).get_device()


def test_stale_socket(tmp_path: Path) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / "wgs0.sock"))
    stale.close()  # the path stays, nobody listens: what a crashed daemon leaves
    backend = open_backend("wgs0", uapi_dir=tmp_path)
    assert isinstance(backend, UapiBackend)
    with pytest.raises(BackendUnavailable, match="wgs0: .* refuses connections"):
        backend.get_device()


def test_regular_file_is_not_a_uapi_socket(tmp_path: Path) -> None:
    (tmp_path / "wgs0.sock").write_text("")
    try:
        backend = open_backend("wgs0", uapi_dir=tmp_path)
    except BackendUnavailable:
        return  # no kernel WireGuard here either: the netlink path was chosen
    assert not isinstance(backend, UapiBackend)
    backend.close()


@pytest.mark.root
def test_against_wireguard_go(needs_wireguard_go: None, netns: Netns, tmp_path: Path) -> None:
    ifname = unique_ifname()
    netns.start_wireguard_go(ifname)
    priv, pub = genkey()
    (tmp_path / "key").write_text(priv + "\n")
    (_, peer1), (_, peer2) = genkey(), genkey()
    netns.run(["wg", "set", ifname, "private-key", str(tmp_path / "key"), "listen-port", "51820",
               "peer", peer1, "endpoint", "192.0.2.1:1234",
               "allowed-ips", "10.0.0.2/32,fd00::2/128",
               "peer", peer2, "allowed-ips", "10.0.0.3/32"])
    with netns.entered():
        assert link_exists(ifname)
        link_up(ifname)
    in_ns = netns.argv([])
    with open_backend(ifname) as backend:
        assert isinstance(backend, UapiBackend)
        dev = backend.get_device()
        assert dev.public_key == base64.b64decode(pub)
        assert dev.listen_port == 51820 and len(dev.peers) == 2
        assert comparable(dev) == comparable(wg_dump(ifname, in_ns))

        key1, key2 = base64.b64decode(peer1), base64.b64decode(peer2)
        backend.set_peer(key1, endpoint=("2001:db8::1", 51821), keepalive=25)
        backend.set_peer(key2, endpoint=("198.51.100.7", 4000))
        backend.set_peer(os.urandom(32), endpoint=("198.51.100.8", 1), keepalive=1)  # not a peer
        dev = backend.get_device()
        assert dev.peer(key1) == Peer(key1, ("2001:db8::1", 51821), keepalive=25,
                                      allowed_ips=("10.0.0.2/32", "fd00::2/128"))
        assert dev.peer(key2) == Peer(key2, ("198.51.100.7", 4000),
                                      allowed_ips=("10.0.0.3/32",))
        assert len(dev.peers) == 2
        assert comparable(dev, counters=False) == comparable(wg_dump(ifname, in_ns),
                                                             counters=False)
        backend.set_peer(key1, keepalive=0)
        assert backend.get_device().peer(key1) == Peer(key1, ("2001:db8::1", 51821),
                                                       allowed_ips=("10.0.0.2/32", "fd00::2/128"))
    with netns.entered(), pytest.raises(DeviceNotFound, match="nosuchwg0"):
        link_up("nosuchwg0")
