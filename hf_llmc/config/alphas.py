"""α values: the grid of a barrier curve (``"0,0.25,0.5"`` or a count) and the α of a merge
(a number, ``START:END`` for a gradient over the selected blocks, or anchors ``A0,A1,...`` spread
piecewise linearly over them as mergekit does). 0 is A, 1 is B."""

from __future__ import annotations

import math
from dataclasses import dataclass

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


@dataclass(frozen=True)
class ItemAlpha:
    """The α of one merge item: one number, a ``START:END`` gradient or a list of anchors.

    Attributes:
        values: ``(α,)``, ``(START, END)`` or the anchors ``(A0, A1, ...)``.
        anchors: True for the list form ``A0,A1,...`` (mergekit's gradient list).
    """

    values: tuple[float, ...]
    anchors: bool = False

    @property
    def constant(self) -> float | None:
        """The α when it is one number, else None."""
        return self.values[0] if len(self.values) == 1 else None

    def block_values(self, n: int) -> list[float]:
        """α of the ``i``-th of ``n`` selected decoder blocks, in block order.

        ``START:END`` runs linearly (``START + (END - START)·i/(n-1)``; one block gets START).
        Anchors are spread as mergekit spreads a gradient list over the layers of a slice: block i
        sits at t = i/(n-1) (t = 1 for a single block), between anchors ``k = ⌊t·(m-1)⌋`` and
        ``k+1`` with weight ``f = t·(m-1) - k``: ``(1-f)·A_k + f·A_{k+1}``.

        Args:
            n: the number of selected blocks.

        Returns:
            ``n`` values.
        """
        if not self.anchors:
            if len(self.values) == 1:
                return [self.values[0]] * n
            start, end = self.values
            return [start + (end - start) * (i / (n - 1) if n > 1 else 0.0) for i in range(n)]
        return [anchor_value(self.values, i / (n - 1) if n > 1 else 1.0) for i in range(n)]

    @property
    def before_blocks(self) -> float:
        """α of selected tensors before the decoder blocks (embeddings): the first value."""
        return self.values[0]

    @property
    def after_blocks(self) -> float:
        """α of selected tensors after the blocks (final norm, head).

        END of a ``START:END`` gradient; the first anchor of a list (mergekit evaluates them at t = 0).
        """
        return self.values[0] if self.anchors else self.values[-1]

    def __str__(self) -> str:
        sep = "," if self.anchors else ":"
        return sep.join(format_number(v) for v in self.values)


def anchor_value(anchors: tuple[float, ...] | list[float], t: float) -> float:
    """mergekit's value of a gradient list at ``t`` in [0, 1] (piecewise linear between anchors).

    Args:
        anchors: the list's values (at least one).
        t: the position, 0 = first anchor, 1 = last.

    Returns:
        ``(1-f)·A_k + f·A_{k+1}`` with ``k = int(t·(m-1))``, ``f = t·(m-1) - k`` (the last
        anchor repeats past the end), computed in this order in double precision.
    """
    scaled = t * (len(anchors) - 1)
    k = int(scaled)
    k1 = min(len(anchors) - 1, k + 1)
    frac = scaled - k
    return (1 - frac) * anchors[k] + frac * anchors[k1]


def parse_item_alpha(value: str | float | int | list | tuple, *, allow_extrapolation: bool = False,
                     what: str = "alpha") -> ItemAlpha:
    """Parse the α of a merge item: a number, ``START:END`` or anchors ``A0,A1,...``.

    Args:
        value: ``0.5``, ``"0.1:0.9"``, ``"0,0.5,1"`` or a sequence of numbers (anchors).
        allow_extrapolation: accept values outside [0, 1].
        what: the option named in error messages.

    Returns:
        The parsed α.

    Raises:
        MergeSpecError: not one of these forms, or a value outside [0, 1].
    """
    if isinstance(value, (list, tuple)) or (isinstance(value, str) and "," in value):
        raw = list(value) if isinstance(value, (list, tuple)) else value.split(",")
        if isinstance(value, str) and ":" in value:
            raise MergeSpecError(f"{what}={value!r}: use either START:END or anchors A0,A1,... (e.g. 0,0.5,1)")
        try:
            if any(isinstance(v, bool) for v in raw):
                raise ValueError
            anchors = tuple(float(v) for v in raw)
        except (TypeError, ValueError):
            raise MergeSpecError(f"{what}={value!r}: expected anchors A0,A1,... (numbers, e.g. 0,0.5,1)") from None
        if len(anchors) < 2:
            raise MergeSpecError(f"{what}={value!r}: a gradient list needs at least two anchors")
        for v in anchors:
            check_alpha(v, allow_extrapolation=allow_extrapolation, what=what, error=MergeSpecError)
        return ItemAlpha(anchors, anchors=True)
    start, end = parse_alpha(value, allow_extrapolation=allow_extrapolation, what=what)
    return ItemAlpha((start,) if end is None else (start, end))


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
