"""Loss, perplexity and top-1 accuracy of the live model on fixed token blocks.

Per-block sums are kept so barriers get paired standard errors. Prefix reuse: when only decoder
blocks ``k..L-1`` (or the head) differ from the base model, the hidden states entering block ``k``
are computed once under the base model and fed back through the model's own forward, skipping
blocks ``0..k-1`` (each skipped block returns its input; block ``k-1`` returns the cached states).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..config.errors import NonFiniteLossError
from ..config.scan import Method, Which
from ..model.architecture import find_block_list
from .data import TokenBlocks

if TYPE_CHECKING:
    from ..model.pair import ModelPair
    from ..model.selection import Group

DEFAULT_CPU_BATCH = 8
DEFAULT_GPU_BATCH = 32


@dataclass
class BlockStats:
    """Per-block sums over the predicted positions, kept so barriers get paired standard errors.

    Attributes:
        indices: ``[n]`` block indices into the token-block tensor.
        loss_sum: ``[n]`` float64 summed next-token cross-entropy per block (nats).
        correct: ``[n]`` int64 top-1 hits per block.
        tokens_per_block: predicted positions per block (``seq_len - 1``); with chat data the mean
            scored tokens per conversation over the whole token set (the scale of :attr:`block_loss`).
        block_tokens: ``[n]`` int64 scored tokens per block when they differ (chat data: one block
            is one conversation); None: ``tokens_per_block`` each.
        byte_sum: ``[n]`` int64 UTF-8 bytes of the text the predicted tokens of each block cover
            (None when the blocks have no byte counts).
    """

    indices: torch.Tensor  # [n] block indices into the token-block tensor
    loss_sum: torch.Tensor  # [n] float64 summed cross-entropy (nats)
    correct: torch.Tensor  # [n] int64 top-1 hits
    tokens_per_block: int | float
    block_tokens: torch.Tensor | None = None  # [n] int64 scored tokens (chat data)
    byte_sum: torch.Tensor | None = None  # [n] int64 bytes covered by the predicted tokens

    @property
    def tokens(self) -> int:
        """Predicted tokens in all blocks."""
        if self.block_tokens is not None:
            return int(self.block_tokens.sum())
        return int(self.indices.numel()) * self.tokens_per_block

    @property
    def weights(self) -> torch.Tensor | None:
        """Per-block weights of the ratio estimator, ``block_tokens / tokens_per_block`` (float64).

        None when every block scores the same tokens.
        """
        return None if self.block_tokens is None else self.block_tokens.double() / self.tokens_per_block

    @property
    def loss(self) -> float:
        """Mean next-token cross-entropy over all predicted tokens (nats)."""
        return float(self.loss_sum.sum() / self.tokens)

    @property
    def accuracy(self) -> float:
        """Top-1 accuracy over all predicted tokens."""
        return float(self.correct.sum()) / self.tokens

    @property
    def bytes(self) -> int | None:
        """UTF-8 bytes covered by all predicted tokens (None when unknown)."""
        return None if self.byte_sum is None else int(self.byte_sum.sum())

    @property
    def bits_per_byte(self) -> float | None:
        """Sum of nats / (ln 2 · sum of bytes) over the predicted tokens (None when the bytes are unknown)."""
        n = self.bytes
        if not n:
            return None
        return float(self.loss_sum.sum()) / (math.log(2) * n)

    def take(self, n: int) -> BlockStats:
        """The statistics of the first ``n`` blocks.

        Args:
            n: the block count.

        Returns:
            The first ``n`` entries of every per-block tensor.
        """
        return BlockStats(self.indices[:n], self.loss_sum[:n], self.correct[:n], self.tokens_per_block,
                          None if self.block_tokens is None else self.block_tokens[:n],
                          None if self.byte_sum is None else self.byte_sum[:n])

    @staticmethod
    def cat(parts: Sequence[BlockStats]) -> BlockStats:
        """Join the statistics of disjoint block lists, in order.

        Args:
            parts: at least one :class:`BlockStats` of the same blocks' length.

        Returns:
            One :class:`BlockStats` (byte sums only when every part has them).
        """
        nbytes = None if any(p.byte_sum is None for p in parts) else torch.cat([p.byte_sum for p in parts])
        ntokens = None if any(p.block_tokens is None for p in parts) else torch.cat([p.block_tokens for p in parts])
        return BlockStats(torch.cat([p.indices for p in parts]), torch.cat([p.loss_sum for p in parts]),
                          torch.cat([p.correct for p in parts]), parts[0].tokens_per_block, ntokens, nbytes)

    @property
    def perplexity(self) -> float:
        """``exp(loss)`` (inf when the loss is not finite or above 700)."""
        return math.exp(self.loss) if math.isfinite(self.loss) and self.loss < 700 else float("inf")

    @property
    def block_loss(self) -> torch.Tensor:
        """Mean loss of each block (float64).

        With chat data a conversation's summed loss over the mean scored tokens per conversation, so
        that the mean over all conversations is the token-weighted loss.
        """
        return self.loss_sum / self.tokens_per_block

    @property
    def block_error(self) -> torch.Tensor:
        """Top-1 error rate of each block (float64), scaled like :attr:`block_loss`."""
        return 1.0 - self.correct.double() / self.tokens_per_block

    def to_dict(self) -> dict:
        """The summary numbers as JSON-ready data.

        Returns:
            ``loss``, ``perplexity``, ``accuracy``, ``tokens`` and, when the bytes are known,
            ``bits_per_byte`` and ``bytes``.
        """
        out = {"loss": self.loss, "perplexity": self.perplexity, "accuracy": self.accuracy, "tokens": self.tokens}
        if self.byte_sum is not None:
            out.update(bits_per_byte=self.bits_per_byte, bytes=self.bytes)
        return out


class Shard(Protocol):
    """A data-parallel share of the blocks (:class:`hf_llmc.analyses.distributed.DataShard`)."""

    def split(self, indices: torch.Tensor) -> torch.Tensor:
        """The block indices this process evaluates.

        Args:
            indices: every block index of the evaluation.

        Returns:
            This process's share of ``indices``.
        """

    def gather(self, local: BlockStats, indices: torch.Tensor) -> BlockStats:
        """Every process's statistics, joined on every process.

        Args:
            local: this process's statistics (of ``split(indices)``).
            indices: every block index of the evaluation.

        Returns:
            The statistics of all of ``indices``, in their order.
        """


class _Stop(Exception):
    """Aborts a forward once the wanted hidden states were captured."""


def model_device(model: nn.Module) -> torch.device:
    """The device input ids must go to: that of the input embeddings.

    Args:
        model: a transformers model.

    Returns:
        The embeddings' device (CPU when they are on the meta device).
    """
    emb = model.get_input_embeddings()
    return emb.weight.device if emb.weight.device.type != "meta" else torch.device("cpu")


class Evaluator:
    """Loss and accuracy of the live model on fixed token blocks, reusing the base model's prefixes.

    Args:
        model: the live model (a transformers causal LM).
        blocks: ``[N, seq_len]`` token ids.
        block_list: the model's decoder blocks (see :func:`~hf_llmc.model.architecture.find_block_list`).
        batch_size: blocks per forward (default: 32 on CUDA, else 8); halved on out-of-memory.
        cache_device: where cached hidden states are kept (default: the model's device).
        shard: the data-parallel share of this process (None: every block here).
        prefix_store_bytes: memory for hidden states recorded by ``run(record=True)`` (0 = off).
        scored: ``[N, seq_len]`` bool, the tokens the loss is taken over (chat data); None: every token
            after the first.
        lengths: ``[N]`` real tokens per row, right-padded after (chat data); each batch is cut to its
            longest row and gets an attention mask. None: full rows.
        byte_counts: ``[N, seq_len]`` UTF-8 bytes each token covers (:attr:`TokenBlocks.bytes`);
            statistics then carry per-block byte sums (of the scored tokens).
    """

    def __init__(
        self,
        model: nn.Module,
        blocks: torch.Tensor,
        block_list: nn.ModuleList,
        *,
        batch_size: int | None = None,
        cache_device: str | torch.device | None = None,
        shard: Shard | None = None,
        prefix_store_bytes: int = 0,
        scored: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
        byte_counts: torch.Tensor | None = None,
    ) -> None:
        self.model = model
        # Chat data: the scored tokens, the real length of each right-padded row, and the tokens
        # each row scores (their mean over all rows scales block_loss, a constant for every subset).
        self.scored, self.lengths = scored, lengths
        self.row_tokens = None if scored is None else scored.sum(dim=1)
        self.tokens_per_block = (blocks.shape[1] - 1 if scored is None
                                 else float(self.row_tokens.sum()) / max(1, blocks.shape[0]))
        # Bytes covered by the predicted (scored) tokens of every block, summed per block.
        self.block_bytes = None
        if byte_counts is not None:
            counted = byte_counts if scored is None else byte_counts * scored.to(byte_counts.dtype)
            self.block_bytes = counted[:, 1:].sum(dim=1)
        # Hidden states entering every block, recorded per base state during a full forward
        # run with ``record=True`` while they fit in ``prefix_store_bytes`` (0 = off).
        self.prefix_store_bytes = prefix_store_bytes
        self._store: dict[tuple, list[torch.Tensor]] = {}  # (state, batch) -> [h_1 .. h_{L-1}]
        self._store_bytes = 0
        # Data-parallel split (hf_llmc.distributed.DataShard): this process evaluates its share
        # of the blocks and gathers every process's per-block sums. None = all blocks here.
        self.shard = shard
        self.blocks = blocks
        self.block_list = block_list
        self.device = model_device(model)
        self.batch_size = batch_size or (DEFAULT_GPU_BATCH if self.device.type == "cuda" else DEFAULT_CPU_BATCH)
        self.cache_device = torch.device(cache_device) if cache_device else None
        self._formats: list[int] | None = None  # per block: 0 = tensor output, n = tuple of n
        self._cache: dict[tuple[int, ...], tuple[int, torch.Tensor]] = {}  # batch -> (k, hidden)
        self._state: object = None
        self.forward_calls = 0

    # -- hooks --------------------------------------------------------------------------------
    def _record_formats(self) -> None:
        formats: list[int] = [0] * len(self.block_list)

        def hook(i):
            def fn(_mod, _args, out):
                formats[i] = len(out) if isinstance(out, tuple) else 0

            return fn

        handles = [b.register_forward_hook(hook(i)) for i, b in enumerate(self.block_list)]
        try:
            with torch.inference_mode():
                self.model(input_ids=self.blocks[:1, :2].to(self.device), use_cache=False)
        finally:
            for h in handles:
                h.remove()
        self._formats = formats

    @contextlib.contextmanager
    def _skipping(self, start: int, hidden: torch.Tensor | None) -> Iterator[None]:
        """Blocks < start return their input; block start-1 returns ``hidden``."""
        if start <= 0:
            yield
            return
        if self._formats is None:
            self._record_formats()
        patched = []

        def passthrough(i, inject):
            n = self._formats[i]

            def forward(hidden_states=None, *args, **kwargs):
                h = inject if inject is not None else hidden_states
                return h if n == 0 else (h,) + (None,) * (n - 1)

            return forward

        try:
            for i in range(start):
                block = self.block_list[i]
                inject = hidden if i == start - 1 else None
                # An instance-level forward (accelerate's device/offload hook) is put back after.
                patched.append((block, block.__dict__.get("forward")))
                block.forward = passthrough(i, inject)
            yield
        finally:
            for block, previous in patched:
                if previous is None:
                    del block.forward
                else:
                    block.forward = previous

    @contextlib.contextmanager
    def _capturing(self, stop: int, sink: list) -> Iterator[None]:
        """Capture the output of block stop-1 (= hidden states entering block ``stop``) and abort."""

        def hook(_mod, _args, out):
            sink.append(out[0] if isinstance(out, tuple) else out)
            raise _Stop

        handle = self.block_list[stop - 1].register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    # -- forward ------------------------------------------------------------------------------
    def _inputs(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """The model inputs of a batch: its ids (right-padded rows cut to the longest, with an attention mask)."""
        if self.lengths is None:
            return {"input_ids": self.blocks[idx].to(self.device)}
        lengths = self.lengths[idx]
        width = int(lengths.max())
        mask = torch.arange(width)[None, :] < lengths[:, None]
        return {"input_ids": self.blocks[idx, :width].to(self.device), "attention_mask": mask.long().to(self.device)}

    def _logits(self, inputs: dict[str, torch.Tensor], start: int, hidden: torch.Tensor | None) -> torch.Tensor:
        with self._skipping(start, hidden):
            self.forward_calls += 1
            return self.model(**inputs, use_cache=False).logits

    def _hidden(self, inputs: dict[str, torch.Tensor], stop: int, start: int, hidden: torch.Tensor | None) -> torch.Tensor:
        sink: list = []
        with self._skipping(start, hidden), self._capturing(stop, sink):
            try:
                self.model(**inputs, use_cache=False)
            except _Stop:
                pass
        return sink[0]

    def _batches(self, indices: torch.Tensor) -> Iterator[torch.Tensor]:
        for i in range(0, indices.numel(), self.batch_size):
            yield indices[i : i + self.batch_size]

    # -- prefix cache -------------------------------------------------------------------------
    def invalidate(self) -> None:
        """Forget cached prefixes (call when the base state of the model changes)."""
        self._cache = {}
        self._store, self._store_bytes = {}, 0

    @contextlib.contextmanager
    def _recording(self, idx: torch.Tensor) -> Iterator[None]:
        """Keep every block's output (the hidden states entering the next block) for batch
        ``idx`` under the current state, unless that would exceed ``prefix_store_bytes``."""
        outs: list[torch.Tensor] = []
        used = [self._store_bytes, True]

        def hook(_mod, _args, out):
            h = out[0] if isinstance(out, tuple) else out
            size = h.numel() * h.element_size()
            if not used[1] or used[0] + size > self.prefix_store_bytes:
                used[1] = False
                outs.clear()
                return
            outs.append(h.detach().clone().to(self.cache_device or self.device))
            used[0] += size

        handles = [b.register_forward_hook(hook) for b in self.block_list[:-1]]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
        if used[1] and len(outs) == len(self.block_list) - 1:
            self._store[(self._state, tuple(idx.tolist()))] = outs
            self._store_bytes = used[0]

    def _prefix(self, k: int, idx: torch.Tensor) -> torch.Tensor:
        """Hidden states entering block k for the batch ``idx`` under the current (base) model.

        One entry per batch; a later k continues from the cached earlier one."""
        key = tuple(idx.tolist())
        stored = self._store.get((self._state, key))
        if stored is not None and 0 < k <= len(stored):
            return stored[k - 1].to(self.device)
        prev_k, prev = self._cache.get(key, (0, None))
        if prev is not None and prev_k == k:
            return prev.to(self.device)
        if prev_k > k:
            prev_k, prev = 0, None
        hidden = self._hidden(self._inputs(idx), k, prev_k, prev.to(self.device) if prev is not None else None)
        self._cache[key] = (k, hidden.to(self.cache_device or self.device))
        return hidden

    # -- public -------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(
        self, indices: Sequence[int] | torch.Tensor | None = None, start_block: int | None = None, state: object = None,
        record: bool = False,
    ) -> BlockStats:
        """Evaluate the live model on the given blocks, recomputing only what differs from the base.

        Args:
            indices: block indices to evaluate (default: all).
            start_block: reuse the base model's hidden states entering this block (valid only when
                the model differs from the base in blocks >= ``start_block`` / final norm / head, and
                the base has not changed since the cache was filled); None or 0 = a full forward.
            state: names the base state (e.g. ``"a"`` / ``"b"``); the prefix cache is dropped
                whenever it changes.
            record: a promise that the live model holds exactly the base ``state``: a full forward
                then keeps the hidden states entering every block (within ``prefix_store_bytes``), so
                later prefixes of that state cost no forward. Kept per ``state`` until :meth:`invalidate`.

        Returns:
            Per-block statistics of ``indices`` (gathered from every process with a data-parallel ``shard``).
        """
        if state != self._state:
            self._cache = {}  # the incremental cache follows one state; the store is per state
            self._state = state
        if indices is None:
            indices = torch.arange(self.blocks.shape[0])
        indices = torch.as_tensor(indices, dtype=torch.long)
        k = start_block or 0
        local = indices if self.shard is None else self.shard.split(indices)
        while True:
            try:
                stats = self._run(local, k, record and k == 0 and self.prefix_store_bytes > 0)
                stats = stats if self.shard is None else self.shard.gather(stats, indices)
                if self.row_tokens is not None:
                    stats.tokens_per_block, stats.block_tokens = self.tokens_per_block, self.row_tokens[stats.indices]
                if self.block_bytes is not None:
                    stats.byte_sum = self.block_bytes[stats.indices]
                return stats
            except torch.OutOfMemoryError:
                if self.batch_size == 1:
                    raise
                self.batch_size //= 2
                self.invalidate()
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()

    def _run(self, indices: torch.Tensor, k: int, record: bool = False) -> BlockStats:
        loss_sums, corrects = [], []
        for idx in self._batches(indices):
            inputs = self._inputs(idx)
            ids = inputs["input_ids"]
            hidden = self._prefix(k, idx) if k > 0 else None
            with self._recording(idx) if record else contextlib.nullcontext():
                logits = self._logits(inputs, k, hidden)
            ls, cs = token_stats(logits, ids, None if self.scored is None else self.scored[idx, : ids.shape[1]])
            loss_sums.append(ls.cpu())
            corrects.append(cs.cpu())
        return BlockStats(
            indices=indices,
            loss_sum=torch.cat(loss_sums) if loss_sums else torch.zeros(0, dtype=torch.float64),
            correct=torch.cat(corrects) if corrects else torch.zeros(0, dtype=torch.long),
            tokens_per_block=self.tokens_per_block,
        )


def token_stats(logits: torch.Tensor, ids: torch.Tensor, scored: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence summed next-token cross-entropy and top-1 hits of one batch.

    Computed one sequence at a time so the float32 temporaries stay one sequence large.

    Args:
        logits: ``[B, T, vocab]`` model outputs.
        ids: ``[B, T]`` the token ids the logits were computed from.
        scored: ``[B, T]`` bool, the target tokens that count (position 0 is never predicted); None: all.

    Returns:
        ``(loss_sum, correct)``: ``[B]`` float64 summed cross-entropy and ``[B]`` int64 hits, on the CPU.
    """
    target = ids[:, 1:].to(logits.device)
    loss_sum = torch.empty(ids.shape[0], dtype=torch.float64)
    correct = torch.empty(ids.shape[0], dtype=torch.long)
    keep = None if scored is None else scored[:, 1:].to(logits.device)
    for row in range(ids.shape[0]):
        row_logits, row_target = logits[row, :-1], target[row]
        if keep is not None:
            row_logits, row_target = row_logits[keep[row]], row_target[keep[row]]
        row_logits = row_logits.float()
        ce = F.cross_entropy(row_logits, row_target, reduction="none")
        loss_sum[row] = ce.double().sum().cpu()
        correct[row] = (row_logits.argmax(dim=-1) == row_target).sum().cpu()
    return loss_sum, correct


# -- the pair's evaluations ---------------------------------------------------------------------------
def evaluator_for(pair: ModelPair, blocks: TokenBlocks, batch_size: int | None = None) -> Evaluator:
    """An :class:`Evaluator` of the pair's live model, data-parallel when ``pair.shard`` is set.

    Args:
        pair: the loaded pair.
        blocks: the token blocks to evaluate on.
        batch_size: blocks per forward (default: automatic).

    Returns:
        The evaluator (no prefix store).
    """
    _, block_list = find_block_list(pair.model)
    return Evaluator(pair.model, blocks.ids, block_list, batch_size=batch_size, shard=pair.shard,
                     scored=blocks.scored, lengths=blocks.lengths, byte_counts=blocks.bytes)


def check_finite(stats: BlockStats, what: str) -> BlockStats:
    """Refuse a non-finite loss, so that no NaN is reported as a result.

    Args:
        stats: the statistics to check.
        what: what was evaluated, for the message (e.g. ``"model A"``).

    Returns:
        ``stats`` unchanged.

    Raises:
        NonFiniteLossError: the loss is NaN or infinite.
    """
    if not math.isfinite(stats.loss):
        raise NonFiniteLossError(
            f"{what}: non-finite loss ({stats.loss}); a checkpoint holds NaN/inf weights or the dtype overflows"
        )
    return stats


def endpoint(pair: ModelPair, which: Which, ev: Evaluator, blocks: TokenBlocks,
             indices: Sequence[int] | torch.Tensor | None = None) -> BlockStats:
    """Statistics of the full model A or B, cached on the pair per token set and blocks.

    Args:
        pair: the loaded pair; its live model is set to ``which``.
        which: ``"a"`` or ``"b"``.
        ev: an evaluator of the pair's live model on ``blocks``.
        blocks: the token blocks (their fingerprint keys the cache).
        indices: block indices to evaluate (default: all).

    Returns:
        The endpoint's per-block statistics.

    Raises:
        NonFiniteLossError: the model's loss is NaN or infinite.
    """
    idx = torch.arange(blocks.num_blocks) if indices is None else torch.as_tensor(indices)
    key = (which, blocks.fingerprint, tuple(idx.tolist()))
    if key not in pair.endpoint_cache:
        pair.interp.set_base(which)
        pair.endpoint_cache[key] = check_finite(ev.run(idx, state=which), f"model {which.upper()}")
    return pair.endpoint_cache[key]


def point(pair: ModelPair, ev: Evaluator, group: Group, alpha: float, *, base: Which = "a", method: Method = "lerp",
          indices: Sequence[int] | torch.Tensor | None = None, prefix: bool = True) -> BlockStats:
    """Statistics of one point of a layer-wise path: ``group`` at α, every other tensor from ``base``.

    The live model is set to ``base`` and restored to it afterwards.

    Args:
        pair: the loaded pair.
        ev: an evaluator of the pair's live model.
        group: the tensors moved along the path.
        alpha: the point (0 = A, 1 = B).
        base: the model the other tensors come from, ``"a"`` or ``"b"``.
        method: ``"lerp"`` or ``"slerp"`` per tensor.
        indices: block indices to evaluate (default: all).
        prefix: reuse the base model's hidden states before the group's first block.

    Returns:
        The point's per-block statistics (not checked for finiteness).
    """
    pair.interp.set_base(base)
    start = group.first_block if prefix and group.first_block else None
    with pair.interp.at([group], alpha, method):
        return ev.run(indices, start_block=start, state=base)


def point_on_sets(pair: ModelPair, evs: Sequence[Evaluator], group: Group, alpha: float, *, base: Which = "a",
                  method: Method = "lerp", prefix: bool = True) -> list[BlockStats]:
    """One path point set in the live model once and evaluated on several evaluation sets.

    Args:
        pair: the loaded pair.
        evs: one evaluator per set (each keeps its own prefix cache).
        group: the tensors moved along the path.
        alpha: the point.
        base: the model the other tensors come from.
        method: ``"lerp"`` or ``"slerp"`` per tensor.
        prefix: reuse the base model's hidden states before the group's first block.

    Returns:
        The statistics of every set, in the order of ``evs``.

    Raises:
        NonFiniteLossError: a set's loss is NaN or infinite.
    """
    pair.interp.set_base(base)
    start = group.first_block if prefix and group.first_block else None
    with pair.interp.at([group], alpha, method):
        return [check_finite(ev.run(None, start_block=start, state=base), f"{group.name} at alpha={alpha:g}")
                for ev in evs]
