"""The streamed safetensors writer: each output tensor is read from the two lazy checkpoints,
mixed in float32, cast and appended to the open shard, whose header was written first from the
known shapes and dtypes; unchanged tensors are copied file to file by the kernel. Peak memory is
the import baseline plus a few tensors; no model is instantiated."""

from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import struct
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import torch

from ...config.errors import MergeSpecError, NonFiniteTensorError
from ...config.merge import DEFAULT_MAX_SHARD_SIZE
from ...config.security import safe_join
from ...model.checkpoint.adapters import AdapterCheckpoint
from ...model.checkpoint.fused import fused_pieces
from ...model.checkpoint.safetensors import DTYPES
from ...model.interpolation import mix
from .plan import MergePlan

INDEX_FILE = "model.safetensors.index.json"
OUT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ST_NAMES = {dtype: name for name, dtype in DTYPES.items()}
#: False, True (a progress bar on a terminal) or a callback ``progress(done, total)``.
Progress = Union[bool, Callable[[int, int], None]]


@dataclass
class TensorJob:
    """One tensor of the output: stored key, canonical parameter (the key itself for a piece of a
    fused parameter; None = copied as stored), α."""

    key: str
    param: str | None
    alpha: float | None
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def plan_tensors(pair, plan: MergePlan, dtype: torch.dtype | None = None) -> list[TensorJob]:
    """Output tensors in model order: the base checkpoint's keys, tied tensors stored once.

    Stored pieces of a fused parameter (MoE experts) are mixed piece by piece at that
    parameter's α (read under their own key from A and B: ``job.param`` is the key)."""
    arch, base = pair.arch, pair.ckpt_a if plan.base == "a" else pair.ckpt_b
    key_param: dict[str, str] = {}
    for name in arch.parameters:
        key = base.key_for(name, arch.aliases)
        if key is not None:
            key_param.setdefault(key, name)
    piece_alpha: dict[str, float | None] = {}
    for block, (names, keys) in fused_pieces(arch, base).items():
        alphas = {plan.alphas.get(n) for n in names}
        if len(alphas) > 1:
            raise MergeSpecError(f"the fused tensors of block {block} ({', '.join(names)}) must move together; "
                                 f"select them as one group (mlp.{block})")
        alpha = alphas.pop()
        if alpha is not None and plan.method != "lerp":
            raise MergeSpecError(f"method={plan.method!r}: fused tensors ({names[0]}) are merged piece by piece, "
                                 "which equals the whole tensor for lerp only; use method='lerp'")
        piece_alpha.update(dict.fromkeys(keys, alpha))
    tied_keys = {base.key_for(alias) for alias in arch.aliases} - set(key_param) - {None}
    ordered = list(key_param) + [k for k in base.keys() if k not in key_param and k not in tied_keys]
    jobs = []
    for key in ordered:
        param, alpha = key_param.get(key), None
        if param is not None:
            alpha = plan.alphas.get(param)
        elif piece_alpha.get(key) is not None:
            param, alpha = key, piece_alpha[key]
        stored = base.dtype(key)
        out = dtype if dtype is not None and stored.is_floating_point else stored
        shape = tuple(base.shape(key))
        vocab = getattr(pair, "vocab", None)
        if vocab is not None and param in vocab.params:  # the union vocabulary: every row
            dim = vocab.params[param]
            shape = shape[:dim] + (vocab.rows,) + shape[dim + 1:]
        jobs.append(TensorJob(key, param, alpha, shape, out))
    return jobs


def _lerp_owned(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """``interpolation.lerp`` bitwise, in place on freshly read tensors (fewer temporaries)."""
    a32 = a if a.dtype == torch.float32 else a.float()
    b32 = b if b.dtype == torch.float32 else b.float()
    a32.mul_(1.0 - alpha)
    b32.mul_(alpha)
    return a32.add_(b32)


def lerp_mergekit(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """(1-α)·A + α·B with mergekit's float32 operations (its linear merge with weights 1-α and α):
    ``zeros.addcmul_(A, w_A).addcmul_(B, w_B)`` with the weights rounded to float32 once, which
    may fuse the second product into the sum (then it differs from :func:`interpolation.lerp` by
    the float32 rounding of that product)."""
    w = torch.tensor([1.0 - alpha, alpha], dtype=torch.float32)
    a32, b32 = a.float(), b.float()
    out = torch.zeros_like(a32)
    out.addcmul_(a32, w[0])
    return out.addcmul_(b32, w[1])


def _stored_bytes(ckpt, key: str) -> ByteRange | None:
    """Where ``key``'s bytes lie unchanged in a safetensors file (None: pickled, adapter-modified)."""
    if isinstance(ckpt, AdapterCheckpoint):
        if key in ckpt.modified_keys():
            return None
        ckpt = ckpt.base
    where = ckpt.location(key) if hasattr(ckpt, "location") else None
    return ByteRange(*where) if where is not None else None


def _tensor(pair, job: TensorJob, plan: MergePlan) -> torch.Tensor | ByteRange:
    aliases = pair.arch.aliases
    base = plan.base
    ckpts = {"a": pair.ckpt_a, "b": pair.ckpt_b}
    keep = 0.0 if plan.base == "a" else 1.0
    vocab = getattr(pair, "vocab", None)
    if vocab is not None and job.param in vocab.params:
        return _vocab_tensor(pair, job, plan, keep)
    if job.param is None or job.alpha is None or job.alpha == keep:
        if ckpts[base].dtype(job.key) == job.dtype:
            stored = _stored_bytes(ckpts[base], job.key)
            if stored is not None:
                return stored
        value = ckpts[base].get(job.key)
    else:
        a = ckpts["a"].get(job.param, aliases)
        b = ckpts["b"].get(job.param, aliases)
        owned = not (pair.ckpt_a.pickled or pair.ckpt_b.pickled)  # pickled reads are shared memory maps
        if plan.method == "lerp" and plan.lerp_ops == "mergekit":
            value = lerp_mergekit(a, b, job.alpha)
        else:
            value = _lerp_owned(a, b, job.alpha) if plan.method == "lerp" and owned else mix(a, b, job.alpha, plan.method)
        del a, b
        value = value.to(job.dtype)
        if value.is_floating_point() and not math.isfinite(float(value.sum(dtype=torch.float64))):
            raise NonFiniteTensorError(
                f"{job.key}: non-finite values (NaN/inf) at alpha={job.alpha:g}; A or B holds NaN/inf weights"
                + (" or the output dtype overflows" if job.dtype != torch.float32 else "")
            )
    if tuple(value.shape) != job.shape:
        raise RuntimeError(f"{job.key}: shape {tuple(value.shape)} differs from the base's {job.shape}")
    return value.to(job.dtype)


def _vocab_tensor(pair, job: TensorJob, plan: MergePlan, keep: float) -> torch.Tensor:
    """A vocabulary-indexed tensor in the union layout (:mod:`hf_llmc.model.vocab`): at the base's
    end when unselected, else at its α; one-side rows follow the pair's ``added_rows`` rule."""
    vocab, dim = pair.vocab, pair.vocab.params[job.param]
    a = pair.ckpt_a.get(job.param, pair.arch.aliases)
    b = pair.ckpt_b.get(job.param, pair.arch.aliases)
    au, bu = vocab.endpoints(a, b, dim)
    del a, b
    alpha = keep if job.alpha is None else job.alpha
    if alpha == keep:
        value = au if keep == 0.0 else bu
    elif plan.method == "lerp":  # in place on the owned union tensors (interpolation.lerp bitwise)
        own = vocab.added_rows == "own"
        only = vocab.only_a | vocab.only_b
        kept = au.movedim(dim, 0)[only].clone() if own else None  # own: one-side rows are the same in au and bu
        value = _lerp_owned(au, bu, alpha)
        del bu
        if own:
            value.movedim(dim, 0)[only] = kept
    else:
        value = vocab.fix_rows(mix(au, bu, alpha, plan.method), au, bu, dim)
    value = value.to(job.dtype)
    if not math.isfinite(float(value.sum(dtype=torch.float64))):
        raise NonFiniteTensorError(f"{job.key}: non-finite values (NaN/inf) at alpha={alpha:g}; A or B holds NaN/inf weights"
                                   + (" or the output dtype overflows" if job.dtype != torch.float32 else ""))
    if tuple(value.shape) != job.shape:
        raise RuntimeError(f"{job.key}: shape {tuple(value.shape)} differs from the union's {job.shape}")
    return value


@dataclass(frozen=True)
class ByteRange:
    """Stored bytes of an unchanged tensor, copied file to file by the kernel (no user buffer)."""

    path: Path
    offset: int
    length: int

    def copy_to(self, fh) -> None:
        """Append the bytes to the unbuffered file ``fh`` (``copy_file_range``, else ``pread``)."""
        with open(self.path, "rb", buffering=0) as src:
            done = 0
            if hasattr(os, "copy_file_range"):
                try:
                    while done < self.length:
                        n = os.copy_file_range(src.fileno(), fh.fileno(), self.length - done, self.offset + done)
                        if n == 0:
                            break
                        done += n
                except OSError:
                    pass  # e.g. across file systems on old kernels: copy through memory below
            while done < self.length:
                chunk = os.pread(src.fileno(), min(self.length - done, 1 << 24), self.offset + done)
                if not chunk:
                    raise RuntimeError(f"{self.path}: short read; is the file truncated?")
                fh.write(chunk)
                done += len(chunk)


class _BackgroundWriter:
    """Writes byte tensors to a file in a second thread, so reading and mixing the next tensor
    overlaps the (usually disk-bound) write of this one; at most ``depth`` tensors wait."""

    def __init__(self, fh, depth: int = 1):
        self.fh = fh
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="hf-llmc-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is None:
                try:
                    if isinstance(item, ByteRange):
                        item.copy_to(self.fh)
                    else:
                        self.fh.write(memoryview(item.numpy()) if isinstance(item, torch.Tensor) else item)
                except BaseException as err:  # noqa: BLE001 - re-raised in the producing thread
                    self.error = err

    def write(self, data) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(data)

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


def _write_shard(path: Path, jobs: list[TensorJob], produce, advance) -> None:
    # Larger items first keeps every tensor aligned to its element size (as safetensors does).
    jobs = sorted(jobs, key=lambda j: -torch.empty((), dtype=j.dtype).element_size())
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for job in jobs:
        header[job.key] = {"dtype": _ST_NAMES[job.dtype], "shape": list(job.shape), "data_offsets": [offset, offset + job.nbytes]}
        offset += job.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb", buffering=0) as fh:
        writer = _BackgroundWriter(fh)
        try:
            writer.write(struct.pack("<Q", len(raw)) + raw)
            for job in jobs:
                value = produce(job)
                if isinstance(value, ByteRange):
                    if value.length != job.nbytes:
                        raise RuntimeError(f"{job.key}: {value.length} stored bytes, expected {job.nbytes}")
                    writer.write(value)
                else:
                    value = value.contiguous().reshape(-1)
                    data = value.view(torch.uint8) if value.numel() else torch.empty(0, dtype=torch.uint8)
                    if data.numel() != job.nbytes:
                        raise RuntimeError(f"{job.key}: {data.numel()} bytes, expected {job.nbytes}")
                    writer.write(data)
                    del data
                del value
                advance()
        finally:
            writer.close()


def shard_size_bytes(size: int | str) -> int:
    """``"5GB"`` / ``"500MB"`` / ``"40KB"`` (powers of 10, as transformers) or a byte count -> bytes."""
    from huggingface_hub.serialization._base import parse_size_to_int

    text = str(size).strip()
    try:
        value = int(text) if text.isdigit() else parse_size_to_int(text)
    except ValueError:
        raise MergeSpecError(f"max_shard_size={size!r}: use e.g. 5GB, 500MB or a byte count") from None
    if value <= 0:
        raise MergeSpecError(f"max_shard_size={size!r}: must be positive")
    return value


def write_tensors(pair, plan: MergePlan, folder: Path, *, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                  dtype: torch.dtype | None = None, progress: Progress = False) -> list[str]:
    """Stream the merged tensors into ``folder`` as (sharded) safetensors; return the file names.

    ``progress``: True shows a progress bar on a terminal; a callable is called as
    ``progress(done, total)`` after each tensor is written."""
    from huggingface_hub import split_state_dict_into_shards_factory

    max_shard_size = shard_size_bytes(max_shard_size)
    jobs = {job.key: job for job in plan_tensors(pair, plan, dtype)}
    split = split_state_dict_into_shards_factory(
        jobs, get_storage_size=lambda j: j.nbytes, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
    )
    with _progress(progress, len(jobs), "writing merged tensors") as advance:
        for filename, keys in split.filename_to_tensors.items():
            # shard names never lead outside the folder
            _write_shard(safe_join(folder, filename), [jobs[k] for k in keys], lambda j: _tensor(pair, j, plan), advance)
    files = list(split.filename_to_tensors)
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(j.nbytes for j in jobs.values())}, "weight_map": split.tensor_to_filename}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        files.append(INDEX_FILE)
    return files


@contextlib.contextmanager
def _progress(progress: Progress, total: int, label: str):
    """``advance()`` after each unit of work: a rich bar (terminal), a callback, or nothing."""
    if callable(progress):
        done = [0]

        def advance() -> None:
            done[0] += 1
            progress(done[0], total)

        yield advance
        return
    if not progress or not sys.stderr.isatty():
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TimeElapsedColumn

    with Bar("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
             console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda: bar.advance(task)
