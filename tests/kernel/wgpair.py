"""Kernel WireGuard fixtures for tests that run inside the throwaway VM.

Two namespaces joined by a veth (10.9.0.1 <-> 10.9.0.2), each with a kernel ``wg0``
(listen ports 51820 and 51821, tunnel 10.10.0.1 <-> 10.10.0.2) that knows the other as
a peer with allowed IPs but no endpoint, so no handshake happens until one is set.
"""

from __future__ import annotations

import base64
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.nstools import Netns, veth

__all__ = ["Side", "WgPair", "make_pair", "genkey", "HAVE_KERNEL_WG"]

HAVE_KERNEL_WG = Path("/sys/module/wireguard").exists()


def genkey() -> tuple[str, str]:
    """A (private, public) base64 key pair from ``wg``."""
    priv = subprocess.run(["wg", "genkey"], capture_output=True, text=True, check=True).stdout
    pub = subprocess.run(["wg", "pubkey"], input=priv, capture_output=True, text=True,
                         check=True).stdout
    return priv.strip(), pub.strip()


@dataclass
class Side:
    ns: Netns
    ip: str
    tun_ip: str
    port: int
    private: str
    public: str

    @property
    def allowed_ips(self) -> tuple[str, str]:
        """What the other side routes to this one."""
        return f"{self.tun_ip}/32", f"fd10::{self.port % 100}/128"

    @property
    def public_raw(self) -> bytes:
        return base64.b64decode(self.public)


@dataclass
class WgPair:
    a: Side
    b: Side

    def close(self) -> None:
        self.a.ns.close()
        self.b.ns.close()


def _setup(side: Side, other: Side, key_dir: Path) -> None:
    keyfile = key_dir / f"{side.port}.key"
    keyfile.write_text(side.private + "\n")
    ns = side.ns
    ns.run(["ip", "link", "add", "wg0", "type", "wireguard"])
    ns.run(["wg", "set", "wg0", "private-key", str(keyfile), "listen-port", str(side.port),
            "peer", other.public, "allowed-ips", ",".join(other.allowed_ips)])
    ns.run(["ip", "addr", "add", f"{side.tun_ip}/24", "dev", "wg0"])
    ns.run(["ip", "link", "set", "wg0", "up"])


def make_pair(key_dir: Path) -> WgPair:
    a_ns = Netns("ka")
    b_ns = None
    try:
        b_ns = Netns("kb")
        ka, kb = genkey(), genkey()
        a = Side(a_ns, "10.9.0.1", "10.10.0.1", 51820, *ka)
        b = Side(b_ns, "10.9.0.2", "10.10.0.2", 51821, *kb)
        veth(a_ns, "eth0", f"{a.ip}/24", b_ns, "eth0", f"{b.ip}/24")
        _setup(a, b, key_dir)
        _setup(b, a, key_dir)
        return WgPair(a, b)
    except BaseException:
        a_ns.close()
        if b_ns is not None:
            b_ns.close()
        raise
