"""``voicebridge call NUMBER [--assistant ID]``: place an outbound call that reaches the
assistant through us.

The call is created with Twilio's REST API; its ``Url`` is this deployment's voice
webhook, so it takes the path of an inbound call (signed webhook, admission, stream
token), to the configured assistant or to ``--assistant``, one of
``outbound.assistants`` (``control.assistants``). Prints the CallSid.
"""

from __future__ import annotations

import sys
from typing import TextIO

import httpx
import trio

from voicebridge.config import load_config
from voicebridge.control.assistants import AssistantRefused, is_e164, outbound_assistant
from voicebridge.control.plane import ControlError, place_outbound_call
from voicebridge.errors import ConfigError
from voicebridge.twilio.rest import TwilioRest, TwilioRestError

#: The voice webhook's path (``web.VOICE_PATH``; not imported: the CLI stays light).
VOICE_PATH = "/twilio/voice"


def call_main(
    number: str,
    config_path: str,
    *,
    assistant: str = "",
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Exit status: 0 placed, 2 a bad number, assistant or configuration, 1 Twilio refused
    or unreachable."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    if not is_e164(number):
        print(f"voicebridge: {number[:70]!r} is not an E.164 number (+15551234567)", file=err)
        return 2
    try:
        config = load_config(config_path, require_complete=False)
    except ConfigError as exc:
        print(f"voicebridge: config error: {exc}", file=err)
        return 2
    try:
        chosen = outbound_assistant(config, assistant)
    except AssistantRefused as exc:
        print(f"voicebridge: --assistant refused: {exc}", file=err)
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
    if chosen and not config.credentials.stream_token_secret.reveal():
        missing.append("credentials.stream_token_secret (it signs the call's assistant)")
    if missing:
        print(f"voicebridge: config error: outbound calls need {', '.join(missing)}", file=err)
        return 2

    async def place() -> str:
        async with httpx.AsyncClient() as http:
            rest = TwilioRest.from_config(http, config)
            return await place_outbound_call(
                rest,
                config,
                voice_url=config.server.public_url + VOICE_PATH,
                to=number,
                assistant=chosen,
            )

    try:
        sid = trio.run(place)
    except (ControlError, AssistantRefused, TwilioRestError) as exc:
        print(f"voicebridge: call failed: {exc}", file=err)
        return 1
    print(sid, file=out)
    return 0
