"""The alert rules of deploy/prometheus, checked and unit-tested by Prometheus's own promtool.

Charter: ``promtool check rules`` and ``promtool test rules`` (Debian's ``prometheus``
package, which ``bootstrap.sh --test`` installs) run on the shipped files; the test
series in voicebridge.rules.test.yml fire each alert on the failure it is for and keep
it quiet on the look-alike that is not (a drain's refusals, replayed stream tokens, a
single auth failure). Skipped, with the reason, only when promtool is not installed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RULES_DIR = REPO / "deploy" / "prometheus"
RULES = RULES_DIR / "voicebridge.rules.yml"
RULE_TESTS = RULES_DIR / "voicebridge.rules.test.yml"

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian package: prometheus)"
)


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], cwd=RULES_DIR, capture_output=True, text=True, timeout=60,
        check=False,
    )


@needs_promtool
def test_the_rules_are_valid() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_every_alert_fires_on_its_failure_and_not_on_look_alikes() -> None:
    result = promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_unit_test() -> None:
    alerts = set(re.findall(r"^\s+- alert: (\w+)$", RULES.read_text(), re.MULTILINE))
    tested = set(re.findall(r"alertname: (\w+)$", RULE_TESTS.read_text(), re.MULTILINE))
    assert {
        "VoicebridgeFallbackRateHigh", "VoicebridgeAssistantLegFailures",
        "VoicebridgeAssistantAuthFailing", "VoicebridgeCallsRefused",
        "VoicebridgeFramesDropped", "VoicebridgeAddedLatencyHigh",
        "VoicebridgeWebhookAuthFailures", "VoicebridgeRestarting",
    } <= alerts
    assert alerts == tested
