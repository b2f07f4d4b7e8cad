"""Tiny real checkpoints for the large-model tests (placement, quantization, multi-process).

A and B are saved with ``save_pretrained`` and share a word-level tokenizer whose token ids
are the numbers in the evaluation text (``w17`` -> id 17), so the CLI's data pipeline yields
exactly the blocks the tests compare against.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

VOCAB = 300


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB - 1)} | {"[UNK]": VOCAB - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="w0", unk_token="[UNK]")


def eval_ids(n_blocks: int = 6, seq_len: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, VOCAB - 1, (n_blocks, seq_len), generator=torch.Generator().manual_seed(seed))


def write_eval_text(path: Path, ids: torch.Tensor) -> Path:
    path.write_text(" ".join(f"w{int(t)}" for t in ids.flatten()))
    return path


def build_full_pair(root: Path, model_type: str = "llama", *, noise: float = 0.3, dtype=torch.float32, **sizes):
    """A (seeded init) and B = A + Gaussian noise, both saved with a tokenizer; returns (a, b)."""
    from hf_llmc.testing import init_model, tiny_config

    root = Path(root)
    cfg = tiny_config(model_type, vocab_size=VOCAB, **({"num_layers": 2, "hidden_size": 64} | sizes))
    model = init_model(cfg, seed=0)
    tok = word_tokenizer()
    model.to(dtype).save_pretrained(root / "a")
    tok.save_pretrained(root / "a")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            scale = p.float().std().item() if p.numel() > 1 else 0.0
            p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * (noise * scale + noise * 0.1))
    model.to(dtype).save_pretrained(root / "b")
    tok.save_pretrained(root / "b")
    return root / "a", root / "b"


def close(x: float, y: float, rel: float = 2e-5) -> bool:
    return math.isclose(x, y, rel_tol=rel, abs_tol=1e-7)


BARRIER_NUMBERS = ("loss_a", "loss_b", "accuracy_a", "accuracy_b", "barrier_max", "barrier_mid", "barrier_mid_se",
                   "error_barrier_max", "error_barrier_mid")


def assert_same_result(got: dict, want: dict, rel: float = 2e-5) -> None:
    """Every number of two barrier results (``to_dict()`` or JSON) agrees to ``rel``."""
    assert got["alphas"] == want["alphas"]
    for key in ("loss", "accuracy"):
        for x, y in zip(got[key], want[key]):
            assert close(x, y, rel), (key, got[key], want[key])
    for key in BARRIER_NUMBERS:
        assert close(got[key], want[key], rel), (key, got[key], want[key])
