"""Coverage-guided fuzzing of the TwiML we answer with (``twiml.connect_stream``,
``twiml.caller_action``): any parameter names and values, any words.

A crash is an exception but the documented ``ValueError``, or a document that does not
parse as XML, or a parameter that does not come back as given (after ``xml_safe``).
Run: see ``fuzz/README.md``.
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET

import atheris

with atheris.instrument_imports():
    from voicebridge.config import CallerAction
    from voicebridge.twilio import twiml


def test_one_input(data: bytes) -> None:
    provider = atheris.FuzzedDataProvider(data)
    parameters = {
        provider.ConsumeUnicode(40): provider.ConsumeUnicode(600)
        for _ in range(provider.ConsumeIntInRange(0, 4))
    }
    try:
        document = twiml.connect_stream(
            stream_url="wss://bridge.example.com/twilio/stream",
            action_url="https://bridge.example.com/twilio/after-stream",
            parameters=parameters,
        )
    except ValueError:
        pass
    else:
        found = {p.get("name"): p.get("value") for p in ET.fromstring(document).iter("Parameter")}
        assert found == {twiml.xml_safe(k): twiml.xml_safe(v) for k, v in parameters.items()}
    words = provider.ConsumeUnicode(300)
    ET.fromstring(twiml.caller_action(CallerAction(say=words)))


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
