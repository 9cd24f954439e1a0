"""RFC 6455 framing for the call's two sockets: a parser of what arrives, and the frames we write.

Every message of a call crosses this module: fifty Twilio media messages a second
each way, and the assistant's audio. wsproto's frame layer is a pipeline of
generators with an event object per frame; here a whole frame is parsed in one
call from the bytes already read, with the same checks (bench/findings.md has
the cost of each). Like wsproto it does no I/O and holds no clock.

``FrameParser`` enforces, on traffic from the Internet:

- the header: no reserved bit (no extension is ever negotiated), a known opcode,
  control frames whole and at most 125 bytes, the shortest length encoding, a
  64-bit length's top bit clear;
- masking: a server takes only masked frames, a client only unmasked ones;
- messages: a continuation only inside a fragmented message, no new message inside
  one, text valid UTF-8 (a fragmented text message is checked fragment by
  fragment, as it comes), no message over ``max_message_bytes`` (judged from the
  frame's header, before its payload is read);
- close frames: no one-byte payload, a code a peer may send, a UTF-8 reason.

A violation raises ``ProtocolViolation`` with the close code to send (1002, 1007,
1009), and the parser takes nothing more. So does a close frame: what follows it
on the wire is not read.
"""

from __future__ import annotations

import codecs
import os
import struct
from typing import Any, Final, NoReturn

OP_CONTINUATION: Final = 0x0
OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
OP_CLOSE: Final = 0x8
OP_PING: Final = 0x9
OP_PONG: Final = 0xA

#: The close code of a close frame with no payload (RFC 6455 §7.1.5); never written.
NO_STATUS = 1005
PROTOCOL_ERROR = 1002
INVALID_PAYLOAD = 1007
MESSAGE_TOO_BIG = 1009

#: Codes of 1000–2999 a peer may send: RFC 6455's and those IANA registered since
#: (1012–1014). 1004 is reserved; 1005, 1006 and 1015 are never sent on the wire.
_PEER_CLOSE_CODES = frozenset(
    {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014}
)
#: Codes that only ever report a closure locally; sent as 1000 (a normal close).
_LOCAL_ONLY_CODES = frozenset({1005, 1006, 1015})

#: Largest payload a control frame may carry, and a close reason after its code.
MAX_CONTROL_PAYLOAD = 125
MAX_CLOSE_REASON_BYTES = MAX_CONTROL_PAYLOAD - 2

#: What ``FrameParser.next`` returns for a fragment that does not end its message:
#: a frame taken (for the reader's fairness count), no message yet.
FRAGMENT: Final = (OP_CONTINUATION, b"")

_LENGTH_16 = struct.Struct("!BBH")
_LENGTH_64 = struct.Struct("!BBQ")
_CLOSE_CODE = struct.Struct("!H")


class ProtocolViolation(Exception):
    """The peer's bytes break RFC 6455; ``code`` is the close code to answer with."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def _unmask(payload: bytes, key: bytes) -> bytes:
    """``payload`` XORed with the repeated four-byte ``key`` (masking is its own inverse)."""
    n = len(payload)
    if not n:
        return payload
    stream = (key * ((n >> 2) + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(stream, "little")).to_bytes(
        n, "little"
    )


class FrameParser:
    """Frames from the bytes ``feed`` is given, a message or control frame at a time.

    ``masked``: the peer is a client, whose frames must be masked (we are the
    server); otherwise the peer is a server, whose frames must not be.
    """

    __slots__ = (
        "_buf",
        "_decoder",
        "_done",
        "_masked",
        "_max_message_bytes",
        "_more",
        "_more_size",
        "_need",
        "_partial",
        "_partial_opcode",
        "_partial_size",
        "_pos",
    )

    def __init__(self, *, masked: bool, max_message_bytes: int) -> None:
        self._masked = masked
        self._max_message_bytes = max_message_bytes
        # Invariant: the unparsed bytes are _buf[_pos:] followed by the _more pieces
        # (_more_size bytes in all). Pieces wait in _more while fewer than _need
        # bytes are buffered, so a large frame arriving in many reads is joined once.
        self._buf = b""
        self._pos = 0
        self._more: list[bytes] = []
        self._more_size = 0
        self._need = 2
        # The fragmented message being assembled: its opcode, pieces and size.
        self._partial_opcode: int | None = None
        self._partial: list[Any] = []  # bytes, or str for text
        self._partial_size = 0
        self._decoder: codecs.IncrementalDecoder | None = None
        # Set after a close frame or a violation: nothing more is parsed.
        self._done = False

    @property
    def done(self) -> bool:
        """A close frame was parsed, or a violation raised: ``next`` returns None from now on."""
        return self._done

    def feed(self, data: bytes) -> None:
        """Add bytes read from the socket (after the ones given before)."""
        if self._pos >= len(self._buf) and not self._more:
            self._buf = data
            self._pos = 0
            return
        self._more.append(data)
        self._more_size += len(data)
        if len(self._buf) - self._pos + self._more_size >= self._need:
            self._buf = b"".join([self._buf[self._pos :], *self._more])
            self._pos = 0
            self._more.clear()
            self._more_size = 0

    def next(self) -> tuple[int, bytes | str] | tuple[int, tuple[int, str]] | None:
        """The next whole message or control frame, ``FRAGMENT``, or None (more bytes needed).

        Returns ``(OP_TEXT, str)``, ``(OP_BINARY, bytes)``, ``(OP_PING, payload)``,
        ``(OP_PONG, payload)``, ``(OP_CLOSE, (code, reason))`` (1005 and "" for an
        empty close frame), or ``FRAGMENT`` for a fragment that does not end its
        message. Raises ``ProtocolViolation``.
        """
        if self._done:
            return None
        buf = self._buf
        pos = self._pos
        available = len(buf) - pos
        if available < 2 or available < self._need:
            return None
        first = buf[pos]
        second = buf[pos + 1]
        opcode = first & 0x0F
        fin = first & 0x80
        if first & 0x70:
            self._violation(PROTOCOL_ERROR, "a reserved bit is set (no extension was agreed)")
        if opcode >= OP_CLOSE:
            if opcode > OP_PONG:
                self._violation(PROTOCOL_ERROR, f"unknown opcode {opcode:#x}")
            if not fin:
                self._violation(PROTOCOL_ERROR, "a fragmented control frame")
        elif opcode > OP_BINARY:
            self._violation(PROTOCOL_ERROR, f"unknown opcode {opcode:#x}")
        length = second & 0x7F
        head = 2
        if length >= 126:
            if opcode >= OP_CLOSE:
                self._violation(PROTOCOL_ERROR, "a control frame over 125 bytes")
            if length == 126:
                if available < 4:
                    self._need = 4  # the head, to its 16-bit length
                    return None
                length = (buf[pos + 2] << 8) | buf[pos + 3]
                if length < 126:
                    self._violation(PROTOCOL_ERROR, "a length in 2 bytes where 1 would do")
                head = 4
            else:
                if available < 10:
                    self._need = 10  # the head, to its 64-bit length
                    return None
                length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                if length >> 63:
                    self._violation(PROTOCOL_ERROR, "a 64-bit length with its top bit set")
                if length < 0x10000:
                    self._violation(PROTOCOL_ERROR, "a length in 8 bytes where 2 would do")
                head = 10
        if second & 0x80:
            if not self._masked:
                self._violation(PROTOCOL_ERROR, "a masked frame from a server")
            head += 4
        elif self._masked:
            self._violation(PROTOCOL_ERROR, "an unmasked frame from a client")
        if opcode < OP_CLOSE and self._partial_size + length > self._max_message_bytes:
            self._violation(MESSAGE_TOO_BIG, f"a message over {self._max_message_bytes} bytes")
        end = head + length
        if available < end:
            self._need = end  # the whole frame
            return None
        start = pos + head
        payload = buf[start : start + length]
        if self._masked:
            payload = _unmask(payload, buf[start - 4 : start])
        self._pos = start + length
        self._need = 2
        if opcode >= OP_CLOSE:
            if opcode == OP_CLOSE:
                self._done = True
                return OP_CLOSE, self._close(payload)
            return opcode, payload
        return self._data(opcode, fin, payload)

    def _violation(self, code: int, reason: str) -> NoReturn:
        self._done = True
        raise ProtocolViolation(code, reason)

    def _data(self, opcode: int, fin: int, payload: bytes) -> tuple[int, bytes | str]:
        partial_opcode = self._partial_opcode
        if partial_opcode is None:
            if opcode == OP_CONTINUATION:
                self._violation(PROTOCOL_ERROR, "a continuation frame with no message to continue")
            if fin:
                if opcode == OP_TEXT:
                    try:
                        return OP_TEXT, payload.decode("utf-8")
                    except UnicodeDecodeError:
                        self._violation(INVALID_PAYLOAD, "a text message that is not UTF-8")
                return OP_BINARY, payload
            self._partial_opcode = opcode
            if opcode == OP_TEXT:
                self._decoder = codecs.getincrementaldecoder("utf-8")()
        elif opcode != OP_CONTINUATION:
            self._violation(PROTOCOL_ERROR, "a new message inside a fragmented one")
        decoder = self._decoder
        piece: bytes | str = payload
        if decoder is not None:
            try:
                piece = decoder.decode(payload, bool(fin))
            except UnicodeDecodeError:
                self._violation(INVALID_PAYLOAD, "a text message that is not UTF-8")
        if piece:
            self._partial.append(piece)
        self._partial_size += len(payload)
        if not fin:
            return FRAGMENT
        pieces = self._partial
        self._partial = []
        self._partial_size = 0
        self._partial_opcode = None
        self._decoder = None
        if decoder is not None:
            return OP_TEXT, "".join(pieces)
        return OP_BINARY, b"".join(pieces)

    def _close(self, payload: bytes) -> tuple[int, str]:
        if not payload:
            return NO_STATUS, ""
        if len(payload) == 1:
            self._violation(PROTOCOL_ERROR, "a close frame with a one-byte payload")
        (code,) = _CLOSE_CODE.unpack_from(payload)
        if (code < 3000 and code not in _PEER_CLOSE_CODES) or code > 4999:
            self._violation(PROTOCOL_ERROR, f"a close frame with code {code}, not one a peer sends")
        try:
            reason = payload[2:].decode("utf-8")
        except UnicodeDecodeError:
            self._violation(INVALID_PAYLOAD, "a close reason that is not UTF-8")
        return code, reason


# -- the frames we write ---------------------------------------------------------------

#: The two-byte heads of unmasked frames with payloads under 126 bytes, by opcode.
_SHORT_HEADS = {
    opcode: [bytes((0x80 | opcode, n)) for n in range(126)]
    for opcode in (OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG)
}


def _head(opcode: int, n: int, mask_bit: int) -> bytes:
    if n < 126:
        return bytes((0x80 | opcode, mask_bit | n))
    if n < 0x10000:
        return _LENGTH_16.pack(0x80 | opcode, mask_bit | 126, n)
    return _LENGTH_64.pack(0x80 | opcode, mask_bit | 127, n)


def server_frame(opcode: int, payload: bytes) -> bytes:
    """A whole unmasked frame (a server's) of ``payload``."""
    n = len(payload)
    if n < 126:
        return _SHORT_HEADS[opcode][n] + payload
    return _head(opcode, n, 0) + payload


def client_frame(opcode: int, payload: bytes) -> bytes:
    """A whole frame of ``payload`` masked with a fresh key from the OS's CSPRNG (a client's).

    RFC 6455 §5.3: the key must be unpredictable, so a page cannot choose the bytes a
    proxy between us and the server sees.
    """
    key = os.urandom(4)
    return _head(opcode, len(payload), 0x80) + key + _unmask(payload, key)


def close_payload(code: int, reason: str) -> bytes:
    """A close frame's payload: ``code`` (1005: none at all) and ``reason``, cut to fit.

    Local-only codes (1006, 1015) are sent as 1000. The reason is cut at a character
    boundary to what a control frame holds.
    """
    if code == NO_STATUS:
        return b""
    if code in _LOCAL_ONLY_CODES:
        code = 1000
    encoded = reason.encode("utf-8")
    if len(encoded) > MAX_CLOSE_REASON_BYTES:
        encoded = encoded[:MAX_CLOSE_REASON_BYTES].decode("utf-8", "ignore").encode("utf-8")
    return _CLOSE_CODE.pack(code) + encoded
