"""``wg-punch status INTERFACE [--json]``: what each peer's endpoint is and where it came
from, merging the live device with the state file wg-punch writes.

The merge (:func:`build`) and the renderings (:func:`render_text`, :func:`to_json`)
are pure; :func:`main` reads the device through the usual backend and the state file.

Where an endpoint came from (``endpoint_source``):

- ``server``: it is what wg-punch set from the server's answer, or the same as the
  server's latest answer (WireGuard already had it and wg-punch kept it);
- ``roaming``: wg-punch set another endpoint, and WireGuard has since moved to this
  one (the peer roamed: WireGuard follows authenticated packets from a new address);
- ``other``: wg-punch set nothing and the server reports something else: set by hand
  (``wg set``, a config file), or roamed before wg-punch ran;
- ``unknown``: there is no wg-punch state to compare with;
- ``none``: the peer has no endpoint.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rendezvous.classic import short_key

from .errors import BadInterface, NotPermitted, PunchError
from .statefile import InterfaceState, PeerRecord, StateFileError, default_dir, read, state_path

if TYPE_CHECKING:
    from .wg import Device

__all__ = ["PeerStatus", "Report", "build", "endpoint_source", "main", "render_text", "to_json"]

SOURCE_TEXT = {
    "server": "from the server",
    "roaming": "WireGuard roaming",
    "other": "set by hand or unknown",
    "unknown": "origin unknown: no wg-punch state",
    "none": "",
}


def format_endpoint(ep: tuple[str, int] | None) -> str | None:
    if ep is None:
        return None
    host, port = ep
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def endpoint_source(current: str | None, record: PeerRecord | None, have_state: bool) -> str:
    """Where the endpoint CURRENT came from (see the module's docstring)."""
    if current is None:
        return "none"
    if not have_state:
        return "unknown"
    if record is not None and record.applied is not None:
        return "server" if current == record.applied else "roaming"
    if record is not None and record.answer_found and current == record.answer:
        return "server"
    return "other"


@dataclass(frozen=True)
class PeerStatus:
    key: bytes
    endpoint: str | None
    source: str
    latest_handshake: float | None  # unix time
    record: PeerRecord | None       # from the state file

    @property
    def nat(self) -> str:
        return self.record.nat if self.record is not None else "unknown"


@dataclass(frozen=True)
class Report:
    interface: str
    public_key: bytes | None
    listen_port: int
    state_file: str
    state: InterfaceState | None
    state_error: str | None
    peers: tuple[PeerStatus, ...]
    writer_alive: bool | None = None  # is the state's pid still there? None: not checked

    @property
    def running(self) -> bool:
        st = self.state
        return st is not None and st.ended is None and self.writer_alive is not False


def build(device: Device, state: InterfaceState | None, state_file: str,
          state_error: str | None = None, writer_alive: bool | None = None) -> Report:
    """Merge the live DEVICE with wg-punch's STATE (None: no state file).

    WRITER_ALIVE says whether the process that wrote STATE still runs: a daemon killed
    without a chance to say it ended leaves a state that claims it is running."""
    records = state.peers if state is not None else {}
    peers = []
    for p in device.peers:
        current = format_endpoint(p.endpoint)
        record = records.get(p.public_key)
        peers.append(PeerStatus(p.public_key, current,
                                endpoint_source(current, record, state is not None),
                                p.last_handshake or None, record))
    return Report(device.name, device.public_key, device.listen_port, state_file, state,
                  state_error, tuple(peers), writer_alive)


def _ago(t: float | None, now: float) -> str:
    if t is None:
        return "never"
    s = max(0, int(now - t))
    if s < 120:
        return f"{s}s ago"
    if s < 7200:
        return f"{s // 60}m {s % 60}s ago"
    if s < 2 * 86400:
        return f"{s // 3600}h {s % 3600 // 60}m ago"
    return f"{s // 86400}d {s % 86400 // 3600}h ago"


def _b64(key: bytes | None) -> str | None:
    return base64.b64encode(key).decode() if key is not None else None


def _pair(mine: str, theirs: str) -> str:
    """What two verdict tokens (rendezvous.nat) mean for a direct tunnel."""
    from rendezvous.nat import Mapping, NatVerdict

    from .netcheck import pair_advice

    def verdict(token: str) -> NatVerdict:
        name, _, extra = token.partition("+")
        try:
            mapping = Mapping[name.upper().replace("-", "_")]
        except KeyError:
            mapping = Mapping.UNKNOWN
        return NatVerdict(mapping, extra == "port-preserved")

    return pair_advice(verdict(mine), verdict(theirs))


def _nat_checks(st: InterfaceState, now: float) -> str:
    """When this host's NAT was checked, and what the daemon's checks again found."""
    if st.nat_checked is None:
        return ""
    again = ""
    if st.nat_checks:
        changed = f"{st.nat_changes} changed it" if st.nat_changes else "none changed it"
        again = f"; checked again {st.nat_checks} time{'s' * (st.nat_checks != 1)}, {changed}"
    return f" (checked {_ago(st.nat_checked, now)}{again})"


def render_text(report: Report, now: float) -> str:
    """The human form, in the spirit of ``wg show``."""
    lines = [f"interface: {report.interface}"]
    if report.public_key is not None:
        lines.append(f"  public key: {_b64(report.public_key)}")
    lines.append(f"  listening port: {report.listen_port}")
    st = report.state
    if st is not None:
        if st.ended is not None:
            run = f"ended {_ago(st.ended, now)}"
        elif report.running:
            run = f"running, state updated {_ago(st.updated, now)}"
        else:
            run = f"not running (pid {st.pid} is gone), state updated {_ago(st.updated, now)}"
        lines.append(f"  wg-punch: {st.mode}, pid {st.pid}, server {st.server}, "
                     f"started {_ago(st.started, now)}, {run}")
        lines.append(f"  last server reply: {_ago(st.last_reply, now)}")
        lines.append(f"  NAT (this host): {st.nat}{_nat_checks(st, now)}")
    elif report.state_error is not None:
        lines.append(f"  wg-punch: state file {report.state_file} unreadable: "
                     f"{report.state_error}")
    else:
        lines.append(f"  wg-punch: no wg-punch state found ({report.state_file} does not "
                     f"exist): showing the device only")
    for p in report.peers:
        lines.append("")
        lines.append(f"peer: {_b64(p.key)}")
        if p.endpoint is None:
            lines.append("  endpoint: (none)")
        else:
            lines.append(f"  endpoint: {p.endpoint} ({SOURCE_TEXT[p.source]})")
        lines.append(f"  latest handshake: {_ago(p.latest_handshake, now)}")
        r = p.record
        if st is not None:
            if r is None or r.answered_at is None:
                lines.append("  server answer: none yet")
            elif r.answer_found:
                lines.append(f"  server answer: {r.answer}, {_ago(r.answered_at, now)}")
            else:
                lines.append(f"  server answer: peer not known to the server, "
                             f"{_ago(r.answered_at, now)}")
            if r is not None and r.applied is not None:
                lines.append(f"  set by wg-punch: {r.applied}, {_ago(r.applied_at, now)}")
            if r is not None and r.path is not None:
                lines.append(f"  path: {r.path}")
        lines.append(f"  NAT: {p.nat}")
        if st is not None and "unknown" not in (st.nat, p.nat):
            lines.append(f"  direct tunnel: {_pair(st.nat, p.nat)}")
    return "\n".join(lines) + "\n"


def to_json(report: Report, now: float) -> dict[str, Any]:
    """The machine form: stable keys, unix times, endpoints as ``ip:port`` text."""
    st = report.state
    state = None if st is None else {
        "mode": st.mode, "pid": st.pid, "server": st.server, "started": st.started,
        "updated": st.updated, "ended": st.ended, "running": report.running,
        "last_reply": st.last_reply, "nat": st.nat, "nat_checked": st.nat_checked,
        "nat_checks": st.nat_checks, "nat_changes": st.nat_changes,
        "last_reply_age": round(now - st.last_reply, 3) if st.last_reply is not None else None,
    }
    peers = []
    for p in report.peers:
        r = p.record
        answer = None
        if r is not None and r.answered_at is not None:
            answer = {"endpoint": r.answer if r.answer_found else None,
                      "found": bool(r.answer_found), "at": r.answered_at,
                      "age": round(now - r.answered_at, 3)}
        peers.append({
            "public_key": _b64(p.key),
            "peer": short_key(p.key),
            "endpoint": p.endpoint,
            "endpoint_source": p.source,
            "latest_handshake": p.latest_handshake,
            "handshake_age": (round(now - p.latest_handshake, 3)
                              if p.latest_handshake is not None else None),
            "server_answer": answer,
            "applied": (None if r is None or r.applied is None
                        else {"endpoint": r.applied, "at": r.applied_at}),
            "status": r.status if r is not None else None,
            "nat": p.nat,
            "path": r.path if r is not None else None,
        })
    return {
        "interface": report.interface,
        "public_key": _b64(report.public_key),
        "listen_port": report.listen_port,
        "state_file": report.state_file,
        "state": state,
        "state_error": report.state_error,
        "peers": peers,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="wg-punch status",
        description="Show, per peer of INTERFACE, the endpoint in use and where it came "
                    "from, the latest handshake, the server's last answer and the NAT "
                    "verdict: the live device merged with the state file wg-punch writes.")
    p.add_argument("interface", metavar="INTERFACE")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument("--state-dir", type=Path, default=None, metavar="DIR",
                   help=f"where wg-punch writes its state (default ${'{'}WG_PUNCH_STATE_DIR"
                        f"{'}'} or {default_dir()})")
    return p


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_device(interface: str) -> Device:
    """The device through the usual backend; errors are PunchErrors with exit codes."""
    from . import wg

    uapi = Path(f"/var/run/wireguard/{interface}.sock")
    if not uapi.exists() and not wg.link_exists(interface):
        raise BadInterface(f"interface {interface} does not exist")
    try:
        with wg.open_backend(interface) as backend:
            return backend.get_device()
    except wg.PermissionDenied as e:
        raise NotPermitted(str(e)) from None
    except wg.WgError as e:
        raise BadInterface(str(e)) from None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        path = state_path(args.state_dir or default_dir(), args.interface)
    except StateFileError as e:
        print(f"wg-punch status: {e}", file=sys.stderr)
        return 2
    try:
        device = read_device(args.interface)
    except PunchError as e:
        print(f"wg-punch status: {e}", file=sys.stderr)
        return e.exit_code
    state, error = None, None
    try:
        state = read(path)
    except StateFileError as e:
        error = str(e)
    except OSError as e:
        error = e.strerror or str(e)
    if state is not None and state.interface != args.interface:
        error = f"it describes interface {state.interface!r}"
        state = None
    report = build(device, state, str(path), error,
                   _alive(state.pid) if state is not None and state.ended is None else None)
    now = time.time()
    if args.json:
        print(json.dumps(to_json(report, now), indent=2))
    else:
        sys.stdout.write(render_text(report, now))
    return 0
