"""Tests of the single-use stream tokens, on a fake wall clock."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from voicebridge.twilio import token as token_module
from voicebridge.twilio.token import StreamTokens, TokenRejected

SECRET = b"0123456789abcdef0123456789abcdef"
CALL = "CAfedcba9876543210fedcba9876543210"
OTHER_CALL = "CA00000000000000000000000000000000"


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def tokens(clock: FakeClock | None = None, secret: bytes = SECRET) -> StreamTokens:
    return StreamTokens(secret=secret, ttl_s=60.0, clock=clock or FakeClock())


def rejected(tokens: StreamTokens, token: str, call_sid: str = CALL) -> str:
    with pytest.raises(TokenRejected) as error:
        tokens.verify(token, call_sid=call_sid)
    return error.value.reason


def test_a_token_is_accepted_once() -> None:
    t = tokens()
    token = t.issue(CALL)
    t.verify(token, call_sid=CALL)
    assert rejected(t, token) == "reused"


def test_tokens_are_compact_and_url_safe() -> None:
    token = tokens().issue(CALL)
    assert len(token) < 150
    assert set(token) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def test_each_token_is_different() -> None:
    t = tokens()
    assert len({t.issue(CALL) for _ in range(20)}) == 20


def test_another_instance_with_the_same_secret_verifies() -> None:
    clock = FakeClock()
    token = tokens(clock).issue(CALL)
    tokens(clock).verify(token, call_sid=CALL)


def test_another_secret_is_rejected() -> None:
    clock = FakeClock()
    token = tokens(clock).issue(CALL)
    assert rejected(tokens(clock, secret=b"another secret"), token) == "bad-signature"


def test_a_token_for_another_call_is_rejected() -> None:
    t = tokens()
    assert rejected(t, t.issue(OTHER_CALL)) == "wrong-call"


def test_a_token_expires() -> None:
    clock = FakeClock()
    t = tokens(clock)
    token = t.issue(CALL)
    clock.now += 59.5
    t.verify(t.issue(CALL), call_sid=CALL)
    late = t.issue(CALL)
    clock.now += 0.5
    assert rejected(t, token) == "expired"
    t.verify(late, call_sid=CALL)


def test_a_used_token_stays_refused_after_it_is_forgotten() -> None:
    clock = FakeClock()
    t = tokens(clock)
    token = t.issue(CALL)
    t.verify(token, call_sid=CALL)
    clock.now += 61
    t.verify(t.issue(CALL), call_sid=CALL)  # forgets the first one
    assert rejected(t, token) == "expired"


def tamper(token: str, index: int) -> str:
    replacement = "A" if token[index] != "A" else "B"
    return token[:index] + replacement + token[index + 1 :]


def test_tampered_tokens_are_rejected() -> None:
    t = tokens()
    token = t.issue(CALL)
    parts = token.split(".")
    # Each of the call sid, the expiry, the nonce and the MAC, altered.
    offsets = [len(".".join(parts[:i])) + 1 for i in range(1, 5)]
    for offset in offsets:
        assert rejected(t, tamper(token, offset)) in ("bad-signature", "malformed")
    later = parts[2][:-1] + str((int(parts[2][-1]) + 1) % 10)
    assert rejected(t, ".".join([*parts[:2], later, *parts[3:]])) == "bad-signature"
    # None of them consumed the genuine token.
    t.verify(token, call_sid=CALL)


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "garbage",
        "v1....",
        "v2.CA1.1.AAAAAAAAAAAAAAAAAAAAAA.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "v1.CA1.-1.AAAAAAAAAAAAAAAAAAAAAA.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "v1.CA1.1.AAAA.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "v1.CA1.1.AAAAAAAAAAAAAAAAAAAAAA.AAAA",
        "v1.C A.1.AAAAAAAAAAAAAAAAAAAAAA.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "v1.CA1.1.AAAAAAAAAAAAAAAAAAAAAA.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA.x",
        "x" * 10_000,
        "v1.CA1.\u0661.AAAAAAAAAAAAAAAAAAAAAA.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    ],
)
def test_malformed_tokens_are_rejected(bad: str) -> None:
    assert rejected(tokens(), bad) == "malformed"


def test_a_full_memory_refuses_new_tokens_until_old_ones_expire(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(token_module, "MAX_REMEMBERED_TOKENS", 3)
    clock = FakeClock()
    t = tokens(clock)
    for _ in range(3):
        t.verify(t.issue(CALL), call_sid=CALL)
    clock.now += 30
    waiting = t.issue(CALL)
    assert rejected(t, waiting) == "overloaded"
    clock.now += 30  # the first three expire; the refused token is still valid
    t.verify(waiting, call_sid=CALL)
    assert rejected(t, waiting) == "reused"


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        StreamTokens(secret=b"", ttl_s=60)
    for ttl in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError):
            StreamTokens(secret=SECRET, ttl_s=ttl)
    with pytest.raises(ValueError):
        tokens().issue("CA.1")
    with pytest.raises(ValueError):
        tokens().issue("")


@given(
    call_sid=st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True),
    secret=st.binary(min_size=1, max_size=64),
    ttl=st.floats(min_value=0.001, max_value=86_400),
)
def test_tokens_round_trip(call_sid: str, secret: bytes, ttl: float) -> None:
    clock = FakeClock()
    issuer = StreamTokens(secret=secret, ttl_s=ttl, clock=clock)
    checker = StreamTokens(secret=secret, ttl_s=ttl, clock=clock)
    token = issuer.issue(call_sid)
    assert len(token) < 500
    checker.verify(token, call_sid=call_sid)
    with pytest.raises(TokenRejected):
        checker.verify(token, call_sid=call_sid)


@given(st.text(max_size=300))
def test_arbitrary_text_is_rejected_not_crashing(text: str) -> None:
    with pytest.raises(TokenRejected):
        tokens().verify(text, call_sid=CALL)
