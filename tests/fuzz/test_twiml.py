"""Property tests of the TwiML we answer with: any parameters, any words, valid TwiML.

``twiml.connect_stream`` carries values from the network (the caller's and called
numbers come from Twilio's webhook) and ``twiml.caller_action`` the configured words.
Either the call raises ``ValueError`` (documented: too long, bad URL) or the result is
a TwiML document that parses, with every value exactly as given.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

from hypothesis import given, settings
from hypothesis import strategies as st

from voicebridge.config import CallerAction
from voicebridge.twilio import twiml

any_text = st.text(max_size=600)


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(any_text.filter(bool), any_text, max_size=4),
    st.sampled_from(["wss://bridge.example.com/twilio/stream", "ws://127.0.0.1:1/s", "https://x/"]),
)
def test_stream_parameters_round_trip_or_are_refused(
    parameters: dict[str, str], stream_url: str
) -> None:
    try:
        document = twiml.connect_stream(
            stream_url=stream_url, action_url="https://bridge.example.com/a", parameters=parameters
        )
    except ValueError:
        return
    root = ET.fromstring(document)
    found = {p.get("name"): p.get("value") for p in root.iter("Parameter")}
    assert found == {twiml.xml_safe(name): twiml.xml_safe(v) for name, v in parameters.items()}


@settings(max_examples=200, deadline=None)
@given(any_text)
def test_caller_action_words_are_valid_twiml(say: str) -> None:
    document = twiml.caller_action(CallerAction(say=say))
    root = ET.fromstring(document)
    [hangup] = root.iter("Hangup")
    assert hangup is not None
    words = [element.text or "" for element in root.iter("Say")]
    safe = twiml.xml_safe(say)
    # An XML parser reads every line break as \n.
    assert words == ([safe.replace("\r\n", "\n").replace("\r", "\n")] if safe else [])


def test_xml_safe_keeps_what_xml_can_carry_and_drops_the_rest() -> None:
    assert twiml.xml_safe("Hola, ¿qué tal? 👋\tok\n") == "Hola, ¿qué tal? 👋\tok\n"
    assert twiml.xml_safe("a\x00b\x1fc\ufffed") == "abcd"
