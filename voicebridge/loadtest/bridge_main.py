"""The bridge under test, as its own process: ``python -m voicebridge.loadtest.bridge_main``.

Started by ``loadtest.process.BridgeProcess``, which passes its settings in
``VOICEBRIDGE_LOADTEST_*`` variables: the listening socket's fd and port, the
simulated assistant's URL and key, the Twilio auth token, and the CPU to pin to.
``VOICEBRIDGE_LOADTEST_SHED_LOOP_LAG_MS``, ``…_DRAIN_DEADLINE_S`` and ``…_MAX_CALLS``
(``max_concurrent_calls``) override those keys of ``[server]``;
``…_EDGE_BARGE_IN=1`` turns on ``[bridge] edge_barge_in``.
It serves the real app with the loopback configuration (warning-level logs, so that
the figures are the bridge's and not the terminal's) and the garbage-collector tuning
of ``voicebridge serve`` until SIGTERM, after printing ``ready``.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from functools import partial

import attrs
import trio

from voicebridge.config import RouteHookConfig, Secret, ServerConfig
from voicebridge.gctuning import tune_gc_for_latency
from voicebridge.loadtest.process import ENV_PREFIX, pin_to
from voicebridge.loopback import loopback_config
from voicebridge.observability.logs import configure_logging
from voicebridge.server import serve

#: Far above any load test: admission must never be what limits one (unless asked).
MAX_CALLS = 100_000
#: The same for the front door's connection caps: every simulated caller connects
#: from 127.0.0.1, and a load test of a few thousand calls must fit.
MAX_CONNECTIONS = 8192


def main() -> int:
    env = os.environ
    cpu = env.get(f"{ENV_PREFIX}CPU", "")
    if cpu:
        pin_to({int(cpu)})
    configure_logging(logging.WARNING)
    config = loopback_config(
        port=int(env[f"{ENV_PREFIX}PORT"]),
        vapi_base_url=env[f"{ENV_PREFIX}ASSISTANT_URL"],
        auth_token=env[f"{ENV_PREFIX}AUTH_TOKEN"],
        api_key=env[f"{ENV_PREFIX}ASSISTANT_KEY"],
    )
    shed = env.get(f"{ENV_PREFIX}SHED_LOOP_LAG_MS", "")
    drain = env.get(f"{ENV_PREFIX}DRAIN_DEADLINE_S", "")
    max_calls = env.get(f"{ENV_PREFIX}MAX_CALLS", "")
    config = config.evolve(
        server=attrs.evolve(
            config.server, max_concurrent_calls=int(max_calls) if max_calls else MAX_CALLS,
            log_level="warning",
            # As ``voicebridge serve`` sheds unless told otherwise (loopback_config turns it
            # off for the tests that share their loop with the simulated Vapi).
            shed_loop_lag_ms=int(shed) if shed else ServerConfig().shed_loop_lag_ms,
            drain_deadline_s=float(drain) if drain else config.server.drain_deadline_s,
        ),
        edge=attrs.evolve(
            config.edge, max_connections=MAX_CONNECTIONS, max_connections_per_peer=MAX_CONNECTIONS
        ),
    )
    if env.get(f"{ENV_PREFIX}EDGE_BARGE_IN", "") == "1":  # --edge-barge-in
        config = config.evolve(bridge=attrs.evolve(config.bridge, edge_barge_in=True))
    hook_url = env.get(f"{ENV_PREFIX}ROUTE_HOOK_URL", "")
    if hook_url:  # --route-hook: every call asks the load generator's decision hook
        config = config.evolve(
            route_hook=RouteHookConfig(url=hook_url),
            credentials=attrs.evolve(
                config.credentials,
                route_hook_secret=Secret(env[f"{ENV_PREFIX}ROUTE_HOOK_SECRET"]),
            ),
        )
    listener = socket.socket(fileno=int(env[f"{ENV_PREFIX}FD"]))
    tune_gc_for_latency()  # as ``voicebridge serve`` does

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(serve, config, listeners=[listener], handle_signals=True))
            print("ready", flush=True)

    trio.run(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
