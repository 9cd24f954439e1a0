"""``voicebridge call NUMBER``: place an outbound call that reaches the assistant through us.

The call is created with Twilio's REST API; its ``Url`` is this deployment's voice
webhook, so it takes the path of an inbound call (signed webhook, admission, stream
token, the configured assistant). Prints the CallSid.
"""

from __future__ import annotations

import sys
from typing import TextIO

import httpx
import trio

from voicebridge.config import load_config
from voicebridge.control.plane import ControlError, place_outbound_call
from voicebridge.errors import ConfigError
from voicebridge.twilio.rest import TwilioRest, TwilioRestError

#: The voice webhook's path (``web.VOICE_PATH``; not imported: the CLI stays light).
VOICE_PATH = "/twilio/voice"


def call_main(
    number: str, config_path: str, *, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """Exit status: 0 placed, 2 configuration problem, 1 Twilio refused or unreachable."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    try:
        config = load_config(config_path, require_complete=False)
    except ConfigError as exc:
        print(f"voicebridge: config error: {exc}", file=err)
        return 2
    token = config.credentials.twilio_auth_token.reveal()
    missing = [
        key
        for key, value in (
            ("server.public_url", config.server.public_url),
            ("twilio.account_sid", config.twilio.account_sid),
            ("credentials.twilio_auth_token", token),
            ("outbound.from_number", config.outbound.from_number),
        )
        if not value
    ]
    if missing:
        print(f"voicebridge: config error: outbound calls need {', '.join(missing)}", file=err)
        return 2

    async def place() -> str:
        async with httpx.AsyncClient() as http:
            rest = TwilioRest.from_config(http, config)
            return await place_outbound_call(
                rest,
                from_number=config.outbound.from_number,
                to=number,
                url=config.server.public_url + VOICE_PATH,
            )

    try:
        sid = trio.run(place)
    except (ControlError, TwilioRestError) as exc:
        print(f"voicebridge: call failed: {exc}", file=err)
        return 1
    print(sid, file=out)
    return 0
