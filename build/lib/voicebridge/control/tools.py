"""Tool handlers: load them from config, run one tool call under a deadline, remember results.

A handler is a Python callable named ``"package.module:function"`` (sync or async,
called as ``function(arguments, context)``) or an http(s) URL the call is forwarded
to. ``ToolDispatcher.run`` never raises (but ``Cancelled``): whatever the handler
does — raises, hangs past the deadline, returns something that is not text — the
tool call gets a one-line ``error`` result, and the webhook is still answered.
``ResultMemory`` makes a tool call idempotent per ``toolCallId``: Vapi may retry a
webhook, and a retry gets the first answer instead of running the tool again.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, Protocol

import httpx
import orjson
import trio
from attrs import frozen

from voicebridge.control.messages import ToolCall, ToolResult
from voicebridge.errors import ConfigError, VoicebridgeError

log = logging.getLogger(__name__)

#: Sync handlers run in worker threads so that they never block the event loop. A hung
#: one is abandoned at its deadline but keeps its thread: at most this many run at
#: once, so hung handlers cannot take every thread of the process.
MAX_TOOL_THREADS: Final = 16
#: Tool results remembered for retries: how many, and for how long. Vapi retries (only
#: with a backoffPlan) within its server timeout plus backoff, well under 10 minutes.
MAX_REMEMBERED_RESULTS: Final = 10_000
RESULT_MEMORY_S: Final = 600.0
#: Most bytes read from an HTTP handler's answer.
MAX_HTTP_ANSWER_BYTES: Final = 256 * 1024


class ToolError(VoicebridgeError):
    """A tool cannot give a result; the message becomes the tool call's ``error``."""


@frozen(kw_only=True)
class ToolContext:
    """What a handler learns about the call besides its arguments."""

    #: The Twilio CallSid ("" when Vapi's message did not carry it).
    call_sid: str
    vapi_call_id: str
    tool_call_id: str
    tool_name: str


class ToolHandler(Protocol):
    """Runs one tool call; returns its result text or raises (any exception: an error)."""

    async def __call__(self, arguments: Mapping[str, Any], context: ToolContext) -> str: ...


PythonFunction = Callable[[Mapping[str, Any], ToolContext], Any]


def load_function(spec: str, *, key: str = "tools.handlers") -> PythonFunction:
    """Import ``"package.module:function"``. Raises ``ConfigError(key, …)`` when it cannot."""
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import-time failure of the operator's module
        raise ConfigError(key, f"cannot import {module_name}: {exc}") from None
    function = getattr(module, attribute, None)
    if not callable(function):
        raise ConfigError(key, f"{spec}: {module_name} has no function {attribute}")
    return function  # type: ignore[no-any-return]


def check_handlers(handlers: Mapping[str, str]) -> None:
    """Import every Python handler of ``[tools] handlers``, as ``serve`` does at start.

    Raises ``ConfigError`` (key ``tools.handlers.<name>``) for the first that cannot be.
    """
    for name, spec in handlers.items():
        if not spec.startswith(("http://", "https://")):
            load_function(spec, key=f"tools.handlers.{name}")


class PythonTool:
    """A Python callable as a ``ToolHandler``: awaited if async, else run in a thread."""

    def __init__(self, function: PythonFunction, limiter: trio.CapacityLimiter) -> None:
        self._function = function
        self._limiter = limiter
        self._is_async = inspect.iscoroutinefunction(function)

    async def __call__(self, arguments: Mapping[str, Any], context: ToolContext) -> str:
        if self._is_async:
            value = await self._function(arguments, context)
        else:
            value = await trio.to_thread.run_sync(
                functools.partial(self._function, arguments, context),
                abandon_on_cancel=True,
                limiter=self._limiter,
            )
            if inspect.isawaitable(value):
                value = await value
        return result_text(value)


class HttpTool:
    """Forwards a tool call as ``POST {url}`` with JSON ``{name, arguments, toolCallId, call}``.

    A 2xx answer of JSON ``{"result": …}`` or ``{"error": …}`` is used as is; any other
    2xx body is the result text. Non-2xx answers are errors.
    """

    def __init__(self, url: str, http: httpx.AsyncClient) -> None:
        self._url = url
        self._http = http

    async def __call__(self, arguments: Mapping[str, Any], context: ToolContext) -> str:
        body = {
            "name": context.tool_name,
            "arguments": dict(arguments),
            "toolCallId": context.tool_call_id,
            "call": {"callSid": context.call_sid, "vapiCallId": context.vapi_call_id},
        }
        try:
            response = await self._http.post(
                self._url, content=orjson.dumps(body), headers={"Content-Type": "application/json"}
            )
        except httpx.HTTPError as exc:
            raise ToolError(f"tool server unreachable ({type(exc).__name__})") from None
        content = response.content[:MAX_HTTP_ANSWER_BYTES]
        if not response.is_success:
            raise ToolError(f"tool server answered HTTP {response.status_code}")
        try:
            answer = orjson.loads(content)
        except orjson.JSONDecodeError:
            return content.decode("utf-8", errors="replace")
        if isinstance(answer, dict) and isinstance(answer.get("error"), str):
            raise ToolError(answer["error"])
        if isinstance(answer, dict) and "result" in answer:
            return result_text(answer["result"])
        return result_text(answer)


def result_text(value: object) -> str:
    """A handler's return value as result text: a string as is, JSON data as compact JSON.

    ``None`` and anything JSON cannot carry are a ``ToolError``.
    """
    if isinstance(value, str):
        return value
    if value is None:
        raise ToolError("the tool returned nothing")
    if isinstance(value, bool | int | float | list | dict):
        try:
            return orjson.dumps(value).decode()
        except (TypeError, orjson.JSONEncodeError):
            pass
    raise ToolError(f"the tool returned a {type(value).__name__}, not text")


class ToolDispatcher:
    """The configured tools by name; ``run`` answers one call within ``deadline_s``."""

    def __init__(self, handlers: Mapping[str, ToolHandler], *, deadline_s: float) -> None:
        self._handlers = dict(handlers)
        self.deadline_s = deadline_s

    @classmethod
    def from_config(
        cls, handlers: Mapping[str, str], *, deadline_s: float, http: httpx.AsyncClient
    ) -> ToolDispatcher:
        """Import every Python handler now (a bad one is a ``ConfigError`` at start-up)."""
        limiter = trio.CapacityLimiter(MAX_TOOL_THREADS)
        built: dict[str, ToolHandler] = {}
        for name, spec in handlers.items():
            if spec.startswith(("http://", "https://")):
                built[name] = HttpTool(spec, http)
            else:
                built[name] = PythonTool(load_function(spec, key=f"tools.handlers.{name}"), limiter)
        return cls(built, deadline_s=deadline_s)

    def knows(self, name: str) -> bool:
        return name in self._handlers

    async def run(self, call: ToolCall, context: ToolContext) -> ToolResult:
        """The tool's result, or an ``error`` result; never raises but ``Cancelled``."""
        handler = self._handlers.get(call.name)
        if handler is None:
            return _failed(call, context, f"unknown tool {call.name}")
        with trio.move_on_after(self.deadline_s):
            try:
                text = await handler(call.arguments, context)
            except ToolError as exc:
                return _failed(call, context, str(exc))
            except Exception as exc:  # the handler's own bug: an error result, and a log line
                log.warning(
                    "tool %s failed for call %s: %s: %s",
                    call.name,
                    context.call_sid or context.vapi_call_id,
                    type(exc).__name__,
                    exc,
                )
                return _failed(call, context, f"the tool failed ({type(exc).__name__})")
            return ToolResult(tool_call_id=call.id, name=call.name, result=text)
        return _failed(call, context, f"the tool did not answer within {self.deadline_s:g} s")


def _failed(call: ToolCall, context: ToolContext, error: str) -> ToolResult:
    log.info("tool %s for call %s: error: %s", call.name, context.call_sid or "?", error)
    return ToolResult(tool_call_id=call.id, name=call.name, error=error)


class _Pending:
    def __init__(self) -> None:
        self.done = trio.Event()


class ResultMemory:
    """Results by ``toolCallId``: a retry of a finished call gets the same result, and a
    retry of a call still running waits for it instead of running the tool again."""

    def __init__(self, *, clock: Callable[[], float] = trio.current_time) -> None:
        self._clock = clock
        self._running: dict[str, _Pending] = {}
        # tool call id -> (result, when it was stored), oldest first
        self._results: OrderedDict[str, tuple[ToolResult, float]] = OrderedDict()

    async def run_once(self, key: str, compute: Callable[[], Awaitable[ToolResult]]) -> ToolResult:
        while (pending := self._running.get(key)) is not None:
            await pending.done.wait()
        remembered = self._results.get(key)
        if remembered is not None:
            return remembered[0]
        pending = _Pending()
        self._running[key] = pending
        try:
            result = await compute()
            self._remember(key, result)
            return result
        finally:
            # Cancelled before a result: nothing is remembered and a retry runs the tool.
            del self._running[key]
            pending.done.set()

    def _remember(self, key: str, result: ToolResult) -> None:
        now = self._clock()
        self._results[key] = (result, now)
        self._results.move_to_end(key)
        while self._results:
            _, (_, stored_at) = next(iter(self._results.items()))
            if len(self._results) > MAX_REMEMBERED_RESULTS or now - stored_at > RESULT_MEMORY_S:
                self._results.popitem(last=False)
            else:
                break
