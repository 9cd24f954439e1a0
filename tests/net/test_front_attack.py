"""Slow clients in another OS process against the real server, beside signed webhooks.

Charter: the attacker is ``tests.net.slow_clients`` in its own process, bound to
127.0.0.2 and up; the witnesses are signed voice webhooks from 127.0.0.1, as Twilio
sends them, each of which must be answered with TwiML within a second. Real time,
loopback only, port 0, a ``fail_after`` guard on every test.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import trio

from tests.harness import Bridge, running_bridge
from voicebridge.loopback import LOOPBACK_ACCOUNT_SID
from voicebridge.twilio.signature import sign
from voicebridge.web import VOICE_PATH

REPO = Path(__file__).resolve().parents[2]
#: Twilio waits 15 s for a webhook by default; a genuine one must not come close.
WITNESS_DEADLINE_S = 1.0
WITNESSES = 16
WITNESS_EVERY_S = 0.25


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def _witness(bridge: Bridge, http: httpx.AsyncClient) -> float:
    """Post one signed voice webhook for a new call; how long its TwiML took."""
    url = bridge.config.server.public_url + VOICE_PATH
    params = {
        "CallSid": "CA" + secrets.token_hex(16),
        "AccountSid": LOOPBACK_ACCOUNT_SID,
        "From": "+15550100001",
        "To": "+15550100002",
        "CallStatus": "ringing",
        "Direction": "inbound",
        "ApiVersion": "2010-04-01",
    }
    signature = sign(url, params, bridge.caller.auth_token)
    started = trio.current_time()
    response = await http.post(
        f"http://127.0.0.1:{bridge.listening.port}{VOICE_PATH}",
        data=params,
        headers={"X-Twilio-Signature": signature},
    )
    took = trio.current_time() - started
    assert response.status_code == 200, response.text
    assert "<Stream " in response.text
    return took


async def _attack_beside_witnesses(
    bridge: Bridge, attacker: list[str]
) -> tuple[list[float], dict[str, Any], int]:
    """Run the attacker; meanwhile send the witnesses. Their times, the attacker's
    totals, and the most descriptors this process held above its count before."""
    baseline = _open_fds()
    process = await trio.lowlevel.open_process(
        [
            *(sys.executable, "-m", "tests.net.slow_clients"),
            *("--port", str(bridge.listening.port), *attacker),
        ],
        stdout=subprocess.PIPE,
        cwd=REPO,
    )
    assert process.stdout is not None
    output = b""
    try:
        while b"\n" not in output:
            chunk = await process.stdout.receive_some()
            assert chunk, "the attacker died before it was ready"
            output += chunk
        assert json.loads(output.split(b"\n")[0])["ready"] > 0
        times = []
        peak = 0
        async with httpx.AsyncClient(timeout=5) as http:
            for _ in range(WITNESSES):
                times.append(await _witness(bridge, http))
                peak = max(peak, _open_fds() - baseline)
                await trio.sleep(WITNESS_EVERY_S)
        while chunk := await process.stdout.receive_some():
            output += chunk
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()
    totals = json.loads(output.strip().split(b"\n")[-1])
    return times, totals, peak


async def test_a_thousand_slow_bodies_from_one_address_leave_webhooks_answered() -> None:
    """The measured attack: 1,100 connections from one address dribbling POST bodies."""
    with trio.fail_after(60):
        async with running_bridge() as bridge:
            per_peer = bridge.config.edge.max_connections_per_peer
            times, totals, peak = await _attack_beside_witnesses(
                bridge,
                ["--sources", "127.0.0.2", "--per-source", "1100", "--seconds", "6"],
            )
            counters = bridge.listening.front
    assert max(times) < WITNESS_DEADLINE_S, [round(t, 3) for t in times]
    # The excess was refused at once; this process never held more than the cap.
    assert totals["opened"] == 1100
    assert counters.refused_peer_cap >= 1100 - per_peer
    assert peak <= per_peer + 32, f"{peak} descriptors held for {per_peer} connections"


async def test_slow_clients_from_many_addresses_at_the_total_cap_leave_webhooks_answered() -> None:
    """Eight addresses each holding their cap, and reconnecting what is closed: more
    than the total cap. The newcomers displace the oldest connections still sending,
    and the deadlines close the rest."""
    edge = {
        "max_connections": 64,
        "max_connections_per_peer": 16,
        "head_deadline_s": 1.0,
        "body_deadline_s": 2.0,
    }
    sources = ",".join(f"127.0.0.{n}" for n in range(2, 10))
    with trio.fail_after(60):
        async with running_bridge(edge=edge) as bridge:
            times, totals, peak = await _attack_beside_witnesses(
                bridge,
                [
                    *("--sources", sources, "--per-source", "16", "--seconds", "6"),
                    *("--every", "0.25", "--reconnects", "100"),
                ],
            )
            counters = bridge.listening.front
    assert max(times) < WITNESS_DEADLINE_S, [round(t, 3) for t in times]
    assert counters.shed > 0
    assert totals["ended"] > 0
    assert peak <= 64 + 32, f"{peak} descriptors held for 64 connections"


async def test_slow_bodies_from_another_process_are_closed_at_the_body_deadline() -> None:
    edge = {"max_connections_per_peer": 16, "max_incomplete_per_peer": 16, "body_deadline_s": 2.0}
    with trio.fail_after(60):
        async with running_bridge(edge=edge) as bridge:
            times, totals, _ = await _attack_beside_witnesses(
                bridge,
                ["--sources", "127.0.0.2", "--per-source", "16", "--seconds", "3.5"],
            )
            counters = bridge.listening.front
    assert max(times) < WITNESS_DEADLINE_S, [round(t, 3) for t in times]
    # Every one of them, 2 s after its head, although it sent a byte every 0.5 s.
    assert (totals["opened"], totals["ended"]) == (16, 16)
    assert counters.body_deadline == 16
