"""``bench/sweep.py``'s judgement of a sweep: which targets held, and where the bridge
nears its core. Hand-made rows, shaped as the sweep keeps them (``LoadReport.to_json``)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SWEEP = Path(__file__).resolve().parent.parent / "bench" / "sweep.py"


@pytest.fixture(scope="module")
def sweep() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_sweep", SWEEP)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _row(
    calls: int,
    core_pct: float | None,
    *,
    c2a: float = 3.0,
    at_playback: float = 4.0,
    at_arrival: float = 9.0,
    barge_in: float | None = 2.0,
    dropped: int = 0,
    failed: int = 0,
    heard_after_clear: float = 0.0,
) -> dict[str, Any]:
    def pct(p99: float | None) -> dict[str, float | None]:
        return {"p50": None if p99 is None else p99 / 3, "p99": p99, "max": p99}

    return {
        "calls": calls,
        "churn": 0.0,
        "bridge": {
            "valid": True,
            "added_latency_ms": {
                "caller_to_agent": pct(c2a),
                "agent_to_caller_at_playback": pct(at_playback),
                "agent_to_caller_at_arrival": pct(at_arrival),
            },
            "barge_in_ms": pct(barge_in),
            "dropped_frames": dropped,
            "failed_calls": failed,
            "heard_after_clear_ms": heard_after_clear,
            "bridge_cpu_pct": core_pct,
            "cpu_us_per_call_second": None if core_pct is None else core_pct * 100,
        },
    }


def test_the_load_at_80_percent_of_the_core_is_interpolated_between_the_rows_around_it(
    sweep: ModuleType,
) -> None:
    rows = [_row(50, 40.0), _row(100, 60.0), _row(150, 90.0), _row(200, 100.0)]
    assert sweep.core_share_load(rows) == pytest.approx(100 + 50 * 20 / 30)
    assert sweep.floor_summary(rows) == (
        "every target held up to 100 calls; the bridge reached 80 % of its core at ≈133 calls"
    )


def test_a_row_at_exactly_80_percent_is_the_load_and_is_judged(sweep: ModuleType) -> None:
    rows = [_row(50, 40.0), _row(100, 80.0, heard_after_clear=20.0), _row(150, 95.0)]
    assert sweep.core_share_load(rows) == 100
    assert sweep.floor_summary(rows) == (
        "a target was missed at 100 calls (20 ms heard after a clear); "
        "the bridge reached 80 % of its core at ≈100 calls"
    )


def test_the_first_row_already_past_80_percent_is_the_load(sweep: ModuleType) -> None:
    assert sweep.core_share_load([_row(300, 85.0), _row(350, 99.0)]) == 300


def test_rows_beyond_the_load_are_not_judged(sweep: ModuleType) -> None:
    rows = [
        _row(50, 40.0),
        _row(100, 70.0),
        _row(150, 90.0, at_playback=15.0, barge_in=8.0, dropped=3),
    ]
    assert sweep.floor_summary(rows).startswith("every target held up to 100 calls; ")


def test_assistant_to_caller_is_judged_at_playback_not_at_arrival(sweep: ModuleType) -> None:
    held = [_row(50, 30.0, at_arrival=24.0), _row(100, 50.0, at_arrival=24.0)]
    assert sweep.floor_summary(held).startswith("every target held up to 100 calls; ")
    assert sweep.capacity(held)["max_calls_meeting_targets"] == 100
    missed = [_row(50, 30.0), _row(100, 50.0, at_playback=10.5, at_arrival=7.0)]
    assert sweep.floor_summary(missed).startswith(
        "a target was missed at 100 calls (a→c at playback p99 10.5 ms > 10 ms); "
    )
    assert sweep.capacity(missed)["max_calls_meeting_targets"] == 50


def test_every_missed_target_of_the_first_row_that_missed_one_is_named(
    sweep: ModuleType,
) -> None:
    rows = [
        _row(50, 30.0),
        _row(100, 50.0, c2a=12.0, barge_in=6.0, dropped=2, failed=1, heard_after_clear=40.0),
        _row(150, 60.0, at_playback=30.0),
    ]
    assert sweep.floor_summary(rows) == (
        "a target was missed at 100 calls (c→a p99 12.0 ms > 10 ms; "
        "barge-in p99 6.0 ms > 5 ms; 2 frames dropped; 1 calls failed; "
        "40 ms heard after a clear); 80 % of the bridge's core not reached up to 150 calls"
    )


def test_a_run_without_barge_ins_misses_none_but_an_unmeasured_latency_misses(
    sweep: ModuleType,
) -> None:
    assert sweep.missed_targets(_row(50, 30.0, barge_in=None)) == []
    unmeasured = _row(50, 30.0)
    del unmeasured["bridge"]["added_latency_ms"]["agent_to_caller_at_playback"]
    assert sweep.missed_targets(unmeasured) == ["a→c at playback p99 – ms > 10 ms"]


def test_without_the_bridges_cpu_the_core_is_not_reached(sweep: ModuleType) -> None:
    rows = [_row(50, None), _row(100, None)]
    assert sweep.core_share_load(rows) is None
    assert sweep.floor_summary(rows) == (
        "every target held up to 100 calls; 80 % of the bridge's core not reached up to 100 calls"
    )


def _with_relay(row: dict[str, Any], c2a: float, at_playback: float) -> dict[str, Any]:
    relay = _row(row["calls"], None, c2a=c2a, at_playback=at_playback)["bridge"]
    return {**row, "tcp": relay}


def test_what_the_bridge_adds_to_the_bare_relay_is_its_worst_row_each_way_up_to_80_percent(
    sweep: ModuleType,
) -> None:
    rows = [
        _with_relay(_row(50, 30.0, c2a=3.0, at_playback=3.5), c2a=2.0, at_playback=3.0),
        _with_relay(_row(100, 60.0, c2a=6.5, at_playback=5.0), c2a=4.0, at_playback=4.5),
        # Past 80 % of the core: not judged, however far over the relay.
        _with_relay(_row(150, 90.0, c2a=30.0, at_playback=40.0), c2a=6.0, at_playback=7.0),
    ]
    assert sweep.over_relay_summary(rows) == (
        "p99 over the bare TCP relay's in the same row, up to 100 calls: "
        "at most 2.5 ms c→a, 0.5 ms a→c at playback"
    )
    assert sweep.over_relay_summary([_row(50, 30.0)]) == (
        "no row with the bare TCP relay to compare with"
    )
