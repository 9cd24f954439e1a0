"""The ``voicebridge loadtest`` command line: its arguments and what it prints."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TextIO

#: Where an external bridge's secrets come from when no ``--*-file`` names them: the
#: variables the bridge itself reads them from.
AUTH_TOKEN_ENV = "VOICEBRIDGE_TWILIO_AUTH_TOKEN"
ASSISTANT_KEY_ENV = "VOICEBRIDGE_VAPI_API_KEY"


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
    parser.add_argument(
        "--churn", type=float, default=0.0, metavar="R",
        help="new calls a second (at random) on top of --calls, from the start to the end "
        "(default 0; --calls 0 --churn R: churn alone)",
    )
    parser.add_argument(
        "--churn-call-s", type=seconds_range, default=(10.0, 40.0), metavar="MIN,MAX",
        help="how long each churn call lasts, uniformly drawn (default 10,40)",
    )
    parser.add_argument(
        "--shed-loop-lag-ms", type=int, default=None, metavar="MS",
        help="the started bridge's server.shed_loop_lag_ms (default: the product's; "
        "0: never shed on the event loop's lag)",
    )
    parser.add_argument(
        "--edge-barge-in", action="store_true",
        help="the started bridge runs [bridge] edge_barge_in (its voice-activity detector "
        "hears every caller frame while the assistant speaks): its CPU per call",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--latency", action="append", default=[], metavar="NAME=MS",
                        help="change one figure of the latency model (repeatable), e.g. "
                        "vapi_create_ms=600; see docs/performance.md")
    parser.add_argument("--no-latency", action="store_true",
                        help="no latency model: the caller's figures are loopback's")
    parser.add_argument(
        "--route-hook", action="store_true",
        help="the bridge asks a simulated decision hook ([route_hook], answering at once) "
        "for every call: the voice webhook line shows what it adds",
    )
    parser.add_argument(
        "--vapi-tls", action="store_true",
        help="the simulated Vapi serves its transport sockets over TLS (wss://, with a "
        "throwaway self-signed certificate for 127.0.0.1 that the bridge started here "
        "trusts alone); POST /call stays plain http on vapi.base_url",
    )
    external = parser.add_argument_group(
        "an external bridge (its vapi.base_url must be http://127.0.0.1:ASSISTANT_PORT)"
    )
    external.add_argument("--url", metavar="URL",
                          help="load this bridge (http://host:port, or https://host[:port] "
                          "through a TLS proxy) instead of starting one")
    external.add_argument("--ca-file", metavar="PEM",
                          help="with an https:// --url: also trust this CA certificate")
    external.add_argument("--public-url", metavar="URL",
                          help="its server.public_url, if not --url (webhooks are signed for it)")
    external.add_argument(
        "--auth-token-file", metavar="PATH",
        help=f"file holding its Twilio auth token (default: ${AUTH_TOKEN_ENV})",
    )
    external.add_argument("--assistant-port", type=int, default=0, metavar="PORT",
                          help="where the simulated Vapi listens")
    external.add_argument(
        "--assistant-key-file", metavar="PATH",
        help=f"file holding its Vapi API key (default: ${ASSISTANT_KEY_ENV})",
    )
    # Secrets on the command line are visible to every user (ps, /proc) and stay in shell
    # histories: these are refused with where to put the secret instead.
    for refused in ("--auth-token", "--assistant-key"):
        external.add_argument(refused, metavar="SECRET", help=argparse.SUPPRESS)
    external.add_argument("--bridge-pid", type=int, metavar="PID",
                          help="its process, for CPU and memory from /proc")
    external.add_argument(
        "--vapi-tls-cert", metavar="PEM",
        help="with --vapi-tls: the certificate to serve, which the bridge must trust before "
        "it starts (e.g. SSL_CERT_FILE=PEM in its environment); without it, --url "
        "--vapi-tls makes one, prints where, and stops",
    )
    external.add_argument("--vapi-tls-key", metavar="PEM",
                          help="with --vapi-tls-cert: its private key")


def seconds_range(text: str) -> tuple[float, float]:
    """``MIN,MAX`` seconds, 0 < MIN <= MAX."""
    low, _, high = text.partition(",")
    try:
        bounds = (float(low), float(high or low))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX seconds, got {text!r}") from None
    if not 0 < bounds[0] <= bounds[1]:
        raise argparse.ArgumentTypeError(f"expected 0 < MIN <= MAX, got {text!r}")
    return bounds


def main(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run the load test; 0 when it ran and is valid with no failed call, else 1 (2: usage)."""
    import trio

    from voicebridge.loadtest.process import LoadTestError
    from voicebridge.loadtest.run import ExternalBridge, LoadTestOptions, run_loadtest
    from voicebridge.loadtest.tls import Certificate

    out = out or sys.stdout
    certificate = None
    if args.vapi_tls_cert or args.vapi_tls_key:
        if not (args.vapi_tls and args.vapi_tls_cert and args.vapi_tls_key):
            print("voicebridge loadtest: --vapi-tls-cert and --vapi-tls-key go together, "
                  "with --vapi-tls", file=sys.stderr)
            return 2
        certificate = Certificate(Path(args.vapi_tls_cert), Path(args.vapi_tls_key))
    for option, file_option, env in (
        ("auth_token", "--auth-token-file", AUTH_TOKEN_ENV),
        ("assistant_key", "--assistant-key-file", ASSISTANT_KEY_ENV),
    ):
        if getattr(args, option) is not None:
            print(f"voicebridge loadtest: --{option.replace('_', '-')} would show the secret "
                  f"to every user (ps) and keep it in shell history; use {file_option} PATH "
                  f"or the {env} environment variable", file=sys.stderr)
            return 2
    external = None
    if args.url:
        try:
            auth_token = _secret(args.auth_token_file, AUTH_TOKEN_ENV)
            assistant_key = _secret(args.assistant_key_file, ASSISTANT_KEY_ENV)
        except OSError as exc:
            print(f"voicebridge loadtest: cannot read {exc.filename}: {exc.strerror}",
                  file=sys.stderr)
            return 2
        if not auth_token or not assistant_key or not args.assistant_port:
            print("voicebridge loadtest: --url needs --assistant-port, the bridge's auth "
                  f"token (--auth-token-file or ${AUTH_TOKEN_ENV}) and its Vapi key "
                  f"(--assistant-key-file or ${ASSISTANT_KEY_ENV})", file=sys.stderr)
            return 2
        external = ExternalBridge(
            url=args.url, public_url=args.public_url, auth_token=auth_token,
            assistant_port=args.assistant_port, assistant_key=assistant_key,
            pid=args.bridge_pid, ca_file=args.ca_file,
        )
        if args.vapi_tls:
            if certificate is None:
                return _certificate_for_external_bridge()
            print(f"voicebridge loadtest: the simulated Vapi serves wss:// with "
                  f"{certificate.cert.resolve()}; the bridge must trust it", file=sys.stderr)
    from voicebridge.sim.latency import LatencyModel, parse_overrides

    try:
        latency = LatencyModel().with_overrides(parse_overrides(args.latency))
    except ValueError as exc:
        print(f"voicebridge loadtest: --latency: {exc}", file=sys.stderr)
        return 2
    options = LoadTestOptions(
        calls=args.calls, duration_s=args.duration, ramp_s=args.ramp,
        bridge_cpu=args.bridge_cpu, external=external,
        barge_in_share=args.barge_in_share, seed=args.seed,
        vapi_tls=args.vapi_tls, vapi_tls_certificate=certificate,
        route_hook=args.route_hook,
        progress=_progress_line,
        churn_per_s=args.churn, churn_call_s=args.churn_call_s,
        shed_loop_lag_ms=args.shed_loop_lag_ms,
        latency=None if args.no_latency else latency,
        edge_barge_in=args.edge_barge_in,
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


def _secret(path: str | None, env: str, environ: Mapping[str, str] | None = None) -> str:
    """The secret in file ``path`` (one trailing newline dropped), else in ``env``; "" for
    none. Raises ``OSError`` for a file that cannot be read."""
    if path:
        return Path(path).read_text().removesuffix("\n")
    return (os.environ if environ is None else environ).get(env, "")


def _progress_line(text: str) -> None:
    """Progress goes to stderr, so that stdout stays the report alone (``--json | jq``)."""
    print(f"voicebridge loadtest: {text}", file=sys.stderr, flush=True)


def _certificate_for_external_bridge() -> int:
    """``--url --vapi-tls`` without a certificate: make one to keep, say how to use it; 2."""
    import tempfile

    import trio

    from voicebridge.loadtest.process import LoadTestError
    from voicebridge.loadtest.tls import make_certificate

    directory = Path(tempfile.mkdtemp(prefix="voicebridge-loadtest-tls-"))
    try:
        certificate = trio.run(make_certificate, directory)
    except LoadTestError as exc:
        print(f"voicebridge loadtest: {exc}", file=sys.stderr)
        return 2
    print(
        "voicebridge loadtest: an external bridge must trust the simulated Vapi's "
        "certificate before it starts. Made one:\n"
        f"  certificate: {certificate.cert}\n"
        f"  key:         {certificate.key}\n"
        f"Start the bridge with SSL_CERT_FILE={certificate.cert} in its environment, then "
        f"run again with --vapi-tls-cert {certificate.cert} --vapi-tls-key {certificate.key}",
        file=sys.stderr,
    )
    return 2
