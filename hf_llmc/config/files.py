"""File primitives every layer shares: the cache root and atomic JSON writes."""

from __future__ import annotations

import json
import os
from pathlib import Path


def cache_root() -> Path:
    """The folder hf-llmc caches into (token blocks, architectures), so repeated runs skip work.

    Returns:
        ``HF_LLMC_CACHE``, else ``$XDG_CACHE_HOME/hf_llmc`` (default ``~/.cache/hf_llmc``).
    """
    root = os.environ.get("HF_LLMC_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hf_llmc"
    return Path(root)


def write_json_atomic(path: str | os.PathLike, payload: dict) -> None:
    """Write JSON atomically (temporary file + rename), so a reader never sees a half-written file.

    Args:
        path: the file to write; its parent folder is created.
        payload: the JSON content (values JSON cannot hold are written with ``str``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)
