"""voicebridge.sim.vapi: the simulated Vapi over real loopback HTTP and WebSocket.

Charter: loopback only (127.0.0.1, port 0), real sockets; httpx as the HTTP client
and trio-websocket as the transport client, as the bridge uses them; every test
guarded by ``trio.fail_after``. The sim paces audio in real time, so timing tests
wait real time: they use the short caller clips as the assistant's voice, send
caller audio unpaced (speech detection runs on audio time), and assert loosely.
The whole module stays under ~10 s.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import httpx
import orjson
import pytest
import trio
import trio_websocket

from voicebridge.sim.audio import CLIP_TEXTS, duration_ms, load_clip, silence, ulaw_to_pcm16
from voicebridge.sim.vapi import (
    CHUNK_MAX_BYTES,
    CHUNK_MIN_BYTES,
    ENDED_ASSISTANT,
    ENDED_CONCURRENCY_LIMIT,
    ENDED_CUSTOMER,
    ENDED_DROPPED,
    ENDED_NO_CUSTOMER_AUDIO,
    CloseCode,
    SimTransfer,
    SimVapi,
    SimVapiBehaviour,
)
from voicebridge.sim.wire import HttpRequest, HttpResponse, SimWebSocket, serve_http_ws

GUARD_S = 5.0

#: A short, quick conversation: the caller clips stand in for the assistant's voice.
QUICK = SimVapiBehaviour(
    greeting_clip="caller_1",
    reply_clips=("caller_2",),
    goodbye_clip="caller_3",
    think_delay_s=0.05,
)


def create_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "assistantId": "asst-123",
        "transport": {
            "provider": "vapi.websocket",
            "audioFormat": {"format": "mulaw", "container": "raw", "sampleRate": 8000},
        },
        "assistantOverrides": {
            "metadata": {"twilioCallSid": "CA0001"},
            "variableValues": {"callerNumber": "+15550001"},
            "clientMessages": ["speech-update", "status-update", "transcript", "user-interrupted"],
        },
    }
    body.update(overrides)
    return body


@pytest.fixture
async def sim(nursery: trio.Nursery) -> SimVapi:
    vapi = SimVapi("test-key")
    await nursery.start(vapi.serve)
    return vapi


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=GUARD_S) as client:
        yield client


async def post_call(sim: SimVapi, http: httpx.AsyncClient, body: Any = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {sim.api_key}"}
    return await http.post(
        f"{sim.base_url}/call", json=create_body() if body is None else body, headers=headers
    )


async def create(sim: SimVapi, http: httpx.AsyncClient, body: Any = None) -> str:
    response = await post_call(sim, http, body)
    assert response.status_code == 201, response.text
    return str(response.json()["transport"]["websocketCallUrl"])


@asynccontextmanager
async def transport(
    sim: SimVapi, url: str, *, key: str | None = None
) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    headers = [(b"Authorization", f"Bearer {sim.api_key if key is None else key}".encode())]
    async with trio_websocket.open_websocket_url(
        url, extra_headers=headers, message_queue_size=1000, disconnect_timeout=1
    ) as ws:
        yield ws


@attrs.define
class Heard:
    """What the client received: JSON messages and audio, stamped with trio time."""

    messages: list[tuple[float, dict[str, Any]]] = attrs.Factory(list)
    audio: list[tuple[float, bytes]] = attrs.Factory(list)

    def types(self) -> list[str]:
        return [message["type"] for _, message in self.messages]

    def first(self, message_type: str, **fields: Any) -> tuple[float, dict[str, Any]]:
        for at, message in self.messages:
            if message["type"] == message_type and fields.items() <= message.items():
                return at, message
        raise AssertionError(f"no {message_type} {fields} in {self.types()}")

    def audio_bytes(self, after: float = -math.inf) -> int:
        return sum(len(chunk) for at, chunk in self.audio if at > after)


async def listen_until(
    ws: trio_websocket.WebSocketConnection, heard: Heard, message_type: str, **fields: Any
) -> dict[str, Any]:
    """Receive into ``heard`` until a JSON message of ``message_type`` (with ``fields``)."""
    while True:
        frame = await ws.get_message()
        now = trio.current_time()
        if isinstance(frame, bytes):
            heard.audio.append((now, frame))
            continue
        message = orjson.loads(frame)
        heard.messages.append((now, message))
        if message["type"] == message_type and fields.items() <= message.items():
            return dict(message)


async def listen_for(ws: trio_websocket.WebSocketConnection, heard: Heard, seconds: float) -> None:
    with trio.move_on_after(seconds):
        await listen_until(ws, heard, "never")


def close_code(closed: trio_websocket.ConnectionClosed) -> int | None:
    return closed.reason.code if closed.reason is not None else None


async def send_audio(ws: trio_websocket.WebSocketConnection, audio: bytes) -> None:
    """Unpaced 20 ms frames: the sim's speech detection runs on audio time."""
    for start in range(0, len(audio), 160):
        await ws.send_message(audio[start : start + 160])


# --- POST /call ---------------------------------------------------------------------


async def test_create_answers_201_and_records_the_request(
    sim: SimVapi, http: httpx.AsyncClient
) -> None:
    with trio.fail_after(GUARD_S):
        response = await post_call(sim, http)
    assert response.status_code == 201
    call = response.json()
    assert call["status"] == "queued" and call["type"] == "vapi.websocketCall"
    assert call["transport"]["provider"] == "vapi.websocket"
    port = sim.base_url.rsplit(":", 1)[1]
    assert call["transport"]["websocketCallUrl"] == (
        f"ws://127.0.0.1:{port}/{call['id']}/transport"
    )
    assert call["assistantOverrides"]["metadata"] == {"twilioCallSid": "CA0001"}
    record = sim.calls[call["id"]]
    assert record.call_sid == "CA0001"
    assert record.metadata == {"twilioCallSid": "CA0001"}
    assert record.variable_values == {"callerNumber": "+15550001"}
    assert "user-interrupted" in record.client_messages
    assert record.create_body == create_body()
    assert [attempt.status for attempt in sim.create_attempts] == [201]


@pytest.mark.parametrize("authorization", ["Bearer wrong-key", "test-key", "Basic dGVzdC1rZXk="])
async def test_create_with_a_bad_key_is_401(
    sim: SimVapi, http: httpx.AsyncClient, authorization: str
) -> None:
    with trio.fail_after(GUARD_S):
        response = await http.post(
            f"{sim.base_url}/call", json=create_body(), headers={"Authorization": authorization}
        )
        no_header = await http.post(f"{sim.base_url}/call", json=create_body())
    assert response.status_code == no_header.status_code == 401
    assert response.json()["statusCode"] == 401
    assert sim.calls == {} and sim.create_attempts == []


def _without(key: str) -> dict[str, Any]:
    body = create_body()
    del body[key]
    return body


@pytest.mark.parametrize(
    ("body", "complaint"),
    [
        (_without("transport"), "transport.provider"),
        (create_body(transport={"provider": "vapi.sip"}), "transport.provider"),
        (create_body(phoneNumberId="pn-1"), "phoneNumberId is not allowed"),
        (create_body(assistant={"name": "x"}), "exactly one of"),
        (_without("assistantId"), "exactly one of"),
        (create_body(metadata={"twilioCallSid": "CA1"}), "property metadata should not exist"),
        (
            create_body(
                transport={
                    "provider": "vapi.websocket",
                    "audioFormat": {"format": "mulaw", "sampleRate": 16000},
                }
            ),
            "sampleRate must be 8000",
        ),
        (create_body(assistantOverrides={"clientMessages": "all"}), "clientMessages"),
        ([1, 2], "JSON object"),
    ],
)
async def test_create_with_a_bad_body_is_400(
    sim: SimVapi, http: httpx.AsyncClient, body: Any, complaint: str
) -> None:
    with trio.fail_after(GUARD_S):
        response = await post_call(sim, http, body)
    assert response.status_code == 400
    error = response.json()
    assert error["statusCode"] == 400 and error["error"] == "Bad Request"
    assert any(complaint in message for message in error["message"]), error
    assert sim.calls == {}


@pytest.mark.parametrize(
    ("status", "message"),
    [(401, "Invalid Key"), (400, "Over Concurrency Limit."), (500, "Internal server error")],
)
async def test_create_refused_by_fault(
    sim: SimVapi, http: httpx.AsyncClient, status: int, message: str
) -> None:
    sim.behaviour = SimVapiBehaviour(refuse_create=status)
    with trio.fail_after(GUARD_S):
        response = await post_call(sim, http)
    assert response.status_code == status
    assert message in response.json()["message"]
    assert sim.calls == {}
    assert sim.create_attempts[0].status == status


async def test_create_delay_and_create_never_answered(
    sim: SimVapi, http: httpx.AsyncClient
) -> None:
    sim.behaviour_for = lambda order, call_sid: SimVapiBehaviour(
        create_delay_s=0.3 if order == 0 else math.inf
    )
    with trio.fail_after(GUARD_S):
        start = trio.current_time()
        assert (await post_call(sim, http)).status_code == 201
        assert trio.current_time() - start >= 0.3
        with trio.move_on_after(0.3) as wait:
            await post_call(sim, http)
    assert wait.cancelled_caught
    assert [attempt.status for attempt in sim.create_attempts] == [201, None]


async def test_behaviour_chosen_by_order_and_call_sid(
    sim: SimVapi, http: httpx.AsyncClient
) -> None:
    seen: list[tuple[int, str | None]] = []

    def choose(order: int, call_sid: str | None) -> SimVapiBehaviour:
        seen.append((order, call_sid))
        return SimVapiBehaviour(refuse_create=500 if order == 0 else None)

    sim.behaviour_for = choose
    with trio.fail_after(GUARD_S):
        first = await post_call(sim, http)
        retry = await post_call(sim, http)
    assert (first.status_code, retry.status_code) == (500, 201)
    assert seen == [(0, "CA0001"), (1, "CA0001")]


async def test_concurrency_limit(sim: SimVapi, http: httpx.AsyncClient) -> None:
    sim.max_concurrent_calls = 1
    with trio.fail_after(GUARD_S):
        assert (await post_call(sim, http)).status_code == 201
        refused = await post_call(sim, http)
    assert refused.status_code == 400
    assert refused.json()["message"] == "Over Concurrency Limit."


async def test_other_routes_are_404(sim: SimVapi, http: httpx.AsyncClient) -> None:
    with trio.fail_after(GUARD_S):
        response = await http.get(f"{sim.base_url}/call")
    assert response.status_code == 404


# --- the transport socket: handshake --------------------------------------------


@pytest.mark.parametrize(
    ("setup", "status"),
    [("bad-key", 401), ("unknown-call", 404), ("reject-fault", 403)],
)
async def test_socket_refused(
    sim: SimVapi, http: httpx.AsyncClient, setup: str, status: int
) -> None:
    if setup == "reject-fault":
        sim.behaviour = SimVapiBehaviour(reject_socket=403)
    with trio.fail_after(GUARD_S):
        url = await create(sim, http)
        if setup == "unknown-call":
            url = url.replace(next(iter(sim.calls)), "no-such-call")
        with pytest.raises(trio_websocket.ConnectionRejected) as rejected:
            async with transport(sim, url, key="wrong" if setup == "bad-key" else None):
                pass
    assert rejected.value.status_code == status


async def test_a_held_upgrade_given_up_leaves_the_call_queued_for_an_end_call_by_http(
    sim: SimVapi, http: httpx.AsyncClient
) -> None:
    sim.behaviour = SimVapiBehaviour(upgrade_delay_s=0.3)
    with trio.fail_after(GUARD_S):
        url = await create(sim, http)
        [record] = sim.calls.values()
        with trio.move_on_after(0.1) as gave_up:  # the client gives up on the upgrade
            async with transport(sim, url):
                pass
        await trio.sleep(0.4)  # past the hold: nothing answered, nothing connected
        queued = (record.connected_at, record.ended_at, record.status)
        say = await http.post(sim.control_url(record.id), json={"type": "say", "content": "Hi"})
        end = await http.post(sim.control_url(record.id), json={"type": "end-call"})
        with pytest.raises(trio_websocket.ConnectionRejected) as rejected:
            async with transport(sim, url):
                pass
    assert gave_up.cancelled_caught
    assert queued == (None, None, "queued")
    assert (say.status_code, end.status_code) == (400, 200)
    assert record.control_posts == [{"type": "end-call"}]
    assert (record.ended_reason, record.ended_unconnected) == (ENDED_CUSTOMER, True)
    assert record.end_call_received_at is not None
    assert rejected.value.status_code == 400  # held as long, then refused: it has ended


async def test_a_create_answer_without_a_control_url(
    sim: SimVapi, http: httpx.AsyncClient
) -> None:
    sim.behaviour = SimVapiBehaviour(control_url_in_answer=False)
    with trio.fail_after(GUARD_S):
        response = await post_call(sim, http)
    assert response.status_code == 201
    assert "monitor" not in response.json()


# --- the transport socket: the conversation ---------------------------------------


async def test_greeting_is_paced_at_real_time(sim: SimVapi, http: httpx.AsyncClient) -> None:
    sim.behaviour = QUICK
    heard = Heard()
    with trio.fail_after(GUARD_S):
        async with transport(sim, await create(sim, http)) as ws:
            await listen_until(ws, heard, "speech-update", role="assistant", status="stopped")
            await listen_until(ws, heard, "transcript", role="assistant")
            await ws.send_message('{"type":"end-call"}')
    assert heard.types()[:2] == ["status-update", "speech-update"]
    assert heard.messages[0][1]["status"] == "in-progress"
    started_at, _ = heard.first("speech-update", role="assistant", status="started")
    stopped_at, _ = heard.first("speech-update", role="assistant", status="stopped")
    assert all(at >= started_at for at, _ in heard.audio)  # audio after "started"
    clip = load_clip("caller_1")
    assert b"".join(chunk for _, chunk in heard.audio) == clip
    assert all(CHUNK_MIN_BYTES <= len(c) <= CHUNK_MAX_BYTES for _, c in heard.audio[:-1])
    clip_s = duration_ms(clip) / 1000
    audio_span = heard.audio[-1][0] - heard.audio[0][0]
    assert audio_span >= 0.8 * (clip_s - CHUNK_MAX_BYTES / 8000)  # not faster than real time
    assert 0.8 * clip_s <= stopped_at - started_at <= clip_s + 0.5
    _, transcript = heard.first("transcript", role="assistant")
    assert transcript["transcript"] == "Hi, where is my order?"
    assert transcript["transcriptType"] == "final"


@pytest.mark.parametrize("tail_ms", [0, 100])
async def test_caller_barges_in(sim: SimVapi, http: httpx.AsyncClient, tail_ms: int) -> None:
    sim.behaviour = SimVapiBehaviour(reaction_delay_s=0.2, tail_after_interrupt_ms=tail_ms)
    heard = Heard()
    with trio.fail_after(GUARD_S):
        async with transport(sim, await create(sim, http)) as ws:
            await listen_until(ws, heard, "speech-update", role="assistant", status="started")
            await listen_for(ws, heard, 0.3)  # the greeting plays
            await send_audio(ws, load_clip("caller_1"))
            await listen_until(ws, heard, "user-interrupted")
            await listen_until(ws, heard, "transcript", role="assistant")
            await listen_for(ws, heard, 0.2)
            await ws.send_message('{"type":"end-call"}')
            await listen_until(ws, heard, "status-update", status="ended")
    user_started_at, _ = heard.first("speech-update", role="user", status="started")
    interrupted_at, _ = heard.first("user-interrupted")
    assert 0.15 <= interrupted_at - user_started_at <= 0.5
    # Nothing of the cut turn after user-interrupted but the configured in-flight tail.
    assert heard.audio_bytes(after=interrupted_at) == tail_ms * 8
    assert heard.types().index("user-interrupted") < heard.types().index("transcript")
    _, said = heard.first("transcript", role="assistant")
    assert 0 < len(said["transcript"]) < len("Hello, thanks for calling. How can I help you today?")
    record = next(iter(sim.calls.values()))
    assert record.turns[0].interrupted_at is not None
    assert record.turns[0].sent_bytes < record.turns[0].total_bytes


async def test_scripted_call_ends_with_the_assistants_goodbye(
    sim: SimVapi, http: httpx.AsyncClient
) -> None:
    sim.behaviour = attrs.evolve(QUICK, audio_burst=True, end_after_replies=1)
    heard = Heard()
    with trio.fail_after(GUARD_S):
        async with transport(sim, await create(sim, http)) as ws:
            for caller_clip in ("caller_1", "caller_3"):
                await listen_until(ws, heard, "transcript", role="assistant")
                await send_audio(ws, silence(200) + load_clip(caller_clip) + silence(700))
            await listen_until(ws, heard, "status-update", status="ended")
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                await listen_until(ws, heard, "never")
    assert close_code(closed.value) == 1000
    transcripts = [
        (m["role"], m["transcript"]) for _, m in heard.messages if m["type"] == "transcript"
    ]
    assert transcripts == [
        ("assistant", "Hi, where is my order?"),
        ("user", "Hi, where is my order?"),
        ("assistant", "Sorry, when will it get here?"),
        ("user", "No, that's all. Thanks!"),
        ("assistant", "No, that's all. Thanks!"),
    ]
    _, ended = heard.first("status-update", status="ended")
    assert ended["endedReason"] == ENDED_ASSISTANT
    record = next(iter(sim.calls.values()))
    await record.wait_ended()
    assert record.ended_reason == ENDED_ASSISTANT
    assert [turn.clip for turn in record.turns] == ["caller_1", "caller_2", "caller_3"]
    assert record.caller_audio_bytes == sum(
        len(silence(200) + load_clip(clip) + silence(700)) for clip in ("caller_1", "caller_3")
    )


async def test_end_call_ends_with_status_update_and_normal_close(
    sim: SimVapi, http: httpx.AsyncClient
) -> None:
    sim.behaviour = QUICK
    heard = Heard()
    with trio.fail_after(GUARD_S):
        async with transport(sim, await create(sim, http)) as ws:
            await listen_until(ws, heard, "speech-update", role="assistant", status="started")
            await ws.send_message(silence(20))
            await ws.send_message(
                '{"type":"add-message","message":{"role":"system","content":"DTMF 5"},'
                '"triggerResponseEnabled":true}'
            )
            await ws.send_message('{"type":"end-call"}')
            ended = await listen_until(ws, heard, "status-update", status="ended")
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                await listen_until(ws, heard, "never")
    assert ended["endedReason"] == ENDED_CUSTOMER
    assert close_code(closed.value) == 1000
    record = next(iter(sim.calls.values()))
    await record.wait_ended()
    assert record.end_call_received_at is not None
    assert record.ended_reason == ENDED_CUSTOMER
    assert record.add_messages[0]["message"]["content"] == "DTMF 5"
    assert record.caller_audio_bytes == 160
    assert [event.type for event in record.events][-1] == "status-update"


async def test_only_subscribed_client_messages_are_sent(
    sim: SimVapi, http: httpx.AsyncClient
) -> None:
    sim.behaviour = attrs.evolve(QUICK, audio_burst=True)
    body = create_body(assistantOverrides={"clientMessages": ["transcript"]})
    heard = Heard()
    with trio.fail_after(GUARD_S):
        async with transport(sim, await create(sim, http, body)) as ws:
            await listen_until(ws, heard, "transcript", role="assistant")
            await ws.send_message('{"type":"end-call"}')
            with pytest.raises(trio_websocket.ConnectionClosed):
                await listen_until(ws, heard, "never")
    assert heard.types() == ["transcript"]


async def test_pcm_s16le_audio_format(sim: SimVapi, http: httpx.AsyncClient) -> None:
    sim.behaviour = attrs.evolve(QUICK, audio_burst=True)
    audio_format = {"format": "pcm_s16le", "container": "raw", "sampleRate": 16000}
    body = create_body(transport={"provider": "vapi.websocket", "audioFormat": audio_format})
    heard = Heard()
    with trio.fail_after(GUARD_S):
        async with transport(sim, await create(sim, http, body)) as ws:
            await listen_until(ws, heard, "transcript", role="assistant")
            assert heard.audio_bytes() == 4 * len(load_clip("caller_1"))  # 16-bit, 16 kHz
            pcm = ulaw_to_pcm16(silence(200) + load_clip("caller_2") + silence(700))
            pcm_16k = b"".join(pcm[i : i + 2] * 2 for i in range(0, len(pcm), 2))
            for start in range(0, len(pcm_16k), 640):
                await ws.send_message(pcm_16k[start : start + 640])
            heard_user = await listen_until(ws, heard, "transcript", role="user")
            await ws.send_message('{"type":"end-call"}')
    assert heard_user["transcript"] in ("Sorry, when will it get here?", "(caller spoke 1.5 s)")


async def test_no_customer_audio_ends_the_call(sim: SimVapi, http: httpx.AsyncClient) -> None:
    sim.behaviour = attrs.evolve(QUICK, silent=True, customer_audio_timeout_s=0.3)
    heard = Heard()
    with trio.fail_after(GUARD_S):
        async with transport(sim, await create(sim, http)) as ws:
            await listen_until(ws, heard, "status-update", status="ended")
    assert heard.messages[-1][1]["endedReason"] == ENDED_NO_CUSTOMER_AUDIO
    assert heard.audio == []


# --- the transport socket: faults ---------------------------------------------------


async def test_drop_fault_ends_without_close_frame(sim: SimVapi, http: httpx.AsyncClient) -> None:
    sim.behaviour = attrs.evolve(QUICK, drop_after_s=0.3)
    heard = Heard()
    with trio.fail_after(GUARD_S):
        async with transport(sim, await create(sim, http)) as ws:
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                await listen_until(ws, heard, "never")
            dropped_at = trio.current_time()
    assert close_code(closed.value) == 1006  # no close frame
    assert "ended" not in [m.get("status") for _, m in heard.messages]
    record = next(iter(sim.calls.values()))
    assert record.ended_reason == ENDED_DROPPED
    assert record.connected_at is not None
    assert dropped_at - heard.messages[0][0] >= 0.25


async def test_ignore_pings_fault(sim: SimVapi, http: httpx.AsyncClient) -> None:
    sim.behaviour = attrs.evolve(QUICK, ignore_pings_after_s=0.3)
    with trio.fail_after(GUARD_S):
        async with transport(sim, await create(sim, http)) as ws, trio.open_nursery() as drain:
            drain.start_soon(listen_for, ws, Heard(), 2.0)
            with trio.fail_after(0.2):
                await ws.ping(b"before")  # answered
            await trio.sleep(0.35)
            with trio.move_on_after(0.4) as pong_wait:
                await ws.ping(b"after")
            assert pong_wait.cancelled_caught  # no pong
            drain.cancel_scope.cancel()
    record = next(iter(sim.calls.values()))
    assert [name for _, name in record.faults_injected] == ["ignore_pings"]


async def test_malformed_json_fault(sim: SimVapi, http: httpx.AsyncClient) -> None:
    sim.behaviour = attrs.evolve(QUICK, malformed_after_s=0.1)
    with trio.fail_after(GUARD_S):
        async with transport(sim, await create(sim, http)) as ws:
            while True:
                frame = await ws.get_message()
                if isinstance(frame, str) and not frame.endswith("}"):
                    break
            with pytest.raises(orjson.JSONDecodeError):
                orjson.loads(frame)
            await ws.send_message('{"type":"end-call"}')


@pytest.mark.parametrize("close_on_unknown", [False, True])
async def test_unknown_messages_are_recorded(
    sim: SimVapi, http: httpx.AsyncClient, close_on_unknown: bool
) -> None:
    sim.behaviour = attrs.evolve(QUICK, close_on_unknown_message=close_on_unknown)
    with trio.fail_after(GUARD_S):
        async with transport(sim, await create(sim, http)) as ws:
            await ws.send_message('{"type":"hangup"}')
            if close_on_unknown:
                with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                    await listen_until(ws, Heard(), "never")
                assert close_code(closed.value) == 1005  # a close frame with no status
            else:
                await ws.send_message('{"type":"end-call"}')
                await listen_until(ws, Heard(), "status-update", status="ended")
    record = next(iter(sim.calls.values()))
    assert record.unknown_messages == ['{"type":"hangup"}']


async def test_a_broken_client_does_not_disturb_the_server(
    sim: SimVapi, http: httpx.AsyncClient
) -> None:
    async def raw_request(data: bytes) -> bytes:
        stream = await trio.open_tcp_stream("127.0.0.1", sim.port)
        async with stream:
            await stream.send_all(data)
            answer = b""
            while chunk := await stream.receive_some(65536):
                answer += chunk
            return answer

    with trio.fail_after(GUARD_S):
        garbage = await raw_request(b"NOT HTTP AT ALL\r\n\r\n")
        too_big = await raw_request(
            b"POST /call HTTP/1.1\r\nhost: x\r\ncontent-length: 2000000\r\n\r\n{"
        )
        async with transport(sim, await create(sim, http)) as ws:
            await ws.send_message(b"\xff" * 160)
            await ws.send_message('{"type":"end-call"}')
    assert garbage.startswith(b"HTTP/1.1 400 ")
    assert too_big.startswith(b"HTTP/1.1 413 ")
    assert len(sim.calls) == 1


# --- how Vapi ends calls -------------------------------------------------------------


@pytest.mark.parametrize("code", [1000, 1005, 1006])
async def test_vapi_ends_with_any_reason_and_close(
    sim: SimVapi, http: httpx.AsyncClient, code: CloseCode
) -> None:
    reason = "pipeline-error-openai-llm-failed"
    sim.behaviour = attrs.evolve(QUICK, end_after_s=0.3, ended_reason=reason, close_code=code)
    heard = Heard()
    with trio.fail_after(GUARD_S):
        async with transport(sim, await create(sim, http)) as ws:
            ended = await listen_until(ws, heard, "status-update", status="ended")
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                await listen_until(ws, heard, "never")
    assert ended["endedReason"] == reason
    assert close_code(closed.value) == code
    [record] = sim.calls.values()
    assert (record.ended_reason, record.close_code) == (reason, code)


async def test_vapi_ends_a_call_nobody_speaks_in_at_its_silence_timeout(
    sim: SimVapi, http: httpx.AsyncClient
) -> None:
    """``silenceTimeoutSeconds`` counts from the end of the last speech: a greeting longer
    than the timeout plays whole, then the quiet call ends with ``silence-timed-out``."""
    sim.behaviour = QUICK
    body = create_body()
    body["assistantOverrides"]["silenceTimeoutSeconds"] = 0.6
    heard = Heard()
    with trio.fail_after(GUARD_S):
        async with transport(sim, await create(sim, http, body)) as ws:
            ended = await listen_until(ws, heard, "status-update", status="ended")
            ended_at = trio.current_time()
    started_at, _ = heard.first("speech-update", role="assistant", status="started")
    stopped_at, _ = heard.first("speech-update", role="assistant", status="stopped")
    assert stopped_at - started_at > 0.6 * 2, "the greeting outlasts the timeout"
    assert b"".join(chunk for _, chunk in heard.audio) == load_clip("caller_1")
    assert ended["endedReason"] == "silence-timed-out"
    assert 0.55 <= ended_at - stopped_at < 0.9


async def test_vapi_may_close_without_saying_it_ended(
    sim: SimVapi, http: httpx.AsyncClient
) -> None:
    sim.behaviour = attrs.evolve(QUICK, end_after_s=0.3, announce_end=False, close_code=1006)
    heard = Heard()
    with trio.fail_after(GUARD_S):
        async with transport(sim, await create(sim, http)) as ws:
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                await listen_until(ws, heard, "never")
    assert close_code(closed.value) == 1006
    assert "ended" not in [m.get("status") for _, m in heard.messages]


async def test_the_goodbyes_tail_comes_after_ended(sim: SimVapi, http: httpx.AsyncClient) -> None:
    sim.behaviour = attrs.evolve(QUICK, end_after_replies=0, tail_after_ended_ms=400)
    heard = Heard()
    with trio.fail_after(GUARD_S):
        async with transport(sim, await create(sim, http)) as ws:
            await listen_until(ws, heard, "speech-update", role="assistant", status="stopped")
            await send_audio(ws, silence(200) + load_clip("caller_2") + silence(700))
            await listen_until(ws, heard, "status-update", status="ended")
            with pytest.raises(trio_websocket.ConnectionClosed):
                await listen_until(ws, heard, "never")
    ended_at = heard.first("status-update", status="ended")[0]
    assert heard.audio_bytes(after=ended_at) == 400 * 8
    [record] = sim.calls.values()
    assert record.tail_bytes_after_ended == 400 * 8
    assert record.turns[-1].total_bytes == len(load_clip("caller_3")) - 400 * 8


# --- built-in transfers, concurrency refusals ------------------------------------------


async def test_a_built_in_transfer_is_announced_as_vapi_does(
    sim: SimVapi, http: httpx.AsyncClient
) -> None:
    sim.behaviour = attrs.evolve(QUICK, transfer=SimTransfer(number="+15550100777"))
    heard = Heard()
    destination = {"type": "number", "number": "+15550100777"}
    messages = ["speech-update", "status-update", "transfer-update"]
    body = create_body(assistantOverrides={"clientMessages": messages})
    with trio.fail_after(GUARD_S):
        async with transport(sim, await create(sim, http, body)) as ws:
            await listen_until(ws, heard, "speech-update", role="assistant", status="stopped")
            await send_audio(ws, silence(200) + load_clip("caller_2") + silence(700))
            forwarding = await listen_until(ws, heard, "status-update", status="forwarding")
            update = await listen_until(ws, heard, "transfer-update")
            await ws.send_message('{"type":"end-call"}')
    assert forwarding["destination"] == update["destination"] == destination
    [record] = sim.calls.values()
    assert record.transfers == [destination]


@pytest.mark.parametrize("how", ["behaviour", "blocked", "ended"])
async def test_a_call_blocked_by_the_concurrency_limit(
    sim: SimVapi, http: httpx.AsyncClient, how: str
) -> None:
    if how == "behaviour":
        sim.behaviour = attrs.evolve(QUICK, concurrency_blocked=True)
    else:
        sim.max_concurrent_calls = 0
        sim.over_limit_answer = "blocked" if how == "blocked" else "ended"
    heard = Heard()
    with trio.fail_after(GUARD_S):
        response = await post_call(sim, http)
        assert response.status_code == 201
        answer = response.json()
        async with transport(sim, answer["transport"]["websocketCallUrl"]) as ws:
            ended = await listen_until(ws, heard, "status-update", status="ended")
    limits = answer.get("subscriptionLimits", {})
    assert limits.get("concurrencyBlocked", False) is (how != "ended")
    assert ended["endedReason"] == ENDED_CONCURRENCY_LIMIT
    assert heard.audio == []


async def test_the_batch_form_of_a_refusal_over_the_concurrency_limit(
    sim: SimVapi, http: httpx.AsyncClient
) -> None:
    """``over_limit_answer = "batch"``: a 201 exactly as the SDK's ``CallBatchResponse``
    (the only answer it declares ``subscriptionLimits`` on), with no call created."""
    from tests.contract.sdk import CallBatchResponse
    from tests.contract.strict import mismatches

    sim.max_concurrent_calls = 0
    sim.over_limit_answer = "batch"
    with trio.fail_after(GUARD_S):
        response = await post_call(sim, http)
    assert response.status_code == 201
    answer = response.json()
    assert mismatches(answer, CallBatchResponse) == []
    assert "id" not in answer and answer["results"] == []
    assert answer["subscriptionLimits"]["concurrencyBlocked"] is True
    assert [error["error"] for error in answer["errors"]] == ["Over Concurrency Limit."]
    assert sim.calls == {}
    [attempt] = sim.create_attempts
    assert (attempt.status, attempt.call_id) == (201, None)


async def test_create_takes_every_field_the_sdk_sends(
    sim: SimVapi, http: httpx.AsyncClient
) -> None:
    body = create_body(assistantVersion=3, squadVersion=1, name="vb CA1")
    with trio.fail_after(GUARD_S):
        response = await post_call(sim, http, body)
    assert response.status_code == 201, response.text
    monitor = response.json()["monitor"]
    call_id = response.json()["id"]
    assert monitor["controlUrl"] == sim.control_url(call_id)
    assert "listenUrl" not in monitor, "Vapi gives it only with monitorPlan.listenEnabled"


# --- say, add-message, control ------------------------------------------------------------


async def test_the_control_url_says_mutes_and_prompts(
    sim: SimVapi, http: httpx.AsyncClient
) -> None:
    sim.behaviour = attrs.evolve(QUICK, end_after_replies=None, audio_burst=True)
    heard = Heard()
    with trio.fail_after(GUARD_S):
        response = await post_call(sim, http)
        call_id = response.json()["id"]
        control = sim.control_url(call_id)
        not_yet = await http.post(control, json={"type": "say", "content": "Hi"})
        async with transport(sim, response.json()["transport"]["websocketCallUrl"]) as ws:
            await listen_until(ws, heard, "transcript", role="assistant")
            said = await http.post(control, json={"type": "say", "content": "Hold on, please."})
            await listen_until(
                ws, heard, "transcript", role="assistant", transcript="Hold on, please."
            )
            # Muted, the assistant's answer to a prompt sends no audio.
            await http.post(control, json={"type": "control", "control": "mute-assistant"})
            before = heard.audio_bytes()
            await ws.send_message(
                '{"type":"add-message","message":{"role":"user","content":"4 2"}}'
            )
            await listen_until(ws, heard, "transcript", role="assistant")
            muted_audio = heard.audio_bytes() - before
            silently = await http.post(
                control,
                json={
                    "type": "add-message",
                    "message": {"role": "system", "content": "x"},
                    "triggerResponseEnabled": False,
                },
            )
            unknown = await http.post(control, json={"type": "dance"})
            await http.post(control, json={"type": "end-call"})
            with pytest.raises(trio_websocket.ConnectionClosed):
                await listen_until(ws, heard, "never")
        ended = await http.post(control, json={"type": "say", "content": "Hi"})
        missing = await http.post(sim.control_url("no-such-call"), json={"type": "end-call"})
    assert (not_yet.status_code, said.status_code, silently.status_code) == (400, 200, 200)
    assert (unknown.status_code, ended.status_code, missing.status_code) == (400, 400, 404)
    [record] = sim.calls.values()
    assert record.said == ["Hold on, please."]
    assert record.prompted_replies == 1  # not for the silent add-message
    assert muted_audio == 0 and record.muted_bytes == len(load_clip("caller_2"))
    assert [m["type"] for m in record.control_posts] == [
        "say",
        "control",
        "add-message",
        "end-call",
    ]


# --- server webhooks ---------------------------------------------------------------------


@pytest.mark.parametrize("server_messages", [None, ["end-of-call-report"]])
async def test_status_updates_and_the_report_are_posted_in_order(
    sim: SimVapi, http: httpx.AsyncClient, nursery: trio.Nursery, server_messages: Any
) -> None:
    """To the call's ``server.url``: every status the call went through, then the report
    (only the types in ``serverMessages`` when it is given)."""
    posted: list[dict[str, Any]] = []

    async def receive(request: HttpRequest) -> HttpResponse:
        posted.append(orjson.loads(request.body)["message"])
        return HttpResponse(status=200, body=b"{}")

    port = await nursery.start(serve_http_ws, receive, reject_websockets)
    overrides: dict[str, Any] = {"server": {"url": f"http://127.0.0.1:{port}/vapi"}}
    if server_messages is not None:
        overrides["serverMessages"] = server_messages
    sim.behaviour = attrs.evolve(QUICK, end_after_s=0.2, ended_reason="worker-shutdown")
    body = create_body(assistantOverrides=overrides)
    with trio.fail_after(GUARD_S):
        async with transport(sim, await create(sim, http, body)) as ws:
            with pytest.raises(trio_websocket.ConnectionClosed):
                await listen_until(ws, Heard(), "never")
        [record] = sim.calls.values()
        await record.wait_webhooks_delivered()
    sent = [(m["type"], m.get("status") or m.get("endedReason")) for m in posted]
    everything = [
        ("status-update", "in-progress"),
        ("status-update", "ended"),
        ("end-of-call-report", "worker-shutdown"),
    ]
    assert sent == (everything if server_messages is None else everything[-1:])
    assert all(m["call"]["id"] == record.id for m in posted)
    assert [exchange.status for exchange in record.webhooks] == [200] * len(sent)


async def reject_websockets(request: HttpRequest, ws: SimWebSocket) -> None:
    await ws.reject(404)


async def test_muting_the_caller_first_message_again_and_a_transfer_on_the_socket(
    sim: SimVapi, http: httpx.AsyncClient
) -> None:
    sim.behaviour = attrs.evolve(QUICK, end_after_replies=None, audio_burst=True)
    messages = ["speech-update", "transcript", "status-update", "transfer-update"]
    body = create_body(assistantOverrides={"clientMessages": messages})
    heard = Heard()
    destination = {"type": "number", "number": "+15550100778"}
    with trio.fail_after(GUARD_S):
        async with transport(sim, await create(sim, http, body)) as ws:
            await listen_until(ws, heard, "transcript", role="assistant")
            await ws.send_message('{"type":"control","control":"mute-customer"}')
            await send_audio(ws, silence(200) + load_clip("caller_2") + silence(700))
            await ws.send_message('{"type":"control","control":"say-first-message"}')
            first_again = await listen_until(ws, heard, "transcript", role="assistant")
            await ws.send_message(
                orjson.dumps({"type": "transfer", "destination": destination}).decode()
            )
            forwarding = await listen_until(ws, heard, "status-update", status="forwarding")
            await ws.send_message('{"type":"end-call"}')
    assert "user" not in [m.get("role") for _, m in heard.messages], "the caller was not heard"
    assert first_again["transcript"] == CLIP_TEXTS[QUICK.greeting_clip]
    assert forwarding["destination"] == destination
    [record] = sim.calls.values()
    assert [m["type"] for m in record.control_messages] == ["control", "control", "transfer"]
