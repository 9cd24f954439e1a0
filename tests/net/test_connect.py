"""Opening and serving TCP connections (``voicebridge.net.connect``).

Charter: loopback only, port 0, ``fail_after`` guards; the peers on the other end
use trio's own streams (and trio's TLS), not this module, so each test checks
``net.connect`` against an independent implementation.
"""

from __future__ import annotations

import shutil
import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio
import trio.testing

from voicebridge.errors import SocketClosed
from voicebridge.loadtest import tls
from voicebridge.net.connect import (
    ConnectionHandler,
    accept_tls,
    open_tcp_socket,
    send_all,
    serve_tcp,
    starts_with_tls,
)
from voicebridge.net.transport import SocketTransport, TlsHandshakeError


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tls.Certificate:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a test certificate")
    return trio.run(tls.make_certificate, tmp_path_factory.mktemp("connect-tls"))


async def _echo(sock: socket.socket) -> None:
    """Echo through a ``SocketTransport`` until the peer closes."""
    transport = SocketTransport(sock)
    while data := await transport.receive_some():
        await send_all(transport, data)


@asynccontextmanager
async def _serving(handler: ConnectionHandler) -> AsyncIterator[int]:
    """``serve_tcp(handler)`` on a free port, for the block's duration."""
    async with trio.open_nursery() as nursery:
        port = await nursery.start(partial(serve_tcp, handler))
        yield port
        nursery.cancel_scope.cancel(reason="test over")


async def _read_to_the_end(stream: trio.SocketStream) -> bytes:
    received = b""
    while chunk := await stream.receive_some(65536):
        received += chunk
    return received


async def test_a_served_connection_echoes_and_ends_when_its_handler_returns() -> None:
    async def greet_then_return(sock: socket.socket) -> None:
        await send_all(SocketTransport(sock), b"hello")

    with trio.fail_after(5):
        async with _serving(_echo) as port:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(b"ping")
                assert await stream.receive_some(100) == b"ping"
        async with _serving(greet_then_return) as port:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                # The handler returned: the server closed the connection.
                assert await _read_to_the_end(stream) == b"hello"


async def test_cancelling_the_server_closes_its_connections_and_its_listener() -> None:
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(partial(serve_tcp, _echo))
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b"x")
            assert await stream.receive_some(10) == b"x"
            nursery.cancel_scope.cancel(reason="test over")
        async with stream:
            assert await _read_to_the_end(stream) == b""
        with pytest.raises(OSError):
            await trio.open_tcp_stream("127.0.0.1", port)


async def test_open_tcp_socket_connects_a_non_blocking_socket_without_nagle() -> None:
    with trio.fail_after(5):
        async with _serving(_echo) as port:
            sock = await open_tcp_socket("127.0.0.1", port)
            with sock:
                assert sock.getblocking() is False
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
                transport = SocketTransport(sock)
                await send_all(transport, b"over the transport")
                assert await transport.receive_some() == b"over the transport"


async def test_open_tcp_socket_raises_when_refused() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with trio.fail_after(5), pytest.raises(OSError):
        await open_tcp_socket("127.0.0.1", port)


async def test_send_all_writes_more_than_the_kernel_takes_at_once_in_order() -> None:
    data = bytes(range(256)) * (16 * 1024)  # 4 MiB: many times a socket buffer
    with trio.fail_after(20):
        async with _serving(_echo) as port:
            sock = await open_tcp_socket("127.0.0.1", port)
            transport = SocketTransport(sock)
            received = bytearray()

            async def read_it_all() -> None:
                while len(received) < len(data):
                    received.extend(await transport.receive_some())

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_it_all)
                await send_all(transport, data)
            await transport.aclose()
    assert received == data


async def test_send_all_always_checkpoints_and_writes_nothing_once_cancelled() -> None:
    ours, theirs = socket.socketpair()
    transport = SocketTransport(ours)
    with trio.testing.assert_checkpoints():
        await send_all(transport, b"small")  # the kernel takes it all at once
    with trio.CancelScope() as scope:
        scope.cancel()
        await send_all(transport, b"never")
    theirs.setblocking(False)
    assert theirs.recv(100) == b"small"
    await transport.aclose()
    with pytest.raises(SocketClosed):
        await send_all(transport, b"after the close")
    theirs.close()


async def test_starts_with_tls_tells_a_client_hello_from_http_and_leaves_the_byte(
    certificate: tls.Certificate,
) -> None:
    seen: list[tuple[bool, bytes]] = []
    all_seen = trio.Event()

    async def sniff(sock: socket.socket) -> None:
        tls_first = await starts_with_tls(sock)
        seen.append((tls_first, await SocketTransport(sock).receive_some()))
        if len(seen) == 3:
            all_seen.set()

    client_context = ssl.create_default_context(cafile=str(certificate.cert))
    with trio.fail_after(5):
        async with _serving(sniff) as port:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(b"GET / HTTP/1.1\r\n\r\n")
                await _read_to_the_end(stream)
            tls_stream = trio.SSLStream(
                await trio.open_tcp_stream("127.0.0.1", port), client_context,
                server_hostname="127.0.0.1",
            )
            with pytest.raises(trio.BrokenResourceError):  # the server never answers
                await tls_stream.do_handshake()
            await tls_stream.aclose()
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.aclose()  # gone before a byte
            await all_seen.wait()
    (http_tls, http_bytes), (hello_tls, hello_bytes), (empty_tls, empty_bytes) = seen
    assert (http_tls, http_bytes) == (False, b"GET / HTTP/1.1\r\n\r\n")  # peeked, not taken
    assert hello_tls is True and hello_bytes[:1] == b"\x16"
    assert (empty_tls, empty_bytes) == (False, b"")


async def test_accept_tls_serves_a_trusting_client_and_refuses_one_that_does_not(
    certificate: tls.Certificate,
) -> None:
    failures: list[TlsHandshakeError] = []
    refused = trio.Event()

    async def serve_tls(sock: socket.socket) -> None:
        try:
            transport = await accept_tls(sock, tls.server_context(certificate))
        except TlsHandshakeError as exc:
            failures.append(exc)
            assert sock.fileno() < 0  # closed by accept_tls
            refused.set()
            return
        while data := await transport.receive_some():
            await send_all(transport, data.upper())
        await transport.aclose()

    trusting = ssl.create_default_context(cafile=str(certificate.cert))
    with trio.fail_after(10):
        async with _serving(serve_tls) as port:
            stream = trio.SSLStream(
                await trio.open_tcp_stream("127.0.0.1", port), trusting,
                server_hostname="127.0.0.1",
            )
            async with stream:
                await stream.send_all(b"over tls")
                assert await stream.receive_some(100) == b"OVER TLS"
            untrusting = trio.SSLStream(
                await trio.open_tcp_stream("127.0.0.1", port), ssl.create_default_context(),
                server_hostname="127.0.0.1",
            )
            with pytest.raises(trio.BrokenResourceError):
                await untrusting.do_handshake()
            await untrusting.aclose()
            await refused.wait()
    assert len(failures) == 1


async def test_a_cancelled_tls_handshake_closes_the_socket(
    certificate: tls.Certificate, autojump_clock: trio.testing.MockClock
) -> None:
    ours, theirs = socket.socketpair()
    with trio.move_on_after(1):  # the peer never says a word
        await accept_tls(ours, tls.server_context(certificate))
    assert ours.fileno() < 0
    theirs.close()
