"""The shipped units under a real PID-1 systemd: every promise of docs/operations.md.

Run as root from a checkout whose ``.venv`` is set up (``./bootstrap.sh --test``)::

    .venv/bin/python tests/system/realsystem.py

It builds a Debian 12 root file system with ``debootstrap`` (cached under
``/var/cache/voicebridge-ci``, or ``$VOICEBRIDGE_CI_CACHE``), copies it, copies this
checkout to ``/usr/local/src/voicebridge`` in the copy, and boots it with systemd as
PID 1 in ``systemd-nspawn`` on a private network namespace. Inside, it runs the shell
blocks of docs/operations.md as an operator would (pip installs from wheels the host
downloaded beforehand for Debian 12's Python: ``PIP_NO_INDEX``, ``PIP_FIND_LINKS``), then
checks socket activation, READY and STATUS, credentials and the transient user, the
journal fields, reload (a valid file, and a refused one that makes ``systemctl reload``
fail), the watchdog, a drain with calls in flight, a stop with the socket still
listening, a second SIGTERM, ``IPAddressDeny=``, ``systemd-analyze security`` and the
``@`` template.

Calls are placed by the project's simulated Twilio caller against its simulated Vapi,
both run by this process after it has joined the container's network namespace: they
reach the service on 127.0.0.1:8080 exactly as a local proxy would.

One line per check, then ``N passed, N failed``; exit status 1 if any failed. Where it
cannot run (not root, no ``systemd-nspawn`` or ``debootstrap``) it says why and exits 0.
Not a pytest module: it takes minutes and needs root. ``VOICEBRIDGE_CI_KEEP=1`` leaves the
container running at the end (for ``nsenter -t PID -a``) instead of powering it off.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import trio  # noqa: E402

from voicebridge.loopback import LOOPBACK_ACCOUNT_SID  # noqa: E402
from voicebridge.sim.caller import (  # noqa: E402
    CallReport,
    Hangup,
    Silence,
    SimTwilioSettings,
    Speak,
    Step,
    WaitForAssistantDone,
    place_call,
)
from voicebridge.sim.vapi import SimVapi, SimVapiBehaviour  # noqa: E402
from voicebridge.twilio.signature import sign  # noqa: E402

CACHE = Path(os.environ.get("VOICEBRIDGE_CI_CACHE", "/var/cache/voicebridge-ci"))
SUITE = "bookworm"
#: What the root file system holds besides the minimal base: systemd as PID 1, procps (the
#: units' /bin/kill, as on any Debian server), Python for the venv, iproute2 (an address for
#: the firewall check) and curl (the docs' probes).
INCLUDE = "systemd,systemd-sysv,dbus,procps,python3,python3-venv,iproute2,curl"
PUBLIC_URL = "https://voicebridge.example.test"
BRIDGE = "http://127.0.0.1:8080"
OPS = "http://127.0.0.1:9180"
CONFIG = "/etc/voicebridge/voicebridge.toml"
SRC = "/usr/local/src/voicebridge"
WHEELS_INSIDE = "/var/tmp/voicebridge-wheels"
#: The drain deadline the box runs with (30 s by default): long enough for a short call
#: to end on its own during the drain, short enough for CI.
DRAIN_DEADLINE_S = 6.0
#: A link-local address the firewall check puts on the container's loopback.
LINK_LOCAL = "169.254.7.7"
INNER_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CLONE_NEWNET = 0x40000000
#: Debian 12's Python, for which the wheels are fetched, and the platforms they may be for.
CONTAINER_PYTHON = "3.11"
MANYLINUX = ("manylinux1_x86_64", "manylinux_2_5_x86_64", "manylinux2014_x86_64",
             "manylinux_2_17_x86_64", "manylinux_2_28_x86_64", "manylinux_2_34_x86_64")

#: Greets (1.25 s), then listens for ever: calls end when the caller or the server ends them.
PATIENT = SimVapiBehaviour(
    greeting_clip="caller_1", reply_clips=("caller_2",), end_after_replies=None,
    think_delay_s=0.2, customer_audio_timeout_s=None,
)


# -- reporting -------------------------------------------------------------------------


class Results:
    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        if ok:
            self.passed += 1
        else:
            self.failed += 1
        line = f"{'PASS' if ok else 'FAIL'}  {name}"
        print(line + (f" — {detail}" if detail else ""), flush=True)
        return ok

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        """A group of checks: an exception in it is one failed check, and the run goes on."""
        try:
            yield
        except Exception as exc:  # reported; the next group still runs
            self.check(name, False, f"{type(exc).__name__}: {str(exc)[:300]}")


def skip(reason: str) -> None:
    print(f"SKIPPED: the real-system test cannot run here: {reason}", flush=True)
    raise SystemExit(0)


# -- the root file system --------------------------------------------------------------


def apt_mirror() -> str:
    """The Debian mirror apt is configured with (its ``URIs:`` or ``deb`` line)."""
    sources = sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))
    for path in sources:
        for line in path.read_text().splitlines():
            if line.startswith("URIs:") and "security" not in line:
                return line.split()[1]
    listing = Path("/etc/apt/sources.list")
    if listing.exists():
        for line in listing.read_text().splitlines():
            words = line.split()
            if words[:1] == ["deb"] and "security" not in line:
                return next(w for w in words[1:] if "://" in w)
    return "http://deb.debian.org/debian"


def base_rootfs() -> tuple[Path, str]:
    """The cached root file system (built once per machine): path, and how it was had."""
    key = hashlib.sha256(f"{SUITE} {INCLUDE}".encode()).hexdigest()[:12]
    path = CACHE / f"rootfs-{SUITE}-{key}"
    if (path / ".voicebridge-ci-complete").exists():
        return path, f"cached in {path}"
    started = time.monotonic()
    building = path.with_name(path.name + ".building")
    shutil.rmtree(building, ignore_errors=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    mirror = apt_mirror()
    log = CACHE / "debootstrap.log"
    with log.open("w") as out:
        subprocess.run(
            ["debootstrap", "--variant=minbase", f"--include={INCLUDE}", SUITE, str(building),
             mirror], stdout=out, stderr=subprocess.STDOUT, check=True,
        )
    (building / ".voicebridge-ci-complete").touch()
    shutil.rmtree(path, ignore_errors=True)
    building.rename(path)
    for older in CACHE.glob(f"rootfs-{SUITE}-*"):  # made for another package list
        if older != path and not older.name.endswith(".building"):
            shutil.rmtree(older, ignore_errors=True)
    return path, f"built from {mirror} in {time.monotonic() - started:.0f} s"


def remove_stale_copies() -> None:
    """The copies of runs that were killed (their runner's pid is gone)."""
    for stale in CACHE.glob("vbci-*"):
        pid = stale.name.split("-")[1].split(".")[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)


def build_wheels(checkout: Path, directory: Path) -> None:
    """The wheels of every dependency (and setuptools, which builds the checkout inside),
    for the container's Python whatever this one is, so that pip there installs with no
    index."""
    project = tomllib.loads((checkout / "pyproject.toml").read_text())
    dependencies = project["project"]["dependencies"]
    # What pip builds the checkout with inside: the build system's own pins.
    build_requires = project["build-system"]["requires"]
    platforms = [arg for tag in MANYLINUX for arg in ("--platform", tag)]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
         "-c", str(checkout / "constraints.txt"), "--only-binary=:all:",
         "--python-version", CONTAINER_PYTHON, "--implementation", "cp",
         "--abi", "cp" + CONTAINER_PYTHON.replace(".", ""), *platforms,
         "-d", str(directory), *dependencies, *build_requires, "pip"],
        check=True, capture_output=True, text=True,
    )


def copy_checkout(target: Path) -> None:
    ignore = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info", "build",
                                    ".mypy_cache", ".pytest_cache", ".ruff_cache")
    shutil.copytree(REPO, target, ignore=ignore)


# -- the container ---------------------------------------------------------------------


class Container:
    """A booted nspawn container; commands run in it through ``nsenter``."""

    def __init__(self, root: Path, name: str) -> None:
        self.root = root
        self.name = name
        self.log = root.with_name(root.name + ".console.log")
        self.nspawn: subprocess.Popen[bytes] | None = None
        self.pid1 = 0

    def boot(self) -> float:
        started = time.monotonic()
        environment = dict(os.environ, SYSTEMD_NSPAWN_UNIFIED_HIERARCHY="1")
        with self.log.open("wb") as out:
            self.nspawn = subprocess.Popen(
                ["systemd-nspawn", "-b", "--register=no", "--keep-unit", "--private-network",
                 "--capability=CAP_BPF,CAP_PERFMON", "--system-call-filter=bpf",
                 "-M", self.name, "-D", str(self.root)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=environment,
            )
        deadline = time.monotonic() + 60
        while not self.pid1:
            if self.nspawn.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"systemd-nspawn did not boot; see {self.log}")
            self.pid1 = _child_named(self.nspawn.pid, "systemd")
            time.sleep(0.1)
        # Until systemd has its private bus socket, systemctl cannot ask it anything.
        while True:
            state = self.run("systemctl is-system-running --wait", timeout=90)
            if state.stdout.strip() in ("running", "degraded"):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the container's systemd is {state.stdout.strip()!r} "
                                   f"({state.stderr.strip()[-200:]})")
            time.sleep(0.2)
        return time.monotonic() - started

    def command(self, script: str) -> list[str]:
        return ["nsenter", "-t", str(self.pid1), "-a", "env", "-i", INNER_PATH, "LANG=C.UTF-8",
                "sh", "-c", script]

    def run(
        self, script: str, *, timeout: float = 120, env: str = ""
    ) -> subprocess.CompletedProcess[str]:
        """``script`` in the container (sh -c), as root; its exit status is not checked."""
        return subprocess.run(self.command(f"export {env}\n{script}" if env else script),
                              capture_output=True, text=True, timeout=timeout, check=False)

    async def arun(self, script: str, *, limit_s: float = 120) -> subprocess.CompletedProcess[str]:
        return await trio.to_thread.run_sync(lambda: self.run(script, timeout=limit_s))

    def join_network(self) -> None:
        """This process joins the container's network namespace (its threads to come too)."""
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/proc/{self.pid1}/ns/net", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns(CLONE_NEWNET) failed")
        finally:
            os.close(fd)

    def shut_down(self) -> None:
        if self.nspawn is None or self.nspawn.poll() is not None:
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.run("systemctl poweroff", timeout=10)
        try:
            self.nspawn.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.nspawn.send_signal(signal.SIGKILL)
            self.nspawn.wait()


def _child_named(parent: int, name: str) -> int:
    for status in Path("/proc").glob("[0-9]*/status"):
        with contextlib.suppress(OSError):
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines()
                          if ":\t" in line)
            if fields.get("PPid", "").strip() == str(parent) and fields["Name"].strip() == name:
                return int(status.parent.name)
    return 0


# -- helpers for the checks -------------------------------------------------------------


def shell_blocks(markdown: str, heading: str) -> list[str]:
    """The ```sh blocks of one ``## heading`` section."""
    section = markdown.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)```", section, flags=re.S)


def set_key(text: str, section: str, key: str, value: str) -> str:
    """``key = value`` in ``[section]`` of a TOML file like the example (one line a key)."""
    start = text.index(f"\n[{section}]\n")
    end = text.find("\n[", start + 1)
    end = len(text) if end < 0 else end
    body, count = re.subn(rf"(?m)^{key} = .*$", f"{key} = {value}", text[start:end], count=1)
    if count != 1:
        raise ValueError(f"no {key} in [{section}]")
    return text[:start] + body + text[end:]


def show(container: Container, unit: str, *props: str) -> dict[str, str]:
    out = container.run(f"systemctl show {unit} " + " ".join(f"-p {p}" for p in props)).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def journal(container: Container, unit: str, *matches: str) -> list[dict[str, Any]]:
    out = container.run(f"journalctl -u '{unit}' -o json --no-pager " + " ".join(matches))
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


async def wait_until(predicate: Callable[[], bool], limit_s: float, what: str) -> float:
    """Poll ``predicate`` (systemd's state, which tells no one when it changes)."""
    started = trio.current_time()
    with trio.move_on_after(limit_s):
        while True:
            if await trio.to_thread.run_sync(predicate):
                return trio.current_time() - started
            await trio.sleep(0.1)
    raise TimeoutError(f"{what}: not within {limit_s} s")


async def http_get(url: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as http:
        return await http.get(url)


class Box:
    """What the checks share: the container, the simulated Vapi, the auth token."""

    def __init__(self, container: Container, vapi: SimVapi, auth_token: str) -> None:
        self.container = container
        self.vapi = vapi
        self.auth_token = auth_token
        self.fallback_words = "technical difficulties"
        #: What ``systemctl stop voicebridge.service`` said on stderr (the drain check).
        self.stop_warning = ""
        self.overflow_words = "all our lines are busy"

    def caller(self, *, bridge: str = BRIDGE, token: str | None = None) -> SimTwilioSettings:
        return SimTwilioSettings(bridge_url=bridge, public_url=PUBLIC_URL,
                                 account_sid=LOOPBACK_ACCOUNT_SID,
                                 auth_token=self.auth_token if token is None else token)

    async def call(self, script: Sequence[Step], **caller: Any) -> CallReport:
        return await place_call(self.caller(**caller), list(script))

    def status(self, unit: str = "voicebridge.service") -> str:
        return show(self.container, unit, "StatusText")["StatusText"]

    def state(self, unit: str = "voicebridge.service") -> dict[str, str]:
        return show(self.container, unit, "ActiveState", "SubState", "MainPID", "Result",
                    "ExecMainStatus", "NRestarts", "StatusText")

    def write_config(self, edit: Callable[[str], str] = lambda text: text) -> None:
        path = self.container.root / CONFIG.lstrip("/")
        path.write_text(edit(self.base_config))

    base_config = ""


#: Hear the greeting, say something, hear the answer, hang up: about 4 s.
SHORT_CALL = (WaitForAssistantDone(quiet_s=0.3), Speak("caller_1"),
              WaitForAssistantDone(quiet_s=0.3), Hangup())


def long_call(seconds: float) -> tuple[Step, ...]:
    return (WaitForAssistantDone(quiet_s=0.3), Silence(seconds), Hangup())


def heard_assistant(report: CallReport) -> bool:
    return report.first_audio_ms is not None and not report.protocol_violations


# -- the checks --------------------------------------------------------------------------


async def check_install(r: Results, c: Container, docs: str) -> None:
    [install, _start] = shell_blocks(docs, "Install on Debian or Ubuntu")[:2]
    offline = f"PIP_NO_INDEX=1 PIP_FIND_LINKS={WHEELS_INSIDE} PIP_DISABLE_PIP_VERSION_CHECK=1"
    done = await trio.to_thread.run_sync(
        lambda: c.run("set -e\n" + install, env=offline, timeout=600))
    version = c.run("/opt/voicebridge/venv/bin/voicebridge --version").stdout.strip()
    r.check("install as docs/operations.md says (venv, compileall, config, units)",
            done.returncode == 0 and bool(version),
            version if done.returncode == 0 else done.stderr[-400:])
    [credentials] = shell_blocks(docs, "Credentials")[:1]
    done = c.run("set -e\n" + credentials)
    mode = c.run("stat -c '%a %U' /etc/voicebridge/credentials "
                 "/etc/voicebridge/credentials/vapi-api-key").stdout.split("\n")
    r.check("credentials as docs/operations.md says: root-only files",
            done.returncode == 0 and mode[:2] == ["700 root", "600 root"], " / ".join(mode[:2]))


async def check_socket_activation(r: Results, box: Box) -> None:
    c = box.container
    c.run("systemctl start voicebridge.socket voicebridge-ops.socket")
    before = box.state()["ActiveState"]
    readyz = await http_get(f"{OPS}/readyz")
    state = box.state()
    r.check("socket activation: the service starts at the first connection, which is served",
            before == "inactive" and state["ActiveState"] == "active"
            and readyz.status_code == 200 and readyz.text.strip() == "ready",
            f"before: {before}, after: {state['ActiveState']}, /readyz {readyz.status_code} "
            f"{readyz.text.strip()!r}")
    r.check("READY and STATUS: active only once ready, status line as documented",
            state["SubState"] == "running"
            and state["StatusText"] == "Serving: 0 calls active, limit 50", state["StatusText"])


async def check_docs_start(r: Results, c: Container, docs: str) -> None:
    [_install, start] = shell_blocks(docs, "Install on Debian or Ubuntu")[:2]
    done = c.run("set -e\n" + start)
    r.check("check-config under systemd-run, enable --now, status, /readyz as documented",
            done.returncode == 0 and "Serving: 0 calls active, limit 50" in done.stdout
            and done.stdout.rstrip().endswith("ready"),
            done.stdout.strip().splitlines()[-1] if done.returncode == 0 else done.stderr[-300:])


async def check_call_and_credentials(r: Results, box: Box) -> None:
    c = box.container
    statuses: list[str] = []

    async def watch_status() -> None:
        while True:
            statuses.append(await trio.to_thread.run_sync(box.status))
            await trio.sleep(0.3)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_status)
        report = await box.call(SHORT_CALL)
        nursery.cancel_scope.cancel()
    r.check("a call through the activated socket: the caller hears the assistant",
            heard_assistant(report) and report.webhook_status == 200,
            f"first audio at {report.first_audio_ms} ms, ended by {report.ended_by}")
    r.check("STATUS follows the calls", "Serving: 1 call active, limit 50" in statuses,
            f"seen: {sorted(set(statuses))}")
    pid = box.state()["MainPID"]
    uid = int(c.run(f"grep ^Uid: /proc/{pid}/status").stdout.split()[1])
    user = show(c, "voicebridge.service", "User")["User"]
    environ = c.run(f"tr '\\0' '\\n' < /proc/{pid}/environ").stdout
    directory = next((line.split("=", 1)[1] for line in environ.splitlines()
                      if line.startswith("CREDENTIALS_DIRECTORY=")), "")
    names = sorted(c.run(f"ls {directory}").stdout.split()) if directory else []
    forged = await http_signed_webhook(box, token="not-the-auth-token")
    r.check("credentials: $CREDENTIALS_DIRECTORY holds the three; the token in it signs",
            names == ["stream-token-secret", "twilio-auth-token", "vapi-api-key"]
            and forged == 403,
            f"{directory}: {names}; a webhook signed with another token: HTTP {forged}")
    # systemd allocates transient users from 61184-65519 (DynamicUser=, systemd.exec(5)).
    r.check("DynamicUser: the service runs as a transient user, not root",
            61184 <= uid <= 65519 and user == "voicebridge", f"User={user}, uid {uid}")
    entries = journal(c, "voicebridge.service", "EVENT=call-end", f"CALL_SID={report.call_sid}")
    fields = entries[0] if entries else {}
    r.check("journal: journalctl finds the call's call-end by CALL_SID, with its fields",
            len(entries) == 1 and fields.get("OUTCOME") == "caller-hung-up"
            and float(fields.get("DURATION_S", 0)) > 1 and fields.get("PRIORITY") == "6",
            " ".join(f"{k}={fields.get(k)}" for k in ("OUTCOME", "DURATION_S", "PRIORITY",
                                                      "SYSLOG_IDENTIFIER")))


async def http_signed_webhook(box: Box, *, token: str) -> int:
    url = f"{PUBLIC_URL}/twilio/voice"
    form = {"CallSid": "CA" + os.urandom(16).hex(), "AccountSid": LOOPBACK_ACCOUNT_SID,
            "From": "+15550100001", "To": "+15550100002"}
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.post(f"{BRIDGE}/twilio/voice", data=form,
                                   headers={"X-Twilio-Signature": sign(url, form, token)})
    return response.status_code


async def check_reload(r: Results, box: Box) -> None:
    c = box.container
    pid = box.state()["MainPID"]
    box.write_config(lambda t: set_key(t, "server", "max_concurrent_calls", "7"))
    good = c.run("systemctl reload voicebridge.service")
    status = box.status()
    r.check("reload, valid file: systemctl reload exits 0, the new limit is in STATUS",
            good.returncode == 0 and status == "Serving: 0 calls active, limit 7"
            and box.state()["MainPID"] == pid,
            f"exit {good.returncode}, {status!r}" + ("" if good.returncode == 0 else "; " + c.run(
                "journalctl -u voicebridge.service --no-pager -o cat -n 8").stdout[-600:]))
    box.write_config(lambda t: set_key(t, "server", "max_concurrent_calls", "-3"))
    refused = c.run("systemctl reload voicebridge.service")
    state = box.state()
    report = await box.call(SHORT_CALL)
    r.check("reload, refused file: systemctl reload fails, the service serves on unchanged",
            refused.returncode != 0 and state["ActiveState"] == "active"
            and state["MainPID"] == pid and state["StatusText"].endswith("limit 7")
            and heard_assistant(report),
            f"exit {refused.returncode}, {state['ActiveState']}, {state['StatusText']!r}, "
            "a call after it heard the assistant" if heard_assistant(report) else "")
    said = c.run("journalctl -u voicebridge.service --no-pager -o cat -n 20").stdout
    r.check("reload, refused file: the journal names the key and the reason",
            "max_concurrent_calls" in said and "config error" in said,
            next((ln for ln in said.splitlines() if "max_concurrent_calls" in ln), "")[:160])
    box.write_config()
    c.run("systemctl reload voicebridge.service")


async def check_watchdog(r: Results, box: Box) -> None:
    c = box.container
    before = box.state()
    c.run(f"kill -STOP {before['MainPID']}")

    def restarted() -> bool:
        now = box.state()
        return now["MainPID"] not in ("0", before["MainPID"]) and now["SubState"] == "running"

    took = await wait_until(restarted, 40, "restart after the watchdog timeout")
    said = c.run("journalctl -u voicebridge.service --no-pager -o cat -n 40").stdout
    after = box.state()
    readyz = await http_get(f"{OPS}/readyz")
    r.check("watchdog: a frozen process is killed and restarted, and serves again",
            "Watchdog timeout (limit 10s)!" in said and readyz.status_code == 200
            and int(after["NRestarts"]) == int(before["NRestarts"]) + 1,
            f"frozen pid {before['MainPID']} replaced by {after['MainPID']} after {took:.1f} s")


async def check_drain(r: Results, box: Box) -> None:
    c = box.container
    reports: dict[str, CallReport] = {}
    stop: dict[str, Any] = {}

    async def call(name: str, script: Sequence[Step]) -> None:
        reports[name] = await box.call(script)

    async def stop_service() -> None:
        started = trio.current_time()
        done = await c.arun("systemctl stop voicebridge.service")
        stop.update(status=done.returncode, took=trio.current_time() - started,
                    said=done.stderr)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(call, "short", long_call(2.0))
        nursery.start_soon(call, "long", long_call(60))
        await wait_until(lambda: box.status().startswith("Serving: 2 calls"), 20, "two calls up")
        nursery.start_soon(stop_service)
        await wait_until(lambda: box.status().startswith("Draining"), 10, "draining")
        readyz = await http_get(f"{OPS}/readyz")
        await call("overflow", SHORT_CALL)
    state = box.state()
    box.stop_warning = str(stop.get("said", ""))
    r.check("drain: the call that ends on its own during the drain ends normally",
            reports["short"].ended_by == "caller" and heard_assistant(reports["short"]),
            f"ended by {reports['short'].ended_by}")
    r.check("drain: past the deadline the caller still on hears the fallback",
            box.fallback_words in reports["long"].final_say.lower(),
            f"{reports['long'].final_say[:60]!r} after {reports['long'].duration_s:.1f} s")
    r.check("drain: a new caller hears the overflow message; /readyz answers 503",
            box.overflow_words in reports["overflow"].final_say.lower()
            and readyz.status_code == 503,
            f"{reports['overflow'].final_say[:50]!r}; /readyz {readyz.status_code} "
            f"{readyz.text.strip()!r}")
    done = journal(c, "voicebridge.service", "EVENT=drain-done")
    fields = done[-1] if done else {}
    r.check("drain: exit status 0, systemctl stop returns after the deadline",
            stop.get("status") == 0 and state["Result"] == "success"
            and state["ExecMainStatus"] == "0" and state["ActiveState"] == "inactive"
            and DRAIN_DEADLINE_S <= stop.get("took", 0) < DRAIN_DEADLINE_S + 10,
            f"stop took {stop.get('took', 0):.2f} s, ExecMainStatus={state['ExecMainStatus']}")
    r.check("drain: EVENT=drain-done in the journal with its figures",
            fields.get("ACTIVE_CALLS") == "2" and fields.get("ENDED_CALLS") == "1"
            and fields.get("STILL_ACTIVE") == "0" and fields.get("ACTIONS_UNANSWERED") == "0",
            " ".join(f"{k}={fields.get(k)}" for k in
                     ("DURATION_S", "ACTIVE_CALLS", "ENDED_CALLS", "STILL_ACTIVE",
                      "ACTIONS_UNANSWERED")))


async def check_stop_with_socket(r: Results, box: Box, warning: str) -> None:
    r.check("stop of the service alone: systemctl warns that the socket can still start it",
            "can still be activated by" in warning and "voicebridge.socket" in warning,
            " ".join(warning.split())[:160])
    state = box.state()
    sockets = show(box.container, "voicebridge.socket", "ActiveState")["ActiveState"]
    report = await box.call(SHORT_CALL)
    after = box.state()
    r.check("stop of the service alone: the socket still listens and the next call starts it",
            state["ActiveState"] == "inactive" and sockets == "active"
            and heard_assistant(report) and after["ActiveState"] == "active",
            f"service {state['ActiveState']} → {after['ActiveState']}, socket {sockets}")


async def check_second_sigterm(r: Results, box: Box) -> None:
    c = box.container
    reports: dict[str, CallReport] = {}
    timing: dict[str, float] = {}

    async def call() -> None:
        reports["long"] = await box.call(long_call(60))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(call)
        await wait_until(lambda: box.status().startswith("Serving: 1 call"), 20, "the call up")
        c.run("systemctl kill -s SIGTERM voicebridge.service")
        await wait_until(lambda: box.status().startswith("Draining"), 10, "draining")
        c.run("systemctl kill -s SIGTERM voicebridge.service")
        second = trio.current_time()
        await wait_until(lambda: box.state()["ActiveState"] == "inactive", 20, "stopped")
        timing["stopped"] = trio.current_time() - second
    state = box.state()
    r.check("second SIGTERM: stops at once, the caller hears the fallback, exit 0",
            timing["stopped"] < DRAIN_DEADLINE_S / 2 and state["ExecMainStatus"] == "0"
            and box.fallback_words in reports["long"].final_say.lower(),
            f"inactive {timing['stopped']:.2f} s after the second signal (deadline "
            f"{DRAIN_DEADLINE_S:.0f} s), ExecMainStatus={state['ExecMainStatus']}")


async def check_firewall(r: Results, box: Box) -> None:
    """``IPAddressDeny=link-local``: the service cannot reach a link-local address that
    this process (outside the service's cgroup) reaches."""
    c = box.container
    c.run(f"ip addr add {LINK_LOCAL}/32 dev lo")
    arrived: list[str] = []
    listener = trio.socket.socket()
    await listener.bind((LINK_LOCAL, 0))
    listener.listen(16)
    port = listener.getsockname()[1]

    async def accept() -> None:
        while True:
            conn, peer = await listener.accept()
            arrived.append(peer[0])
            conn.close()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(accept)
            probe = await trio.open_tcp_stream(LINK_LOCAL, port)
            await probe.aclose()
            await wait_until(lambda: bool(arrived), 5, "the probe's connection")
            box.write_config(lambda t: set_key(t, "vapi", "base_url",
                                               f'"http://{LINK_LOCAL}:{port}"'))
            c.run("systemctl restart voicebridge.service")
            report = await box.call(SHORT_CALL)
            await trio.sleep(0.5)
            nursery.cancel_scope.cancel()
    finally:
        listener.close()
        box.write_config()
        c.run("systemctl restart voicebridge.service")
        c.run(f"ip addr del {LINK_LOCAL}/32 dev lo")
    deny = show(c, "voicebridge.service", "IPAddressDeny")["IPAddressDeny"]
    r.check("IPAddressDeny=link-local enforced: the service's connections never arrive",
            len(arrived) == 1 and box.fallback_words in report.final_say.lower(),
            f"{LINK_LOCAL}:{port} reached by the runner, not by the service (its caller "
            f"heard {report.final_say[:40]!r}); IPAddressDeny={deny}")


async def check_security(r: Results, c: Container) -> None:
    done = c.run("systemd-analyze security --no-pager voicebridge.service")
    found = re.search(r"Overall exposure level for voicebridge\.service: ([0-9.]+) (\S+)",
                      done.stdout)
    score = float(found.group(1)) if found else 99.0
    r.check("systemd-analyze security inside the container: exposure at most 2.0",
            score <= 2.0, found.group(0) if found else done.stderr[-200:])


async def check_template(r: Results, box: Box, docs: str) -> None:
    c = box.container
    [workers] = shell_blocks(docs, "All cores: one process per core")[:1]
    cpus = len(os.sched_getaffinity(0))
    count = min(2, cpus)
    script = workers.replace(
        "systemctl enable --now voicebridge@0.service voicebridge@1.service "
        "voicebridge@2.service voicebridge@3.service",
        "systemctl enable --now " + " ".join(f"voicebridge@{n}.service" for n in range(count)),
    ).replace("127.0.1.3", f"127.0.1.{count - 1}")
    done = c.run(f"cd {SRC}\nset -e\n" + script)
    r.check(f"@ template: the docs' commands start {count} workers; worker {count - 1} ready",
            done.returncode == 0 and re.search(r"(?m)^ready", done.stdout) is not None,
            "" if done.returncode == 0 else done.stderr[-300:])
    reports = []

    async def call() -> None:
        reports.append(await box.call(SHORT_CALL))

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(call)
    counted = []
    pinned = []
    for n in range(count):
        metrics = (await http_get(f"http://127.0.1.{n}:9180/metrics")).text
        counted.append(sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                           if line.startswith("voicebridge_calls_total{")))
        pid = show(c, f"voicebridge@{n}.service", "MainPID")["MainPID"]
        pinned.append(c.run(f"grep Cpus_allowed_list /proc/{pid}/status").stdout.split()[-1])
    r.check("@ template: calls through the one socket; each worker pinned, counting its own",
            len(reports) == 4 and all(heard_assistant(rep) for rep in reports)
            and sum(counted) == 4 and pinned == [str(n) for n in range(count)],
            f"calls per worker {counted}, CPUs {pinned}")


# -- the run -----------------------------------------------------------------------------


async def run_checks(r: Results, c: Container) -> None:
    docs = (REPO / "docs" / "operations.md").read_text()
    with r.step("install"):
        await check_install(r, c, docs)
    credentials = c.root / "etc/voicebridge/credentials"
    auth_token = (credentials / "twilio-auth-token").read_text().strip()
    vapi = SimVapi(api_key=(credentials / "vapi-api-key").read_text().strip(), behaviour=PATIENT)
    async with trio.open_nursery() as nursery:
        await nursery.start(vapi.serve)
        box = Box(c, vapi, auth_token)
        example = (c.root / CONFIG.lstrip("/")).read_text()
        for section, key, value in (
            ("server", "public_url", f'"{PUBLIC_URL}"'),
            ("server", "drain_deadline_s", str(DRAIN_DEADLINE_S)),
            ("twilio", "account_sid", f'"{LOOPBACK_ACCOUNT_SID}"'),
            ("vapi", "base_url", f'"{vapi.base_url}"'),
            ("vapi", "assistant_id", '"sim"'),
        ):
            example = set_key(example, section, key, value)
        Box.base_config = example
        box.write_config()
        checks: list[tuple[str, Callable[[], Awaitable[None]]]] = [
            ("socket activation", lambda: check_socket_activation(r, box)),
            ("start as documented", lambda: check_docs_start(r, c, docs)),
            ("a call, credentials, journal", lambda: check_call_and_credentials(r, box)),
            ("reload", lambda: check_reload(r, box)),
            ("watchdog", lambda: check_watchdog(r, box)),
            ("security", lambda: check_security(r, c)),
            ("firewall", lambda: check_firewall(r, box)),
            ("drain", lambda: check_drain(r, box)),
            ("stop with the socket listening",
             lambda: check_stop_with_socket(r, box, box.stop_warning)),
            ("second SIGTERM", lambda: check_second_sigterm(r, box)),
            ("@ template", lambda: check_template(r, box, docs)),
        ]
        for name, check in checks:
            with r.step(name), trio.fail_after(180):
                await check()
        nursery.cancel_scope.cancel()


def main() -> int:
    if os.geteuid() != 0:
        skip("it must run as root (debootstrap, systemd-nspawn)")
    for tool, package in (("systemd-nspawn", "systemd-container"), ("debootstrap", "debootstrap"),
                          ("nsenter", "util-linux")):
        if shutil.which(tool) is None:
            skip(f"{tool} is not installed (Debian package {package}; ./bootstrap.sh --test)")
    r = Results()
    started = time.monotonic()
    remove_stale_copies()
    base, how = base_rootfs()
    r.check("root file system (debootstrap bookworm)", True, how)
    name = f"vbci-{os.getpid()}"
    root = CACHE / name
    container = Container(root, name)
    try:
        subprocess.run(["cp", "-a", "--reflink=auto", str(base), str(root)], check=True)
        (root / "etc/hostname").write_text(name + "\n")
        copy_checkout(root / SRC.lstrip("/"))
        build_wheels(root / SRC.lstrip("/"), root / WHEELS_INSIDE.lstrip("/"))
        took = container.boot()
        r.check("boot: systemd is PID 1 in the container and the system is running", True,
                f"{took:.1f} s")
        container.join_network()
        trio.run(run_checks, r, container)
    except Exception as exc:  # one failed check, then the summary
        r.check("the run itself", False, f"{type(exc).__name__}: {str(exc)[:400]}")
    finally:
        if os.environ.get("VOICEBRIDGE_CI_KEEP"):
            print(f"kept: nsenter -t {container.pid1} -a; poweroff, then rm -r {root}")
        else:
            container.shut_down()
            shutil.rmtree(root, ignore_errors=True)
        if not r.failed:
            with contextlib.suppress(OSError):
                container.log.unlink()
        else:
            print(f"the container's console: {container.log}", flush=True)
    print(f"{r.passed} passed, {r.failed} failed (in {time.monotonic() - started:.0f} s)",
          flush=True)
    return 1 if r.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
