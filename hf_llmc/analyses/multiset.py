"""Several named evaluation sets in one scan, and averages over sets.

:class:`MultiSetRunner` drives one scan runner per set (:class:`~hf_llmc.analyses.scan.ScanRunner`,
its sequential or robustness variant) through one output folder: the endpoints are evaluated once
per set, every set keeps its own evaluator (so prefix reuse works per set) and its own sequential
estimator (each (point, set) pair stops on its own, in the same seeded block order), and a path point
is set in the live model once and evaluated on every set. Every row of ``results.jsonl`` carries
``dataset``.

Averages over sets (:func:`average_rows`): ``mean`` weights each set by its evaluated tokens (bits per
byte: by its bytes), ``macro`` weights every set equally; standard errors combine as for independent
sets, sqrt(Σ w_s² se_s²).
"""

from __future__ import annotations

import math
import os
import time
from typing import TYPE_CHECKING, Any

from ..config.errors import ScanError
from ..config.files import write_json_atomic
from ..config.security import display_name
from ..engine.data import TokenBlocks
from ..engine.io import MANIFEST, RESULTS, RowWriter, read_rows
from .scan import (
    ScanRunner,
    SequentialScanRunner,
    _now,
    _progress,
    endpoint_row,
    prefix_store_budget,
    prepare_out_dir,
    row_key,
    settings_hash,
    stats_from_endpoint_row,
)

if TYPE_CHECKING:
    from ..config.scan import ScanConfig
    from ..model.pair import ModelPair

#: Row fields averaged over sets (weighted by tokens for ``mean``).
AVERAGED = ("loss", "accuracy", "barrier", "error_barrier")
#: Fields that belong to one set's sequential run and have no average.
PER_SET_ONLY = ("interval", "decision", "stop_reason", "endpoint_blocks", "tokens_ceiling", "looks", "blocks_used",
                "se_method", "block_indices", "block_loss_sum", "block_correct", "block_bytes", "rounded_point",
                "nonfinite")


def dataset_names(rows: list[dict]) -> list[str]:
    """The evaluation sets of a run's rows, in the order they first appear.

    Args:
        rows: result rows.

    Returns:
        The ``dataset`` values (empty for a single-set run).
    """
    names: list[str] = []
    for r in rows:
        name = r.get("dataset")
        if name is not None and name not in names:
            names.append(name)
    return names


def _weighted(values: list[float | None], weights: list[float]) -> float | None:
    if any(v is None for v in values):
        return None
    return sum(w * v for w, v in zip(weights, values))


def average_row(rows: list[dict], how: str) -> dict:
    """One row averaging the rows of the same point (or endpoint) on every set.

    Args:
        rows: one row per set, of the same key.
        how: ``"mean"`` (weighted by tokens; bits per byte by bytes) or ``"macro"`` (equal weights).

    Returns:
        A row of the first row's point with ``dataset`` = ``how``: loss, accuracy, barrier, error
        barrier, barrier_se, tokens and, when every set has byte counts, bits_per_byte, barrier_bpb
        and barrier_bpb_se; per-set sequential fields are left out.
    """
    tokens = [r.get("tokens") or 0 for r in rows]
    total = sum(tokens)
    w = [t / total if how == "mean" and total else 1.0 / len(rows) for t in tokens]
    out = {k: v for k, v in rows[0].items() if k not in PER_SET_ONLY}
    out["dataset"] = how
    for key in AVERAGED:
        out[key] = _weighted([r.get(key) for r in rows], w)
    ses = [r.get("barrier_se") for r in rows]
    out["barrier_se"] = None if any(s is None for s in ses) else math.sqrt(sum((wk * s) ** 2 for wk, s in zip(w, ses)))
    out["perplexity"] = None if out["loss"] is None else (math.exp(out["loss"]) if out["loss"] < 700 else float("inf"))
    out["tokens"] = total
    if all("bits_per_byte" in r and r.get("bytes") for r in rows):
        nbytes = [r["bytes"] for r in rows]
        wb = [b / sum(nbytes) for b in nbytes] if how == "mean" else w
        out["bits_per_byte"] = _weighted([r.get("bits_per_byte") for r in rows], wb)
        out["barrier_bpb"] = _weighted([r.get("barrier_bpb") for r in rows], wb)
        bses = [r.get("barrier_bpb_se") for r in rows]
        out["barrier_bpb_se"] = None if any(s is None for s in bses) else \
            math.sqrt(sum((wk * s) ** 2 for wk, s in zip(wb, bses)))
        out["bytes"] = sum(nbytes)
    else:
        for key in ("bits_per_byte", "barrier_bpb", "barrier_bpb_se", "bytes"):
            out.pop(key, None)
    return out


def average_rows(rows: list[dict], how: str) -> list[dict]:
    """The rows of the average over sets: one per point (and endpoint) that every set has.

    Args:
        rows: the rows of a multi-set run (each with ``dataset``).
        how: ``"mean"`` or ``"macro"`` (see :func:`average_row`).

    Returns:
        The averaged rows, in the order of the first set's rows (the last row of a key wins).
    """
    names = dataset_names(rows)
    by_key: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        if r.get("dataset") in names:
            by_key.setdefault((r.get("kind") == "endpoint", *row_key(r)), {})[r["dataset"]] = r
    return [average_row([per[n] for n in names], how) for per in by_key.values() if len(per) == len(names)]


class MultiSetRunner:
    """One scan (or robustness run) on several named evaluation sets (see the module docstring).

    Args:
        pair: the loaded pair.
        sets: the named token blocks, one per set.
        cfg: the scan settings (``cfg.sequential``: every set stops on its own).
        out_dir: the output folder.
        progress: show a progress bar on a terminal.
        runner: the per-set runner class (default: :class:`ScanRunner`, or :class:`SequentialScanRunner`
            with ``cfg.sequential``); called as ``runner(pair, blocks, cfg, out_dir, **kwargs)``.
        prefix_store_bytes: memory for recorded base hidden states, shared by the sets (default:
            :func:`~hf_llmc.analyses.scan.prefix_store_budget`).
        **kwargs: more arguments of the per-set runner.

    Raises:
        ScanError: a set without a name, or repeated names.
    """

    def __init__(self, pair: ModelPair, sets: list[TokenBlocks], cfg: ScanConfig, out_dir: str | os.PathLike, *,
                 progress: bool = True, runner: type | None = None, prefix_store_bytes: int | None = None,
                 **kwargs: Any) -> None:
        names = [b.name for b in sets]
        if not sets or not all(names) or len(set(names)) != len(names):
            raise ScanError(f"evaluation sets need unique names (got {names})")
        runner = runner or (ScanRunner if getattr(cfg, "sequential", None) is None else SequentialScanRunner)
        self.pair = pair
        self.runners: dict[str, ScanRunner] = {}
        budget = prefix_store_bytes
        for blocks in sets:
            r = runner(pair, blocks, cfg, out_dir, progress=False, prefix_store_bytes=budget, **kwargs)
            if budget is None:  # one budget for all sets
                budget = prefix_store_budget(r.ev.device) // len(sets) if r.cfg.prefix else 0
                r.ev.prefix_store_bytes = budget if r.cfg.prefix else r.ev.prefix_store_bytes
            self.runners[blocks.name] = r
        first = next(iter(self.runners.values()))
        self.cfg = first.cfg  # the scan settings the runners evaluate with (robustness: its scan config)
        self.command, self.points, self.plan, self.full, self.out = first.command, first.points, first.plan, first.full, first.out
        self.progress = progress
        self.sets = sets

    # -- identity -----------------------------------------------------------------------------
    def hashed(self) -> dict:
        """What changes the numbers: the first set's :meth:`ScanRunner.hashed` with ``data`` per set.

        Returns:
            The dict hashed into the manifest.
        """
        first = next(iter(self.runners.values()))
        out = dict(first.hashed())
        out["data"] = [[b.name, b.fingerprint, b.num_blocks, b.seq_len] for b in self.sets]
        return out

    def manifest(self, status: str, **extra: Any) -> dict:
        """The content of ``scan.json``: the first set's manifest with ``data`` per set and every set's points.

        Args:
            status: ``running``, ``complete`` or ``partial``.
            **extra: more fields.

        Returns:
            The manifest; ``data`` holds ``sets`` (name -> source, fingerprint, blocks, seq_len, tokens)
            and ``datasets`` lists the names.
        """
        first = next(iter(self.runners.values()))
        out = first.manifest(status, **extra)
        hashed = self.hashed()
        out["hashed"], out["settings_hash"] = hashed, settings_hash(hashed)
        out["datasets"] = [b.name for b in self.sets]
        out["data"] = {"sets": {b.name: {
            "source": display_name(b.source) if b.source not in ("tensor", None) else b.source,
            "fingerprint": b.fingerprint, "num_blocks": b.num_blocks, "seq_len": b.seq_len,
            "tokens": b.num_blocks * (b.seq_len - 1)} for b in self.sets}}
        out["num_points"] = len(self.points) * len(self.sets)
        if "sequential" in out:
            out["sequential"]["tokens_evaluated"] = sum(
                r.seq.blocks_evaluated * (r.blocks.seq_len - 1) for r in self.runners.values())
        return out

    # -- driver -------------------------------------------------------------------------------
    def _evaluate_all(self, point, todo: list[str]) -> dict:
        """Statistics of ``point`` on the sets ``todo``; the point is set in the model once when the
        runners use the plain evaluation."""
        runners = [self.runners[n] for n in todo]
        plain = all(type(r).evaluate is ScanRunner.evaluate and r._evaluate is None for r in runners)
        if not plain or point.direction != "interp":
            return {n: self.runners[n].evaluate(point) for n in todo}
        group = point.group
        start = group.first_block if self.cfg.prefix and group.first_block else None
        self.pair.interp.set_base(point.base)
        out = {}
        with self.pair.interp.at([group], point.alpha, self.cfg.method):
            for name, r in zip(todo, runners):
                out[name] = r.ev.run(None, start_block=start, state=point.base)
        return out

    def run(self, *, resume: bool = False, overwrite: bool = False) -> list[dict]:
        """Evaluate every point on every set into the output folder.

        Args:
            resume: skip the (point, set) pairs already in the folder's results.
            overwrite: replace the scan files of a non-empty folder.

        Returns:
            Every row of the results file.

        Raises:
            ScanError: a non-empty folder without ``resume`` or ``overwrite``, or a damaged results line.
            ScanSettingsError: ``resume`` on a folder holding another run.
            NonFiniteLossError: an endpoint's loss is NaN or infinite.
        """
        started = time.time()
        resuming = prepare_out_dir(self.out, self.hashed(), resume=resume, overwrite=overwrite,
                                   sources=self.pair.source_folders(), kind=self.command)
        write_json_atomic(self.out / MANIFEST, self.manifest("running", started_at=_now()))
        results = self.out / RESULTS
        rows = read_rows(results, repair=True) if resuming else []
        done: dict[str, dict[tuple, dict]] = {n: {} for n in self.runners}
        for row in rows:
            r = self.runners.get(row.get("dataset"))
            if r is None:
                continue
            if row.get("kind") == "endpoint":
                stats = stats_from_endpoint_row(row)
                r.ends[row["base"]] = stats
                if isinstance(r, SequentialScanRunner):
                    r.seq.seed(row["base"], stats)
            else:
                done[row["dataset"]][row_key(row)] = row
        order = ["a", "b"] if self.cfg.bases == ["b"] else ["b", "a"]  # end on the first base
        todo = [p for p in self.points if any(p.key not in done[n] for n in self.runners)]
        with RowWriter(results) as writer, _progress(self.progress) as bar:
            task = bar.add_task(self.command, total=len(todo) + 2, current="")
            for which in order:
                bar.update(task, current=f"model {which.upper()}")
                for name, r in self.runners.items():
                    if which not in r.ends:
                        r.ends[which] = r.endpoint(which)
                        row = {"dataset": name, **endpoint_row(which, r.ends[which])}
                        writer.write(row)
                        rows.append(row)
                bar.advance(task)
            for point in todo:
                bar.update(task, current=f"{point.group.name} base {point.base.upper()} α={point.alpha:g}")
                found: dict[str, dict] = {}
                need: list[str] = []
                for name, r in self.runners.items():
                    if point.key in done[name]:
                        continue
                    row = r.shared_row(point, done[name])
                    stats = None if row is not None else r.trivial(point)
                    if row is not None:
                        found[name] = row
                    elif stats is not None:
                        found[name] = r.row(point, stats)
                    else:
                        need.append(name)
                if need:
                    for name, stats in self._evaluate_all(point, need).items():
                        found[name] = self.runners[name].row(point, stats)
                for name in self.runners:
                    if name in found:
                        row = {"dataset": name, **{k: v for k, v in found[name].items() if k != "dataset"}}
                        writer.write(row)
                        rows.append(row)
                        done[name][point.key] = row
                bar.advance(task)
            for name, r in self.runners.items():  # sequential: the endpoints on every block any point used
                if not isinstance(r, SequentialScanRunner):
                    continue
                for which in ("a", "b"):
                    n = r.seq.have(which)
                    if n > len(r.ends[which].indices):
                        row = {"dataset": name, **endpoint_row(which, r.seq.endpoint(which, n))}
                        writer.write(row)
                        rows = [row if (x.get("dataset"), x.get("kind"), x.get("base")) == (name, "endpoint", which)
                                else x for x in rows]
        complete = all(p.key in done[n] for p in self.points for n in self.runners)
        write_json_atomic(self.out / MANIFEST, self.manifest(
            "complete" if complete else "partial", started_at=_now(started), elapsed_s=round(time.time() - started, 3)))
        return rows


def run_scan_sets(pair: ModelPair, sets: list[TokenBlocks], cfg: ScanConfig, out_dir: str | os.PathLike,
                  resume: bool = False, progress: bool = True, *, overwrite: bool = False) -> list[dict]:
    """:func:`~hf_llmc.analyses.scan.run_scan` on several named evaluation sets (rows carry ``dataset``).

    Args:
        pair: the loaded pair.
        sets: the named token blocks (see :func:`~hf_llmc.engine.data.sets_for`).
        cfg: the scan settings.
        out_dir: the output folder.
        resume: skip the (point, set) pairs already in ``results.jsonl``.
        progress: show a progress bar on a terminal.
        overwrite: replace the scan files of a non-empty folder.

    Returns:
        Every row of the results file.

    Raises:
        ScanError: bad settings, unnamed sets, or a non-empty folder without ``resume`` or ``overwrite``.
        ScanSettingsError: ``resume`` on a folder holding another run.
        NonFiniteLossError: an endpoint's loss is NaN or infinite.
    """
    return MultiSetRunner(pair, sets, cfg, out_dir, progress=progress).run(resume=resume, overwrite=overwrite)

