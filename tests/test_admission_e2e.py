"""One admission per CallSid, end to end: replayed voice webhooks and streams against the real
server on loopback, beside genuine calls, counting the assistant calls the simulated Vapi
was asked to create.

Charter: loopback only, port 0, a ``trio.fail_after`` guard on every test, real time and
short clips (``tests.harness.SHORT_ASSISTANT``). A captured webhook is the exact signed
request the simulated Twilio makes for a call (``place_call`` with the same CallSid makes
it again). One test's replayer runs in its own OS process (``tests/replay_peer.py``)
from 127.0.0.2; the last test runs two server processes of one box, sharing a directory.
The shedding test's server (``tests/busy_server.py``) holds its own loop on a signal, and
is probed from this process.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from xml.etree import ElementTree

import attrs
import httpx
import pytest
import trio
import trio_websocket
from prometheus_client.parser import text_string_to_metric_families

from tests.edge.harness import write_config
from tests.harness import SHORT_ASSISTANT, Bridge, running_bridge
from tests.test_e2e import OVERFLOW_WORDS, SHORT_SCRIPT, assert_served
from tests.test_systemd_integration import SHORT_CALL, a_box, activated_server, is_ready, listener
from voicebridge.control.assistants import outbound_voice_url
from voicebridge.loopback import LOOPBACK_ACCOUNT_SID
from voicebridge.observability.logs import FieldValue, record_fields
from voicebridge.sim.caller import SimTwilioSettings, place_call
from voicebridge.sim.vapi import SimVapi
from voicebridge.twilio.signature import sign

PEER = Path(__file__).with_name("replay_peer.py")
REPO = Path(__file__).resolve().parents[1]
ALLOWED = ("asst-sales", "asst-support")


@attrs.frozen
class CapturedWebhook:
    """One validly signed voice webhook, as the simulated Twilio sends it for a call."""

    path: str
    form: dict[str, str]
    signature: str

    @classmethod
    def of(cls, bridge: Bridge, call_sid: str, path: str = "/twilio/voice") -> CapturedWebhook:
        return cls.sent_by(bridge.caller, call_sid, path)

    @classmethod
    def sent_by(
        cls, caller: SimTwilioSettings, call_sid: str, path: str = "/twilio/voice"
    ) -> CapturedWebhook:
        """The webhook ``caller`` (the simulated Twilio) sends when ``call_sid`` rings."""
        form = {
            "CallSid": call_sid,
            "AccountSid": caller.account_sid,
            "From": caller.from_number,
            "To": caller.to_number,
            "CallStatus": "ringing",
            "Direction": caller.direction,
            "ApiVersion": "2010-04-01",
            "Caller": caller.from_number,
            "Called": caller.to_number,
        }
        signature = sign(caller.public_url + path, form, caller.auth_token)
        return cls(path=path, form=form, signature=signature)

    async def post(self, http: httpx.AsyncClient, bridge: Bridge) -> httpx.Response:
        return await self.post_to(http, bridge.listening.port)

    async def post_to(self, http: httpx.AsyncClient, port: int) -> httpx.Response:
        return await http.post(
            f"http://127.0.0.1:{port}{self.path}",
            data=self.form,
            headers={"X-Twilio-Signature": self.signature},
        )


def stream_parameters(twiml: str) -> dict[str, str]:
    """The ``<Parameter>``s of the ``<Stream>`` in ``twiml``: what Twilio's start carries."""
    stream = ElementTree.fromstring(twiml).find("Connect/Stream")
    assert stream is not None, twiml
    return {p.get("name", ""): p.get("value", "") for p in stream.iter("Parameter")}


async def start_stream(bridge: Bridge, call_sid: str, parameters: dict[str, str]) -> int:
    """Open the media socket and send a ``start`` carrying ``parameters``; how many
    messages the bridge sent before it closed the socket (it must close it)."""
    return await start_stream_at(bridge.listening.port, call_sid, parameters)


async def start_stream_at(port: int, call_sid: str, parameters: dict[str, str]) -> int:
    """``start_stream`` to the server on ``port``."""
    stream_sid = "MZ" + "9" * 32
    start = {
        "event": "start", "sequenceNumber": "1", "streamSid": stream_sid,
        "start": {
            "accountSid": LOOPBACK_ACCOUNT_SID, "streamSid": stream_sid,
            "callSid": call_sid, "tracks": ["inbound"],
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            "customParameters": parameters,
        },
    }  # fmt: skip
    received = 0
    url = f"ws://127.0.0.1:{port}/twilio/stream"
    with trio.fail_after(5):
        async with trio_websocket.open_websocket_url(url) as ws:
            await ws.send_message(json.dumps(start))
            with pytest.raises(trio_websocket.ConnectionClosed):
                while True:
                    await ws.get_message()
                    received += 1
    return received


def events(caplog: pytest.LogCaptureFixture, call_sid: str) -> list[dict[str, FieldValue]]:
    """The structured log lines about ``call_sid``, in order."""
    return [
        dict(record_fields(r))
        for r in caplog.records
        if record_fields(r).get("CALL_SID") == call_sid
    ]


def assistant_calls(bridge: Bridge) -> list[str]:
    """The CallSid of every assistant call the simulated Vapi was asked to create."""
    return [str(call.call_sid) for call in bridge.vapi.calls.values()]


async def test_a_webhook_posted_four_times_is_one_admission_and_one_assistant_call(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="voicebridge")
    call_sid, other_sid = "CA" + "4" * 32, "CA" + "5" * 32
    with trio.fail_after(40):
        async with (
            running_bridge(server={"max_concurrent_calls": 1}) as bridge,
            httpx.AsyncClient() as http,
        ):
            webhook = CapturedWebhook.of(bridge, call_sid)
            answers = [await webhook.post(http, bridge) for _ in range(4)]
            other = await CapturedWebhook.of(bridge, other_sid).post(http, bridge)
            # Twilio's own request for the call, and its stream.
            report = await place_call(bridge.caller, SHORT_SCRIPT, call_sid=call_sid)
            replayed = await webhook.post(http, bridge)
            replayed_stream = await start_stream(
                bridge, call_sid, stream_parameters(answers[0].text)
            )
            created = assistant_calls(bridge)

    # The same answer each time, holding one slot: the next caller hears the overflow.
    assert [answer.status_code for answer in answers] == [200] * 4
    assert len({answer.text for answer in answers}) == 1
    assert "<Connect" in answers[0].text
    assert OVERFLOW_WORDS in other.text.lower()
    assert report.webhook_twiml == answers[0].text
    assert_served(report, bridge)
    # Once it has streamed, the webhook is refused and so is the stream: one Vapi call.
    assert replayed.status_code == 403
    assert replayed_stream == 0
    assert created == [call_sid]
    lines = [(f["EVENT"], f.get("REASON"), f.get("OUTCOME")) for f in events(caplog, call_sid)]
    assert lines == [
        *[("webhook-repeated", None, None)] * 4,
        ("call-start", None, None),
        ("call-end", None, "assistant-ended"),
        ("webhook-rejected", "replayed", None),
        ("call-end", None, "token-rejected"),
    ]
    rejected = [r.getMessage() for r in caplog.records if "token-rejected" in r.getMessage()]
    assert [text.split(" after ")[0] for text in rejected] == [
        f"call {call_sid} ended: token-rejected (stream token reused)"
    ]


async def test_a_start_with_changed_parameters_is_refused_before_any_assistant_call(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="voicebridge")
    call_sid = "CA" + "6" * 32
    with trio.fail_after(40):
        async with (
            running_bridge(outbound={"assistants": ALLOWED}) as bridge,
            httpx.AsyncClient() as http,
        ):
            public = bridge.config.server.public_url
            granted = outbound_voice_url(
                bridge.config,
                public + "/twilio/voice",
                to=bridge.caller.to_number,
                assistant="asst-sales",
            ).removeprefix(public)
            answer = await CapturedWebhook.of(bridge, call_sid, granted).post(http, bridge)
            signed = stream_parameters(answer.text)
            changes = {
                "another allowed assistant": {"assistant": "asst-support"},
                "the configured assistant": {"assistant": ""},
                "another caller": {"caller": "+15550199999"},
                "another called number": {"called": "+15550199999"},
            }
            received = {
                what: await start_stream(bridge, call_sid, {**signed, **change})
                for what, change in changes.items()
            }
            created_before = assistant_calls(bridge)
            # The genuine stream after all that: the refusals did not use its token up.
            genuine = attrs.evolve(bridge.caller, voice_path=granted)
            report = await place_call(genuine, SHORT_SCRIPT, call_sid=call_sid)

    assert signed["assistant"] == "asst-sales" and set(signed) >= {"token", "caller", "called"}
    assert received == dict.fromkeys(changes, 0)
    assert created_before == []
    assert report.webhook_twiml == answer.text
    assert_served(report, bridge)
    [vapi_call] = bridge.vapi.calls.values()
    assert (vapi_call.call_sid, vapi_call.assistant_id) == (call_sid, "asst-sales")
    ends = [
        r.getMessage().split(" after ")[0]
        for r in caplog.records
        if record_fields(r).get("EVENT") == "call-end"
    ]
    refused = f"call {call_sid} ended: token-rejected (stream token wrong-parameters)"
    served = f"call {call_sid} ended: assistant-ended (assistant-ended-call)"
    assert ends == [refused] * 4 + [served]


async def test_replays_from_another_process_never_make_a_second_assistant_call(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="voicebridge")
    call_sid = "CA" + "7" * 32
    with trio.fail_after(60):
        async with running_bridge(behaviour=SHORT_ASSISTANT) as bridge:
            webhook = CapturedWebhook.of(bridge, call_sid)
            arguments = {
                "port": bridge.listening.port,
                "path": webhook.path,
                "form": webhook.form,
                "signature": webhook.signature,
                "call_sid": call_sid,
            }
            peer = await trio.lowlevel.open_process(
                [sys.executable, str(PEER), json.dumps(arguments)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
            try:
                assert peer.stdin is not None and peer.stdout is not None
                lines = LineReader(peer.stdout)
                assert await lines.readline() == "posted"
                # The genuine call goes on while the replays keep coming.
                report = await place_call(bridge.caller, SHORT_SCRIPT, call_sid=call_sid)
                await peer.stdin.send_all(b"ended\n")
                result = json.loads(await lines.readline())
                assert await peer.wait() == 0
            finally:
                if peer.returncode is None:
                    peer.kill()
            created = assistant_calls(bridge)

    assert_served(report, bridge)
    assert created == [call_sid]
    statuses = [replay["status"] for replay in result["replays"]]
    # Answered as Twilio was while the call was reserved; refused from its stream on.
    refused_from = statuses.index(403)
    assert refused_from > 0 and set(statuses[:refused_from]) == {200}
    assert set(statuses[refused_from:]) == {403}
    assert {replay["body"] for replay in result["replays"][:refused_from]} == {
        report.webhook_twiml
    }
    # Its streams, one while the call was live and one after it ended: refused at start.
    assert result["streams"] == [{"accepted": True, "messages": 0, "close": 1000}] * 2
    fields = events(caplog, call_sid)
    rejections = [f for f in fields if f["EVENT"] == "webhook-rejected"]
    assert len(rejections) == len(statuses) - refused_from
    assert {(f["REASON"], f["REMOTE"]) for f in rejections} == {("replayed", "127.0.0.2")}
    outcomes = [str(f["OUTCOME"]) for f in fields if f["EVENT"] == "call-end"]
    assert sorted(outcomes) == ["assistant-ended", "token-rejected", "token-rejected"]


async def test_the_processes_of_a_box_admit_and_stream_a_call_once(tmp_path: Path) -> None:
    # Two `voicebridge serve` processes of one box, each on a socket of its own (so that
    # the test chooses which one a request reaches), sharing one directory.
    (public_sock, public_port), (sock_a, port_a), (sock_b, port_b) = (listener() for _ in "abc")
    call_sid, other_sid = "CA" + "8" * 32, "CA" + "9" * 32
    with trio.fail_after(40), public_sock, sock_a, sock_b:
        async with a_box(tmp_path, SHORT_ASSISTANT) as box:
            config = box.write_config(
                "vb.toml",
                public_port=public_port,
                shared_dir=str(tmp_path / "run"),
                max_concurrent_calls=1,
            )
            async with (
                activated_server(box, config, [("http", sock_a)]) as a,
                activated_server(box, config, [("http", sock_b)]) as b,
                httpx.AsyncClient() as http,
            ):
                await box.notify.wait_for(is_ready, count=2)
                via_b = box.caller(port=port_b, public_port=public_port)
                webhook = CapturedWebhook.sent_by(via_b, call_sid)
                on_a = await webhook.post_to(http, port_a)
                on_b = await webhook.post_to(http, port_b)  # the repeat lands on B
                other_on_b = await CapturedWebhook.sent_by(via_b, other_sid).post_to(http, port_b)
                # Twilio's own request lands on B too, and so does the stream.
                report = await place_call(via_b, SHORT_CALL, call_sid=call_sid)
                replayed = [await webhook.post_to(http, port) for port in (port_a, port_b)]
                replayed_stream = await start_stream_at(
                    port_a, call_sid, stream_parameters(on_a.text)
                )
                for server in (a, b):
                    server.signal(signal.SIGTERM)
                assert (await a.process.wait(), await b.process.wait()) == (0, 0)
    assert "<Connect" in on_a.text
    assert on_b.text == report.webhook_twiml == on_a.text
    assert "<Connect" in other_on_b.text, "the repeat took no slot on B"
    assert report.final_action == "hangup" and report.protocol_violations == []
    assert [response.status_code for response in replayed] == [403, 403]
    assert replayed_stream == 0
    assert [call.call_sid for call in box.vapi.calls.values()] == [call_sid]
    for server in (a, b):
        assert len(server.log_lines(f"call {call_sid} has streamed already")) == 1
    assert len(a.log_lines("token-rejected (stream token reused)")) == 1
    assert (tmp_path / "run" / "streams" / call_sid).is_file()


class LineReader:
    """Lines of text from a trio receive stream (a child process's stdout)."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = bytearray()

    async def readline(self) -> str:
        while b"\n" not in self._buffer:
            data = await self._stream.receive_some()
            if not data:
                raise EOFError("the peer process closed its output")
            self._buffer += data
        line, _, rest = bytes(self._buffer).partition(b"\n")
        self._buffer = bytearray(rest)
        return line.decode()


# -- shedding: a busy bridge answers new calls with the overflow message, fast ------------

#: The busy spell of ``tests/busy_server.py``: the loop held this long at a time (far over
#: the threshold below), for this long (the probes fit in it with a margin).
BUSY_HOLD_MS = 60
BUSY_FOR_S = 8.0
SHED_LAG_MS = 20
SHED_WINDOW_S = 0.5
#: A refused webhook's answer, at most: this many turns of the held loop. The front door
#: answers it in two or three (the accept, the connection's task, the body's arrival);
#: through hypercorn and quart it took about 17. The margin is for the turns the test
#: sees late (``turn N`` lines come over a pipe).
SHED_ANSWER_TURNS = 6


@attrs.define
class BusyServer:
    process: trio.Process
    port: int
    caller: SimTwilioSettings
    stdout: list[str] = attrs.field(factory=list)
    stderr: list[str] = attrs.field(factory=list)
    line_arrived: trio.Event = attrs.field(factory=trio.Event)

    async def read(self, stream: trio.abc.ReceiveStream, into: list[str]) -> None:
        reader = LineReader(stream)
        with contextlib.suppress(EOFError):
            while True:
                into.append(await reader.readline())
                self.line_arrived.set()
                self.line_arrived = trio.Event()

    async def wait_for_line(self, text: str) -> None:
        while text not in self.stdout:
            await self.line_arrived.wait()

    def ops_port(self) -> int:
        [line] = [line for line in self.stderr if "accepting connections on" in line]
        return int(log_fields_of(line)["OPS_LISTEN"].rsplit(":", 1)[1])

    def turn(self) -> int:
        """The last turn of the busy loop seen (0: none yet)."""
        turns = [line for line in self.stdout if line.startswith("turn ")]
        return int(turns[-1].split()[1]) if turns else 0

    async def post_webhook(self, http: httpx.AsyncClient, call_sid: str) -> tuple[float, str]:
        """A new call's signed voice webhook: (seconds to the answer, the TwiML)."""
        webhook = CapturedWebhook.sent_by(self.caller, call_sid)
        started = trio.current_time()
        response = await webhook.post_to(http, self.port)
        assert response.status_code == 200, response.text
        return trio.current_time() - started, response.text

    async def post_webhook_counting_turns(
        self, http: httpx.AsyncClient, call_sid: str
    ) -> tuple[int, str]:
        """``post_webhook``: (the busy loop's turns it took, the TwiML)."""
        first = self.turn()
        _, twiml = await self.post_webhook(http, call_sid)
        await trio.sleep(0.01)  # the line of a turn that began as the answer came
        return self.turn() - first, twiml


def log_fields_of(line: str) -> dict[str, str]:
    return {key: value.strip('"') for key, value in re.findall(r'(\w+)=("[^"]*"|\S+)', line)}


@contextlib.asynccontextmanager
async def running_busy_server(
    tmp_path: Path, vapi: SimVapi, *, early_answer: bool = True
) -> AsyncIterator[BusyServer]:
    """``tests/busy_server.py`` in its own process on a port of its own, ready; killed on
    exit. ``early_answer=False``: its front door answers nothing itself."""
    auth_token = secrets.token_hex(16)
    sock, port = listener()
    async with trio.open_nursery() as nursery:
        config = write_config(
            tmp_path / "busy.toml", port=port, vapi=vapi,
            sections={"server": {
                "shed_loop_lag_ms": SHED_LAG_MS, "shed_loop_lag_window_s": SHED_WINDOW_S,
            }},
        )
        with sock:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "tests.busy_server", str(config)],
                env={
                    "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                    "VOICEBRIDGE_TWILIO_AUTH_TOKEN": auth_token,
                    "VOICEBRIDGE_VAPI_API_KEY": vapi.api_key,
                    "VOICEBRIDGE_STREAM_TOKEN_SECRET": secrets.token_hex(32),
                    "BUSY_LISTEN_FD": str(sock.fileno()),
                    "BUSY_FOR_S": str(BUSY_FOR_S),
                    "BUSY_HOLD_MS": str(BUSY_HOLD_MS),
                    "BUSY_EARLY_ANSWER": "on" if early_answer else "off",
                },
                cwd=REPO,
                pass_fds=(sock.fileno(),),
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )
        caller = SimTwilioSettings(
            bridge_url=f"http://127.0.0.1:{port}", public_url=f"http://127.0.0.1:{port}",
            account_sid=LOOPBACK_ACCOUNT_SID, auth_token=auth_token,
        )
        server = BusyServer(process, port, caller)
        assert process.stdout is not None and process.stderr is not None
        nursery.start_soon(server.read, process.stdout, server.stdout)
        nursery.start_soon(server.read, process.stderr, server.stderr)
        try:
            await server.wait_for_line("ready")
            yield server
        finally:
            process.kill()
            await process.wait()
            nursery.cancel_scope.cancel(reason="busy server done")


async def test_a_busy_bridge_sheds_new_calls_with_the_overflow_message_fast(
    tmp_path: Path,
) -> None:
    vapi = SimVapi(api_key=secrets.token_hex(16), behaviour=SHORT_ASSISTANT)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(vapi.serve)
            async with running_busy_server(tmp_path, vapi) as server, httpx.AsyncClient(
                limits=httpx.Limits(max_keepalive_connections=0), timeout=10
            ) as http:
                admitted_sid = "CA" + "1" * 32
                _, before = await server.post_webhook(http, admitted_sid)
                server.process.send_signal(signal.SIGUSR1)
                await server.wait_for_line("busy")
                await trio.sleep(SHED_WINDOW_S + 0.2)
                shed = [
                    await server.post_webhook_counting_turns(http, f"CA{n:032x}")
                    for n in range(2, 5)
                ]
                # Twilio's retry of the call admitted before is answered as before.
                _, repeat = await server.post_webhook(http, admitted_sid)
                # A forged webhook is refused for its signature, busy or not, and is
                # no refused call.
                forged = attrs.evolve(
                    CapturedWebhook.sent_by(server.caller, "CA" + "e" * 32),
                    signature="forged",
                )
                forged_answer = await forged.post_to(http, server.port)
                ops = f"http://127.0.0.1:{server.ops_port()}"
                busy_ready = await http.get(ops + "/readyz")
                assert "idle" not in server.stdout, "every probe met the busy loop"
                await server.wait_for_line("idle")
                await trio.sleep(SHED_WINDOW_S + 0.2)
                _, after = await server.post_webhook(http, "CA" + "f" * 32)
                idle_ready = await http.get(ops + "/readyz")
                metrics = (await http.get(ops + "/metrics")).text
            nursery.cancel_scope.cancel(reason="test finished")
    assert "<Connect" in before and "<Connect" in after
    assert repeat == before
    assert forged_answer.status_code == 403
    for turns, twiml in shed:
        assert "<Connect" not in twiml and OVERFLOW_WORDS in twiml.lower()
        assert 0 < turns <= SHED_ANSWER_TURNS, [turns for turns, _ in shed]
    assert (busy_ready.status_code, busy_ready.text) == (503, "not ready: event loop behind\n")
    assert idle_ready.status_code == 200
    refused = [
        sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.name == "voicebridge_admissions_refused_total"
        and sample.labels["reason"] == "loop-behind"
    ]
    assert refused == [3.0]
    lines = [log_fields_of(line) for line in server.stderr if "refused (" in line]
    assert [fields["CALL_SID"] for fields in lines] == [f"CA{n:032x}" for n in range(2, 5)]
    assert all(fields["REASON"] == "loop-behind" for fields in lines)
    assert all(float(fields["LOOP_LAG_MS"]) >= SHED_LAG_MS for fields in lines)
    rejected = [line for line in server.stderr if "signature" in line and "403" in line]
    assert len(rejected) == 1 and ("CA" + "e" * 32) in rejected[0]
    assert not vapi.calls, "no call was ever set up"
