"""The real server on loopback with the simulated Vapi, for end-to-end tests.

Charter for tests using it: loopback only, port 0, a ``trio.fail_after`` guard on
every test, real sockets and real time (so scripts are kept short: a few seconds).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs

from voicebridge.bridge.outcome import CallRecord
from voicebridge.config import Config
from voicebridge.loopback import LoopbackBridge, loopback_bridge
from voicebridge.sim.vapi import BehaviourChooser, SimVapiBehaviour

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


class Bridge(LoopbackBridge):
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
    """The real server on 127.0.0.1:0 against a fresh simulated Vapi (``loopback_bridge``).

    ``sections`` replace whole config sections or evolve them:
    ``server={"max_concurrent_calls": 1}`` evolves ``config.server``.
    """

    def customize(config: Config) -> Config:
        if public_url is not None:
            config = config.evolve(server=attrs.evolve(config.server, public_url=public_url))
        for name, changes in sections.items():
            current = getattr(config, name)
            value = attrs.evolve(current, **changes) if isinstance(changes, dict) else changes
            config = config.evolve(**{name: value})
        return config

    async with loopback_bridge(
        behaviour=behaviour, behaviour_for=behaviour_for, customize=customize
    ) as bridge:
        yield Bridge(bridge.config, bridge.vapi, bridge.listening, bridge.caller)
