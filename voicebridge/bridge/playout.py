"""Playout: the only writer of assistant audio to Twilio, with marks, a bounded lead and barge-in.

Vapi's audio arrives in chunks of any size (170–743 bytes is typical). Playout
rechunks it into whole 20 ms frames, sends each chunk as one ``media`` message
followed by a ``mark``, and never lets more than ``lead_ms`` of audio sit in
Twilio's buffer ahead of what the caller has heard. The mark echoes tell it, to
the chunk, how much the caller actually heard.

Nothing is inserted into speech. The few bytes of a frame that Vapi's chunking left
over wait for the rest of that frame as long as Twilio still has audio to play (the
marks, and the clock from the send times, say until when). Only three things pad a
partial frame with silence: the assistant's end of speech (``end_of_speech()``),
the end of the call's audio (``wait_drained()``), and a pause in which the caller
hears silence anyway: Twilio ran dry and no audio came for ``STRAGGLER_S``.

Marks are confirmations, not the only clock. When an echo is overdue (a chunk should
have finished playing ``MARK_GRACE_S`` ago by the clock), the chunk is presumed heard
and playout goes on at real time, so a pause in the echoes is no pause for the caller.
Through a pause the estimate is bounded: at most ``lead_ms`` of audio is presumed heard
beyond what the echoes confirmed, so Twilio holds at most twice the lead. A later echo
confirms the presumed chunks before it. An echo naming no mark sent is ignored and
counted (``PlayoutStats.unknown_marks``), never taken as "everything played".

Echoes that stop for good (none for ``MARKS_MISSING_S`` while audio was owed one) are
not a dead Twilio: the call is still up, and a Twilio that stopped sending the caller's
media (it sends it continuously, silence included) would have ended the call by the
media inactivity rule. So the caller is not left in dead air: playout goes on by the
clock alone, each chunk presumed heard as the clock says it played, still never more
than ``lead_ms`` ahead of that estimate, i.e. never faster than real time plus the
lead. The oldest presumed chunks are then forgotten (still counted in
``presumed_heard_ms``, the metric of audio no echo confirmed); a late echo of one is
ignored, not counted as unknown. Each such stretch counts in ``stats.marks_missing``
and logs one warning (``EVENT=marks-missing``, rate-limited); any echo ends it.

Each stretch of playout between barge-ins is a *turn* running in its own cancel
scope. ``barge_in()`` cancels that scope, drops every queued byte and sends
``clear`` at once, from the task that read the signal (no hop to the playout task
on the way), so Twilio drops what it buffered and echoes the pending marks, which
are booked as discarded, not played. Audio that arrives
from Vapi after the interruption is the in-flight tail of the cut turn, and not one
byte of it may reach the caller: it is discarded until the assistant starts a new
turn (``turn_started()``, from ``speech-update`` assistant/started). That is decided
by the order of the assistant's messages alone, never by when the bridge got round
to reading them: a bridge that falls behind reads the tail late, and the delay is
its own, not a pause in the assistant's speech. Only an assistant that sends no
speech updates at all (its ``clientMessages`` trimmed) is judged by a pause in its
audio of ``resume_gap_ms`` instead.

An early barge-in (``hold()``, barge-in at the edge: the bridge heard the caller)
is the reversible kind: the ``clear`` goes out at once, but the audio Twilio had
not confirmed playing goes back to the front of the queue and nothing is sent
until the assistant confirms (``barge_in()``, the turn dropped as above) or the
window passes (playout resumes with that audio, byte for byte).

Writes are never cancelled half way: the sockets shield each write (see
``voicebridge.sockets``), and playout's writes take turns under one lock (a chunk's
``media`` and its ``mark`` together), so a barge-in that lands during a write takes
effect right after it, and the ``clear`` always follows the last media of the cut
turn. The lock's uncontended acquire does not yield, so it costs no scheduling pass.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable

import trio
from attrs import define, field

from voicebridge.bridge.outcome import BargeIn
from voicebridge.errors import SocketClosed
from voicebridge.observability.logs import log_event
from voicebridge.sockets import DirectSocket, MessageSocket
from voicebridge.twilio.media import MediaStream

log = logging.getLogger(__name__)

FRAME_MS = 20
#: μ-law 8 kHz: 8 bytes per millisecond, 160 per 20 ms frame. Twilio wants whole frames.
BYTES_PER_MS = 8
FRAME_BYTES = FRAME_MS * BYTES_PER_MS
#: μ-law digital silence, used to pad the last partial frame of a turn.
MULAW_SILENCE = b"\xff"
#: Most assistant audio held here, not yet sent to Twilio. Vapi paces its audio at
#: about real time, so normally this holds one chunk; a burst faster than real time is
#: absorbed up to 30 s (240 KB) and the excess dropped and counted, so a misbehaving
#: assistant cannot grow a call's memory without bound.
MAX_PENDING_BYTES = 30_000 * BYTES_PER_MS
#: A partial frame left over from Vapi's chunking is padded and sent once Twilio has run
#: dry *and* no audio has arrived for this long: the caller already hears a pause, so
#: the turn ended (an assistant that sends no speech updates) or the assistant stalled.
#: Live Vapi audio comes at real-time pace with tens of ms of jitter; 60 ms is past it.
STRAGGLER_S = 0.060
#: A mark echo this late after the clock says its chunk finished playing is presumed
#: lost: the chunk counts as heard. Twilio echoes within its network round trip (tens
#: to a hundred-odd ms); capped at half the lead so that, while echoes are missing,
#: Twilio still holds half a lead of audio and the caller hears no underrun.
MARK_GRACE_S = 0.150
#: No echo for this long while one was owed (since the last echo, or the first chunk
#: sent after everything was confirmed): the echoes stopped for good, and playout goes
#: on by the clock alone. Past any pause of a live Twilio's echoes (its round trip is
#: tens to a hundred-odd ms), and well inside the 5 s media inactivity rule; the caller
#: hears at most this minus twice the lead of silence before the turn plays on.
MARKS_MISSING_S = 1.0


@define(slots=True)
class _SentChunk:
    mark: str
    ms: int
    turn: int
    sent_at: float
    #: The audio, kept until echoed: an early barge-in that is not confirmed plays it again.
    data: bytes


@define(slots=True)
class PlayoutStats:
    """Running figures; read at call end and by tests."""

    assistant_bytes: int = 0
    media_messages: int = 0
    heard_ms: int = 0
    discarded_ms: int = 0
    dropped_bytes: int = 0
    #: Assistant audio thrown away after a barge-in (the cut turn's in-flight tail).
    tail_discarded_bytes: int = 0
    #: Silence bytes added to complete a partial frame (turn ends, pauses).
    padding_bytes: int = 0
    #: Audio presumed heard by the clock (its echo overdue) and never confirmed since;
    #: not part of ``heard_ms``, which the echoes confirmed.
    presumed_heard_ms: int = 0
    #: Mark echoes naming no mark sent on this stream (ignored).
    unknown_marks: int = 0
    #: Stretches of playout on the clock alone: no echo for ``MARKS_MISSING_S``.
    marks_missing: int = 0
    #: Early barge-ins (``hold()``: the caller's own speech heard at the edge), those the
    #: assistant confirmed (the turn then dropped), and those resumed unconfirmed.
    early_barge_ins: int = 0
    early_confirmed: int = 0
    early_resumed: int = 0
    first_audio_at: float | None = None
    barge_ins: list[BargeIn] = field(factory=list)


class Playout:
    """Paces assistant audio into Twilio; ``run()`` is the call's playout task.

    ``feed``, ``turn_started``, ``end_of_speech`` and ``mark_played`` are synchronous
    and called from the call's reader tasks; they only change state and wake
    ``run()``. ``run()``, ``barge_in()`` and ``hold()`` are the only code that writes
    to the Twilio socket while the call is up, one at a time (``_write_lock``).
    """

    def __init__(
        self,
        twilio: MessageSocket,
        stream: MediaStream,
        *,
        lead_ms: int,
        chunk_ms: int,
        resume_gap_ms: int,
        call_started_at: float,
        clock: Callable[[], float] = trio.current_time,
        on_latency: Callable[[float], None] | None = None,
        latency_sample_every: int = 10,
    ) -> None:
        if lead_ms < FRAME_MS or chunk_ms < FRAME_MS:
            raise ValueError("lead_ms and chunk_ms must be at least one frame")
        self._twilio = twilio
        # Twilio's socket when audio may be written to it from the feeding task
        # (``feed``: the direct path); None where it cannot take a write that way.
        self._direct: DirectSocket | None = twilio if isinstance(twilio, DirectSocket) else None
        self._stream = stream
        self._lead_ms = lead_ms
        self._chunk_frames = max(1, chunk_ms // FRAME_MS)
        self._resume_gap_s = resume_gap_ms / 1000
        self._call_started_at = call_started_at
        self._clock = clock
        self.stats = PlayoutStats()
        # Invariant: len(_pending) <= MAX_PENDING_BYTES.
        self._pending = bytearray()
        # Chunks sent to Twilio whose mark has not come back yet, oldest first.
        # Invariant: _buffered_ms == sum(chunk.ms for chunk in _outstanding).
        self._outstanding: deque[_SentChunk] = deque()
        self._buffered_ms = 0
        # Marks that were outstanding when we sent a clear: their echoes mean "discarded".
        self._cleared_marks: dict[str, int] = {}
        self._turn = 0
        self._turn_heard_ms = 0
        self._mark_seq = 0
        self._turn_scope: trio.CancelScope | None = None
        # When Twilio's playback was last known to reach the oldest outstanding chunk:
        # the last echo, or the presumed end of the last chunk presumed heard.
        self._confirmed_at = -math.inf
        # Chunks sent before those in _outstanding, presumed heard by the clock, whose
        # echoes may still come; oldest first.
        # Invariant: _presumed_ms == sum(chunk.ms for chunk in _presumed.values()) <= lead_ms.
        self._presumed: dict[str, _SentChunk] = {}
        self._presumed_ms = 0
        # Since when an echo is owed and none came: the last echo, or the first chunk
        # sent when nothing was outstanding or presumed.
        self._owed_since = -math.inf
        # Playout runs on the clock alone (marks missing): the estimate may run past
        # the echoes without bound. Invariant: set only by _presume_overdue, cleared by
        # any echo of ours.
        self._clock_alone = False
        # Marks up to this sequence number were forgotten on the clock alone: a late
        # echo of one is ours, not unknown.
        self._forgotten_seq = 0
        self._mark_grace_s = min(MARK_GRACE_S, lead_ms / 2000)
        self._last_fed_at = -math.inf
        # While not None, playout is held by an early barge-in until then: Twilio was
        # cleared, the cut audio waits in _pending, and nothing is sent.
        self._held_until: float | None = None
        # Set by barge_in(): when the signal came; consumed by whoever sends the clear.
        # Not None means a clear is owed.
        self._interrupted_at: float | None = None
        self._write_lock = trio.Lock()
        # While not None, incoming audio is the cut turn's tail: discard it. The value is
        # when the last discarded audio (or the interruption) arrived.
        self._discarding_since: float | None = None
        # The assistant announces its turns (speech updates): only its "started" then
        # ends a cut turn's tail, never a pause measured here.
        self._assistant_announces_turns = False
        self._wakeup = trio.Event()
        # Sampled latency (metrics): every ``latency_sample_every``-th audio message fed
        # is stamped; the next Twilio write reports the time since.
        self._on_latency = on_latency
        self._latency_sample_every = latency_sample_every
        self._feeds = 0
        self._latency_fed_at: float | None = None

    # -- called by the reader tasks ------------------------------------------------

    def feed(self, audio: bytes) -> None:
        """Queue assistant audio for playout (drops, and counts, what would overflow)."""
        self.stats.assistant_bytes += len(audio)
        if self._discarding_since is not None:
            if self._assistant_announces_turns:
                self.stats.tail_discarded_bytes += len(audio)
                return
            now = self._clock()
            if now - self._discarding_since < self._resume_gap_s:
                self._discarding_since = now
                self.stats.tail_discarded_bytes += len(audio)
                return
            # The audio paused long enough: this is a new turn, not the cut one's tail.
            self._begin_turn()
        if self._on_latency is not None:
            self._feeds += 1
            if self._feeds % self._latency_sample_every == 0 and self._latency_fed_at is None:
                self._latency_fed_at = self._clock()
        room = MAX_PENDING_BYTES - len(self._pending)
        if len(audio) > room:
            self.stats.dropped_bytes += len(audio) - room
            audio = audio[:room]
        direct = self._direct
        if direct is None:
            self._pending += audio
            self._last_fed_at = self._clock()
            self._wake()
            return
        # Whether the playout task, if it waits, waits for an echo or a partial frame.
        echo_owed = bool(self._outstanding)
        partial_before = 0 < len(self._pending) < FRAME_BYTES
        self._pending += audio
        self._last_fed_at = self._clock()
        self._send_direct(direct)
        if (
            echo_owed
            and not direct.needs_flush
            and not self._next_take()
            and (partial_before or not 0 < len(self._pending) < FRAME_BYTES)
        ):
            # Nothing the waiting playout task must do sooner than it will anyway: the
            # feeder sent what there was to send, the oldest echo it waits for is the
            # same, and a partial frame's padding can only come later than it armed
            # (it wakes then, finds the new time, and waits on). Not waking it spares
            # a task step per chunk of assistant audio.
            return
        self._wake()

    def _send_direct(self, twilio: DirectSocket) -> None:
        """Send what the playout task would send now, from the feeding task, without waiting.

        The hop to the playout task waits for trio's next scheduling pass, which under
        load is most of the assistant → caller latency. So while the playout task waits
        for audio (no write of ours under way or owed, nothing holds the turn), the
        reader that fed the audio writes the chunks itself if the socket takes them at
        once, as the playout task would: whole frames within the lead, each ``media``
        with its ``mark`` in one write. Chunks the socket does not take are left to the
        playout task; the rest of a write it took only in part, the playout task
        finishes before its next write (``_settle``).
        """
        while (
            self._turn_scope is not None
            and self._interrupted_at is None
            and self._held_until is None
            and not self._write_lock.locked()
            and not twilio.needs_flush
            and not self._stream.stopped
        ):
            take = self._next_take()
            if not take:
                return
            chunk = bytes(self._pending[:take])
            mark = self._next_mark()
            stream = self._stream
            if not twilio.send_nowait(stream.send_media(chunk), stream.send_mark(mark)):
                return  # the playout task sends it
            del self._pending[:take]
            self._book(chunk, mark)
            self._media_sent()

    def _next_take(self) -> int:
        """How many bytes the next chunk takes from the queue: whole frames, at most
        ``chunk_ms`` of them, within the lead's room; 0 when there is none to send."""
        room_frames = (self._lead_ms - self._buffered_ms) // FRAME_MS
        whole_frames = len(self._pending) // FRAME_BYTES
        if room_frames <= 0 or whole_frames <= 0:
            return 0
        return min(room_frames, whole_frames, self._chunk_frames) * FRAME_BYTES

    def turn_started(self) -> None:
        """The assistant began a new turn (``speech-update`` assistant/started)."""
        self._assistant_announces_turns = True
        self._begin_turn()

    def end_of_speech(self) -> None:
        """The assistant finished a turn: pad and send any partial last frame now."""
        self._assistant_announces_turns = True
        self._pad_partial_frame()
        self._wake()

    async def barge_in(self) -> None:
        """Barge-in: cut the current turn now and send the ``clear``.

        If a write of the turn is under way, the clear follows it. Should this task be
        cancelled before the clear goes out (the call is ending), the playout task
        still owes it and sends it. A turn held by ``hold()`` is confirmed cut.
        """
        if self._held_until is not None:
            self._held_until = None
            self.stats.early_confirmed += 1
        self._interrupt()
        await self._clear_if_owed()

    def _interrupt(self) -> None:
        now = self._clock()
        self._pending.clear()
        self._latency_fed_at = None
        self._discarding_since = now
        if self._interrupted_at is None:
            self._interrupted_at = now
        if self._turn_scope is not None:
            self._turn_scope.cancel(reason="barge-in")
        self._wake()

    @property
    def speaking(self) -> bool:
        """Assistant audio of the current turn is queued here or playing at Twilio."""
        return (
            self._held_until is None
            and self._discarding_since is None
            and bool(self._pending or self._outstanding)
        )

    async def hold(self, confirm_s: float) -> None:
        """An early barge-in: silence the caller's playback now, but keep the turn.

        Twilio gets a ``clear`` at once; the audio it dropped (every chunk not yet
        confirmed played) goes back to the front of the queue, and the assistant's
        audio keeps queueing behind it. If the assistant confirms the interruption
        (``barge_in()``) within ``confirm_s``, the turn is dropped as ever; if not,
        playout resumes with the first chunk the caller had not finished hearing, so
        a cough costs a pause, not words. Does nothing unless ``speaking``. The clear
        follows any write under way; cancelled before it is sent, playout is held all
        the same and the clear is lost with the call.
        """
        if not self.speaking:
            return
        self.stats.early_barge_ins += 1
        self._held_until = self._clock() + confirm_s
        self._latency_fed_at = None
        self._wake()  # playout, waiting to send, sees the hold
        await self._acquire_writer()
        try:
            if not self.held:
                return  # confirmed meanwhile: barge_in() clears
            kept = b"".join(chunk.data for chunk in self._outstanding)
            self._forget_buffered(discarded=False)  # to be played again, not discarded
            self._pending[:0] = kept
            await self._twilio.send(self._open_stream().send_clear())
        finally:
            self._write_lock.release()
        self._wake()

    @property
    def held(self) -> bool:
        """An early barge-in holds the turn (``hold()``), unconfirmed so far."""
        return self._held_until is not None

    def mark_played(self, name: str) -> None:
        """Twilio echoed ``name``: the audio before it finished playing, or was cleared.

        Every chunk sent before it is confirmed too, those presumed heard included. An
        echo naming no mark sent is counted in ``stats.unknown_marks`` and ignored.
        """
        now = self._clock()
        if (ms := self._cleared_marks.pop(name, None)) is not None:
            self.stats.discarded_ms += ms
            self._echo_came(now)  # Twilio echoes again: the clock is not alone any more
            return
        if name in self._presumed:
            self._confirm_presumed(until=name)
        elif any(chunk.mark == name for chunk in self._outstanding):
            self._confirm_presumed(until=None)
            while self._outstanding:
                chunk = self._outstanding.popleft()
                self._buffered_ms -= chunk.ms
                self._count_heard(chunk)
                if chunk.mark == name:
                    break
        elif self._is_forgotten(name):
            self._echo_came(now)
            return  # heard long ago by the clock: the estimate is ahead of it
        else:
            self.stats.unknown_marks += 1
            return
        self._echo_came(now)
        # Twilio finished the named chunk by now: what follows plays from here.
        self._confirmed_at = max(self._confirmed_at, now)
        self._wake()

    def _echo_came(self, now: float) -> None:
        self._owed_since = now
        self._clock_alone = False

    def _is_forgotten(self, name: str) -> bool:
        """``name`` is a mark of ours forgotten on the clock alone (``turn.seq``)."""
        _, dot, seq = name.partition(".")
        return bool(dot) and seq.isdecimal() and len(seq) < 12 and int(seq) <= self._forgotten_seq

    @property
    def buffered_ms(self) -> int:
        """Audio sent to Twilio and not yet confirmed played."""
        return self._buffered_ms

    # -- the playout task ----------------------------------------------------------

    async def run(self) -> None:
        """Send audio until cancelled (call end); each barge-in ends a turn with a clear.

        On cancellation of the call it returns by raising ``Cancelled``; a socket error
        (``SocketClosed``) propagates to the call nursery, which ends the call.
        """
        while True:
            with trio.CancelScope() as turn_scope:
                self._turn_scope = turn_scope
                if self._interrupted_at is None:
                    await self._play_turn()
            self._turn_scope = None
            # Cut by a barge-in; barge_in() has usually sent the clear already.
            await self._clear_if_owed()

    async def _clear_if_owed(self) -> None:
        """Send the clear a barge-in owes, unless it went out already; in turn with writes."""
        await self._acquire_writer()
        try:
            if self._interrupted_at is not None:
                await self._send_clear()
        finally:
            self._write_lock.release()

    async def _play_turn(self) -> None:
        while True:
            chunk = await self._wait_next_chunk()
            await self._acquire_writer()
            try:
                if chunk is not None:
                    await self._send_chunk(chunk)
            finally:
                self._write_lock.release()

    async def _send_chunk(self, chunk: bytes) -> None:
        """Send one chunk and its mark, in one write where the socket takes it at once
        (the writer lock held)."""
        # Booked before the writes: if a write fails half way the accounting still
        # matches what Twilio may have received.
        mark = self._next_mark()
        self._book(chunk, mark)
        stream = self._open_stream()
        media, mark_text = stream.send_media(chunk), stream.send_mark(mark)
        direct = self._direct
        if direct is not None and direct.send_nowait(media, mark_text):
            self._media_sent()
            await direct.flush()  # no checkpoint when it took both whole
            return
        await self._twilio.send(media)
        self._media_sent()
        self._open_stream()  # a stop read during that write: no mark for a stopped stream
        await self._twilio.send(mark_text)

    def _next_mark(self) -> str:
        """The name of the next chunk's mark (``turn.seq``); ``_book`` takes it."""
        return f"{self._turn}.{self._mark_seq + 1}"

    def _book(self, chunk: bytes, mark: str) -> None:
        """Book ``chunk`` as sent to Twilio now with ``mark`` (``_next_mark``), owing an echo."""
        self._mark_seq += 1
        ms = len(chunk) // BYTES_PER_MS
        now = self._clock()
        if not self._outstanding and not self._presumed:
            self._owed_since = now  # the first echo owed since all was confirmed
        self._outstanding.append(
            _SentChunk(mark=mark, ms=ms, turn=self._turn, sent_at=now, data=chunk)
        )
        self._buffered_ms += ms
        if self.stats.first_audio_at is None:
            self.stats.first_audio_at = now
        self.stats.media_messages += 1

    def _media_sent(self) -> None:
        if self._latency_fed_at is not None and self._on_latency is not None:
            self._on_latency(self._clock() - self._latency_fed_at)
            self._latency_fed_at = None

    async def _wait_next_chunk(self) -> bytes | None:
        """Wait until whole frames are queued and Twilio's lead has room; take a chunk.

        Meanwhile, chunks whose echoes are overdue are presumed heard, and a partial
        frame is padded once the caller hears a pause anyway (module docstring).
        None, at once, while the direct path left a write to finish (``_settle``).
        """
        while True:
            if self._direct is not None and self._direct.needs_flush:
                return None
            if self._held_until is not None:
                with trio.move_on_at(self._held_until):
                    await self._wait_for_change()
                    continue
                # Not confirmed: the caller hears the turn on from where it was cut.
                self._held_until = None
                self.stats.early_resumed += 1
            take = self._next_take()
            if take:
                chunk = bytes(self._pending[:take])
                del self._pending[:take]
                return chunk
            with trio.move_on_at(min(self._echo_overdue_at(), self._pad_at())):
                await self._wait_for_change()
                continue
            # Both again: audio fed meanwhile (without a wake: see ``feed``) may have
            # moved the padding later.
            now = self._clock()
            if now >= self._echo_overdue_at():
                self._presume_overdue(now)
            if now >= self._pad_at():
                self._pad_partial_frame()

    def _pad_at(self) -> float:
        """When a partial frame left alone is padded (inf: none is): once Twilio has run
        dry and no audio came for ``STRAGGLER_S`` (the module docstring)."""
        if 0 < len(self._pending) < FRAME_BYTES:
            return max(self._drained_at(), self._last_fed_at) + STRAGGLER_S
        return math.inf

    def _echo_overdue_at(self) -> float:
        """When the oldest outstanding chunk may be presumed heard (inf: never, for now).

        While presuming it would take the estimate more than the lead past what the
        echoes confirmed, not before the echoes count as missing for good.
        """
        if not self._outstanding:
            return math.inf
        oldest = self._outstanding[0]
        due = max(self._confirmed_at, oldest.sent_at) + oldest.ms / 1000 + self._mark_grace_s
        if not self._clock_alone and self._presumed_ms + oldest.ms > self._lead_ms:
            return max(due, self._owed_since + MARKS_MISSING_S)
        return due

    def _drained_at(self) -> float:
        """When Twilio runs out of the audio sent so far, by the send times and echoes.

        Each chunk plays from when it was sent or the one before it ends, whichever is
        later; the network delay makes the real moment a little later, never earlier.
        """
        ends = self._confirmed_at
        for chunk in self._outstanding:
            ends = max(ends, chunk.sent_at) + chunk.ms / 1000
        return ends

    def _presume_overdue(self, now: float) -> None:
        """Count as heard the outstanding chunks whose echoes are overdue at ``now``."""
        if self._outstanding:
            self._wake()  # wait_drained() may be waiting for them
        while self._outstanding and self._echo_overdue_at() <= now:
            chunk = self._outstanding.popleft()
            self._buffered_ms -= chunk.ms
            self._confirmed_at = max(self._confirmed_at, chunk.sent_at) + chunk.ms / 1000
            if self._presumed_ms + chunk.ms > self._lead_ms:
                self._go_on_alone(room_ms=chunk.ms)
            self._presumed[chunk.mark] = chunk
            self._presumed_ms += chunk.ms
            self.stats.presumed_heard_ms += chunk.ms

    def _go_on_alone(self, *, room_ms: int) -> None:
        """The echoes stopped for good: forget the oldest presumed chunks, so that the
        estimate runs on at real time with bounded memory (module docstring)."""
        if not self._clock_alone:
            self._clock_alone = True
            self.stats.marks_missing += 1
            log_event(
                log,
                logging.WARNING,
                "marks-missing",
                f"call {self._stream.call_sid}: no mark echo from Twilio for "
                f"{MARKS_MISSING_S:g} s while its media keeps coming; playing on by the clock",
                call_sid=self._stream.call_sid,
            )
        while self._presumed and self._presumed_ms + room_ms > self._lead_ms:
            mark = next(iter(self._presumed))
            forgotten = self._presumed.pop(mark)
            self._presumed_ms -= forgotten.ms
            self._forgotten_seq = max(self._forgotten_seq, int(mark.partition(".")[2]))

    def _confirm_presumed(self, *, until: str | None) -> None:
        """An echo confirmed the presumed chunks up to ``until`` (None: all of them)."""
        while self._presumed:
            mark = next(iter(self._presumed))
            chunk = self._presumed.pop(mark)
            self._presumed_ms -= chunk.ms
            self.stats.presumed_heard_ms -= chunk.ms
            self._count_heard(chunk)
            if mark == until:
                break

    def _count_heard(self, chunk: _SentChunk) -> None:
        self.stats.heard_ms += chunk.ms
        if chunk.turn == self._turn:
            self._turn_heard_ms += chunk.ms

    def _open_stream(self) -> MediaStream:
        """The stream, to encode the next frame with; a stopped one counts as closed.

        Twilio's ``stop`` may be read while one of our (shielded) writes is under way:
        the call is ending then, and no frame may be encoded for the stream any more.
        """
        if self._stream.stopped:
            raise SocketClosed(None, "Twilio stopped the stream")
        return self._stream

    async def _send_clear(self) -> None:
        interrupted_at = self._interrupted_at
        self._interrupted_at = None
        discarded = self._forget_buffered(discarded=True)
        await self._twilio.send(self._open_stream().send_clear())
        now = self._clock()
        if interrupted_at is not None:
            self.stats.barge_ins.append(
                BargeIn(
                    at_s=interrupted_at - self._call_started_at,
                    latency_ms=(now - interrupted_at) * 1000,
                    heard_of_turn_ms=self._turn_heard_ms,
                    discarded_ms=discarded,
                )
            )
        self._turn += 1
        self._turn_heard_ms = 0

    # -- helpers -------------------------------------------------------------------

    def _forget_buffered(self, *, discarded: bool) -> int:
        """Forget what Twilio holds, as a ``clear`` is about to drop it; the ms of
        unconfirmed audio. Their echoes, should any still come, count as discarded
        (``discarded``) or as nothing (audio to be played again). Presumed heard,
        probably played: their echoes are neither heard nor discarded."""
        dropped_ms = 0
        for chunk in self._outstanding:
            self._cleared_marks[chunk.mark] = chunk.ms if discarded else 0
            dropped_ms += chunk.ms
        self._outstanding.clear()
        self._buffered_ms = 0
        for mark in self._presumed:
            self._cleared_marks[mark] = 0
        self._presumed.clear()
        self._presumed_ms = 0
        return dropped_ms

    def _begin_turn(self) -> None:
        """A new assistant turn: its audio plays, and its heard time counts from zero."""
        self._discarding_since = None
        self._turn += 1
        self._turn_heard_ms = 0

    def _pad_partial_frame(self) -> None:
        partial = len(self._pending) % FRAME_BYTES
        if partial:
            self._pending += MULAW_SILENCE * (FRAME_BYTES - partial)
            self.stats.padding_bytes += FRAME_BYTES - partial

    async def _acquire_writer(self) -> None:
        """Take the writer lock; without a yield when nobody holds it (nearly always).

        Then finish what the direct path left (``_settle``), so every write of the
        holder follows the last chunk sent and its mark.
        """
        if self._write_lock.locked():
            await self._write_lock.acquire()
        else:
            self._write_lock.acquire_nowait()
        try:
            await self._settle()
        except BaseException:
            self._write_lock.release()
            raise

    async def _settle(self) -> None:
        """Finish the rest of a chunk the direct path wrote, if the socket took it in part."""
        if self._direct is not None and self._direct.needs_flush:
            await self._direct.flush()

    def _wake(self) -> None:
        # Every waiter holds the current event; setting it wakes them all, and the
        # fresh one is what the next wait sees.
        self._wakeup.set()
        self._wakeup = trio.Event()

    async def _wait_for_change(self) -> None:
        await self._wakeup.wait()

    async def wait_drained(self) -> None:
        """Wait until every queued byte was sent and Twilio confirmed it all played."""
        self._pad_partial_frame()
        self._wake()
        while self._pending or self._outstanding:
            await self._wait_for_change()

    @property
    def queued_ms(self) -> int:
        """Audio not yet confirmed played: queued here plus buffered at Twilio."""
        return len(self._pending) // BYTES_PER_MS + self._buffered_ms
