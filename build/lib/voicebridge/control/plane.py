"""What Vapi's server webhooks do: tools, transfers, hang-ups, call records; and outbound calls.

``ControlPlane`` answers each parsed webhook message (``control.messages``) and is
the ``CallControl`` the calls of this process attach to. A transfer or hang-up
reaches the call wherever it is: a call held by this process is handed over
(``Call.hand_over``: the goodbye plays to its end, confirmed by Twilio's marks, then
the ``<Connect action>`` TwiML dials or hangs up and the Vapi leg gets ``end-call``);
a call held by another process is moved through Twilio's REST API by its CallSid,
after ``transfer.remote_delay_s`` (no marks can be seen from here). The REST work
runs after the webhook is answered, as a task of the app's background nursery.
"""

from __future__ import annotations

import logging
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from typing import Any, Final

import httpx
import orjson
import trio
from twilio.twiml.voice_response import VoiceResponse

from voicebridge.bridge.call import Call
from voicebridge.bridge.outcome import Handover, Outcome
from voicebridge.config import Config
from voicebridge.control import messages as msg
from voicebridge.control.assistants import outbound_assistant, outbound_voice_url
from voicebridge.control.auth import WebhookAuthenticator
from voicebridge.control.tools import ResultMemory, ToolContext, ToolDispatcher
from voicebridge.errors import VoicebridgeError
from voicebridge.observability.logs import FieldValue, log_event
from voicebridge.twilio.rest import TwilioRest, TwilioRestError

log = logging.getLogger(__name__)

#: Vapi call id -> CallSid of calls this process held, kept for reports that arrive
#: after the call ended (``end-of-call-report`` comes last). Bounded, oldest forgotten.
MAX_REMEMBERED_CALLS: Final = 10_000
#: Longest summary put in a log line.
MAX_SUMMARY_CHARS: Final = 500
#: The result the end-call tool gives the assistant.
END_CALL_RESULT: Final = "Ending the call now. Say a short goodbye."
#: Tool calls run from one webhook; the rest get an error result without running. A
#: model asks for a handful in parallel per turn; 64 is far above that, and bounds the
#: tasks, handler threads and log lines one request can cause (the body alone could
#: carry tens of thousands).
MAX_TOOL_CALLS_PER_REQUEST: Final = 64
#: The error result of a tool call past that bound.
TOO_MANY_TOOL_CALLS: Final = (
    f"not run: more than {MAX_TOOL_CALLS_PER_REQUEST} tool calls in one request"
)
#: Unknown tool names shown in the one warning about a request that called them.
MAX_UNKNOWN_NAMES_LOGGED: Final = 5
#: Tool arguments that may name a transfer destination, in the order they are read.
DESTINATION_ARGUMENTS: Final = ("destination", "number", "phoneNumber")

#: Starts ``work`` after the webhook is answered, under the app's background nursery.
Spawn = Callable[[Callable[[], Awaitable[None]]], None]


class ControlError(VoicebridgeError):
    """Call control cannot do what was asked (not configured, or not allowed). Safe to log."""


def transfer_twiml(destination: str, *, caller_id: str = "") -> str:
    """``<Dial>`` the destination (a number or ``sip:`` URI), then hang up."""
    response = VoiceResponse()
    if destination.startswith("sip:"):
        response.dial(caller_id=caller_id or None).sip(destination)
    else:
        response.dial(destination, caller_id=caller_id or None)
    response.hangup()
    return str(response)


def _hangup_twiml() -> str:
    response = VoiceResponse()
    response.hangup()
    return str(response)


class ControlPlane:
    """Answers Vapi's webhooks and acts on calls; ``bridge.call.CallControl`` for live calls."""

    def __init__(
        self,
        config: Config,
        *,
        dispatcher: ToolDispatcher,
        rest: TwilioRest | None,
        voice_url: str,
    ) -> None:
        self._config = config
        self._dispatcher = dispatcher
        self._rest = rest
        self._voice_url = voice_url
        self._memory = ResultMemory()
        self._calls: dict[str, Call] = {}
        self._recent: OrderedDict[str, str] = OrderedDict()
        # CallSid -> the handover under way for it. Vapi may ask for the same one twice
        # (a transfer-destination-request, then the phone-call-control forward to that
        # destination; or a retry): the repeat is acknowledged, never carried out again.
        self._handovers: OrderedDict[str, Handover] = OrderedDict()
        self.authenticator: WebhookAuthenticator | None = None
        if config.control.enabled:
            self.authenticator = WebhookAuthenticator.from_config(
                config.control, config.credentials.vapi_webhook_secret.reveal()
            )

    @classmethod
    def from_config(
        cls, config: Config, http: httpx.AsyncClient, *, voice_url: str
    ) -> ControlPlane:
        """Import the tool handlers (``ConfigError`` for a bad one) and build the REST client
        when the Twilio account and auth token are configured."""
        dispatcher = ToolDispatcher.from_config(
            config.tools.handlers, deadline_s=config.tools.deadline_s, http=http
        )
        rest = TwilioRest.from_config(http, config)
        return cls(config, dispatcher=dispatcher, rest=rest, voice_url=voice_url)

    @property
    def config(self) -> Config:
        return self._config

    # -- bridge.call.CallControl -------------------------------------------------------

    def attach(self, call_sid: str, call: Call) -> None:
        self._calls[call_sid] = call

    def detach(self, call_sid: str, call: Call) -> None:
        if self._calls.get(call_sid) is call:
            del self._calls[call_sid]
        if call.vapi_call_id:
            self._recent[call.vapi_call_id] = call_sid
            while len(self._recent) > MAX_REMEMBERED_CALLS:
                self._recent.popitem(last=False)

    async def on_digit(self, call_sid: str, vapi_call_id: str, digit: str) -> str | None:
        """Run the configured DTMF tool, if any; its result goes to the assistant."""
        name = self._config.control.dtmf_tool
        if not name:
            return None
        call = msg.ToolCall(id=f"dtmf-{uuid.uuid4()}", name=name, arguments={"digit": digit})
        context = ToolContext(
            call_sid=call_sid, vapi_call_id=vapi_call_id, tool_call_id=call.id, tool_name=name
        )
        result = await self._dispatcher.run(call, context)
        return result.result or None

    # -- webhooks ----------------------------------------------------------------------

    async def handle(self, message: msg.ServerMessage, spawn: Spawn) -> bytes:
        """The HTTP 200 answer to one authenticated webhook message."""
        ref = self._resolve(message.call)
        if isinstance(message, msg.ToolCallsRequest):
            results = await self._run_tool_calls(message, ref, spawn)
            return msg.encode_results(results, legacy=message.legacy)
        if isinstance(message, msg.TransferDestinationRequest):
            return self._destination_request(ref, spawn)
        if isinstance(message, msg.PhoneCallControl):
            return self._phone_call_control(message, ref, spawn)
        if isinstance(message, msg.StatusReport):
            self._log_status(message, ref)
        elif isinstance(message, msg.EndOfCallReport):
            self._log_report(message, ref)
        else:
            log.debug("Vapi webhook %s for call %s: ignored", message.type, ref.call_sid or "?")
        return b"{}"

    def _resolve(self, ref: msg.CallRef) -> msg.CallRef:
        """Fill in the CallSid from the calls this process holds or held, by Vapi call id."""
        if ref.call_sid or not ref.vapi_call_id:
            return ref
        call_sid = self._recent.get(ref.vapi_call_id, "")
        if not call_sid:
            for sid, call in self._calls.items():
                if call.vapi_call_id == ref.vapi_call_id:
                    call_sid = sid
                    break
        return msg.CallRef(vapi_call_id=ref.vapi_call_id, call_sid=call_sid)

    async def _run_tool_calls(
        self, request: msg.ToolCallsRequest, ref: msg.CallRef, spawn: Spawn
    ) -> list[msg.ToolResult]:
        """The results of every call of the request, in order.

        The first ``MAX_TOOL_CALLS_PER_REQUEST`` run at once, each bounded by the tool
        deadline; the rest get the ``TOO_MANY_TOOL_CALLS`` error without running. Calls
        of tools nobody handles get an error result and one warning per request.
        Cancellation cancels the tools still running.
        """
        calls = request.tool_calls[:MAX_TOOL_CALLS_PER_REQUEST]
        excess = request.tool_calls[MAX_TOOL_CALLS_PER_REQUEST:]
        results: list[msg.ToolResult | None] = [None] * len(calls)
        unknown = [call.name for call in calls if not self._known(call.name)]

        async def run_one(index: int, call: msg.ToolCall) -> None:
            compute = partial(self._run_tool, call, ref, spawn)
            if request.legacy:
                results[index] = await compute()
            else:
                results[index] = await self._memory.run_once(call.id, compute)

        async with trio.open_nursery() as tools_nursery:
            for index, call in enumerate(calls):
                tools_nursery.start_soon(run_one, index, call)
        if unknown:
            names = sorted(set(unknown))
            shown = ", ".join(
                repr(name[: msg.MAX_TYPE_CHARS]) for name in names[:MAX_UNKNOWN_NAMES_LOGGED]
            )
            more = len(names) - MAX_UNKNOWN_NAMES_LOGGED
            _log_call(
                logging.WARNING,
                "tool-unknown",
                f"call {ref.call_sid or '?'}: {len(unknown)} call(s) of unknown tool(s) "
                f"{shown}" + (f" and {more} more" if more > 0 else ""),
                ref,
                tool=names[0][: msg.MAX_TYPE_CHARS],
                count=len(unknown),
            )
        if excess:
            _log_call(
                logging.WARNING,
                "tool-calls-refused",
                f"call {ref.call_sid or '?'}: {len(request.tool_calls)} tool calls in one "
                f"request; the {len(excess)} past the first {MAX_TOOL_CALLS_PER_REQUEST} "
                "were answered with an error without running",
                ref,
                count=len(request.tool_calls),
                refused=len(excess),
            )
        return [result for result in results if result is not None] + [
            msg.ToolResult(tool_call_id=call.id, name=call.name, error=TOO_MANY_TOOL_CALLS)
            for call in excess
        ]

    def _known(self, name: str) -> bool:
        tools = self._config.tools
        return name in (tools.transfer_tool, tools.end_call_tool) or self._dispatcher.knows(name)

    async def _run_tool(self, call: msg.ToolCall, ref: msg.CallRef, spawn: Spawn) -> msg.ToolResult:
        tools = self._config.tools
        if tools.transfer_tool and call.name == tools.transfer_tool:
            return self._transfer_tool(call, ref, spawn)
        if tools.end_call_tool and call.name == tools.end_call_tool:
            handover = Handover(outcome=Outcome.ENDED_BY_CONTROL, detail="end-call tool")
            error = self._hand_over(ref, handover, spawn)
            if error:
                return msg.ToolResult(tool_call_id=call.id, name=call.name, error=error)
            return msg.ToolResult(tool_call_id=call.id, name=call.name, result=END_CALL_RESULT)
        if not self._dispatcher.knows(call.name):
            # Logged once for the whole request (_run_tool_calls).
            return msg.ToolResult(
                tool_call_id=call.id, name=call.name, error=f"unknown tool {call.name}"
            )
        context = ToolContext(
            call_sid=ref.call_sid,
            vapi_call_id=ref.vapi_call_id,
            tool_call_id=call.id,
            tool_name=call.name,
        )
        return await self._dispatcher.run(call, context)

    def _transfer_tool(self, call: msg.ToolCall, ref: msg.CallRef, spawn: Spawn) -> msg.ToolResult:
        try:
            destination = self._allowed_destination(_requested_destination(call.arguments), ref)
        except ControlError as exc:
            return msg.ToolResult(tool_call_id=call.id, name=call.name, error=str(exc))
        error = self._hand_over(ref, _transfer(destination), spawn)
        if error:
            return msg.ToolResult(tool_call_id=call.id, name=call.name, error=error)
        return msg.ToolResult(
            tool_call_id=call.id, name=call.name, result=self._config.transfer.result
        )

    def _allowed_destination(self, requested: str, ref: msg.CallRef) -> str:
        """The destination to dial: the requested one if allowed, else the default."""
        transfer = self._config.transfer
        if not requested:
            if not transfer.default_destination:
                raise ControlError("no destination given and no default transfer destination")
            return transfer.default_destination
        if requested == transfer.default_destination or requested in transfer.allowed:
            return requested
        _log_call(
            logging.WARNING,
            "transfer-refused",
            f"call {ref.call_sid or '?'}: transfer to a number outside the allow-list refused",
            ref,
            destination=requested[:40],
        )
        raise ControlError("that destination is not an allowed transfer target")

    def _destination_request(self, ref: msg.CallRef, spawn: Spawn) -> bytes:
        """Vapi asks where to transfer: the default destination, which we then dial."""
        destination = self._config.transfer.default_destination
        if not destination:
            return orjson.dumps({"error": "no transfer destination is configured"})
        error = self._hand_over(ref, _transfer(destination), spawn)
        if error:
            return orjson.dumps({"error": error})
        return orjson.dumps(
            {
                "destination": {
                    "type": "sip" if destination.startswith("sip:") else "number",
                    ("sipUri" if destination.startswith("sip:") else "number"): destination,
                }
            }
        )

    def _phone_call_control(
        self, message: msg.PhoneCallControl, ref: msg.CallRef, spawn: Spawn
    ) -> bytes:
        if message.request == "hang-up":
            handover = Handover(outcome=Outcome.ENDED_BY_CONTROL, detail="phone-call-control")
        else:
            try:
                handover = _transfer(self._allowed_destination(message.destination, ref))
            except ControlError as exc:
                return orjson.dumps({"error": str(exc)})
        error = self._hand_over(ref, handover, spawn)
        return orjson.dumps({"error": error}) if error else b"{}"

    def _hand_over(self, ref: msg.CallRef, handover: Handover, spawn: Spawn) -> str:
        """Hand the call over here, or through Twilio's REST API; "" or why not.

        A request for the handover already under way is acknowledged ("") and not
        acted on again; a different one is refused.
        """
        if not ref.call_sid:
            return "the call's Twilio CallSid is unknown"
        earlier = self._handovers.get(ref.call_sid)
        if earlier is not None:
            if (earlier.outcome, earlier.transfer_to) == (handover.outcome, handover.transfer_to):
                return ""
            return f"the call is already being handed over ({earlier.outcome.value})"
        call = self._calls.get(ref.call_sid)
        if call is not None:
            if not call.hand_over(handover):
                return "the call is already ending"
            where = "here"
        elif self._rest is None:
            return "the call is held elsewhere and Twilio REST credentials are not configured"
        else:
            where = "Twilio REST"
            spawn(partial(self._hand_over_remotely, ref, handover))
        self._handovers[ref.call_sid] = handover
        while len(self._handovers) > MAX_REMEMBERED_CALLS:
            self._handovers.popitem(last=False)
        self._log_handover(ref, handover, where)
        return ""

    async def _hand_over_remotely(self, ref: msg.CallRef, handover: Handover) -> None:
        assert self._rest is not None
        await trio.sleep(self._config.transfer.remote_delay_s)
        try:
            if handover.outcome is Outcome.TRANSFERRED:
                twiml = transfer_twiml(
                    handover.transfer_to, caller_id=self._config.transfer.caller_id
                )
                done = await self._rest.redirect(ref.call_sid, twiml)
            else:
                done = await self._rest.hang_up(ref.call_sid)
        except TwilioRestError as exc:
            self._handovers.pop(ref.call_sid, None)  # a later request may try again
            _log_call(
                logging.WARNING,
                "handover-failed",
                f"call {ref.call_sid}: {handover.outcome.value} through Twilio REST failed: {exc}",
                ref,
            )
            return
        if not done:
            log.info("call %s was already gone before its %s", ref.call_sid, handover.outcome.value)

    def _log_handover(self, ref: msg.CallRef, handover: Handover, where: str) -> None:
        _log_call(
            logging.INFO,
            "call-handover",
            f"call {ref.call_sid}: {handover.outcome.value} requested ({where})"
            + (f" to {handover.transfer_to}" if handover.transfer_to else ""),
            ref,
            outcome=handover.outcome.value,
            destination=handover.transfer_to or None,
            via=where,
        )

    def _log_status(self, message: msg.StatusReport, ref: msg.CallRef) -> None:
        level = logging.INFO if message.status in ("ended", "forwarding") else logging.DEBUG
        _log_call(
            level,
            "vapi-status",
            f"call {ref.call_sid or '?'}: Vapi status {message.status[:40]}"
            + (f" ({message.ended_reason[:100]})" if message.ended_reason else ""),
            ref,
            vapi_status=message.status[:40],
            ended_reason=message.ended_reason[:100] or None,
            destination=message.destination[:40] or None,
        )

    def _log_report(self, report: msg.EndOfCallReport, ref: msg.CallRef) -> None:
        summary = msg.single_line(report.summary)[:MAX_SUMMARY_CHARS]
        cost = f", cost {report.cost:g}" if report.cost is not None else ""
        _log_call(
            logging.INFO,
            "vapi-call-report",
            f"call {ref.call_sid or '?'}: Vapi ended it ({report.ended_reason[:100] or '?'}){cost}",
            ref,
            ended_reason=report.ended_reason[:100] or None,
            cost=report.cost,
            summary=summary or None,
            started_at=report.started_at[:40] or None,
            ended_at=report.ended_at[:40] or None,
            recording_url=report.recording_url[:300] or None,
        )

    # -- outbound calls ----------------------------------------------------------------

    async def place_call(self, to: str, *, assistant: str = "") -> str:
        """Place an outbound call to ``to``; its TwiML is our voice webhook. Its CallSid.

        ``assistant``: one of ``outbound.assistants``; "" for ``vapi.assistant_id``.
        Raises ``AssistantRefused`` for any other, ``ControlError`` when outbound calls
        are not configured and ``TwilioRestError`` when Twilio refuses.
        """
        return await place_outbound_call(
            self._rest, self._config, voice_url=self._voice_url, to=to, assistant=assistant
        )


async def place_outbound_call(
    rest: TwilioRest | None, config: Config, *, voice_url: str, to: str, assistant: str = ""
) -> str:
    """``POST Calls.json`` with ``Url`` = our voice webhook, so the call reaches the assistant
    the way an inbound one does (signed webhook, admission, stream token). A named
    ``assistant`` rides in that URL with its grant (``control.assistants``)."""
    if rest is None:
        raise ControlError("outbound calls need twilio.account_sid and the Twilio auth token")
    from_number = config.outbound.from_number
    if not from_number:
        raise ControlError("outbound calls need outbound.from_number")
    url = outbound_voice_url(config, voice_url, to=to, assistant=assistant)
    chosen = outbound_assistant(config, assistant)
    sid = await rest.create_call(to=to, from_=from_number, url=url)
    log_event(
        log,
        logging.INFO,
        "call-placed",
        f"outbound call {sid} to {to} placed" + (f" for assistant {chosen}" if chosen else ""),
        call_sid=sid,
        to=to,
        assistant=chosen or None,
    )
    return sid


def _log_call(level: int, event: str, text: str, ref: msg.CallRef, **fields: FieldValue) -> None:
    """One log event about a call, joined to its other lines by CallSid and Vapi call id."""
    log_event(
        log,
        level,
        event,
        text,
        call_sid=ref.call_sid or None,
        vapi_call_id=ref.vapi_call_id or None,
        **fields,
    )


def _transfer(destination: str) -> Handover:
    return Handover(
        outcome=Outcome.TRANSFERRED, detail=f"transferred to {destination}", transfer_to=destination
    )


def _requested_destination(arguments: Mapping[str, Any]) -> str:
    for key in DESTINATION_ARGUMENTS:
        value = arguments.get(key)
        if isinstance(value, dict):
            value = value.get("number") or value.get("sipUri")
        if isinstance(value, str) and value.strip():
            return value.strip()
    return ""
