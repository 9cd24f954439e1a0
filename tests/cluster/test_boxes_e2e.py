"""Two boxes as one service, end to end: two real ``voicebridge serve`` processes, one on
127.0.0.2 and one on 127.0.0.3, each with its own ``server.box_url``, sharing one real
``redis-server`` (127.0.0.4), and the simulated Twilio and Vapi in this process.

The test is the balancer: it chooses which box a voice webhook reaches (signed, as Twilio
signs it, for the shared ``public_url``); everything after the webhook goes where the
box's TwiML says, which is the box itself. What a user would notice: the TwiML and the
call each caller gets, the assistant calls Vapi was asked for, the boxes' logs and
metrics.
"""

from __future__ import annotations

import itertools
import json
import shutil
import signal
import socket
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import httpx
import pytest
import trio
import trio_websocket
from prometheus_client.parser import text_string_to_metric_families

from tests.cluster.redis_fixture import RedisServer, free_port, needs_redis, running_redis
from tests.test_admission_e2e import CapturedWebhook, stream_parameters
from tests.test_systemd_integration import (
    FALLBACK_WORDS,
    OVERFLOW_WORDS,
    SHORT_ASSISTANT,
    SHORT_CALL,
    Box,
    Server,
    a_box,
    activated_server,
    is_ready,
)
from voicebridge.loopback import LOOPBACK_ACCOUNT_SID
from voicebridge.sim.caller import CallReport, SimTwilioSettings, place_call
from voicebridge.twilio.signature import sign

pytestmark = needs_redis
HAPROXY = shutil.which("haproxy") or (
    "/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None
)

LEASE_S = 1.5
BOX_HOSTS = ("127.0.0.2", "127.0.0.3")
#: Each box's ops port, on its own address (known before it starts: the balancer's
#: configuration names it).
OPS_PORTS = {host: free_port(host) for host in BOX_HOSTS}


@attrs.frozen
class EdgeBox:
    """One box: its server process, the address its socket is on, its own URL."""

    server: Server
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def ops_url(self) -> str:
        return f"http://{self.host}:{OPS_PORTS[self.host]}"


@attrs.frozen
class Service:
    box: Box
    redis: RedisServer
    public_url: str
    a: EdgeBox
    b: EdgeBox

    def caller_via(self, edge: EdgeBox) -> SimTwilioSettings:
        """The simulated Twilio, its voice webhook sent to ``edge`` by the balancer."""
        return SimTwilioSettings(
            bridge_url=edge.url,
            public_url=self.public_url,
            account_sid=LOOPBACK_ACCOUNT_SID,
            auth_token=self.box.auth_token,
        )

    async def webhook(self, http: httpx.AsyncClient, edge: EdgeBox, call_sid: str) -> str:
        webhook = CapturedWebhook.sent_by(self.caller_via(edge), call_sid)
        response = await http.post(
            edge.url + webhook.path,
            data=webhook.form,
            headers={"X-Twilio-Signature": webhook.signature},
        )
        assert response.status_code == 200, response.text
        return response.text

    async def webhook_at(self, http: httpx.AsyncClient, url: str, call_sid: str) -> str:
        """``call_sid``'s voice webhook, sent to ``url`` (the balancer)."""
        webhook = CapturedWebhook.sent_by(self.caller_via(self.a), call_sid)
        response = await http.post(
            url + webhook.path, data=webhook.form, headers={"X-Twilio-Signature": webhook.signature}
        )
        assert response.status_code == 200, response.text
        return response.text

    async def action(self, http: httpx.AsyncClient, edge: EdgeBox, call_sid: str) -> str:
        """The ``<Connect action>`` of ``call_sid``, as if it came through the balancer."""
        form = {
            "CallSid": call_sid, "AccountSid": LOOPBACK_ACCOUNT_SID, "CallStatus": "in-progress"
        }
        signature = sign(self.public_url + "/twilio/after-stream", form, self.box.auth_token)
        response = await http.post(
            edge.url + "/twilio/after-stream", data=form, headers={"X-Twilio-Signature": signature}
        )
        assert response.status_code == 200, response.text
        return response.text


def sid(n: int) -> str:
    return f"CA{n:032x}"


def write_config(
    box: Box,
    name: str,
    *,
    public_url: str,
    box_url: str,
    redis: str,
    ops_listen: str = "127.0.0.1:0",
    **cluster: object,
) -> Path:
    path = box.tmp_path / name
    lines = [
        "[server]",
        f'public_url = "{public_url}"',
        f'box_url = "{box_url}"',
        'log_target = "stderr"',
        f'ops_listen = "{ops_listen}"',
        "max_concurrent_calls = 5",
        "[twilio]",
        f'account_sid = "{LOOPBACK_ACCOUNT_SID}"',
        "allow_insecure_stream_url = true",
        "[vapi]",
        f'base_url = "{box.vapi.base_url}"',
        'assistant_id = "sim"',
        "[cluster]",
        f'redis_url = "{redis}"',
        f"lease_s = {LEASE_S}",
        *(f"{key} = {json.dumps(value)}" for key, value in cluster.items()),
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@asynccontextmanager
async def a_service(
    tmp_path: Path, *, public_url: str = "http://127.0.0.1:9", **cluster: object
) -> AsyncIterator[Service]:
    """Two boxes sharing a Redis; ``public_url`` is the balancer's name (by default one
    nothing listens at: the test is the balancer). Each box's ops listener is on the
    box's own address, port ``ops_ports[i]`` (a balancer's health check asks it)."""
    sockets = [socket.create_server((host, 0), backlog=64) for host in BOX_HOSTS]
    with sockets[0], sockets[1]:
        ports = [int(s.getsockname()[1]) for s in sockets]
        async with (
            running_redis(tmp_path / "redis") as redis,
            a_box(tmp_path, SHORT_ASSISTANT) as box,
        ):
            configs = [
                write_config(
                    box, f"{name}.toml", public_url=public_url,
                    box_url=f"http://{host}:{port}", redis=redis.url,
                    ops_listen=f"{host}:{OPS_PORTS[host]}", **cluster,
                )
                for name, host, port in zip("ab", BOX_HOSTS, ports, strict=True)
            ]  # fmt: skip
            async with (
                activated_server(box, configs[0], [("http", sockets[0])]) as a,
                activated_server(box, configs[1], [("http", sockets[1])]) as b,
            ):
                await box.notify.wait_for(is_ready, count=2)
                yield Service(
                    box, redis, public_url,
                    EdgeBox(a, "127.0.0.2", ports[0]), EdgeBox(b, "127.0.0.3", ports[1]),
                )  # fmt: skip
                for server in (a, b):
                    if server.process.returncode is None:
                        server.signal(signal.SIGTERM)


async def start_stream(edge: EdgeBox, call_sid: str, parameters: dict[str, str]) -> int:
    """Open ``edge``'s media socket, send a ``start`` carrying ``parameters``; how many
    messages the box sent before closing the socket (it must close it)."""
    stream_sid = "MZ" + "9" * 32
    start = {
        "event": "start", "sequenceNumber": "1", "streamSid": stream_sid,
        "start": {
            "accountSid": LOOPBACK_ACCOUNT_SID, "streamSid": stream_sid,
            "callSid": call_sid, "tracks": ["inbound"],
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            "customParameters": parameters,
        },
    }  # fmt: skip
    received = 0
    with trio.fail_after(5):
        async with trio_websocket.open_websocket_url(
            f"ws://{edge.host}:{edge.port}/twilio/stream"
        ) as ws:
            await ws.send_message(json.dumps(start))
            with pytest.raises(trio_websocket.ConnectionClosed):
                while True:
                    await ws.get_message()
                    received += 1
    return received


async def counter(edge: EdgeBox, name: str) -> float:
    async with httpx.AsyncClient() as http:
        response = await http.get(edge.ops_url() + "/metrics")
    return sum(
        sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
        if sample.name == name
    )


async def test_a_call_runs_on_its_box_and_its_token_is_refused_by_the_other(
    tmp_path: Path,
) -> None:
    with trio.fail_after(60):
        async with a_service(tmp_path) as service, httpx.AsyncClient() as http:
            a, b = service.a, service.b
            # A whole call through box A: the stream and the action go to A's own URL.
            report = await place_call(service.caller_via(a), SHORT_CALL, call_sid=sid(1))
            # A fresh call admitted by A; its unused token presented at B.
            twiml = await service.webhook(http, a, sid(2))
            at_b = await start_stream(b, sid(2), stream_parameters(twiml))
            # The used token of the first call, at B.
            replayed = await start_stream(b, sid(1), stream_parameters(report.webhook_twiml))
            # Box B answers the first call's <Connect action> right (from the store).
            action_at_b = await service.action(http, b, sid(1))
            unknown_at_b = await service.action(http, b, sid(9))
    assert f'url="ws://127.0.0.2:{a.port}/twilio/stream"' in report.webhook_twiml
    assert f'action="http://127.0.0.2:{a.port}/twilio/after-stream"' in report.webhook_twiml
    assert report.final_action == "hangup" and report.protocol_violations == []
    assert (at_b, replayed) == (0, 0)
    assert [call.call_sid for call in service.box.vapi.calls.values()] == [sid(1)]
    assert len(b.server.log_lines("stream token bad-signature")) == 2
    assert "<Hangup" in action_at_b
    assert FALLBACK_WORDS in unknown_at_b


async def test_the_cluster_limit_holds_across_boxes_and_a_killed_box_frees_its_slots(
    tmp_path: Path,
) -> None:
    with trio.fail_after(60):
        async with a_service(tmp_path, max_calls=3) as service, httpx.AsyncClient() as http:
            a, b = service.a, service.b
            # Box A takes two of the three slots; then eight callers ring at once, at both.
            first = [await service.webhook(http, a, sid(n)) for n in (90, 91)]
            answers: dict[str, str] = {}

            async def ring(edge: EdgeBox, n: int) -> None:
                answers[sid(n)] = await service.webhook(http, edge, sid(n))

            async with trio.open_nursery() as nursery:
                for n in range(8):
                    nursery.start_soon(ring, (a, b)[n % 2], n)
            admitted = [s for s, text in answers.items() if "<Connect" in text]
            overflowed = [s for s, text in answers.items() if OVERFLOW_WORDS in text]
            # kill -9 of box A: its reservations' slots come back within the lease.
            a.server.process.kill()
            killed_at = trio.current_time()
            refused_after_kill = 0
            while True:
                text = await service.webhook(http, b, sid(100 + refused_after_kill))
                if "<Connect" in text:
                    break
                assert OVERFLOW_WORDS in text
                refused_after_kill += 1
                await trio.sleep(0.05)
            freed_after_s = trio.current_time() - killed_at
            refused = await counter(b, "voicebridge_admissions_refused_total")
    assert all("<Connect" in text for text in first)
    assert len(admitted) == 1 and len(overflowed) == 7
    # Held until A's last lease ran out (renewed every third of it), no longer.
    assert refused_after_kill >= 1
    assert LEASE_S / 3 <= freed_after_s <= LEASE_S + 1.0
    assert refused >= refused_after_kill


async def test_the_store_going_away_mid_run(tmp_path: Path) -> None:
    with trio.fail_after(90):
        async with a_service(tmp_path, max_calls=1) as service, httpx.AsyncClient() as http:
            a, b = service.a, service.b
            async with trio.open_nursery() as nursery:
                calls: list[CallReport] = []

                async def call_on_a() -> None:
                    caller = service.caller_via(a)
                    calls.append(await place_call(caller, SHORT_CALL, call_sid=sid(1)))

                nursery.start_soon(call_on_a)
                await a.server.wait_for_log(f"call {sid(1)} started")
                full = await service.webhook(http, b, sid(2))  # the one slot is taken
                await service.redis.stop()
                started = trio.current_time()
                during = await service.webhook(http, b, sid(3))  # box B's own limit now
                during_s = trio.current_time() - started
            [report] = calls
            await service.redis.start()
            # Back by itself: the calls the boxes hold fill the store again, and the
            # cluster limit applies (B holds sid(3)'s reservation: the next is refused).
            with trio.fail_after(LEASE_S * 3):
                for n in itertools.count(4):
                    await trio.sleep(0.1)
                    if OVERFLOW_WORDS in await service.webhook(http, a, sid(n)):
                        break
            failures = await counter(b, "voicebridge_cluster_store_failures_total")
    assert OVERFLOW_WORDS in full
    assert "<Connect" in during and during_s < 1.0
    assert report.final_action == "hangup" and report.protocol_violations == []
    assert len(b.server.log_lines("cluster store: acquire failed")) == 1
    assert len(b.server.log_lines("cluster store answers again")) == 1
    assert failures >= 1


# -- behind a real balancer ----------------------------------------------------------

BALANCER_HOST = "127.0.0.5"
#: Checks every 100 ms; one failed check takes a box out of the pool, one good one back.
HAPROXY_CFG = """\
global
    maxconn 256
defaults
    mode http
    timeout connect 2s
    timeout client 30s
    timeout server 30s
frontend voice
    bind {host}:{port}
    default_backend boxes
backend boxes
    balance roundrobin
    option httpchk GET /readyz
    default-server inter 100ms fall 1 rise 1
    server a {a_host}:{a_port} check port {a_ops}
    server b {b_host}:{b_port} check port {b_ops}
"""


@asynccontextmanager
async def running_haproxy(directory: Path, port: int, service: Service) -> AsyncIterator[str]:
    """Debian's HAProxy balancing the voice webhook over the two boxes; its URL."""
    assert HAPROXY is not None
    config = directory / "haproxy.cfg"
    await trio.Path(config).write_text(
        HAPROXY_CFG.format(
            host=BALANCER_HOST, port=port,
            a_host=service.a.host, a_port=service.a.port, a_ops=OPS_PORTS[service.a.host],
            b_host=service.b.host, b_port=service.b.port, b_ops=OPS_PORTS[service.b.host],
        )
    )  # fmt: skip
    log = directory / "haproxy.log"
    with log.open("wb") as out:
        process = await trio.lowlevel.open_process(
            [HAPROXY, "-db", "-f", str(config)],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        yield f"http://{BALANCER_HOST}:{port}"
    finally:
        process.terminate()
        with trio.move_on_after(5):
            await process.wait()
        if process.returncode is None:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()


async def wait_listening(host: str, port: int) -> None:
    with trio.fail_after(10):
        while True:
            try:
                stream = await trio.open_tcp_stream(host, port)
            except OSError:
                await trio.sleep(0.05)  # not listening yet: nothing to wait on but time
                continue
            await stream.aclose()
            return


def answered_by(service: Service, twiml: str) -> str:
    """Which box's TwiML ``twiml`` is ("a" or "b"), or "" (the overflow message)."""
    for name, edge in (("a", service.a), ("b", service.b)):
        if f"{edge.host}:{edge.port}" in twiml:
            return name
    return ""


@pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (bootstrap.sh --test)")
async def test_calls_through_a_real_balancer(tmp_path: Path) -> None:
    port = free_port(BALANCER_HOST)
    balancer = f"http://{BALANCER_HOST}:{port}"
    with trio.fail_after(90):
        async with (
            a_service(tmp_path, public_url=balancer, max_calls=2) as service,
            running_haproxy(tmp_path, port, service),
            httpx.AsyncClient() as http,
        ):
            via = SimTwilioSettings(
                bridge_url=balancer, public_url=balancer,
                account_sid=LOOPBACK_ACCOUNT_SID, auth_token=service.box.auth_token,
            )  # fmt: skip
            await wait_listening(BALANCER_HOST, port)
            reports: list[CallReport] = []

            async def call(n: int) -> None:
                reports.append(await place_call(via, SHORT_CALL, call_sid=sid(n)))

            async with trio.open_nursery() as nursery:  # three callers at once
                for n in range(3):
                    nursery.start_soon(call, n)
            # Box A dies: the balancer's next check takes it out of the pool.
            service.a.server.process.kill()
            await trio.sleep(0.5)
            after = [await service.webhook_at(http, balancer, sid(n)) for n in (10, 11)]
    served = [r for r in reports if r.final_action == "hangup"]
    refused = [r for r in reports if OVERFLOW_WORDS in r.final_say]
    assert len(served) == 2 and len(refused) == 1
    assert {answered_by(service, r.webhook_twiml) for r in served} <= {"a", "b"}
    assert all(r.protocol_violations == [] for r in reports)
    assert len(service.box.vapi.calls) == 2
    assert [answered_by(service, twiml) for twiml in after] == ["b", "b"]
