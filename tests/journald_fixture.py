"""A private, real systemd-journald for tests: the ``private_journal`` fixture.

The fixture starts ``systemd-journald <namespace>`` — a journal *namespace* (systemd
≥ 245) with a unique name — so it never touches the machine's own journald, its
sockets or its files, whether or not one is running. The namespace's native socket is
``/run/systemd/journal.<namespace>/socket``; its files live in
``/var/log/journal/<machine-id>.<namespace>`` (or under ``/run/log/journal`` when
``/var/log/journal`` does not exist), and ``journalctl --namespace=<namespace>`` reads
them. Everything is removed at the end of the session.

Skips (with the reason) when the binary or ``journalctl`` is missing, when not root
(journald must create its directories under ``/run``), or when journald does not come
up. Usage::

    from tests import journald_fixture
    from tests.journald_fixture import PrivateJournal

    private_journal = journald_fixture.private_journal  # or: pytest_plugins in conftest.py

    def test_x(private_journal: PrivateJournal) -> None:
        handler = JournaldHandler(socket_path=private_journal.socket_path)
        ...
        [entry] = private_journal.entries("CALL_SID=CAxyz")

``entries`` waits (polling ``journalctl``) until the match finds the expected number
of entries; ``wait_for_entries`` is the same for async tests (it runs journalctl with
``trio.run_process`` so the trio loop keeps running, e.g. to serve the call under test;
guard it with ``trio.fail_after``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
import trio

#: Where distributions install journald (Debian: /lib is /usr/lib on merged-usr).
JOURNALD_CANDIDATES = ("/lib/systemd/systemd-journald", "/usr/lib/systemd/systemd-journald")

#: How long journald gets to create its socket, and how long a query waits for entries.
#: Both happen in milliseconds on an idle machine; the margin is for a loaded CI box.
STARTUP_TIMEOUT_S = 5.0
QUERY_TIMEOUT_S = 5.0
_POLL_S = 0.02

Entry = dict[str, str]


@attrs.frozen
class PrivateJournal:
    """A running journald namespace: where to send entries and how to read them back."""

    namespace: str
    #: Native-protocol socket: give it to ``JournaldHandler(socket_path=…)`` or
    #: ``configure_logging(journal_socket=…)``.
    socket_path: str

    def journalctl_command(self, *matches: str) -> list[str]:
        """``journalctl`` reading this namespace as JSON, all fields in full (``--all``)."""
        return [
            "journalctl",
            f"--namespace={self.namespace}",
            "--output=json",
            "--all",
            "--no-pager",
            *matches,
        ]

    def entries(
        self, *matches: str, expect: int = 1, timeout: float = QUERY_TIMEOUT_S
    ) -> list[Entry]:
        """Entries matching ``matches`` (``FIELD=value``), once at least ``expect`` exist.

        journald stores datagrams asynchronously, hence the polling. With ``expect=0``
        it waits ``timeout`` and returns what there is: use it to assert an absence.
        """
        deadline = time.monotonic() + timeout
        while True:
            found = self._query(*matches)
            if (expect and len(found) >= expect) or time.monotonic() >= deadline:
                return found
            time.sleep(_POLL_S)

    async def wait_for_entries(self, *matches: str, expect: int = 1) -> list[Entry]:
        """``entries`` for async tests: waits until ``expect`` entries match.

        Never blocks the trio loop (journalctl runs under ``trio.run_process``), and
        waits for ever: put it under ``trio.fail_after``.
        """
        while True:
            result = await trio.run_process(
                self.journalctl_command(*matches), capture_stdout=True, check=False
            )
            found = _parse(result.stdout)
            if len(found) >= expect:
                return found
            await trio.sleep(_POLL_S)

    def _query(self, *matches: str) -> list[Entry]:
        result = subprocess.run(
            self.journalctl_command(*matches), capture_output=True, check=False, timeout=10
        )
        return _parse(result.stdout)


def _parse(output: bytes) -> list[Entry]:
    """journalctl's JSON lines; fields journalctl shows as byte arrays become text."""
    entries: list[Entry] = []
    for line in output.splitlines():
        raw = json.loads(line)
        entry: Entry = {}
        for name, value in raw.items():
            if isinstance(value, list):  # non-printable value: a list of byte values
                value = bytes(value).decode("utf-8", "replace")
            entry[name] = "" if value is None else str(value)
        entries.append(entry)
    return entries


@contextlib.contextmanager
def saved_voicebridge_logging() -> Iterator[None]:
    """Restore the ``voicebridge`` logger's handlers, level and propagation on exit.

    For tests that call ``configure_logging`` (which replaces them): later tests, and
    pytest's ``caplog``, find the logger as it was.
    """
    root = logging.getLogger("voicebridge")
    handlers, level, propagate = list(root.handlers), root.level, root.propagate
    try:
        yield
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
            if handler not in handlers:
                handler.close()
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)
        root.propagate = propagate


def _journald_binary() -> str | None:
    return next((path for path in JOURNALD_CANDIDATES if os.access(path, os.X_OK)), None)


def _storage_dirs(namespace: str) -> list[Path]:
    """Every directory journald may have made for ``namespace``."""
    dirs = [Path(f"/run/systemd/journal.{namespace}")]
    for root in (Path("/var/log/journal"), Path("/run/log/journal")):
        dirs += root.glob(f"*.{namespace}")
    return dirs


@contextlib.contextmanager
def run_private_journal() -> Iterator[PrivateJournal]:
    """Start a journald namespace, yield it, then stop it and delete its files.

    Calls ``pytest.skip`` when the machine cannot run one (see the module docstring).
    """
    binary = _journald_binary()
    if binary is None:
        pytest.skip(f"systemd-journald not found at {' or '.join(JOURNALD_CANDIDATES)}")
    if shutil.which("journalctl") is None:
        pytest.skip("journalctl not found: cannot read a journal back")
    if os.geteuid() != 0:
        pytest.skip("a private systemd-journald needs root (it creates /run/systemd/journal.*)")

    namespace = f"vbtest-{secrets.token_hex(4)}"
    journal = PrivateJournal(
        namespace=namespace, socket_path=f"/run/systemd/journal.{namespace}/socket"
    )
    with tempfile.TemporaryFile() as output:
        process = subprocess.Popen(
            [binary, namespace],
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C in pytest is not delivered to it twice
        )
        try:
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            while not os.path.exists(journal.socket_path):
                if process.poll() is not None or time.monotonic() >= deadline:
                    output.seek(0)
                    text = output.read().decode(errors="replace").strip()
                    pytest.skip(f"private systemd-journald did not start: {text or 'timeout'}")
                time.sleep(_POLL_S)
            yield journal
        finally:
            _stop(process)
            for directory in _storage_dirs(namespace):
                shutil.rmtree(directory, ignore_errors=True)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def private_journal() -> Iterator[PrivateJournal]:
    """A real systemd-journald in a private namespace, shared by the whole session."""
    with run_private_journal() as journal:
        yield journal
