"""The front door's overflow answer (``voicebridge.web.early_overflow``): which voice
webhooks it answers itself, and that it answers, counts and logs them as the app does.

Charter: the decision on its own, with the services ``serve()`` builds (a registry on a
clock of the test's, real signatures, the real router), fed the request as the front
door reads it; every request it leaves to the app must leave no trace here (nothing
counted, nothing logged). That the app answers those as before, and the whole path from
another process against a busy server, is in tests/test_admission_e2e.py.
"""

from __future__ import annotations

import logging
import urllib.parse
from typing import Any

import attrs
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from voicebridge.bridge.registry import Answer, CallRegistry, Spent
from voicebridge.config import Config, config_from_mapping
from voicebridge.loopback import loopback_config
from voicebridge.net.front import EarlyRequest, EarlyResponse
from voicebridge.observability.logs import record_fields
from voicebridge.observability.looplag import LoopPressure
from voicebridge.routing import Router
from voicebridge.server import build_services
from voicebridge.twilio import twiml
from voicebridge.twilio.signature import sign
from voicebridge.web import TWIML_CONTENT_TYPE, VOICE_PATH, Services, early_overflow

AUTH_TOKEN = "t" * 32
PORT = 8080
PUBLIC_URL = f"http://127.0.0.1:{PORT}"
CALL_SID = "CA" + "a" * 32
OTHER_SID = "CA" + "b" * 32
CALLED = "+15550001111"


@attrs.define
class Clock:
    now: float = 100.0

    def __call__(self) -> float:
        return self.now


def services(*, max_calls: int = 2, routes: list[dict[str, Any]] | None = None) -> Services:
    """The services of a server with shedding at 50 ms of lag over 2 s, on a test clock."""
    config = loopback_config(
        port=PORT, vapi_base_url="http://127.0.0.1:9", auth_token=AUTH_TOKEN, api_key="k"
    )
    config = config.evolve(
        server=attrs.evolve(
            config.server,
            max_concurrent_calls=max_calls,
            shed_loop_lag_ms=50,
            shed_loop_lag_window_s=2.0,
        )
    )
    clock = Clock()
    registry = CallRegistry(
        max_calls=max_calls,
        reservation_ttl_s=60,
        clock=clock,
        pressure=LoopPressure(threshold_s=0.05, window_s=2.0, clock=clock),
    )
    built = build_services(config, httpx.AsyncClient(), registry=registry)
    if routes is not None:
        routed: Config = config_from_mapping(
            {"vapi": {"assistant_id": "asst-default"}, "routes": routes},
            environ={},
            require_complete=False,
        )
        built = attrs.evolve(built, router=Router(routed))
    return built


def behind(services: Services, lag_s: float = 0.08) -> None:
    """The loop monitor's wakes of the last second, each ``lag_s`` late."""
    assert services.registry.pressure is not None
    for _ in range(10):
        services.registry.pressure.loop_lag(lag_s)


def webhook(
    call_sid: str = CALL_SID,
    *,
    query: str = "",
    signature: str | None = None,
    content_type: bytes = b"application/x-www-form-urlencoded",
    **fields: str,
) -> EarlyRequest:
    """The voice webhook the simulated Twilio sends, signed for ``PUBLIC_URL``."""
    form = {
        "CallSid": call_sid, "AccountSid": "AC" + "0" * 32, "From": "+15557654321",
        "To": CALLED, "CallStatus": "ringing", "Direction": "inbound", **fields,
    }  # fmt: skip
    target = VOICE_PATH + (f"?{query}" if query else "")
    if signature is None:
        signature = sign(PUBLIC_URL + target, form, AUTH_TOKEN)
    return EarlyRequest(
        method=b"POST",
        target=target.encode(),
        headers=[
            (b"host", b"127.0.0.1"),
            (b"content-type", content_type),
            (b"x-twilio-signature", signature.encode()),
        ],
        body=urllib.parse.urlencode(form).encode(),
    )


def refused(services: Services) -> dict[str, float]:
    """``voicebridge_admissions_refused_total`` by reason."""
    text = services.metrics.exposition(active_calls=0, admitting=False).decode()
    return {
        sample.labels["reason"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "voicebridge_admissions_refused_total" and sample.value
    }


def events(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [dict(record_fields(record)) for record in caplog.records if record_fields(record)]


def test_while_calls_are_admitted_it_leaves_every_webhook_to_the_app(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="voicebridge.web")
    box = services()
    assert early_overflow(box, webhook()) is None
    assert box.registry.load == 0, "nothing admitted here"
    assert (refused(box), events(caplog)) == ({}, [])


@pytest.mark.parametrize("reason", ["loop-behind", "at-capacity"])
def test_a_new_call_refused_for_load_gets_the_overflow_counted_and_logged(
    caplog: pytest.LogCaptureFixture, reason: str
) -> None:
    caplog.set_level(logging.DEBUG, logger="voicebridge.web")
    box = services()
    if reason == "loop-behind":
        behind(box)
    else:
        for n in range(box.registry.max_calls):
            box.registry.admit(f"CA{n:032x}", lambda: "<Response/>")
    answer = early_overflow(box, webhook())
    assert answer == EarlyResponse(
        200, twiml.caller_action(box.config.overflow).encode(), TWIML_CONTENT_TYPE
    )
    assert refused(box) == {reason: 1.0}
    [route, refusal] = events(caplog)
    assert (route["EVENT"], route["ROUTE"], route["ACTION"]) == (
        "call-routed",
        "default",
        "assistant",
    )
    assert (refusal["EVENT"], refusal["CALL_SID"], refusal["REASON"]) == (
        "call-refused", CALL_SID, reason,
    )  # fmt: skip
    assert [
        r.levelno for r in caplog.records if record_fields(r).get("EVENT") == "call-refused"
    ] == [logging.WARNING]
    if reason == "loop-behind":
        assert refusal["LOOP_LAG_MS"] == 80.0


@pytest.mark.parametrize(
    "request_",
    [
        pytest.param(webhook(signature="forged"), id="bad signature"),
        pytest.param(webhook(signature=""), id="no signature"),
        pytest.param(webhook(CallSid="CA/1"), id="malformed CallSid"),
        pytest.param(webhook(CallSid=""), id="no CallSid"),
        pytest.param(webhook(content_type=b"application/json"), id="not a form"),
        pytest.param(attrs.evolve(webhook(), body=b"CallSid=%FF"), id="form not UTF-8"),
        pytest.param(
            webhook(query="assistant=asst-other&assistantGrant=forged"), id="refused grant"
        ),
        pytest.param(attrs.evolve(webhook(), target=b"/twilio/voice?a=\xff"), id="raw query"),
        pytest.param(attrs.evolve(webhook(), method=b"PUT"), id="not a POST"),
        pytest.param(attrs.evolve(webhook(), target=b"/twilio/after-stream"), id="other path"),
    ],
)
def test_anything_the_app_would_not_answer_with_the_overflow_is_left_to_it(
    caplog: pytest.LogCaptureFixture, request_: EarlyRequest
) -> None:
    caplog.set_level(logging.DEBUG, logger="voicebridge.web")
    box = services()
    behind(box)
    assert early_overflow(box, request_) is None
    assert (refused(box), events(caplog)) == ({}, [])


def test_a_repeat_or_a_replay_of_an_answered_webhook_is_left_to_the_app(
    caplog: pytest.LogCaptureFixture,
) -> None:
    box = services()
    assert isinstance(box.registry.admit(CALL_SID, lambda: "<Response>first</Response>"), Answer)
    assert box.registry.begin(OTHER_SID, lambda outcome, detail: 0.0)
    caplog.set_level(logging.DEBUG, logger="voicebridge.web")
    behind(box)
    assert early_overflow(box, webhook(CALL_SID)) is None  # the app gives the first answer
    assert early_overflow(box, webhook(OTHER_SID)) is None  # the app refuses the replay
    assert (refused(box), events(caplog)) == ({}, [])
    # Left as it was: the app decides them as if the front door had not looked.
    assert box.registry.admit(CALL_SID, lambda: "second") == Answer(
        "<Response>first</Response>", repeat=True
    )
    assert box.registry.admit(OTHER_SID, lambda: "second") == Spent("streamed")


def test_a_draining_server_leaves_its_refusals_to_the_app(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="voicebridge.web")
    box = services()
    box.registry.start_draining()
    assert early_overflow(box, webhook()) is None
    assert (refused(box), events(caplog)) == ({}, [])


def test_a_call_routed_away_from_the_assistants_is_left_to_the_app(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="voicebridge.web")
    box = services(routes=[{"name": "night", "to": [CALLED], "dial": "+15550009999"}])
    behind(box)
    assert early_overflow(box, webhook()) is None
    assert (refused(box), events(caplog)) == ({}, [])
    # An outbound call is not routed: refused here.
    answer = early_overflow(box, webhook(OTHER_SID, Direction="outbound-api"))
    assert answer is not None and b"<Connect" not in answer.body
    assert refused(box) == {"loop-behind": 1.0}
