"""α values: the grid of a barrier curve (``"0,0.25,0.5"`` or a count) and the α of a merge
(a number, or ``START:END`` for a gradient over the selected blocks). 0 is A, 1 is B."""

from __future__ import annotations

import math

from .errors import AlphaError, MergeSpecError

DEFAULT_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
#: An α grid as the API takes it: ``"0,0.25,0.5"``, a count (``5`` or ``"5"``) or a sequence of values.
AlphaGrid = str | int | list[float] | tuple[float, ...]
#: Most points on one path: each costs an evaluation of the whole data set.
MAX_ALPHAS = 1001


def parse_alphas(text: AlphaGrid, *, allow_extrapolation: bool = False, ensure_mid: bool = True) -> list[float]:
    """Parse an α grid into sorted unique floats.

    Args:
        text: ``"0,0.25,0.5"``, a count ``"N"`` (N evenly spaced points on [0, 1]) or a sequence.
        allow_extrapolation: accept values outside [0, 1].
        ensure_mid: add 0.5 (the point ``barrier_mid`` is read at).

    Returns:
        The α values, sorted and unique.

    Raises:
        AlphaError: an empty list, a value that is not a finite number, more than
            :data:`MAX_ALPHAS` points, or a value outside [0, 1] without extrapolation.
    """
    if isinstance(text, (list, tuple)):
        values = [float(v) for v in text]
    else:
        raw = str(text).strip()
        if not raw:
            raise AlphaError("alphas: empty list; give e.g. 0,0.25,0.5,0.75,1 or a count like 5")
        if raw.isdigit() and "," not in raw and int(raw) >= 2:
            n = int(raw)
            if n > MAX_ALPHAS:
                raise AlphaError(f"alphas={raw!r}: at most {MAX_ALPHAS} points (each is a full evaluation)")
            values = [i / (n - 1) for i in range(n)]
        else:
            try:
                values = [float(v) for v in raw.split(",")]
            except ValueError:
                raise AlphaError(f"alphas={raw!r}: not a comma-separated list of numbers or a count >= 2") from None
    if not values:
        raise AlphaError("alphas: empty list")
    if len(values) > MAX_ALPHAS:
        raise AlphaError(f"alphas: {len(values)} values; at most {MAX_ALPHAS} points (each is a full evaluation)")
    for v in values:
        check_alpha(v, allow_extrapolation=allow_extrapolation)
    if ensure_mid:
        values.append(0.5)
    return sorted(set(values))


def check_alpha(value: float, *, allow_extrapolation: bool = False, what: str = "alphas",
                error: type[ValueError] = AlphaError) -> None:
    """Refuse a non-finite α, and one outside [0, 1] unless extrapolation is allowed.

    Args:
        value: the α to check.
        allow_extrapolation: accept finite values outside [0, 1].
        what: the option named in the error message.
        error: the exception class raised.

    Raises:
        AlphaError: (or ``error``) naming ``what`` and the value.
    """
    if not math.isfinite(value):
        raise error(f"{what}: {value} is not a finite number")
    if not allow_extrapolation and not 0.0 <= value <= 1.0:
        raise error(f"alpha {value:g} is outside [0, 1]; pass allow_extrapolation=True to extrapolate")


def parse_alpha(value: str | float | int, *, allow_extrapolation: bool = False, what: str = "alpha") -> tuple[float, float | None]:
    """Parse the α of a merge item.

    Args:
        value: ``0.5`` (one α) or ``"0.1:0.9"`` (a linear gradient over the selected blocks).
        allow_extrapolation: accept values outside [0, 1].
        what: the option named in error messages.

    Returns:
        ``(start, None)`` for one α, ``(start, end)`` for a gradient.

    Raises:
        MergeSpecError: the value is not a number or ``START:END``, or lies outside [0, 1].
    """
    if isinstance(value, bool):
        raise MergeSpecError(f"{what}={value!r}: expected a number or START:END")
    if isinstance(value, (int, float)):
        parts = [float(value)]
    else:
        text = str(value).strip()
        try:
            parts = [float(p) for p in text.split(":")]
        except ValueError:
            raise MergeSpecError(f"{what}={text!r}: expected a number or START:END (e.g. 0.5 or 0.1:0.9)") from None
        if len(parts) not in (1, 2):
            raise MergeSpecError(f"{what}={text!r}: expected a number or START:END (e.g. 0.5 or 0.1:0.9)")
    for v in parts:
        check_alpha(v, allow_extrapolation=allow_extrapolation, what=what, error=MergeSpecError)
    return (parts[0], None) if len(parts) == 1 else (parts[0], parts[1])


def format_number(x: float) -> str:
    """The shortest text that reads back as exactly ``x``, so written specs reproduce the numbers.

    Args:
        x: the number.

    Returns:
        ``repr(float(x))`` without a trailing ``.0`` (``0.5``, ``1``, ``0.123456789``).
    """
    text = repr(float(x))
    return text[:-2] if text.endswith(".0") else text


def format_alpha(start: float, end: float | None) -> str:
    """Write the α of a merge item back as text, the exact inverse of :func:`parse_alpha`.

    Args:
        start: the α (or the gradient's first value).
        end: the gradient's last value; None for one constant α.

    Returns:
        ``"0.5"`` or ``"0.1:0.9"``.
    """
    return format_number(start) if end is None else f"{format_number(start)}:{format_number(end)}"
