"""``REMOTE=`` behind a proxy: the client a trusted proxy names, and nobody else's word.

Charter: the rule itself on plain strings; then the real server on loopback with a
forged webhook and a media stream carrying ``X-Forwarded-For``, asserting the
``REMOTE`` field of the log line an operator would read.
"""

from __future__ import annotations

import logging

import httpx
import pytest
import trio
import trio_websocket

from tests.harness import running_bridge
from voicebridge.config import config_from_mapping
from voicebridge.errors import ConfigError
from voicebridge.observability.logs import FIELDS_ATTR
from voicebridge.observability.remote import client_address

PROXY = ("127.0.0.1", "10.0.0.0/8")


@pytest.mark.parametrize(
    ("peer", "forwarded_for", "forwarded", "expected"),
    [
        # A trusted proxy names the client.
        ("127.0.0.1:5000", "203.0.113.7", None, "203.0.113.7"),
        # Proxies append: the right-most untrusted address is the client; what the
        # client itself wrote further left is not believed.
        ("127.0.0.1:5000", "198.51.100.1, 203.0.113.7, 10.1.2.3", None, "203.0.113.7"),
        # Every hop trusted (a client on the proxy's network): the left-most hop.
        ("127.0.0.1:5000", "10.0.0.1", None, "10.0.0.1"),
        ("127.0.0.1:5000", "10.0.0.2, 10.0.0.1", None, "10.0.0.2"),
        # RFC 7239, with a port and IPv6 in quotes.
        ("127.0.0.1", None, 'for=198.51.100.2:4711;proto=https, for="[2001:db8::1]:443"',
         "2001:db8::1"),
        # An untrusted peer is the client, whatever it writes.
        ("192.0.2.9:5000", "203.0.113.7", None, "192.0.2.9:5000"),
        # Unreadable or absent: the peer stands.
        ("127.0.0.1:5000", "unknown", None, "127.0.0.1:5000"),
        ("127.0.0.1:5000", None, None, "127.0.0.1:5000"),
        ("[::ffff:127.0.0.1]:5000", "203.0.113.8", None, "203.0.113.8"),
    ],
)
def test_the_client_is_whom_a_trusted_proxy_names(
    peer: str, forwarded_for: str | None, forwarded: str | None, expected: str
) -> None:
    assert client_address(
        peer, trusted=PROXY, forwarded_for=forwarded_for, forwarded=forwarded
    ) == expected


def test_without_trusted_proxies_headers_are_ignored() -> None:
    assert client_address("127.0.0.1:1", trusted=(), forwarded_for="203.0.113.7") == "127.0.0.1:1"


def remotes(caplog: pytest.LogCaptureFixture, event: str) -> list[object]:
    return [
        getattr(record, FIELDS_ATTR, {}).get("REMOTE")
        for record in caplog.records
        if getattr(record, FIELDS_ATTR, {}).get("EVENT") == event
    ]


@pytest.mark.parametrize(("trusted", "expected"), [(("127.0.0.1",), "203.0.113.7"), ((), None)])
async def test_rejections_name_the_client_behind_a_trusted_proxy(
    caplog: pytest.LogCaptureFixture, trusted: tuple[str, ...], expected: str | None
) -> None:
    caplog.set_level(logging.INFO, logger="voicebridge")
    headers = {"X-Forwarded-For": "203.0.113.7", "X-Twilio-Signature": "forged"}
    with trio.fail_after(20):
        async with running_bridge(server={"trusted_proxies": trusted}) as bridge:
            async with httpx.AsyncClient() as http:
                answer = await http.post(
                    bridge.config.server.public_url + "/twilio/voice",
                    data={"CallSid": "CA" + "0" * 32}, headers=headers,
                )
            port = bridge.config.server.public_url.rsplit(":", 1)[1]
            async with trio_websocket.open_websocket_url(
                f"ws://127.0.0.1:{port}/twilio/stream",
                extra_headers=[("X-Forwarded-For", "203.0.113.7")],
            ) as ws:
                await ws.send_message('{"event": "connected"}')
                await ws.send_message('{"event": "start", "streamSid": "MZ1", "start": {}}')
                with pytest.raises(trio_websocket.ConnectionClosed):
                    while True:
                        await ws.get_message()
    assert answer.status_code == 403
    [webhook] = remotes(caplog, "webhook-rejected")
    [stream] = remotes(caplog, "call-end")
    if expected is None:  # the proxy's own address, as the peer
        assert str(webhook).startswith("127.0.0.1") and str(stream).startswith("127.0.0.1:")
    else:
        assert webhook == stream == expected


@pytest.mark.parametrize(
    ("server", "key", "reason"),
    [
        ({"trusted_proxies": ["10.0.0.0/8", "proxy.local"]}, "server.trusted_proxies[1]",
         "proxy.local"),
        ({"worker": "a b"}, "server.worker", "letters, digits"),
        ({"worker": ""}, "server.worker", "1 to 32"),
    ],
)
def test_bad_observability_keys_are_refused_with_the_key(
    server: dict[str, object], key: str, reason: str
) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_mapping({"server": server}, environ={}, require_complete=False)
    assert info.value.key == key and reason in info.value.reason


def test_the_keys_can_come_from_the_environment() -> None:
    config = config_from_mapping(
        {}, require_complete=False,
        environ={"VOICEBRIDGE_SERVER_WORKER": "3",
                 "VOICEBRIDGE_SERVER_TRUSTED_PROXIES": '["127.0.0.1", "10.0.0.0/8"]',
                 "VOICEBRIDGE_SERVER_MASK_CALLER_NUMBERS": "true"},
    )
    assert config.server.worker == "3"
    assert config.server.trusted_proxies == ("127.0.0.1", "10.0.0.0/8")
    assert config.server.mask_caller_numbers is True
