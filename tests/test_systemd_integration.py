"""``voicebridge serve`` as systemd runs it: activation, notify, journal, drain, reload, all cores.

Charter: loopback only. The server is the real CLI in a subprocess (``python -m
voicebridge serve --config …``, config written to tmp_path, secrets in environment
variables), handed its listening sockets the way systemd does: by the real
``systemd-socket-activate``, or by a shell that puts the sockets on fds 3, 4, … and sets
``LISTEN_PID`` to its own pid before exec'ing the server (so a test can choose ports,
and give two processes one socket). Each server gets an ops socket of its own (named
``ops``), where the test reads ``/readyz``, ``/healthz`` and ``/metrics``. It tells a
real datagram socket the test binds (``NOTIFY_SOCKET``) how it is doing; the test reads
those datagrams to know when the server is ready and how many calls it has. Calls are
placed by the simulated Twilio caller against the simulated Vapi, which runs in the
test's own trio loop. Only the journald test runs the server in-process, so that logging
can point at a private journald. Every test is under ``trio.fail_after``; every
subprocess is killed on the way out; every call is a few seconds of real time.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from xml.etree import ElementTree

import attrs
import httpx
import pytest
import trio
import trio_websocket
from prometheus_client.parser import text_string_to_metric_families

from tests import journald_fixture
from tests.journald_fixture import PrivateJournal
from voicebridge.loopback import LOOPBACK_ACCOUNT_SID, loopback_bridge
from voicebridge.observability.logs import configure_logging
from voicebridge.sim.caller import (
    CallReport,
    Hangup,
    Silence,
    SimTwilioSettings,
    Speak,
    WaitForAssistantDone,
    place_call,
)
from voicebridge.sim.vapi import SimVapi, SimVapiBehaviour
from voicebridge.twilio.signature import sign

ACTIVATE = shutil.which("systemd-socket-activate")
needs_activate = pytest.mark.skipif(
    ACTIVATE is None, reason="systemd-socket-activate not installed (Debian package: systemd)"
)
private_journal = journald_fixture.private_journal

FALLBACK_WORDS = "technical difficulties"
OVERFLOW_WORDS = "all our lines are busy"

#: Greets briefly (1.25 s) and then listens for ever: calls end when the caller (or the
#: server) ends them.
PATIENT_ASSISTANT = SimVapiBehaviour(
    greeting_clip="caller_1",
    reply_clips=("caller_2",),
    end_after_replies=None,
    think_delay_s=0.2,
    customer_audio_timeout_s=None,
)
#: Greets (1.25 s), answers the caller's first turn with a goodbye (1.25 s), ends the call.
SHORT_ASSISTANT = attrs.evolve(PATIENT_ASSISTANT, goodbye_clip="caller_1", end_after_replies=0)
#: Listen to the greeting, say something (1.25 s), listen to the goodbye: about 4.5 s.
SHORT_CALL = (WaitForAssistantDone(quiet_s=0.3), Speak("caller_1"), WaitForAssistantDone(0.3))


# -- the systemd side: a notify socket ------------------------------------------------


@attrs.frozen
class Notification:
    at: float
    fields: Mapping[str, str]


class NotifySocket:
    """A ``$NOTIFY_SOCKET`` (abstract namespace) and every datagram the service sent."""

    def __init__(self) -> None:
        self.address = f"@voicebridge-test-{secrets.token_hex(6)}"
        self.received: list[Notification] = []
        self._sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._arrived = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None]) -> None:
        with self._sock:
            await self._sock.bind("\0" + self.address[1:])
            task_status.started()
            while True:
                datagram = await self._sock.recv(4096)
                lines = datagram.decode().split("\n")
                fields = dict(line.partition("=")[::2] for line in lines)
                self.received.append(Notification(trio.current_time(), fields))
                self._arrived.set()
                self._arrived = trio.Event()

    async def wait_for(
        self, predicate: Callable[[Mapping[str, str]], bool], *, since: int = 0, count: int = 1
    ) -> Notification:
        """The ``count``-th datagram from index ``since`` on (received already, or yet to
        come) that ``predicate`` accepts."""
        while True:
            found = [n for n in self.received[since:] if predicate(n.fields)]
            if len(found) >= count:
                return found[count - 1]
            await self._arrived.wait()

    def with_key(self, key: str) -> list[Notification]:
        return [n for n in self.received if key in n.fields]


def is_ready(fields: Mapping[str, str]) -> bool:
    return "READY" in fields


def is_reloading(fields: Mapping[str, str]) -> bool:
    return "RELOADING" in fields


def is_stopping(fields: Mapping[str, str]) -> bool:
    return "STOPPING" in fields


def status_is(text: str) -> Callable[[Mapping[str, str]], bool]:
    return lambda fields: text in fields.get("STATUS", "")


# -- the server in a subprocess -------------------------------------------------------


@attrs.define
class Box:
    """What the servers of one test share: secrets, the simulated Vapi, a notify socket."""

    tmp_path: Path
    vapi: SimVapi
    notify: NotifySocket
    auth_token: str = attrs.field(factory=lambda: secrets.token_hex(16))
    token_secret: str = attrs.field(factory=lambda: secrets.token_hex(32))

    def environment(self, **extra: str) -> dict[str, str]:
        """The server's whole environment: secrets, the notify socket, nothing inherited
        that could confuse it (``LISTEN_*``, ``VOICEBRIDGE_*``)."""
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "VOICEBRIDGE_TWILIO_AUTH_TOKEN": self.auth_token,
            "VOICEBRIDGE_VAPI_API_KEY": self.vapi.api_key,
            "VOICEBRIDGE_STREAM_TOKEN_SECRET": self.token_secret,
            "NOTIFY_SOCKET": self.notify.address,
            **extra,
        }

    def write_config(self, name: str, *, public_port: int, **server: object) -> Path:
        """The config file ``name``; a server handed no ops socket binds a free port for
        it (never the default 9180, which a real service or another test may hold)."""
        server.setdefault("ops_listen", "127.0.0.1:0")
        path = self.tmp_path / name
        lines = ["[server]", f'public_url = "http://127.0.0.1:{public_port}"']
        lines += ['log_target = "stderr"']
        lines += [f"{key} = {_toml(value)}" for key, value in server.items()]
        lines += ["[twilio]", f'account_sid = "{LOOPBACK_ACCOUNT_SID}"']
        lines += ["allow_insecure_stream_url = true"]  # ws:// on a loopback port
        lines += ["[vapi]", f'base_url = "{self.vapi.base_url}"', 'assistant_id = "sim"']
        path.write_text("\n".join(lines) + "\n")
        return path

    def caller(self, *, port: int, public_port: int | None = None) -> SimTwilioSettings:
        """The simulated Twilio, sending every request to ``port``."""
        return SimTwilioSettings(
            bridge_url=f"http://127.0.0.1:{port}",
            public_url=f"http://127.0.0.1:{public_port or port}",
            account_sid=LOOPBACK_ACCOUNT_SID,
            auth_token=self.auth_token,
        )


def _toml(value: object) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    return str(value).lower() if isinstance(value, bool) else str(value)


class Server:
    """One ``voicebridge serve`` process and what it wrote to stderr."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.stderr = ""
        self._output = trio.Event()

    async def read_stderr(self) -> None:
        assert self.process.stderr is not None
        async for chunk in self.process.stderr:
            self.stderr += chunk.decode(errors="replace")
            self._output.set()
            self._output = trio.Event()

    async def wait_for_log(self, text: str) -> None:
        while text not in self.stderr:
            await self._output.wait()

    def log_lines(self, text: str) -> list[str]:
        return [line for line in self.stderr.splitlines() if text in line]

    def signal(self, signum: signal.Signals) -> None:
        self.process.send_signal(signum)


@asynccontextmanager
async def serving(
    command: Sequence[str], env: Mapping[str, str], *, pass_fds: Sequence[int] = ()
) -> AsyncIterator[Server]:
    """Run ``command``, collect its stderr, and kill it on the way out if it still runs."""
    process = await trio.lowlevel.open_process(
        list(command),
        env=dict(env),
        pass_fds=tuple(pass_fds),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    server = Server(process)
    try:
        async with trio.open_nursery() as reader_nursery:
            reader_nursery.start_soon(server.read_stderr)
            yield server
            with trio.move_on_after(10):
                await process.wait()
            reader_nursery.cancel_scope.cancel(reason="server exited")
    finally:
        if process.returncode is None:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()
        print(f"--- stderr of {command[0]} (exit status {process.returncode}):\n{server.stderr}")


SERVE = [sys.executable, "-m", "voicebridge", "serve", "--config"]


#: Puts the descriptors listed in argv[1] on 3, 4, …, sets LISTEN_PID to its own pid and
#: exec's the rest of argv (the pid stays the same, as sd_listen_fds(3) requires).
LAUNCHER = """
import os, sys
fds = [int(fd) for fd in sys.argv[1].split(",")]
for target, fd in enumerate(fds, 3):
    os.dup2(fd, target)
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
"""


@asynccontextmanager
async def activated_server(
    box: Box, config: Path, sockets: Sequence[tuple[str, socket.socket]]
) -> AsyncIterator[Server]:
    """``voicebridge serve`` handed ``sockets`` (name, listening socket) as systemd would:
    on fds 3, 4, … with ``LISTEN_FDS``, ``LISTEN_FDNAMES`` and ``LISTEN_PID`` set."""
    # Copies far above 3 + len(sockets), so that moving them onto 3, 4, … never
    # overwrites one still to be moved.
    copies = [fcntl.fcntl(sock.fileno(), fcntl.F_DUPFD_CLOEXEC, 100) for _, sock in sockets]
    env = box.environment(
        LISTEN_FDS=str(len(sockets)), LISTEN_FDNAMES=":".join(name for name, _ in sockets)
    )
    command = [sys.executable, "-c", LAUNCHER, ",".join(map(str, copies)), *SERVE[1:]]
    try:
        async with serving([*command, str(config)], env, pass_fds=copies) as server:
            yield server
    finally:
        for fd in copies:
            os.close(fd)


def listener() -> tuple[socket.socket, int]:
    sock = socket.create_server(("127.0.0.1", 0), backlog=64)
    return sock, int(sock.getsockname()[1])


async def calls_counted(ops_port: int) -> float:
    """Every call a server's ``/metrics`` counts, whatever its outcome."""
    async with httpx.AsyncClient() as http:
        response = await http.get(f"http://127.0.0.1:{ops_port}/metrics")
    response.raise_for_status()
    return sum(
        sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
        if sample.name == "voicebridge_calls_total"
    )


@asynccontextmanager
async def a_box(tmp_path: Path, behaviour: SimVapiBehaviour) -> AsyncIterator[Box]:
    vapi = SimVapi(api_key=secrets.token_hex(16), behaviour=behaviour)
    notify = NotifySocket()
    async with trio.open_nursery() as nursery:
        await nursery.start(vapi.serve)
        await nursery.start(notify.run)
        yield Box(tmp_path, vapi, notify)
        nursery.cancel_scope.cancel(reason="test finished")


async def post_webhook(box: Box, port: int, call_sid: str) -> httpx.Response:
    """A signed voice webhook, as Twilio sends it when a call comes in."""
    url = f"http://127.0.0.1:{port}/twilio/voice"
    form = {"CallSid": call_sid, "AccountSid": LOOPBACK_ACCOUNT_SID,
            "From": "+15550100001", "To": "+15550100002"}
    async with httpx.AsyncClient() as http:
        return await http.post(
            url, data=form, headers={"X-Twilio-Signature": sign(url, form, box.auth_token)}
        )


# -- socket activation, sd_notify and the watchdog ------------------------------------


@needs_activate
async def test_socket_activated_server_notifies_systemd_and_serves_a_call(
    tmp_path: Path,
) -> None:
    ports = []
    for _ in range(2):  # systemd-socket-activate cannot report port 0's pick
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            ports.append(int(probe.getsockname()[1]))
    port, ops_port = ports
    with trio.fail_after(30):
        async with a_box(tmp_path, SHORT_ASSISTANT) as box:
            config = box.write_config("voicebridge.toml", public_port=port)
            environment = box.environment(WATCHDOG_USEC="300000")  # ping every 150 ms
            assert ACTIVATE is not None
            command = [ACTIVATE, "-l", f"127.0.0.1:{port}", "-l", f"127.0.0.1:{ops_port}"]
            command += ["--fdname=public:ops"]
            command += [f"--setenv={name}={value}" for name, value in environment.items()]
            async with serving([*command, *SERVE, str(config)], {"PATH": "/usr/bin:/bin"}) as srv:
                await srv.wait_for_log(f"Listening on 127.0.0.1:{port}")
                # systemd-socket-activate starts the server at the first connection: the
                # webhook waits in the backlog meanwhile, it is never refused.
                report = await place_call(box.caller(port=port), SHORT_CALL)
                await box.notify.wait_for(status_is("Serving: 0 calls active"))
                counted = await calls_counted(ops_port)
                async with httpx.AsyncClient() as http:
                    public_metrics = await http.get(f"http://127.0.0.1:{port}/metrics")
                srv.signal(signal.SIGTERM)
                await box.notify.wait_for(is_stopping)
                assert await srv.process.wait() == 0
    assert report.protocol_violations == []
    assert report.final_action == "hangup"
    assert report.first_audio_ms is not None
    assert "(socket activation)" in srv.stderr
    assert f"health and metrics on 127.0.0.1:{ops_port}" in srv.stderr
    assert counted == 1
    assert public_metrics.status_code == 404
    # Besides the watchdog pings: READY comes first, with a status; then the call's comings
    # and goings; then STOPPING.
    received = [n for n in box.notify.received if "WATCHDOG" not in n.fields]
    assert received[0].fields == {"READY": "1", "STATUS": "Serving: 0 calls active, limit 50"}
    statuses = [n.fields["STATUS"] for n in received if set(n.fields) == {"STATUS"}]
    assert "Serving: 1 call active, limit 50" in statuses
    # STOPPING after the last of those; only the drain's own status may follow it (a
    # status update held back by the 4-a-second limit lands after it).
    [stopping] = [i for i, n in enumerate(received) if "STOPPING" in n.fields]
    assert received[stopping].fields["STOPPING"] == "1"
    assert all(n.fields["STATUS"].startswith("Draining") for n in received[stopping + 1:])
    pings = [n.at for n in box.notify.with_key("WATCHDOG")]
    assert len(pings) >= 10, "a call of ~4 s at one ping per 150 ms"
    gaps = [later - earlier for earlier, later in itertools.pairwise(pings)]
    # The cadence is kept (a late ping does not shift the next ones); single gaps jitter
    # with the load on this machine, so the bounds on each are loose.
    assert 0.13 < (pings[-1] - pings[0]) / len(gaps) < 0.17, gaps
    assert all(0.02 < gap < 0.5 for gap in gaps), gaps


# -- drain on SIGTERM -----------------------------------------------------------------


async def test_sigterm_drains_calls_in_flight_then_exits_zero(tmp_path: Path) -> None:
    sock, port = listener()
    ops_sock, ops_port = listener()
    reports: dict[str, CallReport] = {}
    with trio.fail_after(30), sock, ops_sock:
        async with a_box(tmp_path, PATIENT_ASSISTANT) as box:
            config = box.write_config("vb.toml", public_port=port, drain_deadline_s=2.0)
            caller = box.caller(port=port)
            sockets = [("public", sock), ("ops", ops_sock)]
            async with activated_server(box, config, sockets) as server:
                await box.notify.wait_for(is_ready)

                async def call(name: str, script: tuple[Silence | Hangup, ...]) -> None:
                    reports[name] = await place_call(caller, script)

                async with trio.open_nursery() as calls_nursery:
                    calls_nursery.start_soon(call, "short", (Silence(1.5), Hangup()))
                    calls_nursery.start_soon(call, "long", (Silence(10),))
                    await box.notify.wait_for(status_is("2 calls active"))
                    sigterm_at = trio.current_time()
                    server.signal(signal.SIGTERM)
                    await box.notify.wait_for(is_stopping)
                    # Draining: a new call hears the overflow message; not ready.
                    reports["new"] = await place_call(caller, (Silence(1),))
                    async with httpx.AsyncClient() as http:
                        ready = await http.get(f"http://127.0.0.1:{ops_port}/readyz")
                long_ended_at = trio.current_time()
                assert await server.process.wait() == 0
                exited_at = trio.current_time()
    short, long, new = reports["short"], reports["long"], reports["new"]
    # The short call ended as the caller chose, during the drain.
    assert short.ended_by == "caller"
    [short_end] = server.log_lines(f"call {short.call_sid} ended")
    assert "OUTCOME=caller-hung-up" in short_end
    assert (long.ended_by, long.final_action) == ("server", "say")
    assert FALLBACK_WORDS in long.final_say.lower()
    [long_at_vapi] = [c for c in box.vapi.calls.values() if c.call_sid == long.call_sid]
    assert long_at_vapi.end_call_received_at is not None, "the Vapi leg got end-call"
    assert long_at_vapi.close_code == 1000
    assert (new.streamed, new.final_action) == (False, "say")
    assert OVERFLOW_WORDS in new.final_say.lower()
    assert (ready.status_code, ready.text) == (503, "not ready: draining\n")
    assert 2.0 <= long_ended_at - sigterm_at < 3.5, "ended at the drain deadline"
    assert exited_at - sigterm_at < 5.0
    assert len(server.log_lines("draining: refusing new calls; waiting up to 2 s for 2 calls")) == 1
    assert len(server.log_lines("drain deadline (2 s) passed: ending 1 call with")) == 1
    [done] = server.log_lines("drained in")
    assert "ACTIONS_UNANSWERED=0" in done
    # systemd is told how long the stop may take: at the start, the deadline and the last
    # steps (Vapi end 2 s, close 2 s, actions 3 s, shutdown 5 s, margin 5 s); at the
    # deadline, the last steps again.
    extensions = [int(n.fields["EXTEND_TIMEOUT_USEC"])
                  for n in box.notify.with_key("EXTEND_TIMEOUT_USEC")]
    assert extensions == [19_000_000, 17_000_000]
    assert "STOPPING" in box.notify.with_key("EXTEND_TIMEOUT_USEC")[0].fields
    assert [line for line in server.log_lines("OUTCOME=") if "OUTCOME=shutdown" in line]
    print(f"drain: long call ended {long_ended_at - sigterm_at:.2f} s after SIGTERM, "
          f"process exited after {exited_at - sigterm_at:.2f} s")


async def test_a_second_sigint_stops_at_once(tmp_path: Path) -> None:
    sock, port = listener()
    ops_sock, _ = listener()
    with trio.fail_after(30), sock, ops_sock:
        async with a_box(tmp_path, PATIENT_ASSISTANT) as box:
            config = box.write_config("vb.toml", public_port=port, drain_deadline_s=60.0)
            sockets = [("public", sock), ("ops", ops_sock)]
            async with activated_server(box, config, sockets) as server:
                await box.notify.wait_for(is_ready)
                async with trio.open_nursery() as calls_nursery:
                    reports: list[CallReport] = []

                    async def call() -> None:
                        reports.append(await place_call(box.caller(port=port), (Silence(20),)))

                    calls_nursery.start_soon(call)
                    await box.notify.wait_for(status_is("1 call active"))
                    server.signal(signal.SIGTERM)
                    await box.notify.wait_for(is_stopping)
                    second_at = trio.current_time()
                    server.signal(signal.SIGINT)
                    assert await server.process.wait() == 0
                    stopped_after = trio.current_time() - second_at
    [report] = reports
    print(f"second signal: the process exited {stopped_after:.2f} s after it")
    assert stopped_after < 4.0, "not the 60 s drain deadline"
    assert report.ended_by == "server"
    assert FALLBACK_WORDS in report.final_say.lower()
    assert len(server.log_lines("stopping at once (second signal, SIGINT): ending 1 call")) == 1


# -- reload on SIGHUP -----------------------------------------------------------------


async def test_sighup_applies_a_valid_config_and_refuses_an_invalid_one(tmp_path: Path) -> None:
    sock, port = listener()
    ops_sock, ops_port = listener()
    with trio.fail_after(30), sock, ops_sock:
        async with a_box(tmp_path, PATIENT_ASSISTANT) as box:
            config = box.write_config(
                "vb.toml", public_port=port, max_concurrent_calls=5, drain_deadline_s=0.5
            )
            sockets = [("public", sock), ("ops", ops_sock)]
            async with activated_server(box, config, sockets) as server:
                await box.notify.wait_for(is_ready)

                async def reload() -> None:
                    before = len(box.notify.received)
                    server.signal(signal.SIGHUP)
                    reloading = await box.notify.wait_for(is_reloading, since=before)
                    assert int(reloading.fields["MONOTONIC_USEC"]) > 0
                    await box.notify.wait_for(is_ready, since=before)

                # Valid: the limit drops to one call. A webhook that is answered holds a
                # slot until its stream starts, so the second caller hears the overflow.
                box.write_config(
                    "vb.toml", public_port=port, max_concurrent_calls=1, drain_deadline_s=0.5,
                    listen="127.0.0.1:9",  # the socket is bound: only a restart changes it
                )
                await reload()
                first = await post_webhook(box, port, "CA" + "1" * 32)
                second = await post_webhook(box, port, "CA" + "2" * 32)
                # Invalid: refused with one line; the server runs on with the limit of one.
                config.write_text(config.read_text().replace("= 1\n", '= "one"\n'))
                await reload()
                third = await post_webhook(box, port, "CA" + "3" * 32)
                async with httpx.AsyncClient() as http:
                    health = await http.get(f"http://127.0.0.1:{ops_port}/healthz")
                server.signal(signal.SIGTERM)
                assert await server.process.wait() == 0
    assert "<Connect" in first.text
    assert OVERFLOW_WORDS in second.text.lower() and OVERFLOW_WORDS in third.text.lower()
    assert health.status_code == 200
    assert len(server.log_lines("configuration reloaded: limit 1 call,")) == 1
    assert len(server.log_lines("changes to server.listen take effect at the next restart")) == 1
    [refused] = server.log_lines("reload refused")
    assert "server.max_concurrent_calls" in refused
    assert box.notify.with_key("RELOADING")[1].fields["RELOADING"] == "1"


# -- all cores: two processes, one socket ---------------------------------------------


class ActionToOtherProcess(httpx.AsyncBaseTransport):
    """Sends the ``<Connect action>`` request to ``port``, everything else where it goes."""

    def __init__(self, port: int) -> None:
        self._port = port
        self._transport = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/twilio/after-stream":
            request.url = request.url.copy_with(port=self._port)
        return await self._transport.handle_async_request(request)

    async def aclose(self) -> None:
        await self._transport.aclose()


async def test_two_processes_on_one_socket_share_outcomes_and_tokens(tmp_path: Path) -> None:
    # Both processes accept from one shared socket (as voicebridge@0 and @1 would); each
    # also gets a socket of its own, so the test can choose which one a request reaches,
    # and an ops socket of its own (as voicebridge-ops@0.socket and @1 give them).
    shared_sock, shared_port = listener()
    own = [listener(), listener()]
    ops = [listener(), listener()]
    with trio.fail_after(40), shared_sock, own[0][0], own[1][0], ops[0][0], ops[1][0]:
        async with a_box(tmp_path, SHORT_ASSISTANT) as box:
            config = box.write_config(
                "vb.toml", public_port=shared_port, shared_dir=str(tmp_path / "run")
            )
            a_sockets = [("public", shared_sock), ("own", own[0][0]), ("ops", ops[0][0])]
            b_sockets = [("public", shared_sock), ("own", own[1][0]), ("ops", ops[1][0])]
            async with (
                activated_server(box, config, a_sockets) as a,
                activated_server(box, config, b_sockets) as b,
            ):
                await box.notify.wait_for(is_ready, count=2)
                reports: dict[str, CallReport] = {}

                async def crossed_call() -> None:
                    # Webhook and stream on A; the <Connect action> lands on B.
                    via_a = box.caller(port=own[0][1], public_port=shared_port)
                    transport = ActionToOtherProcess(own[1][1])
                    async with httpx.AsyncClient(transport=transport) as http:
                        reports["crossed"] = await place_call(via_a, SHORT_CALL, http=http)
                    # B refuses the stream token A accepted.
                    await replay_stream(own[1][1], reports["crossed"])

                async def shared_call() -> None:
                    # Served through the shared socket, whichever process takes it.
                    reports["shared"] = await place_call(box.caller(port=shared_port), SHORT_CALL)

                async with trio.open_nursery() as calls_nursery:
                    calls_nursery.start_soon(crossed_call)
                    calls_nursery.start_soon(shared_call)
                # Each process counts the calls it ran, on its own ops listener.
                counted = [await calls_counted(ops[i][1]) for i in (0, 1)]
                for server in (a, b):
                    server.signal(signal.SIGTERM)
                assert (await a.process.wait(), await b.process.wait()) == (0, 0)
    crossed, shared = reports["crossed"], reports["shared"]
    # B answered A's call from A's record: the assistant ended it, so Twilio hangs up
    # (B without the record would have played the fallback).
    assert crossed.final_action == "hangup", crossed.action_twiml
    assert not b.log_lines("after-stream for unknown call")
    assert len(b.log_lines("token-rejected (stream token reused)")) == 1
    assert len(box.vapi.calls) == 2, "no assistant call for the replayed token"
    assert shared.final_action == "hangup"
    assert shared.protocol_violations == []
    assert (tmp_path / "run" / "outcomes" / crossed.call_sid).is_file()
    # The crossed call ran on A; the replay refused on B counts there; the shared call
    # on either.
    assert counted[0] >= 1 and counted[1] >= 1
    assert sum(counted) == 3, counted


async def replay_stream(port: int, report: CallReport) -> None:
    """Open a media stream to ``port`` with the stream parameters ``report``'s call was
    given: its token and the numbers the token vouches for."""
    stream = ElementTree.fromstring(report.webhook_twiml).find("Connect/Stream")
    assert stream is not None
    parameters = {p.get("name", ""): p.get("value", "") for p in stream.iter("Parameter")}
    stream_sid = "MZ" + secrets.token_hex(16)
    start = {
        "event": "start", "sequenceNumber": "1", "streamSid": stream_sid,
        "start": {
            "accountSid": LOOPBACK_ACCOUNT_SID, "streamSid": stream_sid,
            "callSid": report.call_sid, "tracks": ["inbound"],
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            "customParameters": parameters,
        },
    }
    async with trio_websocket.open_websocket_url(f"ws://127.0.0.1:{port}/twilio/stream") as ws:
        await ws.send_message(json.dumps(start))
        with pytest.raises(trio_websocket.ConnectionClosed):
            while True:
                await ws.get_message()


# -- journald ---------------------------------------------------------------------------


async def test_a_call_is_one_journalctl_query_away(private_journal: PrivateJournal) -> None:
    with journald_fixture.saved_voicebridge_logging(), trio.fail_after(30):
        configure_logging("INFO", target="journal", journal_socket=private_journal.socket_path)
        async with loopback_bridge(behaviour=SHORT_ASSISTANT) as bridge:
            report = await place_call(bridge.caller, SHORT_CALL)
        sid = report.call_sid
        entries = await private_journal.wait_for_entries(f"CALL_SID={sid}", expect=2)
        [end] = await private_journal.wait_for_entries(
            f"CALL_SID={sid}", "EVENT=call-end", "OUTCOME=assistant-ended"
        )
    assert {entry["EVENT"] for entry in entries} >= {"call-start", "call-end"}
    assert all(entry["SYSLOG_IDENTIFIER"] == "voicebridge" for entry in entries)
    assert end["STREAM_SID"] == report.stream_sid
    assert end["VAPI_CALL_ID"] in bridge.vapi.calls
    assert end["PRIORITY"] == "6"
    assert int(end["HEARD_MS"]) > 2000
    assert float(end["DURATION_S"]) > 3
    assert int(end["FRAMES_FROM_CALLER"]) > 100
    assert float(end["FIRST_AUDIO_MS"]) > 0
    assert end["MESSAGE"].startswith(f"call {sid} ended: assistant-ended")
    # No secret reaches the journal: not the keys, not the Vapi call's socket URL.
    everything = "".join(str(entry) for entry in entries)
    for secret in (bridge.caller.auth_token, bridge.vapi.api_key, "websocketCallUrl"):
        assert secret not in everything

