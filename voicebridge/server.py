"""Process life: serve calls and the app under trio, tell systemd, drain, reload.

``serve()`` runs one voicebridge process until it is told to stop:

- It serves on the listening sockets it is handed (socket activation, see
  ``voicebridge.listenfds``; tests) or binds ``server.listen``. The front door
  (``voicebridge.net.front``) holds every connection to the ``[edge]`` limits and gives
  media streams to the calls and every other request to hypercorn and the quart app.
- Health and metrics are served only on the ops listener (``voicebridge.net.ops``): the
  socket systemd passes named ``ops``, else ``server.ops_listen``; none when that is
  empty.
- It tells systemd how it is doing through a ``sdnotify.Notifier``: ``READY=1`` once
  the front door accepts connections, ``STATUS=`` whenever the active calls or the
  drain state change, ``WATCHDOG=1`` from this event loop, ``STOPPING=1`` with
  ``EXTEND_TIMEOUT_USEC`` (how long the drain may still take) when the drain begins and
  again when its deadline ends the calls, and ``RELOADING=1`` … ``READY=1`` around a
  reload.
- **Drain** (SIGTERM or SIGINT with ``handle_signals``, or ``stop`` set): new calls are
  refused at once (the webhook answers the overflow TwiML, ``/readyz`` 503), active calls
  get ``server.drain_deadline_s`` to finish, then the rest are ended as ``shutdown`` (the
  caller hears the fallback through the ``<Connect action>``, the Vapi leg gets
  ``end-call``). The ``<Connect action>`` route keeps being served until every call that
  ended during the drain has had its action answered (or ``ACTION_GRACE_S`` passed); only
  then is the front door told to shut down. ``serve`` then returns normally (exit status 0).
- A second SIGTERM or SIGINT **stops at once**: the drain deadline is cut short and every
  call is ended as ``shutdown`` now; the last, bounded steps of the drain (goodbyes, the
  ``<Connect action>`` requests) still run, so callers hear the fallback.
- **Reload** (SIGHUP): ``reload_config()`` re-reads the configuration and secrets; new
  ``Services`` are built around the same registry and swapped in, so limits, overflow,
  fallback, assistant and log level apply to calls from then on (calls in progress keep
  what they started with). An invalid configuration is refused with one log line and
  the process keeps running on the one it has.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
from collections.abc import Callable, Mapping, Sequence

import attrs
import httpx
import trio
from attrs import frozen
from hypercorn.config import Config as HypercornConfig

from voicebridge.boxstate import SWEEP_INTERVAL_S, SharedDir, SharedStreamTokens
from voicebridge.bridge.assistant import VapiConnector
from voicebridge.bridge.call import AssistantConnector, CallSettings
from voicebridge.bridge.early import EarlyCalls, EarlyConnector
from voicebridge.bridge.outcome import Outcome
from voicebridge.bridge.registry import CallRegistry
from voicebridge.cluster import ClusterStore, box_token_secret, cluster_store
from voicebridge.config import SECRET_SOURCES, Config, listen_addresses_overlap
from voicebridge.control.plane import ControlPlane
from voicebridge.control.routes import CALLS_PATH, WEBHOOK_PATH, vapi_server_override
from voicebridge.errors import ConfigError
from voicebridge.net.front import (
    FrontCounters,
    descriptors_needed,
    ensure_descriptor_limit,
    serve_front,
)
from voicebridge.net.ops import bind_ops_listener, ops_hypercorn_config, serve_ops
from voicebridge.net.transport import SocketTransport
from voicebridge.observability.logs import (
    log_event,
    run_suppression_reports,
    set_number_masking,
)
from voicebridge.observability.looplag import LagObservers, LoopPressure, watch_loop_lag
from voicebridge.observability.metrics import BridgeMetrics
from voicebridge.routing import Router
from voicebridge.routing_hook import RouteHook
from voicebridge.sdnotify import Notifier, run_watchdog
from voicebridge.twilio.signature import WebhookVerifier
from voicebridge.twilio.token import StreamTokens
from voicebridge.web import (
    AFTER_STREAM_PATH,
    STREAM_PATH,
    STREAM_STATUS_PATH,
    VOICE_PATH,
    Services,
    create_app,
    create_ops_app,
    early_overflow,
    media_connection,
)

log = logging.getLogger(__name__)

#: Routes whose whole (small) body the front door reads before the app sees the request:
#: Twilio's signed webhooks, which are judged on their whole body anyway.
PREREAD_PATHS = frozenset({VOICE_PATH, AFTER_STREAM_PATH, STREAM_STATUS_PATH})
#: How long the front door lets open connections run after its shutdown trigger before
#: cancelling them. By then the drain has ended every call; this only bounds stragglers.
GRACEFUL_TIMEOUT_S = 5.0
#: hypercorn closes a kept-alive connection idle between requests this long (the
#: front door displaces such connections first when ``[edge] max_connections`` is
#: reached). Twilio's requests of one call come seconds apart at most.
KEEP_ALIVE_TIMEOUT_S = 5.0
#: Listen backlog of a socket we bind; the same as ``Backlog=`` in voicebridge.socket.
LISTEN_BACKLOG = 1024
#: After the drain deadline ends the remaining calls, how much longer than the Vapi end
#: deadline (``end-call`` + close) they get to close their sockets.
CLOSE_SLACK_S = 2.0
#: How long the drain keeps serving for the ``<Connect action>`` requests of calls that
#: ended during it. Twilio asks within a second; one landing on another process is never
#: seen here, so this also bounds that wait.
ACTION_GRACE_S = 3.0
#: The paths whose requests are refused for their credentials (401/403), counted by path.
WEBHOOK_PATHS = (VOICE_PATH, AFTER_STREAM_PATH, STREAM_STATUS_PATH, WEBHOOK_PATH, CALLS_PATH)
#: At most one ``STATUS=`` datagram per this interval (a burst of call starts is one update).
STATUS_MIN_INTERVAL_S = 0.25
#: Added to every ``EXTEND_TIMEOUT_USEC`` the drain sends: a loaded box's scheduling and
#: the last log lines must not turn a clean stop into systemd's SIGKILL.
EXTEND_MARGIN_S = 5.0
#: The signals ``serve`` handles with ``handle_signals``.
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


@frozen
class Listening:
    """What ``serve`` reports through ``task_status`` once it accepts connections."""

    addresses: tuple[tuple[str, int], ...]
    #: The live call registry (active calls, recent outcomes), for the demo and tests.
    registry: CallRegistry
    #: Where health and metrics are served: (host, port), or a Unix socket's path.
    ops_addresses: tuple[tuple[str, int] | str, ...] = ()
    #: What the front door has admitted, refused and closed (``[edge]``), kept current.
    front: FrontCounters = attrs.field(factory=FrontCounters)

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


def shared_dir_path(config: Config, environ: Mapping[str, str] | None = None) -> str:
    """The shared directory to use: ``server.shared_dir``, else systemd's first
    ``$RUNTIME_DIRECTORY``, else ``""`` (nothing shared)."""
    env = os.environ if environ is None else environ
    return config.server.shared_dir or env.get("RUNTIME_DIRECTORY", "").split(":")[0]


def build_services(
    config: Config,
    http: httpx.AsyncClient,
    *,
    registry: CallRegistry | None = None,
    tokens: StreamTokens | None = None,
    connector: AssistantConnector | None = None,
    shared: SharedDir | None = None,
    metrics: BridgeMetrics | None = None,
    early: EarlyCalls | None = None,
    cluster: ClusterStore | None = None,
) -> Services:
    """The route services for ``config``.

    A given ``registry`` (reload) is kept, with ``max_calls`` and its shedding on the
    loop's lag updated; so are given ``tokens`` (a reload keeps the memory of used tokens,
    see ``StreamTokens.rekeyed``) and ``metrics`` (counters never restart).
    ``shared`` makes a new registry and new tokens work across processes; ``cluster``
    (reload: the running one; else the store ``[cluster]`` names) across boxes.
    """
    credentials = config.credentials
    if metrics is None:
        metrics = BridgeMetrics(worker=config.server.worker, webhook_paths=WEBHOOK_PATHS)
    if cluster is None:
        cluster = cluster_store(config.cluster, observer=metrics)
    if registry is None:
        registry = CallRegistry(
            max_calls=config.server.max_concurrent_calls,
            reservation_ttl_s=config.twilio.stream_token_ttl_s,
            shared=shared,
            pressure=LoopPressure(
                threshold_s=config.server.shed_loop_lag_ms / 1000,
                window_s=config.server.shed_loop_lag_window_s,
            ),
            publish=cluster.published,
        )
    else:
        registry.max_calls = config.server.max_concurrent_calls
        if registry.pressure is not None:  # the lag seen so far still counts
            registry.pressure.threshold_s = config.server.shed_loop_lag_ms / 1000
            registry.pressure.window_s = config.server.shed_loop_lag_window_s
    if tokens is None:
        secret, previous = token_secrets(config)
        ttl_s = config.twilio.stream_token_ttl_s
        tokens = (
            SharedStreamTokens(secret=secret, ttl_s=ttl_s, shared=shared, previous_secret=previous)
            if shared is not None
            else StreamTokens(secret=secret, ttl_s=ttl_s, previous_secret=previous)
        )
    connector = connector or VapiConnector(
        http, config.vapi, credentials.vapi_api_key.reveal(), server=vapi_server_override(config)
    )
    if early is not None:
        # Even with create_early off: a reload that turned it off leaves early calls
        # that their streams must still take, or they would get a second call.
        connector = EarlyConnector(
            early,
            connector,
            wait_s=config.twilio.start_deadline_s,
            create_deadline_s=config.vapi.create_deadline_s,
            end_deadline_s=config.vapi.end_deadline_s,
        )
    return Services(
        config=config,
        registry=registry,
        tokens=tokens,
        verifier=WebhookVerifier(
            auth_token=credentials.twilio_auth_token.reveal(),
            previous_auth_token=credentials.twilio_auth_token_previous.reveal(),
            public_url=config.server.public_url,
            box_url=config.server.box_url,
            shared_key=credentials.twilio_shared_key.reveal(),
            shared_key_id=config.twilio.shared_key_id,
        )
        if config.twilio.validate_signatures
        else None,
        connector=connector,
        call_settings=CallSettings.from_config(config),
        router=Router(config),
        hook=RouteHook.from_config(config, http),
        control=ControlPlane.from_config(
            config, http, voice_url=config.server.public_url + VOICE_PATH, observer=metrics
        ),
        metrics=metrics,
        early=connector
        if isinstance(connector, EarlyConnector) and config.vapi.create_early
        else None,
        cluster=cluster,
    )


def token_secrets(config: Config) -> tuple[bytes, bytes]:
    """The stream token secrets (current, previous) of this box: with ``server.box_url``,
    bound to the box, so that no other box of the service accepts its tokens."""
    credentials = config.credentials
    pair = (
        credentials.stream_token_secret.reveal().encode(),
        credentials.stream_token_secret_previous.reveal().encode(),
    )
    if not config.server.box_url:
        return pair
    return box_token_secret(pair[0], config.server.box_url), box_token_secret(
        pair[1], config.server.box_url
    )


async def serve(
    config: Config,
    *,
    listeners: Sequence[socket.socket] = (),
    ops_listeners: Sequence[socket.socket] = (),
    stop: trio.Event | None = None,
    handle_signals: bool = False,
    connector: AssistantConnector | None = None,
    notifier: Notifier | None = None,
    watchdog_interval_s: float | None = None,
    reload_config: Callable[[], Config] | None = None,
    task_status: trio.TaskStatus[Listening] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until drained (``stop`` set, or SIGTERM/SIGINT with ``handle_signals``).

    ``listeners`` are already-listening sockets (socket activation, tests); without
    them ``config.server.listen`` is bound. ``ops_listeners`` likewise for health and
    metrics (the ``ops`` sockets systemd passes); without them
    ``config.server.ops_listen`` is bound, unless it is empty. Every socket is closed
    by the time this returns. ``connector`` replaces the Vapi connector (tests).
    ``notifier`` talks to systemd (none: nothing is sent); with ``watchdog_interval_s``
    it also pings the watchdog. ``reload_config`` is what SIGHUP calls for the new
    configuration (``load_config`` with the same path); without it SIGHUP is logged and
    ignored. Returns normally after a drain; raises ``OSError`` if it cannot listen or
    the shared directory cannot be made; raises ``ConfigError`` when ``ops_listen`` is
    the address of a public listener.
    """
    set_number_masking(config.server.mask_caller_numbers)
    sockets = list(listeners) or [bind_listener(config.server.listen)]
    ensure_descriptor_limit(descriptors_needed(config.edge, config.server.max_concurrent_calls))
    addresses = tuple(_address(sock) for sock in sockets)
    try:
        ops_sockets = list(ops_listeners) or _bind_ops(config.server.ops_listen, addresses)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    ops_addresses = tuple(_ops_address(sock) for sock in ops_sockets)
    shared_path = shared_dir_path(config)
    shared = SharedDir(shared_path) if shared_path else None
    async with httpx.AsyncClient() as http:
        process = _ServerProcess(
            config,
            http,
            stop=stop if stop is not None else trio.Event(),
            notifier=notifier if notifier is not None else Notifier(None),
            connector=connector,
            reload_config=reload_config,
            shared=shared,
        )
        app = create_app(process.current_services)
        ops_app = create_ops_app(process.current_services)

        async def media(transport: SocketTransport, head: bytes) -> None:
            await media_connection(process.current_services(), transport, head)

        counters = FrontCounters()

        async with trio.open_nursery() as process_nursery:
            # Cancelled last (after the drain and the front door): ends unused early calls.
            await process_nursery.start(process.early.run)
            if handle_signals:
                await process_nursery.start(process.handle_signals)
            if watchdog_interval_s is not None and process.notifier.enabled:
                await process_nursery.start(run_watchdog, process.notifier, watchdog_interval_s)
            if shared is not None:
                process_nursery.start_soon(_sweep_periodically, shared)
            services = process.services
            await process_nursery.start(services.cluster.run, services.registry)
            # Rate-limited log lines are reported within a window of their end.
            process_nursery.start_soon(run_suppression_reports)
            async with trio.open_nursery() as http_nursery:
                # The front door takes ownership of the sockets (it closes them).
                await http_nursery.start(
                    lambda task_status: serve_front(
                        app,
                        process.hypercorn_config,
                        sockets,
                        media_path=STREAM_PATH,
                        media=media,
                        shutdown_trigger=process.wait_http_shutdown,
                        limits=lambda: process.current_services().config.edge,
                        counters=counters,
                        preread_paths=PREREAD_PATHS,
                        early=lambda request: early_overflow(
                            process.current_services(), request
                        ),
                        task_status=task_status,
                    )
                )
                if ops_sockets:
                    await http_nursery.start(
                        lambda task_status: serve_ops(
                            ops_app,
                            ops_hypercorn_config(),
                            ops_sockets,
                            shutdown_trigger=process.wait_http_shutdown,
                            task_status=task_status,
                        )
                    )
                ops_text = ", ".join(_show_address(address) for address in ops_addresses)
                log_event(
                    log,
                    logging.INFO,
                    "listening",
                    "accepting connections on "
                    + ", ".join(f"{host}:{port}" for host, port in addresses)
                    + (" (socket activation)" if listeners else "")
                    + (
                        f"; health and metrics on {ops_text}"
                        if ops_text
                        else "; no ops listener: health and metrics are not served"
                    ),
                    ops_listen=ops_text or None,
                    public_url=config.server.public_url,
                    socket_activated=bool(listeners),
                    shared_dir=shared_path or None,
                    max_concurrent_calls=config.server.max_concurrent_calls,
                )
                process.notifier.ready(status=process.status_text())
                process_nursery.start_soon(process.report_status)
                process_nursery.start_soon(process.drain_when_asked)
                # The monitor's wakes feed the metrics and admission (shedding).
                metrics, pressure = process.services.metrics, process.services.registry.pressure
                process_nursery.start_soon(
                    watch_loop_lag,
                    LagObservers(metrics, pressure) if pressure is not None else metrics,
                )
                task_status.started(
                    Listening(addresses, process.services.registry, ops_addresses, counters)
                )
            # The front door has finished its graceful shutdown.
            process_nursery.cancel_scope.cancel(reason="server stopped")
        log_event(log, logging.INFO, "stopped", "stopped")


class _ServerProcess:
    """The live state of one serving process: its services, drain, reload and signals."""

    def __init__(
        self,
        config: Config,
        http: httpx.AsyncClient,
        *,
        stop: trio.Event,
        notifier: Notifier,
        connector: AssistantConnector | None,
        reload_config: Callable[[], Config] | None,
        shared: SharedDir | None,
    ) -> None:
        self.notifier = notifier
        #: The Vapi calls created early (``[vapi] create_early``); kept across reloads.
        self.early = EarlyCalls(shared=shared)
        #: Swapped whole by a reload; the routes read it per request.
        self.services = build_services(
            config, http, connector=connector, shared=shared, early=self.early
        )
        self.early.on_fate = self.services.metrics.early_call
        self.hypercorn_config = _hypercorn_config()
        self._http = http
        self._connector = connector
        self._reload_config = reload_config
        self._shared = shared
        #: Set to drain (first SIGTERM/SIGINT, or the caller's ``stop``).
        self._stop = stop
        #: Set when the front door should shut down: the drain is over.
        self._http_shutdown = trio.Event()
        # Invariant: once True, the drain's wait for calls to finish is (or will be) over.
        self._stopping_now = False
        #: The drain's wait for calls to finish by themselves; stopping at once cancels it.
        self._patience_scope = trio.CancelScope()
        #: The longest goodbye left among the calls ``stop_at_once`` ended.
        self._goodbye_s = 0.0

    def current_services(self) -> Services:
        return self.services

    async def wait_http_shutdown(self) -> None:
        """The front door's shutdown trigger."""
        await self._http_shutdown.wait()

    # -- status ----------------------------------------------------------------------

    def status_text(self) -> str:
        """The one-line ``STATUS=`` shown by ``systemctl status``."""
        registry = self.services.registry
        calls = _calls(registry.active_count)
        if self._stopping_now:
            return f"Stopping at once: {calls} active"
        if registry.draining:
            return f"Draining: {calls} active, refusing new calls"
        return f"Serving: {calls} active, limit {registry.max_calls}"

    async def report_status(self) -> None:
        """Keep ``STATUS=`` current, at most once per ``STATUS_MIN_INTERVAL_S``."""
        if not self.notifier.enabled:
            return
        registry = self.services.registry
        seen = registry.changes
        while True:
            seen = await registry.wait_changed_since(seen)
            self.notifier.status(self.status_text())
            await trio.sleep(STATUS_MIN_INTERVAL_S)

    # -- signals ---------------------------------------------------------------------

    async def handle_signals(self, *, task_status: trio.TaskStatus[None]) -> None:
        """SIGTERM/SIGINT: drain, and at the second one stop at once; SIGHUP: reload."""
        with trio.open_signal_receiver(*HANDLED_SIGNALS) as signals:
            task_status.started()
            async for signum in signals:
                name = signal.Signals(signum).name
                if signum == signal.SIGHUP:
                    log_event(log, logging.INFO, "signal", f"{name}: reloading", signal=name)
                    self.reload()
                elif not self._stop.is_set():
                    log_event(log, logging.INFO, "signal", f"{name}: draining", signal=name)
                    self._stop.set()
                else:
                    self.stop_at_once(f"second signal, {name}")

    # -- drain -----------------------------------------------------------------------

    async def drain_when_asked(self) -> None:
        """Wait for ``stop``, drain, then let the front door shut down."""
        await self._stop.wait()
        await self._drain()
        self._http_shutdown.set()

    async def _drain(self) -> None:
        """Refuse new calls, wait for the active ones up to the deadline, end the rest,
        wait (bounded) for their goodbyes and ``<Connect action>`` requests."""
        registry = self.services.registry
        config = self.services.config
        deadline_s = config.server.drain_deadline_s
        started = trio.current_time()
        registry.start_draining()
        active = registry.active_count
        # systemd's TimeoutStopSec need not know the drain deadline: the drain tells it.
        self.notifier.notify(
            STOPPING=1,
            STATUS=self.status_text(),
            EXTEND_TIMEOUT_USEC=_usec(deadline_s + self._after_calls_end_s(0.0)),
        )
        log_event(
            log,
            logging.INFO,
            "drain-start",
            f"draining: refusing new calls; waiting up to {deadline_s:g} s for "
            f"{_calls(active)} to finish",
            active_calls=active,
            drain_deadline_s=deadline_s,
        )
        with self._patience_scope:
            self._patience_scope.deadline = trio.current_time() + deadline_s
            await registry.wait_idle()
        ended = 0
        goodbye_s = self._goodbye_s
        if registry.load and not self._stopping_now:
            unstarted = registry.load - registry.active_count
            ending = registry.end_all(Outcome.SHUTDOWN, "drain deadline passed")
            ended, goodbye_s = ending.count, ending.goodbye_s
            self.notifier.extend_timeout(self._after_calls_end_s(goodbye_s))
            log_event(
                log,
                logging.WARNING,
                "drain-deadline",
                f"drain deadline ({deadline_s:g} s) passed: ending {_calls(ended)} "
                "with the fallback"
                + (f"; {unstarted} admitted never started streaming" if unstarted else ""),
                ended_calls=ended,
                unstarted_calls=unstarted,
                drain_deadline_s=deadline_s,
            )
        # A call whose assistant had already said goodbye is let finish it (a normal
        # end): the wait covers the longest goodbye left.
        with trio.move_on_after(goodbye_s + config.vapi.end_deadline_s + CLOSE_SLACK_S):
            await registry.wait_idle()
        with trio.move_on_after(ACTION_GRACE_S):
            await registry.wait_actions_answered()
        log_event(
            log,
            logging.INFO,
            "drain-done",
            f"drained in {trio.current_time() - started:.1f} s ({_calls(active)} at the "
            f"start, {ended} ended at the deadline); stopping the server",
            duration_s=round(trio.current_time() - started, 3),
            active_calls=active,
            ended_calls=ended,
            still_active=registry.active_count,
            actions_unanswered=registry.awaiting_action,
        )

    def _after_calls_end_s(self, goodbye_s: float) -> float:
        """The longest the drain's last steps take once calls are ended (goodbyes, their
        ``<Connect action>`` requests, the front door's shutdown), with a margin."""
        return (
            goodbye_s
            + self.services.config.vapi.end_deadline_s
            + CLOSE_SLACK_S
            + ACTION_GRACE_S
            + GRACEFUL_TIMEOUT_S
            + EXTEND_MARGIN_S
        )

    def stop_at_once(self, why: str) -> None:
        """End every call now and cut the drain short.

        The calls still say goodbye to Vapi and their callers still get the fallback
        through the ``<Connect action>``: the drain goes on with its last steps, each
        bounded (the Vapi end deadline + ``CLOSE_SLACK_S``, then ``ACTION_GRACE_S``).
        """
        if self._stopping_now:
            return
        self._stopping_now = True
        registry = self.services.registry
        registry.start_draining()
        ending = registry.end_all(Outcome.SHUTDOWN, f"stopped at once ({why})")
        ended, self._goodbye_s = ending.count, ending.goodbye_s
        log_event(
            log,
            logging.WARNING,
            "stop-now",
            f"stopping at once ({why}): ending {_calls(ended)}",
            ended_calls=ended,
        )
        self.notifier.notify(
            STOPPING=1,
            STATUS=self.status_text(),
            EXTEND_TIMEOUT_USEC=_usec(self._after_calls_end_s(self._goodbye_s)),
        )
        self._patience_scope.cancel(reason=f"stopping at once ({why})")
        self._stop.set()

    # -- reload ----------------------------------------------------------------------

    def reload(self) -> None:
        """Re-read the configuration and apply it to new calls; keep the old one if invalid."""
        if self._stop.is_set():
            log.warning("reload ignored: the server is stopping")
            return
        if self._reload_config is None:
            log.warning("reload ignored: this server was not started from a config file")
            return
        self.notifier.reloading()
        old = self.services
        try:
            new, restart_only = _keep_restart_only_settings(old.config, self._reload_config())
            # Used tokens stay used whatever the new secrets are.
            secret, previous = token_secrets(new)
            tokens = old.tokens.rekeyed(
                secret=secret,
                previous_secret=previous,
                ttl_s=new.twilio.stream_token_ttl_s,
            )
            # Builds everything before anything changes: a bad tool handler, say, raises
            # here and leaves the running configuration untouched.
            services = build_services(
                new,
                self._http,
                registry=old.registry,
                tokens=tokens,
                connector=self._connector,
                shared=self._shared,
                metrics=old.metrics,
                early=self.early,
                cluster=old.cluster,
            )
        except ConfigError as exc:
            others = len(getattr(exc, "__notes__", ()))
            log_event(
                log,
                logging.ERROR,
                "reload-failed",
                f"reload refused, still serving with the previous configuration: {exc}"
                + (f" (and {others} more problem{'s' if others > 1 else ''})" if others else ""),
                key=exc.key or None,
                reason=exc.reason,
            )
            old.metrics.config_loaded("refused")
            self.notifier.ready(status=self.status_text())
            return
        self.services = services
        services.metrics.config_loaded("applied")
        # Names only: what a rotation's operator checks in the journal.
        rotated = [
            name
            for name in SECRET_SOURCES
            if getattr(new.credentials, name) != getattr(old.config.credentials, name)
        ]
        logging.getLogger("voicebridge").setLevel(new.server.log_level.upper())
        set_number_masking(new.server.mask_caller_numbers)
        if restart_only:
            log_event(
                log,
                logging.WARNING,
                "reload-needs-restart",
                "changes to server."
                + ", server.".join(restart_only)
                + " take effect at the next restart",
                keys=",".join(restart_only),
            )
        log_event(
            log,
            logging.INFO,
            "reloaded",
            f"configuration reloaded: limit {_calls(new.server.max_concurrent_calls)}, "
            f"log level {new.server.log_level}"
            + (f"; secrets changed: {', '.join(rotated)}" if rotated else "")
            + "; calls in progress keep their settings",
            max_concurrent_calls=new.server.max_concurrent_calls,
            log_level=new.server.log_level,
            secrets_changed=",".join(rotated) or None,
        )
        self.notifier.ready(status=self.status_text())


#: ``[server]`` keys a reload cannot change: the sockets are bound and the log target and
#: shared directory set up at start; the public URL is in the ``<Connect action>`` of calls
#: in progress, whose signatures must keep verifying; the worker names the metrics' series.
RESTART_ONLY_KEYS = (
    "listen", "ops_listen", "public_url", "box_url", "log_target", "shared_dir", "worker"
)


def _keep_restart_only_settings(old: Config, new: Config) -> tuple[Config, list[str]]:
    """``new`` with the ``RESTART_ONLY_KEYS`` of ``old`` put back, and the keys that differed."""
    changed = [
        key for key in RESTART_ONLY_KEYS if getattr(new.server, key) != getattr(old.server, key)
    ]
    if not changed:
        return new, changed
    kept = {key: getattr(old.server, key) for key in changed}
    return new.evolve(server=attrs.evolve(new.server, **kept)), changed


def _hypercorn_config() -> HypercornConfig:
    """hypercorn's settings for the requests the front door hands it (HTTP/1.1 only:
    the front door serves WebSockets itself and refuses HTTP/2)."""
    config = HypercornConfig()
    config.graceful_timeout = GRACEFUL_TIMEOUT_S
    config.keep_alive_timeout = KEEP_ALIVE_TIMEOUT_S
    config.backlog = LISTEN_BACKLOG
    config.accesslog = None
    config.errorlog = logging.getLogger("voicebridge.http")
    # Per read; the front door's [edge] deadlines bound a request's head and body in
    # total. This one ends a connection whose client stays silent while its request
    # is answered.
    config.read_timeout = 30
    # No TLS on this port (a proxy in front terminates it); were there, no h2 either.
    config.alpn_protocols = ["http/1.1"]
    return config


async def _sweep_periodically(shared: SharedDir) -> None:
    """Delete expired files from the shared directory now and every ``SWEEP_INTERVAL_S``."""
    while True:
        removed = await trio.to_thread.run_sync(shared.sweep, abandon_on_cancel=True)
        log.debug("swept %d expired files from %s", removed, shared.path)
        await trio.sleep(SWEEP_INTERVAL_S)


def _usec(seconds: float) -> int:
    return math.ceil(seconds * 1_000_000)


def _calls(count: int) -> str:
    return f"{count} call{'' if count == 1 else 's'}"


def _address(sock: socket.socket) -> tuple[str, int]:
    name = sock.getsockname()
    return str(name[0]), int(name[1])


def _ops_address(sock: socket.socket) -> tuple[str, int] | str:
    return str(sock.getsockname()) if sock.family == socket.AF_UNIX else _address(sock)


def _show_address(address: tuple[str, int] | str) -> str:
    if isinstance(address, str):
        return address
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _bind_ops(ops_listen: str, public: Sequence[tuple[str, int]]) -> list[socket.socket]:
    """The ops listener ``ops_listen`` names ([] for none), refused when it is the
    address of a public listener (socket activation may have put one there)."""
    if not ops_listen:
        return []
    if not ops_listen.startswith("/"):
        for address in public:
            if listen_addresses_overlap(ops_listen, _show_address(address)):
                raise ConfigError(
                    "server.ops_listen",
                    f"{ops_listen} is where the public listener is "
                    f"({_show_address(address)}): health and metrics would answer "
                    "anyone who reaches the public port",
                )
    return [bind_ops_listener(ops_listen)]
