"""The real server in its own process, attacked from another, beside witness calls.

Charter: loopback only; every test under ``trio.fail_after``; real sockets and real time,
so each attack lasts a few seconds and stops by itself. Three kinds of process:

- **The server** (``tests/edge/server_main.py``): the real ``serve()`` from a config
  file, as ``voicebridge serve`` runs it, with the descriptor limit its systemd unit
  gives it, sd_notify and the watchdog, logs on stderr. A ticker in its event loop (the
  product's loop-lag monitor) prints the largest scheduling gap every 0.1 s.
- **The attacker** (``tests/edge/attackers/``): a separate OS process on 127.0.0.2
  (or more addresses), writing the bytes it means to, that stops within its
  ``--seconds`` and counts and prints one JSON line of what it did and saw. An attacker
  inside the server's event loop would stall together with the server and prove
  nothing; here it competes for the machine, as on the Internet.
- **This test process** (127.0.0.1): the simulated Vapi, the simulated Twilio placing
  ``WITNESSES`` witness calls, a prober posting a signed voice webhook every
  ``PROBE_INTERVAL_S`` on a fresh connection, the notify socket counting watchdog pings,
  and a sampler of the server's resident memory.

``attack_beside_witnesses`` runs one attack and gathers what a user would notice into an
``AttackRun``; ``assert_unharmed`` checks it against issue 10's promise: the witnesses
keep their latency (no gap over ``MAX_LOOP_GAP_S`` in the server's loop), lose no frame
and end normally; signed webhooks keep being answered within ``MAX_WEBHOOK_S``; watchdog
pings continue; RSS stays bounded.
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import secrets
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio

from tests.faults.loopback import WITNESS_ASSISTANT, WITNESS_SCRIPT, WITNESS_WORDS, WITNESSES
from tests.test_systemd_integration import NotifySocket
from voicebridge.config import ServerConfig
from voicebridge.loadtest.process import ProcessSample
from voicebridge.loopback import LOOPBACK_ACCOUNT_SID
from voicebridge.sim.audio import CLIP_TEXTS
from voicebridge.sim.caller import (
    CallReport,
    Hangup,
    SimTwilioSettings,
    WaitForAssistant,
    place_call,
)
from voicebridge.sim.vapi import BehaviourChooser, SimVapi, SimVapiCallRecord
from voicebridge.twilio.signature import sign

REPO = Path(__file__).resolve().parents[2]

# -- what "unharmed" means (issue 10, "How it is shown") -------------------------------

#: The largest scheduling gap the server's loop may show during an attack: a 20 ms audio
#: frame late by more than this is heard; an idle loop shows well under a millisecond.
MAX_LOOP_GAP_S = 0.050
#: A signed voice webhook must be answered within this (Twilio waits 15 s, but a caller
#: hears the silence; an unattacked server answers in a few milliseconds).
MAX_WEBHOOK_S = 1.0
#: The longest silence between two watchdog pings (sent every 0.1 s). systemd's
#: ``WatchdogSec=`` is seconds; a second here is already a loop in trouble.
MAX_WATCHDOG_GAP_S = 1.0
#: How much the server's resident memory may grow during an attack: the witnesses' calls
#: and the attacker's bounded share (a few connections, a capped body) fit well inside.
MAX_RSS_GROWTH_MIB = 32.0
#: A witness's barge-in latency as the bridge measured it (signal from Vapi → ``clear``).
WITNESS_BARGE_IN_MAX_MS = 100.0

# -- how the runs are made --------------------------------------------------------------

#: The server's descriptor limit when its unit sets none: systemd's default soft limit.
DEFAULT_NOFILE = 1024
#: How long the server may take to import, bind and say ``ready``.
START_DEADLINE_S = 30.0
#: Signed voice webhooks are posted this often during an attack, each on a new connection.
PROBE_INTERVAL_S = 0.25
#: A probe unanswered after this long counts as unanswered (``None``).
PROBE_TIMEOUT_S = 5.0
#: The witnesses start this long after the attacker, so that the attack is underway.
WITNESS_DELAY_S = 0.5
#: A witness's call may not last longer than this (the script takes under three seconds).
WITNESS_MAX_CALL_S = 20.0
#: The warm-up call: hear the greeting start, hang up.
WARM_UP_SCRIPT = (WaitForAssistant(heard_ms=100, timeout_s=10), Hangup())
#: How long to wait, after a run, for the ticker's next report (it reports every 0.1 s):
#: past it the loop is taken to be still held.
PULSE_WAIT_S = 3.0
#: The server's resident memory is sampled this often.
RSS_SAMPLE_S = 0.1
#: Kept of the server's stderr (a log flood must not fill this process's memory).
MAX_STDERR_LINES = 100_000


def unit_nofile(unit: Path = REPO / "systemd" / "voicebridge.service") -> int:
    """The soft descriptor limit ``voicebridge.service`` gives the daemon."""
    for line in unit.read_text().splitlines():
        name, _, value = line.partition("=")
        if name.strip() == "LimitNOFILE" and value.strip():
            soft = value.split(":")[0].strip()
            return int(soft) if soft.isdigit() else resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return DEFAULT_NOFILE


@attrs.define
class EdgeServer:
    """The server process and what this process saw of it."""

    process: trio.Process
    port: int
    vapi: SimVapi
    notify: NotifySocket
    caller: SimTwilioSettings
    #: (arrival time, largest loop lag, largest busy lag) since the previous report,
    #: from the ticker (``server_main.Pulse``).
    pulses: list[tuple[float, float, float]] = attrs.field(factory=list)
    #: (arrival time, line) of the server's stderr.
    stderr: list[tuple[float, str]] = attrs.field(factory=list)
    stderr_lines: int = 0
    ready: trio.Event = attrs.field(factory=trio.Event)
    #: Set (and replaced) at each report of the ticker.
    pulse_arrived: trio.Event = attrs.field(factory=trio.Event)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def voice_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/twilio/voice"

    def signed_webhook(self, call_sid: str) -> tuple[dict[str, str], str]:
        """The form of an inbound call's voice webhook and its Twilio signature."""
        form = {
            "CallSid": call_sid,
            "AccountSid": LOOPBACK_ACCOUNT_SID,
            "From": self.caller.from_number,
            "To": self.caller.to_number,
            "CallStatus": "ringing",
            "Direction": "inbound",
        }
        return form, sign(self.voice_url, form, self.caller.auth_token)

    def log_lines(self, since: float = 0.0) -> list[str]:
        return [line for at, line in self.stderr if at >= since]

    async def _read_stdout(self) -> None:
        assert self.process.stdout is not None
        buffered = b""
        async for chunk in self.process.stdout:
            buffered += chunk
            *lines, buffered = buffered.split(b"\n")
            for line in lines:
                if line == b"ready":
                    self.ready.set()
                elif line.startswith(b"pulse "):
                    _, lag, busy = line.split()
                    self.pulses.append((trio.current_time(), float(lag), float(busy)))
                    self.pulse_arrived.set()
                    self.pulse_arrived = trio.Event()

    async def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        buffered = b""
        async for chunk in self.process.stderr:
            buffered += chunk
            *lines, buffered = buffered.split(b"\n")
            now = trio.current_time()
            for line in lines:
                self.stderr_lines += 1
                if len(self.stderr) < MAX_STDERR_LINES:
                    self.stderr.append((now, line.decode(errors="replace")))


def _toml(value: object) -> str:
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return str(value)


def write_config(
    path: Path, *, port: int, vapi: SimVapi, sections: Mapping[str, Mapping[str, object]]
) -> Path:
    """A configuration file for the server on ``port``; ``sections`` add or override keys."""
    merged: dict[str, dict[str, object]] = {
        "server": {
            "public_url": f"http://127.0.0.1:{port}",
            "log_target": "stderr",
            "log_level": "info",
            "max_concurrent_calls": 200,
        },
        # Plain ws:// on a loopback port: the harness has no TLS proxy in front.
        "twilio": {"account_sid": LOOPBACK_ACCOUNT_SID, "allow_insecure_stream_url": True},
        "vapi": {"base_url": vapi.base_url, "assistant_id": "sim-assistant"},
    }
    if "ops_listen" in attrs.fields_dict(ServerConfig):
        # Health and metrics on a free loopback port: never a fixed one two servers share.
        merged["server"]["ops_listen"] = "127.0.0.1:0"
    if "shed_loop_lag_ms" in attrs.fields_dict(ServerConfig):
        # The probes must be admitted. The loop's wall-clock lag also counts the time a
        # shared test machine did not run the server, which no defence controls (the
        # loop's own holds are asserted apart, from its CPU time: assert_unharmed).
        merged["server"]["shed_loop_lag_ms"] = 0
    for name, keys in sections.items():
        merged.setdefault(name, {}).update(keys)
    lines: list[str] = []
    for name, keys in merged.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {_toml(value)}" for key, value in keys.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@asynccontextmanager
async def edge_server(
    tmp_path: Path,
    *,
    behaviour_for: BehaviourChooser | None = None,
    secrets_env: Mapping[str, str] | None = None,
    **sections: Mapping[str, object],
) -> AsyncIterator[EdgeServer]:
    """The real server in a child process on 127.0.0.1 (a free port), against the
    simulated Vapi of this process, warmed up by one call; killed on the way out."""
    vapi = SimVapi(
        api_key=secrets.token_hex(16), behaviour=WITNESS_ASSISTANT, behaviour_for=behaviour_for
    )
    notify = NotifySocket()
    auth_token = secrets.token_hex(16)
    listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
    port = int(listener.getsockname()[1])
    async with trio.open_nursery() as nursery:
        await nursery.start(vapi.serve)
        await nursery.start(notify.run)
        config = write_config(tmp_path / "edge.toml", port=port, vapi=vapi, sections=sections)
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "VOICEBRIDGE_TWILIO_AUTH_TOKEN": auth_token,
            "VOICEBRIDGE_VAPI_API_KEY": vapi.api_key,
            "VOICEBRIDGE_STREAM_TOKEN_SECRET": secrets.token_hex(32),
            "NOTIFY_SOCKET": notify.address,
            "EDGE_LISTEN_FD": str(listener.fileno()),
            "EDGE_NOFILE": str(unit_nofile()),
            **(secrets_env or {}),
        }
        try:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "tests.edge.server_main", str(config)],
                env=env,
                cwd=REPO,
                pass_fds=(listener.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        finally:
            listener.close()  # the server holds its own copy
        caller = SimTwilioSettings(
            bridge_url=f"http://127.0.0.1:{port}",
            public_url=f"http://127.0.0.1:{port}",
            account_sid=LOOPBACK_ACCOUNT_SID,
            auth_token=auth_token,
            max_call_s=WITNESS_MAX_CALL_S,
        )
        edge = EdgeServer(process, port, vapi, notify, caller)
        try:
            nursery.start_soon(edge._read_stdout)
            nursery.start_soon(edge._read_stderr)
            with trio.fail_after(START_DEADLINE_S):
                await edge.ready.wait()
                await warm_up(edge)
            yield edge
        finally:
            with trio.CancelScope(shield=True):
                # Killed, not drained: the drain is not under test here, and it would
                # wait for the probes' reserved calls that will never stream.
                if process.returncode is None:
                    process.kill()
                await process.wait()
            nursery.cancel_scope.cancel(reason="the server stopped")


async def warm_up(edge: EdgeServer) -> None:
    """One short call, so that the attack meets a warm server.

    A server's first webhook and first call do one-time work (lazy imports, the first
    connection to Vapi) that holds its loop for a few hundred milliseconds: a matter
    of start-up, not of any attack.
    """
    report = await place_call(edge.caller, WARM_UP_SCRIPT)
    assert report.streamed, ("the warm-up call was not streamed", report.webhook_twiml)


# -- one attack beside witnesses --------------------------------------------------------


@attrs.frozen
class Probe:
    """One signed voice webhook posted during the attack."""

    at: float
    #: Seconds until the answer; None if none came within ``PROBE_TIMEOUT_S``.
    answered_s: float | None
    status: int
    admitted: bool


@attrs.frozen
class AttackRun:
    """What the attack did and what everyone else noticed meanwhile."""

    attacker: Mapping[str, Any]
    attacker_exit: int
    witnesses: tuple[CallReport, ...]
    probes: tuple[Probe, ...]
    #: The largest scheduling gap the server's ticker saw from the attack's start to
    #: its end (the witnesses' and probes' end included).
    largest_gap_s: float
    #: The largest part of such a gap the server spent on the CPU: its loop held by its
    #: own work, not the kernel running other processes (``server_main.Pulse``).
    largest_busy_gap_s: float
    #: Largest silence between two watchdog pings in the same span.
    watchdog_gap_s: float
    rss_before_mib: float
    rss_peak_mib: float
    #: The server's stderr lines from the attack's start on.
    log: tuple[str, ...]
    #: How many lines that was (all of them, even past ``MAX_STDERR_LINES``).
    log_line_count: int
    seconds: float

    @property
    def rss_growth_mib(self) -> float:
        return self.rss_peak_mib - self.rss_before_mib

    @property
    def slowest_webhook_s(self) -> float | None:
        """The slowest probe's answer time (None: one was never answered)."""
        times = [probe.answered_s for probe in self.probes]
        return None if None in times else max(t for t in times if t is not None)

    def figures(self) -> str:
        """One line for docs/security.md: the attack's cost to everyone else."""
        slowest = self.slowest_webhook_s
        unanswered = sum(1 for probe in self.probes if probe.answered_s is None)
        return (
            f"largest loop gap {self.largest_gap_s * 1000:.0f} ms "
            f"({self.largest_busy_gap_s * 1000:.0f} ms busy); webhooks: "
            f"{len(self.probes)} posted, slowest "
            + ("unanswered" if slowest is None else f"{slowest * 1000:.0f} ms")
            + f" ({unanswered} unanswered); watchdog gap {self.watchdog_gap_s * 1000:.0f} ms; "
            f"RSS {self.rss_before_mib:.0f} -> {self.rss_peak_mib:.0f} MiB; "
            f"{self.log_line_count} log lines in {self.seconds:.1f} s; "
            f"attacker {dict(self.attacker)}"
        )


def attacker_command(name: str, edge: EdgeServer, *args: str) -> list[str]:
    """``python -m tests.edge.attackers.<name> --port <server's> …``."""
    return [sys.executable, "-m", f"tests.edge.attackers.{name}", "--port", str(edge.port), *args]


async def run_attacker(command: Sequence[str], *, stdin: bytes = b"") -> tuple[int, dict[str, Any]]:
    """Run an attacker to its end; (exit status, its JSON report)."""
    result = await trio.run_process(
        list(command), cwd=REPO, stdin=stdin, capture_stdout=True, check=False
    )
    lines = result.stdout.decode().strip().splitlines()
    return result.returncode, json.loads(lines[-1]) if lines else {}


async def probe_webhook(edge: EdgeServer, http: httpx.AsyncClient) -> Probe:
    """A signed voice webhook for a new call, timed from the request to the answer."""
    form, signature = edge.signed_webhook("CA" + secrets.token_hex(16))
    started = trio.current_time()
    with trio.move_on_after(PROBE_TIMEOUT_S):
        try:
            response = await http.post(
                edge.voice_url, data=form, headers={"X-Twilio-Signature": signature}
            )
        except httpx.HTTPError:
            return Probe(started, None, 0, False)
        return Probe(
            started,
            trio.current_time() - started,
            response.status_code,
            "<Connect" in response.text,
        )
    return Probe(started, None, 0, False)


def prober() -> httpx.AsyncClient:
    """The probes' client: every request on a new connection, as Twilio's would be."""
    return httpx.AsyncClient(
        timeout=PROBE_TIMEOUT_S, limits=httpx.Limits(max_keepalive_connections=0)
    )


async def attack_beside_witnesses(
    edge: EdgeServer,
    attacker: Sequence[str],
    *,
    attacker_stdin: bytes = b"",
    witnesses: int = WITNESSES,
) -> AttackRun:
    """Run ``attacker`` while ``witnesses`` calls are placed and webhooks probed.

    Returns when the attacker has exited and every witness call has ended; the
    attacker's own bounds (``--seconds``, its counts) keep that short.
    """
    pid = edge.pid
    rss_before = ProcessSample.of(pid).rss_kib / 1024
    rss_peak = rss_before
    started = trio.current_time()
    reports: list[CallReport] = []
    probes: list[Probe] = []
    outcome: dict[str, Any] = {}
    done = trio.Event()

    async def attack() -> None:
        code, figures = await run_attacker(attacker, stdin=attacker_stdin)
        outcome.update(exit=code, figures=figures)

    async def witness() -> None:
        reports.append(await place_call(edge.caller, WITNESS_SCRIPT))

    async def probe(http: httpx.AsyncClient) -> None:
        probes.append(await probe_webhook(edge, http))

    async def keep_probing() -> None:
        async with prober() as http, trio.open_nursery() as probe_nursery:
            while not done.is_set():
                probe_nursery.start_soon(probe, http)
                with trio.move_on_after(PROBE_INTERVAL_S):
                    await done.wait()

    async def sample_rss() -> None:
        nonlocal rss_peak
        while not done.is_set():
            try:
                rss_peak = max(rss_peak, ProcessSample.of(pid).rss_kib / 1024)
            except FileNotFoundError:
                return  # the server died: the assertions will say so
            with trio.move_on_after(RSS_SAMPLE_S):
                await done.wait()

    async with trio.open_nursery() as run_nursery:
        run_nursery.start_soon(sample_rss)
        run_nursery.start_soon(keep_probing)
        async with trio.open_nursery() as attack_nursery:
            attack_nursery.start_soon(attack)
            await trio.sleep(WITNESS_DELAY_S)
            for _ in range(witnesses):
                attack_nursery.start_soon(witness)
        done.set()
    run_ended = trio.current_time()
    # A loop that is still held reports nothing: the report after the run's end is the
    # one that covers it. If none comes, the loop has been held at least since the
    # last report (a lower bound, counted as its own doing: a stall outlasting the run).
    with trio.move_on_after(PULSE_WAIT_S):
        while not any(at > run_ended for at, _, _ in edge.pulses):
            await edge.pulse_arrived.wait()
    ended = trio.current_time()
    pulses = [(lag, busy) for at, lag, busy in edge.pulses if started <= at <= ended]
    if not any(at > run_ended for at, _, _ in edge.pulses):
        held = ended - max((at for at, _, _ in edge.pulses), default=started)
        pulses.append((held, held))
    pings = [n.at for n in edge.notify.with_key("WATCHDOG") if started <= n.at <= ended]
    watchdog_gap = max(
        (b - a for a, b in zip([started, *pings], [*pings, ended], strict=True)), default=0.0
    )
    log = edge.log_lines(since=started)
    return AttackRun(
        attacker=outcome.get("figures", {}),
        attacker_exit=outcome.get("exit", -1),
        witnesses=tuple(reports),
        probes=tuple(sorted(probes, key=lambda p: p.at)),
        largest_gap_s=max((lag for lag, _ in pulses), default=math.inf),
        largest_busy_gap_s=max((busy for _, busy in pulses), default=math.inf),
        watchdog_gap_s=watchdog_gap,
        rss_before_mib=rss_before,
        rss_peak_mib=rss_peak,
        log=tuple(log),
        log_line_count=sum(1 for at, _ in edge.stderr if at >= started)
        + max(0, edge.stderr_lines - len(edge.stderr)),
        seconds=ended - started,
    )


# -- what a user would notice ---------------------------------------------------------

_FIELD = re.compile(r'([A-Z_]+)=("(?:[^"\\]|\\.)*"|\S+)')


def log_fields(line: str) -> dict[str, str]:
    """The ``KEY=value`` fields of one text log line."""
    return {key: value.strip('"') for key, value in _FIELD.findall(line)}


def call_end(run: AttackRun, call_sid: str) -> dict[str, str]:
    """The fields of the server's call-end line for ``call_sid``."""
    ends = [
        log_fields(line)
        for line in run.log
        if f"CALL_SID={call_sid}" in line and "OUTCOME=" in line
    ]
    assert len(ends) == 1, f"one call-end line for {call_sid}, got {ends}"
    return ends[0]


def vapi_call_for(edge: EdgeServer, call_sid: str) -> list[SimVapiCallRecord]:
    """Every assistant call the simulated Vapi was asked to create for ``call_sid``."""
    return [call for call in edge.vapi.calls.values() if call.call_sid == call_sid]


def assert_witness_served(report: CallReport, run: AttackRun, edge: EdgeServer) -> None:
    """A witness's call went as a normal call does: heard the greeting, barged in and
    was obeyed at once, heard the answer, hung up; every frame it said reached the
    assistant (which recognised the words) and none was dropped."""
    label = f"witness {report.call_sid}"
    assert report.webhook_status == 200, (label, report.webhook_status, report.webhook_twiml)
    assert report.protocol_violations == [], label
    assert report.ended_by == "caller", (label, report.ended_by, report.timed_out_step)
    assert report.final_action == "hangup", label
    [barge_in] = report.barge_ins
    assert barge_in.clear_ms is not None, f"{label}: the assistant was not silenced"
    assert barge_in.heard_after_clear_ms == 0, f"{label}: assistant audio after the clear"
    assert [turn.interrupted for turn in report.turns] == [True, False], label
    end = call_end(run, report.call_sid)
    assert end["OUTCOME"] == "caller-hung-up", (label, end)
    assert end["FRAMES_DROPPED"] == "0", (label, end)
    assert float(end["BARGE_IN_MAX_MS"]) < WITNESS_BARGE_IN_MAX_MS, (label, end)
    [vapi_call] = vapi_call_for(edge, report.call_sid)
    said = [
        event.message["transcript"]
        for event in vapi_call.messages("transcript")
        if event.message["role"] == "user"
    ]
    assert said == [CLIP_TEXTS[WITNESS_WORDS]], label
    assert vapi_call.end_call_received_at is not None, label
    assert vapi_call.close_code == 1000, label


def assert_unharmed(run: AttackRun, edge: EdgeServer, *, witnesses: int = WITNESSES) -> None:
    """Everyone but the attacker was served as if there were no attack."""
    print(f"\nedge figures: {run.figures()}")
    assert run.attacker_exit == 0, "the attacker failed (its traceback is in the output)"
    # The loop's own doing: on a shared test machine the kernel may also not run the
    # server for a while, which no defence controls (the witnesses' checks see that).
    assert run.largest_busy_gap_s <= MAX_LOOP_GAP_S, (
        f"the server's event loop was held for {run.largest_busy_gap_s * 1000:.0f} ms"
    )
    unanswered = [probe for probe in run.probes if probe.answered_s is None]
    assert not unanswered, f"{len(unanswered)} of {len(run.probes)} signed webhooks unanswered"
    slow = [probe for probe in run.probes if (probe.answered_s or 0) > MAX_WEBHOOK_S]
    assert not slow, f"signed webhooks answered after {[p.answered_s for p in slow]} s"
    assert all(probe.status == 200 and probe.admitted for probe in run.probes), run.probes
    assert len(run.probes) >= 3
    assert run.watchdog_gap_s <= MAX_WATCHDOG_GAP_S, f"no watchdog ping for {run.watchdog_gap_s} s"
    assert run.rss_growth_mib <= MAX_RSS_GROWTH_MIB, (
        f"RSS grew {run.rss_growth_mib:.0f} MiB during the attack"
    )
    assert len(run.witnesses) == witnesses
    for report in run.witnesses:
        assert_witness_served(report, run, edge)
