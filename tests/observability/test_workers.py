"""All cores: every worker answers health and metrics for itself, with its ``worker`` label.

Charter: two real ``voicebridge serve`` processes share one public socket, as
``voicebridge@0`` and ``@1`` do (tests/observability/workers.py), each with an ops socket
of its own. Calls are placed through the shared socket by the simulated Twilio caller
against the simulated Vapi. What an operator's scraper would see is asserted: each ops
socket always answers for the same process, with that process's ``worker`` label, and
the two together count every call once.
"""

from __future__ import annotations

import signal
import socket
from pathlib import Path

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families

from tests.observability.workers import running_workers
from tests.test_systemd_integration import SHORT_ASSISTANT, SHORT_CALL, Box, a_box
from voicebridge.sim.caller import place_call

REPO = Path(__file__).resolve().parents[2]
CALLS = 4
SCRAPES = 6


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [
        (sample.name, sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def environment(box: Box) -> dict[str, str]:
    env = box.environment()
    del env["NOTIFY_SOCKET"]  # each worker set gets its own (running_workers)
    return env


async def test_each_worker_scrape_is_that_workers_own(tmp_path: Path) -> None:
    with trio.fail_after(60), socket.create_server(("127.0.0.1", 0), backlog=64) as public:
        public_port = public.getsockname()[1]
        async with a_box(tmp_path, SHORT_ASSISTANT) as box:
            config = box.write_config(
                "vb.toml", public_port=public_port, shared_dir=str(tmp_path / "run")
            )
            async with running_workers(2, config, environment(box), public) as running:
                async with trio.open_nursery() as calls_nursery:
                    for _ in range(CALLS):
                        calls_nursery.start_soon(
                            place_call, box.caller(port=public_port), SHORT_CALL
                        )
                scrapes: dict[str, list[str]] = {}
                async with httpx.AsyncClient() as http:
                    for worker in running.workers:
                        scrapes[worker.name] = [
                            (await http.get(f"{worker.ops_url}/metrics")).text
                            for _ in range(SCRAPES)
                        ]
                        ready = await http.get(f"{worker.ops_url}/readyz")
                        assert ready.status_code == 200
                    # Worker 0 alone is told to reload an invalid configuration.
                    box.write_config(
                        "vb.toml", public_port=public_port, max_concurrent_calls=0
                    )
                    first = running.workers[0]
                    first.server.signal(signal.SIGHUP)
                    await first.server.wait_for_log("reload refused")
                    after_reload = {
                        worker.name: samples((await http.get(f"{worker.ops_url}/metrics")).text)
                        for worker in running.workers
                    }
            starts = {w.name: w.server.log_lines("starting with") for w in running.workers}
    counted: dict[str, float] = {}
    for name, texts in scrapes.items():
        seen = [samples(text) for text in texts]
        # Every sample of this socket says it is this worker's.
        assert {labels["worker"] for scrape in seen for _, labels, _ in scrape} == {name}
        # Scrape after scrape, the same process: its start time and its call count.
        started = {v for scrape in seen for n, _, v in scrape if n == "process_start_time_seconds"}
        calls = {
            sum(v for n, _, v in scrape if n == "voicebridge_calls_total") for scrape in seen
        }
        assert len(started) == 1 and len(calls) == 1, (name, started, calls)
        counted[name] = calls.pop()
    # The two count every call once between them, whichever took it.
    assert sum(counted.values()) == CALLS, counted
    # The refused reload shows on worker 0's scrape only.
    for name, reload_ok, refused in (("0", 0, 1), ("1", 1, 0)):
        scrape = after_reload[name]
        assert [v for n, _, v in scrape if n == "voicebridge_config_last_reload_successful"] == [
            reload_ok
        ]
        assert [
            v for n, labels, v in scrape
            if n == "voicebridge_config_reloads_total" and labels["result"] == "refused"
        ] == [refused]
    # Each says at start which worker it is, with its version and configuration.
    for name, lines in starts.items():
        [line] = lines
        assert f"WORKER={name}" in line and "CONFIG_PATH=" in line and "VERSION=" in line


def test_the_template_names_each_worker_after_its_instance() -> None:
    text = (REPO / "systemd" / "voicebridge@.service").read_text()
    environment_lines = [
        line.split("=", 1)[1] for line in text.splitlines() if line.startswith("Environment=")
    ]
    assert "VOICEBRIDGE_SERVER_WORKER=%i" in environment_lines
