"""Twilio's REST API driven from trio: redirect a live call, hang it up, place a call.

twilio-python builds and parses the requests; its transport here is
``HttpxTwilioClient``, an ``AsyncHttpClient`` over a shared ``httpx.AsyncClient``
(httpx runs under trio; the library's own async client is aiohttp, which does not).
Every request is bounded by a trio deadline. A call that is already gone is an
expected race (a hand-over meeting the caller's hang-up), reported as ``False``, never
raised: Twilio answers an update of a call that has ended with HTTP 400 and error 21220
("invalid call state"), and one of a SID it does not know with 404 and error 20404.
Errors never carry the auth token.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Final

import httpx
import trio
from twilio.base.exceptions import TwilioRestException
from twilio.http import AsyncHttpClient
from twilio.http.response import Response as TwilioResponse
from twilio.rest import Client

from voicebridge.config import Config
from voicebridge.errors import VoicebridgeError

log = logging.getLogger(__name__)

#: Twilio's error code for "the requested resource was not found": an unknown CallSid.
CALL_NOT_FOUND: Final = 20404
#: Twilio's error code for "invalid call state": the call is no longer in progress
#: (completed, so it can be neither redirected nor hung up again). Sent with HTTP 400.
CALL_NOT_IN_PROGRESS: Final = 21220
#: The error codes that mean "the call is already gone", not "the request failed".
CALL_GONE_CODES: Final = frozenset({CALL_NOT_FOUND, CALL_NOT_IN_PROGRESS})
#: Characters of Twilio's error message kept in a ``TwilioRestError``.
MAX_ERROR_CHARS: Final = 200


class TwilioRestError(VoicebridgeError):
    """A Twilio REST request failed; ``status`` is the HTTP status (0: no answer), ``code``
    Twilio's error code when it sent one. Safe to log."""

    def __init__(self, message: str, *, status: int = 0, code: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class HttpxTwilioClient(AsyncHttpClient):  # type: ignore[misc]  # twilio is untyped
    """twilio-python's async transport over httpx, so that ``*_async`` calls run under trio."""

    def __init__(self, http: httpx.AsyncClient, *, timeout_s: float) -> None:
        super().__init__(logger=log, is_async=True, timeout=timeout_s)
        self._http = http

    async def request(
        self,
        method: str,
        uri: str,
        params: Mapping[str, object] | None = None,
        data: Mapping[str, object] | None = None,
        headers: Mapping[str, str] | None = None,
        auth: tuple[str, str] | None = None,
        **options: Any,
    ) -> TwilioResponse:
        """The library's request; ``options`` are its ``timeout`` and ``allow_redirects``.

        The library's per-request timeout is passed on to httpx; the trio deadline in
        ``TwilioRest`` bounds the whole exchange regardless.
        """
        timeout = options.get("timeout")
        response = await self._http.request(
            method.upper(),
            uri,
            params=dict(params) if params else None,  # type: ignore[arg-type]
            data=dict(data) if data else None,
            headers=dict(headers) if headers else None,
            auth=auth,
            timeout=timeout if timeout is not None else self.timeout,
            follow_redirects=bool(options.get("allow_redirects", False)),
        )
        return TwilioResponse(response.status_code, response.text, response.headers)


class TwilioRest:
    """The calls of one Twilio account, under trio; every method bounded by ``deadline_s``."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        account_sid: str,
        auth_token: str,
        base_url: str,
        deadline_s: float,
    ) -> None:
        self._deadline_s = deadline_s
        self._client = Client(
            account_sid, auth_token, http_client=HttpxTwilioClient(http, timeout_s=deadline_s)
        )
        # Point the API domain at base_url (the simulated REST API in tests).
        self._client.api.base_url = base_url.rstrip("/")

    @classmethod
    def from_config(cls, http: httpx.AsyncClient, config: Config) -> TwilioRest | None:
        """The account's client, or None without ``twilio.account_sid`` and the auth token."""
        token = config.credentials.twilio_auth_token.reveal()
        if not config.twilio.account_sid or not token:
            return None
        return cls(
            http,
            account_sid=config.twilio.account_sid,
            auth_token=token,
            base_url=config.twilio.rest_base_url,
            deadline_s=config.twilio.rest_deadline_s,
        )

    async def redirect(self, call_sid: str, twiml: str) -> bool:
        """Give the live call new TwiML (its ``<Connect><Stream>`` ends); False: call gone
        (ended: 21220, or unknown: 20404). Raises ``TwilioRestError`` for any other failure
        or no answer within the deadline; cancellation abandons the request."""
        return await self._update(call_sid, "redirect", twiml=twiml)

    async def hang_up(self, call_sid: str) -> bool:
        """End the call (``Status=completed``); False: it was already gone (as ``redirect``)."""
        return await self._update(call_sid, "hang-up", status="completed")

    async def create_call(self, *, to: str, from_: str, url: str) -> str:
        """Place a call whose TwiML comes from ``url`` (POST); returns its CallSid."""
        instance = await self._bounded(
            "create call",
            self._client.calls.create_async(to=to, from_=from_, url=url, method="POST"),
        )
        if instance is None:
            raise TwilioRestError(f"create call: Twilio REST returned 404 for {to}", status=404)
        sid = getattr(instance, "sid", None)
        if not isinstance(sid, str) or not sid:
            raise TwilioRestError("create call: Twilio's answer has no sid")
        return sid

    async def _update(self, call_sid: str, what: str, **changes: Any) -> bool:
        result = await self._bounded(what, self._client.calls(call_sid).update_async(**changes))
        return result is not None

    async def _bounded(self, what: str, request: Any) -> Any:
        """Await the library's coroutine under the deadline; None when the call is gone."""
        with trio.move_on_after(self._deadline_s) as scope:
            try:
                return await request
            except TwilioRestException as exc:
                if exc.code in CALL_GONE_CODES or exc.status == 404:
                    return None
                message = " ".join(str(exc.msg).split())[:MAX_ERROR_CHARS]
                raise TwilioRestError(
                    f"{what}: Twilio answered HTTP {exc.status} (code {exc.code}): {message}",
                    status=exc.status,
                    code=exc.code,
                ) from None
            except httpx.HTTPError as exc:
                raise TwilioRestError(f"{what}: {type(exc).__name__}: {exc}") from None
        assert scope.cancelled_caught
        raise TwilioRestError(f"{what}: no answer within {self._deadline_s:g} s")
