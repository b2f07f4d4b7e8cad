"""The architecture cache: ``HF_LLMC_CACHE/architectures/`` holds the
:class:`~hf_llmc.model.architecture.Architecture` discovered for a ``config.json``.

Discovery instantiates the model class on the meta device, which imports the transformers
modelling stack (seconds); a streamed merge needs only the parameter names the discovery found,
so with a cached entry ``hf-llmc merge`` never imports transformers. An architecture is looked up
in this order: the cache, the family table (:mod:`hf_llmc.model.families`: known families from
``config.json`` and the safetensors headers, also without transformers; cheap, so not cached),
then discovery (cached).

An architecture entry is keyed by the config's content (without the fields that do not change
the module tree: name, dtype, transformers version), the installed transformers version and the
discovery code itself (architecture.py and families.py), so a new transformers release or a
change to the discovery rules misses the cache. Configs with custom code (``auto_map``) are never
cached. Every use is checked against both checkpoints (parameter names and shapes), so a stale
entry cannot merge wrong tensors. Unwritable or damaged caches are ignored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from functools import cache
from importlib import metadata
from pathlib import Path

from ..config.files import cache_root, write_json_atomic
from . import architecture, families
from .architecture import Architecture, discover, load_config, meta_model
from .families import folder_tensors, table_architecture

#: config.json fields that do not change the parameter layout.
VOLATILE_CONFIG_KEYS = ("_name_or_path", "_commit_hash", "transformers_version", "torch_dtype", "dtype")


@cache
def _discovery_version() -> str:
    try:
        transformers_version = metadata.version("transformers")
    except metadata.PackageNotFoundError:
        transformers_version = "none"
    sources = b"".join(Path(module.__file__).read_bytes() for module in (architecture, families))
    code = hashlib.sha256(sources).hexdigest()[:16]
    return f"{transformers_version}-{code}"


def read_config(folder: Path) -> dict | None:
    """``folder/config.json`` as a dict, or None if missing or not a JSON object."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def architecture_key(config: dict) -> str | None:
    """Cache key of the architecture ``config`` describes; None when it must not be cached."""
    if "auto_map" in config:
        return None
    stable = {k: v for k, v in config.items() if k not in VOLATILE_CONFIG_KEYS}
    payload = json.dumps([_discovery_version(), stable], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def _architecture_path(key: str) -> Path:
    return cache_root() / "architectures" / f"{key}.json"


def load_architecture(key: str | None) -> Architecture | None:
    """The cached architecture for ``key``, or None (missing, unreadable or malformed)."""
    if key is None:
        return None
    try:
        data = json.loads(_architecture_path(key).read_text())
        data["shapes"] = {name: tuple(shape) for name, shape in data["shapes"].items()}
        return Architecture(**data)
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None


def store_architecture(key: str | None, arch: Architecture) -> None:
    """Remember ``arch`` under ``key`` (atomic write; failures are ignored: it is only a cache)."""
    if key is None:
        return
    try:
        write_json_atomic(_architecture_path(key), dataclasses.asdict(arch))
    except OSError:
        pass


def folder_architecture(folder: Path, trust_remote_code: bool = False) -> Architecture:
    """The architecture of the model whose ``config.json`` is in ``folder``: cached, else from the
    family table (:mod:`hf_llmc.model.families`, which needs the folder's safetensors headers: a
    folder without its weights, such as a Hub snapshot of the configs only, is discovered), else
    discovered on the meta device (and cached). Reads no weights."""
    config = None if trust_remote_code else read_config(folder)
    key = architecture_key(config) if config is not None else None
    arch = load_architecture(key)
    if arch is None and config is not None:
        arch = table_architecture(config, folder_tensors(folder))
    if arch is None:
        arch = discover(meta_model(load_config(folder, trust_remote_code), trust_remote_code=trust_remote_code))
        store_architecture(key, arch)
    return arch
