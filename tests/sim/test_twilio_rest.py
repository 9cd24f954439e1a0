"""The simulated Twilio REST API drives live simulated calls (loopback, short clips)."""

from __future__ import annotations

from functools import partial

import httpx
import trio

from tests.harness import running_bridge
from voicebridge.sim.caller import Silence, WaitForAssistantDone
from voicebridge.sim.twilio_rest import SimTwilioRest
from voicebridge.twilio.rest import TwilioRest

#: How often the test looks for the call to be connected (the peers offer no event).
POLL_S = 0.05


async def test_status_completed_hangs_up_a_live_call() -> None:
    rest = SimTwilioRest()
    sid = "CA" + "7" * 32
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery, httpx.AsyncClient() as http:
            await nursery.start(rest.serve)
            async with running_bridge() as bridge:
                rest.settings = bridge.caller
                client = TwilioRest(
                    http,
                    account_sid=bridge.caller.account_sid,
                    auth_token=bridge.caller.auth_token,
                    base_url=rest.base_url,
                    deadline_s=2.0,
                )
                async with trio.open_nursery() as call_nursery:
                    call_nursery.start_soon(
                        partial(
                            rest.place_inbound,
                            (WaitForAssistantDone(quiet_s=0.4), Silence(10)),
                            call_sid=sid,
                        )
                    )
                    while not any(  # noqa: ASYNC110  # the peers offer no event to wait on
                        c.call_sid == sid and c.connected_at for c in bridge.vapi.calls.values()
                    ):
                        await trio.sleep(POLL_S)
                    assert await client.hang_up(sid) is True
                report = rest.reports[sid]
                assert await client.hang_up(sid) is False, "gone now: 20404, not an error"
            nursery.cancel_scope.cancel()
    assert (report.rest_update, report.final_action, report.action_twiml) == (
        "completed",
        "hangup",
        "",
    )
    assert [u.kind for u in rest.updates] == ["status"]
    assert rest.transfers == []
