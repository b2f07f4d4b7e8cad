"""Shared pytest fixtures: tiny trained pairs and tiny random models.

Fixtures (all session-scoped, all offline, all deterministic):

* ``make_pair(model_type="gpt2", **overrides) -> DemoPair`` — builds (once per distinct
  argument set) a trained pair with :func:`hf_llmc.testing.build_pair` under a session
  temporary folder. Defaults are :data:`TINY_PAIR` (a few seconds per pair); the GPT-2
  default pair shows a clear full-interpolation barrier on its ``eval.txt`` (midpoint
  0.39 nats above the endpoints' mean for seed 0; 0.26-0.39 for seeds 0-2).
* ``gpt2_pair`` (3 blocks, width 64, barrier), ``llama_pair`` (6 blocks: ``attn.0``-
  ``attn.5`` exist) and ``neox_pair`` (3 blocks) — ``make_pair`` shortcuts; the last
  two are width 32 with a short training run (cheap; no barrier promised).
* ``tiny_model(model_type, **config_overrides) -> PreTrainedModel`` — random init (seed
  0) from :func:`hf_llmc.testing.tiny_config`, no training; :data:`TINY_MODEL` sizes and
  the vocabulary of ``tiny_tokenizer``. Works for every type in ``MODEL_TYPES``.
* ``save_tiny_model(model_type, dir, **config_overrides) -> Path`` — saves that model
  (safetensors) and ``tiny_tokenizer`` into ``dir`` with ``save_pretrained``.
* ``tiny_tokenizer`` — the byte-level BPE tokenizer (vocab 300) the tiny models use.
* ``merge_pair_dirs`` — a GPT-2 pair (B = A + noise) with evaluation text, shared by the merge,
  card and recipe tests.

Reference computations and checkpoint builders the tests share are in ``helpers.py``.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from hf_llmc.testing import DemoPair, build_pair, init_model, synthetic_documents, tiny_config, train_tokenizer  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

#: Default settings of ``make_pair`` (overridable per call).
TINY_PAIR: dict[str, Any] = {
    "num_layers": 3,
    "hidden_size": 64,
    "num_heads": 4,
    "vocab_size": 512,
    "max_positions": 128,
    "pretrain_steps": 2,
    "finetune_steps": 150,
    "seq_len": 64,
    "batch_size": 8,
    "lr": 5e-3,
    "seed": 0,
}

#: Shorter training for the llama / gpt_neox pairs (trained, but no barrier promised).
_SMALL_RUN: dict[str, Any] = {"finetune_steps": 25, "batch_size": 4, "seq_len": 32}

#: Default sizes of ``tiny_model`` / ``save_tiny_model``.
TINY_MODEL: dict[str, Any] = {
    "num_layers": 3,
    "hidden_size": 32,
    "num_heads": 4,
    "max_positions": 128,
}


@pytest.fixture(scope="session", autouse=True)
def hf_llmc_cache(tmp_path_factory) -> Path:
    """One fresh ``HF_LLMC_CACHE`` for the session (token blocks, architectures): tests never
    read or write the user's cache, and CLI subprocesses inherit it."""
    saved = os.environ.get("HF_LLMC_CACHE")
    root = tmp_path_factory.mktemp("hf_llmc_cache")
    os.environ["HF_LLMC_CACHE"] = str(root)
    yield root
    if saved is None:
        os.environ.pop("HF_LLMC_CACHE", None)
    else:
        os.environ["HF_LLMC_CACHE"] = saved


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    tiny models on a shared 2-core machine run many times faster without thread contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _key(**kwargs: Any) -> tuple:
    return tuple(sorted((k, repr(v)) for k, v in kwargs.items()))


@pytest.fixture(scope="session")
def make_pair(tmp_path_factory) -> Callable[..., DemoPair]:
    """Factory: ``make_pair(model_type="gpt2", **overrides) -> DemoPair``, cached."""
    cache: dict[tuple, DemoPair] = {}

    def make(model_type: str = "gpt2", **overrides: Any) -> DemoPair:
        kwargs = {**TINY_PAIR, **overrides, "model_type": model_type}
        key = _key(**kwargs)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"pair-{model_type}")
            cache[key] = build_pair(out, **kwargs)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def gpt2_pair(make_pair) -> DemoPair:
    """Trained GPT-2 pair, 3 blocks, width 64 (tied embeddings)."""
    return make_pair("gpt2")


@pytest.fixture(scope="session")
def llama_pair(make_pair) -> DemoPair:
    """Trained Llama pair, 6 blocks (``attn.0``-``attn.5``), width 32, short training."""
    return make_pair("llama", num_layers=6, hidden_size=32, **_SMALL_RUN)


@pytest.fixture(scope="session")
def neox_pair(make_pair) -> DemoPair:
    """Trained GPT-NeoX pair, 3 blocks, width 32, short training."""
    return make_pair("gpt_neox", hidden_size=32, **_SMALL_RUN)


@pytest.fixture(scope="session")
def merge_pair_dirs(tmp_path_factory, tiny_model, tiny_tokenizer) -> dict[str, Path]:
    """One GPT-2 pair (3 blocks, width 64; B = A + noise, A with a model card and license) with
    evaluation text, for the merge, card and recipe tests (:func:`helpers.build_pair_dirs`)."""
    from helpers import build_pair_dirs

    model = tiny_model("gpt2", hidden_size=64, max_positions=64)
    return build_pair_dirs(tmp_path_factory.mktemp("merge-pair"), model, tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """Byte-level BPE (vocab 300, bos = eos = unk = ``<|endoftext|>``) for tiny models."""
    return train_tokenizer(synthetic_documents("mixed", 120, 0), 300)


@pytest.fixture(scope="session")
def tiny_model(tiny_tokenizer) -> Callable[..., torch.nn.Module]:
    """Factory: ``tiny_model(model_type, seed=0, **config_overrides)``, random init."""

    def make(model_type: str, *, seed: int = 0, **overrides: Any):
        sizes = {**TINY_MODEL, "vocab_size": len(tiny_tokenizer), **overrides}
        return init_model(tiny_config(model_type, **sizes), seed=seed)

    return make


@pytest.fixture(scope="session")
def moe_pair_dirs(tmp_path_factory, tiny_tokenizer) -> dict[str, Path]:
    """``{"a", "b"}``: two random tiny Mixtral models (2 blocks, 4 experts) with the tiny tokenizer.
    transformers 5 fuses Mixtral's per-expert checkpoint tensors into one parameter on load."""
    from transformers import AutoModelForCausalLM, MixtralConfig

    config = MixtralConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=64)
    root = tmp_path_factory.mktemp("moe-pair")
    dirs = {}
    for name, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        dirs[name] = root / name
        AutoModelForCausalLM.from_config(config).save_pretrained(dirs[name])
        tiny_tokenizer.save_pretrained(dirs[name])
    return dirs


@pytest.fixture(scope="session")
def save_tiny_model(tiny_model, tiny_tokenizer) -> Callable[..., Path]:
    """Factory: ``save_tiny_model(model_type, dir, seed=0, **overrides) -> Path``."""

    def save(model_type: str, directory: str | os.PathLike, *, seed: int = 0,
             **overrides: Any) -> Path:
        path = Path(directory)
        tiny_model(model_type, seed=seed, **overrides).save_pretrained(path)
        tiny_tokenizer.save_pretrained(path)
        return path

    return save
