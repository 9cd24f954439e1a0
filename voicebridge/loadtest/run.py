"""One load test from start to report: ``voicebridge loadtest``.

``run_loadtest`` starts the simulated assistant (``loadtest.generator``), then the
bridge under test in its own process (``loadtest.process``; pinned to one core
when asked, the generator then keeping to the others), or uses an external bridge
at a URL; it ramps the calls up, measures over the window in which all of them are
up, hangs them up and returns a ``LoadReport``.

CPU and memory of the bridge come from ``/proc`` at the edges of that window: CPU
microseconds per call-second is the bridge's CPU time over the window divided by the
call-seconds streamed in it (calls × window without churn); RSS per call is the growth
of the resident set from idle (before the first call) to full load, divided by the
calls up on average over the window. The bridge's CPU is also sampled every
``cpu.CPU_SAMPLE_S`` over the whole run, and split between calls' set-up, their end and
their streaming (``cpu.split_cpu``).

With churn (``churn_per_s``), new calls arrive at random on top of the long ones, each
for a few tens of seconds; the voice webhook's answer time is measured for every call.

With ``vapi_tls`` the simulated assistant's transport sockets are ``wss://``: the
certificate (a throwaway one made in a temporary directory, or the one given) is
served by the generator and trusted, alone, by the bridge it starts
(``loadtest.tls``); an external bridge must already trust it.
"""

from __future__ import annotations

import math
import os
import secrets
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import partial
from pathlib import Path

import attrs
import trio
from attrs import field, frozen

from voicebridge.loadtest.cpu import CPU_SAMPLE_S, split_cpu
from voicebridge.loadtest.generator import BridgeTarget, CallSpan, LoadGenerator, Traffic
from voicebridge.loadtest.process import (
    ENV_PREFIX,
    BridgeProcess,
    LoadTestError,
    ProcessSample,
    available_cpus,
    pin_to,
)
from voicebridge.loadtest.report import (
    GENERATOR_SATURATED_PCT,
    GENERATOR_TICK_SLIP_MS,
    LoadReport,
    Percentiles,
)
from voicebridge.loadtest.tls import (
    Certificate,
    make_certificate,
    server_context,
    trust_environment,
)
from voicebridge.sim.latency import LatencyModel
from voicebridge.sim.route_hook import SECRET_ENV

#: How long the simulated decision hook's process may take to say where it listens.
ROUTE_HOOK_START_S = 10.0
#: The first seconds at full load are left out of the window (the last calls' setup).
WINDOW_SETTLE_S = 1.0
#: Before the first call: the bridge (or relay) settles after start-up before its idle RSS;
#: its CPU over this second is its own, without calls (``cpu.split_cpu``'s base).
IDLE_SETTLE_S = 1.0
#: The default ramp: calls start this many per second, between 1 and 10 s in all.
RAMP_CALLS_PER_S = 25.0


def default_ramp_s(calls: int) -> float:
    """A few seconds for many calls, one for a handful."""
    return min(10.0, max(1.0, calls / RAMP_CALLS_PER_S))


@frozen(kw_only=True)
class ExternalBridge:
    """A bridge the load test does not start: it must use our assistant for Vapi."""

    url: str
    #: What the bridge's ``server.public_url`` is (signatures cover it); default ``url``.
    public_url: str | None
    auth_token: str = field(repr=False)
    #: Where the simulated assistant listens (the bridge's ``vapi.base_url``).
    assistant_port: int
    #: The bridge's ``vapi_api_key``.
    assistant_key: str = field(repr=False)
    #: For CPU and RSS from /proc (the bridge must run on this machine).
    pid: int | None = None
    #: With an ``https://`` URL: a CA certificate (PEM) to trust besides the system's,
    #: e.g. a TLS proxy's throwaway one.
    ca_file: str | None = None


@frozen(kw_only=True)
class LoadTestOptions:
    calls: int
    duration_s: float
    ramp_s: float | None = None
    #: Pin the bridge to this core (and the generator to the others).
    bridge_cpu: int | None = None
    external: ExternalBridge | None = None
    barge_in_share: float = 0.3
    seed: int = 1
    #: The simulated assistant's transport sockets are ``wss://`` (``--vapi-tls``).
    vapi_tls: bool = False
    #: With ``vapi_tls``: serve this certificate instead of a throwaway one.
    vapi_tls_certificate: Certificate | None = None
    #: The bridge asks a simulated decision hook (answering at once) for every call.
    route_hook: bool = False
    #: Called with a line of progress now and then (the CLI prints it on stderr).
    progress: Callable[[str], None] | None = None
    #: New calls a second on top of ``calls``, each lasting within ``churn_call_s``.
    churn_per_s: float = 0.0
    churn_call_s: tuple[float, float] = (10.0, 40.0)
    #: The started bridge's ``server.shed_loop_lag_ms`` (None: the default of the product).
    shed_loop_lag_ms: int | None = None
    #: The delays of the simulated world (``sim.latency``); None: loopback's.
    latency: LatencyModel | None = None
    #: The started bridge runs ``[bridge] edge_barge_in`` (its detector on every caller
    #: frame while the assistant speaks; the generator's frames are silence to it).
    edge_barge_in: bool = False


@frozen
class _AssistantTls:
    """The simulated assistant's TLS: its context, and the environment trusting it."""

    context: ssl.SSLContext
    trust_env: Mapping[str, str]


@frozen
class Target:
    """What the calls go to, its pid for /proc (None: not measured) and its name."""

    bridge: BridgeTarget
    pid: int | None
    name: str


#: Starts what the calls go to (e.g. a reference relay, see bench/) for a generator
#: whose simulated assistant is serving, and stops it on exit.
TargetFactory = Callable[[LoadGenerator], AbstractAsyncContextManager[Target]]


@asynccontextmanager
async def _assistant_tls(options: LoadTestOptions) -> AsyncIterator[_AssistantTls | None]:
    """With ``vapi_tls``: the certificate (made here unless given), until the run ends."""
    if not options.vapi_tls:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="voicebridge-loadtest-tls-") as name:
        directory = Path(name)
        certificate = options.vapi_tls_certificate or await make_certificate(directory)
        yield _AssistantTls(server_context(certificate),
                            trust_environment(certificate, directory))


@asynccontextmanager
async def _local_bridge(
    generator: LoadGenerator,
    options: LoadTestOptions,
    tls: _AssistantTls | None,
    hook_env: Mapping[str, str],
) -> AsyncIterator[Target]:
    auth_token = secrets.token_hex(16)
    env = dict(tls.trust_env) if tls is not None else {}
    if options.shed_loop_lag_ms is not None:
        env[f"{ENV_PREFIX}SHED_LOOP_LAG_MS"] = str(options.shed_loop_lag_ms)
    if options.edge_barge_in:
        env[f"{ENV_PREFIX}EDGE_BARGE_IN"] = "1"
    bridge = await BridgeProcess.start(
        assistant_url=generator.base_url,
        assistant_key=generator.api_key,
        auth_token=auth_token,
        cpu=options.bridge_cpu,
        env={**env, **hook_env},
    )
    try:
        yield Target(
            BridgeTarget(host="127.0.0.1", port=bridge.port, public_url=bridge.url,
                         auth_token=auth_token),
            bridge.pid,
            f"voicebridge (pid {bridge.pid}"
            + (f", pinned to CPU {options.bridge_cpu})" if options.bridge_cpu is not None
               else ")"),
        )
    finally:
        with trio.CancelScope(shield=True):
            await bridge.stop()


async def _route_hook(nursery: trio.Nursery) -> dict[str, str]:
    """A simulated decision hook in a process of its own (so that its answer time is
    not the generator's loop's), until the nursery ends; the bridge's environment."""
    secret = secrets.token_hex(16)
    url: str = await nursery.start(_run_route_hook, secret)
    return {f"{ENV_PREFIX}ROUTE_HOOK_URL": url, f"{ENV_PREFIX}ROUTE_HOOK_SECRET": secret}


async def _run_route_hook(secret: str, task_status: trio.TaskStatus[str]) -> None:
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "voicebridge.sim.route_hook"],
        env={**os.environ, SECRET_ENV: secret},
        stdout=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = b""
        with trio.fail_after(ROUTE_HOOK_START_S):
            while not line.endswith(b"\n"):
                chunk = await process.stdout.receive_some(256)
                if not chunk:
                    raise LoadTestError("the simulated decision hook did not start")
                line += chunk
        task_status.started(line.decode().strip())
        await trio.sleep_forever()
    finally:
        process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()


async def run_loadtest(
    options: LoadTestOptions,
    *,
    target_factory: TargetFactory | None = None,
) -> LoadReport:
    """Run one load test and report it (see the module docstring).

    With ``bridge_cpu`` this process keeps to the other CPUs while the test runs.
    """
    if (options.calls < 1 and options.churn_per_s <= 0) or options.duration_s <= WINDOW_SETTLE_S:
        raise LoadTestError(
            f"need at least 1 call (or churn) and more than {WINDOW_SETTLE_S:g} s of duration"
        )
    low, high = options.churn_call_s
    if options.churn_per_s < 0 or not 0 < low <= high:
        raise LoadTestError("churn must be 0 or more new calls a second, lasting MIN,MAX s > 0")
    if options.vapi_tls and options.external and options.vapi_tls_certificate is None:
        raise LoadTestError(
            "an external bridge must trust the simulated Vapi's certificate before it "
            "starts: give the certificate it trusts (--vapi-tls-cert, --vapi-tls-key)"
        )
    cpus = available_cpus()
    if options.bridge_cpu is not None:
        if options.bridge_cpu not in cpus or len(cpus) < 2:
            raise LoadTestError(
                f"cannot pin the bridge to CPU {options.bridge_cpu} and the generator to "
                f"another one (this process may use CPUs {sorted(cpus)})"
            )
        pin_to(cpus - {options.bridge_cpu})
    try:
        return await _run(options, target_factory)
    finally:
        pin_to(cpus)


async def _run(options: LoadTestOptions, target_factory: TargetFactory | None) -> LoadReport:
    ramp_s = options.ramp_s if options.ramp_s is not None else default_ramp_s(options.calls)
    traffic = Traffic(
        calls=options.calls, duration_s=options.duration_s, ramp_s=ramp_s,
        barge_in_share=options.barge_in_share, seed=options.seed,
        churn_per_s=options.churn_per_s, churn_call_s=options.churn_call_s,
    )
    external = options.external
    async with _assistant_tls(options) as tls:
        generator = LoadGenerator(
            traffic, api_key=external.assistant_key if external else secrets.token_hex(16),
            tls=tls.context if tls is not None else None,
            latency=options.latency,
        )
        return await _serve_and_measure(generator, traffic, options, tls, target_factory)


async def _serve_and_measure(
    generator: LoadGenerator,
    traffic: Traffic,
    options: LoadTestOptions,
    tls: _AssistantTls | None,
    target_factory: TargetFactory | None,
) -> LoadReport:
    external = options.external
    async with trio.open_nursery() as assistant_nursery:
        await assistant_nursery.start(
            partial(generator.serve_assistant, port=external.assistant_port if external else 0)
        )
        target_cm: AbstractAsyncContextManager[Target]
        hook_env: dict[str, str] = {}  # --route-hook: only a bridge started here
        if target_factory is not None:
            target_cm = target_factory(generator)
        elif external is not None:
            target_cm = _external(external)
        else:
            if options.route_hook:
                hook_env = await _route_hook(assistant_nursery)
            target_cm = _local_bridge(generator, options, tls, hook_env)
        async with target_cm as target:
            report = await _measure(generator, traffic, target, options.progress)
        if hook_env:
            report = attrs.evolve(report, route_hook=True)
        assistant_nursery.cancel_scope.cancel(reason="load test finished")
    return report


@asynccontextmanager
async def _external(external: ExternalBridge) -> AsyncIterator[Target]:
    host, port, tls = _external_address(external)
    yield Target(
        BridgeTarget(host=host, port=port, public_url=external.public_url or external.url,
                     auth_token=external.auth_token, tls=tls),
        external.pid,
        external.url,
    )


def _external_address(external: ExternalBridge) -> tuple[str, int, ssl.SSLContext | None]:
    """(host, port, TLS context) of ``http://host:port`` or ``https://host[:port]``."""
    scheme, _, host_port = external.url.partition("://")
    host, colon, port = host_port.rstrip("/").rpartition(":")
    if not colon:
        host, port = host_port.rstrip("/"), "443" if scheme == "https" else ""
    if scheme not in ("http", "https") or not host or not port.isdigit():
        raise LoadTestError(
            f"--url must be http://host:port or https://host[:port], got {external.url!r}")
    if scheme == "http":
        if external.ca_file:
            raise LoadTestError("--ca-file is for an https:// --url")
        return host, int(port), None
    try:
        context = ssl.create_default_context(cafile=external.ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise LoadTestError(f"--ca-file {external.ca_file}: {exc}") from exc
    if external.ca_file:
        context.load_default_certs()
    return host, int(port), context


#: Seconds between two progress lines.
PROGRESS_INTERVAL_S = 5.0


async def _report_progress(
    progress: Callable[[str], None], traffic: Traffic, target: Target
) -> None:
    """A line at the start and every ``PROGRESS_INTERVAL_S``: how far the run is."""
    total_s = traffic.ramp_s + traffic.duration_s
    progress(
        f"{traffic.calls} calls against {target.name}: ramp {traffic.ramp_s:g} s, then "
        f"{traffic.duration_s:g} s with all calls up"
    )
    started = trio.current_time()
    while True:
        await trio.sleep(PROGRESS_INTERVAL_S)
        elapsed = trio.current_time() - started
        progress(f"{min(elapsed, total_s):.0f} s of {total_s:.0f} s")


async def _measure(
    generator: LoadGenerator,
    traffic: Traffic,
    target: Target,
    progress: Callable[[str], None] | None = None,
) -> LoadReport:
    pid = target.pid
    settling = (time.perf_counter(), ProcessSample.of(pid).cpu_s) if pid is not None else None
    await trio.sleep(IDLE_SETTLE_S)
    idle = ProcessSample.of(pid) if pid is not None else None
    # The bridge's own CPU with no call, for the split (over the second it settles).
    base = (
        (idle.cpu_s - settling[1]) / (time.perf_counter() - settling[0])
        if idle is not None and settling is not None else 0.0
    )
    started_at = time.perf_counter() + 0.1
    window_start = started_at + traffic.ramp_s + WINDOW_SETTLE_S
    window_end = started_at + traffic.ramp_s + traffic.duration_s
    generator.window = (window_start, window_end)
    edges: list[tuple[ProcessSample | None, float, float]] = []
    cpu_samples: list[tuple[float, float]] = []
    offset = trio.current_time() - time.perf_counter()

    async def sample_window() -> None:
        for edge in (window_start, window_end):
            await trio.sleep_until(edge + offset)
            bridge = ProcessSample.of(pid) if pid is not None else None
            edges.append((bridge, time.process_time(), time.perf_counter()))

    async def sample_cpu(pid: int) -> None:
        """The bridge's CPU time every ``CPU_SAMPLE_S`` from the start, for ``split_cpu``."""
        at = started_at
        while True:
            await trio.sleep_until(at + offset)
            cpu_samples.append((time.perf_counter(), ProcessSample.of(pid).cpu_s))
            at += CPU_SAMPLE_S

    async with trio.open_nursery() as run_nursery:
        run_nursery.start_soon(sample_window)
        async with trio.open_nursery() as sampler_nursery:
            if pid is not None:
                sampler_nursery.start_soon(sample_cpu, pid)
            if progress is not None:
                sampler_nursery.start_soon(_report_progress, progress, traffic, target)
            await generator.run(target.bridge, started_at=started_at)
            if pid is not None:
                # The last calls' ends: their goodbyes and actions are done by now.
                await trio.sleep(CPU_SAMPLE_S)
                cpu_samples.append((time.perf_counter(), ProcessSample.of(pid).cpu_s))
            sampler_nursery.cancel_scope.cancel(reason="the run is over")
    return _report(generator, traffic, target, idle, edges, cpu_samples, base)


def _report(
    generator: LoadGenerator,
    traffic: Traffic,
    target: Target,
    idle: ProcessSample | None,
    edges: list[tuple[ProcessSample | None, float, float]],
    cpu_samples: list[tuple[float, float]],
    base: float,
) -> LoadReport:
    figures = generator.figures()
    spans = generator.streams()
    (bridge_start, own_start, wall_start), (bridge_end, own_end, wall_end) = edges
    window_s = wall_end - wall_start
    call_seconds = _streamed_within(spans, wall_start, wall_end)
    mean_calls = call_seconds / window_s if window_s > 0 else 0.0
    generator_cpu_pct = (own_end - own_start) / window_s * 100
    cpu_us = bridge_pct = rss_per_call = None
    if bridge_start is not None and bridge_end is not None and idle is not None:
        bridge_cpu_s = bridge_end.cpu_s - bridge_start.cpu_s
        bridge_pct = bridge_cpu_s / window_s * 100
        if call_seconds > 0:
            cpu_us = bridge_cpu_s * 1e6 / call_seconds
            rss_per_call = (bridge_end.rss_kib - idle.rss_kib) / mean_calls
    slip = Percentiles.of(figures.tick_slip_ms)
    reasons = []
    if generator_cpu_pct > GENERATOR_SATURATED_PCT:
        reasons.append(
            f"the generator used {generator_cpu_pct:.0f} % of its core "
            f"(> {GENERATOR_SATURATED_PCT:g} %): its own delays would count as the bridge's"
        )
    if slip.p99 is not None and slip.p99 > GENERATOR_TICK_SLIP_MS:
        reasons.append(
            f"the generator's pacing slipped {slip.p99:.1f} ms (p99 > "
            f"{GENERATOR_TICK_SLIP_MS:g} ms)"
        )
    if not figures.caller_latency_ms and not figures.refused_calls:
        reasons.append("no caller frame was measured")
    if generator.tls and not generator.tls_handshakes:
        reasons.append("no TLS handshake with the simulated Vapi completed")
    return LoadReport(
        target=target.name,
        calls=traffic.calls,
        duration_s=traffic.duration_s,
        ramp_s=traffic.ramp_s,
        valid=not reasons,
        invalid_reasons=tuple(reasons),
        caller_to_agent=Percentiles.of(figures.caller_latency_ms),
        agent_to_caller_at_playback=Percentiles.of(figures.assistant_latency_at_playback_ms),
        agent_to_caller_at_arrival=Percentiles.of(figures.assistant_latency_at_arrival_ms),
        barge_in=Percentiles.of(figures.barge_in_ms),
        barge_ins=len(figures.barge_in_ms),
        heard_after_clear_ms=figures.heard_after_clear_ms,
        first_audio=Percentiles.of(figures.first_audio_ms),
        dropped_caller_frames=figures.dropped_caller_frames,
        dropped_assistant_chunks=figures.dropped_assistant_chunks,
        late_caller_frames=figures.late_caller_frames,
        late_assistant_chunks=figures.late_assistant_chunks,
        caller_frames=len(figures.caller_latency_ms),
        assistant_chunks=len(figures.assistant_latency_at_arrival_ms),
        failed_calls=sum(figures.failures.values()),
        failures=dict(figures.failures),
        calls_placed=generator.calls_placed,
        churn_per_s=traffic.churn_per_s,
        churn_call_s=traffic.churn_call_s,
        mean_calls=mean_calls,
        refused_calls=figures.refused_calls,
        drained_calls=figures.drained_calls,
        webhook=Percentiles.of(figures.webhook_ms),
        cpu_split=split_cpu(cpu_samples, spans, base=base),
        cpu_us_per_call_second=cpu_us,
        bridge_cpu_pct=bridge_pct,
        rss_kib_per_call=rss_per_call,
        rss_idle_kib=idle.rss_kib if idle is not None else None,
        rss_loaded_kib=bridge_end.rss_kib if bridge_end is not None else None,
        rss_growth_kib=(
            bridge_end.rss_kib - bridge_start.rss_kib
            if bridge_start is not None and bridge_end is not None else None
        ),
        generator_cpu_pct=generator_cpu_pct,
        generator_tick_slip_p99_ms=slip.p99,
        window_s=window_s if math.isfinite(window_s) else 0.0,
        vapi_tls=generator.tls,
        vapi_tls_handshakes=generator.tls_handshakes,
        vapi_tls_handshake_failures=dict(generator.tls_handshake_failures),
        time_to_first_word=Percentiles.of(figures.time_to_first_word_ms),
        speech_to_silence=Percentiles.of(figures.speech_to_silence_ms),
        latency=generator.latency.describe() if generator.latency is not None else "",
    )


def _streamed_within(spans: list[CallSpan], start: float, end: float) -> float:
    """Call-seconds streamed between ``start`` and ``end``."""
    return sum(
        max(0.0, min(end, span.ended_at) - max(start, span.streaming_from)) for span in spans
    )
