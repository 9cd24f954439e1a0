"""Handovers through Twilio's REST API that meet a call already over, end to end.

A process that does not hold a call moves it by CallSid (``phone-call-control`` reached
it). When the caller has hung up meanwhile, Twilio answers the redirect or hang-up with
HTTP 400 and error 21220 ("invalid call state"): that is the race going the caller's
way, not a failed handover. The simulated REST API answers as Twilio does.

Charter: as ``test_vapi_call_control_e2e``: loopback only, port 0, a ``trio.fail_after``
guard; the webhooks are signed as Vapi signs them.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import pytest
import trio

from tests.control.test_vapi_call_control_e2e import (
    GREETER,
    HANG_UP,
    forward,
    post_server_message,
)
from tests.control.test_webhook_e2e import HUMAN, sections, wait_for
from tests.harness import running_bridge
from voicebridge.config import Secret
from voicebridge.control.routes import vapi_server_override
from voicebridge.observability.logs import record_fields
from voicebridge.sim.caller import Hangup, WaitForAssistant
from voicebridge.sim.twilio_rest import SimTwilioRest


async def test_a_handover_that_meets_a_hang_up_is_already_gone_not_failed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rest = SimTwilioRest()
    forwarded, hung_up = "CA" + "c" * 32, "CA" + "e" * 32
    caplog.set_level(logging.INFO, logger="voicebridge.control.plane")
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(rest.serve)
            twilio = {"rest_base_url": rest.base_url}
            async with running_bridge(
                behaviour=GREETER, twilio=twilio, **sections("bearer")
            ) as holder:
                rest.settings = holder.caller
                other_sections = sections("bearer")
                other_sections["credentials"]["twilio_auth_token"] = Secret(
                    holder.caller.auth_token
                )
                async with running_bridge(twilio=twilio, **other_sections) as other:
                    server = vapi_server_override(other.config)
                    assert server is not None
                    # Both callers hang up while the greeting plays: the calls are over.
                    script = (WaitForAssistant(heard_ms=300), Hangup())
                    async with trio.open_nursery() as calls_nursery:
                        for sid in (forwarded, hung_up):
                            calls_nursery.start_soon(
                                partial(rest.place_inbound, script, call_sid=sid)
                            )
                    vapi_calls = {c.call_sid: c for c in holder.vapi.calls.values()}
                    answers: list[tuple[int, Any]] = [
                        await post_server_message(
                            vapi_calls[forwarded], forward(HUMAN), server=server
                        ),
                        await post_server_message(vapi_calls[hung_up], HANG_UP, server=server),
                    ]

                    def gone() -> list[str]:
                        return [
                            r.getMessage()
                            for r in caplog.records
                            if "already gone" in r.getMessage()
                        ]

                    await wait_for(lambda: len(gone()) == 2)
            nursery.cancel_scope.cancel(reason="the simulated REST API is no longer needed")
    assert answers == [(200, {}), (200, {})]
    assert [rest.reports[sid].ended_by for sid in (forwarded, hung_up)] == ["caller", "caller"]
    # Twilio refused both (21220), so neither reached the call: no update, no transfer.
    assert rest.updates == [] and rest.transfers == []
    # (The simulated Vapi's status and report webhooks about the two calls log too.)
    events = sorted(
        (event, r.levelno)
        for r in caplog.records
        if (event := str(record_fields(r).get("EVENT", "")))
        not in ("vapi-status", "vapi-call-report")
    )
    assert events == [
        ("", logging.INFO),
        ("", logging.INFO),
        ("call-handover", logging.INFO),
        ("call-handover", logging.INFO),
    ], "one line for each request and one for each call already gone; no handover-failed"
    assert sorted(gone()) == [
        f"call {forwarded} was already gone before its transferred",
        f"call {hung_up} was already gone before its ended-by-control",
    ]
