"""Prometheus metrics of the bridge: what an operator scrapes at ``GET /metrics``.

Per-frame work stays out of the hot path. A call's figures (outcome, frames and
bytes each way, drops, barge-ins, first audio) are added once, when it ends, from
its ``CallRecord``; the bridge-added frame latency is *sampled* by the call (one
frame in so many, see ``voicebridge.bridge.call``); the gauges are read from the
call registry when ``/metrics`` is scraped. Label children are bound once here, so
no update looks a label up.

Every metric lives in this object's own ``CollectorRegistry`` (not the process-wide
default), so that several servers in one process (tests, the demo) never collide. That
registry also carries the standard ``process_*`` and ``python_*`` collectors, and puts a
``worker`` label on every sample: with one process per core, each worker is scraped on
its own ops socket, and a query can tell them apart (or sum them) even where the
scrape's ``instance`` label was rewritten.

Counters and histograms export no ``_created`` series (``disable_created_metrics``): an
operator reads ``voicebridge_calls_created{outcome=…}`` as a call count, and
``process_start_time_seconds`` already says when every counter started.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any, Final, Literal, get_args

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from voicebridge import __version__
from voicebridge.bridge.call import AssistantCall, AssistantConnector
from voicebridge.bridge.early import EarlyFate
from voicebridge.bridge.outcome import CallRecord, LegFailure, Outcome
from voicebridge.bridge.registry import RefusalReason
from voicebridge.observability.alarms import AuthFailureAlarm
from voicebridge.observability.journald import installed_dropped_count
from voicebridge.observability.looplag import is_stall
from voicebridge.sockets import PingableSocket

# Process-wide in prometheus_client; every registry of this process is the bridge's.
disable_created_metrics()  # type: ignore[no-untyped-call]

#: The media type of the text exposition format ``/metrics`` answers with.
CONTENT_TYPE: Final = CONTENT_TYPE_LATEST

#: Bridge-added latency and barge-in latency, in seconds: sub-millisecond up to a second.
#: The targets (10 ms per frame, 5 ms per barge-in) fall on bucket edges.
FAST_BUCKETS_S: Final = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0,
)
#: Vapi's ``POST /call``: typically a few hundred ms; the create deadline is seconds.
CREATE_BUCKETS_S: Final = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0)
#: Stream start → first assistant audio: create + connect + the assistant's first words.
FIRST_AUDIO_BUCKETS_S: Final = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
#: Event-loop lag: a healthy loop wakes its monitor well under a millisecond late; 50 ms
#: is what a call's audio tolerates, 0.25 s a stall (``looplag.STALL_WARNING_S``), and
#: seconds are what precedes a watchdog kill.
LOOP_LAG_BUCKETS_S: Final = (
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)

#: Distinct Twilio error codes ``voicebridge_stream_errors`` keeps a series for: the
#: Media Streams codes (319xx) are a few dozen; more than this is not Twilio's set.
MAX_STREAM_ERROR_CODES: Final = 64
#: The ``code`` label of stream errors past ``MAX_STREAM_ERROR_CODES``.
OTHER_STREAM_ERROR: Final = "other"
#: The decision hook's answer time: its deadline is 1.5 s by default, at most 10 s.
HOOK_BUCKETS_S: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.5, 5.0, 10.0)
#: Distinct routes the route-labelled series keep (route names come from the config,
#: plus ``default`` and ``outbound``); a route past it counts as ``other``.
MAX_ROUTES: Final = 256
#: The ``route`` label of a stream that never began (no route is known for it).
NO_ROUTE: Final = "none"

#: The label every sample carries: which process of the box it came from.
WORKER_LABEL: Final = "worker"
#: The ``worker`` of a process nobody named (``server.worker``): ``voicebridge.service``.
DEFAULT_WORKER: Final = "0"

#: Results of a tool call (``voicebridge_tool_calls_total``): a result, or an error one.
ToolCallResult = Literal["ok", "error"]
#: The ``tool`` label of a call of a tool no handler is configured for: Vapi chooses
#: the name, so it is not a label value.
UNKNOWN_TOOL: Final = "(unknown)"
#: The ``result`` of the last reload (``voicebridge_config_last_reload_successful``).
ReloadResult = Literal["applied", "refused"]

Direction = Literal["caller_to_agent", "agent_to_caller"]
#: Why the voice webhook refused a call (the overflow TwiML was played).


class BridgeMetrics:
    """The bridge's metrics; one per server, kept across configuration reloads.

    It is the calls' ``CallObserver`` (``call_ended``, ``caller_frame_latency``,
    ``assistant_audio_latency``), the web layer's counter of refusals and
    rejected webhooks, and the event loop's ``LagObserver`` (``loop_lag``). Not
    thread-safe (trio: one thread).
    """

    def __init__(
        self,
        *,
        worker: str = DEFAULT_WORKER,
        dropped_log_entries: Callable[[], int] | None = None,
        wall_clock: Callable[[], float] = time.time,
        webhook_paths: Iterable[str] = (),
    ) -> None:
        """``worker`` names this process in the ``worker`` label; ``dropped_log_entries``
        reads the log entries journald had no room for (none: the installed handler's);
        ``webhook_paths`` have their auth-failure series from the start, at 0."""
        self.worker = worker
        self._wall_clock = wall_clock
        self.registry = WorkerRegistry(worker)
        registry = self.registry
        # /proc/stat, where prometheus_client reads the boot time, is hidden by the
        # unit's ProcSubset=pid: without it the process collector reports nothing.
        SandboxedProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        Info(
            "voicebridge_build",
            "The running voicebridge: its version and Python's (always 1).",
            registry=registry,
        ).info({"version": __version__, "python": platform.python_version()})
        self._capacity = Gauge(
            "voicebridge_max_concurrent_calls",
            "Calls this process admits at once (server.max_concurrent_calls, as reloaded).",
            registry=registry,
        )
        self._reload_ok = Gauge(
            "voicebridge_config_last_reload_successful",
            "1 if the last configuration (re)load was applied, 0 if it was refused and the "
            "process runs on the one before.",
            registry=registry,
        )
        self._reload_at = Gauge(
            "voicebridge_config_last_reload_timestamp_seconds",
            "When the configuration was last (re)loaded, applied or refused (Unix time).",
            registry=registry,
        )
        reloads = Counter(
            "voicebridge_config_reloads",
            "Configuration reloads (SIGHUP), by result: applied, or refused as invalid.",
            ["result"],
            registry=registry,
        )
        self._reloads = {result: reloads.labels(result) for result in get_args(ReloadResult)}
        self._reload_ok.set(1)
        self._reload_at.set(wall_clock())
        early_calls = Counter(
            "voicebridge_assistant_calls_created_early",
            "Vapi calls created as the voice webhook was answered ([vapi] create_early), by "
            "fate: taken (by the call's stream), unused (no stream came in time, or the "
            "process stopped first: ended), failed (the create failed).",
            ["fate"],
            registry=registry,
        )
        self._early_calls = {fate: early_calls.labels(fate) for fate in get_args(EarlyFate)}
        leg_failures = Counter(
            "voicebridge_assistant_leg_failures",
            "Calls whose assistant leg failed (outcome assistant-leg-failed), by kind: auth "
            "(Vapi refused the API key), rejected, server, timeout, refused, dropped, "
            "unresponsive, protocol, ended (Vapi ended the call for a failure).",
            ["kind"],
            registry=registry,
        )
        self._leg_failures = {kind: leg_failures.labels(kind) for kind in get_args(LegFailure)}
        tool_calls = Counter(
            "voicebridge_tool_calls",
            "Tool calls the assistant made through the Vapi webhook, by tool and result (ok, "
            "error); tools no handler is configured for count as '(unknown)'.",
            ["tool", "result"],
            registry=registry,
        )
        self._tool_calls = tool_calls
        # Calls of unknown tools exist from the start (at 0): a dashboard's tool panel has
        # a series before the first tool call, and an increase from 0 is seen.
        self._tool_calls_by_key: dict[tuple[str, str], Counter] = {
            (UNKNOWN_TOOL, result): tool_calls.labels(UNKNOWN_TOOL, result)
            for result in get_args(ToolCallResult)
        }
        _DroppedLogEntries(dropped_log_entries or installed_dropped_count, registry=registry)
        #: Raises repeated Vapi auth failures to an ERROR (the calls' observer sees them).
        self.auth_alarm = AuthFailureAlarm()
        self._active_calls = Gauge(
            "voicebridge_active_calls",
            "Calls whose media stream is up and bridged (or being bridged) now.",
            registry=registry,
        )
        self._admitting = Gauge(
            "voicebridge_admitting",
            "1 while the voice webhook admits new calls (what /readyz says), else 0.",
            registry=registry,
        )
        calls = Counter(
            "voicebridge_calls",
            "Calls ended, by outcome (caller-hung-up and assistant-ended are the normal ones) "
            "and route (none: a stream that never began).",
            ["outcome", "route"],
            registry=registry,
        )
        self._calls_by_route = calls
        self._calls: dict[tuple[Outcome, str], Counter] = {
            (outcome, "default"): calls.labels(outcome.value, "default") for outcome in Outcome
        }
        self._routed = Counter(
            "voicebridge_calls_routed",
            "Inbound calls the voice webhook routed, by route, action (assistant, dial, "
            "refuse) and what decided (route or hook).",
            ["route", "action", "by"],
            registry=registry,
        )
        self._hook_latency = Histogram(
            "voicebridge_route_hook_seconds",
            "The decision hook: request sent → answer read, or the failure (deadline included).",
            buckets=HOOK_BUCKETS_S,
            registry=registry,
        )
        hook_failures = Counter(
            "voicebridge_route_hook_failures",
            "Decision hook requests that gave no decision (the route's choice was used), by "
            "reason: timeout, error, malformed, refused.",
            ["reason"],
            registry=registry,
        )
        self._hook_failures = {
            reason: hook_failures.labels(reason)
            for reason in ("timeout", "error", "malformed", "refused")
        }
        self._assistant_endings = Counter(
            "voicebridge_assistant_endings",
            "Calls Vapi ended (status-update ended), by Vapi's endedReason and the outcome "
            "it gave (assistant-ended, assistant-leg-failed, assistant-over-limit).",
            ["ended_reason", "outcome"],
            registry=registry,
        )
        self._cluster_failures = Counter(
            "voicebridge_cluster_store_failures",
            "Requests to the cluster store (Redis) that failed or timed out, by operation "
            "(acquire, renew, publish, lookup); see docs/operations.md.",
            ["operation"],
            registry=registry,
        )
        refused = Counter(
            "voicebridge_admissions_refused",
            "Calls the voice webhook refused with the overflow TwiML, by reason.",
            ["reason"],
            registry=registry,
        )
        self._refused: dict[str, Counter] = {
            reason: refused.labels(reason) for reason in get_args(RefusalReason)
        }
        self._barge_ins = Counter(
            "voicebridge_barge_ins", "Barge-ins: assistant turns cut by the caller.",
            registry=registry,
        )
        self._barge_in_latency = Histogram(
            "voicebridge_barge_in_latency_seconds",
            "Barge-in signal from Vapi received → clear sent to Twilio.",
            buckets=FAST_BUCKETS_S,
            registry=registry,
        )
        added = Histogram(
            "voicebridge_added_latency_seconds",
            "Time a frame spends inside the bridge, sampled: caller_to_agent from the "
            "parsed Twilio frame to its write to Vapi; agent_to_caller from Vapi audio "
            "received to the Twilio write that carries its first byte.",
            ["direction"],
            buckets=FAST_BUCKETS_S,
            registry=registry,
        )
        self._caller_latency = added.labels("caller_to_agent")
        self._assistant_latency = added.labels("agent_to_caller")
        self._create_latency = Histogram(
            "voicebridge_vapi_create_seconds",
            "Vapi POST /call: request sent → call created (failed attempts included).",
            buckets=CREATE_BUCKETS_S,
            registry=registry,
        )
        self._first_word = Histogram(
            "voicebridge_time_to_first_word_seconds",
            "Voice webhook answered (stream token issued) → first assistant audio sent to "
            "Twilio, per call: the bridge's view of the caller's time to first word "
            "(the caller hears it one network trip later).",
            buckets=FIRST_AUDIO_BUCKETS_S,
            registry=registry,
        )
        self._first_audio = Histogram(
            "voicebridge_first_audio_seconds",
            "Media stream start → first assistant audio sent to Twilio, per call.",
            buckets=FIRST_AUDIO_BUCKETS_S,
            registry=registry,
        )
        frames = Counter(
            "voicebridge_media_messages",
            "Audio messages bridged: caller frames written to Vapi (caller_to_agent), "
            "media messages written to Twilio (agent_to_caller). Added at call end.",
            ["direction"],
            registry=registry,
        )
        self._frames_to_agent = frames.labels("caller_to_agent")
        self._frames_to_caller = frames.labels("agent_to_caller")
        audio_bytes = Counter(
            "voicebridge_audio_bytes",
            "Audio bytes bridged: caller audio written to Vapi (caller_to_agent), "
            "assistant audio received from Vapi (agent_to_caller). Added at call end.",
            ["direction"],
            registry=registry,
        )
        self._bytes_to_agent = audio_bytes.labels("caller_to_agent")
        self._bytes_to_caller = audio_bytes.labels("agent_to_caller")
        self._unknown_marks = Counter(
            "voicebridge_unknown_marks",
            "Mark echoes from Twilio naming no mark the bridge sent (ignored). Added at "
            "call end.",
            registry=registry,
        )
        self._presumed_heard = Counter(
            "voicebridge_presumed_heard_seconds",
            "Assistant audio presumed heard by the clock (Twilio's mark echo overdue) and "
            "never confirmed by a later echo; normally 0. Added at call end.",
            registry=registry,
        )
        early = Counter(
            "voicebridge_early_barge_ins",
            "Barge-ins at the edge (bridge.edge_barge_in): the caller's speech over the "
            "assistant heard by the bridge (heard), then the turn dropped on the assistant's "
            "confirmation (confirmed) or played on unconfirmed (resumed). Added at call end.",
            ["result"],
            registry=registry,
        )
        self._early_heard = early.labels("heard")
        self._early_confirmed = early.labels("confirmed")
        self._early_resumed = early.labels("resumed")
        self._dropped = Counter(
            "voicebridge_frames_dropped",
            "Caller audio frames dropped as stale because the Vapi leg did not keep up "
            "(backpressure). Added at call end.",
            registry=registry,
        )
        rejected = Counter(
            "voicebridge_webhook_auth_failures",
            "Webhooks refused for their credentials, by path: Twilio's answered 403 for a "
            "missing or wrong X-Twilio-Signature, Vapi's (/vapi/webhook) and the control "
            "API's answered 401.",
            ["path"],
            registry=registry,
        )
        self._rejected = rejected
        # A series from the start: an alert's increase() sees the first failure.
        self._rejected_by_path: dict[str, Counter] = {
            path: rejected.labels(path) for path in webhook_paths
        }
        self._loop_lag = Histogram(
            "voicebridge_event_loop_lag_seconds",
            "How late the event loop woke a task that asked to wake every 100 ms: the "
            "longest any call, webhook or watchdog ping could have waited for its turn.",
            buckets=LOOP_LAG_BUCKETS_S,
            registry=registry,
        )
        self._loop_lag_largest = Gauge(
            "voicebridge_event_loop_lag_max_seconds",
            "The largest event-loop lag since the previous scrape of /metrics.",
            registry=registry,
        )
        self._loop_stalls = Counter(
            "voicebridge_event_loop_stalls",
            "Wakes of the event loop's monitor at least 0.25 s late: the loop was blocked "
            "(each one is also a WARNING in the log).",
            registry=registry,
        )
        # Invariant: the largest lag observed since the last ``exposition``.
        self._largest_lag = 0.0
        self._stream_errors = Counter(
            "voicebridge_stream_errors",
            "Media Streams Twilio reported failed (<Stream statusCallback> stream-error), by "
            "Twilio's error code (31920: the WebSocket handshake failed; 'unknown': none given).",
            ["code"],
            registry=registry,
        )
        self._stream_errors_by_code: dict[str, Counter] = {}

    # -- the call's observer -------------------------------------------------------

    def call_ended(self, record: CallRecord) -> None:
        """Add one ended call's figures (called once per call, before its socket closes)."""
        route = record.route or NO_ROUTE
        child = self._calls.get((record.outcome, route))
        if child is None:
            if len(self._calls) >= MAX_ROUTES * len(Outcome):
                route = OTHER_STREAM_ERROR
            child = self._calls.setdefault(
                (record.outcome, route), self._calls_by_route.labels(record.outcome.value, route)
            )
        child.inc()
        if record.ended_reason:
            # Log-safe already (vapi.endings.safe_reason): Vapi's enum, a bounded set.
            self._assistant_endings.labels(record.ended_reason, record.outcome.value).inc()
        if record.frames_to_assistant:
            self._frames_to_agent.inc(record.frames_to_assistant)
        if record.media_messages_to_caller:
            self._frames_to_caller.inc(record.media_messages_to_caller)
        if record.caller_audio_bytes:
            self._bytes_to_agent.inc(record.caller_audio_bytes)
        if record.assistant_bytes:
            self._bytes_to_caller.inc(record.assistant_bytes)
        if record.frames_dropped:
            self._dropped.inc(record.frames_dropped)
        if record.unknown_marks:
            self._unknown_marks.inc(record.unknown_marks)
        if record.early_barge_ins:
            self._early_heard.inc(record.early_barge_ins)
            self._early_confirmed.inc(record.early_confirmed)
            self._early_resumed.inc(record.early_resumed)
        if record.presumed_heard_ms:
            self._presumed_heard.inc(record.presumed_heard_ms / 1000)
        if record.barge_ins:
            self._barge_ins.inc(len(record.barge_ins))
            for barge_in in record.barge_ins:
                self._barge_in_latency.observe(barge_in.latency_ms / 1000)
        if record.first_audio_ms is not None:
            self._first_audio.observe(record.first_audio_ms / 1000)
        if record.leg_failure is not None:
            self._leg_failures[record.leg_failure].inc()
            self.auth_alarm.call_ended(record)
        if record.webhook_to_first_audio_ms is not None:
            self._first_word.observe(record.webhook_to_first_audio_ms / 1000)

    def caller_frame_latency(self, seconds: float) -> None:
        """One sampled caller frame's time inside the bridge."""
        self._caller_latency.observe(seconds)

    def assistant_audio_latency(self, seconds: float) -> None:
        """One sampled assistant audio message's time inside the bridge."""
        self._assistant_latency.observe(seconds)

    # -- the event loop's monitor (``observability.looplag``) -----------------------

    def loop_lag(self, seconds: float) -> None:
        """One wake of the event loop's monitor, ``seconds`` late."""
        self._loop_lag.observe(seconds)
        if seconds > self._largest_lag:
            self._largest_lag = seconds
        if is_stall(seconds):
            self._loop_stalls.inc()

    # -- the web layer -------------------------------------------------------------

    def early_call(self, fate: EarlyFate) -> None:
        """What became of a Vapi call created early (``bridge.early``)."""
        self._early_calls[fate].inc()

    def call_refused(self, reason: RefusalReason) -> None:
        """The voice webhook answered the overflow TwiML."""
        self._refused[reason].inc()

    def cluster_store_failed(self, operation: str) -> None:
        """A request to the cluster store failed or timed out (``voicebridge.cluster``)."""
        self._cluster_failures.labels(operation).inc()

    def call_routed(self, route: str, action: str, by: str) -> None:
        """The voice webhook decided an inbound call's route (``routing``)."""
        self._routed.labels(route, action, by).inc()

    def route_hook_answered(self, seconds: float, failure: str | None) -> None:
        """The decision hook answered after ``seconds``; ``failure`` when it gave no
        decision (the route's choice was used)."""
        self._hook_latency.observe(seconds)
        if failure is not None:
            self._hook_failures[failure].inc()

    def webhook_rejected(self, path: str) -> None:
        """A webhook failed its signature check (403) or its credentials (401)."""
        child = self._rejected_by_path.get(path)
        if child is None:
            # Only our few webhook paths reach here (routes are fixed), so this stays small.
            child = self._rejected_by_path[path] = self._rejected.labels(path)
        child.inc()

    def stream_error(self, code: str) -> None:
        """Twilio reported a failed Media Stream; ``code`` is its error code or "unknown".

        The label set is bounded: past ``MAX_STREAM_ERROR_CODES`` distinct codes, new
        ones count as "other" (the code comes from a signed request, but still from
        outside).
        """
        child = self._stream_errors_by_code.get(code)
        if child is None:
            if len(self._stream_errors_by_code) >= MAX_STREAM_ERROR_CODES:
                code = OTHER_STREAM_ERROR
                child = self._stream_errors_by_code.get(code)
            if child is None:
                child = self._stream_errors_by_code[code] = self._stream_errors.labels(code)
        child.inc()

    def tool_called(self, tool: str, result: ToolCallResult) -> None:
        """One tool call answered; ``tool`` is a configured name or ``UNKNOWN_TOOL``."""
        key = (tool, result)
        child = self._tool_calls_by_key.get(key)
        if child is None:
            # Configured names only (the caller maps the rest to UNKNOWN_TOOL): bounded.
            child = self._tool_calls_by_key[key] = self._tool_calls.labels(tool, result)
        child.inc()

    # -- the process -----------------------------------------------------------------

    def config_loaded(self, result: ReloadResult) -> None:
        """A configuration reload was applied or refused."""
        self._reloads[result].inc()
        self._reload_ok.set(1 if result == "applied" else 0)
        self._reload_at.set(self._wall_clock())

    def timed(self, connector: AssistantConnector) -> AssistantConnector:
        """``connector``, with the time of each ``create`` observed as Vapi create latency."""
        return _TimedConnector(connector, self._create_latency)

    def exposition(self, *, active_calls: int, admitting: bool, max_calls: int = 0) -> bytes:
        """The text exposition of every metric, with the gauges set to the given values.

        Starts a new period for the largest event-loop lag (each scrape reports the
        largest since the one before).
        """
        self._capacity.set(max_calls)
        self._active_calls.set(active_calls)
        self._admitting.set(1 if admitting else 0)
        self._loop_lag_largest.set(self._largest_lag)
        self._largest_lag = 0.0
        return generate_latest(self.registry)


class _TimedConnector:
    """An ``AssistantConnector`` that times ``create``; the rest is passed through."""

    def __init__(self, inner: AssistantConnector, histogram: Histogram) -> None:
        self._inner = inner
        self._histogram = histogram

    async def create(
        self,
        *,
        call_sid: str,
        caller: str,
        called: str,
        assistant: str = "",
        decision: Mapping[str, Any] | None = None,
    ) -> AssistantCall:
        started = time.perf_counter()
        try:
            return await self._inner.create(
                call_sid=call_sid,
                caller=caller,
                called=called,
                assistant=assistant,
                decision=decision,
            )
        finally:
            self._histogram.observe(time.perf_counter() - started)

    def connect(self, call: AssistantCall) -> AbstractAsyncContextManager[PingableSocket]:
        return self._inner.connect(call)

    async def post_control(self, call: AssistantCall, message: str) -> bool:
        return await self._inner.post_control(call, message)



class WorkerRegistry(CollectorRegistry):
    """A registry whose every sample carries ``worker="<name>"``."""

    def __init__(self, worker: str) -> None:
        super().__init__(auto_describe=True)
        self.worker = worker

    def collect(self) -> Iterator[Metric]:
        for family in super().collect():
            labelled = Metric(family.name, family.documentation, family.type, family.unit)
            labelled.samples = [
                sample._replace(labels={**sample.labels, WORKER_LABEL: self.worker})
                for sample in family.samples
            ]
            yield labelled


class SandboxedProcessCollector(ProcessCollector):
    """prometheus_client's ``process_*`` collector, with the boot time taken from the
    clocks (``CLOCK_BOOTTIME``) rather than ``/proc/stat``, which ``ProcSubset=pid`` hides.
    Everything else it reads is under ``/proc/self``."""

    def _boot_time(self) -> float:
        return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)


class _DroppedLogEntries(Collector):
    """``voicebridge_log_entries_dropped_total``, read from the log handler when scraped."""

    def __init__(self, read: Callable[[], int], *, registry: CollectorRegistry) -> None:
        self._read = read
        registry.register(self)

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(
            "voicebridge_log_entries_dropped",
            "Log entries lost because journald's queue was full (each loss is also an "
            "EVENT=log-entries-dropped warning once journald takes entries again).",
        )
        family.add_metric([], self._read())
        return [family]

