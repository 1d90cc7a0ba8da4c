"""The UAPI backend: a thin socket shell around :mod:`punch.wg.uapi`.

One connection per request, as ``wg`` does: connect to
``/var/run/wireguard/<iface>.sock``, send, read until the terminating blank line.
"""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path

from .backend import Backend
from .errors import (
    BackendTimeout,
    BackendUnavailable,
    DeviceNotFound,
    PermissionDenied,
    ProtocolError,
)
from .model import Device
from .uapi import ReplyParser, encode_get, encode_set_peer

__all__ = ["UapiBackend", "DEFAULT_UAPI_DIR", "DEFAULT_TIMEOUT", "uapi_socket_path"]

log = logging.getLogger(__name__)

DEFAULT_UAPI_DIR = Path("/var/run/wireguard")
DEFAULT_TIMEOUT = 5.0


def uapi_socket_path(ifname: str, uapi_dir: Path = DEFAULT_UAPI_DIR) -> Path:
    return Path(uapi_dir) / f"{ifname}.sock"


class UapiBackend(Backend):
    """Talk to a userspace implementation (wireguard-go, boringtun) over its UAPI socket."""

    kind = "uapi"

    def __init__(self, ifname: str, *, uapi_dir: Path = DEFAULT_UAPI_DIR,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        super().__init__(ifname)
        self.path = uapi_socket_path(ifname, uapi_dir)
        self.timeout = timeout

    def get_device(self) -> Device:
        return self._request(encode_get(), ReplyParser(self.ifname, "get")).device()

    def set_peer(self, public_key: bytes, *, endpoint: tuple[str, int] | None = None,
                 keepalive: int | None = None) -> None:
        request = encode_set_peer(public_key, endpoint=endpoint, keepalive=keepalive)
        self._request(request, ReplyParser(self.ifname, "set")).check()
        log.debug("%s: set peer %s endpoint=%s keepalive=%s", self.ifname,
                  public_key.hex()[:8], endpoint, keepalive)

    def _request(self, request: bytes, parser: ReplyParser) -> ReplyParser:
        deadline = time.monotonic() + self.timeout
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(self.timeout)
            try:
                s.connect(str(self.path))
                s.sendall(request)
                self._read_reply(s, parser, deadline)
            except FileNotFoundError:
                raise DeviceNotFound(f"{self.ifname}: no userspace WireGuard socket at "
                                     f"{self.path}", self.ifname) from None
            except ConnectionRefusedError:
                raise BackendUnavailable(f"{self.ifname}: {self.path} refuses connections "
                                         "(stale socket: is the WireGuard daemon still running?)",
                                         self.ifname) from None
            except PermissionError:
                raise PermissionDenied(f"{self.ifname}: no permission to use {self.path} "
                                       "(run as root)", self.ifname) from None
            except TimeoutError:
                raise BackendTimeout(f"{self.ifname}: no complete UAPI {parser.operation} reply "
                                     f"from {self.path} within {self.timeout:g} s",
                                     self.ifname) from None
            except (ConnectionResetError, BrokenPipeError) as e:
                raise ProtocolError(f"{self.ifname}: {self.path} closed the connection during "
                                    f"{parser.operation}: {e}", self.ifname) from None
        return parser

    def _read_reply(self, s: socket.socket, parser: ReplyParser, deadline: float) -> None:
        pending = b""
        while not parser.done:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            s.settimeout(remaining)
            data = s.recv(65536)
            if not data:
                raise ProtocolError(f"{self.ifname}: {self.path} closed the connection before "
                                    f"the end of the {parser.operation} reply", self.ifname)
            *lines, pending = (pending + data).split(b"\n")
            for line in lines:
                try:
                    text = line.decode("ascii")
                except UnicodeDecodeError:
                    raise ProtocolError(f"{self.ifname}: non-ASCII UAPI line {line[:80]!r}",
                                        self.ifname) from None
                if parser.feed_line(text):
                    break
