"""Configuration: frozen attrs classes, loaded with cattrs from TOML, env and systemd credentials.

The classes below are the whole configuration surface. ``load_config`` builds a ``Config``
from a TOML file, ``VOICEBRIDGE_<SECTION>_<KEY>`` environment overrides and secrets (see
``Secrets``); ``render_config`` prints the effective configuration with secrets masked;
``check_config_main`` is ``voicebridge check-config``.

Every problem raises ``ConfigError(key, reason)``: ``key`` is the dotted key path
(``server.max_concurrent_calls``) or, for a stray environment variable, the variable's
name; ``reason`` is a sentence for an operator. When there are several problems, the
first is the error's ``key``/``reason`` and the others are attached as notes
(``exc.__notes__``, one ``"key: reason"`` string each). No message, repr or rendering ever
contains a secret's value.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import ipaddress
import json
import math
import os
import re
import sys
import tomllib
import typing
import urllib.parse
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, TextIO

import attrs
import cattrs
from attrs import field, frozen
from cattrs.errors import AttributeValidationNote, ClassValidationError, ForbiddenExtraKeysError

from voicebridge.errors import ConfigError
from voicebridge.vapi.endings import EndingPolicy, is_valid_pattern

DEFAULT_CONFIG_PATH = "/etc/voicebridge/voicebridge.toml"

#: Prefix of every environment override: ``VOICEBRIDGE_<SECTION>_<KEY>``.
ENV_PREFIX = "VOICEBRIDGE_"

#: What ``render_config`` shows for a secret that is set; nothing else about it is shown.
MASK = "********"
#: What ``render_config`` shows for a secret that is not set (or set to an empty value).
UNSET = "(unset)"


# --- validators ------------------------------------------------------------------------
#
# attrs validators raise ConfigError(<field name>, reason). The loader prefixes the section
# path (``server.`` + ``listen``); code that builds a config class directly gets the bare
# field name, which is still enough to find the mistake.

_Validator = Callable[[Any, "attrs.Attribute[Any]", Any], None]

_E164 = re.compile(r"\+[0-9]{8,15}")
#: A Vapi assistant id an outbound call may name (Vapi's are UUIDs).
ASSISTANT_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_ACCOUNT_SID = re.compile(r"AC[0-9a-fA-F]{32}")
_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?")
_PORT = re.compile(r"[0-9]{1,5}")


def _int_range(low: int, high: int, *, step: int = 1) -> _Validator:
    """Validator: an integer in ``[low, high]`` that is a multiple of ``step``."""

    def check(instance: Any, attribute: attrs.Attribute[Any], value: int) -> None:
        if not low <= value <= high:
            raise ConfigError(attribute.name, f"must be between {low} and {high}, got {value}")
        if value % step:
            raise ConfigError(attribute.name, f"must be a multiple of {step}, got {value}")

    return check


def _deadline(high: float) -> _Validator:
    """Validator: a number of seconds greater than 0 and at most ``high``."""

    def check(instance: Any, attribute: attrs.Attribute[Any], value: float) -> None:
        # Written so that NaN fails too: every comparison with NaN is false.
        if not 0 < value <= high:
            raise ConfigError(
                attribute.name, f"must be more than 0 and at most {high:g} seconds, got {value}"
            )

    return check


def _zero_or_deadline(high: float) -> _Validator:
    """Validator: 0 (meaning "derived") or a number of seconds as ``_deadline``."""
    positive = _deadline(high)

    def check(instance: Any, attribute: attrs.Attribute[Any], value: float) -> None:
        if value != 0:
            positive(instance, attribute, value)

    return check


def _at_least_one(instance: Any, attribute: attrs.Attribute[Any], value: int) -> None:
    if value < 1:
        raise ConfigError(attribute.name, f"must be at least 1, got {value}")


def _absolute_path_or_empty(instance: Any, attribute: attrs.Attribute[Any], value: str) -> None:
    if value and not os.path.isabs(value):
        raise ConfigError(attribute.name, f"must be empty or an absolute path, got {_show(value)}")


def _chunk_within_lead(instance: Any, attribute: attrs.Attribute[Any], value: int) -> None:
    # Invariant: attrs runs validators after every field is set, so the lead is readable.
    lead = instance.playout_lead_ms
    if value > lead:
        raise ConfigError(attribute.name, f"must not exceed playout_lead_ms ({lead}), got {value}")


def _listen_address(instance: Any, attribute: attrs.Attribute[Any], value: str) -> None:
    reason = _listen_problem(value)
    if reason:
        raise ConfigError(attribute.name, reason)


def _listen_problem(value: str) -> str:
    """Why ``value`` is not ``host:port`` / ``[v6]:port``, or ``""`` if it is fine."""
    example = "expected host:port such as 127.0.0.1:8080 or [::1]:8080"
    if value.startswith("["):
        host, closed, rest = value[1:].partition("]")
        if not closed or not rest.startswith(":"):
            return f"{example}, got {_show(value)}"
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return f"{_show(host)} in brackets is not an IPv6 address"
        port = rest[1:]
    else:
        host, colon, port = value.rpartition(":")
        if not colon or not host:
            return f"{example}, got {_show(value)}"
        if ":" in host:
            return f"an IPv6 address goes in brackets, as in [::1]:8080; got {_show(value)}"
        if not _HOSTNAME.fullmatch(host):
            return f"{_show(host)} is not a host name or IPv4 address"
    if not _PORT.fullmatch(port) or int(port) > 65535:
        return f"port must be a number from 0 to 65535, got {_show(port)}"
    return ""


#: The longest path a Unix socket address holds (``sun_path`` is 108 bytes on Linux,
#: one of them the terminating NUL).
MAX_UNIX_SOCKET_PATH_BYTES = 107
#: Host parts that mean "every address": a listener there overlaps any other on its port.
_WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})


def _ops_listen_address(instance: Any, attribute: attrs.Attribute[Any], value: str) -> None:
    """Validator of ``ops_listen``: empty, ``host:port``, or an absolute Unix socket path;
    never the public listener's address.

    Invariant: attrs runs validators after every field is set, so ``listen`` is readable.
    """
    if not value:
        return
    if value.startswith("/"):
        size = len(value.encode("utf-8", "surrogateescape"))
        if size > MAX_UNIX_SOCKET_PATH_BYTES or "\0" in value or value.endswith("/"):
            raise ConfigError(
                attribute.name,
                f"a Unix socket path must name a file in at most {MAX_UNIX_SOCKET_PATH_BYTES} "
                f"bytes, got {_show(value)}",
            )
        return
    reason = _listen_problem(value)
    if reason:
        raise ConfigError(
            attribute.name, f"{reason} (or an absolute path for a Unix socket, or empty for none)"
        )
    if listen_addresses_overlap(value, instance.listen):
        raise ConfigError(
            attribute.name,
            f"must not be the public listen address (listen = {_show(instance.listen)}): "
            "health and metrics would answer anyone who reaches the public port",
        )


def listen_addresses_overlap(first: str, second: str) -> bool:
    """Whether two ``host:port`` addresses would take the same socket address: one port
    (not 0, which picks a free one) and one host, or a wildcard host on either side."""
    first_host, _, first_port = first.rpartition(":")
    second_host, _, second_port = second.rpartition(":")
    if first_port != second_port or int(first_port or "0") == 0:
        return False
    hosts = {first_host.strip("[]").lower(), second_host.strip("[]").lower()}
    return len(hosts) == 1 or bool(hosts & _WILDCARD_HOSTS)


def _strip_trailing_slash(value: str) -> str:
    """Converter: ``https://x.example/`` and ``https://x.example`` mean the same base URL."""
    return value.rstrip("/") if isinstance(value, str) else value


def _url_problem(value: str) -> str:
    """Why ``value`` is not an absolute http(s) base URL, or ``""`` if it is fine."""
    if any(c.isspace() for c in value):
        return "must not contain spaces"
    try:
        parts = urllib.parse.urlsplit(value)
        port = parts.port
    except ValueError as exc:
        return f"is not a valid URL ({exc})"
    del port  # only parsed so that a bad port is reported
    if parts.scheme not in ("http", "https"):
        return f"must be an absolute http:// or https:// URL, got {_show(value)}"
    if not parts.hostname:
        return f"must name a host, got {_show(value)}"
    if parts.username is not None or parts.password is not None:
        return "must not contain a user name or password"
    if "?" in value or "#" in value:
        return "must not have a query (?…) or fragment (#…)"
    return ""


def _base_url(instance: Any, attribute: attrs.Attribute[Any], value: str) -> None:
    """Validator: empty (not configured) or an absolute http(s) URL without query/fragment."""
    if value:
        reason = _url_problem(value)
        if reason:
            raise ConfigError(attribute.name, reason)


def _account_sid(instance: Any, attribute: attrs.Attribute[Any], value: str) -> None:
    if value and not _ACCOUNT_SID.fullmatch(value):
        raise ConfigError(
            attribute.name, f"must be 'AC' followed by 32 hex digits, got {_show(value)}"
        )


def _e164_or_empty(instance: Any, attribute: attrs.Attribute[Any], value: str) -> None:
    if value and not _E164.fullmatch(value):
        raise ConfigError(
            attribute.name,
            f"must be empty or an E.164 number ('+' and 8 to 15 digits), got {_show(value)}",
        )


# --- the configuration classes -----------------------------------------------------------


@frozen
class Secret:
    """A secret value; its repr and str never show it. ``reveal()`` to use it.

    ``source`` says where the loader found it ("systemd credential vapi-api-key",
    "file /etc/voicebridge/vapi.key", "environment variable VOICEBRIDGE_VAPI_API_KEY"),
    or is empty when it was not supplied. It is shown by ``render_config``; it takes no part
    in equality.
    """

    _value: str = field(repr=False, alias="value")
    source: str = field(default="", kw_only=True, eq=False)

    def reveal(self) -> str:
        """The secret itself: pass it straight to the API that needs it, never to a log."""
        return self._value

    def __str__(self) -> str:
        return MASK

    def __bool__(self) -> bool:
        return bool(self._value)


@frozen(kw_only=True)
class CallerAction:
    """What the caller hears instead of the assistant: words, then a number dialled, then hang-up.

    Both empty means: hang up at once.
    """

    say: str = ""
    #: Text-to-speech voice for ``say`` (Twilio ``<Say voice=…>``); empty = Twilio's default.
    voice: str = ""
    #: E.164 number to ``<Dial>`` after ``say``; empty = no dial.
    dial: str = field(default="", validator=_e164_or_empty)


def _worker_name(instance: Any, attribute: attrs.Attribute[Any], value: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,32}", value):
        raise ConfigError(
            attribute.name,
            "must be 1 to 32 letters, digits, '_', '.' or '-' (the systemd instance name), "
            f"got {_show(value)}",
        )


def _cidr_list_field(
    instance: Any, attribute: attrs.Attribute[Any], value: tuple[str, ...]
) -> None:
    """``_cidr_list`` (defined below, with ``EdgeConfig``'s keys) for ``ServerConfig``."""
    _cidr_list(instance, attribute, value)


@frozen(kw_only=True)
class ServerConfig:
    """``[server]``: where the HTTP/WebSocket server listens and how many calls it takes."""

    #: ``host:port`` to listen on (ignored under socket activation).
    listen: str = field(default="127.0.0.1:8080", validator=_listen_address)
    #: The ops listener, serving only ``/healthz``, ``/readyz`` and ``/metrics`` (which the
    #: public port never serves): ``host:port``, an absolute path for a Unix socket, or
    #: empty for none. Not bound when systemd passes a socket named ``ops``.
    ops_listen: str = field(default="127.0.0.1:9180", validator=_ops_listen_address)
    #: The public base URL Twilio reaches us at (``https://bridge.example.com``, maybe with a
    #: path prefix). Signatures are checked against it and stream URLs built from it.
    #: A trailing slash is removed.
    public_url: str = field(default="", converter=_strip_trailing_slash, validator=_base_url)
    #: This box's own public base URL, when several boxes share ``public_url`` behind a
    #: balancer (docs/operations.md, "Several boxes"): the stream URL, the ``<Connect
    #: action>``, the stream status callback and Vapi's per-call server URL point here, so
    #: that only the voice webhook goes through the balancer. Empty: ``public_url``.
    box_url: str = field(default="", converter=_strip_trailing_slash, validator=_base_url)
    max_concurrent_calls: int = field(default=50, validator=_at_least_one)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    #: Where logs go: ``auto`` = native journal entries when journald is reachable (and
    #: stderr is not a terminal), else text lines on stderr; or force one of the two.
    log_target: Literal["auto", "journal", "stderr"] = "auto"
    #: On SIGTERM, how long active calls may go on before they are ended with the fallback.
    #: The unit's ``TimeoutStopSec`` must exceed it (by 15 s: see docs/operations.md).
    drain_deadline_s: float = field(default=30.0, validator=_deadline(3600))
    #: Directory the processes of one box share (call outcomes, used stream tokens), on
    #: tmpfs. Empty: ``$RUNTIME_DIRECTORY`` when systemd sets it, else nothing is shared.
    shared_dir: str = field(default="", validator=_absolute_path_or_empty)
    #: This process's name in the ``worker`` label of its metrics: ``voicebridge@N.service``
    #: sets ``VOICEBRIDGE_SERVER_WORKER=N``; a single process is worker 0.
    worker: str = field(default="0", validator=_worker_name)
    #: Proxies (addresses or CIDR networks) whose ``X-Forwarded-For`` / ``Forwarded``
    #: header names the client: ``REMOTE=`` in the log is then the client's address. A
    #: request from any other peer is logged with the peer's own address.
    trusted_proxies: tuple[str, ...] = field(default=(), validator=_cidr_list_field)
    #: Log callers' numbers with all but their last 4 digits masked (``+1555•••0123``).
    mask_caller_numbers: bool = False
    #: Shed new calls (the overflow message) while the event loop's mean lag over
    #: ``shed_loop_lag_window_s`` is at least this many milliseconds; 0: never. A healthy
    #: loop runs a ready task within a millisecond; 50 ms late on every wake means the
    #: process has more work than its core carries and every live call's audio waits too
    #: (docs/performance.md).
    shed_loop_lag_ms: int = field(default=50, validator=_int_range(0, 10_000))
    #: The window of that mean: long enough that one pause (a garbage collection, one slow
    #: request) does not shed, short enough to act within a burst of new calls.
    shed_loop_lag_window_s: float = field(default=2.0, validator=_deadline(60))

    @property
    def own_url(self) -> str:
        """The base URL of this box's own requests: ``box_url``, else ``public_url``."""
        return self.box_url or self.public_url


def _cidr_list(instance: Any, attribute: attrs.Attribute[Any], value: tuple[str, ...]) -> None:
    for index, text in enumerate(value):
        try:
            ipaddress.ip_network(text, strict=True)
        except ValueError as exc:
            raise ConfigError(
                f"{attribute.name}[{index}]",
                f"must be an IP address or network such as 10.0.0.0/8 or ::1 ({exc})",
            ) from None


def _per_peer_within_total(instance: Any, attribute: attrs.Attribute[Any], value: int) -> None:
    # Invariant: attrs runs validators after every field is set, so the total is readable.
    total = instance.max_connections
    if value > total:
        raise ConfigError(attribute.name, f"must not exceed max_connections ({total}), got {value}")


@frozen(kw_only=True)
class EdgeConfig:
    """``[edge]``: what one client may hold of the public port (``voicebridge.net.front``).

    Each call holds one connection here and one to the assistant, so the process needs
    about ``max_connections`` + ``server.max_concurrent_calls`` descriptors plus a small
    reserve: the unit's ``LimitNOFILE=`` sits well above that (docs/operations.md).
    """

    #: Open connections on the public port at once. Beyond it, a new connection first
    #: displaces the oldest one still sending its request; with none, it is refused.
    max_connections: int = field(default=1024, validator=_int_range(8, 65536))
    #: Open connections from one address at once; beyond it, refused at once. Twilio may
    #: send many calls' streams and webhooks from one address: keep it well above
    #: ``server.max_concurrent_calls``.
    max_connections_per_peer: int = field(
        default=128, validator=[_int_range(1, 65536), _per_peer_within_total]
    )
    #: Requests from one address that may go on arriving (head or body) for more than
    #: half a second (``net.front.INCOMPLETE_GRACE_S``): beyond it, the oldest are closed
    #: and new connections from that address refused. Twilio sends a webhook whole in a
    #: segment or two, even in a burst; a client that dribbles requests over many
    #: connections would make each of them a task to wake per byte.
    max_incomplete_per_peer: int = field(default=8, validator=_int_range(1, 65536))
    #: Addresses or networks (CIDR) the per-address caps do not apply to: a TLS proxy
    #: in front, through which every client arrives from one address.
    exempt_peers: tuple[str, ...] = field(default=(), validator=_cidr_list)
    #: A request head (the first, or the next one on a kept-alive connection) must arrive
    #: whole within this many seconds of its first byte (of the connection, for the first).
    head_deadline_s: float = field(default=10.0, validator=_deadline(300))
    #: A request body must arrive whole within this many seconds of the end of its head,
    #: however it is framed (``Content-Length`` or chunked).
    body_deadline_s: float = field(default=30.0, validator=_deadline(3600))


@frozen(kw_only=True)
class TwilioConfig:
    """``[twilio]``: the Twilio account and the deadlines of the Media Streams leg."""

    account_sid: str = field(default="", validator=_account_sid)
    #: Reject webhooks without a valid ``X-Twilio-Signature`` (only ever off in local tests).
    validate_signatures: bool = True
    #: ``connected`` + ``start`` must arrive within this after the media socket opens.
    start_deadline_s: float = field(default=5.0, validator=_deadline(60))
    #: Twilio sends media continuously; this long without any frame means the stream is dead.
    media_inactivity_s: float = field(default=5.0, validator=_deadline(300))
    #: Lifetime of the single-use stream token put in the TwiML.
    stream_token_ttl_s: float = field(default=60.0, validator=_deadline(3600))
    #: Twilio's REST API (``voicebridge.sim`` serves a fake one for tests).
    rest_base_url: str = field(
        default="https://api.twilio.com", converter=_strip_trailing_slash, validator=_base_url
    )
    #: Time allowed for one Twilio REST request (redirect, hang-up, create).
    rest_deadline_s: float = field(default=10.0, validator=_deadline(60))
    #: The id of the SharedKey that signs webhooks moved to shared-key signing
    #: (``webhooks_sharedkey_…``, named in ``X-Twilio-Webhooks-Signature-Settings``);
    #: empty: any key id, checked with the one ``twilio_shared_key`` secret.
    shared_key_id: str = ""
    #: Accept a ``server.public_url`` whose stream URL is not ``wss://`` on port 443
    #: (Twilio refuses such a stream: error 31910). Only for local tests and demos.
    allow_insecure_stream_url: bool = False


@frozen(kw_only=True)
class VapiConfig:
    """``[vapi]``: the Vapi API, the assistant, the audio format and the Vapi leg's deadlines."""

    base_url: str = field(
        default="https://api.vapi.ai", converter=_strip_trailing_slash, validator=_base_url
    )
    assistant_id: str = ""
    #: Inline assistant definition (used when ``assistant_id`` is empty).
    assistant: dict[str, Any] = field(factory=dict)
    audio_format: Literal["mulaw", "pcm_s16le"] = "mulaw"
    sample_rate: Literal[8000, 16000] = 8000
    create_deadline_s: float = field(default=5.0, validator=_deadline(60))
    connect_deadline_s: float = field(default=5.0, validator=_deadline(60))
    ping_interval_s: float = field(default=5.0, validator=_deadline(300))
    pong_deadline_s: float = field(default=3.0, validator=_deadline(60))
    #: Time allowed for ``end-call`` + close when we end the Vapi leg.
    end_deadline_s: float = field(default=2.0, validator=_deadline(60))
    #: The assistant's ``maxDurationSeconds``, sent with every call: Vapi ends the call
    #: then (``exceeded-max-duration``) and the caller hears ``[max_duration]``.
    max_duration_s: int = field(default=600, validator=_int_range(10, 43200))
    #: The assistant's ``silenceTimeoutSeconds``, sent with every call: Vapi ends a call
    #: in which nobody spoke for this long (``silence-timed-out``, a normal end).
    silence_timeout_s: int = field(default=30, validator=_int_range(10, 3600))
    #: Nothing at all from Vapi (no audio, no message) for this long fails the leg: the
    #: caller gets the fallback, not dead air. 0: derived, ``silence_timeout_s`` plus
    #: ``SILENCE_DEADLINE_MARGIN_S``; set, it must exceed ``silence_timeout_s`` by that
    #: margin, or healthy quiet calls would be failed before Vapi ends them.
    silence_deadline_s: float = field(default=0.0, validator=_zero_or_deadline(7200))
    #: Create the Vapi call as the voice webhook is answered, while Twilio sets up the
    #: stream, instead of after the stream's ``start`` (docs/call-flow.md). A call whose
    #: stream does not start within ``twilio.start_deadline_s`` of the answer is ended.
    create_early: bool = False

    @property
    def assistant_silence_s(self) -> float:
        """The silence deadline in force (``silence_deadline_s``, or derived)."""
        return self.silence_deadline_s or self.silence_timeout_s + SILENCE_DEADLINE_MARGIN_S


#: How much longer than the assistant's ``silenceTimeoutSeconds`` the bridge waits for
#: anything from Vapi: Vapi's own end (``status-update`` ended) comes within a second.
SILENCE_DEADLINE_MARGIN_S = 15.0


def _ending_patterns(
    instance: Any, attribute: attrs.Attribute[Any], value: tuple[str, ...]
) -> None:
    for index, pattern in enumerate(value):
        if not is_valid_pattern(pattern):
            raise ConfigError(
                f"{attribute.name}[{index}]",
                "must be a Vapi endedReason (lower-case letters, digits, '.', '_', '-') "
                f"or such a prefix followed by '*', got {_show(pattern)}",
            )


@frozen(kw_only=True)
class EndingsConfig:
    """``[endings]``: which of Vapi's ``endedReason`` values are normal ends.

    Built in: the assistant or the caller ended the call, or a limit the assistant
    was given was reached (``voicebridge.vapi.endings.NORMAL_REASONS``); every other
    reason, an unknown one included, is a failure and the caller hears the fallback.
    """

    #: More reasons (or ``prefix*``) to treat as normal ends: the caller is hung up.
    normal: tuple[str, ...] = field(default=(), validator=_ending_patterns)
    #: Reasons (or ``prefix*``) to treat as failures, even built-in normal ones.
    failure: tuple[str, ...] = field(default=(), validator=_ending_patterns)

    def policy(self) -> EndingPolicy:
        return EndingPolicy(normal=self.normal, failure=self.failure)


def _detector_installed(instance: Any, attribute: attrs.Attribute[Any], value: bool) -> None:
    from voicebridge.bridge.voice_activity import available

    if value and not available():
        raise ConfigError(
            attribute.name, "needs WebRTC's voice-activity detector: pip install webrtcvad-wheels"
        )


@frozen(kw_only=True)
class BridgeConfig:
    """``[bridge]``: playout buffering and barge-in behaviour of every call."""

    #: How much assistant audio may be buffered at Twilio ahead of what the caller heard.
    playout_lead_ms: int = field(default=300, validator=_int_range(20, 5000, step=20))
    #: Largest outbound media chunk (whole 20 ms frames) sent to Twilio in one message.
    playout_chunk_ms: int = field(
        default=100, validator=[_int_range(20, 1000, step=20), _chunk_within_lead]
    )
    #: Barge in on ``speech-update`` user/started too, not only on ``user-interrupted``.
    barge_in_on_speech_start: bool = False
    #: After a barge-in, assistant audio is discarded until the next assistant turn starts
    #: or the audio pauses for this long (so an in-flight tail of the cut turn never plays).
    barge_in_resume_gap_ms: int = field(default=250, validator=_int_range(20, 5000))
    #: Barge-in at the edge: the caller's own speech over the assistant silences it at
    #: once (a ``clear``); the turn resumes where it was cut unless the assistant
    #: confirms the interruption within ``edge_barge_in_confirm_ms``.
    edge_barge_in: bool = field(default=False, validator=_detector_installed)
    #: WebRTC's detector mode: 0 (takes most for speech) to 3 (least).
    edge_barge_in_aggressiveness: int = field(default=3, validator=_int_range(0, 3))
    #: Speech this long, in a row, is an onset (whole 20 ms frames).
    edge_barge_in_onset_ms: int = field(default=60, validator=_int_range(20, 1000, step=20))
    #: How long the assistant has to confirm (``user-interrupted``, or user
    #: ``speech-update`` started) before the held turn resumes.
    edge_barge_in_confirm_ms: int = field(default=800, validator=_int_range(100, 5000))


_IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]*"
_HANDLER_SPEC = re.compile(rf"{_IDENTIFIER}(?:\.{_IDENTIFIER})*:{_IDENTIFIER}")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_TOOL_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _tool_handlers(instance: Any, attribute: attrs.Attribute[Any], value: dict[str, str]) -> None:
    """Validator: tool name -> ``package.module:function`` or an http(s) URL."""
    for name, spec in value.items():
        if not _TOOL_NAME.fullmatch(name):
            raise ConfigError(
                f"{attribute.name}.{name}", "a tool name is 1-64 letters, digits, _ . or -"
            )
        if spec.startswith(("http://", "https://")):
            reason = _url_problem(spec.partition("?")[0])
            if reason:
                raise ConfigError(f"{attribute.name}.{name}", reason)
        elif not _HANDLER_SPEC.fullmatch(spec):
            raise ConfigError(
                f"{attribute.name}.{name}",
                f"must be 'package.module:function' or an http(s) URL, got {_show(spec)}",
            )


def _tool_name_or_empty(instance: Any, attribute: attrs.Attribute[Any], value: str) -> None:
    if value and not _TOOL_NAME.fullmatch(value):
        raise ConfigError(attribute.name, "a tool name is 1-64 letters, digits, _ . or -")


def _header_name(instance: Any, attribute: attrs.Attribute[Any], value: str) -> None:
    if not _HEADER_NAME.fullmatch(value):
        raise ConfigError(attribute.name, f"must be an HTTP header name, got {_show(value)}")


def _e164_tuple(instance: Any, attribute: attrs.Attribute[Any], value: tuple[str, ...]) -> None:
    for index, number in enumerate(value):
        if not _E164.fullmatch(number):
            raise ConfigError(
                f"{attribute.name}[{index}]",
                f"must be an E.164 number ('+' and 8 to 15 digits), got {_show(number)}",
            )


def _assistant_ids(instance: Any, attribute: attrs.Attribute[Any], value: tuple[str, ...]) -> None:
    for index, assistant in enumerate(value):
        if not ASSISTANT_ID.fullmatch(assistant):
            raise ConfigError(
                f"{attribute.name}[{index}]",
                f"must be a Vapi assistant id (1-64 letters, digits, _ or -), "
                f"got {_show(assistant)}",
            )


def _containing(placeholder: str) -> _Validator:
    """Validator: a template that holds ``placeholder`` (e.g. ``{digit}``)."""

    def check(instance: Any, attribute: attrs.Attribute[Any], value: str) -> None:
        if placeholder not in value:
            raise ConfigError(attribute.name, f"must contain {placeholder}, got {_show(value)}")

    return check


#: An HTTP header value as it arrives after parsing: visible ASCII with inner spaces
#: (the parser strips a value's leading and trailing whitespace, and anything else is
#: not a header value a sender may put on the wire).
_HEADER_VALUE = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?")
#: The start of such a value (a prefix, followed by the credential): may end in spaces.
_HEADER_PREFIX = re.compile(r"[\x21-\x7e][\x20-\x7e]*")


def _header_text(instance: Any, attribute: attrs.Attribute[Any], value: str) -> None:
    """Validator: empty, or text that can start an HTTP header value (a prefix)."""
    if value and not _HEADER_PREFIX.fullmatch(value):
        raise ConfigError(
            attribute.name,
            "must be visible ASCII and spaces, not starting with a space (it starts an "
            f"HTTP header value), got {_show(value)}",
        )


def _hmac_needs_credential(instance: Any, attribute: attrs.Attribute[Any], value: str) -> None:
    # Invariant: attrs runs validators after every field is set, so auth is readable.
    if instance.auth == "hmac" and instance.set_server_url and not value:
        raise ConfigError(
            attribute.name,
            "auth = hmac with set_server_url needs the id of the HMAC credential created in "
            "Vapi (Vapi signs with it); or set set_server_url = false and point the "
            "assistant's server at us in Vapi",
        )


def _keypad_delimiters(
    instance: Any, attribute: attrs.Attribute[Any], value: tuple[str, ...]
) -> None:
    for index, key in enumerate(value):
        if key not in ("#", "*"):
            raise ConfigError(f"{attribute.name}[{index}]", f"must be '#' or '*', got {_show(key)}")


def _zero_or_seconds(high: float) -> _Validator:
    """Validator: 0 or a number of seconds up to ``high``."""

    def check(instance: Any, attribute: attrs.Attribute[Any], value: float) -> None:
        if not 0 <= value <= high:
            raise ConfigError(
                attribute.name, f"must be between 0 and {high:g} seconds, got {value}"
            )

    return check


@frozen(kw_only=True)
class KeypadConfig:
    """``[keypad]``: how key presses (DTMF) reach the assistant, as Vapi's keypadInputPlan.

    A 10-digit account number is one entry, not ten model turns: digits are gathered
    and sent as one message when the caller presses a delimiter or stops typing.
    """

    #: Gather digits into entries; false: every key press is its own message
    #: (``control.dtmf_wording``).
    batch: bool = True
    #: An entry is sent this long after its last key press; 0: only on a delimiter
    #: (or, with no delimiters, at once).
    timeout_s: float = field(default=2.0, validator=_zero_or_seconds(10))
    #: Keys that end an entry at once (not part of it): ``#`` and/or ``*``.
    delimiters: tuple[str, ...] = field(default=("#",), validator=_keypad_delimiters)
    #: What the assistant is told; ``{digits}`` is the entry.
    wording: str = field(
        default="(The caller entered {digits} on the keypad.)", validator=_containing("{digits}")
    )


@frozen(kw_only=True)
class ControlConfig:
    """``[control]``: Vapi's server webhooks (tool calls, reports) and their authentication."""

    #: Serve ``POST /vapi/webhook`` and have created calls send their webhooks to it.
    enabled: bool = False
    #: How Vapi proves a webhook is its own: ``secret`` (``X-Vapi-Secret`` header),
    #: ``bearer`` (a token in ``bearer_header``) or ``hmac`` (a signature of the raw body).
    auth: Literal["secret", "bearer", "hmac"] = "bearer"
    bearer_header: str = field(default="Authorization", validator=_header_name)
    #: Put before the token in ``bearer_header`` (Vapi's default ``Bearer ``; may be empty).
    bearer_prefix: str = field(default="Bearer ", validator=_header_text)
    hmac_algorithm: Literal["sha256", "sha512", "sha1"] = "sha256"
    hmac_signature_header: str = field(default="x-signature", validator=_header_name)
    hmac_timestamp_header: str = field(default="x-timestamp", validator=_header_name)
    #: Text before the signature in its header, e.g. ``sha256=``; empty = none.
    hmac_signature_prefix: str = field(default="", validator=_header_text)
    #: What is signed; placeholders ``{timestamp}``, ``{body}``, ``{method}``, ``{url}``.
    hmac_payload_format: str = field(default="{timestamp}.{body}", validator=_containing("{body}"))
    hmac_signature_encoding: Literal["hex", "base64"] = "hex"
    #: The secret is base64 text of the key bytes (Vapi's ``secretIsBase64``).
    hmac_secret_is_base64: bool = False
    #: A signed webhook whose timestamp is further than this from our clock is a replay.
    replay_window_s: float = field(default=300.0, validator=_deadline(3600))
    #: Larger webhook bodies are refused with 413 (end-of-call reports carry transcripts).
    max_body_bytes: int = field(default=4 * 1024 * 1024, validator=_int_range(1024, 64 << 20))
    #: Put ``assistantOverrides.server`` (our webhook URL and its credential) on every
    #: call we create; off when the assistant's server is configured in Vapi instead.
    set_server_url: bool = True
    #: Id of the Vapi credential for ``server.credentialId`` (required for ``hmac``; for
    #: ``secret``/``bearer`` without it the secret is sent in ``server.headers``).
    credential_id: str = field(default="", validator=_hmac_needs_credential)
    #: What the assistant is told when the caller presses a key; ``{digit}`` is the key.
    dtmf_wording: str = field(
        default="(The caller pressed {digit}.)", validator=_containing("{digit}")
    )
    #: Also call this tool (a ``[tools] handlers`` name) with ``{"digit": …}``; empty = no.
    dtmf_tool: str = field(default="", validator=_tool_name_or_empty)


@frozen(kw_only=True)
class ToolsConfig:
    """``[tools]``: which code answers each tool the assistant calls, and how fast."""

    #: Tool name -> ``package.module:function`` (sync or async) or an http(s) URL.
    handlers: dict[str, str] = field(factory=dict, validator=_tool_handlers)
    #: A handler that has not answered by then gives the tool an ``error`` result.
    #: Keep it under the Vapi server timeout (20 s by default).
    deadline_s: float = field(default=8.0, validator=_deadline(60))
    #: Built-in tool that transfers the caller (see ``[transfer]``); empty = none.
    transfer_tool: str = field(default="transfer_to_human", validator=_tool_name_or_empty)
    #: Built-in tool that ends the call once the assistant's goodbye played; empty = none.
    end_call_tool: str = field(default="end_call", validator=_tool_name_or_empty)


@frozen(kw_only=True)
class TransferConfig:
    """``[transfer]``: where the caller may be transferred, and how the handover goes."""

    #: E.164 number dialled when the transfer names no destination; empty = none.
    default_destination: str = field(default="", validator=_e164_or_empty)
    #: Other numbers the assistant may name in the tool's ``destination`` argument.
    allowed: tuple[str, ...] = field(default=(), validator=_e164_tuple)
    #: ``<Dial callerId>``; empty = Twilio's default (the caller's number on inbound calls).
    caller_id: str = field(default="", validator=_e164_or_empty)
    #: The tool's result, which the assistant turns into its goodbye.
    result: str = "Transferring the caller now. Say a short goodbye."
    #: After the request, how long the assistant may take to start its goodbye.
    goodbye_wait_s: float = field(default=2.0, validator=_deadline(30))
    #: The most the goodbye may take to play before the caller is moved anyway.
    goodbye_deadline_s: float = field(default=15.0, validator=_deadline(120))
    #: The call is held by another process: wait this long (the goodbye) before the REST
    #: redirect, since no playout marks are visible from here.
    remote_delay_s: float = field(default=3.0, validator=_deadline(30))


@frozen(kw_only=True)
class OutboundConfig:
    """``[outbound]``: calls placed by ``voicebridge call`` and ``POST /control/calls``."""

    #: The Twilio number outbound calls come from (E.164).
    from_number: str = field(default="", validator=_e164_or_empty)
    #: Serve ``POST /control/calls`` (bearer ``control_api_token``) for other programs.
    http_enabled: bool = False
    #: Vapi assistants an outbound call may name instead of ``vapi.assistant_id``.
    assistants: tuple[str, ...] = field(default=(), validator=_assistant_ids)


#: A route's number pattern: an E.164 number (exact), ``+`` and digits then ``*`` (a
#: prefix), or ``*`` alone (any number, the caller's "anonymous" too).
ROUTE_NUMBER_PATTERN = re.compile(r"\*|\+[0-9]{1,15}\*?")
#: A route's name: it goes in logs (``ROUTE=``), a metrics label and the stream token.
ROUTE_NAME = re.compile(r"[A-Za-z0-9_-]{1,32}")


def _route_name(instance: Any, attribute: attrs.Attribute[Any], value: str) -> None:
    if not ROUTE_NAME.fullmatch(value):
        raise ConfigError(
            attribute.name, f"must be 1-32 letters, digits, _ or -, got {_show(value)}"
        )


def _route_numbers(instance: Any, attribute: attrs.Attribute[Any], value: tuple[str, ...]) -> None:
    for index, pattern in enumerate(value):
        if not ROUTE_NUMBER_PATTERN.fullmatch(pattern):
            raise ConfigError(
                f"{attribute.name}[{index}]",
                "must be an E.164 number, a prefix ('+' and digits then '*') or '*', "
                f"got {_show(pattern)}",
            )


def _assistant_id_or_empty(instance: Any, attribute: attrs.Attribute[Any], value: str) -> None:
    if value and not ASSISTANT_ID.fullmatch(value):
        raise ConfigError(
            attribute.name,
            f"must be a Vapi assistant id (1-64 letters, digits, _ or -), got {_show(value)}",
        )


@frozen(kw_only=True)
class RouteConfig:
    """One ``[[routes]]`` entry: which calls it takes, and what they get (``routing``).

    At most one of ``assistant_id``, ``assistant``, ``dial``, ``refuse``, ``twiml``; none
    of them is the configured assistant (``vapi``), with this route's overrides.
    """

    name: str = field(validator=_route_name)
    #: The dialled numbers it takes (exact, ``+prefix*`` or ``*``); empty = any.
    to: tuple[str, ...] = field(default=(), validator=_route_numbers)
    #: The callers it takes, the same way; empty = any.
    callers: tuple[str, ...] = field(default=(), validator=_route_numbers)
    assistant_id: str = field(default="", validator=_assistant_id_or_empty)
    #: An inline assistant (Vapi's ``assistant`` object).
    assistant: dict[str, Any] = field(factory=dict)
    #: Vapi ``assistantOverrides`` (``variableValues``, ``firstMessage``, …).
    assistant_overrides: dict[str, Any] = field(factory=dict)
    #: ``<Dial>`` this number at once, without an assistant.
    dial: str = field(default="", validator=_e164_or_empty)
    #: Refuse the call with the ``[overflow]`` message.
    refuse: bool = False
    #: Refuse the call with this TwiML document (``<Response>…</Response>``).
    twiml: str = ""
    #: Ask ``[route_hook]`` (when configured) before taking this route's own choice.
    ask_hook: bool = True


@frozen(kw_only=True)
class RouteHookConfig:
    """``[route_hook]``: the operator's server that decides each inbound call (optional)."""

    #: Where the signed decision request goes (http or https); empty = no hook.
    url: str = field(default="", validator=_base_url)
    #: No answer by then: the route's own choice. Well inside Twilio's 15 s webhook timeout.
    deadline_s: float = field(default=1.5, validator=_deadline(10))


_KEY_PREFIX = re.compile(r"[A-Za-z0-9:_.{}-]{1,64}")
_REDIS_SCHEMES = ("redis", "rediss", "unix")


def _redis_url(instance: Any, attribute: attrs.Attribute[Any], value: str) -> None:
    if not value:
        return
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in _REDIS_SCHEMES:
        raise ConfigError(
            attribute.name,
            "must be empty or a redis://host:port/db, rediss://… or unix:///path URL, "
            f"got scheme {_show(parts.scheme)}",
        )
    if parts.scheme != "unix" and not parts.hostname:
        raise ConfigError(attribute.name, "must name a host (redis://host:port/db)")
    if parts.scheme == "unix" and not parts.path.startswith("/"):
        raise ConfigError(attribute.name, "must name an absolute socket path (unix:///path)")


def _without_password(url: str) -> str:
    """``url`` with the password of its user part (if any) shown as ``***``."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{user}:***@{host}").geturl()


def _key_prefix(instance: Any, attribute: attrs.Attribute[Any], value: str) -> None:
    if not _KEY_PREFIX.fullmatch(value):
        raise ConfigError(
            attribute.name,
            f"must be 1 to 64 of A-Z a-z 0-9 : _ . {{ }} -, got {_show(value)}",
        )


@frozen(kw_only=True)
class ClusterConfig:
    """``[cluster]``: several boxes as one service, their shared state in Redis (optional).

    Without ``redis_url`` every box stands alone (its own ``max_concurrent_calls``, its
    processes sharing ``server.shared_dir``); see docs/operations.md, "Several boxes".
    """

    #: The Redis (or Valkey) every box of the service shares; empty: none. It may carry a
    #: password (``redis://:secret@10.0.0.9:6379/0``): it is never logged.
    redis_url: str = field(default="", validator=_redis_url, repr=False)
    #: Put before every key, so that several services (or a test) can share one Redis.
    key_prefix: str = field(default="voicebridge:", validator=_key_prefix)
    #: Calls the whole service takes at once (reserved or streaming), whichever box
    #: answers; set it to the Vapi account's concurrency limit. Each box still takes no
    #: more than its own ``server.max_concurrent_calls``.
    max_calls: int = field(default=10, validator=_int_range(1, 100_000))
    #: A box renews the slots of its calls every third of this; a box that stops (crash,
    #: power, network) has its slots freed within this long.
    lease_s: float = field(default=15.0, validator=_deadline(600))
    #: How long the voice webhook waits for Redis before deciding without it.
    store_deadline_ms: int = field(default=250, validator=_int_range(10, 5000))
    #: When Redis does not answer in time: admit up to the box's own limit (``box-limit``,
    #: the service stays up) or refuse every new call with the overflow message
    #: (``refuse``, the cluster limit is never exceeded).
    on_store_failure: Literal["box-limit", "refuse"] = "box-limit"

    @property
    def enabled(self) -> bool:
        return bool(self.redis_url)


@frozen(kw_only=True)
class Secrets:
    """Secrets never come from the config file in plain text.

    Each is read from ``$CREDENTIALS_DIRECTORY/<credential>`` (systemd ``LoadCredential=``),
    else from the file named by the ``*_file`` key, else from the environment variable.
    Each ``Secret.source`` records which one supplied it.
    """

    twilio_auth_token: Secret = field(factory=lambda: Secret(""))
    vapi_api_key: Secret = field(factory=lambda: Secret(""))
    stream_token_secret: Secret = field(factory=lambda: Secret(""))
    #: Authenticates Vapi's webhooks (``[control] auth``).
    vapi_webhook_secret: Secret = field(factory=lambda: Secret(""))
    #: Bearer token of ``POST /control/calls``.
    control_api_token: Secret = field(factory=lambda: Secret(""))
    #: The SharedKey secret of Twilio's shared-key webhook signing (empty: such webhooks
    #: are refused; the Auth Token still checks all the others).
    twilio_shared_key: Secret = field(factory=lambda: Secret(""))
    #: Signs the decision requests to ``[route_hook] url``.
    route_hook_secret: Secret = field(factory=lambda: Secret(""))
    #: During a rotation: the Auth Token Twilio signed with before (see docs/operations.md,
    #: "Rotating secrets"); webhooks signed with it are still accepted.
    twilio_auth_token_previous: Secret = field(factory=lambda: Secret(""))
    #: During a rotation: the stream token secret before; tokens issued with it are still
    #: accepted (new ones are issued with ``stream_token_secret``).
    stream_token_secret_previous: Secret = field(factory=lambda: Secret(""))


#: secret attribute -> (systemd credential name, environment variable)
SECRET_SOURCES: dict[str, tuple[str, str]] = {
    "twilio_auth_token": ("twilio-auth-token", "VOICEBRIDGE_TWILIO_AUTH_TOKEN"),
    "vapi_api_key": ("vapi-api-key", "VOICEBRIDGE_VAPI_API_KEY"),
    "stream_token_secret": ("stream-token-secret", "VOICEBRIDGE_STREAM_TOKEN_SECRET"),
    "vapi_webhook_secret": ("vapi-webhook-secret", "VOICEBRIDGE_VAPI_WEBHOOK_SECRET"),
    "control_api_token": ("control-api-token", "VOICEBRIDGE_CONTROL_API_TOKEN"),
    "twilio_shared_key": ("twilio-shared-key", "VOICEBRIDGE_TWILIO_SHARED_KEY"),
    "route_hook_secret": ("route-hook-secret", "VOICEBRIDGE_ROUTE_HOOK_SECRET"),
    "twilio_auth_token_previous": (
        "twilio-auth-token-previous",
        "VOICEBRIDGE_TWILIO_AUTH_TOKEN_PREVIOUS",
    ),
    "stream_token_secret_previous": (
        "stream-token-secret-previous",
        "VOICEBRIDGE_STREAM_TOKEN_SECRET_PREVIOUS",
    ),
}

#: ``VOICEBRIDGE_*`` environment variables that are not ``<SECTION>_<KEY>`` overrides, so
#: the loader does not report them as matching no key.
NON_OVERRIDE_ENV_VARS: frozenset[str] = frozenset(env for _, env in SECRET_SOURCES.values())

#: The shortest stream token secret accepted: an HMAC key shorter than this is guessable.
MIN_STREAM_TOKEN_SECRET_BYTES = 16


@frozen(kw_only=True)
class SecretFiles:
    """``[secrets]`` section: optional file paths for each secret."""

    twilio_auth_token_file: str = ""
    vapi_api_key_file: str = ""
    stream_token_secret_file: str = ""
    vapi_webhook_secret_file: str = ""
    control_api_token_file: str = ""
    twilio_shared_key_file: str = ""
    route_hook_secret_file: str = ""
    twilio_auth_token_previous_file: str = ""
    stream_token_secret_previous_file: str = ""


@frozen(kw_only=True)
class Config:
    """The whole configuration; build it with ``load_config``."""

    server: ServerConfig = field(factory=ServerConfig)
    edge: EdgeConfig = field(factory=EdgeConfig)
    twilio: TwilioConfig = field(factory=TwilioConfig)
    vapi: VapiConfig = field(factory=VapiConfig)
    bridge: BridgeConfig = field(factory=BridgeConfig)
    keypad: KeypadConfig = field(factory=KeypadConfig)
    #: Played when the daemon is at its call limit or draining.
    overflow: CallerAction = field(
        factory=lambda: CallerAction(
            say="Sorry, all our lines are busy right now. Please call again in a few minutes."
        )
    )
    #: Played when the assistant leg fails (create, connect, dropped, unresponsive).
    fallback: CallerAction = field(
        factory=lambda: CallerAction(
            say="Sorry, we are having technical difficulties. Please call again later."
        )
    )
    #: Played after Vapi ended the call at ``vapi.max_duration_s`` (then hang-up).
    max_duration: CallerAction = field(
        factory=lambda: CallerAction(
            say="We have reached the time limit for this call. Thank you for calling. Goodbye."
        )
    )
    endings: EndingsConfig = field(factory=EndingsConfig)
    control: ControlConfig = field(factory=ControlConfig)
    tools: ToolsConfig = field(factory=ToolsConfig)
    transfer: TransferConfig = field(factory=TransferConfig)
    outbound: OutboundConfig = field(factory=OutboundConfig)
    route_hook: RouteHookConfig = field(factory=RouteHookConfig)
    cluster: ClusterConfig = field(factory=ClusterConfig)
    secrets: SecretFiles = field(factory=SecretFiles)
    #: ``[[routes]]``, in order: the first that matches a call takes it (``routing``);
    #: a call no route takes gets today's settings (the ``default`` route).
    routes: tuple[RouteConfig, ...] = ()
    #: Filled by the loader from credentials, files or env; not a file section.
    credentials: Secrets = field(factory=Secrets)

    def evolve(self, **changes: Any) -> Config:
        return attrs.evolve(self, **changes)


# --- describing values and keys ----------------------------------------------------------

#: The sections a config file (and ``VOICEBRIDGE_<SECTION>_<KEY>``) may set, in class order.
FILE_SECTIONS: dict[str, type[Any]] = {
    a.name: a.type
    for a in attrs.fields(attrs.resolve_types(Config))
    if a.name != "credentials" and isinstance(a.type, type)
}

#: For every file section, its keys and their (resolved) types, in class order.
_SECTION_FIELDS: dict[str, dict[str, Any]] = {
    name: typing.get_type_hints(cls) for name, cls in FILE_SECTIONS.items()
}

_Problem = tuple[str, str]  # (key path, reason)


def _show(value: Any, limit: int = 40) -> str:
    """A short, readable rendering of a bad value for an error message."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list | tuple):
        return "an array"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _secret_hint(name: str) -> str:
    """Where a secret may be supplied from, as a phrase."""
    credential, env = SECRET_SOURCES[name]
    return (
        f"systemd credential '{credential}' (LoadCredential=), "
        f"a file named by [secrets] {name}_file, "
        f"or the {env} environment variable"
    )


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p).replace(".[", "[")


def _unknown_key_reason(section: str, key: Any) -> str:
    """Why ``key`` in ``section`` (``""`` = top level) is refused, with a suggestion if any."""
    if section:
        candidates = list(_SECTION_FIELDS[section])
        what = "unknown key"
    else:
        candidates = list(FILE_SECTIONS)
        what = "unknown section"
    close = difflib.get_close_matches(str(key), candidates, n=1)
    if close:
        return f"{what}; did you mean {_join(section, close[0])}?"
    # A key put in the wrong section: point at the section that has it.
    elsewhere = [s for s, keys in _SECTION_FIELDS.items() if key in keys and s != section]
    if elsewhere:
        return f"{what}; {key} belongs in [{elsewhere[0]}] ({elsewhere[0]}.{key})"
    return what


def _plain_secret(section: str, key: Any) -> str | None:
    """The secret a key in the file would hold in plain text, or None.

    ``[twilio] auth_token``, ``[vapi] api_key``, ``[secrets] vapi_api_key``, a top-level
    ``stream_token_secret``: every spelling that puts a secret's value in the file.
    """
    if not isinstance(key, str):
        return None
    for name in SECRET_SOURCES:
        if key == name or (section and f"{section}_{key}" == name):
            return name
    return None


# --- structuring -------------------------------------------------------------------------


def _expected(what: str, value: Any) -> ConfigError:
    return ConfigError("", f"expected {what}, got {_show(value)}")


def _structure_str(value: Any, _: type) -> str:
    if not isinstance(value, str):
        raise _expected("a string", value)
    return value


def _structure_int(value: Any, _: type) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _expected("an integer", value)
    return value


def _structure_float(value: Any, _: type) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _expected("a number", value)
    try:
        return float(value)
    except OverflowError:
        raise ConfigError("", f"number out of range: {_show(value)}") from None


def _structure_bool(value: Any, _: type) -> bool:
    if not isinstance(value, bool):
        raise _expected("true or false", value)
    return value


def _is_literal(type_: Any) -> bool:
    return typing.get_origin(type_) is Literal


def _structure_literal(value: Any, type_: Any) -> Any:
    choices = typing.get_args(type_)
    for choice in choices:
        # type() too: 8000.0 == 8000 and True == 1, but neither is a valid choice here.
        if type(value) is type(choice) and value == choice:
            return choice
    listed = ", ".join(str(c) for c in choices)
    raise ConfigError("", f"must be one of {listed}; got {_show(value)}")


def _json_problem(value: Any, path: str = "") -> _Problem | None:
    """(key path relative to the field, reason) of the first part JSON cannot carry."""
    if value is None:
        return path, "null is not allowed (TOML has no null: leave the key out)"
    if isinstance(value, str | bool | int):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else (path, f"must be a finite number, got {value}")
    if isinstance(value, list):
        for index, item in enumerate(value):
            problem = _json_problem(item, f"{path}[{index}]")
            if problem:
                return problem
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return path, f"keys must be strings, got {_show(key)}"
            problem = _json_problem(item, _join(path, key))
            if problem:
                return problem
        return None
    return path, f"must be JSON data (it is sent to Vapi), got {_show(value)}"


def _structure_json_object(value: Any, _: Any) -> dict[str, Any]:
    """``dict[str, Any]`` fields hold JSON sent to Vapi: a table of JSON-compatible data."""
    if not isinstance(value, dict):
        raise _expected("a table", value)
    problem = _json_problem(value)
    if problem:
        raise ConfigError(problem[0], problem[1])
    return dict(value)


def _structure_str_table(value: Any, _: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise _expected("a table", value)
    for key, item in value.items():
        if not isinstance(item, str):
            raise ConfigError(str(key), f"expected a string, got {_show(item)}")
    return dict(value)


def _structure_str_array(value: Any, _: Any) -> tuple[str, ...]:
    if not isinstance(value, list | tuple):
        raise _expected("an array", value)
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise ConfigError(f"[{index}]", f"expected a string, got {_show(item)}")
    return tuple(value)


def _structure_routes(value: Any, _: Any) -> tuple[RouteConfig, ...]:
    """``[[routes]]``: an array of tables, each problem keyed by its entry (``[1].dial``)."""
    if not isinstance(value, list | tuple):
        raise _expected("an array of tables ([[routes]])", value)
    routes: list[RouteConfig] = []
    problems: list[_Problem] = []
    for index, item in enumerate(value):
        try:
            routes.append(_converter.structure(item, RouteConfig))
        except ConfigError as exc:
            problems.append((_join(f"[{index}]", exc.key), exc.reason))
        except ClassValidationError as exc:
            problems += _problems_from(exc, f"[{index}]")
    if problems:
        raise ExceptionGroup("routes", [ConfigError(key, reason) for key, reason in problems])
    return tuple(routes)


def _structure_secrets(value: Any, _: type) -> Secrets:
    raise ConfigError("", "secrets are not read from the config file")


def _attrs_hook_factory(cl: type[Any], converter: cattrs.Converter) -> Callable[[Any, Any], Any]:
    """Structure an attrs section, reporting every problem in it.

    Each key is structured on its own; the instance is built from those that worked (the
    defaults for the others) with validators off, and then every validator of a key that
    structured runs, so that one bad value never hides the next. The problems are raised
    together as a ``ClassValidationError`` in the shape cattrs gives them (a note naming
    the attribute on structuring errors; validators' own ``ConfigError`` keys; unknown keys
    last), which ``_problems_from`` reads.
    """
    fields = attrs.fields(cl)
    types = typing.get_type_hints(cl)
    names = frozenset(a.name for a in fields)

    def structure_section(value: Any, _: Any) -> Any:
        if not isinstance(value, Mapping):
            raise _expected("a table", value)
        errors: list[Exception] = []
        kwargs: dict[str, Any] = {}
        for a in fields:
            if a.name not in value:
                if a.default is attrs.NOTHING:  # required (only a route has such keys)
                    missing = KeyError(a.name)
                    missing.add_note(AttributeValidationNote(
                        f"Structuring {a.name}", a.name, types[a.name]
                    ))
                    errors.append(missing)
                continue
            try:
                kwargs[a.name] = converter.structure(value[a.name], types[a.name])
            except Exception as exc:  # reported with its key, as cattrs would
                note = AttributeValidationNote(f"Structuring {a.name}", a.name, types[a.name])
                exc.add_note(note)
                errors.append(exc)
        if any(isinstance(e, KeyError) for e in errors):
            raise ClassValidationError(f"While structuring {cl.__name__}", errors, cl)
        with attrs.validators.disabled():
            instance = cl(**kwargs)
        for a in fields:
            if a.validator is None or (a.name in value and a.name not in kwargs):
                continue
            try:
                a.validator(instance, a, getattr(instance, a.name))
            except ConfigError as exc:
                errors.append(exc)
        extra = {key for key in value if key not in names}
        if extra:
            errors.append(ForbiddenExtraKeysError("", cl, extra))
        if errors:
            raise ClassValidationError(f"While structuring {cl.__name__}", errors, cl)
        return instance

    return structure_section


def _make_converter() -> cattrs.Converter:
    """The converter for our own config: strict types, unknown keys are errors."""
    converter = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    converter.register_structure_hook(str, _structure_str)
    converter.register_structure_hook(int, _structure_int)
    converter.register_structure_hook(float, _structure_float)
    converter.register_structure_hook(bool, _structure_bool)
    converter.register_structure_hook(Secrets, _structure_secrets)
    converter.register_structure_hook_func(
        lambda t: t == tuple[RouteConfig, ...], _structure_routes
    )
    converter.register_structure_hook_func(_is_literal, _structure_literal)
    converter.register_structure_hook_func(lambda t: t == dict[str, Any], _structure_json_object)
    converter.register_structure_hook_func(lambda t: t == dict[str, str], _structure_str_table)
    converter.register_structure_hook_func(lambda t: t == tuple[str, ...], _structure_str_array)
    converter.register_structure_hook_factory(
        lambda t: attrs.has(t) and t is not Secrets, _attrs_hook_factory
    )
    return converter


_converter = _make_converter()


def _problems_from(exc: BaseException, path: str = "") -> list[_Problem]:
    """Turn what cattrs raised into (key path, reason) pairs, in the order cattrs found them.

    A ``ClassValidationError`` is a group; each member carries an ``AttributeValidationNote``
    naming the attribute it came from (nested sections nest groups). Leaves are our own
    ``ConfigError``s (from hooks and attrs validators, ``key`` relative to the class) and
    ``ForbiddenExtraKeysError``s (unknown keys of the class ``cl``).
    """
    if isinstance(exc, BaseExceptionGroup):
        problems: list[_Problem] = []
        for sub in exc.exceptions:
            names = [
                n.name
                for n in getattr(sub, "__notes__", ())
                if isinstance(n, AttributeValidationNote)
            ]
            problems += _problems_from(sub, _join(path, *names))
        return problems
    if isinstance(exc, ForbiddenExtraKeysError):
        if exc.cl is RouteConfig:  # a [[routes]] entry, not a section
            names = [a.name for a in attrs.fields(RouteConfig)]
            problems = []
            for k in sorted(exc.extra_fields, key=str):
                close = difflib.get_close_matches(str(k), names, n=1)
                hint = f"; did you mean {close[0]}?" if close else ""
                problems.append((_join(path, str(k)), "unknown key" + hint))
            return problems
        section = path if path in _SECTION_FIELDS else ""
        return [
            (_join(path, str(k)), _unknown_key_reason(section, k))
            for k in sorted(exc.extra_fields, key=str)
        ]
    if isinstance(exc, ConfigError):
        return [(_join(path, exc.key), exc.reason)]
    if isinstance(exc, KeyError):  # a required key (only a route has them)
        return [(path, "required")]
    return [(path, f"invalid value ({type(exc).__name__})")]


def _raise(problems: list[_Problem]) -> typing.NoReturn:
    """Raise the first problem; attach the others as ``key: reason`` notes."""
    key, reason = problems[0]
    error = ConfigError(key, reason)
    for other_key, other_reason in problems[1:]:
        error.add_note(f"{other_key}: {other_reason}" if other_key else other_reason)
    raise error


# --- environment overrides ---------------------------------------------------------------

_TRUE = frozenset({"true", "1", "yes"})
_FALSE = frozenset({"false", "0", "no"})
_INTEGER = re.compile(r"[+-]?[0-9]+")


def env_var_name(section: str, key: str) -> str:
    """The environment variable that overrides ``section.key``: ``VOICEBRIDGE_SERVER_LISTEN``."""
    return f"{ENV_PREFIX}{section}_{key}".upper()


def _parse_env_value(text: str, type_: Any) -> Any:
    """The TOML value an environment variable's text stands for, given the field's type.

    Raises ``ConfigError("", reason)``; the caller adds the key path.
    """
    stripped = text.strip()
    if type_ is str:
        return text
    if type_ is bool:
        if stripped.lower() in _TRUE:
            return True
        if stripped.lower() in _FALSE:
            return False
        raise ConfigError("", f"expected true/false/1/0/yes/no, got {_show(text)}")
    if type_ is int:
        if not _INTEGER.fullmatch(stripped):
            raise _expected("an integer", text)
        return int(stripped)
    if type_ is float:
        try:
            return float(stripped)
        except ValueError:
            raise _expected("a number", text) from None
    if _is_literal(type_):
        for choice in typing.get_args(type_):
            if str(choice) == stripped:
                return choice
        listed = ", ".join(str(c) for c in typing.get_args(type_))
        raise ConfigError("", f"must be one of {listed}; got {_show(text)}")
    if type_ == tuple[str, ...]:
        # A JSON array of strings, or (simpler in a unit file) comma-separated items.
        if stripped.startswith("["):
            items = _parse_env_json(text)
            if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
                raise ConfigError("", "expected a JSON array of strings")
            return items
        return [item.strip() for item in text.split(",") if item.strip()]
    if type_ == dict[str, str]:
        table = _parse_env_json(text)
        if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
            raise ConfigError("", "expected a JSON object of strings")
        return table
    if type_ == dict[str, Any]:
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise ConfigError("", f"expected a JSON object: {exc}") from None
        if not isinstance(value, dict):
            raise ConfigError("", f"expected a JSON object, got {_show(value)}")
        return value
    raise AssertionError(f"no environment parser for {type_!r}")  # a new field type: add one


def _parse_env_json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ConfigError("", f"expected JSON: {exc}") from None


def _apply_env_overrides(raw: dict[str, Any], environ: Mapping[str, str]) -> list[_Problem]:
    """Set ``raw[section][key]`` from every ``VOICEBRIDGE_<SECTION>_<KEY>`` in ``environ``."""
    problems: list[_Problem] = []
    known = {
        env_var_name(section, key): (section, key, type_)
        for section, keys in _SECTION_FIELDS.items()
        for key, type_ in keys.items()
    }
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name in NON_OVERRIDE_ENV_VARS:
            continue
        if name not in known:
            # Compare without the shared prefix, which would make anything look close.
            suffixes = [k.removeprefix(ENV_PREFIX) for k in known]
            close = difflib.get_close_matches(name.removeprefix(ENV_PREFIX), suffixes, n=1)
            hint = f"; did you mean {ENV_PREFIX}{close[0]}?" if close else ""
            problems.append((name, f"environment variable matches no configuration key{hint}"))
            continue
        section, key, type_ = known[name]
        try:
            value = _parse_env_value(environ[name], type_)
        except ConfigError as exc:
            problems.append((_join(section, key, exc.key), f"{exc.reason} (from {name})"))
            continue
        table = raw.setdefault(section, {})
        if isinstance(table, dict):  # otherwise structuring reports "expected a table"
            raw[section] = {**table, key: value}
    return problems


# --- secrets -----------------------------------------------------------------------------


def _read_secret_file(path: Path) -> str:
    """The file's text without one trailing newline. Raises OSError / UnicodeDecodeError."""
    text = path.read_bytes().decode("utf-8")
    if text.endswith("\n"):
        text = text[:-1]
        if text.endswith("\r"):
            text = text[:-1]
    return text


def _is_utf8(text: str) -> bool:
    """False for an environment value that was not UTF-8 (Python keeps its bytes as lone
    surrogates, which no secret may carry into an encode)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _load_secrets(files: SecretFiles, environ: Mapping[str, str]) -> tuple[Secrets, list[_Problem]]:
    """Read each secret from its credential, else its ``*_file``, else its env variable."""
    found: dict[str, Secret] = {}
    problems: list[_Problem] = []
    credentials_dir = environ.get("CREDENTIALS_DIRECTORY", "")
    for name, (credential, env) in SECRET_SOURCES.items():
        file_key = f"{name}_file"
        file_name: str = getattr(files, file_key)
        if credentials_dir and (Path(credentials_dir) / credential).exists():
            path, key, source = (
                Path(credentials_dir) / credential,
                f"credentials.{name}",
                f"systemd credential {credential}",
            )
        elif file_name:
            path, key, source = Path(file_name), f"secrets.{file_key}", f"file {file_name}"
        elif env in environ:
            value = environ[env]
            if not _is_utf8(value):
                problems.append((f"credentials.{name}", f"environment variable {env} is not UTF-8"))
                continue
            found[name] = Secret(value, source=f"environment variable {env}")
            continue
        else:
            continue
        try:
            found[name] = Secret(_read_secret_file(path), source=source)
        except OSError as exc:
            problems.append((key, f"cannot read {path}: {exc.strerror or exc}"))
        except UnicodeDecodeError:
            problems.append((key, f"{path} is not UTF-8 text"))
        except ValueError as exc:  # a NUL byte in the path
            problems.append((key, f"cannot read {str(path)!r}: {exc}"))
    return Secrets(**found), problems


def _silence_problems(vapi: VapiConfig) -> list[_Problem]:
    """A silence deadline set below the assistant's own silence timeout (plus margin)."""
    problems: list[_Problem] = []
    if vapi.silence_deadline_s and (
        vapi.silence_deadline_s < vapi.silence_timeout_s + SILENCE_DEADLINE_MARGIN_S
    ):
        problems.append(
            (
                "vapi.silence_deadline_s",
                f"must be 0 (derived) or at least vapi.silence_timeout_s + "
                f"{SILENCE_DEADLINE_MARGIN_S:g} s "
                f"({vapi.silence_timeout_s + SILENCE_DEADLINE_MARGIN_S:g}), got "
                f"{vapi.silence_deadline_s:g}: quiet calls would fail before Vapi ends them",
            )
        )
    return problems


def webhook_key(control: ControlConfig, secret: str) -> bytes:
    """The key that authenticates Vapi's webhooks: what their credential header must hold
    (``secret``/``bearer`` modes, prefix included) or the HMAC key.

    Raises ``ConfigError("credentials.vapi_webhook_secret", reason)`` for a secret that
    could never authenticate a webhook: empty; in ``hmac`` mode with
    ``hmac_secret_is_base64``, not base64; in the header modes,
    not something an HTTP header can carry unchanged (visible ASCII, inner spaces).
    """
    key = "credentials.vapi_webhook_secret"
    if not secret:
        raise ConfigError(key, "empty: webhooks cannot be checked")
    if control.auth == "hmac":
        if not control.hmac_secret_is_base64:
            return secret.encode()
        try:
            decoded = base64.b64decode(secret.encode(), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            raise ConfigError(
                key,
                "control.hmac_secret_is_base64 is true but the secret is not base64 "
                "(A-Z a-z 0-9 + / and = padding, length a multiple of 4)",
            ) from None
        return decoded
    value = (control.bearer_prefix if control.auth == "bearer" else "") + secret
    if not _HEADER_VALUE.fullmatch(value):
        raise ConfigError(
            key,
            f"with control.auth = {control.auth} it travels in an HTTP header: it must be "
            "visible ASCII, with spaces only inside it",
        )
    return value.encode()


def _from(secret: Secret) -> str:
    return f" (from {secret.source})" if secret.source else ""


def _secrets_unusable(config: Config) -> list[_Problem]:
    """Secrets that are set but could never work with the configuration that uses them
    (``serve`` would refuse every request, or fail at start)."""
    problems: list[_Problem] = []
    webhook_secret = config.credentials.vapi_webhook_secret
    if config.control.enabled and webhook_secret:
        try:
            webhook_key(config.control, webhook_secret.reveal())
        except ConfigError as exc:
            problems.append((exc.key, exc.reason + _from(webhook_secret)))
    api_token = config.credentials.control_api_token
    if (
        config.outbound.http_enabled
        and api_token
        and not _HEADER_VALUE.fullmatch(api_token.reveal())
    ):
        problems.append(
            (
                "credentials.control_api_token",
                "it travels in the Authorization header: it must be visible ASCII, with "
                "spaces only inside it" + _from(api_token),
            )
        )
    return problems


#: The only port Twilio opens a Media Stream to (error 31910 otherwise).
STREAM_PORT = 443


def _stream_url_problems(config: Config) -> list[_Problem]:
    """A public URL whose stream URL Twilio would refuse: not ``wss://`` on port 443.

    The stream URL is ``server.public_url`` with https→wss, so the public URL must be
    ``https://`` with no port or port 443, unless ``twilio.allow_insecure_stream_url``.
    """
    key = "server.box_url" if config.server.box_url else "server.public_url"
    public_url = config.server.own_url
    if not public_url or config.twilio.allow_insecure_stream_url:
        return []
    parts = urllib.parse.urlsplit(public_url)
    if parts.scheme != "https":
        reason = f"is {parts.scheme}://, so the media stream URL would be ws://"
    elif parts.port not in (None, STREAM_PORT):
        reason = f"has port {parts.port}, so the media stream URL would be too"
    else:
        return []
    return [
        (
            key,
            f"{reason}: Twilio opens Media Streams only over wss:// on port "
            f"{STREAM_PORT} (error 31910); use https://host[/prefix] (the proxy may "
            f"forward to any local port), or set twilio.allow_insecure_stream_url = true "
            f"for local tests",
        )
    ]


def _incomplete(config: Config, *, secrets: bool = True) -> list[_Problem]:
    """What a serving daemon needs that ``config`` does not have (with ``secrets``, the
    secrets it needs too)."""
    problems: list[_Problem] = []
    if not config.server.public_url:
        problems.append(
            ("server.public_url", "required: the public http(s) base URL Twilio reaches us at")
        )
    if not config.twilio.account_sid:
        problems.append(("twilio.account_sid", "required: the Twilio account SID (AC…)"))
    required = ["vapi_api_key", "stream_token_secret"]
    if config.twilio.validate_signatures:
        required.insert(0, "twilio_auth_token")
    if config.control.enabled:
        required.append("vapi_webhook_secret")
    if config.outbound.http_enabled:
        required.append("control_api_token")
    if config.route_hook.url:
        required.append("route_hook_secret")
    if config.twilio.shared_key_id:
        # Shared-key signed webhooks are expected: without the key each would get a 403.
        required.append("twilio_shared_key")
    for name in required if secrets else ():
        secret: Secret = getattr(config.credentials, name)
        if not secret:
            got = f"empty (from {secret.source})" if secret.source else "missing"
            problems.append((f"credentials.{name}", f"{got}: supply it as {_secret_hint(name)}"))
    if not config.vapi.assistant_id and not config.vapi.assistant:
        problems.append(
            ("vapi.assistant_id", "required: set vapi.assistant_id or an inline vapi.assistant")
        )
    return problems


# --- loading -----------------------------------------------------------------------------


def _refuse_secrets_in_file(data: Mapping[Any, Any]) -> tuple[dict[Any, Any], list[_Problem]]:
    """A copy of ``data`` without plain-text secrets or a ``credentials`` table, and why.

    Sections are copied too, so that env overrides never modify the caller's mapping.
    """
    problems: list[_Problem] = []
    raw: dict[Any, Any] = {}
    for section, table in data.items():
        secret = _plain_secret("", section)
        if secret:
            problems.append(
                (
                    str(section),
                    f"secrets are not read from the config file; supply it as "
                    f"{_secret_hint(secret)}",
                )
            )
        elif section == "credentials":
            problems.append(
                (
                    "credentials",
                    "not a config file section: secrets come from systemd "
                    "credentials, files named in [secrets] or environment variables",
                )
            )
        elif isinstance(table, Mapping) and section in FILE_SECTIONS:
            kept: dict[str, Any] = {}
            for key, value in table.items():
                secret = _plain_secret(section, key)
                if secret:
                    problems.append(
                        (
                            _join(section, key),
                            "secrets are not read from the config file; "
                            f"supply {secret} as {_secret_hint(secret)}",
                        )
                    )
                else:
                    kept[key] = value
            raw[section] = kept
        else:
            raw[section] = table  # structuring reports unknown sections and non-tables
    return raw, problems


def config_from_mapping(
    data: Mapping[str, Any],
    *,
    environ: Mapping[str, str] | None = None,
    require_complete: bool = True,
    read_secrets: bool = True,
) -> Config:
    """Build a ``Config`` from parsed TOML ``data``, env overrides and secrets.

    ``environ`` defaults to ``os.environ``; pass ``{}`` for a config from ``data`` alone.
    With ``require_complete``, everything ``serve`` needs must be present (see
    ``load_config``). With ``read_secrets=False`` no secret is read (all are empty) and
    none is required. Raises ``ConfigError`` for every problem; ``data`` is not modified.
    """
    config, problems = _build(
        data,
        os.environ if environ is None else environ,
        require_complete=require_complete,
        read_secrets=read_secrets,
    )
    if problems or config is None:
        _raise(problems)
    return config


def _build(
    data: Any,
    environ: Mapping[str, str],
    *,
    require_complete: bool,
    read_secrets: bool,
) -> tuple[Config | None, list[_Problem]]:
    """The configuration and every problem found (``None`` when it cannot be built)."""
    if not isinstance(data, Mapping):
        return None, [("", f"the configuration must be a table, got {_show(data)}")]

    raw, problems = _refuse_secrets_in_file(data)
    problems += _apply_env_overrides(raw, environ)
    try:
        config = _converter.structure(raw, Config)
    except ConfigError as exc:
        problems.append((exc.key, exc.reason))
    except ClassValidationError as exc:
        problems += _problems_from(exc)
    if problems:
        return None, problems + _problems_beside(raw, environ, problems, require_complete,
                                                 read_secrets=read_secrets)
    return _check_whole(config, environ, require_complete=require_complete,
                        read_secrets=read_secrets)


def _problems_beside(
    raw: Mapping[Any, Any],
    environ: Mapping[str, str],
    found: list[_Problem],
    require_complete: bool,
    *,
    read_secrets: bool,
) -> list[_Problem]:
    """The problems of the whole configuration (secrets, completeness) that sections which
    could not be structured hide: judged with the defaults in their place, and kept only
    where they concern no section that had problems of its own."""
    sections: dict[str, Any] = {}
    for name, cls in FILE_SECTIONS.items():
        try:
            sections[name] = _converter.structure(raw.get(name, {}), cls)
        except (ConfigError, ClassValidationError):
            continue
    with attrs.validators.disabled():
        partial = Config(**sections)
    _, more = _check_whole(
        partial, environ, require_complete=require_complete, read_secrets=read_secrets
    )
    bad = {key.split(".")[0] for key, _ in found}
    return [(key, reason) for key, reason in more if key.split(".")[0] not in bad]


def _check_whole(
    config: Config,
    environ: Mapping[str, str],
    *,
    require_complete: bool,
    read_secrets: bool,
) -> tuple[Config, list[_Problem]]:
    """``config`` with its secrets, and the problems of the configuration as a whole."""
    problems: list[_Problem] = []
    credentials = Secrets()
    if read_secrets:
        credentials, problems = _load_secrets(config.secrets, environ)
    for name in ("stream_token_secret", "stream_token_secret_previous"):
        token_secret = getattr(credentials, name)
        if token_secret and len(token_secret.reveal().encode()) < MIN_STREAM_TOKEN_SECRET_BYTES:
            problems.append(
                (
                    f"credentials.{name}",
                    f"must be at least {MIN_STREAM_TOKEN_SECRET_BYTES} bytes"
                    f" (from {token_secret.source})",
                )
            )
    config = config.evolve(credentials=credentials)
    problems += _silence_problems(config.vapi)
    problems += _secrets_unusable(config)
    from voicebridge.routing import route_problems  # it builds on this module

    problems += route_problems(config)
    if require_complete:
        problems += _incomplete(config, secrets=read_secrets) + _stream_url_problems(config)
    return config, problems


def _read_toml(file_name: str) -> tuple[str, dict[str, Any]]:
    """The file's text and its parsed TOML; ``ConfigError`` (empty key) naming the file."""
    try:
        with open(file_name, "rb") as file:
            text = file.read().decode("utf-8")
        return text, tomllib.loads(text)
    except OSError as exc:
        raise ConfigError("", f"cannot read {file_name}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("", f"{file_name} is not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError("", f"{file_name} is not UTF-8 text") from None


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    require_complete: bool = True,
    read_secrets: bool = True,
) -> Config:
    """Load the configuration from the TOML file at ``path`` (default ``DEFAULT_CONFIG_PATH``).

    Then apply ``VOICEBRIDGE_<SECTION>_<KEY>`` overrides from ``environ`` (default
    ``os.environ``), read the secrets (``$CREDENTIALS_DIRECTORY/<credential>``, else the
    ``[secrets] <name>_file`` file, else the environment variable) and validate everything.

    With ``require_complete`` (what ``serve`` and ``check-config`` use), also require
    ``server.public_url``, ``twilio.account_sid``, the Twilio auth token (unless
    ``twilio.validate_signatures`` is false), the Vapi API key, a stream token secret of at
    least 16 bytes and one of ``vapi.assistant_id`` / ``vapi.assistant``; and refuse a
    ``server.public_url`` that would give a media stream URL other than ``wss://`` on port
    443 (unless ``twilio.allow_insecure_stream_url``). ``read_secrets=False``: see
    ``config_from_mapping``.

    Raises ``ConfigError``: for an unreadable file or bad TOML its ``key`` is empty and the
    reason names the file; otherwise ``key`` is the dotted key path of the first problem and
    the others are in ``__notes__``. Each reason ends with where the value came from:
    `` (in <file>:<line>)`` for a key in the file, `` (from VOICEBRIDGE_…)`` for an
    environment override.
    """
    config, _ = load_config_with_origins(
        path, environ=environ, require_complete=require_complete, read_secrets=read_secrets
    )
    return config


def load_config_with_origins(
    path: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    require_complete: bool = True,
    read_secrets: bool = True,
) -> tuple[Config, dict[str, str]]:
    """``load_config``, and where each key that was set came from (``key_origins``)."""
    file_name = os.fspath(path) if path is not None else DEFAULT_CONFIG_PATH
    environ = os.environ if environ is None else environ
    text, data = _read_toml(file_name)
    origins = key_origins(text, file_name, environ)
    config, problems = _build(
        data, environ, require_complete=require_complete, read_secrets=read_secrets
    )
    if problems or config is None:
        _raise([(key, reason + _origin_note(key, reason, origins)) for key, reason in problems])
    return config, origins


# --- where a key came from ---------------------------------------------------------------

_TABLE_HEADER = re.compile(r"\s*\[\[?\s*(?P<name>[^\[\]#]+?)\s*\]\]?\s*(?:#.*)?$")
_KEY_PART = r'(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|\'[^\']*\')'
_KEY_LINE = re.compile(rf"\s*(?P<key>{_KEY_PART}(?:\s*\.\s*{_KEY_PART})*)\s*=")
_KEY_SPLIT = re.compile(rf"\s*({_KEY_PART})\s*(?:\.|$)")


def _dotted(key_text: str) -> str:
    """``a . "b.c"`` -> ``a.b.c`` (quotes dropped; good enough to find a key by path)."""
    return ".".join(part.strip("\"'") for part in _KEY_SPLIT.findall(key_text))


def key_lines(text: str) -> dict[str, int]:
    """The line (1-based) of each table header and ``key =`` in TOML ``text``, by dotted
    path (``server``, ``server.listen``, ``vapi.assistant.model``); the first one wins.

    tomllib keeps no positions, so this is a light scan of the lines: it follows
    ``[table]`` headers and skips the insides of multi-line strings and arrays, which is
    all that finding a key for an error message needs (brackets inside strings of an
    array can fool it; the worst that does is a missing or wrong line in a message).
    """
    found: dict[str, int] = {}
    table = ""
    in_string = ""
    # Invariant: > 0 while inside a multi-line array (its lines hold no keys or headers).
    open_brackets = 0
    for number, line in enumerate(text.splitlines(), 1):
        if in_string:
            if line.count(in_string) % 2:
                in_string = ""
            continue
        if open_brackets > 0:
            open_brackets += line.count("[") - line.count("]")
            continue
        header = _TABLE_HEADER.match(line)
        if header and not _KEY_LINE.match(line):
            table = _dotted(header.group("name"))
            found.setdefault(table, number)
            continue
        key = _KEY_LINE.match(line)
        if key:
            path = _join(table, _dotted(key.group("key")))
            found.setdefault(path, number)
            rest = line[key.end() :]
            for quotes in ('"""', "'''"):
                if rest.count(quotes) % 2:
                    in_string = quotes
            if not in_string:
                open_brackets = rest.count("[") - rest.count("]")
    return found


def key_origins(text: str, file_name: str, environ: Mapping[str, str]) -> dict[str, str]:
    """Where each key that was set came from: ``"<file>:<line>"``, or the environment
    variable (``"VOICEBRIDGE_SERVER_LISTEN"``) that overrides the file."""
    origins = {key: f"{file_name}:{line}" for key, line in key_lines(text).items()}
    for section, keys in _SECTION_FIELDS.items():
        for key in keys:
            name = env_var_name(section, key)
            if name in environ:
                origins[_join(section, key)] = name
    return origins


def _origin_note(key: str, reason: str, origins: Mapping[str, str]) -> str:
    """`` (in <file>:<line>)`` or `` (from <variable>)`` for the longest prefix of ``key``
    that has an origin; "" for none, or when ``reason`` names it already."""
    parts = key.split(".") if key else []
    for end in range(len(parts), 0, -1):
        origin = origins.get(".".join(parts[:end]))
        if origin is None:
            continue
        if origin in reason:
            return ""
        return f" (from {origin})" if origin.startswith(ENV_PREFIX) else f" (in {origin})"
    return ""


# --- rendering ---------------------------------------------------------------------------

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _toml_string(key)


def _toml_string(text: str) -> str:
    # JSON's string escapes are a subset of TOML's basic-string escapes; TOML also wants
    # DEL escaped.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_value(value: Any) -> str:
    """``value`` as a TOML value on one line (tables become inline tables)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        items = ", ".join(f"{_toml_key(str(k))} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + items + " }" if items else "{}"
    raise TypeError(f"cannot render {type(value).__name__} as TOML")


def _secret_line(name: str, secret: Secret, *, read: bool = True) -> str:
    credential, env = SECRET_SOURCES[name]
    if not read:
        return f"{name} = {_toml_string(UNSET)}  # not read (--no-secrets)"
    if secret:
        return f"{name} = {_toml_string(MASK)}  # from {secret.source}"
    if secret.source:
        return f"{name} = {_toml_string(UNSET)}  # empty, from {secret.source}"
    return (
        f"{name} = {_toml_string(UNSET)}  # supply via credential {credential}, "
        f"[secrets] {name}_file or {env}"
    )


def render_config(
    config: Config,
    *,
    origins: Mapping[str, str] | None = None,
    secrets_read: bool = True,
) -> str:
    """The effective configuration as TOML text, sections in class order, secrets masked.

    Each secret is ``"********"`` when set and ``"(unset)"`` when not, with a comment
    saying where it came from (``secrets_read=False``: that none was read). The
    ``[credentials]`` table is informational: a config file may not contain it. With
    ``origins`` (``key_origins``), a key that was set ends with a comment saying where:
    ``# voicebridge.toml:12`` or ``# from VOICEBRIDGE_SERVER_LISTEN``; keys without one
    have their default.
    """
    origins = origins or {}
    lines = ["# voicebridge effective configuration (secrets masked)"]
    for section in FILE_SECTIONS:
        lines += ["", f"[{section}]"]
        section_value = getattr(config, section)
        for a in attrs.fields(type(section_value)):
            value = getattr(section_value, a.name)
            if not a.repr and isinstance(value, str):  # e.g. a password inside a URL
                value = _without_password(value)
            line = f"{a.name} = {_toml_value(value)}"
            origin = origins.get(_join(section, a.name))
            if origin is not None:
                line += f"  # {'from ' if origin.startswith(ENV_PREFIX) else ''}{origin}"
            lines.append(line)
    for route in config.routes:
        lines += ["", "[[routes]]"]
        for a in attrs.fields(RouteConfig):
            lines.append(f"{a.name} = {_toml_value(getattr(route, a.name))}")
    lines += [
        "",
        "# Not a file section: secrets come from systemd credentials ($CREDENTIALS_DIRECTORY),",
        "# the files named in [secrets], or environment variables, in that order.",
        "[credentials]",
    ]
    for name in SECRET_SOURCES:
        lines.append(_secret_line(name, getattr(config.credentials, name), read=secrets_read))
    return "\n".join(lines) + "\n"


# --- voicebridge check-config ------------------------------------------------------------


def _print_error(exc: ConfigError, err: TextIO) -> None:
    print(f"voicebridge: config error: {exc}", file=err)
    for note in getattr(exc, "__notes__", ()):
        print(f"voicebridge: config error: {note}", file=err)


def check_config_main(
    path: str | None,
    *,
    environ: Mapping[str, str] | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
    quiet: bool = False,
    read_secrets: bool = True,
) -> int:
    """``voicebridge check-config [--config PATH] [--quiet] [--no-secrets]``: load as
    ``serve`` would and report (the tool handlers are imported too).

    Prints the effective configuration (secrets masked, each key that was set followed by
    where: ``# <file>:<line>`` or ``# from VOICEBRIDGE_…``) to ``out`` (default stdout),
    nothing with ``quiet``, and returns 0; or prints one
    ``voicebridge: config error: <key>: <reason> (in <file>:<line>)`` line per problem to
    ``err`` (default stderr) and returns 2. ``read_secrets=False`` checks everything but
    the secrets, which are neither read nor required (for a user who cannot read them, or
    a new release checked before it is installed).
    """
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    # Imported here: the tools module needs this one.
    from voicebridge.control.tools import check_handlers

    try:
        config, origins = load_config_with_origins(
            path, environ=environ, require_complete=True, read_secrets=read_secrets
        )
        check_handlers(config.tools.handlers)  # serve imports them at start
    except ConfigError as exc:
        _print_error(exc, err)
        return 2
    if not quiet:
        out.write(render_config(config, origins=origins, secrets_read=read_secrets))
    return 0
