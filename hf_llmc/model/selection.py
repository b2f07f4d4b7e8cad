"""Layer specs resolved against one model: named :class:`Group` values of explicit parameter names.

A spec (``attn.0-3,mlp.7``, ``block.*``, ``re:<regex>``; parsed by
:func:`hf_llmc.config.spec.parse_spec`) resolves, for one
:class:`~hf_llmc.model.architecture.Architecture`, to an ordered list of groups.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..config.errors import SpecError
from ..config.spec import BLOCK_KINDS, GLOBAL_KINDS, SpecItem, format_spec, parse_spec
from .architecture import Architecture

@dataclass(frozen=True)
class Group:
    """A named set of parameters moved together (``attn.3``, ``block.0``, ``embed``, ``re:...``).

    ``first_block`` is the earliest decoder block the group touches: None when it touches the
    embeddings (everything must be recomputed), ``num_blocks`` when only the final norm / head.
    """

    name: str
    kind: str
    blocks: tuple[int, ...]
    parameters: tuple[str, ...]
    numel: int
    first_block: int | None

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "block": self.blocks[0] if len(self.blocks) == 1 else None,
            "blocks": list(self.blocks),
            "parameters": list(self.parameters),
            "numel": self.numel,
        }


def _block_indices(item: SpecItem, n: int) -> list[int]:
    if item.start is None:
        return list(range(n))
    lo = item.start + n if item.start < 0 else item.start
    hi = item.end + n if item.end < 0 else item.end
    valid = f"the model has {n} blocks (0-{n - 1})"
    for raw, idx in ((item.start, lo), (item.end, hi)):
        if not 0 <= idx < n:
            raise SpecError(f"{item}: block {raw} is out of range; {valid}")
    if lo > hi:
        raise SpecError(f"{item}: reversed range ({lo} > {hi}); write {item.kind}.{hi}-{lo}")
    return list(range(lo, hi + 1))


def make_group(arch: Architecture, name: str, kind: str, parameters: list[str]) -> Group:
    """Build a group from explicit names (deduplicated, tied aliases folded into one tensor)."""
    seen: dict[str, None] = {}
    for p in parameters:
        seen.setdefault(p, None)
    names = tuple(seen)
    canon = {arch.canonical(p) for p in names}
    blocks_touched = [arch.block_of(p) for p in names]
    in_blocks = sorted({b for b in blocks_touched if b is not None and b < arch.num_blocks})
    first = None if any(b is None for b in blocks_touched) else min(blocks_touched, default=None)
    return Group(
        name=name,
        kind=kind,
        blocks=tuple(in_blocks),
        parameters=names,
        numel=sum(arch.numel[c] for c in canon),
        first_block=first,
    )


def block_group(arch: Architecture, kind: str, index: int) -> Group:
    """Group ``kind.index`` (kind in block, attn, mlp, norm)."""
    if kind == "block":  # model order
        prefix = f"{arch.block_prefix}.{index}."
        names = [p for p in arch.parameters if p.startswith(prefix)]
    else:
        names = arch.blocks[index][kind]
    return make_group(arch, f"{kind}.{index}", kind, names)


def global_group(arch: Architecture, kind: str) -> Group:
    names = {"embed": arch.embed, "final_norm": arch.final_norm, "head": arch.head}[kind]
    return make_group(arch, kind, kind, names)


def resolve(spec: str | list[SpecItem], arch: Architecture) -> list[Group]:
    """Resolve a spec to ordered, de-duplicated groups; ``ValueError`` if it selects nothing."""
    items = parse_spec(spec) if isinstance(spec, str) else spec
    groups: dict[str, Group] = {}
    for item in items:
        if item.kind == "re":
            rx = re.compile(item.pattern)
            every = arch.parameters + list(arch.aliases)
            names = [p for p in every if rx.search(p)]
            if not names:
                raise SpecError(f"re:{item.pattern}: matches no parameter name")
            groups.setdefault(str(item), make_group(arch, str(item), "re", names))
        elif item.kind in GLOBAL_KINDS:
            group = global_group(arch, item.kind)
            if not group.parameters:
                raise SpecError(f"{item}: this model ({arch.model_class}) has no {item.kind} parameters")
            groups.setdefault(group.name, group)
        else:
            for i in _block_indices(item, arch.num_blocks):
                group = block_group(arch, item.kind, i)
                if not group.parameters:
                    continue
                groups.setdefault(group.name, group)
    if not groups:
        raise SpecError(f"{format_spec(items)}: selects no parameters")
    return list(groups.values())


def union(groups: list[Group], arch: Architecture, name: str | None = None) -> Group:
    """One group holding every parameter of ``groups`` (moved together)."""
    names = [p for g in groups for p in g.parameters]
    kinds = {g.kind for g in groups}
    return make_group(arch, name or ",".join(g.name for g in groups), kinds.pop() if len(kinds) == 1 else "set", names)


def all_groups(arch: Architecture) -> list[Group]:
    """Every addressable group (the table of ``hf-llmc layers``), in model order."""
    out = [global_group(arch, "embed")] if arch.embed else []
    for i in range(arch.num_blocks):
        out.append(block_group(arch, "block", i))
        out.extend(block_group(arch, k, i) for k in BLOCK_KINDS if arch.blocks[i][k])
    out.extend(global_group(arch, k) for k in ("final_norm", "head") if getattr(arch, k))
    return out
