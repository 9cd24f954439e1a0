"""G.711 μ-law ↔ 16-bit PCM, and the per-call converter for a Vapi leg not in μ-law/8 kHz.

Twilio's media is μ-law at 8 kHz. With Vapi's default format (``mulaw``/8000) the
bytes pass through untouched and nothing here runs. For ``pcm_s16le`` or 16 kHz,
``LegCodec`` converts each direction, keeping the few bytes or the one sample a
chunk boundary splits, so audio of any chunking converts the same.
"""

from __future__ import annotations

import functools
import sys
from array import array

_BIAS = 0x84
_CLIP_14 = 8159  # largest 14-bit magnitude before the bias is added
_SEGMENT_ENDS = (0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF)


def _decode_sample(code: int) -> int:
    code = ~code & 0xFF
    magnitude = (((code & 0x0F) << 3) + _BIAS) << ((code & 0x70) >> 4)
    return _BIAS - magnitude if code & 0x80 else magnitude - _BIAS


def _encode_sample(sample: int) -> int:
    value = sample >> 2  # 16-bit → 14-bit (floor, as the G.711 reference does)
    if value < 0:
        value, mask = -value, 0x7F
    else:
        mask = 0xFF
    value = min(value, _CLIP_14) + (_BIAS >> 2)
    for segment, end in enumerate(_SEGMENT_ENDS):
        if value <= end:
            return ((segment << 4) | ((value >> (segment + 1)) & 0x0F)) ^ mask
    return 0x7F ^ mask  # unreachable after clipping


#: μ-law byte → linear 16-bit sample.
ULAW_DECODE: tuple[int, ...] = tuple(_decode_sample(code) for code in range(256))
#: μ-law byte → 2-byte little-endian sample, for decoding whole buffers.
_DECODE_LE: tuple[bytes, ...] = tuple(s.to_bytes(2, "little", signed=True) for s in ULAW_DECODE)


@functools.cache
def _encode_table() -> bytes:
    """Unsigned 16-bit pattern (``sample & 0xFFFF``) → μ-law byte; built once (~20 ms)."""
    return bytes(
        _encode_sample(pattern - 0x10000 if pattern & 0x8000 else pattern)
        for pattern in range(0x10000)
    )


def ulaw_to_pcm16(data: bytes) -> bytes:
    """Decode μ-law bytes to little-endian signed 16-bit PCM (twice the length)."""
    return b"".join(map(_DECODE_LE.__getitem__, data))


def pcm16_to_ulaw(data: bytes) -> bytes:
    """Encode little-endian signed 16-bit PCM to μ-law. Raises ``ValueError`` on odd length."""
    if len(data) % 2:
        raise ValueError(f"PCM16 data must have an even length, got {len(data)} bytes")
    samples = array("H")
    samples.frombytes(data)
    if sys.byteorder == "big":
        samples.byteswap()
    table = _encode_table()
    return bytes(map(table.__getitem__, samples))


def _samples(pcm: bytes) -> array[int]:
    samples = array("h")
    samples.frombytes(pcm)
    if sys.byteorder == "big":
        samples.byteswap()
    return samples


def _pcm(samples: array[int]) -> bytes:
    if sys.byteorder == "big":
        samples = array("h", samples)
        samples.byteswap()
    return samples.tobytes()


class LegCodec:
    """Converts one call's audio between Twilio (μ-law 8 kHz) and the Vapi leg's format.

    ``to_assistant`` upsamples 8 → 16 kHz by linear interpolation (the previous
    chunk's last sample carries over); ``from_assistant`` downsamples 16 → 8 kHz by
    averaging sample pairs, holding back a split pair or byte until the next chunk.
    """

    def __init__(self, audio_format: str, sample_rate: int) -> None:
        if audio_format not in ("mulaw", "pcm_s16le") or sample_rate not in (8000, 16000):
            raise ValueError(f"unsupported Vapi audio format {audio_format}/{sample_rate}")
        self._pcm = audio_format == "pcm_s16le"
        self._wide = sample_rate == 16000
        self._previous = 0  # last 8 kHz sample sent, for interpolation
        self._held = b""  # bytes of a sample or sample pair split by chunking

    @property
    def passthrough(self) -> bool:
        """μ-law/8 kHz: Twilio's own format, nothing to convert."""
        return not self._pcm and not self._wide

    def to_assistant(self, ulaw: bytes) -> bytes:
        """Twilio μ-law 8 kHz → the leg's format."""
        if self.passthrough:
            return ulaw
        if not self._wide:
            return ulaw_to_pcm16(ulaw)
        samples = array("h", map(ULAW_DECODE.__getitem__, ulaw))
        wide = array("h", bytes(4 * len(samples)))
        previous = self._previous
        for index, sample in enumerate(samples):
            wide[2 * index] = (previous + sample) // 2
            wide[2 * index + 1] = sample
            previous = sample
        self._previous = previous
        pcm = _pcm(wide)
        return pcm if self._pcm else pcm16_to_ulaw(pcm)

    def from_assistant(self, data: bytes) -> bytes:
        """The leg's format → Twilio μ-law 8 kHz."""
        if self.passthrough:
            return data
        data = self._held + data
        unit = (2 if self._pcm else 1) * (2 if self._wide else 1)
        whole = len(data) - len(data) % unit
        self._held = data[whole:]
        data = data[:whole]
        if not self._wide:
            return pcm16_to_ulaw(data)
        samples = _samples(data) if self._pcm else array("h", map(ULAW_DECODE.__getitem__, data))
        narrow = array("h", ((samples[i] + samples[i + 1]) // 2 for i in range(0, len(samples), 2)))
        return pcm16_to_ulaw(_pcm(narrow))
