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

    Attributes:
        name: the group's name, a layer spec item (``attn.3``) or a comma-joined list for a union.
        kind: ``block``, ``attn``, ``mlp``, ``norm``, ``embed``, ``final_norm``, ``head``, ``re``,
            ``full``, ``set`` (a union of several kinds) or ``module``.
        blocks: the decoder blocks the group touches, sorted.
        parameters: the parameter names, in the order given, without duplicates.
        numel: number of elements (tied aliases counted once).
        first_block: the earliest decoder block the group touches: None when it touches the
            embeddings (everything must be recomputed), ``num_blocks`` when only the final norm / head.
    """

    name: str
    kind: str
    blocks: tuple[int, ...]
    parameters: tuple[str, ...]
    numel: int
    first_block: int | None

    def to_dict(self) -> dict:
        """The group as JSON-ready data (for ``hf-llmc layers --json`` and result files).

        Returns:
            ``name``, ``kind``, ``block`` (the single block, else None), ``blocks``, ``parameters``, ``numel``.
        """
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
    """A group of explicitly named parameters, with the blocks and element count it covers.

    Args:
        arch: the model's architecture.
        name: the group's name.
        kind: the group's kind (see :class:`Group`).
        parameters: parameter names (aliases allowed); duplicates are dropped.

    Returns:
        The group; tied aliases count once in ``numel``.
    """
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
    """The group ``kind.index`` of one decoder block.

    Args:
        arch: the model's architecture.
        kind: ``block`` (every parameter of the block, in model order), ``attn``, ``mlp`` or ``norm``.
        index: the block index (0-based, non-negative).

    Returns:
        The group (with no parameters when the block has none of that kind).
    """
    if kind == "block":  # model order
        prefix = f"{arch.block_prefix}.{index}."
        names = [p for p in arch.parameters if p.startswith(prefix)]
    else:
        names = arch.blocks[index][kind]
    return make_group(arch, f"{kind}.{index}", kind, names)


def global_group(arch: Architecture, kind: str) -> Group:
    """The group of the parameters outside the decoder blocks of one kind.

    Args:
        arch: the model's architecture.
        kind: ``embed``, ``final_norm`` or ``head``.

    Returns:
        The group (with no parameters when the model has none of that kind).
    """
    names = {"embed": arch.embed, "final_norm": arch.final_norm, "head": arch.head}[kind]
    return make_group(arch, kind, kind, names)


def resolve(spec: str | list[SpecItem], arch: Architecture) -> list[Group]:
    """The groups a layer spec selects in one model, in spec order, without duplicates.

    Args:
        spec: a layer spec (``"attn.0-3,mlp.7"``, ``"block.*"``, ``"re:<regex>"``) or its parsed items.
        arch: the model's architecture.

    Returns:
        One group per selected ``kind.index`` (block kinds without parameters are skipped), per
        global kind, or one group for a regular expression.

    Raises:
        SpecError: a malformed spec, a block out of range, a reversed range, a regex or global kind
            that matches no parameter, or a spec that selects nothing.
    """
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
    """One group holding every parameter of several groups, so they move together.

    Args:
        groups: the groups to join.
        arch: the model's architecture.
        name: the group's name (default: the groups' names joined by commas).

    Returns:
        The union; its kind is the groups' common kind, else ``set``.
    """
    names = [p for g in groups for p in g.parameters]
    kinds = {g.kind for g in groups}
    return make_group(arch, name or ",".join(g.name for g in groups), kinds.pop() if len(kinds) == 1 else "set", names)


def all_groups(arch: Architecture) -> list[Group]:
    """Every addressable group of a model (the table of ``hf-llmc layers``), in model order.

    Args:
        arch: the model's architecture.

    Returns:
        ``embed``, then per block ``block.i`` and its ``attn`` / ``mlp`` / ``norm`` groups that have
        parameters, then ``final_norm`` and ``head`` (each global group only when the model has it).
    """
    out = [global_group(arch, "embed")] if arch.embed else []
    for i in range(arch.num_blocks):
        out.append(block_group(arch, "block", i))
        out.extend(block_group(arch, k, i) for k in BLOCK_KINDS if arch.blocks[i][k])
    out.extend(global_group(arch, k) for k in ("final_norm", "head") if getattr(arch, k))
    return out
