"""Rotating the Twilio Auth Token and the stream token secret with ``systemctl reload``
(SIGHUP), no call refused.

Charter: the real ``voicebridge serve`` in a subprocess, handed its sockets as systemd
does (the helpers of tests/test_systemd_integration.py), secrets in files named by
``[secrets]`` so that a reload re-reads them; loopback only, under ``trio.fail_after``.
What a user would notice: the voice webhook answered with ``<Connect>`` or refused 403.
"""

from __future__ import annotations

import secrets
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest
import trio

from tests.test_systemd_integration import (
    PATIENT_ASSISTANT,
    Box,
    Server,
    a_box,
    activated_server,
    is_ready,
    listener,
)
from voicebridge.loopback import LOOPBACK_ACCOUNT_SID
from voicebridge.sim.caller import CallReport, Hangup, Silence, place_call
from voicebridge.twilio.signature import sign


async def answer(port: int, call_sid: str, token: str) -> int:
    """The status of a voice webhook signed with ``token`` (200 with ``<Connect>``, or 403)."""
    url = f"http://127.0.0.1:{port}/twilio/voice"
    form = {"CallSid": call_sid, "AccountSid": LOOPBACK_ACCOUNT_SID,
            "From": "+15550100001", "To": "+15550100002"}
    async with httpx.AsyncClient() as http:
        response = await http.post(
            url, data=form, headers={"X-Twilio-Signature": sign(url, form, token)}
        )
    assert response.status_code == 403 or "<Connect" in response.text, response.text
    return response.status_code


async def test_a_reload_rotates_the_auth_token_without_refusing_either(tmp_path: Path) -> None:
    old, new = secrets.token_hex(16), secrets.token_hex(16)
    current, previous = tmp_path / "twilio-auth-token", tmp_path / "twilio-auth-token-previous"
    current.write_text(old + "\n")
    previous.write_text("")  # an empty previous token: none
    sock, port = listener()
    ops_sock, _ = listener()
    sids = (f"CA{n:032x}" for n in range(1, 100))
    with trio.fail_after(30), sock, ops_sock:
        async with a_box(tmp_path, PATIENT_ASSISTANT) as box:
            config = box.write_config("vb.toml", public_port=port, drain_deadline_s=0.5)
            config.write_text(
                config.read_text()
                + f'[secrets]\ntwilio_auth_token_file = "{current}"\n'
                + f'twilio_auth_token_previous_file = "{previous}"\n'
            )
            sockets = [("public", sock), ("ops", ops_sock)]
            async with activated_server(box, config, sockets) as server:
                await box.notify.wait_for(is_ready)

                async def reload() -> None:
                    before = len(box.notify.received)
                    server.signal(signal.SIGHUP)
                    await box.notify.wait_for(is_ready, since=before)

                start = [await answer(port, next(sids), t) for t in (old, new)]
                # Step 1: the secondary token is ours, the old one is kept as previous.
                current.write_text(new + "\n")
                previous.write_text(old + "\n")
                await reload()
                during = [await answer(port, next(sids), t) for t in (old, new)]
                # Step 2 (after Twilio promoted the secondary): the old one is dropped.
                previous.write_text("")
                await reload()
                after = [await answer(port, next(sids), t) for t in (old, new)]
                server.signal(signal.SIGTERM)
                assert await server.process.wait() == 0
    assert start == [200, 403]
    assert during == [200, 200]
    assert after == [403, 200]
    first, second = server.log_lines("configuration reloaded")
    assert "secrets changed: twilio_auth_token, twilio_auth_token_previous;" in first
    assert "secrets changed: twilio_auth_token_previous;" in second
    assert old not in server.stderr and new not in server.stderr


class ReloadAfterTheWebhook(httpx.AsyncBaseTransport):
    """Runs ``between`` once the voice webhook is answered and before the simulated
    Twilio sees the answer: its stream then opens with a token issued before."""

    def __init__(self, between: Callable[[], Awaitable[None]]) -> None:
        self._between = between
        self._transport = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self._transport.handle_async_request(request)
        if request.url.path == "/twilio/voice":
            await response.aread()
            await self._between()
        return response

    async def aclose(self) -> None:
        await self._transport.aclose()


async def reload(box: Box, server: Server) -> None:
    before = len(box.notify.received)
    server.signal(signal.SIGHUP)
    await box.notify.wait_for(is_ready, since=before)


@pytest.mark.parametrize("keep_previous", [True, False])
async def test_a_stream_token_issued_before_a_rotation_still_opens_its_stream(
    tmp_path: Path, keep_previous: bool
) -> None:
    """The webhook issues a token with the old secret; a reload makes a new secret
    current before the stream opens. With the old one kept as previous the call goes
    through; without it (the control) the stream is refused."""
    old, new = secrets.token_hex(32), secrets.token_hex(32)
    current = tmp_path / "stream-token-secret"
    previous = tmp_path / "stream-token-secret-previous"
    current.write_text(old + "\n")
    previous.write_text("")
    sock, port = listener()
    ops_sock, _ = listener()
    with trio.fail_after(30), sock, ops_sock:
        async with a_box(tmp_path, PATIENT_ASSISTANT) as box:
            config = box.write_config("vb.toml", public_port=port, drain_deadline_s=0.5)
            config.write_text(
                config.read_text()
                + f'[secrets]\nstream_token_secret_file = "{current}"\n'
                + f'stream_token_secret_previous_file = "{previous}"\n'
            )
            sockets = [("public", sock), ("ops", ops_sock)]
            async with activated_server(box, config, sockets) as server:
                await box.notify.wait_for(is_ready)

                async def rotate() -> None:
                    current.write_text(new + "\n")
                    previous.write_text(old + "\n" if keep_previous else "")
                    await reload(box, server)

                transport = ReloadAfterTheWebhook(rotate)
                async with httpx.AsyncClient(transport=transport) as http:
                    report: CallReport = await place_call(
                        box.caller(port=port), (Silence(1.0), Hangup()), http=http
                    )
                server.signal(signal.SIGTERM)
                assert await server.process.wait() == 0
    assert report.webhook_status == 200 and "<Connect" in report.webhook_twiml
    assert len(server.log_lines("configuration reloaded")) == 1
    if keep_previous:
        assert report.streamed and report.ended_by == "caller", report
        assert len(box.vapi.calls) == 1, "the assistant was called"
    else:
        assert len(box.vapi.calls) == 0, "no assistant for a stream whose token was refused"
        assert server.log_lines("bad-signature"), server.stderr
    assert old not in server.stderr and new not in server.stderr
