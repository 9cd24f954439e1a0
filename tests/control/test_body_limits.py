"""Request bodies on the real server: credentials decided before the body, every route's
limit held while the body streams in (chunked or not), bounded tool-call batches.

Charter: loopback only, port 0, a ``trio.fail_after`` guard on every test. Requests are
written by hand on a plain socket, so that a test controls how much of a body is sent
and can see that the answer came without the rest (a client library would send it all).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

import orjson
import pytest
import trio
from quart_trio.wrappers.request import TrioBody
from werkzeug.exceptions import RequestEntityTooLarge

from tests.control.test_webhook_e2e import API_TOKEN, HMAC_CREDENTIAL, WEBHOOK_SECRET, sections
from tests.harness import Bridge, running_bridge
from voicebridge.control.plane import MAX_TOOL_CALLS_PER_REQUEST, TOO_MANY_TOOL_CALLS
from voicebridge.control.routes import CALLS_PATH, MAX_CALL_REQUEST_BYTES, WEBHOOK_PATH
from voicebridge.observability.logs import record_fields
from voicebridge.sim.server_messages import auth_headers
from voicebridge.twilio.signature import sign
from voicebridge.web import AFTER_STREAM_PATH, MAX_WEBHOOK_BYTES, VOICE_PATH

#: What a hostile client claims to send: far more than any route takes.
CLAIMED_BYTES = 4_000_000
#: The Vapi webhook's limit in these tests (``control.max_body_bytes``).
VAPI_LIMIT = 8192
#: Chunk size of the bodies sent here.
CHUNK = 4096


def chunk(data: bytes) -> bytes:
    return b"%x\r\n" % len(data) + data + b"\r\n"


def head(path: str, headers: Mapping[str, str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def exchange(port: int, request: bytes, parts: Iterable[bytes] = ()) -> tuple[int, bytes]:
    """Send ``request`` and then ``parts``; the status and body of the answer, which must
    be followed by the server closing the connection."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        for part in parts:
            await stream.send_all(part)
        received = b""
        while data := await stream.receive_some(65536):
            received += data
    answer_head, _, body = received.partition(b"\r\n\r\n")
    status = int(answer_head.split(b" ", 2)[1])
    return status, body


def rejections(caplog: pytest.LogCaptureFixture) -> list[Any]:
    return [
        record_fields(r).get("REASON")
        for r in caplog.records
        if record_fields(r).get("EVENT") == "webhook-rejected"
    ]


# --- authentication before the body ----------------------------------------------------------


@pytest.mark.parametrize(
    ("auth", "bad"),
    [
        ("bearer", {"Authorization": "Bearer not-the-secret"}),
        ("bearer", {}),
        ("secret", {"X-Vapi-Secret": "not-the-secret"}),
    ],
)
@pytest.mark.parametrize("framing", ["Content-Length", "chunked"])
async def test_a_header_credential_is_refused_before_any_of_the_body(
    auth: str, bad: dict[str, str], framing: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Only the head is ever sent: the answer cannot have waited for the body."""
    length = (
        {"Content-Length": str(CLAIMED_BYTES)}
        if framing == "Content-Length"
        else {"Transfer-Encoding": "chunked"}
    )
    with trio.fail_after(10):
        async with running_bridge(**sections(auth)) as bridge:
            with caplog.at_level(logging.WARNING, logger="voicebridge.control.routes"):
                status, _ = await exchange(
                    bridge.listening.port, head(WEBHOOK_PATH, {**bad, **length})
                )
    assert status == 401
    assert rejections(caplog) == ["mismatch" if bad else "missing"], "one log line"


async def test_hmac_without_a_fresh_signature_is_refused_before_the_body(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stale = str(int(time.time()) - 3600)
    claimed = {"Content-Length": str(CLAIMED_BYTES)}
    with trio.fail_after(10):
        async with running_bridge(**sections("hmac")) as bridge:
            port = bridge.listening.port
            with caplog.at_level(logging.WARNING, logger="voicebridge.control.routes"):
                unsigned = await exchange(port, head(WEBHOOK_PATH, claimed))
                old = {"X-Signature": "00", "X-Timestamp": stale, **claimed}
                replayed = await exchange(port, head(WEBHOOK_PATH, old))
    assert (unsigned[0], replayed[0]) == (401, 401)
    assert rejections(caplog) == ["missing", "stale"]


async def test_the_outbound_call_api_refuses_a_wrong_token_before_the_body() -> None:
    with trio.fail_after(10):
        async with running_bridge(
            outbound={"from_number": "+15550100001", "http_enabled": True}, **sections("bearer")
        ) as bridge:
            wrong = {"Authorization": "Bearer nope", "Content-Length": str(CLAIMED_BYTES)}
            status, _ = await exchange(bridge.listening.port, head(CALLS_PATH, wrong))
    assert status == 401


# --- every route's limit, chunked or not -----------------------------------------------------


def over(limit: int) -> list[bytes]:
    """Chunks of one byte more than ``limit``, and no last chunk: the body never ends."""
    total = limit + 1
    return [chunk(b"x" * min(CHUNK, total - start)) for start in range(0, total, CHUNK)]


def route_headers(bridge: Bridge, path: str) -> dict[str, str]:
    """Headers that pass each route's credential check (where it has one in the head)."""
    if path == WEBHOOK_PATH:
        return {"Authorization": f"Bearer {WEBHOOK_SECRET}", "Content-Type": "application/json"}
    if path == CALLS_PATH:
        return {"Authorization": f"Bearer {API_TOKEN}", "Content-Type": "application/json"}
    return {"Content-Type": "application/x-www-form-urlencoded"}


ROUTE_LIMITS = [
    (VOICE_PATH, MAX_WEBHOOK_BYTES),
    (AFTER_STREAM_PATH, MAX_WEBHOOK_BYTES),
    (WEBHOOK_PATH, VAPI_LIMIT),
    (CALLS_PATH, MAX_CALL_REQUEST_BYTES),
]


def limited_bridge() -> Any:
    return running_bridge(
        outbound={"from_number": "+15550100001", "http_enabled": True},
        **sections("bearer", max_body_bytes=VAPI_LIMIT),
    )


@pytest.mark.parametrize(("path", "limit"), ROUTE_LIMITS)
async def test_a_chunked_body_is_refused_as_soon_as_it_passes_the_limit(
    path: str, limit: int, caplog: pytest.LogCaptureFixture
) -> None:
    """One byte over the limit, and the body never ends: the 413 cannot have waited for
    the end, nor read past the limit."""
    with trio.fail_after(10):
        async with limited_bridge() as bridge:
            chunked = {**route_headers(bridge, path), "Transfer-Encoding": "chunked"}
            with caplog.at_level(logging.WARNING):
                status, body = await exchange(
                    bridge.listening.port, head(path, chunked), over(limit)
                )
    assert status == 413, body
    assert rejections(caplog) == ["too-large"]


@pytest.mark.parametrize(("path", "limit"), ROUTE_LIMITS)
async def test_a_declared_length_over_the_limit_is_refused_before_the_body(
    path: str, limit: int
) -> None:
    with trio.fail_after(10):
        async with limited_bridge() as bridge:
            declared = {**route_headers(bridge, path), "Content-Length": str(limit + 1)}
            status, _ = await exchange(bridge.listening.port, head(path, declared))
    assert status == 413


@pytest.mark.parametrize(("method", "path"), [("POST", "/nowhere"), ("POST", "/healthz")])
async def test_a_body_no_route_takes_is_never_read(method: str, path: str) -> None:
    with trio.fail_after(10):
        async with running_bridge() as bridge:
            claimed = {"Content-Length": str(CLAIMED_BYTES)}
            status, _ = await exchange(bridge.listening.port, head(path, claimed))
            endless = {"Transfer-Encoding": "chunked"}
            status_chunked, _ = await exchange(bridge.listening.port, head(path, endless))
    # /healthz lives on the ops listener only: on the public port it is no route either.
    assert status == status_chunked == 404


async def test_quarts_own_limit_counts_only_what_is_not_yet_read() -> None:
    """Why the routes count for themselves (read_body): quart's ``MAX_CONTENT_LENGTH``
    stops a body that piles up unread, but not one read piece by piece, as its form
    parser reads. If this fails, quart enforces totals and read_body could rely on it."""
    limit = 1000
    piecewise = TrioBody(None, limit)
    total = 0
    for _ in range(10):
        piecewise.append(b"x" * 500)
        total += len(await piecewise.__anext__())
    assert total == 5000 > limit
    unread = TrioBody(None, limit)
    unread.append(b"x" * 500)
    unread.append(b"x" * 501)
    with pytest.raises(RequestEntityTooLarge):
        await unread.__anext__()


def signed_voice_webhook(bridge: Bridge, call_sid: str) -> tuple[dict[str, str], bytes]:
    form = {"CallSid": call_sid, "From": "+15550100001", "To": "+15550100002"}
    signature = sign(bridge.url + VOICE_PATH, form, bridge.caller.auth_token)
    body = "&".join(f"{k}={v.replace('+', '%2B')}" for k, v in form.items()).encode()
    headers = {
        "Content-Type": "application/x-www-form-urlencoded",
        "X-Twilio-Signature": signature,
    }
    return headers, body


async def test_chunked_bodies_within_the_limit_are_served() -> None:
    with trio.fail_after(10):
        async with running_bridge(**sections("hmac")) as bridge:
            port = bridge.listening.port
            headers, form = signed_voice_webhook(bridge, "CA" + "7" * 32)
            chunked = {**headers, "Transfer-Encoding": "chunked"}
            pieces = [chunk(form[:10]), chunk(form[10:]), b"0\r\n\r\n"]
            voice = await exchange(port, head(VOICE_PATH, chunked), pieces)

            message = orjson.dumps({"message": {"type": "status-update", "status": "ended"}})
            server = {"url": bridge.url + WEBHOOK_PATH}
            signed = auth_headers(server, HMAC_CREDENTIAL, message, now=time.time())
            vapi_headers = {**signed, "Transfer-Encoding": "chunked"}
            pieces = [chunk(message[:7]), chunk(message[7:]), b"0\r\n\r\n"]
            vapi = await exchange(port, head(WEBHOOK_PATH, vapi_headers), pieces)
    assert voice[0] == 200 and b"<Stream" in voice[1], voice
    assert vapi == (200, b"{}")


# --- tool-call batches -----------------------------------------------------------------------


async def test_a_huge_tool_call_batch_runs_a_bounded_number_and_logs_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every call is answered in order (the assistant is never left waiting), the first
    ``MAX_TOOL_CALLS_PER_REQUEST`` run, the rest get an error; two log lines in all."""
    count = 2000
    names = ["lookup_order" if i % 2 else "no_such_tool" for i in range(count)]
    items = [
        {"id": f"t{i}", "type": "function", "function": {"name": name, "arguments": {}}}
        for i, name in enumerate(names)
    ]
    message = {"message": {"type": "tool-calls", "toolCallList": items, "call": {"id": "v"}}}
    body = orjson.dumps(message)
    with trio.fail_after(20):
        async with running_bridge(**sections("hmac")) as bridge:
            server = {"url": bridge.url + WEBHOOK_PATH}
            headers = auth_headers(server, HMAC_CREDENTIAL, body, now=time.time())
            caplog.clear()
            with caplog.at_level(logging.INFO, logger="voicebridge.control"):
                status, answer = await exchange(
                    bridge.listening.port,
                    head(WEBHOOK_PATH, {**headers, "Content-Length": str(len(body))}),
                    [body],
                )
    assert status == 200
    results = orjson.loads(answer)["results"]
    assert [r["toolCallId"] for r in results] == [f"t{i}" for i in range(count)]
    ran, refused = results[:MAX_TOOL_CALLS_PER_REQUEST], results[MAX_TOOL_CALLS_PER_REQUEST:]
    assert all(r["result"].startswith("Order ?") for r in ran if r["name"] == "lookup_order")
    assert all(
        r["error"] == "unknown tool no_such_tool" for r in ran if r["name"] != "lookup_order"
    )
    assert {r.get("error") for r in refused} == {TOO_MANY_TOOL_CALLS}
    # The control plane's own lines (a loaded test machine may add a loop-stalled one).
    events = [
        str(record_fields(r).get("EVENT"))
        for r in caplog.records
        if r.name.startswith("voicebridge.control")
    ]
    assert sorted(events) == ["tool-calls-refused", "tool-unknown"], [
        r.getMessage() for r in caplog.records
    ]
