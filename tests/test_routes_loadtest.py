"""What the decision hook adds to the voice webhook's answer time, in the load test
(``voicebridge loadtest --route-hook``): the bridge, its own process, asks a simulated
hook for every call."""

from __future__ import annotations

import json

import pytest

from voicebridge.cli import main


def test_the_load_test_measures_the_webhook_with_a_hook(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(["loadtest", "--calls", "4", "--duration", "2", "--ramp", "0.5",
                 "--route-hook", "--json"])
    report = json.loads(capsys.readouterr().out)
    # Whether the run is VALID depends on the machine's load (the generator's pacing);
    # what this test is about does not.
    assert code in (0, 1), report
    assert report["route_hook"] is True
    assert report["failed_calls"] == 0
    webhook = report["webhook_answer_ms"]
    # One answer per call, each including a signed round trip to the hook.
    assert 0 < webhook["p50"] <= webhook["p99"] <= webhook["max"] < 1500


def test_the_table_names_the_hook(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["loadtest", "--calls", "2", "--duration", "2", "--ramp", "0.5",
                 "--route-hook"])
    table = capsys.readouterr().out
    assert code in (0, 1), table
    assert "voice webhook answered, hook (ms)" in table
    assert "failed calls:               0" in table
