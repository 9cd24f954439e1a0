"""The ending policy: which of Vapi's endedReason values are normal ends (sans-I/O)."""

from __future__ import annotations

import pytest

from voicebridge.vapi.endings import (
    INVALID_REASON,
    NO_REASON,
    Ending,
    EndingPolicy,
    is_valid_pattern,
    safe_reason,
)

DEFAULT = EndingPolicy()


@pytest.mark.parametrize(
    "reason",
    [
        "customer-ended-call",
        "assistant-ended-call",
        "assistant-said-end-call-phrase",
        "assistant-forwarded-call",
        "silence-timed-out",
        "exceeded-max-duration",
    ],
)
def test_the_normal_endings_hang_up(reason: str) -> None:
    assert DEFAULT.classify(reason) is Ending.NORMAL


@pytest.mark.parametrize(
    "reason",
    [
        "pipeline-error-openai-llm-failed",
        "pipeline-error-eleven-labs-voice-failed",
        "pipeline-error-deepgram-transcriber-failed",
        "call.in-progress.error-vapifault-worker-died",
        "worker-shutdown",
        "call.start.error-subscription-insufficient-credits",
        "call.in-progress.error-assistant-did-not-receive-customer-audio",
        "a-reason-vapi-adds-next-year",
        "",
        None,
    ],
)
def test_failures_and_unknown_reasons_give_the_fallback(reason: str | None) -> None:
    assert DEFAULT.classify(reason) is Ending.FAILURE


def test_the_concurrency_limit_is_its_own_ending() -> None:
    reason = "call.start.error-subscription-concurrency-limit-reached"
    assert DEFAULT.classify(reason) is Ending.OVER_LIMIT


def test_operators_move_reasons_by_value_or_prefix() -> None:
    policy = EndingPolicy(
        normal=("worker-shutdown", "call.in-progress.error-warm-transfer-*"),
        failure=("silence-timed-out",),
    )
    assert policy.classify("worker-shutdown") is Ending.NORMAL
    assert policy.classify("call.in-progress.error-warm-transfer-max-duration") is Ending.NORMAL
    assert policy.classify("silence-timed-out") is Ending.FAILURE
    assert policy.classify("pipeline-error-openai-llm-failed") is Ending.FAILURE


@pytest.mark.parametrize(
    ("pattern", "valid"),
    [("worker-shutdown", True), ("pipeline-error-*", True), ("*", False), ("Bad Reason", False)],
)
def test_patterns_are_checked(pattern: str, valid: bool) -> None:
    assert is_valid_pattern(pattern) is valid


def test_reasons_are_made_safe_for_logs_and_labels() -> None:
    assert safe_reason("pipeline-error-openai-llm-failed") == "pipeline-error-openai-llm-failed"
    assert safe_reason("x\nFAKE=1") == INVALID_REASON
    assert safe_reason("") == NO_REASON
