"""Random-direction robustness (the paper's Section 5; definitions in docs/design.md).

For each group G, a seeded Gaussian direction d_G rescaled to ‖d_G‖ = ‖θB_G − θA_G‖; the loss
along θA + t·d_G is compared with the loss along the interpolation path θA + t·(θB_G − θA_G).
Results use the scan's JSON-lines form (``direction`` "interp" / "random", ``sample``) and the
scan's resumable runner.
"""

from __future__ import annotations

import hashlib
import math
import os

import torch

from ..config.scan import RobustnessConfig
from ..engine.data import TokenBlocks
from ..engine.evaluation import BlockStats
from ..model.selection import Group
from .distances import tensor_moments
from .scan import ScanPlan, ScanPoint, ScanRunner, build_plan, prefix_order


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
