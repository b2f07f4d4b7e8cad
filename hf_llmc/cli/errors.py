"""Errors on the command line: the Python messages, with parameters shown as the flags of the
command that ran (``seq_len=0`` -> ``--seq-len 0``, ``allow_extrapolation=True`` ->
``--allow-extrapolation``), one line, tokens redacted."""

from __future__ import annotations

import argparse
import re

from ..config.security import redact


def option_flags(parser: argparse.ArgumentParser, command: str | None) -> dict[str, str]:
    """``{dest: --flag}`` for ``command``'s options, then every other command's (first wins)."""
    subparsers = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    chosen = [subparsers.choices[command]] if subparsers and command in subparsers.choices else []
    others = list(subparsers.choices.values()) if subparsers else []
    flags: dict[str, str] = {}
    for sub in chosen + others:
        for action in sub._actions:
            long = [o for o in action.option_strings if o.startswith("--")]
            if long and action.dest not in flags:
                flags[action.dest] = long[0]
    return flags


_VALUE = r"('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|[^\s,;:)\]]*)"


def as_flags(message: str, flags: dict[str, str]) -> str:
    """Rewrite ``name=value`` mentions of known parameters (and a leading ``name:``) as flags."""
    if not flags:
        return message
    names = "|".join(sorted(map(re.escape, flags), key=len, reverse=True))

    def flag(match: re.Match) -> str:
        name, value = match.group(1), match.group(2)
        if value == "True":
            return flags[name]
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        return f"{flags[name]} {value}" if value else flags[name]

    message = re.sub(rf"(?<![\w.-])({names})={_VALUE}", flag, message)
    return re.sub(rf"^({names}):", lambda m: f"{flags[m.group(1)]}:", message)


def cli_message(err: BaseException, parser: argparse.ArgumentParser, command: str | None) -> str:
    """The one-line message the command line prints for ``err`` (flags, no token)."""
    text = str(err).strip()
    first = text.splitlines()[0] if text else type(err).__name__
    return redact(as_flags(first, option_flags(parser, command)))
