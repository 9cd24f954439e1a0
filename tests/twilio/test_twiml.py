"""Tests of the TwiML documents, parsed back with ElementTree as Twilio would read them."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from voicebridge.config import CallerAction
from voicebridge.twilio.twiml import caller_action, connect_stream, hangup


def parse(document: str) -> ET.Element:
    assert document.startswith('<?xml version="1.0" encoding="UTF-8"?>')
    root = ET.fromstring(document)
    assert root.tag == "Response"
    return root


def shape(element: ET.Element) -> list[str]:
    return [child.tag for child in element]


def test_connect_stream() -> None:
    root = parse(
        connect_stream(
            stream_url="wss://bridge.example.com/twilio/media",
            action_url="https://bridge.example.com/twilio/after-stream",
            parameters={"token": "v1.CA1.123.abc.def", "caller": "+15551234567"},
            status_callback="https://bridge.example.com/twilio/stream-status",
        )
    )
    assert shape(root) == ["Connect"]
    connect = root[0]
    assert connect.attrib == {"action": "https://bridge.example.com/twilio/after-stream"}
    assert shape(connect) == ["Stream"]
    stream = connect[0]
    assert stream.attrib == {
        "url": "wss://bridge.example.com/twilio/media",
        "statusCallback": "https://bridge.example.com/twilio/stream-status",
    }
    assert "track" not in stream.attrib
    assert [p.attrib for p in stream] == [
        {"name": "token", "value": "v1.CA1.123.abc.def"},
        {"name": "caller", "value": "+15551234567"},
    ]
    assert all(p.tag == "Parameter" and len(p) == 0 for p in stream)


def test_connect_stream_without_status_callback_or_parameters() -> None:
    root = parse(
        connect_stream(
            stream_url="wss://bridge.example.com/media",
            action_url="https://bridge.example.com/after",
            parameters={},
        )
    )
    assert root[0][0].attrib == {"url": "wss://bridge.example.com/media"}
    assert len(root[0][0]) == 0


def test_parameter_values_are_escaped() -> None:
    value = 'a "quoted" <value> & more'
    root = parse(
        connect_stream(stream_url="wss://h/m", action_url="https://h/a", parameters={"x": value})
    )
    assert root[0][0][0].attrib == {"name": "x", "value": value}


def test_parameters_must_be_under_500_characters() -> None:
    connect_stream(stream_url="wss://h/m", action_url="https://h/a", parameters={"n": "v" * 498})
    with pytest.raises(ValueError, match="500"):
        connect_stream(
            stream_url="wss://h/m", action_url="https://h/a", parameters={"n": "v" * 499}
        )
    with pytest.raises(ValueError, match="name"):
        connect_stream(stream_url="wss://h/m", action_url="https://h/a", parameters={"": "v"})


@pytest.mark.parametrize(
    "url",
    [
        "wss://bridge.example.com/media?token=x",
        "wss://bridge.example.com/media?",
        "wss://bridge.example.com/media#frag",
        "https://bridge.example.com/media",
        "bridge.example.com/media",
    ],
)
def test_stream_url_must_be_a_websocket_url_without_query(url: str) -> None:
    with pytest.raises(ValueError):
        connect_stream(stream_url=url, action_url="https://h/a", parameters={})


def test_caller_action_says_dials_and_hangs_up() -> None:
    root = parse(
        caller_action(CallerAction(say="Connecting you.", voice="Polly.Amy", dial="+15557654321"))
    )
    assert shape(root) == ["Say", "Dial", "Hangup"]
    say, dial, _ = root
    assert (say.text, say.attrib) == ("Connecting you.", {"voice": "Polly.Amy"})
    assert (dial.text, dial.attrib) == ("+15557654321", {})


def test_caller_action_without_voice_or_dial() -> None:
    root = parse(caller_action(CallerAction(say="Sorry, we are busy.")))
    assert shape(root) == ["Say", "Hangup"]
    assert root[0].attrib == {}


def test_caller_action_dial_only() -> None:
    root = parse(caller_action(CallerAction(dial="+15557654321")))
    assert shape(root) == ["Dial", "Hangup"]


def test_empty_caller_action_hangs_up() -> None:
    assert shape(parse(caller_action(CallerAction()))) == ["Hangup"]


def test_hangup() -> None:
    root = parse(hangup())
    assert shape(root) == ["Hangup"]
    assert root[0].attrib == {} and not root[0].text
