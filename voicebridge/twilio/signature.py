"""Checks of Twilio's ``X-Twilio-Signature`` on webhooks and the media upgrade, via our public URL.

Twilio signs the URL *it* requested. Behind a reverse proxy or TLS terminator that
is not the URL the server sees, so every URL here is the configured public base URL
joined with the request's path (and query), never one rebuilt from the ``Host``
header. The HMAC itself is twilio-python's ``RequestValidator``.

Two keys sign: the account's Auth Token (HMAC-SHA1, the default), or, for webhooks a
Webhook Rule moved to shared-key signing (public beta), a SharedKey. Twilio then adds
``X-Twilio-Webhooks-Signature-Settings: key=<SharedKey id>,algorithm=HMAC_SHA256``.
A request with that header is checked with the configured shared key and the algorithm
it names (the ones the library knows: HMAC_SHA256, HMAC_SHA1), never with the Auth
Token; without a configured shared key, or naming another key id, it is refused.

Rotation: Twilio signs with the account's primary Auth Token only, and promoting the
secondary token makes it the primary at once. A verifier given ``previous_auth_token``
accepts a signature made with either token, so that the switch in the Twilio console and
the switch on this server need not happen at the same instant.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal
from urllib.parse import parse_qs, urlsplit

from twilio.request_validator import (
    HMAC_SHA1,
    HMAC_SHA256,
    SIGNATURE_SETTINGS_HEADER,
    RequestValidator,
)

from voicebridge.errors import VoicebridgeError

__all__ = [
    "SETTINGS_HEADER",
    "SHARED_KEY_ALGORITHMS",
    "FormParams",
    "SignatureError",
    "WebhookVerifier",
    "sign",
    "signature_settings",
]

#: The header Twilio adds to a webhook signed with a SharedKey: ``key=…,algorithm=…``.
SETTINGS_HEADER = SIGNATURE_SETTINGS_HEADER
#: The algorithms a shared-key signature may name: those twilio-python's
#: ``RequestValidator`` computes. Anything else is refused, not guessed at.
SHARED_KEY_ALGORITHMS = frozenset({HMAC_SHA256, HMAC_SHA1})
#: Characters of a settings header quoted in a refusal's detail (it is peer text).
_MAX_SETTINGS_CHARS = 80

#: Form parameters as a mapping (one value per name) or as ``(name, value)`` pairs, which
#: may repeat a name. A mapping with ``getlist`` (werkzeug/quart ``MultiDict``) keeps
#: its repeated values too.
FormParams = Mapping[str, str] | Iterable[tuple[str, str]]


class SignatureError(VoicebridgeError):
    """A request's Twilio signature is ``missing`` or does not match (``mismatch``)."""

    def __init__(self, reason: Literal["missing", "mismatch"], detail: str = "") -> None:
        super().__init__(f"Twilio signature {reason}" + (f": {detail}" if detail else ""))
        self.reason: Literal["missing", "mismatch"] = reason


class _MultiValues(dict[str, list[str]]):
    """Every value of every form field, in the shape ``RequestValidator`` reads.

    ``RequestValidator.get_values`` calls ``getall(name)`` when the mapping has it and
    falls back to ``params[name]`` (a single value) otherwise.
    """

    def getall(self, name: str) -> list[str]:
        return self[name]


def _multi_values(params: FormParams) -> _MultiValues:
    values = _MultiValues()
    if isinstance(params, Mapping):
        # werkzeug's MultiDict (quart's request.form) has getlist, multidict's has getall.
        getlist = getattr(params, "getlist", None) or getattr(params, "getall", None)
        for name in params:
            if callable(getlist):
                values[name] = [str(value) for value in getlist(name)]
            else:
                values[name] = [params[name]]
    else:
        for name, value in params:
            values.setdefault(name, []).append(value)
    return values


def sign(url: str, params: FormParams, auth_token: str, *, algorithm: str = HMAC_SHA1) -> str:
    """The ``X-Twilio-Signature`` Twilio would send for a POST of ``params`` to ``url``.

    The URL is signed as given (no port juggling); for JSON bodies and the media
    upgrade pass empty ``params``. ``auth_token`` is the signing key: the Auth Token,
    or a SharedKey's secret with ``algorithm=HMAC_SHA256``.
    """
    validator = RequestValidator(auth_token)
    return str(validator.compute_signature(url, _multi_values(params), algorithm))


def signature_settings(header: str) -> tuple[str, str]:
    """``(key id, algorithm)`` of an ``X-Twilio-Webhooks-Signature-Settings`` value.

    The value is ``name=value`` pairs separated by commas (``key=…,algorithm=…``);
    a missing part is ``""``. Unknown names are ignored (Twilio may add some).
    """
    found: dict[str, str] = {}
    for part in header.split(","):
        name, equals, value = part.partition("=")
        if equals:
            found.setdefault(name.strip().lower(), value.strip())
    return found.get("key", ""), found.get("algorithm", "")


def _quoted(text: str) -> str:
    """Peer text for an error detail: escaped (``repr``), cut to a bounded length."""
    shown = repr(text[:_MAX_SETTINGS_CHARS])
    return shown + ("…" if len(text) > _MAX_SETTINGS_CHARS else "")


def _toggle_trailing_slash(url: str) -> str:
    return url[:-1] if url.endswith("/") else url + "/"


_DEFAULT_PORTS = {"https": 443, "wss": 443, "http": 80, "ws": 80}


def _port_variants(url: str) -> tuple[str, str]:
    """``url`` without and with its scheme's default port (unchanged for another port).

    ``RequestValidator.validate`` does this itself for http(s) only: it would give a
    ``wss://`` URL port 80.
    """
    parts = urlsplit(url)
    default = _DEFAULT_PORTS[parts.scheme]
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    if parts.port not in (None, default):
        return url, url
    without = parts._replace(netloc=host).geturl()
    with_port = parts._replace(netloc=f"{host}:{default}").geturl()
    return without, with_port


class WebhookVerifier:
    """Verifies Twilio's signatures on requests that reached us at ``public_url``.

    ``public_url`` is the configured public base URL (``https://bridge.example.com``,
    maybe with a port and a path prefix, e.g. ``https://edge.example.com/voicebridge``).
    The path given to each method is the request's path *below* that base, i.e. as
    this server routes it after the proxy stripped any prefix. The signature is
    accepted over the URL with and without the scheme's default port.

    ``shared_key`` (empty: none) checks the requests that carry
    ``X-Twilio-Webhooks-Signature-Settings``; ``shared_key_id``, when set, is the only
    key id such a header may name.

    ``previous_auth_token`` (empty: none) is also accepted for Auth Token signatures:
    the token Twilio signed with before a rotation (see the module docstring).
    """

    __slots__ = ("_bases", "_shared_key_id", "_shared_validator", "_validators")

    def __init__(
        self,
        *,
        auth_token: str,
        public_url: str,
        box_url: str = "",
        shared_key: str = "",
        shared_key_id: str = "",
        previous_auth_token: str = "",
    ) -> None:
        """Raises ``ValueError`` for an empty token, or a public URL that is not a bare
        ``http(s)://host[:port][/prefix]`` (no query, no fragment)."""
        if not auth_token:
            raise ValueError("the Twilio auth token is empty: signatures cannot be checked")
        self._shared_validator = RequestValidator(shared_key) if shared_key else None
        self._shared_key_id = shared_key_id
        for base in (public_url, box_url) if box_url else (public_url,):
            url = urlsplit(base)
            if url.scheme not in ("https", "http") or not url.netloc:
                raise ValueError(f"public URL must be http(s)://host[/prefix], not {base!r}")
            if url.query or url.fragment or "?" in base or "#" in base:
                raise ValueError(f"public URL must not have a query or fragment: {base!r}")
        # Invariant: the current token first; at most one previous token after it.
        self._validators: tuple[RequestValidator, ...] = tuple(
            RequestValidator(token)
            for token in dict.fromkeys((auth_token, previous_auth_token))
            if token
        )
        # Twilio signs the URL it requested: the shared public URL (the voice webhook,
        # through the balancer) or this box's own (what its TwiML points at).
        self._bases = tuple(
            dict.fromkeys(base.rstrip("/") for base in (public_url, box_url) if base)
        )

    def public_url_for(self, path_and_query: str) -> str:
        """The public URL of a request: base URL + path (+ ``?query`` if any)."""
        return self.public_urls_for(path_and_query)[0]

    def public_urls_for(self, path_and_query: str) -> tuple[str, ...]:
        """The URLs a request may have been signed for: the public URL's, then the box's."""
        if not path_and_query.startswith("/"):
            path_and_query = "/" + path_and_query
        return tuple(base + path_and_query for base in self._bases)

    def public_ws_url_for(self, path: str) -> str:
        """The public WebSocket URL of ``path``: the base with https→wss, http→ws."""
        return self._ws_urls_for(path)[0]

    def _ws_urls_for(self, path: str) -> tuple[str, ...]:
        return tuple(
            ("wss" + url.removeprefix("https")) if url.startswith("https") else
            ("ws" + url.removeprefix("http"))
            for url in self.public_urls_for(path)
        )

    def _signing(
        self, settings: str | None
    ) -> tuple[Sequence[RequestValidator], str, str]:
        """``(validators, algorithm, what)`` for a request with this settings header; a
        signature made with any of the validators' keys is accepted.

        No header (or an empty one): the Auth Token (current or previous) with HMAC-SHA1.
        Otherwise the shared key with the algorithm the header names. Raises
        ``SignatureError("mismatch")`` when no shared key is configured, the header names
        another key id, or an algorithm the library does not compute.
        """
        if not settings:
            return self._validators, HMAC_SHA1, "the auth token"
        key_id, algorithm = signature_settings(settings)
        if self._shared_validator is None:
            raise SignatureError(
                "mismatch", "signed with a shared key, but twilio_shared_key is not configured"
            )
        if self._shared_key_id and not hmac.compare_digest(
            key_id.encode(), self._shared_key_id.encode()
        ):
            raise SignatureError(
                "mismatch", f"signed with shared key {_quoted(key_id)}, not twilio.shared_key_id"
            )
        if algorithm.upper() not in SHARED_KEY_ALGORITHMS:
            raise SignatureError(
                "mismatch", f"unsupported signature algorithm {_quoted(algorithm)}"
            )
        return (self._shared_validator,), algorithm.upper(), "the shared key"

    def verify_form(
        self,
        *,
        path_and_query: str,
        params: FormParams,
        signature: str | None,
        settings: str | None = None,
    ) -> None:
        """Check a form-encoded webhook POST (the voice webhook, ``<Connect action>``, …).

        ``params`` are the POST body's fields; repeated names are signed the way Twilio
        does (each name+value, names sorted, then values sorted). ``settings`` is the
        ``X-Twilio-Webhooks-Signature-Settings`` header, if any (see the class). Raises
        ``SignatureError("missing")`` when the signature header is absent or empty and
        ``SignatureError("mismatch")`` when it does not match.
        """
        if not signature:
            raise SignatureError("missing")
        validators, algorithm, what = self._signing(settings)
        urls = self.public_urls_for(path_and_query)
        url = urls[-1]
        values = _multi_values(params)
        if not any(
            v.validate(candidate, values, signature, algorithm)
            for v in validators
            for candidate in urls
        ):
            raise SignatureError(
                "mismatch", f"not signed with {what} for {url} with these parameters"
            )

    def verify_json(
        self,
        *,
        path_and_query: str,
        body: bytes,
        signature: str | None,
        settings: str | None = None,
    ) -> None:
        """Check a webhook POST with a JSON body.

        Twilio puts ``bodySHA256=<hex SHA-256 of the body>`` in the query and signs
        the URL (query included) with no parameters; ``settings`` as in ``verify_form``.
        Raises ``SignatureError("missing")`` for an absent or empty header, and
        ``("mismatch")`` when the signature does not match, the query has no
        ``bodySHA256``, or the body's hash differs.
        """
        if not signature:
            raise SignatureError("missing")
        validators, algorithm, what = self._signing(settings)
        urls = self.public_urls_for(path_and_query)
        url = urls[-1]
        claimed = parse_qs(urlsplit(url).query).get("bodySHA256")
        if not claimed:
            raise SignatureError("mismatch", "no bodySHA256 in the query of a JSON webhook")
        # Hash the raw bytes (RequestValidator.compute_hash wants text and re-encodes it).
        actual = hashlib.sha256(body).hexdigest()
        if not hmac.compare_digest(actual, claimed[0].strip().lower()):
            raise SignatureError("mismatch", "bodySHA256 does not match the body")
        if not any(
            v.validate(candidate, {}, signature, algorithm)
            for v in validators
            for candidate in urls
        ):
            raise SignatureError("mismatch", f"not signed with {what} for {url}")

    def verify_upgrade(
        self, *, path: str, signature: str | None, settings: str | None = None
    ) -> None:
        """Check the ``x-twilio-signature`` of a Media Streams WebSocket upgrade.

        Twilio's documentation says it covers the ``wss://`` URL with no parameters
        and suggests trying with a trailing ``/`` too; both are accepted. (Another
        Twilio source says the upgrade is not signed at all: treat a failure here as
        advisory; the stream token is the gate.) ``settings`` as in ``verify_form``.
        Raises ``SignatureError`` like ``verify_form``.
        """
        if not signature:
            raise SignatureError("missing")
        validators, algorithm, _ = self._signing(settings)
        urls = self._ws_urls_for(path)
        url = urls[-1]
        given = signature.encode()
        for validator in validators:
            for signed in urls:
                for slashed in (signed, _toggle_trailing_slash(signed)):
                    for candidate in _port_variants(slashed):
                        expected = validator.compute_signature(candidate, {}, algorithm)
                        if hmac.compare_digest(str(expected).encode(), given):
                            return
        raise SignatureError("mismatch", f"not signed for {url} (with or without a trailing /)")
