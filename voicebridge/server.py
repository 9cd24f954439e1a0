"""Process life: build the services, serve the app with hypercorn under trio, stop cleanly.

``serve()`` binds (or is handed) the listening sockets, runs hypercorn on them and
returns when told to stop: on SIGINT/SIGTERM when ``handle_signals`` is set, or when
``stop`` is set by the caller (tests, the demo). Stopping first refuses new calls
(the webhook answers the overflow TwiML, ``/readyz`` fails), then lets hypercorn's
graceful shutdown close the rest.
"""

from __future__ import annotations

import logging
import signal
import socket
from collections.abc import Sequence

import httpx
import trio
from attrs import frozen
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from voicebridge.bridge.assistant import VapiConnector
from voicebridge.bridge.call import AssistantConnector, CallSettings
from voicebridge.bridge.registry import CallRegistry
from voicebridge.config import Config
from voicebridge.control.plane import ControlPlane
from voicebridge.control.routes import vapi_server_override
from voicebridge.observability.logs import log_event
from voicebridge.twilio.signature import WebhookVerifier
from voicebridge.twilio.token import StreamTokens
from voicebridge.web import VOICE_PATH, Services, create_app

log = logging.getLogger(__name__)

#: Twilio media frames are ~350 bytes of JSON; nothing legitimate comes near 64 KiB.
MAX_WEBSOCKET_MESSAGE_BYTES = 64 * 1024
#: How long hypercorn lets open connections run after the stop before cancelling them.
#: The calls wind down within this (their own close steps are bounded by a few seconds).
GRACEFUL_TIMEOUT_S = 5.0
LISTEN_BACKLOG = 1024


@frozen
class Listening:
    """What ``serve`` reports through ``task_status`` once it accepts connections."""

    addresses: tuple[tuple[str, int], ...]
    #: The live call registry (active calls, recent outcomes), for the demo and tests.
    registry: CallRegistry

    @property
    def port(self) -> int:
        return self.addresses[0][1]


def parse_listen(listen: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` → (host, port)."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


def bind_listener(listen: str) -> socket.socket:
    """A listening TCP socket for ``host:port`` (port 0 picks a free one)."""
    host, port = parse_listen(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=LISTEN_BACKLOG)


def build_services(
    config: Config,
    http: httpx.AsyncClient,
    *,
    registry: CallRegistry | None = None,
    connector: AssistantConnector | None = None,
) -> Services:
    """The route services for ``config``; a given ``registry`` is kept (reload)."""
    credentials = config.credentials
    if registry is None:
        registry = CallRegistry(
            max_calls=config.server.max_concurrent_calls,
            reservation_ttl_s=config.twilio.stream_token_ttl_s,
        )
    else:
        registry.max_calls = config.server.max_concurrent_calls
    return Services(
        config=config,
        registry=registry,
        tokens=StreamTokens(
            secret=credentials.stream_token_secret.reveal().encode(),
            ttl_s=config.twilio.stream_token_ttl_s,
        ),
        verifier=WebhookVerifier(
            auth_token=credentials.twilio_auth_token.reveal(),
            public_url=config.server.public_url,
        )
        if config.twilio.validate_signatures
        else None,
        connector=connector
        or VapiConnector(
            http,
            config.vapi,
            credentials.vapi_api_key.reveal(),
            server=vapi_server_override(config),
        ),
        call_settings=CallSettings.from_config(config),
        control=ControlPlane.from_config(
            config, http, voice_url=config.server.public_url + VOICE_PATH
        ),
    )


async def serve(
    config: Config,
    *,
    listeners: Sequence[socket.socket] = (),
    stop: trio.Event | None = None,
    handle_signals: bool = False,
    connector: AssistantConnector | None = None,
    task_status: trio.TaskStatus[Listening] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until ``stop`` is set (or SIGINT/SIGTERM with ``handle_signals``).

    ``listeners`` are already-listening sockets (socket activation, tests); without
    them ``config.server.listen`` is bound. The sockets are handed to hypercorn,
    which closes them. ``connector`` replaces the Vapi connector (tests).
    """
    if stop is None:
        stop = trio.Event()
    sockets = list(listeners) or [bind_listener(config.server.listen)]
    addresses = tuple(_address(sock) for sock in sockets)
    async with httpx.AsyncClient() as http:
        services = build_services(config, http, connector=connector)
        app = create_app(lambda: services)
        hypercorn_config = HypercornConfig()
        # hypercorn takes ownership of each fd://N socket (it closes it).
        hypercorn_config.bind = [f"fd://{sock.detach()}" for sock in sockets]
        hypercorn_config.websocket_max_message_size = MAX_WEBSOCKET_MESSAGE_BYTES
        hypercorn_config.graceful_timeout = GRACEFUL_TIMEOUT_S
        hypercorn_config.accesslog = None
        hypercorn_config.errorlog = logging.getLogger("voicebridge.http")
        hypercorn_config.read_timeout = 30

        async def shutdown_trigger() -> None:
            await stop.wait()
            services.registry.start_draining()
            log_event(
                log,
                logging.INFO,
                "stopping",
                f"stopping: refusing new calls, {services.registry.active_count} active",
                active_calls=services.registry.active_count,
            )

        async with trio.open_nursery() as signal_nursery:
            if handle_signals:
                signal_nursery.start_soon(_wait_for_signal, stop)
            async with trio.open_nursery() as http_nursery:
                await http_nursery.start(
                    lambda task_status: hypercorn_serve(
                        app,
                        hypercorn_config,
                        shutdown_trigger=shutdown_trigger,
                        task_status=task_status,
                    )
                )
                log_event(
                    log,
                    logging.INFO,
                    "listening",
                    "accepting connections on "
                    + ", ".join(f"{host}:{port}" for host, port in addresses),
                    public_url=config.server.public_url,
                )
                task_status.started(Listening(addresses, services.registry))
            # hypercorn has finished its graceful shutdown.
            signal_nursery.cancel_scope.cancel(reason="server stopped")
        log_event(log, logging.INFO, "stopped", "stopped")


async def _wait_for_signal(stop: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("received %s", signal.Signals(signum).name)
            stop.set()
            return


def _address(sock: socket.socket) -> tuple[str, int]:
    name = sock.getsockname()
    return str(name[0]), int(name[1])
