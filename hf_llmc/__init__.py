"""hf-llmc: layer-wise linear mode connectivity for Hugging Face transformer checkpoints.

Public names are imported lazily so that ``import hf_llmc`` (and CLI commands that need no
model, such as ``hf-llmc push``) stay fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "BarrierResult": "barrier",
    "Group": "selection",
    "LoadConfig": "pair",
    "MergeSpec": "export",
    "ModelPair": "pair",
    "parse_spec": "selection",
    "resolve": "selection",
    "save_merged": "export",
    "ScanConfig": "scan",
    "SequentialConfig": "sequential",
    "DataConfig": "data",
}

__all__ = [*_EXPORTS, "__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from .barrier import BarrierResult
    from .export import MergeSpec, save_merged
    from .pair import LoadConfig, ModelPair
    from .data import DataConfig
    from .scan import ScanConfig
    from .selection import Group, parse_spec, resolve
    from .sequential import SequentialConfig


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'hf_llmc' has no attribute {name!r}")
