"""``voicebridge call NUMBER``: through the simulated Twilio REST API to the assistant."""

from __future__ import annotations

import io
from functools import partial
from pathlib import Path

import pytest
import trio

from tests.harness import running_bridge
from voicebridge.bridge.outcome import Outcome
from voicebridge.cli import main
from voicebridge.control.outbound import call_main
from voicebridge.sim.caller import Hangup, WaitForAssistant
from voicebridge.sim.twilio_rest import SimTwilioRest

CALLEE = "+15550100777"


async def test_voicebridge_call_reaches_the_assistant(tmp_path: Path) -> None:
    rest = SimTwilioRest(callee_script=(WaitForAssistant(heard_ms=300), Hangup()))
    out, err = io.StringIO(), io.StringIO()
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            await nursery.start(rest.serve)
            async with running_bridge() as bridge:
                rest.settings = bridge.caller
                (tmp_path / "token").write_text(bridge.caller.auth_token + "\n")
                config = tmp_path / "voicebridge.toml"
                config.write_text(
                    f'[server]\npublic_url = "{bridge.config.server.public_url}"\n'
                    f'[twilio]\naccount_sid = "{bridge.caller.account_sid}"\n'
                    f'rest_base_url = "{rest.base_url}"\n'
                    '[outbound]\nfrom_number = "+15550100001"\n'
                    f'[secrets]\ntwilio_auth_token_file = "{tmp_path / "token"}"\n'
                )
                status = await trio.to_thread.run_sync(
                    partial(call_main, CALLEE, str(config), out=out, err=err)
                )
                assert status == 0, err.getvalue()
                report = await rest.wait_report(out.getvalue().strip())
                record = bridge.record(report.call_sid)
            nursery.cancel_scope.cancel()
    assert report.streamed and report.first_audio_ms is not None
    assert record.outcome is Outcome.CALLER_HUNG_UP


def test_voicebridge_call_needs_the_outbound_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "voicebridge.toml"
    config.write_text("")
    assert main(["call", CALLEE, "--config", str(config)]) == 2
    assert "outbound.from_number" in capsys.readouterr().err


def test_voicebridge_call_refuses_an_assistant_not_listed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "voicebridge.toml"
    config.write_text('[outbound]\nassistants = ["asst-sales"]\n')
    assert main(["call", CALLEE, "--assistant", "asst-nobody", "--config", str(config)]) == 2
    assert capsys.readouterr().err == (
        "voicebridge: --assistant refused: "
        "assistant 'asst-nobody' is not listed in outbound.assistants\n"
    )
    assert main(["call", CALLEE, "--assistant", "asst-sales", "--config", str(config)]) == 2
    assert "credentials.stream_token_secret" in capsys.readouterr().err
    assert main(["call", "5550100777", "--config", str(config)]) == 2
    assert capsys.readouterr().err == (
        "voicebridge: '5550100777' is not an E.164 number (+15551234567)\n"
    )
