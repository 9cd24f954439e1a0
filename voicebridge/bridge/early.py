"""The assistant call created early: while Twilio sets up the media stream.

Without it the caller waits, one after the other, for Twilio to open the stream after
the voice webhook's answer, and for Vapi to create the call after the stream's
``start``. With ``[vapi] create_early`` the voice webhook starts the create as it
answers, and the stream's ``Call`` takes the created call instead of creating one:
whichever process of the box the stream lands on (``boxstate.SharedDir`` carries the
created call's id and socket URL between them).

Only the create is early. The transport socket is connected when the stream has
started, as without it: Vapi starts the assistant (its first message, its silence
rules) when the socket connects, a socket cannot move to the process that got the
stream, and an unconnected created call costs nothing but a concurrency slot.

Invariants:
- at most one assistant call per CallSid is created early (one per new admission; the
  box admits a CallSid once), and a stream's ``Call`` creates its own only when no
  early call is (or can still become) available to it: never two at a time;
- every early call is taken by the call's stream, or ended by the process that
  created it: when no stream took it within ``wait_s`` of the webhook's answer, or when
  that process stops (a drain) before one did. Ending it connects its socket and says
  ``end-call`` (``bridge.call.end_through_socket``), as the bridge ends every call it
  leaves (``monitor.controlUrl`` is not in every create answer), counted and logged.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, Literal

import orjson
import trio
from attrs import Factory, define

from voicebridge.bridge.call import AssistantCall, AssistantConnector, end_through_socket
from voicebridge.observability.logs import log_event
from voicebridge.routing import decode_decision
from voicebridge.sockets import PingableSocket
from voicebridge.twilio.token import StreamClaims
from voicebridge.vapi.client import VapiCall, VapiError

if TYPE_CHECKING:
    from voicebridge.boxstate import SharedDir

log = logging.getLogger(__name__)

#: How often a process whose stream's early call is still being created by another
#: process of the box looks again. The shared directory has no cross-process wake-up;
#: the wait is bounded by ``vapi.create_deadline_s`` and costs one stat per look.
SHARED_POLL_S = 0.01
#: Beyond ``vapi.create_deadline_s``, how long a stream waits for another process's
#: create before creating its own (that process died, or its directory failed).
SHARED_WAIT_MARGIN_S = 1.0

#: What became of an early call (``voicebridge_assistant_calls_created_early_total``).
EarlyFate = Literal["taken", "unused", "failed"]


class _Phase(enum.Enum):
    CREATING = "creating"
    READY = "ready"
    TAKEN = "taken"
    FAILED = "failed"
    ENDED = "ended"


@define
class _Early:
    """One CallSid's early call in the process that creates it."""

    # Invariant: ``call`` is set exactly in READY and TAKEN (and ENDED, once it was ready).
    phase: _Phase
    call: AssistantCall | None = None
    #: Set once the create is over (READY or FAILED).
    settled: trio.Event = Factory(trio.Event)
    #: Set when this process's stream took it.
    taken: trio.Event = Factory(trio.Event)


class EarlyCalls:
    """One process's early calls; ``run`` owns their tasks (start it before serving).

    ``shared``: the box's directory (None: one process). ``on_fate``: counts what became
    of each early call.
    """

    def __init__(
        self,
        *,
        shared: SharedDir | None = None,
        on_fate: Callable[[EarlyFate], None] | None = None,
    ) -> None:
        self._shared = shared
        #: Counts what became of each early call (the server sets its metrics' here).
        self.on_fate = on_fate
        self._nursery: trio.Nursery | None = None
        # call_sid -> the early call this process creates or created, until it is over.
        self._calls: dict[str, _Early] = {}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled. On cancellation every early call not taken yet is ended
        (shielded, within its connect and end deadlines) before this returns."""
        async with trio.open_nursery() as early_nursery:
            self._nursery = early_nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    @property
    def pending(self) -> int:
        """Early calls of this process not yet taken or ended."""
        return len(self._calls)

    def start(
        self,
        connector: AssistantConnector,
        claims: StreamClaims,
        *,
        wait_s: float,
        create_deadline_s: float,
        end_deadline_s: float,
    ) -> bool:
        """Start creating ``claims.call_sid``'s assistant call (the voice webhook's new
        admission); False when it is not (already started, not running, or the shared
        directory could not say so to the box's other processes, whose stream would then
        create a second call). Returns at once; the webhook's answer need not wait."""
        call_sid = claims.call_sid
        if self._nursery is None or call_sid in self._calls:
            return False
        try:
            decision = decode_decision(claims.decision)
        except ValueError:
            return False  # the stream's own call reports it
        if self._shared is not None and not self._shared.publish_early_call(
            call_sid, _encode(_Phase.CREATING), first=True
        ):
            return False
        early = _Early(_Phase.CREATING)
        self._calls[call_sid] = early
        self._nursery.start_soon(
            self._create_and_hold, connector, claims, decision, early,
            wait_s, create_deadline_s, end_deadline_s,
        )
        return True

    async def take(self, call_sid: str, *, create_deadline_s: float) -> AssistantCall | None:
        """The early call of ``call_sid`` for its stream, once created; None when there
        is none to take (never started, failed, or ended for want of a stream): the
        stream then creates its own. Waits at most for the create under way.

        Cancelled: the early call stays where it was (its creator ends it in time).
        """
        early = self._calls.get(call_sid)
        if early is not None:
            await early.settled.wait()
            if early.phase is not _Phase.READY:
                return None
            if self._shared is not None:
                self._shared.take_early_call(call_sid)
            early.phase = _Phase.TAKEN
            early.taken.set()
            return early.call
        if self._shared is None:
            return None
        with trio.move_on_after(create_deadline_s + SHARED_WAIT_MARGIN_S):
            while True:
                body = self._shared.load_early_call(call_sid)
                if body is None:
                    return None
                phase, _ = _decode(body)
                if phase is not _Phase.CREATING:
                    break
                await trio.sleep(SHARED_POLL_S)
            if phase is not _Phase.READY:
                return None
            # Atomic across the box: the creator, ending it, may have taken it first.
            taken = self._shared.take_early_call(call_sid)
            return _decode(taken)[1] if taken is not None else None
        return None

    async def _create_and_hold(
        self,
        connector: AssistantConnector,
        claims: StreamClaims,
        decision: Mapping[str, Any],
        early: _Early,
        wait_s: float,
        create_deadline_s: float,
        end_deadline_s: float,
    ) -> None:
        call_sid = claims.call_sid
        deadline = trio.current_time() + wait_s
        why = "before this process stopped"
        try:
            # Shielded: a create abandoned half way may leave a call at Vapi nobody knows
            # of. The create has its own deadline.
            with trio.CancelScope(shield=True):
                try:
                    with trio.fail_after(create_deadline_s + SHARED_WAIT_MARGIN_S):
                        early.call = await connector.create(
                            call_sid=call_sid,
                            caller=claims.caller,
                            called=claims.called,
                            assistant=claims.assistant,
                            decision=decision,
                        )
                except (VapiError, trio.TooSlowError) as exc:
                    early.phase = _Phase.FAILED
                    self._publish(call_sid, _Phase.FAILED)
                    self._count("failed")
                    log_event(
                        log,
                        logging.WARNING,
                        "early-create-failed",
                        f"call {call_sid}: creating the assistant call early failed ({exc}); "
                        "the stream will create its own",
                        call_sid=call_sid,
                    )
                    return
            early.phase = _Phase.READY
            self._publish(call_sid, _Phase.READY, early.call)
            early.settled.set()
            with trio.move_on_at(deadline):
                await early.taken.wait()
            why = f"within {wait_s:g} s of the webhook's answer"
        finally:
            early.settled.set()
            del self._calls[call_sid]
            await self._end_untaken(connector, call_sid, early, why, end_deadline_s)

    async def _end_untaken(
        self,
        connector: AssistantConnector,
        call_sid: str,
        early: _Early,
        why: str,
        end_deadline_s: float,
    ) -> None:
        """End ``early``'s call unless its stream (here or in another process) took it."""
        if early.phase is _Phase.TAKEN:
            self._count("taken")
            return
        if early.phase is not _Phase.READY or early.call is None:
            return
        shared = self._shared
        if shared is not None:
            failures = shared.failures
            if shared.take_early_call(call_sid) is None and shared.failures == failures:
                # Another process's stream took it. (Had the directory failed instead,
                # nobody else could have taken it: it stays this process's to end.)
                early.phase = _Phase.TAKEN
                self._count("taken")
                return
        early.phase = _Phase.ENDED
        self._count("unused")
        log_event(
            log,
            logging.WARNING,
            "early-call-unused",
            f"call {call_sid}: no media stream took the assistant call created early "
            f"{why}; ending it",
            call_sid=call_sid,
            vapi_call_id=early.call.id,
        )
        with trio.move_on_after(2 * end_deadline_s + _CONNECT_GRACE_S, shield=True):
            try:
                await end_through_socket(connector, early.call, end_deadline_s=end_deadline_s)
            except VapiError as exc:
                log_event(
                    log,
                    logging.WARNING,
                    "early-call-end-failed",
                    f"call {call_sid}: could not connect to end the assistant call created "
                    f"early ({exc})",
                    call_sid=call_sid,
                    vapi_call_id=early.call.id,
                )

    def _publish(self, call_sid: str, phase: _Phase, call: AssistantCall | None = None) -> None:
        if self._shared is not None:
            self._shared.publish_early_call(call_sid, _encode(phase, call), first=False)

    def _count(self, fate: EarlyFate) -> None:
        if self.on_fate is not None:
            self.on_fate(fate)


#: Beyond the end deadline, how long connecting to an unused early call may take.
_CONNECT_GRACE_S = 5.0


class EarlyConnector:
    """``AssistantConnector`` that gives a stream the call created early for it, if any,
    and otherwise creates one with ``inner``; ``connect`` and ``post_control`` are
    ``inner``'s."""

    def __init__(
        self,
        early: EarlyCalls,
        inner: AssistantConnector,
        *,
        wait_s: float,
        create_deadline_s: float,
        end_deadline_s: float,
    ) -> None:
        self._early = early
        self._inner = inner
        self._wait_s = wait_s
        self._create_deadline_s = create_deadline_s
        self._end_deadline_s = end_deadline_s

    def start_early(self, claims: StreamClaims) -> bool:
        """Create ``claims``'s call now (the webhook's new admission); see ``EarlyCalls.start``."""
        return self._early.start(
            self._inner,
            claims,
            wait_s=self._wait_s,
            create_deadline_s=self._create_deadline_s,
            end_deadline_s=self._end_deadline_s,
        )

    async def create(
        self,
        *,
        call_sid: str,
        caller: str,
        called: str,
        assistant: str = "",
        decision: Mapping[str, Any] | None = None,
    ) -> AssistantCall:
        call = await self._early.take(call_sid, create_deadline_s=self._create_deadline_s)
        if call is not None:
            return call
        return await self._inner.create(
            call_sid=call_sid, caller=caller, called=called, assistant=assistant,
            decision=decision,
        )

    def connect(self, call: AssistantCall) -> AbstractAsyncContextManager[PingableSocket]:
        return self._inner.connect(call)

    async def post_control(self, call: AssistantCall, message: str) -> bool:
        return await self._inner.post_control(call, message)


def _encode(phase: _Phase, call: AssistantCall | None = None) -> bytes:
    """The shared file's body. Only a ``VapiCall`` can travel to another process."""
    document: dict[str, Any] = {"phase": phase.value}
    if isinstance(call, VapiCall):
        document["call"] = {
            "id": call.id,
            "websocket_url": call.websocket_url,
            "control_url": call.control_url,
        }
    return orjson.dumps(document)


def _decode(body: bytes) -> tuple[_Phase, VapiCall | None]:
    """``_encode``'s body back; an unreadable one (another version) is a failure."""
    try:
        document: Any = orjson.loads(body)
        phase = _Phase(document["phase"])
        fields = document.get("call")
        if fields is None:
            return (_Phase.FAILED if phase is _Phase.READY else phase), None
        return phase, VapiCall(
            id=str(fields["id"]),
            websocket_url=str(fields["websocket_url"]),
            control_url=fields["control_url"] if isinstance(fields["control_url"], str) else None,
        )
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
        return _Phase.FAILED, None
