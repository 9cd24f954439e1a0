"""Tests of voicebridge.config: loading, validation, env overrides, secrets, rendering.

Charter: plain synchronous functions; files only under ``tmp_path``; every test passes its
own ``environ`` so the machine's environment never leaks in. What is asserted is what an
operator sees: the key path and reason of an error, the rendered text, the exit code.
"""

from __future__ import annotations

import io
import math
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from voicebridge.config import (
    DEFAULT_CONFIG_PATH,
    FILE_SECTIONS,
    SECRET_SOURCES,
    BridgeConfig,
    CallerAction,
    Config,
    Secret,
    ServerConfig,
    check_config_main,
    config_from_mapping,
    key_lines,
    load_config,
    render_config,
)
from voicebridge.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "systemd" / "voicebridge.example.toml"
DOCS = REPO / "docs" / "configuration.md"

SID = "AC" + "0123456789abcdef" * 2
TOKEN = "twilio-token-Zq8x"
API_KEY = "vapi-key-Mw3k7p"
STREAM_SECRET = "stream-secret-Hq2v9rT4yL"
SECRET_VALUES = (TOKEN, API_KEY, STREAM_SECRET)

#: Everything require_complete wants, through the environment.
COMPLETE_ENV = {
    "VOICEBRIDGE_SERVER_PUBLIC_URL": "https://bridge.example.com",
    "VOICEBRIDGE_TWILIO_ACCOUNT_SID": SID,
    "VOICEBRIDGE_VAPI_ASSISTANT_ID": "asst-1",
    "VOICEBRIDGE_TWILIO_AUTH_TOKEN": TOKEN,
    "VOICEBRIDGE_VAPI_API_KEY": API_KEY,
    "VOICEBRIDGE_STREAM_TOKEN_SECRET": STREAM_SECRET,
}


def write(tmp_path: Path, text: str, name: str = "voicebridge.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def load(data: dict[str, Any], **environ: str) -> Config:
    return config_from_mapping(data, environ=environ, require_complete=False)


def error_of(data: dict[str, Any], **environ: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(data, **environ)
    return info.value


def all_problems(exc: ConfigError) -> list[str]:
    return [str(exc), *getattr(exc, "__notes__", [])]


# --- files -------------------------------------------------------------------------------


def test_valid_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
[server]
listen = "[::1]:9000"
public_url = "https://bridge.example.com/voice/"
max_concurrent_calls = 12
log_level = "debug"

[twilio]
account_sid = "{SID}"
start_deadline_s = 2

[vapi]
assistant_id = "asst-1"
audio_format = "pcm_s16le"
sample_rate = 16000

[vapi.assistant]
firstMessage = "Hello"
model = {{ provider = "openai", temperature = 0.5 }}

[bridge]
playout_lead_ms = 200
playout_chunk_ms = 40
barge_in_on_speech_start = true

[overflow]
say = "Busy."
dial = "+4915112345678"
""",
    )
    config = load_config(path, environ={}, require_complete=False)
    assert config.server == ServerConfig(
        listen="[::1]:9000",
        public_url="https://bridge.example.com/voice",
        max_concurrent_calls=12,
        log_level="debug",
    )
    assert config.twilio.account_sid == SID
    assert config.twilio.start_deadline_s == 2.0
    assert isinstance(config.twilio.start_deadline_s, float)
    assert config.vapi.audio_format == "pcm_s16le"
    assert config.vapi.sample_rate == 16000
    assert config.vapi.assistant == {
        "firstMessage": "Hello",
        "model": {"provider": "openai", "temperature": 0.5},
    }
    assert config.bridge == BridgeConfig(
        playout_lead_ms=200, playout_chunk_ms=40, barge_in_on_speech_start=True
    )
    assert config.overflow == CallerAction(say="Busy.", dial="+4915112345678")
    assert config.fallback == Config().fallback


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, ""), environ={}, require_complete=False) == Config()


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(missing, environ={})
    assert str(missing) in str(info.value)
    assert "No such file" in info.value.reason


@pytest.mark.skipif(Path(DEFAULT_CONFIG_PATH).exists(), reason="this machine has a config")
def test_default_path_is_used_when_none() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, environ={})
    assert DEFAULT_CONFIG_PATH in str(info.value)


def test_invalid_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "[server\nlisten = 1"), environ={})
    assert "not valid TOML" in info.value.reason
    assert "line 1" in info.value.reason


# --- unknown keys and types --------------------------------------------------------------


def test_unknown_nested_key_suggests_the_right_one() -> None:
    exc = error_of({"server": {"listn": "127.0.0.1:1"}})
    assert exc.key == "server.listn"
    assert exc.reason == "unknown key; did you mean server.listen?"


def test_unknown_top_level_section_suggests_the_right_one() -> None:
    exc = error_of({"sever": {}})
    assert exc.key == "sever"
    assert "unknown section" in exc.reason
    assert "did you mean server?" in exc.reason


def test_unknown_key_without_a_close_match() -> None:
    exc = error_of({"bridge": {"zzz": 1}})
    assert (exc.key, exc.reason) == ("bridge.zzz", "unknown key")


def test_key_in_the_wrong_section_points_at_the_right_one() -> None:
    exc = error_of({"twilio": {"public_url": "https://x.example"}})
    assert exc.key == "twilio.public_url"
    assert "server.public_url" in exc.reason


def test_credentials_is_not_a_file_section() -> None:
    exc = error_of({"credentials": {"vapi_api_key": "x"}})
    assert exc.key == "credentials"
    assert "not a config file section" in exc.reason


@pytest.mark.parametrize(
    ("data", "key", "reason"),
    [
        ({"server": {"max_concurrent_calls": "ten"}}, "server.max_concurrent_calls",
         "expected an integer, got 'ten'"),
        ({"server": {"max_concurrent_calls": 1.5}}, "server.max_concurrent_calls",
         "expected an integer, got 1.5"),
        ({"server": {"max_concurrent_calls": True}}, "server.max_concurrent_calls",
         "expected an integer, got true"),
        ({"server": {"listen": 8080}}, "server.listen", "expected a string, got 8080"),
        ({"twilio": {"validate_signatures": "yes"}}, "twilio.validate_signatures",
         "expected true or false, got 'yes'"),
        ({"twilio": {"start_deadline_s": "5"}}, "twilio.start_deadline_s",
         "expected a number, got '5'"),
        ({"vapi": {"assistant": "x"}}, "vapi.assistant", "expected a table, got 'x'"),
        ({"bridge": {"playout_lead_ms": [1]}}, "bridge.playout_lead_ms",
         "expected an integer, got an array"),
        ({"server": 3}, "server", "expected a table, got 3"),
        ({"overflow": {"say": {"a": 1}}}, "overflow.say", "expected a string, got a table"),
    ],
)  # fmt: skip
def test_wrong_types(data: dict[str, Any], key: str, reason: str) -> None:
    exc = error_of(data)
    assert (exc.key, exc.reason) == (key, reason)


@pytest.mark.parametrize(
    ("data", "key", "reason"),
    [
        ({"vapi": {"audio_format": "opus"}}, "vapi.audio_format",
         "must be one of mulaw, pcm_s16le; got 'opus'"),
        ({"vapi": {"sample_rate": 44100}}, "vapi.sample_rate",
         "must be one of 8000, 16000; got 44100"),
        ({"vapi": {"sample_rate": 8000.0}}, "vapi.sample_rate",
         "must be one of 8000, 16000; got 8000.0"),
        ({"server": {"log_level": "INFO"}}, "server.log_level",
         "must be one of debug, info, warning, error; got 'INFO'"),
    ],
)  # fmt: skip
def test_bad_literal(data: dict[str, Any], key: str, reason: str) -> None:
    exc = error_of(data)
    assert (exc.key, exc.reason) == (key, reason)


def test_several_problems_first_is_raised_others_are_notes() -> None:
    exc = error_of(
        {
            "server": {"max_concurrent_calls": "ten", "listn": "x"},
            "vapi": {"audio_format": "opus"},
            "sever": {},
        }
    )
    assert exc.key == "server.max_concurrent_calls"
    notes = exc.__notes__
    assert "server.listn: unknown key; did you mean server.listen?" in notes
    assert any(n.startswith("vapi.audio_format: must be one of") for n in notes)
    assert any(n.startswith("sever: unknown section") for n in notes)


@pytest.mark.parametrize(
    ("assistant", "key", "fragment"),
    [
        ({"a": [1, {"b": None}]}, "vapi.assistant.a[1].b", "null is not allowed"),
        ({"model": {"t": math.inf}}, "vapi.assistant.model.t", "finite"),
        ({"when": __import__("datetime").date(2024, 1, 1)}, "vapi.assistant.when", "JSON"),
    ],
)
def test_inline_assistant_must_be_json_data(
    assistant: dict[str, Any], key: str, fragment: str
) -> None:
    exc = error_of({"vapi": {"assistant": assistant}})
    assert exc.key == key
    assert fragment in exc.reason


def test_toml_dates_in_the_assistant_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "[vapi.assistant]\nmodel = { since = 2024-01-01 }\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert info.value.key == "vapi.assistant.model.since"


# --- semantic rules ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "listen", ["127.0.0.1:8080", "0.0.0.0:0", "localhost:65535", "[::1]:8080", "[::]:443"]
)
def test_listen_accepts(listen: str) -> None:
    assert load({"server": {"listen": listen}}).server.listen == listen


@pytest.mark.parametrize(
    ("listen", "fragment"),
    [
        ("127.0.0.1", "expected host:port"),
        (":8080", "expected host:port"),
        ("127.0.0.1:65536", "port must be a number from 0 to 65535"),
        ("127.0.0.1:http", "port must be"),
        ("::1:8080", "brackets"),
        ("[::1]8080", "expected host:port"),
        ("[nothost]:8080", "not an IPv6 address"),
        ("bad host:80", "not a host name"),
    ],
)
def test_listen_rejects(listen: str, fragment: str) -> None:
    exc = error_of({"server": {"listen": listen}})
    assert exc.key == "server.listen"
    assert fragment in exc.reason


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://bridge.example.com", "https://bridge.example.com"),
        ("https://bridge.example.com/", "https://bridge.example.com"),
        ("http://127.0.0.1:8080/prefix/", "http://127.0.0.1:8080/prefix"),
        ("", ""),
    ],
)
def test_public_url_accepts_and_normalises(url: str, expected: str) -> None:
    assert load({"server": {"public_url": url}}).server.public_url == expected


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("bridge.example.com", "absolute http:// or https://"),
        ("ftp://bridge.example.com", "absolute http:// or https://"),
        ("https://", "must name a host"),
        ("https:///path", "must name a host"),
        ("https://bridge.example.com/?a=1", "query"),
        ("https://bridge.example.com/#x", "fragment"),
        ("https://user:pw@bridge.example.com", "user name or password"),
        ("https://bridge.example.com:99999", "not a valid URL"),
        ("https://bridge example.com", "spaces"),
    ],
)
def test_public_url_rejects(url: str, fragment: str) -> None:
    exc = error_of({"server": {"public_url": url}})
    assert exc.key == "server.public_url"
    assert fragment in exc.reason


def test_vapi_base_url_is_validated_and_normalised() -> None:
    assert load({"vapi": {"base_url": "http://127.0.0.1:9/"}}).vapi.base_url == "http://127.0.0.1:9"
    exc = error_of({"vapi": {"base_url": "api.vapi.ai"}})
    assert exc.key == "vapi.base_url"


def test_max_concurrent_calls_at_least_one() -> None:
    assert load({"server": {"max_concurrent_calls": 1}}).server.max_concurrent_calls == 1
    exc = error_of({"server": {"max_concurrent_calls": 0}})
    assert (exc.key, exc.reason) == ("server.max_concurrent_calls", "must be at least 1, got 0")


def test_edge_defaults_and_values() -> None:
    edge = load({}).edge
    assert (edge.max_connections, edge.max_connections_per_peer) == (1024, 128)
    assert (edge.exempt_peers, edge.head_deadline_s, edge.body_deadline_s) == ((), 10.0, 30.0)
    edge = load(
        {"edge": {"max_connections": 64, "exempt_peers": ["10.1.0.0/16", "::1", "127.0.0.1"]}},
        VOICEBRIDGE_EDGE_MAX_CONNECTIONS_PER_PEER="8",
    ).edge
    assert (edge.max_connections, edge.max_connections_per_peer) == (64, 8)
    assert edge.exempt_peers == ("10.1.0.0/16", "::1", "127.0.0.1")
    from_env = load({}, VOICEBRIDGE_EDGE_EXEMPT_PEERS="192.0.2.7, 198.51.100.0/24").edge
    assert from_env.exempt_peers == ("192.0.2.7", "198.51.100.0/24")


@pytest.mark.parametrize(
    ("edge", "key", "reason"),
    [
        ({"max_connections": 4}, "edge.max_connections", "must be between 8 and 65536, got 4"),
        (
            {"max_connections": 100, "max_connections_per_peer": 101},
            "edge.max_connections_per_peer",
            "must not exceed max_connections (100), got 101",
        ),
        ({"max_connections_per_peer": 0}, "edge.max_connections_per_peer", "must be between"),
        ({"exempt_peers": ["10.0.0.1/8"]}, "edge.exempt_peers[0]", "has host bits set"),
        ({"exempt_peers": ["::1", "proxy.local"]}, "edge.exempt_peers[1]", "proxy.local"),
        ({"exempt_peers": "10.0.0.0/8"}, "edge.exempt_peers", "expected an array"),
        ({"max_conections": 10}, "edge.max_conections", "did you mean edge.max_connections?"),
    ],
)
def test_edge_refuses_bad_values_with_the_key(edge: dict[str, Any], key: str, reason: str) -> None:
    exc = error_of({"edge": edge})
    assert exc.key == key
    assert reason in exc.reason


#: Seconds with rules of their own (tested below): the assistant's limits sent to Vapi
#: (whole seconds in Vapi's ranges) and the silence deadline (0: derived from them).
ASSISTANT_LIMITS = {("vapi", "max_duration_s"), ("vapi", "silence_timeout_s"),
                    ("vapi", "silence_deadline_s"), ("keypad", "timeout_s")}
DEADLINES = [
    (section, a.name)
    for section, cls in FILE_SECTIONS.items()
    for a in attrs.fields(cls)
    if a.name.endswith("_s") and (section, a.name) not in ASSISTANT_LIMITS
]


def test_deadlines_are_all_covered() -> None:
    assert len(DEADLINES) == 20


def test_shedding_on_the_loops_lag_is_on_by_default_and_may_be_off() -> None:
    server = load({}).server
    assert (server.shed_loop_lag_ms, server.shed_loop_lag_window_s) == (50, 2.0)
    assert load({"server": {"shed_loop_lag_ms": 0}}).server.shed_loop_lag_ms == 0
    exc = error_of({"server": {"shed_loop_lag_ms": 10_001}})
    assert (exc.key, exc.reason) == (
        "server.shed_loop_lag_ms", "must be between 0 and 10000, got 10001"
    )


def test_the_assistants_limits_are_in_vapis_ranges_and_sent() -> None:
    vapi = load({"vapi": {"max_duration_s": 1800, "silence_timeout_s": 60}}).vapi
    assert (vapi.max_duration_s, vapi.silence_timeout_s) == (1800, 60)
    # The silence deadline follows the silence timeout unless set.
    assert vapi.assistant_silence_s == 75
    assert error_of({"vapi": {"max_duration_s": 5}}).key == "vapi.max_duration_s"
    assert error_of({"vapi": {"silence_timeout_s": 3601}}).key == "vapi.silence_timeout_s"
    assert error_of({"vapi": {"silence_deadline_s": -1}}).key == "vapi.silence_deadline_s"


def test_the_keypad_timeout_may_be_zero_and_at_most_ten_seconds() -> None:
    assert load({"keypad": {"timeout_s": 0}}).keypad.timeout_s == 0
    exc = error_of({"keypad": {"timeout_s": 11}})
    assert exc.key == "keypad.timeout_s"
    assert exc.reason == "must be between 0 and 10 seconds, got 11.0"
    assert error_of({"keypad": {"delimiters": ["5"]}}).key == "keypad.delimiters[0]"
    assert error_of({"keypad": {"wording": "no digits"}}).key == "keypad.wording"


def test_a_silence_deadline_below_the_silence_timeout_is_refused() -> None:
    exc = error_of({"vapi": {"silence_timeout_s": 60, "silence_deadline_s": 45}})
    assert exc.key == "vapi.silence_deadline_s"
    assert "at least vapi.silence_timeout_s + 15 s (75)" in exc.reason
    assert load({"vapi": {"silence_deadline_s": 90}}).vapi.assistant_silence_s == 90


@pytest.mark.parametrize(("section", "key"), DEADLINES)
@pytest.mark.parametrize("value", [0, -1.0, math.nan, math.inf, 1e6])
def test_deadlines_reject(section: str, key: str, value: float) -> None:
    exc = error_of({section: {key: value}})
    assert exc.key == f"{section}.{key}"
    assert "must be more than 0 and at most" in exc.reason


@pytest.mark.parametrize(("section", "key"), DEADLINES)
def test_deadlines_accept_small_positive(section: str, key: str) -> None:
    assert getattr(getattr(load({section: {key: 0.5}}), section), key) == 0.5


@pytest.mark.parametrize(
    ("bridge", "key", "fragment"),
    [
        ({"playout_lead_ms": 0}, "bridge.playout_lead_ms", "between 20 and 5000"),
        ({"playout_lead_ms": 5020}, "bridge.playout_lead_ms", "between 20 and 5000"),
        ({"playout_lead_ms": 310}, "bridge.playout_lead_ms", "multiple of 20"),
        ({"playout_chunk_ms": 30}, "bridge.playout_chunk_ms", "multiple of 20"),
        ({"playout_chunk_ms": 1020, "playout_lead_ms": 2000}, "bridge.playout_chunk_ms",
         "between 20 and 1000"),
        ({"playout_chunk_ms": 400, "playout_lead_ms": 300}, "bridge.playout_chunk_ms",
         "must not exceed playout_lead_ms (300)"),
        ({"barge_in_resume_gap_ms": 19}, "bridge.barge_in_resume_gap_ms", "between 20 and 5000"),
        ({"barge_in_resume_gap_ms": 5001}, "bridge.barge_in_resume_gap_ms",
         "between 20 and 5000"),
    ],
)  # fmt: skip
def test_bridge_rules(bridge: dict[str, int], key: str, fragment: str) -> None:
    exc = error_of({"bridge": bridge})
    assert exc.key == key
    assert fragment in exc.reason


def test_bridge_edges_accepted() -> None:
    bridge = load(
        {"bridge": {"playout_lead_ms": 20, "playout_chunk_ms": 20, "barge_in_resume_gap_ms": 20}}
    ).bridge
    assert (bridge.playout_lead_ms, bridge.playout_chunk_ms) == (20, 20)
    bridge = load({"bridge": {"playout_lead_ms": 5000, "playout_chunk_ms": 1000}}).bridge
    assert (bridge.playout_lead_ms, bridge.playout_chunk_ms) == (5000, 1000)


@pytest.mark.parametrize("section", ["overflow", "fallback"])
@pytest.mark.parametrize(
    "dial", ["123", "+1234567", "+1234567890123456", "0049301234567", "+49 30"]
)
def test_dial_must_be_e164(section: str, dial: str) -> None:
    exc = error_of({section: {"dial": dial}})
    assert exc.key == f"{section}.dial"
    assert "E.164" in exc.reason


@pytest.mark.parametrize("dial", ["", "+12345678", "+123456789012345"])
def test_dial_accepts_empty_and_e164(dial: str) -> None:
    assert load({"fallback": {"dial": dial}}).fallback.dial == dial


@pytest.mark.parametrize("sid", ["AC123", "XX" + "0" * 32, "AC" + "g" * 32, "AC" + "0" * 33])
def test_account_sid_shape(sid: str) -> None:
    exc = error_of({"twilio": {"account_sid": sid}})
    assert exc.key == "twilio.account_sid"
    assert "32 hex digits" in exc.reason


def test_validators_also_guard_direct_construction() -> None:
    with pytest.raises(ConfigError) as info:
        BridgeConfig(playout_lead_ms=30)
    assert info.value.key == "playout_lead_ms"


# --- environment overrides ---------------------------------------------------------------


def test_env_overrides_convert_to_the_field_type(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nmax_concurrent_calls = 3\n")
    config = load_config(
        path,
        environ={
            "VOICEBRIDGE_SERVER_MAX_CONCURRENT_CALLS": "10",
            "VOICEBRIDGE_VAPI_ASSISTANT_ID": "asst-9",
            "VOICEBRIDGE_VAPI_SAMPLE_RATE": "16000",
            "VOICEBRIDGE_VAPI_AUDIO_FORMAT": "pcm_s16le",
            "VOICEBRIDGE_TWILIO_MEDIA_INACTIVITY_S": "2.5",
            "VOICEBRIDGE_OVERFLOW_DIAL": "+15551234567",
            "VOICEBRIDGE_VAPI_ASSISTANT": '{"model": {"provider": "openai"}, "n": [1, 2.5]}',
            "PATH": "/usr/bin",
        },
        require_complete=False,
    )
    assert config.server.max_concurrent_calls == 10  # env beats the file
    assert config.vapi.assistant_id == "asst-9"
    assert config.vapi.sample_rate == 16000
    assert config.vapi.audio_format == "pcm_s16le"
    assert config.twilio.media_inactivity_s == 2.5
    assert config.overflow.dial == "+15551234567"
    assert config.vapi.assistant == {"model": {"provider": "openai"}, "n": [1, 2.5]}


@pytest.mark.parametrize(
    ("text", "expected"),
    [("true", True), ("TRUE", True), ("1", True), ("yes", True), ("Yes", True),
     ("false", False), ("0", False), ("no", False), (" no ", False)],
)  # fmt: skip
def test_env_bools(text: str, expected: bool) -> None:
    config = load({}, VOICEBRIDGE_BRIDGE_BARGE_IN_ON_SPEECH_START=text)
    assert config.bridge.barge_in_on_speech_start is expected


@pytest.mark.parametrize(
    ("name", "text", "key", "fragment"),
    [
        ("VOICEBRIDGE_BRIDGE_BARGE_IN_ON_SPEECH_START", "on", "bridge.barge_in_on_speech_start",
         "expected true/false/1/0/yes/no, got 'on'"),
        ("VOICEBRIDGE_SERVER_MAX_CONCURRENT_CALLS", "ten", "server.max_concurrent_calls",
         "expected an integer, got 'ten'"),
        ("VOICEBRIDGE_SERVER_MAX_CONCURRENT_CALLS", "1.5", "server.max_concurrent_calls",
         "expected an integer"),
        ("VOICEBRIDGE_VAPI_PONG_DEADLINE_S", "soon", "vapi.pong_deadline_s", "expected a number"),
        ("VOICEBRIDGE_VAPI_AUDIO_FORMAT", "opus", "vapi.audio_format",
         "must be one of mulaw, pcm_s16le"),
        ("VOICEBRIDGE_VAPI_ASSISTANT", "{not json", "vapi.assistant", "expected a JSON object"),
        ("VOICEBRIDGE_VAPI_ASSISTANT", "[1, 2]", "vapi.assistant",
         "expected a JSON object, got an array"),
        ("VOICEBRIDGE_VAPI_ASSISTANT", '{"a": null}', "vapi.assistant.a", "null"),
        ("VOICEBRIDGE_VAPI_PONG_DEADLINE_S", "nan", "vapi.pong_deadline_s", "more than 0"),
    ],
)  # fmt: skip
def test_env_bad_values_name_key_and_variable(
    name: str, text: str, key: str, fragment: str
) -> None:
    exc = error_of({}, **{name: text})
    assert exc.key == key
    assert fragment in exc.reason


def test_env_bad_value_reason_names_the_variable() -> None:
    exc = error_of({}, VOICEBRIDGE_SERVER_MAX_CONCURRENT_CALLS="ten")
    assert exc.reason == (
        "expected an integer, got 'ten' (from VOICEBRIDGE_SERVER_MAX_CONCURRENT_CALLS)"
    )


def test_env_semantic_error_after_override() -> None:
    exc = error_of({}, VOICEBRIDGE_SERVER_LISTEN="nope")
    assert exc.key == "server.listen"


def test_unknown_voicebridge_env_var_is_named() -> None:
    exc = error_of({}, VOICEBRIDGE_SERVER_LISTN="127.0.0.1:1")
    assert exc.key == "VOICEBRIDGE_SERVER_LISTN"
    assert "matches no configuration key" in exc.reason
    assert "did you mean VOICEBRIDGE_SERVER_LISTEN?" in exc.reason
    exc = error_of({}, VOICEBRIDGE_WHATEVER="1")
    assert (exc.key, exc.reason) == (
        "VOICEBRIDGE_WHATEVER",
        "environment variable matches no configuration key",
    )


def test_secret_env_vars_are_not_overrides() -> None:
    config = load({}, VOICEBRIDGE_TWILIO_AUTH_TOKEN=TOKEN, VOICEBRIDGE_VAPI_API_KEY=API_KEY)
    assert config.credentials.twilio_auth_token.reveal() == TOKEN


def test_env_override_of_a_secret_file_key(tmp_path: Path) -> None:
    (tmp_path / "key").write_text(API_KEY + "\n")
    config = load({}, VOICEBRIDGE_SECRETS_VAPI_API_KEY_FILE=str(tmp_path / "key"))
    assert config.credentials.vapi_api_key.reveal() == API_KEY


def test_env_does_not_modify_the_callers_mapping() -> None:
    data: dict[str, Any] = {"server": {"listen": "127.0.0.1:1"}}
    load(data, VOICEBRIDGE_SERVER_LISTEN="127.0.0.1:2")
    assert data == {"server": {"listen": "127.0.0.1:1"}}


# --- secrets -----------------------------------------------------------------------------


def secret_layout(tmp_path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """A credentials directory, secret files and env vars, each with different values."""
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "twilio-auth-token").write_text("from-credential\n")
    files = tmp_path / "files"
    files.mkdir()
    (files / "twilio").write_text("from-file-twilio\n")
    (files / "vapi").write_text("from-file-vapi\r\n")
    data = {
        "secrets": {
            "twilio_auth_token_file": str(files / "twilio"),
            "vapi_api_key_file": str(files / "vapi"),
        }
    }
    environ = {
        "CREDENTIALS_DIRECTORY": str(credentials),
        "VOICEBRIDGE_TWILIO_AUTH_TOKEN": "from-env-twilio",
        "VOICEBRIDGE_VAPI_API_KEY": "from-env-vapi",
        "VOICEBRIDGE_STREAM_TOKEN_SECRET": "from-env-stream-secret",
    }
    return data, environ


def test_secret_precedence_credential_then_file_then_env(tmp_path: Path) -> None:
    data, environ = secret_layout(tmp_path)
    creds = config_from_mapping(data, environ=environ, require_complete=False).credentials
    assert creds.twilio_auth_token.reveal() == "from-credential"
    assert creds.twilio_auth_token.source == "systemd credential twilio-auth-token"
    assert creds.vapi_api_key.reveal() == "from-file-vapi"
    assert creds.vapi_api_key.source == f"file {tmp_path / 'files' / 'vapi'}"
    assert creds.stream_token_secret.reveal() == "from-env-stream-secret"
    assert (
        creds.stream_token_secret.source == "environment variable VOICEBRIDGE_STREAM_TOKEN_SECRET"
    )


def test_secret_file_loses_only_one_trailing_newline(tmp_path: Path) -> None:
    (tmp_path / "s").write_text("abc\n\n")
    config = load({"secrets": {"vapi_api_key_file": str(tmp_path / "s")}})
    assert config.credentials.vapi_api_key.reveal() == "abc\n"


def test_empty_credential_does_not_fall_through(tmp_path: Path) -> None:
    (tmp_path / "vapi-api-key").write_text("")
    config = load({}, CREDENTIALS_DIRECTORY=str(tmp_path), VOICEBRIDGE_VAPI_API_KEY=API_KEY)
    assert not config.credentials.vapi_api_key
    with pytest.raises(ConfigError) as info:
        config_from_mapping({}, environ={**COMPLETE_ENV, "CREDENTIALS_DIRECTORY": str(tmp_path)})
    exc = info.value
    assert exc.key == "credentials.vapi_api_key"
    assert exc.reason.startswith("empty (from systemd credential vapi-api-key)")


def test_unreadable_secret_file_names_the_key(tmp_path: Path) -> None:
    missing = tmp_path / "absent"
    exc = error_of({"secrets": {"stream_token_secret_file": str(missing)}})
    assert exc.key == "secrets.stream_token_secret_file"
    assert str(missing) in exc.reason
    exc = error_of({"secrets": {"stream_token_secret_file": str(tmp_path)}})  # a directory
    assert exc.key == "secrets.stream_token_secret_file"


def test_non_utf8_secret_file(tmp_path: Path) -> None:
    (tmp_path / "s").write_bytes(b"\xff\xfe")
    exc = error_of({"secrets": {"vapi_api_key_file": str(tmp_path / "s")}})
    assert (exc.key, exc.reason) == (
        "secrets.vapi_api_key_file",
        f"{tmp_path / 's'} is not UTF-8 text",
    )


def test_unreadable_credential_names_the_credential(tmp_path: Path) -> None:
    (tmp_path / "vapi-api-key").mkdir()
    exc = error_of({}, CREDENTIALS_DIRECTORY=str(tmp_path))
    assert exc.key == "credentials.vapi_api_key"
    assert "vapi-api-key" in exc.reason


@pytest.mark.parametrize(
    ("data", "key", "secret"),
    [
        ({"twilio": {"auth_token": TOKEN}}, "twilio.auth_token", "twilio_auth_token"),
        ({"twilio": {"twilio_auth_token": TOKEN}}, "twilio.twilio_auth_token",
         "twilio_auth_token"),
        ({"vapi": {"api_key": API_KEY}}, "vapi.api_key", "vapi_api_key"),
        ({"secrets": {"vapi_api_key": API_KEY}}, "secrets.vapi_api_key", "vapi_api_key"),
        ({"server": {"stream_token_secret": STREAM_SECRET}}, "server.stream_token_secret",
         "stream_token_secret"),
        ({"stream_token_secret": STREAM_SECRET}, "stream_token_secret", "stream_token_secret"),
    ],
)  # fmt: skip
def test_plain_secret_in_file_is_refused(data: dict[str, Any], key: str, secret: str) -> None:
    exc = error_of(data)
    assert exc.key == key
    credential, env = SECRET_SOURCES[secret]
    assert "secrets are not read from the config file" in exc.reason
    assert credential in exc.reason and env in exc.reason and f"{secret}_file" in exc.reason
    assert all(value not in str(exc) for value in SECRET_VALUES)


# --- require_complete --------------------------------------------------------------------


def test_complete_config_from_env() -> None:
    config = config_from_mapping({}, environ=COMPLETE_ENV)
    assert config.credentials.vapi_api_key.reveal() == API_KEY


@pytest.mark.parametrize(
    ("removed", "key"),
    [
        ("VOICEBRIDGE_SERVER_PUBLIC_URL", "server.public_url"),
        ("VOICEBRIDGE_TWILIO_ACCOUNT_SID", "twilio.account_sid"),
        ("VOICEBRIDGE_VAPI_ASSISTANT_ID", "vapi.assistant_id"),
        ("VOICEBRIDGE_TWILIO_AUTH_TOKEN", "credentials.twilio_auth_token"),
        ("VOICEBRIDGE_VAPI_API_KEY", "credentials.vapi_api_key"),
        ("VOICEBRIDGE_STREAM_TOKEN_SECRET", "credentials.stream_token_secret"),
    ],
)
def test_each_missing_required_item_is_named(removed: str, key: str) -> None:
    environ = {k: v for k, v in COMPLETE_ENV.items() if k != removed}
    with pytest.raises(ConfigError) as info:
        config_from_mapping({}, environ=environ)
    assert info.value.key == key
    assert not getattr(info.value, "__notes__", [])
    if key.startswith("credentials."):
        name = key.removeprefix("credentials.")
        credential, env = SECRET_SOURCES[name]
        for hint in (credential, f"[secrets] {name}_file", env):
            assert hint in info.value.reason
    # Without require_complete the same configuration loads.
    config_from_mapping({}, environ=environ, require_complete=False)


def test_all_missing_items_are_reported_together() -> None:
    with pytest.raises(ConfigError) as info:
        config_from_mapping({}, environ={})
    keys = [line.split(": ")[0] for line in all_problems(info.value)]
    assert keys == [
        "server.public_url",
        "twilio.account_sid",
        "credentials.twilio_auth_token",
        "credentials.vapi_api_key",
        "credentials.stream_token_secret",
        "vapi.assistant_id",
    ]


def test_inline_assistant_satisfies_the_assistant_requirement() -> None:
    environ = {k: v for k, v in COMPLETE_ENV.items() if k != "VOICEBRIDGE_VAPI_ASSISTANT_ID"}
    config = config_from_mapping({"vapi": {"assistant": {"firstMessage": "Hi"}}}, environ=environ)
    assert config.vapi.assistant_id == ""


def test_auth_token_not_required_without_signature_validation() -> None:
    environ = {k: v for k, v in COMPLETE_ENV.items() if k != "VOICEBRIDGE_TWILIO_AUTH_TOKEN"}
    config = config_from_mapping({"twilio": {"validate_signatures": False}}, environ=environ)
    assert not config.credentials.twilio_auth_token


def test_stream_token_secret_must_be_16_bytes() -> None:
    short = "x" * 15
    for complete in (True, False):
        with pytest.raises(ConfigError) as info:
            config_from_mapping(
                {},
                environ={**COMPLETE_ENV, "VOICEBRIDGE_STREAM_TOKEN_SECRET": short},
                require_complete=complete,
            )
        assert info.value.key == "credentials.stream_token_secret"
        assert "at least 16 bytes" in info.value.reason
        assert short not in str(info.value)
    environ = {**COMPLETE_ENV, "VOICEBRIDGE_STREAM_TOKEN_SECRET": "x" * 16}
    assert config_from_mapping({}, environ=environ)


# --- rendering and secret hygiene --------------------------------------------------------


def test_render_masks_secrets_and_says_where_they_came_from(tmp_path: Path) -> None:
    data, environ = secret_layout(tmp_path)
    data["twilio"] = {"validate_signatures": False}
    environ.pop("VOICEBRIDGE_STREAM_TOKEN_SECRET")
    config = config_from_mapping(data, environ=environ, require_complete=False)
    text = render_config(config)
    lines = text.splitlines()
    assert 'twilio_auth_token = "********"  # from systemd credential twilio-auth-token' in lines
    assert f'vapi_api_key = "********"  # from file {tmp_path / "files" / "vapi"}' in lines
    stream_line = next(line for line in lines if line.startswith("stream_token_secret ="))
    assert stream_line.startswith('stream_token_secret = "(unset)"  # supply via credential')
    assert "from-credential" not in text and "from-file" not in text


def test_render_is_toml_in_class_order_and_round_trips() -> None:
    config = config_from_mapping(
        {
            "vapi": {"assistant": {"model": {"x y": [1, 2.5, 'q"\x7f']}, "ok": True}},
            "overflow": {"say": 'Line one\nline "two"\\', "dial": "+4930123456"},
        },
        environ=COMPLETE_ENV,
    )
    parsed = tomllib.loads(render_config(config))
    assert list(parsed) == [*FILE_SECTIONS, "credentials"]
    assert parsed["credentials"] == {
        name: "********" if env in COMPLETE_ENV else "(unset)"
        for name, (_, env) in SECRET_SOURCES.items()
    }
    del parsed["credentials"]
    assert config_from_mapping(parsed, environ=COMPLETE_ENV) == config


def test_secret_values_never_shown(tmp_path: Path) -> None:
    config = config_from_mapping({}, environ=COMPLETE_ENV)
    shown = [render_config(config), repr(config), str(config), repr(config.credentials)]
    shown += [str(config.credentials.vapi_api_key), f"{config.credentials.vapi_api_key}"]
    # Error messages of a config that has secrets but another problem.
    environ = {**COMPLETE_ENV, "VOICEBRIDGE_SERVER_LISTN": "x"}
    with pytest.raises(ConfigError) as info:
        config_from_mapping({"vapi": {"api_key": API_KEY}}, environ=environ)
    shown += all_problems(info.value)
    out, err = io.StringIO(), io.StringIO()
    path = write(tmp_path, f'[twilio]\nauth_token = "{TOKEN}"\n')
    assert check_config_main(str(path), environ=COMPLETE_ENV, out=out, err=err) == 2
    shown += [out.getvalue(), err.getvalue()]
    for text in shown:
        for value in SECRET_VALUES:
            assert value not in text


def test_secret_equality_ignores_source() -> None:
    assert Secret("a", source="file x") == Secret("a")
    assert Secret("a") != Secret("b")


# --- check-config ------------------------------------------------------------------------


def test_check_config_ok(tmp_path: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    code = check_config_main(str(write(tmp_path, "")), environ=COMPLETE_ENV, out=out, err=err)
    assert code == 0
    assert err.getvalue() == ""
    origins = {
        "server.public_url": "VOICEBRIDGE_SERVER_PUBLIC_URL",
        "twilio.account_sid": "VOICEBRIDGE_TWILIO_ACCOUNT_SID",
        "vapi.assistant_id": "VOICEBRIDGE_VAPI_ASSISTANT_ID",
    }
    expected = render_config(config_from_mapping({}, environ=COMPLETE_ENV), origins=origins)
    assert out.getvalue() == expected
    assert 'public_url = "https://bridge.example.com"  # from VOICEBRIDGE_SERVER_PUBLIC_URL' in (
        expected.splitlines()
    )


def test_check_config_error_lines(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\nmax_concurrent_calls = "ten"\nlistn = 1\n')
    out, err = io.StringIO(), io.StringIO()
    assert check_config_main(str(path), environ=COMPLETE_ENV, out=out, err=err) == 2
    assert out.getvalue() == ""
    assert err.getvalue().splitlines() == [
        "voicebridge: config error: server.max_concurrent_calls: expected an integer, got 'ten'"
        f" (in {path}:2)",
        "voicebridge: config error: server.listn: unknown key; did you mean server.listen?"
        f" (in {path}:3)",
    ]


def test_check_config_reports_every_problem_with_its_line_or_variable(tmp_path: Path) -> None:
    """Two bad keys of one section, one of another, a missing secret: all of them, each
    with the line it is on or the variable that set it."""
    path = write(
        tmp_path,
        "# a comment\n"
        "[server]\n"
        'public_url = "ftp://bridge.example.com"\n'
        "max_concurrent_calls = 0\n"
        "\n"
        "[vapi]\n"
        "ping_interval_s = -1\n",
    )
    environ = {**COMPLETE_ENV, "VOICEBRIDGE_SERVER_LISTEN": "nowhere"}
    del environ["VOICEBRIDGE_SERVER_PUBLIC_URL"], environ["VOICEBRIDGE_VAPI_API_KEY"]
    err = io.StringIO()
    assert check_config_main(str(path), environ=environ, out=io.StringIO(), err=err) == 2
    lines = err.getvalue().splitlines()
    assert all(line.startswith("voicebridge: config error: ") for line in lines)
    where = {line.split(": ")[2]: line for line in lines}
    assert where["server.public_url"].endswith(f"(in {path}:3)")
    assert where["server.max_concurrent_calls"].endswith(f"(in {path}:4)")
    assert where["vapi.ping_interval_s"].endswith(f"(in {path}:7)")
    assert where["server.listen"].endswith("(from VOICEBRIDGE_SERVER_LISTEN)")
    assert "credentials.vapi_api_key" in where
    assert len(lines) == 5, lines


def test_check_config_quiet_prints_only_problems(tmp_path: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    good = write(tmp_path, "")
    assert check_config_main(str(good), environ=COMPLETE_ENV, out=out, err=err, quiet=True) == 0
    assert (out.getvalue(), err.getvalue()) == ("", "")
    bad = write(tmp_path, "[server]\nlistn = 1\n", name="bad.toml")
    assert check_config_main(str(bad), environ=COMPLETE_ENV, out=out, err=err, quiet=True) == 2
    assert out.getvalue() == ""
    assert "server.listn" in err.getvalue()


def test_check_config_without_secrets(tmp_path: Path) -> None:
    """A user who cannot read the secrets checks everything else; a missing secret is no
    problem, an unreadable secret file is not even opened."""
    unreadable = tmp_path / "root-only"
    unreadable.write_text("x")
    unreadable.chmod(0)
    path = write(tmp_path, f'[secrets]\nvapi_api_key_file = "{unreadable}"\n')
    environ = {k: v for k, v in COMPLETE_ENV.items() if k in (
        "VOICEBRIDGE_SERVER_PUBLIC_URL", "VOICEBRIDGE_TWILIO_ACCOUNT_SID",
        "VOICEBRIDGE_VAPI_ASSISTANT_ID")}
    out, err = io.StringIO(), io.StringIO()
    assert check_config_main(str(path), environ=environ, out=out, err=err,
                             read_secrets=False) == 0, err.getvalue()
    assert 'vapi_api_key = "(unset)"  # not read (--no-secrets)' in out.getvalue()
    assert check_config_main(str(path), environ=environ, out=io.StringIO(), err=err) == 2
    # Everything else is still checked.
    bad = write(tmp_path, "[server]\nmax_concurrent_calls = 0\n", name="bad.toml")
    err = io.StringIO()
    assert check_config_main(str(bad), environ=environ, out=out, err=err,
                             read_secrets=False) == 2
    assert "server.max_concurrent_calls" in err.getvalue()


def test_key_lines_follow_tables_and_skip_multiline_strings() -> None:
    text = (
        "[server]\n"
        "listen = '127.0.0.1:8080'  # comment = not a key\n"
        "[vapi]\n"
        'say = """\n'
        "fake = 1\n"
        '"""\n'
        '"quoted.key" = 2\n'
        "[vapi.assistant]\n"
        "model . provider = 'x'\n"
        "allowed = [\n"
        "  'a',\n"
        "  ['nested', 'array']\n"
        "]\n"
        "[[tools.list]]\n"
        "name = 'x'\n"
    )
    assert key_lines(text) == {
        "server": 1,
        "server.listen": 2,
        "vapi": 3,
        "vapi.say": 4,
        "vapi.quoted.key": 7,
        "vapi.assistant": 8,
        "vapi.assistant.model.provider": 9,
        "vapi.assistant.allowed": 10,
        "tools.list": 14,
        "tools.list.name": 15,
    }


def test_check_config_requires_completeness(tmp_path: Path) -> None:
    err = io.StringIO()
    assert check_config_main(str(write(tmp_path, "")), environ={}, out=io.StringIO(), err=err) == 2
    assert "voicebridge: config error: server.public_url: required" in err.getvalue()


def test_check_config_missing_file(tmp_path: Path) -> None:
    err = io.StringIO()
    missing = tmp_path / "missing.toml"
    assert check_config_main(str(missing), environ={}, out=io.StringIO(), err=err) == 2
    assert err.getvalue().startswith(f"voicebridge: config error: cannot read {missing}")


# --- [control]: secrets that could never work are refused at start ---------------------

HMAC_BASE64 = "[control]\nenabled = true\nauth = \"hmac\"\ncredential_id = \"cred-1\"\n" + (
    "hmac_secret_is_base64 = true\n"
)
BEARER = '[control]\nenabled = true\nauth = "bearer"\n'
SECRET_MODE = '[control]\nenabled = true\nauth = "secret"\n'
OUTBOUND = '[outbound]\nhttp_enabled = true\nfrom_number = "+15550100001"\n'


@pytest.mark.parametrize(
    ("toml", "variable", "value", "key", "fragment"),
    [
        (HMAC_BASE64, "VAPI_WEBHOOK_SECRET", "not base64!", "vapi_webhook_secret", "not base64"),
        (HMAC_BASE64, "VAPI_WEBHOOK_SECRET", "c2VjcmV0", "", ""),  # b"secret"
        (HMAC_BASE64, "VAPI_WEBHOOK_SECRET", "c2VjcmV", "vapi_webhook_secret", "not base64"),
        (HMAC_BASE64, "VAPI_WEBHOOK_SECRET", "====", "vapi_webhook_secret", "not base64"),
        (BEARER, "VAPI_WEBHOOK_SECRET", "line\nbreak", "vapi_webhook_secret", "HTTP header"),
        (BEARER, "VAPI_WEBHOOK_SECRET", "sécret-Hq2v9rT4", "vapi_webhook_secret", "ASCII"),
        (SECRET_MODE, "VAPI_WEBHOOK_SECRET", "trailing-space ", "vapi_webhook_secret", "ASCII"),
        (SECRET_MODE, "VAPI_WEBHOOK_SECRET", "inner space ok", "", ""),
        (OUTBOUND, "CONTROL_API_TOKEN", "tök-0123456789", "control_api_token", "ASCII"),
    ],
)
def test_check_config_refuses_a_secret_serve_could_never_use(
    tmp_path: Path, toml: str, variable: str, value: str, key: str, fragment: str
) -> None:
    environ = {**COMPLETE_ENV, f"VOICEBRIDGE_{variable}": value}
    if "[outbound]" in toml:
        environ["VOICEBRIDGE_VAPI_WEBHOOK_SECRET"] = "unused"
    out, err = io.StringIO(), io.StringIO()
    code = check_config_main(str(write(tmp_path, toml)), environ=environ, out=out, err=err)
    if not key:
        assert (code, err.getvalue()) == (0, "")
        return
    assert code == 2
    [line] = err.getvalue().splitlines()
    assert line.startswith(f"voicebridge: config error: credentials.{key}: "), line
    assert fragment in line and f"environment variable VOICEBRIDGE_{variable}" in line
    assert value.strip() not in line


@pytest.mark.parametrize(
    ("key", "value", "ok"),
    [
        ("bearer_prefix", "Bearer ", True),
        ("bearer_prefix", "", True),
        ("bearer_prefix", "Token  ", True),
        ("bearer_prefix", " Bearer", False),
        ("bearer_prefix", "Bearer\t", False),
        ("hmac_signature_prefix", "sha256=", True),
        ("hmac_signature_prefix", "v1,", True),
        ("hmac_signature_prefix", "\u00e9=", False),
    ],
)
def test_credential_prefixes_must_start_a_header_value(key: str, value: str, ok: bool) -> None:
    data = {"control": {key: value}}
    if ok:
        assert getattr(load(data).control, key) == value
        return
    error = error_of(data)
    assert error.key == f"control.{key}"
    assert "HTTP header value" in error.reason


@pytest.mark.parametrize(
    "variable", ["VOICEBRIDGE_STREAM_TOKEN_SECRET", "VOICEBRIDGE_VAPI_API_KEY"]
)
def test_a_secret_variable_that_is_not_utf8_is_named(variable: str) -> None:
    # How Python hands over an environment value whose bytes are not UTF-8.
    environ = {**COMPLETE_ENV, variable: "0123456789abcdef\udcff"}
    with pytest.raises(ConfigError) as info:
        config_from_mapping({}, environ=environ)
    name = variable.removeprefix("VOICEBRIDGE_").lower()
    assert (info.value.key, info.value.reason) == (
        f"credentials.{name}",
        f"environment variable {variable} is not UTF-8",
    )


def test_check_config_imports_the_tool_handlers_as_serve_does(tmp_path: Path) -> None:
    path = write(tmp_path, '[tools]\nhandlers = { lookup = "no_such_package.tools:lookup" }\n')
    err = io.StringIO()
    assert check_config_main(str(path), environ=COMPLETE_ENV, out=io.StringIO(), err=err) == 2
    assert err.getvalue() == (
        "voicebridge: config error: tools.handlers.lookup: cannot import "
        "no_such_package.tools: No module named 'no_such_package'\n"
    )


@pytest.mark.parametrize(
    ("toml", "environ", "expected"),
    [
        (
            HMAC_BASE64,
            {"VOICEBRIDGE_VAPI_WEBHOOK_SECRET": "not base64!"},
            "credentials.vapi_webhook_secret: control.hmac_secret_is_base64 is true but the "
            "secret is not base64",
        ),
        (
            '[tools]\nhandlers = { lookup = "no_such_package.tools:lookup" }\n',
            {},
            "tools.handlers.lookup: cannot import no_such_package.tools",
        ),
    ],
)
def test_serve_refuses_them_at_start_without_a_traceback(
    tmp_path: Path, toml: str, environ: dict[str, str], expected: str
) -> None:
    """``voicebridge serve`` as a user runs it: a real subprocess."""
    config = write(tmp_path, '[server]\nlisten = "127.0.0.1:0"\n' + toml)
    result = subprocess.run(
        [sys.executable, "-m", "voicebridge", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env={**os.environ, **COMPLETE_ENV, **environ},
    )
    assert result.returncode == 78, result.stderr
    assert f"config error: {expected}" in result.stderr
    assert "Traceback" not in result.stderr


# --- the example file and the docs -------------------------------------------------------


def test_example_file_loads_and_shows_every_default() -> None:
    config = load_config(EXAMPLE, environ={}, require_complete=False)
    assert config == Config()
    parsed = tomllib.loads(EXAMPLE.read_text())
    text = EXAMPLE.read_text()
    for section, cls in FILE_SECTIONS.items():
        for a in attrs.fields(cls):
            if section == "secrets":
                assert f"# {a.name} = " in text  # commented out: secrets are optional files
            else:
                assert a.name in parsed[section], f"{section}.{a.name} missing from the example"
    assert "LoadCredential=" in text


def test_example_file_is_complete_with_credentials(tmp_path: Path) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    for name, (credential, _) in SECRET_SOURCES.items():
        (credentials / credential).write_text(f"{name}-value-0123456789\n")
    environ = {
        "CREDENTIALS_DIRECTORY": str(credentials),
        "VOICEBRIDGE_SERVER_PUBLIC_URL": "https://bridge.example.com",
        "VOICEBRIDGE_TWILIO_ACCOUNT_SID": SID,
        "VOICEBRIDGE_VAPI_ASSISTANT_ID": "asst-1",
    }
    config = load_config(EXAMPLE, environ=environ)
    assert config.credentials.stream_token_secret.reveal() == "stream_token_secret-value-0123456789"


def test_docs_describe_every_key() -> None:
    text = DOCS.read_text()
    for section, cls in FILE_SECTIONS.items():
        assert f"[{section}]" in text
        for a in attrs.fields(cls):
            assert f"`{a.name}`" in text, f"{section}.{a.name} is not documented"
    for credential, env in SECRET_SOURCES.values():
        assert credential in text and env in text


# --- property: structuring never fails with anything but ConfigError ---------------------

_KEYS = st.sampled_from(
    [*FILE_SECTIONS, "credentials", "auth_token", "api_key", "listn"]
    + [a.name for cls in FILE_SECTIONS.values() for a in attrs.fields(cls)]
) | st.text(max_size=8)
_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.sampled_from([0, 1, 20, 300, 8000, 16000, 2**1030])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(
        ["mulaw", "info", "127.0.0.1:80", "[::1]:1", "https://x.example", "+15551234567"]
    )
    | st.dates()
    | st.datetimes()
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_KEYS, inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=100, deadline=None, database=None)
@given(st.dictionaries(_KEYS, _VALUES, max_size=5), st.booleans())
def test_arbitrary_data_loads_or_raises_config_error(data: dict[str, Any], complete: bool) -> None:
    try:
        config = config_from_mapping(data, environ={}, require_complete=complete)
    except ConfigError as exc:
        assert isinstance(exc.key, str) and exc.reason
    else:
        assert isinstance(config, Config)
        render_config(config)


def _section_strategy(section: str) -> st.SearchStrategy[dict[Any, Any]]:
    """Mostly the section's own keys, with plausible and implausible values."""
    keys = st.sampled_from([a.name for a in attrs.fields(FILE_SECTIONS[section])]) | _KEYS
    return st.dictionaries(keys, _VALUES, max_size=4)


_CONFIG_SHAPED = st.fixed_dictionaries(
    {}, optional={section: _section_strategy(section) for section in FILE_SECTIONS}
)
_ENV_NAMES = st.sampled_from(
    [
        f"VOICEBRIDGE_{section}_{a.name}".upper()
        for section, cls in FILE_SECTIONS.items()
        for a in attrs.fields(cls)
    ]
    + [env for _, env in SECRET_SOURCES.values()]
    + ["VOICEBRIDGE_X", "VOICEBRIDGE_", "OTHER"]
)


@settings(max_examples=150, deadline=None, database=None)
@given(
    _CONFIG_SHAPED,
    st.dictionaries(_ENV_NAMES, st.text(max_size=12) | st.sampled_from(["1", "yes", "{}"])),
    st.booleans(),
)
def test_config_shaped_data_and_env_load_or_raise_config_error(
    data: dict[str, Any], environ: dict[str, str], complete: bool
) -> None:
    try:
        config = config_from_mapping(data, environ=environ, require_complete=complete)
    except ConfigError as exc:
        assert isinstance(exc.key, str) and exc.reason
    else:
        assert tomllib.loads(render_config(config))


# --- the media stream URL Twilio accepts -------------------------------------------------


@pytest.mark.parametrize(
    ("public_url", "problem"),
    [
        ("https://bridge.example.com", None),
        ("https://bridge.example.com:443/voice", None),
        ("http://bridge.example.com", "is http://, so the media stream URL would be ws://"),
        ("https://bridge.example.com:8443", "has port 8443, so the media stream URL would be too"),
        ("http://127.0.0.1:8080", "is http://, so the media stream URL would be ws://"),
    ],
)
def test_check_config_refuses_a_stream_url_twilio_would_refuse(
    tmp_path: Path, public_url: str, problem: str | None
) -> None:
    environ = {**COMPLETE_ENV, "VOICEBRIDGE_SERVER_PUBLIC_URL": public_url}
    err = io.StringIO()
    code = check_config_main(str(write(tmp_path, "")), environ=environ, out=io.StringIO(), err=err)
    if problem is None:
        assert (code, err.getvalue()) == (0, "")
        return
    assert code == 2
    [line] = err.getvalue().splitlines()
    assert line.startswith(f"voicebridge: config error: server.public_url: {problem}: ")
    assert "wss:// on port 443 (error 31910)" in line
    assert "twilio.allow_insecure_stream_url" in line
    # The testing flag lets it through; a partial load (voicebridge call) never asks.
    allowed = write(tmp_path, "[twilio]\nallow_insecure_stream_url = true\n", "allowed.toml")
    assert check_config_main(str(allowed), environ=environ, out=io.StringIO(), err=err) == 0
    assert load({"server": {"public_url": public_url}}).server.public_url == public_url


def test_the_shared_key_is_a_secret(tmp_path: Path) -> None:
    key = tmp_path / "shared"
    key.write_text("shared-key-secret-0123456789\n")
    config = config_from_mapping(
        {"secrets": {"twilio_shared_key_file": str(key)}, "twilio": {"shared_key_id": "k1"}},
        environ=COMPLETE_ENV,
    )
    assert config.credentials.twilio_shared_key.reveal() == "shared-key-secret-0123456789"
    assert config.twilio.shared_key_id == "k1"
    assert "shared-key-secret" not in render_config(config)
    exc = error_of({"twilio": {"shared_key": "in the file"}})
    assert exc.key == "twilio.shared_key" and "VOICEBRIDGE_TWILIO_SHARED_KEY" in exc.reason


def test_a_shared_key_id_needs_the_shared_key() -> None:
    with pytest.raises(ConfigError) as info:
        config_from_mapping({"twilio": {"shared_key_id": "k1"}}, environ=COMPLETE_ENV)
    assert info.value.key == "credentials.twilio_shared_key"
    assert info.value.reason.startswith(
        "missing: supply it as systemd credential 'twilio-shared-key'"
    )


def test_key_lines_find_every_key_of_the_example_file() -> None:
    text = EXAMPLE.read_text()
    lines = key_lines(text)
    numbered = text.splitlines()
    for section, table in tomllib.loads(text).items():
        for key in table:
            line = lines[f"{section}.{key}"]
            assert numbered[line - 1].lstrip().startswith(f"{key} ="), (section, key)


def test_a_secret_file_name_with_a_nul_byte_is_a_problem_not_a_crash() -> None:
    environ = {**COMPLETE_ENV, "VOICEBRIDGE_SECRETS_VAPI_API_KEY_FILE": "/etc/\x00key"}
    with pytest.raises(ConfigError) as info:
        config_from_mapping({}, environ=environ)
    assert info.value.key == "secrets.vapi_api_key_file"
    assert "cannot read '/etc/\\x00key'" in info.value.reason
