"""The ops listener: health, readiness and metrics apart from the public port.

Charter: loopback only (127.0.0.1, 127.0.0.2 for a hostile peer, Unix sockets under a
short temporary directory), port 0 wherever the test picks, a ``trio.fail_after`` guard
on every test, real sockets and real time (each test a few seconds at most). The public
port's attacker runs in its own OS process; the units are judged by
``systemd-analyze verify`` on copies, as in tests/test_units.py.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio

import voicebridge
from tests.harness import running_bridge
from tests.test_units import (
    INSTALLED_BINARY,
    UNITS_DIR,
    WORKERS_DROP_IN,
    settings,
    stand_in_binary,
    verify,
)
from voicebridge import listenfds
from voicebridge.config import ServerConfig, config_from_mapping
from voicebridge.errors import ConfigError
from voicebridge.loopback import loopback_config
from voicebridge.net.ops import MAX_OPS_CONNECTIONS
from voicebridge.observability.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from voicebridge.server import bind_listener, serve
from voicebridge.web import HEALTH_PATH, METRICS_PATH, READY_PATH, STREAM_PATH, VOICE_PATH

ACTIVATE = shutil.which("systemd-socket-activate")
needs_activate = pytest.mark.skipif(
    ACTIVATE is None, reason="systemd-socket-activate not installed (Debian package: systemd)"
)

OPS_PATHS = (HEALTH_PATH, READY_PATH, METRICS_PATH)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory for Unix sockets whose paths fit in ``sun_path`` (tmp_path may not)."""
    with tempfile.TemporaryDirectory(prefix="vb-ops-") as name:
        yield Path(name)


# -- configuration --------------------------------------------------------------------


def load_server(**server: Any) -> ServerConfig:
    return config_from_mapping({"server": server}, environ={}, require_complete=False).server


def test_the_default_is_loopback_port_9180() -> None:
    assert ServerConfig().ops_listen == "127.0.0.1:9180"
    assert ipaddress.ip_address(ServerConfig().ops_listen.rpartition(":")[0]).is_loopback


@pytest.mark.parametrize(
    "ops_listen", ["", "127.0.0.1:0", "[::1]:9180", "localhost:9999", "/run/voicebridge/ops.sock"]
)
def test_ops_listen_accepts(ops_listen: str) -> None:
    assert load_server(ops_listen=ops_listen).ops_listen == ops_listen


@pytest.mark.parametrize(
    ("server", "fragment"),
    [
        ({"ops_listen": "9180"}, "expected host:port"),
        ({"ops_listen": "ops.sock"}, "or an absolute path for a Unix socket, or empty for none"),
        ({"ops_listen": "::1:9180"}, "brackets"),
        ({"ops_listen": "127.0.0.1:99999"}, "port must be a number from 0 to 65535"),
        ({"ops_listen": "/run/" + "x" * 110}, "at most 107 bytes"),
        ({"ops_listen": "/run/voicebridge/"}, "must name a file"),
        # Health and metrics on the public port: the very thing the ops listener prevents.
        ({"ops_listen": "127.0.0.1:8080"}, "must not be the public listen address"),
        ({"listen": "0.0.0.0:9180"}, "must not be the public listen address"),
        ({"listen": "[::]:8443", "ops_listen": "127.0.0.1:8443"}, "must not be the public"),
    ],
)
def test_ops_listen_rejects(server: dict[str, str], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_server(**server)
    assert info.value.key == "server.ops_listen"
    assert fragment in info.value.reason


def test_ops_listen_can_be_set_from_the_environment() -> None:
    config = config_from_mapping(
        {}, environ={"VOICEBRIDGE_SERVER_OPS_LISTEN": ""}, require_complete=False
    )
    assert config.server.ops_listen == ""


# -- the real server on loopback ------------------------------------------------------


async def test_health_and_metrics_are_served_on_the_ops_listener_only() -> None:
    with trio.fail_after(20):
        async with running_bridge() as bridge, httpx.AsyncClient() as http:
            public = {path: await http.get(bridge.url + path) for path in OPS_PATHS}
            ops = {path: await http.get(bridge.ops_url + path) for path in OPS_PATHS}
            # The ops port serves nothing else: no webhook, no media stream.
            webhook = await http.post(bridge.ops_url + VOICE_PATH, data={"CallSid": "CA1"})
            upgrade = await http.get(
                bridge.ops_url + STREAM_PATH,
                headers={"Upgrade": "websocket", "Connection": "Upgrade",
                         "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                         "Sec-WebSocket-Version": "13"},
            )
    assert {path: r.status_code for path, r in public.items()} == dict.fromkeys(OPS_PATHS, 404)
    assert (ops[HEALTH_PATH].status_code, ops[HEALTH_PATH].text) == (200, "ok\n")
    assert (ops[READY_PATH].status_code, ops[READY_PATH].text) == (200, "ready\n")
    assert ops[METRICS_PATH].status_code == 200
    assert ops[METRICS_PATH].headers["content-type"] == METRICS_CONTENT_TYPE
    assert "# TYPE voicebridge_active_calls gauge" in ops[METRICS_PATH].text
    assert (webhook.status_code, upgrade.status_code) == (404, 404)


async def test_an_ops_listener_on_a_unix_socket_replaces_a_stale_file(short_dir: Path) -> None:
    path = str(short_dir / "ops.sock")
    # Left behind by a process that is gone: the file exists, nothing listens.
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()
    with trio.fail_after(20):
        async with running_bridge(server={"ops_listen": path}) as bridge:
            transport = httpx.AsyncHTTPTransport(uds=path)
            async with httpx.AsyncClient(transport=transport) as http:
                ready = await http.get("http://ops" + READY_PATH)
    assert bridge.listening.ops_addresses == (path,)
    assert (ready.status_code, ready.text) == (200, "ready\n")


async def test_a_unix_socket_something_listens_on_is_not_taken(short_dir: Path) -> None:
    path = str(short_dir / "ops.sock")
    public = bind_listener("127.0.0.1:0")
    config = loopback_config(port=0, vapi_base_url="http://127.0.0.1:9", auth_token="t",
                             api_key="k")
    config = config.evolve(server=attrs.evolve(config.server, ops_listen=path))
    with socket.socket(socket.AF_UNIX) as other, trio.fail_after(20):
        other.bind(path)
        other.listen()
        with pytest.raises(OSError, match=f"ops listener {path}: Address already in use"):
            await serve(config, listeners=[public])
        # The other process's socket still answers; ours is closed.
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(path)
    assert public.fileno() == -1


async def test_an_empty_ops_listen_means_no_ops_listener(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("INFO", logger="voicebridge")
    with trio.fail_after(20):
        async with running_bridge(server={"ops_listen": ""}) as bridge, httpx.AsyncClient() as http:
            health = await http.get(bridge.url + HEALTH_PATH)
    assert bridge.listening.ops_addresses == ()
    assert health.status_code == 404
    [listening] = [r.message for r in caplog.records if "accepting connections" in r.message]
    assert listening.endswith("; no ops listener: health and metrics are not served")


#: Holds connections to the public port from 127.0.0.2, each a request head that never
#: ends, dribbling a header byte now and then (argv: port, count); prints how many it
#: holds, then holds them until killed. Refusals by the server are counted, not fatal.
SLOW_HEADS = textwrap.dedent(
    """
    import socket, sys, time
    port, count = int(sys.argv[1]), int(sys.argv[2])
    held = []
    for _ in range(count):
        try:
            conn = socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.2", 0))
            conn.sendall(b"POST /twilio/voice HTTP/1.1\\r\\nHost: x\\r\\n")
            held.append(conn)
        except OSError:
            pass
    print(len(held), flush=True)
    while True:
        time.sleep(0.5)
        for conn in list(held):
            try:
                conn.sendall(b"X")
            except OSError:
                held.remove(conn)
    """
)
#: Connections the slow-head attacker opens: more than a public port's per-peer cap.
SLOW_HEAD_CONNECTIONS = 300


async def test_the_ops_listener_answers_while_the_public_port_is_held_by_slow_heads() -> None:
    with trio.fail_after(30):
        async with running_bridge() as bridge, httpx.AsyncClient() as http:
            attacker = await trio.lowlevel.open_process(
                [sys.executable, "-c", SLOW_HEADS, str(bridge.listening.port),
                 str(SLOW_HEAD_CONNECTIONS)],
                stdout=subprocess.PIPE,
            )
            try:
                assert attacker.stdout is not None
                held = int((await attacker.stdout.receive_some(100)).decode())
                answered, waits = [], []
                for _ in range(10):
                    # Within a second each, as a health check that must not flap.
                    asked_at = trio.current_time()
                    with trio.fail_after(1):
                        answered.append((await http.get(bridge.ops_url + READY_PATH)).text)
                    waits.append(trio.current_time() - asked_at)
                    await trio.sleep(0.1)
            finally:
                attacker.kill()
                await attacker.wait()
    print(f"the attacker held {held} public connections; /readyz answered in at most "
          f"{max(waits) * 1000:.1f} ms")
    assert held > 0
    assert answered == ["ready\n"] * 10


async def test_the_ops_connection_cap_queues_the_next_probe_without_touching_the_public_port(
) -> None:
    with trio.fail_after(20):
        async with running_bridge() as bridge, httpx.AsyncClient() as http:
            host, port = bridge.listening.ops_addresses[0]
            # A local client that opens ops connections and never sends a request.
            idle = [socket.create_connection((host, port)) for _ in range(MAX_OPS_CONNECTIONS)]
            try:
                probe = await trio.open_tcp_stream(host, port)
                await probe.send_all(b"GET /readyz HTTP/1.1\r\nHost: ops\r\n\r\n")
                with trio.move_on_after(0.5) as waited:
                    await probe.receive_some(1000)
                public = await http.get(bridge.url + HEALTH_PATH)
                idle.pop().close()
                answer = b""
                with trio.fail_after(5):
                    while not answer.endswith(b"ready\n"):
                        answer += await probe.receive_some(1000)
                await probe.aclose()
            finally:
                for conn in idle:
                    conn.close()
    assert waited.cancelled_caught, "the probe past the cap waited in the backlog"
    assert public.status_code == 404  # the public port answered at once
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"ready\n")


# -- socket activation: the real voicebridge serve -------------------------------------


def free_tcp_port() -> int:
    with socket.socket() as probe:  # systemd-socket-activate cannot report port 0's pick
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def serve_environment() -> dict[str, str]:
    package_root = str(Path(voicebridge.__file__).resolve().parent.parent)
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": package_root,
        "VOICEBRIDGE_TWILIO_AUTH_TOKEN": "t" * 32,
        "VOICEBRIDGE_VAPI_API_KEY": "k" * 32,
        "VOICEBRIDGE_STREAM_TOKEN_SECRET": "s" * 64,
    }


def write_config(directory: Path, public_port: int, **server: str) -> Path:
    path = directory / "voicebridge.toml"
    lines = ["[server]", f'public_url = "http://127.0.0.1:{public_port}"',
             'log_target = "stderr"']
    lines += [f'{key} = "{value}"' for key, value in server.items()]
    lines += ["[twilio]", 'account_sid = "AC' + "d" * 32 + '"', "allow_insecure_stream_url = true"]
    lines += ["[vapi]", 'base_url = "http://127.0.0.1:9"', 'assistant_id = "sim"']
    path.write_text("\n".join(lines) + "\n")
    return path


def activate_command(listens: list[str], fdnames: str, config: Path) -> list[str]:
    assert ACTIVATE is not None
    command = [ACTIVATE, *(f"--listen={listen}" for listen in listens), f"--fdname={fdnames}"]
    command += [f"--setenv={name}={value}" for name, value in serve_environment().items()]
    return [*command, sys.executable, "-m", "voicebridge", "serve", "--config", str(config)]


async def wait_for_line(stream: trio.abc.ReceiveStream, text: str, seen: list[bytes]) -> None:
    while text.encode() not in b"".join(seen):
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise AssertionError(f"no {text!r} in {b''.join(seen).decode()!r}")
        seen.append(chunk)


@needs_activate
async def test_a_scrape_on_the_activated_ops_socket_starts_the_server(
    short_dir: Path,
) -> None:
    # As voicebridge-ops@.socket could be set up: the ops socket a Unix socket, passed
    # named "ops" beside the public one ("public"). The first connection is a scrape.
    port = free_tcp_port()
    ops_path = str(short_dir / "ops.sock")
    config = write_config(short_dir, port, ops_listen="127.0.0.1:1")  # not bound: passed
    command = activate_command([f"127.0.0.1:{port}", ops_path], "public:ops", config)
    stderr: list[bytes] = []
    with trio.fail_after(30):
        process = await trio.lowlevel.open_process(
            command, env={"PATH": "/usr/bin:/bin"}, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        try:
            assert process.stderr is not None
            await wait_for_line(process.stderr, f"Listening on {ops_path}", stderr)
            transport = httpx.AsyncHTTPTransport(uds=ops_path)
            async with httpx.AsyncClient(transport=transport) as ops:
                metrics = await ops.get("http://ops" + METRICS_PATH)
            async with httpx.AsyncClient() as http:
                public = await http.get(f"http://127.0.0.1:{port}{READY_PATH}")
            process.terminate()
            assert await process.wait() == 0
            async for chunk in process.stderr:
                stderr.append(chunk)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    log = b"".join(stderr).decode()
    print(log)
    assert metrics.status_code == 200 and 'voicebridge_admitting{worker="0"} 1.0' in metrics.text
    assert public.status_code == 404
    assert f"health and metrics on {ops_path}" in log


@needs_activate
async def test_serve_refuses_an_ops_listen_that_is_the_activated_public_address(
    tmp_path: Path,
) -> None:
    # `listen` is ignored under socket activation, so only the passed socket's address
    # tells that ops_listen would put health and metrics on the public port.
    port = free_tcp_port()
    config = write_config(tmp_path, port, ops_listen=f"127.0.0.1:{port}")
    command = activate_command([f"127.0.0.1:{port}"], "public", config)
    with trio.fail_after(30):
        process = await trio.lowlevel.open_process(
            command, env={"PATH": "/usr/bin:/bin"}, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        try:
            assert process.stderr is not None
            stderr: list[bytes] = []
            await wait_for_line(process.stderr, f"Listening on 127.0.0.1:{port}", stderr)
            # The first connection starts the server, which refuses to serve.
            with socket.create_connection(("127.0.0.1", port)):
                status = await process.wait()
            async for chunk in process.stderr:
                stderr.append(chunk)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    log = b"".join(stderr).decode()
    assert status == 78, log  # EX_CONFIG
    assert (
        f"cannot serve: config error: server.ops_listen: 127.0.0.1:{port} is where the "
        f"public listener is (127.0.0.1:{port})"
    ) in log


# -- the units ------------------------------------------------------------------------


@pytest.fixture
def units(tmp_path: Path) -> Path:
    """Copies of the shipped units, ExecStart pointing at an existing binary."""
    binary = stand_in_binary()
    for unit in UNITS_DIR.glob("voicebridge*.s*"):
        if unit.suffix in (".service", ".socket"):
            (tmp_path / unit.name).write_text(unit.read_text().replace(INSTALLED_BINARY, binary))
    return tmp_path


def test_the_ops_socket_and_the_service_verify_clean(units: Path) -> None:
    names = ("voicebridge-ops.socket", "voicebridge.socket", "voicebridge.service")
    assert verify(units, *names) == []


@pytest.mark.parametrize("cpu", ["0", "1", "255"])
def test_each_worker_ops_socket_verifies_clean(units: Path, cpu: str) -> None:
    assert verify(units, f"voicebridge-ops@{cpu}.socket", f"voicebridge@{cpu}.service") == []


def test_workers_setup_with_their_ops_sockets_verifies_clean(units: Path) -> None:
    drop_in = units / "voicebridge.socket.d"
    drop_in.mkdir()
    (drop_in / "workers.conf").write_text(WORKERS_DROP_IN)
    names = ["voicebridge.socket", "voicebridge@0.service", "voicebridge-ops@0.socket"]
    assert verify(units, *names) == []


def test_a_worker_past_cpu_255_has_no_ops_address(units: Path) -> None:
    problems = verify(units, "voicebridge-ops@256.socket")
    assert any("127.0.1.256:9180" in problem for problem in problems), problems


def test_ops_socket_contract() -> None:
    single = settings(UNITS_DIR / "voicebridge-ops.socket")
    worker = settings(UNITS_DIR / "voicebridge-ops@.socket")
    for unit in (single, worker):
        assert unit[("Socket", "FileDescriptorName")] == [listenfds.OPS]
        assert unit[("Socket", "Accept")] == ["no"]
    # The unit and the configuration's default agree: one address to scrape.
    assert single[("Socket", "ListenStream")] == [ServerConfig().ops_listen]
    assert single[("Socket", "Service")] == ["voicebridge.service"]
    # Worker N: loopback 127.0.1.N, port 9180; its own service instance.
    assert worker[("Socket", "ListenStream")] == ["127.0.1.%i:9180"]
    assert worker[("Socket", "Service")] == ["voicebridge@%i.service"]
    service = settings(UNITS_DIR / "voicebridge.service")
    template = settings(UNITS_DIR / "voicebridge@.service")
    assert service[("Service", "Sockets")] == ["voicebridge.socket voicebridge-ops.socket"]
    assert template[("Service", "Sockets")] == ["voicebridge.socket voicebridge-ops@%i.socket"]
    # The public socket is required; the ops socket only wanted (Sockets= implies it): a
    # service whose ops socket is masked still serves calls.
    assert service[("Unit", "Requires")] == template[("Unit", "Requires")] == [
        "voicebridge.socket"
    ]


SYSTEMCTL = shutil.which("systemctl")


def enabled_by(units: Path, *names: str) -> set[str]:
    """What ``systemctl enable names`` links into the targets of a root at ``units``."""
    if SYSTEMCTL is None:
        pytest.skip("systemctl not installed (Debian package: systemd)")
    root = units / "root"
    system = root / "etc" / "systemd" / "system"
    system.mkdir(parents=True)
    for unit in units.glob("voicebridge*.s*"):
        shutil.copy(unit, system / unit.name)
    subprocess.run(
        [SYSTEMCTL, f"--root={root}", "enable", *names],
        capture_output=True, text=True, timeout=60, check=True,
    )
    return {f"{link.parent.name}/{link.name}" for link in system.glob("*.wants/*")}


def test_enabling_the_service_enables_its_ops_socket(units: Path) -> None:
    assert enabled_by(units, "voicebridge.service") == {
        "multi-user.target.wants/voicebridge.service",
        "sockets.target.wants/voicebridge.socket",
        "sockets.target.wants/voicebridge-ops.socket",
    }


def test_enabling_workers_enables_an_ops_socket_for_each(units: Path) -> None:
    assert enabled_by(units, "voicebridge@0.service", "voicebridge@1.service") == {
        "multi-user.target.wants/voicebridge@0.service",
        "multi-user.target.wants/voicebridge@1.service",
        "sockets.target.wants/voicebridge.socket",
        "sockets.target.wants/voicebridge-ops@0.socket",
        "sockets.target.wants/voicebridge-ops@1.socket",
    }
