"""Admission control and call outcomes: which calls we took, and how each one ended.

The voice webhook asks ``try_admit`` before it hands out a stream; an admitted
call holds a *reservation* until its media stream starts (``begin``) or the
reservation expires (the caller hung up while ringing, or Twilio never
connected). ``finish`` releases the slot and keeps the call's record for the
``<Connect action>`` request that Twilio makes right after the stream closes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import trio

from voicebridge.bridge.outcome import CallRecord, Outcome

#: How long a finished call's record is kept for its ``<Connect action>`` request.
#: Twilio makes that request within a second of the stream closing; ten minutes
#: also covers slow retries and an operator looking at /calls.
RECORD_RETENTION_S = 600.0
#: At most this many finished records are kept (oldest forgotten first), so a flood
#: of short calls cannot grow memory without bound.
MAX_RECORDS = 10_000


class CallRegistry:
    """Counts calls against ``max_calls`` and remembers recent outcomes. Not thread-safe."""

    def __init__(
        self,
        *,
        max_calls: int,
        reservation_ttl_s: float,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.max_calls = max_calls
        self._reservation_ttl_s = reservation_ttl_s
        self._clock = clock
        # call_sid -> reservation expiry
        self._reservations: dict[str, float] = {}
        # call_sid -> how to end it from outside (drain)
        self._active: dict[str, Callable[[Outcome, str], None]] = {}
        # call_sid -> (record, time finished), oldest first
        self._records: OrderedDict[str, tuple[CallRecord, float]] = OrderedDict()
        self._draining = False

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

    def start_draining(self) -> None:
        """Refuse every new call from now on (shutdown)."""
        self._draining = True

    def try_admit(self, call_sid: str) -> bool:
        """Reserve a slot for ``call_sid``; False when full or draining (play overflow)."""
        if call_sid in self._reservations or call_sid in self._active:
            return True  # Twilio retried the webhook: same call, same slot
        if not self.admitting:
            return False
        self._reservations[call_sid] = self._clock() + self._reservation_ttl_s
        return True

    def begin(self, call_sid: str, end: Callable[[Outcome, str], None]) -> None:
        """The call's media stream started: its reservation becomes an active call.

        A stream whose webhook another instance answered has no reservation here; its
        valid token proves it was admitted, so it is counted without a check.
        """
        self._reservations.pop(call_sid, None)
        self._active[call_sid] = end

    def finish(self, record: CallRecord) -> None:
        """The call ended: free its slot and keep its record for the after-stream route."""
        self._active.pop(record.call_sid, None)
        self._reservations.pop(record.call_sid, None)
        if not record.call_sid:
            return
        now = self._clock()
        self._records[record.call_sid] = (record, now)
        self._records.move_to_end(record.call_sid)
        self._forget_old_records(now)

    def end_all(self, outcome: Outcome, detail: str) -> int:
        """End every active call with ``outcome`` (drain deadline); returns how many."""
        enders = list(self._active.values())
        for end in enders:
            end(outcome, detail)
        return len(enders)

    def record_for(self, call_sid: str) -> CallRecord | None:
        """The finished call's record, if this process ran it recently."""
        entry = self._records.get(call_sid)
        return entry[0] if entry is not None else None

    def _expire_reservations(self) -> None:
        if not self._reservations:
            return
        now = self._clock()
        for call_sid in [sid for sid, expiry in self._reservations.items() if expiry <= now]:
            del self._reservations[call_sid]

    def _forget_old_records(self, now: float) -> None:
        while self._records:
            oldest_sid, (_, finished_at) = next(iter(self._records.items()))
            if len(self._records) > MAX_RECORDS or now - finished_at > RECORD_RETENTION_S:
                del self._records[oldest_sid]
            else:
                break
