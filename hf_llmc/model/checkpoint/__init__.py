"""Lazy tensor access to checkpoints: safetensors shards (local or Hub), pickles only on opt-in,
PEFT LoRA adapters read as "base + adapter", fused (MoE) tensors from their stored pieces.

:func:`open_source` is the one entry point: it resolves a local folder or Hub id and returns a
:class:`LazyCheckpoint` (an :class:`AdapterCheckpoint` for an adapter folder).
"""

from __future__ import annotations

import os

from .adapters import AdapterCheckpoint, is_adapter_folder
from .folders import resolve_folder
from .lazy import LazyCheckpoint

__all__ = ["AdapterCheckpoint", "LazyCheckpoint", "open_source"]


def open_source(
    source: str | os.PathLike,
    *,
    revision: str | None = None,
    allow_pickle: bool = False,
    token: str | bool | None = None,
    base_model: str | os.PathLike | None = None,
) -> LazyCheckpoint:
    """Open a model argument lazily.

    Args:
        source: a local folder or Hub id (full model or PEFT LoRA adapter).
        revision: Hub revision of ``source``.
        allow_pickle: allow pickled ``.bin`` weights (``torch.load(weights_only=True)``).
        token: Hub token (default: huggingface_hub's usual sources).
        base_model: for an adapter, the base to apply it to (overrides the recorded one).

    Returns:
        A :class:`LazyCheckpoint`, or an :class:`AdapterCheckpoint` reading "base + adapter".

    Raises:
        CheckpointError: the folder is missing, unreadable, pickled without opt-in, truncated.
    """
    folder = resolve_folder(source, revision, token=token)
    if is_adapter_folder(folder):
        return AdapterCheckpoint.open_adapter(folder, str(source), revision, base_model=base_model,
                                              allow_pickle=allow_pickle, token=token)
    return LazyCheckpoint.open_folder(folder, str(source), revision, allow_pickle=allow_pickle)
