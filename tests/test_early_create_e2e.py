"""``[vapi] create_early`` end to end: the real server on loopback, the simulated Twilio's
signed webhooks and stream, the simulated Vapi counting the calls it was asked for.

Charter: loopback only, port 0, a ``trio.fail_after`` guard on every test, real time and
short clips (``tests.harness.SHORT_ASSISTANT``). The drain test runs the server alone (the
simulated Vapi outlives it, as Vapi does); the last test runs two ``voicebridge serve``
processes of one box sharing a directory.
"""

from __future__ import annotations

import logging
import secrets
import signal
from functools import partial
from pathlib import Path

import attrs
import httpx
import pytest
import trio

from tests.harness import SHORT_ASSISTANT, running_bridge
from tests.test_admission_e2e import CapturedWebhook, events
from tests.test_e2e import SHORT_SCRIPT, assert_served
from tests.test_systemd_integration import SHORT_CALL, a_box, activated_server, is_ready, listener
from voicebridge.loopback import LOOPBACK_ACCOUNT_SID, loopback_config
from voicebridge.server import bind_listener, serve
from voicebridge.sim.caller import SimTwilioSettings, place_call
from voicebridge.sim.vapi import SimVapi

EARLY = {"create_early": True}
CREATED_EARLY = "voicebridge_assistant_calls_created_early_total"


async def test_a_webhook_repeated_by_twilio_creates_one_call_the_stream_takes() -> None:
    call_sid = "CA" + "6" * 32
    with trio.fail_after(40):
        async with running_bridge(vapi=EARLY) as bridge, httpx.AsyncClient() as http:
            webhook = CapturedWebhook.of(bridge, call_sid)
            answers = [await webhook.post(http, bridge) for _ in range(3)]
            await trio.sleep(0.3)  # Twilio sets up the stream meanwhile
            [early] = bridge.vapi.calls.values()
            assert early.call_sid == call_sid and early.connected_at is None
            report = await place_call(bridge.caller, SHORT_SCRIPT, call_sid=call_sid)
            assert_served(report, bridge)
            assert list(bridge.vapi.calls) == [early.id]
            assert early.connected_at is not None
            metrics = (await http.get(bridge.ops_url + "/metrics")).text
    assert f'{CREATED_EARLY}{{fate="taken",worker="0"}} 1.0' in metrics
    assert len({answer.text for answer in answers}) == 1


async def test_a_stream_that_never_comes_ends_the_call_created_early(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="voicebridge")
    call_sid = "CA" + "7" * 32
    with trio.fail_after(40):
        async with (
            running_bridge(vapi=EARLY, twilio={"start_deadline_s": 1.0}) as bridge,
            httpx.AsyncClient() as http,
        ):
            answered = trio.current_time()
            await CapturedWebhook.of(bridge, call_sid).post(http, bridge)
            await trio.sleep(0.3)
            [early] = bridge.vapi.calls.values()
            await early.wait_ended()
            assert trio.current_time() - answered >= 1.0
            assert early.end_call_received_at is not None
            metrics = (await http.get(bridge.ops_url + "/metrics")).text
    assert f'{CREATED_EARLY}{{fate="unused",worker="0"}} 1.0' in metrics
    assert f'{CREATED_EARLY}{{fate="taken",worker="0"}} 0.0' in metrics
    assert [f["EVENT"] for f in events(caplog, call_sid)] == ["early-call-unused"]


async def test_a_drain_before_the_stream_ends_the_call_created_early(
    nursery: trio.Nursery,
) -> None:
    # The server alone is stopped (the simulated Vapi lives on, as Vapi does).
    call_sid = "CA" + "8" * 32
    vapi = SimVapi(api_key=secrets.token_hex(16))
    await nursery.start(vapi.serve)
    listener = bind_listener("127.0.0.1:0")
    port = int(listener.getsockname()[1])
    config = loopback_config(
        port=port, vapi_base_url=vapi.base_url, auth_token=secrets.token_hex(16),
        api_key=vapi.api_key,
    )
    config = config.evolve(
        vapi=attrs.evolve(config.vapi, create_early=True),
        # The stream would be waited for long; the drain is what ends the call.
        twilio=attrs.evolve(config.twilio, start_deadline_s=30.0),
        server=attrs.evolve(config.server, drain_deadline_s=0.5),
    )
    caller = SimTwilioSettings(
        bridge_url=f"http://127.0.0.1:{port}", public_url=config.server.public_url,
        account_sid=LOOPBACK_ACCOUNT_SID, auth_token=config.credentials.twilio_auth_token.reveal(),
    )
    stop = trio.Event()
    with trio.fail_after(20):
        async with trio.open_nursery() as server_nursery:
            await server_nursery.start(partial(serve, config, listeners=[listener], stop=stop))
            async with httpx.AsyncClient() as http:
                answer = await CapturedWebhook.sent_by(caller, call_sid).post_to(http, port)
            assert answer.status_code == 200
            await trio.sleep(0.3)
            [early] = vapi.calls.values()
            stop.set()  # SIGTERM: the drain, its deadline, the server stops
        assert early.ended_at is not None
        assert early.end_call_received_at is not None
        assert early.connected_at is not None and early.caller_audio_bytes == 0


async def test_the_stream_on_another_process_of_the_box_takes_the_call(tmp_path: Path) -> None:
    # Two `voicebridge serve` processes sharing one directory, each on a socket of its
    # own, so that the test chooses where each request lands.
    (public_sock, public_port), (sock_a, port_a), (sock_b, port_b) = (listener() for _ in "abc")
    taken_sid, unused_sid = "CA" + "a" * 32, "CA" + "b" * 32
    with trio.fail_after(40), public_sock, sock_a, sock_b:
        async with a_box(tmp_path, SHORT_ASSISTANT) as box:
            config = box.write_config(
                "vb.toml", public_port=public_port, shared_dir=str(tmp_path / "run")
            )
            text = config.read_text().replace("[twilio]\n", "[twilio]\nstart_deadline_s = 2.0\n")
            config.write_text(text + "create_early = true\n")
            async with (
                activated_server(box, config, [("http", sock_a)]) as a,
                activated_server(box, config, [("http", sock_b)]) as b,
                httpx.AsyncClient() as http,
            ):
                await box.notify.wait_for(is_ready, count=2)
                via_b = box.caller(port=port_b, public_port=public_port)
                # The webhook lands on A; Twilio's repeat of it and the stream on B.
                on_a = await CapturedWebhook.sent_by(via_b, taken_sid).post_to(http, port_a)
                unused = await CapturedWebhook.sent_by(via_b, unused_sid).post_to(http, port_a)
                await trio.sleep(0.3)
                report = await place_call(via_b, SHORT_CALL, call_sid=taken_sid)
                [early_unused] = [
                    c for c in box.vapi.calls.values() if c.call_sid == unused_sid
                ]
                await early_unused.wait_ended()
                for server in (a, b):
                    server.signal(signal.SIGTERM)
                assert (await a.process.wait(), await b.process.wait()) == (0, 0)
    assert "<Connect" in on_a.text and "<Connect" in unused.text
    assert report.webhook_twiml == on_a.text
    assert report.final_action == "hangup" and report.protocol_violations == []
    [taken] = [c for c in box.vapi.calls.values() if c.call_sid == taken_sid]
    assert taken.connected_at is not None and taken.caller_audio_bytes > 0
    assert len(box.vapi.calls) == 2
    assert early_unused.connected_at is not None and early_unused.caller_audio_bytes == 0
    assert early_unused.end_call_received_at is not None
    assert len(a.log_lines(f"call {unused_sid}: no media stream took")) == 1
    assert not a.log_lines(f"call {taken_sid}: no media stream took")
    assert list((tmp_path / "run" / "early").iterdir()) == []
