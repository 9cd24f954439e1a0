"""The real server and the simulated Vapi on 127.0.0.1, wired together: demo and tests.

``loopback_bridge()`` starts the simulated Vapi, binds a free port, serves the real
app there with a complete in-code configuration, and yields what a simulated
Twilio caller needs to call it. On exit it stops the server gracefully and waits
(bounded) for the simulated Vapi's calls to end, so no call is cut short. With a
``LatencyModel`` the peers reach the server across modelled networks (``sim.latency``).
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial

import attrs
import trio

from voicebridge.config import (
    Config,
    Secret,
    Secrets,
    ServerConfig,
    TwilioConfig,
    VapiConfig,
)
from voicebridge.server import Listening, bind_listener, serve
from voicebridge.sim.caller import SimTwilioSettings
from voicebridge.sim.latency import LatencyModel, serve_delay_proxy
from voicebridge.sim.vapi import BehaviourChooser, SimVapi, SimVapiBehaviour

#: The simulated Twilio account every loopback call comes from.
LOOPBACK_ACCOUNT_SID = "AC" + "d" * 32
#: How long the exit waits for the simulated Vapi's calls to end.
WIND_DOWN_S = 10.0


def loopback_config(*, port: int, vapi_base_url: str, auth_token: str, api_key: str) -> Config:
    """A complete configuration for a server on ``127.0.0.1:port`` and the simulated Vapi."""
    return Config(
        server=ServerConfig(
            listen=f"127.0.0.1:{port}",
            # A free port: several loopback servers may run at once.
            ops_listen="127.0.0.1:0",
            public_url=f"http://127.0.0.1:{port}",
            max_concurrent_calls=1000,
            # The simulated Vapi and the tests run in this loop: their work is not the
            # bridge's overload, and must not shed its calls.
            shed_loop_lag_ms=0,
        ),
        # Plain ws:// on a loopback port: Twilio would refuse it, the simulation does not.
        twilio=TwilioConfig(account_sid=LOOPBACK_ACCOUNT_SID, allow_insecure_stream_url=True),
        vapi=VapiConfig(base_url=vapi_base_url, assistant_id="sim-assistant"),
        credentials=Secrets(
            twilio_auth_token=Secret(auth_token),
            vapi_api_key=Secret(api_key),
            stream_token_secret=Secret(secrets.token_hex(32)),
        ),
    )


@attrs.frozen
class LoopbackBridge:
    config: Config
    vapi: SimVapi
    listening: Listening
    #: What the simulated Twilio caller needs to place calls to this server.
    caller: SimTwilioSettings

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listening.port}"

    @property
    def ops_url(self) -> str:
        """The ops listener: ``/healthz``, ``/readyz``, ``/metrics``."""
        [address] = self.listening.ops_addresses
        assert not isinstance(address, str), "the loopback ops listener is TCP"
        host, port = address
        return f"http://{host}:{port}"


@asynccontextmanager
async def loopback_bridge(
    *,
    behaviour: SimVapiBehaviour | None = None,
    behaviour_for: BehaviourChooser | None = None,
    customize: Callable[[Config], Config] | None = None,
    latency: LatencyModel | None = None,
) -> AsyncIterator[LoopbackBridge]:
    """Serve the real app on 127.0.0.1 (a free port) against a fresh simulated Vapi.

    ``customize`` adjusts the configuration before the server starts (it must keep
    the listen address and the Vapi base URL it was given). With ``latency`` the
    caller and the simulated Vapi reach the server through delay relays, and the
    peers take the model's own times (``behaviour`` is adjusted to it).
    """
    if latency is not None:
        behaviour = attrs.evolve(
            behaviour or SimVapiBehaviour(),
            create_delay_s=latency.vapi_create_ms / 1000,
            reaction_delay_s=latency.vapi_reaction_ms / 1000,
            think_delay_s=latency.vapi_reply_ms / 1000,
        )
    auth_token = secrets.token_hex(16)
    vapi = SimVapi(api_key=secrets.token_hex(16), behaviour=behaviour, behaviour_for=behaviour_for)
    listener = bind_listener("127.0.0.1:0")
    port = int(listener.getsockname()[1])
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(vapi.serve)
        vapi_base_url = vapi.base_url
        bridge_url = f"http://127.0.0.1:{port}"
        if latency is not None:
            vapi_relay = await nursery.start(
                partial(
                    serve_delay_proxy,
                    "127.0.0.1",
                    vapi.port,
                    one_way_ms=latency.vapi_network_ms,
                    handshake_round_trips=latency.handshake_round_trips,
                )
            )
            vapi.advertised_authority = f"127.0.0.1:{vapi_relay}"
            vapi_base_url = f"http://127.0.0.1:{vapi_relay}"
            twilio_relay = await nursery.start(
                partial(
                    serve_delay_proxy,
                    "127.0.0.1",
                    port,
                    one_way_ms=latency.twilio_network_ms,
                    handshake_round_trips=latency.handshake_round_trips,
                )
            )
            bridge_url = f"http://127.0.0.1:{twilio_relay}"
        config = loopback_config(
            port=port, vapi_base_url=vapi_base_url, auth_token=auth_token, api_key=vapi.api_key
        )
        if customize is not None:
            config = customize(config)
        listening: Listening = await nursery.start(
            partial(serve, config, listeners=[listener], stop=stop)
        )
        caller = SimTwilioSettings(
            bridge_url=bridge_url,
            public_url=config.server.public_url,
            account_sid=LOOPBACK_ACCOUNT_SID,
            auth_token=auth_token,
            stream_setup_s=latency.twilio_stream_setup_ms / 1000 if latency is not None else 0.0,
        )
        yield LoopbackBridge(config, vapi, listening, caller)
        stop.set()
        with trio.move_on_after(WIND_DOWN_S):
            for record in list(vapi.calls.values()):
                if record.connected_at is not None:
                    await record.wait_ended()
        nursery.cancel_scope.cancel(reason="loopback bridge finished")
