"""Single-use, expiring stream tokens bound to a CallSid: the gate of the media WebSocket.

The voice webhook issues a token and puts it in a TwiML ``<Parameter>``; Twilio
brings it back in ``start.customParameters`` and the media socket verifies it before
bridging anything. A token is stateless (HMAC-SHA256 over the CallSid, an expiry and
a random nonce), so any instance holding the secret can check it.

Format (URL-safe, about 120 characters for a Twilio CallSid)::

    v1.<call_sid>.<expiry, integer ms since the epoch>.<nonce, 16 bytes b64url>.<mac, b64url>
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import hmac
import math
import re
import secrets
import time
from collections.abc import Callable
from typing import Literal

from voicebridge.errors import VoicebridgeError

__all__ = ["MAX_REMEMBERED_TOKENS", "StreamTokens", "TokenRejected"]

#: How many used tokens one instance remembers (each until its expiry) to refuse a
#: second use. At the default 60 s lifetime this is ~1,600 new calls per second,
#: far beyond one instance; the bound only stops a flood from growing memory without end.
MAX_REMEMBERED_TOKENS = 100_000

_VERSION = "v1"
_NONCE_BYTES = 16
#: Tokens longer than this are malformed before any parsing (a CallSid is 34 characters).
_MAX_TOKEN_CHARS = 200
#: What a CallSid may look like here: Twilio's are ``CA`` + 32 hex digits; the simulator's
#: may differ, but never contain the token's ``.`` separator.
_CALL_SID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_NONCE = re.compile(r"[A-Za-z0-9_-]{22}")
_MAC = re.compile(r"[A-Za-z0-9_-]{43}")
_EXPIRY = re.compile(r"[0-9]{1,15}")
#: Separates this use of the secret from any other use of the same key.
_DOMAIN = b"voicebridge stream token\x00"

Reason = Literal["malformed", "bad-signature", "expired", "wrong-call", "reused", "overloaded"]


class TokenRejected(VoicebridgeError):
    """A stream token failed verification; ``reason`` says why.

    ``malformed``: not a token at all; ``bad-signature``: not issued with our secret
    (or altered); ``wrong-call``: issued for another CallSid; ``expired``: past its
    lifetime; ``reused``: already verified once by this instance; ``overloaded``: this
    instance cannot remember another used token (see ``StreamTokens.verify``).
    """

    def __init__(self, reason: Reason) -> None:
        super().__init__(f"stream token rejected: {reason}")
        self.reason: Reason = reason


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class StreamTokens:
    """Issues and verifies stream tokens for calls.

    ``clock`` is wall-clock seconds on purpose: tokens cross processes and hosts,
    whose monotonic clocks do not agree (injectable for tests). Keep instances'
    clocks in sync (NTP); a skew eats into ``ttl_s``. Single use holds per instance:
    a token verified by one instance is not known as used by another. Not thread-safe.
    """

    __slots__ = ("_clock", "_expiries", "_secret", "_ttl_ms", "_used")

    def __init__(
        self, *, secret: bytes, ttl_s: float, clock: Callable[[], float] = time.time
    ) -> None:
        """Raises ``ValueError`` for an empty secret or a lifetime that is not positive."""
        if not secret:
            raise ValueError("the stream token secret is empty")
        if not (ttl_s > 0 and math.isfinite(ttl_s)):
            raise ValueError(f"stream token lifetime must be positive, not {ttl_s!r}")
        self._secret = secret
        self._ttl_ms = max(1, round(ttl_s * 1000))
        self._clock = clock
        # Used nonces -> expiry (ms), and the same pairs as a min-heap on expiry so that
        # expired ones are forgotten in order.
        # Invariant: _used and _expiries hold the same (nonce, expiry) pairs.
        self._used: dict[str, int] = {}
        self._expiries: list[tuple[int, str]] = []

    def _now_ms(self) -> int:
        return math.floor(self._clock() * 1000)

    def _mac(self, call_sid: str, expiry: str, nonce: str) -> str:
        message = _DOMAIN + f"{_VERSION}.{call_sid}.{expiry}.{nonce}".encode("ascii")
        return _b64(hmac.new(self._secret, message, hashlib.sha256).digest())

    def issue(self, call_sid: str) -> str:
        """A new token for ``call_sid``, valid for ``ttl_s`` from now.

        Raises ``ValueError`` if ``call_sid`` is not 1-64 of ``[A-Za-z0-9_-]``.
        """
        if not _CALL_SID.fullmatch(call_sid):
            raise ValueError(f"not a CallSid: {call_sid[:70]!r}")
        expiry = str(self._now_ms() + self._ttl_ms)
        nonce = _b64(secrets.token_bytes(_NONCE_BYTES))
        mac = self._mac(call_sid, expiry, nonce)
        return f"{_VERSION}.{call_sid}.{expiry}.{nonce}.{mac}"

    def verify(self, token: str, *, call_sid: str) -> None:
        """Accept ``token`` for ``call_sid`` once, or raise ``TokenRejected``.

        Checks, in order: shape (``malformed``), HMAC (``bad-signature``), CallSid
        (``wrong-call``), expiry (``expired``), earlier use (``reused``). An accepted
        token is remembered until its expiry, after which it is refused as expired.

        When ``MAX_REMEMBERED_TOKENS`` unexpired tokens are already remembered, a new,
        otherwise valid token is refused (``overloaded``) rather than accepted
        unremembered: forgetting a live token would let it be replayed, so the safe
        failure is to turn the call away.
        """
        if len(token) > _MAX_TOKEN_CHARS:
            raise TokenRejected("malformed")
        parts = token.split(".")
        if len(parts) != 5 or parts[0] != _VERSION:
            raise TokenRejected("malformed")
        _, token_call_sid, expiry, nonce, mac = parts
        if not (
            _CALL_SID.fullmatch(token_call_sid)
            and _EXPIRY.fullmatch(expiry)
            and _NONCE.fullmatch(nonce)
            and _MAC.fullmatch(mac)
        ):
            raise TokenRejected("malformed")
        expected = self._mac(token_call_sid, expiry, nonce)
        if not hmac.compare_digest(expected.encode("ascii"), mac.encode("ascii")):
            raise TokenRejected("bad-signature")
        if token_call_sid != call_sid:  # a CallSid is no secret: no constant time needed
            raise TokenRejected("wrong-call")
        now = self._now_ms()
        expires = int(expiry)
        if now >= expires:
            raise TokenRejected("expired")
        self._forget_expired(now)
        if nonce in self._used:
            raise TokenRejected("reused")
        if len(self._used) >= MAX_REMEMBERED_TOKENS:
            raise TokenRejected("overloaded")
        self._used[nonce] = expires
        heapq.heappush(self._expiries, (expires, nonce))

    def _forget_expired(self, now_ms: int) -> None:
        while self._expiries and self._expiries[0][0] <= now_ms:
            _, nonce = heapq.heappop(self._expiries)
            del self._used[nonce]
