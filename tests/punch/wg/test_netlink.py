"""The netlink backend's message parsing against real kernel dumps recorded in the VM,
and its errors where kernel WireGuard is missing (as on the host)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.generic.wireguard import wgmsg

from punch.wg import (
    BackendUnavailable,
    Device,
    DeviceNotFound,
    NetlinkBackend,
    NetlinkOperationError,
    PermissionDenied,
    ProtocolError,
    open_backend,
)
from punch.wg.netlink import device_from_messages, netlink_error
from tests.punch.wg.wgdump import comparable, device_from_wg_dump

DUMPS = json.loads((Path(__file__).parent / "data" / "netlink_dumps.json").read_text())
KERNEL_WG = Path("/sys/module/wireguard").exists()


def messages(case: str) -> list[Any]:
    out = []
    for raw in DUMPS[case]["messages"]:
        msg = wgmsg(bytes.fromhex(raw))
        msg.decode()
        out.append(msg)
    return out


@pytest.mark.parametrize("case", sorted(DUMPS))
def test_recorded_dump_matches_wg(case: str) -> None:
    ifname = DUMPS[case]["ifname"]
    dev = device_from_messages(ifname, messages(case))
    assert comparable(dev) == comparable(device_from_wg_dump(ifname, DUMPS[case]["wg_dump"]))


def test_empty_device() -> None:
    assert device_from_messages("wg1", messages("empty")) == Device("wg1")


def test_handshake_ipv6_and_bare_peers() -> None:
    dev = device_from_messages("wg0", messages("handshake_ipv6"))
    assert dev.listen_port == 51820 and dev.fwmark == 0x42
    assert dev.public_key is not None and len(dev.public_key) == 32
    live, v6, bare = dev.peers
    assert live.last_handshake is not None and live.rx_bytes > 0 and live.keepalive == 25
    assert live.endpoint == ("10.9.0.2", 51821)
    assert v6.endpoint == ("2001:db8::1", 51820) and v6.last_handshake is None
    assert v6.allowed_ips == ("fd00::/64", "192.0.2.0/24")
    assert (bare.endpoint, bare.allowed_ips, bare.keepalive) == (None, (), 0)


def test_peer_continued_in_next_message_is_merged() -> None:
    msgs = messages("multi_message")
    assert len(msgs) == 2
    first_only = device_from_messages("wg0", msgs[:1])
    merged = device_from_messages("wg0", msgs)
    big = [p for p in merged.peers if len(p.allowed_ips) == 1500]
    assert len(big) == 1
    partial = first_only.peer(big[0].public_key)
    assert partial is not None and 0 < len(partial.allowed_ips) < 1500
    # the continuation carries only key + allowed IPs: the other fields must survive
    assert (partial.endpoint, partial.keepalive) == (big[0].endpoint, big[0].keepalive)
    assert len(merged.peers) == len({p.public_key for p in merged.peers}) == 14


class _Nla(dict):  # the shape of a decoded pyroute2 message, to feed bad values
    def get_attr(self, name: str) -> Any:
        return self.get(name)


def test_bad_values_are_protocol_errors() -> None:
    with pytest.raises(ProtocolError, match="empty netlink reply"):
        device_from_messages("wg0", [])
    with pytest.raises(ProtocolError, match="device public key"):
        device_from_messages("wg0", [_Nla(WGDEVICE_A_PUBLIC_KEY=b"AAAA")])
    bad_peer = _Nla(WGPEER_A_PUBLIC_KEY=b"A" * 43 + b"=",
                    WGPEER_A_ALLOWEDIPS=[_Nla(WGALLOWEDIP_A_FAMILY=2,
                                              WGALLOWEDIP_A_IPADDR="0a:00:00:01",
                                              WGALLOWEDIP_A_CIDR_MASK=40)])
    with pytest.raises(ProtocolError, match="bad mask /40"):
        device_from_messages("wg0", [_Nla(WGDEVICE_A_PEERS=[bad_peer])])


@pytest.mark.parametrize("code, cls, text", [
    (19, DeviceNotFound, "wg5: no such interface"),
    (95, DeviceNotFound, "wg5: not a WireGuard interface"),
    (1, PermissionDenied, "CAP_NET_ADMIN"),
    (22, NetlinkOperationError, "wg5: netlink set failed: errno=22"),
])
def test_netlink_errors(code: int, cls: type, text: str) -> None:
    err = netlink_error(NetlinkError(code), "wg5", "set")
    assert type(err) is cls and text in str(err) and err.ifname == "wg5"


@pytest.mark.skipif(KERNEL_WG, reason="kernel WireGuard is present here")
def test_missing_kernel_family_is_backend_unavailable(tmp_path: Path) -> None:
    with pytest.raises(BackendUnavailable, match="wg5: no WireGuard kernel module"):
        NetlinkBackend("wg5")
    with pytest.raises(BackendUnavailable) as e:
        open_backend("wg5", uapi_dir=tmp_path)
    assert str(e.value) == (f"wg5: no WireGuard kernel module and no userspace socket at "
                            f"{tmp_path}/wg5.sock")
