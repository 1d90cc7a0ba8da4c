"""The client's errors; each maps to one exit status and a one-line message."""

from __future__ import annotations

__all__ = ["PunchError", "NotPermitted", "BadInterface", "BadServerKey", "FilterRefused",
           "ServerUnreachable", "ServerUnresolvable"]


class PunchError(Exception):
    """Something the user can fix; the message is printed as one line."""

    exit_code = 1


class NotPermitted(PunchError):
    exit_code = 3


class BadInterface(PunchError):
    exit_code = 4


class ServerUnresolvable(PunchError):
    exit_code = 5


class BadServerKey(PunchError):
    """--server-key is not a usable X25519 public key (a bad argument)."""

    exit_code = 2


class ServerUnreachable(PunchError):
    """No route to any address of the server."""

    exit_code = 1


class FilterRefused(PunchError):
    """The kernel refused the reply filter on a raw socket (SO_ATTACH_FILTER)."""

    exit_code = 1
