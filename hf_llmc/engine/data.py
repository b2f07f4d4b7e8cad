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

Bytes per token (for bits per byte): every token is attributed the UTF-8 bytes of the text it
covers, from the character offsets of a fast tokenizer. A token covers the text from the end of
the previous token to the end of its own span (gaps, such as spaces a tokenizer trims from its
offsets, go to the next token); tokens that share one span (a character split into several
byte-level or byte-fallback tokens, or a prepended word marker and a
character) share its bytes evenly, later tokens taking the remainder;
the last token of a document also covers any text after it; inserted special tokens (BOS, the EOS
between documents) cover 0 bytes. The tokens of a document therefore sum to its UTF-8 byte count.
A tokenizer without offsets (a slow tokenizer) gives no byte counts (``bits_per_byte`` is None).

Chat data (``chat=True``) are not cut into blocks: each conversation is one right-padded row, and
only the tokens ``loss_on`` names are scored (:mod:`hf_llmc.engine.chat` has the protocol).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..config.data import DataConfig
from ..config.errors import DataError, PairError
from ..config.files import cache_root
from ..config.security import display_name
from ..model.tokenizer import adds_bos, tokenizer_digest
from .chat import chat_template as find_template, fits, render_rows

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
        bytes: ``[N, seq_len]`` UTF-8 bytes of the text each token covers (int64; see the module
            docstring), or None when unknown (id tensors, tokenizers without offsets).
        name: the evaluation set's name (None: the single, unnamed set).
        scored: ``[N, seq_len]`` bool, the tokens the loss is taken over (chat data); None: every
            token after the first of a block.
        lengths: ``[N]`` real tokens per row, the rest is right padding (chat data); None: full rows.
        chat: what chat data hold (:class:`~hf_llmc.engine.chat.ChatRows` ``summary``); None for plain text.
    """

    ids: torch.Tensor
    source: str
    fingerprint: str
    bytes: torch.Tensor | None = None
    name: str | None = None
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
    def bpb_scale(self) -> float | None:
        """Factor from nats per token to bits per byte: tokens / (ln 2 · bytes) of all predicted positions.

        None without byte counts.
        """
        if self.bytes is None:
            return None
        nbytes = int(self.bytes[:, 1:].sum())
        return self.num_blocks * (self.seq_len - 1) / (math.log(2) * nbytes) if nbytes else None

    @property
    def bpb_missing(self) -> str | None:
        """Why ``metric='bpb'`` cannot be used on these blocks (a one-line error), or None when it can."""
        if self.bpb_scale is not None:
            return None
        why = ("chat data: bits per byte are not computed over assistant tokens" if self.chat is not None
               else "token ids, or a tokenizer without offsets")
        named = f" {self.name!r}" if self.name else ""
        return f"metric='bpb': the evaluation data{named} has no byte counts ({why}); use metric='loss'"

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
                use_cache: bool = True, chat_template: str | None = None) -> TokenBlocks:
    """Tokenize the configured data into ``[N, seq_len]`` blocks, or chat data into one row per conversation.

    The protocols are in the module docstring and in :mod:`hf_llmc.engine.chat`.

    Args:
        tokenizer: the tokenizer (model A's).
        cfg: where the text comes from and how it is cut.
        model_config: the model's config; gives the default ``seq_len`` and its upper limit
            (without it the default is 1024 and not checked).
        use_cache: read and write the on-disk cache (:func:`cache_dir`).
        chat_template: the chat template of chat data (None: the tokenizer's).

    Returns:
        The blocks; the last partial block is dropped.

    Raises:
        DataError: bad options, ``seq_len`` above the model's maximum positions, a file or dataset
            that cannot be read, or fewer tokens than one block; with chat data also a tokenizer without
            a chat template and malformed conversations.
    """
    cfg.validate()
    sets = cfg.named()
    if sets[0][0] is not None:
        raise DataError("data: several named evaluation sets; load them with sets_for (or each of DataConfig.named())")
    cfg = sets[0][1]
    limit = max_positions(model_config) if model_config is not None else None
    seq_len = cfg.seq_len or (default_seq_len(model_config) if model_config is not None else 1024)
    if limit and seq_len > limit:
        raise DataError(f"seq_len={seq_len}: above the model's maximum positions ({limit})")
    if cfg.chat:
        chat_template = find_template(tokenizer, chat_template)  # none: refused before the data are read
    docs, digest = _read_documents(cfg)
    if cfg.chat:
        return _chat_blocks(tokenizer, cfg, seq_len, docs, digest, use_cache, chat_template)
    bos = not cfg.no_bos and adds_bos(tokenizer)
    key = hashlib.sha256(json.dumps(
        [digest, tokenizer_digest(tokenizer), cfg.text_column, seq_len, cfg.max_tokens, "bos" if bos else "plain"]
    ).encode()).hexdigest()[:24]
    source = cfg.data or cfg.dataset
    cached = cache_dir() / f"{key}.pt"
    if use_cache and cached.is_file():
        entry = _read_cached(cached, seq_len, len(tokenizer))
        if entry is not None:
            return TokenBlocks(entry[0], source, key, entry[1])
    width = seq_len - 1 if bos else seq_len  # a BOS block: BOS + seq_len - 1 tokens of text
    ids, nbytes = tokenize_with_bytes(tokenizer, docs, cfg.max_tokens, add_special_tokens=not bos)
    if not ids:
        raise DataError(f"{source}: no tokens in the evaluation data")
    n = len(ids) // width
    if n == 0:
        raise DataError(f"{source}: {len(ids)} tokens, fewer than one block of seq_len={seq_len}")
    blocks = torch.tensor(ids[: n * width], dtype=torch.long).view(n, width)
    counts = torch.tensor(nbytes[: n * width], dtype=torch.long).view(n, width) if nbytes is not None else None
    if bos:
        blocks = torch.cat([torch.full((n, 1), tokenizer.bos_token_id, dtype=torch.long), blocks], dim=1)
        if counts is not None:
            counts = torch.cat([torch.zeros((n, 1), dtype=torch.long), counts], dim=1)
    if use_cache:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(f".tmp{os.getpid()}")
            torch.save({"ids": blocks, "bytes": counts}, tmp)
            os.replace(tmp, cached)
        except OSError:
            pass  # caching is an optimisation only
    return TokenBlocks(blocks, source, key, counts)


def _chat_blocks(tokenizer: PreTrainedTokenizerBase, cfg: DataConfig, seq_len: int, conversations: list,
                 digest: str, use_cache: bool, template: str) -> TokenBlocks:
    """One right-padded row per conversation (:func:`~hf_llmc.engine.chat.render_rows`), cached like blocks."""
    key = hashlib.sha256(json.dumps(
        [digest, tokenizer_digest(tokenizer), "chat", template, cfg.messages_column, seq_len, cfg.max_tokens,
         cfg.resolved_loss_on]
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
                           column=cfg.messages_column, template=template)
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


def _read_cached(path: Path, seq_len: int, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """Cached blocks and byte counts, or None when the entry is damaged, of an older format or does
    not fit (shape, dtype, id range)."""
    try:
        entry = torch.load(path, weights_only=True)
    except Exception:  # noqa: BLE001 - a damaged cache entry is rebuilt
        return None
    if not isinstance(entry, dict):
        return None
    blocks, counts = entry.get("ids"), entry.get("bytes")
    ok = (isinstance(blocks, torch.Tensor) and blocks.dtype == torch.long and blocks.dim() == 2
          and blocks.shape[0] > 0 and blocks.shape[1] == seq_len
          and int(blocks.min()) >= 0 and int(blocks.max()) < vocab_size)
    ok = ok and (counts is None or (isinstance(counts, torch.Tensor) and counts.dtype == torch.long
                                    and counts.shape == blocks.shape and int(counts.min()) >= 0))
    return (blocks, counts) if ok else None


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


def tokenize_with_bytes(tokenizer: PreTrainedTokenizerBase, docs: list[str], max_tokens: int, *,
                        add_special_tokens: bool = True) -> tuple[list[int], list[int] | None]:
    """:func:`tokenize_stream` plus the UTF-8 bytes of the text each token covers.

    Args:
        tokenizer: the tokenizer.
        docs: the documents; empty ones are skipped.
        max_tokens: the cap on the stream's length.
        add_special_tokens: keep the tokenizer's default special tokens per document.

    Returns:
        ``(ids, bytes)``: the ids of :func:`tokenize_stream` and, per id, its byte count (see the module
        docstring; the EOS between documents covers 0 bytes); bytes is None for a tokenizer without
        character offsets.
    """
    if not getattr(tokenizer, "is_fast", False):
        return tokenize_stream(tokenizer, docs, max_tokens, add_special_tokens=add_special_tokens), None
    eos = tokenizer.eos_token_id
    out: list[int] = []
    nbytes: list[int] = []
    for doc in docs:
        if not doc:
            continue
        if out and eos is not None:
            out.append(eos)
            nbytes.append(0)
        enc = tokenizer(doc, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        out.extend(enc["input_ids"])
        nbytes.extend(token_bytes(doc, enc["offset_mapping"]))
        if len(out) >= max_tokens:
            break
    return out[:max_tokens], nbytes[:max_tokens]


def token_bytes(text: str, offsets: list[tuple[int, int]]) -> list[int]:
    """The UTF-8 bytes of ``text`` each token covers, from the tokens' character offsets.

    Args:
        text: one document.
        offsets: ``(start, end)`` character offsets of its tokens (a fast tokenizer's ``offset_mapping``).

    Returns:
        One count per token; they sum to ``len(text.encode())`` when a token covers any text (the
        attribution rule is in the module docstring).
    """
    edge = [0]
    for ch in text:
        edge.append(edge[-1] + len(ch.encode("utf-8", "surrogatepass")))
    out = [0] * len(offsets)
    covered, last, i = 0, None, 0
    while i < len(offsets):
        start, end = offsets[i]
        if end <= start:  # a special token: no text
            i += 1
            continue
        j = i
        while j + 1 < len(offsets) and tuple(offsets[j + 1]) == (start, end):
            j += 1
        stop = edge[min(end, len(text))]
        share, rest = divmod(max(0, stop - covered), j - i + 1)
        for t in range(i, j + 1):
            out[t] = share + (1 if j - t < rest else 0)
        covered, last, i = max(covered, stop), j, j + 1
    if last is not None:
        out[last] += edge[-1] - covered
    return out


def blocks_for(pair: ModelPair, data: DataSource) -> TokenBlocks:
    """Token blocks for evaluating ``pair``, from any form the API accepts for data.

    Args:
        pair: the loaded pair; text is tokenized with A's tokenizer (with the union tokenizer when
            the vocabularies differ by added tokens, :mod:`hf_llmc.model.vocab`), blocks fit A's
            maximum positions; chat data are rendered with A's chat template (the union tokenizer's,
            i.e. B's, when A has none).
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
        own = getattr(getattr(pair, "tokenizer_a", None), "chat_template", None) if data.chat else None
        blocks = load_blocks(pair.tokenizer, data, pair.model.config, chat_template=own)
    vocab = getattr(pair, "vocab", None)
    if vocab is not None:  # both endpoints are evaluated: every real token must be shared
        if blocks.lengths is None:
            vocab.check_ids(blocks.ids)
        else:  # chat rows: padding is neither attended nor scored; it gets a shared id either model has
            real = torch.arange(blocks.seq_len)[None, :] < blocks.lengths[:, None]
            vocab.check_ids(blocks.ids[real])
            if vocab.lacking(blocks.ids) is not None:
                blocks = dataclasses.replace(blocks, ids=torch.where(real, blocks.ids, vocab.shared_id()))
    return blocks


#: Several named evaluation sets: a mapping name -> data, named :class:`TokenBlocks`, or a
#: :class:`DataConfig` with ``NAME=PATH`` entries.
SetsSource = DataSource | Mapping[str, DataSource] | Sequence[TokenBlocks]


def sets_for(pair: ModelPair, data: SetsSource) -> list[TokenBlocks]:
    """The evaluation sets of a run: one unnamed set, or several named ones.

    Args:
        pair: the loaded pair (see :func:`blocks_for`).
        data: any form of :data:`DataSource` (one set; named when it is a :class:`DataConfig` with
            ``NAME=PATH`` entries or :class:`TokenBlocks` with a ``name``), a mapping name -> data,
            or a sequence of named :class:`TokenBlocks`.

    Returns:
        The token blocks of every set, in the order given; a single unnamed set has ``name`` None.

    Raises:
        DataError: the data cannot be read, a set has no name or a name repeats.
        PairError: text was given but the pair has no tokenizer.
    """
    if isinstance(data, Mapping):
        sets = [replace(blocks_for(pair, d), name=str(n)) for n, d in data.items()]
    elif isinstance(data, DataConfig) and data.multiple:
        sets = [replace(blocks_for(pair, cfg), name=name) for name, cfg in data.named()]
    elif isinstance(data, (list, tuple)):
        sets = list(data)
        if not all(isinstance(b, TokenBlocks) and b.name for b in sets):
            raise DataError("several evaluation sets: give named TokenBlocks or a mapping name -> data")
    else:
        return [blocks_for(pair, data)]
    names = [b.name for b in sets]
    if not sets or len(set(names)) != len(names):
        raise DataError(f"evaluation sets: names must be unique and at least one set given ({', '.join(map(str, names))})")
    return sets
