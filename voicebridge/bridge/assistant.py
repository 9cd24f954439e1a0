"""The real assistant connector: creates the Vapi call over HTTPS and opens its socket."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from attrs import frozen

from voicebridge.config import VapiConfig
from voicebridge.sockets import PingableSocket
from voicebridge.vapi.client import create_call, open_transport


@frozen
class VapiLeg:
    call_id: str
    socket: PingableSocket


class VapiConnector:
    """``AssistantConnector`` for Vapi: ``POST /call``, then the transport socket.

    Each step runs under its configured deadline; failures raise ``VapiError`` with
    its kind (auth, rejected, server, timeout, refused, dropped, protocol).
    """

    def __init__(self, http: httpx.AsyncClient, config: VapiConfig, api_key: str) -> None:
        self._http = http
        self._config = config
        self._api_key = api_key

    @asynccontextmanager
    async def open(self, *, call_sid: str, caller: str, called: str) -> AsyncIterator[VapiLeg]:
        call = await create_call(
            self._http,
            self._config,
            self._api_key,
            call_sid=call_sid,
            caller=caller,
            called=called,
        )
        async with open_transport(
            call, self._api_key, connect_deadline_s=self._config.connect_deadline_s
        ) as socket:
            yield VapiLeg(call.id, socket)
