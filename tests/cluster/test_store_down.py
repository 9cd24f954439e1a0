"""A box whose cluster store is down from the start: it starts, and its webhook answers
within the store's deadline as ``cluster.on_store_failure`` says; a bad ``[cluster]`` is
refused at start with the key and the reason."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio

from tests.cluster.redis_fixture import HOST, free_port
from tests.harness import running_bridge
from tests.test_admission_e2e import CapturedWebhook
from tests.test_e2e import OVERFLOW_WORDS
from voicebridge.loopback import LOOPBACK_ACCOUNT_SID


@pytest.mark.parametrize(
    ("policy", "answer"), [("box-limit", "<Connect"), ("refuse", OVERFLOW_WORDS)]
)
async def test_a_box_whose_store_is_down_decides_as_configured(policy: str, answer: str) -> None:
    nobody = f"redis://{HOST}:{free_port(HOST)}/0"  # nothing listens there
    cluster = {"redis_url": nobody, "on_store_failure": policy, "store_deadline_ms": 200}
    with trio.fail_after(20):
        async with running_bridge(cluster=cluster) as bridge, httpx.AsyncClient() as http:
            started = trio.current_time()
            first = await CapturedWebhook.of(bridge, "CA" + "1" * 32).post(http, bridge)
            first_s = trio.current_time() - started
            started = trio.current_time()
            second = await CapturedWebhook.of(bridge, "CA" + "2" * 32).post(http, bridge)
            second_s = trio.current_time() - started
    assert answer in first.text and answer in second.text
    assert first_s < 1.0
    assert second_s < 0.2  # the store is not asked again at once


def test_a_bad_cluster_section_is_refused_with_its_key(tmp_path: Path) -> None:
    config = tmp_path / "vb.toml"
    config.write_text('[cluster]\nredis_url = "http://10.0.0.9:6379"\n')
    result = subprocess.run(
        [sys.executable, "-m", "voicebridge", "check-config", "--config", str(config)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0
    assert "cluster.redis_url" in result.stderr and "redis://" in result.stderr


def test_check_config_never_prints_the_stores_password(tmp_path: Path) -> None:
    config = tmp_path / "vb.toml"
    config.write_text(
        '[server]\npublic_url = "https://voice.example.com"\n'
        f'[twilio]\naccount_sid = "{LOOPBACK_ACCOUNT_SID}"\n[vapi]\nassistant_id = "a"\n'
        '[cluster]\nredis_url = "redis://:hunter2-secret@10.0.0.9:6379/0"\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "voicebridge", "check-config", "--no-secrets", "--config",
         str(config)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert "hunter2" not in result.stdout + result.stderr
    assert 'redis_url = "redis://:***@10.0.0.9:6379/0"' in result.stdout + result.stderr
