"""The project's error hierarchy: one base class, and the protocol-error pair of h11/wsproto."""

from __future__ import annotations


class VoicebridgeError(Exception):
    """Base class of every error voicebridge raises on purpose."""


class ConfigError(VoicebridgeError):
    """The configuration is invalid; ``key`` names the offending key path (``a.b.c``)."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}" if key else reason)
        self.key = key
        self.reason = reason


class LocalProtocolError(VoicebridgeError):
    """We tried to send something the protocol does not allow in this state: our bug."""


class RemoteProtocolError(VoicebridgeError):
    """The peer sent something malformed or out of order: their fault, ends that call."""


class SocketClosed(VoicebridgeError):
    """A message socket closed (cleanly or not) while we were using it."""

    def __init__(self, code: int | None = None, reason: str = "") -> None:
        super().__init__(f"socket closed (code={code}, reason={reason!r})")
        self.code = code
        self.reason = reason
