"""The assistant an outbound call reaches, carried from the call's creation to Vapi.

An outbound call (``voicebridge call --assistant``, ``POST /control/calls``) may name
one of ``outbound.assistants`` instead of ``vapi.assistant_id``. The name travels in
the voice webhook URL voicebridge gives Twilio when it creates the call::

    <public_url>/twilio/voice?assistant=<id>&assistantGrant=<grant>

where the grant is HMAC-SHA256 of the assistant id and the called number, keyed by
the stream token secret (with a label of its own, so it can never pass for a stream
token). Twilio signs the URL it requests, query included; the voice webhook honours
the assistant only with the right grant for the call's ``To`` and while the id is
still allowed. So neither a caller nor anyone who can point a Twilio number at our
webhook can choose an assistant: only voicebridge's own outbound path can. From
there it goes to the ``<Stream>`` as a ``<Parameter>``, whose ``start`` is gated by
the single-use stream token (which vouches for the assistant too: ``twilio.token``),
and on to Vapi's ``POST /call`` as ``assistantId``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping
from typing import Final
from urllib.parse import urlencode

from voicebridge.config import ASSISTANT_ID, Config
from voicebridge.errors import VoicebridgeError

#: The voice webhook's query parameters that carry an outbound call's assistant.
ASSISTANT_QUERY: Final = "assistant"
GRANT_QUERY: Final = "assistantGrant"
#: Separates this use of the stream token secret from its others.
_LABEL: Final = b"voicebridge outbound assistant\x00"


class AssistantRefused(VoicebridgeError):
    """An outbound call names an assistant it may not have. Safe to log."""


def is_e164(number: str) -> bool:
    """``+`` and 8 to 15 digits."""
    digits = number[1:]
    return (
        number.startswith("+") and digits.isascii() and digits.isdigit() and 8 <= len(digits) <= 15
    )


def outbound_assistant(config: Config, requested: str) -> str:
    """The assistant of an outbound call that asks for ``requested``.

    "" (the configured one) for "" or ``vapi.assistant_id``; ``requested`` when
    ``outbound.assistants`` lists it; otherwise ``AssistantRefused``.
    """
    if not requested or requested == config.vapi.assistant_id:
        return ""
    if not ASSISTANT_ID.fullmatch(requested):
        raise AssistantRefused(
            "an assistant id is 1-64 letters, digits, _ or -, got "
            f"{requested[:70]!r}" + ("…" if len(requested) > 70 else "")
        )
    if requested not in config.outbound.assistants:
        raise AssistantRefused(f"assistant {requested!r} is not listed in outbound.assistants")
    return requested


def outbound_voice_url(config: Config, voice_url: str, *, to: str, assistant: str) -> str:
    """The voice webhook URL for an outbound call to ``to``: ``voice_url``, with the
    assistant and its grant when the call names one. ``AssistantRefused`` as
    ``outbound_assistant``, or when there is no stream token secret to sign with."""
    assistant = outbound_assistant(config, assistant)
    if not assistant:
        return voice_url
    secret = config.credentials.stream_token_secret.reveal()
    if not secret:
        raise AssistantRefused(
            "an outbound call's own assistant needs the stream token secret "
            "(credentials.stream_token_secret) to sign it"
        )
    query = urlencode({ASSISTANT_QUERY: assistant, GRANT_QUERY: _grant(secret, assistant, to)})
    return f"{voice_url}?{query}"


def granted_assistant(config: Config, query: Mapping[str, str], *, to: str) -> str:
    """The assistant the voice webhook's ``query`` grants the call to ``to``; "" for none.

    ``AssistantRefused`` when the query names an assistant without the grant
    voicebridge made for this number, or one that is no longer allowed.
    """
    assistant = query.get(ASSISTANT_QUERY, "")
    grant = query.get(GRANT_QUERY, "")
    if not assistant and not grant:
        return ""
    # A grant made before a rotation of the secret still holds (the call was placed).
    given = grant.encode("utf-8", "replace")
    secrets = (
        config.credentials.stream_token_secret.reveal(),
        config.credentials.stream_token_secret_previous.reveal(),
    )
    if not assistant or not any(
        secret and hmac.compare_digest(_grant(secret, assistant, to).encode(), given)
        for secret in secrets
    ):
        raise AssistantRefused(
            "the assistant in the voice webhook URL has no valid grant for this call "
            "(voicebridge did not place it)"
        )
    return outbound_assistant(config, assistant)


def _grant(secret: str, assistant: str, to: str) -> str:
    message = b"\x00".join((assistant.encode("utf-8", "replace"), to.encode("utf-8", "replace")))
    mac = hmac.new(secret.encode(), _LABEL + message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode("ascii")
