"""The simulated Twilio REST API drives live simulated calls (loopback, short clips)."""

from __future__ import annotations

from functools import partial
from typing import Any

import httpx
import trio

from tests.harness import running_bridge
from voicebridge.sim.caller import Hangup, Silence, WaitForAssistantDone
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


async def raw_update(http: httpx.AsyncClient, rest: SimTwilioRest, sid: str, **form: str) -> Any:
    """One ``Calls/{sid}.json`` update as Twilio's API answers it: (status, error code)."""
    assert rest.settings is not None
    account, token = rest.settings.account_sid, rest.settings.auth_token
    response = await http.post(
        f"{rest.base_url}/2010-04-01/Accounts/{account}/Calls/{sid}.json",
        data=form,
        auth=(account, token),
    )
    return response.status_code, response.json().get("code")


async def test_a_redirected_call_stays_in_progress_and_a_completed_one_answers_21220() -> None:
    """Twilio's states, as the bridge meets them: a call redirected to a <Dial> is still
    in progress (it takes another redirect, then a hang-up); a completed call answers
    HTTP 400 with error 21220, an unknown SID 404 with 20404; the client reads both
    as "already gone"."""
    rest = SimTwilioRest()
    sid = "CA" + "8" * 32
    dial = "<Response><Dial>{}</Dial></Response>"
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
                        partial(rest.place_inbound, (Silence(10),), call_sid=sid)
                    )
                    while not any(  # noqa: ASYNC110  # the peers offer no event to wait on
                        c.call_sid == sid and c.connected_at for c in bridge.vapi.calls.values()
                    ):
                        await trio.sleep(POLL_S)
                    assert await client.redirect(sid, dial.format("+15550100077")) is True
                report = rest.reports[sid]
                # The stream is over; the caller talks to +15550100077 now.
                assert await client.redirect(sid, dial.format("+15550100078")) is True
                assert await client.hang_up(sid) is True
                completed = await raw_update(http, rest, sid, Twiml="<Response/>")
                assert await client.redirect(sid, dial.format("+15550100079")) is False
                assert await client.hang_up(sid) is False
                unknown = await raw_update(http, rest, "CA" + "9" * 32, Status="completed")
            nursery.cancel_scope.cancel()
    assert (report.rest_update, report.final_dial) == ("redirect", "+15550100077")
    assert completed == (400, 21220)
    assert unknown == (404, 20404)
    assert rest.transfers == [(sid, "+15550100077"), (sid, "+15550100078")]
    assert [u.kind for u in rest.updates] == ["twiml", "twiml", "status"]


async def test_a_call_that_ended_without_a_dial_is_completed() -> None:
    rest = SimTwilioRest()
    sid = "CA" + "a" * 32
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery, httpx.AsyncClient() as http:
            await nursery.start(rest.serve)
            async with running_bridge() as bridge:
                rest.settings = bridge.caller
                report = await rest.place_inbound(
                    (WaitForAssistantDone(quiet_s=0.4), Hangup()), call_sid=sid
                )
                answer = await raw_update(http, rest, sid, Twiml="<Response><Hangup/></Response>")
            nursery.cancel_scope.cancel()
    assert report.ended_by == "caller"
    assert answer == (400, 21220)
    assert rest.updates == []
