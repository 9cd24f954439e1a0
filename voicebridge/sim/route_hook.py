"""The simulated decision hook: an operator's server that decides calls (docs/call-control.md).

Used by tests and ``voicebridge demo``. It checks every request as the documented recipe
says, with its own code (an oracle: nothing here comes from the bridge)::

    X-Voicebridge-Timestamp: <seconds since the epoch>
    X-Voicebridge-Signature: v1=<hex HMAC-SHA256(secret, timestamp + "." + body)>

and refuses a forged or stale request with 401. A good request gets ``answer(message)``
(a Vapi ``assistant-request`` answer, or None for 204), after ``delay_s``; ``status`` and
``raw_answer`` make it misbehave on request::

    hook = SimRouteHook(secret, answer=lambda m: {"assistantId": "asst-vip"})
    port = await nursery.start(hook.serve)
    hook.url          # "http://127.0.0.1:<port>/route"
    hook.requests     # every request: its JSON, whether its signature held, when

As its own process (the load test's ``--route-hook``: a peer measured in its own event
loop, not the load generator's), answering every request at once with overrides::

    VOICEBRIDGE_SIM_ROUTE_HOOK_SECRET=… python -m voicebridge.sim.route_hook
    # prints its URL on one line, then serves until killed
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import trio

from voicebridge.sim.wire import HttpRequest, HttpResponse, SimWebSocket, serve_http_ws

#: What the simulated server accepts as the age of a request's timestamp (either way).
MAX_SKEW_S = 300.0
PATH = "/route"

Answer = Callable[[Mapping[str, Any]], Mapping[str, Any] | None]


@attrs.frozen(kw_only=True)
class HookRequest:
    """One request the hook received."""

    message: Mapping[str, Any]
    signature_valid: bool
    #: The request as it came: its body bytes and headers (names lower-case).
    body: bytes
    headers: Mapping[str, str]
    #: ``trio.current_time()`` when it arrived.
    at: float


def expected_signature(secret: bytes, timestamp: str, body: bytes) -> str:
    """The documented recipe, written here on its own."""
    digest = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return "v1=" + digest


class SimRouteHook:
    """A decision hook server on loopback."""

    def __init__(
        self,
        secret: bytes,
        *,
        answer: Answer = lambda message: None,
        delay_s: float = 0.0,
        status: int = 200,
        raw_answer: bytes | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.secret = secret
        self.answer = answer
        self.delay_s = delay_s
        self.status = status
        self.raw_answer = raw_answer
        self._clock = clock
        self.requests: list[HookRequest] = []
        self._port: int | None = None

    @property
    def url(self) -> str:
        if self._port is None:
            raise RuntimeError("SimRouteHook is not serving yet")
        return f"http://127.0.0.1:{self._port}{PATH}"

    async def serve(
        self,
        *,
        host: str = "127.0.0.1",
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve on ``host`` (a free port) until cancelled."""
        async with trio.open_nursery() as nursery:
            self._port = await nursery.start(
                functools.partial(serve_http_ws, self._handle, _no_websockets, host=host)
            )
            task_status.started(self._port)

    def _signature_valid(self, request: HttpRequest) -> bool:
        timestamp = request.headers.get("x-voicebridge-timestamp", "")
        signature = request.headers.get("x-voicebridge-signature", "")
        if not timestamp.isdigit() or abs(self._clock() - int(timestamp)) > MAX_SKEW_S:
            return False
        expected = expected_signature(self.secret, timestamp, request.body)
        return hmac.compare_digest(expected.encode(), signature.encode("utf-8", "replace"))

    async def _handle(self, request: HttpRequest) -> HttpResponse:
        if request.method != "POST" or request.path != PATH:
            return HttpResponse(status=404)
        valid = self._signature_valid(request)
        try:
            body = json.loads(request.body)
            message = body["message"] if isinstance(body, dict) else {}
        except (ValueError, KeyError):
            message = {}
        self.requests.append(
            HookRequest(
                message=message,
                signature_valid=valid,
                body=request.body,
                headers=dict(request.headers),
                at=trio.current_time(),
            )
        )
        if not valid:
            return HttpResponse(status=401, body=b'{"error": "bad signature"}')
        await trio.sleep(self.delay_s)
        json_type = (("content-type", "application/json"),)
        if self.raw_answer is not None:
            return HttpResponse(status=self.status, headers=json_type, body=self.raw_answer)
        answer = self.answer(message)
        if answer is None:
            return HttpResponse(status=204)
        return HttpResponse(
            status=self.status, headers=json_type, body=json.dumps(answer).encode()
        )


async def _no_websockets(request: HttpRequest, ws: SimWebSocket) -> None:
    await ws.reject(404)


#: The environment variable that gives ``main`` its secret.
SECRET_ENV = "VOICEBRIDGE_SIM_ROUTE_HOOK_SECRET"
#: What ``main``'s hook answers: the call's route, with overrides (which then travel
#: under the stream token too).
OVERRIDES_ANSWER = {"assistantOverrides": {"variableValues": {"tier": "gold"}}}


def main() -> int:
    """Serve a hook on 127.0.0.1 that answers ``OVERRIDES_ANSWER``; print its URL."""
    hook = SimRouteHook(os.environ[SECRET_ENV].encode(), answer=lambda m: OVERRIDES_ANSWER)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(hook.serve)
            print(hook.url, flush=True)

    trio.run(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
