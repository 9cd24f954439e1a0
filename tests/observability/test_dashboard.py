"""The Grafana dashboard's every query, run by a real Prometheus scraping two real workers
under ``voicebridge loadtest``.

Charter: loopback only. Two ``voicebridge serve`` processes share one public socket
(tests/observability/workers.py), each with its own ops socket; Debian's ``prometheus``
(installed by ``bootstrap.sh --test``) runs from a temporary configuration on
127.0.0.4, scraping both every second and loading the shipped alert rules; the real
``voicebridge loadtest`` CLI places calls through the shared socket against its own
simulated Vapi. Then each query of deploy/grafana/voicebridge.json, with the
dashboard's variables filled in as Grafana would (all workers), must return data; and
Prometheus must see two workers, each target carrying its own ``worker`` label.
Skipped, with the reason, only when ``prometheus`` is not installed.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.observability.workers import Workers, running_workers
from voicebridge.loopback import LOOPBACK_ACCOUNT_SID

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "voicebridge.json"
RULES = REPO / "deploy" / "prometheus" / "voicebridge.rules.yml"

PROMETHEUS = shutil.which("prometheus")
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None, reason="prometheus not installed (Debian package: prometheus)"
)

CALLS = 6
#: What Grafana puts in for the dashboard's variables: the default job, all workers, and
#: a rate window that spans the whole (short) load test.
VARIABLES = {"$job": "voicebridge", "$worker": ".*", "$__rate_interval": "1m"}
#: Polls of Prometheus's HTTP API while waiting for it (it runs in another process).
POLL_S = 0.25


def free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def dashboard_queries() -> Iterator[tuple[str, str]]:
    """(panel title, expression) of every target of every panel."""
    document = json.loads(DASHBOARD.read_text())
    for panel in document["panels"]:
        for target in panel.get("targets", ()):
            yield panel["title"], target["expr"]


def filled_in(expression: str) -> str:
    for variable, value in VARIABLES.items():
        expression = expression.replace(variable, value)
    return expression


class Prometheus:
    def __init__(self, url: str, http: httpx.AsyncClient) -> None:
        self.url = url
        self.http = http

    async def query(self, expression: str) -> list[dict[str, Any]]:
        response = await self.http.get(f"{self.url}/api/v1/query", params={"query": expression})
        body = response.json()
        assert body["status"] == "success", (expression, body)
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    async def wait_until(self, expression: str) -> list[dict[str, Any]]:
        """The result of ``expression`` once it is not empty."""
        while True:
            # Another process: nothing to wait on but its answers.
            result = await self.query(expression)
            if result:
                return result
            await trio.sleep(POLL_S)


@asynccontextmanager
async def running_prometheus(tmp_path: Path, workers: Workers) -> AsyncIterator[Prometheus]:
    assert PROMETHEUS is not None
    host = "127.0.0.4"
    port = free_port(host)
    targets = ", ".join(f'"{worker.ops_target}"' for worker in workers.workers)
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f'rule_files: ["{RULES}"]\n'
        "scrape_configs:\n  - job_name: voicebridge\n"
        f"    static_configs:\n      - targets: [{targets}]\n"
    )
    command = [
        PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address={host}:{port}", "--log.level=warn",
    ]
    process = await trio.lowlevel.open_process(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        async with httpx.AsyncClient() as http:
            url = f"http://{host}:{port}"
            while True:
                try:
                    if (await http.get(f"{url}/-/ready")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert process.returncode is None, "prometheus exited at start"
                await trio.sleep(POLL_S)
            yield Prometheus(url, http)
    finally:
        process.terminate()
        with trio.move_on_after(10):
            await process.wait()
        if process.returncode is None:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()


def config_file(tmp_path: Path, public_port: int, assistant_port: int) -> Path:
    path = tmp_path / "vb.toml"
    path.write_text(
        "[server]\n"
        f'public_url = "http://127.0.0.1:{public_port}"\n'
        'log_target = "stderr"\nlog_level = "warning"\n'
        f'shared_dir = "{tmp_path / "run"}"\n'
        "[twilio]\n"
        f'account_sid = "{LOOPBACK_ACCOUNT_SID}"\nallow_insecure_stream_url = true\n'
        "[vapi]\n"
        f'base_url = "http://127.0.0.1:{assistant_port}"\nassistant_id = "loadtest"\n'
    )
    return path


@needs_prometheus
async def test_every_dashboard_query_returns_data_from_two_workers_under_load(
    tmp_path: Path,
) -> None:
    auth_token, api_key = secrets.token_hex(16), secrets.token_hex(16)
    assistant_port = free_port("127.0.0.1")
    environment = {
        "PATH": "/usr/bin:/bin",
        "VOICEBRIDGE_TWILIO_AUTH_TOKEN": auth_token,
        "VOICEBRIDGE_VAPI_API_KEY": api_key,
        "VOICEBRIDGE_STREAM_TOKEN_SECRET": secrets.token_hex(32),
    }
    empty: list[str] = []
    with trio.fail_after(120), socket.create_server(("127.0.0.1", 0), backlog=256) as public:
        config = config_file(tmp_path, public.getsockname()[1], assistant_port)
        async with (
            running_workers(2, config, environment, public) as workers,
            running_prometheus(tmp_path, workers) as prometheus,
        ):
            up = await prometheus.wait_until('count(up{job="voicebridge"} == 1) == 2')
            assert up
            loadtest = await trio.run_process(
                [
                    sys.executable, "-m", "voicebridge", "loadtest",
                    "--url", f"http://127.0.0.1:{workers.public_port}",
                    "--assistant-port", str(assistant_port),
                    "--calls", str(CALLS), "--duration", "4", "--ramp", "1", "--json",
                ],
                capture_stdout=True, capture_stderr=True, check=False,
                # The secrets as an operator passes them: never in argv.
                env={**os.environ, **environment},
            )
            report = json.loads(loadtest.stdout)
            # Every call went through; whether the figures are valid as a benchmark (the
            # generator kept its pace on a shared machine) is not this test's business.
            assert report["failed_calls"] == 0, (report["failures"], loadtest.stderr.decode())
            # Every call has ended and been scraped, whichever worker ran it.
            await prometheus.wait_until(
                f'sum(voicebridge_calls_total{{job="voicebridge"}}) == {CALLS}'
            )
            for title, expression in dashboard_queries():
                result = await prometheus.query(filled_in(expression))
                values = [float(series["value"][1]) for series in result]
                if not any(math.isfinite(value) for value in values):
                    empty.append(f"{title}: {expression} -> {values}")
            build = await prometheus.query('voicebridge_build_info{job="voicebridge"}')
            worker_values = await prometheus.http.get(
                f"{prometheus.url}/api/v1/label/worker/values",
                params={"match[]": 'voicebridge_build_info{job="voicebridge"}'},
            )
            rules = (await prometheus.http.get(f"{prometheus.url}/api/v1/rules")).json()
    assert empty == []
    # The dashboard's worker variable lists both; each target reports its own worker.
    assert worker_values.json()["data"] == ["0", "1"]
    by_target = {series["metric"]["instance"]: series["metric"]["worker"] for series in build}
    assert by_target == {w.ops_target: w.name for w in workers.workers}
    # The shipped rules loaded and were evaluated by the real Prometheus.
    groups = {group["name"]: group for group in rules["data"]["groups"]}
    assert set(groups) == {"voicebridge.rules", "voicebridge.alerts"}
    assert all(rule["health"] == "ok" for g in groups.values() for rule in g["rules"])
