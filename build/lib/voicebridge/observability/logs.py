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

Messages and field values may carry text a peer chose (a CallSid, a path, a reason
from a parser). Every output renders them through ``escape_text``: control characters
(CR, LF, ESC, the rest of C0 and C1, DEL) and other invisible or line-breaking
characters become visible escapes, and long values are cut with a marker, so no peer
can forge a log line or a terminal sequence, whatever the call site wrote. Tracebacks
keep their newlines (``escape_lines``); in text output every line after a record's
first starts with a space, so only a real record starts a line.

Warnings come at a rate the peers choose. ``RateLimitFilter`` lets through at most
``RATE_LIMIT_BURST`` lines of one kind per ``RATE_LIMIT_WINDOW_S``, counts the rest
and reports them in one ``log-suppressed`` line per kind and window; a kind is the
``EVENT`` (with the ``OUTCOME`` when there is one), so one noisy peer cannot silence
a different kind of event. Only warnings and worse are limited unless a call site says
otherwise (``log_event(…, rate_limited=…)``): one ``call-start`` and one ``call-end``
line per call always reach the log.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Literal, NoReturn, TextIO

import attrs
import trio

FieldValue = str | int | float | bool | None

#: Attribute name on ``logging.LogRecord`` that carries the structured fields.
FIELDS_ATTR = "vb_fields"

#: Attribute name on ``logging.LogRecord`` that overrides the rate-limit rule:
#: ``True`` limits the record whatever its level, ``False`` never limits it. A plain
#: ``logging`` call sets it with ``extra={RATE_LIMIT_ATTR: …}``.
RATE_LIMIT_ATTR = "vb_rate_limited"


#: The one keyword of ``log_event`` that is not a field: the rate-limit override.
RATE_LIMITED_KEYWORD = "rate_limited"


def log_event(
    logger: logging.Logger,
    level: int,
    event: str,
    message: str,
    /,
    **fields: FieldValue,
) -> None:
    """Emit one structured event. Field names are upper-cased; ``None`` values are left out.

    ``rate_limited=`` (``RATE_LIMITED_KEYWORD``) is not a field: it overrides the rule
    that warnings and worse are rate-limited per kind and lesser levels are not (see
    ``RateLimitFilter``). ``True`` for an info line a peer can repeat at will, ``False``
    for a warning that must never be suppressed; anything but a bool is a ``TypeError``.
    """
    rate_limited = fields.pop(RATE_LIMITED_KEYWORD, None)
    if rate_limited is not None and not isinstance(rate_limited, bool):
        raise TypeError(f"rate_limited must be a bool, not {rate_limited!r}")
    if not logger.isEnabledFor(level):
        return
    record_fields: dict[str, FieldValue] = {"EVENT": event}
    for name, value in fields.items():
        if value is not None:
            record_fields[name.upper()] = value
    extra: dict[str, object] = {FIELDS_ATTR: record_fields}
    if rate_limited is not None:
        extra[RATE_LIMIT_ATTR] = rate_limited
    logger.log(level, message, extra=extra, stacklevel=2)


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


# -- peer text ---------------------------------------------------------------------

#: Longest rendered message. The messages voicebridge writes are one sentence (well
#: under 200 characters); one longer than this carries a long peer string, and 1 KiB
#: keeps its start (what the line is about) on an operator's screen.
MAX_MESSAGE_CHARS = 1024

#: Longest rendered field value. Ids (a CallSid is 34 characters), paths and one-line
#: reasons fit several times over; with a dozen fields a line stays around 7 KiB, far
#: below journald's default line limit (``LineMax=48K``) for stream lines.
MAX_FIELD_CHARS = 512

#: Longest kind name (``rate_limit_kind``). Our event names are a few words; a plain
#: record's kind is its message template, whose start tells it apart well enough.
MAX_KIND_CHARS = 120

#: The escapes with a name of their own; every other character ``str.isprintable``
#: refuses (C0 and C1 controls, DEL, line and paragraph separators, bidirectional
#: overrides and other format characters, unassigned code points, lone surrogates)
#: becomes ``\xNN``, ``\uNNNN`` or ``\UNNNNNNNN``. The backslash itself is escaped, so a
#: ``\n`` in a log always stands for a newline that arrived, never for text that looks
#: like one.
_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}


def _escape_char(char: str) -> str:
    named = _NAMED_ESCAPES.get(char)
    if named is not None:
        return named
    if char.isprintable():
        return char
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def truncation_marker(cut: int) -> str:
    """What ends a value of which ``cut`` characters were left out."""
    return f"…[{cut} more chars]"


def escape_text(text: str, limit: int) -> str:
    """``text`` as one safe line: every unprintable character and the backslash escaped.

    The result is at most ``limit`` characters plus a ``truncation_marker`` that says
    how many characters of ``text`` were left out. Printable text without a backslash
    (every message voicebridge writes itself) comes back unchanged. Work is bounded by
    ``limit``, not by the length of ``text``.
    """
    head = text[:limit]
    if head.isprintable() and "\\" not in head:
        return head if len(text) <= limit else head + truncation_marker(len(text) - limit)
    out: list[str] = []
    size = 0
    for index, char in enumerate(head):
        piece = _escape_char(char)
        if size + len(piece) > limit:
            return "".join(out) + truncation_marker(len(text) - index)
        out.append(piece)
        size += len(piece)
    rendered = "".join(out)
    return rendered if len(text) <= limit else rendered + truncation_marker(len(text) - limit)


def escape_lines(text: str) -> str:
    """Multi-line text of our own (a traceback) with its newlines kept.

    Every other unprintable character is escaped as in ``escape_text`` (an exception's
    message may quote a peer); backslashes and the length are left alone: a traceback
    is read by a person, whole.
    """
    if all(line.isprintable() for line in text.split("\n")):
        return text
    return "\n".join(
        "".join(c if c.isprintable() else _escape_char(c) for c in line)
        for line in text.split("\n")
    )


def render_message(record: logging.LogRecord) -> str:
    """The record's message, escaped and bounded (``MAX_MESSAGE_CHARS``)."""
    return escape_text(record.getMessage(), MAX_MESSAGE_CHARS)


def render_value(value: FieldValue) -> str:
    """A field value as safe text: ``format_value``, escaped and bounded (``MAX_FIELD_CHARS``)."""
    return escape_text(format_value(value), MAX_FIELD_CHARS)


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


# -- rate limit --------------------------------------------------------------------

#: Lines of one kind let through per window. Enough to see what is happening (a
#: burst of rejections, their peers and reasons); a flood beyond it says nothing new.
RATE_LIMIT_BURST = 10

#: The window, in seconds. With the burst, at most one line a second per kind on
#: average: journald's default per-service limit (10,000 messages per 30 s) is never
#: reached by a flood, so it never drops genuine entries.
RATE_LIMIT_WINDOW_S = 10.0

#: Kinds tracked at once. voicebridge has a few dozen; the rest of the room is for
#: plain ``logging`` calls, whose kind is their message template. Past it, new kinds
#: share one window (``OVERFLOW_KIND``), so memory stays bounded whatever is logged.
MAX_RATE_LIMIT_KINDS = 256
OVERFLOW_KIND = "(other kinds)"

#: ``EVENT`` of the line that reports suppressed lines.
SUPPRESSED_EVENT = "log-suppressed"

Clock = Callable[[], float]


def rate_limit_kind(record: logging.LogRecord) -> str:
    """What ``record`` is counted as: ``EVENT``, or ``EVENT/OUTCOME`` when it has one.

    The outcome splits ``call-end`` lines of streams that never began: a flood of bad
    tokens (``call-end/token-rejected``) cannot silence streams refused for another
    reason (``call-end/protocol-error``). A plain ``logging`` record counts as its logger
    and message template. Kinds are words of our own, never a peer's: a peer cannot make
    a kind per line.
    """
    fields = record_fields(record)
    event = fields.get("EVENT")
    if event is not None:
        outcome = fields.get("OUTCOME")
        kind = f"{event}/{outcome}" if outcome is not None else str(event)
    else:
        kind = f"{record.name}: {record.msg}"
    return kind[:MAX_KIND_CHARS]


def is_rate_limited(record: logging.LogRecord) -> bool:
    """Whether ``record`` counts against its kind's burst: warnings and worse, unless
    the call site said otherwise (``RATE_LIMIT_ATTR``)."""
    explicit = getattr(record, RATE_LIMIT_ATTR, None)
    if explicit is not None:
        return bool(explicit)
    return record.levelno >= logging.WARNING


@attrs.define
class _Window:
    """One kind's current window."""

    started_at: float
    # Invariant: lines <= burst; suppressed > 0 only once lines == burst.
    lines: int = 0
    suppressed: int = 0


@attrs.frozen
class Suppression:
    """Lines of one kind that a window suppressed: what a ``log-suppressed`` line says."""

    kind: str
    count: int
    #: From the window's start to the report, in seconds.
    over_s: float


class RateLimitFilter(logging.Filter):
    """At most ``burst`` rate-limited lines of one kind per ``window_s``; counts the rest.

    Windows are fixed per kind: the first limited line of a kind opens one; after
    ``burst`` lines, the rest of the window's lines of that kind are suppressed and
    counted. Once a window with suppressed lines is over, one ``log-suppressed``
    warning reports them through ``report`` (the handler the filter sits on): with the
    next record of any kind, or at the latest when ``flush`` is called (the server
    calls it every window: ``run_suppression_reports``). Lines that are not rate-limited
    (``is_rate_limited``) always pass. ``clock`` is ``time.monotonic`` (logging happens
    outside trio too); tests give their own.

    Thread-safe: the counts are taken under a lock, and reports are written outside it.
    """

    def __init__(
        self,
        *,
        burst: int = RATE_LIMIT_BURST,
        window_s: float = RATE_LIMIT_WINDOW_S,
        clock: Clock = time.monotonic,
        report: Callable[[logging.LogRecord], object] | None = None,
    ) -> None:
        super().__init__()
        if burst < 1 or window_s <= 0:
            raise ValueError("a rate limit needs a burst of at least 1 and a positive window")
        self.burst = burst
        self.window_s = window_s
        self.clock = clock
        self.report = report
        self._lock = threading.Lock()
        # Invariant: len(_windows) <= MAX_RATE_LIMIT_KINDS + 1 (the overflow kind).
        self._windows: dict[str, _Window] = {}
        # Invariant: exactly the kinds whose window has suppressed > 0.
        self._pending: set[str] = set()
        self._suppressed: Counter[str] = Counter()

    def suppressed_counts(self) -> dict[str, int]:
        """Lines suppressed since this filter was made, per kind (for a metric)."""
        with self._lock:
            return dict(self._suppressed)

    def filter(self, record: logging.LogRecord) -> bool:
        limited = is_rate_limited(record)
        now = self.clock()
        with self._lock:
            due = self._take_due(now)
            allowed = self._admit(rate_limit_kind(record), now) if limited else True
        self._write(due)
        return allowed

    def flush(self, *, final: bool = False) -> list[Suppression]:
        """Report every window that is over and suppressed lines; all of them if ``final``.

        Returns what it reported. ``final`` is for shutdown: counts not yet reported
        would otherwise be lost with the process.
        """
        now = self.clock()
        with self._lock:
            due = self._take_due(now, final=final)
        self._write(due)
        return due

    def _admit(self, kind: str, now: float) -> bool:
        if kind not in self._windows and len(self._windows) >= MAX_RATE_LIMIT_KINDS:
            self._forget_idle(now)
            if len(self._windows) >= MAX_RATE_LIMIT_KINDS:
                kind = OVERFLOW_KIND
        window = self._windows.get(kind)
        if window is None or now - window.started_at >= self.window_s:
            # An old window's suppressions were reported by _take_due just before.
            window = self._windows[kind] = _Window(started_at=now)
        if window.lines < self.burst:
            window.lines += 1
            return True
        window.suppressed += 1
        self._pending.add(kind)
        self._suppressed[kind] += 1
        return False

    def _forget_idle(self, now: float) -> None:
        """Drop the windows that are over (their suppressions were taken already)."""
        for kind, window in list(self._windows.items()):
            if now - window.started_at >= self.window_s and kind not in self._pending:
                del self._windows[kind]

    def _take_due(self, now: float, *, final: bool = False) -> list[Suppression]:
        due: list[Suppression] = []
        for kind in sorted(self._pending):
            window = self._windows[kind]
            over_s = now - window.started_at
            if final or over_s >= self.window_s:
                due.append(Suppression(kind=kind, count=window.suppressed, over_s=over_s))
                window.suppressed = 0
                if over_s >= self.window_s:
                    del self._windows[kind]
        self._pending.difference_update(s.kind for s in due)
        return due

    def _write(self, due: list[Suppression]) -> None:
        if self.report is None:
            return
        for suppression in due:
            self.report(suppression_record(suppression))


_SUPPRESSION_LOGGER = logging.getLogger(__name__)


def suppression_record(suppression: Suppression) -> logging.LogRecord:
    """The ``log-suppressed`` warning for ``suppression`` (itself never rate-limited)."""
    fields: dict[str, FieldValue] = {
        "EVENT": SUPPRESSED_EVENT,
        "SUPPRESSED_KIND": suppression.kind,
        "SUPPRESSED": suppression.count,
        "SUPPRESSED_OVER_S": round(suppression.over_s, 1),
    }
    return _SUPPRESSION_LOGGER.makeRecord(
        _SUPPRESSION_LOGGER.name,
        logging.WARNING,
        __file__,
        0,
        "event %s: %d more suppressed in the last %.0f s",
        (suppression.kind, suppression.count, suppression.over_s),
        None,
        func="RateLimitFilter",
        extra={FIELDS_ATTR: fields, RATE_LIMIT_ATTR: False},
    )


def installed_rate_limiter() -> RateLimitFilter | None:
    """The rate limiter ``configure_logging`` put on the ``voicebridge`` handler, if any."""
    for handler in logging.getLogger("voicebridge").handlers:
        for candidate in handler.filters:
            if isinstance(candidate, RateLimitFilter):
                return candidate
    return None


def suppressed_counts() -> dict[str, int]:
    """Log lines suppressed so far per kind by the installed rate limiter (for a metric).

    Cumulative since ``configure_logging``; empty when logging was not configured.
    """
    limiter = installed_rate_limiter()
    return {} if limiter is None else limiter.suppressed_counts()


async def run_suppression_reports() -> NoReturn:
    """Every window, report the windows that are over (``RateLimitFilter.flush``).

    Without it, a window's suppressed lines would wait for the next log line of any
    kind; with it, they are reported within a window of the window's end. Follows
    whatever rate limiter ``configure_logging`` installed last (none: it only waits).
    Runs until cancelled; cancellation (the server stopping) reports every count still
    pending, even of a window that is not over, so none is lost with the process.
    """
    try:
        while True:
            limiter = installed_rate_limiter()
            await trio.sleep(RATE_LIMIT_WINDOW_S if limiter is None else limiter.window_s)
            limiter = installed_rate_limiter()
            if limiter is not None:
                limiter.flush()
    finally:
        limiter = installed_rate_limiter()
        if limiter is not None:
            limiter.flush(final=True)


#: What starts every line of a text record after its first (a traceback's lines): a
#: line that does not start with it is the start of a record, whatever a peer put
#: into an exception's message.
CONTINUATION_INDENT = "  "


class TextFormatter(logging.Formatter):
    """One readable line per event: ``LEVEL logger: message KEY=value …``.

    The message and the values are escaped (``escape_text``); a value that is empty or
    holds a space or a double quote is quoted. A traceback follows on lines of its own,
    each indented by ``CONTINUATION_INDENT``.
    """

    def format(self, record: logging.LogRecord) -> str:
        parts = [f"{record.levelname:<7} {record.name}: {render_message(record)}"]
        for name, value in record_fields(record).items():
            if name == "EVENT" or value is None:
                continue
            text = render_value(value)
            if not text or " " in text or '"' in text:
                text = '"' + text.replace('"', '\\"') + '"'
            parts.append(f"{escape_text(name, MAX_FIELD_CHARS)}={text}")
        lines = [" ".join(parts)]
        if record.exc_info:
            if not record.exc_text:
                record.exc_text = self.formatException(record.exc_info)
            lines += escape_lines(record.exc_text).split("\n")
        if record.stack_info:
            lines += escape_lines(record.stack_info).split("\n")
        return f"\n{CONTINUATION_INDENT}".join(lines)


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
    #: Limits repeated warnings per kind; ``rate_limiter.suppressed_counts()`` for a metric.
    rate_limiter: RateLimitFilter
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
    rate_limit_burst: int = RATE_LIMIT_BURST,
    rate_limit_window_s: float = RATE_LIMIT_WINDOW_S,
    clock: Clock = time.monotonic,
) -> LoggingSetup:
    """Route the ``voicebridge`` loggers to journald or to stderr; returns what it did.

    ``target="auto"`` writes native journal entries when journald is reachable
    (``$JOURNAL_STREAM`` names ``stderr``, or the journal socket exists) and text lines
    on ``stderr`` otherwise — and always text lines when ``stderr`` is a terminal: someone
    running ``voicebridge`` by hand is watching it, even on a box with journald.
    ``"journal"`` and ``"stderr"`` force one or the other.
    Text lines get ``<N>`` priority prefixes when ``stderr`` is a journal stream. If
    journald disappears later, journal entries fall back to those text lines.
    Every record passes a ``RateLimitFilter`` (``rate_limit_burst`` lines of a kind per
    ``rate_limit_window_s``, timed by ``clock``) and a ``SecretFieldFilter``.
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
    rate_limiter = RateLimitFilter(
        burst=rate_limit_burst, window_s=rate_limit_window_s, clock=clock, report=handler.handle
    )
    # The rate limit first: a suppressed line costs no more than its count.
    handler.addFilter(rate_limiter)
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
        rate_limiter=rate_limiter,
        priority_prefix=prefix,
    )
