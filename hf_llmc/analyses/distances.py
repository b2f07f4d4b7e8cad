"""Distances between the two checkpoints (definitions in docs/design.md).

:func:`distances` gives, per group, ‖θB_G − θA_G‖, the relative distance ‖θB_G − θA_G‖ / ‖θA_G‖
and the cosine similarity of θA_G and θB_G. Tensors are streamed one at a time from the two lazy
checkpoints; no model is instantiated (the architecture comes from the cache, the table of known
families or a meta-device model).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from ..config.errors import NonFiniteTensorError, PairError, ScanError
from ..config.scan import GRANULARITIES, ScanConfig
from ..config.security import display_name
from ..model.architecture import Architecture
from ..model.checkpoint.fused import fused_pieces
from ..model.checkpoint.lazy import LazyCheckpoint
from ..model.pair import lazy_pair
from ..model.selection import Group, make_group, resolve
from .scan import build_plan

CHUNK = 1 << 22  # elements per streamed chunk (float64 arithmetic)


# -- distances --------------------------------------------------------------------------------------
@dataclass
class TensorMoments:
    """Sums over one tensor (float64): ‖a‖², ‖b‖², a·b and ‖b − a‖²."""

    sq_a: float = 0.0
    sq_b: float = 0.0
    dot: float = 0.0
    sq_diff: float = 0.0

    def add(self, other: "TensorMoments") -> None:
        self.sq_a += other.sq_a
        self.sq_b += other.sq_b
        self.dot += other.dot
        self.sq_diff += other.sq_diff


def tensor_moments(a: torch.Tensor, b: torch.Tensor) -> TensorMoments:
    """Moments of two same-shape tensors, in float64 chunks (bounded extra memory)."""
    if a.shape != b.shape:
        raise PairError(f"shape mismatch {tuple(a.shape)} vs {tuple(b.shape)}")
    fa, fb = a.reshape(-1), b.reshape(-1)
    out = TensorMoments()
    for i in range(0, fa.numel(), CHUNK):
        ca, cb = fa[i : i + CHUNK].double(), fb[i : i + CHUNK].double()
        out.sq_a += float(ca @ ca)
        out.sq_b += float(cb @ cb)
        out.dot += float(ca @ cb)
        d = cb - ca
        out.sq_diff += float(d @ d)
    return out


def distance_row(group: Group, moments: TensorMoments) -> dict:
    norm_a, norm_b, dist = math.sqrt(moments.sq_a), math.sqrt(moments.sq_b), math.sqrt(moments.sq_diff)
    return {
        "group": group.name,
        "kind": group.kind,
        "blocks": list(group.blocks),
        "numel": group.numel,
        "norm_a": norm_a,
        "norm_b": norm_b,
        "distance": dist,
        "relative_distance": dist / norm_a if norm_a > 0 else None,
        "cosine": moments.dot / (norm_a * norm_b) if norm_a > 0 and norm_b > 0 else None,
    }


def group_distances(arch: Architecture, ckpt_a: LazyCheckpoint, ckpt_b: LazyCheckpoint, groups: list[Group],
                    *, progress: bool = False) -> list[dict]:
    """Distance rows of ``groups``; every tensor is read once from each checkpoint.

    A block's fused parameters (MoE experts, :func:`hf_llmc.pair.fused_pieces`) count as one
    unit: their stored pieces' sums go to the first of them, so a group holds all or none."""
    names: dict[str, None] = {}
    for g in groups:
        for p in g.parameters:
            names.setdefault(arch.canonical(p), None)
    fused = list(fused_pieces(arch, ckpt_a).values())
    pieces = {block_names[0]: keys for block_names, keys in fused}
    for block_names, _ in fused:
        for g in groups:
            inside = {arch.canonical(p) for p in g.parameters} & set(block_names)
            if inside and inside != set(block_names):
                raise PairError(f"{g.name}: the fused tensors {', '.join(block_names)} are stored as shared pieces; "
                                "select all of them or none")
    per_tensor: dict[str, TensorMoments] = {}
    for name in names:
        if name in arch.fused:
            per_tensor[name] = TensorMoments()
            for key in pieces.get(name, []):
                per_tensor[name].add(tensor_moments(ckpt_a.get(key), ckpt_b.get(key)))
            continue
        a = ckpt_a.get(name, arch.aliases)
        b = ckpt_b.get(name, arch.aliases)
        try:
            per_tensor[name] = tensor_moments(a, b)
        except PairError as err:
            raise PairError(f"{name}: {err}") from None
        del a, b
        m = per_tensor[name]
        if not all(math.isfinite(v) for v in (m.sq_a, m.sq_b, m.dot, m.sq_diff)):  # never report a nan distance
            which = " and ".join(w for w, v in (("A", m.sq_a), ("B", m.sq_b)) if not math.isfinite(v)) or "A or B"
            raise NonFiniteTensorError(f"{name}: non-finite values (NaN/inf) in {which}; no distance is reported")
    rows = []
    for g in groups:
        total = TensorMoments()
        for name in dict.fromkeys(arch.canonical(p) for p in g.parameters):
            total.add(per_tensor[name])
        rows.append(distance_row(g, total))
    return rows


def plan_groups(arch: Architecture, layers: str | None = None, granularity: str = "block") -> list[Group]:
    """Groups named by a layer spec, else every group of a single scan at ``granularity``."""
    if layers:
        return resolve(layers, arch)
    return build_plan(arch, ScanConfig(granularity=granularity)).groups


def distances(
    a: str | os.PathLike,
    b: str | os.PathLike,
    *,
    granularity: str = "block",
    layers: str | None = None,
    revision_a: str | None = None,
    revision_b: str | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    token: str | bool | None = None,
) -> dict:
    """Per-group distances of two checkpoints (full model first); streamed, no model needed."""
    if granularity not in GRANULARITIES:
        raise ScanError(f"granularity={granularity!r}: use one of {', '.join(GRANULARITIES)}")
    pair = lazy_pair(a, b, revision_a=revision_a, revision_b=revision_b, trust_remote_code=trust_remote_code,
                     allow_pickle=allow_pickle, token=token)
    arch, ckpt_a, ckpt_b = pair.arch, pair.ckpt_a, pair.ckpt_b

    full = make_group(arch, "full", "full", arch.parameters)
    groups = [full] + plan_groups(arch, layers, granularity)
    return {
        "model_a": display_name(a),
        "model_b": display_name(b),
        "architecture": arch.model_class,
        "num_blocks": arch.num_blocks,
        "granularity": None if layers else granularity,
        "layers": layers,
        "groups": group_distances(arch, ckpt_a, ckpt_b, groups),
    }
