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

import hashlib
import json
import math
import os
import platform
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .architecture import BLOCK_KINDS, Architecture
from .barrier import parse_alphas, standard_error
from .checkpoint import LazyCheckpoint, display_name
from .data import TokenBlocks
from .evaluation import BlockStats
from .interpolation import METHODS
from .selection import Group, SpecItem, all_groups, block_group, format_spec, make_group, union

MODES = ("single", "cumulative", "window")
GRANULARITIES = ("block", "sublayer", "module")
ORDERS = ("shallow", "deep", "random")
BASES = ("a", "b", "both")

RESULTS = "results.jsonl"
MANIFEST = "scan.json"
#: Files a scan or its report writes (removed by ``overwrite=True``; nothing else is touched).
OUTPUT_FILES = (RESULTS, MANIFEST, "summary.json", "report.md", "report.html", "heatmap.png",
                "cumulative.png", "robustness.png")


class ScanError(ValueError):
    """Bad scan settings, or an output folder that cannot be used (exit code 2)."""


class ScanSettingsError(ScanError):
    """``resume`` on a folder whose scan used different settings, models or data."""


@dataclass
class ScanConfig:
    """What a scan evaluates (plan, bases, α grid) and how."""

    mode: str = field(default="single", metadata={"help": "single: each group alone; cumulative: the first/last k blocks together; window: blocks i..i+W-1.", "choices": list(MODES)})
    granularity: str = field(default="block", metadata={"help": "Groups of a single scan: block (whole decoder blocks), sublayer (attn, mlp, norm of each block, plus embed, final_norm, head) or module (every parameter-owning module).", "choices": list(GRANULARITIES)})
    order: str = field(default="shallow", metadata={"help": "Cumulative order(s), comma-separated: shallow (first k blocks), deep (last k), random (seeded)."})
    seed: int = field(default=0, metadata={"help": "Seed of the random cumulative order."})
    window: int = field(default=2, metadata={"help": "Blocks per moving window (--mode window)."})
    base: str = field(default="a", metadata={"help": "Which model the unselected tensors come from: a, b or both.", "choices": list(BASES)})
    alphas: str = field(default="0.5", metadata={"help": "Comma-separated α values or a count N of evenly spaced points (0.5 always included)."})
    method: str = field(default="lerp", metadata={"help": "Interpolation method per tensor.", "choices": list(METHODS)})
    prefix: bool = field(default=True, metadata={"help": "Reuse the base model's hidden states before a group's first block.", "cli": False})
    batch_size: int | None = field(default=None, metadata={"help": "Blocks per forward (default: automatic).", "cli": False})
    sequential: _sequential.SequentialConfig | None = field(default=None, metadata={"help": "Sequential estimation: stop each point once its error bar allows (hf_llmc.sequential.SequentialConfig; None = every block).", "cli": False})

    # -- derived ------------------------------------------------------------------------------
    @property
    def orders(self) -> list[str]:
        return [o.strip() for o in str(self.order).split(",") if o.strip()]

    @property
    def bases(self) -> list[str]:
        return ["a", "b"] if self.base == "both" else [self.base]

    def alpha_list(self) -> list[float]:
        return parse_alphas(self.alphas)

    def validate(self) -> None:
        """Raise :class:`ScanError` with a one-line message on any bad value."""
        checks = (("mode", MODES), ("granularity", GRANULARITIES), ("base", BASES), ("method", METHODS))
        for name, valid in checks:
            if getattr(self, name) not in valid:
                raise ScanError(f"--{name} {getattr(self, name)}: use one of {', '.join(valid)}")
        if self.mode != "single" and self.granularity != "block":
            raise ScanError(f"--granularity {self.granularity}: only --mode single takes a granularity; cumulative and window scans move whole blocks")
        if not self.orders:
            raise ScanError("--order: empty; use shallow, deep or random (comma-separated)")
        for order in self.orders:
            if order not in ORDERS:
                raise ScanError(f"--order {order}: use one of {', '.join(ORDERS)} (comma-separated)")
        if self.window < 1:
            raise ScanError(f"--window {self.window}: must be at least 1")
        if self.batch_size is not None and self.batch_size < 1:
            raise ScanError(f"--batch-size {self.batch_size}: must be at least 1")
        if self.sequential is not None:
            try:
                self.sequential.validate()
            except ValueError as err:
                raise ScanError(str(err)) from None
        try:
            self.alpha_list()
        except ValueError as err:
            raise ScanError(str(err)) from None

    def result_settings(self) -> dict:
        """The settings that change the numbers (hashed for resume; prefix/batch size do not)."""
        out = {"mode": self.mode, "base": self.base, "alphas": self.alpha_list(), "method": self.method}
        if self.mode == "single":
            out["granularity"] = self.granularity
        if self.mode == "cumulative":
            out["order"] = self.orders
            if "random" in self.orders:
                out["seed"] = self.seed
        if self.mode == "window":
            out["window"] = self.window
        if self.sequential is not None:  # absent otherwise: fixed-budget hashes stay as they were
            out["sequential"] = self.sequential.result_settings()
        return out


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
    raise ScanError(f"--order {order}: use one of {', '.join(ORDERS)}")


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
            raise ScanError(f"--window {cfg.window}: the model has only {n} blocks")
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
def read_rows(path: str | os.PathLike, *, repair: bool = False) -> list[dict]:
    """Rows of a results file; a truncated last line (an interrupted write) is ignored, and cut
    off the file when ``repair`` is set. A damaged line elsewhere raises :class:`ScanError`."""
    path = Path(path)
    if not path.is_file():
        return []
    raw = path.read_bytes()
    rows: list[dict] = []
    pos = good_end = 0
    while pos < len(raw):
        nl = raw.find(b"\n", pos)
        end = len(raw) if nl == -1 else nl + 1
        line = raw[pos:end].strip()
        if line:
            try:
                row = json.loads(line)
                if not isinstance(row, dict) or "group" not in row:
                    raise ValueError("not a result row")
            except ValueError:
                if raw[end:].strip():
                    lineno = raw.count(b"\n", 0, pos) + 1
                    raise ScanError(f"{path}: line {lineno} is damaged; remove it and resume") from None
                break  # an interrupted final write
            rows.append(row)
        good_end = end
        pos = end
    if repair and good_end < len(raw):
        with open(path, "r+b") as fh:
            fh.truncate(good_end)
    if repair and good_end and not raw[:good_end].endswith(b"\n"):
        with open(path, "ab") as fh:
            fh.write(b"\n")
    return rows


class RowWriter:
    """Appends rows to a JSON-lines file; each line is flushed and fsynced before the next."""

    def __init__(self, path: Path):
        self.path = path
        self._fh = open(path, "ab")

    def write(self, row: dict) -> None:
        self._fh.write((json.dumps(row, allow_nan=False) + "\n").encode())
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> "RowWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_json_atomic(path: str | os.PathLike, payload: dict) -> None:
    """Write JSON atomically (temporary file + rename), creating the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def checkpoint_fingerprint(ckpt: LazyCheckpoint) -> str:
    """Hash of the weight files' names, sizes and safetensors headers (tensor names, dtypes,
    shapes, offsets) plus config.json: cheap, and changes when another checkpoint is used."""
    h = hashlib.sha256()
    folder = Path(ckpt.folder)
    for file in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")) + [folder / "config.json"]:
        if not file.is_file():
            continue
        size = file.stat().st_size
        h.update(f"{file.name}:{size}\n".encode())
        with open(file, "rb") as fh:
            if file.suffix == ".safetensors":
                head = fh.read(8)
                n = int.from_bytes(head, "little") if len(head) == 8 else 0
                h.update(head + fh.read(min(n, size)))
            elif file.suffix == ".json":
                h.update(fh.read())
    return h.hexdigest()[:16]


def library_versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("hf-llmc", "torch", "transformers", "safetensors", "huggingface_hub", "accelerate"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


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
        raise ScanError(f"{out}: output folder is not empty; pass --overwrite to replace it or --resume to continue")
    for name in OUTPUT_FILES:
        (out / name).unlink(missing_ok=True)
    return False


def settings_hash(hashed: dict) -> str:
    return hashlib.sha256(json.dumps(hashed, sort_keys=True, default=str).encode()).hexdigest()[:16]


# -- execution --------------------------------------------------------------------------------------
def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

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
        self.ev = pair.evaluator(blocks, cfg.batch_size)
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
            "model_a": [display_name(pair.source_a), pair.ckpt_a.revision, checkpoint_fingerprint(pair.ckpt_a)],
            "model_b": [display_name(pair.source_b), pair.ckpt_b.revision, checkpoint_fingerprint(pair.ckpt_b)],
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
        from .pair import check_finite

        self.pair.interp.set_base(which)
        return check_finite(self.ev.run(None, state=which, record=self.cfg.prefix), f"model {which.upper()}")

    def evaluate_point(self, point: ScanPoint) -> BlockStats:
        """The path point evaluated on the live model, with prefix reuse unless disabled."""
        return self.pair.point(self.ev, point.group, point.alpha, base=point.base, method=self.cfg.method,
                               prefix=self.cfg.prefix)

    def evaluate(self, point: ScanPoint) -> BlockStats:
        if self._evaluate is not None:
            return self._evaluate(self, point)
        return self.evaluate_point(point)

    def trivial(self, point: ScanPoint) -> BlockStats | None:
        """Stats known without a forward: the base itself (α=0 into A, α=1 into B, full at 0/1)."""
        if point.direction != "interp":
            return self.ends["a"] if point.alpha == 0.0 and point.base == "a" else None
        full = point.group.name == self.full.name
        if point.alpha == 0.0 and (point.base == "a" or full):
            return self.ends["a"]
        if point.alpha == 1.0 and (point.base == "b" or full):
            return self.ends["b"]
        return None

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
    def run(self, points: list[ScanPoint] | None = None, *, resume: bool = False, overwrite: bool = False) -> list[dict]:
        """Evaluate ``points`` (default: all) into the output folder; returns every row of the file."""
        points = self.points if points is None else points
        resuming = prepare_out_dir(self.out, self.hashed(), resume=resume, overwrite=overwrite)
        results = self.out / RESULTS
        rows = read_rows(results, repair=True) if resuming else []
        done = {row_key(r): r for r in rows}
        started = time.time()
        write_json_atomic(self.out / MANIFEST, self.manifest("running", started_at=_now()))
        for row in rows:
            if row.get("kind") == "endpoint":
                self.ends[row["base"]] = stats_from_endpoint_row(row)
        todo = [p for p in points if p.key not in done]
        missing_ends = [w for w in ("b", "a") if w not in self.ends]  # end on A: base A runs first
        if self.cfg.bases == ["b"]:
            missing_ends.reverse()
        with RowWriter(results) as writer, _progress(self.progress) as bar:
            task = bar.add_task(self.command, total=len(todo) + len(missing_ends), current="")
            for which in missing_ends:
                bar.update(task, current=f"model {which.upper()}")
                stats = self.endpoint(which)
                row = endpoint_row(which, stats)
                writer.write(row)
                rows.append(row)
                self.ends[which] = stats
                bar.advance(task)
            for point in todo:
                bar.update(task, current=f"{point.group.name} base {point.base.upper()} α={point.alpha:g}")
                row = self.result_row(point, done)
                writer.write(row)
                rows.append(row)
                done[point.key] = row
                bar.advance(task)
        complete = all(p.key in done for p in self.points)
        write_json_atomic(self.out / MANIFEST, self.manifest(
            "complete" if complete else "partial", started_at=_now(started),
            elapsed_s=round(time.time() - started, 3)))
        return rows


def _now(ts: float | None = None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def run_scan(pair, blocks: TokenBlocks, cfg: ScanConfig, out_dir: str | os.PathLike, resume: bool = False,
             progress: bool = True, *, overwrite: bool = False) -> list[dict]:
    """Run the scan ``cfg`` of ``pair`` on ``blocks`` into ``out_dir``; return every result row.

    ``resume=True`` skips the points already in ``OUT/results.jsonl`` (a truncated last line is
    dropped) and raises :class:`ScanSettingsError` if the folder holds a scan of other settings,
    models or data. Without ``resume`` a non-empty folder needs ``overwrite=True``.
    """
    runner = ScanRunner if cfg.sequential is None else _sequential.SequentialScanRunner
    return runner(pair, blocks, cfg, out_dir, progress=progress).run(resume=resume, overwrite=overwrite)


# Sequential estimation builds on this module (its runner subclasses ScanRunner); imported last so
# that either module can be imported first. ScanConfig.sequential is annotated through it.
from . import sequential as _sequential  # noqa: E402
