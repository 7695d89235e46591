"""Dataclasses filled from loosely typed mappings (YAML, JSON, `--set KEY=VALUE`): every
value is checked, and converted where the conversion is exact, by its field's type hint,
so each settings class reads its values the same way and a wrong one is refused with the
field's name and the value.

What each hint accepts (nothing else is guessed):

- `int`: an int, a float with an integral value (1e5), or a string holding one ("64",
  "1e5"); never a bool.
- `float`: an int or a float, kept as given (an int is a valid float in typing's numeric
  tower, and a later message then shows the value as it was written), or a string holding
  a number: PyYAML reads `1e-3` (no dot) as a string.
- `bool`: true or false only (not 0/1, not "yes").
- `str`: a string, or a path (`os.PathLike`) turned into its string.
- `list[X]`, `tuple[X, ...]`, `tuple[X, Y]`: a list or tuple (of that length for a fixed
  tuple), each item converted by its own hint; `dict[K, V]`: a mapping, keys and values
  converted.
- `X | None` and other unions: None where None is a member; else a value already of a
  member's type as it is, else the first member that converts it.
- a dataclass: an instance of it as it is, or a mapping read by `from_mapping`.
- `Literal[...]`: one of its values; `Any`: anything.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import os
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")

_SHOWN_CHARS = 120  # a value longer than this is cut in messages, so an error stays one line


class FieldError(ValueError):
    """A setting that does not fit its class: a value of the wrong kind (the message names
    the field and the value), an unknown or missing key, or not a mapping at all."""

    field: str | None = None  # the field (or item of one) whose value is wrong


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


def _wrong(name: str, value: Any, hint: Any) -> FieldError:
    error = FieldError(f"{name} must be {describe(hint)}, got {_shown(value)}")
    error.field = name
    return error


def describe(hint: Any) -> str:
    """A type hint as a reader writes it: `int | None`, `dict[str, float]`; a dataclass as
    the mapping it is read from."""
    if hint is type(None) or hint is None:
        return "None"
    if hint is Any:
        return "Any"
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(describe(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return f"tuple[{describe(args[0])}, ...]"
        return f"{name}[{', '.join(describe(a) for a in args)}]" if args else name
    if dataclasses.is_dataclass(hint):
        return f"a mapping of {hint.__name__} settings"
    return getattr(hint, "__name__", str(hint))


@functools.cache
def field_hints(cls: type) -> dict[str, Any]:
    """The resolved type hints of the dataclass `cls`'s init fields, in field order."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _to_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            value = float(value)  # "1e5"; a ValueError here is the caller's answer
    if isinstance(value, numbers.Real):
        as_float = float(value)
        if math.isfinite(as_float) and as_float.is_integer():
            return int(as_float)
    raise ValueError


def _to_float(value: Any) -> float | int:
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, numbers.Real):  # a NumPy scalar
        return float(value)
    if isinstance(value, str):
        return float(value)
    raise ValueError


def _to_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, os.PathLike):
        text = os.fspath(value)
        if isinstance(text, str):
            return text
    raise ValueError


_SCALARS = {int: _to_int, float: _to_float, str: _to_str}


def _is_instance(value: Any, hint: Any) -> bool:
    """True when `value` already has the plain (not generic) type `hint`; a bool is not an
    int or a float here."""
    if not isinstance(hint, type) or typing.get_origin(hint) is not None:
        return False
    if isinstance(value, bool) and hint is not bool:
        return False
    return isinstance(value, hint)


def coerce(value: Any, hint: Any, name: str) -> Any:
    """`value` checked and converted for a field `name` with type hint `hint` (see the
    module's list); `FieldError` names the field (or its item) and the value otherwise."""
    if hint is Any:
        return value
    if hint is type(None) or hint is None:
        if value is None:
            return None
        raise _wrong(name, value, hint)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        members = [a for a in args if a is not type(None)]
        if len(members) == 1:  # `X | None`: an item's error from X as it is
            try:
                if value is None:
                    raise _wrong(name, value, members[0])
                return coerce(value, members[0], name)
            except FieldError as exc:
                if exc.field == name:
                    raise _wrong(name, value, hint) from None
                raise
        for member in members:
            if _is_instance(value, member) and not dataclasses.is_dataclass(member):
                return value
        for member in members:
            try:
                return coerce(value, member, name)
            except FieldError:
                continue
        raise _wrong(name, value, hint)
    if origin is typing.Literal:
        if value in args:
            return value
        raise _wrong(name, value, hint)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _wrong(name, value, hint)
        if origin is list:
            item = args[0] if args else Any
            return [coerce(v, item, f"{name}[{i}]") for i, v in enumerate(value)]
        if not args or (len(args) == 2 and args[1] is Ellipsis):
            item = args[0] if args else Any
            return tuple(coerce(v, item, f"{name}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise _wrong(name, value, hint)
        return tuple(
            coerce(v, a, f"{name}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))
        )
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _wrong(name, value, hint)
        key_hint, value_hint = args if args else (Any, Any)
        return {coerce(k, key_hint, f"a key of {name}"): coerce(v, value_hint, f"{name}[{k!r}]")
                for k, v in value.items()}  # fmt: skip
    if origin is not None:
        raise TypeError(f"{name}: type hint {hint!r} is not one that settings are read by")
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if isinstance(value, Mapping):
            return from_mapping(hint, value, name)
        raise _wrong(name, value, hint)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _wrong(name, value, hint)
    if hint in _SCALARS:
        try:
            return _SCALARS[hint](value)
        except (ValueError, OverflowError):
            raise _wrong(name, value, hint) from None
    if isinstance(hint, type):
        if isinstance(value, hint):
            return value
        raise _wrong(name, value, hint)
    raise TypeError(f"{name}: type hint {hint!r} is not one that settings are read by")


def coerce_fields(instance: Any) -> None:
    """Every init field of the dataclass `instance` converted in place by its type hint
    (for `__post_init__`, so direct construction converts as `from_mapping` does)."""
    for name, hint in field_hints(type(instance)).items():
        value = getattr(instance, name)
        converted = coerce(value, hint, name)
        if converted is not value:
            setattr(instance, name, converted)


def unknown_keys(cls: type, data: Mapping[str, Any]) -> list[str]:
    """The keys of `data` that are not init fields of the dataclass `cls`, sorted."""
    return sorted(set(data) - set(field_hints(cls)), key=str)


def from_mapping(cls: type[T], data: Any, where: str) -> T:
    """An instance of the dataclass `cls` from the mapping `data`, every value converted by
    its field's hint. Unknown keys are refused with the known ones listed, missing required
    ones are named, and every error (the class's own checks too) starts with `where`."""
    if not isinstance(data, Mapping):
        raise FieldError(f"{where}: expected a mapping of settings, got {_shown(data)}")
    hints = field_hints(cls)
    unknown = unknown_keys(cls, data)
    if unknown:
        raise FieldError(f"{where}: unknown settings {unknown}; known: {list(hints)}")
    required = [f.name for f in dataclasses.fields(cls) if f.init
                and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]  # fmt: skip
    missing = [name for name in required if name not in data]
    if missing:
        raise FieldError(f"{where}: missing settings {missing}")
    try:
        # A nested settings class raises its own range checks' ValueError here too.
        values = {name: coerce(value, hints[name], name) for name, value in data.items()}
        return cls(**values)
    except FieldError as exc:
        raise FieldError(f"{where}: {exc}") from None
    except ValueError as exc:  # the class's own range checks
        raise ValueError(f"{where}: {exc}") from None
