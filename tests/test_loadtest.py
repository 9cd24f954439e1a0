"""``voicebridge loadtest``: a short real run, and the pieces it is made of.

Charter: loopback only, port 0, real processes and real time kept short (a few
seconds). The run's figures are checked for shape and sanity only (no failed call,
nothing heard after a clear, every latency a plausible number), never against a
performance target: this machine is shared, and a timed assertion would be flaky.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from voicebridge.cli import main
from voicebridge.loadtest import cli as loadtest_cli
from voicebridge.loadtest import tls
from voicebridge.loadtest.cpu import split_cpu
from voicebridge.loadtest.generator import (
    MARKER_BYTES,
    MARKER_LEAD,
    MARKER_LIMIT,
    BridgeTarget,
    CallSpan,
    Playback,
    Traffic,
    ideal_wire_heard,
    marker,
    read_marker,
)
from voicebridge.loadtest.process import BridgeProcess, LoadTestError
from voicebridge.loadtest.report import Percentiles
from voicebridge.loadtest.run import (
    ExternalBridge,
    LoadTestOptions,
    Target,
    _report_progress,
    run_loadtest,
)
from voicebridge.loadtest.wire import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    LeanWebSocket,
    StampedSocket,
    WebSocketClosed,
    encode_frame,
)
from voicebridge.net.connect import accept_tls
from voicebridge.net.transport import SocketTransport, TlsSocketTransport
from voicebridge.sim.latency import LatencyModel

needs_openssl = pytest.mark.skipif(
    shutil.which("openssl") is None, reason="--vapi-tls makes its certificate with openssl"
)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tls.Certificate:
    if shutil.which("openssl") is None:
        pytest.skip("--vapi-tls makes its certificate with openssl")
    return trio.run(tls.make_certificate, tmp_path_factory.mktemp("vapi-tls"))


def test_the_json_of_a_short_run_has_every_key_and_sane_figures(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(
        [
            "loadtest",
            "--calls",
            "5",
            "--duration",
            "3",
            "--ramp",
            "1",
            "--barge-in-share",
            "1",
            "--json",
        ]
    )
    captured = capsys.readouterr()
    report = json.loads(captured.out)  # stdout is the report alone: progress is on stderr
    assert captured.err.startswith("voicebridge loadtest: 5 calls against voicebridge (pid "), (
        captured.err
    )
    assert code == 0, report
    assert report["calls"] == 5
    assert report["duration_s"] == 3
    assert report["valid"] is True
    assert report["failed_calls"] == 0
    assert report["heard_after_clear_ms"] == 0
    assert report["dropped_frames"] == 0
    added = report["added_latency_ms"]
    assert set(added) == {
        "caller_to_agent",
        "agent_to_caller_at_playback",
        "agent_to_caller_at_arrival",
    }
    # At playback it may be nothing at all, never less: the caller hears no chunk
    # earlier than the ideal wire would have played it.
    for direction, figures in added.items():
        assert set(figures) == {"p50", "p99", "max"}
        assert 0 <= figures["p50"] <= figures["p99"] <= figures["max"] < 1000, direction
    assert added["caller_to_agent"]["p50"] > 0
    assert added["agent_to_caller_at_arrival"]["p50"] > 0
    # The window is 2 s of 5 calls at 50 frames/s.
    assert report["frames"]["caller_to_agent"]["measured"] >= 400
    assert report["barge_ins"] >= 1
    assert set(report["barge_in_ms"]) >= {"p50", "p99"}
    assert 0 < report["barge_in_ms"]["p50"] < 1000
    assert 0 < report["first_audio_ms"]["p50"] <= report["first_audio_ms"]["p99"] < 5000
    assert report["cpu_us_per_call_second"] > 0
    assert report["rss_kib_per_call"] is not None
    assert 0 < report["generator_cpu_pct"] < 100
    assert report["vapi_tls"] is False
    assert report["vapi_tls_handshakes"] == 0
    # The caller's figures, on the default latency model: at least its own delays.
    model = LatencyModel()
    assert report["latency_model"] == model.describe()
    first_word = report["time_to_first_word_ms"]
    least = model.vapi_create_ms + model.twilio_stream_setup_ms + model.first_word_network_ms()
    assert least < first_word["p50"] <= first_word["p99"] <= first_word["max"] < least + 1000
    silence = report["speech_to_silence_ms"]
    least = model.speech_to_silence_extra_ms()
    assert least < silence["p50"] <= silence["p99"] <= silence["max"] < least + 1000


def test_without_the_latency_model_the_callers_figures_are_loopbacks(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(
        [
            "loadtest",
            "--calls",
            "3",
            "--duration",
            "2",
            "--ramp",
            "0.5",
            "--barge-in-share",
            "1",
            "--no-latency",
            "--json",
        ]
    )
    report = json.loads(capsys.readouterr().out)
    assert code == 0, report
    assert report["latency_model"] is None
    # Speech to silence is then the bridge's interrupted → clear, nothing added.
    assert report["speech_to_silence_ms"] == report["barge_in_ms"]
    assert 0 < report["time_to_first_word_ms"]["p50"] < LatencyModel().vapi_create_ms


def test_with_barge_in_at_the_edge_the_generators_calls_are_never_held(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The bridge's detector hears every caller frame while the assistant speaks; the
    # generator's frames are silence to it, so no turn is held (a held turn would wait
    # for the 800 ms confirm window, and its audio reach the caller that much later).
    code = main(
        [
            "loadtest",
            "--calls",
            "3",
            "--duration",
            "3",
            "--ramp",
            "0.5",
            "--barge-in-share",
            "0",
            "--no-latency",
            "--edge-barge-in",
            "--json",
        ]
    )
    report = json.loads(capsys.readouterr().out)
    assert code == 0, report
    assert report["failed_calls"] == 0 and report["dropped_frames"] == 0
    assert report["frames"]["agent_to_caller"]["measured"] > 0
    assert report["added_latency_ms"]["agent_to_caller_at_playback"]["max"] < 400
    assert report["added_latency_ms"]["agent_to_caller_at_arrival"]["max"] < 400
    assert report["barge_ins"] == 0


def test_a_misnamed_latency_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["loadtest", "--latency", "vapi_create=5"]) == 2
    assert "unknown latency 'vapi_create'" in capsys.readouterr().err


def test_the_table_is_readable(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["loadtest", "--calls", "2", "--duration", "2", "--ramp", "0.5"])
    table = capsys.readouterr().out
    assert code == 0, table
    assert table.splitlines()[0].endswith("Vapi leg ws:// (no TLS)")
    assert "Vapi TLS handshakes" not in table
    assert "added latency caller→agent (ms)" in table
    assert "added latency agent→caller at playback (ms)" in table
    assert "added latency agent→caller at arrival (ms)" in table
    assert "failed calls:               0" in table
    assert "result: VALID" in table


def test_an_external_bridge_needs_its_secrets(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VOICEBRIDGE_TWILIO_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("VOICEBRIDGE_VAPI_API_KEY", raising=False)
    assert main(["loadtest", "--url", "http://127.0.0.1:9", "--assistant-port", "9"]) == 2
    err = capsys.readouterr().err
    assert "--auth-token-file or $VOICEBRIDGE_TWILIO_AUTH_TOKEN" in err
    assert "--assistant-key-file or $VOICEBRIDGE_VAPI_API_KEY" in err


@pytest.mark.parametrize("option", ["--auth-token", "--assistant-key"])
def test_secrets_on_the_command_line_are_refused(
    capsys: pytest.CaptureFixture[str], option: str
) -> None:
    assert (
        main(
            [
                "loadtest",
                "--url",
                "http://127.0.0.1:9",
                "--assistant-port",
                "9",
                option,
                "s3cret-value",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert f"{option} would show the secret to every user (ps)" in err
    assert f"use {option}-file PATH or the VOICEBRIDGE_" in err
    assert "s3cret-value" not in err


def test_an_external_bridge_s_secrets_come_from_files(tmp_path: Path) -> None:
    token, key = tmp_path / "token", tmp_path / "key"
    token.write_text("from-the-file\n")
    assert loadtest_cli._secret(str(token), "UNSET_VARIABLE", {}) == "from-the-file"
    assert loadtest_cli._secret(None, "V", {"V": "from-the-environment"}) == (
        "from-the-environment"
    )
    with pytest.raises(OSError):
        loadtest_cli._secret(str(key), "V", {})


@asynccontextmanager
async def _bridge_elsewhere(env: Mapping[str, str] | None = None) -> AsyncIterator[ExternalBridge]:
    """A bridge this test starts, but the load test only knows by URL, secrets and pid,
    as it would know one started by systemd; its Vapi is the load test's assistant."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        assistant_port = probe.getsockname()[1]
    bridge = await BridgeProcess.start(
        assistant_url=f"http://127.0.0.1:{assistant_port}",
        assistant_key="k" * 16,
        auth_token="t" * 32,
        cpu=None,
        env=env,
    )
    try:
        yield ExternalBridge(
            url=bridge.url,
            public_url=None,
            auth_token="t" * 32,
            assistant_port=assistant_port,
            assistant_key="k" * 16,
            pid=bridge.pid,
        )
    finally:
        await bridge.stop()


async def test_an_external_bridge_is_loaded_through_its_url() -> None:
    async with _bridge_elsewhere() as external:
        with trio.fail_after(60):
            report = await run_loadtest(
                LoadTestOptions(calls=3, duration_s=2.5, ramp_s=0.5, external=external)
            )
    assert report.target == external.url
    assert report.failed_calls == 0, report.failures
    assert report.caller_frames > 0 and report.assistant_chunks > 0
    assert report.cpu_us_per_call_second is not None


@needs_openssl
def test_with_vapi_tls_the_bridge_reaches_the_simulated_vapi_over_tls(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The traffic of the plain run above (same seed), its Vapi leg over TLS.
    code = main(
        [
            "loadtest",
            "--calls",
            "5",
            "--duration",
            "3",
            "--ramp",
            "1",
            "--barge-in-share",
            "1",
            "--vapi-tls",
            "--json",
        ]
    )
    report = json.loads(capsys.readouterr().out)
    assert code == 0, report
    assert report["vapi_tls"] is True
    assert report["valid"] is True, report["invalid_reasons"]
    assert report["failed_calls"] == 0, report["failures"]
    # One transport socket per call, each over TLS (a plain upgrade would be refused);
    # POST /call stays plain http.
    assert report["vapi_tls_handshakes"] == 5
    assert report["vapi_tls_handshake_failures"] == {}
    assert report["dropped_frames"] == 0
    assert report["heard_after_clear_ms"] == 0
    assert report["frames"]["caller_to_agent"]["measured"] >= 400
    assert report["frames"]["agent_to_caller"]["measured"] > 0
    assert report["first_audio_ms"]["p50"] is not None  # every call heard its greeting
    assert report["barge_ins"] >= 1


def test_the_started_bridge_trusts_the_vapi_certificate_alone(
    certificate: tls.Certificate, tmp_path: Path
) -> None:
    # What ssl.create_default_context() (the bridge's Vapi leg) loads in the child.
    env = dict(os.environ, **tls.trust_environment(certificate, tmp_path))
    probe = (
        "import json, ssl; c = ssl.create_default_context(); "
        "print(json.dumps([c.cert_store_stats(), c.get_ca_certs()]))"
    )
    stats, cas = json.loads(
        subprocess.run(
            [sys.executable, "-c", probe],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    assert stats["x509_ca"] == 1
    assert cas[0]["subject"] == [[["commonName", "127.0.0.1"]]]
    assert cas[0]["subjectAltName"] == [["IP Address", "127.0.0.1"]]
    assert os.listdir(env["SSL_CERT_DIR"]) == []


async def test_an_external_bridge_trusting_the_certificate_is_loaded_over_tls(
    certificate: tls.Certificate, tmp_path: Path
) -> None:
    async with _bridge_elsewhere(tls.trust_environment(certificate, tmp_path)) as external:
        with trio.fail_after(60):
            report = await run_loadtest(
                LoadTestOptions(
                    calls=3,
                    duration_s=2.0,
                    ramp_s=0.5,
                    external=external,
                    vapi_tls=True,
                    vapi_tls_certificate=certificate,
                )
            )
    assert report.failed_calls == 0, report.failures
    assert report.vapi_tls and report.vapi_tls_handshakes == 3
    assert report.caller_frames > 0 and report.assistant_chunks > 0
    assert "Vapi leg wss:// (TLS)" in report.table().splitlines()[0]
    assert "Vapi TLS handshakes:        3 completed, 0 failed" in report.table()


@needs_openssl
def test_an_external_bridge_over_tls_is_first_given_a_certificate(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VOICEBRIDGE_TWILIO_AUTH_TOKEN", "t")
    monkeypatch.setenv("VOICEBRIDGE_VAPI_API_KEY", "k")
    code = main(["loadtest", "--url", "http://127.0.0.1:9", "--assistant-port", "9", "--vapi-tls"])
    err = capsys.readouterr().err
    assert code == 2
    lines = dict(
        line.strip().split(": ", 1)
        for line in err.splitlines()
        if line.strip().startswith(("certificate:", "key:"))
    )
    made = Path(lines["certificate"].strip())
    try:
        assert made.is_file() and Path(lines["key"].strip()).is_file()
        assert f"SSL_CERT_FILE={made} " in err
        assert f"--vapi-tls-cert {made} " in err
    finally:
        shutil.rmtree(made.parent)


def test_the_certificate_options_go_with_vapi_tls(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["loadtest", "--vapi-tls-cert", "c.pem", "--vapi-tls-key", "k.pem"]) == 2
    assert main(["loadtest", "--vapi-tls", "--vapi-tls-cert", "c.pem"]) == 2
    assert "go together" in capsys.readouterr().err


async def test_without_openssl_vapi_tls_says_so(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(LoadTestError, match="openssl command, which is not installed"):
        await tls.make_certificate(tmp_path)


class _TlsClient:
    """A TLS client driven by hand over one end of a socket pair (the bridge's side)."""

    def __init__(self, sock: socket.socket, certificate: tls.Certificate) -> None:
        self.sock = sock
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ssl.create_default_context(cafile=str(certificate.cert)).wrap_bio(
            self.incoming, self.outgoing, server_hostname="127.0.0.1"
        )

    async def handshake_then_send(self, data: bytes) -> None:
        """The handshake, and ``data`` written in the same send as the client's Finished."""
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.sock.sendall(self.outgoing.read())
                await trio.lowlevel.wait_readable(self.sock)
                self.incoming.write(self.sock.recv(65536))
        self.send(data)

    def send(self, data: bytes) -> None:
        self.tls.write(data)
        self.sock.sendall(self.outgoing.read())

    def read_to_the_end(self) -> bytes:
        """Everything until our peer's close_notify (SSLWantReadError if there is none)."""
        while data := self.sock.recv(65536):  # the peer closed: this never blocks
            self.incoming.write(data)
        received = bytearray()
        while chunk := self.tls.read(65536):
            received += chunk
        return bytes(received)


async def _tls_server(
    certificate: tls.Certificate, first: bytes
) -> tuple[TlsSocketTransport, _TlsClient]:
    """The simulated Vapi's end of TLS (as the generator accepts it) and a client."""
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    client = _TlsClient(theirs, certificate)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.handshake_then_send, first)
        transport = await accept_tls(ours, tls.server_context(certificate))
    return transport, client


async def test_a_tls_websocket_serves_the_request_of_the_first_flight(
    certificate: tls.Certificate,
) -> None:
    request = b"GET /x HTTP/1.1\r\n\r\n"
    with trio.fail_after(5):
        # The client's Finished and its request arrive in one read: the request must
        # not wait in the TLS buffer for bytes that never come.
        transport, client = await _tls_server(certificate, request)
        assert await transport.receive_some() == request
        ws = LeanWebSocket(transport, client=False)
        client.send(
            encode_frame(OP_TEXT, b"caller", masked=True)
            + encode_frame(OP_BINARY, b"\x00\x00abc", masked=True)
        )
        assert await ws.receive_batch() == [(OP_TEXT, b"caller"), (OP_BINARY, b"\x00\x00abc")]
        ws.send_binary(b"assistant")
        await ws.aclose(1000)
    # The frames, the close frame, then TLS's close_notify.
    assert client.read_to_the_end() == (
        encode_frame(OP_BINARY, b"assistant", masked=False)
        + encode_frame(OP_CLOSE, b"\x03\xe8", masked=False)
    )
    client.sock.close()


async def test_the_peers_close_notify_ends_a_tls_websocket_after_its_last_frame(
    certificate: tls.Certificate,
) -> None:
    with trio.fail_after(5):
        transport, client = await _tls_server(certificate, b"")
        ws = LeanWebSocket(transport, client=False)
        client.tls.write(encode_frame(OP_TEXT, b"last", masked=True))
        with pytest.raises(ssl.SSLWantReadError):  # close_notify written, ours awaited
            client.tls.unwrap()
        client.sock.sendall(client.outgoing.read())
        assert await ws.receive_batch() == [(OP_TEXT, b"last")]
        with pytest.raises(WebSocketClosed, match="connection closed"):
            await ws.receive_batch()
        assert ws.closed
        await ws.aclose()
    client.sock.close()


async def _read_until(sock: socket.socket, size: int) -> bytes:
    """``size`` bytes from a non-blocking ``sock``, as they come."""
    received = bytearray()
    while len(received) < size:
        await trio.lowlevel.wait_readable(sock)
        received += sock.recv(1 << 20)
    return bytes(received)


#: Frames written without yielding: many times what a small socket buffer takes.
_BULK = [bytes([i]) * 20_000 for i in range(40)]


async def test_frames_the_kernel_cannot_take_at_once_follow_in_order() -> None:
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)
    theirs.setblocking(False)
    ws = LeanWebSocket(SocketTransport(ours), client=False)
    for payload in _BULK:
        ws.send_binary(payload)
    assert ws.unsent_bytes > 0  # the rest waits for the flusher
    expected = b"".join(encode_frame(OP_BINARY, p, masked=False) for p in _BULK)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ws.run_flusher)
            received = await _read_until(theirs, 1)
            ws.send_text("last")  # behind everything before it, flushing or not
            expected += encode_frame(OP_TEXT, b"last", masked=False)
            received += await _read_until(theirs, len(expected) - len(received))
            nursery.cancel_scope.cancel(reason="all read")
    assert received == expected
    assert ws.unsent_bytes == 0
    await ws.aclose()
    theirs.close()


async def test_over_tls_frames_the_kernel_cannot_take_at_once_follow_in_order(
    certificate: tls.Certificate,
) -> None:
    with trio.fail_after(10):
        transport, client = await _tls_server(certificate, b"")
        transport.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)
        ws = LeanWebSocket(transport, client=False)
        for payload in _BULK:
            ws.send_binary(payload)
        expected = b"".join(encode_frame(OP_BINARY, p, masked=False) for p in _BULK)
        plain = bytearray()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ws.run_flusher)
            while len(plain) < len(expected):
                client.incoming.write(await _read_until(client.sock, 1))
                with contextlib.suppress(ssl.SSLWantReadError):
                    while chunk := client.tls.read(1 << 20):
                        plain += chunk
            nursery.cancel_scope.cancel(reason="all read")
    assert plain == expected
    await ws.aclose()
    client.sock.close()


def _chunk(seq: int, size: int) -> bytes:
    """An assistant chunk as the generator sends it: its marker, then silence."""
    return marker(seq) + b"\xff" * (size - MARKER_BYTES)


def _latencies(
    chunks: list[tuple[float, bytes]], frames: list[tuple[float, int, int]]
) -> dict[int, tuple[float, float]]:
    """(ms at playback, ms at arrival) of each chunk (sent at, audio), the assistant's
    audio reaching the caller as frames (arrival, first byte, end) of its byte stream."""
    wire, twilio = Playback(), Playback()
    wire_heard = [wire.play(len(audio), sent_at) for sent_at, audio in chunks]
    stream = b"".join(audio for _, audio in chunks)
    figures = {}
    for now, start, end in frames:
        for seq, heard_at in twilio.hear(stream[start:end], now):
            figures[seq] = ((heard_at - wire_heard[seq]) * 1000, (now - chunks[seq][0]) * 1000)
    return figures


def test_a_chunk_held_while_twilio_still_plays_is_heard_on_time() -> None:
    # A burst: 25 ms of audio, then the next chunk 4 ms later. The bridge sends a whole
    # frame at once and holds the rest until the next chunk completes the frame, 15 ms
    # in, while Twilio still plays the first frame: the caller hears nothing later.
    chunks = [(0.0, _chunk(0, 200)), (0.004, _chunk(1, 200))]
    figures = _latencies(chunks, [(0.0, 0, 160), (0.015, 160, 320), (0.030, 320, 400)])
    assert figures[0] == pytest.approx((0.0, 0.0))
    assert figures[1] == pytest.approx((0.0, 11.0))


def test_a_marker_split_across_frames_is_heard_when_its_first_byte_plays() -> None:
    # The first frame holds 20 bytes of the second chunk's marker, the held frame its rest.
    chunks = [(0.0, _chunk(0, 140)), (0.002, _chunk(1, 300))]
    figures = _latencies(chunks, [(0.0, 0, 160), (0.012, 160, 320), (0.030, 320, 440)])
    assert figures[1] == pytest.approx((0.0, 10.0))


def test_audio_reaching_a_dry_buffer_is_as_late_as_it_arrived_and_so_is_what_follows() -> None:
    # Real time: a frame every 20 ms. The second reaches Twilio 7 ms after the first had
    # played; the third is on time, but plays after the second: 7 ms late as well.
    chunks = [(0.0, _chunk(0, 160)), (0.020, _chunk(1, 160)), (0.040, _chunk(2, 160))]
    figures = _latencies(chunks, [(0.0, 0, 160), (0.027, 160, 320), (0.041, 320, 480)])
    assert figures[1] == pytest.approx((7.0, 7.0))
    assert figures[2] == pytest.approx((7.0, 1.0))


def test_a_barge_in_empties_both_buffers() -> None:
    # 100 ms of audio, talked over 30 ms in: the assistant's signal empties the wire's
    # buffer, the bridge's clear Twilio's. The next turn starts on an empty buffer each.
    wire, twilio = Playback(), Playback()
    assert wire.play(800, 0.0) == 0.0
    assert [seq for seq, _ in twilio.hear(_chunk(0, 800), 0.001)] == [0]
    wire.clear(0.030)
    twilio.clear(0.032)
    wire_heard = wire.play(160, 0.050)
    [(seq, heard_at)] = twilio.hear(_chunk(1, 160), 0.051)
    assert (seq, wire_heard, heard_at) == (1, 0.050, 0.051)
    assert (wire.end, twilio.end) == (pytest.approx(0.070), pytest.approx(0.071))


def test_the_ideal_wire_of_a_bridge_sends_whole_frames_and_a_bridge_doing_so_adds_nothing() -> None:
    # Real time: 200-byte chunks (25 ms) every 25 ms. Twilio takes whole frames, so
    # each chunk's last partial frame waits for the next chunk, and Twilio runs dry
    # meanwhile: the turn plays up to a frame later than the chunks as sent would.
    framed, raw = Playback(), Playback()
    sends = [(i * 200, i * 0.025) for i in range(4)]
    heard = [ideal_wire_heard(framed, at, 200, sent, whole_frames=True) for at, sent in sends]
    as_sent = [ideal_wire_heard(raw, at, 200, sent, whole_frames=False) for at, sent in sends]
    assert heard == pytest.approx([0.0, 0.030, 0.060, 0.090])
    assert as_sent == pytest.approx([0.0, 0.025, 0.050, 0.075])
    # A bridge that sends each frame the moment it is complete: nothing added at playback.
    twilio = Playback()
    stream = b"".join(_chunk(i, 200) for i in range(4))
    played = {}
    for now, start, end in [(0.0, 0, 160), (0.025, 160, 320), (0.05, 320, 480), (0.075, 480, 800)]:
        played.update(twilio.hear(stream[start:end], now))
    assert [played[i] - heard[i] for i in range(4)] == pytest.approx([0.0] * 4)


def test_markers_survive_any_sequence_number() -> None:
    for seq in (0, 1, 255, 256, 65_535, 65_536, 7_999_999, MARKER_LIMIT - 1):
        data = b"\xff" * 7 + marker(seq) + b"\xff" * 3
        assert len(marker(seq)) == MARKER_BYTES
        assert data.find(MARKER_LEAD) == 7
        assert read_marker(data, 7) == seq


def test_a_marker_cut_short_before_the_next_one_is_no_marker() -> None:
    # A clear cut the audio anywhere in a marker; the next turn starts right behind,
    # or silence follows: never a wrong number, and the next marker is found.
    seqs = (0, 1, 0x5A5A5A, 0xA5A5A5, MARKER_LIMIT - 1)
    for first, second in itertools.product(seqs, seqs):
        for cut in range(1, MARKER_BYTES):
            data = b"\xff" * 3 + marker(first)[:cut] + marker(second) + b"\xff" * 3
            found = []
            position = data.find(MARKER_LEAD)
            while position >= 0:
                found.append(read_marker(data, position))
                position = data.find(MARKER_LEAD, position + 1)
            assert [seq for seq in found if seq >= 0] == [second], (first, second, cut)
            silence_after = marker(first)[:cut] + b"\xff" * MARKER_BYTES
            assert read_marker(silence_after, 0) in (-1, first), (first, cut)


def test_the_generators_frames_are_silence_to_the_edge_detector() -> None:
    """Caller frames (a marker, then silence) must not hold the bridge's playout when
    it runs barge-in at the edge: its detector hears no speech in them at all."""
    from voicebridge.bridge.voice_activity import SpeechOnset

    for aggressiveness in range(4):
        onset = SpeechOnset(aggressiveness=aggressiveness, onset_frames=1)
        frames = [marker(seq) + b"\xff" * (160 - MARKER_BYTES) for seq in range(3000)]
        assert not any(onset.feed(frame) for frame in frames), aggressiveness


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert Percentiles.of(values) == Percentiles(p50=50.0, p99=99.0, max=100.0, count=100)
    assert Percentiles.of([]) == Percentiles(None, None, None, 0)


async def test_the_lean_websocket_reads_masked_fragmented_and_control_frames() -> None:
    ours, theirs = socket.socketpair()
    ws = LeanWebSocket(SocketTransport(ours), client=False)
    key = b"\x01\x02\x03\x04"
    payload = b"hello, bridge"
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    theirs.sendall(
        bytes((0x80 | OP_TEXT, 0x80 | len(payload)))
        + key
        + masked
        + bytes((OP_BINARY, 2))
        + b"ab"
        + bytes((0x80 | OP_CONTINUATION, 1))
        + b"c"
        + bytes((0x80 | OP_PING, 1))
        + b"p"
        + encode_frame(OP_BINARY, b"x" * 300, masked=False)
    )
    with trio.fail_after(5):
        batch = await ws.receive_batch()
    assert batch == [(OP_TEXT, payload), (OP_BINARY, b"abc"), (OP_BINARY, b"x" * 300)]
    assert theirs.recv(100) == bytes((0x80 | OP_PONG, 1)) + b"p"
    theirs.sendall(bytes((0x80 | OP_CLOSE, 2)) + b"\x03\xe8")
    with trio.fail_after(5), pytest.raises(WebSocketClosed) as closed:
        await ws.receive_batch()
    assert closed.value.code == 1000
    assert theirs.recv(100) == bytes((0x80 | OP_CLOSE, 2)) + b"\x03\xe8"
    await ws.aclose()
    theirs.close()


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Both ends of a loopback TCP connection (the first accepted), blocking."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        theirs = socket.create_connection(listener.getsockname())
        ours, _ = listener.accept()
    return ours, theirs


async def _until_stamped(ws: LeanWebSocket, theirs: socket.socket) -> None:
    """Ping until a read comes stamped: the kernel turns stamping on a moment after
    the first socket asks (and not at all for packets received before)."""
    with trio.fail_after(5):
        while True:
            theirs.sendall(encode_frame(OP_TEXT, b"warm-up", masked=True))
            assert await ws.receive_batch() == [(OP_TEXT, b"warm-up")]
            now = time.perf_counter()
            if ws.arrived_at(now) != now:
                return
            await trio.sleep(0.01)


async def test_a_message_is_timed_from_its_arrival_in_the_kernel_not_from_its_read() -> None:
    ours, theirs = _tcp_pair()
    ws = LeanWebSocket(SocketTransport(StampedSocket.adopt(ours)), client=False)
    await _until_stamped(ws, theirs)
    frame = encode_frame(OP_TEXT, b"late read", masked=True)
    theirs.sendall(frame)
    await trio.sleep(0.1)  # this loop is busy elsewhere
    with trio.fail_after(5):
        assert await ws.receive_batch() == [(OP_TEXT, b"late read")]
    now = time.perf_counter()
    assert 0.1 <= now - ws.arrived_at(now) < 5
    # A message completed by a later packet is stamped with that packet's arrival:
    # late, never early.
    theirs.sendall(frame[:3])
    await trio.sleep(0.1)
    second_sent = time.perf_counter()
    theirs.sendall(frame[3:])
    await trio.sleep(0.1)
    with trio.fail_after(5):
        assert await ws.receive_batch() == [(OP_TEXT, b"late read")]
    now = time.perf_counter()
    assert second_sent - 0.001 <= ws.arrived_at(now) <= now - 0.1
    await ws.aclose()
    theirs.close()


async def test_a_socket_the_kernel_does_not_stamp_is_timed_when_read() -> None:
    ours, theirs = socket.socketpair()  # not TCP, not adopted
    ws = LeanWebSocket(SocketTransport(ours), client=False)
    theirs.sendall(encode_frame(OP_TEXT, b"x", masked=True))
    await trio.sleep(0.05)
    assert await ws.receive_batch() == [(OP_TEXT, b"x")]
    assert ws.arrived_at(12.5) == 12.5
    await ws.aclose()
    theirs.close()


async def test_a_write_on_a_lost_connection_is_dropped_and_the_reader_reports_the_end() -> None:
    ours, theirs = socket.socketpair()
    ws = LeanWebSocket(SocketTransport(ours), client=False)
    theirs.close()
    # The ticker writes for every call: one lost connection must not raise there.
    ws.send_text("to nobody")
    ws.send_binary(b"to nobody either")
    assert ws.closed
    with trio.fail_after(5), pytest.raises(WebSocketClosed):
        await ws.receive_batch()
    await ws.aclose()


def test_client_frames_are_masked_with_the_zero_key() -> None:
    assert encode_frame(OP_TEXT, b"hi", masked=True) == b"\x81\x82\x00\x00\x00\x00hi"
    long = encode_frame(OP_BINARY, b"y" * 70_000, masked=False)
    assert long[:2] == b"\x82\x7f" and int.from_bytes(long[2:10], "big") == 70_000


async def test_progress_is_reported_every_five_seconds(
    autojump_clock: trio.testing.MockClock,
) -> None:
    lines: list[tuple[float, str]] = []
    traffic = Traffic(calls=7, duration_s=12.0, ramp_s=1.0, barge_in_share=0.3, seed=1)
    target = Target(
        BridgeTarget(host="127.0.0.1", port=9, public_url="http://x", auth_token="t"),
        None,
        "a bridge",
    )
    with trio.move_on_after(16):
        await _report_progress(
            lambda text: lines.append((trio.current_time(), text)), traffic, target
        )
    assert lines == [
        (0.0, "7 calls against a bridge: ramp 1 s, then 12 s with all calls up"),
        (5.0, "5 s of 13 s"),
        (10.0, "10 s of 13 s"),
        (15.0, "13 s of 13 s"),
    ]


async def test_calls_the_bridge_drains_are_drained_not_failed_and_the_drain_is_quick() -> None:
    # As Twilio does, the load test requests the <Connect action> of a stream the bridge
    # ended: a SIGTERM'd bridge's drain then waits for nothing once its deadline has passed.
    drain_deadline_s = 1.0
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        assistant_port = probe.getsockname()[1]
    bridge = await BridgeProcess.start(
        assistant_url=f"http://127.0.0.1:{assistant_port}",
        assistant_key="k" * 16,
        auth_token="t" * 32,
        cpu=None,
        env={"VOICEBRIDGE_LOADTEST_DRAIN_DEADLINE_S": str(drain_deadline_s)},
    )
    external = ExternalBridge(
        url=bridge.url,
        public_url=None,
        auth_token="t" * 32,
        assistant_port=assistant_port,
        assistant_key="k" * 16,
    )
    stopped: list[float] = []

    async def stop_midway() -> None:
        await trio.sleep(3.0)
        signalled = trio.current_time()
        bridge.process.send_signal(signal.SIGTERM)
        stopped.append(await bridge.process.wait())
        stopped.append(trio.current_time() - signalled)

    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stop_midway)
                report = await run_loadtest(
                    LoadTestOptions(calls=4, duration_s=8, ramp_s=0.5, external=external)
                )
    finally:
        await bridge.stop()
    assert (report.drained_calls, report.failed_calls) == (4, 0), report.failures
    code, took_s = stopped
    assert code == 0
    # The deadline, the calls' goodbyes to the assistant, the actions: not their grace.
    assert took_s < drain_deadline_s + 1.5, took_s


async def test_calls_answered_with_the_overflow_message_are_refused_not_failed() -> None:
    async with _bridge_elsewhere({"VOICEBRIDGE_LOADTEST_MAX_CALLS": "2"}) as external:
        with trio.fail_after(60):
            report = await run_loadtest(
                LoadTestOptions(calls=4, duration_s=2.5, ramp_s=0.5, external=external)
            )
    assert (report.refused_calls, report.failed_calls) == (2, 0), report.failures
    assert report.webhook.count == 4
    assert report.mean_calls == pytest.approx(2, abs=0.1)
    assert report.caller_frames > 0


def test_churn_places_new_calls_all_along_and_splits_the_bridges_cpu(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(
        [
            "loadtest",
            "--calls",
            "2",
            "--churn",
            "3",
            "--churn-call-s",
            "1,2",
            "--duration",
            "4",
            "--ramp",
            "0.5",
            "--json",
        ]
    )
    report = json.loads(capsys.readouterr().out)
    # Its validity (the generator's own pacing) is the shared machine's matter here.
    assert code == (0 if report["valid"] else 1), report
    assert (report["churn_per_s"], report["churn_call_s"]) == (3, [1, 2])
    assert report["calls_placed"] > 2 + 3 * 2  # Poisson: 13.5 expected, seeded
    assert report["failed_calls"] == report["refused_calls"] == report["drained_calls"] == 0
    webhook = report["webhook_answer_ms"]
    assert 0 < webhook["p50"] <= webhook["p99"] <= webhook["max"]
    split = report["cpu_split"]
    assert set(split) == {
        "setup_ms_per_call",
        "end_ms_per_call",
        "streaming_us_per_call_second",
        "base_pct",
        "intervals",
    }
    assert split["intervals"] >= 8


def test_the_cpu_split_recovers_the_costs_that_made_the_samples() -> None:
    # A bridge that spends 8 ms per set-up, 2 ms per end, 5,000 µs per call-second and
    # 1 % of a core on its own; calls of 3-5 s arriving at two a second.
    setup_s, end_s, streaming_s, base = 0.008, 0.002, 0.005, 0.01
    spans = [
        CallSpan(setup_at=at, streaming_from=at + 0.1, ended_at=at + 3 + (n % 3))
        for n, at in enumerate(0.5 * k + 0.13 * (k % 4) for k in range(40))
    ]
    samples, cpu = [], 0.0
    for step in range(60):
        start = step * 0.5
        if step:
            cpu += (
                base * 0.5
                + setup_s * sum(start - 0.5 <= s.setup_at < start for s in spans)
                + end_s * sum(start - 0.5 <= s.ended_at < start for s in spans)
                + streaming_s
                * sum(
                    max(0.0, min(start, s.ended_at) - max(start - 0.5, s.streaming_from))
                    for s in spans
                )
            )
        samples.append((start, cpu))
    split = split_cpu(samples, spans, base=base)
    assert split is not None
    assert split.setup_ms == pytest.approx(8.0)
    assert split.end_ms == pytest.approx(2.0)
    assert split.streaming_us_per_call_second == pytest.approx(5000.0)
    assert split.base_pct == pytest.approx(1.0)
    # Without any end in the samples, the costs cannot be told apart.
    assert split_cpu(samples[:4], spans, base=base) is None
