"""The routing table: order, prefixes, callers, refusal, direct dial; its checks; the CLI;
the decision the stream token carries."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from secrets import token_hex
from typing import Any

import pytest

from voicebridge.config import Config, config_from_mapping, load_config, render_config
from voicebridge.errors import ConfigError
from voicebridge.routing import (
    DEFAULT_ROUTE,
    MAX_DECISION_CHARS,
    AssistantChoice,
    DialChoice,
    RefuseChoice,
    Router,
    decision_parameters,
    decode_decision,
    encode_decision,
    joined_decision,
)
from voicebridge.twilio.token import StreamClaims, StreamTokens, TokenRejected
from voicebridge.vapi.client import build_create_body

SALES = "+15550001111"
SUPPORT = "+15550002222"
CALL_SID = "CA" + "0" * 32

ROUTES: list[dict[str, Any]] = [
    {"name": "vip", "to": [SALES], "callers": ["+4930123*"], "assistant_id": "asst-vip"},
    {"name": "sales", "to": [SALES], "assistant_id": "asst-sales",
     "assistant_overrides": {"firstMessage": "Sales, hello!", "variableValues": {"team": "s"}}},
    {"name": "berlin", "to": ["+4930*"], "assistant": {"name": "inline", "firstMessage": "Hallo"}},
    {"name": "night", "to": [SUPPORT], "dial": "+15550009999"},
    {"name": "blocked", "callers": ["+1900*"], "refuse": True},
    {"name": "closed", "to": ["+15550003333"], "twiml": "<Response><Say>Closed.</Say></Response>"},
    {"name": "german", "to": ["+49*"], "assistant_overrides": {"variableValues": {"lang": "de"}}},
]


def load(data: dict[str, Any], **environ: str) -> Config:
    return config_from_mapping(data, environ=environ, require_complete=False)


def router(routes: list[dict[str, Any]] = ROUTES) -> Router:
    return Router(load({"vapi": {"assistant_id": "asst-default"}, "routes": routes}))


def errors(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(data)
    return [str(info.value), *getattr(info.value, "__notes__", [])]


def test_the_first_route_that_matches_takes_the_call() -> None:
    table = router()
    # The same number: the caller decides between vip and sales, in order.
    vip = table.match(to=SALES, caller="+4930123456")
    assert (vip.route, vip.choice) == ("vip", AssistantChoice(assistant_id="asst-vip"))
    sales = table.match(to=SALES, caller="+15551234567")
    assert sales.route == "sales"
    assert sales.choice == AssistantChoice(
        assistant_id="asst-sales",
        overrides={"firstMessage": "Sales, hello!", "variableValues": {"team": "s"}},
    )
    # Order wins over specificity: vip comes first, but only for its callers.
    assert router(list(reversed(ROUTES[:2]))).match(to=SALES, caller="+4930123456").route == "sales"


def test_prefixes_exact_numbers_and_the_default_route() -> None:
    table = router()
    assert table.match(to="+4930999", caller="").route == "berlin"
    assert table.match(to="+4989123", caller="").route == "german"  # +49*, not +4930*
    assert table.match(to=SALES + "1", caller="").route == DEFAULT_ROUTE  # exact means exact
    default = table.match(to="+15559999999", caller="+15551234567")
    assert default.route == DEFAULT_ROUTE
    assert default.choice == AssistantChoice()  # today's settings
    assert default.why == "no route takes it: today's settings"


def test_refusals_and_direct_dial() -> None:
    table = router()
    night = table.match(to=SUPPORT, caller="+15551234567")
    assert night.choice == DialChoice(number="+15550009999")
    # A blocked caller is refused whatever they dial (routes before it take theirs first).
    blocked = table.match(to="+15558888888", caller="+19005551234")
    assert isinstance(blocked.choice, RefuseChoice)
    assert "all our lines are busy" in blocked.choice.twiml  # the [overflow] message
    assert blocked.choice.twiml.endswith("<Hangup /></Response>")
    closed = table.match(to="+15550003333", caller="")
    assert closed.choice == RefuseChoice(twiml="<Response><Say>Closed.</Say></Response>")


def test_an_anonymous_caller_matches_only_any_caller() -> None:
    table = router([{"name": "us", "callers": ["+1*"], "dial": "+15550009999"},
                    {"name": "rest", "callers": ["*"], "refuse": True}])
    assert table.match(to=SALES, caller="anonymous").route == "rest"
    assert table.match(to=SALES, caller="+15551234567").route == "us"


def test_explain_says_why_each_route_did_not_take_it() -> None:
    lines = router().explain(to="+4930999", caller="+15551234567")
    assert lines == [
        "routes[0] vip: no (to +4930999 matches none of +15550001111)",
        "routes[1] sales: no (to +4930999 matches none of +15550001111)",
        "routes[2] berlin: takes it",
        "route: berlin",
        "why: to +4930999 matches +4930*, caller +15551234567 matches any",
        "gives: an inline assistant",
    ]


@pytest.mark.parametrize(
    ("route", "key", "fragment"),
    [
        ({"name": "a b"}, "routes[0].name", "must be 1-32 letters"),
        ({"name": "default"}, "routes[0].name", "reserved"),
        ({"name": "x", "to": ["555"]}, "routes[0].to[0]", "an E.164 number, a prefix"),
        ({"name": "x", "callers": ["+1*5"]}, "routes[0].callers[0]", "a prefix"),
        ({"name": "x", "dial": "555"}, "routes[0].dial", "E.164"),
        ({"name": "x", "dial": "+15550009999", "assistant_id": "a"}, "routes[0]",
         "gives assistant_id and dial: a route gives at most one"),
        ({"name": "x", "refuse": True, "assistant_overrides": {"firstMessage": "hi"}},
         "routes[0].assistant_overrides", "only an assistant takes overrides"),
        ({"name": "x", "twiml": "<Say>hi</Say>"}, "routes[0].twiml", "<Response> document"),
        ({"name": "x", "twiml": "<Response>"}, "routes[0].twiml", "is not XML"),
        ({"name": "x", "assistant_id": "no spaces"}, "routes[0].assistant_id", "assistant id"),
        ({"name": "x", "colour": "red"}, "routes[0].colour", "unknown key"),
        ({"name": "x", "assistant": {"prompt": "".join(f"{i:x}" for i in range(40_000))}},
         "routes[0]", f"over the {MAX_DECISION_CHARS} a call carries"),
    ],
)
def test_check_config_names_the_route_key_and_the_reason(
    route: dict[str, Any], key: str, fragment: str
) -> None:
    problems = errors({"routes": [route]})
    assert any(p.startswith(f"{key}: ") and fragment in p for p in problems), problems


def test_names_are_unique_and_routes_an_array_of_tables() -> None:
    problems = errors({"routes": [{"name": "a", "refuse": True}, {"name": "a", "refuse": True}]})
    assert problems == ["routes[1].name: 'a' is taken by routes[0]"]
    assert errors({"routes": {"name": "a"}}) == [
        "routes: expected an array of tables ([[routes]]), got a table"
    ]
    # Several problems in several routes: all reported, each with its key.
    problems = errors({"routes": [{"name": "ok"}, {"name": "x", "dial": "1"}, {"to": ["+1"]}]})
    assert problems == [
        "routes[1].dial: must be empty or an E.164 number ('+' and 8 to 15 digits), got '1'",
        "routes[2].name: required",
    ]


def test_a_hook_needs_its_secret(tmp_path: Path) -> None:
    data = {"route_hook": {"url": "https://hooks.example/route"}}
    with pytest.raises(ConfigError) as info:
        config_from_mapping(data, environ={}, require_complete=True)
    assert any(
        p.startswith("credentials.route_hook_secret: missing")
        for p in [str(info.value), *info.value.__notes__]
    )
    problems = [
        p
        for p in errors_with(data, VOICEBRIDGE_ROUTE_HOOK_SECRET="short")
        if "route_hook_secret" in p
    ]
    assert problems == [
        "credentials.route_hook_secret: must be at least 16 bytes "
        "(from environment variable VOICEBRIDGE_ROUTE_HOOK_SECRET)"
    ]


def errors_with(data: dict[str, Any], **environ: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(data, **environ)
    return [str(info.value), *getattr(info.value, "__notes__", [])]


EXAMPLE_TOML = """
[server]
public_url = "https://bridge.example.com"
[twilio]
account_sid = "AC00000000000000000000000000000000"
[vapi]
assistant_id = "asst-default"

[[routes]]
name = "sales"
to = ["+15550001111"]
assistant_id = "asst-sales"
assistant_overrides = { variableValues = { team = "sales" } }

[[routes]]
name = "night"
to = ["+15550002222"]
callers = ["+1555*"]
dial = "+15550009999"
ask_hook = false
"""


def write_config(tmp_path: Path) -> Path:
    path = tmp_path / "voicebridge.toml"
    path.write_text(EXAMPLE_TOML)
    return path


def test_check_config_renders_the_routes_so_that_they_load_again(tmp_path: Path) -> None:
    environ = {
        "VOICEBRIDGE_TWILIO_AUTH_TOKEN": "t" * 32,
        "VOICEBRIDGE_VAPI_API_KEY": "k" * 32,
        "VOICEBRIDGE_STREAM_TOKEN_SECRET": "s" * 32,
    }
    config = load_config(write_config(tmp_path), environ=environ)
    rendered = render_config(config)
    assert '[[routes]]\nname = "sales"' in rendered
    again = tmp_path / "again.toml"
    # The rendered file, less its informational [credentials] table, loads to the same routes.
    again.write_text(rendered.split("[credentials]")[0].replace("# Not a file section", "#"))
    assert load_config(again, environ=environ).routes == config.routes


def test_the_route_command_prints_the_route_and_why(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "voicebridge", "route", "--to", "+15550002222",
         "--from", "+15551230000", "--config", str(path)],
        capture_output=True, text=True, check=False, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "routes[0] sales: no (to +15550002222 matches none of +15550001111)",
        "routes[1] night: takes it",
        "route: night",
        "why: to +15550002222 matches +15550002222, caller +15551230000 matches +1555*",
        "gives: dial +15550009999 (no assistant)",
    ]
    bad = tmp_path / "bad.toml"
    bad.write_text('[[routes]]\nname = "x"\ndial = "nope"\n')
    result = subprocess.run(
        [sys.executable, "-m", "voicebridge", "route", "--to", "+1", "--config", str(bad)],
        capture_output=True, text=True, check=False, timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("voicebridge: config error: routes[0].dial: ")


# --- the decision a call carries ------------------------------------------------------


def test_a_decision_survives_the_parameters_and_the_token_covers_it() -> None:
    choice = AssistantChoice(
        assistant={"model": {"messages": [{"role": "system", "content": token_hex(1000) + "é\n"}]}},
        overrides={"variableValues": {"name": "Ada"}},
    )
    blob = encode_decision(choice)
    parameters = decision_parameters(blob)
    assert len(parameters) > 1  # cut into several <Parameter>s …
    assert all(len(n) + len(v) < 500 for n, v in parameters.items())  # … each under Twilio's limit
    assert joined_decision(parameters) == blob
    assert decode_decision(blob) == {
        "assistant": choice.assistant, "assistantOverrides": choice.overrides
    }
    tokens = StreamTokens(secret=b"k" * 32, ttl_s=60)
    claims = StreamClaims(call_sid=CALL_SID, caller="+1", called="+2", route="r", decision=blob)
    token = tokens.issue(claims)
    other = encode_decision(AssistantChoice(overrides={"variableValues": {"name": "Eve"}}))
    for changed in (
        StreamClaims(call_sid=CALL_SID, caller="+1", called="+2", route="r", decision=other),
        StreamClaims(call_sid=CALL_SID, caller="+1", called="+2", route="s", decision=blob),
        StreamClaims(call_sid=CALL_SID, caller="+1", called="+2"),
    ):
        with pytest.raises(TokenRejected) as info:
            tokens.verify(token, changed)
        assert info.value.reason == "wrong-parameters"
    tokens.verify(token, claims)


def test_a_default_route_token_is_the_same_claim_as_before_routes() -> None:
    tokens = StreamTokens(secret=b"k" * 32, ttl_s=60)
    plain = StreamClaims(call_sid=CALL_SID, caller="+1", called="+2")
    token = tokens.issue(plain)
    # A route with an empty name and no decision hashes as the claims always did.
    tokens.verify(token, StreamClaims(call_sid=CALL_SID, caller="+1", called="+2", route=""))
    # Moving a value between claims is a change, not the same encoding.
    moved = tokens.issue(StreamClaims(call_sid=CALL_SID, called="+2", route="+1"))
    with pytest.raises(TokenRejected):
        tokens.verify(moved, StreamClaims(call_sid=CALL_SID, caller="+1", called="+2"))


def test_the_decision_reaches_vapis_create_body_under_the_bridges_own_keys() -> None:
    config = load({"vapi": {"assistant_id": "asst-default"}})
    decision = decode_decision(encode_decision(AssistantChoice(
        assistant={"name": "inline"},
        overrides={
            "firstMessage": "Hi Ada",
            "variableValues": {"name": "Ada", "caller": "forged"},
            "clientMessages": [],
            "maxDurationSeconds": 99999,
        },
    )))
    body = build_create_body(
        config.vapi, call_sid=CALL_SID, caller="+1", called="+2", decision=decision
    )
    assert body["assistant"] == {"name": "inline"} and "assistantId" not in body
    overrides = body["assistantOverrides"]
    assert overrides["firstMessage"] == "Hi Ada"
    assert overrides["variableValues"] == {
        "name": "Ada", "twilioCallSid": CALL_SID, "caller": "+1", "called": "+2"
    }
    assert overrides["clientMessages"] != []
    assert overrides["maxDurationSeconds"] == config.vapi.max_duration_s
    # An assistant id (the route's) wins over the configured one; no decision: as ever.
    plain = build_create_body(config.vapi, call_sid=CALL_SID, caller="+1", called="+2",
                              assistant="asst-sales")
    assert plain["assistantId"] == "asst-sales"
    assert plain["assistantOverrides"]["variableValues"] == {
        "twilioCallSid": CALL_SID, "caller": "+1", "called": "+2"
    }
