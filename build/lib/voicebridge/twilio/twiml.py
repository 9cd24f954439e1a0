"""TwiML documents voicebridge answers Twilio with, built with twilio-python's VoiceResponse."""

from __future__ import annotations

import re
from collections.abc import Mapping
from urllib.parse import urlsplit

from twilio.twiml.voice_response import VoiceResponse

from voicebridge.config import CallerAction

__all__ = ["MAX_PARAMETER_CHARS", "caller_action", "connect_stream", "hangup", "xml_safe"]

#: Twilio's limit on one ``<Parameter>``: its name and value together must be shorter.
MAX_PARAMETER_CHARS = 500
#: Characters XML 1.0 cannot carry at all (most C0 controls, surrogates, U+FFFE/U+FFFF):
#: written raw they make the whole document malformed, and Twilio then plays its
#: generic error to the caller.
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def xml_safe(text: str) -> str:
    """``text`` without the characters XML cannot carry (they are dropped)."""
    return _NOT_XML.sub("", text)


def connect_stream(
    *,
    stream_url: str,
    action_url: str,
    parameters: Mapping[str, str],
    status_callback: str | None = None,
) -> str:
    """``<Connect action><Stream url>`` with one ``<Parameter>`` per item of ``parameters``.

    The stream is bidirectional, so there is no ``track`` attribute (such a stream
    carries the inbound track only). Twilio requests ``action_url`` for the next TwiML
    once the stream ends; ``status_callback``, if given, receives the stream's
    ``stream-started`` / ``stream-stopped`` / ``stream-error`` events. The parameters
    arrive in ``start.customParameters``, in this order.

    Characters XML cannot carry are dropped from names and values (``xml_safe``).
    Raises ``ValueError`` when ``stream_url`` is not ``wss://`` (or ``ws://``, for local
    tests) or carries a query string or fragment (Twilio does not support them; per-call
    data goes in parameters), when a parameter name is empty, or when a parameter's name
    and value together reach ``MAX_PARAMETER_CHARS``.
    """
    parameters = {xml_safe(name): xml_safe(value) for name, value in parameters.items()}
    url = urlsplit(stream_url)
    if url.scheme not in ("wss", "ws") or not url.netloc:
        raise ValueError(f"stream URL must be wss://host/path, not {stream_url!r}")
    if url.query or url.fragment or "?" in stream_url or "#" in stream_url:
        raise ValueError(
            f"stream URL must not have a query string or fragment (Twilio does not "
            f"support them; use parameters): {stream_url!r}"
        )
    for name, value in parameters.items():
        if not name:
            raise ValueError("a stream parameter needs a name")
        if len(name) + len(value) >= MAX_PARAMETER_CHARS:
            raise ValueError(
                f"stream parameter {name!r}: name and value are {len(name) + len(value)} "
                f"characters, Twilio's limit is under {MAX_PARAMETER_CHARS}"
            )
    response = VoiceResponse()
    connect = response.connect(action=action_url)
    stream = connect.stream(url=stream_url, status_callback=status_callback)
    for name, value in parameters.items():
        stream.parameter(name=name, value=value)
    return str(response)


def caller_action(action: CallerAction) -> str:
    """``<Say>`` the words (if any), ``<Dial>`` the number (if any), then ``<Hangup/>``.

    Characters XML cannot carry are dropped from the words (``xml_safe``).
    """
    response = VoiceResponse()
    say = xml_safe(action.say)
    if say:
        response.say(say, voice=xml_safe(action.voice) or None)
    if action.dial:
        response.dial(action.dial)
    response.hangup()
    return str(response)


def hangup() -> str:
    """A response that hangs up at once."""
    response = VoiceResponse()
    response.hangup()
    return str(response)
