"""The shipped systemd units, judged by systemd's own tools.

Charter: ``systemd-analyze verify`` and ``systemd-analyze security --offline=true`` run
on temporary copies of systemd/*.service and *.socket in which the ExecStart binary
(/opt/voicebridge/venv/bin/voicebridge, absent outside a real install) is replaced by
one that exists, so CI needs no install. A unit passes only if verify exits 0 *and*
prints nothing about our units: verify reports most mistakes (unknown keys, bad
values) as warnings while still exiting 0. Deliberately broken copies prove the check
can fail. Tests that need systemd-analyze skip when it is missing.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from voicebridge import cli, listenfds, server
from voicebridge.config import EdgeConfig, ServerConfig, VapiConfig
from voicebridge.net.front import descriptors_needed

UNITS_DIR = Path(__file__).resolve().parent.parent / "systemd"
INSTALLED_BINARY = "/opt/voicebridge/venv/bin/voicebridge"

ANALYZE = shutil.which("systemd-analyze")


def analyze() -> str:
    """The systemd-analyze binary, or skip the test that needs it."""
    if ANALYZE is None:
        pytest.skip("systemd-analyze not installed (Debian package: systemd)")
    return ANALYZE


#: The ceiling the issue sets for ``systemd-analyze security`` (lower is safer).
MAX_EXPOSURE = 2.0

#: The drain deadline's default (``server.drain_deadline_s``).
DRAIN_DEADLINE_DEFAULT_S = ServerConfig().drain_deadline_s
#: What a stop takes beyond the drain deadline, at worst: the Vapi goodbyes and socket
#: closes, the <Connect action> requests, hypercorn's graceful shutdown.
STOP_AFTER_DEADLINE_S = (
    VapiConfig().end_deadline_s
    + server.CLOSE_SLACK_S
    + server.ACTION_GRACE_S
    + server.GRACEFUL_TIMEOUT_S
)
#: The margin docs/operations.md asks operators to keep between the two.
DOCUMENTED_MARGIN_S = 15.0

#: The socket drop-in docs/operations.md prescribes for the one-process-per-core setup.
WORKERS_DROP_IN = "[Socket]\nService=voicebridge@0.service\n"

#: Keys only the template has, and keys whose values differ between the two services
#: (the template names its instance's own ops socket).
TEMPLATE_ONLY = {("Service", "CPUAffinity")}
MAY_DIFFER = {("Unit", "Description"), ("Unit", "After"), ("Service", "Sockets"),
              ("Install", "Also"), ("Service", "Environment")}


def stand_in_binary() -> str:
    """An executable for ExecStart=: the venv's voicebridge script if installed, else true."""
    script = Path(sys.executable).parent / "voicebridge"
    if script.exists():
        return str(script)
    true = shutil.which("true")
    assert true is not None
    return true


@pytest.fixture
def units(tmp_path: Path) -> Path:
    """A directory with the shipped units, ExecStart pointing at an existing binary."""
    binary = stand_in_binary()
    for unit in sorted(UNITS_DIR.glob("voicebridge*.s*")):
        if unit.suffix in (".service", ".socket"):
            text = unit.read_text()
            assert INSTALLED_BINARY in text or unit.suffix == ".socket", unit
            (tmp_path / unit.name).write_text(text.replace(INSTALLED_BINARY, binary))
    return tmp_path


def verify(directory: Path, *names: str) -> list[str]:
    """Problems ``systemd-analyze verify`` finds in the named units; [] when clean."""
    result = subprocess.run(
        [analyze(), "verify", "--man=no", *(str(directory / name) for name in names)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = (result.stdout + result.stderr).splitlines()
    # Lines about other units (the host's own) are not ours to fix.
    problems = [line for line in output if "voicebridge" in line]
    if result.returncode != 0:
        problems.append(f"exit status {result.returncode}: {' / '.join(output)}")
    return problems


def exposure(directory: Path, name: str) -> float:
    result = subprocess.run(
        [analyze(), "security", "--offline=true", "--no-pager", str(directory / name)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    return float(match.group(1))


def settings(path: Path) -> dict[tuple[str, str], list[str]]:
    """``(section, key) -> values`` of a unit file, in order; comments dropped."""
    found: dict[tuple[str, str], list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found.setdefault((section, key.strip()), []).append(value.strip())
    return found


# -- verify ---------------------------------------------------------------------------


def test_service_and_socket_verify_clean(units: Path) -> None:
    assert verify(units, "voicebridge.socket", "voicebridge.service") == []


@pytest.mark.parametrize("instance", ["0", "1"])
def test_template_instances_verify_clean(units: Path, instance: str) -> None:
    assert verify(units, f"voicebridge@{instance}.service") == []


def test_workers_setup_verifies_clean(units: Path) -> None:
    drop_in = units / "voicebridge.socket.d"
    drop_in.mkdir()
    (drop_in / "workers.conf").write_text(WORKERS_DROP_IN)
    assert verify(units, "voicebridge.socket", "voicebridge@0.service") == []


@pytest.mark.parametrize(
    ("unit", "old", "new", "complaint"),
    [
        ("voicebridge.service", "ProtectSystem=", "ProtectSytem=", "Unknown key 'ProtectSytem'"),
        ("voicebridge.service", "Type=notify", "Type=notfy", "notfy"),
        ("voicebridge.service", "ExecStart=", "ExecStart=/nonexistent/vb ", "/nonexistent/vb"),
        ("voicebridge.socket", "NoDelay=true", "NoDelay=maybe", "maybe"),
        ("voicebridge@.service", "CPUAffinity=%i", "CPUAffinity=%i-x", "CPU affinity '1-x'"),
    ],
)
def test_broken_units_fail_verification(
    units: Path, unit: str, old: str, new: str, complaint: str
) -> None:
    path = units / unit
    broken, count = re.subn(rf"^{re.escape(old)}", new, path.read_text(), count=1, flags=re.M)
    assert count == 1, f"no line starts with {old!r}"
    path.write_text(broken)
    names = ["voicebridge@1.service"] if unit.startswith("voicebridge@") else [unit]
    problems = verify(units, *names)
    assert any(complaint in problem for problem in problems), problems


def test_missing_socket_unit_fails_verification(units: Path) -> None:
    (units / "voicebridge.socket").unlink()
    problems = verify(units, "voicebridge.service")
    assert any("voicebridge.socket not found" in problem for problem in problems), problems


# -- security -------------------------------------------------------------------------


@pytest.mark.parametrize("unit", ["voicebridge.service", "voicebridge@1.service"])
def test_exposure_is_at_most_two(units: Path, unit: str) -> None:
    assert exposure(units, unit) <= MAX_EXPOSURE


# -- what the units promise -----------------------------------------------------------


def test_template_does_not_drift_from_the_service() -> None:
    service = settings(UNITS_DIR / "voicebridge.service")
    template = settings(UNITS_DIR / "voicebridge@.service")
    assert set(template) - set(service) == TEMPLATE_ONLY
    assert set(service) - set(template) == set()
    differing = {key for key in service if service[key] != template[key]}
    assert differing == MAY_DIFFER


def test_stop_timeout_exceeds_the_drain_deadline() -> None:
    service = settings(UNITS_DIR / "voicebridge.service")
    [timeout] = service[("Service", "TimeoutStopSec")]
    assert STOP_AFTER_DEADLINE_S < DOCUMENTED_MARGIN_S
    assert float(timeout) >= DRAIN_DEADLINE_DEFAULT_S + DOCUMENTED_MARGIN_S


def test_service_contract() -> None:
    service = settings(UNITS_DIR / "voicebridge.service")
    assert service[("Service", "Type")] == ["notify"]
    assert service[("Service", "NotifyAccess")] == ["main"]
    assert service[("Service", "WatchdogSec")] == ["10"]
    # Reload checks the configuration first, so that a refused one fails `systemctl reload`.
    [check, hup] = service[("Service", "ExecReload")]
    assert "voicebridge check-config --config /etc/voicebridge/voicebridge.toml" in check
    assert hup == "/bin/kill -HUP $MAINPID"
    assert service[("Unit", "Requires")] == ["voicebridge.socket"]
    credentials = {v.split(":", 1)[0] for v in service[("Service", "LoadCredential")]}
    assert credentials == {"twilio-auth-token", "vapi-api-key", "stream-token-secret"}
    socket_unit = settings(UNITS_DIR / "voicebridge.socket")
    assert socket_unit[("Socket", "FileDescriptorName")] == [listenfds.PUBLIC]
    assert socket_unit[("Socket", "Backlog")] == [str(server.LISTEN_BACKLOG)]
    # The shared directory: one per box, kept while any worker runs, one user for all.
    assert service[("Service", "RuntimeDirectory")] == ["voicebridge"]
    assert service[("Service", "RuntimeDirectoryPreserve")] == ["yes"]
    assert service[("Service", "User")] == ["voicebridge"]
    # A refused configuration is not restarted until the start limit (docs/operations.md).
    assert service[("Service", "RestartPreventExitStatus")] == [str(cli.EXIT_CONFIG)]
    # The public socket is on loopback: the TLS proxy in front is on this box.
    assert socket_unit[("Socket", "ListenStream")] == ["127.0.0.1:8080"]
    for unit in ("voicebridge.service", "voicebridge@.service", "voicebridge.socket"):
        [documentation] = settings(UNITS_DIR / unit)[("Unit", "Documentation")]
        assert documentation.split()[0] == "man:voicebridge(8)"


def _bytes(size: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)


@pytest.mark.parametrize("unit", ["voicebridge.service", "voicebridge@.service"])
def test_the_default_edge_limits_fit_well_under_the_units_resource_caps(unit: str) -> None:
    service = settings(UNITS_DIR / unit)
    [nofile] = service[("Service", "LimitNOFILE")]
    needed = descriptors_needed(EdgeConfig(), ServerConfig().max_concurrent_calls)
    # "Well under": the caps, not the descriptor table, are what a flood runs into.
    assert 2 * needed <= int(nofile)
    [high] = service[("Service", "MemoryHigh")]
    [most] = service[("Service", "MemoryMax")]
    assert 0 < _bytes(high) < _bytes(most)
    [tasks] = service[("Service", "TasksMax")]
    assert int(tasks) >= 64


#: Run in a child: enforce write-xor-execute memory the way MemoryDenyWriteExecute=yes
#: does (Linux ≥ 6.3 offers it to any process as PR_SET_MDWE), then load and run the
#: stack. A dependency that needs a JIT or writable code would fail here, not in production.
MDWE_PROBE = """
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
    sys.exit(77)
import attrs, cattrs, httpx, hypercorn.trio, orjson, quart_trio, trio, trio_websocket, twilio.rest
import voicebridge.listenfds, voicebridge.observability.journald, voicebridge.sdnotify

async def main():
    await trio.sleep(0)

trio.run(main)
assert orjson.loads(orjson.dumps({"ok": True})) == {"ok": True}
print("ran")
"""


def test_python_stack_runs_with_memory_deny_write_execute() -> None:
    package_root = str(UNITS_DIR.parent)
    result = subprocess.run(
        [sys.executable, "-c", MDWE_PROBE],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PYTHONPATH": package_root, "PATH": "/usr/bin:/bin"},
    )
    if result.returncode == 77:
        pytest.skip("this kernel has no PR_SET_MDWE (Linux < 6.3)")
    assert (result.returncode, result.stdout) == (0, "ran\n"), result.stderr
