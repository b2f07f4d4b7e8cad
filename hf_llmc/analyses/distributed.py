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

from pathlib import Path

import torch

from ..config import errors as error_types
from ..config.errors import HfLlmcError, ScanError, UsageError
from ..engine.evaluation import BlockStats
from ..engine.io import RESULTS, RowWriter, read_rows
from .scan import SingleProcess, row_key

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


class Processes(SingleProcess):
    """A scan shared between the processes of a ``torchrun`` / ``accelerate launch`` run.

    ``mode="data"``: every process runs every point on its share of the blocks (the runner's
    evaluator carries a :class:`DataShard`); process 0 writes ``results.jsonl``.
    ``mode="points"``: the points still to do (in prefix-reuse order) are split into contiguous
    per-process runs; process ``r`` writes ``results.rank{r}.jsonl``, and process 0 merges them
    into ``results.jsonl`` (also when resuming an interrupted run) and writes the manifest.
    """

    def __init__(self, mode: str):
        if mode not in ("data", "points"):
            raise UsageError(f"parallel={mode!r}: use data or points")
        self.mode = mode
        self.state = init_processes()
        self.is_main = bool(self.state.is_main_process)
        self.info = {"mode": mode, "processes": int(self.state.num_processes)}

    def prepare(self, fn):
        from accelerate.utils import broadcast_object_list

        message: list = [None, False]
        if self.is_main:
            try:
                message = [None, fn()]
            except HfLlmcError as err:  # every process raises it, none waits forever
                message = [f"{type(err).__name__}:{err}", False]
        broadcast_object_list(message, from_process=0)
        if message[0] is not None:
            kind, _, text = message[0].partition(":")
            raise getattr(error_types, kind, ScanError)(text)
        return message[1]

    def tidy(self, out: Path, resuming: bool) -> None:
        if resuming:  # rows of an interrupted parallel run
            _merge_rank_files(out, {row_key(r): r for r in read_rows(out / RESULTS, repair=True)})
        else:
            for leftover in out.glob("results.rank*.jsonl"):
                leftover.unlink()

    def share(self, todo: list) -> list:
        if self.mode == "data":
            return todo
        bounds = torch.tensor_split(torch.arange(len(todo)), self.state.num_processes)[self.state.process_index]
        return [todo[i] for i in bounds.tolist()]

    def rows_file(self, out: Path) -> Path | None:
        if self.mode == "points":
            return out / rank_results_name(self.state.process_index)
        return out / RESULTS if self.is_main else None

    def finish(self, out: Path) -> bool:
        self.state.wait_for_everyone()
        if self.is_main and self.mode == "points":
            _merge_rank_files(out, {row_key(r): r for r in read_rows(out / RESULTS)})
        return self.is_main


def run_scan_parallel(runner, mode: str, *, resume: bool = False, overwrite: bool = False) -> list[dict] | None:
    """Run a :class:`~hf_llmc.analyses.scan.ScanRunner` under N processes (see :class:`Processes`);
    returns the rows on process 0, None elsewhere."""
    return runner.run(resume=resume, overwrite=overwrite, processes=Processes(mode))
