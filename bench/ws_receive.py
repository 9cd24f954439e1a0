"""CPU per message of ``WsConnection.receive`` on a plain socket: the media socket's read path.

    python bench/ws_receive.py [--seconds 5]

Two shapes, each for ``--seconds`` in this process, over a ``socket.socketpair()``
with the bridge's side a server ``WsConnection`` on ``SocketTransport`` and the
peer writing masked text frames of Twilio's media size (about 350 bytes):

- ``paced``: the reader task waits in ``receive``; the peer writes one frame and
  yields until the reader has it, and again: one frame per read, the reader
  waking for each (a live call's shape: a frame every 20 ms, so the socket is
  empty whenever the reader asks).
- ``burst``: the peer keeps 64 KiB of frames written ahead; the reader receives as
  fast as it can (a flood, or a backlog after a stall: the socket never empty).

It prints microseconds of CPU (user and system, this process) per message for
each shape. The peer's own cost is in the figures (one ``send`` per frame paced,
one per 64 KiB burst), the same before and after a change to the read path.
"""

from __future__ import annotations

import argparse
import resource
import socket

import trio
import trio.testing
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request, TextMessage

from voicebridge.net.transport import SocketTransport
from voicebridge.net.ws import WsConnection

FRAME_TEXT = (
    '{"event":"media","streamSid":"MZ' + "0" * 32 + '","media":{"payload":"' + "/" * 216 + '"}}'
)
BURST_BYTES = 64 * 1024


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def pair() -> tuple[WsConnection, socket.socket, WSConnection]:
    ours, theirs = socket.socketpair()
    client = WSConnection(ConnectionType.CLIENT)
    server = WSConnection(ConnectionType.SERVER)
    server.receive_data(client.send(Request(host="bridge.test", target="/twilio/stream")))
    next(server.events())
    client.receive_data(server.send(AcceptConnection()))
    next(client.events())
    theirs.setblocking(False)
    return WsConnection(SocketTransport(ours), client=False), theirs, client


async def paced(seconds: float) -> float:
    connection, theirs, client = pair()
    frame = client.send(TextMessage(data=FRAME_TEXT))
    received = 0

    async def read() -> None:
        nonlocal received
        while True:
            await connection.receive()
            received += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        await trio.testing.wait_all_tasks_blocked()
        start = cpu_s()
        deadline = trio.current_time() + seconds
        sent = 0
        while trio.current_time() < deadline:
            for _ in range(1000):
                theirs.send(frame)
                sent += 1
                while received < sent:  # the reader was waiting: it wakes, reads, waits again
                    await trio.lowlevel.checkpoint()
        used = cpu_s() - start
        nursery.cancel_scope.cancel()
    theirs.close()
    return used / sent * 1e6


async def burst(seconds: float) -> float:
    connection, theirs, client = pair()
    frame = client.send(TextMessage(data=FRAME_TEXT))
    chunk = frame * (BURST_BYTES // len(frame))
    per_chunk = BURST_BYTES // len(frame)
    count = 0
    start = cpu_s()
    deadline = trio.current_time() + seconds
    owed = 0  # messages written and not yet received
    while trio.current_time() < deadline:
        while owed < 2 * per_chunk:
            theirs.setblocking(True)
            theirs.sendall(chunk)
            owed += per_chunk
        for _ in range(per_chunk):
            await connection.receive()
        owed -= per_chunk
        count += per_chunk
    used = cpu_s() - start
    theirs.close()
    return used / count * 1e6


async def main(seconds: float) -> None:
    for name, shape in (("paced", paced), ("burst", burst)):
        print(f"{name}: {await shape(seconds):.2f} us per message")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per shape")
    args = parser.parse_args()
    trio.run(main, args.seconds)
