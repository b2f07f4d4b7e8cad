"""Lazy, memory-mapped access to a checkpoint's tensors by parameter name.

A checkpoint is a local folder or a Hub repo id (+ revision, through huggingface_hub's cache,
honouring ``HF_HUB_OFFLINE``) holding single or sharded safetensors. Tensors are read one at a
time with positioned reads at the offsets of the safetensors header (not through a long-lived
memory map, whose touched pages would count as resident memory of this process), so nothing is
materialised until asked for and nothing stays resident after use. Pickled ``.bin`` / ``.pt``
weights are refused unless the caller opts in (then ``torch.load(weights_only=True, mmap=True)``).
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import torch

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = ("pytorch_model.bin", "model.pt", "pytorch_model.pt")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja", "*.md"]


class CheckpointError(RuntimeError):
    """A checkpoint cannot be found, read or trusted; the message says what to do."""


def _looks_like_path(source: str) -> bool:
    return (
        source.startswith((".", "/", "~"))
        or os.sep in source.strip("/").replace("/", "", 1)
        or source.count("/") > 1
    )


def resolve_folder(
    source: str | os.PathLike,
    revision: str | None = None,
    *,
    token: str | bool | None = None,
    allow_patterns: list[str] | None = None,
) -> Path:
    """Return a local folder for ``source``: the folder itself, or a Hub snapshot in the cache."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{source}: is a file; pass the model folder")
    text = str(source)
    if _looks_like_path(text):
        raise CheckpointError(f"{source}: no such model folder")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(
            snapshot_download(
                text,
                revision=revision,
                token=token,
                allow_patterns=allow_patterns or HUB_PATTERNS,
            )
        )
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"{source}: not a local folder, and the Hub cannot be reached (offline, or not cached); "
            "check the path, or connect / unset HF_HUB_OFFLINE"
        ) from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{source}: revision {revision!r} not found on the Hub") from None
    except GatedRepoError:
        raise CheckpointError(f"{source}: gated repository; request access and log in") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{source}: no such local folder or Hub repository") from None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{source}: cannot be fetched from the Hub ({type(err).__name__})") from None


def display_name(source: str | os.PathLike) -> str:
    """A name safe to publish: a Hub id as is, a local folder by its last component only."""
    path = Path(source).expanduser()
    return path.resolve().name if path.exists() else str(source)


def _load_pickle(file: Path) -> dict:
    """``torch.load(weights_only=True)``: tensors only; a pickle that would run code or build other
    objects is refused with a :class:`CheckpointError` (never unpickled with full rights)."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - UnpicklingError, RuntimeError, EOFError...
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        if found:
            raise CheckpointError(
                f"{file.name}: refused by torch.load(weights_only=True) (it refers to {found.group(1)}); "
                "only plain tensors are loaded"
            ) from None
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else ""
        raise CheckpointError(f"{file.name}: unreadable pickled weights ({type(err).__name__}: {first}); is it truncated?") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{file.name}: not a state dict of tensors")
    return state


class LazyCheckpoint:
    """Tensors of one checkpoint, read on demand from memory-mapped files."""

    def __init__(self, folder: Path, source: str, revision: str | None, files: dict[str, Path], pickled: bool):
        self.folder = folder
        self.source = source
        self.revision = revision
        self.pickled = pickled
        self._files = files  # tensor name -> file
        # Parameter name -> stored key where transformers renames on save (Architecture.stored_names).
        self.stored_names: dict[str, str] = {}
        # Fused parameters (stored as several tensors) and the function that assembles one of
        # them, set for live pairs (hf_llmc.pair.FusedAssembler).
        self.fused: frozenset[str] = frozenset()
        self.assembler = None
        self._handles: dict[Path, object] = {}

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        source: str | os.PathLike,
        *,
        revision: str | None = None,
        allow_pickle: bool = False,
        token: str | bool | None = None,
        base_model: str | os.PathLike | None = None,
    ) -> "LazyCheckpoint":
        """Open ``source`` lazily. A PEFT LoRA adapter folder opens as the merged weights of its
        base (``base_model`` overrides the recorded one) + the adapter (:mod:`hf_llmc.adapters`)."""
        folder = resolve_folder(source, revision, token=token)
        from .adapters import AdapterCheckpoint, is_adapter_folder

        if is_adapter_folder(folder):
            return AdapterCheckpoint.open_adapter(
                folder, str(source), revision, base_model=base_model, allow_pickle=allow_pickle, token=token
            )
        files, pickled = cls._index(folder, allow_pickle)
        ckpt = cls(folder, str(source), revision, files, pickled)
        if not pickled:
            for file in sorted(set(files.values())):
                ckpt._handle(file)  # validates headers now: truncated files fail early
        return ckpt

    @staticmethod
    def _index(folder: Path, allow_pickle: bool) -> tuple[dict[str, Path], bool]:
        def from_index(index_file: Path) -> dict[str, Path]:
            from .security import UnsafePathError, safe_join

            try:
                weight_map = json.loads(index_file.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as err:
                raise CheckpointError(f"{index_file}: unreadable index ({err})") from None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{index_file}: unreadable index (weight_map is not a mapping of names to files)")
            out = {}
            for name, shard in weight_map.items():
                try:  # a shard name must not lead outside the folder (../x, /abs/path)
                    out[name] = safe_join(folder, shard)
                except UnsafePathError:
                    raise CheckpointError(
                        f"{index_file.name} names shard {shard}, which lies outside the model folder; refusing to read it"
                    ) from None
            for shard in sorted(set(out.values())):
                if not shard.is_file():
                    raise CheckpointError(f"{folder}: shard {shard.name} is listed in {index_file.name} but missing")
            return out

        if (folder / SAFE_INDEX).is_file():
            return from_index(folder / SAFE_INDEX), False
        if (folder / SAFE_SINGLE).is_file():
            return {name: folder / SAFE_SINGLE for name in SafetensorsFile(folder / SAFE_SINGLE).keys()}, False
        singles = [folder / name for name in PICKLE_SINGLE if (folder / name).is_file()]
        if (folder / PICKLE_INDEX).is_file() or singles:
            found = PICKLE_INDEX if (folder / PICKLE_INDEX).is_file() else singles[0].name
            if not allow_pickle:
                raise CheckpointError(
                    f"{folder}: only pickled weights ({found}); refusing to unpickle. Convert them to "
                    "safetensors, or pass --allow-pickle (allow_pickle=True) to load with weights_only=True"
                )
            if (folder / PICKLE_INDEX).is_file():
                return from_index(folder / PICKLE_INDEX), True
            state = _load_pickle(singles[0])
            return {name: singles[0] for name in state}, True
        raise CheckpointError(f"{folder}: no model weights (model.safetensors or {SAFE_INDEX}) found")

    def _handle(self, file: Path):
        handle = self._handles.get(file)
        if handle is None:
            if self.pickled:
                handle = _load_pickle(file)
            else:
                handle = SafetensorsFile(file)
            self._handles[file] = handle
        return handle

    # -- access -------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._files)

    def key_for(self, name: str, aliases: dict[str, str] | None = None) -> str | None:
        """The stored key for parameter ``name`` (tolerates a dropped/added base-model prefix, tied
        aliases and transformers' save-time renames); None when absent."""
        candidates = [name]
        if aliases:
            candidates.append(aliases.get(name, name))
            candidates.extend(a for a, c in aliases.items() if c == name)
        candidates.extend(self.stored_names[c] for c in list(candidates) if c in self.stored_names)
        for cand in list(candidates):
            head, _, rest = cand.partition(".")
            if rest:
                candidates.append(rest)
        for cand in candidates:
            if cand in self._files:
                return cand
        return None

    def __contains__(self, name: str) -> bool:
        return self.key_for(name) is not None

    def shape(self, name: str) -> tuple[int, ...]:
        key = self._require(name)
        handle = self._handle(self._files[key])
        return tuple(handle[key].shape) if self.pickled else handle.shape(key)

    def dtype(self, name: str, aliases: dict[str, str] | None = None) -> torch.dtype:
        """The stored dtype of ``name`` (from the safetensors header; no tensor data is read)."""
        key = self._require(name, aliases)
        handle = self._handle(self._files[key])
        return handle[key].dtype if self.pickled else handle.dtype(key)

    def get(self, name: str, aliases: dict[str, str] | None = None) -> torch.Tensor:
        """The stored tensor for ``name`` (CPU, stored dtype, memory-mapped where possible); a
        fused parameter is assembled from its stored pieces."""
        if name in self.fused and self.assembler is not None:
            return self.assembler(name)
        key = self._require(name, aliases)
        handle = self._handle(self._files[key])
        return handle[key] if self.pickled else handle.get(key)

    def location(self, name: str, aliases: dict[str, str] | None = None) -> tuple[Path, int, int] | None:
        """(file, byte offset, byte length) of the stored bytes of ``name`` in a safetensors file,
        for copying them unchanged (e.g. ``os.copy_file_range``); None for pickled weights."""
        key = self._require(name, aliases)
        if self.pickled:
            return None
        return self._handle(self._files[key]).location(key)

    def read_into(self, name: str, out: torch.Tensor, aliases: dict[str, str] | None = None) -> bool:
        """Read tensor ``name`` straight into ``out`` (no temporary) when ``out`` is a contiguous
        CPU tensor of the stored dtype and shape; returns False when it cannot."""
        if name in self.fused:
            return False
        key = self._require(name, aliases)
        if self.pickled or out.device.type != "cpu" or not out.is_contiguous():
            return False
        return self._handle(self._files[key]).read_into(key, out)

    def iter_chunks(self, name: str, chunk_bytes: int = 8 << 20, aliases: dict[str, str] | None = None):
        """Yield ``(start, flat_tensor)`` pieces of tensor ``name`` in storage order, each at most
        ``chunk_bytes`` large, so huge tensors never need a full-size temporary."""
        if self.pickled or name in self.fused:
            yield 0, self.get(name, aliases).reshape(-1)
            return
        key = self._require(name, aliases)
        yield from self._handle(self._files[key]).iter_chunks(key, chunk_bytes)

    def _require(self, name: str, aliases: dict[str, str] | None = None) -> str:
        key = self.key_for(name, aliases)
        if key is None:
            raise CheckpointError(f"{self.source}: tensor {name} is missing from the checkpoint")
        return key

    def close(self) -> None:
        self._handles.clear()


_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class SafetensorsFile:
    """Header-indexed reader of one safetensors file; validates offsets against the file size."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                if n > size - 8:
                    raise ValueError("header longer than the file")
                header = json.loads(fh.read(n))
        except (OSError, ValueError, struct.error) as err:
            raise CheckpointError(f"{self.path}: unreadable safetensors file ({err}); is it truncated?") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self._start = 8 + n
        self._entries = header
        for name, entry in header.items():
            begin, end = entry["data_offsets"]
            if self._start + end > size or entry["dtype"] not in _DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name} lies past the end of the file; is it truncated?")

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return _DTYPES[self._entries[name]["dtype"]]

    def get(self, name: str) -> torch.Tensor:
        entry = self._entries[name]
        begin, end = entry["data_offsets"]
        out = torch.empty(end - begin, dtype=torch.uint8)
        with open(self.path, "rb", buffering=0) as fh:
            fh.seek(self._start + begin)
            fh.readinto(memoryview(out.numpy()))
        return out.view(_DTYPES[entry["dtype"]]).reshape(entry["shape"])

    def iter_chunks(self, name: str, chunk_bytes: int):
        entry = self._entries[name]
        dtype = _DTYPES[entry["dtype"]]
        itemsize = torch.empty(0, dtype=dtype).element_size()
        begin, end = entry["data_offsets"]
        total = (end - begin) // itemsize
        step = max(1, chunk_bytes // itemsize)
        with open(self.path, "rb", buffering=0) as fh:
            fh.seek(self._start + begin)
            for start in range(0, total, step):
                n = min(step, total - start)
                buf = torch.empty(n * itemsize, dtype=torch.uint8)
                if fh.readinto(memoryview(buf.numpy())) != n * itemsize:
                    raise CheckpointError(f"{self.path}: short read for {name}; is the file truncated?")
                yield start, buf.view(dtype)

    def location(self, name: str) -> tuple[Path, int, int]:
        begin, end = self._entries[name]["data_offsets"]
        return self.path, self._start + begin, end - begin

    def read_into(self, name: str, out: torch.Tensor) -> bool:
        entry = self._entries[name]
        if _DTYPES[entry["dtype"]] != out.dtype or tuple(entry["shape"]) != tuple(out.shape):
            return False
        begin, end = entry["data_offsets"]
        with open(self.path, "rb", buffering=0) as fh:
            fh.seek(self._start + begin)
            view = memoryview(out.view(-1).view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
            if fh.readinto(view) != end - begin:
                raise CheckpointError(f"{self.path}: short read for {name}; is the file truncated?")
        return True
