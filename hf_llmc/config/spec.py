"""The layer selection grammar, parsed without a model: ``KIND.RANGE[,KIND.RANGE...]`` or
``re:<regex>``.

``KIND`` is one of :data:`KINDS`; ``RANGE`` is ``i``, ``i-j`` (inclusive), ``*`` or negative
indices from the end. :func:`parse_spec` and :func:`format_spec` round-trip; resolving a spec
against one model's architecture is :func:`hf_llmc.model.selection.resolve`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import SpecError

#: Every kind of group a spec can name, in the order `hf-llmc layers` lists them.
KINDS = ("block", "attn", "mlp", "norm", "embed", "final_norm", "head")
#: Kinds that live inside each decoder block.
BLOCK_KINDS = ("attn", "mlp", "norm")
#: Kinds outside the decoder blocks (they take no block range).
GLOBAL_KINDS = ("embed", "final_norm", "head")
_RANGE = re.compile(r"^(-?\d+)(?:-(-?\d+))?$")


@dataclass(frozen=True)
class SpecItem:
    """One comma-separated item of a layer spec, as parsed by :func:`parse_spec`.

    Attributes:
        kind: one of :data:`KINDS`, or ``"re"`` for a regular expression.
        start: first block (inclusive, may be negative = from the end); None = every block.
        end: last block (inclusive, may be negative); None with ``start`` set = ``start`` only.
        pattern: the regular expression when ``kind == "re"``.
    """

    kind: str
    start: int | None = None
    end: int | None = None
    pattern: str | None = None

    def __str__(self) -> str:
        if self.kind == "re":
            return f"re:{self.pattern}"
        if self.kind in GLOBAL_KINDS:
            return self.kind
        if self.start is None:
            return f"{self.kind}.*"
        if self.end is None or self.end == self.start:
            return f"{self.kind}.{self.start}"
        return f"{self.kind}.{self.start}-{self.end}"


def parse_spec(spec: str) -> list[SpecItem]:
    """Parse a layer spec.

    Args:
        spec: e.g. ``"attn.0-3,mlp.7"``, ``"block.*"``, ``"embed"`` or ``"re:.*attn.*"``.

    Returns:
        One :class:`SpecItem` per comma-separated item (one for a regex).

    Raises:
        SpecError: an empty spec, an unknown kind, a bad range or a bad regular expression;
            the one-line message names the offending item.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise SpecError("empty layer spec; expected e.g. 'attn.0-3' or 're:<regex>'")
    spec = spec.strip()
    if spec.startswith("re:"):
        pattern = spec[3:]
        if not pattern:
            raise SpecError("re: needs a regular expression, e.g. 're:.*attn.*'")
        try:
            re.compile(pattern)
        except (re.error, RecursionError, OverflowError) as err:
            raise SpecError(f"re:{pattern}: bad regular expression ({err})") from None
        return [SpecItem("re", pattern=pattern)]
    items = []
    for raw in spec.split(","):
        part = raw.strip()
        if not part:
            raise SpecError(f"{spec}: empty item in the list")
        kind, dot, rng = part.partition(".")
        if kind not in KINDS:
            raise SpecError(f"{part}: unknown kind '{kind}' (valid: {', '.join(KINDS)}, re:<regex>)")
        if kind in GLOBAL_KINDS:
            if dot:
                raise SpecError(f"{part}: '{kind}' takes no block range")
            items.append(SpecItem(kind))
            continue
        if not dot or rng in ("", "*"):
            if dot and rng == "":
                raise SpecError(f"{part}: missing block range after '.' (e.g. {kind}.0-3 or {kind}.*)")
            items.append(SpecItem(kind))
            continue
        match = _RANGE.match(rng)
        if not match:
            raise SpecError(f"{part}: bad block range '{rng}' (use i, i-j, * or negative indices)")
        start = int(match.group(1))
        end = int(match.group(2)) if match.group(2) is not None else start
        items.append(SpecItem(kind, start, end))
    return items


def format_spec(items: list[SpecItem]) -> str:
    """Write parsed spec items back as a spec, the inverse of :func:`parse_spec`.

    Args:
        items: the items, e.g. from :func:`parse_spec`.

    Returns:
        The comma-separated spec, e.g. ``"attn.0-3,mlp.7"``.
    """
    return ",".join(str(item) for item in items)
