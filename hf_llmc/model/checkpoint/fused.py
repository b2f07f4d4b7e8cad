"""Parameters transformers assembles from several stored tensors on load (fused MoE experts:
one parameter per block, stored one tensor per expert): which stored pieces make up which
parameters, and how to assemble them with transformers' own load-time converters."""

from __future__ import annotations

import math

import torch

from ...config.errors import PairError
from ..architecture import Architecture
from .lazy import LazyCheckpoint


def fused_pieces(arch: Architecture, ckpt: LazyCheckpoint) -> dict[int, tuple[list[str], list[str]]]:
    """``{block: (fused parameters, stored keys)}`` for the parameters transformers assembles
    from several stored tensors (``arch.fused``, e.g. MoE experts stored one tensor per expert).

    A block's pieces are its stored keys that belong to no parameter and lie under the fused
    parameters' module (``...experts.``); their element counts must add up to the fused
    parameters', else the layout is refused. Elementwise operations (lerp) on the pieces equal
    the same operations on the assembled tensors."""
    out: dict[int, tuple[list[str], list[str]]] = {}
    if not arch.fused:
        return out
    mapped = {ckpt.key_for(n, arch.aliases) for n in [*arch.parameters, *arch.aliases]} - {None}
    for name in arch.fused:
        block = arch.block_of(name)
        if block is None or block >= arch.num_blocks:
            raise PairError(f"{arch.model_class}: fused tensor {name} lies outside the decoder blocks; not supported")
        out.setdefault(block, ([], []))[0].append(name)
    word = arch.block_prefix.rsplit(".", 1)[-1]
    for block, (names, keys) in out.items():
        modules = {f".{n.rsplit('.', 2)[-2]}." for n in names}  # e.g. ".experts."
        keys.extend(k for k in ckpt.keys() if k not in mapped and f".{word}.{block}." in f".{k}"
                    and any(m in k for m in modules))
        if sum(math.prod(ckpt.shape(k)) for k in keys) != sum(arch.numel[n] for n in names):
            raise PairError(
                f"{arch.model_class}: cannot match the fused tensors of block {block} ({', '.join(names)}) to the "
                f"checkpoint's stored tensors; this layout is not supported"
            )
    return out


class FusedAssembler:
    """Builds the fused parameters (MoE experts) of one checkpoint from their stored pieces with
    transformers' own load-time converters: the operations ``from_pretrained`` applies, on one
    parameter at a time."""

    def __init__(self, model, arch: Architecture, ckpt: LazyCheckpoint):
        try:  # transformers-internal API (5.x): where a new release would break this
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import WeightRenaming, dot_natural_key, rename_source_key
        except ImportError as err:
            raise PairError(f"{arch.model_class}: fused tensors need transformers' conversion API ({err})") from None

        self.model, self.ckpt = model, ckpt
        conversions = get_model_conversion_mapping(model)
        renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
        converters = [c for c in conversions if not isinstance(c, WeightRenaming) and hasattr(c, "source_patterns")]
        self.by_pattern = {p: c for c in converters for p in c.source_patterns}
        self.sources: dict[str, list[tuple[str, str]]] = {}  # parameter -> [(stored key, pattern)]
        for _, keys in fused_pieces(arch, ckpt).values():
            for key in sorted(keys, key=dot_natural_key):  # expert 2 before expert 10, as transformers does
                target, pattern = rename_source_key(key, renamings, converters)
                if pattern in self.by_pattern:
                    self.sources.setdefault(target, []).append((key, pattern))
        unmatched = sorted(set(arch.fused) - set(self.sources))
        if unmatched:
            raise PairError(f"{arch.model_class}: no stored pieces found for the fused tensor {unmatched[0]}")

    def __call__(self, name: str) -> torch.Tensor:
        from copy import deepcopy

        sources = self.sources[name]
        converter = deepcopy(self.by_pattern[sources[0][1]])
        for key, pattern in sources:
            converter.add_tensor(name, key, pattern, self.ckpt.get(key))
        value = converter.convert(name, model=self.model, config=self.model.config)[name]
        return value[0] if isinstance(value, list) else value
