"""Opening and accepting TCP connections, and writing whole buffers, for ``net.transport``.

The transports drive a connected non-blocking stdlib socket; this module makes
them: ``open_tcp_socket`` connects one, ``serve_tcp`` accepts them and runs a
handler per connection, ``accept_tls`` does a server's TLS handshake on an
accepted one, and ``starts_with_tls`` tells, from a peeked first byte, whether a
client opens with TLS. ``send_all`` writes a whole buffer through any
``Transport``. The simulators and the load generator use these; what they say
over the bytes is their own.
"""

from __future__ import annotations

import functools
import socket
import ssl
from collections.abc import Awaitable, Callable

import trio

from voicebridge.net.transport import TlsSocketTransport, Transport

#: Pending connections the kernel queues for ``serve_tcp``: a load test opens two
#: per call at once, for hundreds of calls; the kernel caps it at ``somaxconn``.
LISTEN_BACKLOG = 4096
#: The first byte of a TLS record carrying a handshake (a ClientHello): never the
#: first byte of an HTTP request, whose method is ASCII letters.
TLS_HANDSHAKE_RECORD = 0x16

#: What ``serve_tcp`` runs for each accepted connection.
ConnectionHandler = Callable[[socket.socket], Awaitable[None]]


def _tune(sock: socket.socket) -> socket.socket:
    """Non-blocking, with Nagle off (frames are written whole, and latency matters)."""
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


async def open_tcp_socket(host: str, port: int) -> socket.socket:
    """A connected non-blocking TCP socket to ``host:port``, Nagle off.

    Names are resolved and tried as trio does (``trio.open_tcp_stream``). Raises
    ``OSError`` when refused or unreachable. Cancellation closes whatever was
    opened and connects nothing.
    """
    stream = await trio.open_tcp_stream(host, port)
    return _tune(socket.socket(fileno=stream.socket.detach()))


async def send_all(transport: Transport, data: bytes | bytearray | memoryview) -> None:
    """Write all of ``data`` through ``transport``, waiting while the kernel's buffer is full.

    Always a checkpoint, like trio's ``send_all``. Raises ``SocketClosed`` if the
    connection is lost. Cancellation before the first byte writes nothing; once
    bytes have gone, a cancellation leaves the rest unwritten and the byte stream
    torn, so a caller that keeps the connection shields the write.
    """
    await trio.lowlevel.checkpoint_if_cancelled()
    view = memoryview(data)
    sent = transport.try_send(view)
    if sent < len(view) or transport.pending:
        await transport.send_rest(view[sent:])
    else:
        await trio.lowlevel.cancel_shielded_checkpoint()


async def starts_with_tls(sock: socket.socket) -> bool:
    """Whether the client's first byte opens a TLS handshake; False if it closed first.

    The byte is peeked, not read: it stays for the transport that serves the
    connection. Waits for it without bound: the caller bounds the wait.
    """
    while True:
        try:
            first = sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)
            continue
        except OSError:  # reset before a byte came
            return False
        return first == bytes((TLS_HANDSHAKE_RECORD,))


async def accept_tls(sock: socket.socket, context: ssl.SSLContext) -> TlsSocketTransport:
    """The server's end of TLS on an accepted ``sock``, its handshake done.

    Raises ``TlsHandshakeError`` (the socket is then closed). The caller bounds the
    handshake; cancellation closes the socket.
    """
    transport = TlsSocketTransport(sock, context, server_side=True)
    try:
        await transport.handshake()
    except BaseException:
        with trio.CancelScope(shield=True):
            await transport.aclose()
        raise
    return transport


async def serve_tcp(
    handler: ConnectionHandler,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    backlog: int = LISTEN_BACKLOG,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on ``host:port`` and run ``handler(sock)`` for every connection, each in its own task.

    ``task_status.started(bound_port)`` once listening. Accepting is trio's
    (``trio.serve_listeners``: it pauses while the process is out of descriptors);
    the handler gets the connection as a non-blocking stdlib socket with Nagle
    off, for a transport to drive, and it is closed when the handler returns. An
    exception escaping a handler ends the server (the handler decides what ends
    only its connection). Cancellation closes the listener and every connection.
    """
    listeners = await trio.open_tcp_listeners(port, host=host, backlog=backlog)
    bound_port = int(listeners[0].socket.getsockname()[1])
    async with trio.open_nursery() as connection_nursery:
        task_status.started(bound_port)
        await trio.serve_listeners(
            functools.partial(_run_handler, handler), listeners, handler_nursery=connection_nursery
        )


async def _run_handler(handler: ConnectionHandler, stream: trio.SocketStream) -> None:
    # The stream's socket, handed over: trio then closes an empty shell.
    sock = _tune(socket.socket(fileno=stream.socket.detach()))
    try:
        await handler(sock)
    finally:
        if sock.fileno() >= 0:
            trio.lowlevel.notify_closing(sock)
            sock.close()
