"""How settings dataclasses describe themselves: one ``help`` text per field (shared by the API
docs, the command line and the recipe schema) and choices typed as ``Literal[...]``."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, get_args, get_origin


def setting(default: Any = dataclasses.MISSING, help: str = "", *, cli: bool = True, recipe: bool = True,
            default_factory: Any = dataclasses.MISSING, flag: str | None = None) -> Any:
    """A dataclass field with its help text, shared by the API docs, the command line and recipes.

    Args:
        default: the field's default value (omit for a required field).
        help: one-line description of the setting.
        cli: False keeps the field off the command line (set from Python or recipes only).
        recipe: False keeps the field out of recipes.
        default_factory: a factory for a mutable default (used instead of ``default``).
        flag: the command-line option, when it is not ``--`` + the field name with dashes.

    Returns:
        A :func:`dataclasses.field` whose metadata holds ``help`` (and ``cli`` / ``recipe`` when False,
        ``flag`` when given).
    """
    metadata = {"help": help}
    if flag is not None:
        metadata["flag"] = flag
    if not cli:
        metadata["cli"] = False
    if not recipe:
        metadata["recipe"] = False
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def without_none(tp: Any) -> Any:
    """A type without its ``None`` member, to read the type of an optional field.

    Args:
        tp: a type annotation.

    Returns:
        ``X`` for ``X | None``, the union of the other members for a larger union; ``tp`` unchanged otherwise.
    """
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else typing.Union[tuple(args)]
    return tp


def choices(tp: Any) -> tuple | None:
    """The allowed values of a ``Literal[...]`` type, for validation and command-line choices.

    Args:
        tp: a type annotation, e.g. ``Literal["a", "b"] | None``.

    Returns:
        The ``Literal``'s values (also inside ``| None``), or None for any other type.
    """
    tp = without_none(tp)
    if get_origin(tp) is Literal:
        return get_args(tp)
    return None


def field_choices(cls: type, name: str) -> tuple | None:
    """The ``Literal`` choices of one dataclass field.

    Args:
        cls: a settings dataclass.
        name: the field's name.

    Returns:
        The allowed values, or None when the field is not a ``Literal``.
    """
    return choices(typing.get_type_hints(cls)[name])


def check_choice(cls: type, obj: Any, name: str, error: type[Exception]) -> None:
    """Refuse a field value outside its ``Literal`` choices, with a one-line message naming the field.

    Args:
        cls: the settings dataclass that declares the field.
        obj: the settings object to check.
        name: the field's name.
        error: the exception class raised (e.g. :class:`~hf_llmc.config.errors.ScanError`).

    Raises:
        error: the value is not None and not one of the choices.
    """
    allowed = field_choices(cls, name)
    value = getattr(obj, name)
    if allowed is not None and value is not None and value not in allowed:
        raise error(f"{name}={value!r}: use one of {', '.join(map(str, allowed))}")


def flag_of(f: dataclasses.Field) -> str:
    """The command-line option of a settings field.

    Args:
        f: a field of a settings dataclass.

    Returns:
        Its ``flag``, else ``--`` + the field name with dashes.
    """
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def option_argv(cfg: Any, *, exclude: tuple[str, ...] = ()) -> list[str]:
    """The command-line options that reproduce ``cfg``, one per field that differs from its default.

    The inverse of how the command line builds settings from their fields.

    Args:
        cfg: a settings dataclass instance.
        exclude: fields to leave out (e.g. ones the caller writes itself).

    Returns:
        ``[flag]`` for a true boolean, ``[flag, str(value)]`` otherwise, in field order; fields kept off
        the command line are skipped.
    """
    argv: list[str] = []
    for f in dataclasses.fields(cfg):
        if f.name in exclude or f.metadata.get("cli") is False:
            continue
        value = getattr(cfg, f.name)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if value == default:
            continue
        argv += [flag_of(f)] if value is True else [flag_of(f), str(value)]
    return argv
