"""Issue 10's attacks on the public port, each from its own OS process, beside witness calls.

Charter (``tests/edge/harness.py``): the real server runs in a child process, the attacker
in another (bound to 127.0.0.2 …), the witnesses, the simulated Vapi and the webhook
prober in this one; loopback only; every test under ``trio.fail_after``; each attack
stops by itself within a few seconds. Each test asserts what a user would notice when
the defence works: the witnesses and the signed webhooks are served as if nothing
happened (``assert_unharmed``), and the attacker gets the refusal the defence gives.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from tests.edge.harness import (
    assert_unharmed,
    attack_beside_witnesses,
    attacker_command,
    edge_server,
)

pytestmark = pytest.mark.slow

#: How long each attacker attacks (the witnesses' calls, under three seconds, fit inside).
ATTACK_S = 4.0
#: The guard on each test: the server's start, the attack, the witnesses, the stop.
TEST_DEADLINE_S = 60.0


async def test_without_an_attack_everyone_is_served(tmp_path: Path) -> None:
    # The control run: the harness's own figures on a quiet server.
    with trio.fail_after(TEST_DEADLINE_S):
        async with edge_server(tmp_path) as edge:
            run = await attack_beside_witnesses(
                edge, attacker_command("idle", edge, "--seconds", str(ATTACK_S))
            )
    assert_unharmed(run, edge)


async def test_a_tokenless_frame_flood_is_cut_off_and_starves_no_one(tmp_path: Path) -> None:
    # (a) 18 Mbit/s of {"event":"x"} on an upgraded /twilio/stream, no start, no token.
    with trio.fail_after(TEST_DEADLINE_S):
        async with edge_server(tmp_path) as edge:
            run = await attack_beside_witnesses(
                edge, attacker_command("flood", edge, "--seconds", str(ATTACK_S), "--mbit", "18")
            )
    assert run.attacker["status"] == 101
    assert_unharmed(run, edge)
    # Traffic before `start` has a small budget: the server hung up on the flooder.
    assert run.attacker["closed_by_server"], run.attacker
