"""``net.frames`` against wsproto's frame layer: the same bytes, the same verdict.

The parser faces the Internet on the media socket and Vapi on the other leg. wsproto
is an independent implementation of RFC 6455, so it is the oracle: for any stream of
frames (mostly well-formed, with every kind of breakage mixed in: reserved bits and
opcodes, wrong masking, lengths in too many bytes, fragmented or oversized control
frames, stray continuations, text that is not UTF-8, close frames with one byte, a
code no peer sends or a reason that is not UTF-8), fed in arbitrary pieces, both
report the same messages and control frames in the same order, and stop at the same
frame with the same close code. The frames we write are read back by wsproto as
what we meant.
"""

from __future__ import annotations

import itertools
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto.frame_protocol import FrameProtocol, Opcode, ParseFailed

from voicebridge.net.frames import (
    FRAGMENT,
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameParser,
    ProtocolViolation,
    client_frame,
    close_payload,
    server_frame,
)

#: Large enough that no generated message reaches it (wsproto has no such limit).
LIMIT = 1 << 20

Outcome = tuple[Any, ...]


def ours(chunks: list[bytes], *, masked: bool) -> list[Outcome]:
    parser = FrameParser(masked=masked, max_message_bytes=LIMIT)
    seen: list[Outcome] = []
    for chunk in chunks:
        parser.feed(chunk)
        while True:
            try:
                frame = parser.next()
            except ProtocolViolation as exc:
                seen.append(("violation", exc.code))
                return seen
            if frame is None:
                break
            if frame == FRAGMENT:
                continue
            opcode, payload = frame
            if opcode == OP_CLOSE:
                seen.append(("close", *payload))  # type: ignore[misc]
                return seen
            seen.append((opcode, payload))
    return seen


def wsprotos(chunks: list[bytes], *, masked: bool) -> list[Outcome]:
    protocol = FrameProtocol(client=not masked, extensions=[])
    seen: list[Outcome] = []
    message: list[Any] = []
    for chunk in chunks:
        protocol.receive_bytes(chunk)
        try:
            for frame in protocol.received_frames():
                if frame.opcode is Opcode.CLOSE:
                    code, reason = frame.payload  # type: ignore[misc]
                    seen.append(("close", int(code), reason))
                    return seen
                if frame.opcode in (Opcode.PING, Opcode.PONG):
                    seen.append((int(frame.opcode), bytes(frame.payload)))  # type: ignore[arg-type]
                    continue
                message.append(frame.payload)
                if frame.frame_finished and frame.message_finished:
                    if frame.opcode is Opcode.TEXT:
                        seen.append((OP_TEXT, "".join(message)))
                    else:
                        seen.append((OP_BINARY, b"".join(message)))
                    message = []
        except ParseFailed as exc:
            seen.append(("violation", int(exc.code)))
            return seen
    return seen


# -- frames, mostly right ---------------------------------------------------------------

texts = st.text(max_size=40)


@st.composite
def payloads(draw: st.DrawFn, opcode: int) -> bytes:
    if opcode == OP_CLOSE:
        kind = draw(st.sampled_from(["code", "code", "code", "empty", "one-byte", "bad-reason"]))
        if kind == "empty":
            return b""
        if kind == "one-byte":
            return b"\x03"
        code = draw(
            st.sampled_from([1000, 1001, 1002, 1003, 1007, 1008, 1011, 1012, 1013, 3000, 4999])
            | st.integers(min_value=0, max_value=0xFFFF).filter(lambda c: c != 1014)
        )
        reason = b"\xc3\x28" if kind == "bad-reason" else draw(texts).encode()[:100]
        return struct.pack("!H", code) + reason
    if opcode == OP_TEXT or (opcode == 0 and draw(st.booleans())):
        if draw(st.integers(0, 9)) == 0:
            return draw(st.binary(max_size=20))  # often not UTF-8
        encoded = draw(texts).encode()
        if draw(st.booleans()) and len(encoded) > 1:
            cut = draw(st.integers(0, len(encoded)))  # a fragment may split a character
            return encoded[:cut]
        return encoded
    size = draw(st.sampled_from([0, 5, 125, 126, 300, 70000]))
    return draw(st.binary(min_size=size, max_size=size)) if size < 70000 else b"\x01" * size


@st.composite
def frames(draw: st.DrawFn, masked: bool) -> bytes:
    opcode = draw(
        st.sampled_from([OP_TEXT] * 4 + [OP_BINARY] * 3 + [0] * 3 + [OP_PING, OP_PONG, OP_CLOSE])
        | st.integers(0, 15)
    )
    fin = draw(st.integers(0, 5)) > 0
    rsv = 0 if draw(st.integers(0, 15)) else draw(st.sampled_from([0x40, 0x20, 0x10]))
    if opcode >= 8 and opcode != OP_CLOSE:
        payload = draw(st.binary(max_size=125 if draw(st.integers(0, 9)) else 130))
    else:
        payload = draw(payloads(opcode))
    n = len(payload)
    encoding = draw(st.sampled_from(["minimal"] * 8 + ["16", "64"]))
    if n < 0x10000 and (encoding == "16" or (encoding == "minimal" and n >= 126)):
        length = bytes([126]) + struct.pack("!H", n)
        first = 126
    elif encoding != "minimal" or n >= 126:
        length = bytes([127]) + struct.pack("!Q", n)
        first = 127
    else:
        length = bytes([n])
        first = n
    mask = masked if draw(st.integers(0, 15)) else not masked
    head = bytes([(0x80 if fin else 0) | rsv | opcode, (0x80 if mask else 0) | first])
    head += length[1:]
    if not mask:
        return head + payload
    key = draw(st.binary(min_size=4, max_size=4))
    body = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return head + key + body


@st.composite
def streams(draw: st.DrawFn) -> tuple[bool, list[bytes]]:
    """Whole frames (the last one too), cut into pieces anywhere."""
    masked = draw(st.booleans())
    data = b"".join(draw(st.lists(frames(masked), min_size=1, max_size=12)))
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=8)))
    edges = [0, *cuts, len(data)]
    return masked, [data[a:b] for a, b in itertools.pairwise(edges) if b > a]


@settings(max_examples=400, deadline=None)
@given(streams())
def test_every_stream_gets_wsprotos_verdict(stream: tuple[bool, list[bytes]]) -> None:
    masked, chunks = stream
    assert ours(chunks, masked=masked) == wsprotos(chunks, masked=masked)


def test_a_stream_fed_a_byte_at_a_time_gets_the_same_messages() -> None:
    data = b"".join(
        [
            client_frame(OP_TEXT, "héllo".encode()),
            client_frame(OP_BINARY, b"\x00" * 70000),
            client_frame(OP_PING, b"p"),
            client_frame(OP_CLOSE, close_payload(1000, "bye")),
        ]
    )
    one_piece = ours([data], masked=True)
    assert one_piece == wsprotos([data], masked=True)
    assert ours([data[i : i + 1] for i in range(len(data))], masked=True) == one_piece
    assert one_piece[-1] == ("close", 1000, "bye")


# -- what we write ------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from([OP_TEXT, OP_BINARY, OP_PING, OP_PONG]),
    st.binary(max_size=70000),
    st.booleans(),
)
def test_wsproto_reads_the_frames_we_write(opcode: int, payload: bytes, client: bool) -> None:
    if opcode >= 8:
        payload = payload[:125]
    if opcode == OP_TEXT:
        payload = payload.decode("utf-8", "replace").encode()
    frame = (client_frame if client else server_frame)(opcode, payload)
    expected: Outcome = (opcode, payload.decode() if opcode == OP_TEXT else payload)
    assert wsprotos([frame], masked=client) == [expected]


@pytest.mark.parametrize(
    ("code", "reason", "read_back"),
    [
        (1000, "", (1000, "")),
        (1005, "ignored", (1005, "")),  # no status: an empty close frame
        (1006, "lost", (1000, "lost")),  # local-only codes go out as 1000
        (4001, "é" * 100, (4001, "é" * 61)),  # cut to 123 bytes, at a character
    ],
)
def test_close_frames_we_write(code: int, reason: str, read_back: tuple[int, str]) -> None:
    frame = server_frame(OP_CLOSE, close_payload(code, reason))
    assert wsprotos([frame], masked=False) == [("close", *read_back)]


def test_a_close_with_1014_is_taken_though_wsproto_refuses_it() -> None:
    # 1014 (Bad Gateway) was registered with IANA after wsproto's list was written:
    # a proxy in front of Vapi may send it.
    frame = server_frame(OP_CLOSE, struct.pack("!H", 1014))
    assert ours([frame], masked=False) == [("close", 1014, "")]
    assert wsprotos([frame], masked=False) == [("violation", 1002)]


def test_an_oversized_message_is_refused_from_its_header() -> None:
    parser = FrameParser(masked=True, max_message_bytes=1000)
    head = client_frame(OP_BINARY, b"\x00" * 1001)[:8]  # the head and key only
    parser.feed(head)
    with pytest.raises(ProtocolViolation) as refused:
        parser.next()
    assert refused.value.code == 1009
    assert parser.done
    parser.feed(b"\x00" * 1001)
    assert parser.next() is None


def test_fragments_count_toward_the_limit() -> None:
    parser = FrameParser(masked=False, max_message_bytes=1000)
    parser.feed(bytes([0x02, 126]) + struct.pack("!H", 600) + b"a" * 600)
    assert parser.next() == FRAGMENT
    parser.feed(bytes([0x80, 126]) + struct.pack("!H", 401))
    with pytest.raises(ProtocolViolation) as refused:
        parser.next()
    assert refused.value.code == 1009
