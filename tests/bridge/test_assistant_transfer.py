"""Transfers the assistant starts itself (Vapi's transferCall tool), on the autojump clock.

With a destination configured on the tool, Vapi sends no webhook: the socket says
``status-update`` forwarding (with the destination) and ``transfer-update``. On this
transport Vapi has no phone line, so the bridge moves the caller: the goodbye plays,
then Twilio gets ``<Dial>``, if ``[transfer]`` allows the number.
"""

from __future__ import annotations

import logging

import pytest
import trio
import trio.testing
from trio import Nursery

from tests.bridge.peers import FakeTwilio, MemoryConnector, stop_frame
from tests.bridge.test_call import run_call, settings_with, start_vapi
from voicebridge.bridge.outcome import Outcome
from voicebridge.config import Config
from voicebridge.observability.logs import record_fields
from voicebridge.web import after_stream_twiml

ALLOWED = "+15550100200"
SETTINGS_WITH_TRANSFER = settings_with(transfer={"allowed": (ALLOWED,)})


def speech(status: str) -> dict[str, object]:
    return {"type": "speech-update", "status": status, "role": "assistant", "turn": 1}


def number(value: str) -> dict[str, str]:
    return {"type": "number", "number": value}


async def test_the_assistants_own_transfer_plays_the_goodbye_then_dials(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def scenario(twilio: FakeTwilio, connector: MemoryConnector, nursery: Nursery) -> None:
        nursery.start_soon(twilio.stream_media)
        vapi = await start_vapi(connector, nursery)
        await vapi.send_json(speech("started"))
        await vapi.speak(1500, paced=False)  # "Let me put you through."
        await vapi.send_json(
            {"type": "status-update", "status": "forwarding", "destination": number(ALLOWED)}
        )
        await vapi.send_json({"type": "transfer-update", "destination": number(ALLOWED)})
        await vapi.send_json(speech("stopped"))

    record, twilio, _ = await run_call(scenario, settings=SETTINGS_WITH_TRANSFER)
    assert record.outcome is Outcome.TRANSFERRED
    assert record.transfer_to == ALLOWED
    assert twilio.heard_bytes == 1500 * 8, "the goodbye played whole first"
    action = after_stream_twiml(Config(), record.call_sid, record)
    assert f"<Dial>{ALLOWED}</Dial>" in action


async def test_a_transfer_outside_the_allow_list_is_refused_and_the_call_goes_on(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario(twilio: FakeTwilio, connector: MemoryConnector, nursery: Nursery) -> None:
        nursery.start_soon(twilio.stream_media)
        vapi = await start_vapi(connector, nursery)
        await vapi.send_json({"type": "transfer-update", "destination": number("+15550199999")})
        await vapi.send_json(speech("started"))
        await vapi.speak(500, paced=False)
        await vapi.send_json(speech("stopped"))
        await trio.sleep(2.0)
        await twilio.socket.send(stop_frame(twilio.next_seq()))

    with caplog.at_level(logging.WARNING, logger="voicebridge"):
        record, twilio, _ = await run_call(scenario, settings=SETTINGS_WITH_TRANSFER)
    assert record.outcome is Outcome.CALLER_HUNG_UP
    assert twilio.heard_bytes == 500 * 8
    refused = [record_fields(r) for r in caplog.records if record_fields(r).get("EVENT")]
    assert [f["EVENT"] for f in refused] == ["transfer-refused"]
    assert refused[0]["DESTINATION"] == "+15550199999"


async def test_a_transfer_without_a_destination_goes_to_the_default(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def scenario(twilio: FakeTwilio, connector: MemoryConnector, nursery: Nursery) -> None:
        nursery.start_soon(twilio.stream_media)
        vapi = await start_vapi(connector, nursery)
        await vapi.send_json({"type": "status-update", "status": "forwarding"})

    settings = settings_with(transfer={"default_destination": "+15550100300"})
    record, _, _ = await run_call(scenario, settings=settings)
    assert record.outcome is Outcome.TRANSFERRED
    assert record.transfer_to == "+15550100300"
