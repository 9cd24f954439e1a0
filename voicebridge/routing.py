"""Which assistant answers a call: the routing table, and the decision a call carries.

``[[routes]]`` is an ordered list; the first route that takes a call's dialled number
(``To``) and caller (``From``) decides it, and a call no route takes gets the
``default`` route: today's settings (``vapi.assistant_id`` or ``vapi.assistant``). A
route gives one ``Choice``:

- ``AssistantChoice``: an assistant (an id, an inline assistant, or the configured one)
  with optional ``assistantOverrides``; the call is admitted and streamed as ever;
- ``DialChoice``: ``<Dial>`` a number at once, without an assistant (no admission);
- ``RefuseChoice``: a TwiML document (the ``[overflow]`` message, or the route's own).

A route may first ask the operator's decision hook (``routing_hook``), whose answer has
the same choices. Whatever decided, an assistant choice travels to the media socket
under the stream token's MAC (``StreamClaims.route`` and ``.decision``), so any process
of the box can act on it without shared state: the route's name, and the inline
assistant and overrides as one compressed ``decision`` blob, cut into ``<Parameter>``s.

No I/O here: ``decide`` (in ``routing_hook``) does the asking.
"""

from __future__ import annotations

import base64
import binascii
import sys
import xml.etree.ElementTree as ET
import zlib
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

import orjson
from attrs import field, frozen

from voicebridge.config import CallerAction, Config, RouteConfig, load_config
from voicebridge.errors import ConfigError
from voicebridge.twilio import twiml

__all__ = [
    "DECISION_PARAMETER",
    "DEFAULT_ROUTE",
    "MAX_DECISION_CHARS",
    "OUTBOUND_ROUTE",
    "ROUTE_PARAMETER",
    "AssistantChoice",
    "Choice",
    "Decision",
    "DialChoice",
    "RefuseChoice",
    "Router",
    "decision_parameters",
    "decode_decision",
    "encode_decision",
    "joined_decision",
    "route_problems",
]

#: The route of a call no ``[[routes]]`` entry takes: today's settings.
DEFAULT_ROUTE = "default"
#: The route of an outbound call (placed by ``voicebridge call``): never routed.
OUTBOUND_ROUTE = "outbound"
RESERVED_ROUTE_NAMES = frozenset({DEFAULT_ROUTE, OUTBOUND_ROUTE})
#: ``<Parameter>`` names: the route, and the decision blob in pieces (``decision``,
#: ``decision.1``, …), each piece short enough for Twilio's 500-character limit.
ROUTE_PARAMETER = "route"
DECISION_PARAMETER = "decision"
DECISION_CHUNK_CHARS = 480
#: The largest decision blob a call carries (ten parameters). A larger inline assistant
#: belongs in Vapi as a saved assistant, named by its id.
MAX_DECISION_CHARS = 10 * DECISION_CHUNK_CHARS
#: Keys of ``assistantOverrides`` the bridge sets itself and relies on (the audio
#: format, its deadlines, where webhooks go): a route's or hook's values are ignored.
BRIDGE_OVERRIDE_KEYS = frozenset(
    {"clientMessages", "server", "serverMessages", "maxDurationSeconds", "silenceTimeoutSeconds"}
)


@frozen(kw_only=True)
class AssistantChoice:
    """An assistant answers: ``assistant_id``, else the inline ``assistant``, else the
    configured one (``vapi``); ``overrides`` become Vapi ``assistantOverrides``."""

    assistant_id: str = ""
    assistant: Mapping[str, Any] = field(factory=dict)
    overrides: Mapping[str, Any] = field(factory=dict)


@frozen(kw_only=True)
class DialChoice:
    """``<Dial>`` ``number`` at once (after ``say``, if any), without an assistant."""

    number: str
    say: str = ""


@frozen(kw_only=True)
class RefuseChoice:
    """Answer the call with this TwiML document (no assistant, no admission)."""

    twiml: str


Choice = AssistantChoice | DialChoice | RefuseChoice


@frozen(kw_only=True)
class Decision:
    """What a call gets: the route that took it, its choice, and why (for people)."""

    route: str
    choice: Choice
    why: str
    #: Whether the decision hook may be asked to decide instead.
    ask_hook: bool = True
    #: ``route`` (the table) or ``hook`` (the operator's server decided).
    by: str = "route"


def _number_matches(pattern: str, number: str) -> bool:
    if pattern == "*":
        return True
    if pattern.endswith("*"):
        return number.startswith(pattern[:-1])
    return number == pattern


def _which(patterns: Sequence[str], number: str) -> str | None:
    """The first pattern ``number`` matches ("any" for no patterns), or None."""
    if not patterns:
        return "any"
    return next((p for p in patterns if _number_matches(p, number)), None)


def choice_of(route: RouteConfig, config: Config) -> Choice:
    """The choice a configured route gives."""
    if route.dial:
        return DialChoice(number=route.dial)
    if route.refuse:
        return RefuseChoice(twiml=twiml.caller_action(config.overflow))
    if route.twiml:
        return RefuseChoice(twiml=route.twiml)
    return AssistantChoice(
        assistant_id=route.assistant_id,
        assistant=route.assistant,
        overrides=route.assistant_overrides,
    )


def describe(choice: Choice) -> str:
    """The choice in a few words, for ``voicebridge route`` and the logs."""
    match choice:
        case AssistantChoice(assistant_id=assistant_id, assistant=inline, overrides=overrides):
            if assistant_id:
                what = f"assistant {assistant_id}"
            elif inline:
                what = "an inline assistant"
            else:
                what = "the configured assistant (vapi)"
            if overrides:
                what += " with assistantOverrides " + ", ".join(sorted(overrides))
            return what
        case DialChoice(number=number):
            return f"dial {number} (no assistant)"
        case RefuseChoice():
            return "refuse (TwiML, no assistant)"


def choice_action(choice: Choice) -> str:
    """``assistant``, ``dial`` or ``refuse``: a metrics label."""
    match choice:
        case AssistantChoice():
            return "assistant"
        case DialChoice():
            return "dial"
        case RefuseChoice():
            return "refuse"


def choice_twiml(choice: DialChoice | RefuseChoice) -> str:
    """The TwiML that answers a call given a choice without an assistant."""
    match choice:
        case DialChoice(number=number, say=say):
            return twiml.caller_action(CallerAction(say=say, dial=number))
        case RefuseChoice(twiml=document):
            return document


class Router:
    """The routing table of one configuration; matching is pure and cheap."""

    __slots__ = ("_config", "_routes")

    def __init__(self, config: Config) -> None:
        self._config = config
        self._routes = tuple((route, choice_of(route, config)) for route in config.routes)

    def match(self, *, to: str, caller: str) -> Decision:
        """The decision for a call to ``to`` from ``caller``: the first route that takes
        it, else the default route."""
        for route, choice in self._routes:
            to_pattern = _which(route.to, to)
            caller_pattern = _which(route.callers, caller)
            if to_pattern is not None and caller_pattern is not None:
                return Decision(
                    route=route.name,
                    choice=choice,
                    why=f"to {to or '(none)'} matches {to_pattern}, "
                    f"caller {caller or '(none)'} matches {caller_pattern}",
                    ask_hook=route.ask_hook,
                )
        return Decision(
            route=DEFAULT_ROUTE,
            choice=AssistantChoice(),
            why="no route takes it: today's settings",
        )

    def explain(self, *, to: str, caller: str) -> list[str]:
        """Every route in order, whether it takes the call and why not; then the decision."""
        lines: list[str] = []
        for index, (route, _) in enumerate(self._routes):
            if _which(route.to, to) is None:
                reason = f"to {to or '(none)'} matches none of {', '.join(route.to)}"
            elif _which(route.callers, caller) is None:
                reason = f"caller {caller or '(none)'} matches none of {', '.join(route.callers)}"
            else:
                lines.append(f"routes[{index}] {route.name}: takes it")
                break
            lines.append(f"routes[{index}] {route.name}: no ({reason})")
        decision = self.match(to=to, caller=caller)
        lines.append(f"route: {decision.route}")
        lines.append(f"why: {decision.why}")
        lines.append(f"gives: {describe(decision.choice)}")
        hook = self._config.route_hook.url
        if hook and decision.ask_hook:
            lines.append(
                f"hook: {hook} is asked first (deadline {self._config.route_hook.deadline_s:g} s); "
                "on a timeout, an error or a malformed answer the route's choice above is used"
            )
        return lines


# --- the decision a call carries ------------------------------------------------------


def encode_decision(choice: AssistantChoice) -> str:
    """The inline assistant and overrides as the token's ``decision`` claim: compressed
    canonical JSON in base64url; "" when there are neither."""
    payload: dict[str, Any] = {}
    if choice.assistant:
        payload["assistant"] = choice.assistant
    if choice.overrides:
        payload["assistantOverrides"] = choice.overrides
    if not payload:
        return ""
    packed = zlib.compress(orjson.dumps(payload, option=orjson.OPT_SORT_KEYS), 9)
    return base64.urlsafe_b64encode(packed).rstrip(b"=").decode("ascii")


def decode_decision(text: str) -> dict[str, Any]:
    """The ``{"assistant": …, "assistantOverrides": …}`` of a ``decision`` claim ({} for
    ""). Raises ``ValueError`` for text ``encode_decision`` did not make."""
    if not text:
        return {}
    if len(text) > MAX_DECISION_CHARS:
        raise ValueError("decision too long")
    try:
        packed = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        inflater = zlib.decompressobj()
        raw = inflater.decompress(packed, 1 << 20)
        if inflater.unconsumed_tail or not inflater.eof:
            raise ValueError("decision truncated or too large")
        value = orjson.loads(raw)
    except (binascii.Error, zlib.error, orjson.JSONDecodeError) as exc:
        raise ValueError(f"decision unreadable: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError("decision is not an object")
    return value


def decision_parameters(decision: str) -> dict[str, str]:
    """The ``<Parameter>``s that carry a ``decision`` claim, in order."""
    size = DECISION_CHUNK_CHARS
    pieces = [decision[i : i + size] for i in range(0, len(decision), size)]
    return {
        (DECISION_PARAMETER if n == 0 else f"{DECISION_PARAMETER}.{n}"): piece
        for n, piece in enumerate(pieces)
    }


def joined_decision(parameters: Mapping[str, str]) -> str:
    """The ``decision`` claim put back together from a stream's parameters."""
    first = parameters.get(DECISION_PARAMETER, "")
    if not first:
        return ""
    pieces = [first]
    for n in range(1, MAX_DECISION_CHARS // DECISION_CHUNK_CHARS):
        piece = parameters.get(f"{DECISION_PARAMETER}.{n}")
        if piece is None:
            break
        pieces.append(piece)
    return "".join(pieces)


def create_overrides(
    decision: Mapping[str, Any], correlation: Mapping[str, str]
) -> dict[str, Any]:
    """A decision's ``assistantOverrides`` as they go to Vapi, before the bridge's own
    keys: ``variableValues`` and ``metadata`` are merged with the call's ``correlation``
    (which wins), the keys the bridge sets itself (``BRIDGE_OVERRIDE_KEYS``) dropped."""
    overrides = decision.get("assistantOverrides")
    if not isinstance(overrides, Mapping):
        overrides = {}
    merged = {k: v for k, v in overrides.items() if k not in BRIDGE_OVERRIDE_KEYS}
    for key in ("variableValues", "metadata"):
        theirs = overrides.get(key)
        merged[key] = {**(theirs if isinstance(theirs, Mapping) else {}), **correlation}
    return merged


# --- check-config ---------------------------------------------------------------------

_CHOICE_KEYS = ("assistant_id", "assistant", "dial", "refuse", "twiml")


def _twiml_problem(document: str) -> str:
    try:
        root = ET.fromstring(document)
    except ET.ParseError as exc:
        return f"is not XML ({exc})"
    if root.tag != "Response":
        return f"must be a <Response> document, got <{root.tag}>"
    return ""


def route_problems(config: Config) -> list[tuple[str, str]]:
    """(key, reason) for every ``[[routes]]`` entry that cannot work, and a hook secret
    too short to sign with."""
    problems: list[tuple[str, str]] = []
    seen: dict[str, int] = {}
    for index, route in enumerate(config.routes):
        key = f"routes[{index}]"
        if route.name in RESERVED_ROUTE_NAMES:
            problems.append((f"{key}.name", f"{route.name!r} is reserved (calls no route takes)"))
        elif route.name in seen:
            problems.append(
                (f"{key}.name", f"{route.name!r} is taken by routes[{seen[route.name]}]")
            )
        seen.setdefault(route.name, index)
        given = [name for name in _CHOICE_KEYS if getattr(route, name)]
        if len(given) > 1:
            problems.append(
                (key, f"gives {' and '.join(given)}: a route gives at most one of "
                 f"{', '.join(_CHOICE_KEYS)}")
            )
            continue
        if route.assistant_overrides and given and given[0] not in ("assistant_id", "assistant"):
            problems.append(
                (f"{key}.assistant_overrides", f"only an assistant takes overrides, not {given[0]}")
            )
        if route.twiml:
            reason = _twiml_problem(route.twiml)
            if reason:
                problems.append((f"{key}.twiml", reason))
        choice = choice_of(route, config)
        if isinstance(choice, AssistantChoice):
            carried = encode_decision(choice)
            if len(carried) > MAX_DECISION_CHARS:
                problems.append(
                    (key, f"its inline assistant and overrides take {len(carried)} characters "
                     f"compressed, over the {MAX_DECISION_CHARS} a call carries: save the "
                     "assistant in Vapi and name it with assistant_id")
                )
            if not choice.assistant_id and not choice.assistant and not (
                config.vapi.assistant_id or config.vapi.assistant
            ):
                problems.append(
                    (key, "gives the configured assistant, and vapi has none: set assistant_id")
                )
    secret = config.credentials.route_hook_secret
    if config.route_hook.url and secret and len(secret.reveal().encode()) < 16:
        problems.append(
            ("credentials.route_hook_secret", f"must be at least 16 bytes (from {secret.source})")
        )
    return problems


def route_main(path: str, *, to: str, caller: str, out: TextIO | None = None) -> int:
    """``voicebridge route --to N [--from N]``: the route a call would take and why (0),
    or the configuration's problems (2), as ``check-config`` prints them."""
    out = sys.stdout if out is None else out
    try:
        config = load_config(path, require_complete=False)
    except ConfigError as exc:
        print(f"voicebridge: config error: {exc}", file=sys.stderr)
        for note in getattr(exc, "__notes__", ()):
            print(f"voicebridge: config error: {note}", file=sys.stderr)
        return 2
    for line in Router(config).explain(to=to, caller=caller):
        print(line, file=out)
    return 0
