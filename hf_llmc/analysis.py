"""Distances between the two checkpoints and random-direction robustness (DESIGN.md).

* :func:`distances` — per group ‖θB_G − θA_G‖, the relative distance ‖θB_G − θA_G‖ / ‖θA_G‖ and
  the cosine similarity of θA_G and θB_G. Tensors are streamed one at a time from the two lazy
  checkpoints; no model is instantiated (the architecture comes from a meta-device model).
* :func:`run_robustness` — for each group G, a seeded Gaussian direction d_G rescaled to
  ‖d_G‖ = ‖θB_G − θA_G‖; the loss along θA + t·d_G is compared with the loss along the
  interpolation path θA + t·(θB_G − θA_G). Results use the scan's JSON-lines form
  (``direction`` "interp" / "random", ``sample``) and the scan's resumable runner.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from .architecture import Architecture
from .checkpoint import LazyCheckpoint, display_name
from .data import TokenBlocks
from .evaluation import BlockStats
from .scan import (GRANULARITIES, ScanConfig, ScanError, ScanPlan, ScanPoint, ScanRunner, build_plan,
                   prefix_order)
from .selection import Group, resolve

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
        raise ValueError(f"shape mismatch {tuple(a.shape)} vs {tuple(b.shape)}")
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
    from .pair import PairError, fused_pieces

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
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
        del a, b
        m = per_tensor[name]
        if not all(math.isfinite(v) for v in (m.sq_a, m.sq_b, m.dot, m.sq_diff)):  # never report a nan distance
            from .export import NonFiniteTensorError

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
        raise ScanError(f"--granularity {granularity}: use one of {', '.join(GRANULARITIES)}")
    from .export import lazy_pair  # compatibility checks, cached architecture, stored key names
    from .selection import make_group

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


# -- robustness -------------------------------------------------------------------------------------
@dataclass
class RobustnessConfig:
    """Random-direction robustness: which groups, how many directions, which t grid."""

    layers: str | None = field(default=None, metadata={"help": "Layer spec; each resolved group is tested separately (default: every group of --granularity)."})
    granularity: str = field(default="block", metadata={"help": "Groups when --layers is not given: block, sublayer or module.", "choices": list(GRANULARITIES)})
    samples: int = field(default=5, metadata={"help": "Random directions per group (mean and spread are reported)."})
    seed: int = field(default=0, metadata={"help": "Seed of the random directions."})
    alphas: str = field(default="0,0.25,0.5,0.75,1", metadata={"help": "Step sizes t along both directions: comma-separated values or a count N."})
    prefix: bool = field(default=True, metadata={"help": "Reuse the base model's hidden states before a group's first block.", "cli": False})
    batch_size: int | None = field(default=None, metadata={"help": "Blocks per forward (default: automatic).", "cli": False})

    def validate(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise ScanError(f"--granularity {self.granularity}: use one of {', '.join(GRANULARITIES)}")
        if self.samples < 1:
            raise ScanError(f"--samples {self.samples}: must be at least 1")
        self.scan_config().validate()

    def scan_config(self) -> ScanConfig:
        return ScanConfig(granularity=self.granularity, base="a", alphas=self.alphas, prefix=self.prefix,
                          batch_size=self.batch_size)


def _tensor_seed(seed: int, sample: int, name: str) -> int:
    digest = hashlib.sha256(f"hf-llmc/robustness/{seed}/{sample}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def random_direction(interp, group: Group, seed: int, sample: int) -> dict[str, torch.Tensor]:
    """Seeded Gaussian direction over the tensors of ``group`` (float32, CPU), rescaled so that
    its norm equals ‖θB_G − θA_G‖. Each tensor has its own generator seeded from
    (seed, sample, tensor name), so the direction does not depend on the device or group order."""
    names = interp.canonical_names([group])
    target = 0.0
    direction: dict[str, torch.Tensor] = {}
    for name in names:
        a, b = interp.stored("a", name), interp.stored("b", name)
        target += tensor_moments(a, b).sq_diff
        gen = torch.Generator().manual_seed(_tensor_seed(seed, sample, name))
        direction[name] = torch.randn(tuple(a.shape), generator=gen, dtype=torch.float32)
    norm = math.sqrt(sum(float(d.double().pow(2).sum()) for d in direction.values()))
    scale = math.sqrt(target) / norm if norm > 0 else 0.0
    return {name: d * scale for name, d in direction.items()}


class RobustnessRunner(ScanRunner):
    """Per group: the interpolation path into A and ``samples`` random directions, on the t grid."""

    command = "robustness"

    def __init__(self, pair, blocks: TokenBlocks, cfg: RobustnessConfig, out_dir: str | os.PathLike, *,
                 progress: bool = True):
        cfg.validate()
        self.rcfg = cfg
        groups = pair.groups(cfg.layers) if cfg.layers else build_plan(pair.arch, cfg.scan_config()).groups
        plan = ScanPlan(groups)
        scfg = cfg.scan_config()
        points: list[ScanPoint] = []
        for group in sorted(groups, key=prefix_order):
            points.extend(ScanPoint(group, "a", t) for t in scfg.alpha_list())
            for s in range(cfg.samples):
                points.extend(ScanPoint(group, "a", t, "random", s) for t in scfg.alpha_list())
        super().__init__(pair, blocks, scfg, out_dir, progress=progress, plan=plan, points=points)
        self._direction: tuple[tuple, dict[str, torch.Tensor]] | None = None

    def result_settings(self) -> dict:
        c = self.rcfg
        return {"layers": c.layers, "granularity": None if c.layers else c.granularity, "samples": c.samples,
                "seed": c.seed, "alphas": c.scan_config().alpha_list()}

    def manifest(self, status: str, **extra) -> dict:
        from dataclasses import asdict

        out = super().manifest(status, **extra)
        out["settings"] = asdict(self.rcfg)
        return out

    def direction(self, group: Group, sample: int) -> dict[str, torch.Tensor]:
        key = (group.name, sample)
        if self._direction is None or self._direction[0] != key:
            self._direction = (key, random_direction(self.pair.interp, group, self.rcfg.seed, sample))
        return self._direction[1]

    @torch.no_grad()
    def evaluate(self, point: ScanPoint) -> BlockStats:
        if point.direction == "interp":
            return self.evaluate_point(point)
        interp = self.pair.interp
        interp.set_base("a")
        direction = self.direction(point.group, point.sample)
        names = list(direction)
        try:
            for name in names:  # through the interpolator's writer (offloaded / quantized weights)
                device = interp._device(name)
                interp._write(name, interp.stored("a", name).to(device).float() + point.alpha * direction[name].to(device))
            start = point.group.first_block if self.rcfg.prefix and point.group.first_block else None
            return self.ev.run(None, start_block=start, state="a")
        finally:
            interp.restore(names)

    def row(self, point: ScanPoint, stats: BlockStats) -> dict:
        row = super().row(point, stats)
        row["direction"] = point.direction
        row["sample"] = point.sample
        row["delta"] = None if row["loss"] is None else row["loss"] - self.ends["a"].loss
        return row


def run_robustness(pair, blocks: TokenBlocks, cfg: RobustnessConfig, out_dir: str | os.PathLike,
                   resume: bool = False, progress: bool = True, *, overwrite: bool = False) -> list[dict]:
    """Run the robustness comparison into ``out_dir`` (``results.jsonl`` + ``scan.json``)."""
    return RobustnessRunner(pair, blocks, cfg, out_dir, progress=progress).run(resume=resume, overwrite=overwrite)


def robustness_summary(rows: Iterable[dict]) -> list[dict]:
    """Per group and t: the interpolation loss and the mean, std, min, max over random samples."""
    by: dict[tuple[str, float], dict] = {}
    order: list[tuple[str, float]] = []
    for r in rows:
        if r.get("kind") == "endpoint" or r.get("loss") is None:
            continue
        key = (r["group"], float(r["alpha"]))
        if key not in by:
            by[key] = {"group": r["group"], "kind": r["kind"], "blocks": r["blocks"], "t": float(r["alpha"]),
                       "interp": None, "random": []}
            order.append(key)
        if r.get("direction", "interp") == "interp":
            by[key]["interp"] = r["loss"]
        else:
            by[key]["random"].append(r["loss"])
    out = []
    for key in order:
        e = by[key]
        losses = e.pop("random")
        n = len(losses)
        mean = sum(losses) / n if n else None
        std = math.sqrt(sum((x - mean) ** 2 for x in losses) / (n - 1)) if n > 1 else (0.0 if n else None)
        e.update(random_mean=mean, random_std=std, random_min=min(losses) if n else None,
                 random_max=max(losses) if n else None, samples=n)
        out.append(e)
    return out
