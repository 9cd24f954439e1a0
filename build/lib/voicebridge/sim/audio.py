"""G.711 μ-law 8 kHz audio helpers for the simulated peers: codec, energy, clips, WAV.

Everything here is pure Python (no numpy, no ``audioop``, which is deprecated)
and cheap enough for the per-frame path: decoding and energy go through 256-entry
tables, encoding through a 64 Ki-entry table built once on first use.

The codec is the classic CCITT G.711 μ-law reference (Sun's ``g711.c``, the same
arithmetic ``audioop.lin2ulaw``/``ulaw2lin`` use): 16-bit samples are reduced to
14 bits, biased by 33, and coded as sign/3-bit segment/4-bit mantissa with all
bits inverted, so digital silence is ``0xFF``.

Clips are raw μ-law 8 kHz mono files shipped as package data in
``voicebridge/sim/clips/`` (made once by ``tools/make_clips.py``); ``clips.txt``
holds ``name<TAB>words spoken`` for each.
"""

from __future__ import annotations

import collections
import functools
import importlib.resources
import os
import wave
from collections.abc import Iterator, Mapping

import attrs

from voicebridge.codec import ULAW_DECODE
from voicebridge.codec import pcm16_to_ulaw as pcm16_to_ulaw  # re-exported
from voicebridge.codec import ulaw_to_pcm16 as ulaw_to_pcm16  # re-exported
from voicebridge.errors import VoicebridgeError

#: Duration of one telephony frame: Twilio sends 20 ms frames, Vapi's tester too.
FRAME_MS = 20
#: μ-law telephony sample rate (Hz), one byte per sample.
SAMPLE_RATE = 8000
#: Bytes in one ``FRAME_MS`` frame of μ-law at ``SAMPLE_RATE``.
FRAME_BYTES = SAMPLE_RATE * FRAME_MS // 1000
#: The μ-law byte of digital silence (linear 0).
MULAW_SILENCE = 0xFF

#: Mean absolute 16-bit amplitude above which a 20 ms frame counts as voiced.
#: The shipped clips (peak -6 dBFS) average ~800-1400 per frame and reach ~6000
#: on vowels, while digital silence is 0 and quiet line noise stays well under 100;
#: 300 (about -40 dBFS) keeps the quiet ends of words voiced and ignores hiss.
SPEECH_THRESHOLD = 300.0

#: Voiced audio needed before speech counts as started: 3 frames, so one click
#: or a single loud frame of noise does not trigger a turn.
SPEECH_ONSET_MS = 60
#: Silence needed before speech counts as ended: long enough to bridge the pauses
#: between words and phrases (the clips' longest is ~460 ms), short enough to answer briskly.
SPEECH_END_MS = 600
#: Audio kept from before the onset and handed out with the utterance, so a
#: quiet first syllable is not lost.
SPEECH_PRE_ROLL_MS = 300
#: Longest utterance audio ``SpeechDetector`` keeps (later audio is not kept;
#: durations stay exact): 30 s bounds memory per talker.
MAX_UTTERANCE_MS = 30_000


#: Package directory (inside ``voicebridge.sim``) holding the clip files.
CLIPS_DIR = "clips"
#: Suffix of the raw μ-law clip files.
CLIP_SUFFIX = ".ulaw"
#: Index file: one ``name<TAB>text`` line per clip.
CLIP_INDEX = "clips.txt"


class UnknownClipError(VoicebridgeError, KeyError):
    """``load_clip`` was asked for a clip that is not shipped with the package."""

    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(name)
        self.name = name
        self.known = known

    def __str__(self) -> str:
        return f"unknown audio clip {self.name!r}; known clips: {', '.join(self.known)}"


#: μ-law byte → |linear sample|, for frame energy.
_ABS: tuple[int, ...] = tuple(abs(sample) for sample in ULAW_DECODE)


def silence(ms: int) -> bytes:
    """``ms`` milliseconds of μ-law digital silence (rounded down to whole samples)."""
    return bytes([MULAW_SILENCE]) * (SAMPLE_RATE * ms // 1000)


def duration_ms(data: bytes) -> float:
    """Duration in milliseconds of ``data`` μ-law bytes at ``SAMPLE_RATE``."""
    return len(data) * 1000 / SAMPLE_RATE


def iter_frames(data: bytes, frame_bytes: int = FRAME_BYTES) -> Iterator[bytes]:
    """Split ``data`` into ``frame_bytes`` chunks; the last one is padded with silence."""
    for start in range(0, len(data), frame_bytes):
        frame = data[start : start + frame_bytes]
        if len(frame) < frame_bytes:
            frame += bytes([MULAW_SILENCE]) * (frame_bytes - len(frame))
        yield frame


def frame_energy(frame: bytes) -> float:
    """Mean absolute linear amplitude (0-32124) of a μ-law frame; 0.0 for an empty one."""
    if not frame:
        return 0.0
    return sum(map(_ABS.__getitem__, frame)) / len(frame)


def is_speech(frame: bytes) -> bool:
    """Whether a μ-law frame (normally ``FRAME_BYTES`` long) is loud enough to be voice."""
    return frame_energy(frame) >= SPEECH_THRESHOLD


def _clips_root() -> importlib.resources.abc.Traversable:
    return importlib.resources.files("voicebridge.sim").joinpath(CLIPS_DIR)


class _ClipTexts(Mapping[str, str]):
    """``clips.txt`` as a read-only mapping, read on first use (not at import)."""

    @functools.cached_property
    def _texts(self) -> dict[str, str]:
        texts: dict[str, str] = {}
        index = _clips_root().joinpath(CLIP_INDEX).read_text(encoding="utf-8")
        for line in index.splitlines():
            if line.strip():
                name, _, text = line.partition("\t")
                texts[name.strip()] = text.strip()
        return texts

    def __getitem__(self, name: str) -> str:
        return self._texts[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._texts)

    def __len__(self) -> int:
        return len(self._texts)


#: Clip name → the words spoken in it (from ``clips/clips.txt``).
CLIP_TEXTS: Mapping[str, str] = _ClipTexts()


@functools.cache
def load_clip(name: str) -> bytes:
    """The raw μ-law 8 kHz bytes of a shipped clip. Raises ``UnknownClipError`` (a KeyError)."""
    if name not in CLIP_TEXTS:
        raise UnknownClipError(name, sorted(CLIP_TEXTS))
    return _clips_root().joinpath(name + CLIP_SUFFIX).read_bytes()


def write_wav(path: str | os.PathLike[str], ulaw: bytes) -> None:
    """Write μ-law audio as a standard 16-bit PCM mono 8 kHz WAV file any player opens."""
    with wave.open(os.fspath(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(SAMPLE_RATE)
        wav.writeframes(ulaw_to_pcm16(ulaw))


@attrs.frozen(kw_only=True)
class SpeechStarted:
    """Speech onset, reported ``SPEECH_ONSET_MS`` after the first voiced frame."""

    at_ms: int  # audio time (ms since the detector's first byte) of the detection


@attrs.frozen(kw_only=True)
class SpeechEnded:
    """End of speech, reported after ``SPEECH_END_MS`` of silence."""

    at_ms: int  # audio time of the detection
    duration_ms: int  # from the first voiced frame to the last one
    audio: bytes = attrs.field(repr=False)  # μ-law, pre-roll included, bounded


SpeechEvent = SpeechStarted | SpeechEnded


class SpeechDetector:
    """Energy-based voice activity detector over μ-law audio (sans-I/O, audio time only).

    ``feed()`` any amount of μ-law; it is cut into ``FRAME_BYTES`` frames (a partial
    tail waits for the next call) and returns the ``SpeechStarted``/``SpeechEnded``
    events those frames caused, which always alternate, starting with ``SpeechStarted``.
    """

    def __init__(self, *, onset_ms: int = SPEECH_ONSET_MS, end_ms: int = SPEECH_END_MS) -> None:
        self._onset_frames = max(1, onset_ms // FRAME_MS)
        self._end_frames = max(1, end_ms // FRAME_MS)
        self._pending = b""
        self._position_ms = 0
        self._run = 0  # consecutive voiced frames (quiet) or silent frames (speaking)
        self._started_ms: int | None = None  # Invariant: None exactly while quiet
        self._pre_roll: collections.deque[bytes] = collections.deque(
            maxlen=SPEECH_PRE_ROLL_MS // FRAME_MS
        )
        self._utterance: list[bytes] = []

    @property
    def speaking(self) -> bool:
        return self._started_ms is not None

    def feed(self, ulaw: bytes) -> list[SpeechEvent]:
        data = self._pending + ulaw
        whole = len(data) - len(data) % FRAME_BYTES
        self._pending = data[whole:]
        events: list[SpeechEvent] = []
        for start in range(0, whole, FRAME_BYTES):
            event = self._frame(data[start : start + FRAME_BYTES])
            if event is not None:
                events.append(event)
        return events

    def _frame(self, frame: bytes) -> SpeechEvent | None:
        self._position_ms += FRAME_MS
        voiced = is_speech(frame)
        if self._started_ms is None:
            self._pre_roll.append(frame)
            self._run = self._run + 1 if voiced else 0
            if self._run < self._onset_frames:
                return None
            self._started_ms = self._position_ms - self._run * FRAME_MS
            self._utterance = list(self._pre_roll)
            self._pre_roll.clear()
            self._run = 0
            return SpeechStarted(at_ms=self._position_ms)
        if len(self._utterance) * FRAME_MS < MAX_UTTERANCE_MS:
            self._utterance.append(frame)
        self._run = 0 if voiced else self._run + 1
        if self._run < self._end_frames:
            return None
        ended = SpeechEnded(
            at_ms=self._position_ms,
            duration_ms=self._position_ms - self._run * FRAME_MS - self._started_ms,
            audio=b"".join(self._utterance),
        )
        self._started_ms, self._run, self._utterance = None, 0, []
        return ended
