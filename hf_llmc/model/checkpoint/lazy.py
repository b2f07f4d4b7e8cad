"""Lazy, memory-mapped access to a checkpoint's tensors by parameter name.

A checkpoint is a local folder or a Hub repo id (+ revision, through huggingface_hub's cache,
honouring ``HF_HUB_OFFLINE``) holding single or sharded safetensors. Tensors are read one at a
time with positioned reads at the offsets of the safetensors header (not through a long-lived
memory map, whose touched pages would count as resident memory of this process), so nothing is
materialised until asked for and nothing stays resident after use. Pickled ``.bin`` / ``.pt``
weights are refused unless the caller opts in (then ``torch.load(weights_only=True, mmap=True)``).
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import zipfile
from pathlib import Path

import torch

from ...config.errors import CheckpointError, UnsafePathError
from ...config.security import safe_join
from .folders import PICKLE_INDEX, PICKLE_SINGLE, SAFE_INDEX, SAFE_SINGLE
from .safetensors import SafetensorsFile


def _refusal(err: BaseException) -> str | None:
    """What ``torch.load(weights_only=True)`` refused, when ``err`` is such a refusal (any torch wording).

    Returns:
        ``"it refers to NAME"`` (the global the pickle asks for), ``"it holds more than plain
        tensors"`` for another refusal, or None when ``err`` is not a weights-only refusal.
    """
    text = str(err)
    if not isinstance(err, pickle.UnpicklingError) and "weights_only" not in text and "Weights only" not in text:
        return None
    found = re.search(r"GLOBAL\s+([A-Za-z_][\w.]*)", text) or re.search(r"global[:\s]+'?([A-Za-z_][\w.]*)", text)
    if found:
        return f"it refers to {found.group(1)}"
    return "it holds more than plain tensors"


def _load_pickle(file: Path) -> dict:
    """``torch.load(weights_only=True)``: tensors only; a pickle that would run code or build other
    objects is refused with a :class:`CheckpointError` (never unpickled with full rights). Zip
    archives (``torch.save``'s format) are memory-mapped; older pickles are read whole."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    except Exception as err:  # noqa: BLE001 - UnpicklingError, RuntimeError, EOFError...
        refused = _refusal(err)
        if refused is not None:
            raise CheckpointError(
                f"{file.name}: refused by torch.load(weights_only=True) ({refused}); only plain tensors are loaded"
            ) from None
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else ""
        raise CheckpointError(f"{file.name}: unreadable pickled weights ({type(err).__name__}: {first}); is it truncated?") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
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
    def open_folder(cls, folder: Path, source: str, revision: str | None = None, *,
                    allow_pickle: bool = False) -> "LazyCheckpoint":
        """Open the weights in ``folder`` (resolved from ``source``; see
        :func:`hf_llmc.model.checkpoint.open_source`, which also opens adapters)."""
        files, pickled = cls._index(folder, allow_pickle)
        ckpt = cls(folder, str(source), revision, files, pickled)
        if not pickled:
            for file in sorted(set(files.values())):
                ckpt._handle(file)  # validates headers now: truncated files fail early
        return ckpt

    @staticmethod
    def _index(folder: Path, allow_pickle: bool) -> tuple[dict[str, Path], bool]:
        def from_index(index_file: Path) -> dict[str, Path]:
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
                    "safetensors, or pass allow_pickle=True to load with weights_only=True"
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


def fingerprint(ckpt: LazyCheckpoint) -> str:
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
