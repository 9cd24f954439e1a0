"""Twilio's ``<Stream statusCallback>`` requests, parsed: stream started, stopped, or failed.

Twilio posts one form-encoded request per event of a Media Stream to the URL our
TwiML put in ``statusCallback``: ``AccountSid``, ``CallSid``, ``StreamSid``,
``StreamName``, ``StreamEvent`` (``stream-started``, ``stream-stopped``,
``stream-error``), ``StreamError`` (a description of the failure, on ``stream-error``)
and ``Timestamp``. Sans-I/O: a form in, a frozen event out; no logging, no clock.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final, Literal

from attrs import frozen

__all__ = [
    "MAX_ERROR_CHARS",
    "UNKNOWN_CODE",
    "StreamStatus",
    "StreamStatusEvent",
    "StreamStatusUnrecognized",
    "parse_stream_status",
]

StreamStatusEvent = Literal["stream-started", "stream-stopped", "stream-error"]
_EVENTS: Final[dict[str, StreamStatusEvent]] = {
    "stream-started": "stream-started",
    "stream-stopped": "stream-stopped",
    "stream-error": "stream-error",
}
#: Characters of ``StreamError`` kept: Twilio's descriptions are a sentence; the rest of a
#: longer value is cut rather than carried into logs.
MAX_ERROR_CHARS: Final = 300
#: Characters of an unrecognized ``StreamEvent`` kept (for the one log line about it).
_MAX_EVENT_CHARS: Final = 40
#: The ``code`` of a stream error that names none.
UNKNOWN_CODE: Final = "unknown"
#: A Twilio error code: five digits (Media Streams' are 319xx), standing alone.
_ERROR_CODE = re.compile(r"(?<![0-9])[0-9]{5}(?![0-9])")


@frozen(kw_only=True)
class StreamStatus:
    """One recognised stream status event."""

    event: StreamStatusEvent
    call_sid: str
    stream_sid: str
    #: ``StreamError``, cut to ``MAX_ERROR_CHARS`` (peer text: escape it to log it).
    error: str
    #: Twilio's error code: ``ErrorCode`` when sent, else the first five-digit number in
    #: ``StreamError``; ``UNKNOWN_CODE`` when neither has one. Always digits or that.
    code: str
    timestamp: str


@frozen(kw_only=True)
class StreamStatusUnrecognized:
    """A ``StreamEvent`` this module does not know (Twilio may add events)."""

    event: str
    call_sid: str


def _error_code(form: Mapping[str, str], error: str) -> str:
    given = form.get("ErrorCode", "").strip()
    if given.isascii() and given.isdigit() and len(given) == 5:
        return given
    found = _ERROR_CODE.search(error)
    return found.group(0) if found else UNKNOWN_CODE


def parse_stream_status(form: Mapping[str, str]) -> StreamStatus | StreamStatusUnrecognized:
    """The event a status callback's form carries. Missing fields are empty strings."""
    event = form.get("StreamEvent", "")
    call_sid = form.get("CallSid", "")
    known = _EVENTS.get(event)
    if known is None:
        return StreamStatusUnrecognized(event=event[:_MAX_EVENT_CHARS], call_sid=call_sid)
    error = form.get("StreamError", "")[:MAX_ERROR_CHARS]
    return StreamStatus(
        event=known,
        call_sid=call_sid,
        stream_sid=form.get("StreamSid", ""),
        error=error,
        code=_error_code(form, error) if known == "stream-error" else "",
        timestamp=form.get("Timestamp", ""),
    )
