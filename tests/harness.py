"""The real server on loopback with the simulated Vapi, for end-to-end tests.

Charter for tests using it: loopback only, port 0, a ``trio.fail_after`` guard on
every test, real sockets and real time (so scripts are kept short: a few seconds).
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import attrs
import trio

from voicebridge.bridge.outcome import CallRecord
from voicebridge.config import Config
from voicebridge.demo import DEMO_ACCOUNT_SID, demo_config
from voicebridge.server import Listening, bind_listener, serve
from voicebridge.sim.caller import SimTwilioSettings
from voicebridge.sim.vapi import BehaviourChooser, SimVapi, SimVapiBehaviour

#: An assistant with short turns: greets (1.25 s), answers the caller's first turn
#: with a goodbye (1.9 s) and ends the call.
SHORT_ASSISTANT = SimVapiBehaviour(
    greeting_clip="caller_1",
    reply_clips=("reply_2",),
    goodbye_clip="caller_3",
    end_after_replies=0,
    think_delay_s=0.2,
    customer_audio_timeout_s=None,
)


@attrs.frozen
class Bridge:
    config: Config
    vapi: SimVapi
    listening: Listening
    caller: SimTwilioSettings

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listening.port}"

    def record(self, call_sid: str) -> CallRecord:
        record = self.listening.registry.record_for(call_sid)
        assert record is not None, f"the bridge has no record of {call_sid}"
        return record


@asynccontextmanager
async def running_bridge(
    *,
    behaviour: SimVapiBehaviour = SHORT_ASSISTANT,
    behaviour_for: BehaviourChooser | None = None,
    public_url: str | None = None,
    **sections: Any,
) -> AsyncIterator[Bridge]:
    """Serve the real app on 127.0.0.1:0 against a fresh simulated Vapi.

    ``sections`` replace whole config sections or evolve them:
    ``server={"max_concurrent_calls": 1}`` evolves ``config.server``.
    """
    auth_token = secrets.token_hex(16)
    vapi = SimVapi(api_key=secrets.token_hex(16), behaviour=behaviour, behaviour_for=behaviour_for)
    listener = bind_listener("127.0.0.1:0")
    port = int(listener.getsockname()[1])
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(vapi.serve)
        config = demo_config(
            port=port, vapi_base_url=vapi.base_url, auth_token=auth_token, api_key=vapi.api_key
        )
        if public_url is not None:
            config = config.evolve(server=attrs.evolve(config.server, public_url=public_url))
        for name, changes in sections.items():
            current = getattr(config, name)
            value = attrs.evolve(current, **changes) if isinstance(changes, dict) else changes
            config = config.evolve(**{name: value})
        listening: Listening = await nursery.start(
            partial(serve, config, listeners=[listener], stop=stop)
        )
        caller = SimTwilioSettings(
            bridge_url=f"http://127.0.0.1:{port}",
            public_url=config.server.public_url,
            account_sid=DEMO_ACCOUNT_SID,
            auth_token=auth_token,
        )
        yield Bridge(config, vapi, listening, caller)
        stop.set()
        with trio.move_on_after(10):
            await vapi_idle(vapi)
        nursery.cancel_scope.cancel(reason="test finished")


async def vapi_idle(vapi: SimVapi) -> None:
    """Wait until every connected simulated Vapi call has ended (nothing cut short)."""
    for record in list(vapi.calls.values()):
        if record.connected_at is not None:
            await record.wait_ended()
