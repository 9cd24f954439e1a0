"""The simulated world's delays: the network each way, Twilio's stream set-up, Vapi's timing.

On loopback everything answers at once, which hides what a caller waits for. This
model puts the delays of a real deployment back: ``demo`` and ``loadtest`` run with
``LatencyModel()`` (its defaults, from published figures, see docs/performance.md
"What the caller hears"); tests that need exact times run without one.

The network is modelled by ``serve_delay_proxy``: a TCP relay between two peers
that delivers every byte ``one_way_ms`` after it was sent, each way, and takes
``handshake_round_trips`` round trips to open a connection (TCP, and TLS, as a
remote peer costs). Putting it on the wire, rather than in the peers' code, delays
everything the way a network does: the webhook and its answer, the WebSocket
upgrades, every frame, mark echo and ``clear``, with order kept and no peer told.
The peers' own delays (Vapi's create, its reaction to speech, Twilio's stream
set-up) are their settings; ``LatencyModel`` says which.
"""

from __future__ import annotations

import functools
import socket
from collections.abc import Callable

import attrs
import trio

from voicebridge.errors import SocketClosed
from voicebridge.net.connect import open_tcp_socket, send_all, serve_tcp
from voicebridge.net.transport import SocketTransport

#: Bytes in flight on one direction of one relayed connection: the proxy stops reading
#: past it, so TCP pushes back on the sender as a full network path would. 1 MiB is
#: far more than a call's delay (a second of audio is 8 KB, ~11 KB as base64 JSON).
MAX_IN_FLIGHT_BYTES = 1 << 20
#: Pieces in flight per direction: the reader's reads, bounded like the bytes.
MAX_IN_FLIGHT_PIECES = 4096


@attrs.frozen(kw_only=True)
class LatencyModel:
    """What a caller waits for beyond the bridge itself, in milliseconds.

    The defaults are one deployment's typical figures (sources in docs/performance.md):
    a bridge in the cloud region of Twilio's media edge and of Vapi.
    """

    #: One way between Twilio and the bridge (webhooks, the Media Stream).
    twilio_network_ms: float = 20.0
    #: One way between the bridge and Vapi (``POST /call``, the transport socket).
    vapi_network_ms: float = 20.0
    #: Round trips to open a connection before its first byte: TCP's, then TLS 1.3's.
    handshake_round_trips: float = 2.0
    #: Twilio's own time from the TwiML it fetched to opening the Media Stream
    #: (beyond the network, which the proxy adds).
    twilio_stream_setup_ms: float = 150.0
    #: Vapi's ``POST /call``: request received → answer sent.
    vapi_create_ms: float = 350.0
    #: Caller speech onset → Vapi's ``user-interrupted`` (``stopSpeakingPlan.voiceSeconds``).
    vapi_reaction_ms: float = 200.0
    #: End of the caller's turn → the reply (``startSpeakingPlan.waitSeconds`` and more).
    vapi_reply_ms: float = 700.0

    def with_overrides(self, overrides: dict[str, float]) -> LatencyModel:
        """This model with the named fields changed (``--latency name=ms`` options)."""
        known = {a.name for a in attrs.fields(LatencyModel)}
        for name in overrides:
            if name not in known:
                raise ValueError(f"unknown latency {name!r}; known: {', '.join(sorted(known))}")
            if overrides[name] < 0:
                raise ValueError(f"latency {name} must not be negative, got {overrides[name]}")
        return attrs.evolve(self, **overrides)

    def webhook_trip_ms(self) -> float:
        """Twilio sending a webhook on a new connection → the request reaching the bridge."""
        return self.twilio_network_ms * (2 * self.handshake_round_trips + 1)

    def first_word_network_ms(self) -> float:
        """The network's share of the time to first word, from the webhook at the bridge.

        On that path: the TwiML back to Twilio; Twilio opening the stream (handshake,
        the upgrade and its answer, then ``start``); the bridge creating the call
        (handshake, request, answer) and opening the assistant's socket (handshake,
        upgrade, answer); the greeting to the bridge, then to Twilio. The load
        generator adds this by arithmetic (its peers are in one process, on loopback);
        the demo puts it on the wire.
        """
        handshake = 2 * self.handshake_round_trips
        twilio_legs = 1 + handshake + 3 + 1
        vapi_legs = (handshake + 2) + (handshake + 2) + 1
        return twilio_legs * self.twilio_network_ms + vapi_legs * self.vapi_network_ms

    def speech_to_silence_extra_ms(self) -> float:
        """Beyond the bridge's interrupted → clear: the caller's audio to the assistant,
        its reaction, then ``user-interrupted`` back and the ``clear`` to Twilio."""
        return self.vapi_reaction_ms + 2 * (self.twilio_network_ms + self.vapi_network_ms)

    def describe(self) -> str:
        """One line, for the demo's and the load test's headers."""
        return (
            f"network {self.twilio_network_ms:g} ms to Twilio, {self.vapi_network_ms:g} ms to "
            f"Vapi (one way; {self.handshake_round_trips:g} round trips per connection); "
            f"Twilio stream set-up {self.twilio_stream_setup_ms:g} ms; Vapi create "
            f"{self.vapi_create_ms:g} ms, reaction {self.vapi_reaction_ms:g} ms, reply "
            f"{self.vapi_reply_ms:g} ms"
        )


def parse_overrides(items: list[str]) -> dict[str, float]:
    """``["vapi_create_ms=500", …]`` → ``{"vapi_create_ms": 500.0}``; ValueError if malformed."""
    overrides: dict[str, float] = {}
    for item in items:
        name, equals, value = item.partition("=")
        if not equals:
            raise ValueError(f"expected name=milliseconds, got {item!r}")
        try:
            overrides[name.strip().replace("-", "_")] = float(value)
        except ValueError:
            raise ValueError(f"{name.strip()}: not a number: {value!r}") from None
    return overrides


async def serve_delay_proxy(
    target_host: str,
    target_port: int,
    *,
    one_way_ms: float,
    handshake_round_trips: float,
    host: str = "127.0.0.1",
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Relay TCP connections to ``target_host:target_port`` across a modelled network.

    ``task_status.started(port)`` once listening on ``host``. Each connection is
    connected upstream ``handshake_round_trips`` round trips after it was accepted
    (its first bytes wait meanwhile, as they would for a handshake), then every read
    is delivered ``one_way_ms`` after it arrived, each way, in order. A close is
    passed on after the same delay. Runs until cancelled, which drops every
    connection.
    """
    delay_s = one_way_ms / 1000
    setup_s = 2 * delay_s * handshake_round_trips
    handler = functools.partial(
        _relay, target_host=target_host, target_port=target_port, delay_s=delay_s, setup_s=setup_s
    )
    await serve_tcp(handler, host=host, task_status=task_status)


async def _relay(
    downstream_sock: socket.socket,
    *,
    target_host: str,
    target_port: int,
    delay_s: float,
    setup_s: float,
) -> None:
    accepted_at = trio.current_time()
    downstream = SocketTransport(downstream_sock)
    try:
        upstream_sock = await open_tcp_socket(target_host, target_port)
    except OSError:
        await downstream.aclose()
        return
    upstream = SocketTransport(upstream_sock)
    try:
        async with trio.open_nursery() as relay_nursery:
            closed = functools.partial(relay_nursery.cancel_scope.cancel, reason="relay over")
            # The first bytes arrive one way after the handshake's round trips.
            ready_at = accepted_at + setup_s + delay_s
            relay_nursery.start_soon(_one_way, downstream, upstream, delay_s, ready_at, closed)
            relay_nursery.start_soon(_one_way, upstream, downstream, delay_s, ready_at, closed)
    finally:
        with trio.CancelScope(shield=True):
            await upstream.aclose()
            await downstream.aclose()
            upstream_sock.close()


async def _one_way(
    source: SocketTransport,
    sink: SocketTransport,
    delay_s: float,
    ready_at: float,
    closed: Callable[[], None],
) -> None:
    """Read ``source``, write each piece to ``sink`` ``delay_s`` later (not before ``ready_at``).

    The end of either side ends the relay (``closed``): the other direction's bytes
    still in flight are lost, as a reset connection loses them.
    """
    send_channel, receive_channel = trio.open_memory_channel[tuple[float, bytes]](
        MAX_IN_FLIGHT_PIECES
    )
    in_flight = _Budget(MAX_IN_FLIGHT_BYTES)

    async def deliver() -> None:
        async for due, data in receive_channel:
            await trio.sleep_until(max(due, ready_at))
            in_flight.release(len(data))
            if not data:
                closed()
                return
            try:
                await send_all(sink, data)
            except SocketClosed:
                closed()
                return

    async with trio.open_nursery() as direction_nursery:
        direction_nursery.start_soon(deliver)
        while True:
            data = await source.receive_some()
            await in_flight.acquire(len(data))
            await send_channel.send((trio.current_time() + delay_s, data))
            if not data:
                return


class _Budget:
    """Bytes in flight one way, bounded: the reader waits while the budget is spent."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        # Invariant: 0 <= _used; above _limit only by one piece larger than the limit.
        self._used = 0
        self._changed = trio.Event()

    async def acquire(self, size: int) -> None:
        while self._used and self._used + size > self._limit:
            await self._changed.wait()
        self._used += size

    def release(self, size: int) -> None:
        self._used -= size
        self._changed.set()
        self._changed = trio.Event()
