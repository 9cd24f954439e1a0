"""Tests of the single-use stream tokens and what they vouch for, on a fake wall clock."""

from __future__ import annotations

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from voicebridge.twilio import token as token_module
from voicebridge.twilio.token import MAX_TOKEN_CHARS, StreamClaims, StreamTokens, TokenRejected

SECRET = b"0123456789abcdef0123456789abcdef"
CALL = "CAfedcba9876543210fedcba9876543210"
OTHER_CALL = "CA00000000000000000000000000000000"
#: What the voice webhook signs for an ordinary inbound call.
SIGNED = StreamClaims(call_sid=CALL, caller="+15550100001", called="+15550100002")


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def tokens(clock: FakeClock | None = None, secret: bytes = SECRET) -> StreamTokens:
    return StreamTokens(secret=secret, ttl_s=60.0, clock=clock or FakeClock())


def rejected(tokens: StreamTokens, token: str, claims: StreamClaims = SIGNED) -> str:
    with pytest.raises(TokenRejected) as error:
        tokens.verify(token, claims)
    return error.value.reason


def test_a_token_is_accepted_once() -> None:
    t = tokens()
    token = t.issue(SIGNED)
    t.verify(token, SIGNED)
    assert rejected(t, token) == "reused"


def test_tokens_are_compact_and_url_safe() -> None:
    token = tokens().issue(SIGNED)
    assert len(token) < 150
    assert set(token) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def test_each_token_is_different() -> None:
    t = tokens()
    assert len({t.issue(SIGNED) for _ in range(20)}) == 20


def test_another_instance_with_the_same_secret_verifies() -> None:
    clock = FakeClock()
    token = tokens(clock).issue(SIGNED)
    tokens(clock).verify(token, SIGNED)


def test_another_secret_is_rejected() -> None:
    clock = FakeClock()
    token = tokens(clock).issue(SIGNED)
    assert rejected(tokens(clock, secret=b"another secret"), token) == "bad-signature"


def test_a_token_for_another_call_is_rejected() -> None:
    t = tokens()
    assert rejected(t, t.issue(attrs.evolve(SIGNED, call_sid=OTHER_CALL))) == "wrong-call"


def test_a_token_expires() -> None:
    clock = FakeClock()
    t = tokens(clock)
    token = t.issue(SIGNED)
    clock.now += 59.5
    t.verify(t.issue(SIGNED), SIGNED)
    late = t.issue(SIGNED)
    clock.now += 0.5
    assert rejected(t, token) == "expired"
    t.verify(late, SIGNED)


def test_a_used_token_stays_refused_after_it_is_forgotten() -> None:
    clock = FakeClock()
    t = tokens(clock)
    token = t.issue(SIGNED)
    t.verify(token, SIGNED)
    clock.now += 61
    t.verify(t.issue(SIGNED), SIGNED)  # forgets the first one
    assert rejected(t, token) == "expired"


def tamper(token: str, index: int) -> str:
    replacement = "A" if token[index] != "A" else "B"
    return token[:index] + replacement + token[index + 1 :]


def test_tampered_tokens_are_rejected() -> None:
    t = tokens()
    token = t.issue(SIGNED)
    parts = token.split(".")
    # Each of the call sid, the expiry, the nonce, the claims tag and the MAC, altered.
    offsets = [len(".".join(parts[:i])) + 1 for i in range(1, 6)]
    for offset in offsets:
        assert rejected(t, tamper(token, offset)) in ("bad-signature", "malformed")
    later = parts[2][:-1] + str((int(parts[2][-1]) + 1) % 10)
    assert rejected(t, ".".join([*parts[:2], later, *parts[3:]])) == "bad-signature"
    # None of them consumed the genuine token.
    t.verify(token, SIGNED)


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
        f"v2.CA1.1.{'A' * 22}.{'A' * 21}.{'A' * 43}",
        f"v2.CA1.1.{'A' * 22}.{'A' * 22}.{'A' * 43}.x",
        f"v2.CA1.\u0661.{'A' * 22}.{'A' * 22}.{'A' * 43}",
        f"v2.{'C' * 65}.1.{'A' * 22}.{'A' * 22}.{'A' * 43}",
    ],
)
def test_malformed_tokens_are_rejected(bad: str) -> None:
    assert rejected(tokens(), bad) == "malformed"


def test_a_token_of_the_format_that_vouched_for_the_call_sid_alone_is_malformed() -> None:
    token = tokens().issue(SIGNED)
    version, call_sid, expiry, nonce, _, mac = token.split(".")
    assert version == "v2"
    assert rejected(tokens(), ".".join(("v1", call_sid, expiry, nonce, mac))) == "malformed"


def test_the_token_vouches_for_the_assistant_and_the_numbers() -> None:
    t = tokens()
    granted = attrs.evolve(SIGNED, assistant="asst-sales")
    token = t.issue(granted)
    changed = [
        attrs.evolve(granted, assistant="asst-support"),
        attrs.evolve(granted, assistant=""),  # back to the configured assistant
        attrs.evolve(granted, caller="+15550199999"),
        attrs.evolve(granted, caller=""),
        attrs.evolve(granted, called="+15550199999"),
        # The same characters, cut elsewhere between the fields.
        attrs.evolve(granted, assistant="asst-sales+1555", caller="0100001"),
    ]
    for claims in changed:
        assert rejected(t, token, claims) == "wrong-parameters", claims
    # A start that adds an assistant to a call that had none is refused alike.
    plain = t.issue(SIGNED)
    assert rejected(t, plain, attrs.evolve(SIGNED, assistant="asst-sales")) == "wrong-parameters"
    # None of the refusals used up the token: the genuine stream still starts, once.
    t.verify(token, granted)
    assert rejected(t, token, granted) == "reused"
    t.verify(plain, SIGNED)


def test_the_longest_token_fits_in_a_twilio_parameter() -> None:
    clock = FakeClock(now=999_990_000_000.0)  # the longest expiry: 15 digits of ms
    longest = StreamTokens(secret=SECRET, ttl_s=3600, clock=clock).issue(
        StreamClaims(call_sid="C" * 64, assistant="a" * 64, caller="+1" * 20)
    )
    assert len(longest) == MAX_TOKEN_CHARS
    assert len("token") + MAX_TOKEN_CHARS < 500  # Twilio's limit on a <Parameter>
    assert len(tokens().issue(SIGNED)) == 141


def test_a_full_memory_refuses_new_tokens_until_old_ones_expire(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(token_module, "MAX_REMEMBERED_TOKENS", 3)
    clock = FakeClock()
    t = tokens(clock)
    for _ in range(3):
        t.verify(t.issue(SIGNED), SIGNED)
    clock.now += 30
    waiting = t.issue(SIGNED)
    assert rejected(t, waiting) == "overloaded"
    clock.now += 30  # the first three expire; the refused token is still valid
    t.verify(waiting, SIGNED)
    assert rejected(t, waiting) == "reused"


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        StreamTokens(secret=b"", ttl_s=60)
    for ttl in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError):
            StreamTokens(secret=SECRET, ttl_s=ttl)
    with pytest.raises(ValueError):
        tokens().issue(StreamClaims(call_sid="CA.1"))
    with pytest.raises(ValueError):
        tokens().issue(StreamClaims(call_sid=""))


@given(
    call_sid=st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True),
    secret=st.binary(min_size=1, max_size=64),
    ttl=st.floats(min_value=0.001, max_value=86_400),
    assistant=st.text(max_size=64),
    caller=st.text(max_size=40),
    called=st.text(max_size=40),
)
def test_tokens_round_trip(
    call_sid: str, secret: bytes, ttl: float, assistant: str, caller: str, called: str
) -> None:
    clock = FakeClock()
    issuer = StreamTokens(secret=secret, ttl_s=ttl, clock=clock)
    checker = StreamTokens(secret=secret, ttl_s=ttl, clock=clock)
    claims = StreamClaims(call_sid=call_sid, assistant=assistant, caller=caller, called=called)
    token = issuer.issue(claims)
    assert len(token) <= MAX_TOKEN_CHARS
    checker.verify(token, claims)
    with pytest.raises(TokenRejected):
        checker.verify(token, claims)


@given(st.text(max_size=300))
def test_arbitrary_text_is_rejected_not_crashing(text: str) -> None:
    with pytest.raises(TokenRejected):
        tokens().verify(text, SIGNED)


# -- rotating the secret ------------------------------------------------------------

NEW_SECRET = b"fedcba9876543210fedcba9876543210"


def test_tokens_issued_with_the_previous_secret_are_still_accepted() -> None:
    clock = FakeClock()
    old = tokens(clock)
    before = old.issue(SIGNED)
    rotated = StreamTokens(secret=NEW_SECRET, previous_secret=SECRET, ttl_s=60.0, clock=clock)
    rotated.verify(before, SIGNED)
    # New tokens are issued with the new secret: an instance that only knows the old
    # secret refuses them, one that only knows the new one accepts them.
    after = rotated.issue(SIGNED)
    assert rejected(tokens(clock), after) == "bad-signature"
    tokens(clock, secret=NEW_SECRET).verify(after, SIGNED)
    # Once the previous secret is dropped, its tokens are refused.
    assert rejected(tokens(clock, secret=NEW_SECRET), old.issue(SIGNED)) == "bad-signature"


def test_a_token_signed_with_the_previous_secret_must_still_carry_its_claims() -> None:
    clock = FakeClock()
    before = tokens(clock).issue(SIGNED)
    rotated = StreamTokens(secret=NEW_SECRET, previous_secret=SECRET, ttl_s=60.0, clock=clock)
    assert rejected(rotated, before, attrs.evolve(SIGNED, caller="+15550199999")) == (
        "wrong-parameters"
    )


def test_rekeyed_tokens_remember_the_tokens_used_before() -> None:
    clock = FakeClock()
    t = tokens(clock)
    used, unused = t.issue(SIGNED), t.issue(SIGNED)
    t.verify(used, SIGNED)
    rotated = t.rekeyed(secret=NEW_SECRET, previous_secret=SECRET, ttl_s=60.0)
    assert rejected(rotated, used) == "reused"
    rotated.verify(unused, SIGNED)
    assert rejected(t, unused) == "reused"  # one memory, shared


def test_a_token_tells_when_it_was_issued() -> None:
    clock = FakeClock(1_700_000_000.25)
    issued = tokens(clock).issue(SIGNED)
    clock.now += 30
    assert token_module.issued_at(issued, 60.0) == 1_700_000_000.25
    assert token_module.issued_at("not-a-token", 60.0) is None
