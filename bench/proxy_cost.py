"""What the TLS proxy in front costs: the same load direct, through nginx, through HAProxy.

    .venv/bin/python bench/proxy_cost.py                 # 40 calls, 15 s each target
    .venv/bin/python bench/proxy_cost.py --calls 20 --duration 10 --rounds 3 --json /tmp/p.json

One ``voicebridge serve`` (a config of its own, 127.0.0.1, warnings only) and the
shipped proxy files (deploy/nginx, deploy/haproxy, run by ``tests/proxy_fixture``
with a throwaway certificate on 127.0.0.2 / 127.0.0.3). ``voicebridge loadtest --url``
loads it three times with the same traffic: ``http://`` to the bridge, then
``https://``/``wss://`` through each proxy. The load test measures the added latency
per frame of the whole path (generator → [proxy →] bridge → simulated Vapi and back)
and the bridge's CPU; this script reads the proxy's CPU (all its processes) from
/proc before and after each run. Figures from one run each, printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import trio

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from tests.proxy_fixture import (  # noqa: E402
    PUBLIC_HOST,
    free_port,
    make_certificate,
    running_proxy,
)

ACCOUNT_SID = "AC" + "d" * 32
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """CPU time of ``pid`` and its children (nginx's workers), from /proc."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(stat.parent.name) == pid or int(fields[1]) == pid:
            total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return total


def bridge_config(directory: Path, port: int, assistant_port: int) -> Path:
    path = directory / "voicebridge.toml"
    path.write_text(
        "[server]\n"
        f'listen = "127.0.0.1:{port}"\nops_listen = "127.0.0.1:0"\n'
        f'public_url = "https://{PUBLIC_HOST}"\nmax_concurrent_calls = 100000\n'
        'log_level = "warning"\nlog_target = "stderr"\n'
        "[edge]\nmax_connections = 8192\nmax_connections_per_peer = 8192\n"
        f'[twilio]\naccount_sid = "{ACCOUNT_SID}"\n'
        f'[vapi]\nbase_url = "http://127.0.0.1:{assistant_port}"\nassistant_id = "sim"\n'
    )
    return path


async def load(url: str, args: argparse.Namespace, environment: dict[str, str],
               bridge_pid: int, ca_file: str | None) -> dict[str, Any]:
    command = [
        sys.executable, "-m", "voicebridge", "loadtest", "--json",
        "--calls", str(args.calls), "--duration", str(args.duration), "--seed", "7",
        "--url", url, "--public-url", f"https://{PUBLIC_HOST}",
        "--assistant-port", environment["ASSISTANT_PORT"],
        "--bridge-pid", str(bridge_pid),
    ]
    if ca_file:
        command += ["--ca-file", ca_file]
    # The secrets through the environment, never argv (loadtest refuses them there).
    secret_env = {name: environment[name]
               for name in ("VOICEBRIDGE_TWILIO_AUTH_TOKEN", "VOICEBRIDGE_VAPI_API_KEY")}
    result = await trio.run_process(command, capture_stdout=True, capture_stderr=True,
                                    check=False, env={**os.environ, **secret_env})
    if not result.stdout:
        raise SystemExit(f"loadtest failed: {result.stderr.decode()[-1000:]}")
    report: dict[str, Any] = json.loads(result.stdout)
    return report


async def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="voicebridge-proxy-cost-") as name:
        directory = Path(name)
        certificate = make_certificate(directory, ("127.0.0.2", "127.0.0.3"))
        port, assistant_port = free_port("127.0.0.1"), free_port("127.0.0.1")
        environment = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "VOICEBRIDGE_TWILIO_AUTH_TOKEN": secrets.token_hex(16),
            "VOICEBRIDGE_VAPI_API_KEY": secrets.token_hex(16),
            "VOICEBRIDGE_STREAM_TOKEN_SECRET": secrets.token_hex(32),
        }
        config = bridge_config(directory, port, assistant_port)
        bridge = await trio.lowlevel.open_process(
            [sys.executable, "-m", "voicebridge", "serve", "--config", str(config)],
            env=environment, stdin=subprocess.DEVNULL,
        )
        environment["ASSISTANT_PORT"] = str(assistant_port)
        try:
            await trio.sleep(2)  # the server starts listening
            targets: list[tuple[str, str | None]] = [("direct", None), ("nginx", "127.0.0.2"),
                                                     ("haproxy", "127.0.0.3")] * args.rounds
            for target, host in targets:
                if host is None:
                    before = 0.0
                    report = await load(f"http://127.0.0.1:{port}", args, environment,
                                        bridge.pid, None)
                    proxy_cpu = 0.0
                else:
                    async with running_proxy(target, directory / target, host, port,
                                             certificate) as proxy:
                        before = cpu_seconds(proxy.process.pid)
                        report = await load(proxy.url, args, environment, bridge.pid,
                                            str(certificate.cert))
                        proxy_cpu = cpu_seconds(proxy.process.pid) - before
                call_seconds = args.calls * (args.duration + report["ramp_s"])
                rows.append({
                    "target": target,
                    "failed_calls": report["failed_calls"],
                    "valid": report["valid"],
                    "invalid_reasons": report["invalid_reasons"],
                    "caller_to_agent_ms": report["added_latency_ms"]["caller_to_agent"],
                    "agent_to_caller_ms": report["added_latency_ms"]["agent_to_caller_at_playback"],
                    "bridge_cpu_us_per_call_second": report["cpu_us_per_call_second"],
                    "proxy_cpu_s": round(proxy_cpu, 2),
                    # The proxy's CPU over the whole run (ramp and hang-ups too), per call
                    # and second of call.
                    "proxy_cpu_us_per_call_second": round(proxy_cpu / call_seconds * 1e6, 1),
                })
                print(json.dumps(rows[-1]), flush=True)
        finally:
            bridge.terminate()
            await bridge.wait()
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| path | failed calls | added latency caller→agent p50 / p99 (ms) | "
             "agent→caller at playback p50 / p99 (ms) | bridge CPU (µs per call-second) | "
             "proxy CPU (µs per call-second) |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        up, down = row["caller_to_agent_ms"], row["agent_to_caller_ms"]
        lines.append(
            f"| {row['target']} | {row['failed_calls']} | {up['p50']} / {up['p99']} | "
            f"{down['p50']} / {down['p99']} | {row['bridge_cpu_us_per_call_second']} | "
            f"{row['proxy_cpu_us_per_call_second'] if row['target'] != 'direct' else '-'} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=40)
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--rounds", type=int, default=1,
                        help="alternate direct, nginx, haproxy this many times")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    arguments = parser.parse_args()
    result = trio.run(main, arguments)
    print(table(result))
    if arguments.json:
        arguments.json.write_text(json.dumps(result, indent=1))
