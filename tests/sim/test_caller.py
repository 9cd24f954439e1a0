"""Tests of the simulated Twilio caller against a real, minimal bridge on loopback.

Charter: real sockets only (hypercorn serving a small raw-ASGI app on 127.0.0.1,
port 0, playing the bridge's role); every test is guarded by ``trio.fail_after``;
timed assertions are loose bounds on real time because the caller paces itself on
the real clock. The bridge pretends to sit behind a proxy: Twilio (the simulator)
signs ``https://voice.example.test/…`` while connecting to ``127.0.0.1``.
"""

from __future__ import annotations

import base64
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast
from urllib.parse import parse_qsl

import attrs
import orjson
import pytest
import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from twilio.request_validator import RequestValidator

from voicebridge.sim.audio import FRAME_BYTES, MULAW_SILENCE, is_speech, iter_frames, load_clip
from voicebridge.sim.caller import (
    CallReport,
    Hangup,
    PressDigit,
    SendRaw,
    Silence,
    SimTwilioSettings,
    Speak,
    Step,
    WaitForAssistant,
    WaitForAssistantDone,
    place_call,
)

ACCOUNT_SID = "AC" + "0123456789abcdef" * 2
AUTH_TOKEN = "test-auth-token-not-a-secret"
PUBLIC = "https://voice.example.test"
STREAM_URL = "wss://voice.example.test/twilio/stream"
CONNECT_TWIML = (
    '<?xml version="1.0" encoding="UTF-8"?><Response>'
    '<Connect action="/twilio/after"><Stream url="wss://voice.example.test/twilio/stream">'
    '<Parameter name="token" value="tok-123"/><Parameter name="lang" value="en"/>'
    "</Stream></Connect></Response>"
)
AFTER_TWIML = (
    "<Response><Say>Transferring you now.</Say><Dial>+15550100099</Dial><Hangup/></Response>"
)
#: Recognisably loud audio for the bridge to play (the greeting clip).
GREETING = load_clip("greeting")
#: The first 800 ms of a reply, for the assistant's answer after a barge-in.
REPLY = load_clip("reply_3")[: 800 * 8]


def speech_span_ms(audio: bytes) -> float:
    """From the first to the end of the last speech frame of ``audio`` (20 ms frames)."""
    flags = [is_speech(frame) for frame in iter_frames(audio)]
    first = flags.index(True)
    last = len(flags) - 1 - flags[::-1].index(True)
    return (last - first + 1) * 20.0


class Disconnected(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class BridgeSide:
    """The bridge's end of one Media Stream, over raw ASGI."""

    def __init__(
        self,
        receive: Callable[[], Awaitable[dict[str, Any]]],
        send: Callable[[dict[str, Any]], Awaitable[None]],
    ) -> None:
        self._receive = receive
        self._send = send
        self.stream_sid = ""

    async def receive(self) -> str | bytes:
        event = await self._receive()
        if event["type"] == "websocket.disconnect":
            raise Disconnected(event.get("code", 1005))
        text: str | None = event.get("text")
        return text if text is not None else event["bytes"]

    async def receive_json(self) -> dict[str, Any]:
        message: dict[str, Any] = orjson.loads(await self.receive())
        return message

    async def receive_event(self, name: str) -> dict[str, Any]:
        """The next message whose event is ``name``, skipping microphone media."""
        while True:
            message = await self.receive_json()
            if message["event"] == name:
                return message
            assert message["event"] == "media", message

    async def handshake(self) -> tuple[dict[str, Any], dict[str, Any]]:
        connected = await self.receive_json()
        start = await self.receive_json()
        self.stream_sid = start["streamSid"]
        return connected, start

    async def send_text(self, text: str) -> None:
        await self._send({"type": "websocket.send", "text": text})

    async def send_bytes(self, data: bytes) -> None:
        await self._send({"type": "websocket.send", "bytes": data})

    async def send_json(self, message: dict[str, Any]) -> None:
        await self.send_text(orjson.dumps(message).decode())

    async def play(self, audio: bytes) -> None:
        payload = base64.b64encode(audio).decode()
        await self.send_json(
            {"event": "media", "streamSid": self.stream_sid, "media": {"payload": payload}}
        )

    async def mark(self, name: str) -> None:
        await self.send_json(
            {"event": "mark", "streamSid": self.stream_sid, "mark": {"name": name}}
        )

    async def clear(self) -> None:
        await self.send_json({"event": "clear", "streamSid": self.stream_sid})

    async def close(self, code: int = 1000) -> None:
        await self._send({"type": "websocket.close", "code": code})

    async def wait_disconnect(self) -> int:
        """Drain messages until the caller closes; returns its close code."""
        try:
            while True:
                await self.receive()
        except Disconnected as gone:
            return gone.code


StreamHandler = Callable[[BridgeSide], Awaitable[None]]


async def close_after_start(side: BridgeSide) -> None:
    await side.handshake()
    await side.close()


@attrs.define
class Request:
    method: str
    path: str
    headers: dict[str, str]
    form: dict[str, str]


@attrs.define
class FakeBridge:
    """The bridge's role, minimally: TwiML answers and one stream handler per test."""

    voice_twiml: str = CONNECT_TWIML
    voice_status: int = 200
    reject_streams: bool = False
    after_twiml: str = AFTER_TWIML
    on_stream: StreamHandler = close_after_start
    url: str = ""
    requests: list[Request] = attrs.field(factory=list)
    upgrades: list[tuple[str, dict[str, str]]] = attrs.field(factory=list)

    async def asgi(
        self,
        scope: dict[str, Any],
        receive: Callable[[], Awaitable[dict[str, Any]]],
        send: Callable[[dict[str, Any]], Awaitable[None]],
    ) -> None:
        headers = {k.decode().lower(): v.decode() for k, v in scope.get("headers", [])}
        if scope["type"] == "http":
            body = b""
            while True:
                event = await receive()
                body += event.get("body", b"")
                if not event.get("more_body"):
                    break
            form = dict(parse_qsl(body.decode()))
            self.requests.append(Request(scope["method"], scope["path"], headers, form))
            twiml = self.voice_twiml if scope["path"] == "/twilio/voice" else self.after_twiml
            await send(
                {
                    "type": "http.response.start",
                    "status": self.voice_status if scope["path"] == "/twilio/voice" else 200,
                    "headers": [(b"content-type", b"text/xml")],
                }
            )
            await send({"type": "http.response.body", "body": twiml.encode()})
        elif scope["type"] == "websocket":
            self.upgrades.append((scope["path"], headers))
            assert (await receive())["type"] == "websocket.connect"
            if self.reject_streams:
                await send({"type": "websocket.close"})  # hypercorn answers 403
                return
            await send({"type": "websocket.accept"})
            await self.on_stream(BridgeSide(receive, send))
        elif scope["type"] == "lifespan":
            while True:
                event = await receive()
                await send({"type": event["type"] + ".complete"})
                if event["type"] == "lifespan.shutdown":
                    return


@pytest.fixture
async def bridge(nursery: trio.Nursery) -> AsyncIterator[FakeBridge]:
    fake = FakeBridge()
    config = Config()
    config.bind = ["127.0.0.1:0"]
    binds = await nursery.start(
        functools.partial(
            serve, cast("Any", fake.asgi), config, shutdown_trigger=trio.sleep_forever
        )
    )
    fake.url = binds[0]
    yield fake


def settings_for(bridge: FakeBridge, **changes: Any) -> SimTwilioSettings:
    return SimTwilioSettings(
        bridge_url=bridge.url,
        public_url=PUBLIC,
        account_sid=ACCOUNT_SID,
        auth_token=AUTH_TOKEN,
        **changes,
    )


async def call(bridge: FakeBridge, script: list[Step], **changes: Any) -> CallReport:
    with trio.fail_after(8):
        return await place_call(settings_for(bridge, **changes), tuple(script))


async def test_webhook_is_signed_and_stream_starts_as_twilio_does(bridge: FakeBridge) -> None:
    seen: dict[str, Any] = {}

    async def handler(side: BridgeSide) -> None:
        seen["connected"], seen["start"] = await side.handshake()
        seen["media"] = await side.receive_json()
        await side.close()

    bridge.on_stream = handler
    report = await call(bridge, [])

    webhook = bridge.requests[0]
    assert (webhook.method, webhook.path) == ("POST", "/twilio/voice")
    assert webhook.form == {
        "CallSid": report.call_sid,
        "AccountSid": ACCOUNT_SID,
        "From": "+15550100001",
        "To": "+15550100002",
        "CallStatus": "ringing",
        "Direction": "inbound",
        "ApiVersion": "2010-04-01",
        "Caller": "+15550100001",
        "Called": "+15550100002",
    }
    validator = RequestValidator(AUTH_TOKEN)
    signature = webhook.headers["x-twilio-signature"]
    assert validator.validate(PUBLIC + "/twilio/voice", webhook.form, signature)
    assert not validator.validate(bridge.url + "/twilio/voice", webhook.form, signature)
    assert report.call_sid.startswith("CA") and len(report.call_sid) == 34

    path, upgrade_headers = bridge.upgrades[0]
    assert path == "/twilio/stream"
    assert validator.validate(STREAM_URL, {}, upgrade_headers["x-twilio-signature"])

    assert seen["connected"] == {"event": "connected", "protocol": "Call", "version": "1.0.0"}
    stream_sid = report.stream_sid
    assert stream_sid.startswith("MZ") and len(stream_sid) == 34
    assert seen["start"] == {
        "event": "start",
        "sequenceNumber": "1",
        "streamSid": stream_sid,
        "start": {
            "accountSid": ACCOUNT_SID,
            "streamSid": stream_sid,
            "callSid": report.call_sid,
            "tracks": ["inbound"],
            "customParameters": {"token": "tok-123", "lang": "en"},
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        },
    }
    assert seen["media"] == {
        "event": "media",
        "sequenceNumber": "2",
        "streamSid": stream_sid,
        "media": {
            "track": "inbound",
            "chunk": "1",
            "timestamp": "0",
            "payload": base64.b64encode(bytes([MULAW_SILENCE]) * FRAME_BYTES).decode(),
        },
    }
    assert report.streamed and report.webhook_status == 200
    assert report.ended_by == "server" and report.close_code == 1000
    assert report.protocol_violations == []


async def test_media_is_paced_at_real_time(bridge: FakeBridge) -> None:
    frames: list[tuple[float, dict[str, Any]]] = []

    async def handler(side: BridgeSide) -> None:
        await side.handshake()
        with trio.move_on_after(0.5):
            while True:
                frames.append((trio.current_time(), await side.receive_event("media")))
        await side.close()

    bridge.on_stream = handler
    report = await call(bridge, [])

    assert 20 <= len(frames) <= 28  # 50 frames/s over 0.5 s, loosely
    elapsed = frames[-1][0] - frames[0][0]
    assert elapsed == pytest.approx((len(frames) - 1) * 0.020, abs=0.06)
    for index, (_, frame) in enumerate(frames):
        assert frame["sequenceNumber"] == str(index + 2)
        assert frame["media"]["chunk"] == str(index + 1)
        assert frame["media"]["timestamp"] == str(index * 20)
    assert report.frames_sent >= len(frames)


async def test_mark_is_echoed_when_its_audio_has_played(bridge: FakeBridge) -> None:
    echoes: dict[str, tuple[float, dict[str, Any]]] = {}

    async def handler(side: BridgeSide) -> None:
        await side.handshake()
        sent = trio.current_time()
        await side.play(GREETING[: 400 * 8])  # 400 ms
        await side.mark("played")
        echo = await side.receive_event("mark")
        echoes["played"] = (trio.current_time() - sent, echo)
        sent = trio.current_time()
        await side.mark("idle")  # nothing queued: echoed at once
        echo = await side.receive_event("mark")
        echoes["idle"] = (trio.current_time() - sent, echo)
        await side.close()

    bridge.on_stream = handler
    report = await call(bridge, [])

    delay, echo = echoes["played"]
    assert 0.38 <= delay <= 0.55
    assert echo == {
        "event": "mark",
        "sequenceNumber": echo["sequenceNumber"],
        "streamSid": report.stream_sid,
        "mark": {"name": "played"},
    }
    assert isinstance(echo["sequenceNumber"], str)
    delay, echo = echoes["idle"]
    assert delay < 0.05 and echo["mark"] == {"name": "idle"}
    assert (report.marks_sent, report.marks_echoed, report.marks_cleared) == (2, 2, 0)
    assert report.bytes_heard == 400 * 8
    assert report.protocol_violations == []


async def test_clear_echoes_pending_marks_and_stops_playback(bridge: FakeBridge) -> None:
    timings: dict[str, float] = {}

    async def handler(side: BridgeSide) -> None:
        await side.handshake()
        started = trio.current_time()
        await side.play(GREETING[: 2000 * 8])  # 2 s
        await side.mark("end")
        await trio.sleep(0.3)
        cleared = trio.current_time()
        timings["clear_ms"] = (cleared - started) * 1000
        await side.clear()
        echo = await side.receive_event("mark")
        timings["echo_delay"] = trio.current_time() - cleared
        assert echo["mark"] == {"name": "end"}
        await trio.sleep(0.3)
        await side.close()

    bridge.on_stream = handler
    report = await call(bridge, [])

    assert timings["echo_delay"] < 0.05
    assert (report.marks_sent, report.marks_echoed, report.marks_cleared) == (1, 1, 1)
    assert report.clears == 1
    assert 0.25 * 8000 <= report.bytes_heard <= 0.4 * 8000
    audio = report.heard_audio
    assert len(audio) >= 0.55 * 8000  # the whole stream, real-time aligned
    assert audio[: 200 * 8] != bytes([MULAW_SILENCE]) * (200 * 8)
    after_clear = audio[int((timings["clear_ms"] + 60) * 8) :]
    assert after_clear == bytes([MULAW_SILENCE]) * len(after_clear)
    assert len(report.turns) == 1 and report.turns[0].interrupted
    assert report.protocol_violations == []


async def test_bad_frames_from_the_bridge_are_reported(bridge: FakeBridge) -> None:
    async def handler(side: BridgeSide) -> None:
        await side.handshake()
        sid = side.stream_sid
        await side.send_json(
            {"event": "media", "streamSid": sid, "media": {"payload": "/w=="}, "track": "x"}
        )
        await side.send_bytes(b"\xff" * 160)
        await side.send_json({"event": "clear", "streamSid": "MZ" + "0" * 32})
        await side.send_json({"event": "media", "streamSid": sid, "media": {"payload": "@@"}})
        await side.send_json({"event": "mark", "streamSid": sid, "mark": {"name": 7}})
        await side.send_json({"event": "hello", "streamSid": sid})
        await side.send_text("not json")
        await side.send_json({"event": "media", "streamSid": sid, "media": {"payload": "/w=="}})
        await side.mark("fine")
        await side.receive_event("mark")
        await side.close()

    bridge.on_stream = handler
    report = await call(bridge, [])

    codes = [violation.split(":")[0] for violation in report.protocol_violations]
    assert codes == ["31951", "31950", "31951", "31951", "31951", "31951", "31951"]
    assert "track" in report.protocol_violations[0]
    assert "streamSid" in report.protocol_violations[2]
    assert report.bytes_heard == 1  # only the valid media message played
    assert report.marks_echoed == 1


async def test_hangup_sends_stop_then_closes(bridge: FakeBridge) -> None:
    received: list[dict[str, Any]] = []
    close_codes: list[int] = []

    async def handler(side: BridgeSide) -> None:
        await side.handshake()
        try:
            while True:
                received.append(await side.receive_json())
        except Disconnected as gone:
            close_codes.append(gone.code)

    bridge.on_stream = handler
    report = await call(bridge, [Silence(0.1), PressDigit("5"), Silence(0.04), Hangup()])

    events = [message["event"] for message in received]
    assert events[-1] == "stop" and "dtmf" in events
    assert [m["sequenceNumber"] for m in received] == [str(n) for n in range(2, len(received) + 2)]
    dtmf = received[events.index("dtmf")]
    assert dtmf == {
        "event": "dtmf",
        "sequenceNumber": dtmf["sequenceNumber"],
        "streamSid": report.stream_sid,
        "dtmf": {"track": "inbound_track", "digit": "5"},
    }
    assert received[-1] == {
        "event": "stop",
        "sequenceNumber": received[-1]["sequenceNumber"],
        "streamSid": report.stream_sid,
        "stop": {"accountSid": ACCOUNT_SID, "callSid": report.call_sid},
    }
    # hypercorn reports any client-initiated close to the app as 1006 (it only calls a
    # close normal once the app itself closed), so the code we sent shows on our side.
    assert len(close_codes) == 1
    assert report.ended_by == "caller" and report.close_code == 1000
    assert 6 <= report.frames_sent <= 9
    action = bridge.requests[1]
    assert action.form["CallStatus"] == "completed"


async def test_action_is_fetched_signed_after_the_bridge_closes(bridge: FakeBridge) -> None:
    report = await call(bridge, [Silence(5)])

    assert report.ended_by == "server"
    action = bridge.requests[1]
    assert (action.method, action.path) == ("POST", "/twilio/after")
    assert action.form == {
        "CallSid": report.call_sid,
        "AccountSid": ACCOUNT_SID,
        "From": "+15550100001",
        "To": "+15550100002",
        "CallStatus": "in-progress",
        "Direction": "inbound",
        "ApiVersion": "2010-04-01",
    }
    validator = RequestValidator(AUTH_TOKEN)
    assert validator.validate(
        PUBLIC + "/twilio/after", action.form, action.headers["x-twilio-signature"]
    )
    assert report.action_twiml == AFTER_TWIML
    assert (report.final_action, report.final_say, report.final_dial) == (
        "dial",
        "Transferring you now.",
        "+15550100099",
    )
    assert report.protocol_violations == []


async def test_overflow_twiml_is_reported_without_a_stream(bridge: FakeBridge) -> None:
    bridge.voice_twiml = "<Response><Say>All lines are busy.</Say><Hangup/></Response>"
    report = await call(bridge, [Speak("caller_1"), Hangup()])

    assert not report.streamed and report.ended_by == "no_stream"
    assert bridge.upgrades == [] and len(bridge.requests) == 1
    assert report.webhook_twiml == bridge.voice_twiml
    assert (report.final_action, report.final_say) == ("say", "All lines are busy.")
    assert report.stream_sid == "" and report.close_code is None and report.heard_audio == b""
    assert report.protocol_violations == []


async def test_step_timeout_and_max_duration_hang_up(bridge: FakeBridge) -> None:
    close_codes: list[int] = []

    async def silent_bridge(side: BridgeSide) -> None:
        await side.handshake()
        close_codes.append(await side.wait_disconnect())

    bridge.on_stream = silent_bridge
    timed_out = await call(bridge, [Silence(0.04), WaitForAssistant(timeout_s=0.2)])
    too_long = await call(bridge, [], max_call_s=0.2)

    assert (timed_out.ended_by, timed_out.timed_out_step) == ("step_timeout", 1)
    assert too_long.ended_by == "max_duration" and too_long.timed_out_step is None
    assert 8 <= too_long.frames_sent <= 12
    assert len(close_codes) == 2  # both hung up (see the hypercorn note above)
    assert timed_out.close_code == too_long.close_code == 1000


async def test_barge_in_is_measured_as_the_caller_hears_it(bridge: FakeBridge) -> None:
    """The bridge queues the whole greeting, clears on the caller's first speech frame,
    and answers once the caller has been quiet for 200 ms."""

    async def barging_bridge(side: BridgeSide) -> None:
        await side.handshake()
        await side.play(GREETING)
        quiet_frames = 0
        heard_speech = False
        while quiet_frames < 10 or not heard_speech:
            media = await side.receive_event("media")
            if is_speech(base64.b64decode(media["media"]["payload"])):
                if not heard_speech:
                    await side.clear()
                heard_speech, quiet_frames = True, 0
            else:
                quiet_frames += 1
        await side.play(REPLY)
        await side.wait_disconnect()

    bridge.on_stream = barging_bridge
    report = await call(
        bridge,
        [
            WaitForAssistant(heard_ms=400),
            Speak("caller_1"),
            WaitForAssistant(),
            WaitForAssistantDone(quiet_s=0.3),
            Hangup(),
        ],
    )

    assert report.ended_by == "caller" and report.protocol_violations == []
    assert report.first_audio_ms is not None and report.first_audio_ms < 100
    greeting, reply = report.turns
    assert greeting.interrupted and not reply.interrupted
    (barge_in,) = report.barge_ins
    assert barge_in.latency_ms is not None and 0 <= barge_in.latency_ms < 60
    assert barge_in.heard_after_clear_ms == 0
    assert barge_in.heard_of_turn_ms == pytest.approx(greeting.heard_ms)
    # The greeting was cut about when the caller started talking, at ~400 ms heard.
    assert 400 <= greeting.heard_ms <= 700
    assert reply.start_ms > barge_in.speech_onset_ms + 1200  # after caller_1 (1.25 s)
    assert reply.heard_ms == pytest.approx(speech_span_ms(REPLY), abs=40)
    assert report.clears == 1


async def test_send_raw_reaches_the_bridge_verbatim(bridge: FakeBridge) -> None:
    raw: list[str | bytes] = []

    async def handler(side: BridgeSide) -> None:
        await side.handshake()
        while len(raw) < 2:
            message = await side.receive()
            if isinstance(message, bytes) or '"media"' not in message:
                raw.append(message)
        await side.close()

    bridge.on_stream = handler
    await call(bridge, [SendRaw("{not json"), SendRaw(b"\x00\x01")])

    assert raw == ["{not json", b"\x00\x01"]


async def test_failures_are_reported_not_raised(bridge: FakeBridge) -> None:
    bridge.reject_streams = True
    rejected = await call(bridge, [Speak("caller_1")])
    bridge.voice_status = 500
    failed = await call(bridge, [Speak("caller_1")])

    assert (rejected.ended_by, rejected.streamed, rejected.close_code) == (
        "stream_failed",
        False,
        None,
    )
    assert [v.split(":")[0] for v in rejected.protocol_violations] == ["31920"]
    assert rejected.final_action == "dial"  # the action still runs after a failed stream
    assert (failed.ended_by, failed.webhook_status, failed.final_action) == (
        "no_stream",
        500,
        "none",
    )
    assert [v.split(":")[0] for v in failed.protocol_violations] == ["11200"]


STATUS_TWIML = CONNECT_TWIML.replace(
    '<Stream url="wss://voice.example.test/twilio/stream">',
    '<Stream url="wss://voice.example.test/twilio/stream" statusCallback="/twilio/status">',
)


def stream_events(bridge: FakeBridge) -> list[Request]:
    return [r for r in bridge.requests if r.path == "/twilio/status"]


async def test_the_stream_status_callback_is_posted_as_twilio_does(bridge: FakeBridge) -> None:
    bridge.voice_twiml = STATUS_TWIML
    report = await call(bridge, [])
    bridge.reject_streams = True
    failed = await call(bridge, [])

    validator = RequestValidator(AUTH_TOKEN)
    started, stopped, error = stream_events(bridge)
    for request in (started, stopped, error):
        assert request.method == "POST"
        url = PUBLIC + "/twilio/status"
        assert validator.validate(url, request.form, request.headers["x-twilio-signature"])
        assert request.form["Timestamp"].endswith("+00:00")
    common = {"AccountSid": ACCOUNT_SID, "CallSid": report.call_sid}
    assert {k: started.form[k] for k in common} == common
    assert (started.form["StreamEvent"], started.form["StreamSid"]) == (
        "stream-started",
        report.stream_sid,
    )
    assert (stopped.form["StreamEvent"], stopped.form["StreamSid"]) == (
        "stream-stopped",
        report.stream_sid,
    )
    assert "StreamError" not in started.form and "StreamError" not in stopped.form
    # A refused upgrade: stream-error, with the handshake's error code (31920) first.
    assert (error.form["CallSid"], error.form["StreamEvent"]) == (failed.call_sid, "stream-error")
    assert error.form["StreamError"].startswith("31920 Stream - WebSocket - Handshake Error")
    assert report.protocol_violations == []


async def test_a_shared_key_rule_signs_with_the_shared_key(bridge: FakeBridge) -> None:
    bridge.voice_twiml = STATUS_TWIML
    await call(bridge, [], shared_key="shared-secret-0123", shared_key_id="webhooks_sharedkey_1")

    webhooks = [r for r in bridge.requests if r.path != "/twilio/stream"]
    assert {r.path for r in webhooks} == {"/twilio/voice", "/twilio/status", "/twilio/after"}
    shared = RequestValidator("shared-secret-0123")
    for request in webhooks:
        url = PUBLIC + request.path
        signature = request.headers["x-twilio-signature"]
        assert request.headers["x-twilio-webhooks-signature-settings"] == (
            "key=webhooks_sharedkey_1,algorithm=HMAC_SHA256"
        )
        assert shared.validate(url, request.form, signature, "HMAC_SHA256")
        assert not RequestValidator(AUTH_TOKEN).validate(url, request.form, signature)
