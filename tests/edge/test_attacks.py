"""Issue 10's attacks on the public port, each from its own OS process, beside witness calls.

Charter (``tests/edge/harness.py``): the real server runs in a child process, the attacker
in another (bound to 127.0.0.2 …), the witnesses, the simulated Vapi and the webhook
prober in this one; loopback only; every test under ``trio.fail_after``; each attack
stops by itself within a few seconds. Each test asserts what a user would notice when
the defence works: the witnesses and the signed webhooks are served as if nothing
happened (``assert_unharmed``), and the attacker gets the refusal the defence gives.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from tests.edge.harness import (
    EdgeServer,
    assert_unharmed,
    attack_beside_witnesses,
    attacker_command,
    edge_server,
    vapi_call_for,
)
from voicebridge.sim.caller import Hangup, WaitForAssistant, place_call

pytestmark = pytest.mark.slow

#: The front door's one-line refusal at an [edge] cap, as the attackers record it.
REFUSED = "HTTP/1.1 503 Service Unavailable"

#: How long each attacker attacks: the witnesses' calls (under three seconds, starting
#: half a second in) overlap it.
ATTACK_S = 3.0
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


@pytest.mark.parametrize(
    ("sources", "label"), [("127.0.0.2", "one address"), ("127.0.0.2-9", "eight addresses")]
)
async def test_a_thousand_slow_bodies_leave_room_for_twilio(
    tmp_path: Path, sources: str, label: str
) -> None:
    # (b) 1,100 connections, each dribbling a POST body, from one address or from eight.
    with trio.fail_after(TEST_DEADLINE_S):
        async with edge_server(tmp_path) as edge:
            run = await attack_beside_witnesses(
                edge,
                attacker_command(
                    "slow", edge, "--source", sources, "--connections", "1100",
                    "--seconds", str(ATTACK_S),
                ),
            )
    assert run.attacker["connections"] == 1100
    assert_unharmed(run, edge)
    # No one client (nor eight) holds a thousand of the server's connections.
    assert run.attacker["held_at_end"] < run.attacker["connections"], run.attacker
    # Accept errors back off instead of flooding the log.
    assert sum("Too many open files" in line for line in run.log) <= ATTACK_S, label


async def test_big_bodies_with_a_wrong_bearer_are_refused_unread(tmp_path: Path) -> None:
    # (c) 40 x 4 MB to /vapi/webhook in bearer mode, where the header alone decides.
    secret = "edge-webhook-secret-0123456789"
    with trio.fail_after(TEST_DEADLINE_S):
        async with edge_server(
            tmp_path,
            control={"enabled": True, "auth": "bearer"},
            secrets_env={"VOICEBRIDGE_VAPI_WEBHOOK_SECRET": secret},
        ) as edge:
            run = await attack_beside_witnesses(
                edge,
                attacker_command(
                    "bodies", edge, "--path", "/vapi/webhook", "--count", "40",
                    "--size", "4000000", "--header", "Authorization: Bearer wrong",
                    "--header", "Content-Type: application/json", "--seconds", str(ATTACK_S),
                ),
            )
    assert_unharmed(run, edge)
    # Each one refused: answered 401, or cut off (a cap on connections) without an answer.
    refused = run.attacker["closed_without_answer"] + run.attacker["refused_at_connect"]
    # 401 unread, or refused at once: the address has too many requests still arriving.
    assert set(run.attacker["statuses"]) <= {"HTTP/1.1 401", REFUSED}, run.attacker
    assert sum(run.attacker["statuses"].values()) + refused == 40, run.attacker


async def test_chunked_bodies_meet_the_route_limit_while_streaming(tmp_path: Path) -> None:
    # (c) 20 chunked 4 MiB bodies to /twilio/voice: no Content-Length to check up front.
    with trio.fail_after(TEST_DEADLINE_S):
        async with edge_server(tmp_path) as edge:
            run = await attack_beside_witnesses(
                edge,
                attacker_command(
                    "bodies", edge, "--path", "/twilio/voice", "--count", "20",
                    "--size", str(4 * 2**20), "--chunked", "--header", "X-Twilio-Signature: x",
                    "--header", "Content-Type: application/x-www-form-urlencoded",
                    "--seconds", str(ATTACK_S),
                ),
            )
    assert_unharmed(run, edge)
    # Each one refused as too large, while it was still coming (or cut off by a cap).
    refused = run.attacker["closed_without_answer"] + run.attacker["refused_at_connect"]
    # 413 while streaming, or refused at once: too many requests arriving from one address.
    assert set(run.attacker["statuses"]) <= {"HTTP/1.1 413", REFUSED}, run.attacker
    assert sum(run.attacker["statuses"].values()) + refused == 20, run.attacker


def replay_plan(edge: EdgeServer, call_sid: str, **plan: object) -> bytes:
    """A stream attacker's plan: a captured, validly signed voice webhook for ``call_sid``."""
    form, signature = edge.signed_webhook(call_sid)
    return json.dumps(
        {"path": "/twilio/voice", "form": form, "signature": signature, **plan}
    ).encode()


async def test_a_replayed_voice_webhook_gets_the_same_answer(tmp_path: Path) -> None:
    # (d) One captured webhook posted 4 times: Twilio's own retry looks the same.
    call_sid = "CA" + "d1" * 16
    with trio.fail_after(TEST_DEADLINE_S):
        async with edge_server(tmp_path) as edge:
            run = await attack_beside_witnesses(
                edge,
                attacker_command("stream", edge),
                attacker_stdin=replay_plan(edge, call_sid, posts=4, stream="none"),
            )
    assert_unharmed(run, edge)
    assert run.attacker["statuses"] == [200] * 4
    assert run.attacker["connects"] == 4
    assert run.attacker["distinct_answers"] == 1, "a second token for one CallSid"


async def test_replayed_answers_streamed_make_one_assistant_call(tmp_path: Path) -> None:
    # (d) The 4 answers, each streamed at once: never two assistant calls for one CallSid.
    call_sid = "CA" + "d2" * 16
    with trio.fail_after(TEST_DEADLINE_S):
        async with edge_server(tmp_path) as edge:
            run = await attack_beside_witnesses(
                edge,
                attacker_command("stream", edge),
                attacker_stdin=replay_plan(edge, call_sid, posts=4, stream="each", hold_s=1.5),
            )
    assert_unharmed(run, edge)
    assert len(vapi_call_for(edge, call_sid)) == 1, run.attacker
    assert sum(1 for s in run.attacker["streams"] if s["media_received"]) <= 1, run.attacker


async def test_a_voice_webhook_replayed_after_its_call_ended_is_refused(tmp_path: Path) -> None:
    # (d) The call happened and ended; its webhook, replayed and streamed, starts nothing.
    with trio.fail_after(TEST_DEADLINE_S):
        async with edge_server(tmp_path) as edge:
            ended = await place_call(edge.caller, (WaitForAssistant(heard_ms=200), Hangup()))
            assert ended.final_action == "hangup"
            run = await attack_beside_witnesses(
                edge,
                attacker_command("stream", edge),
                attacker_stdin=replay_plan(
                    edge, ended.call_sid, posts=1, stream="first", hold_s=1.5
                ),
            )
    assert_unharmed(run, edge)
    assert run.attacker["connects"] == 0, "the replay was admitted again"
    assert len(vapi_call_for(edge, ended.call_sid)) == 1, "a second assistant call"


async def test_a_start_with_another_assistant_is_refused_before_any_assistant_call(
    tmp_path: Path,
) -> None:
    # (e) A holder of a stream token picks its own assistant in customParameters.
    call_sid = "CA" + "e1" * 16
    with trio.fail_after(TEST_DEADLINE_S):
        async with edge_server(tmp_path) as edge:
            run = await attack_beside_witnesses(
                edge,
                attacker_command("stream", edge),
                attacker_stdin=replay_plan(
                    edge, call_sid, posts=1, stream="first", hold_s=1.5,
                    parameters={"assistant": "assistant-of-the-attackers-choice"},
                ),
            )
    assert_unharmed(run, edge)
    assert vapi_call_for(edge, call_sid) == [], "an assistant call for a tampered start"
    [stream] = run.attacker["streams"]
    assert stream["closed_by"] == "server", stream


#: The start of a log line the next test tries to forge.
FORGED = "INFO    voicebridge.server: configuration reloaded by the attacker"


async def test_a_newline_in_a_start_forges_no_log_line(tmp_path: Path) -> None:
    # (f) A `\n` in a start's callSid, then text shaped like a log line of its own.
    call_sid = "CA" + "f1" * 16
    with trio.fail_after(TEST_DEADLINE_S):
        async with edge_server(tmp_path) as edge:
            run = await attack_beside_witnesses(
                edge,
                attacker_command("stream", edge),
                attacker_stdin=replay_plan(
                    edge, call_sid, posts=1, stream="first", hold_s=1.0,
                    start_call_sid=call_sid + "\n" + FORGED,
                ),
            )
    assert_unharmed(run, edge)
    assert [s["closed_by"] for s in run.attacker["streams"]] == ["server"]
    assert not [line for line in run.log if line.startswith(FORGED)], "a forged log line"
    assert any(call_sid in line for line in run.log), "the refusal was not logged"


#: Rejection lines a flood of a few seconds may cause: a few per kind, and the periodic
#: "more suppressed" lines.
MAX_REJECTION_LINES = 20


async def test_a_rejection_flood_does_not_flood_the_log(tmp_path: Path) -> None:
    # (f) Forged webhooks and token-less streams, as fast as one client can make them.
    with trio.fail_after(TEST_DEADLINE_S):
        async with edge_server(tmp_path) as edge:
            run = await attack_beside_witnesses(
                edge, attacker_command("rejections", edge, "--seconds", str(ATTACK_S))
            )
    assert_unharmed(run, edge)
    # One client on a busy 2-core machine makes 40-100 a second.
    assert run.attacker["requests"] >= 60, run.attacker
    assert set(run.attacker["webhooks"]) <= {"403"}, run.attacker
    assert run.attacker["streams_refused"] == run.attacker["streams"], run.attacker
    warnings = [line for line in run.log if line.startswith("WARNING")]
    assert len(warnings) <= MAX_REJECTION_LINES, f"{len(warnings)} warnings"
    # Every rejection names the peer it refused.
    refused_streams = [line for line in warnings if "token-rejected" in line]
    assert refused_streams and all("127.0.0.2" in line for line in refused_streams)


async def test_h2c_prior_knowledge_is_refused(tmp_path: Path) -> None:
    # (g) The HTTP/2 preface and 20,000 HEADERS + RST_STREAM pairs, in clear text.
    with trio.fail_after(TEST_DEADLINE_S):
        async with edge_server(tmp_path) as edge:
            run = await attack_beside_witnesses(
                edge,
                attacker_command(
                    "h2c", edge, "--mode", "preface", "--streams", "20000",
                    "--seconds", str(ATTACK_S),
                ),
            )
    assert_unharmed(run, edge)
    assert not run.attacker["spoke_h2"], run.attacker


async def test_an_upgrade_to_h2c_is_refused(tmp_path: Path) -> None:
    # (g) `Upgrade: h2c` on an HTTP/1.1 request.
    with trio.fail_after(TEST_DEADLINE_S):
        async with edge_server(tmp_path) as edge:
            run = await attack_beside_witnesses(
                edge, attacker_command("h2c", edge, "--mode", "upgrade")
            )
    assert_unharmed(run, edge)
    assert not run.attacker["spoke_h2"], run.attacker


async def test_frames_in_the_upgrades_segment_are_not_lost(tmp_path: Path) -> None:
    # (h) The upgrade request, `connected`, `start` and a frame of media in one write.
    call_sid = "CA" + "a8" * 16
    with trio.fail_after(TEST_DEADLINE_S):
        async with edge_server(tmp_path) as edge:
            run = await attack_beside_witnesses(
                edge,
                attacker_command("stream", edge),
                attacker_stdin=replay_plan(
                    edge, call_sid, posts=1, stream="first", hold_s=2.0, coalesce=True
                ),
            )
    assert_unharmed(run, edge)
    [stream] = run.attacker["streams"]
    assert stream["status"] == 101
    # The start in that segment was read: the assistant was called and spoke.
    calls = vapi_call_for(edge, call_sid)
    assert len(calls) == 1, "the start that came with the upgrade request was lost"
    assert calls[0].caller_audio_messages > 0
    assert stream["media_received"] > 0, stream
