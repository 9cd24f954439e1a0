"""The ``voicebridge loadtest`` command line: its arguments and what it prints."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TextIO


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``loadtest`` subcommand's options."""
    parser.add_argument("--calls", type=int, default=100, metavar="N",
                        help="concurrent calls (default 100)")
    parser.add_argument("--duration", type=float, default=30.0, metavar="S",
                        help="seconds with all calls up; measured from 1 s in (default 30)")
    parser.add_argument("--ramp", type=float, default=None, metavar="S",
                        help="seconds over which the calls start (default: calls/25, 1-10 s)")
    parser.add_argument("--bridge-cpu", type=int, default=None, metavar="K",
                        help="pin the bridge to CPU K and the load generator to the others")
    parser.add_argument("--barge-in-share", type=float, default=0.3, metavar="F",
                        help="share of assistant turns the caller talks over (default 0.3)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the simulated traffic")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    external = parser.add_argument_group(
        "an external bridge (its vapi.base_url must be http://127.0.0.1:ASSISTANT_PORT)"
    )
    external.add_argument("--url", metavar="URL",
                          help="load this bridge (http://host:port) instead of starting one")
    external.add_argument("--public-url", metavar="URL",
                          help="its server.public_url, if not --url (webhooks are signed for it)")
    external.add_argument("--auth-token", metavar="TOKEN", help="its Twilio auth token")
    external.add_argument("--assistant-port", type=int, default=0, metavar="PORT",
                          help="where the simulated Vapi listens")
    external.add_argument("--assistant-key", metavar="KEY", help="its Vapi API key")
    external.add_argument("--bridge-pid", type=int, metavar="PID",
                          help="its process, for CPU and memory from /proc")


def main(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run the load test; 0 when it ran and is valid with no failed call, else 1 (2: usage)."""
    import trio

    from voicebridge.loadtest.process import LoadTestError
    from voicebridge.loadtest.run import ExternalBridge, LoadTestOptions, run_loadtest

    out = out or sys.stdout
    external = None
    if args.url:
        if not args.auth_token or not args.assistant_key or not args.assistant_port:
            print("voicebridge loadtest: --url needs --auth-token, --assistant-port and "
                  "--assistant-key", file=sys.stderr)
            return 2
        external = ExternalBridge(
            url=args.url, public_url=args.public_url, auth_token=args.auth_token,
            assistant_port=args.assistant_port, assistant_key=args.assistant_key,
            pid=args.bridge_pid,
        )
    options = LoadTestOptions(
        calls=args.calls, duration_s=args.duration, ramp_s=args.ramp,
        bridge_cpu=args.bridge_cpu, external=external,
        barge_in_share=args.barge_in_share, seed=args.seed,
    )
    try:
        report = trio.run(run_loadtest, options)
    except LoadTestError as exc:
        print(f"voicebridge loadtest: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.to_json(), indent=2), file=out)
    else:
        print(report.table(), file=out)
    return 0 if report.valid and not report.failed_calls else 1
