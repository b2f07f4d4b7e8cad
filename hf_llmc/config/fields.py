"""How settings dataclasses describe themselves: one ``help`` text per field (shared by the API
docs, the command line and the recipe schema) and choices typed as ``Literal[...]``."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, get_args, get_origin


def setting(default: Any = dataclasses.MISSING, help: str = "", *, cli: bool = True, recipe: bool = True,
            default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with its help text; ``cli=False`` / ``recipe=False`` keep it off the
    command line / out of recipes (set from Python only)."""
    metadata = {"help": help}
    if not cli:
        metadata["cli"] = False
    if not recipe:
        metadata["recipe"] = False
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def without_none(tp: Any) -> Any:
    """``X | None`` -> ``X`` (the first non-None member of a union); other types unchanged."""
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else typing.Union[tuple(args)]
    return tp


def choices(tp: Any) -> tuple | None:
    """The allowed values of a ``Literal[...]`` (also inside ``| None``), else None."""
    tp = without_none(tp)
    if get_origin(tp) is Literal:
        return get_args(tp)
    return None


def field_choices(cls: type, name: str) -> tuple | None:
    """The ``Literal`` choices of field ``name`` of dataclass ``cls``."""
    return choices(typing.get_type_hints(cls)[name])


def check_choice(cls: type, obj: Any, name: str, error: type[Exception]) -> None:
    """Raise ``error`` when ``obj.name`` is not one of the field's ``Literal`` choices."""
    allowed = field_choices(cls, name)
    value = getattr(obj, name)
    if allowed is not None and value is not None and value not in allowed:
        raise error(f"{name}={value!r}: use one of {', '.join(map(str, allowed))}")
