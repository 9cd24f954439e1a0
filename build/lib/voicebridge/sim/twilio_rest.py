"""The simulated Twilio REST API: the ``Calls`` resource, driving simulated callers.

Serves, with HTTP Basic auth (account SID : auth token) like Twilio:

- ``POST /2010-04-01/Accounts/{AccountSid}/Calls.json`` (``To``, ``From``, ``Url``): an
  outbound call. The callee is a ``sim.caller.place_call`` run with the SimTwilioRest's
  ``callee_script``; its webhook is ``Url`` (``Direction=outbound-api``). 201 with
  the call resource.
- ``POST /2010-04-01/Accounts/{AccountSid}/Calls/{CallSid}.json`` with ``Twiml``, ``Url``
  or ``Status=completed``: updates a live call. A redirect ends the call's Media
  Stream (``stop``, close) and the call runs the new TwiML instead of its ``<Connect
  action>``; a ``<Dial>`` in it is recorded as a transfer. A redirected call is still
  in progress: while its new TwiML has it dialled to someone it takes further updates
  (another redirect, ``Status=completed``). A call that has ended (hung up, completed,
  or TwiML run out without a ``<Dial>``) is 400 with Twilio's error 21220 ("invalid call
  state"); a SID the account never had is 404 with error 20404.

Calls placed by ``place_inbound`` (tests) are live here too, so REST updates reach them.
Everything is recorded: ``created``, ``updates``, ``transfers``, ``reports`` (by CallSid).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hmac
import secrets
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from typing import Any, Final
from urllib.parse import parse_qsl

import attrs
import httpx
import orjson
import trio

from voicebridge.sim.caller import CallReport, LiveCall, Script, SimTwilioSettings, place_call
from voicebridge.sim.wire import HttpRequest, HttpResponse, SimWebSocket, serve_http_ws

API_PREFIX: Final = "/2010-04-01/Accounts/"
#: Twilio's error codes for the cases the simulation answers.
AUTHENTICATE: Final = 20003
NOT_FOUND: Final = 20404
#: "Invalid call state": a realtime operation on a call that is not in progress.
CALL_NOT_IN_PROGRESS: Final = 21220
INVALID_PARAMETER: Final = 21205
#: The webhook's ``Direction`` of a call placed through ``Calls.json``.
OUTBOUND_DIRECTION: Final = "outbound-api"


@attrs.frozen(kw_only=True)
class RestCreate:
    """One ``Calls.json`` create: the call it placed and the webhook ``Url`` it was given."""

    call_sid: str
    to: str
    url: str


@attrs.frozen(kw_only=True)
class RestUpdate:
    """One ``Calls/{sid}`` update: ``kind`` is ``twiml``, ``url`` or ``status``."""

    call_sid: str
    kind: str
    value: str
    at: float


class SimTwilioRest:
    """A fake Twilio account's Calls resource; ``serve`` it, point the bridge's
    ``twilio.rest_base_url`` at ``base_url``."""

    def __init__(
        self, settings: SimTwilioSettings | None = None, *, callee_script: Script = ()
    ) -> None:
        #: The account, and where callers go; settable (a bridge's port may come later).
        self.settings = settings
        self.callee_script: Script = callee_script
        self._live: dict[str, LiveCall] = {}
        #: Calls whose stream is over, by CallSid: True while still in progress (the
        #: redirect's TwiML dialled someone), False once completed.
        # Invariant: a SID is in at most one of _live and _over.
        self._over: dict[str, bool] = {}
        self._done: dict[str, trio.Event] = {}
        self.reports: dict[str, CallReport] = {}
        self.created: list[RestCreate] = []
        self.updates: list[RestUpdate] = []
        #: (CallSid, number) for each ``<Dial>`` a redirect brought.
        self.transfers: list[tuple[str, str]] = []
        self._nursery: trio.Nursery | None = None
        self._port: int | None = None

    @property
    def base_url(self) -> str:
        if self._port is None:
            raise RuntimeError("SimTwilioRest is not serving yet")
        return f"http://127.0.0.1:{self._port}"

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve on 127.0.0.1 until cancelled; outbound calls run in this task's nursery."""
        async with trio.open_nursery() as calls_nursery:
            self._nursery = calls_nursery
            self._port = await calls_nursery.start(
                functools.partial(serve_http_ws, self._handle_http, _no_websockets)
            )
            task_status.started(self._port)

    async def place_inbound(self, script: Script, *, call_sid: str | None = None) -> CallReport:
        """An inbound call (as ``place_call``) that REST updates can reach."""
        return await self._run_call(self._settings, script, call_sid or _new_sid())

    async def wait_report(self, call_sid: str) -> CallReport:
        """Wait for an outbound call to end; its report."""
        await self._done.setdefault(call_sid, trio.Event()).wait()
        return self.reports[call_sid]

    async def _run_call(self, settings: SimTwilioSettings, script: Script, sid: str) -> CallReport:
        live = LiveCall(sid)
        self._live[sid] = live
        try:
            report = await place_call(settings, script, live=live)
        finally:
            del self._live[sid]
            self._over[sid] = False
        # TwiML that ended in a <Dial> (a redirect's or the action's) leaves the caller
        # connected to someone else: the call is still in progress.
        self._over[sid] = report.final_action == "dial"
        self.reports[sid] = report
        self._done.setdefault(sid, trio.Event()).set()
        return report

    # --- HTTP -------------------------------------------------------------------

    @property
    def _settings(self) -> SimTwilioSettings:
        if self.settings is None:
            raise RuntimeError("SimTwilioRest has no settings yet")
        return self.settings

    async def _handle_http(self, request: HttpRequest) -> HttpResponse:
        if self.settings is None:
            return _error(503, NOT_FOUND, "the simulated account is not set up yet")
        prefix = f"{API_PREFIX}{self._settings.account_sid}/Calls"
        if request.method != "POST" or not request.path.startswith(prefix):
            return _error(404, NOT_FOUND, f"The requested resource {request.path} was not found")
        if not self._authorized(request):
            return _error(401, AUTHENTICATE, "Authenticate")
        params = dict(parse_qsl(request.body.decode("utf-8", "replace"), keep_blank_values=True))
        rest = request.path[len(prefix) :]
        if rest == ".json":
            return self._create(params)
        if rest.startswith("/") and rest.endswith(".json"):
            return await self._update(rest[1 : -len(".json")], params)
        return _error(404, NOT_FOUND, f"The requested resource {request.path} was not found")

    def _authorized(self, request: HttpRequest) -> bool:
        scheme, _, encoded = request.headers.get("authorization", "").partition(" ")
        try:
            given = base64.b64decode(encoded, validate=True)
        except binascii.Error:
            return False
        expected = f"{self._settings.account_sid}:{self._settings.auth_token}".encode()
        return scheme.lower() == "basic" and hmac.compare_digest(given, expected)

    def _create(self, params: Mapping[str, str]) -> HttpResponse:
        to, from_, url = params.get("To", ""), params.get("From", ""), params.get("Url", "")
        public = self._settings.public_url.rstrip("/")
        if not to or not from_ or not url.startswith(public + "/"):
            return _error(400, INVALID_PARAMETER, "To, From and a Url under the public URL needed")
        assert self._nursery is not None
        sid = _new_sid()
        settings = attrs.evolve(
            self._settings,
            voice_path=url[len(public) :],
            from_number=from_,
            to_number=to,
            direction=OUTBOUND_DIRECTION,
        )
        self._done.setdefault(sid, trio.Event())
        self.created.append(RestCreate(call_sid=sid, to=to, url=url))
        self._nursery.start_soon(self._run_call, settings, self.callee_script, sid)
        return _resource(201, sid, self._settings.account_sid, to, from_, "queued")

    async def _update(self, sid: str, params: Mapping[str, str]) -> HttpResponse:
        live = self._live.get(sid)
        in_progress = self._over.get(sid)
        if live is None and in_progress is None:
            return _error(404, NOT_FOUND, f"The requested resource Calls/{sid} was not found")
        if (live is not None and live.update == "completed") or in_progress is False:
            return _error(
                400, CALL_NOT_IN_PROGRESS, "Call is not in-progress. Cannot redirect."
            )
        now = trio.current_time()
        if "Twiml" in params:
            twiml = params["Twiml"]
            self.updates.append(RestUpdate(call_sid=sid, kind="twiml", value=twiml, at=now))
        elif "Url" in params:
            self.updates.append(RestUpdate(call_sid=sid, kind="url", value=params["Url"], at=now))
            twiml = await self._fetch(params["Url"], sid)
        elif params.get("Status") in ("completed", "canceled"):
            self.updates.append(RestUpdate(call_sid=sid, kind="status", value="completed", at=now))
            if live is not None:
                await live.complete()
            else:
                self._over[sid] = False
            return _resource(200, sid, self._settings.account_sid, "", "", "completed")
        else:
            return _error(400, INVALID_PARAMETER, "one of Twiml, Url or Status is required")
        for number in _dialled(twiml):
            self.transfers.append((sid, number))
        if live is not None:
            await live.redirect(twiml)
        else:
            # Past its stream: the new TwiML replaces the dial; without one it ends.
            self._over[sid] = bool(_dialled(twiml))
        return _resource(200, sid, self._settings.account_sid, "", "", "in-progress")

    async def _fetch(self, url: str, sid: str) -> str:
        """The TwiML at ``url`` (an unsigned POST: good enough for the simulation)."""
        async with httpx.AsyncClient() as http:
            response = await http.post(url, data={"CallSid": sid})
        return response.text


def _dialled(twiml: str) -> Sequence[str]:
    try:
        root = ET.fromstring(twiml)
    except ET.ParseError:
        return []
    numbers = []
    for dial in root.iter("Dial"):
        target = next(iter(dial), None)
        numbers.append(((target.text if target is not None else dial.text) or "").strip())
    return numbers


def _new_sid() -> str:
    return "CA" + secrets.token_hex(16)


def _resource(status: int, sid: str, account: str, to: str, from_: str, state: str) -> HttpResponse:
    body: dict[str, Any] = {
        "sid": sid,
        "account_sid": account,
        "to": to,
        "from": from_,
        "status": state,
        "direction": OUTBOUND_DIRECTION,
        "api_version": "2010-04-01",
        "uri": f"{API_PREFIX}{account}/Calls/{sid}.json",
    }
    return _json(status, body)


def _error(status: int, code: int, message: str) -> HttpResponse:
    return _json(status, {"code": code, "message": message, "more_info": "", "status": status})


def _json(status: int, body: Mapping[str, Any]) -> HttpResponse:
    return HttpResponse(
        status=status, headers=(("content-type", "application/json"),), body=orjson.dumps(body)
    )


async def _no_websockets(request: HttpRequest, ws: SimWebSocket) -> None:
    await ws.reject(404)
