"""The user-facing :class:`ModelPair`: the loaded pair (:class:`hf_llmc.model.pair.ModelPair`,
state only) plus one-line methods for what the layers above do with it.

It sits above every layer it calls into, so imports still point one way; inside hf-llmc the
functions themselves are used (:func:`hf_llmc.analyses.barrier.barrier`,
:func:`hf_llmc.outputs.merge.live.merge_live`, ...).
"""

from __future__ import annotations

import os

import torch

from .analyses import barrier as _barrier
from .analyses.barrier import BarrierResult
from .config.alphas import DEFAULT_ALPHAS
from .config.data import DataConfig
from .config.merge import MergeSpec
from .config.scan import SequentialConfig
from .engine import evaluation as _evaluation
from .engine.data import TokenBlocks, blocks_for
from .engine.evaluation import BlockStats, Evaluator
from .model import pair as _pair
from .model.selection import Group
from .outputs.merge.live import merge_live

__all__ = ["ModelPair"]


class ModelPair(_pair.ModelPair):
    """A live model holding A (or B), with lazy checkpoints of both.

    Load one with :meth:`from_pretrained`; measure with :meth:`barrier`, set merged weights with
    :meth:`merge`. Scans, distances and merge folders take the pair as their first argument
    (:func:`hf_llmc.run_scan`, :func:`hf_llmc.save_merged`, ...).
    """

    def blocks(self, data: DataConfig | TokenBlocks | str | os.PathLike | torch.Tensor) -> TokenBlocks:
        """Token blocks from a config, a local file path, ready blocks or an id tensor
        (see :func:`hf_llmc.engine.data.blocks_for`)."""
        return blocks_for(self, data)

    def evaluator(self, blocks: TokenBlocks, batch_size: int | None = None) -> Evaluator:
        """An evaluator of the live model on ``blocks`` (see :func:`hf_llmc.engine.evaluation.evaluator_for`)."""
        return _evaluation.evaluator_for(self, blocks, batch_size)

    def endpoint(self, which: str, ev: Evaluator, blocks: TokenBlocks, indices=None) -> BlockStats:
        """Stats of the full model ``which`` (see :func:`hf_llmc.engine.evaluation.endpoint`)."""
        return _evaluation.endpoint(self, which, ev, blocks, indices)

    def point(self, ev: Evaluator, group: Group, alpha: float, *, base: str = "a", method: str = "lerp",
              indices=None, prefix: bool = True) -> BlockStats:
        """Stats of one path point (see :func:`hf_llmc.engine.evaluation.point`)."""
        return _evaluation.point(self, ev, group, alpha, base=base, method=method, indices=indices, prefix=prefix)

    def barrier(self, data, layers: str | None = None, alphas=DEFAULT_ALPHAS, base: str = "a", method: str = "lerp",
                *, batch_size: int | None = None, prefix: bool = True, allow_extrapolation: bool = False,
                sequential: SequentialConfig | None = None) -> BarrierResult:
        """The barrier of the path of ``layers`` (None = the full model) into ``base``
        (see :func:`hf_llmc.analyses.barrier.barrier` for every argument)."""
        return _barrier.barrier(self, data, layers, alphas, base, method, batch_size=batch_size, prefix=prefix,
                                allow_extrapolation=allow_extrapolation, sequential=sequential)

    def merge(self, spec: MergeSpec | str | dict) -> torch.nn.Module:
        """Set the live model to the merge ``spec`` (a :class:`MergeSpec`, or ``"attn.0-3=0.5; mlp.*=0.25"``)
        and return it, ready for ``save_pretrained``/``push_to_hub``.

        No second model is built: the returned model *is* ``self.model``, now holding the merged
        weights. The pair's next evaluation streams its base back in first. To write a merge
        without touching the live model (and with a model card), use :func:`hf_llmc.save_merged`.
        """
        return merge_live(self, spec)
