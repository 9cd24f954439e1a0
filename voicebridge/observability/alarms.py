"""Alarms: a problem that one call logs as a warning, raised to an ERROR when it repeats.

A revoked or mistyped Vapi API key fails every call the same way (``assistant-leg-failed``,
``LEG_FAILURE=auth``), one ``call-end`` warning each: invisible to ``journalctl -p err``
and to whoever watches errors only. ``AuthFailureAlarm`` sees every ended call and logs
one ``EVENT=assistant-auth-failing`` ERROR when ``AUTH_FAILURES_TO_ALARM`` calls within
``AUTH_ALARM_WINDOW_S`` failed for the key, then at most one more per
``AUTH_ALARM_INTERVAL_S`` while it goes on.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Final

from voicebridge.bridge.outcome import CallRecord
from voicebridge.observability.logs import log_event

log = logging.getLogger(__name__)

#: Auth failures within the window that raise the alarm: one could be a key being
#: rotated; three in a row is the key.
AUTH_FAILURES_TO_ALARM: Final = 3
AUTH_ALARM_WINDOW_S: Final = 60.0
#: At most one alarm line per this interval while the failures go on.
AUTH_ALARM_INTERVAL_S: Final = 60.0


class AuthFailureAlarm:
    """Watches ended calls for Vapi refusing the API key; see the module docstring.

    ``clock`` is monotonic seconds (``time.monotonic``; tests pass their own).
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        # Invariant: the times of the auth failures within the last AUTH_ALARM_WINDOW_S,
        # oldest first, at most AUTH_FAILURES_TO_ALARM of them.
        self._recent: deque[float] = deque(maxlen=AUTH_FAILURES_TO_ALARM)
        self._last_alarm: float | None = None
        #: Auth failures since the last alarm line (what the next one reports).
        self._since_alarm = 0

    def call_ended(self, record: CallRecord) -> None:
        if record.leg_failure != "auth":
            return
        now = self._clock()
        self._recent.append(now)
        self._since_alarm += 1
        if len(self._recent) < AUTH_FAILURES_TO_ALARM:
            return
        if now - self._recent[0] > AUTH_ALARM_WINDOW_S:
            return
        if self._last_alarm is not None and now - self._last_alarm < AUTH_ALARM_INTERVAL_S:
            return
        log_event(
            log,
            logging.ERROR,
            "assistant-auth-failing",
            f"Vapi refused the API key for {self._since_alarm} calls (the last: "
            f"{record.detail}): every caller hears the fallback; check the vapi-api-key "
            "credential, then reload",
            calls=self._since_alarm,
            call_sid=record.call_sid or None,
            detail=record.detail,
            rate_limited=True,
        )
        self._last_alarm = now
        self._since_alarm = 0
