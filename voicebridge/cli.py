"""The ``voicebridge`` command: ``serve``, ``check-config``, ``route``, ``call``, ``demo``,
``loadtest``, ``install-units`` and ``completion``; its manual is man/voicebridge.8."""

from __future__ import annotations

import argparse
import logging
import os
import select
import signal
import sys
from collections.abc import Sequence
from functools import partial

import trio

from voicebridge import __version__
from voicebridge.config import DEFAULT_CONFIG_PATH, check_config_main, load_config
from voicebridge.errors import ConfigError
from voicebridge.observability.logs import configure_logging, log_event


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
        "check-config",
        help="print the effective configuration (secrets masked, where each key came from) "
        "or every problem, each with its file:line",
    )
    check.add_argument("--config", default=DEFAULT_CONFIG_PATH, metavar="PATH")
    check.add_argument(
        "--quiet", "-q", action="store_true", help="print nothing when the configuration is valid"
    )
    check.add_argument(
        "--no-secrets",
        action="store_true",
        help="neither read nor require the secrets (check the rest as a user who cannot "
        "read them)",
    )

    route = commands.add_parser(
        "route",
        help="print which route a call to a number would take, and why (see [[routes]])",
    )
    route.add_argument("--to", required=True, metavar="NUMBER", help="the dialled number")
    route.add_argument("--from", dest="caller", default="", metavar="NUMBER", help="the caller")
    route.add_argument("--config", default=DEFAULT_CONFIG_PATH, metavar="PATH")

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
        "--create-early",
        action="store_true",
        help="the server runs with [vapi] create_early = true (the Vapi call is created "
        "while Twilio sets up the stream)",
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

    from voicebridge import cli_install

    install = commands.add_parser(
        "install-units",
        help="install the systemd units, the example configuration, the man page and the "
        "documentation shipped in this package",
    )
    cli_install.add_arguments(install)

    completion = commands.add_parser(
        "completion", help="print a shell completion script (bash, zsh or tcsh)"
    )
    completion.add_argument("shell", choices=SHELLS, help="the shell to complete for")
    return parser


#: What ``voicebridge completion`` can write a script for (those shtab supports).
SHELLS = ("bash", "zsh", "tcsh")


#: The exit status of a command whose reader went away (``voicebridge loadtest --json |
#: head``): what a shell reports for a process killed by SIGPIPE, without a traceback.
EXIT_PIPE_CLOSED = 128 + signal.SIGPIPE


def main(argv: Sequence[str] | None = None) -> int:
    try:
        code = _run(argv)
        sys.stdout.flush()  # a closed pipe shows here, not at the interpreter's exit
    except BrokenPipeError:
        if not _stdout_reader_gone():
            raise  # a socket's peer went away: a real error, not the reader of our output
        # Nothing more can be written; stop Python's own flush at exit from complaining.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_PIPE_CLOSED
    return code


def _stdout_reader_gone() -> bool:
    """Whether standard output is a pipe nobody reads any more (Linux reports POLLERR on
    the write end of a pipe without readers)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError):
        return False


def _run(argv: Sequence[str] | None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "completion":
        import shtab

        print(shtab.complete(parser, shell=args.shell), end="")
        return 0
    if args.command == "install-units":
        from voicebridge import cli_install

        return cli_install.main(args)
    if args.command == "check-config":
        return check_config_main(
            args.config, quiet=args.quiet, read_secrets=not args.no_secrets
        )
    if args.command == "route":
        from voicebridge.routing import route_main

        return route_main(args.config, to=args.to, caller=args.caller)
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
            create_early=args.create_early,
        )
    if args.command == "loadtest":
        from voicebridge.loadtest import cli as loadtest_cli

        return loadtest_cli.main(args)
    if args.command == "call":
        from voicebridge.control.outbound import call_main

        return call_main(args.number, args.config, assistant=args.assistant)
    raise AssertionError(args.command)


#: ``serve``'s exit status for a configuration it refuses (sysexits.h ``EX_CONFIG``): the
#: units' ``RestartPreventExitStatus=`` names it, since restarting cannot fix the file.
EXIT_CONFIG = 78


def _serve(config_path: str) -> int:
    """``voicebridge serve``: 0 after a drain, 1 when it cannot serve (a port taken, say:
    worth restarting), ``EXIT_CONFIG`` for a configuration or unit setup it refuses."""
    from voicebridge.listenfds import ListenFdsError, by_role, listen_sockets
    from voicebridge.sdnotify import Notifier, watchdog_interval
    from voicebridge.server import serve

    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print(f"voicebridge: config error: {exc}", file=sys.stderr)
        for note in getattr(exc, "__notes__", ()):
            print(f"voicebridge: config error: {note}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(config.server.log_level.upper(), target=config.server.log_target)
    log = logging.getLogger("voicebridge")
    log_event(
        log,
        logging.INFO,
        "starting",
        f"voicebridge {__version__} starting with {config_path}",
        version=__version__,
        config_path=config_path,
        worker=config.server.worker,
    )
    # Taken from the environment (and removed from it) so that no child inherits them.
    notifier = Notifier.from_environ(unset_environment=True)
    watchdog_s = watchdog_interval()
    try:
        activated = by_role(listen_sockets())
    except ListenFdsError as exc:
        log.error("cannot serve: socket activation: %s", exc)
        return EXIT_CONFIG
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
        return EXIT_CONFIG
    except OSError as exc:
        log.error("cannot serve: %s", exc)
        return 1
    finally:
        notifier.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
