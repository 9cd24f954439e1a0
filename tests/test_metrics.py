"""``/metrics``, ``/healthz`` and ``/readyz`` (on the ops listener) after real calls on loopback.

Charter: loopback only, port 0, a ``trio.fail_after`` guard on every test, real
sockets and real time (a few seconds per call). The figures asserted are the ones
an operator reads on a dashboard, checked against what the bridge recorded.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import attrs
import httpx
import trio
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import SHORT_ASSISTANT, Bridge, running_bridge
from voicebridge import __version__
from voicebridge.bridge.outcome import BargeIn, CallRecord, Outcome
from voicebridge.config import Secret
from voicebridge.observability.looplag import STALL_WARNING_S, TICK_S
from voicebridge.observability.metrics import (
    MAX_STREAM_ERROR_CODES,
    OTHER_STREAM_ERROR,
    UNKNOWN_TOOL,
    BridgeMetrics,
    SandboxedProcessCollector,
)
from voicebridge.sim.caller import Speak, WaitForAssistant, WaitForAssistantDone, place_call
from voicebridge.twilio.signature import sign

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample of an exposition, keyed by (name, sorted labels)."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, *, worker: str = "0", **labels: str) -> float:
    """The sample ``name`` with exactly ``labels`` and the ``worker`` label every one has."""
    return samples[(name, tuple(sorted({**labels, "worker": worker}.items())))]


async def scrape(bridge: Bridge) -> Samples:
    async with httpx.AsyncClient() as http:
        response = await http.get(f"{bridge.ops_url}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


def record(**changes: object) -> CallRecord:
    figures: dict[str, object] = {
        "call_sid": "CA1", "stream_sid": "MZ1", "vapi_call_id": "v1",
        "outcome": Outcome.CALLER_HUNG_UP, "detail": "stop", "duration_s": 3.0,
        "frames_from_caller": 150, "frames_to_assistant": 140, "frames_dropped": 2,
        "assistant_bytes": 8000, "media_messages_to_caller": 12, "heard_ms": 900,
        "first_audio_ms": 700.0, "barge_ins": (), "caller_audio_bytes": 22400,
    }
    figures.update(changes)
    return CallRecord(**figures)  # type: ignore[arg-type]


def test_a_call_record_is_counted_once_at_its_end() -> None:
    metrics = BridgeMetrics()
    cut = BargeIn(at_s=2.0, latency_ms=1.5, heard_of_turn_ms=800, discarded_ms=200)
    metrics.call_ended(record(barge_ins=(cut, cut), webhook_to_first_audio_ms=900.0,
                              unknown_marks=3, presumed_heard_ms=200, early_barge_ins=3,
                              early_confirmed=2, early_resumed=1, route="sales"))
    metrics.call_ended(record(outcome=Outcome.TOKEN_REJECTED, frames_to_assistant=0,
                              first_audio_ms=None, frames_dropped=0))
    samples = parse(metrics.exposition(active_calls=3, admitting=True).decode())
    assert value(samples, "voicebridge_active_calls") == 3
    assert value(samples, "voicebridge_admitting") == 1
    assert value(samples, "voicebridge_calls_total", outcome="caller-hung-up", route="sales") == 1
    # A stream that never began was taken by no route.
    assert value(samples, "voicebridge_calls_total", outcome="token-rejected", route="none") == 1
    assert value(samples, "voicebridge_calls_total", outcome="shutdown", route="default") == 0
    assert value(samples, "voicebridge_media_messages_total", direction="caller_to_agent") == 140
    assert value(samples, "voicebridge_media_messages_total", direction="agent_to_caller") == 24
    assert value(samples, "voicebridge_audio_bytes_total", direction="caller_to_agent") == 44800
    assert value(samples, "voicebridge_frames_dropped_total") == 2
    assert value(samples, "voicebridge_barge_ins_total") == 2
    assert value(samples, "voicebridge_barge_in_latency_seconds_count") == 2
    assert value(samples, "voicebridge_barge_in_latency_seconds_bucket", le="0.002") == 2
    assert value(samples, "voicebridge_barge_in_latency_seconds_bucket", le="0.001") == 0
    assert value(samples, "voicebridge_first_audio_seconds_count") == 1
    assert value(samples, "voicebridge_first_audio_seconds_sum") == 0.7
    assert value(samples, "voicebridge_time_to_first_word_seconds_count") == 1
    assert value(samples, "voicebridge_time_to_first_word_seconds_sum") == 0.9
    assert value(samples, "voicebridge_unknown_marks_total") == 3
    assert value(samples, "voicebridge_presumed_heard_seconds_total") == 0.2
    assert value(samples, "voicebridge_early_barge_ins_total", result="heard") == 3
    assert value(samples, "voicebridge_early_barge_ins_total", result="confirmed") == 2
    assert value(samples, "voicebridge_early_barge_ins_total", result="resumed") == 1


def test_two_servers_in_one_process_keep_separate_metrics() -> None:
    first, second = BridgeMetrics(), BridgeMetrics()
    first.call_refused("at-capacity")
    first.webhook_rejected("/twilio/voice")
    samples = parse(second.exposition(active_calls=0, admitting=False).decode())
    assert value(samples, "voicebridge_admissions_refused_total", reason="at-capacity") == 0
    assert value(samples, "voicebridge_admitting") == 0
    samples = parse(first.exposition(active_calls=0, admitting=True).decode())
    assert value(samples, "voicebridge_admissions_refused_total", reason="at-capacity") == 1
    assert value(
        samples, "voicebridge_webhook_auth_failures_total", path="/twilio/voice"
    ) == 1


def test_event_loop_lag_is_a_histogram_a_largest_per_scrape_and_a_count_of_stalls() -> None:
    metrics = BridgeMetrics()
    for lag in (0.0, 0.0004, 0.003, 0.3, 0.0):
        metrics.loop_lag(lag)
    first = parse(metrics.exposition(active_calls=0, admitting=True).decode())
    metrics.loop_lag(0.002)
    second = parse(metrics.exposition(active_calls=0, admitting=True).decode())
    assert value(first, "voicebridge_event_loop_lag_seconds_count") == 5
    assert value(first, "voicebridge_event_loop_lag_seconds_bucket", le="0.001") == 3
    assert value(first, "voicebridge_event_loop_lag_seconds_bucket", le="0.25") == 4
    assert value(first, "voicebridge_event_loop_lag_seconds_sum") == 0.3034
    assert value(first, "voicebridge_event_loop_lag_max_seconds") == 0.3
    assert value(first, "voicebridge_event_loop_stalls_total") == 1
    # Each scrape reports the largest lag since the previous one; the rest accumulates.
    assert value(second, "voicebridge_event_loop_lag_max_seconds") == 0.002
    assert value(second, "voicebridge_event_loop_lag_seconds_count") == 6
    assert value(second, "voicebridge_event_loop_stalls_total") == 1


async def test_a_blocked_event_loop_shows_in_the_servers_metrics() -> None:
    # The server runs in this process: holding this loop holds the server's.
    # Long enough that even a wake due at the very end of a tick is a stall.
    hold_s = STALL_WARNING_S + TICK_S + 0.05
    with trio.fail_after(20):
        async with running_bridge() as bridge:
            before = await scrape(bridge)
            await trio.sleep(0.1)
            time.sleep(hold_s)  # noqa: ASYNC251 -- a blocked loop is what is measured
            after = await scrape(bridge)
    assert value(after, "voicebridge_event_loop_lag_seconds_count") > value(
        before, "voicebridge_event_loop_lag_seconds_count"
    )
    # The monitor was due at most one tick into the hold, and woke after it.
    assert value(after, "voicebridge_event_loop_lag_max_seconds") >= hold_s - TICK_S
    assert value(after, "voicebridge_event_loop_stalls_total") >= 1


async def test_metrics_after_a_call_with_a_barge_in() -> None:
    assistant = attrs.evolve(SHORT_ASSISTANT, end_after_replies=1)
    script = (
        WaitForAssistantDone(quiet_s=0.4),
        Speak("caller_1"),
        WaitForAssistant(heard_ms=800),
        Speak("caller_2"),
        WaitForAssistantDone(quiet_s=0.4),
    )
    with trio.fail_after(40):
        async with running_bridge(behaviour=assistant) as bridge:
            before = await scrape(bridge)
            report = await place_call(bridge.caller, script)
            after = await scrape(bridge)
    assert value(before, "voicebridge_calls_total", outcome="assistant-ended", route="default") == 0
    record = bridge.record(report.call_sid)
    assert record.outcome is Outcome.ASSISTANT_ENDED
    assert value(after, "voicebridge_calls_total", outcome="assistant-ended", route="default") == 1
    assert value(after, "voicebridge_active_calls") == 0
    assert value(after, "voicebridge_barge_ins_total") == len(record.barge_ins) == 1
    assert value(after, "voicebridge_barge_in_latency_seconds_count") == 1
    assert value(after, "voicebridge_barge_in_latency_seconds_sum") == (
        record.barge_ins[0].latency_ms / 1000
    )
    to_agent = {"direction": "caller_to_agent"}
    to_caller = {"direction": "agent_to_caller"}
    assert value(after, "voicebridge_media_messages_total", **to_agent) == (
        record.frames_to_assistant
    ) > 100
    assert value(after, "voicebridge_media_messages_total", **to_caller) == (
        record.media_messages_to_caller
    ) > 0
    assert value(after, "voicebridge_audio_bytes_total", **to_agent) == (
        160 * record.frames_to_assistant
    )
    assert value(after, "voicebridge_audio_bytes_total", **to_caller) == record.assistant_bytes
    assert value(after, "voicebridge_frames_dropped_total") == 0
    assert value(after, "voicebridge_vapi_create_seconds_count") == 1
    assert value(after, "voicebridge_first_audio_seconds_count") == 1
    # The voice webhook → first audio sent: after the stream's start, before the caller
    # heard it (the token's time is to the millisecond).
    first_word_ms = record.webhook_to_first_audio_ms
    assert first_word_ms is not None and report.first_audio_after_webhook_ms is not None
    assert record.first_audio_ms is not None
    assert record.first_audio_ms < first_word_ms <= report.first_audio_after_webhook_ms + 1
    assert value(after, "voicebridge_time_to_first_word_seconds_count") == 1
    assert value(after, "voicebridge_time_to_first_word_seconds_sum") == first_word_ms / 1000
    # Sampled: one caller frame a second, one assistant audio message in ten.
    caller_samples = value(after, "voicebridge_added_latency_seconds_count", **to_agent)
    assert 1 <= caller_samples <= record.frames_to_assistant // 50
    assert value(after, "voicebridge_added_latency_seconds_count", **to_caller) >= 1
    assert value(after, "voicebridge_added_latency_seconds_bucket", le="+Inf", **to_agent) == (
        caller_samples
    )


async def test_refusals_and_rejected_webhooks_are_counted() -> None:
    with trio.fail_after(20):
        async with running_bridge(server={"max_concurrent_calls": 1}) as bridge:
            url = bridge.config.server.public_url + "/twilio/voice"

            async def ring(call_sid: str, signature: str | None = None) -> httpx.Response:
                form = {"CallSid": call_sid, "AccountSid": bridge.caller.account_sid,
                        "From": "+15550100001", "To": "+15550100002"}
                if signature is None:
                    signature = sign(url, form, bridge.caller.auth_token)
                return await http.post(url, data=form, headers={"X-Twilio-Signature": signature})

            async with httpx.AsyncClient() as http:
                assert (await http.get(f"{bridge.ops_url}/healthz")).status_code == 200
                assert (await http.get(f"{bridge.ops_url}/readyz")).status_code == 200
                forged = await ring("CA" + "0" * 32, signature="forged")
                # The first call rings (it holds the only slot); the second is refused.
                admitted = await ring("CA" + "1" * 32)
                refused = await ring("CA" + "2" * 32)
                ready = await http.get(f"{bridge.ops_url}/readyz")
            samples = await scrape(bridge)
    assert forged.status_code == 403
    assert "<Connect" in admitted.text
    assert "<Connect" not in refused.text
    assert ready.status_code == 503
    assert value(samples, "voicebridge_admitting") == 0
    assert value(samples, "voicebridge_admissions_refused_total", reason="at-capacity") == 1
    assert value(samples, "voicebridge_admissions_refused_total", reason="draining") == 0
    assert value(
        samples, "voicebridge_webhook_auth_failures_total", path="/twilio/voice"
    ) == 1


def test_stream_errors_are_counted_by_code_within_a_bounded_label_set() -> None:
    metrics = BridgeMetrics()
    metrics.stream_error("31920")
    metrics.stream_error("31920")
    metrics.stream_error("unknown")
    # A peer inventing codes cannot grow the series without bound.
    for code in range(10000, 10000 + MAX_STREAM_ERROR_CODES + 10):
        metrics.stream_error(str(code))
    samples = parse(metrics.exposition(active_calls=0, admitting=True).decode())
    counted = {
        dict(labels)["code"]: count
        for (name, labels), count in samples.items()
        if name == "voicebridge_stream_errors_total"
    }
    assert (counted["31920"], counted["unknown"]) == (2, 1)
    assert len(counted) == MAX_STREAM_ERROR_CODES + 1
    assert counted[OTHER_STREAM_ERROR] == 12
    assert sum(counted.values()) == 3 + MAX_STREAM_ERROR_CODES + 10


def test_every_sample_has_the_worker_label_and_no_created_series() -> None:
    metrics = BridgeMetrics(worker="3")
    metrics.call_ended(record())
    text = metrics.exposition(active_calls=0, admitting=True, max_calls=7).decode()
    families = list(text_string_to_metric_families(text))
    samples = [sample for family in families for sample in family.samples]
    assert samples and all(sample.labels.get("worker") == "3" for sample in samples)
    # A counter's _created series reads like a count of calls: none is exported.
    assert not [sample.name for sample in samples if sample.name.endswith("_created")]
    assert value(
        parse(text), "voicebridge_calls_total", worker="3", outcome="caller-hung-up", route="none"
    ) == 1


def test_the_standard_collectors_build_info_and_capacity_are_exported() -> None:
    started = time.time()
    samples = parse(
        BridgeMetrics().exposition(active_calls=2, admitting=True, max_calls=40).decode()
    )
    names = {name for name, _ in samples}
    # Process, platform and garbage-collector series, as the default registry has them.
    assert {"process_resident_memory_bytes", "process_open_fds", "process_max_fds",
            "process_cpu_seconds_total", "python_info",
            "python_gc_collections_total"} <= names
    # This process started before the test did, and not long before (the boot time is
    # taken from the clocks, not from /proc/stat, which the unit's sandbox hides).
    start = value(samples, "process_start_time_seconds")
    assert started - 3600 < start <= started
    [build] = [labels for name, labels in samples if name == "voicebridge_build_info"]
    assert dict(build)["version"] == __version__
    assert value(samples, "voicebridge_max_concurrent_calls") == 40
    assert value(samples, "voicebridge_active_calls") == 2


def test_assistant_leg_failures_are_counted_by_kind() -> None:
    metrics = BridgeMetrics()
    failed = {"outcome": Outcome.ASSISTANT_LEG_FAILED, "detail": "x"}
    for kind in ("auth", "auth", "unresponsive", "ended"):
        metrics.call_ended(record(leg_failure=kind, **failed))
    metrics.call_ended(record())
    samples = parse(metrics.exposition(active_calls=0, admitting=True).decode())
    counted = {
        dict(labels)["kind"]: count
        for (name, labels), count in samples.items()
        if name == "voicebridge_assistant_leg_failures_total"
    }
    assert counted == {
        "auth": 2, "rejected": 0, "server": 0, "timeout": 0, "refused": 0, "dropped": 0,
        "unresponsive": 1, "protocol": 0, "ended": 1,
    }


def test_reloads_set_the_last_result_and_time() -> None:
    now = [1000.0]
    metrics = BridgeMetrics(wall_clock=lambda: now[0])
    first = parse(metrics.exposition(active_calls=0, admitting=True).decode())
    now[0] = 1060.0
    metrics.config_loaded("refused")
    refused = parse(metrics.exposition(active_calls=0, admitting=True).decode())
    now[0] = 1120.0
    metrics.config_loaded("applied")
    applied = parse(metrics.exposition(active_calls=0, admitting=True).decode())
    # The start is a successful load.
    assert value(first, "voicebridge_config_last_reload_successful") == 1
    assert value(first, "voicebridge_config_last_reload_timestamp_seconds") == 1000.0
    assert value(refused, "voicebridge_config_last_reload_successful") == 0
    assert value(refused, "voicebridge_config_last_reload_timestamp_seconds") == 1060.0
    assert value(applied, "voicebridge_config_last_reload_successful") == 1
    assert value(applied, "voicebridge_config_last_reload_timestamp_seconds") == 1120.0
    assert value(applied, "voicebridge_config_reloads_total", result="refused") == 1
    assert value(applied, "voicebridge_config_reloads_total", result="applied") == 1


def test_tool_calls_and_dropped_log_entries_are_counted() -> None:
    dropped = [0]
    metrics = BridgeMetrics(dropped_log_entries=lambda: dropped[0])
    metrics.tool_called("lookup", "ok")
    metrics.tool_called("lookup", "ok")
    metrics.tool_called("lookup", "error")
    metrics.tool_called(UNKNOWN_TOOL, "error")
    dropped[0] = 5
    samples = parse(metrics.exposition(active_calls=0, admitting=True).decode())
    assert value(samples, "voicebridge_tool_calls_total", tool="lookup", result="ok") == 2
    assert value(samples, "voicebridge_tool_calls_total", tool="lookup", result="error") == 1
    assert value(samples, "voicebridge_tool_calls_total", tool=UNKNOWN_TOOL, result="error") == 1
    assert value(samples, "voicebridge_log_entries_dropped_total") == 5


async def test_a_revoked_vapi_key_shows_as_auth_failures_of_the_assistant_leg() -> None:
    script = (WaitForAssistantDone(quiet_s=0.3),)
    # The bridge's key is not the one the simulated Vapi accepts (401).
    wrong = {"vapi_api_key": Secret("revoked-" + "0" * 16)}
    with trio.fail_after(30):
        async with running_bridge(credentials=wrong) as bridge:
            reports = [await place_call(bridge.caller, script) for _ in range(2)]
            samples = await scrape(bridge)
    assert all(bridge.record(r.call_sid).outcome is Outcome.ASSISTANT_LEG_FAILED for r in reports)
    assert value(samples, "voicebridge_assistant_leg_failures_total", kind="auth") == 2
    assert value(
        samples, "voicebridge_calls_total", outcome="assistant-leg-failed", route="default"
    ) == 2


async def test_call_control_counts_refused_webhooks_and_tool_calls_by_result() -> None:
    from tests.control.test_webhook_e2e import HMAC_CREDENTIAL, sections
    from voicebridge.control.routes import WEBHOOK_PATH, vapi_server_override
    from voicebridge.sim.server_messages import SimToolCall, send_tool_calls, tool_calls_body

    with trio.fail_after(20):
        async with running_bridge(**sections("hmac")) as bridge:
            server = vapi_server_override(bridge.config)
            assert server is not None
            overrides = {"server": server}
            for index, name in enumerate(("lookup_order", "lookup_order", "explode", "nope")):
                tool = SimToolCall(name=name, arguments='{"order": 7}')
                [exchange] = await send_tool_calls(
                    "vapi-m", overrides, HMAC_CREDENTIAL, tool, index
                )
                assert exchange.status == 200
            unsigned = tool_calls_body("vapi-m", overrides, SimToolCall(name="lookup_order"), 9)
            async with httpx.AsyncClient() as http:
                refused = await http.post(bridge.url + WEBHOOK_PATH, content=unsigned)
            samples = await scrape(bridge)
    assert refused.status_code == 401
    assert value(samples, "voicebridge_webhook_auth_failures_total", path=WEBHOOK_PATH) == 1
    assert value(samples, "voicebridge_webhook_auth_failures_total", path="/twilio/voice") == 0
    tools = {
        (dict(labels)["tool"], dict(labels)["result"]): count
        for (name, labels), count in samples.items()
        if name == "voicebridge_tool_calls_total"
    }
    assert tools == {
        ("lookup_order", "ok"): 2, ("explode", "error"): 1,
        (UNKNOWN_TOOL, "error"): 1, (UNKNOWN_TOOL, "ok"): 0,
    }


def test_process_metrics_survive_a_proc_without_stat(tmp_path: Path) -> None:
    # What the unit's ProcSubset=pid leaves: /proc/<pid>/…, no /proc/stat. A stand-in
    # /proc with only this process in it.
    (tmp_path / "self").symlink_to(f"/proc/{os.getpid()}")

    def collected(collector_class: type[ProcessCollector]) -> set[str]:
        registry = CollectorRegistry()
        collector_class(proc=str(tmp_path), registry=registry)
        return {metric.name for metric in registry.collect()}

    # prometheus_client's own collector reports nothing there (the boot time is missing)…
    assert collected(ProcessCollector) == set()
    # …the bridge's reports everything, and the start time is this process's.
    assert collected(SandboxedProcessCollector) >= {
        "process_start_time_seconds", "process_resident_memory_bytes", "process_cpu_seconds",
        "process_open_fds",
    }
    sandboxed, real = CollectorRegistry(), CollectorRegistry()
    SandboxedProcessCollector(proc=str(tmp_path), registry=sandboxed)
    ProcessCollector(registry=real)  # where /proc/stat is readable, as here
    start = sandboxed.get_sample_value("process_start_time_seconds")
    expected = real.get_sample_value("process_start_time_seconds")
    assert start is not None and expected is not None
    assert abs(start - expected) < 1
