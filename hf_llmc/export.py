"""Merged checkpoints: merge specs, a streamed sharded safetensors writer, atomic output folders.

A :class:`MergeSpec` says which groups move to which α (``--layers attn.0-3 --alpha 0.5``,
repeated ``--set attn.0-3=0.5``, or a per-block gradient ``--alpha 0.1:0.9``); every other tensor
comes from the base checkpoint. :func:`save_merged` writes the merged model tensor by tensor: each
tensor is read from the two lazy checkpoints, mixed in float32, cast and appended to the open
shard, whose safetensors header was written first from the known shapes and dtypes. Peak memory is
the import baseline plus a few tensors; no model is instantiated. The folder (weights, config,
generation config, tokenizer files, model card, ``hf_llmc_config.yaml``) is built in a temporary
folder beside the destination and renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import ctypes
import fnmatch
import json
import math
import os
import queue
import shlex
import shutil
import struct
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from .barrier import check_alpha
from .checkpoint import _DTYPES, LazyCheckpoint, display_name
from .interpolation import METHODS, mix
from .selection import Group, make_group, parse_spec, resolve, union

CONFIG_FILE = "hf_llmc_config.yaml"
CARD_FILE = "README.md"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = "5GB"
DEFAULT_ALPHA = 0.5
TMP_MARK = ".hf-llmc-tmp-"
OUT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: Files copied from the base checkpoint's folder (config, generation config, tokenizer, processor).
TOKENIZER_PATTERNS = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "*.tiktoken",
)
COPY_PATTERNS = (
    "config.json", "generation_config.json", *TOKENIZER_PATTERNS, "chat_template.json", "chat_template.jinja",
    "preprocessor_config.json", "processor_config.json",
)
#: Test-only: seconds to sleep after each written tensor (lets tests interrupt a merge midway).
DELAY_ENV = "HF_LLMC_TEST_WRITE_DELAY"
MERGED = "merged"  # Interpolator base marker: the live model holds a merge, not a checkpoint
_ST_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


class MergeSpecError(ValueError):
    """A merge spec is malformed or out of range (usage error)."""


class OutputExistsError(ValueError):
    """The output folder exists and is not empty, and ``overwrite`` was not given (usage error)."""


class NonFiniteTensorError(RuntimeError):
    """A merged (or compared) tensor holds NaN or inf; nothing is written or reported."""


# -- merge spec ----------------------------------------------------------------------------------
def parse_alpha(value: str | float | int, *, allow_extrapolation: bool = False, what: str = "--alpha") -> tuple[float, float | None]:
    """``0.5`` -> (0.5, None); ``"0.1:0.9"`` -> (0.1, 0.9), a linear gradient over the selected blocks."""
    if isinstance(value, bool):
        raise MergeSpecError(f"{what} {value}: expected a number or START:END")
    if isinstance(value, (int, float)):
        parts = [float(value)]
    else:
        text = str(value).strip()
        try:
            parts = [float(p) for p in text.split(":")]
        except ValueError:
            raise MergeSpecError(f"{what} {text}: expected a number or START:END (e.g. 0.5 or 0.1:0.9)") from None
        if len(parts) not in (1, 2):
            raise MergeSpecError(f"{what} {text}: expected a number or START:END (e.g. 0.5 or 0.1:0.9)")
    for v in parts:
        check_alpha(v, allow_extrapolation=allow_extrapolation, what=what, error=MergeSpecError)
    return (parts[0], None) if len(parts) == 1 else (parts[0], parts[1])


def _num(x: float) -> str:
    """Shortest text that reads back as exactly ``x`` (``0.5``, ``1``, ``0.123456789``)."""
    text = repr(float(x))
    return text[:-2] if text.endswith(".0") else text


def format_alpha(start: float, end: float | None) -> str:
    """Inverse of :func:`parse_alpha` (exact)."""
    return _num(start) if end is None else f"{_num(start)}:{_num(end)}"


@dataclass
class MergeSpec:
    """Which tensors move to which point of the A-B path; the rest comes from the base."""

    layers: str | None = field(default=None, metadata={"help": "Layer spec to merge at --alpha, e.g. attn.0-3 or attn.*,mlp.0 (grammar of `hf-llmc layers`)."})
    alpha: str | float | None = field(default=None, metadata={"help": "α for --layers: a number (0 = A, 1 = B; default 0.5), or START:END for a linear gradient over the selected blocks in order."})
    sets: list[str] = field(default_factory=list, metadata={"help": "LAYERS=ALPHA items (repeatable --set), e.g. attn.0-3=0.5; a later item wins where items overlap.", "cli": False})
    method: str = field(default="lerp", metadata={"help": "Interpolation per tensor: lerp ((1-α)·A + α·B) or slerp.", "choices": list(METHODS)})
    base: str = field(default="a", metadata={"help": "Checkpoint the tensors outside the spec (and config, tokenizer) come from.", "choices": ["a", "b"]})
    allow_extrapolation: bool = field(default=False, metadata={"help": "Allow α outside [0, 1]."})

    def __post_init__(self) -> None:
        if isinstance(self.sets, str):
            self.sets = [self.sets]
        self.sets = list(self.sets or [])

    @classmethod
    def parse(cls, text: str, **kwargs) -> "MergeSpec":
        """``"attn.0-3=0.5; mlp.*=0.25"`` (``;``-separated ``LAYERS=ALPHA`` items) -> spec."""
        return cls(sets=[s.strip() for s in text.split(";") if s.strip()], **kwargs)

    def entries(self) -> list[tuple[str, float, float | None]]:
        """Validated ``(layers, alpha_start, alpha_end)`` items in order (``alpha_end`` None = constant)."""
        if self.method not in METHODS:
            raise MergeSpecError(f"--method {self.method}: use one of {', '.join(METHODS)}")
        if self.base not in ("a", "b"):
            raise MergeSpecError(f"--base {self.base}: use a or b")
        out: list[tuple[str, float, float | None]] = []
        if self.layers:
            parse_spec(self.layers)
            alpha = DEFAULT_ALPHA if self.alpha is None else self.alpha
            out.append((self.layers, *parse_alpha(alpha, allow_extrapolation=self.allow_extrapolation)))
        elif self.alpha is not None:
            raise MergeSpecError("--alpha needs --layers (or write --set LAYERS=ALPHA)")
        for item in self.sets:
            layers, eq, value = str(item).rpartition("=")
            if not eq or not layers.strip() or not value.strip():
                raise MergeSpecError(f"--set {item}: expected LAYERS=ALPHA, e.g. attn.0-3=0.5")
            parse_spec(layers.strip())
            out.append((layers.strip(), *parse_alpha(value, allow_extrapolation=self.allow_extrapolation, what=f"--set {item}:")))
        if not out:
            raise MergeSpecError("nothing to merge: give --layers SPEC [--alpha X], --set SPEC=X, or --auto")
        return out

    def validate(self) -> None:
        self.entries()

    @property
    def single_alpha(self) -> float | None:
        """The α when every item uses one constant α, else None."""
        values = {(s, e) for _, s, e in self.entries()}
        if len(values) == 1:
            start, end = values.pop()
            if end is None or end == start:
                return start
        return None

    def describe(self) -> str:
        """``attn.0-3=0.5; mlp.*=0.1:0.9`` (the ``--set`` form of every item)."""
        return "; ".join(f"{layers}={format_alpha(s, e)}" for layers, s, e in self.entries())

    def to_dict(self) -> dict:
        return asdict(self)

    def plan(self, arch) -> "MergePlan":
        return plan_merge(arch, self)


@dataclass
class PlanRow:
    """One resolved group of a merge spec and its α range."""

    group: str
    alpha_min: float
    alpha_max: float
    numel: int

    @property
    def alpha_text(self) -> str:
        return f"{self.alpha_min:g}" if self.alpha_min == self.alpha_max else f"{self.alpha_min:g}..{self.alpha_max:g}"


@dataclass
class MergePlan:
    """Canonical parameter name -> α for every tensor a spec selects (the rest is the base's)."""

    alphas: dict[str, float]
    rows: list[PlanRow]
    base: str
    method: str
    numel_total: int
    numel_changed: int
    groups: list[Group]

    @property
    def fraction_changed(self) -> float:
        """Fraction of the model's parameters whose value differs from the base (α != base end)."""
        return self.numel_changed / self.numel_total if self.numel_total else 0.0

    def changed(self) -> dict[float, list[str]]:
        """α -> names that actually move away from the base (in model order)."""
        keep = 0.0 if self.base == "a" else 1.0
        out: dict[float, list[str]] = {}
        for name, alpha in self.alphas.items():
            if alpha != keep:
                out.setdefault(alpha, []).append(name)
        return out


def _gradient(start: float, end: float | None, blocks: list[int]) -> dict[int, float]:
    if end is None:
        return {b: start for b in blocks}
    n = len(blocks)
    return {b: start + (end - start) * (i / (n - 1) if n > 1 else 0.0) for i, b in enumerate(blocks)}


def plan_merge(arch, spec: MergeSpec) -> MergePlan:
    """Resolve ``spec`` against ``arch``: α per canonical tensor, display rows, changed fraction.

    A gradient ``START:END`` runs linearly over the decoder blocks the item selects, in block
    order (a single block gets START); embeddings take START, the final norm and head END.
    """
    per_name: dict[str, float] = {}
    rows: list[PlanRow] = []
    groups: list[Group] = []
    for layers, start, end in spec.entries():
        resolved = resolve(layers, arch)
        blocks = sorted({b for g in resolved for b in g.blocks})
        by_block = _gradient(start, end, blocks)
        for group in resolved:
            values = []
            for p in group.parameters:
                canon = arch.canonical(p)
                b = arch.block_of(canon)
                alpha = start if (b is None or end is None) else (end if b >= arch.num_blocks else by_block[b])
                per_name.pop(canon, None)  # a later item wins, and takes its place in the order below
                per_name[canon] = alpha
                values.append(alpha)
            rows.append(PlanRow(group.name, min(values), max(values), group.numel))
            groups.append(group)
    order = {name: i for i, name in enumerate(arch.parameters)}
    alphas = dict(sorted(per_name.items(), key=lambda kv: order.get(kv[0], len(order))))
    keep = 0.0 if spec.base == "a" else 1.0
    total = sum(arch.numel.values())
    changed = sum(arch.numel[n] for n, a in alphas.items() if a != keep)
    return MergePlan(alphas, rows, spec.base, spec.method, total, changed, groups)


# -- live model ----------------------------------------------------------------------------------
def _set_points(pair, plan: MergePlan) -> list[str]:
    written: list[str] = []
    for alpha, names in plan.changed().items():
        group = make_group(pair.arch, f"merge@{alpha:g}", "set", names)
        written += pair.interp.set_point([group], alpha, plan.method)
    return written


@contextlib.contextmanager
def merged_state(pair, spec: MergeSpec) -> Iterator[MergePlan]:
    """Context in which ``pair.model`` holds the merged weights; the base is restored on exit."""
    plan = plan_merge(pair.arch, spec)
    pair.interp.set_base(spec.base)
    written: list[str] = []
    try:
        written = _set_points(pair, plan)
        yield plan
    finally:
        pair.interp.restore(written)


def merge_live(pair, spec: MergeSpec | str):
    """Set the pair's live model to the merged weights and return it (no second model is built).

    The pair's next evaluation (``point``/``endpoint``/``barrier``) streams a full base back in
    first, so the pair stays usable; the returned model is ``pair.model`` itself.
    """
    spec = as_spec(spec)
    plan = plan_merge(pair.arch, spec)
    pair.interp.set_base(spec.base)
    _set_points(pair, plan)
    pair.interp.base = MERGED  # not a checkpoint: set_base("a"/"b") rewrites every tensor
    return pair.model


def as_spec(spec: MergeSpec | str | dict) -> MergeSpec:
    if isinstance(spec, MergeSpec):
        return spec
    if isinstance(spec, str):
        return MergeSpec.parse(spec)
    if isinstance(spec, dict):
        return MergeSpec(**spec)
    raise TypeError(f"merge spec: expected MergeSpec, str or dict, got {type(spec).__name__}")


# -- streamed safetensors writer -----------------------------------------------------------------
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
    from .pair import fused_pieces

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
            raise MergeSpecError(f"--method {plan.method}: fused tensors ({names[0]}) are merged piece by piece, "
                                 "which equals the whole tensor for lerp only; use --method lerp")
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
        jobs.append(TensorJob(key, param, alpha, tuple(base.shape(key)), out))
    return jobs


def _lerp_owned(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """``interpolation.lerp`` bitwise, in place on freshly read tensors (fewer temporaries)."""
    a32 = a if a.dtype == torch.float32 else a.float()
    b32 = b if b.dtype == torch.float32 else b.float()
    a32.mul_(1.0 - alpha)
    b32.mul_(alpha)
    return a32.add_(b32)


def _stored_bytes(ckpt, key: str) -> ByteRange | None:
    """Where ``key``'s bytes lie unchanged in a safetensors file (None: pickled, adapter-modified)."""
    from .adapters import AdapterCheckpoint

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
    delay = float(os.environ.get(DELAY_ENV) or 0)
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
                if delay:
                    time.sleep(delay)
        finally:
            writer.close()


def shard_size_bytes(size: int | str) -> int:
    """``"5GB"`` / ``"500MB"`` / ``"40KB"`` (powers of 10, as transformers) or a byte count -> bytes."""
    from huggingface_hub.serialization._base import parse_size_to_int

    text = str(size).strip()
    try:
        value = int(text) if text.isdigit() else parse_size_to_int(text)
    except ValueError:
        raise MergeSpecError(f"--max-shard-size {size}: use e.g. 5GB, 500MB or a byte count") from None
    if value <= 0:
        raise MergeSpecError(f"--max-shard-size {size}: must be positive")
    return value


def write_tensors(pair, plan: MergePlan, folder: Path, *, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                  dtype: torch.dtype | None = None, progress: bool = False) -> list[str]:
    """Stream the merged tensors into ``folder`` as (sharded) safetensors; return the file names."""
    from huggingface_hub import split_state_dict_into_shards_factory

    from .security import safe_join  # shard names never lead outside the folder

    max_shard_size = shard_size_bytes(max_shard_size)
    jobs = {job.key: job for job in plan_tensors(pair, plan, dtype)}
    split = split_state_dict_into_shards_factory(
        jobs, get_storage_size=lambda j: j.nbytes, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
    )
    with _progress(progress, len(jobs), "writing merged tensors") as advance:
        for filename, keys in split.filename_to_tensors.items():
            _write_shard(safe_join(folder, filename), [jobs[k] for k in keys], lambda j: _tensor(pair, j, plan), advance)
    files = list(split.filename_to_tensors)
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(j.nbytes for j in jobs.values())}, "weight_map": split.tensor_to_filename}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        files.append(INDEX_FILE)
    return files


@contextlib.contextmanager
def _progress(enabled: bool, total: int, label: str):
    if not enabled or not sys.stderr.isatty():
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda: bar.advance(task)


# -- output folder -------------------------------------------------------------------------------
def check_writable(folder: str | os.PathLike, shown: str | os.PathLike | None = None) -> None:
    """Raise :class:`OutputExistsError` (a usage error) unless files can be created in ``folder``
    (or, where it does not exist yet, in its nearest existing parent): checked before any work,
    so a result is never computed and then lost."""
    path = Path(folder).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    where = shown if shown is not None else folder
    if not path.is_dir():
        raise OutputExistsError(f"{where}: {path.name} is not a folder")
    if not os.access(path, os.W_OK | os.X_OK):
        raise OutputExistsError(f"{where}: cannot write there ({path.name or path} is not writable)")


def check_output_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Raise :class:`OutputExistsError` for an existing non-empty ``out_dir`` without ``overwrite``,
    or one that cannot be created (the folder is written beside it, then renamed into place)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(f"{out}: exists and is not empty; pass --overwrite to replace it")
    check_writable(out.absolute().parent, out)
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(out_dir: str | os.PathLike) -> list[Path]:
    """Remove temporary folders beside ``out_dir`` left by killed runs (their process is gone)."""
    out = Path(out_dir)
    removed = []
    if not out.parent.is_dir():
        return removed
    prefix = f".{out.name}{TMP_MARK}"
    for entry in out.parent.iterdir():
        if not entry.name.startswith(prefix) or not entry.is_dir():
            continue
        pid = entry.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out_dir``; on success it replaces ``out_dir`` at once.

    An existing non-empty ``out_dir`` needs ``overwrite`` and stays intact until the new folder is
    complete (then the two are swapped atomically where the OS allows). On error, or if the process
    is killed, ``out_dir`` is untouched; stale temporary folders are removed at the next run.
    """
    out = check_output_dir(out_dir, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
    tmp = out.parent / f".{out.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        check_output_dir(out, overwrite)
        if out.is_dir() and any(out.iterdir()):
            if not _exchange(tmp, out):
                old = out.parent / f".{out.name}{TMP_MARK}{os.getpid()}-old-{uuid.uuid4().hex[:8]}"
                os.rename(out, old)
                os.rename(tmp, out)
                tmp = old
            shutil.rmtree(tmp, ignore_errors=True)  # the previous content
        else:
            if out.is_dir():
                out.rmdir()
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_base_files(folder: Path, dest: Path, dtype: str | None = None) -> list[str]:
    """Copy config, generation config and tokenizer files; record a changed dtype in config.json."""
    copied = []
    for item in sorted(folder.iterdir()):
        if item.is_file() and any(fnmatch.fnmatch(item.name, p) for p in COPY_PATTERNS):
            shutil.copyfile(item, dest / item.name)
            copied.append(item.name)
    if dtype is not None and (dest / "config.json").is_file():
        config = json.loads((dest / "config.json").read_text())
        keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]
        for k in keys:
            config[k] = dtype
        (dest / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return copied


# -- settings ------------------------------------------------------------------------------------
@dataclass
class ExportConfig:
    """Where and how the merged checkpoint is written."""

    out: str | None = field(default=None, metadata={"help": "Output folder (written atomically)."})
    max_shard_size: str = field(default=DEFAULT_MAX_SHARD_SIZE, metadata={"help": "Largest safetensors shard, e.g. 5GB or 500MB (model.safetensors.index.json when sharded)."})
    dtype: str | None = field(default=None, metadata={"help": "Output dtype of floating tensors (default: as stored in the base).", "choices": list(OUT_DTYPES)})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing non-empty output folder (kept intact until the new one is complete)."})


@dataclass
class PushConfig:
    """Publishing the merged folder on the Hugging Face Hub."""

    push_to_hub: str | None = field(default=None, metadata={"help": "Hub repo id (user/name) to upload the merged folder to."})
    private: bool = field(default=False, metadata={"help": "Create the Hub repo as private."})
    revision: str | None = field(default=None, metadata={"help": "Hub branch to push to (created from main if missing)."})
    commit_message: str | None = field(default=None, metadata={"help": "Commit message of the upload."})


# -- evaluation of a merge -----------------------------------------------------------------------
EVAL_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def evaluate_merge(pair, spec: MergeSpec, data, *, batch_size: int | None = None) -> dict:
    """Loss / perplexity / accuracy of A, B and the merged model, and the barrier of the merged groups.

    The barrier is that of the union of the merged groups along its own path into the base
    (DESIGN.md definitions, α grid 0, 0.25, 0.5, 0.75, 1 plus the merge α). ``merge_barrier`` is
    L(merged) − ((1−α)·L_A + α·L_B) when the spec uses one α.
    """
    from .barrier import barrier_from_stats
    from .pair import check_finite

    blocks = pair.blocks(data)
    ev = pair.evaluator(blocks, batch_size)
    order = ("b", "a") if spec.base == "a" else ("a", "b")
    stats = {w: pair.endpoint(w, ev, blocks) for w in order}
    plan = plan_merge(pair.arch, spec)
    group = union(plan.groups, pair.arch, spec.describe())
    alpha = spec.single_alpha
    grid = sorted(set(EVAL_ALPHAS) | ({alpha} if alpha is not None else set()))
    curve = {}
    for a in grid:
        if a == 0.0 and spec.base == "a":
            curve[a] = stats["a"]
        elif a == 1.0 and spec.base == "b":
            curve[a] = stats["b"]
        else:
            curve[a] = check_finite(pair.point(ev, group, a, base=spec.base, method=spec.method), f"{group.name} at alpha={a:g}")
    result = barrier_from_stats(curve, stats["a"], stats["b"], layers=spec.describe(), base=spec.base, method=spec.method)
    if alpha is not None:
        merged = curve[alpha]
    else:
        with merged_state(pair, spec):
            merged = check_finite(ev.run(state=MERGED), "the merged model")
    out = {
        "data": _public(blocks.source),
        "dataset": getattr(data, "dataset", None),
        "fingerprint": blocks.fingerprint,
        "tokens": merged.tokens,
        "a": stats["a"].to_dict(),
        "b": stats["b"].to_dict(),
        "merged": merged.to_dict(),
        "barrier_max": result.barrier_max,
        "barrier_mid": result.barrier_mid,
        "barrier_mid_se": result.barrier_mid_se,
        "curve": {"alphas": result.alphas, "loss": result.loss},
    }
    if alpha is not None:
        out["alpha"] = alpha
        out["merge_barrier"] = merged.loss - ((1 - alpha) * stats["a"].loss + alpha * stats["b"].loss)
    return out


# -- reproducible description --------------------------------------------------------------------
def _public(value: str | None) -> str | None:
    """A local path by its last component; anything else (Hub ids, dataset names) unchanged."""
    if value is None:
        return None
    path = Path(str(value)).expanduser()
    if path.is_absolute() or path.exists():
        return display_name(value)
    return str(value)


def merge_command(source_a: str, source_b: str, spec: MergeSpec, export: ExportConfig, *, load=None, data=None,
                  push: PushConfig | None = None, auto=None) -> str:
    """The ``hf-llmc merge`` command that reproduces this merge (local paths by their name only)."""
    argv = ["hf-llmc", "merge", _public(source_a), _public(source_b)]
    if auto is not None:  # the automatic choice (an AutoChoice), as the user asked for it
        argv += ["--auto", "--max-barrier", _num(auto.max_barrier)]
        if auto.alpha != DEFAULT_ALPHA:
            argv += ["--alpha", _num(auto.alpha)]
        if auto.auto_layers:
            argv += ["--auto-layers", auto.auto_layers]
        if auto.scan_dir:
            argv += ["--scan-dir", Path(auto.scan_dir).name]
    else:
        if spec.layers:
            argv += ["--layers", spec.layers]
            if spec.alpha is not None:
                argv += ["--alpha", str(spec.alpha)]
        for item in spec.sets:
            argv += ["--set", item]
    if spec.method != "lerp":
        argv += ["--method", spec.method]
    if spec.base != "a":
        argv += ["--base", spec.base]
    if spec.allow_extrapolation:
        argv.append("--allow-extrapolation")
    if load is not None:
        for name in ("revision_a", "revision_b"):
            if getattr(load, name, None):
                argv += ["--" + name.replace("_", "-"), str(getattr(load, name))]
        if getattr(load, "base_model", None):
            argv += ["--base-model", _public(load.base_model)]
        if getattr(load, "trust_remote_code", False):
            argv.append("--trust-remote-code")
        if getattr(load, "allow_pickle", False):
            argv.append("--allow-pickle")
    if data is not None:
        if data.data:
            argv += ["--eval-data", _public(data.data)]
        if data.dataset:
            argv += ["--eval-dataset", data.dataset]
        if data.seq_len:
            argv += ["--seq-len", str(data.seq_len)]
        from .data import DEFAULT_MAX_TOKENS

        if data.max_tokens != DEFAULT_MAX_TOKENS:
            argv += ["--max-tokens", str(data.max_tokens)]
        if data.text_column != "text":
            argv += ["--text-column", data.text_column]
    if export.dtype:
        argv += ["--dtype", export.dtype]
    if export.max_shard_size != DEFAULT_MAX_SHARD_SIZE:
        argv += ["--max-shard-size", str(export.max_shard_size)]
    argv += ["--out", Path(export.out or "merged").name]
    if push is not None and push.push_to_hub:
        argv += ["--push-to-hub", push.push_to_hub]
        if push.private:
            argv.append("--private")
        if push.revision:
            argv += ["--revision", push.revision]
    return shlex.join(argv)


def reproduction_recipe(source_a: str, source_b: str, revision_a: str | None, revision_b: str | None, spec: MergeSpec,
                        export: ExportConfig, *, load=None, data=None) -> dict:
    """A recipe (``hf-llmc run``) with one pair and one merge step that rebuilds this folder."""
    from . import __version__

    step: dict = {"sets": [f"{layers}={format_alpha(s, e)}" for layers, s, e in spec.entries()],
                  "method": spec.method, "base": spec.base}
    if spec.allow_extrapolation:
        step["allow_extrapolation"] = True
    step["out"] = Path(export.out or "merged").name
    step["max_shard_size"] = str(export.max_shard_size)
    if export.dtype:
        step["dtype"] = export.dtype
    recipe: dict = {
        "description": f"Reproduces this merge (written by hf-llmc {__version__}). Run from the folder "
                       "holding the local models named below: hf-llmc run hf_llmc_config.yaml",
        "out": ".",
        "pairs": [{"name": "merge",
                   "a": {"model": _public(source_a), "revision": revision_a},
                   "b": {"model": _public(source_b), "revision": revision_b}}],
    }
    if load is not None:
        loading = {k: getattr(load, k) for k in ("dtype", "trust_remote_code", "allow_pickle", "base_model")
                   if getattr(load, k, None)}
        if "base_model" in loading:
            loading["base_model"] = _public(loading["base_model"])
        if loading:
            recipe["load"] = loading
    if data is not None:
        from .data import DataConfig

        d = {f.name: getattr(data, f.name) for f in fields(DataConfig) if getattr(data, f.name) != f.default}
        if "data" in d:
            d["data"] = _public(d["data"])
        recipe["data"] = d
        step["eval"] = True
    recipe["steps"] = [{"merge": step}]
    return recipe


def merge_provenance(pair, base_ckpt, dtype: str | None, evaluation: dict | None) -> dict:
    """What ``hf_llmc_config.yaml`` records besides the recipe (ignored when it is run): library
    versions, platform, the writer's device and output dtype, and the evaluation's device, dtype
    and data fingerprint. No paths."""
    from .provenance import environment, model_device_dtype

    if dtype is None:  # as stored: the base's floating dtype(s)
        stored = {str(base_ckpt.dtype(k)).removeprefix("torch.") for k in base_ckpt.keys()}
        dtype = "+".join(sorted(d for d in stored if d.startswith(("float", "bfloat")))) or None
    out = environment(device="cpu", dtype=dtype)
    if evaluation is not None:
        device, live_dtype = model_device_dtype(pair.model)
        out["evaluation"] = {"device": device, "dtype": live_dtype, "data": evaluation.get("data"),
                             "dataset": evaluation.get("dataset"), "fingerprint": evaluation.get("fingerprint"),
                             "tokens": evaluation.get("tokens")}
    return out


# -- the merge -----------------------------------------------------------------------------------
@dataclass
class MergeResult:
    """What :func:`save_merged` wrote."""

    folder: Path
    files: list[str]
    plan: MergePlan
    spec: MergeSpec
    evaluation: dict | None = None
    command: str = ""
    url: str | None = None
    seconds: float = 0.0

    @property
    def sharded(self) -> bool:
        return INDEX_FILE in self.files


def lazy_pair(a: str | os.PathLike, b: str | os.PathLike, *, revision_a: str | None = None, revision_b: str | None = None,
              trust_remote_code: bool = False, allow_pickle: bool = False, token: str | bool | None = None,
              base_model: str | os.PathLike | None = None):
    """A :class:`~hf_llmc.pair.ModelPair` without a live model, for streaming a merge: both
    checkpoints are opened lazily and checked for compatibility, nothing is loaded (enough to
    merge, not to evaluate). A or B may be a PEFT adapter (``base_model`` overrides its recorded
    base).

    When both folders hold the same tokenizer files, no tokenizer is loaded (``pair.tokenizer``
    is None); otherwise their vocabularies are compared. When this config was seen before
    (:mod:`hf_llmc.cache`) as well, nothing of transformers is imported and ``pair.model`` is
    None; otherwise the model is instantiated on the meta device to discover its architecture
    (``pair.model`` is that meta model).
    """
    from .adapters import AdapterCheckpoint, base_identity
    from .architecture import discover, meta_model
    from .cache import architecture_key, load_architecture, read_config, store_architecture
    from .pair import LoadConfig, ModelPair, PairError, _load_config, _load_tokenizer, check_same_architecture

    opts = dict(allow_pickle=allow_pickle, token=token, base_model=base_model)
    ckpt_a = LazyCheckpoint.open(a, revision=revision_a, **opts)
    ckpt_b = LazyCheckpoint.open(b, revision=revision_b, **opts)
    if isinstance(ckpt_a, AdapterCheckpoint) and isinstance(ckpt_b, AdapterCheckpoint) and base_identity(ckpt_a) != base_identity(ckpt_b):
        raise PairError(
            f"the adapters are on different base models: A on {display_name(ckpt_a.base.source)}, "
            f"B on {display_name(ckpt_b.base.source)}; pass --base-model to use one base for both"
        )
    load = LoadConfig(revision_a=revision_a, revision_b=revision_b, trust_remote_code=trust_remote_code,
                      allow_pickle=allow_pickle, base_model=None if base_model is None else str(base_model))
    same_tokenizer = same_tokenizer_files(ckpt_a.folder, ckpt_b.folder)
    raw_a, raw_b = read_config(ckpt_a.folder), read_config(ckpt_b.folder)
    key = architecture_key(raw_a) if raw_a is not None and raw_b is not None and not trust_remote_code else None
    arch = load_architecture(key)
    if arch is not None and same_tokenizer:
        check_same_architecture(*[(c.get("model_type"), c.get("architectures")) for c in (raw_a, raw_b)])
        pair = ModelPair(None, None, arch, ckpt_a, ckpt_b, load)
        try:
            pair._check_compatible(None)
            return pair
        except PairError:
            pass  # the checkpoints disagree with the cached entry: discover again (and report from there)
    cfg_a = _load_config(ckpt_a.folder, trust_remote_code)
    cfg_b = _load_config(ckpt_b.folder, trust_remote_code)
    check_same_architecture((cfg_a.model_type, cfg_a.architectures), (cfg_b.model_type, cfg_b.architectures))
    model = meta_model(cfg_a, trust_remote_code=trust_remote_code)
    tokenizer = None if same_tokenizer else _load_tokenizer(ckpt_a.folder, trust_remote_code)
    pair = ModelPair(model, tokenizer, discover(model), ckpt_a, ckpt_b, load)
    pair._check_compatible(None if same_tokenizer else _load_tokenizer(ckpt_b.folder, trust_remote_code))
    store_architecture(key, pair.arch)  # only once the checkpoints agree with it
    return pair


def same_tokenizer_files(a: Path, b: Path) -> bool:
    """Whether both folders hold the same tokenizer files, byte for byte (then their
    vocabularies are equal without loading either tokenizer)."""
    def files(folder: Path) -> dict[str, Path]:
        return {f.name: f for f in Path(folder).iterdir()
                if f.is_file() and any(fnmatch.fnmatch(f.name, p) for p in TOKENIZER_PATTERNS)}

    fa, fb = files(a), files(b)
    return fa.keys() == fb.keys() and all(fa[n].stat().st_size == fb[n].stat().st_size and fa[n].read_bytes() == fb[n].read_bytes() for n in fa)


def save_merged(
    pair,
    spec: MergeSpec | str | dict,
    out_dir: str | os.PathLike,
    *,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    dtype: str | None = None,
    overwrite: bool = False,
    data=None,
    batch_size: int | None = None,
    evaluation: dict | None = None,
    auto=None,
    push: PushConfig | None = None,
    card: bool = True,
    progress: bool = False,
) -> MergeResult:
    """Stream the merge of ``pair`` described by ``spec`` into ``out_dir`` (atomically).

    Reads each tensor from the pair's lazy checkpoints (the live model, if any, is not used for
    writing). ``data`` (a :class:`~hf_llmc.data.DataConfig`, path or token blocks) adds A's, B's
    and the merged model's perplexity and the merged groups' barrier to the card (needs a live
    model); ``evaluation`` passes such numbers in precomputed. ``auto`` (an
    :class:`~hf_llmc.autoselect.AutoChoice`) records an automatic choice. ``push`` uploads the
    finished folder with :func:`hf_llmc.hub.push_folder`.
    """
    t0 = time.perf_counter()
    spec = as_spec(spec)
    plan = plan_merge(pair.arch, spec)
    if dtype is not None and dtype not in OUT_DTYPES:
        raise MergeSpecError(f"--dtype {dtype}: use one of {', '.join(OUT_DTYPES)}")
    export = ExportConfig(out=str(out_dir), max_shard_size=str(max_shard_size), dtype=dtype, overwrite=overwrite)
    shard_size_bytes(max_shard_size)
    check_output_dir(out_dir, overwrite)
    if isinstance(data, (str, os.PathLike)):
        from .data import DataConfig

        data = DataConfig(data=str(data))
    data_cfg = data
    if data is not None and evaluation is None:
        evaluation = evaluate_merge(pair, spec, data, batch_size=batch_size)
    if data_cfg is not None and not hasattr(data_cfg, "max_tokens"):
        data_cfg = None  # token blocks / tensors: nothing reproducible to record
    base_ckpt = pair.ckpt_a if spec.base == "a" else pair.ckpt_b
    command = merge_command(pair.source_a, pair.source_b, spec, export, load=pair.load, data=data_cfg, push=push)
    if auto is not None:
        auto = {**auto.to_dict(), "command": merge_command(pair.source_a, pair.source_b, spec, export, load=pair.load,
                                                           data=data_cfg, push=push, auto=auto)}
    recipe = reproduction_recipe(pair.source_a, pair.source_b, pair.ckpt_a.revision, pair.ckpt_b.revision, spec, export,
                                 load=pair.load, data=data_cfg)
    recipe["provenance"] = merge_provenance(pair, base_ckpt, dtype, evaluation)
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        files = write_tensors(pair, plan, tmp, max_shard_size=max_shard_size,
                              dtype=OUT_DTYPES[dtype] if dtype else None, progress=progress)
        files += copy_base_files(base_ckpt.folder, tmp, dtype)
        import yaml

        from .security import redact

        config_text = redact(
            "# hf-llmc merge configuration; reproduce with: hf-llmc run hf_llmc_config.yaml\n"
            + yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True)
        )
        (tmp / CONFIG_FILE).write_text(config_text)
        files.append(CONFIG_FILE)
        if card:
            from .card import merge_card

            text = merge_card(
                source_a=pair.source_a, source_b=pair.source_b,
                revision_a=pair.ckpt_a.revision, revision_b=pair.ckpt_b.revision,
                plan=plan, spec=spec, command=command, config_yaml=config_text,
                evaluation=evaluation, auto=auto, license_folder=pair.ckpt_a.folder,
                model_name=Path(out_dir).resolve().name, repo_id=push.push_to_hub if push else None,
            )
            (tmp / CARD_FILE).write_text(text)
            files.append(CARD_FILE)
    result = MergeResult(Path(out_dir), files, plan, spec, evaluation, command, seconds=time.perf_counter() - t0)
    if push is not None and push.push_to_hub:
        from .hub import push_folder

        result.url = push_folder(result.folder, push.push_to_hub, private=push.private, revision=push.revision,
                                 commit_message=push.commit_message)
    return result
