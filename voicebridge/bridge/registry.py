"""Admission control and call outcomes: which calls we took, and how each one ended.

The voice webhook asks ``try_admit`` before it hands out a stream; an admitted
call holds a *reservation* until its media stream starts (``begin``) or the
reservation expires (the caller hung up while ringing, or Twilio never
connected). ``finish`` releases the slot and keeps the call's record for the
``<Connect action>`` request that Twilio makes right after the stream closes.

With a ``SharedDir`` (several processes on one box), records are also published
there, so the ``<Connect action>`` is answered right by whichever process it lands
on, and a reservation is released when its stream starts in another process.

The drain (``voicebridge.server``) uses the rest: ``start_draining`` refuses new
calls, ``wait_idle`` waits for the active calls to end, ``end_all`` ends them (and any
stream that starts later), and ``wait_actions_answered`` waits until Twilio has asked
for the ``<Connect action>`` of every call that ended during the drain.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio
from attrs import frozen

from voicebridge.bridge.outcome import CallRecord, Outcome

if TYPE_CHECKING:
    from voicebridge.boxstate import SharedDir

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


@frozen
class EndedAll:
    """What ``CallRegistry.end_all`` did."""

    #: Active calls told to end.
    count: int
    #: The longest goodbye still to play among them (their assistant had already ended).
    goodbye_s: float


class CallRegistry:
    """Counts calls against ``max_calls`` and remembers recent outcomes. Not thread-safe."""

    def __init__(
        self,
        *,
        max_calls: int,
        reservation_ttl_s: float,
        clock: Callable[[], float] = trio.current_time,
        shared: SharedDir | None = None,
    ) -> None:
        self.max_calls = max_calls
        self._reservation_ttl_s = reservation_ttl_s
        self._clock = clock
        self._shared = shared
        # call_sid -> reservation expiry
        self._reservations: dict[str, float] = {}
        # call_sid -> how to end it from outside (drain)
        self._active: dict[str, Callable[[Outcome, str], float]] = {}
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
        self._expire_reservations()
        return len(self._active) + len(self._reservations)

    @property
    def admitting(self) -> bool:
        return not self._draining and self.load < self.max_calls

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
        for call_sid, expiry in self._reservations.items():
            self._reservations[call_sid] = min(expiry, latest)
        self._note_change()

    def try_admit(self, call_sid: str) -> bool:
        """Reserve a slot for ``call_sid``; False when full or draining (play overflow)."""
        if call_sid in self._reservations or call_sid in self._active:
            return True  # Twilio retried the webhook: same call, same slot
        if not self.admitting:
            return False
        self._reservations[call_sid] = self._clock() + self._reservation_ttl_s
        return True

    def begin(self, call_sid: str, end: Callable[[Outcome, str], float]) -> None:
        """The call's media stream started: its reservation becomes an active call.

        A stream whose webhook another instance answered has no reservation here; its
        valid token proves it was admitted, so it is counted without a check.
        """
        self._reservations.pop(call_sid, None)
        self._active[call_sid] = end
        if self._shared is not None:
            self._shared.mark_stream_started(call_sid)
        self._note_change()
        if self._ending_all is not None:
            end(*self._ending_all)  # began after the drain deadline: it ends at once

    def finish(self, record: CallRecord) -> None:
        """The call ended: free its slot and keep its record for the after-stream route."""
        self._active.pop(record.call_sid, None)
        self._reservations.pop(record.call_sid, None)
        self._note_change()
        if not record.call_sid:
            return
        now = self._clock()
        self._records[record.call_sid] = (record, now)
        self._records.move_to_end(record.call_sid)
        self._forget_old_records(now)
        if self._shared is not None:
            self._shared.save_record(record)
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
        self._reservations.clear()
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
            next_expiry = min(self._reservations.values(), default=None)
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

    def _expire_reservations(self) -> None:
        if not self._reservations:
            return
        now = self._clock()
        shared = self._shared
        for call_sid in [
            sid
            for sid, expiry in self._reservations.items()
            # Its stream started in another process, which counts it as active there.
            if expiry <= now or (shared is not None and shared.stream_started(sid))
        ]:
            del self._reservations[call_sid]

    def _forget_old_records(self, now: float) -> None:
        while self._records:
            oldest_sid, (_, finished_at) = next(iter(self._records.items()))
            if len(self._records) > MAX_RECORDS or now - finished_at > RECORD_RETENTION_S:
                del self._records[oldest_sid]
            else:
                break
