"""The shipped TLS fronts (deploy/nginx, deploy/haproxy) in front of the real bridge.

Charter: loopback only. Debian's nginx and HAProxy (``./bootstrap.sh --test`` installs
them) run the files from deploy/ with a throwaway certificate on 127.0.0.2 (nginx) and
127.0.0.3 (HAProxy), each on a free port, in front of the real server on 127.0.0.1.
Calls are placed over ``https://`` and ``wss://`` by the simulated Twilio caller, which
trusts that certificate alone besides the system's; ``voicebridge loadtest --url
https://…`` loads the bridge through each. Real time, a few seconds a call.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import ssl
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import httpx
import pytest
import trio

from tests.harness import Bridge, running_bridge
from tests.proxy_fixture import (
    PUBLIC_HOST,
    Certificate,
    Proxy,
    free_port,
    make_certificate,
    running_proxy,
)
from voicebridge.observability.logs import record_fields
from voicebridge.observability.remote import client_address
from voicebridge.sim.caller import Speak, WaitForAssistantDone, place_call

PROXIES = {"nginx": "127.0.0.2", "haproxy": "127.0.0.3"}
PUBLIC_URL = f"https://{PUBLIC_HOST}"
#: Hear the greeting, say something, hear the goodbye: the assistant ends the call and
#: Twilio fetches the <Connect action> (through the proxy too).
SHORT_CALL = (WaitForAssistantDone(quiet_s=0.3), Speak("caller_1"), WaitForAssistantDone(0.3))


def _needs(name: str) -> None:
    if shutil.which(name) is None:
        pytest.skip(f"{name} is not installed (Debian package {name}; ./bootstrap.sh --test)")


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    _needs("openssl")
    return make_certificate(tmp_path_factory.mktemp("tls"), tuple(PROXIES.values()))


@asynccontextmanager
async def bridge_behind(
    name: str, tmp_path: Path, certificate: Certificate, **sections: object
) -> AsyncIterator[tuple[Bridge, Proxy]]:
    """The bridge (public URL ``https://voicebridge.test``) and proxy ``name`` before it."""
    _needs(name)
    async with running_bridge(
        public_url=PUBLIC_URL, twilio={"allow_insecure_stream_url": False}, **sections
    ) as bridge, running_proxy(
        name, tmp_path / name, PROXIES[name], bridge.listening.port, certificate
    ) as proxy:
        yield bridge, proxy


@pytest.mark.parametrize("name", sorted(PROXIES))
async def test_calls_through_the_proxy_over_wss(
    name: str, tmp_path: Path, certificate: Certificate, caplog: pytest.LogCaptureFixture
) -> None:
    reports = []
    trust = {"trusted_proxies": ("127.0.0.1",)}
    with trio.fail_after(40), caplog.at_level(logging.INFO, logger="voicebridge"):
        async with bridge_behind(name, tmp_path, certificate, server=trust) as (bridge, proxy):
            caller = attrs.evolve(bridge.caller, bridge_url=proxy.url,
                                  ca_file=str(certificate.cert))

            async def call() -> None:
                reports.append(await place_call(caller, SHORT_CALL))

            async with trio.open_nursery() as nursery:
                for _ in range(2):
                    nursery.start_soon(call)
            records = [bridge.record(report.call_sid) for report in reports]
    for report, record in zip(reports, records, strict=True):
        # The stream went through the proxy's TLS as a WebSocket (wss://), both ways.
        assert report.streamed and report.protocol_violations == []
        assert report.first_audio_ms is not None and report.bytes_heard > 8000 * 2
        assert record.frames_from_caller > 50
        # The assistant ended the call; the <Connect action> came back through the proxy.
        assert report.final_action == "hangup", report.final_say
        assert record.outcome.value == "assistant-ended"
    # The stream's client as the proxy forwarded it (the proxy's own peer address would
    # carry its port).
    ends = [record_fields(r) for r in caplog.records if record_fields(r).get("EVENT") == "call-end"]
    assert sorted(str(fields.get("REMOTE")) for fields in ends) == ["127.0.0.1", "127.0.0.1"]


@pytest.mark.parametrize("name", sorted(PROXIES))
async def test_only_the_bridges_routes_are_exposed_over_http_1_1(
    name: str, tmp_path: Path, certificate: Certificate
) -> None:
    context = ssl.create_default_context(cafile=str(certificate.cert))
    context.set_alpn_protocols(["h2", "http/1.1"])
    with trio.fail_after(20):
        async with bridge_behind(name, tmp_path, certificate) as (_, proxy):
            async with httpx.AsyncClient(verify=context) as http:
                ops = {path: (await http.get(proxy.url + path)).status_code
                       for path in ("/metrics", "/healthz", "/readyz", "/")}
                unsigned = await http.post(proxy.url + "/twilio/voice", data={"CallSid": "CA1"})
            stream = await trio.open_ssl_over_tcp_stream(proxy.host, proxy.port,
                                                         ssl_context=context)
            await stream.do_handshake()
            alpn = stream.selected_alpn_protocol()
            await stream.aclose()
    # Health and metrics stay on the ops listener; the proxy answers 404 itself.
    assert ops == {"/metrics": 404, "/healthz": 404, "/readyz": 404, "/": 404}
    # A webhook reaches the bridge, which checks its signature.
    assert unsigned.status_code == 403
    assert alpn in ("http/1.1", None), "HTTP/2 is not offered: the stream is an HTTP/1.1 upgrade"


@pytest.mark.parametrize("name", sorted(PROXIES))
async def test_loadtest_through_the_proxy(
    name: str, tmp_path: Path, certificate: Certificate
) -> None:
    assistant_port = free_port("127.0.0.1")
    async with bridge_behind(
        name, tmp_path, certificate, vapi={"base_url": f"http://127.0.0.1:{assistant_port}"},
    ) as (bridge, proxy):
        auth_token = bridge.caller.auth_token
        key = bridge.config.credentials.vapi_api_key
        assert key is not None
        command = [
            sys.executable, "-m", "voicebridge", "loadtest", "--calls", "4", "--duration", "3",
            "--ramp", "1", "--json", "--url", proxy.url, "--public-url", PUBLIC_URL,
            "--ca-file", str(certificate.cert), "--assistant-port", str(assistant_port),
        ]
        # The secrets as an operator passes them: never in argv.
        secrets = {"VOICEBRIDGE_TWILIO_AUTH_TOKEN": auth_token,
                   "VOICEBRIDGE_VAPI_API_KEY": key.reveal()}
        with trio.fail_after(60):
            result = await trio.run_process(command, capture_stdout=True,
                                            capture_stderr=True, check=False,
                                            env={**os.environ, **secrets})
    report = json.loads(result.stdout)
    assert report["calls"] == 4 and report["failed_calls"] == 0, report["failures"]
    # Exit 1 also marks a run whose own pacing slipped (this machine is shared): that says
    # nothing about the proxy, so only that reason is let through.
    assert all("pacing" in reason for reason in report["invalid_reasons"]), report
    assert result.returncode == (0 if report["valid"] else 1)
    assert report["frames"]["caller_to_agent"]["measured"] > 0
    assert report["frames"]["agent_to_caller"]["measured"] > 0


async def test_loadtest_refuses_an_untrusted_proxy(
    tmp_path: Path, certificate: Certificate
) -> None:
    _needs("nginx")
    assistant_port = free_port("127.0.0.1")
    async with bridge_behind(
        "nginx", tmp_path, certificate, vapi={"base_url": f"http://127.0.0.1:{assistant_port}"},
    ) as (bridge, proxy):
        command = [
            sys.executable, "-m", "voicebridge", "loadtest", "--calls", "1", "--duration", "2",
            "--ramp", "1", "--json", "--url", proxy.url, "--public-url", PUBLIC_URL,
            "--assistant-port", str(assistant_port),
        ]
        with trio.fail_after(60):
            result = await trio.run_process(
                command, capture_stdout=True, capture_stderr=True, check=False,
                env={"PATH": "/usr/bin:/bin", "SSL_CERT_FILE": "/dev/null",
                     "VOICEBRIDGE_TWILIO_AUTH_TOKEN": bridge.caller.auth_token,
                     "VOICEBRIDGE_VAPI_API_KEY": "k"},
            )
    assert result.returncode != 0, result.stderr.decode()[-2000:]
    assert result.stdout, result.stderr.decode()[-2000:]
    report = json.loads(result.stdout)
    assert report["failed_calls"] == 1
    assert "CERTIFICATE_VERIFY_FAILED" in json.dumps(report["failures"]), report["failures"]


@pytest.mark.parametrize("name", sorted(PROXIES))
@pytest.mark.parametrize("trusted", [True, False])
async def test_the_logs_name_the_client_behind_a_trusted_proxy_alone(
    name: str, trusted: bool, tmp_path: Path, certificate: Certificate,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The client comes from 127.0.0.5 and claims another address; the proxy reaches the
    # bridge from 127.0.0.1.
    transport = httpx.AsyncHTTPTransport(
        local_address="127.0.0.5", verify=ssl.create_default_context(cafile=certificate.cert)
    )
    server = {"trusted_proxies": ("127.0.0.1",) if trusted else ()}
    with trio.fail_after(20), caplog.at_level(logging.WARNING, logger="voicebridge"):
        async with bridge_behind(name, tmp_path, certificate, server=server) as (
            _, proxy
        ), httpx.AsyncClient(transport=transport) as http:
            refused = await http.post(proxy.url + "/twilio/voice", data={"CallSid": "CA1"},
                                      headers={"X-Forwarded-For": "203.0.113.9"})
    assert refused.status_code == 403
    [rejected] = [record_fields(r) for r in caplog.records
                  if record_fields(r).get("EVENT") == "webhook-rejected"]
    assert rejected["REMOTE"] == ("127.0.0.5" if trusted else "127.0.0.1")


@pytest.mark.parametrize(
    ("peer", "header", "client"),
    [
        ("127.0.0.1", "198.51.100.7", "198.51.100.7"),
        # Appended to by several hops: the last one, which the trusted proxy added.
        ("127.0.0.1", "203.0.113.9, 198.51.100.7", "198.51.100.7"),
        ("10.1.2.3", "2001:db8::1", "2001:db8::1"),
        # Not a trusted peer: whatever it claims is ignored.
        ("192.0.2.1", "198.51.100.7", None),
        # Trusted, but the header ends in no address.
        ("127.0.0.1", "198.51.100.7, unknown", None),
        ("127.0.0.1", "", None),
        ("127.0.0.1", None, None),
    ],
)
def test_forwarded_client(peer: str, header: str | None, client: str | None) -> None:
    trusted = ("127.0.0.1", "10.0.0.0/8")
    assert client_address(peer, trusted=trusted, forwarded_for=header) == (client or peer)
    assert client_address(peer, trusted=(), forwarded_for=header) == peer
