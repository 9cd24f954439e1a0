"""A box's own public URL (``server.box_url``): what Twilio signs for it is accepted, what
it signs for another box is not, and the configuration names the key of a bad one."""

from __future__ import annotations

import pytest

from voicebridge.config import config_from_mapping
from voicebridge.errors import ConfigError
from voicebridge.twilio.signature import SignatureError, WebhookVerifier, sign

TOKEN = "0123456789abcdef0123456789abcdef"
PUBLIC = "https://voice.example.com"
BOX_A = "https://edge-a.example.com"
BOX_B = "https://edge-b.example.com"
FORM = [("CallSid", "CA" + "1" * 32), ("CallStatus", "completed")]


def verifier() -> WebhookVerifier:
    return WebhookVerifier(auth_token=TOKEN, public_url=PUBLIC, box_url=BOX_A)


@pytest.mark.parametrize("base", [PUBLIC, BOX_A])
def test_a_request_signed_for_the_public_or_the_box_url_is_accepted(base: str) -> None:
    signature = sign(base + "/twilio/after-stream", FORM, TOKEN)
    verifier().verify_form(path_and_query="/twilio/after-stream", params=FORM, signature=signature)


def test_a_request_signed_for_another_box_is_refused() -> None:
    signature = sign(BOX_B + "/twilio/after-stream", FORM, TOKEN)
    with pytest.raises(SignatureError) as info:
        verifier().verify_form(
            path_and_query="/twilio/after-stream", params=FORM, signature=signature
        )
    assert info.value.reason == "mismatch"


def test_the_stream_upgrade_signed_for_the_box_is_accepted() -> None:
    for base, accepted in ((BOX_A, True), (PUBLIC, True), (BOX_B, False)):
        signature = sign("wss" + base.removeprefix("https") + "/twilio/stream", [], TOKEN)
        if accepted:
            verifier().verify_upgrade(path="/twilio/stream", signature=signature)
        else:
            with pytest.raises(SignatureError):
                verifier().verify_upgrade(path="/twilio/stream", signature=signature)


def test_the_box_url_is_this_box_s_own_url_and_a_bad_one_is_refused_with_its_key() -> None:
    server = {"public_url": PUBLIC, "box_url": BOX_A + "/"}
    config = config_from_mapping({"server": server}, environ={}, require_complete=False)
    assert config.server.own_url == BOX_A
    alone = config_from_mapping(
        {"server": {"public_url": PUBLIC}}, environ={}, require_complete=False
    )
    assert alone.server.own_url == PUBLIC
    with pytest.raises(ConfigError) as info:
        config_from_mapping(
            {"server": {"public_url": PUBLIC, "box_url": "ftp://edge-a"}},
            environ={},
            require_complete=False,
        )
    assert "box_url" in str(info.value)
