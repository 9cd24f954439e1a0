"""Coverage-guided fuzzing of the Twilio Media Streams parser (``MediaStream.receive``).

The input is cut into frames at each 0xff byte; frames that decode as UTF-8 go in as
text, the others as binary. The first frames of most inputs should be a valid
``connected`` + ``start`` (seed the corpus with ``fuzz/seeds/twilio``) so that the
fuzzer explores the started stream. A crash is any exception but
``RemoteProtocolError``, or a broken invariant (see the property test
``tests/fuzz/test_twilio_frames.py``). Run: see ``fuzz/README.md``.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from voicebridge.errors import LocalProtocolError, RemoteProtocolError
    from voicebridge.twilio.media import MediaStream, Start, Stop


def test_one_input(data: bytes) -> None:
    stream = MediaStream()
    stopped = False
    for chunk in data.split(b"\xff"):
        frame: str | bytes
        try:
            frame = chunk.decode("utf-8")
        except UnicodeDecodeError:
            frame = chunk
        before = (stream.started, stream.stopped, stream.stream_sid)
        try:
            event = stream.receive(frame)
        except RemoteProtocolError:
            assert (stream.started, stream.stopped, stream.stream_sid) == before
            continue
        assert not stopped, "an event after stop"
        stopped = isinstance(event, Stop)
        assert stream.started == (stream.stream_sid is not None)
        if isinstance(event, Start):
            assert stream.stream_sid == event.stream_sid
        try:
            stream.send_clear()
        except LocalProtocolError:
            assert not stream.started or stream.stopped


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
