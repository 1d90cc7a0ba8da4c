"""Read ``wg show <iface> dump`` output into our model, to cross-check the backends.

Test helper only: the client never runs ``wg``.
"""

from __future__ import annotations

import base64
import subprocess
from collections.abc import Sequence

from punch.wg import Device, Peer

__all__ = ["device_from_wg_dump", "wg_dump", "comparable"]


def _key(text: str) -> bytes | None:
    return None if text == "(none)" else base64.b64decode(text)


def _endpoint(text: str) -> tuple[str, int] | None:
    if text == "(none)":
        return None
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def device_from_wg_dump(ifname: str, text: str) -> Device:
    lines = text.rstrip("\n").split("\n")
    private, public, port, fwmark = lines[0].split("\t")
    peers = []
    for line in lines[1:]:
        key, _psk, endpoint, allowed, handshake, rx, tx, keepalive = line.split("\t")
        peers.append(Peer(
            public_key=base64.b64decode(key),
            endpoint=_endpoint(endpoint),
            last_handshake=float(handshake) if handshake != "0" else None,
            rx_bytes=int(rx),
            tx_bytes=int(tx),
            keepalive=0 if keepalive == "off" else int(keepalive),
            allowed_ips=() if allowed == "(none)" else tuple(allowed.split(",")),
        ))
    return Device(ifname, _key(public), _key(private), int(port),
                  0 if fwmark == "off" else int(fwmark, 16), tuple(peers))


def wg_dump(ifname: str, argv_prefix: Sequence[str] = ()) -> Device:
    """Run ``wg show IFNAME dump`` (optionally inside ``ip netns exec NS``) and parse it."""
    out = subprocess.run([*argv_prefix, "wg", "show", ifname, "dump"], capture_output=True,
                         text=True, check=True, timeout=30).stdout
    return device_from_wg_dump(ifname, out)


def comparable(dev: Device, counters: bool = True) -> Device:
    """DEV with handshake times truncated to whole seconds (wg prints seconds), peers in
    key order (`wg show` sorts them its own way) and, unless COUNTERS, byte counters
    zeroed (traffic may move them between two reads)."""
    peers = tuple(sorted((Peer(p.public_key, p.endpoint,
                       None if p.last_handshake is None else float(int(p.last_handshake)),
                       p.rx_bytes if counters else 0, p.tx_bytes if counters else 0,
                       p.keepalive, p.allowed_ips) for p in dev.peers),
                         key=lambda p: p.public_key))
    return Device(dev.name, dev.public_key, dev.private_key, dev.listen_port, dev.fwmark, peers)
