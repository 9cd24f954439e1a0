"""``voicebridge loadtest``: a short real run, and the pieces it is made of.

Charter: loopback only, port 0, real processes and real time kept short (a few
seconds). The run's figures are checked for shape and sanity only (no failed call,
nothing heard after a clear, every latency a plausible number), never against a
performance target: this machine is shared, and a timed assertion would be flaky.
"""

from __future__ import annotations

import json
import socket

import pytest
import trio

from voicebridge.cli import main
from voicebridge.loadtest.generator import MARKER_BYTES, marker, read_marker
from voicebridge.loadtest.process import BridgeProcess
from voicebridge.loadtest.report import Percentiles
from voicebridge.loadtest.run import ExternalBridge, LoadTestOptions, run_loadtest
from voicebridge.loadtest.wire import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    LeanWebSocket,
    WebSocketClosed,
    encode_frame,
)


def test_the_json_of_a_short_run_has_every_key_and_sane_figures(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(["loadtest", "--calls", "5", "--duration", "3", "--ramp", "1",
                 "--barge-in-share", "1", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0, report
    assert report["calls"] == 5
    assert report["duration_s"] == 3
    assert report["valid"] is True
    assert report["failed_calls"] == 0
    assert report["heard_after_clear_ms"] == 0
    assert report["dropped_frames"] == 0
    for direction in ("caller_to_agent", "agent_to_caller"):
        figures = report["added_latency_ms"][direction]
        assert set(figures) == {"p50", "p99", "max"}
        assert 0 < figures["p50"] <= figures["p99"] <= figures["max"] < 1000
    # The window is 2 s of 5 calls at 50 frames/s.
    assert report["frames"]["caller_to_agent"]["measured"] >= 400
    assert report["barge_ins"] >= 1
    assert set(report["barge_in_ms"]) >= {"p50", "p99"}
    assert 0 < report["barge_in_ms"]["p50"] < 1000
    assert 0 < report["first_audio_ms"]["p50"] <= report["first_audio_ms"]["p99"] < 5000
    assert report["cpu_us_per_call_second"] > 0
    assert report["rss_kib_per_call"] is not None
    assert 0 < report["generator_cpu_pct"] < 100


def test_the_table_is_readable(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["loadtest", "--calls", "2", "--duration", "2", "--ramp", "0.5"])
    table = capsys.readouterr().out
    assert code == 0, table
    assert "added latency caller→agent (ms)" in table
    assert "failed calls:               0" in table
    assert "result: VALID" in table


def test_an_external_bridge_needs_its_secrets(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["loadtest", "--url", "http://127.0.0.1:9"]) == 2
    assert "--auth-token" in capsys.readouterr().err


async def test_an_external_bridge_is_loaded_through_its_url() -> None:
    # A bridge this test starts, but the load test only knows by URL, secrets and pid,
    # as it would know one started by systemd; its Vapi is the load test's assistant.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        assistant_port = probe.getsockname()[1]
    bridge = await BridgeProcess.start(
        assistant_url=f"http://127.0.0.1:{assistant_port}", assistant_key="k" * 16,
        auth_token="t" * 32, cpu=None,
    )
    try:
        external = ExternalBridge(
            url=bridge.url, public_url=None, auth_token="t" * 32,
            assistant_port=assistant_port, assistant_key="k" * 16, pid=bridge.pid,
        )
        with trio.fail_after(60):
            report = await run_loadtest(
                LoadTestOptions(calls=3, duration_s=2.5, ramp_s=0.5, external=external)
            )
    finally:
        await bridge.stop()
    assert report.target == bridge.url
    assert report.failed_calls == 0, report.failures
    assert report.caller_frames > 0 and report.assistant_chunks > 0
    assert report.cpu_us_per_call_second is not None


def test_markers_survive_any_sequence_number() -> None:
    for seq in (0, 1, 199, 200, 39_999, 40_000, 7_999_999):
        data = b"\xff" * 7 + marker(seq) + b"\xff" * 3
        assert len(marker(seq)) == MARKER_BYTES
        assert data.find(b"\x00\x00") == 7
        assert read_marker(data, 7) == seq


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert Percentiles.of(values) == Percentiles(p50=50.0, p99=99.0, max=100.0, count=100)
    assert Percentiles.of([]) == Percentiles(None, None, None, 0)


async def test_the_lean_websocket_reads_masked_fragmented_and_control_frames() -> None:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    ws = LeanWebSocket(ours, client=False)
    key = b"\x01\x02\x03\x04"
    payload = b"hello, bridge"
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    theirs.sendall(
        bytes((0x80 | OP_TEXT, 0x80 | len(payload))) + key + masked
        + bytes((OP_BINARY, 2)) + b"ab" + bytes((0x80 | OP_CONTINUATION, 1)) + b"c"
        + bytes((0x80 | OP_PING, 1)) + b"p"
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
    ws.close()
    theirs.close()


def test_client_frames_are_masked_with_the_zero_key() -> None:
    assert encode_frame(OP_TEXT, b"hi", masked=True) == b"\x81\x82\x00\x00\x00\x00hi"
    long = encode_frame(OP_BINARY, b"y" * 70_000, masked=False)
    assert long[:2] == b"\x82\x7f" and int.from_bytes(long[2:10], "big") == 70_000
