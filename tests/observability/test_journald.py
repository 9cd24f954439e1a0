"""Native journald logging, read back from a real systemd-journald.

Charter: entries go to a private journald namespace (``private_journal``, see
tests/journald_fixture.py) and are read back with ``journalctl -o json`` by a
``CALL_SID`` unique to the test, so tests never see each other's entries. Behaviour
that needs a misbehaving journald (full queue, socket gone) runs against a plain
datagram socket the test owns. No test sleeps: journal queries poll with a deadline.
"""

from __future__ import annotations

import errno
import inspect
import logging
import os
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import journald_fixture
from tests.journald_fixture import PrivateJournal
from voicebridge.observability import journald
from voicebridge.observability.journald import (
    JournaldHandler,
    journal_field_name,
    journald_available,
)
from voicebridge.observability.logs import (
    MAX_FIELD_CHARS,
    MAX_MESSAGE_CHARS,
    LoggingSetup,
    configure_logging,
    is_secret_field,
    log_event,
)

#: The real journald this module's tests write to (see tests/journald_fixture.py).
private_journal = journald_fixture.private_journal

#: A journal entry as journalctl's JSON output gives it.
Entry = dict[str, str]


@pytest.fixture
def call_sid() -> str:
    """A CallSid no other test (or earlier run) uses: the key to read our entries back."""
    return "CA" + secrets.token_hex(16)


@pytest.fixture
def logger() -> Iterator[logging.Logger]:
    """A child of the ``voicebridge`` logger; the parent's setup is restored afterwards."""
    with journald_fixture.saved_voicebridge_logging():
        yield logging.getLogger("voicebridge.test")


@pytest.fixture
def journal_logging(private_journal: PrivateJournal, logger: logging.Logger) -> LoggingSetup:
    """``configure_logging`` writing native entries to the private journal."""
    return configure_logging(
        logging.DEBUG, target="journal", journal_socket=private_journal.socket_path
    )


def one_entry(journal: PrivateJournal, call_sid: str) -> Entry:
    [entry] = journal.entries(f"CALL_SID={call_sid}")
    return entry


# -- what an operator queries -------------------------------------------------------


def test_call_end_event_is_one_entry_with_its_fields(
    private_journal: PrivateJournal,
    journal_logging: LoggingSetup,
    logger: logging.Logger,
    call_sid: str,
) -> None:
    assert journal_logging.target == "journal"
    frame = inspect.currentframe()
    assert frame is not None
    line = frame.f_lineno + 1  # the log_event call below: CODE_LINE names the caller
    log_event(
        logger,
        logging.WARNING,
        "call-end",
        "call ended: assistant leg failed",
        call_sid=call_sid,
        stream_sid="MZ0123",
        vapi_call_id="vapi-42",
        outcome="assistant-leg-failed",
        duration_s=12.5,
        barge_ins=3,
        answered=True,
    )

    entry = one_entry(private_journal, call_sid)
    assert entry["MESSAGE"] == "call ended: assistant leg failed"
    assert entry["PRIORITY"] == "4"
    assert entry["SYSLOG_IDENTIFIER"] == "voicebridge"
    assert entry["LOGGER"] == "voicebridge.test"
    assert entry["EVENT"] == "call-end"
    assert entry["CALL_SID"] == call_sid
    assert entry["STREAM_SID"] == "MZ0123"
    assert entry["VAPI_CALL_ID"] == "vapi-42"
    assert entry["OUTCOME"] == "assistant-leg-failed"
    assert entry["DURATION_S"] == "12.5"
    assert entry["BARGE_INS"] == "3"
    assert entry["ANSWERED"] == "true"
    assert entry["CODE_FILE"] == __file__
    assert entry["CODE_FUNC"] == "test_call_end_event_is_one_entry_with_its_fields"
    assert int(entry["CODE_LINE"]) == line
    assert entry["_TRANSPORT"] == "journal"

    # The operator's other query: every failure, by outcome.
    by_outcome = private_journal.entries("OUTCOME=assistant-leg-failed", f"CALL_SID={call_sid}")
    assert [e["EVENT"] for e in by_outcome] == ["call-end"]


@pytest.mark.parametrize(
    ("level", "priority"),
    [
        (logging.DEBUG, "7"),
        (logging.INFO, "6"),
        (logging.WARNING, "4"),
        (logging.ERROR, "3"),
        (logging.CRITICAL, "2"),
    ],
)
def test_priority_follows_the_logging_level(
    private_journal: PrivateJournal,
    journal_logging: LoggingSetup,
    logger: logging.Logger,
    call_sid: str,
    level: int,
    priority: str,
) -> None:
    log_event(logger, level, "level-check", "level check", call_sid=call_sid)
    assert one_entry(private_journal, call_sid)["PRIORITY"] == priority


def test_peer_text_is_stored_escaped_in_message_and_fields(
    private_journal: PrivateJournal,
    journal_logging: LoggingSetup,
    logger: logging.Logger,
    call_sid: str,
) -> None:
    # What a peer may put into a CallSid: a line of its own and a terminal sequence.
    peer = "CAx\nWARNING voicebridge.web: forged\r\x1b[2J\u2028\x85\\n"
    log_event(
        logger,
        logging.WARNING,
        "stream-refused",
        f"stream {peer} refused",
        call_sid=call_sid,
        claimed=peer,
    )
    entry = one_entry(private_journal, call_sid)
    shown = r"CAx\nWARNING voicebridge.web: forged\r\x1b[2J\u2028\x85\\n"
    assert entry["MESSAGE"] == f"stream {shown} refused"
    assert entry["CLAIMED"] == shown
    assert entry["MESSAGE"].isprintable()


def test_long_peer_text_is_cut_with_a_marker(
    private_journal: PrivateJournal,
    journal_logging: LoggingSetup,
    logger: logging.Logger,
    call_sid: str,
) -> None:
    long = "z" * 100_000
    log_event(logger, logging.INFO, "long", f"start {long}", call_sid=call_sid, note=long)
    entry = one_entry(private_journal, call_sid)
    kept = MAX_MESSAGE_CHARS - len("start ")
    assert entry["MESSAGE"] == "start " + "z" * kept + f"…[{len(long) - kept} more chars]"
    assert entry["NOTE"] == "z" * MAX_FIELD_CHARS + f"…[{len(long) - MAX_FIELD_CHARS} more chars]"


def test_exception_goes_into_fields_and_message(
    private_journal: PrivateJournal,
    journal_logging: LoggingSetup,
    logger: logging.Logger,
    call_sid: str,
) -> None:
    try:
        raise ZeroDivisionError("no audio frames to average")
    except ZeroDivisionError:
        logger.exception("figures failed", extra={"vb_fields": {"CALL_SID": call_sid}})
    entry = one_entry(private_journal, call_sid)
    assert entry["PRIORITY"] == "3"
    assert entry["EXCEPTION_TYPE"] == "builtins.ZeroDivisionError"
    assert entry["EXCEPTION_TEXT"].startswith("Traceback (most recent call last):")
    assert entry["EXCEPTION_TEXT"].endswith("ZeroDivisionError: no audio frames to average")
    assert entry["MESSAGE"] == "figures failed\n" + entry["EXCEPTION_TEXT"]


def _larger_than_a_datagram() -> int:
    """A size no single datagram can carry here, so the memfd path must be taken."""
    try:
        default_sndbuf = int(Path("/proc/sys/net/core/wmem_default").read_text())
    except OSError:
        default_sndbuf = 212_992
    return max(250_000, 2 * default_sndbuf)


def _log_with_a_long_traceback(logger: logging.Logger, call_sid: str, text: str) -> None:
    """A traceback is the one part of an entry that is not cut to a bound."""
    try:
        raise ValueError(text)
    except ValueError:
        logger.exception("figures failed", extra={"vb_fields": {"CALL_SID": call_sid}})


def test_large_entry_travels_by_sealed_memfd(
    private_journal: PrivateJournal,
    journal_logging: LoggingSetup,
    logger: logging.Logger,
    call_sid: str,
) -> None:
    size = _larger_than_a_datagram()
    text = "\n".join(f"{i:08d}" for i in range(size // 9 + 1))
    _log_with_a_long_traceback(logger, call_sid, text)
    entry = one_entry(private_journal, call_sid)
    assert len(entry["EXCEPTION_TEXT"]) > len(text) > 200_000
    assert entry["EXCEPTION_TEXT"].endswith("ValueError: " + text)
    assert entry["MESSAGE"] == "figures failed\n" + entry["EXCEPTION_TEXT"]
    assert "VB_TRUNCATED" not in entry


def test_large_entry_is_truncated_when_no_memfd_can_be_made(
    private_journal: PrivateJournal,
    journal_logging: LoggingSetup,
    logger: logging.Logger,
    call_sid: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_memfd(name: str, flags: int = 0) -> int:
        raise OSError(errno.ENOSYS, "memfd_create blocked")

    monkeypatch.setattr(os, "memfd_create", no_memfd)
    _log_with_a_long_traceback(logger, call_sid, "y" * _larger_than_a_datagram())
    entry = one_entry(private_journal, call_sid)
    assert entry["VB_TRUNCATED"] == "MESSAGE,EXCEPTION_TEXT"
    for name in ("MESSAGE", "EXCEPTION_TEXT"):
        kept, marker = entry[name].encode(), "…[truncated]".encode()
        assert len(kept) == journald.TRUNCATED_VALUE_BYTES + len(marker)
        assert entry[name].endswith("y…[truncated]")


def test_invalid_field_names_are_renamed_deterministically(
    private_journal: PrivateJournal,
    journal_logging: LoggingSetup,
    logger: logging.Logger,
    call_sid: str,
) -> None:
    long_name = "X" * 70
    fields = {
        "CALL_SID": call_sid,
        "_PID": "forged",  # journald's trusted fields start with "_"
        "MESSAGE": "forged message",  # the handler's own field
        "9LIVES": 9,
        "twilio.account": "AC1",
        long_name: "long",
        "___": "nothing left",
    }
    logger.info("renames", extra={"vb_fields": fields})
    entry = one_entry(private_journal, call_sid)
    assert entry["PID"] == "forged"
    assert entry["_PID"] != "forged"
    assert entry["MESSAGE"] == "renames"
    assert entry["F_MESSAGE"] == "forged message"
    assert entry["F_9LIVES"] == "9"
    assert entry["TWILIO_ACCOUNT"] == "AC1"
    assert entry["X" * 64] == "long"
    assert "nothing left" not in entry.values()


def test_field_name_rule() -> None:
    assert journal_field_name("call_sid") == "CALL_SID"
    assert journal_field_name("__x-y") == "X_Y"
    assert journal_field_name("PRIORITY") == "F_PRIORITY"
    assert journal_field_name("1st") == "F_1ST"
    assert journal_field_name("_") is None
    assert journal_field_name("a" * 100) == "A" * 64


# -- secrets ------------------------------------------------------------------------

SECRET_FIELDS = {
    "websocket_url": "wss://phone-call-websocket.example/4e1c/transport",
    "vapi_websocket_call_url": "wss://phone-call-websocket.example/9f3a/transport",
    "api_key": "vapi-private-key-0123",
    "twilio_auth_token": "twilio-token-4567",
    "stream_token": "v1.CA.1700000000.c2lnbmF0dXJl",
    "secret": "stream-token-secret-89ab",
}


def test_denylisted_fields_never_reach_the_journal(
    private_journal: PrivateJournal,
    journal_logging: LoggingSetup,
    logger: logging.Logger,
    call_sid: str,
) -> None:
    log_event(
        logger, logging.INFO, "vapi-leg-open", "vapi leg open", call_sid=call_sid, **SECRET_FIELDS
    )
    entry = one_entry(private_journal, call_sid)
    stored = "\n".join(f"{k}={v}" for k, v in entry.items())
    for value in SECRET_FIELDS.values():
        assert value not in stored
    refused = sorted(name.upper() for name in SECRET_FIELDS)
    assert entry["VB_REFUSED_FIELDS"] == ",".join(refused)
    assert dict(journal_logging.secret_filter.refused) == dict.fromkeys(refused, 1)
    assert entry["EVENT"] == "vapi-leg-open"


def test_denylisted_fields_never_reach_stderr(logger: logging.Logger, tmp_path: Path) -> None:
    with (tmp_path / "stderr").open("w+") as stderr:
        setup = configure_logging(logging.INFO, target="stderr", environ={}, stderr=stderr)
        log_event(logger, logging.INFO, "vapi-leg-open", "vapi leg open", **SECRET_FIELDS)
        stderr.seek(0)
        text = stderr.read()
    assert setup.target == "stderr"
    for value in SECRET_FIELDS.values():
        assert value not in text
    assert "VB_REFUSED_FIELDS=" in text


def test_secret_rule_is_by_whole_name_suffix() -> None:
    for name in ("TOKEN", "stream_token", "VAPI_API_KEY", "auth_token", "WEBSOCKET_URL", "api-key"):
        assert is_secret_field(name), name
    for name in ("CALL_SID", "TOKEN_AGE_MS", "STATUS_CALLBACK_URL", "TOKENS", "OUTCOME"):
        assert not is_secret_field(name), name


# -- stderr: the fallback, and the <N> prefixes on a journal stream ----------------


def journal_stream_env(path: Path) -> dict[str, str]:
    st = path.stat()
    return {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}


def test_stderr_lines_without_journal_stream_have_no_prefix(
    logger: logging.Logger, tmp_path: Path
) -> None:
    path = tmp_path / "stderr"
    with path.open("w+") as stderr:
        setup = configure_logging(
            logging.INFO,
            environ={},
            stderr=stderr,
            journal_socket=str(tmp_path / "no-journald"),
        )
        log_event(logger, logging.WARNING, "call-end", "call ended", call_sid="CA1", outcome="ok")
    assert (setup.target, setup.priority_prefix) == ("stderr", False)
    assert path.read_text() == "WARNING voicebridge.test: call ended CALL_SID=CA1 OUTCOME=ok\n"


def test_stderr_lines_on_a_journal_stream_carry_priority_prefixes(
    logger: logging.Logger, tmp_path: Path
) -> None:
    path = tmp_path / "stderr"
    path.touch()
    with path.open("w+") as stderr:
        setup = configure_logging(
            logging.DEBUG, target="stderr", environ=journal_stream_env(path), stderr=stderr
        )
        log_event(logger, logging.INFO, "call-start", "call started", call_sid="CA2")
        try:
            raise RuntimeError("vapi said no")
        except RuntimeError:
            logger.exception("vapi leg failed")
    assert (setup.target, setup.priority_prefix) == ("stderr", True)
    lines = path.read_text().splitlines()
    assert lines[0] == "<6>INFO    voicebridge.test: call started CALL_SID=CA2"
    assert lines[1] == "<3>ERROR   voicebridge.test: vapi leg failed"
    # The traceback's lines are indented: only a record starts a line at the prefix.
    assert lines[2] == "<3>  Traceback (most recent call last):"
    assert lines[-1] == "<3>  RuntimeError: vapi said no"
    assert all(line.startswith("<3>  ") for line in lines[2:])


def test_journal_stream_of_another_file_is_not_ours(logger: logging.Logger, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.touch()
    with (tmp_path / "stderr").open("w+") as stderr:
        setup = configure_logging(
            logging.INFO,
            environ=journal_stream_env(other),
            stderr=stderr,
            journal_socket=str(tmp_path / "no-journald"),
        )
    assert (setup.target, setup.priority_prefix) == ("stderr", False)


def test_auto_prefers_the_journal_when_stderr_is_a_journal_stream(
    private_journal: PrivateJournal, logger: logging.Logger, tmp_path: Path, call_sid: str
) -> None:
    path = tmp_path / "stderr"
    path.touch()
    with path.open("w+") as stderr:
        setup = configure_logging(
            logging.INFO,
            environ=journal_stream_env(path),
            stderr=stderr,
            journal_socket=private_journal.socket_path,
        )
        log_event(logger, logging.INFO, "call-start", "call started", call_sid=call_sid)
    assert setup.target == "journal"
    assert one_entry(private_journal, call_sid)["MESSAGE"] == "call started"
    assert path.read_text() == ""


def test_auto_writes_text_to_a_terminal_even_with_journald(
    private_journal: PrivateJournal, logger: logging.Logger
) -> None:
    controller, terminal = os.openpty()
    try:
        with os.fdopen(terminal, "w", closefd=False) as stderr:
            setup = configure_logging(
                logging.INFO, environ={}, stderr=stderr, journal_socket=private_journal.socket_path
            )
            log_event(logger, logging.INFO, "call-start", "call started", call_sid="CA3")
        assert setup.target == "stderr"
        assert (
            os.read(controller, 4096) == b"INFO    voicebridge.test: call started CALL_SID=CA3\r\n"
        )
    finally:
        os.close(terminal)
        os.close(controller)


def test_journald_available(private_journal: PrivateJournal, tmp_path: Path) -> None:
    path = tmp_path / "stderr"
    path.touch()
    missing = str(tmp_path / "no-journald")
    with path.open("w") as stderr:
        assert journald_available({}, stderr=stderr, socket_path=private_journal.socket_path)
        assert not journald_available({}, stderr=stderr, socket_path=missing)
        assert journald_available(journal_stream_env(path), stderr=stderr, socket_path=missing)
        assert not journald_available(
            {"JOURNAL_STREAM": "garbage"}, stderr=stderr, socket_path=missing
        )
    # A regular file is not a socket.
    assert not journald_available({}, stderr=None, socket_path=str(path))


# -- a journald that cannot keep up, or is gone -------------------------------------


def parse_datagram(data: bytes) -> dict[str, str]:
    """The fields of a native-protocol datagram with only ``KEY=value`` lines."""
    return dict(line.split("=", 1) for line in data.decode().splitlines())


def test_full_queue_drops_and_counts_then_reports(tmp_path: Path) -> None:
    address = str(tmp_path / "journal.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(address)
        handler = JournaldHandler(socket_path=address)
        log = logging.getLogger("voicebridge.test.full-queue")
        log.propagate = False
        log.addHandler(handler)
        try:
            # Nobody reads the receiver: its queue fills up and sending must not block.
            sent = 0
            while handler.dropped < 5:
                log.warning("entry %d", sent)
                sent += 1
                assert sent < 100_000, "the queue never filled up"
            queued = sent - handler.dropped

            receiver.setblocking(False)
            received = [parse_datagram(receiver.recv(65536)) for _ in range(queued)]
            with pytest.raises(BlockingIOError):
                receiver.recv(65536)
            assert [e["MESSAGE"] for e in received] == [f"entry {i}" for i in range(queued)]

            log.warning("after the congestion")
            after = parse_datagram(receiver.recv(65536))
            report = parse_datagram(receiver.recv(65536))
        finally:
            log.removeHandler(handler)
            handler.close()
    assert after["MESSAGE"] == "after the congestion"
    assert report["VB_DROPPED"] == "5"
    assert report["PRIORITY"] == "4"
    assert report["EVENT"] == "log-entries-dropped"
    assert handler.dropped == 5


def test_vanished_journald_falls_back_to_stderr_text(
    logger: logging.Logger, tmp_path: Path
) -> None:
    path = tmp_path / "stderr"
    with path.open("w+") as stderr:
        setup = configure_logging(
            logging.INFO,
            target="journal",
            environ={},
            stderr=stderr,
            journal_socket=str(tmp_path / "gone"),
        )
        log_event(logger, logging.ERROR, "call-end", "call ended", outcome="error")
    assert isinstance(setup.handler, JournaldHandler)
    assert setup.handler.fallbacks == 1
    assert path.read_text() == "ERROR   voicebridge.test: call ended OUTCOME=error\n"
