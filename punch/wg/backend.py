"""The one interface every WireGuard backend implements."""

from __future__ import annotations

import abc
from types import TracebackType

from .model import Device

__all__ = ["Backend"]


class Backend(abc.ABC):
    """Read a WireGuard device and update one peer at a time; a context manager."""

    #: short name for logs: "uapi" or "netlink"
    kind: str = "?"

    def __init__(self, ifname: str) -> None:
        self.ifname = ifname

    @abc.abstractmethod
    def get_device(self) -> Device:
        """The device's keys, port, fwmark and peers as they are now."""

    @abc.abstractmethod
    def set_peer(self, public_key: bytes, *, endpoint: tuple[str, int] | None = None,
                 keepalive: int | None = None) -> None:
        """Update an existing peer's endpoint and/or persistent keepalive (seconds, 0 = off).

        None leaves a field unchanged. Never creates or removes a peer and never touches
        its allowed IPs; like ``wg``'s update-only flag, a key that is not a peer of the
        device is silently ignored by WireGuard itself.
        """

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the backend's resources; idempotent."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.ifname} ({self.kind})>"
