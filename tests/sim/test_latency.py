"""The latency model: the delay relay on real loopback sockets, and the model's options.

The relay runs on the real clock (it relays real sockets); delays are asserted as
lower bounds, exact by construction, with a generous upper bound for a loaded machine.
"""

from __future__ import annotations

import functools
import socket

import pytest
import trio

from voicebridge.net.connect import open_tcp_socket, serve_tcp
from voicebridge.sim.latency import LatencyModel, parse_overrides, serve_delay_proxy

ONE_WAY_MS = 40.0
#: What a loaded machine may add to a delay, at most, in these tests.
SLACK_S = 0.25


async def _echo(sock: socket.socket) -> None:
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
    async for data in stream:
        await stream.send_all(data)


async def _receive_exactly(stream: trio.SocketStream, size: int) -> bytes:
    data = b""
    while len(data) < size:
        data += await stream.receive_some(size - len(data))
    return data


async def test_the_relay_delays_each_way_and_the_handshake_costs_its_round_trips() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            echo_port = await nursery.start(functools.partial(serve_tcp, _echo))
            relay_port = await nursery.start(
                functools.partial(
                    serve_delay_proxy,
                    "127.0.0.1",
                    echo_port,
                    one_way_ms=ONE_WAY_MS,
                    handshake_round_trips=2,
                )
            )
            sock = await open_tcp_socket("127.0.0.1", relay_port)
            stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
            d = ONE_WAY_MS / 1000
            # The first bytes: two round trips of handshake, then there and back.
            sent_at = trio.current_time()
            await stream.send_all(b"first")
            assert await _receive_exactly(stream, 5) == b"first"
            first = trio.current_time() - sent_at
            assert 6 * d <= first < 6 * d + SLACK_S
            # Then one round trip, and a burst keeps its order and its bytes.
            burst = [bytes([n]) * 1000 for n in range(1, 50)]
            sent_at = trio.current_time()
            for piece in burst:
                await stream.send_all(piece)
            assert await _receive_exactly(stream, 49_000) == b"".join(burst)
            later = trio.current_time() - sent_at
            assert 2 * d <= later < 2 * d + SLACK_S
            await stream.aclose()
            nursery.cancel_scope.cancel()


async def test_a_close_passes_through_the_relay() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            echo_port = await nursery.start(functools.partial(serve_tcp, _echo))
            relay_port = await nursery.start(
                functools.partial(
                    serve_delay_proxy,
                    "127.0.0.1",
                    echo_port,
                    one_way_ms=ONE_WAY_MS,
                    handshake_round_trips=0,
                )
            )
            sock = await open_tcp_socket("127.0.0.1", relay_port)
            stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
            await stream.send_all(b"bye")
            assert await _receive_exactly(stream, 3) == b"bye"
            await stream.send_eof()
            assert await stream.receive_some() == b""  # the echo server saw the end
            nursery.cancel_scope.cancel()


def test_the_model_takes_named_overrides_and_refuses_unknown_or_negative_ones() -> None:
    overrides = parse_overrides(["vapi-create-ms=600", "vapi_network_ms=5"])
    model = LatencyModel().with_overrides(overrides)
    assert (model.vapi_create_ms, model.vapi_network_ms) == (600.0, 5.0)
    assert model.twilio_network_ms == LatencyModel().twilio_network_ms
    with pytest.raises(ValueError, match="unknown latency 'vapi_creat_ms'"):
        LatencyModel().with_overrides({"vapi_creat_ms": 1.0})
    with pytest.raises(ValueError, match="must not be negative"):
        LatencyModel().with_overrides({"vapi_create_ms": -1.0})
    with pytest.raises(ValueError, match="expected name=milliseconds"):
        parse_overrides(["vapi_create_ms"])
    with pytest.raises(ValueError, match="not a number"):
        parse_overrides(["vapi_create_ms=fast"])
