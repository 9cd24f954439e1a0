"""A ``logging`` handler that writes native journal entries to systemd-journald.

It speaks the journal's native protocol: one ``AF_UNIX`` datagram per entry to
``/run/systemd/journal/socket``, each field either ``KEY=value\\n`` or, when the value
contains a newline, ``KEY\\n`` + 64-bit little-endian length + value + ``\\n``. An entry
too big for one datagram is written to a sealed ``memfd`` whose descriptor is passed
with ``SCM_RIGHTS`` (journald reads the entry from it); if a memfd cannot be made, the
oversized values are truncated and the entry carries ``VB_TRUNCATED=<field names>``.

Every entry has ``MESSAGE``, ``PRIORITY``, ``SYSLOG_IDENTIFIER``, ``CODE_FILE``,
``CODE_LINE``, ``CODE_FUNC``, ``LOGGER``, the record's structured fields
(``record.vb_fields``, see :mod:`voicebridge.observability.logs`) and, when the record
carries an exception, ``EXCEPTION_TYPE`` and ``EXCEPTION_TEXT``. The message and the
field values are escaped and bounded exactly as on stderr (``render_message``,
``render_value``): a peer's newline or escape sequence is stored as visible text, so
``journalctl`` shows one line where the peer sent two. Only a traceback keeps its newlines.

The handler never blocks the event loop: the socket is non-blocking, and an entry
journald has no room for (its receive queue is full) is dropped and counted; the next
entry that gets through is followed by a warning entry saying how many were lost.
When the socket is gone altogether (journald stopped), entries fall back to text
lines on stderr so nothing is lost silently.
"""

from __future__ import annotations

import array
import errno
import fcntl
import logging
import os
import re
import socket
import stat
import struct
import sys
from collections.abc import Iterable, Mapping
from typing import Literal, TextIO

from voicebridge.observability.logs import (
    FieldValue,
    escape_lines,
    record_fields,
    render_message,
    render_value,
    syslog_priority,
)

#: Where journald listens for native-protocol datagrams.
JOURNAL_SOCKET = "/run/systemd/journal/socket"

#: ``SYSLOG_IDENTIFIER`` of every entry unless the handler is told otherwise.
DEFAULT_IDENTIFIER = "voicebridge"

#: journald's limit on a field name's length.
MAX_FIELD_NAME = 64

#: When no memfd can be made, each value longer than this is cut to this many bytes.
#: 32 KiB keeps a whole entry well under the default 208 KiB socket send buffer.
TRUNCATED_VALUE_BYTES = 32 * 1024

#: Fields the handler writes itself; a structured field of the same name is renamed
#: with ``FIELD_RENAME_PREFIX`` so it can neither forge nor duplicate them.
RESERVED_FIELDS = frozenset(
    {
        "MESSAGE",
        "PRIORITY",
        "SYSLOG_IDENTIFIER",
        "CODE_FILE",
        "CODE_LINE",
        "CODE_FUNC",
        "LOGGER",
        "EXCEPTION_TYPE",
        "EXCEPTION_TEXT",
        "VB_TRUNCATED",
        "VB_DROPPED",
    }
)
FIELD_RENAME_PREFIX = "F_"

_INVALID_NAME_CHARS = re.compile(r"[^A-Z0-9_]")
_LENGTH = struct.Struct("<Q")
#: What became of one entry: delivered, dropped (queue full), or journald unreachable.
_Outcome = Literal["sent", "dropped", "unreachable"]

_MEMFD_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL


def journal_field_name(name: str) -> str | None:
    """``name`` made into a valid user field name for journald, or ``None`` to drop it.

    Deterministic: upper-cased; every character outside ``[A-Z0-9_]`` becomes ``_``;
    leading underscores (reserved for journald's trusted fields) are stripped; a name
    starting with a digit, or one the handler writes itself (``RESERVED_FIELDS``), gets
    the ``F_`` prefix; the result is cut to 64 characters. An empty result is dropped.
    """
    fixed = _INVALID_NAME_CHARS.sub("_", name.upper()).lstrip("_")
    if not fixed:
        return None
    if fixed[0].isdigit() or fixed in RESERVED_FIELDS:
        fixed = FIELD_RENAME_PREFIX + fixed
    return fixed[:MAX_FIELD_NAME]


def encode_entry(fields: Iterable[tuple[str, str | bytes]]) -> bytes:
    """Serialize fields in the journal's native protocol (names must already be valid)."""
    chunks: list[bytes] = []
    for name, value in fields:
        data = value.encode("utf-8", "replace") if isinstance(value, str) else value
        key = name.encode("ascii")
        if b"\n" in data:
            chunks += [key, b"\n", _LENGTH.pack(len(data)), data, b"\n"]
        else:
            chunks += [key, b"=", data, b"\n"]
    return b"".join(chunks)


def stream_identity(stream: TextIO) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of the file behind ``stream``, or ``None`` if it has none."""
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return None
    return st.st_dev, st.st_ino


def is_journal_stream(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """True if ``stream`` is the journal stream systemd named in ``$JOURNAL_STREAM``.

    systemd sets ``JOURNAL_STREAM=<st_dev>:<st_ino>`` for a service whose stdout or
    stderr is connected to journald; a child that inherited the variable but not the
    stream sees a different identity and gets ``False``.
    """
    env = os.environ if environ is None else environ
    value = env.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    return stream_identity(stream) == (int(dev), int(ino))


def journald_available(
    environ: Mapping[str, str] | None = None,
    *,
    stderr: TextIO | None = None,
    socket_path: str = JOURNAL_SOCKET,
) -> bool:
    """True when native journal logging should be used.

    That is when ``$JOURNAL_STREAM`` names our stderr (we run under systemd with
    stderr going to the journal) or journald's native socket exists.
    """
    if is_journal_stream(sys.stderr if stderr is None else stderr, environ):
        return True
    try:
        return stat.S_ISSOCK(os.stat(socket_path).st_mode)
    except OSError:
        return False


class JournaldHandler(logging.Handler):
    """Writes each record as one native journal entry; see the module docstring.

    ``dropped`` counts entries lost because journald's queue was full (or an entry
    could not be sent at all); ``fallbacks`` counts entries written to ``fallback``
    (stderr by default) because the journal socket was unreachable.
    """

    def __init__(
        self,
        level: int = logging.NOTSET,
        *,
        socket_path: str = JOURNAL_SOCKET,
        identifier: str = DEFAULT_IDENTIFIER,
        fallback: logging.Handler | None = None,
    ) -> None:
        super().__init__(level)
        self.socket_path = socket_path
        self.identifier = identifier
        self.dropped = 0
        self.fallbacks = 0
        # Invariant: dropped entries not yet reported in a VB_DROPPED warning entry.
        self._unreported_drops = 0
        self._fallback = fallback
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.setblocking(False)

    # -- building an entry -------------------------------------------------------

    def entry_fields(self, record: logging.LogRecord) -> list[tuple[str, str]]:
        """The fields of the journal entry for ``record``, in write order."""
        message = render_message(record)
        exception_text = ""
        if record.exc_info and record.exc_info[0] is not None:
            exception_text = escape_lines(self._exception_text(record))
            message = f"{message}\n{exception_text}"
        if record.stack_info:
            message = f"{message}\n{escape_lines(record.stack_info)}"
        fields: list[tuple[str, str]] = [
            ("MESSAGE", message),
            ("PRIORITY", str(syslog_priority(record.levelno))),
            ("SYSLOG_IDENTIFIER", self.identifier),
            ("LOGGER", record.name),
            ("CODE_FILE", record.pathname),
            ("CODE_LINE", str(record.lineno)),
            ("CODE_FUNC", record.funcName),
        ]
        if exception_text:
            exc_type = record.exc_info[0] if record.exc_info else None
            if exc_type is not None:
                fields.append(("EXCEPTION_TYPE", f"{exc_type.__module__}.{exc_type.__qualname__}"))
            fields.append(("EXCEPTION_TEXT", exception_text))
        fields += _structured_fields(record_fields(record))
        return fields

    def _exception_text(self, record: logging.LogRecord) -> str:
        if not record.exc_text and record.exc_info:
            formatter = self.formatter or logging.Formatter()
            record.exc_text = formatter.formatException(record.exc_info)
        return record.exc_text or ""

    # -- sending -----------------------------------------------------------------

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = self.entry_fields(record)
            payload = encode_entry(fields)
        except Exception:
            self.handleError(record)
            return
        outcome = self._send(payload, fields)
        if outcome == "sent":
            self._report_drops()
        elif outcome == "unreachable":
            self._fall_back(record)

    def _send(self, payload: bytes, fields: list[tuple[str, str]] | None) -> _Outcome:
        """Send one entry without blocking.

        ``fields`` (the entry before encoding) is only needed if the entry is too big
        for a datagram and no memfd can be made: it is then truncated and re-sent.
        """
        try:
            self._sock.sendto(payload, self.socket_path)
            return "sent"
        except BlockingIOError:
            self._count_drop()
            return "dropped"
        except OSError as exc:
            if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                return "unreachable"
        return self._send_large(payload, fields)

    def _send_large(self, payload: bytes, fields: list[tuple[str, str]] | None) -> _Outcome:
        try:
            fd = _sealed_memfd(payload)
        except OSError:
            if fields is None:
                self._count_drop()
                return "dropped"
            truncated = encode_entry(_truncate(fields))
            return self._send(truncated, None)
        try:
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
            self._sock.sendmsg([], rights, 0, self.socket_path)
            return "sent"
        except BlockingIOError:
            self._count_drop()
            return "dropped"
        except OSError:
            return "unreachable"
        finally:
            os.close(fd)

    def _count_drop(self) -> None:
        self.dropped += 1
        self._unreported_drops += 1

    def _report_drops(self) -> None:
        if not self._unreported_drops:
            return
        count = self._unreported_drops
        payload = encode_entry(
            [
                ("MESSAGE", f"journald queue was full: {count} log entries were dropped"),
                ("PRIORITY", "4"),
                ("SYSLOG_IDENTIFIER", self.identifier),
                ("LOGGER", __name__),
                ("EVENT", "log-entries-dropped"),
                ("VB_DROPPED", str(count)),
            ]
        )
        try:
            self._sock.sendto(payload, self.socket_path)
        except OSError:
            return  # still congested: report with the next entry that gets through
        self._unreported_drops = 0

    def _fall_back(self, record: logging.LogRecord) -> None:
        if self._fallback is None:
            self._count_drop()
            return
        self.fallbacks += 1
        self._fallback.handle(record)

    def close(self) -> None:
        try:
            self._sock.close()
        finally:
            super().close()


def _structured_fields(fields: Mapping[str, FieldValue]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for name, value in fields.items():
        if value is None:
            continue
        valid = journal_field_name(name)
        if valid is not None:
            out.append((valid, render_value(value)))
    return out


def _truncate(fields: list[tuple[str, str]]) -> list[tuple[str, str]]:
    cut: list[str] = []
    out: list[tuple[str, str]] = []
    for name, value in fields:
        data = value.encode("utf-8", "replace")
        if len(data) > TRUNCATED_VALUE_BYTES:
            value = data[:TRUNCATED_VALUE_BYTES].decode("utf-8", "ignore") + "…[truncated]"
            cut.append(name)
        out.append((name, value))
    out.append(("VB_TRUNCATED", ",".join(cut)))
    return out


def _sealed_memfd(payload: bytes) -> int:
    """A memfd holding ``payload``, sealed against any change, as journald requires."""
    fd = os.memfd_create("journal-entry", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(payload)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _MEMFD_SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd
