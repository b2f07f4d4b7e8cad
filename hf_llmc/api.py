"""The user-facing :class:`ModelPair`: the loaded pair (:class:`hf_llmc.model.pair.ModelPair`,
state only) plus one-line methods for what the layers above do with it.

It sits above every layer it calls into, so imports still point one way; inside hf-llmc the
functions themselves are used (:func:`hf_llmc.analyses.barrier.barrier`,
:func:`hf_llmc.outputs.merge.live.merge_live`, ...).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .analyses import barrier as _barrier
from .analyses.barrier import BarrierResult
from .config.alphas import DEFAULT_ALPHAS, AlphaGrid
from .config.data import DataConfig
from .config.merge import MergeSpec
from .config.scan import Method, Metric, SequentialConfig, Which
from .config.search import SearchConfig
from .engine import evaluation as _evaluation
from .engine.data import DataSource, TokenBlocks, blocks_for
from .engine.evaluation import BlockStats, Evaluator
from .model import pair as _pair
from .model.selection import Group
from .outputs.merge.live import merge_live
from .outputs.search import SearchOutcome, search_and_merge

__all__ = ["ModelPair"]


class ModelPair(_pair.ModelPair):
    """A live model holding A (or B), with lazy checkpoints of both.

    Load one with :meth:`from_pretrained`; measure with :meth:`barrier`, set merged weights with
    :meth:`merge`. Scans, distances and merge folders take the pair as their first argument
    (:func:`hf_llmc.run_scan`, :func:`hf_llmc.save_merged`, ...).
    """

    def blocks(self, data: DataSource) -> TokenBlocks:
        """Token blocks to evaluate this pair on (see :func:`hf_llmc.engine.data.blocks_for`).

        Args:
            data: a :class:`DataConfig`, a local text file path, ready :class:`TokenBlocks` or an
                ``[N, seq_len]`` id tensor; text is tokenized with A's tokenizer.

        Returns:
            The token blocks.

        Raises:
            DataError: the data cannot be read or cut into blocks.
            PairError: text was given but the pair has no tokenizer.
        """
        return blocks_for(self, data)

    def evaluator(self, blocks: TokenBlocks, batch_size: int | None = None) -> Evaluator:
        """An evaluator of the live model (see :func:`hf_llmc.engine.evaluation.evaluator_for`).

        Args:
            blocks: the token blocks to evaluate on.
            batch_size: blocks per forward (default: automatic).

        Returns:
            The evaluator, data-parallel when ``self.shard`` is set.
        """
        return _evaluation.evaluator_for(self, blocks, batch_size)

    def endpoint(self, which: Which, ev: Evaluator, blocks: TokenBlocks,
                 indices: Sequence[int] | torch.Tensor | None = None) -> BlockStats:
        """Statistics of the full model A or B, cached per token set (see :func:`hf_llmc.engine.evaluation.endpoint`).

        Args:
            which: ``"a"`` or ``"b"``; the live model is set to it.
            ev: an evaluator from :meth:`evaluator` on ``blocks``.
            blocks: the token blocks.
            indices: block indices to evaluate (default: all).

        Returns:
            The endpoint's per-block statistics.

        Raises:
            NonFiniteLossError: the model's loss is NaN or infinite.
        """
        return _evaluation.endpoint(self, which, ev, blocks, indices)

    def point(self, ev: Evaluator, group: Group, alpha: float, *, base: Which = "a", method: Method = "lerp",
              indices: Sequence[int] | torch.Tensor | None = None, prefix: bool = True) -> BlockStats:
        """Statistics of one path point: ``group`` at α into ``base`` (see :func:`hf_llmc.engine.evaluation.point`).

        Args:
            ev: an evaluator from :meth:`evaluator`.
            group: the tensors moved along the path (e.g. from :meth:`groups`).
            alpha: the point (0 = A, 1 = B).
            base: the model the other tensors come from, ``"a"`` or ``"b"``.
            method: ``"lerp"`` or ``"slerp"`` per tensor.
            indices: block indices to evaluate (default: all).
            prefix: reuse the base model's hidden states before the group's first block.

        Returns:
            The point's per-block statistics; the live model holds ``base`` again afterwards.
        """
        return _evaluation.point(self, ev, group, alpha, base=base, method=method, indices=indices, prefix=prefix)

    def barrier(self, data: DataSource, layers: str | None = None, alphas: AlphaGrid = DEFAULT_ALPHAS,
                base: Which = "a", method: Method = "lerp", *, batch_size: int | None = None, prefix: bool = True,
                allow_extrapolation: bool = False, sequential: SequentialConfig | None = None,
                metric: Metric = "loss") -> BarrierResult:
        """The barrier of the path of ``layers`` into ``base`` (see :func:`hf_llmc.analyses.barrier.barrier`).

        Args:
            data: a :class:`DataConfig`, a local text file, token blocks or an id tensor.
            layers: a layer spec (e.g. ``"attn.0-3"``); None = the full model.
            alphas: the α grid (``"0,0.25,0.5,0.75,1"``, a count, or a sequence); 0.5 is always added.
            base: the model the unselected tensors come from, ``"a"`` or ``"b"``.
            method: ``"lerp"`` or ``"slerp"`` per tensor.
            batch_size: blocks per forward (default: automatic).
            prefix: reuse the base model's hidden states before the group's first block.
            allow_extrapolation: allow α outside [0, 1].
            sequential: stop as soon as the α = 0.5 point's error bar allows; None = every block.
            metric: what the sequential rule decides on: ``"loss"`` (nats) or ``"bpb"`` (bits per byte).

        Returns:
            The :class:`~hf_llmc.analyses.barrier.BarrierResult`.

        Raises:
            UsageError: a bad method, base, α list or layer spec.
            DataError: the data cannot be read or cut into blocks.
            NonFiniteLossError: an evaluation gave NaN or inf.
        """
        return _barrier.barrier(self, data, layers, alphas, base, method, batch_size=batch_size, prefix=prefix,
                                allow_extrapolation=allow_extrapolation, sequential=sequential, metric=metric)

    def merge(self, spec: MergeSpec | str | dict) -> torch.nn.Module:
        """Set the live model to a merge and return it, ready for ``save_pretrained`` / ``push_to_hub``.

        No second model is built: the returned model *is* ``self.model``, now holding the merged
        weights. The pair's next evaluation streams its base back in first. To write a merge
        without touching the live model (and with a model card), use :func:`hf_llmc.save_merged`.

        Args:
            spec: a :class:`MergeSpec`, its text form ``"attn.0-3=0.5; mlp.*=0.25"`` or a dict of its fields.

        Returns:
            ``self.model`` holding the merged weights.

        Raises:
            MergeSpecError: a malformed spec or α, or nothing to merge.
            SpecError: a layer spec that is malformed or out of range for this model.
        """
        return merge_live(self, spec)

    def search(self, sets: dict[str, DataSource] | DataConfig, cfg: SearchConfig | None = None, out_dir: str = "hf-llmc-search", *,
               data: DataConfig | None = None, batch_size: int | None = None, resume: bool = False,
               overwrite: bool = False, write_merge: bool = True) -> SearchOutcome:
        """Search per-group α for two evaluation sets and write the picked merge (see :func:`hf_llmc.search_merge`).

        Args:
            sets: exactly two named sets, ``{name: path, DataConfig or TokenBlocks}``, or data settings
                naming them (``DataConfig(data=["code=code.txt", "prose=prose.txt"])``).
            cfg: the search settings (default: :class:`~hf_llmc.config.search.SearchConfig`'s defaults).
            out_dir: the search folder (``search.jsonl``, ``search.json``, report, ``merged/``).
            data: shared data settings for sets given as paths (``seq_len``, ``max_tokens``, ...).
            batch_size: blocks per forward (default: automatic).
            resume: continue an interrupted search in ``out_dir``.
            overwrite: replace a previous search in ``out_dir``.
            write_merge: write the picked merge into ``out_dir/merged``.

        Returns:
            The :class:`~hf_llmc.outputs.search.SearchOutcome` (manifest with the front, report files, merge).

        Raises:
            SearchError: bad settings or not exactly two sets.
            DataError: a set cannot be read.
            ScanError: the output folder cannot be used.
            NonFiniteLossError: a candidate's loss is NaN or infinite.
        """
        return search_and_merge(self, sets, cfg or SearchConfig(), out_dir, data=data, batch_size=batch_size,
                                resume=resume, overwrite=overwrite, sources=self.source_folders(), write_merge=write_merge)
