"""Structured log events: one function every module calls, rendered for journald or stderr.

A log event is a stdlib ``logging`` record carrying ``record.vb_fields``: a mapping of
journald-style field names (upper case, ``[A-Z0-9_]``) to values. ``EVENT`` always
names the event (``call-start``, ``call-end``, ``webhook-rejected`` …), so operators
can filter with ``journalctl EVENT=call-end``. Handlers decide how to render them:
native journal fields when journald is reachable, ``key=value`` text otherwise.

Never pass secrets or Vapi socket URLs as fields: they are bearer credentials. As a
second line of defence every handler ``configure_logging`` installs carries a
``SecretFieldFilter``, which removes fields whose names look like secrets (see
``is_secret_field``), counts them, and names them in ``VB_REFUSED_FIELDS`` instead.
Message text is not inspected: keep secrets out of messages.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections import Counter
from collections.abc import Mapping
from typing import Literal, TextIO

import attrs

FieldValue = str | int | float | bool | None

#: Attribute name on ``logging.LogRecord`` that carries the structured fields.
FIELDS_ATTR = "vb_fields"


def log_event(
    logger: logging.Logger,
    level: int,
    event: str,
    message: str,
    /,
    **fields: FieldValue,
) -> None:
    """Emit one structured event. Field names are upper-cased; ``None`` values are left out."""
    if not logger.isEnabledFor(level):
        return
    record_fields: dict[str, FieldValue] = {"EVENT": event}
    for name, value in fields.items():
        if value is not None:
            record_fields[name.upper()] = value
    logger.log(level, message, extra={FIELDS_ATTR: record_fields}, stacklevel=2)


def record_fields(record: logging.LogRecord) -> Mapping[str, FieldValue]:
    """The structured fields of ``record`` (empty for plain stdlib records)."""
    fields: Mapping[str, FieldValue] = getattr(record, FIELDS_ATTR, {})
    return fields


def format_value(value: FieldValue) -> str:
    """A field value as text: booleans as ``true``/``false``, everything else ``str()``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def syslog_priority(levelno: int) -> int:
    """The syslog priority (2 crit … 7 debug) for a ``logging`` level number."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


# -- secrets -----------------------------------------------------------------------

#: A field is refused when its upper-cased name is one of these words, or ends with
#: ``_`` + one of them (``TWILIO_AUTH_TOKEN``, ``VAPI_API_KEY``, ``STREAM_TOKEN`` …).
#: Vapi's ``websocketCallUrl`` is a bearer credential for the call's audio, hence the
#: URL entries. Deliberately a name rule, not a value heuristic: predictable, and cheap.
DENIED_FIELD_WORDS = (
    "SECRET",
    "TOKEN",
    "PASSWORD",
    "API_KEY",
    "AUTHORIZATION",
    "COOKIE",
    "CREDENTIAL",
    "CREDENTIALS",
    "WEBSOCKET_URL",
    "WEBSOCKET_CALL_URL",
    "TRANSPORT_URL",
)

_NON_ALNUM = re.compile(r"[^A-Z0-9]")

#: Field that lists (comma-separated, sorted) the names a ``SecretFieldFilter`` removed.
REFUSED_FIELDS_FIELD = "VB_REFUSED_FIELDS"


def is_secret_field(name: str) -> bool:
    """True if a field called ``name`` must never reach a log (see ``DENIED_FIELD_WORDS``).

    The name is compared as journald will store it: upper-cased, with every character
    outside ``[A-Z0-9]`` read as ``_`` (so ``api-key`` is ``API_KEY``).
    """
    normal = _NON_ALNUM.sub("_", name.upper())
    return any(normal == word or normal.endswith("_" + word) for word in DENIED_FIELD_WORDS)


class SecretFieldFilter(logging.Filter):
    """Removes secret-looking structured fields from every record it sees.

    The record is still logged; its ``vb_fields`` lose the refused fields and gain
    ``VB_REFUSED_FIELDS=<names>`` so the omission is visible. ``refused`` counts the
    removals by field name (a non-zero count is a bug at the call site to fix).
    """

    def __init__(self) -> None:
        super().__init__()
        self.refused: Counter[str] = Counter()

    def filter(self, record: logging.LogRecord) -> bool:
        fields = record_fields(record)
        refused = sorted(name for name in fields if is_secret_field(name))
        if refused:
            kept = {k: v for k, v in fields.items() if k not in refused}
            kept[REFUSED_FIELDS_FIELD] = ",".join(refused)
            setattr(record, FIELDS_ATTR, kept)
            self.refused.update(refused)
        return True


class TextFormatter(logging.Formatter):
    """One readable line per event: ``LEVEL logger: message KEY=value …``."""

    def format(self, record: logging.LogRecord) -> str:
        parts = [f"{record.levelname:<7} {record.name}: {record.getMessage()}"]
        for name, value in record_fields(record).items():
            if name == "EVENT" or value is None:
                continue
            text = format_value(value)
            if not text or any(c.isspace() for c in text) or '"' in text:
                escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
                text = f'"{escaped}"'
            parts.append(f"{name}={text}")
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + record.stack_info
        return line


class PriorityPrefixFormatter(TextFormatter):
    """``TextFormatter`` lines prefixed with ``<N>``, the sd-daemon(3) priority prefix.

    Used when stderr is itself a journal stream: journald strips the prefix and stores
    ``PRIORITY=N``. Every line of a multi-line event (a traceback) gets the prefix,
    because journald turns each line of a stream into its own entry.
    """

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


LogTarget = Literal["auto", "journal", "stderr"]


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (ValueError, AttributeError):  # closed, or not a real stream
        return False


@attrs.frozen
class LoggingSetup:
    """What ``configure_logging`` installed on the ``voicebridge`` logger."""

    #: ``"journal"`` (native entries) or ``"stderr"`` (text lines).
    target: Literal["journal", "stderr"]
    handler: logging.Handler
    #: Counts refused secret fields (``secret_filter.refused``), e.g. for a metric.
    secret_filter: SecretFieldFilter
    #: True when text lines carry ``<N>`` prefixes (stderr is a journal stream).
    priority_prefix: bool


def configure_logging(
    level: int | str = logging.INFO,
    *,
    target: LogTarget = "auto",
    environ: Mapping[str, str] | None = None,
    stderr: TextIO | None = None,
    journal_socket: str | None = None,
    identifier: str = "voicebridge",
) -> LoggingSetup:
    """Route the ``voicebridge`` loggers to journald or to stderr; returns what it did.

    ``target="auto"`` writes native journal entries when journald is reachable
    (``$JOURNAL_STREAM`` names ``stderr``, or the journal socket exists) and text lines
    on ``stderr`` otherwise — and always text lines when ``stderr`` is a terminal: someone
    running ``voicebridge`` by hand is watching it, even on a box with journald.
    ``"journal"`` and ``"stderr"`` force one or the other.
    Text lines get ``<N>`` priority prefixes when ``stderr`` is a journal stream. If
    journald disappears later, journal entries fall back to those text lines.
    Calling it again replaces (and closes) the handlers installed before.
    """
    # Imported here: journald.py builds on this module's field helpers.
    from voicebridge.observability import journald

    env = os.environ if environ is None else environ
    stream = sys.stderr if stderr is None else stderr
    socket_path = journald.JOURNAL_SOCKET if journal_socket is None else journal_socket
    secret_filter = SecretFieldFilter()

    prefix = journald.is_journal_stream(stream, env)
    text_handler = logging.StreamHandler(stream)
    text_handler.setFormatter(PriorityPrefixFormatter() if prefix else TextFormatter())

    use_journal = target == "journal" or (
        target == "auto"
        and not _is_terminal(stream)
        and journald.journald_available(env, stderr=stream, socket_path=socket_path)
    )
    handler: logging.Handler
    if use_journal:
        handler = journald.JournaldHandler(
            socket_path=socket_path, identifier=identifier, fallback=text_handler
        )
    else:
        handler = text_handler
    handler.addFilter(secret_filter)

    root = logging.getLogger("voicebridge")
    root.setLevel(level)
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.propagate = False
    return LoggingSetup(
        target="journal" if use_journal else "stderr",
        handler=handler,
        secret_filter=secret_filter,
        priority_prefix=prefix,
    )
