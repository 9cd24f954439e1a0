"""Barge-in at the edge: the caller's own speech over the assistant silences it at once.

The assistant notices an interruption only after its own detector and a network
trip each way (``stopSpeakingPlan.voiceSeconds``, 0.2 s by default, plus transport).
Listening to the caller's frames here, while the assistant speaks, the bridge can
clear Twilio's buffer on the speech onset itself. It is reversible: playout holds
the cut audio (``Playout.hold``), the assistant's own confirmation (``user-interrupted``,
or user ``speech-update`` started) drops the turn as ever, and without one within
the window the turn resumes where the caller stopped hearing it: a cough costs a
pause, not words.
"""

from __future__ import annotations

from attrs import frozen

from voicebridge.bridge.playout import FRAME_MS, Playout
from voicebridge.bridge.voice_activity import SpeechOnset
from voicebridge.config import Config


@frozen(kw_only=True)
class EdgeBargeIn:
    """``[bridge] edge_barge_in*`` as a call uses them."""

    aggressiveness: int
    onset_frames: int
    confirm_s: float

    @classmethod
    def from_config(cls, config: Config) -> EdgeBargeIn | None:
        bridge = config.bridge
        if not bridge.edge_barge_in:
            return None
        return cls(
            aggressiveness=bridge.edge_barge_in_aggressiveness,
            onset_frames=bridge.edge_barge_in_onset_ms // FRAME_MS,
            confirm_s=bridge.edge_barge_in_confirm_ms / 1000,
        )

    def listener(self) -> EdgeListener:
        """One call's listener (its detector keeps state between frames)."""
        return EdgeListener(self)


class EdgeListener:
    """Hears one call's caller frames; holds playout on a speech onset over the assistant."""

    def __init__(self, settings: EdgeBargeIn) -> None:
        self._settings = settings
        self._onset = SpeechOnset(
            aggressiveness=settings.aggressiveness, onset_frames=settings.onset_frames
        )

    async def hear(self, ulaw: bytes, playout: Playout) -> None:
        """One caller frame. Only while the assistant speaks is it listened to; an onset
        holds playout (a ``clear`` at once, see ``Playout.hold``). Cancellation: as
        ``Playout.hold``."""
        if not playout.speaking:
            self._onset.reset()
            return
        if self._onset.feed(ulaw):
            await playout.hold(self._settings.confirm_s)
