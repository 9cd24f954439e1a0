"""Processes of a load test: the bridge under test in its own (pinned) process, and /proc.

``BridgeProcess.start`` runs ``python -m voicebridge.loadtest.bridge_main``: the real
server, configured in code for loopback against the load generator's simulated
assistant, listening on a socket this process bound and handed down (so the port is
known before the child starts), optionally pinned to one core with
``os.sched_setaffinity``. The child says ``ready`` on stdout once it accepts calls;
``stop`` sends SIGTERM (the server's drain) and, past a deadline, SIGKILL.

``ProcessSample`` reads a process's CPU time and resident memory from ``/proc``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence

import trio
from attrs import frozen

from voicebridge.errors import VoicebridgeError

#: How long the child may take to import, bind and say ``ready``.
START_DEADLINE_S = 30.0
#: How long a SIGTERM'd bridge may take to drain (no calls are left by then) and exit.
STOP_DEADLINE_S = 15.0
#: The environment variables the child reads its settings from (not argv: ``ps`` shows
#: argv, and the secrets, throwaway as they are, have no business there).
ENV_PREFIX = "VOICEBRIDGE_LOADTEST_"

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class LoadTestError(VoicebridgeError):
    """The load test could not run (the bridge did not start, a bad argument, …)."""


@frozen
class ProcessSample:
    """A process's CPU seconds (user + system) and resident set, at one moment."""

    cpu_s: float
    rss_kib: int

    @classmethod
    def of(cls, pid: int) -> ProcessSample:
        """Read ``/proc/<pid>/stat`` and ``/proc/<pid>/status``."""
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
        # After the ")" that ends the command name: state is field 0, utime 11, stime 12.
        cpu_s = (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
        rss_kib = 0
        with open(f"/proc/{pid}/status", "rb") as status:
            for line in status:
                if line.startswith(b"VmRSS:"):
                    rss_kib = int(line.split()[1])
                    break
        return cls(cpu_s=cpu_s, rss_kib=rss_kib)


def pin_to(cpus: set[int]) -> None:
    """Pin this process to ``cpus`` (Linux)."""
    os.sched_setaffinity(0, cpus)


def available_cpus() -> set[int]:
    """The CPUs this process may run on."""
    return set(os.sched_getaffinity(0))


class BridgeProcess:
    """The bridge under test, in a child process. Use ``start`` and ``stop``."""

    def __init__(self, process: trio.Process, port: int, auth_token: str) -> None:
        self.process = process
        self.port = port
        self.auth_token = auth_token

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    async def start(
        cls,
        *,
        assistant_url: str,
        assistant_key: str,
        auth_token: str,
        cpu: int | None,
        command: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> BridgeProcess:
        """Start the bridge and wait until it accepts calls.

        ``command`` runs something else in its place that reads the same settings and
        says ``ready`` the same way (the reference relays of ``bench/``). ``env`` adds
        to (or overrides) the environment it inherits: the trust store of ``--vapi-tls``.
        """
        listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
        port = int(listener.getsockname()[1])
        child_env = dict(os.environ)
        child_env.update(env or {})
        child_env.update({
            f"{ENV_PREFIX}FD": str(listener.fileno()),
            f"{ENV_PREFIX}PORT": str(port),
            f"{ENV_PREFIX}ASSISTANT_URL": assistant_url,
            f"{ENV_PREFIX}ASSISTANT_KEY": assistant_key,
            f"{ENV_PREFIX}AUTH_TOKEN": auth_token,
            f"{ENV_PREFIX}CPU": "" if cpu is None else str(cpu),
        })
        try:
            process = await trio.lowlevel.open_process(
                list(command or (sys.executable, "-m", "voicebridge.loadtest.bridge_main")),
                stdout=subprocess.PIPE,
                pass_fds=(listener.fileno(),),
                env=child_env,
            )
        finally:
            listener.close()  # the child holds its own copy
        bridge = cls(process, port, auth_token)
        try:
            with trio.fail_after(START_DEADLINE_S):
                await bridge._wait_ready()
        except BaseException:
            with trio.CancelScope(shield=True):
                await bridge.stop()
            raise
        return bridge

    async def _wait_ready(self) -> None:
        assert self.process.stdout is not None
        seen = b""
        while b"ready" not in seen:
            data = await self.process.stdout.receive_some(4096)
            if not data:
                code = await self.process.wait()
                raise LoadTestError(f"the bridge process exited with {code} before it was ready")
            seen += data

    async def stop(self) -> int:
        """SIGTERM, then SIGKILL past ``STOP_DEADLINE_S``; the exit code."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            with trio.move_on_after(STOP_DEADLINE_S):
                await self.process.wait()
            if self.process.returncode is None:
                self.process.kill()
        code = await self.process.wait()
        if self.process.stdout is not None:
            await self.process.stdout.aclose()
        return code
