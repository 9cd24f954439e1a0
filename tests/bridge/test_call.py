"""The call nursery on trio's autojump clock: barge-in, deadlines, liveness, endings.

Every test drives the real ``Call`` over in-memory sockets with the peers in
``peers.py`` and asserts exact virtual times and the frames each peer received.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from trio import Nursery

from tests.bridge.peers import (
    CALL_SID,
    FakeTwilio,
    FakeVapi,
    MemoryConnector,
    Tracker,
    connected_frame,
    start_frame,
    stop_frame,
    verify_token,
)
from voicebridge.bridge.call import Call, CallSettings
from voicebridge.bridge.outcome import CallRecord, Outcome
from voicebridge.config import Config, KeypadConfig
from voicebridge.observability.logs import record_fields
from voicebridge.sockets import memory_socket_pair
from voicebridge.twilio.media import PRE_START_FRAMES
from voicebridge.vapi.client import VapiError
from voicebridge.web import after_stream_twiml

#: What the call tests run with: the defaults but for shorter deadlines, and every key
#: press its own message (``[keypad]`` batching is tested in ``test_keypad.py``).
CONFIG = Config().evolve(
    twilio=attrs.evolve(Config().twilio, start_deadline_s=5.0, media_inactivity_s=3.0),
    vapi=attrs.evolve(
        Config().vapi, ping_interval_s=5.0, pong_deadline_s=2.0, end_deadline_s=1.0
    ),
    keypad=KeypadConfig(batch=False),
)
SETTINGS = CallSettings.from_config(CONFIG)


def settings_with(**sections: Any) -> CallSettings:
    """``SETTINGS`` with these sections of ``CONFIG`` changed (``name={key: value}``)."""
    changed = {
        name: attrs.evolve(getattr(CONFIG, name), **keys) for name, keys in sections.items()
    }
    return CallSettings.from_config(CONFIG.evolve(**changed))

Scenario = Callable[[FakeTwilio, MemoryConnector, trio.Nursery], Awaitable[None]]


async def run_call(
    scenario: Scenario,
    *,
    connector: MemoryConnector | None = None,
    settings: CallSettings = SETTINGS,
    send_start: bool = True,
    remote: str = "",
) -> tuple[CallRecord, FakeTwilio, MemoryConnector]:
    """Run one call with ``scenario`` playing both peers; return its record."""
    connector = connector or MemoryConnector()
    bridge_side, twilio_side = memory_socket_pair()
    twilio = FakeTwilio(twilio_side)
    tracker = Tracker()
    call = Call(
        bridge_side,
        settings=settings,
        connector=connector,
        verify_token=verify_token,
        tracker=tracker,
        remote=remote,
    )
    record: CallRecord | None = None

    async def run() -> None:
        nonlocal record
        record = await call.run()

    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            nursery.start_soon(twilio.read)
            if send_start:
                await twilio.socket.send(connected_frame())
                await twilio.socket.send(start_frame())
            await scenario(twilio, connector, nursery)
    assert record is not None
    assert tracker.finished == ([record] if tracker.begun else [])
    return record, twilio, connector


async def start_vapi(connector: MemoryConnector, nursery: trio.Nursery) -> FakeVapi:
    await connector.opened.wait()
    assert connector.peer is not None
    vapi = FakeVapi(connector.peer)
    nursery.start_soon(vapi.read)
    return vapi


async def test_barge_in_clears_and_no_audio_of_the_cut_turn_follows(
    autojump_clock: trio.testing.MockClock,
) -> None:
    seen: dict[str, object] = {}

    async def scenario(twilio: FakeTwilio, connector: MemoryConnector, nursery: Nursery) -> None:
        nursery.start_soon(twilio.stream_media)
        vapi = await start_vapi(connector, nursery)
        t0 = trio.current_time()
        await vapi.send_json(
            {"type": "speech-update", "status": "started", "role": "assistant", "turn": 0}
        )
        with trio.move_on_after(1.62):
            # A 2 s turn, paced at real time. The signal comes at 1.5 s, and the
            # speaker goes on for 120 ms after it: the in-flight tail of the cut
            # turn, which must never play.
            async with trio.open_nursery() as speaker:
                speaker.start_soon(vapi.speak, 2000)
                await trio.sleep_until(t0 + 1.5)
                interrupted_at = trio.current_time()
                await vapi.send_json({"type": "user-interrupted"})
        await trio.sleep(1.0)
        await vapi.send_json(
            {"type": "speech-update", "status": "started", "role": "assistant", "turn": 1}
        )
        next_turn_at = trio.current_time()
        await vapi.speak(200, paced=False)
        await trio.sleep(1.0)
        seen.update(interrupted_at=interrupted_at, next_turn_at=next_turn_at, t0=t0)
        await twilio.socket.send(stop_frame(twilio.next_seq()))

    record, twilio, _ = await run_call(scenario)

    clears = twilio.events("clear")
    assert len(clears) == 1
    assert clears[0].at == seen["interrupted_at"]  # the same virtual instant
    media_after_clear = [r for r in twilio.events("media") if r.at >= clears[0].at]
    assert media_after_clear, "the next turn plays"
    assert all(r.at >= seen["next_turn_at"] for r in media_after_clear)
    assert record.outcome is Outcome.CALLER_HUNG_UP
    [barge_in] = record.barge_ins
    assert barge_in.latency_ms == 0
    # Twilio played 1.5 s of the turn before the clear (the lead keeps ≤ 300 ms queued).
    assert 1200 <= barge_in.heard_of_turn_ms <= 1500
    assert barge_in.discarded_ms <= 300


async def test_playout_keeps_lead_bounded_and_sends_whole_frames(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def scenario(twilio: FakeTwilio, connector: MemoryConnector, nursery: Nursery) -> None:
        nursery.start_soon(twilio.stream_media)
        vapi = await start_vapi(connector, nursery)
        await vapi.speak(5000, paced=False)  # a burst far ahead of real time
        t0 = trio.current_time()
        for _ in range(40):
            await trio.sleep(0.1)
            ahead = twilio.play_until - trio.current_time()
            assert ahead <= 0.3 + 1e-9, "never more than the lead buffered at Twilio"
        assert trio.current_time() - t0 == pytest.approx(4.0)
        await trio.sleep(1.5)
        await twilio.socket.send(stop_frame(twilio.next_seq()))

    record, twilio, _ = await run_call(scenario)
    assert twilio.heard_bytes == 5000 * 8
    assert record.heard_ms == 5000
    assert all(len(r.message["media"]["payload"]) > 0 for r in twilio.events("media"))


async def test_no_start_within_deadline_ends_with_protocol_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def scenario(twilio: FakeTwilio, connector: MemoryConnector, nursery: Nursery) -> None:
        await twilio.socket.send(connected_frame())

    t0 = trio.current_time()
    record, twilio, connector = await run_call(scenario, send_start=False)
    assert record.outcome is Outcome.PROTOCOL_ERROR
    assert "no start within 5 s" in record.detail
    assert twilio.closed_at == t0 + 5.0
    assert not connector.opened.is_set()


async def test_too_much_before_start_is_refused_at_once_with_1008(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="voicebridge")

    async def scenario(twilio: FakeTwilio, connector: MemoryConnector, nursery: Nursery) -> None:
        await trio.sleep(1.0)
        await twilio.socket.send(connected_frame())
        for _ in range(PRE_START_FRAMES):  # one over: connected counts too
            await twilio.socket.send('{"event":"x"}')
        await twilio.socket.send(start_frame())  # too late: refused already

    t0 = trio.current_time()
    record, twilio, connector = await run_call(
        scenario, send_start=False, remote="203.0.113.7:40112"
    )
    assert record.outcome is Outcome.PROTOCOL_ERROR
    assert record.detail == f"before start: more than {PRE_START_FRAMES} frames before 'start'"
    assert twilio.closed_at == t0 + 1.0  # at once, not at the start deadline
    assert twilio.close_code == 1008
    assert connector.created == 0, "no assistant call for a refused stream"
    [line] = [r for r in caplog.records if r.name.startswith("voicebridge")]
    assert record_fields(line)["REMOTE"] == "203.0.113.7:40112"
    assert "from 203.0.113.7:40112" in line.getMessage()
    assert line.levelno == logging.WARNING


async def test_unknown_events_within_the_budget_before_start_are_tolerated(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def scenario(twilio: FakeTwilio, connector: MemoryConnector, nursery: Nursery) -> None:
        await twilio.socket.send(connected_frame())
        for _ in range(PRE_START_FRAMES - 2):  # with connected and start: the whole budget
            await twilio.socket.send('{"event":"x"}')
        await twilio.socket.send(start_frame())
        await start_vapi(connector, nursery)
        await twilio.socket.send(stop_frame(twilio.next_seq()))

    record, twilio, connector = await run_call(scenario, send_start=False)
    assert record.outcome is Outcome.CALLER_HUNG_UP
    assert twilio.close_code == 1000
    assert connector.created == 1


@pytest.mark.parametrize("why", ["no start", "bad token"])
async def test_every_refusal_before_start_names_the_peer(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture, why: str
) -> None:
    caplog.set_level(logging.INFO, logger="voicebridge")

    async def scenario(twilio: FakeTwilio, connector: MemoryConnector, nursery: Nursery) -> None:
        await twilio.socket.send(connected_frame())
        if why == "bad token":
            await twilio.socket.send(start_frame(token="forged"))

    t0 = trio.current_time()
    record, twilio, connector = await run_call(
        scenario, send_start=False, remote="[2001:db8::5]:443"
    )
    assert record.outcome is (
        Outcome.PROTOCOL_ERROR if why == "no start" else Outcome.TOKEN_REJECTED
    )
    assert twilio.closed_at == t0 + (SETTINGS.start_deadline_s if why == "no start" else 0.0)
    assert connector.created == 0
    [line] = [r for r in caplog.records if r.name.startswith("voicebridge")]
    assert record_fields(line)["EVENT"] == "call-end"
    assert record_fields(line)["REMOTE"] == "[2001:db8::5]:443"


async def test_media_inactivity_ends_the_call_and_vapi_gets_end_call(
    autojump_clock: trio.testing.MockClock,
) -> None:
    vapis: list[FakeVapi] = []

    async def scenario(twilio: FakeTwilio, connector: MemoryConnector, nursery: Nursery) -> None:
        vapis.append(await start_vapi(connector, nursery))
        await twilio.stream_media(seconds=1.0)  # then Twilio goes silent

    t0 = trio.current_time()
    record, twilio, _ = await run_call(scenario)
    assert record.outcome is Outcome.STREAM_LOST
    assert "no frames from Twilio for 3 s" in record.detail
    # The last frame went at t0 + 0.98 s; the deadline is 3 s after it.
    assert twilio.closed_at == pytest.approx(t0 + 0.98 + 3.0)
    [vapi] = vapis
    assert [m["type"] for _, m in vapi.text] == ["end-call"]
    assert vapi.closed_at is not None
    assert vapi.audio_frames == 50
    assert after_stream_twiml(Config(), CALL_SID, record).count("<Say>") == 1  # fallback


async def test_vapi_not_answering_pings_fails_the_leg_at_the_pong_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def scenario(twilio: FakeTwilio, connector: MemoryConnector, nursery: Nursery) -> None:
        nursery.start_soon(twilio.stream_media)
        await connector.opened.wait()
        assert connector.peer is not None
        connector.peer.answers_pings = False
        nursery.start_soon(FakeVapi(connector.peer).read)

    t0 = trio.current_time()
    record, twilio, _ = await run_call(scenario)
    assert record.outcome is Outcome.ASSISTANT_LEG_FAILED
    assert record.detail == "unresponsive: no pong within 2 s"
    assert twilio.closed_at == t0 + 5.0 + 2.0


async def test_vapi_answering_pings_keeps_the_call_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def scenario(twilio: FakeTwilio, connector: MemoryConnector, nursery: Nursery) -> None:
        nursery.start_soon(twilio.stream_media)
        await start_vapi(connector, nursery)
        await trio.sleep(30)
        await twilio.socket.send(stop_frame(twilio.next_seq()))

    record, _, _ = await run_call(scenario)
    assert record.outcome is Outcome.CALLER_HUNG_UP
    assert record.duration_s == pytest.approx(30, abs=0.1)


@pytest.mark.parametrize("kind", ["auth", "rejected", "server", "timeout", "refused"])
async def test_vapi_create_failure_gives_the_fallback(
    autojump_clock: trio.testing.MockClock, kind: str
) -> None:
    async def scenario(twilio: FakeTwilio, connector: MemoryConnector, nursery: Nursery) -> None:
        nursery.start_soon(twilio.stream_media)

    connector = MemoryConnector(fail=VapiError(kind, "simulated"), create_delay_s=0.25)  # type: ignore[arg-type]
    t0 = trio.current_time()
    record, twilio, _ = await run_call(scenario, connector=connector)
    assert record.outcome is Outcome.ASSISTANT_LEG_FAILED
    assert record.detail == "simulated"
    assert twilio.closed_at == t0 + 0.25
    twiml = after_stream_twiml(Config(), CALL_SID, record)
    assert "technical difficulties" in twiml and "<Hangup />" in twiml


async def test_caller_stop_sends_end_call_and_closes_vapi(
    autojump_clock: trio.testing.MockClock,
) -> None:
    vapis: list[FakeVapi] = []

    async def scenario(twilio: FakeTwilio, connector: MemoryConnector, nursery: Nursery) -> None:
        nursery.start_soon(twilio.stream_media)
        vapis.append(await start_vapi(connector, nursery))
        await trio.sleep(2)
        await twilio.socket.send(stop_frame(twilio.next_seq()))

    t0 = trio.current_time()
    record, twilio, _ = await run_call(scenario)
    assert record.outcome is Outcome.CALLER_HUNG_UP
    [vapi] = vapis
    assert [m["type"] for _, m in vapi.text] == ["end-call"]
    assert vapi.text[0][0] == t0 + 2.0
    assert vapi.closed_at == t0 + 2.0
    assert twilio.closed_at == t0 + 2.0
    assert 95 <= record.frames_to_assistant <= 101
    assert after_stream_twiml(Config(), CALL_SID, record).endswith("<Hangup /></Response>")


async def test_assistant_end_lets_the_goodbye_play_then_closes_twilio(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def scenario(twilio: FakeTwilio, connector: MemoryConnector, nursery: Nursery) -> None:
        nursery.start_soon(twilio.stream_media)
        vapi = await start_vapi(connector, nursery)
        await vapi.speak(1000, paced=False)  # the goodbye, all at once
        await vapi.send_json(
            {"type": "status-update", "status": "ended", "endedReason": "assistant-ended-call"}
        )

    t0 = trio.current_time()
    record, twilio, _ = await run_call(scenario)
    assert record.outcome is Outcome.ASSISTANT_ENDED
    assert record.detail == "assistant-ended-call"
    assert twilio.heard_bytes == 8000, "the whole goodbye reached Twilio"
    assert record.heard_ms == 1000, "and Twilio confirmed it played"
    assert twilio.closed_at == pytest.approx(t0 + 1.0)
    assert after_stream_twiml(Config(), CALL_SID, record).endswith("<Hangup /></Response>")


async def test_bad_token_is_rejected_without_an_assistant_leg(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def scenario(twilio: FakeTwilio, connector: MemoryConnector, nursery: Nursery) -> None:
        await twilio.socket.send(connected_frame())
        await twilio.socket.send(start_frame(token="forged"))

    record, twilio, connector = await run_call(scenario, send_start=False)
    assert record.outcome is Outcome.TOKEN_REJECTED
    assert not connector.opened.is_set()
    assert twilio.closed_at is not None


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        ("not json", "JSON"),
        (b"\x00\x01", "binary"),
        (
            '{"event":"media","sequenceNumber":"9","streamSid":"MZother","media":'
            '{"track":"inbound","chunk":"1","timestamp":"0","payload":"/w=="}}',
            "streamSid",
        ),
    ],
)
async def test_malformed_twilio_frame_ends_the_call_with_a_reason(
    autojump_clock: trio.testing.MockClock, frame: str | bytes, reason: str
) -> None:
    vapis: list[FakeVapi] = []

    async def scenario(twilio: FakeTwilio, connector: MemoryConnector, nursery: Nursery) -> None:
        vapis.append(await start_vapi(connector, nursery))
        await twilio.socket.send(frame)

    record, _, _ = await run_call(scenario)
    assert record.outcome is Outcome.PROTOCOL_ERROR
    assert reason.lower() in record.detail.lower()
    assert [m["type"] for _, m in vapis[0].text] == ["end-call"]


async def test_malformed_vapi_message_fails_the_leg(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def scenario(twilio: FakeTwilio, connector: MemoryConnector, nursery: Nursery) -> None:
        nursery.start_soon(twilio.stream_media)
        vapi = await start_vapi(connector, nursery)
        await vapi.socket.send("{not json")

    record, _, _ = await run_call(scenario)
    assert record.outcome is Outcome.ASSISTANT_LEG_FAILED
    assert record.detail.startswith("protocol:")


async def test_barge_in_on_speech_start_when_configured(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def scenario(twilio: FakeTwilio, connector: MemoryConnector, nursery: Nursery) -> None:
        nursery.start_soon(twilio.stream_media)
        vapi = await start_vapi(connector, nursery)
        await vapi.speak(600, paced=False)
        await trio.sleep(0.2)
        await vapi.send_json(
            {"type": "speech-update", "status": "started", "role": "user", "turn": 1}
        )
        await trio.sleep(0.5)
        await twilio.socket.send(stop_frame(twilio.next_seq()))

    record, twilio, _ = await run_call(
        scenario, settings=settings_with(bridge={"barge_in_on_speech_start": True})
    )
    assert len(twilio.events("clear")) == 1
    assert len(record.barge_ins) == 1
