"""Webhook authentication, sans-I/O: every mode, over raw bytes, with the replay window."""

from __future__ import annotations

import base64
import hashlib
import hmac

import attrs
import pytest

from voicebridge.config import ControlConfig
from voicebridge.control.auth import WebhookAuthenticator, WebhookAuthError
from voicebridge.errors import ConfigError

BODY = b'{"message": {"type": "status-update",  "status": "ended"}}'  # odd spacing on purpose
URL = "https://bridge.example.com/vapi/webhook"
NOW = 1_800_000_000.0
SECRET = "webhook-secret-0123456789"


def check(config: ControlConfig, headers: dict[str, str], body: bytes = BODY) -> None:
    auth = WebhookAuthenticator.from_config(config, SECRET)
    auth.verify(headers=headers, body=body, method="POST", url=URL, now=NOW)


def reason(config: ControlConfig, headers: dict[str, str], body: bytes = BODY) -> str:
    with pytest.raises(WebhookAuthError) as info:
        check(config, headers, body)
    return info.value.reason


def test_legacy_secret_header() -> None:
    config = ControlConfig(auth="secret")
    check(config, {"x-vapi-secret": SECRET})
    assert reason(config, {}) == "missing"
    assert reason(config, {"x-vapi-secret": SECRET + "x"}) == "mismatch"


def test_bearer_with_configurable_header_and_prefix() -> None:
    check(ControlConfig(auth="bearer"), {"authorization": f"Bearer {SECRET}"})
    assert reason(ControlConfig(auth="bearer"), {"authorization": SECRET}) == "mismatch"
    custom = ControlConfig(auth="bearer", bearer_header="X-Api-Key", bearer_prefix="")
    check(custom, {"x-api-key": SECRET})
    assert reason(custom, {"authorization": f"Bearer {SECRET}"}) == "missing"


def hmac_config(**changes: object) -> ControlConfig:
    return attrs.evolve(ControlConfig(auth="hmac", credential_id="cred-1"), **changes)


def signature(payload: bytes, *, key: bytes = SECRET.encode(), algorithm: str = "sha256") -> str:
    return hmac.new(key, payload, getattr(hashlib, algorithm)).hexdigest()


def test_hmac_default_signs_timestamp_dot_raw_body() -> None:
    stamp = str(int(NOW))
    good = {"x-signature": signature(stamp.encode() + b"." + BODY), "x-timestamp": stamp}
    check(hmac_config(), good)
    # A re-serialised body (what a JSON framework would hand over) does not verify.
    assert reason(hmac_config(), good, body=BODY.replace(b"  ", b" ")) == "mismatch"
    assert reason(hmac_config(), {"x-timestamp": stamp}) == "missing"
    assert reason(hmac_config(), {"x-signature": good["x-signature"]}) == "missing"


def test_hmac_every_option() -> None:
    config = hmac_config(
        hmac_algorithm="sha512",
        hmac_signature_header="X-Vapi-Signature",
        hmac_timestamp_header="X-Vapi-Timestamp",
        hmac_signature_prefix="sha512=",
        hmac_payload_format="{method}|{url}|{timestamp}|{body}",
        hmac_signature_encoding="base64",
        hmac_secret_is_base64=True,
    )
    key = b"\x00\x01binary-key\xff"
    stamp = str(int(NOW * 1000))  # milliseconds are accepted too
    payload = f"POST|{URL}|{stamp}|".encode() + BODY
    digest = hmac.new(key, payload, hashlib.sha512).digest()
    headers = {
        "x-vapi-signature": "sha512=" + base64.b64encode(digest).decode(),
        "x-vapi-timestamp": stamp,
    }
    auth = WebhookAuthenticator.from_config(config, base64.b64encode(key).decode())
    auth.verify(headers=headers, body=BODY, method="post", url=URL, now=NOW)


@pytest.mark.parametrize(
    ("stamp", "why"),
    [
        (str(int(NOW - 301)), "stale"),
        (str(int(NOW + 301)), "stale"),
        (str(int((NOW - 400) * 1000)), "stale"),
        ("yesterday", "malformed"),
        ("nan", "malformed"),
        ("9" * 30, "malformed"),
    ],
)
def test_hmac_replay_window(stamp: str, why: str) -> None:
    headers = {"x-signature": signature(stamp.encode() + b"." + BODY), "x-timestamp": stamp}
    assert reason(hmac_config(), headers) == why


def test_errors_never_show_the_secret_or_signature() -> None:
    stamp = str(int(NOW))
    bad = signature(b"other")
    with pytest.raises(WebhookAuthError) as info:
        check(hmac_config(), {"x-signature": bad, "x-timestamp": stamp})
    assert SECRET not in str(info.value) and bad not in str(info.value)
    assert SECRET not in repr(WebhookAuthenticator.from_config(hmac_config(), SECRET))


@pytest.mark.parametrize(
    ("config", "secret", "why"),
    [
        (ControlConfig(), "", "empty"),
        (hmac_config(hmac_secret_is_base64=True), "not base64!", "not base64"),
        (hmac_config(hmac_secret_is_base64=True), "abc", "not base64"),
        (hmac_config(hmac_secret_is_base64=True), "====", "not base64"),
        (hmac_config(hmac_secret_is_base64=True), "", "empty"),
        (ControlConfig(auth="bearer"), "tok\nen", "HTTP header"),
        (ControlConfig(auth="secret"), "sécret-0123456789", "HTTP header"),
        (ControlConfig(auth="secret"), " padded ", "HTTP header"),
        (ControlConfig(auth="bearer", bearer_prefix=""), " leading", "HTTP header"),
    ],
)
def test_a_secret_that_cannot_work_is_a_config_error(
    config: ControlConfig, secret: str, why: str
) -> None:
    with pytest.raises(ConfigError) as info:
        WebhookAuthenticator.from_config(config, secret)
    assert info.value.key == "credentials.vapi_webhook_secret"
    assert why in info.value.reason
    assert not secret or secret.strip() not in str(info.value)


@pytest.mark.parametrize(
    ("config", "good"),
    [
        (ControlConfig(auth="secret"), {"x-vapi-secret": SECRET}),
        (ControlConfig(auth="bearer"), {"authorization": f"Bearer {SECRET}"}),
    ],
)
def test_header_modes_decide_on_the_headers_alone(
    config: ControlConfig, good: dict[str, str]
) -> None:
    auth = WebhookAuthenticator.from_config(config, SECRET)
    assert not auth.needs_body
    auth.verify_headers(headers=good, now=NOW)
    with pytest.raises(WebhookAuthError, match="mismatch"):
        auth.verify_headers(headers={k: v + "x" for k, v in good.items()}, now=NOW)
    with pytest.raises(WebhookAuthError, match="missing"):
        auth.verify_headers(headers={}, now=NOW)


def test_hmac_headers_decide_presence_and_freshness_before_the_body() -> None:
    auth = WebhookAuthenticator.from_config(hmac_config(), SECRET)
    assert auth.needs_body
    stamp = str(int(NOW))
    # A wrong signature of a fresh request passes the headers: only the body can tell.
    auth.verify_headers(headers={"x-signature": "00", "x-timestamp": stamp}, now=NOW)
    for headers, why in [
        ({"x-timestamp": stamp}, "missing"),
        ({"x-signature": "00"}, "missing"),
        ({"x-signature": "00", "x-timestamp": str(int(NOW - 301))}, "stale"),
        ({"x-signature": "00", "x-timestamp": "soon"}, "malformed"),
    ]:
        with pytest.raises(WebhookAuthError) as info:
            auth.verify_headers(headers=headers, now=NOW)
        assert info.value.reason == why
