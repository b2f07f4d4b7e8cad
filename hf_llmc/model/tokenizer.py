"""Tokenizers: loading one, its identity, and whether two encode text the same way.

Two tokenizers with the same vocabulary can still cut text differently (a lowercasing normalizer,
another pre-tokenizer, other special tokens or BOS/EOS settings). Their identity is therefore a
digest of the whole definition (:func:`tokenizer_digest`), and a pair's tokenizers must also
agree on their special tokens and on the encoding of a fixed probe text (:func:`check_same_tokenizer`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from ..config.errors import PairError
from .checkpoint.folders import TOKENIZER_PATTERNS

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedTokenizerBase

#: Text every pair's two tokenizers must encode identically: case, accents, digits, CJK, emoji,
#: code, runs of spaces, tabs and newlines.
PROBE_TEXT = (
    "The Quick brown fox, naïve café: 12,345.67 ÉCOLE straße. 東京 こんにちは 🙂\n"
    "def f(x):\n\treturn x ** 2  # square\n\n   indented   text\r\n<s> </s> [CLS] <|endoftext|>"
)


def has_tokenizer_files(folder: str | Path) -> bool:
    """Whether ``folder`` holds any tokenizer file."""
    import fnmatch

    return any(f.is_file() and any(fnmatch.fnmatch(f.name, p) for p in TOKENIZER_PATTERNS) for f in Path(folder).iterdir())


def load_tokenizer(folder: Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase | None:
    """The tokenizer in ``folder``.

    Args:
        folder: a model (or tokenizer) folder.
        trust_remote_code: allow a tokenizer class shipped with the checkpoint.

    Returns:
        The tokenizer, or None when the folder holds no tokenizer files.

    Raises:
        PairError: the folder holds tokenizer files that do not load.
    """
    if not has_tokenizer_files(folder):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as err:  # noqa: BLE001 - transformers raises many types for broken files
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise PairError(f"{Path(folder).name}: its tokenizer files do not load ({first})") from None


def special_tokens(tokenizer: PreTrainedTokenizerBase) -> dict[str, tuple[str, int | None]]:
    """``{role: (token, id)}`` of the tokenizer's special tokens (bos, eos, unk, pad, ...)."""
    out = {}
    for role, token in sorted(tokenizer.special_tokens_map.items()):
        if isinstance(token, str):
            out[role] = (token, tokenizer.convert_tokens_to_ids(token))
    return out


def adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer starts an encoded text with its BOS token by default."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("")["input_ids"][:1] == [bos]


def tokenizer_digest(tokenizer: PreTrainedTokenizerBase) -> str:
    """A digest of the tokenizer's whole definition: its class, the serialized fast tokenizer
    (vocabulary, merges, normalizer, pre-tokenizer, post-processor) or else the vocabulary,
    the special tokens, whether it adds BOS / EOS, and its chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    encoded = tokenizer("")["input_ids"]  # the special tokens it adds
    payload = json.dumps([type(tokenizer).__name__, definition, special_tokens(tokenizer), encoded,
                          getattr(tokenizer, "chat_template", None)], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def check_same_tokenizer(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> None:
    """Refuse two tokenizers that would turn the same text into different token ids.

    Args:
        a: model A's tokenizer.
        b: model B's tokenizer.

    Raises:
        PairError: the vocabularies, the special tokens or the encoding of :data:`PROBE_TEXT`
            differ; the one-line message says what differs.
    """
    va, vb = a.get_vocab(), b.get_vocab()
    if va != vb:
        diff = sorted(set(va.items()) ^ set(vb.items()))[:3]
        raise PairError(
            f"different tokenizer vocabularies (A {len(va)} tokens, B {len(vb)}; first differences: "
            f"{', '.join(repr(t) for t, _ in diff)})"
        )
    sa, sb = special_tokens(a), special_tokens(b)
    if sa != sb:
        role = next(r for r in sorted(set(sa) | set(sb)) if sa.get(r) != sb.get(r))
        raise PairError(f"different special tokens: {role} is {sa.get(role)} in A, {sb.get(role)} in B")
    for probe in (PROBE_TEXT, vocabulary_probe(a)):
        ea, eb = _encode(a, probe), _encode(b, probe)
        if ea != eb:
            at = next((i for i, (x, y) in enumerate(zip(ea, eb)) if x != y), min(len(ea), len(eb)))
            raise PairError(
                f"the tokenizers encode text differently (same vocabulary, other normalizer, pre-tokenizer or "
                f"settings): a probe text gives {len(ea)} tokens in A, {len(eb)} in B, first difference at {at}"
            )


def vocabulary_probe(tokenizer: PreTrainedTokenizerBase, count: int = 64) -> str:
    """Text made of the tokenizer's own first ``count`` regular tokens (every tokenizer can encode
    it, also a word-level one without an unknown token)."""
    special = set(tokenizer.all_special_tokens)
    words = [t for t, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]) if t not in special][:count]
    return tokenizer.convert_tokens_to_string(words) + " " + " ".join(words)


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int] | str:
    """The ids of ``text``, or the kind of error encoding it raises (also compared)."""
    try:
        return tokenizer(text)["input_ids"]
    except Exception as err:  # noqa: BLE001 - e.g. a word-level tokenizer without an unknown token
        return f"error: {type(err).__name__}"
