"""hf-llmc: layer-wise linear mode connectivity for Hugging Face transformer checkpoints.

The documented Python API is :data:`__all__`. Names are imported lazily, so ``import hf_llmc``
stays fast and the command line imports torch only for the commands that need it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .config.version import __version__

#: Public name -> module that defines it.
_EXPORTS = {
    # loading and the pair
    "ModelPair": "api",
    "LoadConfig": "config.load",
    "lazy_pair": "model.pair",
    # settings
    "DataConfig": "config.data",
    "ScanConfig": "config.scan",
    "SequentialConfig": "config.scan",
    "RobustnessConfig": "config.scan",
    "MergeSpec": "config.merge",
    "ExportConfig": "config.merge",
    "PushConfig": "config.merge",
    "AutoConfig": "config.merge",
    "SearchConfig": "config.search",
    # layer specs
    "parse_spec": "config.spec",
    "Group": "model.selection",
    "resolve": "model.selection",
    # data and evaluation
    "TokenBlocks": "engine.data",
    "load_blocks": "engine.data",
    "sets_for": "engine.data",
    # analyses
    "BarrierResult": "analyses.barrier",
    "barrier": "analyses.barrier",
    "barrier_sets": "analyses.barrier",
    "run_scan": "analyses.scan",
    "run_scan_sets": "analyses.multiset",
    "sequential_decision": "analyses.sequential",
    "run_robustness": "analyses.robustness",
    "distances": "analyses.distances",
    "auto_select": "analyses.autoselect",
    "run_search": "analyses.search",
    # outputs
    "save_merged": "outputs.merge.save",
    "auto_merge": "outputs.merge.save",
    "MergeResult": "outputs.merge.save",
    "push_folder": "outputs.hub",
    "render_report": "outputs.report",
    # mergekit configs
    "load_mergekit": "config.mergekit",
    "spec_from_mergekit": "outputs.merge.mergekit",
    "emit_mergekit": "outputs.merge.mergekit",
    "search_merge": "outputs.search",
    "SearchOutcome": "outputs.search",
    # errors
    "HfLlmcError": "config.errors",
    "UsageError": "config.errors",
    "SpecError": "config.errors",
    "DataError": "config.errors",
    "MergeSpecError": "config.errors",
    "ScanError": "config.errors",
    "SearchError": "config.errors",
    "OutputExistsError": "config.errors",
    "CheckpointError": "config.errors",
    "PairError": "config.errors",
    "NonFiniteLossError": "config.errors",
    "HubError": "config.errors",
}
_RENAMED = {"render_report": "render", "search_merge": "search_and_merge"}

__all__ = [*_EXPORTS, "__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from .analyses.autoselect import auto_select
    from .analyses.barrier import BarrierResult, barrier, barrier_sets
    from .analyses.distances import distances
    from .analyses.multiset import run_scan_sets
    from .analyses.robustness import run_robustness
    from .analyses.scan import run_scan
    from .analyses.search import run_search
    from .analyses.sequential import sequential_decision
    from .api import ModelPair
    from .config.data import DataConfig
    from .config.errors import (
        CheckpointError,
        DataError,
        HfLlmcError,
        HubError,
        MergeSpecError,
        NonFiniteLossError,
        OutputExistsError,
        PairError,
        ScanError,
        SearchError,
        SpecError,
        UsageError,
    )
    from .config.load import LoadConfig
    from .config.merge import AutoConfig, ExportConfig, MergeSpec, PushConfig
    from .config.mergekit import load_mergekit
    from .config.scan import RobustnessConfig, ScanConfig, SequentialConfig
    from .config.search import SearchConfig
    from .config.spec import parse_spec
    from .engine.data import TokenBlocks, load_blocks, sets_for
    from .model.pair import lazy_pair
    from .model.selection import Group, resolve
    from .outputs.hub import push_folder
    from .outputs.merge.mergekit import emit_mergekit, spec_from_mergekit
    from .outputs.merge.save import MergeResult, auto_merge, save_merged
    from .outputs.report import render as render_report
    from .outputs.search import SearchOutcome, search_and_merge as search_merge


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(module, _RENAMED.get(name, name))
    raise AttributeError(f"module 'hf_llmc' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
