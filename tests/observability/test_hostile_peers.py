"""Log hygiene against the real server, attacked from another OS process.

Charter: the bridge is the real server on 127.0.0.1 (``running_bridge``) with the
simulated Vapi; the attacker is ``tests/observability/hostile_peer.py``, a separate
Python process connecting from 127.0.0.2, so it cannot stall the bridge from inside
its event loop. The witness is a genuine call placed by the simulated Twilio caller.
Logs are read back as an operator reads them: text lines from the file standing in for
stderr (plain, and with the ``<N>`` prefixes of a journal stream), or native entries
from a private, real journald (``journalctl -o json``). Real time, with a
``trio.fail_after`` guard on every test; logs are polled with a deadline, never slept on.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Literal, assert_never

import attrs
import pytest
import trio

from tests import journald_fixture
from tests.harness import SHORT_ASSISTANT, Bridge, running_bridge
from tests.journald_fixture import PrivateJournal
from voicebridge.observability.logs import (
    RATE_LIMIT_BURST,
    RATE_LIMIT_WINDOW_S,
    configure_logging,
)
from voicebridge.sim.caller import (
    CallReport,
    Silence,
    Speak,
    WaitForAssistantDone,
    place_call,
)

#: The real journald of the journal cases (see tests/journald_fixture.py).
private_journal = journald_fixture.private_journal

REPO_ROOT = Path(__file__).resolve().parents[2]

Output = Literal["stderr", "journal-stream", "journal"]

#: The witness's call: hear the greeting, say something, hear the goodbye (the
#: assistant ends the call).
WITNESS_SCRIPT = (
    WaitForAssistantDone(quiet_s=0.4),
    Speak("caller_2"),
    WaitForAssistantDone(quiet_s=0.4),
)

_POLL_S = 0.02


@pytest.fixture
def voicebridge_logging() -> Iterator[None]:
    with journald_fixture.saved_voicebridge_logging():
        yield


@attrs.frozen
class Logs:
    """Where the bridge's logs went in one test, and how to read them back."""

    output: Output
    path: Path
    journal: PrivateJournal | None

    def lines(self) -> list[str]:
        return self.path.read_text().splitlines()


def configure(
    output: Output,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    *,
    identifier: str = "voicebridge",
    burst: int = RATE_LIMIT_BURST,
    window_s: float = RATE_LIMIT_WINDOW_S,
) -> Logs:
    """``configure_logging`` for ``output``; stderr is a file the test reads back."""
    path = tmp_path / "stderr"
    path.touch()
    stream = path.open("w", buffering=1)
    request.addfinalizer(stream.close)
    st = path.stat()
    journal: PrivateJournal | None = None
    environ: dict[str, str] = {}
    match output:
        case "stderr":
            pass
        case "journal-stream":
            environ = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        case "journal":
            journal = request.getfixturevalue("private_journal")
        case _:
            assert_never(output)
    configure_logging(
        logging.INFO,
        target="stderr" if journal is None else "journal",
        environ=environ,
        stderr=stream,
        journal_socket=None if journal is None else journal.socket_path,
        identifier=identifier,
        rate_limit_burst=burst,
        rate_limit_window_s=window_s,
    )
    return Logs(output, path, journal)


async def attack(bridge: Bridge, call_sid: str, count: int = 1) -> dict[str, int]:
    """Run the hostile peer as its own process; what it reports."""
    result = await trio.run_process(
        [
            sys.executable,
            "-m",
            "tests.observability.hostile_peer",
            f"--target=127.0.0.1:{bridge.listening.port}",
            "--source=127.0.0.2",
            f"--call-sid={call_sid}",
            f"--count={count}",
        ],
        cwd=REPO_ROOT,
        capture_stdout=True,
    )
    report: dict[str, int] = json.loads(result.stdout)
    return report


# -- a forged line ------------------------------------------------------------------------


@pytest.mark.parametrize("output", ["stderr", "journal-stream", "journal"])
async def test_a_newline_in_a_peers_call_sid_forges_no_line(
    output: Output, tmp_path: Path, request: pytest.FixtureRequest, voicebridge_logging: None
) -> None:
    marker = secrets.token_hex(8)
    forged = f"WARNING voicebridge.web: {marker} accepted"
    call_sid = f"CA{marker}\n{forged}\x1b[2J\r"
    shown = rf"CA{marker}\n{forged}\x1b[2J\r"
    logs = configure(output, tmp_path, request)
    with trio.fail_after(30):
        async with running_bridge() as bridge:
            assert await attack(bridge, call_sid) == {"opened": 1, "closed": 1}
        # The server has stopped: the stream's line is written.
        if logs.journal is not None:
            [entry] = await logs.journal.wait_for_entries(f"CALL_SID={shown}")

    if logs.journal is not None:
        assert entry["EVENT"] == "call-end"
        assert entry["OUTCOME"] == "token-rejected"
        assert entry["PRIORITY"] == "4"
        assert entry["MESSAGE"].startswith(f"call {shown} ended: token-rejected")
        assert entry["MESSAGE"].isprintable()
        return
    prefix = "<4>" if output == "journal-stream" else ""
    lines = logs.lines()
    [line] = [line for line in lines if marker in line]
    assert line.startswith(f"{prefix}WARNING voicebridge.bridge.call: call {shown} ended:")
    assert f'CALL_SID="{shown}"' in line
    assert all(line.isprintable() for line in lines)
    assert not any(line.removeprefix(prefix).startswith(forged) for line in lines)


# -- a flood of rejections ----------------------------------------------------------------

#: Streams the flooder opens, one after the other. 3,000 lines in 10 s were measured
#: from one client; 300 make the point in a second or two of real time.
FLOOD = 300
#: A small window so the test sees several of them in a few seconds of real time.
BURST = 5
WINDOW_S = 1.0
#: How long journald gets to store what a stopped server sent it.
QUERY_DEADLINE_S = 5.0


def _counted_in_text(logs: Logs, kind: str) -> tuple[int, int]:
    """(lines of the flood written, lines reported suppressed), from text lines."""
    lines = logs.lines()
    written = sum("ended: token-rejected" in line for line in lines)
    suppressed = sum(
        int(line.split(" SUPPRESSED=")[1].split()[0])
        for line in lines
        if f"SUPPRESSED_KIND={kind} " in line
    )
    return written, suppressed


async def _counted_in_journal(
    journal: PrivateJournal, identifier: str, kind: str
) -> tuple[int, int]:
    """The same from the journal, once journald has stored all of it (or a deadline)."""
    ours = f"SYSLOG_IDENTIFIER={identifier}"
    written, summaries, suppressed = 0, [], 0
    with trio.move_on_after(QUERY_DEADLINE_S):
        while True:
            written = len(await journal.wait_for_entries(ours, "OUTCOME=token-rejected", expect=0))
            summaries = await journal.wait_for_entries(ours, f"SUPPRESSED_KIND={kind}", expect=0)
            suppressed = sum(int(e["SUPPRESSED"]) for e in summaries)
            if written + suppressed >= FLOOD:
                break
            await trio.sleep(_POLL_S)
    assert {e["PRIORITY"] for e in summaries} == {"4"}
    return written, suppressed


@pytest.mark.slow
@pytest.mark.parametrize("output", ["stderr", "journal"])
async def test_a_flood_of_rejections_is_bounded_and_counted_while_a_call_is_logged(
    output: Output, tmp_path: Path, request: pytest.FixtureRequest, voicebridge_logging: None
) -> None:
    identifier = f"vb-{secrets.token_hex(6)}"
    logs = configure(
        output, tmp_path, request, identifier=identifier, burst=BURST, window_s=WINDOW_S
    )
    reports: list[CallReport] = []
    flood: list[dict[str, int]] = []
    with trio.fail_after(60):
        async with running_bridge() as bridge:
            started = trio.current_time()

            async def flooder() -> None:
                flood.append(await attack(bridge, "CA" + "f" * 32, count=FLOOD))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(flooder)
                reports.append(await place_call(bridge.caller, WITNESS_SCRIPT))
            elapsed = trio.current_time() - started
        # The server has stopped: every pending count was reported on the way out.
    assert flood == [{"opened": FLOOD, "closed": FLOOD}]
    [report] = reports
    kind = "call-end/token-rejected"

    if logs.journal is None:
        written, suppressed = _counted_in_text(logs, kind)
        witness = [line for line in logs.lines() if report.call_sid in line]
        assert [line.split(":")[0] for line in witness] == ["INFO    voicebridge.bridge.call"] * 2
        assert "started" in witness[0] and "ended: assistant-ended" in witness[1]
    else:
        witness_entries = await logs.journal.wait_for_entries(
            f"CALL_SID={report.call_sid}", expect=2
        )
        assert [e["EVENT"] for e in witness_entries] == ["call-start", "call-end"]
        assert witness_entries[1]["OUTCOME"] == "assistant-ended"
        written, suppressed = await _counted_in_journal(logs.journal, identifier, kind)

    # Every rejection is a line or is counted in a suppressed line: nothing is lost
    # without a trace, and the lines are bounded by the windows, not by the flood.
    most_lines = BURST * (math.ceil(elapsed / WINDOW_S) + 1)
    assert written + suppressed == FLOOD
    assert BURST <= written <= most_lines


async def test_every_call_that_began_gets_its_end_line_even_when_many_fail(
    tmp_path: Path, request: pytest.FixtureRequest, voicebridge_logging: None
) -> None:
    # A Vapi outage: every call ends with a warning of the same kind, faster than the
    # burst allows. Each is a call an operator may be asked about: none is suppressed.
    calls = 3 * BURST
    logs = configure("stderr", tmp_path, request, burst=BURST, window_s=60.0)
    outage = attrs.evolve(SHORT_ASSISTANT, refuse_create=500)
    reports: list[CallReport] = []
    with trio.fail_after(30):
        async with running_bridge(behaviour=outage) as bridge:

            async def one() -> None:
                reports.append(await place_call(bridge.caller, (Silence(1),)))

            async with trio.open_nursery() as nursery:
                for _ in range(calls):
                    nursery.start_soon(one)
    ends = [line for line in logs.lines() if "ended: assistant-leg-failed" in line]
    assert len(reports) == len(ends) == calls
    assert {r.call_sid for r in reports} == {line.split("CALL_SID=")[1].split()[0] for line in ends}
    assert all(line.startswith("WARNING voicebridge.bridge.call:") for line in ends)
    assert not any("more suppressed" in line for line in logs.lines())
