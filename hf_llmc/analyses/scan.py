"""Scans: barriers of many groups (every layer, cumulative groups, moving windows) in one run.

A scan is a *plan* (an ordered list of groups, see :func:`build_plan`) turned into *points*
(group × base × α, see :func:`plan_points`) that are evaluated in an order that lets the
evaluator reuse prefixes: per base, groups are sorted by the earliest decoder block they touch,
so the hidden states entering block k are computed once under the base model and every group
starting at block k only runs blocks k..L-1 and the head.

Results are data first: every finished point is appended (flushed and fsynced) as one JSON line
to ``OUT/results.jsonl``; ``OUT/scan.json`` holds the settings, the models, the data fingerprint
and a hash of everything that changes the numbers, so an interrupted scan resumes exactly
(:func:`run_scan` with ``resume=True``) and a folder holding another scan is refused.

:class:`ScanRunner` is the unit other drivers build on: ``runner.points`` can be split between
processes (``runner.run(points=...)``) and ``runner.evaluate`` swapped for another estimator.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..config.errors import ScanError, ScanSettingsError
from ..config.files import write_json_atomic
from ..config.scan import ORDERS, ScanConfig
from ..config.security import display_name
from ..config.spec import BLOCK_KINDS, SpecItem, format_spec
from ..engine.data import TokenBlocks
from ..engine.evaluation import BlockStats, check_finite, evaluator_for, point as point_stats
from ..engine.io import MANIFEST, RESULTS, RowWriter, Sources, check_run_dir, output_path, prepare_run_dir, read_rows
from ..engine.provenance import library_versions
from ..engine.stats import paired_standard_error
from ..model.architecture import Architecture
from ..model.checkpoint.lazy import fingerprint
from ..model.selection import Group, all_groups, block_group, make_group, union
from .barrier import bpb_scale, is_endpoint
from .sequential import Outcome, SequentialEstimator

if TYPE_CHECKING:
    from ..model.pair import ModelPair

#: Files a scan or its report writes (removed by ``overwrite=True``; nothing else is touched).
OUTPUT_FILES = (RESULTS, MANIFEST, "summary.json", "report.md", "report.html", "heatmap.png",
                "cumulative.png", "robustness.png")


# -- plans ------------------------------------------------------------------------------------------
@dataclass
class ScanPlan:
    """The groups a scan evaluates (besides the endpoints and the full-model row).

    Attributes:
        groups: the groups, in model order (cumulative: by first block, then size).
        sequences: for a cumulative scan, each order's group names G_1..G_L (the first k blocks).
    """

    groups: list[Group]
    sequences: dict[str, list[str]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """The plan as recorded in ``scan.json`` (no parameter names).

        Returns:
            ``groups`` (name, kind, blocks, numel of each) and ``sequences``.
        """
        return {
            "groups": [{"name": g.name, "kind": g.kind, "blocks": list(g.blocks), "numel": g.numel} for g in self.groups],
            "sequences": self.sequences,
        }


def block_set_name(indices: Iterable[int]) -> str:
    """The name of a set of whole blocks, written as a valid layer spec.

    Args:
        indices: block indices (any order, duplicates allowed).

    Returns:
        Runs of consecutive blocks as ranges: ``[0, 1, 2, 5]`` -> ``"block.0-2,block.5"``.
    """
    idx = sorted(set(indices))
    items: list[SpecItem] = []
    for i in idx:
        if items and items[-1].end == i - 1:
            items[-1] = SpecItem("block", items[-1].start, i)
        else:
            items.append(SpecItem("block", i, i))
    return format_spec(items)


def block_set_group(arch: Architecture, indices: Iterable[int]) -> Group:
    """One group of several whole decoder blocks (a cumulative or window scan's group).

    Args:
        arch: the model's architecture.
        indices: block indices (any order, duplicates allowed).

    Returns:
        The union of the blocks, named by :func:`block_set_name`.
    """
    idx = sorted(set(indices))
    return union([block_group(arch, "block", i) for i in idx], arch, block_set_name(idx))


def _kind_of(arch: Architecture, name: str) -> str:
    b = arch.block_of(name)
    if b is not None and b < arch.num_blocks:
        return next((k for k in BLOCK_KINDS if name in arch.blocks[b][k]), "block")
    for kind in ("embed", "final_norm", "head"):
        if name in getattr(arch, kind):
            return kind
    return "module"


def module_groups(arch: Architecture) -> list[Group]:
    """One group per parameter-owning module, for ``granularity="module"`` scans.

    Args:
        arch: the model's architecture.

    Returns:
        One group per module with its direct parameters (canonical names; a tied head is its
        embedding's module), named by the module path, in model order.
    """
    modules: dict[str, list[str]] = {}
    for name in arch.parameters:  # canonical names only: a tied head is its embedding's module
        modules.setdefault(name.rsplit(".", 1)[0] if "." in name else name, []).append(name)
    return [make_group(arch, mod, _kind_of(arch, names[0]), names) for mod, names in modules.items()]


def cumulative_order(num_blocks: int, order: str, seed: int = 0) -> list[int]:
    """The order in which blocks join a cumulative group.

    Args:
        num_blocks: number of decoder blocks.
        order: ``shallow`` (first blocks first), ``deep`` (last blocks first) or ``random``.
        seed: seed of the ``random`` order.

    Returns:
        Every block index once, in joining order.

    Raises:
        ScanError: an unknown ``order``.
    """
    if order == "shallow":
        return list(range(num_blocks))
    if order == "deep":
        return list(range(num_blocks - 1, -1, -1))
    if order == "random":
        perm = list(range(num_blocks))
        random.Random(seed).shuffle(perm)
        return perm
    raise ScanError(f"order={order!r}: use one of {', '.join(ORDERS)}")


def build_plan(arch: Architecture, cfg: ScanConfig) -> ScanPlan:
    """The groups a scan evaluates (besides the endpoints and the full-model row).

    Args:
        arch: the model's architecture.
        cfg: the scan settings (``mode``, ``granularity``, ``order``, ``seed``, ``window``).

    Returns:
        The plan: single groups of the granularity, moving windows, or every prefix G_k of each
        cumulative order (shared groups once, with ``sequences``).

    Raises:
        ScanError: bad settings, or a window larger than the model.
    """
    cfg.validate()
    n = arch.num_blocks
    if cfg.mode == "single":
        if cfg.granularity == "block":
            return ScanPlan([block_group(arch, "block", i) for i in range(n)])
        if cfg.granularity == "sublayer":
            return ScanPlan([g for g in all_groups(arch) if g.kind != "block" and g.parameters])
        return ScanPlan(module_groups(arch))
    if cfg.mode == "window":
        if cfg.window > n:
            raise ScanError(f"window={cfg.window}: the model has only {n} blocks")
        return ScanPlan([block_set_group(arch, range(i, i + cfg.window)) for i in range(n - cfg.window + 1)])
    groups: dict[str, Group] = {}
    sequences: dict[str, list[str]] = {}
    for order in cfg.orders:
        perm = cumulative_order(n, order, cfg.seed)
        names = []
        for k in range(1, n + 1):
            group = block_set_group(arch, perm[:k])
            groups.setdefault(group.name, group)
            names.append(group.name)
        sequences[order] = names
    ordered = sorted(groups.values(), key=lambda g: (g.blocks[0], len(g.blocks), g.blocks))
    return ScanPlan(ordered, sequences)


# -- points -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScanPoint:
    """One evaluation of a scan: ``group`` at ``alpha`` into ``base``.

    Attributes:
        group: the tensors moved.
        base: the model the other tensors come from, ``"a"`` or ``"b"``.
        alpha: the point on the path (robustness: the step t).
        direction: ``"interp"`` (towards the other model) or, for robustness, ``"random"``.
        sample: the random direction's index (None on the interpolation path).
    """

    group: Group
    base: str
    alpha: float
    direction: str = "interp"
    sample: int | None = None

    @property
    def key(self) -> tuple:
        """``(group name, base, alpha, direction, sample)``: identifies the point's row (see :func:`row_key`)."""
        return (self.group.name, self.base, float(self.alpha), self.direction, self.sample)


def row_key(row: dict) -> tuple:
    """The key of a result row, equal to :attr:`ScanPoint.key` of the point it belongs to.

    Args:
        row: a result row.

    Returns:
        ``(group, base, alpha, direction, sample)`` (``"interp"`` / None when the row has none).
    """
    return (row["group"], row["base"], float(row["alpha"]), row.get("direction", "interp"), row.get("sample"))


def prefix_order(group: Group) -> int:
    """Sort key that lets the evaluator reuse prefixes: by the first block a group touches.

    Args:
        group: a group.

    Returns:
        ``group.first_block``, or -1 for a group touching the embeddings (full forward, first).
    """
    return -1 if group.first_block is None else group.first_block


def plan_points(plan: ScanPlan, full: Group, cfg: ScanConfig) -> list[ScanPoint]:
    """Every point of a scan, in the order that reuses prefixes.

    Args:
        plan: the scan's groups.
        full: the full-model group.
        cfg: the scan settings (bases and α grid).

    Returns:
        Per base: the full model at every α, then the groups by first block (plan order within a block).
    """
    alphas = cfg.alpha_list()
    points: list[ScanPoint] = []
    for base in cfg.bases:
        points.extend(ScanPoint(full, base, a) for a in alphas)
        for group in sorted(plan.groups, key=prefix_order):  # stable: plan order within a block
            points.extend(ScanPoint(group, base, a) for a in alphas)
    return points


# -- rows -------------------------------------------------------------------------------------------
def _finite_or_none(x: float) -> float | None:
    return x if isinstance(x, float) and math.isfinite(x) else None


def point_row(point: ScanPoint, stats: BlockStats, stat_a: BlockStats, stat_b: BlockStats) -> dict:
    """One results line: loss, accuracy and the barrier loss − R(α) with its paired standard error.

    Args:
        point: the point evaluated.
        stats: its statistics.
        stat_a: statistics of the full model A (same blocks).
        stat_b: statistics of the full model B (same blocks).

    Returns:
        The row: group, kind, blocks, first_block, numel, base, alpha, loss, perplexity, accuracy,
        barrier, barrier_se (``se_method``: "iid", or "batch-means" where neighbouring blocks
        correlate, see :func:`~hf_llmc.engine.stats.paired_standard_error`), error_barrier, tokens
        (plus direction / sample off the interpolation path); with byte counts also
        ``bits_per_byte``, ``barrier_bpb`` and ``barrier_bpb_se`` (the barrier in bits per byte);
        non-finite values are None and the row gets ``nonfinite``.
    """
    alpha = float(point.alpha)
    g = point.group
    ref = (1 - alpha) * stat_a.loss + alpha * stat_b.loss
    err_ref = (1 - alpha) * (1 - stat_a.accuracy) + alpha * (1 - stat_b.accuracy)
    d = stats.block_loss - ((1 - alpha) * stat_a.block_loss + alpha * stat_b.block_loss)
    finite = math.isfinite(stats.loss)
    se, method, _ = paired_standard_error(d, stats.indices, stats.weights)
    row = {
        "group": g.name,
        "kind": g.kind,
        "blocks": list(g.blocks),
        "first_block": g.first_block,
        "numel": g.numel,
        "base": point.base,
        "alpha": alpha,
        "loss": _finite_or_none(stats.loss),
        "perplexity": _finite_or_none(stats.perplexity),
        "accuracy": stats.accuracy,
        "barrier": _finite_or_none(stats.loss - ref),
        "barrier_se": _finite_or_none(se) if finite else None,
        "se_method": method,
        "error_barrier": (1 - stats.accuracy) - err_ref,
        "tokens": stats.tokens,
    }
    scale = bpb_scale(stats)
    if scale is not None:
        row["bits_per_byte"] = _finite_or_none(stats.bits_per_byte)
        row["barrier_bpb"] = None if row["barrier"] is None else row["barrier"] * scale
        row["barrier_bpb_se"] = None if row["barrier_se"] is None else row["barrier_se"] * scale
        row["bytes"] = stats.bytes
    if point.direction != "interp" or point.sample is not None:
        row["direction"] = point.direction
        row["sample"] = point.sample
    if not finite:
        row["nonfinite"] = True
    return row


def endpoint_row(which: str, stats: BlockStats) -> dict:
    """The row of a full endpoint model; keeps its per-block sums so a resumed scan needs no re-run.

    Args:
        which: ``"a"`` or ``"b"``.
        stats: the model's statistics.

    Returns:
        The row (group ``A`` / ``B``, kind ``endpoint``), with ``block_indices``, ``block_loss_sum``,
        ``block_correct`` and ``tokens_per_block`` (chat data: and ``block_tokens``).
    """
    return {
        "group": which.upper(),
        "kind": "endpoint",
        "blocks": [],
        "base": which,
        "alpha": 0.0 if which == "a" else 1.0,
        "loss": stats.loss,
        "perplexity": stats.perplexity,
        "accuracy": stats.accuracy,
        "barrier": 0.0,
        "barrier_se": 0.0,
        "error_barrier": 0.0,
        "tokens": stats.tokens,
        "block_indices": stats.indices.tolist(),
        "block_loss_sum": stats.loss_sum.tolist(),
        "block_correct": stats.correct.tolist(),
        "tokens_per_block": stats.tokens_per_block,
        **({} if stats.block_tokens is None else {"block_tokens": stats.block_tokens.tolist()}),
        **({} if stats.byte_sum is None else {"bits_per_byte": stats.bits_per_byte, "barrier_bpb": 0.0,
                                              "bytes": stats.bytes, "block_bytes": stats.byte_sum.tolist()}),
    }


def stats_from_endpoint_row(row: dict) -> BlockStats:
    """The statistics an endpoint row recorded, so a resumed scan does not evaluate A or B again.

    Args:
        row: a row written by :func:`endpoint_row`.

    Returns:
        The per-block statistics.
    """
    return BlockStats(
        indices=torch.tensor(row["block_indices"], dtype=torch.long),
        loss_sum=torch.tensor(row["block_loss_sum"], dtype=torch.float64),
        correct=torch.tensor(row["block_correct"], dtype=torch.long),
        tokens_per_block=int(row["tokens_per_block"]) if "block_tokens" not in row else float(row["tokens_per_block"]),
        block_tokens=torch.tensor(row["block_tokens"], dtype=torch.long) if "block_tokens" in row else None,
        byte_sum=torch.tensor(row["block_bytes"], dtype=torch.long) if "block_bytes" in row else None,
    )


# -- results files ----------------------------------------------------------------------------------
def prepare_out_dir(out: Path, hashed: dict, *, resume: bool, overwrite: bool, sources: Sources = (),
                    kind: str = "scan") -> bool:
    """Check the output folder of a scan, and clear its scan files on ``overwrite``.

    The output-folder policy of :mod:`hf_llmc.engine.io` applies: never a source model's folder,
    the Hub cache, the current or home folder; ``overwrite`` only of a folder hf-llmc wrote (its
    marker file). A folder the scan creates (or finds empty) gets the marker.

    Args:
        out: the output folder (created when missing).
        hashed: everything that changes the numbers (see :meth:`ScanRunner.hashed`).
        resume: continue the scan in the folder.
        overwrite: remove the files a scan writes (:data:`OUTPUT_FILES`; nothing else).
        sources: ``(label, folder)`` of the source models (:func:`hf_llmc.engine.io.source_folders`).
        kind: what the folder holds, recorded in its marker (``scan`` or ``robustness``).

    Returns:
        True when the folder holds a scan to resume, False when the run starts afresh.

    Raises:
        ScanError: a file or link in its place, a non-empty folder without ``resume`` or
            ``overwrite``, or ``overwrite`` of a folder hf-llmc did not write.
        OutputExistsError: a protected location, or a folder that is not writable.
        ScanSettingsError: ``resume`` on a folder without a readable manifest or holding a run
            of other settings, models or data (the message names what differs).
    """
    check_run_dir(out, resume=resume, overwrite=overwrite, sources=sources)
    if not out.is_dir() or not any(out.iterdir()):
        prepare_run_dir(out, kind)
        return False
    manifest = out / MANIFEST
    if resume:
        try:
            old = json.loads(manifest.read_text())
        except FileNotFoundError:
            raise ScanSettingsError(f"{out}: not a scan folder (no {MANIFEST}); nothing to resume") from None
        except ValueError:
            raise ScanSettingsError(f"{out}/{MANIFEST}: unreadable; cannot resume") from None
        if not isinstance(old, dict):
            raise ScanSettingsError(f"{out}/{MANIFEST}: unreadable; cannot resume")
        if old.get("settings_hash") != settings_hash(hashed):
            before = old.get("hashed") if isinstance(old.get("hashed"), dict) else {}
            differ = []
            for key in sorted(set(before) | set(hashed)):
                was, now = before.get(key), hashed.get(key)
                if was == now:
                    continue
                if isinstance(was, dict) and isinstance(now, dict):
                    differ += [f"{k} ({was.get(k)} vs {now.get(k)})" for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k)]
                else:
                    differ.append({"model_a": "model A", "model_b": "model B", "data": "evaluation data"}.get(key, key))
            raise ScanSettingsError(
                f"{out}: holds a run with different {', '.join(differ) or 'settings'}; "
                "resume with the same settings, or use another --out or --overwrite"
            )
        prepare_run_dir(out, kind)  # a scan of this run: marked (and tidied) like a new one
        return True
    for name in OUTPUT_FILES:  # overwrite: check_run_dir found the folder's marker
        (out / name).unlink(missing_ok=True)
    for extra in out.glob("heatmap-*.png"):  # the per-set heatmaps of a run on several evaluation sets
        extra.unlink(missing_ok=True)
    prepare_run_dir(out, kind)
    return False


def settings_hash(hashed: dict) -> str:
    """A short hash of what changes the numbers, compared on ``resume``.

    Args:
        hashed: settings, models, data and dtype (see :meth:`ScanRunner.hashed`).

    Returns:
        The first 16 hex digits of the SHA-256 of ``hashed`` as sorted JSON.
    """
    return hashlib.sha256(json.dumps(hashed, sort_keys=True, default=str).encode()).hexdigest()[:16]


# -- execution --------------------------------------------------------------------------------------
def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True)
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[current]}"),
        console=console,
        disable=not enabled or not console.is_terminal,
        transient=False,
    )


Evaluate = Callable[["ScanRunner", ScanPoint], BlockStats]


def prefix_store_budget(device: torch.device) -> int:
    """The memory the evaluator may keep for the base model's per-block hidden states.

    When they do not fit, prefixes are computed incrementally instead (one pass over the blocks per base).

    Args:
        device: the model's device.

    Returns:
        Bytes: a tenth of the free CUDA memory; on other devices a tenth of the available RAM, at most 4 GiB.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(0.1 * free)
    import psutil

    return int(min(4 << 30, 0.1 * psutil.virtual_memory().available))


class ScanRunner:
    """Plans, orders and executes one scan into an output folder (see the module docstring).

    ``evaluate`` (default :meth:`evaluate_point`) maps a point to its :class:`BlockStats`; the
    runner handles endpoints, trivial points, row writing, resume and progress around it.

    Args:
        pair: the loaded pair.
        blocks: the token blocks to evaluate on.
        cfg: the scan settings (validated here).
        out_dir: the output folder.
        progress: show a progress bar on a terminal.
        evaluate: replaces :meth:`evaluate` (called as ``evaluate(runner, point)``).
        plan: the groups (default: :func:`build_plan` of ``cfg``).
        points: the points (default: :func:`plan_points` of the plan).
        prefix_store_bytes: memory for recorded base hidden states (default: :func:`prefix_store_budget`);
            used only with ``cfg.prefix``.

    Raises:
        ScanError: bad settings, or ``cfg.metric="bpb"`` on blocks without byte counts (token ids, chat data).
    """

    command = "scan"

    def __init__(self, pair: ModelPair, blocks: TokenBlocks, cfg: ScanConfig, out_dir: str | os.PathLike, *,
                 progress: bool = True, evaluate: Evaluate | None = None, plan: ScanPlan | None = None,
                 points: list[ScanPoint] | None = None, prefix_store_bytes: int | None = None) -> None:
        cfg.validate()
        if cfg.metric == "bpb" and blocks.bpb_missing:
            raise ScanError(blocks.bpb_missing)
        self.pair = pair
        self.blocks = blocks
        self.cfg = cfg
        self.out = output_path(out_dir)  # ~ expanded
        self.progress = progress
        self._evaluate = evaluate
        self.plan = plan or build_plan(pair.arch, cfg)
        self.full = pair.full_group()
        self.points = points if points is not None else plan_points(self.plan, self.full, cfg)
        self.ev = evaluator_for(pair, blocks, cfg.batch_size)
        if cfg.prefix:  # the endpoint runs record every block's input, so prefixes cost no forward
            self.ev.prefix_store_bytes = prefix_store_budget(self.ev.device) if prefix_store_bytes is None else prefix_store_bytes
        self.ends: dict[str, BlockStats] = {}

    # -- identity -----------------------------------------------------------------------------
    def hashed(self) -> dict:
        """Everything that changes the numbers, hashed into the manifest so ``resume`` can refuse other runs.

        Returns:
            ``command``, ``settings`` (:meth:`result_settings`), ``model_a`` / ``model_b`` (name,
            revision, fingerprint), ``data`` (fingerprint, blocks, seq_len) and ``dtype``; computed once.
        """
        if getattr(self, "_hashed", None) is None:
            self._hashed = self._identity()
        return self._hashed

    def _identity(self) -> dict:
        pair = self.pair
        dtype = next(iter(pair.model.parameters())).dtype
        return {
            "command": self.command,
            "settings": self.result_settings(),
            "model_a": [display_name(pair.source_a), pair.ckpt_a.revision, fingerprint(pair.ckpt_a)],
            "model_b": [display_name(pair.source_b), pair.ckpt_b.revision, fingerprint(pair.ckpt_b)],
            "data": [self.blocks.fingerprint, self.blocks.num_blocks, self.blocks.seq_len],
            "dtype": str(dtype).removeprefix("torch."),
            # vocabularies that differ: the rule for one-side rows changes embed / head points
            **({"added_rows": pair.vocab.added_rows} if getattr(pair, "vocab", None) is not None else {}),
        }

    def result_settings(self) -> dict:
        """The settings that change the numbers (part of :meth:`hashed`).

        Returns:
            :meth:`~hf_llmc.config.scan.ScanConfig.result_settings` of the scan settings.
        """
        return self.cfg.result_settings()

    def manifest(self, status: str, **extra: Any) -> dict:
        """The content of ``scan.json``: what was run, on what, and how far it got.

        Args:
            status: ``running``, ``complete`` or ``partial``.
            **extra: more fields (start time, elapsed seconds, parallel run).

        Returns:
            Settings, α grid, settings hash, models, architecture, data, plan, number of points,
            device and library versions.
        """
        pair = self.pair
        hashed = self.hashed()
        source = self.blocks.source
        return {
            "command": self.command,
            "status": status,
            "settings": asdict(self.cfg),
            "alphas": self.cfg.alpha_list(),
            "settings_hash": settings_hash(hashed),
            "hashed": hashed,
            "models": {
                "a": {"name": display_name(pair.source_a), "revision": pair.ckpt_a.revision},
                "b": {"name": display_name(pair.source_b), "revision": pair.ckpt_b.revision},
            },
            "architecture": {"model_class": pair.arch.model_class, "model_type": pair.arch.model_type,
                             "num_blocks": pair.arch.num_blocks, "block_prefix": pair.arch.block_prefix},
            "data": {"source": display_name(source) if source not in ("tensor", None) else source,
                     "fingerprint": self.blocks.fingerprint, "num_blocks": self.blocks.num_blocks,
                     "seq_len": self.blocks.seq_len,
                     "tokens": self.blocks.tokens, **({"chat": self.blocks.chat} if self.blocks.chat else {})},
            "plan": self.plan.to_dict(),
            **({"vocabulary": pair.vocab.describe()} if getattr(pair, "vocab", None) is not None else {}),
            "num_points": len(self.points),
            "device": str(self.ev.device),
            "libraries": library_versions(),
            **extra,
        }

    # -- evaluation ---------------------------------------------------------------------------
    def endpoint(self, which: str) -> BlockStats:
        """Statistics of the full model A or B; its run records the base hidden states for prefix reuse.

        Args:
            which: ``"a"`` or ``"b"``; the live model is set to it.

        Returns:
            The endpoint's per-block statistics.

        Raises:
            NonFiniteLossError: the model's loss is NaN or infinite.
        """
        self.pair.interp.set_base(which)
        return check_finite(self.ev.run(None, state=which, record=self.cfg.prefix), f"model {which.upper()}")

    def evaluate_point(self, point: ScanPoint) -> BlockStats:
        """A path point evaluated on the live model, with prefix reuse unless ``cfg.prefix`` is off.

        Args:
            point: the point.

        Returns:
            Its per-block statistics.
        """
        return point_stats(self.pair, self.ev, point.group, point.alpha, base=point.base, method=self.cfg.method,
                           prefix=self.cfg.prefix)

    def evaluate(self, point: ScanPoint) -> BlockStats:
        """Statistics of a point that needs a forward: the ``evaluate`` given, else :meth:`evaluate_point`.

        Args:
            point: the point.

        Returns:
            Its per-block statistics.
        """
        if self._evaluate is not None:
            return self._evaluate(self, point)
        return self.evaluate_point(point)

    def trivial(self, point: ScanPoint) -> BlockStats | None:
        """Statistics known without a forward, because the point is an endpoint model.

        Args:
            point: the point.

        Returns:
            The endpoint's statistics for α = 0 into A, α = 1 into B and the full path at 0 / 1
            (robustness: t = 0 into A); else None.
        """
        if point.direction != "interp":
            return self.ends["a"] if point.alpha == 0.0 and point.base == "a" else None
        which = is_endpoint(point.alpha, point.base, point.group.name == self.full.name)
        return self.ends[which] if which else None

    def shared_row(self, point: ScanPoint, done: dict[tuple, dict]) -> dict | None:
        """A full-model row taken from the other base, since the full path is the same into A and into B.

        Args:
            point: the point.
            done: the rows so far, by :func:`row_key`.

        Returns:
            The other base's row with this ``base``, or None when there is none (or not a full-model point).
        """
        if point.group.name != self.full.name or point.direction != "interp":
            return None
        for other in ("a", "b"):
            row = done.get((point.group.name, other, float(point.alpha), "interp", None))
            if row is not None and other != point.base:
                return {**row, "base": point.base}
        return None

    def row(self, point: ScanPoint, stats: BlockStats) -> dict:
        """The result row of an evaluated point.

        Args:
            point: the point.
            stats: its statistics.

        Returns:
            :func:`point_row` against the endpoints.
        """
        row = point_row(point, stats, self.ends["a"], self.ends["b"])
        rounded = self.pair.interp.rounding.get(float(point.alpha))
        if rounded is not None and point.group.name == self.full.name:  # a low-precision full path
            row["rounded_point"] = rounded
        return row

    def result_row(self, point: ScanPoint, done: dict[tuple, dict]) -> dict:
        """The result row of a point, evaluating only when it is not known otherwise.

        Args:
            point: the point.
            done: the rows so far, by :func:`row_key`.

        Returns:
            The row: shared with the other base (:meth:`shared_row`), of an endpoint (:meth:`trivial`),
            or evaluated (:meth:`evaluate`).
        """
        row = self.shared_row(point, done)
        if row is not None:
            return row
        stats = self.trivial(point)
        return self.row(point, stats if stats is not None else self.evaluate(point))

    # -- driver -------------------------------------------------------------------------------
    def run(self, points: list[ScanPoint] | None = None, *, resume: bool = False, overwrite: bool = False,
            processes: SingleProcess | None = None) -> list[dict] | None:
        """Evaluate the points into the output folder, appending one row per point.

        Args:
            points: the points to evaluate (default: all of the runner's).
            resume: skip the points already in the folder's results.
            overwrite: replace the scan files of a non-empty folder.
            processes: shares the run between processes (:class:`hf_llmc.analyses.distributed.Processes`);
                default: this process only.

        Returns:
            Every row of the results file (endpoint rows included), in the main process; None in the others.

        Raises:
            ScanError: a non-empty folder without ``resume`` or ``overwrite``, or a damaged results line.
            ScanSettingsError: ``resume`` on a folder holding a run of other settings, models or data.
            NonFiniteLossError: an endpoint's loss is NaN or infinite.
        """
        procs = processes or SingleProcess()
        points = self.points if points is None else points
        started = time.time()
        extra = {"parallel": procs.info} if procs.info else {}

        def prepare() -> bool:  # the main process owns the folder
            resuming = prepare_out_dir(self.out, self.hashed(), resume=resume, overwrite=overwrite,
                                       sources=self.pair.source_folders(), kind=self.command)
            procs.tidy(self.out, resuming)
            write_json_atomic(self.out / MANIFEST, self.manifest("running", started_at=_now(), **extra))
            return resuming

        resuming = procs.prepare(prepare)
        results = self.out / RESULTS
        rows = read_rows(results, repair=procs.is_main) if resuming else []
        done = {row_key(r): r for r in rows}
        for row in rows:
            if row.get("kind") == "endpoint":
                self.ends[row["base"]] = stats_from_endpoint_row(row)
        mine = procs.share([p for p in points if p.key not in done])
        missing_ends = [w for w in ("b", "a") if w not in self.ends]  # end on A: base A runs first
        if self.cfg.bases == ["b"]:
            missing_ends.reverse()
        path = procs.rows_file(self.out)  # None: this process writes no rows (data-parallel, not main)
        with RowWriter(path) if path else contextlib.nullcontext() as writer, \
                _progress(self.progress and procs.is_main) as bar:
            task = bar.add_task(self.command, total=len(mine) + len(missing_ends), current="")
            for which in missing_ends:  # every process needs both endpoints for its rows
                bar.update(task, current=f"model {which.upper()}")
                stats = self.endpoint(which)
                self.ends[which] = stats
                if procs.is_main:
                    row = endpoint_row(which, stats)
                    writer.write(row)
                    rows.append(row)
                bar.advance(task)
            for point in mine:
                bar.update(task, current=f"{point.group.name} base {point.base.upper()} α={point.alpha:g}")
                row = self.result_row(point, done)
                if writer is not None:
                    writer.write(row)
                rows.append(row)
                done[point.key] = row
                bar.advance(task)
        if not procs.finish(self.out):
            return None
        if procs.info:  # the rows of every process, merged into the results file
            rows = read_rows(results)
            done = {row_key(r): r for r in rows}
        complete = all(p.key in done for p in self.points)
        write_json_atomic(self.out / MANIFEST, self.manifest(
            "complete" if complete else "partial", started_at=_now(started),
            elapsed_s=round(time.time() - started, 3), **extra))
        return rows


class SingleProcess:
    """How a run is shared between processes; here one process does everything (the default).

    :class:`hf_llmc.analyses.distributed.Processes` shares it between several.
    """

    is_main = True
    #: What the manifest records as ``"parallel"`` (None: nothing).
    info: dict | None = None

    def prepare(self, fn: Callable[[], bool]) -> bool:
        """Run ``fn`` (check and open the output folder) where the folder is owned.

        Args:
            fn: the preparation; returns whether the run resumes.

        Returns:
            ``fn()``'s result, in every process.
        """
        return fn()

    def tidy(self, out: Path, resuming: bool) -> None:
        """Bring rows of an interrupted multi-process run into the results file (nothing here).

        Args:
            out: the output folder.
            resuming: whether the run resumes.
        """

    def share(self, todo: list[ScanPoint]) -> list[ScanPoint]:
        """The points this process evaluates.

        Args:
            todo: the points still to do, in execution order.

        Returns:
            Its share (here: all of them).
        """
        return todo

    def rows_file(self, out: Path) -> Path | None:
        """Where this process writes its rows.

        Args:
            out: the output folder.

        Returns:
            The file (here: ``results.jsonl``), or None for a process that writes no rows.
        """
        return out / RESULTS

    def finish(self, out: Path) -> bool:
        """Wait for the other processes and merge their rows.

        Args:
            out: the output folder.

        Returns:
            True in the process that reports (here: always).
        """
        return True


def _now(ts: float | None = None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


# -- scans --------------------------------------------------------------------------------------------
class SequentialScanRunner(ScanRunner):
    """A scan whose points stop by the rule of ``cfg.sequential`` (chosen by :func:`run_scan`).

    Rows carry ``loss``/``accuracy`` measured on the point's ``blocks_used`` blocks, ``barrier`` /
    ``barrier_se`` of the regression estimate, ``interval``, ``decision``, ``stop_reason`` and
    ``tokens`` (= blocks used × tokens per block). Endpoint rows are written first with the first
    look's blocks and appended again at the end with every block any point used (the last row of a
    key wins).

    Args:
        pair: the loaded pair.
        blocks: the token blocks (visited in the seeded order of ``cfg.sequential``).
        cfg: the scan settings, with ``sequential`` set.
        out_dir: the output folder.
        **kwargs: the other arguments of :class:`ScanRunner`.

    Raises:
        ScanError: ``cfg.sequential`` is None (or bad settings).
    """

    def __init__(self, pair: ModelPair, blocks: TokenBlocks, cfg: ScanConfig, out_dir: str | os.PathLike,
                 **kwargs: Any) -> None:
        super().__init__(pair, blocks, cfg, out_dir, **kwargs)
        if cfg.sequential is None:
            raise ScanError("SequentialScanRunner needs ScanConfig.sequential")
        self.scale = blocks.bpb_scale if cfg.metric == "bpb" else 1.0  # checked by ScanRunner
        self.seq = SequentialEstimator(pair, self.ev, blocks.num_blocks, cfg.sequential, record=cfg.prefix,
                                       scale=self.scale)
        self._outcomes: dict[tuple, Outcome] = {}

    def manifest(self, status: str, **extra: Any) -> dict:
        """The content of ``scan.json``, with the sequential settings, schedule and tokens evaluated.

        Args:
            status: ``running``, ``complete`` or ``partial``.
            **extra: more fields (start time, elapsed seconds, parallel run).

        Returns:
            :meth:`ScanRunner.manifest` plus ``sequential``.
        """
        out = super().manifest(status, **extra)
        out["sequential"] = {**self.cfg.sequential.result_settings(), "interval_description": self.seq.rule.description(),
                             "assumption": self.seq.rule.assumption(), "schedule": self.seq.schedule,
                             "tokens_evaluated": round(self.seq.blocks_evaluated * self.blocks.tokens_per_block)}
        return out

    def endpoint(self, which: str) -> BlockStats:
        """Statistics of the full model A or B on the first look's blocks.

        Args:
            which: ``"a"`` or ``"b"``.

        Returns:
            The endpoint's per-block statistics.
        """
        return self.seq.endpoint(which, self.seq.schedule[0])

    def trivial(self, point: ScanPoint) -> BlockStats | None:
        """Statistics known without a forward, because the point is an endpoint model (first look's blocks).

        Args:
            point: the point.

        Returns:
            The endpoint's statistics, or None.
        """
        if point.direction != "interp":
            return super().trivial(point)
        which = is_endpoint(point.alpha, point.base, point.group.name == self.full.name)
        return self.seq.endpoint(which, self.seq.schedule[0]) if which else None

    def evaluate(self, point: ScanPoint) -> BlockStats:
        """Evaluate a point block by block until its stopping rule is met.

        Args:
            point: the point (interpolation paths only).

        Returns:
            Its statistics on the blocks it used.

        Raises:
            ScanError: a robustness (random-direction) point.
        """
        if point.direction != "interp":
            raise ScanError("sequential estimation covers interpolation paths only")
        stats, outcome = self.seq.evaluate(point.group, point.alpha, point.base, self.cfg.method, self.cfg.prefix)
        self._outcomes[point.key] = outcome
        return stats

    def row(self, point: ScanPoint, stats: BlockStats) -> dict:
        """The result row of a point, with its sequential estimate and stopping fields.

        Args:
            point: the point.
            stats: its statistics.

        Returns:
            :func:`point_row` on the point's blocks, with the regression barrier / standard error and
            the outcome's fields (interval, decision, stop reason, tokens, ...).
        """
        n = stats.indices.numel()
        row = point_row(point, stats, self.seq.endpoint("a", n), self.seq.endpoint("b", n))
        outcome = self._outcomes.pop(point.key, None) or self.seq.exact(n)
        if outcome.look is not None and row["barrier"] is not None:
            row["barrier"], row["barrier_se"] = outcome.look.mean / self.scale, outcome.look.se / self.scale
            row["se_method"] = "sequential"
            scale = self.scale if self.scale != 1.0 else bpb_scale(stats)  # bpb: the rule's own scale
            if scale is not None:
                row["barrier_bpb"], row["barrier_bpb_se"] = row["barrier"] * scale, row["barrier_se"] * scale
        row.update(outcome.fields(stats.tokens_per_block))
        return row

    def run(self, points: list[ScanPoint] | None = None, *, resume: bool = False,
            overwrite: bool = False) -> list[dict]:
        """Evaluate the points into the output folder, then append the endpoints' rows on every block used.

        Args:
            points: the points to evaluate (default: all).
            resume: skip the points already in the folder's results (reusing its endpoint blocks).
            overwrite: replace the scan files of a non-empty folder.

        Returns:
            Every row, with the endpoint rows replaced by their final version.

        Raises:
            ScanError: a non-empty folder without ``resume`` or ``overwrite``, or a damaged results line.
            ScanSettingsError: ``resume`` on a folder holding a run of other settings, models or data.
            NonFiniteLossError: an endpoint's loss is NaN or infinite.
        """
        if resume:  # endpoint blocks of the interrupted run (valid only in this block order)
            for row in read_rows(self.out / RESULTS):
                if row.get("kind") == "endpoint":
                    self.seq.seed(row["base"], stats_from_endpoint_row(row))
        rows = super().run(points, resume=resume, overwrite=overwrite)
        final = {}
        for which in ("a", "b"):
            n = self.seq.have(which)
            if n > len(self.ends[which].indices):
                final[which] = endpoint_row(which, self.seq.endpoint(which, n))
        if final:
            with RowWriter(self.out / RESULTS) as writer:
                for row in final.values():
                    writer.write(row)
            rows = [final.get(r["base"], r) if r.get("kind") == "endpoint" else r for r in rows]
        return rows



def run_scan(pair: ModelPair, blocks: TokenBlocks, cfg: ScanConfig, out_dir: str | os.PathLike, resume: bool = False,
             progress: bool = True, *, overwrite: bool = False) -> list[dict]:
    """Run a scan into a folder (``results.jsonl`` + ``scan.json``) and return every result row.

    Args:
        pair: the loaded pair.
        blocks: the token blocks to evaluate on.
        cfg: the scan settings; with ``cfg.sequential`` each point stops once its error bar allows.
        out_dir: the output folder; render it with :func:`hf_llmc.render_report`.
        resume: skip the points already in ``results.jsonl`` (a truncated last line is dropped).
        progress: show a progress bar on a terminal.
        overwrite: replace the scan files of a non-empty folder (needed without ``resume``).

    Returns:
        Every row of the results file: the two endpoint rows and one row per point.

    Raises:
        ScanError: bad settings, or a non-empty folder without ``resume`` or ``overwrite``.
        ScanSettingsError: ``resume`` on a folder holding a scan of other settings, models or data.
        NonFiniteLossError: an endpoint's loss is NaN or infinite.
    """
    runner = ScanRunner if cfg.sequential is None else SequentialScanRunner
    return runner(pair, blocks, cfg, out_dir, progress=progress).run(resume=resume, overwrite=overwrite)
