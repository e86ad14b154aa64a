"""Plain dicts (JSON, TOML) to trees of frozen dataclasses and back, checked against the type hints.

`build(kind, data)` makes dataclass `kind` from a dict that may leave fields out (they keep their
defaults). Each value is checked against the field's type hint: bool, int, float (an int is
accepted), str, a Literal (its values' type; the dataclass's own check decides membership),
``X | None``, ``tuple[X, ...]`` (from a list) and nested dataclasses (from nested dicts). A wrong
key, a missing required field or a wrong type is an `InputError` (a ValueError) naming its path,
e.g. ``recipe.losses has no setting 'gard'``; a dataclass's own ``__post_init__`` checks the values.

`merge(base, *layers)` lays partial dicts over a base, nested dicts key by key; in a layer, None
means "not given". `plain(tree)` is the inverse of `build`: nested dicts with lists, JSON-safe.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeVar, Union

from bsafuse.errors import InputError

T = TypeVar("T")


def build(kind: type[T], data: object, *, where: str = "") -> T:
    """Dataclass `kind` from `data`; `where` is its path in messages (e.g. "recipe"; "": the root)."""
    if not isinstance(data, Mapping):
        raise InputError(f"{where or 'a config'} must be a table of settings, got {data!r}")
    hints = typing.get_type_hints(kind)
    fields = {f.name: f for f in dataclasses.fields(kind) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise InputError(
            f"{where or 'the config'} has no setting {', '.join(map(repr, unknown))}; "
            f"its settings are {', '.join(fields)}"
        )
    for name, f in fields.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and name not in data:
            raise InputError(f"{_join(where, name)} is missing")
    values = {key: convert(hints[key], value, where=_join(where, key)) for key, value in data.items()}
    try:
        return kind(**values)
    except InputError:
        raise
    except ValueError as exc:  # the dataclass's own check, e.g. LossWeights.grad must be >= 0
        raise InputError(f"{where}: {exc}" if where else str(exc)) from None


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def convert(hint: Any, value: object, *, where: str) -> Any:
    """`value` as the type `hint` describes, or InputError."""
    if dataclasses.is_dataclass(hint):
        return build(hint, value, where=where)  # type: ignore[arg-type]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = (a for a in args if a is not type(None))
        return convert(inner, value, where=where)
    if origin is Literal:
        return convert(type(args[0]), value, where=where)
    if origin is tuple:
        if isinstance(value, str | bytes) or not isinstance(value, Sequence):
            raise InputError(f"{where} must be a list, got {value!r}")
        return tuple(convert(args[0], v, where=f"{where}[{i}]") for i, v in enumerate(value))
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, bool):
        raise InputError(f"{where} must be an integer, got {value!r}")
    if hint in (bool, int, str) and isinstance(value, hint):
        return value
    want = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if hint not in want:
        raise TypeError(f"{where}: no conversion to {hint!r}")  # a field type this module lacks
    raise InputError(f"{where} must be {want[hint]}, got {value!r}")


def merge(base: Mapping[str, Any], *layers: Mapping[str, Any] | None) -> dict[str, Any]:
    """`base` with each layer laid over it in turn; nested dicts merge, None in a layer is skipped."""
    merged = dict(base)
    for layer in layers:
        for key, value in (layer or {}).items():
            if value is None:
                continue
            below = merged.get(key)
            if isinstance(value, Mapping):  # None inside it is skipped too
                merged[key] = merge(below if isinstance(below, Mapping) else {}, value)
            else:
                merged[key] = value
    return merged


def plain(tree: Any) -> Any:
    """A dataclass tree as nested dicts, with lists for tuples (safe for JSON and checkpoints)."""
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        return {f.name: plain(getattr(tree, f.name)) for f in dataclasses.fields(tree)}
    if isinstance(tree, Mapping):
        return {k: plain(v) for k, v in tree.items()}
    if isinstance(tree, tuple | list):
        return [plain(v) for v in tree]
    return tree
