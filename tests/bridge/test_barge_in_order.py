"""What belongs to a cut turn is decided by the order of the assistant's messages.

On trio's autojump clock. A bridge that falls behind (its loop blocked by other
work) reads the cut turn's in-flight tail late; that delay is the bridge's own, not
a pause in the assistant's speech, and must never make the tail play after the
``clear``. The starvation is modelled exactly: the clock jumps while the bridge
does not run, between the barge-in and the tail.
"""

from __future__ import annotations

import base64

import pytest
import trio
import trio.testing
from trio import Nursery

from tests.bridge.peers import FakeTwilio, MemoryConnector, stop_frame
from tests.bridge.test_call import run_call, start_vapi
from voicebridge.bridge.outcome import Outcome

STARTED = {"type": "speech-update", "status": "started", "role": "assistant"}
#: Longer than ``barge_in_resume_gap_ms`` (250 ms in the tests' settings).
STARVED_S = 0.6
TAIL = b"\x11" * 8 * 120  # 120 ms of the cut turn, in flight when the signal came
NEXT = b"\x22" * 8 * 400  # the next turn's first 400 ms


async def test_a_starved_bridge_never_plays_the_cut_turns_tail(
    autojump_clock: trio.testing.MockClock,
) -> None:
    seen: dict[str, float] = {}

    async def scenario(twilio: FakeTwilio, connector: MemoryConnector, nursery: Nursery) -> None:
        nursery.start_soon(twilio.stream_media)
        vapi = await start_vapi(connector, nursery)
        await vapi.send_json(STARTED | {"turn": 0})
        await vapi.speak(2000, paced=False)
        await trio.sleep(0.5)
        await vapi.send_json({"type": "user-interrupted"})
        await trio.sleep(0.01)  # the bridge has sent the clear
        assert twilio.events("clear")
        # The bridge does not run for STARVED_S: the tail it then reads arrived long ago.
        autojump_clock.jump(STARVED_S)
        await vapi.socket.send(TAIL)
        await trio.sleep(0.5)
        seen["next_turn_at"] = trio.current_time()
        await vapi.send_json(STARTED | {"turn": 1})
        await vapi.socket.send(NEXT)
        await trio.sleep(1.0)
        await twilio.socket.send(stop_frame(twilio.next_seq()))

    record, twilio, _ = await run_call(scenario)
    [clear] = twilio.events("clear")
    after_clear = [r for r in twilio.events("media") if r.at >= clear.at]
    payloads = b"".join(base64.b64decode(r.message["media"]["payload"]) for r in after_clear)
    assert b"\x11" not in payloads, "the cut turn's tail reached the caller"
    assert payloads.count(b"\x22") == len(NEXT), "the next turn plays whole"
    assert all(r.at >= seen["next_turn_at"] for r in after_clear)
    assert record.outcome is Outcome.CALLER_HUNG_UP


async def test_a_bridge_that_blocks_its_loop_after_the_clear_never_plays_the_tail(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The tail is in the socket before the bridge reads the signal (as when it falls
    # behind); right after its clear, the bridge's own task holds the loop for STARVED_S
    # (the clock moves, nothing else runs), and only then reads the tail.
    starved: list[float] = []
    seen: dict[str, float] = {}

    async def scenario(twilio: FakeTwilio, connector: MemoryConnector, nursery: Nursery) -> None:
        bridge_side = twilio.socket.peer
        assert bridge_side is not None
        send = bridge_side.send

        async def send_then_hold_the_loop(message: str | bytes) -> None:
            await send(message)
            if isinstance(message, str) and '"clear"' in message and not starved:
                starved.append(trio.current_time())
                autojump_clock.jump(STARVED_S)  # synchronous: the loop is held

        bridge_side.send = send_then_hold_the_loop  # type: ignore[method-assign]
        nursery.start_soon(twilio.stream_media)
        vapi = await start_vapi(connector, nursery)
        await vapi.send_json(STARTED | {"turn": 0})
        await vapi.speak(2000, paced=False)
        await trio.sleep(0.5)
        await vapi.send_json({"type": "user-interrupted"})
        await vapi.socket.send(TAIL)
        await trio.sleep(STARVED_S + 0.5)
        seen["next_turn_at"] = trio.current_time()
        await vapi.send_json(STARTED | {"turn": 1})
        await vapi.socket.send(NEXT)
        await trio.sleep(1.0)
        await twilio.socket.send(stop_frame(twilio.next_seq()))

    record, twilio, _ = await run_call(scenario)
    [clear] = twilio.events("clear")
    # Twilio's side read the clear once the loop was free again.
    assert starved == [pytest.approx(clear.at - STARVED_S)], "the loop was held after the clear"
    after_clear = [r for r in twilio.events("media") if r.at >= clear.at]
    payloads = b"".join(base64.b64decode(r.message["media"]["payload"]) for r in after_clear)
    assert b"\x11" not in payloads, "the cut turn's tail reached the caller"
    assert payloads.count(b"\x22") == len(NEXT), "the next turn plays whole"
    assert all(r.at >= seen["next_turn_at"] for r in after_clear)
    assert record.outcome is Outcome.CALLER_HUNG_UP
