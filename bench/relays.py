"""The physical-limit references: the same traffic through a bare relay instead of the bridge.

    python bench/relays.py tcp   # bare trio: bytes in → bytes out, no framing at all
    python bench/relays.py ws    # bare trio-websocket: message in → message out

Started by the sweep (``bench/sweep.py``) exactly like the bridge under test, through
``voicebridge.loadtest.process.BridgeProcess`` and its ``VOICEBRIDGE_LOADTEST_*``
variables: the listening socket's fd, the simulated assistant's URL, the CPU to pin
to. For every connection (a simulated caller's media socket) it opens one to the
assistant at the same path and copies both ways until either side ends. It says
``ready`` on stdout once it accepts connections, and runs until SIGTERM.

The TCP relay forwards the WebSocket handshake and frames untouched (the two
peers talk WebSocket end to end); the WebSocket relay terminates both sockets and
forwards whole messages. Neither parses JSON, converts Twilio frames to Vapi
frames, paces audio, sends marks or does anything else a bridge must: they show
what the machine and the libraries cost per message, which no bridge can beat.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import urllib.parse
from functools import partial

import trio
import trio_websocket

from voicebridge.loadtest.process import ENV_PREFIX, pin_to

#: One read of the TCP relay; many frames under load.
RECEIVE_BYTES = 64 * 1024


async def _copy(source: trio.SocketStream, sink: trio.SocketStream) -> None:
    """Copy bytes until ``source`` ends, then end ``sink``'s sending side."""
    try:
        while data := await source.receive_some(RECEIVE_BYTES):
            await sink.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await sink.aclose()


async def tcp_relay(listener: trio.SocketListener, upstream: tuple[str, int]) -> None:
    """Serve connections; each one is relayed byte for byte to ``upstream``."""

    async def relay(downstream: trio.SocketStream) -> None:
        async with downstream:
            try:
                upstream_stream = await trio.open_tcp_stream(*upstream)
            except OSError:
                return
            async with upstream_stream, trio.open_nursery() as pair_nursery:
                pair_nursery.start_soon(_copy, downstream, upstream_stream)
                pair_nursery.start_soon(_copy, upstream_stream, downstream)

    await trio.serve_listeners(relay, [listener])


async def _forward(
    source: trio_websocket.WebSocketConnection,
    sink: trio_websocket.WebSocketConnection,
    pair_scope: trio.CancelScope,
) -> None:
    try:
        while True:
            await sink.send_message(await source.get_message())
    except trio_websocket.ConnectionClosed:
        pair_scope.cancel(reason="one side of the relay closed")


async def ws_relay(listener: trio.SocketListener, upstream: tuple[str, int]) -> None:
    """Serve WebSockets; each one is relayed message by message to ``upstream``."""
    host, port = upstream

    async def relay(request: trio_websocket.WebSocketRequest) -> None:
        downstream = await request.accept()
        headers = [(name, value) for name, value in request.headers if name == b"authorization"]
        try:
            async with trio_websocket.open_websocket(
                host, port, request.path, use_ssl=False, extra_headers=headers
            ) as upstream_ws, trio.open_nursery() as pair_nursery:
                scope = pair_nursery.cancel_scope
                pair_nursery.start_soon(_forward, downstream, upstream_ws, scope)
                pair_nursery.start_soon(_forward, upstream_ws, downstream, scope)
        except trio_websocket.HandshakeError:
            pass
        await downstream.aclose()

    server = trio_websocket.WebSocketServer(relay, [listener])
    await server.run()


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[1] not in ("tcp", "ws"):
        print("usage: relays.py tcp|ws (settings in VOICEBRIDGE_LOADTEST_*)", file=sys.stderr)
        return 2
    env = os.environ
    if env.get(f"{ENV_PREFIX}CPU"):
        pin_to({int(env[f"{ENV_PREFIX}CPU"])})
    assistant = urllib.parse.urlsplit(env[f"{ENV_PREFIX}ASSISTANT_URL"])
    upstream = (assistant.hostname or "127.0.0.1", assistant.port or 80)
    sock = socket.socket(fileno=int(env[f"{ENV_PREFIX}FD"]))
    serve = tcp_relay if argv[1] == "tcp" else ws_relay

    async def run() -> None:
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as relay_nursery:
                relay_nursery.start_soon(partial(serve, listener, upstream))
                print("ready", flush=True)
                async for _ in signals:
                    relay_nursery.cancel_scope.cancel(reason="stopped by a signal")
                    break

    trio.run(run)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
