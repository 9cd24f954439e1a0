"""The ``voicebridge`` command: ``serve``, ``check-config``, ``call``, ``demo``, ``loadtest``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from functools import partial

import trio

from voicebridge import __version__
from voicebridge.config import DEFAULT_CONFIG_PATH, check_config_main, load_config
from voicebridge.errors import ConfigError
from voicebridge.observability.logs import configure_logging


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="voicebridge",
        description="Answers Twilio phone calls and bridges each caller to a Vapi assistant.",
    )
    parser.add_argument("--version", action="version", version=f"voicebridge {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the daemon")
    serve.add_argument(
        "--config",
        default=DEFAULT_CONFIG_PATH,
        metavar="PATH",
        help=f"configuration file (default {DEFAULT_CONFIG_PATH})",
    )

    check = commands.add_parser(
        "check-config", help="print the effective configuration (secrets masked) or the error"
    )
    check.add_argument("--config", default=DEFAULT_CONFIG_PATH, metavar="PATH")

    call = commands.add_parser(
        "call",
        help="place an outbound call (Twilio REST) that reaches the assistant through this "
        "deployment's voice webhook; prints its CallSid",
    )
    call.add_argument("number", help="E.164 number to call, e.g. +15551234567")
    call.add_argument(
        "--assistant",
        default="",
        metavar="ID",
        help="the Vapi assistant of this call, one of [outbound] assistants "
        "(default vapi.assistant_id)",
    )
    call.add_argument("--config", default=DEFAULT_CONFIG_PATH, metavar="PATH")

    demo = commands.add_parser(
        "demo",
        help="a real call through the real server, against the simulated Twilio caller "
        "and simulated Vapi assistant (no account, no network)",
    )
    demo.add_argument(
        "--calls", type=int, default=1, metavar="N", help="run N calls at once (default 1)"
    )
    demo.add_argument(
        "--save-audio", metavar="DIR", help="write what each caller heard as WAV files into DIR"
    )
    demo.add_argument("--verbose", action="store_true", help="show the server's log lines")
    demo.add_argument(
        "--latency",
        action="append",
        default=[],
        metavar="NAME=MS",
        help="change one figure of the latency model (repeatable), e.g. vapi_create_ms=600; "
        "names: see docs/performance.md",
    )
    demo.add_argument(
        "--edge-barge-in",
        action="store_true",
        help="the server runs with [bridge] edge_barge_in = true (barge-in at the edge)",
    )
    demo.add_argument(
        "--no-latency",
        action="store_true",
        help="no latency model: the simulated peers answer at loopback speed",
    )

    from voicebridge.loadtest import cli as loadtest_cli

    loadtest = commands.add_parser(
        "loadtest",
        help="N concurrent simulated calls against a bridge (one it starts, or --url): "
        "added latency, barge-in, CPU and memory per call",
    )
    loadtest_cli.add_arguments(loadtest)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check-config":
        return check_config_main(args.config)
    if args.command == "serve":
        return _serve(args.config)
    if args.command == "demo":
        from voicebridge.demo import run_demo
        from voicebridge.sim.latency import LatencyModel, parse_overrides

        if args.calls < 1:
            print("voicebridge: --calls must be at least 1", file=sys.stderr)
            return 2
        try:
            latency = LatencyModel().with_overrides(parse_overrides(args.latency))
        except ValueError as exc:
            print(f"voicebridge: --latency: {exc}", file=sys.stderr)
            return 2
        return run_demo(
            calls=args.calls,
            save_audio=args.save_audio,
            verbose=args.verbose,
            latency=None if args.no_latency else latency,
            edge_barge_in=args.edge_barge_in,
        )
    if args.command == "loadtest":
        from voicebridge.loadtest import cli as loadtest_cli

        return loadtest_cli.main(args)
    if args.command == "call":
        from voicebridge.control.outbound import call_main

        return call_main(args.number, args.config, assistant=args.assistant)
    raise AssertionError(args.command)


def _serve(config_path: str) -> int:
    """``voicebridge serve``: 0 after a drain, 1 when it cannot serve, 2 for a bad setup."""
    from voicebridge.listenfds import ListenFdsError, by_role, listen_sockets
    from voicebridge.sdnotify import Notifier, watchdog_interval
    from voicebridge.server import serve

    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print(f"voicebridge: config error: {exc}", file=sys.stderr)
        for note in getattr(exc, "__notes__", ()):
            print(f"voicebridge: config error: {note}", file=sys.stderr)
        return 2
    configure_logging(config.server.log_level.upper(), target=config.server.log_target)
    log = logging.getLogger("voicebridge")
    # Taken from the environment (and removed from it) so that no child inherits them.
    notifier = Notifier.from_environ(unset_environment=True)
    watchdog_s = watchdog_interval()
    try:
        activated = by_role(listen_sockets())
    except ListenFdsError as exc:
        log.error("cannot serve: socket activation: %s", exc)
        return 2
    from voicebridge.gctuning import tune_gc_for_latency

    tune_gc_for_latency()  # everything is imported: freeze it (see gctuning)
    try:
        trio.run(
            partial(
                serve,
                config,
                listeners=activated.public,
                ops_listeners=activated.ops,
                handle_signals=True,
                notifier=notifier,
                watchdog_interval_s=watchdog_s,
                reload_config=partial(load_config, config_path),
            )
        )
    except ConfigError as exc:  # what only serving finds (a tool handler, the ops address)
        log.error("cannot serve: config error: %s", exc)
        return 2
    except OSError as exc:
        log.error("cannot serve: %s", exc)
        return 1
    finally:
        notifier.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
