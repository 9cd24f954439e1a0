"""Single-use, expiring stream tokens bound to a call: the gate of the media WebSocket.

The voice webhook issues a token and puts it in a TwiML ``<Parameter>``, beside the
other parameters of the ``<Stream>``; Twilio brings them all back in
``start.customParameters`` and the media socket verifies the token against them before
bridging anything. A token is stateless (HMAC-SHA256 over the CallSid, an expiry, a
random nonce and a tag of the stream's other parameters), so any instance holding the
secret can check it.

Rotation: tokens are issued with the current secret only; a ``previous_secret`` is still
accepted for verifying, so that tokens issued before a change of secret (by this
instance before a reload, or by another instance not yet switched) keep working.

What the token vouches for is a ``StreamClaims``: the CallSid, and the assistant, caller
and called number that go on to Vapi's ``POST /call``, and the call's route with its
decision (``voicebridge.routing``: the inline assistant and overrides). A ``start`` that
changes any of them is refused (``wrong-parameters``), however valid the token.

Format (URL-safe, 141 characters for a Twilio CallSid, at most ``MAX_TOKEN_CHARS``)::

    v2.<call_sid>.<expiry, ms since the epoch>.<nonce, 16 bytes>.<claims tag, 16 bytes>.<mac>

(bytes in unpadded base64url). The MAC covers everything before it; the claims tag is a
keyed hash of the other claims, so that a changed parameter is told apart from a forged
token. The route and decision are hashed only when either is set: a call of the default
route hashes exactly as before they existed, and the length prefixes keep the two shapes
from ever encoding alike.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import heapq
import hmac
import math
import re
import secrets
import time
from collections.abc import Callable
from typing import Literal

from attrs import frozen

from voicebridge.errors import VoicebridgeError

__all__ = [
    "MAX_REMEMBERED_TOKENS",
    "MAX_TOKEN_CHARS",
    "StreamClaims",
    "StreamTokens",
    "TokenRejected",
    "is_call_sid",
]

#: How many used tokens one instance remembers (each until its expiry) to refuse a
#: second use. At the default 60 s lifetime this is ~1,600 new calls per second,
#: far beyond one instance; the bound only stops a flood from growing memory without end.
MAX_REMEMBERED_TOKENS = 100_000
#: The longest token there is (a 64-character CallSid and a 15-digit expiry): with its
#: name it stays far inside Twilio's limit on a ``<Parameter>`` (name and value under
#: 500 characters), and anything longer is malformed before any parsing.
MAX_TOKEN_CHARS = 173

_VERSION = "v2"
_NONCE_BYTES = 16
#: 128 bits: the tag sits under the MAC, so it needs only to be unguessable for another
#: set of parameters, not to resist forgery on its own.
_TAG_BYTES = 16
#: What a CallSid may look like here: Twilio's are ``CA`` + 32 hex digits; the simulator's
#: may differ, but never contain the token's ``.`` separator.
_CALL_SID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_NONCE = re.compile(r"[A-Za-z0-9_-]{22}")
_TAG = _NONCE
_MAC = re.compile(r"[A-Za-z0-9_-]{43}")
_EXPIRY = re.compile(r"[0-9]{1,15}")
#: Separate this use of the secret from any other use of the same key (the outbound
#: assistant grant has a label of its own too).
_DOMAIN = b"voicebridge stream token\x00"
_CLAIMS_DOMAIN = b"voicebridge stream claims\x00"

Reason = Literal[
    "malformed",
    "bad-signature",
    "expired",
    "wrong-call",
    "wrong-parameters",
    "reused",
    "overloaded",
]


class TokenRejected(VoicebridgeError):
    """A stream token failed verification; ``reason`` says why.

    ``malformed``: not a token at all; ``bad-signature``: not issued with our secret
    (or altered); ``wrong-call``: issued for another CallSid; ``expired``: past its
    lifetime; ``wrong-parameters``: the stream's assistant, caller, called number, route
    or decision is not the one the token was issued with; ``reused``: already verified once by this
    instance; ``overloaded``: this instance cannot remember another used token (see
    ``StreamTokens.verify``).
    """

    def __init__(self, reason: Reason) -> None:
        super().__init__(f"stream token rejected: {reason}")
        self.reason: Reason = reason


def is_call_sid(text: str) -> bool:
    """Whether ``text`` can be a CallSid here: 1-64 of ``[A-Za-z0-9_-]``."""
    return _CALL_SID.fullmatch(text) is not None


@frozen(kw_only=True)
class StreamClaims:
    """What a stream token vouches for: the call, and the parameters of its ``<Stream>``
    that reach Vapi. ``assistant`` is "" for the configured assistant; ``caller`` and
    ``called`` are "" when the webhook left them out; ``route`` is the route that took
    the call ("" for the default) and ``decision`` its inline assistant and overrides
    (``routing.encode_decision``; "" for none)."""

    call_sid: str
    assistant: str = ""
    caller: str = ""
    called: str = ""
    route: str = ""
    decision: str = ""


def _encode_claims(claims: StreamClaims) -> bytes:
    """The claims the tag covers, length-prefixed: no two different claims encode alike
    (a value may hold any character)."""
    out = bytearray()
    parts = [claims.assistant, claims.caller, claims.called]
    if claims.route or claims.decision:
        parts += [claims.route, claims.decision]
    for part in parts:
        data = part.encode("utf-8", "surrogatepass")
        out += len(data).to_bytes(4, "big") + data
    return bytes(out)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def issued_at(token: str, ttl_s: float) -> float | None:
    """When ``token`` was issued, in seconds since the epoch (its expiry less ``ttl_s``).

    For a token ``StreamTokens.verify`` accepted (nothing is checked here); None when
    ``token`` does not have a token's shape.
    """
    parts = token.split(".")
    if len(parts) != 6 or not _EXPIRY.fullmatch(parts[2]):
        return None
    return int(parts[2]) / 1000 - ttl_s


class StreamTokens:
    """Issues and verifies stream tokens for calls.

    ``clock`` is wall-clock seconds on purpose: tokens cross processes and hosts,
    whose monotonic clocks do not agree (injectable for tests). Keep instances'
    clocks in sync (NTP); a skew eats into ``ttl_s``. Single use holds per instance:
    a token verified by one instance is not known as used by another. Not thread-safe.
    """

    __slots__ = ("_clock", "_expiries", "_secret", "_secrets", "_ttl_ms", "_used")

    def __init__(
        self,
        *,
        secret: bytes,
        ttl_s: float,
        clock: Callable[[], float] = time.time,
        previous_secret: bytes = b"",
    ) -> None:
        """Raises ``ValueError`` for an empty secret or a lifetime that is not positive.

        ``previous_secret`` (empty: none) verifies but never issues (see the module)."""
        if not secret:
            raise ValueError("the stream token secret is empty")
        if not (ttl_s > 0 and math.isfinite(ttl_s)):
            raise ValueError(f"stream token lifetime must be positive, not {ttl_s!r}")
        self._secret = secret
        # Invariant: the issuing secret first.
        self._secrets = tuple(s for s in dict.fromkeys((secret, previous_secret)) if s)
        self._ttl_ms = max(1, round(ttl_s * 1000))
        self._clock = clock
        # Used nonces -> expiry (ms), and the same pairs as a min-heap on expiry so that
        # expired ones are forgotten in order.
        # Invariant: _used and _expiries hold the same (nonce, expiry) pairs.
        self._used: dict[str, int] = {}
        self._expiries: list[tuple[int, str]] = []

    def rekeyed(
        self, *, secret: bytes, ttl_s: float, previous_secret: bytes = b""
    ) -> StreamTokens:
        """A copy with other secrets and lifetime that shares this one's memory of used
        tokens: a token used before a rotation stays used after it. Raises ``ValueError``
        as the constructor does."""
        new = copy.copy(self)
        StreamTokens.__init__(
            new, secret=secret, ttl_s=ttl_s, clock=self._clock, previous_secret=previous_secret
        )
        new._used, new._expiries = self._used, self._expiries
        return new

    def _now_ms(self) -> int:
        return math.floor(self._clock() * 1000)

    def _mac(self, secret: bytes, call_sid: str, expiry: str, nonce: str, tag: str) -> str:
        message = _DOMAIN + f"{_VERSION}.{call_sid}.{expiry}.{nonce}.{tag}".encode("ascii")
        return _b64(hmac.new(secret, message, hashlib.sha256).digest())

    def _tag(self, secret: bytes, claims: StreamClaims) -> str:
        digest = hmac.new(secret, _CLAIMS_DOMAIN + _encode_claims(claims), hashlib.sha256)
        return _b64(digest.digest()[:_TAG_BYTES])

    def issue(self, claims: StreamClaims) -> str:
        """A new token for ``claims``, valid for ``ttl_s`` from now.

        Raises ``ValueError`` if ``claims.call_sid`` is not a CallSid (``is_call_sid``).
        """
        call_sid = claims.call_sid
        if not is_call_sid(call_sid):
            raise ValueError(f"not a CallSid: {call_sid[:70]!r}")
        expiry = str(self._now_ms() + self._ttl_ms)
        nonce = _b64(secrets.token_bytes(_NONCE_BYTES))
        tag = self._tag(self._secret, claims)
        mac = self._mac(self._secret, call_sid, expiry, nonce, tag)
        return f"{_VERSION}.{call_sid}.{expiry}.{nonce}.{tag}.{mac}"

    def verify(self, token: str, claims: StreamClaims) -> None:
        """Accept ``token`` for a stream that carries ``claims``, once; or raise
        ``TokenRejected``.

        Checks, in order: shape (``malformed``), HMAC (``bad-signature``), CallSid
        (``wrong-call``), expiry (``expired``), the other claims (``wrong-parameters``),
        earlier use (``reused``). Only an accepted token is remembered (until its
        expiry, after which it is refused as expired), so a stream refused for its
        parameters does not use up the token of the genuine one.

        When ``MAX_REMEMBERED_TOKENS`` unexpired tokens are already remembered, a new,
        otherwise valid token is refused (``overloaded``) rather than accepted
        unremembered: forgetting a live token would let it be replayed, so the safe
        failure is to turn the call away.
        """
        nonce, expires = self._check(token, claims)
        self._forget_expired(self._now_ms())
        if nonce in self._used:
            raise TokenRejected("reused")
        if len(self._used) >= MAX_REMEMBERED_TOKENS:
            raise TokenRejected("overloaded")
        self._used[nonce] = expires
        heapq.heappush(self._expiries, (expires, nonce))

    def _check(self, token: str, claims: StreamClaims) -> tuple[str, int]:
        """Every check of ``verify`` but single use; returns the nonce and the expiry."""
        if len(token) > MAX_TOKEN_CHARS:
            raise TokenRejected("malformed")
        parts = token.split(".")
        if len(parts) != 6 or parts[0] != _VERSION:
            raise TokenRejected("malformed")
        _, token_call_sid, expiry, nonce, tag, mac = parts
        if not (
            _CALL_SID.fullmatch(token_call_sid)
            and _EXPIRY.fullmatch(expiry)
            and _NONCE.fullmatch(nonce)
            and _TAG.fullmatch(tag)
            and _MAC.fullmatch(mac)
        ):
            raise TokenRejected("malformed")
        for secret in self._secrets:
            expected = self._mac(secret, token_call_sid, expiry, nonce, tag)
            if hmac.compare_digest(expected.encode("ascii"), mac.encode("ascii")):
                break
        else:
            raise TokenRejected("bad-signature")
        if token_call_sid != claims.call_sid:  # a CallSid is no secret: no constant time
            raise TokenRejected("wrong-call")
        expires = int(expiry)
        if self._now_ms() >= expires:
            raise TokenRejected("expired")
        if not hmac.compare_digest(self._tag(secret, claims).encode("ascii"), tag.encode("ascii")):
            raise TokenRejected("wrong-parameters")
        return nonce, expires

    def _forget_expired(self, now_ms: int) -> None:
        while self._expiries and self._expiries[0][0] <= now_ms:
            _, nonce = heapq.heappop(self._expiries)
            del self._used[nonce]
