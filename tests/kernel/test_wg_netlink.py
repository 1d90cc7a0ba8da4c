"""The netlink backend against real kernel WireGuard (inside the VM only; see conftest).

Python is 20-40x slower in the VM: the tests share one pair of namespaces and do
little each.
"""

from __future__ import annotations

import base64
import socket
import struct

import pytest

from punch.wg import DeviceNotFound, NetlinkBackend, Peer, link_exists, link_up, open_backend
from tests.kernel.wgpair import WgPair, genkey
from tests.punch.wg.wgdump import comparable, wg_dump


def backend_in(side) -> NetlinkBackend:  # type: ignore[no-untyped-def]
    with side.ns.entered():
        backend = open_backend("wg0")
    assert isinstance(backend, NetlinkBackend)
    return backend


def ping(side, ip: str) -> None:  # type: ignore[no-untyped-def]
    side.ns.run(["ping", "-c", "1", "-W", "5", ip], timeout=60)


def test_get_device_matches_wg(wgpair: WgPair) -> None:
    a, b = wgpair.a, wgpair.b
    with backend_in(a) as backend:
        dev = backend.get_device()
    assert dev.name == "wg0"
    assert dev.private_key == base64.b64decode(a.private)
    assert dev.public_key == a.public_raw
    assert dev.listen_port == a.port
    assert dev.peers == (Peer(b.public_raw, allowed_ips=b.allowed_ips),)
    assert dev == wg_dump("wg0", a.ns.argv([]))


def test_set_peer_then_handshake(wgpair: WgPair) -> None:
    a, b = wgpair.a, wgpair.b
    with backend_in(a) as backend:
        backend.set_peer(b.public_raw, endpoint=(b.ip, b.port), keepalive=25)
        peer = backend.get_device().peer(b.public_raw)
        assert peer is not None
        assert (peer.endpoint, peer.keepalive) == ((b.ip, b.port), 25)
        assert peer.allowed_ips == b.allowed_ips
        ping(a, b.tun_ip)
        dev = backend.get_device()
    peer = dev.peer(b.public_raw)
    assert peer is not None and peer.last_handshake is not None
    assert peer.rx_bytes > 0 and peer.tx_bytes > 0
    assert comparable(dev, counters=False) == comparable(wg_dump("wg0", a.ns.argv([])),
                                                         counters=False)
    # B learnt A's endpoint from the handshake.
    with backend_in(b) as backend:
        back = backend.get_device().peer(a.public_raw)
    assert back is not None and back.endpoint == (a.ip, a.port)


def test_set_peer_partial_updates_and_ipv6(wgpair: WgPair) -> None:
    a = wgpair.a
    _, other = genkey()
    a.ns.run(["wg", "set", "wg0", "peer", other, "allowed-ips", "10.77.0.0/16"])
    key = base64.b64decode(other)
    try:
        with backend_in(a) as backend:
            backend.set_peer(key, endpoint=("2001:db8::1", 51820))
            backend.set_peer(key, keepalive=7)
            peer = backend.get_device().peer(key)
            assert peer == Peer(key, ("2001:db8::1", 51820), keepalive=7,
                                allowed_ips=("10.77.0.0/16",))
            backend.set_peer(key, keepalive=0)  # off; endpoint left alone
            assert backend.get_device().peer(key) == Peer(key, ("2001:db8::1", 51820),
                                                          allowed_ips=("10.77.0.0/16",))
            # update only: an unknown key creates nothing
            backend.set_peer(b"\x01" * 32, keepalive=5)
            assert backend.get_device().peer(b"\x01" * 32) is None
    finally:
        a.ns.run(["wg", "set", "wg0", "peer", other, "remove"])


def test_raw_udp_from_wireguard_port(wgpair: WgPair) -> None:
    """A raw socket sends from the port kernel WireGuard holds; the tunnel survives."""
    a, b = wgpair.a, wgpair.b
    with backend_in(a) as backend:
        backend.set_peer(b.public_raw, endpoint=(b.ip, b.port), keepalive=25)
    payload = b"x" * 64
    with b.ns.entered():
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with a.ns.entered():
        raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with rx, raw, udp:
        with pytest.raises(OSError):
            udp.bind(("0.0.0.0", a.port))  # WireGuard holds it
        rx.bind((b.ip, 40000))
        rx.settimeout(30)
        raw.sendto(struct.pack("!HHHH", a.port, 40000, 8 + len(payload), 0) + payload,
                   (b.ip, 0))
        data, source = rx.recvfrom(2048)
    assert (data, source) == (payload, (a.ip, a.port))
    ping(a, b.tun_ip)


def test_missing_and_foreign_interfaces(wgpair: WgPair) -> None:
    with wgpair.a.ns.entered():
        for name in ("nosuchwg0", "lo"):
            with NetlinkBackend(name) as backend:
                with pytest.raises(DeviceNotFound, match=name):
                    backend.get_device()
                with pytest.raises(DeviceNotFound, match=name):
                    backend.set_peer(wgpair.b.public_raw, keepalive=1)
        assert link_exists("wg0") and not link_exists("nosuchwg0")
        link_up("wg0")
        with pytest.raises(DeviceNotFound, match="nosuchwg0"):
            link_up("nosuchwg0")
