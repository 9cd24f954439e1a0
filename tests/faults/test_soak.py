"""A short soak in CI: a few hundred calls through one server; nothing may grow.

The full soak (thousands of calls) is ``python -m voicebridge.soak``; see
docs/reliability.md for its figures.
"""

from __future__ import annotations

import io
import logging

import pytest
import trio

from voicebridge.soak import MAX_RSS_GROWTH_PER_CALL, MIX, main, soak

CALLS = 300
CHECKPOINT = 100


async def test_a_few_hundred_calls_leave_no_task_descriptor_or_memory_behind(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The test's log capture would keep every call's log lines: memory the server
    # does not hold. The soak reads figures, not lines.
    caplog.set_level(logging.ERROR, logger="voicebridge")
    out = io.StringIO()
    with trio.fail_after(90):
        report = await soak(calls=CALLS, concurrency=20, checkpoint=CHECKPOINT, out=out)
    print(out.getvalue())
    assert report.wrong_outcomes == ()
    first, last = report.snapshots[0], report.snapshots[-1]
    assert [s.calls for s in report.snapshots] == [CHECKPOINT, 2 * CHECKPOINT, CALLS]
    assert last.tasks == first.tasks, report.snapshots
    assert last.fds == first.fds, report.snapshots
    assert report.rss_growth_per_call < MAX_RSS_GROWTH_PER_CALL, report.snapshots
    assert report.flat
    assert len(out.getvalue().splitlines()) == 3, "one line per checkpoint"


def test_the_mix_covers_normal_calls_barge_ins_and_faults_on_both_sides() -> None:
    names = {kind.name for kind in MIX}
    assert {"hang-up", "barge-in", "vapi-refuses", "vapi-drops", "twilio-drops"} <= names


def test_the_command_refuses_a_run_with_a_single_checkpoint() -> None:
    try:
        main(["--calls", "10", "--checkpoint", "10"], out=io.StringIO())
    except ValueError as exc:
        assert "two checkpoints" in str(exc)
    else:
        raise AssertionError("a single checkpoint compares nothing")
