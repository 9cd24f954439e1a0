"""Twilio's side misbehaving, on loopback: the real server and the simulated peers.

Each test makes one caller's Media Stream misbehave (``FAULT_SID``) while two
witness calls run at the same moment, and asserts what that caller experienced,
what the operator sees (the call-end line, ``/metrics``) and that the witnesses had
perfect calls. These need real sockets: hypercorn's frame limit, TCP closing under
quart-trio, a second socket, a peer that stops reading.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from urllib.parse import parse_qs
from xml.etree import ElementTree

import httpx
import pytest
import trio
import trio_websocket

from tests.faults.loopback import (
    FAULT_SID,
    WITNESS_ASSISTANT,
    WITNESSES,
    FaultRun,
    assert_fallback,
    assert_journal_matches,
    assert_metrics,
    assert_witnesses_untouched,
    fault_sid,
    run_with_witnesses,
    vapi_call_of,
    witnesses_and,
)
from tests.harness import Bridge, running_bridge
from voicebridge.bridge.outcome import Outcome
from voicebridge.bridge.playout import BYTES_PER_MS, FRAME_MS
from voicebridge.observability.logs import record_fields
from voicebridge.sim.caller import (
    Drop,
    Flood,
    Hangup,
    Script,
    SendMedia,
    SendRaw,
    Silence,
    StopReading,
    WaitForAssistant,
)
from voicebridge.web import MAX_MEDIA_MESSAGE_BYTES, STREAM_PATH

#: Slack on a timing bound for a loaded CI machine.
SLACK_S = 0.75


async def run_twilio_fault(
    expected: Mapping[Outcome, int],
    fault_script: Script | None = None,
    *,
    faults: Mapping[str, Script] | None = None,
    alongside: Callable[[Bridge], Awaitable[None]] | None = None,
    witness_http: httpx.AsyncClient | None = None,
) -> tuple[FaultRun, Bridge]:
    """The fault calls (``run_with_witnesses``) with the witnesses, against an assistant
    that behaves; ``/metrics`` must then count ``expected`` calls by outcome."""
    with trio.fail_after(30):
        async with running_bridge(behaviour=WITNESS_ASSISTANT) as bridge:
            run = await run_with_witnesses(
                bridge,
                fault_script,
                faults=faults,
                alongside=(lambda: alongside(bridge)) if alongside is not None else None,
                witness_http=witness_http,
            )
            await assert_metrics(bridge, expected)
    return run, bridge


def _after_stream_unknown(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if record_fields(r).get("EVENT") == "after-stream-unknown"]


async def test_socket_dropped_without_stop(caplog: pytest.LogCaptureFixture) -> None:
    # The connection between Twilio and us breaks: TCP closed, no stop, no close frame.
    # Twilio goes on to the <Connect action> at once; the call's outcome must be there.
    run, bridge = await run_twilio_fault(
        witnesses_and(Outcome.STREAM_LOST), (WaitForAssistant(heard_ms=300), Drop())
    )
    assert run.fault.ended_by == "dropped"
    assert run.fault.final_action == "say", "the caller, still on the line, hears the fallback"
    record = bridge.record(FAULT_SID)
    assert record.outcome is Outcome.STREAM_LOST
    assert record.detail.startswith("media socket closed")
    # The call ended with its socket: its record was ready when Twilio asked, and Vapi
    # got a proper goodbye (its answer read, not waited out for vapi.end_deadline_s).
    assert not _after_stream_unknown(caplog)
    assert record.duration_s < 0.3 + SLACK_S
    vapi_call = vapi_call_of(bridge, FAULT_SID)
    assert vapi_call.end_call_received_at is not None
    assert vapi_call.close_code == 1000
    assert_journal_matches(caplog, record, level=logging.WARNING)
    assert_witnesses_untouched(run, bridge)


async def test_stop_then_more_frames(caplog: pytest.LogCaptureFixture) -> None:
    # A broken proxy keeps sending media after stop: the call ends at the stop, and
    # nothing after it is read, let alone forwarded to Vapi.
    extra = 25
    run, bridge = await run_twilio_fault(
        {Outcome.CALLER_HUNG_UP: WITNESSES + 1},
        (WaitForAssistant(heard_ms=300), Hangup(media_after_stop=extra)),
    )
    report = run.fault
    assert report.ended_by == "caller"
    assert report.final_action == "hangup"
    assert report.protocol_violations == []
    record = bridge.record(FAULT_SID)
    assert (record.outcome, record.detail) == (Outcome.CALLER_HUNG_UP, "Twilio sent stop")
    assert record.frames_from_caller < report.frames_sent, "frames did follow the stop"
    assert vapi_call_of(bridge, FAULT_SID).caller_audio_messages == record.frames_to_assistant
    assert not _after_stream_unknown(caplog)
    assert_journal_matches(caplog, record, level=logging.INFO)
    assert_witnesses_untouched(run, bridge)


async def test_frames_for_another_stream(caplog: pytest.LogCaptureFixture) -> None:
    alien = json.dumps(
        {
            "event": "media",
            "sequenceNumber": "40",
            "streamSid": "MZ" + "0" * 32,
            "media": {"track": "inbound", "chunk": "39", "timestamp": "780", "payload": "/w=="},
        }
    )
    run, bridge = await run_twilio_fault(
        witnesses_and(Outcome.PROTOCOL_ERROR),
        (WaitForAssistant(heard_ms=300), SendRaw(alien), Silence(3)),
    )
    record = assert_fallback(
        run.fault, bridge, outcome=Outcome.PROTOCOL_ERROR, detail="is not this stream's"
    )
    assert vapi_call_of(bridge, FAULT_SID).end_call_received_at is not None
    assert_journal_matches(caplog, record, level=logging.WARNING)
    assert_witnesses_untouched(run, bridge)


async def test_a_flood_of_frames_faster_than_real_time(caplog: pytest.LogCaptureFixture) -> None:
    # 30 s of caller audio (1500 frames) sent back to back, as fast as TCP takes them.
    # The call survives it; every frame is either forwarded to Vapi or dropped as stale
    # and counted (never queued without end); the other calls do not notice.
    flood_s = 30.0
    run, bridge = await run_twilio_fault(
        {Outcome.CALLER_HUNG_UP: WITNESSES + 1},
        (WaitForAssistant(heard_ms=200), Flood(flood_s), Silence(0.5), Hangup()),
    )
    report = run.fault
    assert report.protocol_violations == []
    assert report.ended_by == "caller"
    record = bridge.record(FAULT_SID)
    assert record.outcome is Outcome.CALLER_HUNG_UP
    assert record.frames_from_caller == report.frames_sent
    assert report.frames_sent >= flood_s * 1000 / FRAME_MS
    # Frames before the assistant leg was up went nowhere; all others are accounted for.
    assert record.frames_to_assistant + record.frames_dropped <= record.frames_from_caller
    assert record.frames_to_assistant + record.frames_dropped >= flood_s * 1000 / FRAME_MS
    assert vapi_call_of(bridge, FAULT_SID).caller_audio_messages == record.frames_to_assistant
    fields = [
        record_fields(r)
        for r in caplog.records
        if record_fields(r).get("EVENT") == "call-end"
        and record_fields(r).get("CALL_SID") == FAULT_SID
    ]
    assert [f["FRAMES_DROPPED"] for f in fields] == [record.frames_dropped]
    assert_witnesses_untouched(run, bridge)


async def test_oversized_frames(caplog: pytest.LogCaptureFixture) -> None:
    # Two misbehaving streams: one frame past the server's message limit (the media
    # socket closes with 1009, the call ends, the caller gets the fallback), and one large
    # frame under it (5 s of audio in one message: forwarded, the call goes on).
    too_big, big = fault_sid("b16"), fault_sid("1a7")
    over_limit = b"\xff" * (MAX_MEDIA_MESSAGE_BYTES * 3 // 4 + 1024)  # base64 grows 4/3
    under_limit = b"\xff" * 40_000
    run, bridge = await run_twilio_fault(
        {Outcome.CALLER_HUNG_UP: WITNESSES + 1, Outcome.STREAM_LOST: 1},
        faults={
            too_big: (WaitForAssistant(heard_ms=300), SendMedia(over_limit), Silence(3)),
            big: (WaitForAssistant(heard_ms=300), SendMedia(under_limit), Hangup()),
        },
    )
    assert run.faults[too_big].close_code == 1009, "message too big"
    record = assert_fallback(
        run.faults[too_big], bridge, outcome=Outcome.STREAM_LOST, detail="closed"
    )
    assert vapi_call_of(bridge, too_big).end_call_received_at is not None
    assert_journal_matches(caplog, record, level=logging.WARNING)
    big_record = bridge.record(big)
    assert big_record.outcome is Outcome.CALLER_HUNG_UP
    vapi_big = vapi_call_of(bridge, big)
    assert vapi_big.caller_audio_bytes == big_record.caller_audio_bytes
    assert big_record.caller_audio_bytes >= len(under_limit)
    assert not _after_stream_unknown(caplog)
    assert_witnesses_untouched(run, bridge)


def _start_frame(call_sid: str, parameters: dict[str, str]) -> str:
    """A ``start`` frame for ``call_sid`` carrying a stream ``token``, as Twilio sends it."""
    stream_sid = "MZ" + "7" * 32
    return json.dumps(
        {
            "event": "start",
            "sequenceNumber": "1",
            "streamSid": stream_sid,
            "start": {
                "accountSid": "AC" + "d" * 32,
                "streamSid": stream_sid,
                "callSid": call_sid,
                "tracks": ["inbound"],
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                "customParameters": parameters,
            },
        }
    )


async def test_a_stream_token_replayed_on_a_second_socket(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # An eavesdropper takes a live call's stream token from the TwiML and opens a
    # second media socket with it while the call runs. The token was used once: the
    # second socket is closed, no assistant call is made, the real call goes on.
    stolen: list[tuple[str, dict[str, str]]] = []
    stolen_event = trio.Event()

    async def steal(response: httpx.Response) -> None:
        await response.aread()
        if 'name="token"' in response.text and not stolen:
            call_sid = parse_qs(response.request.content.decode())["CallSid"][0]
            stream = ElementTree.fromstring(response.text).find("Connect/Stream")
            assert stream is not None
            parameters = {p.get("name", ""): p.get("value", "") for p in stream.iter("Parameter")}
            stolen.append((call_sid, parameters))
            stolen_event.set()

    closed_by_server: list[int | None] = []

    async def replay(bridge: Bridge) -> None:
        await stolen_event.wait()
        await trio.sleep(0.5)  # the real stream is up and has used the token
        call_sid, parameters = stolen[0]
        url = f"ws://127.0.0.1:{bridge.listening.port}{STREAM_PATH}"
        async with trio_websocket.open_websocket_url(url) as ws:
            await ws.send_message(
                json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"})
            )
            await ws.send_message(_start_frame(call_sid, parameters))
            with trio.fail_after(2), pytest.raises(trio_websocket.ConnectionClosed) as closed:
                while True:
                    await ws.get_message()
            reason = closed.value.reason
            closed_by_server.append(reason.code if reason is not None else None)

    async with httpx.AsyncClient(event_hooks={"response": [steal]}) as http:
        run, bridge = await run_twilio_fault(
            {Outcome.CALLER_HUNG_UP: WITNESSES, Outcome.TOKEN_REJECTED: 1},
            alongside=replay,
            witness_http=http,
        )
    assert closed_by_server == [1000]
    victim = stolen[0][0]
    assert victim in {report.call_sid for report in run.witnesses}
    rejected = [
        record_fields(r)
        for r in caplog.records
        if record_fields(r).get("OUTCOME") == Outcome.TOKEN_REJECTED.value
    ]
    assert [f["DETAIL"] for f in rejected] == ["stream token reused"]
    assert len(bridge.vapi.calls) == WITNESSES, "no assistant call for the replay"
    assert_witnesses_untouched(run, bridge)  # the victim among them


async def test_a_client_that_stops_reading(caplog: pytest.LogCaptureFixture) -> None:
    # Twilio's side stops reading the socket (its buffers fill; TCP pushes back): one
    # for 2 s, one for good. The bridge never sends faster than real time plus its
    # playout lead to a peer that does not confirm playing it (mark echoes), so nothing
    # piles up and no write blocks; each call ends when its caller hangs up, 2.3 s in.
    paused, deaf = fault_sid("5ea"), fault_sid("dea")
    run, bridge = await run_twilio_fault(
        {Outcome.CALLER_HUNG_UP: WITNESSES + 2},
        faults={
            paused: (StopReading(2.0), Silence(2.3), Hangup()),
            deaf: (StopReading(math.inf), Silence(2.3), Hangup()),
        },
    )
    lead_ms = bridge.config.bridge.playout_lead_ms
    for call_sid in (paused, deaf):
        record = bridge.record(call_sid)
        assert record.outcome is Outcome.CALLER_HUNG_UP
        assert record.assistant_bytes > BYTES_PER_MS * 1000, "the assistant spoke for a second"
        assert record.duration_s < 2.3 + SLACK_S, "the call ended with the caller's hang-up"
        assert record.frames_dropped == 0
        assert_journal_matches(caplog, record, level=logging.INFO)
    assert bridge.record(deaf).heard_ms == 0, "no mark ever came back"
    # What the paused caller got: the lead, one more presumed heard by the clock (echoes
    # overdue), then, its echoes missing for good (it still sends media), audio at real
    # time by the clock alone; never faster than real time plus the lead over the call's
    # 2.3 s, and never the whole greeting.
    received = run.faults[paused].audio_received_bytes
    assert 0 < received <= (2300 + lead_ms + 100) * BYTES_PER_MS  # + one chunk in flight
    assert bridge.listening.registry.active_count == 0
    assert_witnesses_untouched(run, bridge)
