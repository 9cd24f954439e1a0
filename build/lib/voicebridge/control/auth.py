"""Authentication of Vapi's server webhooks over the raw body bytes, sans-I/O.

Three modes (PROTOCOLS.md §3): the legacy ``X-Vapi-Secret`` header, a bearer token
in a configurable header, or an HMAC of a configurable payload built from the raw
body, the timestamp, the method and the URL. Every comparison is constant-time.
HMAC requests also carry a timestamp, accepted in seconds or milliseconds, that
must lie within the replay window of our clock. Nothing here logs, and no error
message ever holds the secret or a signature.

``verify_headers`` is everything the headers alone decide: the whole check in the
``secret`` and ``bearer`` modes, the signature's presence and the timestamp's
freshness in ``hmac`` mode. The route runs it before reading any of the body, so a
request without the credential costs us its head only.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import re
from collections.abc import Mapping
from typing import Final, Literal

from attrs import field, frozen

from voicebridge.config import ControlConfig, webhook_key
from voicebridge.errors import VoicebridgeError

#: Header of the legacy mode (a bearer credential with this name and no prefix).
VAPI_SECRET_HEADER: Final = "x-vapi-secret"
#: A timestamp above this is taken as milliseconds (1e11 s is the year 5138).
MILLISECONDS_ABOVE: Final = 100_000_000_000
#: Longest timestamp header read: a decimal count of milliseconds is 13 digits.
MAX_TIMESTAMP_CHARS: Final = 20

_DIGESTS: Final = {"sha256": hashlib.sha256, "sha512": hashlib.sha512, "sha1": hashlib.sha1}

#: The placeholders of ``hmac_payload_format``.
_PLACEHOLDER: Final = re.compile(rb"\{(timestamp|body|method|url)\}")

AuthFailure = Literal["missing", "mismatch", "stale", "malformed"]


class WebhookAuthError(VoicebridgeError):
    """The webhook is not Vapi's: credential ``missing``, ``mismatch``, ``stale`` timestamp
    (outside the replay window) or ``malformed`` header. Safe to log."""

    def __init__(self, reason: AuthFailure, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason: AuthFailure = reason


@frozen(kw_only=True)
class WebhookAuthenticator:
    """Checks one webhook request; build it with ``from_config``."""

    mode: Literal["secret", "bearer", "hmac"]
    _key: bytes = field(repr=False, alias="key")
    header: str
    prefix: str = ""
    algorithm: Literal["sha256", "sha512", "sha1"] = "sha256"
    timestamp_header: str = ""
    payload_format: str = "{timestamp}.{body}"
    encoding: Literal["hex", "base64"] = "hex"
    replay_window_s: float = 300.0

    @classmethod
    def from_config(cls, config: ControlConfig, secret: str) -> WebhookAuthenticator:
        """Raises ``ConfigError`` (key ``credentials.vapi_webhook_secret``) for a secret
        that cannot authenticate anything: empty, not base64 when
        ``hmac_secret_is_base64`` says it is, or not sendable in an HTTP header in the
        header modes. ``load_config`` refuses the same secrets (``webhook_key``)."""
        key = webhook_key(config, secret)
        if config.auth == "secret":
            return cls(mode="secret", key=key, header=VAPI_SECRET_HEADER)
        if config.auth == "bearer":
            return cls(mode="bearer", key=key, header=config.bearer_header.lower())
        return cls(
            mode="hmac",
            key=key,
            header=config.hmac_signature_header.lower(),
            prefix=config.hmac_signature_prefix,
            algorithm=config.hmac_algorithm,
            timestamp_header=config.hmac_timestamp_header.lower(),
            payload_format=config.hmac_payload_format,
            encoding=config.hmac_signature_encoding,
            replay_window_s=config.replay_window_s,
        )

    @property
    def needs_body(self) -> bool:
        """Whether the verdict depends on the body (``hmac``); if not, ``verify_headers``
        is the whole check."""
        return self.mode == "hmac"

    def verify_headers(self, *, headers: Mapping[str, str], now: float) -> None:
        """Raise ``WebhookAuthError`` for what the headers alone show to be not Vapi's.

        In the ``secret`` and ``bearer`` modes a request that passes is authentic; in
        ``hmac`` mode it still needs ``verify``. ``headers`` must have lower-case names;
        ``now`` is Unix time in seconds.
        """
        given = headers.get(self.header)
        if not given:
            raise WebhookAuthError("missing", f"no {self.header} header")
        if self.mode != "hmac":
            if not hmac.compare_digest(given.encode(), self._key):
                raise WebhookAuthError("mismatch", f"{self.header} does not match")
            return
        timestamp = headers.get(self.timestamp_header, "").strip()
        if not timestamp:
            raise WebhookAuthError("missing", f"no {self.timestamp_header} header")
        self._check_fresh(timestamp, now)

    def verify(
        self,
        *,
        headers: Mapping[str, str],
        body: bytes,
        method: str,
        url: str,
        now: float,
    ) -> None:
        """Raise ``WebhookAuthError`` unless the request is authentic.

        ``headers`` must have lower-case names; ``body`` is the raw bytes as received;
        ``url`` is the public URL Vapi was told to call; ``now`` is Unix time in seconds.
        """
        self.verify_headers(headers=headers, now=now)
        if not self.needs_body:
            return
        timestamp = headers[self.timestamp_header].strip()
        expected = self.signature(timestamp=timestamp, body=body, method=method, url=url)
        if not hmac.compare_digest(headers[self.header].strip().encode(), expected.encode()):
            raise WebhookAuthError("mismatch", f"{self.header} does not match the body")

    def signature(self, *, timestamp: str, body: bytes, method: str, url: str) -> str:
        """The header value Vapi sends for this request: prefix + encoded HMAC of the payload."""
        payload = self.payload(timestamp, body, method, url)
        digest = hmac.new(self._key, payload, _DIGESTS[self.algorithm]).digest()
        if self.encoding == "hex":
            encoded = digest.hex()
        else:
            encoded = base64.b64encode(digest).decode("ascii")
        return self.prefix + encoded

    def payload(self, timestamp: str, body: bytes, method: str, url: str) -> bytes:
        """``payload_format`` with its placeholders filled; ``{body}`` is the raw bytes.

        Built on bytes so that the body is signed exactly as received, never re-encoded.
        """
        values = {
            b"timestamp": timestamp.encode(),
            b"method": method.upper().encode(),
            b"url": url.encode(),
            b"body": body,
        }
        return _PLACEHOLDER.sub(lambda m: values[m.group(1)], self.payload_format.encode())

    def _check_fresh(self, timestamp: str, now: float) -> None:
        if len(timestamp) > MAX_TIMESTAMP_CHARS:
            raise WebhookAuthError("malformed", f"{self.timestamp_header} is too long")
        try:
            stamp = float(timestamp)
        except ValueError:
            raise WebhookAuthError(
                "malformed", f"{self.timestamp_header} is not a number"
            ) from None
        if not math.isfinite(stamp):
            raise WebhookAuthError("malformed", f"{self.timestamp_header} is not a number")
        if stamp > MILLISECONDS_ABOVE:
            stamp /= 1000
        if abs(now - stamp) > self.replay_window_s:
            raise WebhookAuthError(
                "stale",
                f"{self.timestamp_header} is {now - stamp:+.0f} s from our clock "
                f"(window {self.replay_window_s:g} s)",
            )
