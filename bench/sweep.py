"""The capacity benchmark: sweep the number of calls, with the physical-limit references.

    .venv/bin/python bench/sweep.py                    # writes docs/performance.md + plots
    .venv/bin/python bench/sweep.py --duration 10 --step 50 --out /tmp/perf.md

For N = start, start+step, … it runs ``voicebridge loadtest`` (the bridge in its own
process pinned to ``--bridge-cpu``, the generator on the other cores) until the p99
added latency of either direction (assistant → caller at the caller's playback) passes
``--limit-ms`` (20 ms), a call fails, or the
generator itself saturates. At every N it runs the same traffic through a bare trio
TCP relay and a bare trio-websocket relay (``bench/relays.py``), pinned the same way:
what the machine and the libraries cost per message, which no bridge can beat. It
then writes a Markdown report (a summary line: every target held up to which load, and
where the bridge reached 80 % of its core; the table, the ratios to the references, the
machine and its load) and two PNG plots (latency vs calls, CPU per call vs calls) beside it.

With ``--churn R`` every run also places R new calls a second, each lasting
``--churn-call-s`` (10–40 s by default), on top of its N long ones; with
``--churn-sweep R1,R2,…`` the sweep holds N at ``--start`` and varies the churn instead
(``--start 0``: churn alone). Each row reports the voice webhook's answer time and the
bridge's CPU split between a call's set-up and its streaming (``loadtest.cpu``).

    .venv/bin/python bench/sweep.py --start 50 --churn-sweep 0,2,4,6 --out /tmp/churn.md

Figures come from one run each; they are printed, never asserted.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import trio

from voicebridge.loadtest.cli import seconds_range
from voicebridge.loadtest.generator import BridgeTarget, LoadGenerator
from voicebridge.loadtest.process import BridgeProcess
from voicebridge.loadtest.report import GENERATOR_SATURATED_PCT, LoadReport
from voicebridge.loadtest.run import LoadTestOptions, Target, TargetFactory, run_loadtest

HERE = Path(__file__).resolve().parent
RELAYS = HERE / "relays.py"
#: Hand-written: what the profiles showed and which levers were measured (kept or not).
FINDINGS = HERE / "findings.md"
REFERENCES = {"tcp": "bare trio TCP relay", "ws": "bare trio-websocket relay"}
#: The targets of issue 5 for one bridge process on one core.
TARGET_P99_MS = 10.0
TARGET_BARGE_IN_P99_MS = 5.0
TARGET_RSS_KIB = 150.0
#: The share of its core (percent) at which the bridge is taken to be near its floor.
CORE_SHARE_PCT = 80.0
#: The two directions of added latency the targets judge: assistant → caller at the
#: caller's playback (``loadtest.generator.LoadGenerator``), caller → assistant at arrival.
JUDGED = ("caller_to_agent", "agent_to_caller_at_playback")


def relay_factory(kind: str, cpu: int | None) -> TargetFactory:
    """Starts ``bench/relays.py kind`` in place of the bridge."""

    @asynccontextmanager
    async def start(generator: LoadGenerator) -> AsyncIterator[Target]:
        relay = await BridgeProcess.start(
            assistant_url=generator.base_url, assistant_key=generator.api_key, auth_token="",
            cpu=cpu, command=[sys.executable, str(RELAYS), kind],
        )
        try:
            target = BridgeTarget(host="127.0.0.1", port=relay.port, public_url=None, relay=True)
            yield Target(target, relay.pid, REFERENCES[kind])
        finally:
            with trio.CancelScope(shield=True):
                await relay.stop()

    return start


def _worst_p99(report: LoadReport) -> float:
    values = [report.caller_to_agent.p99, report.agent_to_caller_at_playback.p99]
    return max(value for value in values if value is not None) if any(
        value is not None for value in values) else float("inf")


def sweep(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run the sweep; one row per N with the bridge's and the references' reports."""
    rows: list[dict[str, Any]] = []
    steps = (
        [(args.start, rate) for rate in args.churn_sweep] if args.churn_sweep
        else [(n, args.churn) for n in range(args.start, args.max + 1, args.step)]
    )
    for calls, churn in steps:
        options = LoadTestOptions(calls=calls, duration_s=args.duration,
                                  bridge_cpu=args.bridge_cpu, seed=args.seed,
                                  churn_per_s=churn, churn_call_s=args.churn_call_s,
                                  shed_loop_lag_ms=args.shed_loop_lag_ms,
                                  edge_barge_in=args.edge_barge_in)
        print(f"--- {calls} calls + {churn:g} new a second: voicebridge", flush=True)
        bridge = trio.run(run_loadtest, options)
        print(bridge.table(), flush=True)
        row: dict[str, Any] = {"calls": calls, "churn": churn, "bridge": bridge.to_json()}
        for kind in REFERENCES:
            print(f"--- {calls} calls: {REFERENCES[kind]}", flush=True)
            reference = trio.run(
                partial(run_loadtest, options,
                        target_factory=relay_factory(kind, args.bridge_cpu))
            )
            row[kind] = reference.to_json()
        rows.append(row)
        worst = _worst_p99(bridge)
        # A row whose generator slipped is kept (marked not valid); a saturated
        # generator cannot load more calls, so the sweep ends there.
        saturated = bridge.generator_cpu_pct > GENERATOR_SATURATED_PCT
        if bridge.failed_calls or worst > args.limit_ms or saturated:
            row["stopped"] = (
                f"{bridge.failed_calls} failed calls" if bridge.failed_calls
                else f"p99 {worst:.1f} ms > {args.limit_ms:g} ms" if worst > args.limit_ms
                else f"the generator used {bridge.generator_cpu_pct:.0f} % of its core"
            )
            break
    return rows


def machine() -> dict[str, str]:
    """What the figures were measured on, and how busy it was."""
    model = "unknown"
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    load = " ".join(f"{value:.2f}" for value in os.getloadavg())
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": f"{model}, {os.cpu_count()} cores",
        "load average before": load,
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


def _get(row: dict[str, Any], who: str, *path: str) -> Any:
    value: Any = row.get(who)
    for key in path:
        if value is None:
            return None
        value = value.get(key)
    return value


def _a2c(row: dict[str, Any], who: str, figure: str) -> dict[str, float | None]:
    """Assistant → caller ``at_playback`` or ``at_arrival`` (p50, p99, max) of one run.

    Rows saved before the playback figure existed have the arrival one alone, as
    ``agent_to_caller``; their playback figure reads as not measured."""
    added = _get(row, who, "added_latency_ms") or {}
    value = added.get(f"agent_to_caller_{figure}")
    if value is None and figure == "at_arrival":
        value = added.get("agent_to_caller")
    return value or {"p50": None, "p99": None, "max": None}


def _f(value: float | None, spec: str = ".1f") -> str:
    return "–" if value is None else format(value, spec)


def capacity(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The largest N that met the targets, and CPU-bound capacity per core."""
    frames_met = [
        row["calls"] for row in rows
        if row["bridge"]["valid"] and not row["bridge"]["failed_calls"]
        and not row["bridge"]["dropped_frames"]
        and max(_get(row, "bridge", "added_latency_ms", d, "p99") or 1e9
                for d in JUDGED) <= TARGET_P99_MS
    ]
    met = [
        row["calls"] for row in rows
        if row["calls"] in frames_met
        and (_get(row, "bridge", "barge_in_ms", "p99") or 0) <= TARGET_BARGE_IN_P99_MS
    ]
    last = rows[-1]["bridge"] if rows else None
    return {
        "max_calls_meeting_targets": max(met) if met else None,
        "max_calls_meeting_frame_targets": max(frames_met) if frames_met else None,
        "cpu_bound_calls_per_core": (
            1e6 / last["cpu_us_per_call_second"]
            if last and last["cpu_us_per_call_second"] else None
        ),
    }


def missed_targets(row: dict[str, Any]) -> list[str]:
    """The targets the bridge missed in one row, each with its figure; [] if none.

    p99 added latency ≤ ``TARGET_P99_MS`` each way (assistant → caller at playback),
    barge-in p99 ≤ ``TARGET_BARGE_IN_P99_MS``, nothing dropped (no frame, no failed
    call), nothing heard after a clear. A latency that was not measured misses; a row
    without barge-ins misses nothing for them.
    """
    bridge = row["bridge"]
    missed = []
    for direction, name in zip(JUDGED, ("c→a", "a→c at playback"), strict=True):
        p99 = _get(row, "bridge", "added_latency_ms", direction, "p99")
        if p99 is None or p99 > TARGET_P99_MS:
            missed.append(f"{name} p99 {_f(p99, '.1f')} ms > {TARGET_P99_MS:g} ms")
    barge_in = _get(row, "bridge", "barge_in_ms", "p99")
    if barge_in is not None and barge_in > TARGET_BARGE_IN_P99_MS:
        missed.append(f"barge-in p99 {barge_in:.1f} ms > {TARGET_BARGE_IN_P99_MS:g} ms")
    if bridge["dropped_frames"]:
        missed.append(f"{bridge['dropped_frames']} frames dropped")
    if bridge["failed_calls"]:
        missed.append(f"{bridge['failed_calls']} calls failed")
    if bridge["heard_after_clear_ms"]:
        missed.append(f"{bridge['heard_after_clear_ms']:.0f} ms heard after a clear")
    return missed


def core_share_load(rows: list[dict[str, Any]], share_pct: float = CORE_SHARE_PCT) -> float | None:
    """The calls at which the bridge uses ``share_pct`` of its core, interpolated linearly
    between the two rows around it (the first row's calls if it already does); None
    where no row reaches it. Rows without the bridge's CPU are left out."""
    measured: list[tuple[int, float]] = [
        (row["calls"], row["bridge"]["bridge_cpu_pct"]) for row in rows
        if row["bridge"].get("bridge_cpu_pct") is not None
    ]
    below: tuple[int, float] | None = None
    for calls, pct in measured:
        if pct >= share_pct:
            if below is None or pct == below[1]:
                return float(calls)
            return below[0] + (share_pct - below[1]) * (calls - below[0]) / (pct - below[1])
        below = (calls, pct)
    return None


def floor_summary(rows: list[dict[str, Any]], share_pct: float = CORE_SHARE_PCT) -> str:
    """One line: up to which load every target held, and where the bridge reached
    ``share_pct`` of its core. Only rows up to that load are judged (all rows when it
    was not reached); the first that missed a target is named, with what it missed."""
    if not rows:
        return "no rows"
    at = core_share_load(rows, share_pct)
    judged = [row for row in rows if at is None or row["calls"] <= at]
    core = (
        f"the bridge reached {share_pct:g} % of its core at ≈{at:.0f} calls" if at is not None
        else f"{share_pct:g} % of the bridge's core not reached up to {rows[-1]['calls']} calls"
    )
    for row in judged:
        missed = missed_targets(row)
        if missed:
            return f"a target was missed at {row['calls']} calls ({'; '.join(missed)}); {core}"
    return f"every target held up to {judged[-1]['calls']} calls; {core}"


def over_relay_summary(rows: list[dict[str, Any]], share_pct: float = CORE_SHARE_PCT) -> str:
    """One line: the most the bridge's p99 exceeded the bare TCP relay's in the same row,
    each way, over the rows ``floor_summary`` judges. The relay carries the same traffic
    from the same generator on the same kernel, so its p99 is the measurement's own
    floor at that load; what the bridge adds to it is the bridge's."""
    at = core_share_load(rows, share_pct)
    judged = [
        row for row in rows
        if (at is None or row["calls"] <= at) and row.get("tcp") is not None
    ]
    if not judged:
        return "no row with the bare TCP relay to compare with"
    worst: list[str] = []
    for direction, name in zip(JUDGED, ("c→a", "a→c at playback"), strict=True):
        over = [
            _get(row, "bridge", "added_latency_ms", direction, "p99")
            - _get(row, "tcp", "added_latency_ms", direction, "p99")
            for row in judged
            if _get(row, "bridge", "added_latency_ms", direction, "p99") is not None
            and _get(row, "tcp", "added_latency_ms", direction, "p99") is not None
        ]
        worst.append(f"{_f(max(over) if over else None, '.1f')} ms {name}")
    return (
        f"p99 over the bare TCP relay's in the same row, up to {judged[-1]['calls']} calls: "
        f"at most {', '.join(worst)}"
    )


def write_report(rows: list[dict[str, Any]], out: Path, info: dict[str, str],
                 args: argparse.Namespace) -> None:
    """docs/performance.md: the table, ratios, the machine, the plots."""
    plots = plot(rows, out.parent)
    cap = capacity(rows)
    lines = [
        "# Performance: calls per core, added latency, barge-in, CPU and memory per call",
        "",
        "Written by `bench/sweep.py` (see the README); every figure comes from one run of",
        "`voicebridge loadtest` on the machine below. The bridge ran in its own process",
        f"pinned to CPU {args.bridge_cpu}, the load generator on the other core. Each row",
        f"held N calls for {args.duration:g} s after a ramp; latencies are measured over",
        "that window from the sequence numbers the simulated peers embed in the audio",
        "(frame in → frame out, both peers on one clock; a frame in is timed at its",
        "arrival in the kernel, which stamps every read, so the generator's own loop",
        "adds nothing). Assistant → caller is judged",
        "at the caller's playback: when each chunk starts to play through a model of",
        "Twilio's buffer, against when it would over an ideal wire; its time to",
        "arrival at the caller is reported beside it. The references carry the",
        "same traffic (caller frames one way; assistant audio, a mark per chunk and the",
        "mark echoes the other) through a relay that does nothing else.",
        "",
        "## Machine",
        "",
    ]
    lines += [f"- {key}: {value}" for key, value in info.items()]
    lines += [
        "",
        "## Result",
        "",
        f"- {floor_summary(rows)}",
        f"- {over_relay_summary(rows)}",
        f"- Most concurrent calls meeting every target (p99 added ≤ {TARGET_P99_MS:g} ms each "
        f"way, 0 dropped, barge-in p99 ≤ {TARGET_BARGE_IN_P99_MS:g} ms): "
        f"**{cap['max_calls_meeting_targets'] or 'none'}**",
        f"- Most concurrent calls meeting the frame targets (p99 added ≤ {TARGET_P99_MS:g} ms "
        f"each way, 0 dropped), barge-in aside: "
        f"**{cap['max_calls_meeting_frame_targets'] or 'none'}**",
        f"- CPU-bound ceiling (1 s of CPU / CPU per call-second at the last N): "
        f"{_f(cap['cpu_bound_calls_per_core'], '.0f')} calls per core",
    ]
    if rows and "stopped" in rows[-1]:
        lines.append(f"- The sweep stopped at {rows[-1]['calls']} calls: {rows[-1]['stopped']}")
    lines += [
        "",
        "## Sweep",
        "",
        "| calls (+ new/s) | c→a p50 / p99 / max ms | a→c at playback p50 / p99 / max ms "
        "| a→c at arrival p99 ms | barge-in p50 / p99 ms "
        "| heard after clear | dropped | failed | CPU µs/call-s | core % "
        "| RSS KiB/call (growth over the window) "
        "| webhook p50 / p99 / max ms | set-up CPU ms/call | streaming µs/call-s | refused "
        "| valid |",
        "|---:|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---|",
    ]
    for row in rows:
        b = row["bridge"]
        c2a = b["added_latency_ms"]["caller_to_agent"]
        a2c = _a2c(row, "bridge", "at_playback")
        arrival = _a2c(row, "bridge", "at_arrival")
        hook = b.get("webhook_answer_ms") or {"p50": None, "p99": None, "max": None}
        split = b.get("cpu_split") or {}
        churn = f" (+{row['churn']:g}/s)" if row.get("churn") else ""
        lines.append(
            f"| {row['calls']}{churn} | {_f(c2a['p50'], '.2f')} / {_f(c2a['p99'], '.2f')} / "
            f"{_f(c2a['max'], '.1f')} | {_f(a2c['p50'], '.2f')} / {_f(a2c['p99'], '.2f')} / "
            f"{_f(a2c['max'], '.1f')} | {_f(arrival['p99'], '.2f')} | "
            f"{_f(b['barge_in_ms']['p50'], '.2f')} / "
            f"{_f(b['barge_in_ms']['p99'], '.2f')} | {_f(b['heard_after_clear_ms'], '.0f')} ms "
            f"| {b['dropped_frames']} | {b['failed_calls']} | "
            f"{_f(b['cpu_us_per_call_second'], '.0f')} | {_f(b['bridge_cpu_pct'], '.0f')} | "
            f"{_f(b['rss_kib_per_call'], '.0f')} ({_f(b['rss_growth_kib'], '+d')} KiB) | "
            f"{_f(hook['p50'], '.1f')} / {_f(hook['p99'], '.1f')} / {_f(hook['max'], '.0f')} | "
            f"{_f(split.get('setup_ms_per_call'), '.1f')} | "
            f"{_f(split.get('streaming_us_per_call_second'), '.0f')} | "
            f"{b.get('refused_calls', 0)} | "
            f"{'yes' if b['valid'] else 'no'} |"
        )
    lines += [
        "",
        "## The references: the same traffic through a bare relay",
        "",
        "| calls | bridge CPU µs/call-s | TCP relay µs/call-s | ws relay µs/call-s "
        "| bridge ÷ TCP | bridge ÷ ws | p99 c→a ms bridge / TCP / ws "
        "| p99 a→c at playback ms bridge / TCP / ws |",
        "|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for row in rows:
        cpu = {who: _get(row, who, "cpu_us_per_call_second") for who in ("bridge", "tcp", "ws")}
        p99 = {
            d: [_get(row, who, "added_latency_ms", d, "p99") for who in ("bridge", "tcp", "ws")]
            for d in JUDGED
        }
        lines.append(
            f"| {row['calls']} | {_f(cpu['bridge'], '.0f')} | {_f(cpu['tcp'], '.0f')} | "
            f"{_f(cpu['ws'], '.0f')} | {_ratio(cpu['bridge'], cpu['tcp'])} | "
            f"{_ratio(cpu['bridge'], cpu['ws'])} | "
            + " / ".join(_f(v, ".2f") for v in p99["caller_to_agent"]) + " | "
            + " / ".join(_f(v, ".2f") for v in p99["agent_to_caller_at_playback"]) + " |"
        )
    if FINDINGS.exists():
        lines += ["", FINDINGS.read_text().rstrip()]
    lines += ["", "## Plots", ""]
    lines += [f"![{title}]({name})" for title, name in plots]
    lines += [
        "",
        "## Raw figures",
        "",
        "<details><summary>every run's <code>--json</code></summary>",
        "",
        "```json",
        json.dumps(rows, indent=1),
        "```",
        "",
        "</details>",
        "",
    ]
    out.write_text("\n".join(lines))


def _ratio(numerator: float | None, denominator: float | None) -> str:
    if not numerator or not denominator:
        return "–"
    return f"{numerator / denominator:.1f}×"


def plot(rows: list[dict[str, Any]], folder: Path) -> list[tuple[str, str]]:
    """Two PNGs beside the report: latency vs calls, CPU per call vs calls."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    calls = [row["calls"] for row in rows]
    who_names = {"bridge": "voicebridge", "tcp": REFERENCES["tcp"], "ws": REFERENCES["ws"]}
    colours = {"bridge": "tab:blue", "tcp": "tab:green", "ws": "tab:purple"}

    def save(figure: Any, axes: Any, ylabel: str, title: str, name: str) -> str:
        axes.set_xlabel("concurrent calls (one process, one core)")
        axes.set_ylabel(ylabel)
        axes.set_title(title)
        axes.legend(fontsize="small")
        axes.grid(True, alpha=0.3)
        figure.tight_layout()
        figure.savefig(folder / name, dpi=100)
        plt.close(figure)
        return name

    figure, axes = plt.subplots(figsize=(8, 4.5))
    for who, name in who_names.items():
        for direction, style in zip(JUDGED, ("-", "--"), strict=True):
            values = [_get(row, who, "added_latency_ms", direction, "p99") for row in rows]
            axes.plot(calls, values, style, marker="o", color=colours[who],
                      label=f"{name}, {direction.replace('_', ' ')}")
    axes.axhline(TARGET_P99_MS, color="grey", linestyle=":", label="target p99 (10 ms)")
    axes.set_yscale("log")
    latency_png = save(figure, axes, "p99 added latency (ms)",
                       "p99 added latency per frame vs concurrent calls",
                       "performance-latency.png")

    figure, axes = plt.subplots(figsize=(8, 4.5))
    for who, name in who_names.items():
        values = [_get(row, who, "cpu_us_per_call_second") for row in rows]
        axes.plot(calls, values, marker="o", color=colours[who], label=name)
    axes.set_ylim(bottom=0)
    cpu_png = save(figure, axes, "CPU µs per call-second",
                   "CPU per call vs concurrent calls (1,000,000 µs = one core)",
                   "performance-cpu.png")
    return [("p99 added latency vs calls", latency_png), ("CPU per call vs calls", cpu_png)]


def _rates(text: str) -> list[float]:
    return [float(rate) for rate in text.split(",")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--start", type=int, default=25)
    parser.add_argument("--step", type=int, default=25)
    parser.add_argument("--max", type=int, default=400)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--limit-ms", type=float, default=20.0)
    parser.add_argument("--bridge-cpu", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--churn", type=float, default=0.0,
                        help="new calls a second on top of each row's N (default 0)")
    parser.add_argument("--churn-sweep", type=_rates, default=None, metavar="R1,R2,…",
                        help="vary the churn instead, N held at --start")
    parser.add_argument("--churn-call-s", type=seconds_range, default=(10.0, 40.0),
                        metavar="MIN,MAX", help="how long each churn call lasts (10,40)")
    parser.add_argument("--shed-loop-lag-ms", type=int, default=None,
                        help="the bridge's server.shed_loop_lag_ms (default: the product's)")
    parser.add_argument("--edge-barge-in", action="store_true",
                        help="the bridge runs [bridge] edge_barge_in (the detector's CPU)")
    parser.add_argument("--out", type=Path, default=HERE.parent / "docs" / "performance.md")
    parser.add_argument("--rows", type=Path, help="also write the rows (and machine) as JSON")
    parser.add_argument("--from-rows", type=Path,
                        help="only write the report, from the JSON a run wrote with --rows")
    args = parser.parse_args()
    try:
        import matplotlib  # noqa: F401  (the plots; checked before a long sweep, not after it)
    except ImportError:
        parser.error("the plots need matplotlib: .venv/bin/pip install -e '.[bench]'")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.from_rows:
        saved = json.loads(args.from_rows.read_text())
        write_report(saved["rows"], args.out, saved["machine"], args)
        print(f"wrote {args.out}")
        return 0
    info = machine()
    rows = sweep(args)
    info["load average after"] = " ".join(f"{value:.2f}" for value in os.getloadavg())
    if args.rows:
        args.rows.write_text(json.dumps({"machine": info, "rows": rows}, indent=1))
    write_report(rows, args.out, info, args)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
