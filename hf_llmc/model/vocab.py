"""Pairs whose vocabularies differ by added tokens or padding rows.

Fine-tunes often add tokens (a pad token, chat tokens such as ``<|im_start|>``) to their base's
tokenizer and resize the embedding and head, often to a multiple of 8, 64 or 128. Such a pair is
accepted when the two tokenizers differ *only* by added tokens: the same tokenizer model (base
vocabulary and merges), normalizer, pre-tokenizer, post-processor and decoder, the same BOS / EOS /
unknown tokens, and the same id for every token both have. Anything else is refused with a
one-line message that says what differs.

The *union* vocabulary is the superset tokenizer when one side's vocabulary contains the other's;
when both add different tokens it is A's tokenizer plus B's added tokens (in B's id order) with
new ids after A's last. Evaluation text is tokenized with it.

The *union matrices* (embedding, head and any other vocabulary-indexed tensor) have
``max(union vocabulary size, A's rows, B's rows)`` rows: a token's row sits at its union id; a
padding row (beyond its own tokenizer) at or beyond the union vocabulary keeps its index, and a
padding row that falls on a token of the union vocabulary gives way to that token's row. Rows that
exist on both sides are interpolated. Rows that exist on one side only follow ``added_rows``:

* ``own`` (default): taken from the side that has them, at every α (exactly those values);
* ``mean-init``: the missing side's value is the mean of that side's shared token rows (how
  ``resize_token_embeddings`` initialises new rows), and the row is interpolated like the others.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..config.errors import DataError, PairError
from .tokenizer import PROBE_TEXT, vocabulary_probe

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedTokenizerBase

#: The parts of a fast tokenizer's definition that must agree, and how a difference is named.
_PARTS = {
    "model": "the tokenizer model (base vocabulary or merges)",
    "normalizer": "the normalizer",
    "pre_tokenizer": "the pre-tokenizer",
    "post_processor": "the post-processor",
    "decoder": "the decoder",
}
_ROLES = ("bos_token", "eos_token", "unk_token")


def config_vocab_size(config: dict | None) -> int | None:
    """``vocab_size`` of a ``config.json`` dict (top level, else ``text_config``); None when absent."""
    if not isinstance(config, dict):
        return None
    value = config.get("vocab_size")
    if value is None and isinstance(config.get("text_config"), dict):
        value = config["text_config"].get("vocab_size")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _definition(tokenizer: PreTrainedTokenizerBase) -> dict | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return None if backend is None else json.loads(backend.to_str())


def _short(tokens: list[str], n: int = 3) -> str:
    shown = ", ".join(repr(t) for t in tokens[:n])
    return shown + (f" (+{len(tokens) - n} more)" if len(tokens) > n else "")


def check_added_tokens_only(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> None:
    """Refuse two tokenizers that differ in more than added tokens.

    Args:
        a: model A's tokenizer.
        b: model B's tokenizer.

    Raises:
        PairError: a shared token with two ids, another tokenizer model, normalizer, pre-tokenizer,
            post-processor or decoder, other BOS / EOS / unknown tokens, or a probe text that
            encodes differently; the one-line message says what differs.
    """
    va, vb = a.get_vocab(), b.get_vocab()
    head = f"different tokenizer vocabularies (A {len(va)} tokens, B {len(vb)})"
    moved = sorted((t for t in va.keys() & vb.keys() if va[t] != vb[t]), key=va.get)
    if moved:
        t = moved[0]
        raise PairError(f"{head}: the shared token {t!r} has id {va[t]} in A, {vb[t]} in B"
                        + (f" (+{len(moved) - 1} more)" if len(moved) > 1 else "")
                        + "; only vocabularies that differ by added tokens can be paired")
    da, db = _definition(a), _definition(b)
    if da is None or db is None:
        diff = sorted(set(va.items()) ^ set(vb.items()))[:3]
        raise PairError(f"{head}; first differences: {', '.join(repr(t) for t, _ in diff)} (no fast tokenizer to "
                        "tell added tokens apart)")
    for part, label in _PARTS.items():
        if da.get(part) != db.get(part):
            extra = ""
            if part == "model":
                ma, mb = (da.get("model") or {}).get("vocab"), (db.get("model") or {}).get("vocab")
                if isinstance(ma, dict) and isinstance(mb, dict) and ma != mb:
                    diff = sorted(set(ma.items()) ^ set(mb.items()), key=lambda kv: kv[1])
                    extra = f"; first differences: {_short([t for t, _ in diff])}"
                else:
                    extra = "; the merges differ" if isinstance(ma, dict) and ma == mb else ""
            raise PairError(f"{head}: {label} differs{extra}; only added tokens may differ")
    added_a = {t["content"]: t for t in da.get("added_tokens") or []}
    added_b = {t["content"]: t for t in db.get("added_tokens") or []}
    for content in sorted(added_a.keys() & added_b.keys()):
        if added_a[content] != added_b[content]:
            raise PairError(f"{head}: the added token {content!r} has other settings in A and B "
                            "(id, special, normalized, lstrip/rstrip or single_word)")
    for role in _ROLES:
        ta, tb = getattr(a, role, None), getattr(b, role, None)
        if ta is not None and tb is not None and str(ta) != str(tb):
            raise PairError(f"different special tokens: {role} is {str(ta)!r} in A, {str(tb)!r} in B")
    one_side = sorted(va.keys() ^ vb.keys(), key=len, reverse=True)
    probe = PROBE_TEXT
    for token in one_side:
        probe = probe.replace(token, " ")
    for text in (probe, vocabulary_probe(a), ""):
        if a(text)["input_ids"] != b(text)["input_ids"]:
            raise PairError("the tokenizers encode text differently (apart from their added tokens: other "
                            "settings or special tokens added to every text)")


def _added(tokenizer: PreTrainedTokenizerBase) -> dict[str, object]:
    """``{content: AddedToken}`` of the tokenizer's added tokens."""
    return {str(t): t for t in tokenizer.added_tokens_decoder.values()}


def union_tokenizer(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> tuple[PreTrainedTokenizerBase, str]:
    """The tokenizer of the union vocabulary and where it comes from.

    Args:
        a: model A's tokenizer.
        b: model B's tokenizer (differing from A's by added tokens only).

    Returns:
        ``(tokenizer, source)``: A's tokenizer (``"a"``) when its vocabulary contains B's, B's
        (``"b"``) when B's contains A's, else a copy of A's with B's added tokens appended in B's
        id order (``"union"``; B's special-token roles that A lacks and B's chat template when A
        has none are added too).
    """
    va, vb = a.get_vocab(), b.get_vocab()
    if vb.keys() <= va.keys():
        return a, "a"
    if va.keys() <= vb.keys():
        return b, "b"
    tok = copy.deepcopy(a)
    added_b = _added(b)
    for content, _ in sorted(((t, i) for t, i in vb.items() if t not in va), key=lambda kv: kv[1]):
        token = added_b.get(content, content)
        tok.add_tokens([token], special_tokens=bool(getattr(token, "special", False)))
    roles = {role: str(value) for role, value in b.special_tokens_map.items()
             if isinstance(value, str) and getattr(a, role, None) is None}
    if roles:
        tok.add_special_tokens(roles)
    if not getattr(tok, "chat_template", None) and getattr(b, "chat_template", None):
        tok.chat_template = b.chat_template
    return tok, "union"


def _runs(positions: torch.Tensor, sources: torch.Tensor) -> list[tuple[int, int, int]]:
    """``(start, source start, length)`` of the runs where both ``positions`` and ``sources`` step by one."""
    if positions.numel() == 0:
        return []
    cut = ((positions[1:] - positions[:-1] != 1) | (sources[1:] - sources[:-1] != 1)).nonzero().flatten() + 1
    starts, ends = [0, *cut.tolist()], [*cut.tolist(), positions.numel()]
    return [(int(positions[s]), int(sources[s]), e - s) for s, e in zip(starts, ends)]


def _copy_rows(out: torch.Tensor, src: torch.Tensor, index: torch.Tensor) -> None:
    """``out[i] = src[index[i]]`` where ``index[i] >= 0``, cast to ``out``'s dtype, run by run."""
    positions = (index >= 0).nonzero().flatten()
    for start, source, length in _runs(positions, index[positions]):
        out[start:start + length].copy_(src[source:source + length])


def _mean_rows(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of ``t``'s rows where ``mask`` (run by run; one run: ``Tensor.mean``)."""
    positions = mask.nonzero().flatten()
    runs = _runs(positions, positions)
    if len(runs) == 1:
        start, _, length = runs[0]
        return t[start:start + length].mean(dim=0)
    total = sum(t[start:start + length].double().sum(dim=0) for start, _, length in runs)
    return (total / positions.numel()).to(t.dtype)


@dataclass
class VocabMap:
    """How A's and B's vocabulary-indexed rows sit in the union matrices (see the module docstring).

    Attributes:
        tokenizer: the union tokenizer (evaluation text is tokenized with it).
        source: ``"a"``, ``"b"`` (that side's tokenizer is the superset) or ``"union"`` (built).
        union_size: tokens in the union vocabulary.
        rows: rows of the union matrices.
        rows_a: A's embedding rows; ``rows_b`` B's.
        index_a: ``[rows]`` A's row for each union row, -1 where A has none; ``index_b`` B's.
        shared: tokens both have.
        added_a: ``(token, union id)`` of the tokens only A has; ``added_b`` B's.
        added_rows: ``"own"`` or ``"mean-init"``.
        params: canonical parameter name -> its vocabulary dimension (0).
    """

    tokenizer: object
    source: str
    union_size: int
    rows: int
    rows_a: int
    rows_b: int
    index_a: torch.Tensor
    index_b: torch.Tensor
    shared: int
    added_a: list[tuple[str, int]]
    added_b: list[tuple[str, int]]
    added_rows: str = "own"
    params: dict[str, int] = field(default_factory=dict)

    # -- rows -----------------------------------------------------------------------------------
    @property
    def only_a(self) -> torch.Tensor:
        """Union rows only A has (bool mask)."""
        return (self.index_a >= 0) & (self.index_b < 0)

    @property
    def only_b(self) -> torch.Tensor:
        return (self.index_b >= 0) & (self.index_a < 0)

    @property
    def shared_tokens(self) -> torch.Tensor:
        """Union rows of tokens both tokenizers have (bool mask; padding rows excluded)."""
        both = (self.index_a >= 0) & (self.index_b >= 0)
        both[self.union_size:] = False
        return both

    def endpoints(self, a: torch.Tensor, b: torch.Tensor, dim: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """A's and B's tensors in the union layout (float32), the missing rows filled per ``added_rows``.

        Args:
            a: A's stored tensor (``rows_a`` along ``dim``).
            b: B's stored tensor.
            dim: the vocabulary dimension.

        Returns:
            ``(a_union, b_union)``, each with ``rows`` along ``dim``. With ``own`` a missing row
            is the other side's row (so every α gives that row); with ``mean-init`` it is the mean
            of the side's own shared token rows.
        """
        a0, b0 = a.movedim(dim, 0), b.movedim(dim, 0)
        have_a, have_b = self.index_a >= 0, self.index_b >= 0
        au = torch.empty((self.rows, *a0.shape[1:]), dtype=torch.float32, device=a0.device)
        bu = torch.empty_like(au)
        _copy_rows(au, a0, self.index_a)  # slice by slice: no full-size temporary
        _copy_rows(bu, b0, self.index_b)
        if self.added_rows == "mean-init":
            shared = self.shared_tokens
            au[~have_a] = _mean_rows(au, shared)
            bu[~have_b] = _mean_rows(bu, shared)
        else:
            au[~have_a] = bu[~have_a]
            bu[~have_b] = au[~have_b]
        return au.movedim(0, dim), bu.movedim(0, dim)

    def fix_rows(self, value: torch.Tensor, a_union: torch.Tensor, b_union: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """With ``own``: set the one-side rows of a mixed tensor to exactly that side's values (in place)."""
        if self.added_rows == "own":
            v, au, bu = value.movedim(dim, 0), a_union.movedim(dim, 0), b_union.movedim(dim, 0)
            v[self.only_a] = au[self.only_a].to(v.dtype)
            v[self.only_b] = bu[self.only_b].to(v.dtype)
        return value

    # -- tokens ---------------------------------------------------------------------------------
    def lacking(self, ids: torch.Tensor) -> tuple[int, str] | None:
        """The first token id in ``ids`` that A or B lacks, and which: ``(id, "model A")``; None when all are shared."""
        flat = ids.reshape(-1)
        if flat.numel() == 0:
            return None
        bad = (flat < 0) | (flat >= self.union_size)
        ok = flat.clamp(0, self.union_size - 1)
        bad |= (self.index_a[ok] < 0) | (self.index_b[ok] < 0)
        if not bool(bad.any()):
            return None
        first = int(flat[bad.nonzero()[0, 0]])
        if not 0 <= first < self.union_size:
            return first, "either model"
        return first, "model A" if int(self.index_a[first]) < 0 else "model B"

    def shared_id(self) -> int:
        """A token id both models have (the EOS token's when shared), e.g. for padding positions."""
        eos = getattr(self.tokenizer, "eos_token_id", None)
        shared = self.shared_tokens
        if eos is not None and 0 <= eos < self.union_size and bool(shared[eos]):
            return int(eos)
        return int(shared.nonzero()[0, 0])

    def check_ids(self, ids: torch.Tensor) -> None:
        """Refuse evaluation tokens that A or B lacks (both endpoints are evaluated).

        Raises:
            DataError: naming the first such token and the model that lacks it.
        """
        found = self.lacking(ids)
        if found is not None:
            token_id, who = found
            token = self.tokenizer.convert_ids_to_tokens(token_id) if 0 <= token_id < self.union_size else None
            shown = f"token {token!r} (id {token_id})" if token is not None else f"token id {token_id}"
            raise DataError(f"the evaluation text contains {shown}, which {who} lacks; "
                            "only tokens of the shared vocabulary can be evaluated on both models")

    def describe(self) -> dict:
        """The shared vocabulary size, the added tokens on each side and the row counts (for results)."""
        return {
            "shared_tokens": self.shared, "union_tokens": self.union_size, "tokenizer": self.source,
            "added_a": [t for t, _ in self.added_a], "added_b": [t for t, _ in self.added_b],
            "rows_a": self.rows_a, "rows_b": self.rows_b, "rows": self.rows, "added_rows": self.added_rows,
        }

    def summary(self) -> str:
        """One line: shared size, added tokens per side, rows and the rule for one-side rows."""
        def side(name: str, added: list[tuple[str, int]]) -> str:
            return f"{name} adds {len(added)}" + (f" ({_short([t for t, _ in added])})" if added else "")

        return (f"vocabulary: {self.shared:,} shared tokens; {side('A', self.added_a)}, {side('B', self.added_b)}; "
                f"embedding rows A {self.rows_a:,}, B {self.rows_b:,}, union {self.rows:,} "
                f"(tokenizer: {'built union' if self.source == 'union' else self.source.upper() + chr(39) + 's'}); "
                f"one-side rows: {self.added_rows}")


def build_vocab_map(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase, rows_a: int, rows_b: int,
                    added_rows: str = "own") -> VocabMap:
    """The union vocabulary of two tokenizers that differ by added tokens (or only in their rows).

    Args:
        a: model A's tokenizer.
        b: model B's tokenizer.
        rows_a: rows of A's embedding (its ``vocab_size``).
        rows_b: rows of B's.
        added_rows: ``"own"`` or ``"mean-init"`` (module docstring).

    Returns:
        The :class:`VocabMap`.

    Raises:
        PairError: the tokenizers differ in more than added tokens, or a tokenizer has more tokens
            than its model has rows.
    """
    va, vb = a.get_vocab(), b.get_vocab()
    if va != vb:
        check_added_tokens_only(a, b)
    for name, vocab, rows in (("A", va, rows_a), ("B", vb, rows_b)):
        top = max(vocab.values(), default=-1)
        if top >= rows:
            raise PairError(f"model {name}'s tokenizer has token id {top} but its embedding only {rows} rows")
    tok, source = union_tokenizer(a, b)
    vu = tok.get_vocab()
    union_size = max(vu.values()) + 1
    rows = max(union_size, rows_a, rows_b)
    index_a = torch.full((rows,), -1, dtype=torch.long)
    index_b = torch.full((rows,), -1, dtype=torch.long)
    for t, i in vu.items():
        if t in va:
            index_a[i] = va[t]
        if t in vb:
            index_b[i] = vb[t]
    for index, own_rows in ((index_a, rows_a), (index_b, rows_b)):  # padding rows past the union keep their index
        if own_rows > union_size:
            index[union_size:own_rows] = torch.arange(union_size, own_rows)
    added_a = sorted(((t, vu[t]) for t in va.keys() - vb.keys()), key=lambda kv: kv[1])
    added_b = sorted(((t, vu[t]) for t in vb.keys() - va.keys()), key=lambda kv: kv[1])
    return VocabMap(tok, source, union_size, rows, rows_a, rows_b, index_a, index_b, len(va.keys() & vb.keys()),
                    added_a, added_b, added_rows)
