"""The Twilio REST client under trio, against the simulated REST API and a silent server.

Loopback only, port 0, ``fail_after`` on every test.
"""

from __future__ import annotations

from functools import partial

import httpx
import pytest
import trio

from voicebridge.sim.caller import SimTwilioSettings
from voicebridge.sim.twilio_rest import SimTwilioRest
from voicebridge.twilio.rest import TwilioRest, TwilioRestError

ACCOUNT = "AC" + "a" * 32
TOKEN = "twilio-auth-token-0123"
SETTINGS = SimTwilioSettings(
    bridge_url="http://127.0.0.1:9",
    public_url="https://bridge.example.com",
    account_sid=ACCOUNT,
    auth_token=TOKEN,
)


def client(
    http: httpx.AsyncClient, base_url: str, *, token: str = TOKEN, deadline_s: float = 2.0
) -> TwilioRest:
    return TwilioRest(
        http, account_sid=ACCOUNT, auth_token=token, base_url=base_url, deadline_s=deadline_s
    )


async def test_a_call_already_gone_is_not_an_error_and_bad_credentials_are() -> None:
    rest = SimTwilioRest(SETTINGS)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery, httpx.AsyncClient() as http:
            await nursery.start(rest.serve)
            assert (
                await client(http, rest.base_url).redirect("CA" + "0" * 32, "<Response/>") is False
            )
            assert await client(http, rest.base_url).hang_up("CA" + "0" * 32) is False
            with pytest.raises(TwilioRestError) as info:
                await client(http, rest.base_url, token="wrong").hang_up("CA" + "0" * 32)
            nursery.cancel_scope.cancel()
    assert info.value.status == 401 and info.value.code == 20003
    assert TOKEN not in str(info.value) and "wrong" not in str(info.value)
    assert rest.updates == []


async def test_create_refused_is_an_error() -> None:
    rest = SimTwilioRest(SETTINGS)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery, httpx.AsyncClient() as http:
            await nursery.start(rest.serve)
            with pytest.raises(TwilioRestError) as info:
                # A Url outside the account's public URL: Twilio would fetch nothing useful.
                await client(http, rest.base_url).create_call(
                    to="+15550100777", from_="+15550100001", url="https://elsewhere.example/x"
                )
            nursery.cancel_scope.cancel()
    assert info.value.status == 400


async def test_a_silent_server_is_bounded_by_the_deadline() -> None:
    async def never_answer(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery, httpx.AsyncClient() as http:
            [listener] = await nursery.start(
                partial(trio.serve_tcp, never_answer, 0, host="127.0.0.1")
            )
            port = listener.socket.getsockname()[1]
            started = trio.current_time()
            with pytest.raises(TwilioRestError, match=r"no answer within 0\.3 s"):
                await client(http, f"http://127.0.0.1:{port}", deadline_s=0.3).hang_up("CA1")
            elapsed = trio.current_time() - started
            nursery.cancel_scope.cancel()
    assert 0.3 <= elapsed < 1.0
