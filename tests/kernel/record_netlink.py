"""Record real kernel WireGuard get-device dumps as test data (run inside the VM).

    bash /work/shared/kernel-wg-vm.sh "$PY" -m tests.kernel.record_netlink

writes tests/punch/wg/data/netlink_dumps.json: for each case, the raw netlink messages
(hex) that pyroute2's WireGuard.info() returned and ``wg show wg0 dump`` at that moment.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from pyroute2 import WireGuard

from tests.kernel.wgpair import genkey, make_pair

OUT = Path(__file__).resolve().parent.parent / "punch" / "wg" / "data" / "netlink_dumps.json"


def record(ns, ifname: str = "wg0") -> dict[str, object]:  # type: ignore[no-untyped-def]
    with ns.entered():
        wg = WireGuard()
    with wg:
        msgs = wg.info(ifname)
    dump = ns.run(["wg", "show", ifname, "dump"]).stdout
    return {"ifname": ifname,
            "messages": [m.data[m.offset:m.offset + m["header"]["length"]].hex() for m in msgs],
            "wg_dump": dump}


def main() -> None:
    cases: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        pair = make_pair(Path(tmp))
        try:
            a, b = pair.a, pair.b
            a.ns.run(["ip", "link", "add", "wg1", "type", "wireguard"])
            cases["empty"] = record(a.ns, "wg1")
            a.ns.run(["wg", "set", "wg0", "fwmark", "0x42", "peer", b.public, "endpoint",
                      f"{b.ip}:{b.port}", "persistent-keepalive", "25"])
            a.ns.run(["ping", "-c", "1", "-W", "5", b.tun_ip], timeout=60)
            _, k6 = genkey()
            a.ns.run(["wg", "set", "wg0", "peer", k6, "endpoint", "[2001:db8::1]:51820",
                      "allowed-ips", "fd00::/64,192.0.2.0/24"])
            _, bare = genkey()
            a.ns.run(["wg", "set", "wg0", "peer", bare])
            cases["handshake_ipv6"] = record(a.ns)
            # Enough allowed IPs and peers to spill over several netlink messages.
            _, big = genkey()
            many = ",".join(f"10.{100 + i // 250}.{i % 250}.0/24" for i in range(1500))
            a.ns.run(["wg", "set", "wg0", "peer", big, "allowed-ips", many])
            for i in range(10):
                _, k = genkey()
                a.ns.run(["wg", "set", "wg0", "peer", k, "allowed-ips", f"172.16.{i}.0/24"])
            cases["multi_message"] = record(a.ns)
        finally:
            pair.close()
    OUT.write_text(json.dumps(cases, indent=1) + "\n")
    for name, case in cases.items():
        print(name, len(case["messages"]), "messages")  # type: ignore[index]


if __name__ == "__main__":
    main()
