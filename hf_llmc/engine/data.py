"""Evaluation text -> deterministic, non-overlapping token blocks.

Protocol: documents are tokenized with A's tokenizer, concatenated with the EOS id between
documents, capped at ``max_tokens`` and cut into blocks of ``seq_len`` tokens; the last partial
block is dropped. When the tokenizer adds a BOS token to a text by default (Llama-family models
are trained so), every block starts with BOS followed by ``seq_len - 1`` tokens of text, and the
documents are tokenized without special tokens; ``no_bos`` keeps the tokenizer's default per
document instead. The first token of a block is never predicted, so every block scores
``seq_len - 1`` tokens either way. Tokenizations are cached on disk, keyed by the data, the
settings (BOS included: it is part of the data fingerprint) and a digest of the tokenizer's whole
definition; a cached entry is used only if its shape and token ids fit.

Chat data (``chat=True``) are not cut into blocks: each conversation is one right-padded row, and
only the tokens ``loss_on`` names are scored (:mod:`hf_llmc.engine.chat` has the protocol).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..config.data import DataConfig
from ..config.errors import DataError, PairError
from ..config.files import cache_root
from ..config.security import display_name
from ..model.tokenizer import adds_bos, tokenizer_digest
from .chat import chat_template, fits, render_rows

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

    from ..model.pair import ModelPair

TABLE_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class TokenBlocks:
    """Evaluation tokens cut into equal blocks, plus what is needed to reproduce them.

    Attributes:
        ids: ``[N, seq_len]`` token ids (int64).
        source: where they came from: the ``data`` path or ``dataset`` name, or ``"tensor"``.
        fingerprint: a key of the data, tokenizer and settings (results record it; ``resume`` compares it).
        scored: ``[N, seq_len]`` bool, the tokens the loss is taken over (chat data); None: every
            token after the first of a block.
        lengths: ``[N]`` real tokens per row, the rest is right padding (chat data); None: full rows.
        chat: what chat data hold (:class:`~hf_llmc.engine.chat.ChatRows` ``summary``); None for plain text.
    """

    ids: torch.Tensor
    source: str
    fingerprint: str
    scored: torch.Tensor | None = None
    lengths: torch.Tensor | None = None
    chat: dict | None = None

    @property
    def seq_len(self) -> int:
        """Tokens per block."""
        return int(self.ids.shape[1])

    @property
    def num_blocks(self) -> int:
        """Number of blocks N."""
        return int(self.ids.shape[0])

    @property
    def row_tokens(self) -> torch.Tensor | None:
        """``[N]`` scored tokens per row when rows differ (chat data), else None (``seq_len - 1`` each)."""
        return None if self.scored is None else self.scored.sum(dim=1)

    @property
    def tokens(self) -> int:
        """Scored (predicted) tokens of all blocks."""
        return int(self.scored.sum()) if self.scored is not None else self.num_blocks * (self.seq_len - 1)

    @property
    def tokens_per_block(self) -> float:
        """Scored tokens per block: ``seq_len - 1``, or their mean over the rows of chat data."""
        return self.tokens / self.num_blocks if self.scored is not None else self.seq_len - 1


#: Everything evaluation data may be given as: settings, a local text file, ready blocks or an id tensor.
DataSource = DataConfig | TokenBlocks | str | os.PathLike | torch.Tensor


def max_positions(config: PretrainedConfig) -> int | None:
    """The longest sequence a model accepts, read from its config.

    Args:
        config: the model's config.

    Returns:
        The first positive integer of ``max_position_embeddings``, ``n_positions``, ``n_ctx`` or
        ``seq_length``; None when the config has none.
    """
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def default_seq_len(config: PretrainedConfig) -> int:
    """The block length used when ``seq_len`` is not set.

    Args:
        config: the model's config.

    Returns:
        ``min(1024, max_positions(config))``, or 1024 when the maximum is unknown.
    """
    limit = max_positions(config)
    return min(1024, limit) if limit else 1024


def _read_documents(cfg: DataConfig) -> tuple[list[str], str]:
    """Documents and a content fingerprint of their source."""
    if cfg.data is not None:
        path = Path(cfg.data).expanduser()
        if not path.is_file():
            raise DataError(f"data={cfg.data!r}: no such file")
        raw = path.read_bytes()
        digest = hashlib.sha256(raw).hexdigest()
        suffix = path.suffix.lower()
        if suffix in TABLE_SUFFIXES:
            docs = _table_documents(TABLE_SUFFIXES[suffix], str(path), *_column(cfg), cfg.data)
        elif cfg.chat:
            raise DataError(f"data={cfg.data!r}: chat data must be a table (.jsonl/.json/.csv/.parquet) with a "
                            f"'{cfg.messages_column}' column")
        else:
            if b"\x00" in raw[:65536]:
                raise DataError(f"data={cfg.data!r}: looks binary (NUL bytes); give a text file")
            try:
                docs = [raw.decode("utf-8")]
            except UnicodeDecodeError:
                raise DataError(f"data={cfg.data!r}: not UTF-8 text") from None
        return docs, digest
    return _hub_documents(cfg)


def _column(cfg: DataConfig) -> tuple[str, type, str]:
    """The column documents come from, the type of its values, and the setting that names it."""
    return (cfg.messages_column, list, "messages_column") if cfg.chat else (cfg.text_column, str, "text_column")


def _quiet_datasets() -> None:
    """No "Generating split" bars or info logs: our own output stays one line per problem."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


def _table_documents(builder: str, path: str, column: str, kind: type, setting: str, shown: str) -> list:
    from datasets import load_dataset

    _quiet_datasets()
    try:
        ds = load_dataset(builder, data_files=path, split="train")
    except Exception as err:  # datasets raises many types for malformed files
        raise DataError(f"data={shown!r}: cannot be read as {builder} ({type(err).__name__})") from None
    if column not in ds.column_names:
        raise DataError(f"data={shown!r}: no column '{column}' (columns: {', '.join(ds.column_names)}); set {setting}=NAME")
    return [t for t in ds[column] if isinstance(t, kind)]


def _hub_documents(cfg: DataConfig) -> tuple[list[str], str]:
    from datasets import get_dataset_split_names, load_dataset

    _quiet_datasets()
    parts = cfg.dataset.split(":")
    name, config, split = parts[0], (parts[1] or None) if len(parts) > 1 else None, parts[2] if len(parts) > 2 else None
    try:
        if split is None:
            names = get_dataset_split_names(name, config)
            split = next((s for s in ("validation", "test", "train") if s in names), None)
            if split is None:
                raise DataError(f"dataset={cfg.dataset!r}: no validation, test or train split ({names})")
        ds = load_dataset(name, config, split=split)
    except DataError:
        raise
    except Exception as err:
        raise DataError(f"dataset={cfg.dataset!r}: cannot be loaded ({type(err).__name__}: {str(err).splitlines()[0][:160]})") from None
    column, kind, _ = _column(cfg)
    if column not in ds.column_names:
        raise DataError(f"dataset={cfg.dataset!r}: no column '{column}' (columns: {', '.join(ds.column_names)})")
    fingerprint = getattr(ds, "_fingerprint", f"{name}:{config}:{split}")
    return [t for t in ds[column] if isinstance(t, kind)], f"{cfg.dataset}:{split}:{fingerprint}"


def cache_dir() -> Path:
    """The folder tokenized blocks are cached in, so a second run skips tokenization.

    Returns:
        ``tokens`` under :func:`~hf_llmc.config.files.cache_root`.
    """
    return cache_root() / "tokens"


def load_blocks(tokenizer: PreTrainedTokenizerBase, cfg: DataConfig, model_config: PretrainedConfig | None = None, *,
                use_cache: bool = True) -> TokenBlocks:
    """Tokenize the configured data into ``[N, seq_len]`` blocks (see the module docstring for the protocol),
    or chat data into one row per conversation.

    Args:
        tokenizer: the tokenizer (model A's).
        cfg: where the text comes from and how it is cut.
        model_config: the model's config; gives the default ``seq_len`` and its upper limit
            (without it the default is 1024 and not checked).
        use_cache: read and write the on-disk cache (:func:`cache_dir`).

    Returns:
        The blocks; the last partial block is dropped.

    Raises:
        DataError: bad options, ``seq_len`` above the model's maximum positions, a file or dataset
            that cannot be read, or fewer tokens than one block; with chat data also a tokenizer without
            a chat template and malformed conversations.
    """
    cfg.validate()
    limit = max_positions(model_config) if model_config is not None else None
    seq_len = cfg.seq_len or (default_seq_len(model_config) if model_config is not None else 1024)
    if limit and seq_len > limit:
        raise DataError(f"seq_len={seq_len}: above the model's maximum positions ({limit})")
    if cfg.chat:
        chat_template(tokenizer)  # a pair without one is refused before the data are read
    docs, digest = _read_documents(cfg)
    if cfg.chat:
        return _chat_blocks(tokenizer, cfg, seq_len, docs, digest, use_cache)
    bos = not cfg.no_bos and adds_bos(tokenizer)
    key = hashlib.sha256(json.dumps(
        [digest, tokenizer_digest(tokenizer), cfg.text_column, seq_len, cfg.max_tokens, "bos" if bos else "plain"]
    ).encode()).hexdigest()[:24]
    source = cfg.data or cfg.dataset
    cached = cache_dir() / f"{key}.pt"
    if use_cache and cached.is_file():
        blocks = _read_cached(cached, seq_len, len(tokenizer))
        if blocks is not None:
            return TokenBlocks(blocks, source, key)
    width = seq_len - 1 if bos else seq_len  # a BOS block: BOS + seq_len - 1 tokens of text
    ids = tokenize_stream(tokenizer, docs, cfg.max_tokens, add_special_tokens=not bos)
    if not ids:
        raise DataError(f"{source}: no tokens in the evaluation data")
    n = len(ids) // width
    if n == 0:
        raise DataError(f"{source}: {len(ids)} tokens, fewer than one block of seq_len={seq_len}")
    blocks = torch.tensor(ids[: n * width], dtype=torch.long).view(n, width)
    if bos:
        blocks = torch.cat([torch.full((n, 1), tokenizer.bos_token_id, dtype=torch.long), blocks], dim=1)
    if use_cache:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(f".tmp{os.getpid()}")
            torch.save(blocks, tmp)
            os.replace(tmp, cached)
        except OSError:
            pass  # caching is an optimisation only
    return TokenBlocks(blocks, source, key)


def _chat_blocks(tokenizer: PreTrainedTokenizerBase, cfg: DataConfig, seq_len: int, conversations: list,
                 digest: str, use_cache: bool) -> TokenBlocks:
    """One right-padded row per conversation (:func:`~hf_llmc.engine.chat.render_rows`), cached like blocks."""
    key = hashlib.sha256(json.dumps(
        [digest, tokenizer_digest(tokenizer), "chat", cfg.messages_column, seq_len, cfg.max_tokens, cfg.resolved_loss_on]
    ).encode()).hexdigest()[:24]
    source = cfg.data or cfg.dataset
    cached = cache_dir() / f"{key}.pt"
    entry = None
    if use_cache and cached.is_file():
        try:
            entry = torch.load(cached, weights_only=True)
        except Exception:  # noqa: BLE001 - a damaged cache entry is rebuilt
            entry = None
        if not fits(entry, len(tokenizer)):
            entry = None
    if entry is None:
        rows = render_rows(tokenizer, conversations, seq_len=seq_len, max_tokens=cfg.max_tokens, loss_on=cfg.resolved_loss_on,
                           column=cfg.messages_column)
        entry = {"ids": rows.ids, "scored": rows.scored, "lengths": rows.lengths, "summary": rows.summary}
        if use_cache:
            try:
                cached.parent.mkdir(parents=True, exist_ok=True)
                tmp = cached.with_suffix(f".tmp{os.getpid()}")
                torch.save(entry, tmp)
                os.replace(tmp, cached)
            except OSError:
                pass  # caching is an optimisation only
    return TokenBlocks(entry["ids"], source, key, scored=entry["scored"], lengths=entry["lengths"],
                       chat={**entry["summary"], "seq_len": seq_len})


def _read_cached(path: Path, seq_len: int, vocab_size: int) -> torch.Tensor | None:
    """Cached blocks, or None when the entry is damaged or does not fit (shape, dtype, id range)."""
    try:
        blocks = torch.load(path, weights_only=True)
    except Exception:  # noqa: BLE001 - a damaged cache entry is rebuilt
        return None
    ok = (isinstance(blocks, torch.Tensor) and blocks.dtype == torch.long and blocks.dim() == 2
          and blocks.shape[0] > 0 and blocks.shape[1] == seq_len
          and int(blocks.min()) >= 0 and int(blocks.max()) < vocab_size)
    return blocks if ok else None


def tokenize_stream(tokenizer: PreTrainedTokenizerBase, docs: list[str], max_tokens: int, *,
                    add_special_tokens: bool = True) -> list[int]:
    """Tokenize documents into one token stream, stopping once ``max_tokens`` are reached.

    Args:
        tokenizer: the tokenizer.
        docs: the documents; empty ones are skipped.
        max_tokens: the cap on the stream's length.
        add_special_tokens: keep the tokenizer's default special tokens per document (False: the
            text's tokens only, when blocks get their own BOS).

    Returns:
        The token ids of the documents with the EOS id between them (when the tokenizer has one),
        cut to ``max_tokens``.
    """
    eos = tokenizer.eos_token_id
    out: list[int] = []
    for doc in docs:
        if not doc:
            continue
        if out and eos is not None:
            out.append(eos)
        out.extend(tokenizer(doc, add_special_tokens=add_special_tokens)["input_ids"])
        if len(out) >= max_tokens:
            break
    return out[:max_tokens]


def blocks_for(pair: ModelPair, data: DataSource) -> TokenBlocks:
    """Token blocks for evaluating ``pair``, from any form the API accepts for data.

    Args:
        pair: the loaded pair; text is tokenized with A's tokenizer (with the union tokenizer when
            the vocabularies differ by added tokens, :mod:`hf_llmc.model.vocab`), blocks fit A's
            maximum positions.
        data: a :class:`DataConfig`, a local text file path, ready :class:`TokenBlocks` (returned as
            is) or an ``[N, seq_len]`` id tensor (used as is, source ``"tensor"``).

    Returns:
        The token blocks.

    Raises:
        DataError: the data cannot be read or cut into blocks, or (vocabularies that differ) holds
            a token that A or B lacks.
        PairError: text was given but the pair has no tokenizer.
    """
    if isinstance(data, TokenBlocks):
        blocks = data
    elif isinstance(data, torch.Tensor):
        blocks = TokenBlocks(data, "tensor", "tensor")
    else:
        if isinstance(data, (str, os.PathLike)):
            data = DataConfig(data=str(data))
        if data.chat and pair.tokenizer is None:
            raise DataError("chat=True: model A has no tokenizer, so no chat template")
        if pair.tokenizer is None:
            raise PairError(f"{display_name(pair.source_a)}: no tokenizer; pass token blocks instead")
        blocks = load_blocks(pair.tokenizer, data, pair.model.config)
    vocab = getattr(pair, "vocab", None)
    if vocab is not None:
        vocab.check_ids(blocks.ids)  # both endpoints are evaluated: every token must be shared
    return blocks
