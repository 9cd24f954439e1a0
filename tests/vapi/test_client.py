"""voicebridge.vapi.client over real loopback HTTP and WebSocket.

Charter: loopback only (127.0.0.1, port 0), real sockets and real servers written
here (h11 over trio TCP for HTTP; for the transport socket trio-websocket, an
implementation independent of ours, or wsproto driven by hand where a test needs
exact bytes), no mocks; every test guarded by ``trio.fail_after``. The deadline tests wait real
time, kept to ``SHORT_DEADLINE_S`` each; anything else timed uses ``autojump_clock``.
"""

from __future__ import annotations

import contextlib
import functools
import socket
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import h11
import httpx
import orjson
import pytest
import trio
import trio.testing
import trio_websocket
import wsproto
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Request,
    TextMessage,
)

from tests.net.test_ws import make_certificate, server_context
from voicebridge.config import VapiConfig
from voicebridge.errors import ConfigError, SocketClosed
from voicebridge.net.ws import CLOSE_REPLY_S, WsConnection
from voicebridge.sockets import CLOSE_GRACE_S, memory_socket_pair
from voicebridge.vapi import client
from voicebridge.vapi.client import (
    VapiCall,
    VapiError,
    build_create_body,
    create_call,
    end_call,
    open_transport,
    post_control,
)

#: Guard on every test: a loopback exchange takes milliseconds.
GUARD_S = 3.0
#: Deadline for the tests that wait for one to pass (real time).
SHORT_DEADLINE_S = 0.2
API_KEY = "vapi-private-key-0123456789"
CALL_SID = "CA" + "0123456789abcdef" * 2
SECRET_PATH = "/3f9a-secret-call-id/transport"


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# --- A tiny real HTTP server (h11 over trio TCP) --------------------------------------


@attrs.frozen
class ReceivedRequest:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


Behaviour = Callable[[trio.SocketStream, h11.Connection], Awaitable[None]]


def respond(status: int, body: bytes | dict[str, Any]) -> Behaviour:
    content = body if isinstance(body, bytes) else orjson.dumps(body)

    async def behaviour(stream: trio.SocketStream, conn: h11.Connection) -> None:
        headers = [("content-type", "application/json"), ("content-length", str(len(content)))]
        await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)))
        await stream.send_all(conn.send(h11.Data(data=content)))
        await stream.send_all(conn.send(h11.EndOfMessage()))

    return behaviour


async def never_answer(stream: trio.SocketStream, conn: h11.Connection) -> None:
    await trio.sleep_forever()


async def close_without_answer(stream: trio.SocketStream, conn: h11.Connection) -> None:
    await stream.aclose()


async def close_mid_body(stream: trio.SocketStream, conn: h11.Connection) -> None:
    headers = [("content-type", "application/json"), ("content-length", "100")]
    await stream.send_all(conn.send(h11.Response(status_code=201, headers=headers)))
    await stream.send_all(conn.send(h11.Data(data=b'{"id": "call-1", ')))
    await stream.aclose()


class HttpServer:
    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.requests: list[ReceivedRequest] = []
        self.base_url = ""

    async def start(self, nursery: trio.Nursery) -> None:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, host="127.0.0.1"), self._handle, 0
        )
        self.base_url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"

    async def _handle(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        request: h11.Request | None = None
        body = b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            else:  # the client went away
                return
        assert request is not None
        self.requests.append(
            ReceivedRequest(
                method=request.method.decode(),
                target=request.target.decode(),
                headers={k.decode(): v.decode() for k, v in request.headers},
                body=body,
            )
        )
        async with stream:
            await self.behaviour(stream, conn)


async def start_http(nursery: trio.Nursery, behaviour: Behaviour) -> HttpServer:
    server = HttpServer(behaviour)
    await server.start(nursery)
    return server


def vapi_config(base_url: str, **changes: Any) -> VapiConfig:
    return VapiConfig(base_url=base_url, assistant_id="asst-123", **changes)


async def create(config: VapiConfig, api_key: str = API_KEY) -> VapiCall:
    async with httpx.AsyncClient(trust_env=False) as http:
        return await create_call(
            http, config, api_key, call_sid=CALL_SID, caller="+15550001111", called="+15550002222"
        )


def created_body(websocket_url: str = f"wss://api.vapi.ai{SECRET_PATH}") -> dict[str, Any]:
    return {
        "id": "call-1",
        "status": "queued",
        "type": "vapi.websocketCall",
        "transport": {"provider": "vapi.websocket", "websocketCallUrl": websocket_url},
        "monitor": {
            "listenUrl": "wss://phone-call-websocket.aws-us-west-2-backend-production2.vapi.ai/x/listen",
            "controlUrl": "https://phone-call-websocket.aws-us-west-2-backend-production2.vapi.ai/x/control",
        },
    }


def assert_secret_free(error: BaseException) -> None:
    text = f"{error} {error!r}"
    assert API_KEY not in text
    assert SECRET_PATH not in text
    assert "secret" not in text


# --- build_create_body ---------------------------------------------------------------


def test_create_body_follows_the_protocol() -> None:
    body = build_create_body(
        vapi_config("https://api.vapi.ai"), call_sid=CALL_SID, caller="+1555001", called="+1555002"
    )
    correlation = {"twilioCallSid": CALL_SID, "caller": "+1555001", "called": "+1555002"}
    assert body == {
        "name": f"vb {CALL_SID}",
        "assistantId": "asst-123",
        "assistantOverrides": {
            "clientMessages": [
                "speech-update", "user-interrupted", "status-update", "transcript",
                "transfer-update",
            ],
            "metadata": correlation,
            "variableValues": correlation,
            "maxDurationSeconds": 600,
            "silenceTimeoutSeconds": 30,
        },
        "transport": {
            "provider": "vapi.websocket",
            "audioFormat": {"format": "mulaw", "container": "raw", "sampleRate": 8000},
        },
    }
    assert len(body["name"]) <= 40


def test_create_body_with_an_inline_assistant_and_pcm() -> None:
    assistant = {"name": "Front desk", "firstMessage": "Hello!"}
    config = VapiConfig(assistant=assistant, audio_format="pcm_s16le", sample_rate=16000)
    body = build_create_body(config, call_sid="CA1", caller="a", called="b")
    assert body["assistant"] == assistant
    assert "assistantId" not in body
    assert body["transport"]["audioFormat"] == {
        "format": "pcm_s16le",
        "container": "raw",
        "sampleRate": 16000,
    }
    assert "phoneNumber" not in body and "phoneNumberId" not in body and "metadata" not in body


def test_create_body_needs_an_assistant() -> None:
    with pytest.raises(ConfigError):
        build_create_body(VapiConfig(), call_sid="CA1", caller="a", called="b")


def test_call_name_never_exceeds_vapi_limit() -> None:
    assert len(client.call_name("CA" + "f" * 60)) == client.MAX_CALL_NAME_CHARS


# --- create_call -----------------------------------------------------------------------


async def test_create_call_posts_the_body_with_the_bearer_key(nursery: trio.Nursery) -> None:
    with trio.fail_after(GUARD_S):
        server = await start_http(nursery, respond(201, created_body()))
        call = await create(vapi_config(server.base_url + "/"))

    assert call.id == "call-1"
    assert call.websocket_url == f"wss://api.vapi.ai{SECRET_PATH}"
    assert call.control_url is not None and call.control_url.endswith("/x/control")
    assert SECRET_PATH not in repr(call) and "control" not in repr(call)
    [request] = server.requests
    assert (request.method, request.target) == ("POST", "/call")
    assert request.headers["authorization"] == f"Bearer {API_KEY}"
    assert request.headers["content-type"] == "application/json"
    body = request.json()
    assert body["assistantId"] == "asst-123"
    assert body["transport"] == {
        "provider": "vapi.websocket",
        "audioFormat": {"format": "mulaw", "container": "raw", "sampleRate": 8000},
    }
    overrides = body["assistantOverrides"]
    assert overrides["metadata"]["twilioCallSid"] == CALL_SID
    assert overrides["variableValues"] == {
        "twilioCallSid": CALL_SID,
        "caller": "+15550001111",
        "called": "+15550002222",
    }
    assert set(overrides["clientMessages"]) >= {
        "user-interrupted",
        "speech-update",
        "status-update",
    }
    assert "phoneNumber" not in body and "metadata" not in body


async def test_create_call_accepts_200_without_monitor(nursery: trio.Nursery) -> None:
    body = created_body()
    del body["monitor"]
    with trio.fail_after(GUARD_S):
        server = await start_http(nursery, respond(200, body))
        call = await create(vapi_config(server.base_url))
    assert call.control_url is None


@pytest.mark.parametrize(
    ("status", "body", "kind", "words"),
    [
        (
            401,
            {
                "message": "Invalid Key. Hot tip, you may be using the private key instead"
                " of the public key, or vice versa.",
                "error": "Unauthorized",
                "statusCode": 401,
            },
            "auth",
            "HTTP 401: Invalid Key",
        ),
        (403, b"", "auth", "HTTP 403"),
        (
            400,
            {"message": "Concurrency limit reached", "error": "Bad Request", "statusCode": 400},
            "limit",
            "HTTP 400: Concurrency limit reached",
        ),
        (400, {"message": "Over Concurrency Limit.", "statusCode": 400}, "limit", "Over Conc"),
        (
            400,
            {
                "message": [
                    "assistantId must be a UUID",
                    "name must be shorter than or equal to 40 characters",
                ],
                "error": "Bad Request",
            },
            "rejected",
            "assistantId must be a UUID; name must be",
        ),
        (402, {"error": "Payment Required"}, "rejected", "HTTP 402: Payment Required"),
        (429, b"Too Many Requests", "rejected", "HTTP 429"),
        (
            500,
            {"message": "Internal server error", "statusCode": 500},
            "server",
            "HTTP 500: Internal server error",
        ),
        (503, b"<html>bad gateway</html>", "server", "HTTP 503"),
    ],
)
async def test_create_call_classifies_error_statuses(
    nursery: trio.Nursery, status: int, body: bytes | dict[str, Any], kind: str, words: str
) -> None:
    with trio.fail_after(GUARD_S):
        server = await start_http(nursery, respond(status, body))
        with pytest.raises(VapiError) as info:
            await create(vapi_config(server.base_url))
    assert info.value.kind == kind
    assert info.value.status_code == status
    assert words in str(info.value)
    assert_secret_free(info.value)


async def test_a_call_created_blocked_by_the_concurrency_limit_is_refused(
    nursery: trio.Nursery,
) -> None:
    blocked = created_body() | {"subscriptionLimits": {"concurrencyBlocked": True}}
    with trio.fail_after(GUARD_S):
        server = await start_http(nursery, respond(201, blocked))
        with pytest.raises(VapiError) as info:
            await create(vapi_config(server.base_url))
    assert info.value.kind == "limit"
    assert "concurrency limit" in str(info.value)
    assert_secret_free(info.value)


async def test_create_call_error_text_is_cut_and_never_echoes_the_key(
    nursery: trio.Nursery,
) -> None:
    message = f"Key {API_KEY} is not valid.\n" + "x" * 1000
    with trio.fail_after(GUARD_S):
        server = await start_http(nursery, respond(401, {"message": message}))
        with pytest.raises(VapiError) as info:
            await create(vapi_config(server.base_url))
    assert "Key *** is not valid. xxx" in str(info.value)
    assert len(str(info.value)) < 300
    assert_secret_free(info.value)


async def test_create_call_times_out_at_the_deadline(nursery: trio.Nursery) -> None:
    with trio.fail_after(GUARD_S):
        server = await start_http(nursery, never_answer)
        start = trio.current_time()
        with pytest.raises(VapiError) as info:
            await create(vapi_config(server.base_url, create_deadline_s=SHORT_DEADLINE_S))
        elapsed = trio.current_time() - start
    assert info.value.kind == "timeout"
    assert SHORT_DEADLINE_S <= elapsed < SHORT_DEADLINE_S + 0.5
    assert_secret_free(info.value)


async def test_create_call_to_a_closed_port_is_refused() -> None:
    with trio.fail_after(GUARD_S), pytest.raises(VapiError) as info:
        await create(vapi_config(f"http://127.0.0.1:{closed_port()}"))
    assert info.value.kind == "refused"
    assert_secret_free(info.value)


@pytest.mark.parametrize("behaviour", [close_without_answer, close_mid_body])
async def test_create_call_dropped_connection(nursery: trio.Nursery, behaviour: Behaviour) -> None:
    with trio.fail_after(GUARD_S):
        server = await start_http(nursery, behaviour)
        with pytest.raises(VapiError) as info:
            await create(vapi_config(server.base_url))
    assert info.value.kind == "dropped"
    assert_secret_free(info.value)


# --- post_control (Live Call Control) ---------------------------------------------------

#: A call's control URL: its path is as secret as the socket URL's.
CONTROL_PATH = "/3f9a-secret-call-id/control"


async def control(base_url: str, *, deadline_s: float = GUARD_S) -> None:
    async with httpx.AsyncClient(trust_env=False) as http:
        await post_control(
            http, base_url + CONTROL_PATH, '{"type":"end-call"}', deadline_s=deadline_s
        )


async def test_post_control_posts_the_message_without_the_key(nursery: trio.Nursery) -> None:
    with trio.fail_after(GUARD_S):
        server = await start_http(nursery, respond(200, b""))
        await control(server.base_url)
    [request] = server.requests
    assert (request.method, request.target) == ("POST", CONTROL_PATH)
    assert request.json() == {"type": "end-call"}
    assert request.headers["content-type"] == "application/json"
    assert "authorization" not in request.headers  # the URL is the credential


@pytest.mark.parametrize(
    ("behaviour", "kind", "words"),
    [
        (respond(400, {"message": "Call is not in progress."}), "rejected", "HTTP 400: Call is"),
        (respond(404, {"message": f"No call at {CONTROL_PATH}"}), "rejected", "No call at /***"),
        (respond(503, b""), "server", "HTTP 503"),
        (never_answer, "timeout", f"within {SHORT_DEADLINE_S:g} s"),
        (close_without_answer, "dropped", "call control failed (dropped)"),
    ],
    ids=["400", "404-echoing-the-url", "503", "no-answer", "dropped"],
)
async def test_post_control_failures_are_classified_and_keep_the_url_secret(
    nursery: trio.Nursery, behaviour: Behaviour, kind: str, words: str
) -> None:
    with trio.fail_after(GUARD_S):
        server = await start_http(nursery, behaviour)
        with pytest.raises(VapiError) as info:
            await control(server.base_url, deadline_s=SHORT_DEADLINE_S)
    assert info.value.kind == kind
    assert words in str(info.value)
    assert CONTROL_PATH not in f"{info.value} {info.value!r}"


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"<html>ok</html>", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (orjson.dumps({"transport": created_body()["transport"]}), "no 'id'"),
        (orjson.dumps({"id": "call-1", "transport": {}}), "no 'transport.websocketCallUrl'"),
        (orjson.dumps({"id": "call-1"}), "no 'transport.websocketCallUrl'"),
        (orjson.dumps(created_body(f"https://api.vapi.ai{SECRET_PATH}")), "not a ws(s) URL"),
    ],
)
async def test_create_call_unusable_success_is_a_protocol_error(
    nursery: trio.Nursery, body: bytes, words: str
) -> None:
    with trio.fail_after(GUARD_S):
        server = await start_http(nursery, respond(201, body))
        with pytest.raises(VapiError) as info:
            await create(vapi_config(server.base_url))
    assert info.value.kind == "protocol"
    assert words in str(info.value)
    assert_secret_free(info.value)


@pytest.mark.parametrize("api_key", ["", "key-with-newline\n", "key with space"])
async def test_create_call_refuses_an_unusable_key_before_sending(
    nursery: trio.Nursery, api_key: str
) -> None:
    with trio.fail_after(GUARD_S):
        server = await start_http(nursery, respond(201, created_body()))
        with pytest.raises(VapiError) as info:
            await create(vapi_config(server.base_url), api_key=api_key)
    assert info.value.kind == "auth"
    assert server.requests == []


# --- open_transport ---------------------------------------------------------------------


@attrs.define
class WsServer:
    """A trio-websocket server; ``handler`` runs per accepted connection."""

    handler: Callable[[trio_websocket.WebSocketConnection], Awaitable[None]] | None = None
    reject_status: int | None = None
    ssl_context: ssl.SSLContext | None = None
    paths: list[str] = attrs.field(factory=list)
    headers: list[dict[bytes, bytes]] = attrs.field(factory=list)
    port: int = 0

    async def start(self, nursery: trio.Nursery) -> None:
        server = await nursery.start(
            trio_websocket.serve_websocket, self._handle, "127.0.0.1", 0, self.ssl_context
        )
        self.port = server.port

    def call(self, scheme: str = "ws") -> VapiCall:
        return VapiCall(id="call-1", websocket_url=f"{scheme}://127.0.0.1:{self.port}{SECRET_PATH}")

    async def _handle(self, request: trio_websocket.WebSocketRequest) -> None:
        self.paths.append(request.path)
        self.headers.append(dict(request.headers))
        if self.reject_status is not None:
            await request.reject(self.reject_status)
            return
        websocket = await request.accept()
        if self.handler is not None:
            await self.handler(websocket)
        else:
            await trio.sleep_forever()


@attrs.define
class Recorder:
    """A server handler that records what the client sent and how it closed."""

    messages: list[str | bytes] = attrs.field(factory=list)
    close_code: int | None = None
    done: trio.Event = attrs.field(factory=trio.Event)

    async def __call__(self, websocket: trio_websocket.WebSocketConnection) -> None:
        try:
            while True:
                self.messages.append(await websocket.get_message())
        except trio_websocket.ConnectionClosed as exc:
            self.close_code = exc.reason.code if exc.reason else None
        finally:
            self.done.set()


async def start_ws(nursery: trio.Nursery, **kwargs: Any) -> WsServer:
    server = WsServer(**kwargs)
    await server.start(nursery)
    return server


async def test_open_transport_sends_the_key_on_the_upgrade_and_closes_on_exit(
    nursery: trio.Nursery,
) -> None:
    recorder = Recorder()
    with trio.fail_after(GUARD_S):
        server = await start_ws(nursery, handler=recorder)
        async with open_transport(server.call(), API_KEY, connect_deadline_s=1.0) as sock:
            await sock.send("hello")
            await sock.send(b"\xff\x7f")
        await recorder.done.wait()
    assert server.paths == [SECRET_PATH]
    assert server.headers[0][b"authorization"] == f"Bearer {API_KEY}".encode()
    assert recorder.messages == ["hello", b"\xff\x7f"]
    assert recorder.close_code == 1000


async def test_open_transport_receives_what_vapi_sends(nursery: trio.Nursery) -> None:
    async def greet(websocket: trio_websocket.WebSocketConnection) -> None:
        await websocket.send_message('{"type":"assistant.started"}')
        await websocket.send_message(b"\x00" * 160)
        await trio.sleep_forever()

    with trio.fail_after(GUARD_S):
        server = await start_ws(nursery, handler=greet)
        async with open_transport(server.call(), API_KEY, connect_deadline_s=1.0) as sock:
            assert await sock.receive() == '{"type":"assistant.started"}'
            assert await sock.receive() == b"\x00" * 160


class Boom(Exception):
    pass


async def test_open_transport_body_exception_propagates_unchanged(nursery: trio.Nursery) -> None:
    recorder = Recorder()
    error = Boom("from the body")
    with trio.fail_after(GUARD_S):
        server = await start_ws(nursery, handler=recorder)
        with pytest.raises(Boom) as info:
            async with open_transport(server.call(), API_KEY, connect_deadline_s=1.0):
                raise error
        await recorder.done.wait()
    assert info.value is error
    assert recorder.close_code == 1000


async def test_open_transport_body_timeout_is_not_a_connect_timeout(nursery: trio.Nursery) -> None:
    with trio.fail_after(GUARD_S):
        server = await start_ws(nursery)
        with pytest.raises(trio.TooSlowError):
            async with open_transport(server.call(), API_KEY, connect_deadline_s=1.0) as sock:
                with trio.fail_after(0.01):
                    await sock.receive()


async def test_open_transport_body_cancellation_propagates_and_closes(
    nursery: trio.Nursery,
) -> None:
    recorder = Recorder()
    with trio.fail_after(GUARD_S):
        server = await start_ws(nursery, handler=recorder)
        with trio.CancelScope() as call_scope:
            async with open_transport(server.call(), API_KEY, connect_deadline_s=1.0):
                call_scope.cancel(reason="caller hung up")
                start = trio.current_time()
                await trio.sleep_forever()
        elapsed = trio.current_time() - start
        await recorder.done.wait()
    assert call_scope.cancelled_caught
    # The close frame still goes out, but nobody waits for Vapi's answer: the reader
    # task that would read it was cancelled along with the body.
    assert recorder.close_code == 1000
    assert elapsed < client.CLOSE_DEADLINE_S / 2


@pytest.mark.parametrize(
    ("status", "kind"), [(401, "auth"), (403, "auth"), (404, "rejected"), (500, "server")]
)
async def test_open_transport_rejected_upgrade(
    nursery: trio.Nursery, status: int, kind: str
) -> None:
    with trio.fail_after(GUARD_S):
        server = await start_ws(nursery, reject_status=status)
        with pytest.raises(VapiError) as info:
            async with open_transport(server.call(), API_KEY, connect_deadline_s=1.0):
                pytest.fail("the body must not run")
    assert info.value.kind == kind
    assert info.value.status_code == status
    assert_secret_free(info.value)


async def test_open_transport_to_a_closed_port_is_refused() -> None:
    call = VapiCall(id="c", websocket_url=f"ws://127.0.0.1:{closed_port()}{SECRET_PATH}")
    with trio.fail_after(GUARD_S), pytest.raises(VapiError) as info:
        async with open_transport(call, API_KEY, connect_deadline_s=1.0):
            pytest.fail("the body must not run")
    assert info.value.kind == "refused"
    assert_secret_free(info.value)


TcpHandler = Callable[[trio.SocketStream], Awaitable[None]]


async def tcp_server(nursery: trio.Nursery, handler: TcpHandler) -> int:
    listeners = await nursery.start(functools.partial(trio.serve_tcp, host="127.0.0.1"), handler, 0)
    port: int = listeners[0].socket.getsockname()[1]
    return port


async def silent(stream: trio.SocketStream) -> None:
    await stream.receive_some(65536)
    await trio.sleep_forever()


async def hang_up_on_the_upgrade(stream: trio.SocketStream) -> None:
    await stream.receive_some(65536)
    await stream.aclose()


def answer_with(reply: bytes, *, then_hang_up: bool = False) -> TcpHandler:
    """A peer that reads the upgrade request, writes ``reply`` and waits (or hangs up)."""

    async def handler(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await stream.send_all(reply)
        if then_hang_up:
            await stream.aclose()
        else:
            await trio.sleep_forever()

    return handler


@pytest.mark.parametrize(
    ("handler", "kind"),
    [
        (silent, "timeout"),
        (hang_up_on_the_upgrade, "dropped"),
        (
            answer_with(
                b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n", then_hang_up=True
            ),
            "dropped",
        ),
        (answer_with(b"SSH-2.0-OpenSSH_9.6\r\n\r\n"), "protocol"),
        (answer_with(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"), "protocol"),
        (
            answer_with(
                b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n"
                b"connection: upgrade\r\nsec-websocket-accept: bm90IHRoZSByaWdodCBrZXk=\r\n\r\n"
            ),
            "protocol",
        ),
        (answer_with(b"HTTP/1.1 103 Early Hints\r\n\r\n"), "protocol"),
    ],
    ids=["silent", "hang-up", "half-answer", "garbage", "plain-http", "wrong-accept", "1xx"],
)
async def test_open_transport_bad_peers(
    nursery: trio.Nursery, handler: TcpHandler, kind: str
) -> None:
    with trio.fail_after(GUARD_S):
        port = await tcp_server(nursery, handler)
        call = VapiCall(id="c", websocket_url=f"ws://127.0.0.1:{port}{SECRET_PATH}")
        start = trio.current_time()
        with pytest.raises(VapiError) as info:
            async with open_transport(call, API_KEY, connect_deadline_s=SHORT_DEADLINE_S):
                pytest.fail("the body must not run")
        elapsed = trio.current_time() - start
    assert info.value.kind == kind
    if kind == "timeout":
        assert SHORT_DEADLINE_S <= elapsed < SHORT_DEADLINE_S + 0.5
    else:  # known at once, not at the deadline
        assert elapsed < SHORT_DEADLINE_S
    assert_secret_free(info.value)


@attrs.define
class RawWsServer:
    """A WebSocket server on wsproto driven by hand: ``behaviour`` runs once the upgrade
    request is read, and answers it (or not) byte for byte."""

    behaviour: Callable[[trio.SocketStream, wsproto.WSConnection], Awaitable[None]]
    requests: list[Request] = attrs.field(factory=list)
    port: int = 0

    async def start(self, nursery: trio.Nursery) -> None:
        self.port = await tcp_server(nursery, self._handle)

    def call(self, query: str = "") -> VapiCall:
        url = f"ws://127.0.0.1:{self.port}{SECRET_PATH}{query}"
        return VapiCall(id="call-1", websocket_url=url)

    async def _handle(self, stream: trio.SocketStream) -> None:
        ws = wsproto.WSConnection(wsproto.ConnectionType.SERVER)
        while data := await stream.receive_some(65536):
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, Request):
                    self.requests.append(event)
                    await self.behaviour(stream, ws)
                    return


async def accept_with_messages_behind(stream: trio.SocketStream, ws: wsproto.WSConnection) -> None:
    # The 101 and Vapi's first messages in one write: they arrive in one read.
    await stream.send_all(
        ws.send(AcceptConnection())
        + ws.send(TextMessage(data='{"type":"assistant.started"}'))
        + ws.send(BytesMessage(data=b"\x01" * 160))
    )
    while data := await stream.receive_some(65536):
        ws.receive_data(data)
        for event in ws.events():
            if isinstance(event, CloseConnection):
                await stream.send_all(ws.send(event.response()))


async def accept_then_never_read(stream: trio.SocketStream, ws: wsproto.WSConnection) -> None:
    await stream.send_all(ws.send(AcceptConnection()))
    await trio.sleep_forever()


async def test_open_transport_request_and_what_follows_the_101(nursery: trio.Nursery) -> None:
    with trio.fail_after(GUARD_S):
        server = RawWsServer(accept_with_messages_behind)
        await server.start(nursery)
        call = server.call("?token=abc")
        async with open_transport(call, API_KEY, connect_deadline_s=1.0) as sock:
            assert isinstance(sock, WsConnection)
            assert await sock.receive() == '{"type":"assistant.started"}'
            assert await sock.receive() == b"\x01" * 160
    [request] = server.requests
    assert request.target == f"{SECRET_PATH}?token=abc"
    assert request.host == f"127.0.0.1:{server.port}"
    assert (b"authorization", f"Bearer {API_KEY}".encode()) in request.extra_headers


@pytest.mark.parametrize("cancelled", [False, True], ids=["exit", "cancelled-exit"])
async def test_open_transport_exit_waits_for_vapis_close_only_as_long_as_allowed(
    nursery: trio.Nursery, cancelled: bool
) -> None:
    with trio.fail_after(GUARD_S):
        server = RawWsServer(accept_then_never_read)
        await server.start(nursery)
        with trio.CancelScope() as call_scope:
            async with open_transport(
                server.call(), API_KEY, connect_deadline_s=1.0, close_deadline_s=SHORT_DEADLINE_S
            ):
                start = trio.current_time()
                if cancelled:
                    call_scope.cancel(reason="caller hung up")
                    await trio.sleep_forever()
        elapsed = trio.current_time() - start
    assert call_scope.cancelled_caught == cancelled
    assert SHORT_DEADLINE_S < CLOSE_REPLY_S  # so it is close_deadline_s that bounds the exit
    if cancelled:  # only the grace: the call is going away
        assert CLOSE_GRACE_S <= elapsed < SHORT_DEADLINE_S
    else:
        assert SHORT_DEADLINE_S <= elapsed < SHORT_DEADLINE_S + 0.5


async def test_open_transport_exit_reads_vapis_answer_to_the_close(nursery: trio.Nursery) -> None:
    recorder = Recorder()
    with trio.fail_after(GUARD_S):
        server = await start_ws(nursery, handler=recorder)
        async with open_transport(server.call(), API_KEY, connect_deadline_s=1.0) as sock:
            await sock.send("bye")
            start = trio.current_time()
        elapsed = trio.current_time() - start
        await recorder.done.wait()
    assert recorder.messages == ["bye"]
    assert recorder.close_code == 1000
    assert elapsed < CLOSE_REPLY_S / 2  # the answer came in a round trip


@pytest.mark.parametrize(
    "url",
    [
        f"https://api.vapi.ai{SECRET_PATH}",
        f"ws://127.0.0.1:99999{SECRET_PATH}",
        f"ws://127.0.0.1:port{SECRET_PATH}",
        f"ws://{SECRET_PATH}",
        f"ws://127.0.0.1{SECRET_PATH}/with space",
        f"ws://127.0.0.1{SECRET_PATH}/é",
    ],
    ids=["https", "port-range", "port-word", "no-host", "space", "non-ascii"],
)
async def test_open_transport_rejects_a_non_websocket_url(url: str) -> None:
    call = VapiCall(id="c", websocket_url=url)
    with trio.fail_after(GUARD_S), pytest.raises(VapiError) as info:
        async with open_transport(call, API_KEY, connect_deadline_s=1.0):
            pytest.fail("the body must not run")
    assert info.value.kind == "protocol"
    assert_secret_free(info.value)


async def test_open_transport_wss_to_a_closed_port_is_refused() -> None:
    call = VapiCall(id="c", websocket_url=f"wss://127.0.0.1:{closed_port()}{SECRET_PATH}")
    with trio.fail_after(GUARD_S), pytest.raises(VapiError) as info:
        async with open_transport(call, API_KEY, connect_deadline_s=1.0):
            pytest.fail("the body must not run")
    assert info.value.kind == "refused"


async def test_open_transport_tls_failure_is_dropped(nursery: trio.Nursery) -> None:
    # wss:// to a plain-TCP WebSocket server: it answers the TLS hello with an HTTP 400.
    with trio.fail_after(GUARD_S):
        server = await start_ws(nursery, handler=Recorder())
        with pytest.raises(VapiError) as info:
            async with open_transport(
                server.call("wss"), API_KEY, connect_deadline_s=SHORT_DEADLINE_S
            ):
                pytest.fail("the body must not run")
    assert info.value.kind == "dropped"
    assert "TLS handshake failed" in str(info.value)
    assert_secret_free(info.value)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key (made by openssl, or skip)."""
    return make_certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def trusted(tls_files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> ssl.SSLContext:
    """Make ``open_transport`` trust the test certificate; the server's context for it."""
    client_context = ssl.create_default_context(cafile=str(tls_files[0]))
    monkeypatch.setattr(client, "_default_ssl_context", lambda: client_context)
    return server_context(*tls_files)


async def test_open_transport_over_tls(nursery: trio.Nursery, trusted: ssl.SSLContext) -> None:
    async def echo(websocket: trio_websocket.WebSocketConnection) -> None:
        with contextlib.suppress(trio_websocket.ConnectionClosed):
            while True:
                await websocket.send_message(await websocket.get_message())

    recorder = Recorder()
    with trio.fail_after(GUARD_S):
        server = await start_ws(nursery, handler=echo, ssl_context=trusted)
        async with open_transport(server.call("wss"), API_KEY, connect_deadline_s=1.0) as sock:
            await sock.send('{"type":"end-call"}')
            await sock.send(b"\x00" * 160)
            assert await sock.receive() == '{"type":"end-call"}'
            assert await sock.receive() == b"\x00" * 160
            async with trio.open_nursery() as reading:  # a pong is noted by the reader
                reading.start_soon(sock.receive)
                await sock.ping()
                reading.cancel_scope.cancel()
        other = await start_ws(nursery, handler=recorder, ssl_context=trusted)
        async with open_transport(other.call("wss"), API_KEY, connect_deadline_s=1.0):
            pass
        await recorder.done.wait()
    assert server.headers[0][b"authorization"] == f"Bearer {API_KEY}".encode()
    assert recorder.close_code == 1000


async def test_open_transport_over_tls_is_on_the_lean_path(
    nursery: trio.Nursery, trusted: ssl.SSLContext
) -> None:
    recorder = Recorder()
    frames = [bytes([i]) * 160 for i in range(50)]
    big = bytes(range(256)) * 400  # 100 KiB: seven TLS records
    with trio.fail_after(GUARD_S):
        server = await start_ws(nursery, handler=recorder, ssl_context=trusted)
        async with open_transport(server.call("wss"), API_KEY, connect_deadline_s=1.0) as sock:
            assert isinstance(sock, WsConnection)
            # Caller frames go straight into the kernel from the caller's task, as on
            # ws://: no yield, no hop to the sender.
            with trio.testing.assert_no_checkpoints():
                for frame in frames:
                    assert sock.send_nowait(frame)
                    assert not sock.needs_flush
            await sock.send(big)
            await sock.send('{"type":"end-call"}')
        await recorder.done.wait()
    assert recorder.messages == [*frames, big, '{"type":"end-call"}']
    assert recorder.close_code == 1000


async def test_open_transport_over_tls_with_an_untrusted_certificate(
    nursery: trio.Nursery, tls_files: tuple[Path, Path]
) -> None:
    with trio.fail_after(GUARD_S):
        server = await start_ws(nursery, handler=Recorder(), ssl_context=server_context(*tls_files))
        with pytest.raises(VapiError) as info:
            async with open_transport(server.call("wss"), API_KEY, connect_deadline_s=1.0):
                pytest.fail("the body must not run")
    assert info.value.kind == "dropped"
    assert "certificate verify failed" in str(info.value)
    assert_secret_free(info.value)


@pytest.mark.parametrize(
    ("handler", "kind", "detail"),
    [
        (silent, "timeout", "no upgrade within"),
        (
            hang_up_on_the_upgrade,
            "dropped",
            "TLS handshake failed (the peer closed the connection)",
        ),
    ],
    ids=["silent", "hang-up"],
)
async def test_open_transport_wss_peer_that_never_finishes_the_handshake(
    nursery: trio.Nursery, handler: TcpHandler, kind: str, detail: str
) -> None:
    with trio.fail_after(GUARD_S):
        port = await tcp_server(nursery, handler)  # reads the TLS hello, never answers it
        call = VapiCall(id="c", websocket_url=f"wss://127.0.0.1:{port}{SECRET_PATH}")
        with pytest.raises(VapiError) as info:
            async with open_transport(call, API_KEY, connect_deadline_s=SHORT_DEADLINE_S):
                pytest.fail("the body must not run")
    assert info.value.kind == kind
    assert detail in str(info.value)
    assert_secret_free(info.value)


# --- end_call ---------------------------------------------------------------------------


async def test_end_call_sends_end_call_then_closes(nursery: trio.Nursery) -> None:
    recorder = Recorder()
    with trio.fail_after(GUARD_S):
        server = await start_ws(nursery, handler=recorder)
        async with open_transport(server.call(), API_KEY, connect_deadline_s=1.0) as sock:
            await end_call(sock, deadline_s=1.0)
            await recorder.done.wait()
    assert recorder.messages == ['{"type":"end-call"}']
    assert recorder.close_code == 1000


async def test_end_call_after_vapi_closed_returns_quietly(nursery: trio.Nursery) -> None:
    async def close_at_once(websocket: trio_websocket.WebSocketConnection) -> None:
        await websocket.aclose(1000, "call ended")

    with trio.fail_after(GUARD_S):
        server = await start_ws(nursery, handler=close_at_once)
        async with open_transport(server.call(), API_KEY, connect_deadline_s=1.0) as sock:
            with pytest.raises(SocketClosed):
                await sock.receive()
            await end_call(sock, deadline_s=1.0)


async def test_end_call_after_we_closed_returns_quietly(nursery: trio.Nursery) -> None:
    with trio.fail_after(GUARD_S):
        server = await start_ws(nursery, handler=Recorder())
        async with open_transport(server.call(), API_KEY, connect_deadline_s=1.0) as sock:
            await sock.aclose()
            await end_call(sock, deadline_s=1.0)


class StuckSocket:
    """A MessageSocket whose peer never answers the close (cancellable, unlike the adapters)."""

    def __init__(self) -> None:
        self.sent: list[str | bytes] = []

    async def receive(self) -> str | bytes:
        await trio.sleep_forever()
        raise AssertionError

    async def send(self, message: str | bytes) -> None:
        await trio.lowlevel.checkpoint()
        self.sent.append(message)

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        await trio.sleep_forever()


async def test_end_call_never_waits_past_its_deadline(autojump_clock: trio.abc.Clock) -> None:
    sock = StuckSocket()
    with trio.fail_after(GUARD_S):
        start = trio.current_time()
        await end_call(sock, deadline_s=2.0)
    assert trio.current_time() - start == 2.0
    assert sock.sent == ['{"type":"end-call"}']


async def test_end_call_runs_even_when_the_call_is_being_cancelled() -> None:
    ours, vapi = memory_socket_pair()
    with trio.fail_after(GUARD_S):
        with trio.CancelScope() as call_scope:
            call_scope.cancel(reason="caller hung up")
            await end_call(ours, deadline_s=1.0)
        assert await vapi.receive() == '{"type":"end-call"}'
        with pytest.raises(SocketClosed):
            await vapi.receive()
