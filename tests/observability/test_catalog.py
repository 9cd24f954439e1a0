"""Fixed MESSAGE_IDs and the journal catalog: ``journalctl -x`` says what to do.

Charter: the catalog file (systemd/voicebridge.catalog) is compiled by the real
``journalctl --update-catalog`` into a temporary root, never the machine's; entries go
to a private journald (tests/journald_fixture.py) through the real handler, and are read
back with ``journalctl -x`` in a private mount namespace (``unshare -m``) where the
temporary catalog database is bound over /var/lib/systemd/catalog: what an operator on
a box with the catalog installed would see. Skipped, with the reason, where the machine
cannot do that (no ``journalctl``; not root for journald or the mount namespace).
"""

from __future__ import annotations

import logging
import re
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import journald_fixture
from tests.journald_fixture import PrivateJournal
from voicebridge.bridge.outcome import Outcome
from voicebridge.observability.catalog import MESSAGE_IDS, message_id
from voicebridge.observability.journald import JournaldHandler
from voicebridge.observability.logs import log_event

REPO = Path(__file__).resolve().parents[2]
CATALOG = REPO / "systemd" / "voicebridge.catalog"
SYSTEM_CATALOG_DB_DIR = Path("/var/lib/systemd/catalog")

private_journal = journald_fixture.private_journal
JOURNALCTL = shutil.which("journalctl")
needs_journalctl = pytest.mark.skipif(
    JOURNALCTL is None, reason="journalctl not installed (Debian package: systemd)"
)


def catalog_ids() -> list[str]:
    return re.findall(r"^-- ([0-9a-f]{32})$", CATALOG.read_text(), re.MULTILINE)


def test_every_event_id_has_one_catalog_entry_and_every_entry_an_event() -> None:
    ids = catalog_ids()
    assert len(ids) == len(set(ids))
    assert sorted(ids) == sorted(MESSAGE_IDS.values())
    assert len(set(MESSAGE_IDS.values())) == len(MESSAGE_IDS)
    assert all(re.fullmatch(r"[0-9a-f]{32}", value) for value in MESSAGE_IDS.values())


def test_every_call_outcome_has_its_own_message_id() -> None:
    ids = {message_id("call-end", outcome.value) for outcome in Outcome}
    assert None not in ids and len(ids) == len(Outcome)
    assert message_id("reload-failed") == MESSAGE_IDS["reload-failed"]
    assert message_id("not-an-event") is None


@pytest.fixture
def catalog_root(tmp_path: Path) -> Iterator[Path]:
    """A root whose catalog database ``journalctl --update-catalog`` built from ours."""
    assert JOURNALCTL is not None
    source = tmp_path / "usr" / "lib" / "systemd" / "catalog"
    source.mkdir(parents=True)
    shutil.copy(CATALOG, source / CATALOG.name)
    result = subprocess.run(
        [JOURNALCTL, f"--root={tmp_path}", "--update-catalog"],
        capture_output=True, text=True, check=False, timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "var" / "lib" / "systemd" / "catalog" / "database").is_file()
    yield tmp_path


@needs_journalctl
def test_journalctl_compiles_the_catalog(catalog_root: Path) -> None:
    assert JOURNALCTL is not None
    listed = subprocess.run(
        [JOURNALCTL, f"--root={catalog_root}", "--list-catalog"],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout
    assert sorted(re.findall(r"^([0-9a-f]{32}) ", listed, re.MULTILINE)) == sorted(catalog_ids())
    dumped = subprocess.run(
        [JOURNALCTL, f"--root={catalog_root}", "--dump-catalog",
         MESSAGE_IDS["call-end/assistant-over-limit"]],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout
    assert "concurrency limit" in dumped and "max_concurrent_calls" in dumped


@needs_journalctl
def test_journalctl_x_explains_a_failed_assistant_leg(
    private_journal: PrivateJournal, catalog_root: Path
) -> None:
    if not SYSTEM_CATALOG_DB_DIR.is_dir() or shutil.which("unshare") is None:
        pytest.skip(f"no {SYSTEM_CATALOG_DB_DIR} to bind over, or no unshare")
    call_sid = "CA" + secrets.token_hex(16)
    handler = JournaldHandler(socket_path=private_journal.socket_path)
    log = logging.getLogger(f"voicebridge.test.catalog.{call_sid}")
    log.propagate = False
    log.addHandler(handler)
    try:
        log_event(
            log, logging.WARNING, "call-end", f"call {call_sid} ended: assistant-leg-failed",
            call_sid=call_sid, outcome="assistant-leg-failed", leg_failure="auth",
            detail="Vapi create-call failed (auth): HTTP 401",
        )
    finally:
        log.removeHandler(handler)
        handler.close()
    [entry] = private_journal.entries(f"CALL_SID={call_sid}")
    assert entry["MESSAGE_ID"] == MESSAGE_IDS["call-end/assistant-leg-failed"]
    database = catalog_root / "var" / "lib" / "systemd" / "catalog"
    script = (
        f"mount --bind {database} {SYSTEM_CATALOG_DB_DIR} && exec journalctl "
        f"--namespace={private_journal.namespace} -x --no-pager CALL_SID={call_sid}"
    )
    shown = subprocess.run(
        ["unshare", "-m", "sh", "-c", script],
        capture_output=True, text=True, check=False, timeout=30,
    )
    if shown.returncode != 0 and "mount" in shown.stderr + shown.stdout:
        pytest.skip(f"cannot make a private mount namespace here: {shown.stderr.strip()}")
    assert shown.returncode == 0, shown.stderr
    # The catalog's text, with the entry's own fields put in.
    assert f"Subject: Call {call_sid}: the assistant leg failed (auth)" in shown.stdout
    assert "DETAIL says why: Vapi create-call failed (auth): HTTP 401" in shown.stdout
    assert "check the vapi-api-key" in shown.stdout
