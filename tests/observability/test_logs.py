"""Log hygiene: peer text escaped in every text line, repeated warnings rate-limited.

Charter: lines are written by ``configure_logging`` to a file standing in for stderr
and read back as an operator would (``splitlines``). The rate limit runs on an
injected clock (``FakeClock``: the test sets the time) or on trio's ``autojump_clock``
for the periodic report: exact times, no sleeping. Native journal entries are tested
against a real journald in test_journald.py; attacks through the real server from
another process in test_hostile_peers.py.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import attrs
import pytest
import trio
import trio.testing

from tests import journald_fixture
from voicebridge.observability.logs import (
    MAX_FIELD_CHARS,
    MAX_MESSAGE_CHARS,
    MAX_RATE_LIMIT_KINDS,
    LoggingSetup,
    configure_logging,
    escape_text,
    log_event,
    run_suppression_reports,
    suppressed_counts,
)

#: What a peer may put into any string it sends: a line of its own, and terminal
#: sequences (clear the screen, a colour, a carriage return hiding what came before).
FORGED = "CAx\nWARNING voicebridge.web: forged line\r\x1b[2J\x1b[31m"
FORGED_SHOWN = r"CAx\nWARNING voicebridge.web: forged line\r\x1b[2J\x1b[31m"


@attrs.define
class FakeClock:
    """A clock the test moves by hand."""

    now: float = 0.0

    def __call__(self) -> float:
        return self.now


@attrs.frozen
class Output:
    """Where ``configure_logging`` writes, and how to read it back."""

    path: Path
    setup: LoggingSetup

    def lines(self) -> list[str]:
        return self.path.read_text().splitlines()


@pytest.fixture
def logger() -> Iterator[logging.Logger]:
    with journald_fixture.saved_voicebridge_logging():
        yield logging.getLogger("voicebridge.test")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def stderr(tmp_path: Path) -> Iterator[TextIO]:
    with (tmp_path / "stderr").open("w", buffering=1) as stream:
        yield stream


@pytest.fixture
def output(logger: logging.Logger, clock: FakeClock, stderr: TextIO, tmp_path: Path) -> Output:
    """Text lines on a file, rate limit 10 per 10 s on ``clock``."""
    setup = configure_logging(
        logging.DEBUG, target="stderr", environ={}, stderr=stderr, clock=clock
    )
    return Output(tmp_path / "stderr", setup)


# -- escaping -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sent", "shown"),
    [
        ("a\nb", r"a\nb"),
        ("a\r\nb", r"a\r\nb"),
        ("tab\there", r"tab\there"),
        ("\x1b[2J", r"\x1b[2J"),
        ("nul\x00bell\x07", r"nul\x00bell\x07"),
        ("del\x7f", r"del\x7f"),
        ("c1 next line\x85 csi\x9b", r"c1 next line\x85 csi\x9b"),
        ("line\u2028para\u2029", r"line\u2028para\u2029"),
        ("bidi \u202egnp.exe", r"bidi \u202egnp.exe"),
        ("back\\slash", r"back\\slash"),
        ("surrogate \udcff", r"surrogate \udcff"),
        ("plane 14 tag \U000e0041", r"plane 14 tag \U000e0041"),
    ],
)
def test_escape_makes_what_could_forge_a_line_visible(sent: str, shown: str) -> None:
    assert escape_text(sent, 100) == shown
    assert shown.isprintable()


def test_escape_leaves_readable_text_alone() -> None:
    text = 'call CA1 ended: assistant-ended (the assistant said "bye") after 3.2 s; Zoë ☎ 日本'
    assert escape_text(text, 200) == text


def test_escape_cuts_long_text_with_a_marker() -> None:
    assert escape_text("x" * 30, 10) == "x" * 10 + "…[20 more chars]"
    # Escapes count towards the limit, and are never cut in half.
    assert escape_text("\x1b" * 30, 10) == r"\x1b\x1b" + "…[28 more chars]"
    huge = escape_text("\n" * 10_000_000, MAX_FIELD_CHARS)
    assert (
        huge
        == r"\n" * (MAX_FIELD_CHARS // 2) + f"…[{10_000_000 - MAX_FIELD_CHARS // 2} more chars]"
    )


def test_a_peer_newline_in_the_message_and_fields_stays_on_one_line(
    output: Output, logger: logging.Logger
) -> None:
    log_event(
        logger,
        logging.WARNING,
        "stream-refused",
        f"call {FORGED} refused",
        call_sid=FORGED,
        reason="stream token malformed",
    )
    [line] = output.lines()
    assert line == (
        f"WARNING voicebridge.test: call {FORGED_SHOWN} refused "
        f'CALL_SID="{FORGED_SHOWN}" REASON="stream token malformed"'
    )


def test_plain_logging_calls_are_escaped_too(output: Output, logger: logging.Logger) -> None:
    logger.info("tool %s for call %s: error", "lookup\nINFO    voicebridge: forged", "CA1")
    assert output.lines() == [
        r"INFO    voicebridge.test: tool lookup\nINFO    voicebridge: forged for call CA1: error"
    ]


def test_field_values_are_quoted_when_they_hold_a_space_or_a_quote(
    output: Output, logger: logging.Logger
) -> None:
    log_event(
        logger,
        logging.INFO,
        "e",
        "m",
        empty="",
        spaced="a b",
        quoted='say "hi"',
        path="C:\\x",
        answered=True,
    )
    [line] = output.lines()
    assert line == (
        'INFO    voicebridge.test: m EMPTY="" SPACED="a b" '
        r'QUOTED="say \"hi\"" PATH=C:\\x ANSWERED=true'
    )


def test_long_peer_strings_are_cut(output: Output, logger: logging.Logger) -> None:
    log_event(logger, logging.INFO, "e", "m " + "y" * 5000, claimed="z" * 5000)
    [line] = output.lines()
    message_cut = "m " + "y" * (MAX_MESSAGE_CHARS - 2) + f"…[{5002 - MAX_MESSAGE_CHARS} more chars]"
    field_cut = "z" * MAX_FIELD_CHARS + f"…[{5000 - MAX_FIELD_CHARS} more chars]"
    assert line == f'INFO    voicebridge.test: {message_cut} CLAIMED="{field_cut}"'


def _raise_with_peer_text(logger: logging.Logger) -> None:
    try:
        raise ValueError(f"bad frame {FORGED}")
    except ValueError:
        logger.exception("call CA1 failed with a bug")


def test_a_traceback_keeps_its_lines_indented_under_its_record(
    output: Output, logger: logging.Logger
) -> None:
    _raise_with_peer_text(logger)
    lines = output.lines()
    assert lines[0] == "ERROR   voicebridge.test: call CA1 failed with a bug"
    assert lines[1] == "  Traceback (most recent call last):"
    # The exception's message keeps its newline (a traceback is multi-line text), but
    # its second line is indented: no line but a record's first starts at column 0.
    assert lines[-2:] == [
        "  ValueError: bad frame CAx",
        r"  WARNING voicebridge.web: forged line\r\x1b[2J\x1b[31m",
    ]
    assert all(line.startswith("  ") and line.isprintable() for line in lines[1:])


def test_priority_prefixed_lines_are_escaped_the_same(
    logger: logging.Logger, tmp_path: Path
) -> None:
    path = tmp_path / "stderr"
    path.touch()
    st = path.stat()
    with path.open("w", buffering=1) as stream:
        configure_logging(
            logging.INFO,
            target="stderr",
            environ={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"},
            stderr=stream,
        )
        log_event(logger, logging.WARNING, "stream-refused", f"call {FORGED}", call_sid=FORGED)
        _raise_with_peer_text(logger)
    lines = path.read_text().splitlines()
    assert lines[0] == f'<4>WARNING voicebridge.test: call {FORGED_SHOWN} CALL_SID="{FORGED_SHOWN}"'
    assert lines[1] == "<3>ERROR   voicebridge.test: call CA1 failed with a bug"
    assert all(line.startswith("<3>  ") for line in lines[2:])


# -- rate limit -------------------------------------------------------------------------


def refuse(logger: logging.Logger, n: int, *, event: str = "stream-refused") -> None:
    for i in range(n):
        log_event(logger, logging.WARNING, event, f"{event} {i}", peer="127.0.0.2")


def test_a_flood_gives_ten_lines_then_one_suppressed_line_per_window(
    output: Output, logger: logging.Logger, clock: FakeClock
) -> None:
    refuse(logger, 25)
    clock.now = 9.9
    refuse(logger, 5)  # the same window
    assert len(output.lines()) == 10
    clock.now = 10.0  # the window is over: the next line of any kind reports it
    log_event(logger, logging.INFO, "call-start", "call CA1 started", call_sid="CA1")
    lines = output.lines()
    assert lines[:10] == [
        f"WARNING voicebridge.test: stream-refused {i} PEER=127.0.0.2" for i in range(10)
    ]
    assert lines[10:] == [
        "WARNING voicebridge.observability.logs: event stream-refused: 20 more suppressed "
        "in the last 10 s SUPPRESSED_KIND=stream-refused SUPPRESSED=20 SUPPRESSED_OVER_S=10.0",
        "INFO    voicebridge.test: call CA1 started CALL_SID=CA1",
    ]
    # A new window lets ten through again.
    refuse(logger, 12)
    assert len(output.lines()) == 12 + 10


def test_one_noisy_kind_does_not_silence_another(
    output: Output, logger: logging.Logger, clock: FakeClock
) -> None:
    refuse(logger, 100, event="stream-refused")
    refuse(logger, 3, event="webhook-rejected")
    # call-end is split by outcome: token rejections cannot silence a failed call.
    for _ in range(50):
        log_event(logger, logging.WARNING, "call-end", "rejected", outcome="token-rejected")
    log_event(
        logger,
        logging.WARNING,
        "call-end",
        "failed",
        call_sid="CA9",
        outcome="assistant-leg-failed",
    )
    lines = output.lines()
    assert sum("webhook-rejected" in line for line in lines) == 3
    assert sum(line.startswith("WARNING voicebridge.test: rejected") for line in lines) == 10
    assert lines[-1] == "WARNING voicebridge.test: failed CALL_SID=CA9 OUTCOME=assistant-leg-failed"


def test_info_lines_are_never_suppressed(
    output: Output, logger: logging.Logger, clock: FakeClock
) -> None:
    refuse(logger, 100)
    for i in range(100):
        log_event(logger, logging.INFO, "call-start", f"call CA{i} started")
        log_event(logger, logging.INFO, "call-end", f"call CA{i} ended", outcome="caller-hung-up")
    lines = output.lines()
    assert sum(" started" in line for line in lines) == 100
    assert sum(" ended" in line for line in lines) == 100


def test_a_call_site_opts_in_or_out(output: Output, logger: logging.Logger) -> None:
    for i in range(20):
        log_event(logger, logging.INFO, "tool-call", f"tool {i}", rate_limited=True)
        log_event(logger, logging.ERROR, "drain-deadline", f"drain {i}", rate_limited=False)
        logger.debug("frame %d", i, extra={"vb_rate_limited": True})
    lines = output.lines()
    assert sum(": tool " in line for line in lines) == 10
    assert sum(": drain " in line for line in lines) == 20
    assert sum(": frame " in line for line in lines) == 10
    with pytest.raises(TypeError, match="rate_limited must be a bool"):
        log_event(logger, logging.INFO, "e", "m", rate_limited="yes")


def test_plain_warnings_are_limited_per_message_template(
    output: Output, logger: logging.Logger
) -> None:
    for i in range(30):
        logger.warning("outbound call to %s refused", f"+1555{i:07d}")
        logger.warning("reload ignored: the server is stopping")
    lines = output.lines()
    assert sum("outbound call" in line for line in lines) == 10
    assert sum("reload ignored" in line for line in lines) == 10


def test_kinds_a_caller_makes_up_share_one_bounded_window(
    output: Output, logger: logging.Logger, clock: FakeClock
) -> None:
    # A message built with an f-string makes a kind per line: past the table's
    # capacity they share one window instead of growing it.
    for i in range(MAX_RATE_LIMIT_KINDS + 500):
        logger.warning(f"made-up kind {i}")
    lines = output.lines()
    assert len(lines) == MAX_RATE_LIMIT_KINDS + 10
    clock.now = 10.0
    output.setup.rate_limiter.flush()
    assert output.lines()[-1].startswith(
        "WARNING voicebridge.observability.logs: event (other kinds): 490 more suppressed"
    )
    # Once their windows are over, the idle kinds make room again.
    logger.warning("a new kind")
    assert output.lines()[-1] == "WARNING voicebridge.test: a new kind"


def test_flush_reports_windows_that_are_over_and_everything_when_final(
    output: Output, logger: logging.Logger, clock: FakeClock
) -> None:
    limiter = output.setup.rate_limiter
    refuse(logger, 15, event="stream-refused")
    clock.now = 4.0
    refuse(logger, 12, event="webhook-rejected")
    clock.now = 9.0
    assert limiter.flush() == []
    clock.now = 10.0
    [over] = limiter.flush()
    assert (over.kind, over.count, over.over_s) == ("stream-refused", 5, 10.0)
    clock.now = 11.0
    [pending] = limiter.flush(final=True)
    assert (pending.kind, pending.count, pending.over_s) == ("webhook-rejected", 2, 7.0)
    assert limiter.flush(final=True) == []
    assert output.lines()[-2:] == [
        "WARNING voicebridge.observability.logs: event stream-refused: 5 more suppressed "
        "in the last 10 s SUPPRESSED_KIND=stream-refused SUPPRESSED=5 SUPPRESSED_OVER_S=10.0",
        "WARNING voicebridge.observability.logs: event webhook-rejected: 2 more suppressed "
        "in the last 7 s SUPPRESSED_KIND=webhook-rejected SUPPRESSED=2 SUPPRESSED_OVER_S=7.0",
    ]


def test_suppressed_counts_are_there_for_a_metric(
    output: Output, logger: logging.Logger, clock: FakeClock
) -> None:
    assert suppressed_counts() == {}
    refuse(logger, 15)
    clock.now = 20.0
    refuse(logger, 13)
    for _ in range(11):
        log_event(logger, logging.WARNING, "call-end", "rejected", outcome="token-rejected")
    assert suppressed_counts() == {"stream-refused": 8, "call-end/token-rejected": 1}
    assert output.setup.rate_limiter.suppressed_counts() == suppressed_counts()


async def test_the_server_task_reports_each_window_and_the_rest_when_cancelled(
    logger: logging.Logger, stderr: TextIO, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    configure_logging(
        logging.INFO, target="stderr", environ={}, stderr=stderr, clock=trio.current_time
    )
    start = trio.current_time()

    def suppressed_lines() -> list[str]:
        text = (tmp_path / "stderr").read_text()
        return [line for line in text.splitlines() if "more suppressed" in line]

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_suppression_reports)
        refuse(logger, 14)  # a window from 0 s to 10 s
        await trio.sleep(10.5)
        refuse(logger, 13)  # a window from 10.5 s
        await trio.sleep(9.6)
        # The task woke at 10 s, when the first window was over: reported then. At
        # 20 s the second window (from 10.5 s) was not over: nothing.
        assert suppressed_lines() == [
            "WARNING voicebridge.observability.logs: event stream-refused: 4 more suppressed "
            "in the last 10 s SUPPRESSED_KIND=stream-refused SUPPRESSED=4 SUPPRESSED_OVER_S=10.0"
        ]
        await trio.sleep(2.0)  # 22.1 s: the second window is over, not reported yet
        nursery.cancel_scope.cancel(reason="server stopped")
    assert trio.current_time() - start == pytest.approx(22.1)
    assert suppressed_lines()[1:] == [
        "WARNING voicebridge.observability.logs: event stream-refused: 3 more suppressed "
        "in the last 12 s SUPPRESSED_KIND=stream-refused SUPPRESSED=3 SUPPRESSED_OVER_S=11.6"
    ]
