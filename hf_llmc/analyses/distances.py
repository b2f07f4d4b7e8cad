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
from ..config.scan import GRANULARITIES, Granularity, ScanConfig
from ..config.security import display_name
from ..model.architecture import Architecture
from ..model.checkpoint.fused import fused_pieces
from ..model.checkpoint.lazy import LazyCheckpoint
from ..model.pair import lazy_pair
from ..model.selection import Group, make_group, resolve
from ..model.vocab import VocabMap
from .scan import build_plan

CHUNK = 1 << 22  # elements per streamed chunk (float64 arithmetic)


# -- distances --------------------------------------------------------------------------------------
@dataclass
class TensorMoments:
    """Sums over one or more tensors (float64) from which norms, distance and cosine follow.

    Attributes:
        sq_a: ‖a‖².
        sq_b: ‖b‖².
        dot: a·b.
        sq_diff: ‖b − a‖².
    """

    sq_a: float = 0.0
    sq_b: float = 0.0
    dot: float = 0.0
    sq_diff: float = 0.0

    def add(self, other: "TensorMoments") -> None:
        """Add another tensor's sums (in place), to total a group.

        Args:
            other: the sums to add.
        """
        self.sq_a += other.sq_a
        self.sq_b += other.sq_b
        self.dot += other.dot
        self.sq_diff += other.sq_diff


def tensor_moments(a: torch.Tensor, b: torch.Tensor) -> TensorMoments:
    """The sums of two same-shape tensors, in float64 chunks so extra memory stays bounded.

    Args:
        a: A's tensor.
        b: B's tensor.

    Returns:
        ‖a‖², ‖b‖², a·b and ‖b − a‖².

    Raises:
        PairError: the shapes differ.
    """
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
    """One result row of :func:`distances`.

    Args:
        group: the group.
        moments: the group's summed moments.

    Returns:
        group, kind, blocks, numel, norm_a, norm_b, distance ‖θB_G − θA_G‖, relative_distance
        (distance / norm_a; None when norm_a is 0) and cosine (None when a norm is 0).
    """
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
                    vocab: VocabMap | None = None) -> list[dict]:
    """Distance rows of several groups; every tensor is read once from each checkpoint.

    A block's fused parameters (MoE experts, :func:`hf_llmc.model.checkpoint.fused.fused_pieces`)
    count as one unit: their stored pieces' sums go to the first of them, so a group holds all or none.

    Args:
        arch: the model's architecture.
        ckpt_a: A's checkpoint.
        ckpt_b: B's checkpoint.
        groups: the groups.
        vocab: the pair's row map when the vocabularies differ (:mod:`hf_llmc.model.vocab`): its
            tensors are compared in the union layout.

    Returns:
        One :func:`distance_row` per group, in order.

    Raises:
        PairError: a group holds only some of a block's fused tensors, or a tensor's shapes differ.
        NonFiniteTensorError: a tensor holds NaN or inf.
    """
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
        if vocab is not None and name in vocab.params:
            a, b = vocab.endpoints(a, b, vocab.params[name])
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


def plan_groups(arch: Architecture, layers: str | None = None, granularity: Granularity = "block") -> list[Group]:
    """The groups :func:`distances` reports: those of a layer spec, else a single scan's.

    Args:
        arch: the model's architecture.
        layers: a layer spec; None = every group of a single scan at ``granularity``.
        granularity: ``block``, ``sublayer`` or ``module`` (ignored with ``layers``).

    Returns:
        The groups.

    Raises:
        SpecError: a bad layer spec.
        ScanError: a bad granularity.
    """
    if layers:
        return resolve(layers, arch)
    return build_plan(arch, ScanConfig(granularity=granularity)).groups


def distances(
    a: str | os.PathLike,
    b: str | os.PathLike,
    *,
    granularity: Granularity = "block",
    layers: str | None = None,
    revision_a: str | None = None,
    revision_b: str | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    token: str | bool | None = None,
) -> dict:
    """Per-group distances between two checkpoints, streamed tensor by tensor without a model.

    Args:
        a: model A: a Hub id or a local folder.
        b: model B: a Hub id or a local folder.
        granularity: groups when ``layers`` is not given: ``block``, ``sublayer`` or ``module``.
        layers: a layer spec; each resolved group gets a row.
        revision_a: Hub revision of A.
        revision_b: Hub revision of B.
        trust_remote_code: run custom modelling code shipped with a checkpoint.
        allow_pickle: allow pickled ``.bin`` / ``.pt`` weights.
        token: Hub token (default: huggingface_hub's usual sources).

    Returns:
        ``model_a``, ``model_b``, ``architecture``, ``num_blocks``, ``granularity`` (None with
        ``layers``), ``layers`` and ``groups``: one :func:`distance_row` per group, the full model first.

    Raises:
        ScanError: a bad granularity.
        SpecError: a bad layer spec.
        CheckpointError: a checkpoint cannot be opened.
        PairError: the checkpoints are not compatible.
        NonFiniteTensorError: a tensor holds NaN or inf.
    """
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
        "groups": group_distances(arch, ckpt_a, ckpt_b, groups, pair.vocab),
    }
