"""How Vapi's endings reach the caller, on trio's autojump clock.

A ``status-update`` ended is judged by its ``endedReason`` (``vapi.endings``): a normal
end hangs up, a failure gives the fallback, the account's concurrency limit the
overflow message, the max duration its own goodbye. What the assistant still sends
after ending the call is played, and how its socket then closes changes nothing.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing
from trio import Nursery

from tests.bridge.peers import FakeTwilio, MemoryConnector
from tests.bridge.test_call import run_call, start_vapi
from voicebridge.bridge.call import CallSettings
from voicebridge.bridge.outcome import CallRecord, Outcome
from voicebridge.config import Config, EndingsConfig
from voicebridge.vapi.client import VapiError
from voicebridge.web import after_stream_twiml

CONFIG = Config()


def ended(reason: str) -> dict[str, str]:
    return {"type": "status-update", "status": "ended", "endedReason": reason}


def heard(config: Config, record: CallRecord) -> str:
    """The TwiML Twilio gets once the stream is over: what the caller hears next."""
    return after_stream_twiml(config, record.call_sid, record)


@pytest.mark.parametrize(
    ("reason", "outcome", "words"),
    [
        ("assistant-ended-call", Outcome.ASSISTANT_ENDED, "<Hangup"),
        ("customer-ended-call", Outcome.ASSISTANT_ENDED, "<Hangup"),
        ("pipeline-error-openai-llm-failed", Outcome.ASSISTANT_LEG_FAILED,
         "technical difficulties"),
        ("call.in-progress.error-vapifault-worker-died", Outcome.ASSISTANT_LEG_FAILED,
         "technical difficulties"),
        ("something-vapi-adds-next-year", Outcome.ASSISTANT_LEG_FAILED, "technical difficulties"),
        ("call.start.error-subscription-concurrency-limit-reached", Outcome.ASSISTANT_OVER_LIMIT,
         "all our lines are busy"),
        ("exceeded-max-duration", Outcome.ASSISTANT_ENDED, "time limit for this call"),
    ],
)
async def test_each_ending_gives_the_caller_what_it_means(
    autojump_clock: trio.testing.MockClock, reason: str, outcome: Outcome, words: str
) -> None:
    async def scenario(twilio: FakeTwilio, connector: MemoryConnector, nursery: Nursery) -> None:
        nursery.start_soon(twilio.stream_media)
        vapi = await start_vapi(connector, nursery)
        await vapi.speak(1000, paced=False)
        await vapi.send_json(ended(reason))
        await vapi.socket.aclose(1000)

    record, twilio, _ = await run_call(scenario)
    assert record.outcome is outcome
    assert record.ended_reason == reason
    assert reason in record.detail
    assert twilio.heard_bytes == 1000 * 8, "what was queued still plays"
    assert words in heard(CONFIG, record)


async def test_audio_after_ended_is_played_and_a_close_without_status_is_normal(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def scenario(twilio: FakeTwilio, connector: MemoryConnector, nursery: Nursery) -> None:
        nursery.start_soon(twilio.stream_media)
        vapi = await start_vapi(connector, nursery)
        await vapi.speak(600, paced=False)
        await vapi.send_json(ended("assistant-said-end-call-phrase"))
        await vapi.speak(400, paced=False)  # the rest of the goodbye, after the message
        await vapi.socket.aclose(1005)

    record, twilio, _ = await run_call(scenario)
    assert record.outcome is Outcome.ASSISTANT_ENDED
    assert twilio.heard_bytes == 1000 * 8


async def test_a_close_without_status_and_without_ended_is_a_failure(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def scenario(twilio: FakeTwilio, connector: MemoryConnector, nursery: Nursery) -> None:
        nursery.start_soon(twilio.stream_media)
        vapi = await start_vapi(connector, nursery)
        await vapi.speak(400, paced=False)
        await vapi.socket.aclose(1006)

    record, _, _ = await run_call(scenario)
    assert record.outcome is Outcome.ASSISTANT_LEG_FAILED
    assert "technical difficulties" in heard(CONFIG, record)


async def test_a_create_refused_for_the_concurrency_limit_plays_the_overflow(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def scenario(twilio: FakeTwilio, connector: MemoryConnector, nursery: Nursery) -> None:
        nursery.start_soon(twilio.stream_media)

    refused = VapiError("limit", "Vapi create-call failed (limit): HTTP 400: Over Concurrency")
    record, _, _ = await run_call(scenario, connector=MemoryConnector(fail=refused))
    assert record.outcome is Outcome.ASSISTANT_OVER_LIMIT
    assert "max_concurrent_calls" in record.detail  # what the operator can change
    assert "all our lines are busy" in heard(CONFIG, record)


async def test_operators_can_move_a_reason_to_the_normal_ends(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = Config().evolve(endings=EndingsConfig(normal=("worker-*",)))
    settings = CallSettings.from_config(config)

    async def scenario(twilio: FakeTwilio, connector: MemoryConnector, nursery: Nursery) -> None:
        nursery.start_soon(twilio.stream_media)
        vapi = await start_vapi(connector, nursery)
        await vapi.send_json(ended("worker-shutdown"))
        await vapi.socket.aclose(1000)

    record, _, _ = await run_call(scenario, settings=settings)
    assert record.outcome is Outcome.ASSISTANT_ENDED
