"""The front door: accepts the public port's connections, holds them to the ``[edge]``
limits, and decides from each connection's first request head who serves it.

Twilio's media stream and the webhooks share one port (one public URL). Every
other request (the webhooks, call control) is served by hypercorn and the quart
app. The media stream is not: each call's socket carries a message every few
milliseconds each way, and under hypercorn every one of them crossed its
connection-reader task, a queue and a send lock, each a wait for trio's scheduler
(docs/performance.md). So the front door accepts the connections itself, reads the
first request head, and

- a ``GET`` of the media stream path goes to ``media`` with the raw socket
  (``voicebridge.net.ws``: the call's own task reads it);
- a whole pre-read request (below) that ``early`` (the app's own decision, for what
  it can settle without hypercorn) answers is answered and closed here: two or three
  turns of the event loop instead of the seventeen or so of hypercorn and the app,
  each as long as the loop is behind (the voice webhook's overflow under load,
  ``voicebridge.web.early_overflow``);
- anything else goes to hypercorn's per-connection server with the bytes already
  read put back in front of the stream, so hypercorn sees the connection whole.

What no client may do here (``[edge]``, docs/operations.md "Resource caps"):

- hold more than ``max_connections`` connections in all, or
  ``max_connections_per_peer`` from one address (``exempt_peers`` aside). At the
  total cap a newcomer displaces the connection idle the longest between two
  requests, else the one that has been sending its request longest (a genuine
  webhook sends its whole request in milliseconds, a slow client does not); with
  neither, and at the per-address cap, the newcomer gets a minimal 503 and is
  closed. Nothing waits for a slot; no request the app is working on is cut.
- take longer than ``head_deadline_s`` over a request head, or ``body_deadline_s``
  over a body: totals, not per read (hypercorn's ``read_timeout`` is per read). The
  requests hypercorn reads are followed here with h11, the parser hypercorn itself
  uses, so both agree on where every head and body ends. The first
  ``PREREAD_BYTES`` of a body are read here, before hypercorn: a client still
  sending a webhook-sized request costs no request handling.
- speak HTTP/2: the prior-knowledge preface (``PRI * HTTP/2.0``) and ``Upgrade: h2c``
  end the connection before hypercorn, which would honour both, sees them. Twilio
  never uses HTTP/2, and one HTTP/2 connection multiplexes work onto this event loop
  that no connection cap sees.

Accept errors for lack of descriptors or memory back off exponentially and are
logged once, then as rate-limited "N more" lines.

Process life stays hypercorn's: the app's lifespan, the graceful timeout after the
shutdown trigger (connections still open get that long, then are cancelled), and
idle keep-alive connections closed at shutdown. hypercorn is pinned
(constraints.txt): its per-connection ``TCPServer``, ``Lifespan``, ``WorkerContext``
and ``ConnectionState`` are used here, and only here, as
``hypercorn.trio.run.worker_serve`` uses them. What is assumed of them, each tested in
tests/net/test_front.py:

- the lifespan startup completes before the first connection is accepted, and the
  connection state is copied after it (what startup stores reaches requests);
- ``TCPServer`` takes the addresses from the stream's ``.socket`` and serves plain
  HTTP on a stream without ``do_handshake``;
- cancelling ``TCPServer.run`` ends the connection and its app task (the graceful
  timeout, the deadlines and displacement all do that), and setting
  ``WorkerContext.terminated`` closes idle kept-alive connections at once;
- ``TCPServer.protocol_send`` is given ``Updated(idle=True)`` when a connection
  waits for its next request;
- hypercorn parses requests with h11 and ``h11_max_incomplete_size``, as
  ``_Framing`` does, and serves HTTP/2 to the preface or an ``Upgrade: h2c``
  unless stopped before it;
- hypercorn serializes its ``send_all`` calls but not its ``send_eof`` (``_Guarded``
  orders the two).
"""

from __future__ import annotations

import contextlib
import enum
import errno
import ipaddress
import logging
import math
import resource
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import assert_never

import attrs
import h11
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.events import Event, Updated
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.statsd import StatsdLogger
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ASGIFramework, ConnectionState
from hypercorn.utils import wrap_app

from voicebridge.config import EdgeConfig
from voicebridge.net.transport import SocketTransport
from voicebridge.observability.logs import log_event

log = logging.getLogger(__name__)

#: The longest request head read before routing. hypercorn's own limit for an
#: incomplete request is 16 KiB (h11_max_incomplete_size); longer heads go to it
#: unrouted, and it answers them.
MAX_HEAD_BYTES = 16 * 1024
#: The most of a request body the front door reads before handing the connection to
#: hypercorn, for a request that declares a body this small. A Twilio webhook (a few
#: hundred bytes to a few KiB of form fields) is whole in it, so a client still sending
#: costs no hypercorn or app work; a larger or chunked body goes to hypercorn at once,
#: which reads it as it comes, under the same body deadline.
PREREAD_BYTES = 16 * 1024
#: Accepting failed for lack of descriptors or memory: pause this long first, doubling
#: at each failure in a row up to ``ACCEPT_BACKOFF_MAX_S``, so a full table neither
#: turns the accept loop into a busy loop nor leaves it asleep long once it clears.
ACCEPT_BACKOFF_MIN_S = 0.01
ACCEPT_BACKOFF_MAX_S = 1.0
_ACCEPT_RESOURCE_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
#: A repeated kind of log line (refusals, deadlines, accept errors): the first is
#: logged, then at most one "N more" line per gap, the gap doubling while it goes on
#: up to the bound; a flood from outside costs the journal a line a minute.
LOG_FIRST_GAP_S = 1.0
LOG_MAX_GAP_S = 60.0
#: What a connection refused at a cap is sent (one non-blocking send, then closed):
#: enough for a person with curl to see why, too little to be worth a second syscall.
REFUSAL = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
#: A request still arriving after this long counts against its address's
#: ``max_incomplete_per_peer``: Twilio's arrive whole within milliseconds, even in a
#: burst; a dribbling client's never do.
INCOMPLETE_GRACE_S = 0.5
#: How often the connections of addresses over ``max_incomplete_per_peer`` are shed.
INCOMPLETE_SWEEP_S = 0.25
#: At most this many connections are shed per pass of the scheduler.
SHED_PER_PASS = 32
#: How long the end of a connection's answer (``send_eof``) may wait, shielded, for the
#: write before it: a live client takes both in microseconds.
SEND_EOF_GRACE_S = 1.0
#: Descriptors a process needs besides the connections and the assistant legs: the
#: listeners, journald and notify sockets, trio's wakeup pipe and epoll, the REST and
#: assistant API connection pools, files of the shared directory being written.
DESCRIPTOR_RESERVE = 256

#: The ``content-type`` of an early answer when none is given.
EARLY_CONTENT_TYPE = "text/plain; charset=utf-8"


@attrs.frozen
class EarlyRequest:
    """A whole request the front door read itself, offered to ``EarlyAnswer``."""

    method: bytes
    #: As sent: the path and any query (``?…``), not decoded.
    target: bytes
    #: As h11 gives them: names lower-cased, in order, repeats kept.
    headers: Sequence[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> str | None:
        """The first value of the header ``name`` (lower-case), as latin-1 text."""
        for key, value in self.headers:
            if key == name:
                return value.decode("latin-1")
        return None


@attrs.frozen
class EarlyResponse:
    """A complete answer to an ``EarlyRequest``; the connection closes after it."""

    status: int
    body: bytes
    content_type: str = EARLY_CONTENT_TYPE

    def http(self) -> bytes:
        reason = _REASONS.get(self.status, b"")
        return (
            b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n"
            % (self.status, reason, self.content_type.encode("latin-1"), len(self.body))
        ) + self.body


_REASONS = {200: b"OK", 204: b"No Content", 403: b"Forbidden", 503: b"Service Unavailable"}

#: Answers a whole pre-read request ahead of hypercorn, or None: hypercorn and the app
#: serve it as any other. Synchronous (no turn of the event loop) and cheap: it runs for
#: every pre-read request. Whatever it answers, the app must answer the same.
EarlyAnswer = Callable[[EarlyRequest], EarlyResponse | None]

#: Serves one media connection: the socket and the request head (with anything the
#: client sent after it). It owns the socket and closes it.
MediaHandler = Callable[[SocketTransport, bytes], Awaitable[None]]


def descriptors_needed(edge: EdgeConfig, max_concurrent_calls: int) -> int:
    """File descriptors a process needs at its limits: one per connection, one per
    call's assistant leg (a call also holds a connection, so there are no more calls
    than connections), and ``DESCRIPTOR_RESERVE``."""
    calls = min(max_concurrent_calls, edge.max_connections)
    return edge.max_connections + calls + DESCRIPTOR_RESERVE


def ensure_descriptor_limit(needed: int) -> int:
    """Raise this process's soft ``RLIMIT_NOFILE`` to ``needed`` if it is lower and the
    hard limit allows; log a warning if it stays below. Returns the soft limit.

    Under the units, ``LimitNOFILE=`` sets both limits well above ``needed`` (and the
    system call filter refuses ``setrlimit``); elsewhere the soft limit is often 1024.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError):
            pass
    if soft != resource.RLIM_INFINITY and soft < needed:
        log_event(
            log,
            logging.WARNING,
            "descriptor-limit-low",
            f"the file descriptor limit ({soft}) is below what [edge] max_connections and "
            f"server.max_concurrent_calls need ({needed}): raise LimitNOFILE or lower them",
            limit=soft,
            needed=needed,
        )
    return int(soft)


def is_media_request(head: bytes, media_path: str) -> bool:
    """Whether ``head`` starts a ``GET`` of ``media_path`` (with or without a query)."""
    line_end = head.find(b"\r\n")
    if line_end < 0:
        return False
    parts = head[:line_end].split(b" ")
    if len(parts) != 3 or parts[0] != b"GET":
        return False
    target = parts[1].split(b"?", 1)[0]
    return target == media_path.encode("ascii")


@attrs.define
class FrontCounters:
    """What the front door has done since it started (for metrics and tests)."""

    #: Connections admitted (served, until they end).
    accepted: int = 0
    #: Connections open now.
    open: int = 0
    #: Refused: that address already held ``max_connections_per_peer``.
    refused_peer_cap: int = 0
    #: Refused: ``max_connections`` open and none of them idle or still sending a request.
    refused_total_cap: int = 0
    #: Closed to make room for a newcomer at ``max_connections``.
    shed: int = 0
    #: Closed: a request head not whole within ``head_deadline_s``.
    head_deadline: int = 0
    #: Closed: a request body not whole within ``body_deadline_s``.
    body_deadline: int = 0
    #: Closed: the HTTP/2 preface or an ``Upgrade: h2c``.
    http2_refused: int = 0
    #: ``accept()`` failed for lack of descriptors or memory.
    accept_errors: int = 0


async def serve_front(
    app: ASGIFramework,
    config: HypercornConfig,
    listeners: Sequence[socket.socket],
    *,
    media_path: str,
    media: MediaHandler,
    shutdown_trigger: Callable[[], Awaitable[None]],
    limits: Callable[[], EdgeConfig] = EdgeConfig,
    counters: FrontCounters | None = None,
    preread_paths: frozenset[str] = frozenset(),
    early: EarlyAnswer | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``listeners`` (listening sockets, owned and closed here) until shut down.

    A request to one of ``preread_paths`` (routes whose bodies are small and judged
    whole, as Twilio's signed webhooks) that declares a body of at most
    ``PREREAD_BYTES`` has it read by the front door before the app sees the request.
    Once it is whole (and nothing more came after it on the connection), ``early`` is
    asked: its answer is sent and the connection closed, without hypercorn.

    ``limits`` is called at each new connection and request for the ``[edge]``
    limits in force (a reload changes them for what comes next); ``counters``, if
    given, is kept up to date. Starts accepting once the app's lifespan startup is
    done. Returns once ``shutdown_trigger`` has returned and every connection has
    ended (or been cancelled ``config.graceful_timeout`` later), then the lifespan
    shutdown ran. Cancelled, it closes the listeners and every connection at once.
    """

    def start_accepting(
        host: HypercornHost, accept_nursery: trio.Nursery, connection_nursery: trio.Nursery
    ) -> None:
        front = _Front(
            host.app,
            config,
            host.context,
            host.state,
            media_path,
            media,
            limits,
            counters if counters is not None else FrontCounters(),
            preread_paths,
            early,
        )
        for listener in listeners:
            accept_nursery.start_soon(front.accept_loop, listener, connection_nursery)
        accept_nursery.start_soon(front.shed_dribblers)

    await serve_hypercorn(
        app,
        config,
        listeners,
        start_accepting=start_accepting,
        shutdown_trigger=shutdown_trigger,
        task_status=task_status,
    )


@attrs.frozen
class HypercornHost:
    """What hypercorn's per-connection server needs, once the app's lifespan started."""

    #: The app as hypercorn wraps it.
    app: object
    context: WorkerContext
    #: Copied from the lifespan state after startup, as ``worker_serve`` does: what the
    #: app's startup put there reaches every request (a shallow copy each).
    state: ConnectionState


#: Starts a server's accept loops in the first nursery; they serve each connection as
#: a task of the second, which shutdown cancels ``graceful_timeout`` after its trigger.
StartAccepting = Callable[[HypercornHost, trio.Nursery, trio.Nursery], None]


async def serve_hypercorn(
    app: ASGIFramework,
    config: HypercornConfig,
    listeners: Sequence[socket.socket],
    *,
    start_accepting: StartAccepting,
    shutdown_trigger: Callable[[], Awaitable[None]],
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``app``'s lifespan around accept loops that ``start_accepting`` starts, as
    ``hypercorn.trio.worker_serve`` does around its own (the front door and the ops
    listener accept for themselves). ``listeners`` are owned and closed here.

    Started (``task_status``) once the lifespan startup is done and the accept loops
    run. Returns once ``shutdown_trigger`` has returned and every connection has ended
    (or been cancelled ``config.graceful_timeout`` later), then the lifespan shutdown
    ran. Cancelled, it closes the listeners and every connection at once.
    """
    config.set_statsd_logger_class(StatsdLogger)
    wrapped = wrap_app(app, config.wsgi_max_body_size, "asgi")
    lifespan_state: dict[str, object] = {}
    lifespan = Lifespan(wrapped, config, lifespan_state)
    context = WorkerContext(None)
    try:
        async with trio.open_nursery() as lifespan_nursery:
            await lifespan_nursery.start(lifespan.handle_lifespan)
            await lifespan.wait_for_startup()
            host = HypercornHost(wrapped, context, ConnectionState(lifespan_state.copy()))
            async with trio.open_nursery() as connection_nursery:
                try:
                    async with trio.open_nursery() as accept_nursery:
                        start_accepting(host, accept_nursery, connection_nursery)
                        task_status.started()
                        await shutdown_trigger()
                        accept_nursery.cancel_scope.cancel(reason="shutting down")
                finally:
                    close_listeners(listeners)
                    await context.terminated.set()
                    connection_nursery.cancel_scope.deadline = (
                        trio.current_time() + config.graceful_timeout
                    )
            await lifespan.wait_for_shutdown()
            lifespan_nursery.cancel_scope.cancel(reason="shut down")
    finally:
        close_listeners(listeners)


def close_listeners(listeners: Sequence[socket.socket]) -> None:
    """Close the listening sockets still open (waking whoever waits on them)."""
    for listener in listeners:
        if listener.fileno() >= 0:
            trio.lowlevel.notify_closing(listener)
            listener.close()


class Phase(enum.Enum):
    """Where a connection is in its current request, as the front door sees it."""

    #: Sending a request head (or, fresh, its first one). Sheddable, head deadline.
    HEAD = "head"
    #: Sending a request body. Sheddable, body deadline.
    BODY = "body"
    #: Its request is whole: the app's turn, or a call. No deadline here.
    SERVED = "served"
    #: Kept alive between requests: its last answer sent, not one byte of the next
    #: request yet. Sheddable before any other; hypercorn's keep-alive timeout closes it.
    IDLE = "idle"


class _Ended(enum.Enum):
    """Why the front door ended a connection itself."""

    SHED = "shed"
    HTTP2 = "http2"


class _Slot:
    """One admitted connection's place in the front door's books."""

    __slots__ = ("ended", "peer", "peer_counted", "phase", "scope", "sending_since")

    def __init__(self, peer: str, peer_counted: bool, deadline: float) -> None:
        self.peer = peer
        #: When its current request began arriving (meaningful while it is sending).
        self.sending_since = 0.0
        #: Counted against the per-address cap (not an exempt peer).
        self.peer_counted = peer_counted
        self.phase = Phase.HEAD
        #: Everything the connection does runs in it: its deadline is the current
        #: phase's, and cancelling it ends the connection.
        self.scope = trio.CancelScope(deadline=deadline)
        # Invariant: once set, never changes, and the scope is cancelled.
        self.ended: _Ended | None = None


class _Throttle:
    """Decides which occurrences of one kind of log line are written.

    The first is; after that, one per gap, carrying the count of those skipped, the
    gap doubling from ``LOG_FIRST_GAP_S`` up to ``LOG_MAX_GAP_S``. After a quiet
    ``LOG_MAX_GAP_S`` the next occurrence is a first again.
    """

    def __init__(self) -> None:
        self._next_at = -math.inf
        self._gap_s = LOG_FIRST_GAP_S
        self._last_at = -math.inf
        self._skipped = 0

    def occurred(self, now: float) -> int | None:
        """None: skip this one; else write it, with this many skipped since the last."""
        if now - self._last_at >= LOG_MAX_GAP_S:
            self._gap_s = LOG_FIRST_GAP_S
        self._last_at = now
        if now < self._next_at:
            self._skipped += 1
            return None
        skipped, self._skipped = self._skipped, 0
        self._next_at = now + self._gap_s
        self._gap_s = min(self._gap_s * 2, LOG_MAX_GAP_S)
        return skipped


class _Step(enum.Enum):
    """What the bytes just received did to the request being read."""

    HEAD_STARTED = "head-started"
    HEAD_ENDED = "head-ended"
    BODY_ENDED = "body-ended"
    #: An HTTP/2 preface or an ``Upgrade: h2c``: the connection must end before
    #: hypercorn sees it.
    HTTP2 = "http2"


class _Framing:
    """Follows the requests on one connection as hypercorn's h11 will read them.

    Sans-I/O: fed every byte hypercorn is handed, in order, it says where each
    request head and body begins and ends. It uses h11 as hypercorn does (same
    version, same incomplete-event limit), and pretends to answer each request so
    that h11 moves on to the next, so pipelined and kept-alive requests are followed
    too. Once h11 finds the stream malformed (hypercorn answers it 400 and closes) or
    the connection can carry no further request, it stops.
    """

    def __init__(self, max_incomplete_size: int) -> None:
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=max_incomplete_size)
        # Invariant: True only between requests with not one byte of the next seen.
        # A connection starts inside its first head (the front door read it).
        self._between = False
        self._stopped = False
        # The Content-Length of the request whose head ended last; None when it has
        # none (chunked, or no body).
        self.declared_length: int | None = None
        # That request's head (None before the first ends).
        self.request: h11.Request | None = None
        # The path (query cut off) of that request.
        self.target = b""

    @property
    def between(self) -> bool:
        """Between requests, with not one byte of the next one received."""
        return self._between

    def receive(self, data: bytes) -> list[_Step]:
        """The steps ``data`` (``b""``: the end of the stream) took, in order."""
        if self._stopped:
            return []
        steps: list[_Step] = []
        if data and self._between:
            self._between = False
            steps.append(_Step.HEAD_STARTED)
        self._h11.receive_data(data)
        while not self._stopped:
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError:
                self._stopped = True
                break
            if event is h11.NEED_DATA:
                break
            if isinstance(event, h11.Request):
                if _is_http2(event):
                    self._stopped = True
                    steps.append(_Step.HTTP2)
                    break
                self.declared_length = _content_length(event)
                self.request = event
                self.target = event.target.split(b"?", 1)[0]
                steps.append(_Step.HEAD_ENDED)
            elif isinstance(event, h11.EndOfMessage):
                steps.append(_Step.BODY_ENDED)
                self._next_cycle()
                if not self._stopped and self._h11.trailing_data[0]:
                    steps.append(_Step.HEAD_STARTED)
                elif not self._stopped:
                    self._between = True
            elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                self._stopped = True
            # h11.Data: more of the body; its end comes as EndOfMessage.
        return steps

    def _next_cycle(self) -> None:
        # Any status but 101 (and 2xx to CONNECT) keeps h11 on HTTP/1.1, as hypercorn
        # stays on it for everything but h2c, which never gets this far.
        self._h11.send(h11.Response(status_code=404, headers=[(b"content-length", b"0")]))
        self._h11.send(h11.EndOfMessage())
        try:
            self._h11.start_next_cycle()
        except h11.LocalProtocolError:
            # "Connection: close", or HTTP/1.0: hypercorn closes after its answer.
            self._stopped = True


def _is_http2(request: h11.Request) -> bool:
    """The prior-knowledge preface's request line, or an upgrade that names h2c.

    Broader than hypercorn's own test (the last Upgrade header, exactly ``h2c``, no
    body), so that nothing hypercorn would take for HTTP/2 gets past.
    """
    if request.method == b"PRI" or request.http_version not in (b"1.0", b"1.1"):
        return True
    return any(
        name == b"upgrade" and b"h2c" in (t.strip() for t in value.lower().split(b","))
        for name, value in request.headers
    )


def _peer_of(address: object) -> str:
    """The address a connection came from, for the per-address cap ("" if none)."""
    if not isinstance(address, tuple) or not address or not isinstance(address[0], str):
        return ""  # AF_UNIX (tests)
    try:
        ip = ipaddress.ip_address(address[0].partition("%")[0])
    except ValueError:
        return address[0]
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


class _Front:
    def __init__(
        self,
        app: object,
        config: HypercornConfig,
        context: WorkerContext,
        state: ConnectionState,
        media_path: str,
        media: MediaHandler,
        limits: Callable[[], EdgeConfig],
        counters: FrontCounters,
        preread_paths: frozenset[str] = frozenset(),
        early: EarlyAnswer | None = None,
    ) -> None:
        self._app = app
        self._early = early
        self._preread_paths = frozenset(path.encode("ascii") for path in preread_paths)
        self._config = config
        self._context = context
        self._state = state
        self._media_path = media_path
        self._media = media
        self._limits = limits
        self.counters = counters
        self._per_peer: dict[str, int] = {}
        # Invariant: exactly the open slots in Phase.HEAD or Phase.BODY that have not
        # been ended, in the order they entered that phase (oldest first).
        self._sending: dict[_Slot, None] = {}
        # Invariant: the same for Phase.IDLE.
        self._idle: dict[_Slot, None] = {}
        # Invariant: for each counted peer, its slots in _sending, oldest first.
        self._incomplete: dict[str, dict[_Slot, None]] = {}
        # Invariant: the slots ended by shedding whose connection has not closed yet.
        self._shedding = 0
        self._exempt_key: tuple[str, ...] = ()
        self._exempt: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
        self._throttles: dict[str, _Throttle] = {}

    # -- accepting ---------------------------------------------------------------------

    async def accept_loop(self, listener: socket.socket, nursery: trio.Nursery) -> None:
        """Accept from ``listener`` until cancelled; serve each admitted connection in
        ``nursery``. Raises the ``OSError`` of an accept failure that is not for lack
        of resources."""
        listener.setblocking(False)
        backoff_s = ACCEPT_BACKOFF_MIN_S
        while True:
            try:
                conn, address = listener.accept()
            except BlockingIOError:
                # Nothing waiting (or a sibling process on the same socket took it).
                await trio.lowlevel.wait_readable(listener)
                continue
            except OSError as exc:
                if exc.errno not in _ACCEPT_RESOURCE_ERRORS:
                    raise
                self.counters.accept_errors += 1
                self._log(
                    "accept-failed",
                    logging.ERROR,
                    f"cannot accept a connection ({exc.strerror}); backing off",
                    "more accept failures",
                )
                await trio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, ACCEPT_BACKOFF_MAX_S)
                continue
            backoff_s = ACCEPT_BACKOFF_MIN_S
            slot = self._admit(conn, _peer_of(address))
            if slot is not None:
                nursery.start_soon(self._connection, conn, slot)
            await trio.lowlevel.checkpoint()

    def _admit(self, conn: socket.socket, peer: str) -> _Slot | None:
        """A slot for the new connection, or None: refused (and closed)."""
        limits = self._limits()
        # A local (Unix) socket has no address to cap.
        counted = bool(peer) and not self._is_exempt(peer, limits.exempt_peers)
        if counted and self._per_peer.get(peer, 0) >= limits.max_connections_per_peer:
            self.counters.refused_peer_cap += 1
            self._log(
                "connection-refused-peer",
                logging.WARNING,
                f"refused a connection from {peer or 'a local socket'}: it holds "
                f"{limits.max_connections_per_peer} already ([edge] max_connections_per_peer)",
                "more connections refused at the per-address cap",
                peer=peer,
            )
            _refuse(conn)
            return None
        if counted and self._dribbling(peer) >= limits.max_incomplete_per_peer:
            self.counters.refused_peer_cap += 1
            self._log(
                "connection-refused-incomplete",
                logging.WARNING,
                f"refused a connection from {peer}: it has "
                f"{limits.max_incomplete_per_peer} requests still arriving after "
                f"{INCOMPLETE_GRACE_S:g} s ([edge] max_incomplete_per_peer)",
                "more connections refused for requests still arriving from their address",
                peer=peer,
            )
            _refuse(conn)
            return None
        if self.counters.open - self._shedding >= limits.max_connections:
            if not self._idle and not self._sending:
                self.counters.refused_total_cap += 1
                self._log(
                    "connection-refused-total",
                    logging.WARNING,
                    f"refused a connection from {peer or 'a local socket'}: "
                    f"{limits.max_connections} open and none idle or still sending its "
                    "request ([edge] max_connections)",
                    "more connections refused at the total cap",
                    peer=peer,
                )
                _refuse(conn)
                return None
            self._shed_oldest(limits)
        slot = _Slot(peer, counted, trio.current_time() + limits.head_deadline_s)
        self.counters.accepted += 1
        self.counters.open += 1
        if counted:
            self._per_peer[peer] = self._per_peer.get(peer, 0) + 1
        self._start_sending(slot)
        return slot

    def _start_sending(self, slot: _Slot) -> None:
        if slot not in self._sending:
            self._sending[slot] = None
            slot.sending_since = trio.current_time()
            if slot.peer_counted:
                self._incomplete.setdefault(slot.peer, {})[slot] = None

    def _stop_sending(self, slot: _Slot) -> None:
        if slot not in self._sending:
            return
        del self._sending[slot]
        if slot.peer_counted:
            mine = self._incomplete[slot.peer]
            del mine[slot]
            if not mine:
                del self._incomplete[slot.peer]

    def _dribbling(self, peer: str) -> int:
        """How many of ``peer``'s requests have been arriving for ``INCOMPLETE_GRACE_S``
        or more (a genuine one is whole within milliseconds, a burst of them too)."""
        since = trio.current_time() - INCOMPLETE_GRACE_S
        count = 0
        for slot in self._incomplete.get(peer, ()):
            if slot.sending_since > since:
                break  # oldest first: the rest are younger still
            count += 1
        return count

    async def shed_dribblers(self) -> None:
        """Every ``INCOMPLETE_SWEEP_S``, close the oldest requests of any address that
        has more than ``max_incomplete_per_peer`` arriving for ``INCOMPLETE_GRACE_S`` or
        more. Connections admitted in a burst are young and let in; if they dribble, they
        are closed here before they cost a wake-up each for long."""
        while True:
            await trio.sleep(INCOMPLETE_SWEEP_S)
            limits = self._limits()
            since = trio.current_time() - INCOMPLETE_GRACE_S
            shed = 0
            for peer in list(self._incomplete):
                old = [s for s in self._incomplete.get(peer, ()) if s.sending_since <= since]
                for slot in old[: max(0, len(old) - limits.max_incomplete_per_peer)]:
                    if slot.ended is not None:
                        continue
                    shed += 1
                    if shed % SHED_PER_PASS == 0:
                        # Each closed connection's task wakes to close: a few dozen per
                        # scheduler pass, not a thousand in one.
                        await trio.lowlevel.checkpoint()
                    self._end(slot, _Ended.SHED)
                    self._shedding += 1
                    self.counters.shed += 1
                    self._log(
                        "connection-shed-incomplete",
                        logging.WARNING,
                        f"closed a connection from {peer} still sending its request "
                        f"({slot.phase.value}): it has more than "
                        f"{limits.max_incomplete_per_peer} arriving for "
                        f"{INCOMPLETE_GRACE_S:g} s ([edge] max_incomplete_per_peer)",
                        "more connections closed for requests still arriving",
                        peer=peer,
                    )

    def _shed_oldest(self, limits: EdgeConfig) -> None:
        """End the connection idle the longest, else the one sending its request the
        longest: neither has a request the app is working on."""
        slot = next(iter(self._idle or self._sending))
        what = (
            "idle between requests"
            if slot.phase is Phase.IDLE
            else f"still sending its request ({slot.phase.value})"
        )
        self._end(slot, _Ended.SHED)
        self._shedding += 1
        self.counters.shed += 1
        self._log(
            "connection-shed",
            logging.WARNING,
            f"closed a connection from {slot.peer or 'a local socket'} {what} to make "
            f"room: {limits.max_connections} open ([edge] max_connections)",
            "more connections closed to make room at the total cap",
            peer=slot.peer,
        )

    def _is_exempt(self, peer: str, exempt_peers: tuple[str, ...]) -> bool:
        if not exempt_peers:
            return False
        if exempt_peers != self._exempt_key:
            self._exempt = tuple(ipaddress.ip_network(net) for net in exempt_peers)
            self._exempt_key = exempt_peers
        ip = ipaddress.ip_address(peer)
        return any(ip in net for net in self._exempt)

    # -- phases ------------------------------------------------------------------------

    def enter(self, slot: _Slot, phase: Phase) -> None:
        """Move ``slot`` to ``phase``, with that phase's deadline from now."""
        if slot.ended is not None:
            return
        limits = self._limits()
        slot.phase = phase
        match phase:
            case Phase.HEAD:
                slot.scope.deadline = trio.current_time() + limits.head_deadline_s
                self._idle.pop(slot, None)
                self._start_sending(slot)
            case Phase.BODY:
                slot.scope.deadline = trio.current_time() + limits.body_deadline_s
                self._idle.pop(slot, None)
                self._start_sending(slot)
            case Phase.SERVED:
                slot.scope.deadline = math.inf
                self._idle.pop(slot, None)
                self._stop_sending(slot)
            case Phase.IDLE:
                slot.scope.deadline = math.inf
                self._stop_sending(slot)
                self._idle.setdefault(slot)
            case _:
                assert_never(phase)

    def _end(self, slot: _Slot, why: _Ended) -> None:
        if slot.ended is None:
            slot.ended = why
            self._stop_sending(slot)
            self._idle.pop(slot, None)
            slot.scope.cancel(reason=f"the front door ended it: {why.value}")

    def refuse_http2(self, slot: _Slot) -> None:
        self._end(slot, _Ended.HTTP2)
        self.counters.http2_refused += 1
        self._log(
            "http2-refused",
            logging.WARNING,
            f"closed a connection from {slot.peer or 'a local socket'}: HTTP/2 is not served here",
            "more HTTP/2 connections closed",
            peer=slot.peer,
        )

    def follow(self, slot: _Slot, steps: list[_Step]) -> bool:
        """Apply what ``_Framing`` saw to ``slot``; False: HTTP/2, the connection ends."""
        for step in steps:
            match step:
                case _Step.HEAD_STARTED:
                    self.enter(slot, Phase.HEAD)
                case _Step.HEAD_ENDED:
                    self.enter(slot, Phase.BODY)
                case _Step.BODY_ENDED:
                    self.enter(slot, Phase.SERVED)
                case _Step.HTTP2:
                    self.refuse_http2(slot)
                    return False
                case _:
                    assert_never(step)
        return True

    # -- one connection ----------------------------------------------------------------

    async def _connection(self, conn: socket.socket, slot: _Slot) -> None:
        """Serve one connection. A bug here ends this connection only, with one log line."""
        try:
            with slot.scope:
                await self._serve(conn, slot)
            if slot.scope.cancelled_caught and slot.ended is None:
                self._missed_deadline(slot)
        except Exception:
            log.error("a connection failed with a bug; closed it", exc_info=True)
        finally:
            if conn.fileno() >= 0:
                conn.close()
            self._release(slot)

    def _missed_deadline(self, slot: _Slot) -> None:
        limits = self._limits()
        match slot.phase:
            case Phase.HEAD:
                self.counters.head_deadline += 1
                what, seconds = "request head", limits.head_deadline_s
            case Phase.BODY:
                self.counters.body_deadline += 1
                what, seconds = "request body", limits.body_deadline_s
            case Phase.SERVED | Phase.IDLE:
                return  # no deadline in these phases: cancelled from outside
            case _:
                assert_never(slot.phase)
        self._log(
            f"{slot.phase.value}-deadline",
            logging.WARNING,
            f"closed a connection from {slot.peer or 'a local socket'}: its {what} was not "
            f"whole within {seconds:g} s ([edge] {slot.phase.value}_deadline_s)",
            f"more connections closed at the {slot.phase.value} deadline",
            peer=slot.peer,
        )

    def _release(self, slot: _Slot) -> None:
        self.counters.open -= 1
        self._stop_sending(slot)
        self._idle.pop(slot, None)
        if slot.ended is _Ended.SHED:
            self._shedding -= 1
        if slot.peer_counted:
            left = self._per_peer[slot.peer] - 1
            if left:
                self._per_peer[slot.peer] = left
            else:
                del self._per_peer[slot.peer]

    async def _serve(self, conn: socket.socket, slot: _Slot) -> None:
        conn.setblocking(False)
        head = await _read_head(conn)
        if head is None:
            return
        if is_media_request(head, self._media_path):
            self.enter(slot, Phase.SERVED)
            await self._media(SocketTransport(conn), head)
            return
        framing = _Framing(self._config.h11_max_incomplete_size)
        if not self.follow(slot, framing.receive(head)):
            return
        # A small declared body of a route that judges its body whole (Twilio's signed
        # webhooks) is read here, where a slow client costs a task and a buffer, not
        # hypercorn's and the app's per-request work. Any other goes to the app at once:
        # a route may refuse it from its headers (a header credential, a declared length
        # over its limit) without a byte of it.
        received = bytearray(head)
        declared = framing.declared_length
        preread = (
            declared is not None
            and declared <= PREREAD_BYTES
            and framing.target in self._preread_paths
        )
        while preread and slot.phase is Phase.BODY and len(received) < PREREAD_BYTES:
            chunk = await _receive(conn, PREREAD_BYTES - len(received))
            if chunk is None:
                return
            if not chunk:
                break  # hypercorn reads the end too
            received += chunk
            if not self.follow(slot, framing.receive(chunk)):
                return
        if (
            preread
            and self._early is not None
            and await self._answer_early(conn, slot, framing, head, bytes(received))
        ):
            return
        stream = _Guarded(
            trio.SocketStream(trio.socket.from_stdlib_socket(conn)),
            bytes(received),
            self,
            slot,
            framing,
        )
        server = _Served(self._app, self._config, self._context, self._state, stream)  # type: ignore[arg-type]
        server.watch(self, slot, framing)
        await server.run()

    async def _answer_early(
        self, conn: socket.socket, slot: _Slot, framing: _Framing, head: bytes, received: bytes
    ) -> bool:
        """Offer the whole request ``received`` to ``early``; True: answered, closed.

        Only a request that is exactly what the connection carried (its body whole,
        nothing pipelined after it) is offered, so that closing after the answer drops
        nothing the client sent. Sent without waiting for a turn when the socket takes
        it at once (a short answer always does), so the connection costs no turn of the
        loop after its request arrived. Skipping the scheduler here is per connection
        but bounded: one request of at most ``PREREAD_BYTES``, one synchronous decision,
        and each connection is a task of its own that the accept loop (which
        checkpoints at every accept) started. Cancelled (the connection's scope), the
        connection ends unanswered.
        """
        assert self._early is not None
        request = framing.request
        head_end = head.find(b"\r\n\r\n") + 4
        if (
            request is None
            or slot.phase is not Phase.SERVED
            or head_end < 4
            or framing.declared_length is None
            or len(received) != head_end + framing.declared_length
        ):
            return False
        response = self._early(
            EarlyRequest(
                method=request.method,
                target=request.target,
                headers=list(request.headers),
                body=received[head_end:],
            )
        )
        if response is None:
            return False
        await _send_then_close(conn, response.http())
        return True

    def _log(self, event: str, level: int, first: str, more: str, **fields: str | int) -> None:
        throttle = self._throttles.setdefault(event, _Throttle())
        skipped = throttle.occurred(trio.current_time())
        if skipped is None:
            return
        message = f"{first} (and {skipped} {more} since the last report)" if skipped else first
        log_event(log, level, event, message, suppressed=skipped, **fields)


def _content_length(request: h11.Request) -> int | None:
    """The request's declared body length (h11 has checked it), None if it has none."""
    for name, value in request.headers:
        if name == b"content-length":
            return int(value)
    return None


def _refuse(conn: socket.socket) -> None:
    conn.setblocking(False)
    with contextlib.suppress(OSError):  # full or reset: closing says enough
        conn.send(REFUSAL)
    conn.close()


async def _send_then_close(conn: socket.socket, data: bytes) -> None:
    """Send all of ``data`` (waiting for room only when the socket has none), then end
    the stream (FIN, not a reset) and close. A reset or closed peer ends it quietly."""
    view = memoryview(data)
    try:
        while view:
            try:
                view = view[conn.send(view) :]
            except BlockingIOError:
                await trio.lowlevel.wait_writable(conn)
        conn.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    finally:
        conn.close()


async def _read_head(conn: socket.socket) -> bytes | None:
    """The bytes up to the end of the first request head (and any that came with them).

    None when the client closed or reset first. A head longer than ``MAX_HEAD_BYTES``
    is returned incomplete (hypercorn refuses it). The head deadline is the caller's
    (the connection's cancel scope); cancelled, nothing is returned.
    """
    data = b""
    while b"\r\n\r\n" not in data and len(data) < MAX_HEAD_BYTES:
        chunk = await _receive(conn, MAX_HEAD_BYTES)
        if not chunk:
            return data or None
        data += chunk
    return data


async def _receive(conn: socket.socket, max_bytes: int) -> bytes | None:
    """The next bytes from ``conn`` (non-blocking); ``b""`` at its end, None if reset."""
    while True:
        try:
            return conn.recv(max_bytes)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(conn)
        except OSError:
            return None


class _Served(TCPServer):
    """hypercorn's per-connection server, telling the front door when the connection
    becomes idle between requests (its keep-alive timer starts then)."""

    def watch(self, front: _Front, slot: _Slot, framing: _Framing) -> None:
        self._front = front
        self._slot = slot
        self._framing = framing

    async def protocol_send(self, event: Event) -> None:
        # Idle with a pipelined request already in: that request is not idle.
        if isinstance(event, Updated) and event.idle and self._framing.between:
            self._front.enter(self._slot, Phase.IDLE)
        await super().protocol_send(event)


class _Guarded(trio.abc.HalfCloseableStream):
    """The stream hypercorn serves: the socket, with the bytes the front door already
    read (and followed) put back in front, and every byte received after them
    followed by ``_Framing`` so that the connection's phase (and so its deadline)
    stays current.

    hypercorn's ``TCPServer`` reads ``.socket`` for the addresses, and tells a plain
    connection from TLS by the missing ``do_handshake``: both as for a ``SocketStream``.
    """

    def __init__(
        self,
        stream: trio.SocketStream,
        received: bytes,
        front: _Front,
        slot: _Slot,
        framing: _Framing,
    ) -> None:
        self._stream = stream
        self._received = received
        self._front = front
        self._slot = slot
        self._framing = framing
        self._send_lock = trio.Lock()
        self.socket = stream.socket

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """The next bytes, as ``SocketStream.receive_some``.

        Raises ``trio.BrokenResourceError`` instead of returning bytes that start
        HTTP/2 (the connection is being ended). Cancelled, nothing was received.
        """
        if self._received:
            # Already followed by the front door when it read them.
            data, self._received = self._received, b""
            await trio.lowlevel.checkpoint()
            return data
        data = bytes(await self._stream.receive_some(max_bytes))
        if not self._front.follow(self._slot, self._framing.receive(data)):
            raise trio.BrokenResourceError("HTTP/2 is not served here")
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        async with self._send_lock:
            await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        """As ``SocketStream.send_eof``, but after any ``send_all`` in progress, and
        shielded (bounded by ``SEND_EOF_GRACE_S``).

        hypercorn serializes its ``send_all`` calls but not the ``send_eof`` of its
        close, which a connection cancelled mid-answer (a deadline, a displacement, the
        graceful timeout) runs while the app's shielded ``send_all`` is still going:
        ``trio.BusyResourceError`` in the app, logged as an app error. And hypercorn
        closes a connection (Connection: close, or a body left unread) from inside the
        app's last send, which quart-trio cancels as the stream closes: unshielded, the
        checkpoint before the shutdown raises, the socket stays open and hypercorn goes
        on reading whatever the client sends. Past the grace the end is not sent (the
        front door closes the socket anyway).
        """
        with trio.CancelScope(shield=True, deadline=trio.current_time() + SEND_EOF_GRACE_S):
            async with self._send_lock:
                await self._stream.send_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()
