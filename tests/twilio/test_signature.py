"""Tests of webhook signature checks, with signatures made by twilio-python's own validator.

The server in these tests sits behind a proxy: it sees http://127.0.0.1:8080/…, while
Twilio signed the public https://bridge.example.com/… URL.
"""

from __future__ import annotations

import hashlib

import pytest
from twilio.request_validator import RequestValidator
from werkzeug.datastructures import MultiDict

from voicebridge.twilio.signature import SignatureError, WebhookVerifier, sign, signature_settings

TOKEN = "12345678901234567890123456789012"
PUBLIC = "https://bridge.example.com"
FORM = {
    "CallSid": "CAfedcba9876543210fedcba9876543210",
    "AccountSid": "AC0123456789abcdef0123456789abcdef",
    "From": "+15551234567",
    "To": "+15557654321",
    "CallStatus": "ringing",
}


def twilio_signs(url: str, params: object = None) -> str:
    """The signature Twilio sends: the real library's compute_signature over its URL."""
    return str(RequestValidator(TOKEN).compute_signature(url, params or {}))


def verifier(public_url: str = PUBLIC) -> WebhookVerifier:
    return WebhookVerifier(auth_token=TOKEN, public_url=public_url)


def reason(error: pytest.ExceptionInfo[SignatureError]) -> str:
    return error.value.reason


# --------------------------------------------------------------------- form webhooks


def test_valid_form_signature_over_the_public_url() -> None:
    signature = twilio_signs("https://bridge.example.com/twilio/voice", FORM)
    verifier().verify_form(path_and_query="/twilio/voice", params=FORM, signature=signature)


def test_the_url_the_server_sees_is_not_what_twilio_signed() -> None:
    local = twilio_signs("http://127.0.0.1:8080/twilio/voice", FORM)
    with pytest.raises(SignatureError) as error:
        verifier().verify_form(path_and_query="/twilio/voice", params=FORM, signature=local)
    assert reason(error) == "mismatch"


def test_altered_parameters_do_not_match() -> None:
    signature = twilio_signs("https://bridge.example.com/twilio/voice", FORM)
    altered = {**FORM, "From": "+15550000000"}
    with pytest.raises(SignatureError) as error:
        verifier().verify_form(path_and_query="/twilio/voice", params=altered, signature=signature)
    assert reason(error) == "mismatch"
    with pytest.raises(SignatureError):
        verifier().verify_form(path_and_query="/twilio/other", params=FORM, signature=signature)


def test_another_token_does_not_match() -> None:
    signature = sign("https://bridge.example.com/twilio/voice", FORM, "another-token")
    with pytest.raises(SignatureError) as error:
        verifier().verify_form(path_and_query="/twilio/voice", params=FORM, signature=signature)
    assert reason(error) == "mismatch"


@pytest.mark.parametrize("header", [None, ""])
def test_a_missing_signature(header: str | None) -> None:
    v = verifier()
    with pytest.raises(SignatureError) as error:
        v.verify_form(path_and_query="/twilio/voice", params=FORM, signature=header)
    assert reason(error) == "missing"
    with pytest.raises(SignatureError) as error:
        v.verify_json(path_and_query="/x?bodySHA256=00", body=b"", signature=header)
    assert reason(error) == "missing"
    with pytest.raises(SignatureError) as error:
        v.verify_upgrade(path="/twilio/media", signature=header)
    assert reason(error) == "missing"


@pytest.mark.parametrize(
    ("public_url", "signed_url"),
    [
        ("https://bridge.example.com", "https://bridge.example.com/twilio/voice"),
        ("https://bridge.example.com", "https://bridge.example.com:443/twilio/voice"),
        ("https://bridge.example.com:443", "https://bridge.example.com/twilio/voice"),
        ("https://bridge.example.com:443", "https://bridge.example.com:443/twilio/voice"),
        ("https://bridge.example.com:8443", "https://bridge.example.com:8443/twilio/voice"),
        ("http://bridge.example.com", "http://bridge.example.com:80/twilio/voice"),
        ("https://bridge.example.com/", "https://bridge.example.com/twilio/voice"),
        (
            "https://edge.example.com/voicebridge",
            "https://edge.example.com/voicebridge/twilio/voice",
        ),
        (
            "https://edge.example.com:443/voicebridge/",
            "https://edge.example.com/voicebridge/twilio/voice",
        ),
    ],
)
def test_public_urls_with_and_without_ports_and_prefixes(public_url: str, signed_url: str) -> None:
    signature = twilio_signs(signed_url, FORM)
    verifier(public_url).verify_form(
        path_and_query="/twilio/voice", params=FORM, signature=signature
    )


def test_a_non_default_port_must_match() -> None:
    signature = twilio_signs("https://bridge.example.com:8443/twilio/voice", FORM)
    with pytest.raises(SignatureError):
        verifier().verify_form(path_and_query="/twilio/voice", params=FORM, signature=signature)


def test_the_query_string_is_signed() -> None:
    signature = twilio_signs("https://bridge.example.com/twilio/voice?leg=2&x=%20y", FORM)
    verifier().verify_form(
        path_and_query="/twilio/voice?leg=2&x=%20y", params=FORM, signature=signature
    )
    with pytest.raises(SignatureError):
        verifier().verify_form(path_and_query="/twilio/voice", params=FORM, signature=signature)
    with pytest.raises(SignatureError):
        verifier().verify_form(
            path_and_query="/twilio/voice?leg=3&x=%20y", params=FORM, signature=signature
        )


def test_repeated_form_fields_are_signed_as_twilio_does() -> None:
    url = "https://bridge.example.com/twilio/voice"
    pairs = [("StreamEvent", "b"), ("A", "2"), ("A", "1"), ("A", "2")]
    # How twilio-python signs a multi-valued form: names sorted, each distinct value sorted.
    expected = twilio_signs(url, MultiDict(pairs))
    raw = RequestValidator(TOKEN)
    assert expected == raw.compute_signature(url + "A1A2StreamEventb", {})

    assert sign(url, pairs, TOKEN) == expected
    for params in (pairs, MultiDict(pairs)):
        verifier().verify_form(path_and_query="/twilio/voice", params=params, signature=expected)
    # Keeping only one value of a repeated field breaks the signature.
    with pytest.raises(SignatureError):
        verifier().verify_form(
            path_and_query="/twilio/voice", params=dict(pairs), signature=expected
        )


def test_public_url_for_joins_the_base_and_the_request_path() -> None:
    assert verifier().public_url_for("/twilio/voice?a=1") == (
        "https://bridge.example.com/twilio/voice?a=1"
    )
    assert verifier("https://edge.example.com:8443/vb/").public_url_for("twilio/voice") == (
        "https://edge.example.com:8443/vb/twilio/voice"
    )


@pytest.mark.parametrize(
    "public_url",
    ["", "bridge.example.com", "ftp://bridge.example.com", "https://b.example.com/?x=1"],
)
def test_bad_public_urls_are_refused(public_url: str) -> None:
    with pytest.raises(ValueError):
        verifier(public_url)


def test_an_empty_token_is_refused() -> None:
    with pytest.raises(ValueError):
        WebhookVerifier(auth_token="", public_url=PUBLIC)


# ---------------------------------------------------------------------- JSON bodies


def test_json_body_signature() -> None:
    body = b'{"CallSid": "CA1", "note": "caf\xc3\xa9"}'
    digest = hashlib.sha256(body).hexdigest()
    path = f"/twilio/events?bodySHA256={digest}"
    signature = twilio_signs("https://bridge.example.com" + path)
    # The real validator agrees this request is valid.
    assert RequestValidator(TOKEN).validate(
        "https://bridge.example.com" + path, body.decode(), signature
    )
    verifier().verify_json(path_and_query=path, body=body, signature=signature)

    with pytest.raises(SignatureError) as error:
        verifier().verify_json(path_and_query=path, body=body + b" ", signature=signature)
    assert reason(error) == "mismatch"


def test_json_body_hash_must_be_signed_and_present() -> None:
    body = b"{}"
    signed_path = "/twilio/events?bodySHA256=" + hashlib.sha256(b"[]").hexdigest()
    forged_path = "/twilio/events?bodySHA256=" + hashlib.sha256(body).hexdigest()
    signature = twilio_signs("https://bridge.example.com" + signed_path)
    with pytest.raises(SignatureError):
        verifier().verify_json(path_and_query=forged_path, body=body, signature=signature)

    signature = twilio_signs("https://bridge.example.com/twilio/events")
    with pytest.raises(SignatureError, match="bodySHA256"):
        verifier().verify_json(path_and_query="/twilio/events", body=body, signature=signature)


# ------------------------------------------------------------------ media upgrade


@pytest.mark.parametrize(
    ("public_url", "signed_url"),
    [
        ("https://bridge.example.com", "wss://bridge.example.com/twilio/media"),
        ("https://bridge.example.com", "wss://bridge.example.com/twilio/media/"),
        ("https://bridge.example.com:443", "wss://bridge.example.com/twilio/media"),
        ("https://bridge.example.com", "wss://bridge.example.com:443/twilio/media"),
        ("https://edge.example.com/vb", "wss://edge.example.com/vb/twilio/media/"),
        ("http://127.0.0.1:8080", "ws://127.0.0.1:8080/twilio/media"),
    ],
)
def test_upgrade_signature_over_the_websocket_url(public_url: str, signed_url: str) -> None:
    verifier(public_url).verify_upgrade(path="/twilio/media", signature=twilio_signs(signed_url))


@pytest.mark.parametrize(
    "signed_url",
    [
        "https://bridge.example.com/twilio/media",
        "wss://bridge.example.com:80/twilio/media",
        "wss://bridge.example.com/twilio/other",
        "wss://other.example.com/twilio/media",
    ],
)
def test_upgrade_signature_over_another_url(signed_url: str) -> None:
    with pytest.raises(SignatureError) as error:
        verifier().verify_upgrade(path="/twilio/media", signature=twilio_signs(signed_url))
    assert reason(error) == "mismatch"


def test_sign_is_twilios_compute_signature() -> None:
    url = "https://bridge.example.com/twilio/voice"
    assert sign(url, FORM, TOKEN) == RequestValidator(TOKEN).compute_signature(url, FORM)
    assert sign(url, list(FORM.items()), TOKEN) == sign(url, FORM, TOKEN)


# ------------------------------------------------------------ shared-key signing (beta)

SHARED_KEY = "shared-key-secret-0123456789abcdef"
KEY_ID = "webhooks_sharedkey_0123456789abcdef"
SETTINGS = f"key={KEY_ID},algorithm=HMAC_SHA256"
VOICE_URL = "https://bridge.example.com/twilio/voice"


def shared_key_signs(url: str, params: object = None, *, algorithm: str = "HMAC_SHA256") -> str:
    """What Twilio sends under a shared-key Webhook Rule: the library's signature, made
    with the SharedKey and the algorithm its settings header names."""
    return str(RequestValidator(SHARED_KEY).compute_signature(url, params or {}, algorithm))


def shared_verifier(
    *, shared_key: str = SHARED_KEY, shared_key_id: str = KEY_ID
) -> WebhookVerifier:
    return WebhookVerifier(
        auth_token=TOKEN, public_url=PUBLIC, shared_key=shared_key, shared_key_id=shared_key_id
    )


@pytest.mark.parametrize("key_id", [KEY_ID, ""], ids=["key id configured", "any key id"])
def test_a_shared_key_signature_is_accepted(key_id: str) -> None:
    signature = shared_key_signs(VOICE_URL, FORM)
    shared_verifier(shared_key_id=key_id).verify_form(
        path_and_query="/twilio/voice", params=FORM, signature=signature, settings=SETTINGS
    )
    # The settings header in another spelling Twilio might use: spaces, order, case.
    shared_verifier(shared_key_id=key_id).verify_form(
        path_and_query="/twilio/voice",
        params=FORM,
        signature=signature,
        settings=f" algorithm=hmac_sha256 , key={KEY_ID}",
    )
    # The Auth Token still checks the webhooks that are not moved to shared-key signing.
    shared_verifier(shared_key_id=key_id).verify_form(
        path_and_query="/twilio/voice", params=FORM, signature=twilio_signs(VOICE_URL, FORM)
    )


def test_shared_key_json_and_upgrade_signatures() -> None:
    body = b'{"event": "x"}'
    path = f"/twilio/status?bodySHA256={hashlib.sha256(body).hexdigest()}"
    shared_verifier().verify_json(
        path_and_query=path,
        body=body,
        signature=shared_key_signs(PUBLIC + path),
        settings=SETTINGS,
    )
    shared_verifier().verify_upgrade(
        path="/twilio/stream",
        signature=shared_key_signs("wss://bridge.example.com/twilio/stream"),
        settings=SETTINGS,
    )


@pytest.mark.parametrize(
    ("signature", "settings", "configured", "detail"),
    [
        # A shared-key request, but this server has no shared key.
        (shared_key_signs(VOICE_URL, FORM), SETTINGS, "", "not configured"),
        # Signed with another SharedKey id than the configured one.
        (
            shared_key_signs(VOICE_URL, FORM),
            "key=webhooks_sharedkey_other,algorithm=HMAC_SHA256",
            SHARED_KEY,
            "'webhooks_sharedkey_other'",
        ),
        # An algorithm the library does not compute is refused, not guessed at.
        (
            shared_key_signs(VOICE_URL, FORM),
            f"key={KEY_ID},algorithm=HMAC_SHA512",
            SHARED_KEY,
            "unsupported signature algorithm 'HMAC_SHA512'",
        ),
        # No algorithm named: nothing to check with.
        (shared_key_signs(VOICE_URL, FORM), f"key={KEY_ID}", SHARED_KEY, "algorithm ''"),
        # The header claims shared-key signing, but the Auth Token signed: not accepted.
        (twilio_signs(VOICE_URL, FORM), SETTINGS, SHARED_KEY, "with the shared key"),
        # The shared key signed with SHA-1 while the header says SHA-256.
        (
            shared_key_signs(VOICE_URL, FORM, algorithm="HMAC_SHA1"),
            SETTINGS,
            SHARED_KEY,
            "with the shared key",
        ),
        # A shared-key signature without the header is checked with the Auth Token.
        (shared_key_signs(VOICE_URL, FORM), None, SHARED_KEY, "with the auth token"),
    ],
)
def test_shared_key_signatures_that_are_refused(
    signature: str, settings: str | None, configured: str, detail: str
) -> None:
    with pytest.raises(SignatureError) as error:
        shared_verifier(shared_key=configured).verify_form(
            path_and_query="/twilio/voice", params=FORM, signature=signature, settings=settings
        )
    assert reason(error) == "mismatch"
    assert detail in str(error.value)


def test_a_hostile_settings_header_is_quoted_and_cut() -> None:
    settings = "key=" + "\x1b[31m" * 100 + ",algorithm=HMAC_SHA256"
    with pytest.raises(SignatureError) as error:
        shared_verifier().verify_form(
            path_and_query="/twilio/voice",
            params=FORM,
            signature=shared_key_signs(VOICE_URL, FORM),
            settings=settings,
        )
    assert "\x1b" not in str(error.value) and len(str(error.value)) < 300


def test_signature_settings_parsing() -> None:
    assert signature_settings(SETTINGS) == (KEY_ID, "HMAC_SHA256")
    assert signature_settings("algorithm=HMAC_SHA256") == ("", "HMAC_SHA256")
    assert signature_settings("garbage, key = k1 ,future=x") == ("k1", "")


def test_sign_with_a_shared_key_is_the_librarys_signature() -> None:
    assert sign(VOICE_URL, FORM, SHARED_KEY, algorithm="HMAC_SHA256") == shared_key_signs(
        VOICE_URL, FORM
    )


# ------------------------------------------------------ rotating the Auth Token


NEW_TOKEN = "abcdefabcdefabcdefabcdefabcdef12"


def test_during_a_rotation_either_token_is_accepted_and_after_it_only_the_new_one() -> None:
    """Twilio's flow: the secondary token becomes ours (the old one stays as previous)
    before it is promoted; after the promotion the old one is dropped."""
    url = "https://bridge.example.com/twilio/voice"
    by_old, by_new = sign(url, FORM, TOKEN), sign(url, FORM, NEW_TOKEN)
    before = WebhookVerifier(auth_token=TOKEN, public_url=PUBLIC)
    during = WebhookVerifier(auth_token=NEW_TOKEN, previous_auth_token=TOKEN, public_url=PUBLIC)
    after = WebhookVerifier(auth_token=NEW_TOKEN, public_url=PUBLIC)
    for v, accepted, refused in ((before, [by_old], [by_new]), (during, [by_old, by_new], []),
                                 (after, [by_new], [by_old])):
        for signature in accepted:
            v.verify_form(path_and_query="/twilio/voice", params=FORM, signature=signature)
        for signature in refused:
            with pytest.raises(SignatureError) as error:
                v.verify_form(path_and_query="/twilio/voice", params=FORM, signature=signature)
            assert reason(error) == "mismatch"


def test_the_previous_token_also_checks_json_bodies_and_the_media_upgrade() -> None:
    during = WebhookVerifier(auth_token=NEW_TOKEN, previous_auth_token=TOKEN, public_url=PUBLIC)
    body = b'{"CallSid": "CA1"}'
    query = "?bodySHA256=" + hashlib.sha256(body).hexdigest()
    json_url = "https://bridge.example.com/twilio/status" + query
    during.verify_json(
        path_and_query="/twilio/status" + query, body=body, signature=sign(json_url, {}, TOKEN)
    )
    ws_url = "wss://bridge.example.com/twilio/stream"
    during.verify_upgrade(path="/twilio/stream", signature=sign(ws_url, {}, TOKEN))
    with pytest.raises(SignatureError):
        during.verify_upgrade(path="/twilio/stream", signature=sign(ws_url, {}, "a third token"))
