"""Multi-process runs on Accelerate: data-parallel evaluation and split scan points.

Start N processes with ``torchrun --nproc_per_node N -m hf_llmc ...`` or
``accelerate launch --multi_gpu --num_processes N -m hf_llmc ...`` (one node or several). Each
process loads the pair on its own device (``cuda:local_rank``; CPU + gloo when there is no GPU).

* ``--parallel data``: every evaluation is split into contiguous shares of the token blocks;
  the per-block loss sums and top-1 counts of all processes are gathered, so every process
  holds the full per-block statistics (means and paired standard errors are exactly those of
  one process).
* ``--parallel points``: whole scan points are split between processes (see :mod:`hf_llmc.analyses.scan`).

Only the main process prints and writes outputs.
"""

from __future__ import annotations

import time

import torch

from ..config.errors import ScanError, UsageError
from ..config.files import write_json_atomic
from ..engine.evaluation import BlockStats
from ..engine.io import RowWriter, read_rows
from ..config import errors as error_types
from .scan import MANIFEST, RESULTS, _now, endpoint_row, prepare_out_dir, row_key, stats_from_endpoint_row

PARALLEL_MODES = ("none", "data", "points")


def init_processes(cpu: bool | None = None):
    """Accelerate's process state (must be the first Accelerate state object of the process).

    ``cpu=None`` uses the GPUs when there are any, else CPU processes talking over gloo."""
    from accelerate import PartialState

    if cpu is None:
        cpu = not torch.cuda.is_available()
    return PartialState(cpu=cpu)


def is_main_process() -> bool:
    """True in a single-process run and in process 0 of a multi-process run."""
    from accelerate import PartialState

    if not PartialState._shared_state:  # no state created: a plain single-process run
        return True
    return PartialState().is_main_process


def wait_for_everyone() -> None:
    from accelerate import PartialState

    if PartialState._shared_state:
        PartialState().wait_for_everyone()


class DataShard:
    """Splits block indices into contiguous per-process shares and gathers the results."""

    def __init__(self, state):
        self.state = state

    @property
    def num_processes(self) -> int:
        return int(self.state.num_processes)

    @property
    def index(self) -> int:
        return int(self.state.process_index)

    def split(self, indices: torch.Tensor) -> torch.Tensor:
        """This process's share (process order = block order, as in ``split_between_processes``)."""
        return torch.tensor_split(indices, self.num_processes)[self.index]

    def gather(self, local: BlockStats, indices: torch.Tensor) -> BlockStats:
        """The full per-block statistics, in the order of ``indices``, on every process."""
        from accelerate.utils import gather_object

        parts = gather_object([(local.indices.cpu(), local.loss_sum.cpu(), local.correct.cpu())])
        got = torch.cat([p[0] for p in parts])
        if not torch.equal(got, indices.cpu()):
            raise RuntimeError("data-parallel evaluation: processes evaluated different block lists")
        return BlockStats(
            indices=indices,
            loss_sum=torch.cat([p[1] for p in parts]),
            correct=torch.cat([p[2] for p in parts]),
            tokens_per_block=local.tokens_per_block,
        )


def setup_parallel(args) -> DataShard | None:
    """For a command with ``--parallel data|points``: start the process state and pick this
    process's device (``--device auto``: ``cuda:local_rank`` or CPU). Returns the
    :class:`DataShard` for ``data``, else None."""
    mode = getattr(args, "parallel", "none")
    if mode == "none":
        return None
    state = init_processes()
    if getattr(args, "device", "auto") == "auto":
        args.device = str(state.device)
    return DataShard(state) if mode == "data" else None


# -- scans ------------------------------------------------------------------------------------------
def rank_results_name(rank: int) -> str:
    return f"results.rank{rank}.jsonl"


def _merge_rank_files(out, keep: dict) -> list[dict]:
    """Append the rows of ``results.rank*.jsonl`` missing from ``results.jsonl`` (process order),
    then delete the rank files. ``keep`` maps row keys already present to their rows."""
    files = sorted(out.glob("results.rank*.jsonl"), key=lambda p: int(p.name.split(".")[1].removeprefix("rank")))
    added: list[dict] = []
    with RowWriter(out / RESULTS) as writer:
        for file in files:
            for row in read_rows(file):
                key = row_key(row)
                if key not in keep:
                    writer.write(row)
                    keep[key] = row
                    added.append(row)
    for file in files:
        file.unlink()
    return added


def run_scan_parallel(runner, mode: str, *, resume: bool = False, overwrite: bool = False) -> list[dict] | None:
    """Run a :class:`~hf_llmc.analyses.scan.ScanRunner` under N processes; returns the rows on process 0
    (None elsewhere).

    ``mode="data"``: every process runs every point on its share of the blocks (the runner's
    evaluator must carry a :class:`DataShard`); process 0 writes ``results.jsonl``.
    ``mode="points"``: the points still to do (in prefix-reuse order) are split into contiguous
    per-process runs; process ``r`` writes ``results.rank{r}.jsonl``, and process 0 merges them
    into ``results.jsonl`` (also when resuming an interrupted run) and writes the manifest.
    """
    from accelerate.utils import broadcast_object_list

    if mode not in ("data", "points"):
        raise UsageError(f"parallel={mode!r}: use data or points")
    state = init_processes()
    main = state.is_main_process
    out = runner.out
    info = {"mode": mode, "processes": int(state.num_processes)}
    started = time.time()
    message: list = [None, False]
    if main:
        try:
            resuming = prepare_out_dir(out, runner.hashed(), resume=resume, overwrite=overwrite)
            if resuming:  # rows of an interrupted parallel run
                _merge_rank_files(out, {row_key(r): r for r in read_rows(out / RESULTS, repair=True)})
            else:
                for leftover in out.glob("results.rank*.jsonl"):
                    leftover.unlink()
            write_json_atomic(out / MANIFEST, runner.manifest("running", started_at=_now(), parallel=info))
            message = [None, resuming]
        except ScanError as err:
            message = [f"{type(err).__name__}:{err}", False]
    broadcast_object_list(message, from_process=0)
    if message[0] is not None:
        kind, _, text = message[0].partition(":")
        raise getattr(error_types, kind, ScanError)(text)
    rows = read_rows(out / RESULTS) if message[1] else []
    done = {row_key(r): r for r in rows}
    for row in rows:
        if row.get("kind") == "endpoint":
            runner.ends[row["base"]] = stats_from_endpoint_row(row)
    todo = [p for p in runner.points if p.key not in done]
    if mode == "points":
        bounds = torch.tensor_split(torch.arange(len(todo)), state.num_processes)[state.process_index]
        mine = [todo[i] for i in bounds.tolist()]
        path = out / rank_results_name(state.process_index)
    else:
        mine = todo
        path = out / RESULTS if main else None
    missing_ends = [w for w in ("b", "a") if w not in runner.ends]
    if runner.cfg.bases == ["b"]:
        missing_ends.reverse()
    ends_writer = RowWriter(out / RESULTS) if main and missing_ends else None
    for which in missing_ends:  # every process needs both endpoints for its rows
        stats = runner.endpoint(which)
        runner.ends[which] = stats
        if ends_writer is not None:
            ends_writer.write(endpoint_row(which, stats))
    if ends_writer is not None:
        ends_writer.close()
    writer = RowWriter(path) if path is not None else None
    try:
        for point in mine:
            row = runner.result_row(point, done)
            if writer is not None:
                writer.write(row)
            done[point.key] = row
    finally:
        if writer is not None:
            writer.close()
    state.wait_for_everyone()
    if not main:
        return None
    all_rows = read_rows(out / RESULTS)
    if mode == "points":
        _merge_rank_files(out, {row_key(r): r for r in all_rows})
        all_rows = read_rows(out / RESULTS)
    keys = {row_key(r) for r in all_rows}
    complete = all(p.key in keys for p in runner.points)
    write_json_atomic(out / MANIFEST, runner.manifest(
        "complete" if complete else "partial", started_at=_now(started),
        elapsed_s=round(time.time() - started, 3), parallel=info))
    return all_rows
