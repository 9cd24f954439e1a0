"""Key presses reach the assistant as entries (Vapi's keypadInputPlan), on the autojump clock.

A 10-digit account number is one message to the assistant, not ten model turns: the
digits are gathered and sent when the caller presses a delimiter or stops typing.
"""

from __future__ import annotations

import json

import trio
import trio.testing
from trio import Nursery

from tests.bridge.peers import STREAM_SID, FakeTwilio, FakeVapi, MemoryConnector, stop_frame
from tests.bridge.test_call import SETTINGS, run_call, settings_with, start_vapi
from voicebridge.config import KeypadConfig

KEYPAD = KeypadConfig()  # the defaults: 2 s after the last key, or '#'
WITH_KEYPAD = settings_with(keypad={"batch": True})


def dtmf_frame(seq: int, digit: str) -> str:
    return json.dumps(
        {
            "event": "dtmf",
            "streamSid": STREAM_SID,
            "sequenceNumber": str(seq),
            "dtmf": {"track": "inbound_track", "digit": digit},
        }
    )


async def press(twilio: FakeTwilio, keys: str, *, every_s: float = 0.3) -> None:
    for key in keys:
        await twilio.socket.send(dtmf_frame(twilio.next_seq(), key))
        await trio.sleep(every_s)


def entries(vapi: FakeVapi) -> list[tuple[float, str]]:
    return [
        (at, message["message"]["content"])
        for at, message in vapi.text
        if message["type"] == "add-message"
    ]


async def test_an_account_number_is_one_entry_sent_when_the_caller_stops_typing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    vapis: list[FakeVapi] = []
    seen: dict[str, float] = {}

    async def scenario(twilio: FakeTwilio, connector: MemoryConnector, nursery: Nursery) -> None:
        nursery.start_soon(twilio.stream_media)
        vapis.append(await start_vapi(connector, nursery))
        await press(twilio, "4012888818", every_s=0.3)
        seen["last_key"] = trio.current_time() - 0.3
        await trio.sleep(5)
        await twilio.socket.send(stop_frame(twilio.next_seq()))

    await run_call(scenario, settings=WITH_KEYPAD)
    [(at, content)] = entries(vapis[0])
    assert content == "(The caller entered 4012888818 on the keypad.)"
    assert at == seen["last_key"] + KEYPAD.timeout_s


async def test_a_delimiter_sends_the_entry_at_once_and_alone_is_sent_as_itself(
    autojump_clock: trio.testing.MockClock,
) -> None:
    vapis: list[FakeVapi] = []
    seen: dict[str, float] = {}

    async def scenario(twilio: FakeTwilio, connector: MemoryConnector, nursery: Nursery) -> None:
        nursery.start_soon(twilio.stream_media)
        vapis.append(await start_vapi(connector, nursery))
        await press(twilio, "1234", every_s=0.3)
        await twilio.socket.send(dtmf_frame(twilio.next_seq(), "#"))
        seen["hash"] = trio.current_time()
        await trio.sleep(3)
        await press(twilio, "#")
        await trio.sleep(3)
        await twilio.socket.send(stop_frame(twilio.next_seq()))

    await run_call(scenario, settings=WITH_KEYPAD)
    sent = entries(vapis[0])
    assert [content for _, content in sent] == [
        "(The caller entered 1234 on the keypad.)",
        "(The caller entered # on the keypad.)",
    ]
    assert sent[0][0] == seen["hash"]


async def test_without_batching_every_key_is_its_own_message(
    autojump_clock: trio.testing.MockClock,
) -> None:
    vapis: list[FakeVapi] = []

    async def scenario(twilio: FakeTwilio, connector: MemoryConnector, nursery: Nursery) -> None:
        nursery.start_soon(twilio.stream_media)
        vapis.append(await start_vapi(connector, nursery))
        await press(twilio, "12")
        await trio.sleep(1)
        await twilio.socket.send(stop_frame(twilio.next_seq()))

    await run_call(scenario, settings=SETTINGS)  # keypad=None: Vapi's keypad plan off
    assert [content for _, content in entries(vapis[0])] == [
        "(The caller pressed 1.)",
        "(The caller pressed 2.)",
    ]


async def test_a_timeout_of_zero_waits_for_the_delimiter(
    autojump_clock: trio.testing.MockClock,
) -> None:
    vapis: list[FakeVapi] = []

    async def scenario(twilio: FakeTwilio, connector: MemoryConnector, nursery: Nursery) -> None:
        nursery.start_soon(twilio.stream_media)
        vapis.append(await start_vapi(connector, nursery))
        await press(twilio, "98", every_s=4.0)
        assert entries(vapis[0]) == []  # 8 s after the first key: still gathering
        await press(twilio, "*")
        await twilio.socket.send(stop_frame(twilio.next_seq()))

    keypad = {"batch": True, "timeout_s": 0, "delimiters": ("*",)}
    await run_call(scenario, settings=settings_with(keypad=keypad))
    assert [content for _, content in entries(vapis[0])] == [
        "(The caller entered 98 on the keypad.)"
    ]
