"""Admission control and call outcomes: which calls we took, and how each one ended.

One admission per CallSid, one stream per CallSid, ever. The voice webhook asks
``admit``: a new call gets a *reservation* and the webhook's answer (the TwiML with its
stream token) is kept with it, until its media stream starts (``begin``) or the
reservation expires (the caller hung up while ringing, or Twilio never connected). A
repeat of the webhook while the call is reserved gets the same answer and no second
slot (Twilio retries a webhook it got no answer to); once the call has streamed, or its
reservation lapsed, the webhook is refused (``Spent``): Twilio has no reason to ask
again, so that is a replay. ``begin`` admits one stream per CallSid; ``finish`` releases
the slot and keeps the call's record for the ``<Connect action>`` request that Twilio
makes right after the stream closes. CallSids are remembered ``CALL_MEMORY_S`` after
their reservation or call is over.

With a ``SharedDir`` (several processes on one box), records, admissions and streams
are also published there, so the ``<Connect action>`` is answered right by whichever
process it lands on, a webhook repeat gets the same answer from every process, a
reservation is released when its stream starts in another process, and no two
processes stream one CallSid.

The drain (``voicebridge.server``) uses the rest: ``start_draining`` refuses new
calls, ``wait_idle`` waits for the active calls to end, ``end_all`` ends them (and any
stream that starts later), and ``wait_actions_answered`` waits until Twilio has asked
for the ``<Connect action>`` of every call that ended during the drain.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

import attrs
import trio
from attrs import frozen

from voicebridge.bridge.outcome import CallRecord, Outcome

if TYPE_CHECKING:
    from voicebridge.boxstate import SharedDir
    from voicebridge.observability.looplag import LoopPressure

#: How long a finished call's record is kept for its ``<Connect action>`` request.
#: Twilio makes that request within a second of the stream closing; ten minutes
#: also covers slow retries and an operator looking at /calls.
RECORD_RETENTION_S = 600.0
#: At most this many finished records are kept (oldest forgotten first), so a flood
#: of short calls cannot grow memory without bound.
MAX_RECORDS = 10_000
#: Once draining, an admitted call whose media stream has not started within this long
#: is let go: Twilio opens the stream within a second or two of the webhook's answer,
#: so an older reservation is a caller who hung up while it rang.
DRAIN_RESERVATION_GRACE_S = 5.0
#: How long a CallSid is remembered after its call (or its reservation) is over, so
#: that a replayed voice webhook or stream is refused: an hour, the longest stream token
#: lifetime the configuration allows (``twilio.stream_token_ttl_s``), so that no token
#: issued for a call outlives the memory of its CallSid. A webhook replayed later than
#: this is admitted afresh (Twilio's signature carries no time); see docs/call-flow.md.
CALL_MEMORY_S = 3600.0
#: At most this many finished CallSids are remembered (oldest forgotten first): an hour
#: at ~14 new calls a second per process, ~12 MB at the very worst. Only calls Twilio
#: signed are ever remembered, so no client can fill it.
MAX_REMEMBERED_CALLS = 50_000

#: Why a CallSid's admission is over: its stream started (here, or in another process of
#: the box), or its reservation lapsed before any stream did (or the drain let it go).
SpentReason = Literal["streamed", "lapsed"]
#: Why a new call is refused with the overflow message: ``max_calls`` reached, the server
#: draining, its event loop behind (``LoopPressure``: the calls it has use its core), or
#: the whole service at ``cluster.max_calls``, or its store down with
#: ``cluster.on_store_failure = "refuse"`` (``voicebridge.cluster``).
RefusalReason = Literal["at-capacity", "draining", "loop-behind", "cluster-full", "store-down"]


@frozen
class Answer:
    """Answer the voice webhook with ``twiml`` (the stream and its token)."""

    twiml: str
    #: The webhook was answered before and the call is still reserved: the same answer.
    repeat: bool


@frozen
class Full:
    """No room for a new call (or the server is draining, or behind): play the overflow
    message."""

    reason: RefusalReason
    #: With ``loop-behind``: the event loop's mean lag that refused the call, in seconds.
    loop_lag_s: float = 0.0


@frozen
class Spent:
    """The CallSid had its admission already; the webhook is a replay: refuse it."""

    reason: SpentReason


#: What ``CallRegistry.admit`` decides.
Admission = Answer | Full | Spent


@frozen
class _Reservation:
    #: When the reservation lapses (``clock`` time).
    expires_at: float
    #: The voice webhook's answer, given again to a repeat of the webhook.
    answer: str


@frozen
class EndedAll:
    """What ``CallRegistry.end_all`` did."""

    #: Active calls told to end.
    count: int
    #: The longest goodbye still to play among them (their assistant had already ended).
    goodbye_s: float


class CallRegistry:
    """Admits each CallSid once and streams it once, counts calls against ``max_calls``,
    and remembers recent outcomes. Not thread-safe."""

    def __init__(
        self,
        *,
        max_calls: int,
        reservation_ttl_s: float,
        clock: Callable[[], float] = trio.current_time,
        shared: SharedDir | None = None,
        pressure: LoopPressure | None = None,
        publish: Callable[[CallRecord], None] | None = None,
    ) -> None:
        self.max_calls = max_calls
        #: Also told every finished call's record (the cluster's store, ``voicebridge.cluster``).
        self.publish = publish
        #: The event loop's lag: while it is behind, new calls are refused.
        self.pressure = pressure
        self._reservation_ttl_s = reservation_ttl_s
        self._clock = clock
        self._shared = shared
        # Invariant: a CallSid is in at most one of _reservations, _active and _spent.
        # call_sid -> the reservation of an admitted call whose stream has not started
        self._reservations: dict[str, _Reservation] = {}
        # call_sid -> how to end it from outside (drain)
        self._active: dict[str, Callable[[Outcome, str], float]] = {}
        # call_sid -> (when to forget it, why it is over), oldest first (all are kept
        # equally long, so the oldest is also the first to be forgotten)
        self._spent: OrderedDict[str, tuple[float, SpentReason]] = OrderedDict()
        # call_sid -> (record, time finished), oldest first
        self._records: OrderedDict[str, tuple[CallRecord, float]] = OrderedDict()
        self._draining = False
        # Set by end_all: every call that begins afterwards is ended at once with it.
        self._ending_all: tuple[Outcome, str] | None = None
        # Calls that ended while draining and whose <Connect action> was not asked for yet.
        self._awaiting_action: set[str] = set()
        # Active calls whose <Connect action> was asked for already: the caller hung up, and
        # Twilio asks while the call is still saying goodbye to Vapi.
        self._answered_early: set[str] = set()
        # Counts changes to the active calls and the drain state (see wait_changed_since).
        self._changes = 0
        self._changed = trio.Event()

    @property
    def active_count(self) -> int:
        return len(self._active)

    @property
    def load(self) -> int:
        """Active calls plus live reservations: what admission counts."""
        self._expire()
        return len(self._active) + len(self._reservations)

    @property
    def admitting(self) -> bool:
        return self.refusal() is None

    def refusal(self) -> Full | None:
        """Why a new call would be refused now, or None when it would be admitted.

        Cheap (a comparison, and a mean kept up to date), so that a refusal costs the
        webhook nothing it would not spend on any request.
        """
        if self._draining:
            return Full("draining")
        if self.load >= self.max_calls:
            return Full("at-capacity")
        if self.pressure is not None:
            lag = self.pressure.behind()
            if lag is not None:
                return Full("loop-behind", loop_lag_s=lag)
        return None

    def holding(self) -> frozenset[str]:
        """The CallSids this process holds a slot for: reserved or streaming."""
        self._expire()
        return frozenset(self._reservations) | frozenset(self._active)

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def changes(self) -> int:
        """How many times the active calls or the drain state changed so far."""
        return self._changes

    def start_draining(self) -> None:
        """Refuse every new call from now on (shutdown).

        Reservations are cut to ``DRAIN_RESERVATION_GRACE_S``, so that the drain does not
        wait long for a caller who hung up while it rang.
        """
        if self._draining:
            return
        self._draining = True
        latest = self._clock() + DRAIN_RESERVATION_GRACE_S
        for call_sid, reservation in self._reservations.items():
            if reservation.expires_at > latest:
                self._reservations[call_sid] = attrs.evolve(reservation, expires_at=latest)
        self._note_change()

    def admit(self, call_sid: str, answer: Callable[[], str]) -> Admission:
        """Decide the voice webhook of ``call_sid``.

        A new call, with room and not draining, is reserved a slot and answered with
        ``answer()`` (called only then: it issues the stream token), which is kept for a
        repeat. A reserved call gets that answer again, draining or not, and takes no
        second slot; one that streamed or lapsed is ``Spent``; with no room, while
        draining, or with the event loop behind (``pressure``), ``Full``.
        With a shared directory, every process of the box decides alike: a call another
        process admitted gets its answer (the slot stays there).
        """
        self._expire()
        reservation = self._reservations.get(call_sid)
        if reservation is not None:
            return Answer(reservation.answer, repeat=True)
        if call_sid in self._active:
            return Spent("streamed")
        spent = self._spent.get(call_sid)
        if spent is not None:
            return Spent(spent[1])
        shared = self._shared
        if shared is not None:
            if shared.stream_started(call_sid):
                self._remember(call_sid, "streamed")
                return Spent("streamed")
            published = shared.load_admission(call_sid)
            if published is not None:
                return self._published(call_sid, *published)
        refusal = self.refusal()
        if refusal is not None:
            return refusal
        twiml = answer()
        if shared is not None:
            earlier = shared.publish_admission(call_sid, twiml)
            if earlier is not None:  # another process admitted it a moment ago
                return self._published(call_sid, earlier, 0.0)
        self._reservations[call_sid] = _Reservation(
            expires_at=self._clock() + self._reservation_ttl_s, answer=twiml
        )
        return Answer(twiml, repeat=False)

    def _published(self, call_sid: str, answer: str, age_s: float) -> Admission:
        """The decision for a call another process admitted, ``age_s`` ago."""
        if answer and age_s < self._reservation_ttl_s:
            return Answer(answer, repeat=True)
        self._remember(call_sid, "lapsed")
        return Spent("lapsed")

    def begin(self, call_sid: str, end: Callable[[Outcome, str], float]) -> bool:
        """The call's media stream started: its reservation becomes an active call.

        False when ``call_sid`` has streamed before (here, or in another process sharing
        the directory): one stream per CallSid, ever; refuse the stream. A stream whose
        webhook another instance answered, or whose reservation lapsed, has no
        reservation here; its valid token proves it was admitted, so it is counted
        without a check.
        """
        spent = self._spent.get(call_sid)
        if call_sid in self._active or (spent is not None and spent[1] == "streamed"):
            return False
        shared = self._shared
        if shared is not None and not shared.claim_stream(call_sid):
            self._reservations.pop(call_sid, None)
            self._remember(call_sid, "streamed")
            return False
        self._spent.pop(call_sid, None)
        self._reservations.pop(call_sid, None)
        if shared is not None:
            shared.close_admission(call_sid)  # whichever process published it
        self._active[call_sid] = end
        self._note_change()
        if self._ending_all is not None:
            end(*self._ending_all)  # began after the drain deadline: it ends at once
        return True

    def finish(self, record: CallRecord) -> None:
        """The call ended: free its slot and keep its record for the after-stream route."""
        self._active.pop(record.call_sid, None)
        self._reservations.pop(record.call_sid, None)
        self._note_change()
        if not record.call_sid:
            return
        self._remember(record.call_sid, "streamed")
        if self._shared is not None:
            self._shared.stream_ended(record.call_sid)
        now = self._clock()
        self._records[record.call_sid] = (record, now)
        self._records.move_to_end(record.call_sid)
        self._forget_old_records(now)
        if self._shared is not None:
            self._shared.save_record(record)
        if self.publish is not None:
            self.publish(record)
        if record.call_sid in self._answered_early:
            self._answered_early.discard(record.call_sid)
        elif self._draining:
            self._awaiting_action.add(record.call_sid)

    def end_all(self, outcome: Outcome, detail: str) -> EndedAll:
        """End every active call with ``outcome`` (drain deadline).

        Reservations are dropped: a call whose stream begins later is ended at once
        with the same outcome. A call whose assistant already said goodbye finishes
        it (``EndedAll.goodbye_s`` says how long the longest has left).
        """
        self._ending_all = (outcome, detail)
        for call_sid in list(self._reservations):
            self._lapse(call_sid)
        enders = list(self._active.values())
        goodbye_s = max((end(outcome, detail) for end in enders), default=0.0)
        return EndedAll(count=len(enders), goodbye_s=goodbye_s)

    def record_for(self, call_sid: str) -> CallRecord | None:
        """The finished call's record, if this process (or one sharing its directory) ran it."""
        entry = self._records.get(call_sid)
        if entry is not None:
            return entry[0]
        return self._shared.load_record(call_sid) if self._shared is not None else None

    def record_for_action(self, call_sid: str) -> CallRecord | None:
        """``record_for``, for answering the ``<Connect action>``; the drain waits for that."""
        if call_sid in self._awaiting_action:
            self._awaiting_action.discard(call_sid)
            self._note_change()
        elif call_sid in self._active:
            self._answered_early.add(call_sid)
        return self.record_for(call_sid)

    @property
    def awaiting_action(self) -> int:
        """Calls that ended during the drain whose ``<Connect action>`` this process has not
        answered (yet, or at all: it may have landed on another process)."""
        return len(self._awaiting_action)

    async def wait_record(self, call_sid: str) -> CallRecord | None:
        """The call's record once it has one: at once if it has ended, when it has if it
        is still active (winding down), None if it is neither. Bound it from outside."""
        while call_sid in self._active:
            await self.wait_changed_since(self._changes)
        return self.record_for(call_sid)

    async def wait_changed_since(self, seen: int) -> int:
        """Wait until ``changes`` differs from ``seen`` (at once if it does); returns it."""
        while self._changes == seen:
            await self._changed.wait()
        return self._changes

    async def wait_idle(self) -> None:
        """Wait until no call is active and no reservation is left."""
        while self.load:
            seen = self._changes
            next_expiry = min(
                (reservation.expires_at for reservation in self._reservations.values()),
                default=None,
            )
            with trio.move_on_after(
                max(0.0, next_expiry - self._clock()) if next_expiry is not None else math.inf
            ):
                await self.wait_changed_since(seen)

    async def wait_actions_answered(self) -> None:
        """Wait until every call that ended while draining has had its action answered here."""
        while self._awaiting_action:
            await self.wait_changed_since(self._changes)

    def _note_change(self) -> None:
        self._changes += 1
        self._changed.set()
        self._changed = trio.Event()

    def _expire(self) -> None:
        """Let lapsed reservations go, and forget CallSids past ``CALL_MEMORY_S``."""
        now = self._clock()
        shared = self._shared
        for call_sid in [
            sid
            for sid, reservation in self._reservations.items()
            # Its stream started in another process, which counts it as active there.
            if reservation.expires_at <= now
            or (shared is not None and shared.stream_started(sid))
        ]:
            self._lapse(call_sid)
        spent = self._spent
        while spent:
            forget_at = next(iter(spent.values()))[0]
            if forget_at > now and len(spent) <= MAX_REMEMBERED_CALLS:
                break
            spent.popitem(last=False)

    def _lapse(self, call_sid: str) -> None:
        """The reservation of ``call_sid`` is over without a stream here."""
        del self._reservations[call_sid]
        shared = self._shared
        if shared is not None and shared.stream_started(call_sid):
            self._remember(call_sid, "streamed")
            return
        self._remember(call_sid, "lapsed")
        if shared is not None:
            shared.close_admission(call_sid)

    def _remember(self, call_sid: str, reason: SpentReason) -> None:
        """Refuse ``call_sid``'s webhook for ``CALL_MEMORY_S`` from now (see ``admit``)."""
        self._spent[call_sid] = (self._clock() + CALL_MEMORY_S, reason)
        self._spent.move_to_end(call_sid)
        if len(self._spent) > MAX_REMEMBERED_CALLS:
            self._spent.popitem(last=False)

    def _forget_old_records(self, now: float) -> None:
        while self._records:
            oldest_sid, (_, finished_at) = next(iter(self._records.items()))
            if len(self._records) > MAX_RECORDS or now - finished_at > RECORD_RETENTION_S:
                del self._records[oldest_sid]
            else:
                break
