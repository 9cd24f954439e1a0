"""Where the bridge's CPU goes: setting calls up and ending them, or streaming them.

A call costs the bridge CPU once when it is set up (the voice webhook, the stream's
start and token, the assistant's ``POST /call`` and socket), once when it ends (the
goodbye to the assistant, the record, the ``<Connect action>``), and all along while it
streams. One window's CPU per call-second mixes the three whenever calls come and go.
``split_cpu`` separates them: the run samples the bridge's CPU time every
``CPU_SAMPLE_S``; for each interval between samples it counts the calls set up (voice
webhook sent) and ended (hang-up, or the bridge's close) in it and the call-seconds
streamed in it, and fits, by least squares over all intervals,

    CPU of the interval − base × its length
        = setup × set-ups + end × ends + streaming × call-seconds

``base`` is what the process spends with no call at all (its timers, the loop-lag
monitor), measured before the first call: fitted, it could not be told from streaming
in a steady state, where every interval streams as many call-seconds. The ramp of long
calls (many set-ups, few call-seconds), their steady state (only call-seconds) and the
hang-up at the end (only ends) tell the three apart; so does a churn of calls arriving
at random.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from typing import TYPE_CHECKING, Final

from attrs import frozen

if TYPE_CHECKING:
    from voicebridge.loadtest.generator import CallSpan

#: How often the bridge's CPU time is sampled for the split: /proc counts in 10 ms ticks,
#: so half a second keeps each interval's figure within 2 %, and a few seconds of ramp
#: still give several intervals with many set-ups.
CPU_SAMPLE_S: Final = 0.5
#: Fewer intervals than this, or no set-up or no end among them: no split.
MIN_INTERVALS: Final = 8


@frozen(kw_only=True)
class CpuSplit:
    """The fitted costs (see the module docstring)."""

    #: CPU milliseconds per call set up.
    setup_ms: float
    #: CPU milliseconds per call ended.
    end_ms: float
    #: CPU microseconds per second of one call streaming.
    streaming_us_per_call_second: float
    #: CPU of the process with no call (measured, not fitted), percent of a core.
    base_pct: float
    #: Intervals fitted.
    intervals: int


def split_cpu(
    samples: Sequence[tuple[float, float]], spans: Sequence[CallSpan], *, base: float
) -> CpuSplit | None:
    """Fit the costs to ``samples`` ((time, CPU seconds) ascending, perf_counter times)
    and the calls' ``spans``, ``base`` CPU seconds a second being the process's own;
    None when the samples cannot tell them apart."""
    rows: list[tuple[tuple[float, float, float], float]] = []
    for (start, cpu_start), (end, cpu_end) in pairwise(samples):
        if end <= start:
            continue
        setups = sum(1 for span in spans if start <= span.setup_at < end)
        ends = sum(1 for span in spans if start <= span.ended_at < end)
        call_s = sum(
            max(0.0, min(end, span.ended_at) - max(start, span.streaming_from)) for span in spans
        )
        rows.append(
            ((float(setups), float(ends), call_s), cpu_end - cpu_start - base * (end - start))
        )
    if (
        len(rows) < MIN_INTERVALS
        or not any(x[0] for x, _ in rows)
        or not any(x[1] for x, _ in rows)
    ):
        return None
    coefficients = _least_squares(rows)
    if coefficients is None:
        return None
    setup, end_cost, streaming = coefficients
    return CpuSplit(
        setup_ms=setup * 1e3,
        end_ms=end_cost * 1e3,
        streaming_us_per_call_second=streaming * 1e6,
        base_pct=base * 100,
        intervals=len(rows),
    )


def _least_squares(
    rows: Sequence[tuple[tuple[float, ...], float]],
) -> list[float] | None:
    """The β minimizing Σ (y − x·β)²: the normal equations, by Gaussian elimination with
    partial pivoting; None when they are singular (a regressor never varies apart)."""
    n = len(rows[0][0])
    # The augmented matrix [XᵀX | Xᵀy].
    matrix = [
        [sum(x[i] * x[j] for x, _ in rows) for j in range(n)] + [sum(x[i] * y for x, y in rows)]
        for i in range(n)
    ]
    scale = max(abs(matrix[i][i]) for i in range(n)) or 1.0
    for column in range(n):
        pivot = max(range(column, n), key=lambda row: abs(matrix[row][column]))
        if abs(matrix[pivot][column]) <= 1e-12 * scale:
            return None
        matrix[column], matrix[pivot] = matrix[pivot], matrix[column]
        for row in range(n):
            if row != column:
                factor = matrix[row][column] / matrix[column][column]
                matrix[row] = [
                    a - factor * b for a, b in zip(matrix[row], matrix[column], strict=True)
                ]
    return [matrix[i][n] / matrix[i][i] for i in range(n)]
