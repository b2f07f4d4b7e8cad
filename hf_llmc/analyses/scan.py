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

import torch

from ..config.errors import ScanError, ScanSettingsError
from ..config.files import write_json_atomic
from ..config.scan import ORDERS, ScanConfig
from ..config.security import display_name
from ..config.spec import BLOCK_KINDS, SpecItem, format_spec
from ..engine.data import TokenBlocks
from ..engine.evaluation import BlockStats, check_finite, evaluator_for, point as point_stats
from ..engine.io import MANIFEST, RESULTS, RowWriter, read_rows
from ..engine.provenance import library_versions
from ..engine.stats import standard_error
from ..model.architecture import Architecture
from ..model.checkpoint.lazy import fingerprint
from ..model.selection import Group, all_groups, block_group, make_group, union
from .barrier import is_endpoint
from .sequential import INTERVAL_DESCRIPTION, Outcome, SequentialEstimator

#: Files a scan or its report writes (removed by ``overwrite=True``; nothing else is touched).
OUTPUT_FILES = (RESULTS, MANIFEST, "summary.json", "report.md", "report.html", "heatmap.png",
                "cumulative.png", "robustness.png")


# -- plans ------------------------------------------------------------------------------------------
@dataclass
class ScanPlan:
    """Groups of a scan in model order; ``sequences`` maps a cumulative order to its G_1..G_L."""

    groups: list[Group]
    sequences: dict[str, list[str]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "groups": [{"name": g.name, "kind": g.kind, "blocks": list(g.blocks), "numel": g.numel} for g in self.groups],
            "sequences": self.sequences,
        }


def block_set_name(indices: Iterable[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"block.0-2,block.5"`` (a valid layer spec)."""
    idx = sorted(set(indices))
    items: list[SpecItem] = []
    for i in idx:
        if items and items[-1].end == i - 1:
            items[-1] = SpecItem("block", items[-1].start, i)
        else:
            items.append(SpecItem("block", i, i))
    return format_spec(items)


def block_set_group(arch: Architecture, indices: Iterable[int]) -> Group:
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
    """One group per parameter-owning module (its direct parameters), in model order."""
    modules: dict[str, list[str]] = {}
    for name in arch.parameters:  # canonical names only: a tied head is its embedding's module
        modules.setdefault(name.rsplit(".", 1)[0] if "." in name else name, []).append(name)
    return [make_group(arch, mod, _kind_of(arch, names[0]), names) for mod, names in modules.items()]


def cumulative_order(num_blocks: int, order: str, seed: int = 0) -> list[int]:
    """Block indices in the order they join the cumulative group."""
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
    """The groups a scan evaluates (besides the endpoints and the full-model row)."""
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
    """One evaluation: ``group`` at ``alpha`` into ``base`` (``direction``/``sample`` for robustness)."""

    group: Group
    base: str
    alpha: float
    direction: str = "interp"
    sample: int | None = None

    @property
    def key(self) -> tuple:
        return (self.group.name, self.base, float(self.alpha), self.direction, self.sample)


def row_key(row: dict) -> tuple:
    return (row["group"], row["base"], float(row["alpha"]), row.get("direction", "interp"), row.get("sample"))


def prefix_order(group: Group) -> int:
    """Sort key giving prefix reuse: groups touching the embeddings (full forward) first."""
    return -1 if group.first_block is None else group.first_block


def plan_points(plan: ScanPlan, full: Group, cfg: ScanConfig) -> list[ScanPoint]:
    """Every point of a scan, in execution order: per base, the full row, then groups by first block."""
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
    """One results line: loss, accuracy and the barrier loss − R(α) with its paired standard error."""
    alpha = float(point.alpha)
    g = point.group
    ref = (1 - alpha) * stat_a.loss + alpha * stat_b.loss
    err_ref = (1 - alpha) * (1 - stat_a.accuracy) + alpha * (1 - stat_b.accuracy)
    d = stats.block_loss - ((1 - alpha) * stat_a.block_loss + alpha * stat_b.block_loss)
    finite = math.isfinite(stats.loss)
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
        "barrier_se": _finite_or_none(standard_error(d)) if finite else None,
        "error_barrier": (1 - stats.accuracy) - err_ref,
        "tokens": stats.tokens,
    }
    if point.direction != "interp" or point.sample is not None:
        row["direction"] = point.direction
        row["sample"] = point.sample
    if not finite:
        row["nonfinite"] = True
    return row


def endpoint_row(which: str, stats: BlockStats) -> dict:
    """Row of a full endpoint model; keeps its per-block sums so a resumed scan needs no re-run."""
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
    }


def stats_from_endpoint_row(row: dict) -> BlockStats:
    return BlockStats(
        indices=torch.tensor(row["block_indices"], dtype=torch.long),
        loss_sum=torch.tensor(row["block_loss_sum"], dtype=torch.float64),
        correct=torch.tensor(row["block_correct"], dtype=torch.long),
        tokens_per_block=int(row["tokens_per_block"]),
    )


# -- results files ----------------------------------------------------------------------------------
def prepare_out_dir(out: Path, hashed: dict, *, resume: bool, overwrite: bool) -> bool:
    """Check (and on ``overwrite`` clear) the output folder; True when there are rows to resume."""
    if out.exists() and not out.is_dir():
        raise ScanError(f"{out}: exists and is not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        out.mkdir(parents=True, exist_ok=True)
        return False
    manifest = out / MANIFEST
    if resume:
        try:
            old = json.loads(manifest.read_text())
        except FileNotFoundError:
            raise ScanSettingsError(f"{out}: not a scan folder (no {MANIFEST}); nothing to resume") from None
        except ValueError:
            raise ScanSettingsError(f"{out}/{MANIFEST}: unreadable; cannot resume") from None
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
        return True
    if not overwrite:
        raise ScanError(f"{out}: output folder is not empty; pass overwrite=True to replace it or resume=True to continue")
    for name in OUTPUT_FILES:
        (out / name).unlink(missing_ok=True)
    return False


def settings_hash(hashed: dict) -> str:
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
    """Bytes the evaluator may keep for per-block base hidden states: a tenth of the free device
    memory (CPU: of the available RAM, at most 4 GiB). When they do not fit, prefixes are
    computed incrementally instead (one pass over the blocks per base)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(0.1 * free)
    import psutil

    return int(min(4 << 30, 0.1 * psutil.virtual_memory().available))


class ScanRunner:
    """Plans, orders and executes one scan into an output folder (see the module docstring).

    ``evaluate`` (default :meth:`evaluate_point`) maps a point to its :class:`BlockStats`; the
    runner handles endpoints, trivial points, row writing, resume and progress around it.
    """

    command = "scan"

    def __init__(self, pair, blocks: TokenBlocks, cfg: ScanConfig, out_dir: str | os.PathLike, *,
                 progress: bool = True, evaluate: Evaluate | None = None, plan: ScanPlan | None = None,
                 points: list[ScanPoint] | None = None, prefix_store_bytes: int | None = None):
        cfg.validate()
        self.pair = pair
        self.blocks = blocks
        self.cfg = cfg
        self.out = Path(out_dir)
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
        """Everything that changes the numbers: settings, model fingerprints, data, dtype."""
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
        }

    def result_settings(self) -> dict:
        return self.cfg.result_settings()

    def manifest(self, status: str, **extra) -> dict:
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
                     "tokens": self.blocks.num_blocks * (self.blocks.seq_len - 1)},
            "plan": self.plan.to_dict(),
            "num_points": len(self.points),
            "device": str(self.ev.device),
            "libraries": library_versions(),
            **extra,
        }

    # -- evaluation ---------------------------------------------------------------------------
    def endpoint(self, which: str) -> BlockStats:
        """The full model ``which``; its run records the base hidden states for prefix reuse."""
        self.pair.interp.set_base(which)
        return check_finite(self.ev.run(None, state=which, record=self.cfg.prefix), f"model {which.upper()}")

    def evaluate_point(self, point: ScanPoint) -> BlockStats:
        """The path point evaluated on the live model, with prefix reuse unless disabled."""
        return point_stats(self.pair, self.ev, point.group, point.alpha, base=point.base, method=self.cfg.method,
                           prefix=self.cfg.prefix)

    def evaluate(self, point: ScanPoint) -> BlockStats:
        if self._evaluate is not None:
            return self._evaluate(self, point)
        return self.evaluate_point(point)

    def trivial(self, point: ScanPoint) -> BlockStats | None:
        """Stats known without a forward: the base itself (α=0 into A, α=1 into B, full at 0/1)."""
        if point.direction != "interp":
            return self.ends["a"] if point.alpha == 0.0 and point.base == "a" else None
        which = is_endpoint(point.alpha, point.base, point.group.name == self.full.name)
        return self.ends[which] if which else None

    def shared_row(self, point: ScanPoint, done: dict[tuple, dict]) -> dict | None:
        """The full-model path is the same into A and into B: reuse the other base's row."""
        if point.group.name != self.full.name or point.direction != "interp":
            return None
        for other in ("a", "b"):
            row = done.get((point.group.name, other, float(point.alpha), "interp", None))
            if row is not None and other != point.base:
                return {**row, "base": point.base}
        return None

    def row(self, point: ScanPoint, stats: BlockStats) -> dict:
        return point_row(point, stats, self.ends["a"], self.ends["b"])

    def result_row(self, point: ScanPoint, done: dict[tuple, dict]) -> dict:
        """The result row of ``point``: shared with the other base, trivial, or evaluated."""
        row = self.shared_row(point, done)
        if row is not None:
            return row
        stats = self.trivial(point)
        return self.row(point, stats if stats is not None else self.evaluate(point))

    # -- driver -------------------------------------------------------------------------------
    def run(self, points: list[ScanPoint] | None = None, *, resume: bool = False, overwrite: bool = False,
            processes: SingleProcess | None = None) -> list[dict] | None:
        """Evaluate ``points`` (default: all) into the output folder; returns every row of the file.

        ``processes`` shares the run between processes (:class:`hf_llmc.analyses.distributed.Processes`);
        the main process then returns the rows and every other one None."""
        procs = processes or SingleProcess()
        points = self.points if points is None else points
        started = time.time()
        extra = {"parallel": procs.info} if procs.info else {}

        def prepare() -> bool:  # the main process owns the folder
            resuming = prepare_out_dir(self.out, self.hashed(), resume=resume, overwrite=overwrite)
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
    :class:`hf_llmc.analyses.distributed.Processes` shares it between several."""

    is_main = True
    #: What the manifest records as ``"parallel"`` (None: nothing).
    info: dict | None = None

    def prepare(self, fn: Callable[[], bool]) -> bool:
        """Run ``fn`` (check and open the output folder) where the folder is owned; its result everywhere."""
        return fn()

    def tidy(self, out: Path, resuming: bool) -> None:
        """Bring rows of an interrupted multi-process run into the results file (nothing here)."""

    def share(self, todo: list[ScanPoint]) -> list[ScanPoint]:
        """The points this process evaluates."""
        return todo

    def rows_file(self, out: Path) -> Path | None:
        """Where this process writes its rows."""
        return out / RESULTS

    def finish(self, out: Path) -> bool:
        """Wait for the other processes and merge their rows; True in the process that reports."""
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
    key wins)."""

    def __init__(self, pair, blocks, cfg, out_dir, **kwargs):
        super().__init__(pair, blocks, cfg, out_dir, **kwargs)
        if cfg.sequential is None:
            raise ScanError("SequentialScanRunner needs ScanConfig.sequential")
        self.seq = SequentialEstimator(pair, self.ev, blocks.num_blocks, cfg.sequential, record=cfg.prefix)
        self._outcomes: dict[tuple, Outcome] = {}

    def manifest(self, status: str, **extra) -> dict:
        out = super().manifest(status, **extra)
        out["sequential"] = {**self.cfg.sequential.result_settings(), "interval_description": INTERVAL_DESCRIPTION,
                             "schedule": self.seq.schedule,
                             "tokens_evaluated": self.seq.blocks_evaluated * (self.blocks.seq_len - 1)}
        return out

    def endpoint(self, which: str) -> BlockStats:
        return self.seq.endpoint(which, self.seq.schedule[0])

    def trivial(self, point: ScanPoint) -> BlockStats | None:
        if point.direction != "interp":
            return super().trivial(point)
        which = is_endpoint(point.alpha, point.base, point.group.name == self.full.name)
        return self.seq.endpoint(which, self.seq.schedule[0]) if which else None

    def evaluate(self, point: ScanPoint) -> BlockStats:
        if point.direction != "interp":
            raise ScanError("sequential estimation covers interpolation paths only")
        stats, outcome = self.seq.evaluate(point.group, point.alpha, point.base, self.cfg.method, self.cfg.prefix)
        self._outcomes[point.key] = outcome
        return stats

    def row(self, point: ScanPoint, stats: BlockStats) -> dict:
        n = stats.indices.numel()
        row = point_row(point, stats, self.seq.endpoint("a", n), self.seq.endpoint("b", n))
        outcome = self._outcomes.pop(point.key, None) or self.seq.exact(n)
        if outcome.look is not None and row["barrier"] is not None:
            row["barrier"], row["barrier_se"] = outcome.look.mean, outcome.look.se
        row.update(outcome.fields(stats.tokens_per_block))
        return row

    def run(self, points: list[ScanPoint] | None = None, *, resume: bool = False,
            overwrite: bool = False) -> list[dict]:
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



def run_scan(pair, blocks: TokenBlocks, cfg: ScanConfig, out_dir: str | os.PathLike, resume: bool = False,
             progress: bool = True, *, overwrite: bool = False) -> list[dict]:
    """Run the scan ``cfg`` of ``pair`` on ``blocks`` into ``out_dir``; return every result row.

    ``resume=True`` skips the points already in ``OUT/results.jsonl`` (a truncated last line is
    dropped) and raises :class:`ScanSettingsError` if the folder holds a scan of other settings,
    models or data. Without ``resume`` a non-empty folder needs ``overwrite=True``.
    """
    runner = ScanRunner if cfg.sequential is None else SequentialScanRunner
    return runner(pair, blocks, cfg, out_dir, progress=progress).run(resume=resume, overwrite=overwrite)
