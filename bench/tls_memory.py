"""CPU and memory of the ``wss://`` Vapi leg: trio's ``SSLStream`` against ``TlsSocketTransport``.

    python bench/tls_memory.py [--pairs 100] [--duration 150] [--warmup 10] [--cpu 1]

Runs the same traffic twice, each time in a fresh child process (so that one run's
heap does not carry into the other's RSS): ``--pairs`` pairs of ``WsConnection``
over TLS on loopback, first with the transport the Vapi leg used to have (a
``trio.SSLStream``, ``StreamTransport`` below, kept here for the comparison), then
with ``net.transport.TlsSocketTransport``. Each pair is a client (the bridge's Vapi leg)
and a server (the assistant), both on the transport under test, so every figure
counts both ends of every pair.

The traffic is the loadtest's shape:
- the client sends a 160-byte binary frame (20 ms of caller audio) every 20 ms;
- the server, every 20 ms, sends a 160-400-byte binary chunk half the time and a
  40-120-byte JSON text one time in ten.

Each side writes the way ``bridge.call`` writes caller audio: straight from the
ticker with ``send_nowait`` when nothing is queued, else through a channel to a
sender task (the hop), which also finishes a frame taken in part (``flush``). One
reader task per connection counts what arrives. The garbage collector is tuned as
in ``voicebridge serve``.

After ``--warmup`` seconds the child measures, over ``--duration`` seconds, the
process's CPU time (user and system) per connection-second, and its RSS at the
start of that window and at the end. It also reports how many writes took the hop
and whether the ticker kept its time. The parent prints both rows.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request

from voicebridge.errors import SocketClosed
from voicebridge.gctuning import tune_gc_for_latency
from voicebridge.net.transport import ABNORMAL_CLOSURE, RECV_BYTES, TlsSocketTransport, Transport
from voicebridge.net.ws import WsConnection

TICK_S = 0.020
FRAME = b"\x55" * 160
#: As ``bridge.call``'s channel to the Vapi sender.
CHANNEL_FRAMES = 50
TRANSPORTS = ("sslstream", "tlssocket")


class StreamTransport(Transport):
    """The Vapi leg's ``wss://`` transport before ``TlsSocketTransport``: a trio stream.

    Every write goes through ``send_all`` (``try_send`` takes nothing, so each one
    yields and ``send_nowait`` always fails); every read allocates ``RECV_BYTES``
    twice (the socket's ``recv`` and ``SSLObject.read``) and shrinks them.
    """

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream

    async def receive_some(self) -> bytes:
        try:
            return bytes(await self.stream.receive_some(RECV_BYTES))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return b""

    def try_send(self, data: memoryview) -> int:
        return 0

    async def send_rest(self, data: memoryview) -> None:
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise SocketClosed(ABNORMAL_CLOSURE, "connection lost") from None

    async def aclose(self) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self.stream.aclose()


# -- one child: one transport --------------------------------------------------------


class Writer:
    """Writes one connection's messages as ``bridge.call`` writes caller audio."""

    FLUSH = object()

    def __init__(self, connection: WsConnection) -> None:
        self.connection = connection
        self.send_channel, self.receive_channel = trio.open_memory_channel[Any](CHANNEL_FRAMES)
        self.queued = 0
        self.direct = 0
        self.hopped = 0
        self.dropped = 0

    def write(self, message: str | bytes) -> None:
        connection = self.connection
        if self.queued == 0 and connection.send_nowait(message):
            self.direct += 1
            if connection.needs_flush:
                self.queued += 1
                self.send_channel.send_nowait(self.FLUSH)
            return
        try:
            self.send_channel.send_nowait(message)
        except trio.WouldBlock:
            self.dropped += 1
            return
        self.queued += 1
        self.hopped += 1

    async def run(self) -> None:
        with contextlib.suppress(SocketClosed):
            async for message in self.receive_channel:
                try:
                    if message is self.FLUSH:
                        await self.connection.flush()
                    else:
                        await self.connection.send(message)
                finally:
                    self.queued -= 1


class Counts:
    def __init__(self) -> None:
        self.messages = 0
        self.bytes = 0


async def read_all(connection: WsConnection, counts: Counts) -> None:
    with contextlib.suppress(SocketClosed):
        while True:
            message = await connection.receive()
            counts.messages += 1
            counts.bytes += len(message)


def ws_pair() -> tuple[WSConnection, WSConnection]:
    """A client and a server wsproto connection past the opening handshake."""
    client = WSConnection(ConnectionType.CLIENT)
    server = WSConnection(ConnectionType.SERVER)
    server.receive_data(client.send(Request(host="127.0.0.1", target="/transport")))
    next(server.events())
    client.receive_data(server.send(AcceptConnection()))
    next(client.events())
    return client, server


async def connect_pair(
    kind: str,
    listener: socket.socket,
    client_context: ssl.SSLContext,
    server_context: ssl.SSLContext,
) -> tuple[WsConnection, WsConnection]:
    """A client and a server ``WsConnection`` over loopback TLS on the ``kind`` transport."""
    ours = socket.create_connection(listener.getsockname())
    theirs, _ = listener.accept()
    client_transport: Transport
    server_transport: Transport
    if kind == "sslstream":
        client_tls = trio.SSLStream(
            trio.SocketStream(trio.socket.from_stdlib_socket(ours)),
            client_context,
            server_hostname="127.0.0.1",
            https_compatible=True,
        )
        server_tls = trio.SSLStream(
            trio.SocketStream(trio.socket.from_stdlib_socket(theirs)),
            server_context,
            server_side=True,
            https_compatible=True,
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client_tls.do_handshake)
            nursery.start_soon(server_tls.do_handshake)
        client_transport = StreamTransport(client_tls)
        server_transport = StreamTransport(server_tls)
    else:
        client_raw = TlsSocketTransport(ours, client_context, server_hostname="127.0.0.1")
        server_raw = TlsSocketTransport(theirs, server_context, server_side=True)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client_raw.handshake)
            nursery.start_soon(server_raw.handshake)
        client_transport, server_transport = client_raw, server_raw
    ws_pair()  # the opening handshake, which both ends are past
    return (
        WsConnection(client_transport, client=True),
        WsConnection(server_transport, client=False),
    )


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run_child(kind: str, pairs: int, warmup_s: float, duration_s: float, certs: Path) -> None:
    cert, key = certs / "cert.pem", certs / "key.pem"
    client_context = ssl.create_default_context(cafile=str(cert))
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0), backlog=pairs)
    connections = [
        await connect_pair(kind, listener, client_context, server_context) for _ in range(pairs)
    ]
    listener.close()
    tune_gc_for_latency()
    clients = [Writer(client) for client, _ in connections]
    servers = [Writer(server) for _, server in connections]
    received = Counts()
    rng = random.Random(1)
    texts = [
        f'{{"type":"speech-update","status":"started","role":"assistant","turn":{n}}}'
        for n in range(10)
    ] + [f'{{"type":"model-output","output":"{"x" * size}"}}' for size in range(10, 80, 7)]
    chunks = [b"\x7f" * size for size in range(160, 401)]
    figures: dict[str, Any] = {"transport": kind, "pairs": pairs, "duration_s": duration_s}

    async with trio.open_nursery() as nursery:
        for client, server in connections:
            nursery.start_soon(read_all, client, received)
            nursery.start_soon(read_all, server, received)
        for writer in (*clients, *servers):
            nursery.start_soon(writer.run)

        start = trio.current_time()
        window_start = start + warmup_s
        end = window_start + duration_s
        tick = start
        worst_slip = 0.0
        started = False
        while tick < end:
            tick += TICK_S
            await trio.sleep_until(tick)
            now = trio.current_time()
            if not started and now >= window_start:
                started = True
                cpu_at, rss_at, messages_at = cpu_seconds(), rss_bytes(), received.messages
                hops_at = sum(w.hopped for w in clients), sum(w.direct for w in clients)
            if started:
                worst_slip = max(worst_slip, now - tick)
            for caller_side, assistant_side in zip(clients, servers, strict=True):
                caller_side.write(FRAME)
                draw = rng.random()
                if draw < 0.5:
                    assistant_side.write(rng.choice(chunks))
                elif draw < 0.6:
                    assistant_side.write(rng.choice(texts))
        cpu = cpu_seconds() - cpu_at
        rss = rss_bytes()
        connection_seconds = 2 * pairs * duration_s
        hopped = sum(w.hopped for w in clients) - hops_at[0]
        direct = sum(w.direct for w in clients) - hops_at[1]
        figures.update(
            cpu_us_per_connection_s=round(cpu / connection_seconds * 1e6, 1),
            rss_start_mib=round(rss_at / 2**20, 2),
            rss_growth_mib=round((rss - rss_at) / 2**20, 2),
            messages_per_s=round((received.messages - messages_at) / duration_s),
            client_writes_hopped=round(hopped / max(1, hopped + direct), 3),
            dropped=sum(w.dropped for w in (*clients, *servers)),
            worst_tick_slip_ms=round(worst_slip * 1000, 1),
        )
        nursery.cancel_scope.cancel()
    with trio.move_on_after(5):  # both ends close at once, each reading the other's close
        async with trio.open_nursery() as nursery:
            for client, server in connections:
                nursery.start_soon(client.aclose)
                nursery.start_soon(server.aclose)
    print(json.dumps(figures), flush=True)


# -- the parent: both transports, one table ---------------------------------------------


def make_certificate(folder: Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        sys.exit("needs the openssl command to make the loopback certificate")
    request = (
        "req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1"
        " -subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1"
    )
    subprocess.run(
        [
            openssl,
            *request.split(),
            "-keyout",
            str(folder / "key.pem"),
            "-out",
            str(folder / "cert.pem"),
        ],
        check=True,
        capture_output=True,
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=100)
    parser.add_argument("--duration", type=float, default=150.0, help="measured window, s")
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument("--cpu", type=int, default=None, help="pin the children to this CPU")
    parser.add_argument("--child", choices=TRANSPORTS, help=argparse.SUPPRESS)
    parser.add_argument("--certs", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        if args.cpu is not None:
            os.sched_setaffinity(0, {args.cpu})
        trio.run(run_child, args.child, args.pairs, args.warmup, args.duration, args.certs)
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        make_certificate(Path(folder))
        for kind in TRANSPORTS:
            command = [sys.executable, __file__, "--child", kind, "--certs", folder]
            command += ["--pairs", str(args.pairs), "--duration", str(args.duration)]
            command += ["--warmup", str(args.warmup)]
            if args.cpu is not None:
                command += ["--cpu", str(args.cpu)]
            done = subprocess.run(command, check=True, capture_output=True, text=True)
            rows.append(json.loads(done.stdout.splitlines()[-1]))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(
        f"{args.pairs} pairs over loopback TLS, {args.duration:g} s measured after"
        f" {args.warmup:g} s (both ends of each pair counted)"
    )
    print(
        f"{'transport':<10} {'CPU µs/conn-s':>14} {'RSS start MiB':>14} {'RSS growth MiB':>15}"
        f" {'msgs/s':>8} {'hopped':>7} {'dropped':>8} {'slip ms':>8}"
    )
    for row in rows:
        print(
            f"{row['transport']:<10} {row['cpu_us_per_connection_s']:>14,.0f}"
            f" {row['rss_start_mib']:>14.1f} {row['rss_growth_mib']:>+15.2f}"
            f" {row['messages_per_s']:>8,} {row['client_writes_hopped']:>7.1%}"
            f" {row['dropped']:>8} {row['worst_tick_slip_ms']:>8.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
