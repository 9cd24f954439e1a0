"""How a Vapi call's ``endedReason`` is judged: a normal end, a failure, or the account's limit.

Vapi ends every call with one of some six hundred ``endedReason`` values, and most
of them are failures (an LLM, voice or transcriber provider's error, a Vapi worker
that died, credits run out). Only the few below are a conversation ending as it
should; everything else, a value never seen before included, is a failure, and the
caller gets the fallback rather than a silent hang-up. Operators may move reasons
either way in the configuration (``[vapi.endings]``), by exact value or by prefix.

Sources: Vapi's API reference (``Call.endedReason``) and its call-ended-reason
guide; see docs/protocols.md.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable

from attrs import frozen

#: Reasons that end a conversation as it should: the assistant or the caller ended it,
#: or one of the limits the assistant was given (silence, duration) was reached.
NORMAL_REASONS = frozenset(
    {
        "assistant-ended-call",
        "assistant-ended-call-after-message-spoken",
        "assistant-ended-call-with-hangup-task",
        "assistant-said-end-call-phrase",
        "assistant-forwarded-call",
        "customer-ended-call",
        "customer-ended-call-during-transfer",
        "customer-ended-call-before-warm-transfer",
        "customer-ended-call-after-warm-transfer-attempt",
        "silence-timed-out",
        "exceeded-max-duration",
        "manually-canceled",
    }
)
#: Vapi refused the call for the account's concurrency limit: the caller may call back.
OVER_LIMIT_REASONS = frozenset({"call.start.error-subscription-concurrency-limit-reached"})
#: The call reached the ``maxDurationSeconds`` voicebridge asked for.
MAX_DURATION_REASON = "exceeded-max-duration"
#: What a reason may look like in a log field or a metric label; anything else is
#: shown as ``INVALID_REASON`` (it comes from the network).
_REASON_SHAPE = re.compile(r"[a-z0-9][a-z0-9._-]{0,119}")
INVALID_REASON = "invalid"
#: The reason recorded when Vapi ended the call without saying why.
NO_REASON = "none"


class Ending(enum.Enum):
    """What an ``endedReason`` means for the caller."""

    #: A conversation that ended as it should: the caller is hung up.
    NORMAL = "normal"
    #: The assistant failed: the caller hears the fallback.
    FAILURE = "failure"
    #: Vapi's concurrency limit: the caller hears the overflow message.
    OVER_LIMIT = "over-limit"


@frozen(kw_only=True)
class EndingPolicy:
    """The classification, with the operator's overrides (exact values or ``prefix*``)."""

    #: Reasons (or ``prefix*``) to treat as normal ends on top of ``NORMAL_REASONS``.
    normal: tuple[str, ...] = ()
    #: Reasons (or ``prefix*``) to treat as failures even if listed as normal.
    failure: tuple[str, ...] = ()

    def classify(self, reason: str | None) -> Ending:
        """What ``reason`` means; an unknown or missing reason is a failure."""
        if not reason:
            return Ending.FAILURE
        if _matches(reason, self.failure):
            return Ending.FAILURE
        if reason in OVER_LIMIT_REASONS:
            return Ending.OVER_LIMIT
        if reason in NORMAL_REASONS or _matches(reason, self.normal):
            return Ending.NORMAL
        return Ending.FAILURE


def _matches(reason: str, patterns: Iterable[str]) -> bool:
    for pattern in patterns:
        if pattern.endswith("*"):
            if reason.startswith(pattern[:-1]):
                return True
        elif reason == pattern:
            return True
    return False


def is_valid_pattern(pattern: str) -> bool:
    """Whether ``pattern`` is a reason or a ``prefix*`` (for the configuration's check)."""
    body = pattern[:-1] if pattern.endswith("*") else pattern
    return bool(body) and _REASON_SHAPE.fullmatch(body) is not None


def safe_reason(reason: str | None) -> str:
    """``reason`` as a log field or metric label: its own text if it has a reason's
    shape (a bounded set in practice: Vapi's enum), else ``INVALID_REASON``."""
    if not reason:
        return NO_REASON
    return reason if _REASON_SHAPE.fullmatch(reason) else INVALID_REASON
