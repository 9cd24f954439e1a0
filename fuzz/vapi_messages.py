"""Coverage-guided fuzzing of the Vapi transport parser (``transport.parse_message``).

Each input is one text frame (UTF-8, errors replaced). A crash is any exception but
``RemoteProtocolError``, or an event that kept the message's ``call`` object (which
carries the socket URL, a bearer secret). Run: see ``fuzz/README.md``.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from voicebridge.errors import RemoteProtocolError
    from voicebridge.vapi.transport import parse_message


def test_one_input(data: bytes) -> None:
    text = data.decode("utf-8", errors="replace")
    try:
        event = parse_message(text)
    except RemoteProtocolError:
        return
    # The `call` object (with its socket URL) is never kept in an event.
    assert "websocketCallUrl" not in repr(event)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
