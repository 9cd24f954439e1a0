"""Speech onset in the caller's audio, for barge-in at the edge.

A thin wrapper of WebRTC's voice-activity detector (``webrtcvad-wheels``; chosen for
its cost, about 430 µs of CPU per call-second against Silero's 4,400, see
docs/performance.md). It is fed the caller's 20 ms μ-law frames only while the
assistant speaks and says when the caller started talking over it: ``onset_frames``
speech frames in a row. No I/O and no clock: the call decides what an onset does.
"""

from __future__ import annotations

import importlib.util

from voicebridge.codec import ulaw_to_pcm16

SAMPLE_RATE = 8000
#: Twilio's frames: 20 ms of μ-law, one of the lengths WebRTC's detector takes.
FRAME_BYTES = 160


def available() -> bool:
    """Whether the detector's library is installed (``pip install webrtcvad-wheels``)."""
    return importlib.util.find_spec("webrtcvad") is not None


class SpeechOnset:
    """Says when ``onset_frames`` speech frames in a row were fed since the last ``reset``."""

    def __init__(self, *, aggressiveness: int, onset_frames: int) -> None:
        import webrtcvad

        if not 0 <= aggressiveness <= 3 or onset_frames < 1:
            raise ValueError("aggressiveness is 0-3 and onset_frames at least 1")
        self._vad = webrtcvad.Vad(aggressiveness)
        self._onset_frames = onset_frames
        # Invariant: 0 <= _run < _onset_frames: speech frames in a row so far.
        self._run = 0

    def feed(self, ulaw: bytes) -> bool:
        """Feed one frame; True when it completes an onset (the run then starts over).

        A frame of another length than 20 ms is not speech.
        """
        if len(ulaw) != FRAME_BYTES or not self._vad.is_speech(ulaw_to_pcm16(ulaw), SAMPLE_RATE):
            self._run = 0
            return False
        self._run += 1
        if self._run < self._onset_frames:
            return False
        self._run = 0
        return True

    def reset(self) -> None:
        """The assistant is not speaking: a run of speech starts over."""
        self._run = 0
