"""The ``voicebridge`` command as a user runs it: a real subprocess."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import wave
import zipfile
from pathlib import Path

import pytest
import trio

from voicebridge import cli

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
    # The routes: two numbers, two assistants, and the hook's call.
    assert "route sales, hook asked; Vapi got assistant asst-sales" in out
    assert "route support, hook not asked; Vapi got assistant asst-support, team=support" in out
    assert "route sales, hook asked; Vapi got assistant asst-vip, name=Ada" in out
    assert_saved_call_audio(tmp_path)
    # Progress goes to stderr, so that the ~20 s of the call are not silent.
    progress = result.stderr.decode().splitlines()
    assert progress[0] == "voicebridge demo: call 1 ringing…"
    assert progress[1].startswith("voicebridge demo: call 1 ended after ")
    assert "ringing" not in out


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
    assert result.returncode == 78  # EX_CONFIG: RestartPreventExitStatus= in the units
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
        assert result.returncode == {"check-config": 2, "serve": 78}[command], result.stderr
        [line] = result.stderr.splitlines()
        assert line.startswith("voicebridge: config error: server.public_url: has port 8443")
        assert "wss:// on port 443 (error 31910)" in line


# --- closed pipes, completion, the man page ------------------------------------------


def test_a_closed_pipe_ends_the_command_quietly() -> None:
    """``voicebridge … | head``: the reader is gone before anything is written."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run(
            [*VOICEBRIDGE, "completion", "bash"], stdout=write_end, stderr=subprocess.PIPE,
            text=True, check=False, timeout=60,
        )
    finally:
        os.close(write_end)
    assert result.returncode == cli.EXIT_PIPE_CLOSED == 141
    assert result.stderr == ""


def test_a_broken_pipe_that_is_not_stdout_is_not_hidden(monkeypatch: pytest.MonkeyPatch) -> None:
    """A peer's socket closing under ``call`` or ``loadtest`` is an error, not a reader
    that went away: it is raised, not turned into a quiet 141."""

    def peer_went_away(argv: object) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli, "_run", peer_went_away)
    with pytest.raises(BrokenPipeError):
        cli.main(["demo"])


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash not installed")
def test_bash_completion_completes_commands_and_options() -> None:
    script = subprocess.run(
        [*VOICEBRIDGE, "completion", "bash"], capture_output=True, text=True, check=True
    ).stdout
    # Load the script into a real bash and ask it what it would complete.
    probe = script + (
        "\nCOMP_WORDS=(voicebridge check-config --); COMP_CWORD=2; COMP_LINE='voicebridge "
        "check-config --'; COMP_POINT=${#COMP_LINE}\n"
        "$(complete -p voicebridge | sed -E 's/.*-F ([^ ]+).*/\\1/') voicebridge -- check-config\n"
        "printf '%s\\n' \"${COMPREPLY[@]}\"\n"
    )
    result = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, check=False)
    offered = set(result.stdout.split())
    assert {"--quiet", "--no-secrets", "--config"} <= offered, result.stdout + result.stderr


def _commands_and_options() -> dict[str, list[str]]:
    """Every command of the parser and its options, as a user types them."""
    parser = cli._parser()
    [commands] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    found: dict[str, list[str]] = {}
    for name, sub in commands.choices.items():
        found[name] = [
            option
            for action in sub._actions
            if action.help != argparse.SUPPRESS
            for option in action.option_strings
            if option.startswith("--") and option != "--help"
        ]
    return found


def _rendered(page: Path) -> str:
    result = subprocess.run(
        ["groff", "-man", "-Tutf8", "-ww", "-P-cbou", "-rHY=0", "-rLL=1000n", str(page)],
        capture_output=True, text=True, check=True,
    )
    assert result.stderr == "", result.stderr  # no groff warning
    return result.stdout.replace("\u2010", "-").replace("\u2011", "-")


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff not installed")
def test_the_man_page_describes_every_command_and_option() -> None:
    text = _rendered(REPO / "man" / "voicebridge.8")
    for command, options in _commands_and_options().items():
        assert re.search(rf"voicebridge {command}\b", text), command
        for option in options:
            assert option in text, f"{command} {option}"
    assert "RestartPreventExitStatus=78" in text
    assert str(cli.EXIT_CONFIG) in text


REPO = Path(__file__).resolve().parent.parent


def test_install_units_puts_what_the_package_ships_in_place(tmp_path: Path) -> None:
    dest, man, docs = tmp_path / "units", tmp_path / "man", tmp_path / "docs"
    example = tmp_path / "etc" / "voicebridge.example.toml"
    catalog = tmp_path / "catalog"
    result = subprocess.run(
        [*VOICEBRIDGE, "install-units", "--dest", str(dest), "--man-dir", str(man),
         "--docs-dir", str(docs), "--example-config", str(example),
         "--catalog-dir", str(catalog)],
        capture_output=True, text=True, check=False, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    shipped = sorted(p.name for p in (REPO / "systemd").glob("*.s*") if p.suffix != ".toml")
    assert sorted(p.name for p in dest.iterdir()) == shipped
    for name in shipped:
        assert (dest / name).read_text() == (REPO / "systemd" / name).read_text()
    assert example.read_text() == (REPO / "systemd" / "voicebridge.example.toml").read_text()
    assert (docs / "operations.md").read_text() == (REPO / "docs" / "operations.md").read_text()
    assert (man / "man8" / "voicebridge.8").is_file()
    shipped_catalog = (REPO / "systemd" / "voicebridge.catalog").read_text()
    assert (catalog / "voicebridge.catalog").read_text() == shipped_catalog
    assert f"installed {dest / 'voicebridge.service'}" in result.stdout.splitlines()
    if shutil.which("man"):
        # What Documentation=man:voicebridge(8) opens (systemctl help runs man).
        page = subprocess.run(
            ["man", "-M", str(man), "-P", "cat", "voicebridge"],
            capture_output=True, text=True, check=False, env={**os.environ, "MANWIDTH": "80"},
        )
        assert page.returncode == 0, page.stderr
        assert "voicebridge - bridge Twilio phone calls to Vapi voice assistants" in page.stdout


def test_the_wheel_builds_without_warnings_and_carries_units_docs_and_man_page(
    tmp_path: Path,
) -> None:
    """What ``pip install``/``pip wheel`` sees: an SPDX licence, a pinned build backend
    without deprecation warnings, and the operator's files inside the wheel. Built from a
    copy of the project: setuptools writes build/ and *.egg-info where it builds."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "setup.cfg"):
        if (REPO / name).exists():
            shutil.copy2(REPO / name, source / name)
    for name in ("systemd", "docs", "man"):
        shutil.copytree(REPO / name, source / name)
    shutil.copytree(REPO / "voicebridge", source / "voicebridge", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--disable-pip-version-check",
         "-w", str(wheels), str(source)],
        capture_output=True, text=True, check=False, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "Deprecat" not in output and "BuildBackendWarning" not in output, output[-5000:]
    [wheel] = wheels.glob("voicebridge-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        [metadata] = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = archive.read(metadata).decode()
    assert "License-Expression: LicenseRef-Proprietary" in meta.splitlines()
    assert "Requires-Dist: shtab" in meta
    for unit in ("voicebridge.service", "voicebridge@.service", "voicebridge.socket",
                 "voicebridge-ops.socket", "voicebridge-ops@.socket",
                 "voicebridge.example.toml"):
        assert f"voicebridge/share/systemd/{unit}" in names
    assert "voicebridge/share/man/voicebridge.8" in names
    assert {f"voicebridge/share/docs/{p.name}" for p in (REPO / "docs").glob("*.md")} <= names
