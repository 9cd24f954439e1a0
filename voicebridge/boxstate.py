"""What the voicebridge processes of one box share through a directory: outcomes, admissions,
streams and used tokens.

With one process per core on one listening socket (``voicebridge@.service``), a call's
webhook, media stream and ``<Connect action>`` may each land on a different process.
Whatever a later request needs must therefore be readable by all of them. The shared
directory (``server.shared_dir``, by default systemd's ``RuntimeDirectory=``
``/run/voicebridge``) holds five kinds of small files:

- ``outcomes/<CallSid>``: the call's ``CallRecord`` as JSON, written by the process that
  ran the call when it ends (before it closes Twilio's socket), read by whichever
  process answers the ``<Connect action>``. Kept ``OUTCOME_RETENTION_S``.
- ``admissions/<CallSid>``: the voice webhook's answer (TwiML with the stream token),
  created exclusively by the process that admits the call, so that a repeat of the
  webhook gets the same answer from any process and no process admits the call twice.
  Emptied once the call's reservation is over (the stream started, or never did in
  time): an empty file means "admitted before, answer no longer given". Kept
  ``CALL_MEMORY_S`` after that.
- ``streams/<CallSid>``: an empty marker created exclusively when a call's media stream
  starts: one stream per CallSid per box. It also lets the process which admitted the
  call release its reservation although the stream landed elsewhere. Kept
  ``CALL_MEMORY_S`` after the call ends (the process running a call refreshes its
  marker at every sweep, so a long call's marker is never swept).
- ``early/<CallSid>``: the assistant call created early for the call (``[vapi]
  create_early``, ``voicebridge.bridge.early``): "creating", then its id and socket URL
  (a bearer secret, as the directory's tokens are), created exclusively by the process
  that admitted the call and taken (renamed away) by exactly one process: the stream's,
  or the creator's to end it. Swept after ``OUTCOME_RETENTION_S`` if a process died
  holding one.
- ``tokens/<expiry ms>-<nonce>``: created with ``O_EXCL`` when a stream token is first
  accepted, so that a token is single-use per box, not only per process. Kept until the
  token's expiry (after which every process refuses it as expired anyway).

The directory belongs on tmpfs (``/run``): every operation is a create, rename, stat or
unlink of a tiny file, which costs microseconds and never waits for a disk, so it is done
synchronously on the event loop. Records are written to a temporary name and renamed,
so a reader never sees half a record. ``sweep()`` deletes what has expired (each process
runs it every ``SWEEP_INTERVAL_S``, in a worker thread), and at most
``MAX_SHARED_RECORDS`` outcomes are kept, so the directory stays bounded whatever the
call rate and however processes come and go.

A failing directory (full, removed, wrong owner) never fails a call: the operation is
skipped (an outcome then lives only in the memory of the process that ran the call; a
token's single use and a CallSid's single admission and stream hold per process) and one
warning is logged until it works again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import cattrs
import orjson

from voicebridge.bridge.outcome import CallRecord
from voicebridge.bridge.registry import CALL_MEMORY_S
from voicebridge.observability.logs import log_event
from voicebridge.twilio.token import StreamClaims, StreamTokens, TokenRejected

log = logging.getLogger(__name__)

#: How long an outcome is kept for a ``<Connect action>`` that lands on another process:
#: Twilio asks within a second; ten minutes covers slow retries.
OUTCOME_RETENTION_S = 600.0
#: At most this many outcomes are kept (oldest deleted first by ``sweep``): a flood of
#: short calls cannot fill the tmpfs. At ~600 bytes each that is ~6 MB.
MAX_SHARED_RECORDS = 10_000
#: At most this many admissions and as many stream markers are kept (oldest deleted
#: first). They come only from calls Twilio signed, an hour of them at ~14 new calls a
#: second; an empty file costs tmpfs an inode (~1 KiB), so ~100 MB at the very worst.
MAX_SHARED_CALLS = 50_000
#: How often each process sweeps the directory.
SWEEP_INTERVAL_S = 60.0
#: Format version inside each outcome file; a reader ignores files of another version.
RECORD_FORMAT = 1

#: What a CallSid or token nonce must look like to become a file name (no ``/``, no ``..``).
_SAFE_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_TOKEN_FILE = re.compile(r"([0-9]{1,15})-[A-Za-z0-9_-]{1,64}")
_SUBDIRS = ("outcomes", "admissions", "streams", "tokens", "early")
_T = TypeVar("_T")
_converter = cattrs.Converter()


class SharedDir:
    """The shared directory at ``path``; its subdirectories are created (mode 0700).

    Raises ``OSError`` if they cannot be created: a deployment error reported at start.
    After that, no method raises (see the module docstring).
    """

    def __init__(self, path: str | os.PathLike[str], *, clock: Callable[[], float] = time.time):
        self.path = Path(path)
        #: Wall-clock seconds: file times are compared across processes.
        self._clock = clock
        for name in _SUBDIRS:
            (self.path / name).mkdir(mode=0o700, parents=True, exist_ok=True)
        #: Operations that failed with an OSError since this object was made.
        self.failures = 0
        # The calls streaming in this process, whose markers ``sweep`` refreshes. Changed
        # on the event loop, read by ``sweep`` in a worker thread (as a copy).
        self._live: set[str] = set()
        # Invariant: True between a failure that was logged and the next success, so a
        # broken directory is logged once, not once per call.
        self._failure_logged = False

    # -- outcomes ----------------------------------------------------------------------

    def save_record(self, record: CallRecord) -> None:
        """Publish ``record`` for every process (atomically replacing an older one)."""
        if not _SAFE_NAME.fullmatch(record.call_sid):
            return
        body = encode_record(record)
        final = self.path / "outcomes" / record.call_sid
        temporary = final.with_name(f".{record.call_sid}.{os.getpid()}.tmp")

        def write() -> None:
            with open(temporary, "wb") as file:
                file.write(body)
            os.replace(temporary, final)

        self._attempt("save the outcome of " + record.call_sid, write, None)

    def load_record(self, call_sid: str) -> CallRecord | None:
        """The record some process saved for ``call_sid``, or None (none, expired, unreadable)."""
        if not _SAFE_NAME.fullmatch(call_sid):
            return None
        path = self.path / "outcomes" / call_sid
        body = self._attempt(
            "read the outcome of " + call_sid, path.read_bytes, None, missing_ok=True
        )
        if body is None:
            return None
        return decode_record(body, str(path))

    # -- assistant calls created early (voicebridge.bridge.early) ------------------------

    def publish_early_call(self, call_sid: str, body: bytes, *, first: bool) -> bool:
        """Publish ``body`` as what is known of ``call_sid``'s early assistant call: with
        ``first``, only if nothing is published for it (an exclusive create), else in
        place of what is. False when not published (``first`` and one was; the
        directory failed)."""
        if not _SAFE_NAME.fullmatch(call_sid):
            return False
        final = self.path / "early" / call_sid
        temporary = final.with_name(f".{call_sid}.{os.getpid()}.tmp")

        def publish() -> bool:
            with open(temporary, "wb") as file:
                file.write(body)
            self._stamp(temporary)
            try:
                if not first:
                    os.replace(temporary, final)
                    return True
                try:
                    os.link(temporary, final)
                except FileExistsError:
                    return False
                return True
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temporary)

        return self._attempt("publish the early call of " + call_sid, publish, False)

    def load_early_call(self, call_sid: str) -> bytes | None:
        """What is published of ``call_sid``'s early call, or None (nothing, or failed)."""
        if not _SAFE_NAME.fullmatch(call_sid):
            return None
        path = self.path / "early" / call_sid
        return self._attempt(
            "read the early call of " + call_sid, path.read_bytes, None, missing_ok=True
        )

    def take_early_call(self, call_sid: str) -> bytes | None:
        """Take ``call_sid``'s early call: what was published, removed for good. Atomic
        across processes (a rename): of several takers one gets it, the others None."""
        if not _SAFE_NAME.fullmatch(call_sid):
            return None
        path = self.path / "early" / call_sid
        taken = path.with_name(f".{call_sid}.{os.getpid()}.taken")

        def take() -> bytes:
            os.rename(path, taken)
            try:
                return taken.read_bytes()
            finally:
                os.unlink(taken)

        return self._attempt("take the early call of " + call_sid, take, None, missing_ok=True)

    # -- admissions --------------------------------------------------------------------

    def publish_admission(self, call_sid: str, answer: str) -> str | None:
        """Publish ``answer`` as ``call_sid``'s admission, unless a process did first.

        None when ours is published (or the directory failed: the caller's own memory
        then decides alone); the earlier answer when another process published one first
        ("" if it is no longer given out), which the caller should give instead.
        """
        if not _SAFE_NAME.fullmatch(call_sid):
            return None
        final = self.path / "admissions" / call_sid
        temporary = final.with_name(f".{call_sid}.{os.getpid()}.tmp")

        def publish() -> bool:
            with open(temporary, "w", encoding="utf-8") as file:
                file.write(answer)
            self._stamp(temporary)
            try:
                # A hard link is an exclusive create of a file that is already whole:
                # a reader never sees half an answer.
                os.link(temporary, final)
            except FileExistsError:
                return False
            finally:
                os.unlink(temporary)
            return True

        if self._attempt("publish the admission of " + call_sid, publish, True):
            return None
        earlier = self.load_admission(call_sid)
        return earlier[0] if earlier is not None else ""

    def load_admission(self, call_sid: str) -> tuple[str, float] | None:
        """``call_sid``'s published answer and its age in seconds ("" once the reservation
        is over), or None when no process admitted it (or the directory failed)."""
        if not _SAFE_NAME.fullmatch(call_sid):
            return None
        path = self.path / "admissions" / call_sid

        def read() -> tuple[str, float]:
            with open(path, encoding="utf-8") as file:
                age_s = self._clock() - os.fstat(file.fileno()).st_mtime
                return file.read(), age_s

        return self._attempt("read the admission of " + call_sid, read, None, missing_ok=True)

    def close_admission(self, call_sid: str) -> None:
        """Stop giving out ``call_sid``'s answer (its reservation is over); keep the fact."""
        if not _SAFE_NAME.fullmatch(call_sid):
            return
        path = self.path / "admissions" / call_sid

        def empty() -> None:
            with contextlib.suppress(FileNotFoundError):
                os.truncate(path, 0)
                self._stamp(path)

        self._attempt("close the admission of " + call_sid, empty, None)

    # -- stream markers ----------------------------------------------------------------

    def claim_stream(self, call_sid: str) -> bool:
        """True the first time any process claims ``call_sid``'s stream; False after.

        When the directory fails, True: the caller's own memory still holds per process,
        and a broken ``/run`` must not turn every caller away. A CallSid that cannot be
        a file name is refused.
        """
        if not _SAFE_NAME.fullmatch(call_sid):
            return False
        path = self.path / "streams" / call_sid

        def create() -> bool:
            if not _create(path):
                return False
            self._live.add(call_sid)  # only a marker that exists is refreshed
            self._stamp(path)
            return True

        return self._attempt("claim the stream of " + call_sid, create, True)

    def stream_ended(self, call_sid: str) -> None:
        """``call_sid``'s stream (claimed here) ended: its marker is kept from now on."""
        self._live.discard(call_sid)
        if _SAFE_NAME.fullmatch(call_sid):
            path = self.path / "streams" / call_sid
            self._attempt(
                "mark the end of the stream of " + call_sid, partial(self._stamp, path), None
            )

    def stream_started(self, call_sid: str) -> bool:
        """Whether ``call_sid``'s media stream started in any process."""
        if not _SAFE_NAME.fullmatch(call_sid):
            return False
        path = self.path / "streams" / call_sid
        return self._attempt("look for the stream of " + call_sid, path.exists, False)

    # -- tokens ------------------------------------------------------------------------

    def claim_token(self, nonce: str, expiry_ms: int) -> bool:
        """True the first time any process claims ``nonce``; False when it was claimed before.

        When the directory fails, True: the caller's own per-process check still holds,
        and a broken ``/run`` must not turn every caller away.
        """
        if not _SAFE_NAME.fullmatch(nonce):
            return False
        path = self.path / "tokens" / f"{expiry_ms}-{nonce}"
        return self._attempt("claim a stream token", partial(_create, path), True)

    # -- cleaning up -------------------------------------------------------------------

    def sweep(self) -> int:
        """Delete expired outcomes, admissions, markers and tokens, and the oldest past
        their caps; returns how many. First refreshes the markers of this process's live
        calls, so that no live call's marker is ever old.

        Safe to run in a worker thread and in several processes at once (a file another
        sweeper deleted first is skipped). Blocks for a few milliseconds per thousand files.
        """
        now = self._clock()
        for call_sid in tuple(self._live):
            path = self.path / "streams" / call_sid
            self._attempt(
                "refresh the stream marker of " + call_sid, partial(self._stamp, path), None
            )
        removed = 0
        kept = (
            ("outcomes", MAX_SHARED_RECORDS, OUTCOME_RETENTION_S),
            ("admissions", MAX_SHARED_CALLS, CALL_MEMORY_S),
            ("streams", MAX_SHARED_CALLS, CALL_MEMORY_S),
            # Left only by a process that died holding one (the others take or end them).
            ("early", MAX_SHARED_CALLS, OUTCOME_RETENTION_S),
        )
        for kind, cap, retention_s in kept:
            directory = self.path / kind
            none: list[tuple[float, Path]] = []
            entries = sorted(self._attempt(f"list {directory}", partial(_aged, directory), none))
            excess = len(entries) - cap
            for index, (mtime, path) in enumerate(entries):  # oldest first
                if index < excess or now - mtime > retention_s:
                    removed += _unlink(path)
        directory = self.path / "tokens"
        no_tokens: list[Path] = []
        for path in self._attempt(f"list {directory}", partial(_listed, directory), no_tokens):
            match = _TOKEN_FILE.fullmatch(path.name)
            if match and int(match.group(1)) <= now * 1000:
                removed += _unlink(path)
        return removed

    def _stamp(self, path: Path) -> None:
        """Set ``path``'s times to now by ``clock`` (the ages ``sweep`` reads)."""
        now = self._clock()
        os.utime(path, (now, now))

    def _attempt(
        self,
        what: str,
        operation: Callable[[], _T],
        on_failure: _T,
        *,
        missing_ok: bool = False,
    ) -> _T:
        """``operation()``; on OSError log once (until a success) and return ``on_failure``.

        With ``missing_ok``, a missing file is an ordinary answer, not a failure.
        """
        try:
            result = operation()
        except FileNotFoundError as exc:
            if missing_ok and (self.path / "outcomes").is_dir():
                return on_failure
            return self._failed(what, exc, on_failure)
        except OSError as exc:
            return self._failed(what, exc, on_failure)
        self._failure_logged = False
        return result

    def _failed(self, what: str, exc: OSError, on_failure: _T) -> _T:
        self.failures += 1
        if not self._failure_logged:
            self._failure_logged = True
            log_event(
                log,
                logging.WARNING,
                "shared-dir-failed",
                f"shared directory {self.path}: cannot {what}: {exc.strerror or exc}; "
                "carrying on without it",
                shared_dir=str(self.path),
                errno=exc.errno,
            )
        return on_failure


def encode_record(record: CallRecord) -> bytes:
    """``record`` as the bytes other processes (and boxes, ``voicebridge.cluster``) read."""
    return orjson.dumps({"format": RECORD_FORMAT, "record": _converter.unstructure(record)})


def decode_record(body: bytes, where: str) -> CallRecord | None:
    """The record ``encode_record`` wrote, or None (another format, unreadable: logged)."""
    try:
        document: Any = orjson.loads(body)
        if document.get("format") != RECORD_FORMAT:
            return None
        return _converter.structure(document["record"], CallRecord)
    except (orjson.JSONDecodeError, AttributeError, KeyError, cattrs.BaseValidationError):
        log.warning("ignoring the unreadable shared outcome %s", where)
        return None


def _aged(directory: Path) -> list[tuple[float, Path]]:
    """(mtime, path) of the finished files in ``directory`` (not temporary ones)."""
    aged: list[tuple[float, Path]] = []
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                aged.append((entry.stat().st_mtime, Path(entry.path)))
            except FileNotFoundError:
                continue
    return aged


def _create(path: Path) -> bool:
    """Create the empty file ``path``; False if it exists already."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def _listed(directory: Path) -> list[Path]:
    return list(directory.iterdir())


def _unlink(path: Path) -> int:
    try:
        path.unlink()
    except OSError:  # another process's sweep was first, or the directory is broken
        return 0
    return 1


class SharedStreamTokens(StreamTokens):
    """``StreamTokens`` whose single use holds for every process sharing ``shared``.

    ``verify`` first runs every check of ``StreamTokens.verify`` (shape, HMAC, CallSid,
    expiry, earlier use in this process), then claims the token's nonce in the shared
    directory; a nonce another process claimed first is ``reused``.
    """

    __slots__ = ("_shared",)

    def __init__(
        self,
        *,
        secret: bytes,
        ttl_s: float,
        shared: SharedDir,
        clock: Callable[[], float] = time.time,
        previous_secret: bytes = b"",
    ) -> None:
        super().__init__(
            secret=secret, ttl_s=ttl_s, clock=clock, previous_secret=previous_secret
        )
        self._shared = shared

    def verify(self, token: str, claims: StreamClaims) -> None:
        super().verify(token, claims)
        # The token is well formed now: v2.<call_sid>.<expiry ms>.<nonce>.<tag>.<mac>
        _, _, expiry, nonce, _, _ = token.split(".")
        if not self._shared.claim_token(nonce, int(expiry)):
            raise TokenRejected("reused")
