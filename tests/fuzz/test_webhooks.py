"""Property tests of the webhooks through the real app: any form body, any headers.

The voice webhook and the ``<Connect action>`` face the network. Whatever arrives —
signed or not, well-formed or not, with any fields and values — the answer is one a
caller survives: TwiML (200), or 400 / 403 / 413 for requests Twilio never sends. Never
a 5xx, which makes Twilio play its generic error to the caller. Signed requests get
TwiML that parses. Vapi's webhook answers 401 to anything without its credential, 413
to anything over its limit, and never a 5xx. Driven through quart's test client
against the real routes.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from quart import Response
from quart_trio import QuartTrio

from tests.fuzz.strategies import json_values
from voicebridge.config import Secret
from voicebridge.loopback import loopback_config
from voicebridge.server import build_services
from voicebridge.twilio.signature import sign
from voicebridge.web import AFTER_STREAM_PATH, MAX_WEBHOOK_BYTES, VOICE_PATH, create_app

AUTH_TOKEN = "fuzz-auth-token-0123456789abcdef"
PORT = 9
#: Statuses a webhook may answer with; anything else (a 5xx above all) is a bug.
ALLOWED = {200, 400, 403, 413}

values = st.text(max_size=40) | st.text(max_size=700) | st.sampled_from(["", "+15550100001"])
forms = st.dictionaries(
    st.sampled_from(["CallSid", "From", "To", "AccountSid", "CallStatus", "Digits"])
    | st.text(max_size=12),
    values,
    max_size=6,
)
paths = st.sampled_from([VOICE_PATH, AFTER_STREAM_PATH])


#: A complete configuration; nothing listens at its Vapi URL (no call gets that far).
CONFIG = loopback_config(
    port=PORT, vapi_base_url="http://127.0.0.1:9", auth_token=AUTH_TOKEN, api_key="k"
)


@asynccontextmanager
async def the_app() -> AsyncIterator[QuartTrio]:
    async with httpx.AsyncClient() as http:
        services = build_services(CONFIG, http)
        yield create_app(lambda: services)


async def post_signed(app: QuartTrio, path: str, form: dict[str, str]) -> Response:
    """POST ``form`` to ``path``, signed as Twilio signs it."""
    url = f"http://127.0.0.1:{PORT}{path}"
    headers = {"X-Twilio-Signature": sign(url, form, AUTH_TOKEN)}
    response: Response = await app.test_client().post(path, form=form, headers=headers)
    return response


def assert_twiml(body: str | bytes) -> None:
    root = ET.fromstring(body)
    assert root.tag == "Response"


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(paths, forms, st.booleans())
async def test_any_form_signed_or_not_gets_twiml_or_a_4xx(
    path: str, form: dict[str, str], signed: bool
) -> None:
    url = f"http://127.0.0.1:{PORT}{path}"
    headers = {"X-Twilio-Signature": sign(url, form, AUTH_TOKEN)} if signed else {}
    async with the_app() as app:
        response = await app.test_client().post(path, form=form, headers=headers)
        body = await response.get_data()
    assert response.status_code in ALLOWED, (response.status_code, body[:200])
    if not signed:
        assert response.status_code == 403
    elif response.status_code == 200:
        assert_twiml(body)
    else:  # Twilio always sends a CallSid: CA and 32 hex digits
        assert response.status_code == 400
        assert body in (b"CallSid missing\n", b"CallSid malformed\n")


@settings(
    max_examples=60,
    deadline=None,
    # Bodies past MAX_WEBHOOK_BYTES are large on purpose.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)
@given(
    paths,
    st.binary(max_size=300)
    | st.binary(min_size=MAX_WEBHOOK_BYTES, max_size=MAX_WEBHOOK_BYTES + 10),
    st.sampled_from(["application/x-www-form-urlencoded", "multipart/form-data", "text/plain", ""]),
    st.dictionaries(
        st.sampled_from(["X-Twilio-Signature", "Content-Encoding", "X-Forwarded-For"]),
        st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40),
        max_size=3,
    ),
)
async def test_any_body_and_headers_get_a_4xx_or_twiml(
    path: str, body: bytes, content_type: str, headers: dict[str, str]
) -> None:
    if content_type:
        headers["Content-Type"] = content_type
    async with the_app() as app:
        response = await app.test_client().post(path, data=body, headers=headers)
        answer = await response.get_data()
    assert response.status_code in ALLOWED, (response.status_code, answer[:200])
    if response.status_code == 200:
        assert_twiml(answer)


async def test_a_signed_call_with_a_valid_form_is_answered_with_a_stream() -> None:
    # The property tests above must not pass by refusing everything.
    form = {"CallSid": "CA" + "1" * 32, "From": "+15550100001", "To": "+15550100002"}
    async with the_app() as app:
        response = await post_signed(app, VOICE_PATH, form)
        body = await response.get_data()
    assert response.status_code == 200
    assert b"<Stream" in body


async def test_a_call_from_a_very_long_number_is_still_answered() -> None:
    # Found by the property test: a From past Twilio's <Parameter> limit made the
    # webhook fail (500, and Twilio's generic error for the caller). It is left out.
    form = {"CallSid": "CA" + "2" * 32, "From": "sip:" + "x" * 600 + "@example.com"}
    async with the_app() as app:
        response = await post_signed(app, VOICE_PATH, form)
        body = await response.get_data()
    assert response.status_code == 200
    [caller] = [p for p in ET.fromstring(body).iter("Parameter") if p.get("name") == "caller"]
    assert caller.get("value") == ""


async def test_a_malformed_call_sid_is_refused_without_taking_a_slot() -> None:
    # Found by the property test: a signed webhook whose CallSid the stream token cannot
    # carry failed with a 500 after admission had reserved a slot for it.
    form = {"CallSid": "CA 1/2", "From": "+15550100001"}
    async with httpx.AsyncClient() as http:
        services = build_services(CONFIG, http)
        response = await post_signed(create_app(lambda: services), VOICE_PATH, form)
    assert response.status_code == 400
    assert services.registry.load == 0


# --- Vapi's webhook: the credential first, then the limit, then the message -------------------

VAPI_SECRET = "fuzz-vapi-secret-0123456789"
VAPI_LIMIT = 2048
VAPI_CONFIG = CONFIG.evolve(
    control=attrs.evolve(CONFIG.control, enabled=True, auth="bearer", max_body_bytes=VAPI_LIMIT),
    credentials=attrs.evolve(CONFIG.credentials, vapi_webhook_secret=Secret(VAPI_SECRET)),
)
vapi_bodies = (
    st.binary(max_size=300)
    | st.builds(lambda v: json.dumps({"message": v}).encode(), json_values())
    | st.binary(min_size=VAPI_LIMIT - 2, max_size=VAPI_LIMIT + 2)
)


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)
@given(
    vapi_bodies,
    st.sampled_from(["", f"Bearer {VAPI_SECRET}", f"Bearer {VAPI_SECRET}x", VAPI_SECRET]),
)
async def test_any_vapi_webhook_is_judged_by_its_credential_then_its_size(
    body: bytes, authorization: str
) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    async with httpx.AsyncClient() as http:
        services = build_services(VAPI_CONFIG, http)
        app = create_app(lambda: services)
        response = await app.test_client().post("/vapi/webhook", data=body, headers=headers)
    if authorization != f"Bearer {VAPI_SECRET}":
        assert response.status_code == 401
    elif len(body) > VAPI_LIMIT:
        assert response.status_code == 413
    else:
        assert response.status_code in (200, 400)
