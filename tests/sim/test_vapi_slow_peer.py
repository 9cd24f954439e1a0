"""voicebridge.sim.vapi against a peer that is slow to read, on trio's autojump clock.

Charter: the real sim over loopback (127.0.0.1, port 0) and httpx for ``POST /call``;
the peer on the transport socket is a plain TCP stream speaking WebSocket through
wsproto, so the test decides when it reads. To hold the sim's socket the peer stops
reading and pings without pause: the sim's pong then waits for room in the socket,
and every other write of the sim queues behind it, as behind any slow peer. Everything
runs on ``autojump_clock`` with exact virtual times; every test is guarded by
``trio.fail_after``.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import attrs
import httpx
import orjson
import trio
import trio.testing
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Event,
    Message,
    Ping,
    Request,
    TextMessage,
)

from voicebridge.sim.audio import CLIP_TEXTS, SAMPLE_RATE, load_clip
from voicebridge.sim.vapi import ENDED_SILENCE, SimVapi, SimVapiBehaviour

#: Virtual seconds; a test that hangs fails at once.
GUARD_S = 60.0
#: The call's ``silenceTimeoutSeconds``.
SILENCE_S = 4.0
#: How long the peer reads nothing: well under the sim's write deadline (5 s), after
#: which it would give the socket up.
STALL_S = 2.0
#: The peer's receive buffer: small, so that the sim's pongs fill the socket quickly.
PEER_BUFFER = 4096
#: A greeting of 1.2 s and no wait for caller audio: the call ends only by its silence.
QUIET = SimVapiBehaviour(greeting_clip="caller_1", customer_audio_timeout_s=None)
CLIENT_MESSAGES = ["speech-update", "status-update", "transcript"]
#: The largest a ping may carry: each fills the sim's socket with a pong as large.
PING_PAYLOAD = b"p" * 125


@attrs.define
class Heard:
    """What the peer received: JSON messages and audio bytes, stamped with trio time."""

    messages: list[tuple[float, dict[str, Any]]] = attrs.Factory(list)
    audio_bytes: int = 0

    def has(self, message_type: str, **fields: Any) -> bool:
        return any(
            message["type"] == message_type and fields.items() <= message.items()
            for _, message in self.messages
        )

    def at(self, message_type: str, **fields: Any) -> float:
        """When the first message of ``message_type`` (with ``fields``) arrived."""
        for at, message in self.messages:
            if message["type"] == message_type and fields.items() <= message.items():
                return at
        raise AssertionError(f"no {message_type} {fields} in {self.messages}")


class SlowPeer:
    """The far end of the sim's transport socket, reading only when the test says.

    ``stall`` pings from a task of its own (one whole frame per write, never cut) while
    nothing is read; the next read lets the sim's pongs, and what queued behind them,
    through.
    """

    def __init__(self, stream: trio.SocketStream, ws: WSConnection, nursery: trio.Nursery):
        self._stream = stream
        self._ws = ws
        self._nursery = nursery
        self._send_lock = trio.Lock()
        self._parts: list[str | bytes] = []  # of a message not yet whole
        self.heard = Heard()

    async def _send(self, event: Event) -> None:
        async with self._send_lock:
            await self._stream.send_all(self._ws.send(event))

    async def read_until(self, done: Callable[[Heard], bool]) -> None:
        """Read (answering a close) until ``done(heard)``; the sim's close ends it too."""
        while not done(self.heard):
            data = await self._stream.receive_some(65536)
            now = trio.current_time()
            self._ws.receive_data(data or None)
            for event in self._ws.events():
                if isinstance(event, Message):
                    self._parts.append(event.data)
                    if not event.message_finished:
                        continue
                    parts, self._parts = self._parts, []
                    if isinstance(event, TextMessage):
                        text = "".join(str(part) for part in parts)
                        self.heard.messages.append((now, orjson.loads(text)))
                    else:
                        self.heard.audio_bytes += sum(len(part) for part in parts)
                elif isinstance(event, CloseConnection):
                    await self._send(event.response())
                    return
            if not data:
                return

    async def stall(self, seconds: float) -> None:
        """Read nothing for ``seconds`` while pinging, so that the sim's socket fills."""
        over = trio.Event()
        self._nursery.start_soon(self._ping_until, over)
        await trio.sleep(seconds)
        over.set()

    async def _ping_until(self, over: trio.Event) -> None:
        while not over.is_set():
            await self._send(Ping(payload=PING_PAYLOAD))


@asynccontextmanager
async def open_peer(url: str, key: str) -> AsyncIterator[SlowPeer]:
    """Connect to the transport ``url`` with a small receive buffer, upgrade, yield the peer."""
    parts = urlsplit(url)
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, PEER_BUFFER)
    await sock.connect((parts.hostname, parts.port))
    stream = trio.SocketStream(sock)
    ws = WSConnection(ConnectionType.CLIENT)
    request = Request(
        host=parts.netloc,
        target=parts.path,
        extra_headers=[(b"authorization", f"Bearer {key}".encode())],
    )
    await stream.send_all(ws.send(request))
    while not any(isinstance(event, AcceptConnection) for event in ws.events()):
        ws.receive_data(await stream.receive_some(65536))
    async with stream, trio.open_nursery() as peer_nursery:
        yield SlowPeer(stream, ws, peer_nursery)
        peer_nursery.cancel_scope.cancel(reason="the call is over")


@asynccontextmanager
async def quiet_call(nursery: trio.Nursery) -> AsyncIterator[tuple[SimVapi, str, SlowPeer]]:
    """A sim serving one quiet call (``QUIET``, ``SILENCE_S``), its id and its slow peer."""
    sim = SimVapi("test-key", behaviour=QUIET)
    await nursery.start(sim.serve)
    body = {
        "assistantId": "asst-123",
        "transport": {
            "provider": "vapi.websocket",
            "audioFormat": {"format": "mulaw", "container": "raw", "sampleRate": 8000},
        },
        "assistantOverrides": {
            "clientMessages": CLIENT_MESSAGES,
            "silenceTimeoutSeconds": SILENCE_S,
        },
    }
    headers = {"Authorization": f"Bearer {sim.api_key}"}
    async with httpx.AsyncClient() as http:
        created = await http.post(f"{sim.base_url}/call", json=body, headers=headers)
    assert created.status_code == 201, created.text
    answer = created.json()
    async with open_peer(answer["transport"]["websocketCallUrl"], sim.api_key) as peer:
        yield sim, answer["id"], peer


def closed(heard: Heard) -> bool:
    """Never done: read until the sim closes the socket."""
    return False


async def test_the_silence_counts_from_the_end_of_the_greeting_however_late_its_announcement(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """The peer stops reading once the greeting's audio is in: ``speech-update`` stopped
    and the transcript wait in the socket. The greeting still finished when its audio
    did, and the quiet call ends exactly ``silenceTimeoutSeconds`` after that."""
    greeting_bytes = len(load_clip(QUIET.greeting_clip))
    with trio.fail_after(GUARD_S):
        async with quiet_call(nursery) as (sim, call_id, peer):
            await peer.read_until(lambda heard: heard.audio_bytes == greeting_bytes)
            await peer.stall(STALL_S)
            await peer.read_until(closed)
            await sim.calls[call_id].wait_ended()
    record = sim.calls[call_id]
    [greeting] = record.turns
    assert greeting.completed and greeting.finished_at is not None
    assert greeting.finished_at == greeting.started_at + greeting_bytes / SAMPLE_RATE
    heard = peer.heard
    stopped_heard_at = heard.at("speech-update", role="assistant", status="stopped")
    assert stopped_heard_at > greeting.finished_at + 1, "the announcement waited for the peer"
    [stopped] = [
        sent for sent in record.messages("speech-update") if sent.message["status"] == "stopped"
    ]
    assert stopped.at == greeting.finished_at, "recorded when the sim handed it over"
    assert record.ended_reason == ENDED_SILENCE
    assert heard.at("status-update", status="ended") == greeting.finished_at + SILENCE_S


async def test_a_turn_begun_before_the_silence_deadline_is_spoken_however_late_its_announcement(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A ``say`` comes a second before the quiet call's silence deadline while the peer
    reads nothing: its ``speech-update`` started waits in the socket past the deadline.
    The assistant spoke from the moment it began, so the call goes on: the words are
    spoken whole, and the silence counts again from their end."""
    text = CLIP_TEXTS["caller_2"]
    with trio.fail_after(GUARD_S):
        async with quiet_call(nursery) as (sim, call_id, peer):
            await peer.read_until(lambda heard: heard.has("transcript"))  # the greeting's
            greeting_stopped_at = peer.heard.at("speech-update", role="assistant", status="stopped")
            deadline = greeting_stopped_at + SILENCE_S
            await trio.sleep_until(deadline - 1.5)
            async with trio.open_nursery() as stall_nursery:
                stall_nursery.start_soon(peer.stall, STALL_S)
                await trio.sleep(0.5)  # the socket is full: the sim's writes wait
                async with httpx.AsyncClient() as http:
                    said = await http.post(
                        sim.control_url(call_id), json={"type": "say", "content": text}
                    )
                assert said.status_code == 200
            await peer.read_until(closed)
            record = sim.calls[call_id]
            await record.wait_ended()
    [_, say] = record.turns
    assert say.started_at == deadline - 1
    assert say.completed and say.finished_at is not None, "the words were spoken whole"
    assert peer.heard.audio_bytes == len(load_clip(QUIET.greeting_clip)) + say.total_bytes
    started_heard_at = peer.heard.at("speech-update", role="assistant", status="started", turn=1)
    assert started_heard_at > deadline, "the announcement waited for the peer past the deadline"
    assert record.ended_reason == ENDED_SILENCE
    assert peer.heard.at("status-update", status="ended") == say.finished_at + SILENCE_S
