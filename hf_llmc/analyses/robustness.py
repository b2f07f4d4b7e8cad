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
from typing import TYPE_CHECKING, Any

import torch

from ..config.scan import RobustnessConfig
from ..engine.data import TokenBlocks
from ..engine.evaluation import BlockStats
from ..model.selection import Group
from .distances import tensor_moments
from .scan import ScanPlan, ScanPoint, ScanRunner, build_plan, prefix_order

if TYPE_CHECKING:
    from ..model.interpolation import Interpolator
    from ..model.pair import ModelPair


def _tensor_seed(seed: int, sample: int, name: str) -> int:
    digest = hashlib.sha256(f"hf-llmc/robustness/{seed}/{sample}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def random_direction(interp: Interpolator, group: Group, seed: int, sample: int) -> dict[str, torch.Tensor]:
    """A seeded Gaussian direction over a group's tensors, as long as the path from A to B.

    Each tensor has its own generator seeded from (seed, sample, tensor name), so the direction
    does not depend on the device or the group order.

    Args:
        interp: the pair's interpolator (reads the stored A and B tensors).
        group: the tensors the direction moves.
        seed: the run's seed.
        sample: the direction's index.

    Returns:
        One float32 CPU tensor per canonical name, rescaled so the direction's norm equals ‖θB_G − θA_G‖
        (all zeros when that is 0).
    """
    names = interp.canonical_names([group])
    target = 0.0
    direction: dict[str, torch.Tensor] = {}
    for name in names:
        a, b = interp.endpoint_tensors(name)  # vocabularies that differ: the union layout
        target += tensor_moments(a, b).sq_diff
        gen = torch.Generator().manual_seed(_tensor_seed(seed, sample, name))
        direction[name] = torch.randn(tuple(a.shape), generator=gen, dtype=torch.float32)
    norm = math.sqrt(sum(float(d.double().pow(2).sum()) for d in direction.values()))
    scale = math.sqrt(target) / norm if norm > 0 else 0.0
    return {name: d * scale for name, d in direction.items()}


class RobustnessRunner(ScanRunner):
    """Per group: the interpolation path into A and ``samples`` random directions, on the t grid.

    Args:
        pair: the loaded pair.
        blocks: the token blocks to evaluate on.
        cfg: the robustness settings (validated here).
        out_dir: the output folder.
        progress: show a progress bar on a terminal.
        prefix_store_bytes: memory for recorded base hidden states (default: automatic).
    """

    command = "robustness"

    def __init__(self, pair: ModelPair, blocks: TokenBlocks, cfg: RobustnessConfig, out_dir: str | os.PathLike, *,
                 progress: bool = True, prefix_store_bytes: int | None = None) -> None:
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
        super().__init__(pair, blocks, scfg, out_dir, progress=progress, plan=plan, points=points,
                         prefix_store_bytes=prefix_store_bytes)
        self._direction: tuple[tuple, dict[str, torch.Tensor]] | None = None

    def result_settings(self) -> dict:
        """The settings that change the numbers (hashed for ``resume``).

        Returns:
            ``layers``, ``granularity`` (None with ``layers``), ``samples``, ``seed`` and the t grid.
        """
        c = self.rcfg
        return {"layers": c.layers, "granularity": None if c.layers else c.granularity, "samples": c.samples,
                "seed": c.seed, "alphas": c.scan_config().alpha_list()}

    def manifest(self, status: str, **extra: Any) -> dict:
        """The content of ``scan.json``, with the robustness settings as ``settings``.

        Args:
            status: ``running``, ``complete`` or ``partial``.
            **extra: more fields (start time, elapsed seconds, parallel run).

        Returns:
            :meth:`ScanRunner.manifest` with ``settings`` replaced.
        """
        from dataclasses import asdict

        out = super().manifest(status, **extra)
        out["settings"] = asdict(self.rcfg)
        return out

    def direction(self, group: Group, sample: int) -> dict[str, torch.Tensor]:
        """The random direction of a group and sample, kept while consecutive points share it.

        Args:
            group: the group.
            sample: the direction's index.

        Returns:
            :func:`random_direction` with the run's seed.
        """
        key = (group.name, sample)
        if self._direction is None or self._direction[0] != key:
            self._direction = (key, random_direction(self.pair.interp, group, self.rcfg.seed, sample))
        return self._direction[1]

    @torch.no_grad()
    def evaluate(self, point: ScanPoint) -> BlockStats:
        """Statistics at θA + t·d_G for a random direction, else the interpolation point.

        Args:
            point: the point (``alpha`` is the step t).

        Returns:
            Its per-block statistics; the group's tensors are restored to A afterwards.
        """
        if point.direction == "interp":
            return self.evaluate_point(point)
        interp = self.pair.interp
        interp.set_base("a")
        direction = self.direction(point.group, point.sample)
        names = list(direction)
        try:
            for name in names:  # through the interpolator's writer (offloaded / quantized weights)
                device = interp._device(name)
                interp._write(name, interp.endpoint_tensors(name)[0].to(device).float() + point.alpha * direction[name].to(device))
            start = point.group.first_block if self.rcfg.prefix and point.group.first_block else None
            return self.ev.run(None, start_block=start, state="a")
        finally:
            interp.restore(names)

    def row(self, point: ScanPoint, stats: BlockStats) -> dict:
        """The result row of a point, with its direction, sample and loss change.

        Args:
            point: the point.
            stats: its statistics.

        Returns:
            The scan row plus ``direction``, ``sample`` and ``delta`` (loss − L_A; None for a non-finite
            loss). A random direction's row has no ``barrier`` fields: its points are not on the A-B path,
            so a loss minus the A-B reference line means nothing there.
        """
        row = super().row(point, stats)
        row["direction"] = point.direction
        row["sample"] = point.sample
        if point.direction != "interp":
            for key in ("barrier", "barrier_se", "error_barrier"):
                row.pop(key, None)
        row["delta"] = None if row["loss"] is None else row["loss"] - self.ends["a"].loss
        return row


def run_robustness(pair: ModelPair, blocks: TokenBlocks | list[TokenBlocks], cfg: RobustnessConfig, out_dir: str | os.PathLike,
                   resume: bool = False, progress: bool = True, *, overwrite: bool = False) -> list[dict]:
    """Compare the interpolation path with random directions of equal norm, per group, into a folder.

    Args:
        pair: the loaded pair.
        blocks: the token blocks to evaluate on, or several named evaluation sets (each point is then
            evaluated on every set; rows carry ``dataset``).
        cfg: which groups, how many directions, which t grid.
        out_dir: the output folder (``results.jsonl`` + ``scan.json``); render it with
            :func:`hf_llmc.render_report`.
        resume: skip the points already in ``results.jsonl``.
        progress: show a progress bar on a terminal.
        overwrite: replace the files of a non-empty folder (needed without ``resume``).

    Returns:
        Every row of the results file.

    Raises:
        ScanError: bad settings, or a non-empty folder without ``resume`` or ``overwrite``.
        ScanSettingsError: ``resume`` on a folder holding a run of other settings, models or data.
        SpecError: a bad ``cfg.layers``.
        NonFiniteLossError: an endpoint's loss is NaN or infinite.
    """
    if isinstance(blocks, list):
        from .multiset import MultiSetRunner

        return MultiSetRunner(pair, blocks, cfg, out_dir, progress=progress, runner=RobustnessRunner).run(
            resume=resume, overwrite=overwrite)
    return RobustnessRunner(pair, blocks, cfg, out_dir, progress=progress).run(resume=resume, overwrite=overwrite)
