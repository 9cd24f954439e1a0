"""The ``voicebridge`` command as a user runs it: a real subprocess."""

from __future__ import annotations

import subprocess
import sys
import wave
from pathlib import Path

import trio

VOICEBRIDGE = [sys.executable, "-m", "voicebridge"]


async def test_demo_runs_a_call_with_a_barge_in(tmp_path: Path) -> None:
    with trio.fail_after(90):
        result = await trio.run_process(
            [*VOICEBRIDGE, "demo", "--save-audio", str(tmp_path)],
            capture_stdout=True, capture_stderr=True, check=False,
        )
    out = result.stdout.decode()
    assert result.returncode == 0, out + result.stderr.decode()
    assert "latency model: network" in out  # on by default
    assert "time to first word: " in out
    assert "barge-in: caller spoke at" in out
    assert "speech to silence " in out
    assert "and 0 ms after the clear" in out
    assert "outcome assistant-ended" in out
    assert "every caller was served as expected" in out
    assert_saved_call_audio(tmp_path)


async def test_demo_with_barge_in_at_the_edge_silences_the_assistant_sooner() -> None:
    with trio.fail_after(90):
        result = await trio.run_process(
            [*VOICEBRIDGE, "demo", "--edge-barge-in"],
            capture_stdout=True, capture_stderr=True, check=False,
        )
    out = result.stdout.decode()
    assert result.returncode == 0, out + result.stderr.decode()
    assert "confirmed by the assistant" in out
    [line] = [line for line in out.splitlines() if "speech to silence" in line]
    silence_ms = int(line.split("speech to silence ")[1].split(" ms")[0])
    # The onset (three 20 ms frames) and the network both ways (2 x 20 ms), not the
    # assistant's 200 ms reaction.
    assert 80 <= silence_ms < 200, line
    assert "and 0 ms after the clear" in line


def assert_saved_call_audio(directory: Path) -> None:
    [wav] = directory.glob("call-1-CA*.wav")
    with wave.open(str(wav)) as audio:
        assert (audio.getframerate(), audio.getnchannels(), audio.getsampwidth()) == (8000, 1, 2)
        assert audio.getnframes() > 8000 * 10  # more than 10 s of call


def test_check_config_refuses_a_bad_file_with_the_key(tmp_path: Path) -> None:
    config = tmp_path / "voicebridge.toml"
    config.write_text('[server]\nmax_concurrent_calls = "ten"\n')
    result = subprocess.run(
        [*VOICEBRIDGE, "check-config", "--config", str(config)],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 2
    assert "server.max_concurrent_calls" in result.stderr


def test_serve_refuses_a_bad_config_at_start(tmp_path: Path) -> None:
    config = tmp_path / "voicebridge.toml"
    config.write_text("[server]\nlisten = \"127.0.0.1:8080\"\nlistn = 1\n")
    result = subprocess.run(
        [*VOICEBRIDGE, "serve", "--config", str(config)],
        capture_output=True, text=True, check=False, timeout=30,
    )
    assert result.returncode == 2
    assert "server.listn" in result.stderr


def test_serve_and_check_config_refuse_a_stream_url_twilio_would_refuse(tmp_path: Path) -> None:
    # Everything else is complete: the public URL alone is what is wrong.
    config = tmp_path / "voicebridge.toml"
    config.write_text(
        '[server]\npublic_url = "https://bridge.example.com:8443"\n'
        '[twilio]\naccount_sid = "AC0123456789abcdef0123456789abcdef"\n'
        '[vapi]\nassistant_id = "asst-1"\n'
    )
    environ = {
        "PATH": "/usr/bin:/bin",
        "VOICEBRIDGE_TWILIO_AUTH_TOKEN": "twilio-auth-token-0123",
        "VOICEBRIDGE_VAPI_API_KEY": "vapi-api-key-0123",
        "VOICEBRIDGE_STREAM_TOKEN_SECRET": "stream-token-secret-0123456789",
    }
    for command in ("check-config", "serve"):
        result = subprocess.run(
            [*VOICEBRIDGE, command, "--config", str(config)],
            capture_output=True, text=True, check=False, timeout=30, env=environ,
        )
        assert result.returncode == 2, result.stderr
        [line] = result.stderr.splitlines()
        assert line.startswith("voicebridge: config error: server.public_url: has port 8443")
        assert "wss:// on port 443 (error 31910)" in line
