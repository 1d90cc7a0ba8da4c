"""The client's errors; each maps to one exit status and a one-line message."""

from __future__ import annotations

__all__ = ["PunchError", "NotPermitted", "BadInterface", "ServerUnresolvable"]


class PunchError(Exception):
    """Something the user can fix; the message is printed as one line."""

    exit_code = 1


class NotPermitted(PunchError):
    exit_code = 3


class BadInterface(PunchError):
    exit_code = 4


class ServerUnresolvable(PunchError):
    exit_code = 5
