"""The result of one load test: its figures, the readable table and the ``--json`` object."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from attrs import asdict, field, frozen

from voicebridge.loadtest.cpu import CpuSplit

#: A caller frame or an assistant chunk that arrives more than this long after it was
#: sent is *late*: a telephone jitter buffer hides about two frames, no more.
LATE_AFTER_MS = 40.0
#: The generator's CPU (percent of one core) above which its own timing is suspect.
GENERATOR_SATURATED_PCT = 75.0
#: The generator's pacing tick may slip this much (p99) before its clock is suspect.
GENERATOR_TICK_SLIP_MS = 5.0
#: The width of the table's first column.
_LABEL = 45


@frozen
class Percentiles:
    """p50 / p99 / max of a sample, in milliseconds; None when there was no sample."""

    p50: float | None
    p99: float | None
    max: float | None
    count: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Percentiles:
        if not values:
            return cls(None, None, None, 0)
        ordered = sorted(values)
        return cls(
            p50=_rank(ordered, 0.50), p99=_rank(ordered, 0.99), max=ordered[-1],
            count=len(ordered),
        )


def _rank(ordered: Sequence[float], quantile: float) -> float:
    """The nearest-rank quantile of a sorted sample."""
    index = max(0, math.ceil(quantile * len(ordered)) - 1)
    return ordered[index]


@frozen(kw_only=True)
class LoadReport:
    """Everything one load test measured. Latencies are milliseconds."""

    target: str
    calls: int
    duration_s: float
    ramp_s: float
    #: Whether the figures can be trusted (the generator was not itself the bottleneck).
    valid: bool
    #: Why not, when ``valid`` is false.
    invalid_reasons: tuple[str, ...]
    caller_to_agent: Percentiles
    #: Assistant → caller at the caller's playback, against the ideal wire: what the
    #: caller hears later (``generator.ideal_wire_heard``). The targets judge this one.
    agent_to_caller_at_playback: Percentiles
    #: Assistant → caller at the frame's arrival at the caller, waits the caller never
    #: hears included (a partial frame held while Twilio still had audio to play).
    agent_to_caller_at_arrival: Percentiles
    barge_in: Percentiles
    barge_ins: int
    #: Assistant audio of an interrupted turn that reached the caller after the clear.
    heard_after_clear_ms: float
    first_audio: Percentiles
    dropped_caller_frames: int
    dropped_assistant_chunks: int
    late_caller_frames: int
    late_assistant_chunks: int
    caller_frames: int
    assistant_chunks: int
    failed_calls: int
    #: Failure reason → number of calls.
    failures: Mapping[str, int]
    #: Bridge CPU per second of one call (None for an external bridge without a pid).
    cpu_us_per_call_second: float | None
    #: The bridge's CPU use over the measurement window, percent of one core.
    bridge_cpu_pct: float | None
    rss_kib_per_call: float | None
    rss_idle_kib: int | None
    rss_loaded_kib: int | None
    #: RSS growth from the start to the end of the window, all calls up: flat is 0.
    rss_growth_kib: int | None
    generator_cpu_pct: float
    generator_tick_slip_p99_ms: float | None
    window_s: float
    #: The Vapi leg was ``wss://`` (``--vapi-tls``): TLS handshakes the simulated Vapi
    #: completed, and failed ones by reason.
    vapi_tls: bool = False
    vapi_tls_handshakes: int = 0
    vapi_tls_handshake_failures: Mapping[str, int] = field(factory=dict)
    #: The bridge asked a decision hook (``--route-hook``) for every call.
    route_hook: bool = False
    #: Every call placed: ``calls`` long ones and the churn.
    calls_placed: int = 0
    #: New calls a second on top of ``calls``, and how long each lasted (s).
    churn_per_s: float = 0.0
    churn_call_s: tuple[float, float] = (0.0, 0.0)
    #: Calls streaming on average over the window.
    mean_calls: float = 0.0
    #: Calls the voice webhook answered with the overflow message (not failed).
    refused_calls: int = 0
    #: Calls the bridge ended for its shutdown, their action requested (not failed).
    drained_calls: int = 0
    #: The voice webhook's answer time, every call placed.
    webhook: Percentiles = field(factory=lambda: Percentiles(None, None, None, 0))
    #: The bridge's CPU split between set-up, end and streaming (None: not measured).
    cpu_split: CpuSplit | None = None
    #: What the caller lives: voice webhook at the bridge → first word heard; speech
    #: onset → playback silent (a barge-in). On the latency model (``latency``), if any.
    time_to_first_word: Percentiles = Percentiles(None, None, None, 0)
    speech_to_silence: Percentiles = Percentiles(None, None, None, 0)
    #: The latency model's description; "" when the run had none.
    latency: str = ""

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` object (stable keys; see docs/performance.md)."""

        def pct(value: Percentiles, *keys: str) -> dict[str, float | None]:
            return {key: _round(getattr(value, key)) for key in keys}

        split = self.cpu_split

        return {
            "target": self.target,
            "calls": self.calls,
            "calls_placed": self.calls_placed,
            "churn_per_s": self.churn_per_s,
            "churn_call_s": list(self.churn_call_s),
            "mean_calls": _round(self.mean_calls),
            "duration_s": self.duration_s,
            "ramp_s": self.ramp_s,
            "window_s": round(self.window_s, 3),
            "valid": self.valid,
            "invalid_reasons": list(self.invalid_reasons),
            "added_latency_ms": {
                "caller_to_agent": pct(self.caller_to_agent, "p50", "p99", "max"),
                "agent_to_caller_at_playback": pct(
                    self.agent_to_caller_at_playback, "p50", "p99", "max"
                ),
                "agent_to_caller_at_arrival": pct(
                    self.agent_to_caller_at_arrival, "p50", "p99", "max"
                ),
            },
            "barge_in_ms": pct(self.barge_in, "p50", "p99", "max"),
            "barge_ins": self.barge_ins,
            "heard_after_clear_ms": _round(self.heard_after_clear_ms),
            "first_audio_ms": pct(self.first_audio, "p50", "p99", "max"),
            "route_hook": self.route_hook,
            "time_to_first_word_ms": pct(self.time_to_first_word, "p50", "p99", "max"),
            "speech_to_silence_ms": pct(self.speech_to_silence, "p50", "p99", "max"),
            "latency_model": self.latency or None,
            "dropped_frames": self.dropped_caller_frames + self.dropped_assistant_chunks,
            "late_frames": self.late_caller_frames + self.late_assistant_chunks,
            "frames": {
                "caller_to_agent": {
                    "measured": self.caller_frames,
                    "dropped": self.dropped_caller_frames,
                    "late": self.late_caller_frames,
                },
                "agent_to_caller": {
                    "measured": self.assistant_chunks,
                    "dropped": self.dropped_assistant_chunks,
                    "late": self.late_assistant_chunks,
                },
            },
            "late_after_ms": LATE_AFTER_MS,
            "failed_calls": self.failed_calls,
            "failures": dict(self.failures),
            "refused_calls": self.refused_calls,
            "drained_calls": self.drained_calls,
            "webhook_answer_ms": pct(self.webhook, "p50", "p99", "max"),
            "cpu_us_per_call_second": _round(self.cpu_us_per_call_second),
            "cpu_split": None if split is None else {
                "setup_ms_per_call": _round(split.setup_ms),
                "end_ms_per_call": _round(split.end_ms),
                "streaming_us_per_call_second": _round(split.streaming_us_per_call_second),
                "base_pct": _round(split.base_pct),
                "intervals": split.intervals,
            },
            "bridge_cpu_pct": _round(self.bridge_cpu_pct),
            "rss_kib_per_call": _round(self.rss_kib_per_call),
            "rss_idle_kib": self.rss_idle_kib,
            "rss_loaded_kib": self.rss_loaded_kib,
            "rss_growth_kib": self.rss_growth_kib,
            "generator_cpu_pct": _round(self.generator_cpu_pct),
            "generator_tick_slip_p99_ms": _round(self.generator_tick_slip_p99_ms),
            "vapi_tls": self.vapi_tls,
            "vapi_tls_handshakes": self.vapi_tls_handshakes,
            "vapi_tls_handshake_failures": dict(self.vapi_tls_handshake_failures),
        }

    def table(self) -> str:
        """A readable summary for a terminal."""
        leg = "wss:// (TLS)" if self.vapi_tls else "ws:// (no TLS)"
        churn = (
            f" + {self.churn_per_s:g} new calls/s of {self.churn_call_s[0]:g}-"
            f"{self.churn_call_s[1]:g} s ({self.calls_placed} placed, "
            f"{self.mean_calls:.0f} up on average)"
            if self.churn_per_s else ""
        )
        lines = [
            f"voicebridge loadtest: {self.calls} calls{churn}, {self.duration_s:g} s at full "
            f"load (ramp {self.ramp_s:g} s) against {self.target}, Vapi leg {leg}",
            "",
            f"{'':{_LABEL}}{'p50':>9}{'p99':>9}{'max':>9}{'n':>9}",
        ]
        rows = [
            ("added latency caller→agent (ms)", self.caller_to_agent),
            ("added latency agent→caller at playback (ms)", self.agent_to_caller_at_playback),
            ("added latency agent→caller at arrival (ms)", self.agent_to_caller_at_arrival),
            ("barge-in: interrupted→clear (ms)", self.barge_in),
            ("first assistant audio (ms)", self.first_audio),
            ("voice webhook answered" + (", hook" if self.route_hook else "") + " (ms)",
             self.webhook),
            ("caller: time to first word (ms)", self.time_to_first_word),
            ("caller: speech to silence (ms)", self.speech_to_silence),
        ]
        for label, value in rows:
            lines.append(
                f"{label:{_LABEL}}{_cell(value.p50)}{_cell(value.p99)}{_cell(value.max)}"
                f"{value.count:>9}"
            )
        lines += [
            "",
            "caller figures on " + (f"the latency model: {self.latency}" if self.latency
                                    else "loopback (no latency model)"),
            f"heard after a clear:        {self.heard_after_clear_ms:.0f} ms "
            f"(over {self.barge_ins} barge-ins)",
            f"dropped frames:             {self.dropped_caller_frames} caller, "
            f"{self.dropped_assistant_chunks} assistant chunks",
            f"late frames (> {LATE_AFTER_MS:g} ms):      {self.late_caller_frames} caller, "
            f"{self.late_assistant_chunks} assistant chunks",
            f"failed calls:               {self.failed_calls}"
            + (f"  ({_failures(self.failures)})" if self.failures else ""),
            f"refused (overflow message): {self.refused_calls}; drained: {self.drained_calls}",
            f"bridge CPU:                 {_maybe(self.cpu_us_per_call_second, '.0f')} µs per "
            f"call-second ({_maybe(self.bridge_cpu_pct, '.0f')} % of a core)",
            "bridge CPU split:           " + (
                "n/a" if self.cpu_split is None else
                f"{self.cpu_split.setup_ms:.1f} ms per call set-up, "
                f"{self.cpu_split.end_ms:.1f} ms per end, "
                f"{self.cpu_split.streaming_us_per_call_second:.0f} µs per call-second "
                f"streaming ({self.cpu_split.intervals} intervals fitted)"
            ),
            f"bridge RSS per call:        {_maybe(self.rss_kib_per_call, '.0f')} KiB "
            f"(idle {_maybe(self.rss_idle_kib, 'd')} KiB, loaded "
            f"{_maybe(self.rss_loaded_kib, 'd')} KiB, "
            f"{_maybe(self.rss_growth_kib, '+d')} KiB over the window)",
            f"generator CPU:              {self.generator_cpu_pct:.0f} % of a core, tick slip "
            f"p99 {_maybe(self.generator_tick_slip_p99_ms, '.1f')} ms",
        ]
        if self.vapi_tls:
            failed = self.vapi_tls_handshake_failures
            lines.append(
                f"Vapi TLS handshakes:        {self.vapi_tls_handshakes} completed, "
                f"{sum(failed.values())} failed" + (f"  ({_failures(failed)})" if failed else "")
            )
        lines += [
            "",
            "result: VALID" if self.valid
            else "result: NOT VALID (" + "; ".join(self.invalid_reasons) + ")",
        ]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        """Every field, for programs (the bench keeps these)."""
        return asdict(self)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _cell(value: float | None) -> str:
    return f"{'-':>9}" if value is None else f"{value:>9.2f}"


def _maybe(value: float | int | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _failures(failures: Mapping[str, int]) -> str:
    return ", ".join(f"{count}× {reason}" for reason, count in sorted(failures.items()))
