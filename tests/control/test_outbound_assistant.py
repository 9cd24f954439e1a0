"""An outbound call's own assistant: granted by voicebridge's outbound path, honoured by the
voice webhook, refused when forged or not allowed (sans-I/O, then end to end on loopback).
"""

from __future__ import annotations

import io
import logging
from functools import partial
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import attrs
import httpx
import pytest
import trio

from tests.harness import Bridge, running_bridge
from voicebridge.config import (
    Config,
    OutboundConfig,
    Secret,
    Secrets,
    VapiConfig,
    config_from_mapping,
)
from voicebridge.control.assistants import (
    AssistantRefused,
    granted_assistant,
    outbound_assistant,
    outbound_voice_url,
)
from voicebridge.control.outbound import call_main
from voicebridge.control.routes import CALLS_PATH
from voicebridge.errors import ConfigError
from voicebridge.observability.logs import record_fields
from voicebridge.sim.caller import CallReport, Hangup, WaitForAssistant, place_call
from voicebridge.sim.twilio_rest import SimTwilioRest
from voicebridge.sim.vapi import SimVapiCallRecord

CALLEE = "+15550100777"
OTHER_CALLEE = "+15550100888"
FROM = "+15550100001"
ALLOWED = ("asst-sales", "asst-support")
VOICE_URL = "https://bridge.example.com/twilio/voice"
API_TOKEN = "control-api-token-0123456789"
CONFIG = Config(
    vapi=VapiConfig(assistant_id="asst-main"),
    outbound=OutboundConfig(assistants=ALLOWED),
    credentials=Secrets(stream_token_secret=Secret("stream-token-secret-0123456789")),
)
NOT_LISTED = "assistant 'asst-nobody' is not listed in outbound.assistants"
NO_GRANT = (
    "the assistant in the voice webhook URL has no valid grant for this call "
    "(voicebridge did not place it)"
)


def query_of(url: str) -> dict[str, str]:
    return dict(parse_qsl(urlsplit(url).query))


# --- the grant, sans-I/O ------------------------------------------------------------------


def test_the_configured_assistant_needs_no_grant() -> None:
    for requested in ("", "asst-main"):
        assert outbound_voice_url(CONFIG, VOICE_URL, to=CALLEE, assistant=requested) == VOICE_URL
    assert granted_assistant(CONFIG, {}, to=CALLEE) == ""


def test_a_granted_assistant_is_honoured_for_its_number_only() -> None:
    url = outbound_voice_url(CONFIG, VOICE_URL, to=CALLEE, assistant="asst-sales")
    query = query_of(url)
    assert url.startswith(VOICE_URL + "?assistant=asst-sales&assistantGrant=")
    assert granted_assistant(CONFIG, query, to=CALLEE) == "asst-sales"
    forged: list[tuple[dict[str, str], str]] = [
        (query, OTHER_CALLEE),  # the URL of one call reused for another number
        ({**query, "assistant": "asst-support"}, CALLEE),  # another assistant, same grant
        ({"assistant": "asst-sales"}, CALLEE),  # no grant at all
        ({"assistantGrant": query["assistantGrant"]}, CALLEE),  # a grant without its assistant
        ({**query, "assistantGrant": "A" * 43}, CALLEE),
    ]
    for bad_query, to in forged:
        with pytest.raises(AssistantRefused) as refused:
            granted_assistant(CONFIG, bad_query, to=to)
        assert str(refused.value) == NO_GRANT
    other_deployment = attrs.evolve(
        CONFIG, credentials=Secrets(stream_token_secret=Secret("another-secret-0123456789"))
    )
    with pytest.raises(AssistantRefused, match="no valid grant"):
        granted_assistant(other_deployment, query, to=CALLEE)


def test_a_grant_made_before_a_rotation_of_the_secret_still_holds() -> None:
    query = query_of(outbound_voice_url(CONFIG, VOICE_URL, to=CALLEE, assistant="asst-sales"))
    old = CONFIG.credentials.stream_token_secret
    new = Secret("the-new-stream-token-secret-0123")
    rotated = attrs.evolve(
        CONFIG, credentials=Secrets(stream_token_secret=new, stream_token_secret_previous=old)
    )
    assert granted_assistant(rotated, query, to=CALLEE) == "asst-sales"
    after = attrs.evolve(CONFIG, credentials=Secrets(stream_token_secret=new))
    with pytest.raises(AssistantRefused, match="no valid grant"):
        granted_assistant(after, query, to=CALLEE)


def test_a_grant_ends_when_its_assistant_leaves_the_allow_list() -> None:
    query = query_of(outbound_voice_url(CONFIG, VOICE_URL, to=CALLEE, assistant="asst-sales"))
    narrowed = attrs.evolve(CONFIG, outbound=OutboundConfig(assistants=("asst-support",)))
    with pytest.raises(AssistantRefused) as refused:
        granted_assistant(narrowed, query, to=CALLEE)
    assert str(refused.value) == "assistant 'asst-sales' is not listed in outbound.assistants"


def test_only_listed_assistants_may_be_named() -> None:
    assert outbound_assistant(CONFIG, "asst-support") == "asst-support"
    with pytest.raises(AssistantRefused) as refused:
        outbound_assistant(CONFIG, "asst-nobody")
    assert str(refused.value) == NOT_LISTED
    with pytest.raises(AssistantRefused) as malformed:
        outbound_assistant(CONFIG, "asst sales&x=1")
    assert str(malformed.value) == (
        "an assistant id is 1-64 letters, digits, _ or -, got 'asst sales&x=1'"
    )
    unsigned = attrs.evolve(CONFIG, credentials=Secrets())
    with pytest.raises(AssistantRefused, match="needs the stream token secret"):
        outbound_voice_url(unsigned, VOICE_URL, to=CALLEE, assistant="asst-sales")


def test_the_allow_list_is_checked_when_the_configuration_loads() -> None:
    config = config_from_mapping(
        {"outbound": {"assistants": ["asst-sales"]}}, environ={}, require_complete=False
    )
    assert config.outbound.assistants == ("asst-sales",)
    from_env = config_from_mapping(
        {},
        environ={"VOICEBRIDGE_OUTBOUND_ASSISTANTS": "asst-sales, asst-support"},
        require_complete=False,
    )
    assert from_env.outbound.assistants == ALLOWED
    with pytest.raises(ConfigError) as bad:
        config_from_mapping(
            {"outbound": {"assistants": ["asst-sales", "a/b"]}}, environ={}, require_complete=False
        )
    assert "outbound.assistants[1]" in str(bad.value)


# --- end to end: the CLI and the HTTP endpoint, through the simulated Twilio REST API -------


def write_cli_config(tmp_path: Path, bridge: Bridge, rest: SimTwilioRest) -> Path:
    """What an operator's config file holds for ``voicebridge call`` against ``bridge``."""
    (tmp_path / "token").write_text(bridge.caller.auth_token + "\n")
    secret = bridge.config.credentials.stream_token_secret.reveal()
    (tmp_path / "stream-secret").write_text(secret + "\n")
    config = tmp_path / "voicebridge.toml"
    config.write_text(
        f'[server]\npublic_url = "{bridge.config.server.public_url}"\n'
        f'[twilio]\naccount_sid = "{bridge.caller.account_sid}"\n'
        f'rest_base_url = "{rest.base_url}"\n'
        f'[outbound]\nfrom_number = "{FROM}"\nassistants = ["asst-sales", "asst-support"]\n'
        f'[secrets]\ntwilio_auth_token_file = "{tmp_path / "token"}"\n'
        f'stream_token_secret_file = "{tmp_path / "stream-secret"}"\n'
    )
    return config


def vapi_call_of(bridge: Bridge, call_sid: str) -> SimVapiCallRecord:
    [vapi_call] = [c for c in bridge.vapi.calls.values() if c.call_sid == call_sid]
    return vapi_call


async def test_an_outbound_call_reaches_the_assistant_it_names(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    script = (WaitForAssistant(heard_ms=300), Hangup())
    rest = SimTwilioRest(callee_script=script)
    err = io.StringIO()

    async def cli(*args: str) -> tuple[int, str]:
        out = io.StringIO()
        number, *rest_of_args = args
        assistant = rest_of_args[0] if rest_of_args else ""
        status = await trio.to_thread.run_sync(
            partial(call_main, number, str(config), assistant=assistant, out=out, err=err)
        )
        return status, out.getvalue().strip()

    with trio.fail_after(25):
        async with trio.open_nursery() as nursery:
            await nursery.start(rest.serve)
            async with running_bridge(
                twilio={"rest_base_url": rest.base_url},
                outbound={"from_number": FROM, "assistants": ALLOWED, "http_enabled": True},
                credentials={"control_api_token": Secret(API_TOKEN)},
            ) as bridge:
                rest.settings = bridge.caller
                config = write_cli_config(tmp_path, bridge, rest)

                named_status, named_sid = await cli(CALLEE, "asst-sales")
                default_status, default_sid = await cli(CALLEE)
                refused_status, _ = await cli(CALLEE, "asst-nobody")
                assert (named_status, default_status, refused_status) == (0, 0, 2), err.getvalue()
                async with httpx.AsyncClient() as http:

                    async def post_call(document: object) -> httpx.Response:
                        return await http.post(
                            bridge.url + CALLS_PATH,
                            json=document,
                            headers={"Authorization": f"Bearer {API_TOKEN}"},
                        )

                    over_http = await post_call({"to": CALLEE, "assistant": "asst-support"})
                    not_listed = await post_call({"to": CALLEE, "assistant": "asst-nobody"})
                    not_text = await post_call({"to": CALLEE, "assistant": 7})
                assert over_http.status_code == 201, over_http.text
                http_sid = over_http.json()["callSid"]
                placed = {c.call_sid: c for c in rest.created}
                assert set(placed) == {named_sid, default_sid, http_sid}, "refused ones not placed"
                reports = {sid: await rest.wait_report(sid) for sid in placed}

                # Someone who can point a Twilio number at our webhook, but holds no grant.
                granted_url = placed[named_sid].url
                public = bridge.config.server.public_url
                forged_paths = {
                    "replayed for another number": granted_url.removeprefix(public),
                    "no grant": "/twilio/voice?assistant=asst-sales",
                    "a made-up grant": "/twilio/voice?assistant=asst-sales&assistantGrant="
                    + "A" * 43,
                }
                caplog.clear()
                with caplog.at_level(logging.WARNING, logger="voicebridge.control.routes"):
                    forged: dict[str, CallReport] = {}
                    for what, path in forged_paths.items():
                        settings = attrs.evolve(
                            bridge.caller, voice_path=path, to_number=OTHER_CALLEE
                        )
                        forged[what] = await place_call(settings, script)
                rejected = [
                    (record_fields(r), r.getMessage())
                    for r in caplog.records
                    if r.name == "voicebridge.control.routes"
                ]
                created_for = {c.call_sid for c in bridge.vapi.calls.values()}
            nursery.cancel_scope.cancel(reason="the simulated REST API is no longer needed")

    # The assistant each call reached, as Vapi saw its creation.
    assert vapi_call_of(bridge, named_sid).assistant_id == "asst-sales"
    assert vapi_call_of(bridge, default_sid).assistant_id == "sim-assistant"
    assert vapi_call_of(bridge, http_sid).assistant_id == "asst-support"
    for sid, report in reports.items():
        assert report.streamed and report.first_audio_ms is not None, sid
        assert report.protocol_violations == [], sid
    assert granted_url.startswith(public + "/twilio/voice?assistant=asst-sales&assistantGrant=")
    assert placed[default_sid].url == public + "/twilio/voice"

    # Refused before any call was placed, with the reason.
    assert err.getvalue() == f"voicebridge: --assistant refused: {NOT_LISTED}\n"
    assert (not_listed.status_code, not_listed.json()) == (400, {"error": NOT_LISTED})
    assert (not_text.status_code, not_text.json()) == (
        400,
        {"error": "'assistant' must be a string"},
    )

    # Forged: refused at the webhook, no stream, no Vapi call; one log line each.
    for what, report in forged.items():
        assert (report.webhook_status, report.streamed) == (403, False), what
        assert report.call_sid not in created_for, what
    assert [(f["EVENT"], f["REASON"]) for f, _ in rejected] == [
        ("webhook-rejected", "assistant")
    ] * 3
    assert [text for _, text in rejected] == [f"/twilio/voice: {NO_GRANT}; answered 403"] * 3
