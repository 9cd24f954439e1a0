"""A strict check of a JSON value against one of vapi-server-sdk's pydantic types.

The SDK's models validate leniently on purpose (``extra="allow"``, every enum an
open ``Union[Literal[...], Any]``), so they accept almost anything. ``mismatches``
walks the type itself instead — ``model_fields`` with their aliases (the camelCase
wire names), ``Literal``, ``Union``, ``Annotated`` with Fern's ``UnionMetadata``
discriminant, lists, dicts and scalars — and reports, with a JSON path, every key the
type does not declare, every value outside a declared enum, every required key
missing and every value of the wrong JSON type. A type it has no rule for is a
``TypeError``: nothing passes unchecked.

``Holes`` names the few places where the SDK is known to be wrong (a key Vapi sends
or accepts that the SDK does not declare); each is allowed on one model only.
"""

from __future__ import annotations

import datetime
import enum
import functools
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Final

import pydantic
from attrs import frozen

from tests.contract.sdk import UnionMetadata

#: Keys the SDK lacks, per model class: ``{Model: {"wireKey": "why the SDK is wrong"}}``.
Holes = Mapping[type[pydantic.BaseModel], Mapping[str, str]]

_NONE: Final = type(None)


@frozen
class Mismatch:
    """One way a JSON value differs from the type: where, and how."""

    path: str
    problem: str

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


def mismatches(value: Any, annotation: Any, *, holes: Holes | None = None) -> list[Mismatch]:
    """Every way ``value`` (parsed JSON) differs from ``annotation`` (an SDK type); [] if none."""
    checker = _Checker(holes or {})
    checker.check(value, annotation, "$", host=None)
    return checker.found


def model_from_signature(
    name: str, function: Any, *, skip: Sequence[str] = ("self", "request_options")
) -> type[pydantic.BaseModel]:
    """A model of a request body the SDK only spells as keyword arguments.

    Each argument becomes an optional field whose alias is its camelCase wire name
    (as the SDK's own ``json={...}`` spells them), typed as the argument is.
    """
    hints = typing.get_type_hints(function, include_extras=True)
    fields: dict[str, Any] = {}
    for argument, hint in hints.items():
        if argument in skip or argument == "return":
            continue
        fields[argument] = (hint, pydantic.Field(default=None, alias=_camel(argument)))
    model: type[pydantic.BaseModel] = pydantic.create_model(
        name, __config__=pydantic.ConfigDict(defer_build=True), **fields
    )
    return model


def _camel(snake: str) -> str:
    head, *rest = snake.split("_")
    return head + "".join(part.capitalize() for part in rest)


def _json_type(value: Any) -> str:
    match value:
        case None:
            return "null"
        case bool():
            return "boolean"
        case int() | float():
            return "number"
        case str():
            return "string"
        case list():
            return "array"
        case dict():
            return "object"
    return type(value).__name__


class _Checker:
    def __init__(self, holes: Holes) -> None:
        self._holes = holes
        self.found: list[Mismatch] = []

    def _bad(self, path: str, problem: str) -> None:
        self.found.append(Mismatch(path, problem))

    def check(self, value: Any, annotation: Any, path: str, *, host: type | None) -> None:
        annotation = _resolve(annotation, host)
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            inner, *metadata = typing.get_args(annotation)
            discriminant = next(
                (item.discriminant for item in metadata if isinstance(item, UnionMetadata)), None
            )
            if discriminant is not None:
                self._check_tagged_union(value, inner, discriminant, path, host)
            else:
                self.check(value, inner, path, host=host)
            return
        if annotation is Any or annotation is object:
            return
        if annotation is _NONE:
            if value is not None:
                self._bad(path, f"expected null, got {_json_type(value)}")
            return
        if origin is typing.Literal:
            self._check_literal(value, typing.get_args(annotation), path)
            return
        if origin is typing.Union or origin is types.UnionType:
            self._check_union(value, typing.get_args(annotation), path, host)
            return
        if origin in (list, Sequence, typing.List, tuple, set, frozenset):  # noqa: UP006
            self._check_list(value, annotation, path, host)
            return
        if origin in (dict, Mapping, typing.Dict):  # noqa: UP006
            self._check_dict(value, annotation, path, host)
            return
        if isinstance(annotation, type):
            self._check_class(value, annotation, path)
            return
        raise TypeError(f"strict: no rule for {annotation!r} at {path}")

    # -- containers ----------------------------------------------------------------------

    def _check_list(self, value: Any, annotation: Any, path: str, host: type | None) -> None:
        if not isinstance(value, list):
            self._bad(path, f"expected array, got {_json_type(value)}")
            return
        args = typing.get_args(annotation)
        item_type = args[0] if args else Any
        for index, item in enumerate(value):
            self.check(item, item_type, f"{path}[{index}]", host=host)

    def _check_dict(self, value: Any, annotation: Any, path: str, host: type | None) -> None:
        if not isinstance(value, dict):
            self._bad(path, f"expected object, got {_json_type(value)}")
            return
        args = typing.get_args(annotation)
        value_type = args[1] if len(args) == 2 else Any
        for key, item in value.items():
            if not isinstance(key, str):
                self._bad(path, f"key {key!r} is not a string")
            self.check(item, value_type, f"{path}.{key}", host=host)

    # -- enums and unions ------------------------------------------------------------------

    def _check_literal(self, value: Any, allowed: tuple[Any, ...], path: str) -> None:
        # ``True == 1``: compare the JSON types too.
        if not any(value == option and type(value) is type(option) for option in allowed):
            shown = ", ".join(repr(option) for option in allowed[:8])
            more = f", … ({len(allowed)} values)" if len(allowed) > 8 else ""
            self._bad(path, f"{value!r} is not one of {shown}{more}")

    def _check_union(
        self, value: Any, members: tuple[Any, ...], path: str, host: type | None
    ) -> None:
        members = tuple(_resolve(member, host) for member in members)
        if value is None and _NONE in members:
            return
        members = tuple(member for member in members if member is not _NONE)
        literals = [m for m in members if typing.get_origin(m) is typing.Literal]
        if literals:
            # Fern's open enum, ``Union[Literal[...], Any]``: the Literal is what the
            # schema declares, so the ``Any`` beside it is dropped.
            members = tuple(m for m in members if m is not Any)
        if Any in members:
            return
        implicit = _implicit_tags(members)
        if implicit is not None and isinstance(value, dict) and "type" in value:
            matching = [m for m in members if value["type"] in implicit[m]]
            if not matching:
                known = sorted({tag for tags in implicit.values() for tag in tags})
                self._bad(f"{path}.type", f"{value['type']!r} is not one of {known}")
                return
            members = tuple(matching)
        self._first_fit(value, members, path, host)

    def _check_tagged_union(
        self, value: Any, union: Any, discriminant: str, path: str, host: type | None
    ) -> None:
        union = _resolve(union, host)
        members = tuple(m for m in typing.get_args(union) if m is not _NONE)
        if value is None and _NONE in typing.get_args(union):
            return
        if not isinstance(value, dict):
            self._bad(path, f"expected object, got {_json_type(value)}")
            return
        if discriminant not in value:
            self._bad(path, f"missing the discriminant {discriminant!r}")
            return
        tags = {member: _tag_values(member, discriminant) for member in members}
        matching = tuple(m for m in members if value[discriminant] in tags[m])
        if not matching:
            known = sorted({tag for values in tags.values() for tag in values})
            self._bad(f"{path}.{discriminant}", f"{value[discriminant]!r} is not one of {known}")
            return
        self._first_fit(value, matching, path, host)

    def _first_fit(
        self, value: Any, members: tuple[Any, ...], path: str, host: type | None
    ) -> None:
        """Pass if any member fits; else report the closest member's mismatches."""
        best: list[Mismatch] | None = None
        for member in members:
            trial = _Checker(self._holes)
            trial.check(value, member, path, host=host)
            if not trial.found:
                return
            if best is None or len(trial.found) < len(best):
                best = trial.found
        if best is None:
            self._bad(path, "no type to check against")
        elif len(members) == 1:
            self.found.extend(best)
        else:
            names = ", ".join(_name(member) for member in members)
            self._bad(path, f"fits none of {names}; the closest differs by:")
            self.found.extend(best)

    # -- classes ---------------------------------------------------------------------------

    def _check_class(self, value: Any, cls: type, path: str) -> None:
        if issubclass(cls, pydantic.BaseModel):
            self._check_model(value, cls, path)
        elif issubclass(cls, enum.Enum):
            self._check_literal(value, tuple(member.value for member in cls), path)
        elif cls is bool:
            if not isinstance(value, bool):
                self._bad(path, f"expected boolean, got {_json_type(value)}")
        elif cls is int:
            if isinstance(value, bool) or not isinstance(value, int):
                self._bad(path, f"expected integer, got {_json_type(value)}")
        elif cls is float:
            if isinstance(value, bool) or not isinstance(value, int | float):
                self._bad(path, f"expected number, got {_json_type(value)}")
        elif cls is str:
            if not isinstance(value, str):
                self._bad(path, f"expected string, got {_json_type(value)}")
        elif cls is datetime.datetime or cls is datetime.date:
            self._check_date(value, cls, path)
        elif cls is dict:
            self._check_dict(value, dict, path, None)
        elif cls is list:
            self._check_list(value, list, path, None)
        else:
            raise TypeError(f"strict: no rule for class {cls!r} at {path}")

    def _check_date(self, value: Any, cls: type, path: str) -> None:
        if not isinstance(value, str):
            self._bad(path, f"expected an ISO 8601 string, got {_json_type(value)}")
            return
        try:
            if cls is datetime.date:
                datetime.date.fromisoformat(value)
            else:
                datetime.datetime.fromisoformat(value)
        except ValueError:
            self._bad(path, f"{value!r} is not an ISO 8601 {cls.__name__}")

    def _check_model(self, value: Any, model: type[pydantic.BaseModel], path: str) -> None:
        if not isinstance(value, dict):
            self._bad(path, f"expected object ({model.__name__}), got {_json_type(value)}")
            return
        declared: set[str] = set()
        for key, annotation, required in _fields(model):
            declared.add(key)
            if key not in value:
                if required:
                    self._bad(path, f"missing required {key!r} ({model.__name__})")
                continue
            self.check(value[key], annotation, f"{path}.{key}", host=model)
        holes = self._holes.get(model, {})
        for key in value:
            if key not in declared and key not in holes:
                self._bad(f"{path}.{key}", f"unknown key ({model.__name__} declares no {key!r})")


@functools.cache
def _fields(model: type[pydantic.BaseModel]) -> tuple[tuple[str, Any, bool], ...]:
    """``(wire name, type, required)`` of each of ``model``'s fields.

    A field pydantic could not resolve when the class was made (its type names a class
    imported further down the SDK's module) is kept as a ``ForwardRef`` to its whole
    annotation, ``Annotated`` alias included: it is resolved here, and its wire name
    read from the ``pydantic.Field`` inside.
    """
    fields = []
    for name, info in model.model_fields.items():
        key = info.alias or name
        annotation = info.annotation
        metadata = list(info.metadata)
        if isinstance(annotation, typing.ForwardRef | str):
            annotation = _resolve(annotation, model)
            if typing.get_origin(annotation) is typing.Annotated:
                annotation, *extra = typing.get_args(annotation)
                metadata.extend(extra)
                aliases = [m.alias for m in extra if isinstance(m, pydantic.fields.FieldInfo)]
                key = next((alias for alias in aliases if alias), key)
        union_metadata = [item for item in metadata if isinstance(item, UnionMetadata)]
        if union_metadata:
            annotation = typing.Annotated[annotation, *union_metadata]
        fields.append((key, annotation, info.is_required()))
    return tuple(fields)


def _resolve(annotation: Any, host: type | None) -> Any:
    """A forward reference (``"CreateAssistantDto"``) looked up where ``host`` is defined."""
    if isinstance(annotation, str):
        annotation = typing.ForwardRef(annotation)
    if isinstance(annotation, typing.ForwardRef):
        module = sys.modules.get(host.__module__) if host is not None else None
        namespace = vars(module) if module is not None else {}
        try:
            return eval(annotation.__forward_arg__, namespace)  # the SDK's own type names
        except NameError:
            import vapi.types

            return getattr(vapi.types, annotation.__forward_arg__)
    return annotation


def _tag_values(member: Any, field: str) -> frozenset[Any]:
    """The values ``member``'s ``field`` may take (its Literal), or none."""
    if not (isinstance(member, type) and issubclass(member, pydantic.BaseModel)):
        return frozenset()
    info = next((i for n, i in member.model_fields.items() if (i.alias or n) == field), None)
    if info is None:
        return frozenset()
    return frozenset(_literal_values(info.annotation))


def _literal_values(annotation: Any) -> list[Any]:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return list(typing.get_args(annotation))
    if origin is typing.Union or origin is types.UnionType:
        return [v for arg in typing.get_args(annotation) for v in _literal_values(arg)]
    if origin is typing.Annotated:
        return _literal_values(typing.get_args(annotation)[0])
    return []


def _implicit_tags(members: tuple[Any, ...]) -> dict[Any, frozenset[Any]] | None:
    """For a union of message models each with a ``type`` Literal: their type values."""
    if len(members) < 2:
        return None
    tags = {member: _tag_values(member, "type") for member in members}
    return tags if all(tags.values()) else None


def _name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or repr(annotation)
