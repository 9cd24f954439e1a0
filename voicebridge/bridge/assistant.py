"""The real assistant connector: creates the Vapi call over HTTPS, opens its socket, and
reaches it through Live Call Control."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any

import httpx

from voicebridge.bridge.call import AssistantCall
from voicebridge.config import VapiConfig
from voicebridge.sockets import PingableSocket
from voicebridge.vapi.client import VapiCall, create_call, open_transport, post_control


class VapiConnector:
    """``AssistantConnector`` for Vapi: ``POST /call``, then the transport socket; and
    ``monitor.controlUrl`` for a call whose socket never opened.

    Each step runs under its configured deadline; failures raise ``VapiError`` with
    its kind (auth, rejected, server, timeout, refused, dropped, protocol).
    """

    def __init__(
        self,
        http: httpx.AsyncClient,
        config: VapiConfig,
        api_key: str,
        *,
        server: Mapping[str, Any] | None = None,
    ) -> None:
        self._http = http
        self._config = config
        self._api_key = api_key
        # assistantOverrides.server: where Vapi sends the call's webhooks (call control).
        self._server = server

    async def create(
        self,
        *,
        call_sid: str,
        caller: str,
        called: str,
        assistant: str = "",
        decision: Mapping[str, Any] | None = None,
    ) -> VapiCall:
        """``assistant``: the call's own assistant id; "" for ``vapi.assistant_id``.
        ``decision``: its route's inline assistant and overrides (``build_create_body``)."""
        return await create_call(
            self._http, self._config, self._api_key,
            call_sid=call_sid, caller=caller, called=called, server=self._server,
            assistant=assistant, decision=decision,
        )

    def connect(self, call: AssistantCall) -> AbstractAsyncContextManager[PingableSocket]:
        if not isinstance(call, VapiCall):
            raise TypeError(f"not a call this connector created: {call!r}")
        return open_transport(
            call,
            self._api_key,
            connect_deadline_s=self._config.connect_deadline_s,
            close_deadline_s=self._config.end_deadline_s,
        )

    async def post_control(self, call: AssistantCall, message: str) -> bool:
        """POST ``message`` to the call's ``monitor.controlUrl``, within ``end_deadline_s``;
        False when the create answer had none (``vapi.client.post_control``)."""
        if not isinstance(call, VapiCall):
            raise TypeError(f"not a call this connector created: {call!r}")
        if call.control_url is None:
            return False
        await post_control(
            self._http, call.control_url, message, deadline_s=self._config.end_deadline_s
        )
        return True
