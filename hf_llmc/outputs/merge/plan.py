"""The plan of a merge: a :class:`~hf_llmc.config.merge.MergeSpec` resolved against one
architecture, giving the α of every tensor it selects (the rest stays the base's).

A gradient ``START:END`` runs linearly over the decoder blocks an item selects, in block order;
embeddings take START, the final norm and head END. A gradient list ``A0,A1,...`` is spread over
those blocks as mergekit spreads it over a slice (:meth:`~hf_llmc.config.alphas.ItemAlpha.block_values`);
tensors outside the blocks take A0, as in mergekit. A later item wins where items overlap.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...config.merge import MergeSpec
from ...model.selection import Group, resolve


@dataclass
class PlanRow:
    """One resolved group of a merge spec and its α range."""

    group: str
    alpha_min: float
    alpha_max: float
    numel: int

    @property
    def alpha_text(self) -> str:
        return f"{self.alpha_min:g}" if self.alpha_min == self.alpha_max else f"{self.alpha_min:g}..{self.alpha_max:g}"


@dataclass
class MergePlan:
    """Canonical parameter name -> α for every tensor a spec selects (the rest is the base's)."""

    alphas: dict[str, float]
    rows: list[PlanRow]
    base: str
    method: str
    numel_total: int
    numel_changed: int
    groups: list[Group]
    lerp_ops: str = "plain"

    @property
    def fraction_changed(self) -> float:
        """Fraction of the model's parameters whose value differs from the base (α != base end)."""
        return self.numel_changed / self.numel_total if self.numel_total else 0.0

    def changed(self) -> dict[float, list[str]]:
        """α -> names that actually move away from the base (in model order)."""
        keep = 0.0 if self.base == "a" else 1.0
        out: dict[float, list[str]] = {}
        for name, alpha in self.alphas.items():
            if alpha != keep:
                out.setdefault(alpha, []).append(name)
        return out


def plan_merge(arch, spec: MergeSpec) -> MergePlan:
    """Resolve ``spec`` against ``arch``: α per canonical tensor, display rows, changed fraction.

    A gradient ``START:END`` runs linearly over the decoder blocks the item selects, in block
    order (a single block gets START); embeddings take START, the final norm and head END. A
    gradient list is spread as mergekit does (see the module's docstring).
    """
    per_name: dict[str, float] = {}
    rows: list[PlanRow] = []
    groups: list[Group] = []
    for layers, item in spec.entries():
        resolved = resolve(layers, arch)
        blocks = sorted({b for g in resolved for b in g.blocks})
        by_block = dict(zip(blocks, item.block_values(len(blocks))))
        for group in resolved:
            values = []
            for p in group.parameters:
                canon = arch.canonical(p)
                b = arch.block_of(canon)
                alpha = item.before_blocks if b is None else (item.after_blocks if b >= arch.num_blocks else by_block[b])
                per_name.pop(canon, None)  # a later item wins, and takes its place in the order below
                per_name[canon] = alpha
                values.append(alpha)
            rows.append(PlanRow(group.name, min(values), max(values), group.numel))
            groups.append(group)
    order = {name: i for i, name in enumerate(arch.parameters)}
    alphas = dict(sorted(per_name.items(), key=lambda kv: order.get(kv[0], len(order))))
    keep = 0.0 if spec.base == "a" else 1.0
    total = sum(arch.numel.values())
    changed = sum(arch.numel[n] for n, a in alphas.items() if a != keep)
    return MergePlan(alphas, rows, spec.base, spec.method, total, changed, groups, spec.lerp_ops)
