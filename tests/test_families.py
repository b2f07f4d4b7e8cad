"""The family table (architectures as data): for every known family it gives exactly the
architecture generic discovery finds, from config.json and the safetensors headers alone; a first
merge and ``layers`` of a known family import no transformers; anything the table does not know
(another family, custom code, a checkpoint of another layout) falls back to discovery."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_llmc import lazy_pair, save_merged
from hf_llmc.config.errors import PairError
from hf_llmc.model.architecture import discover, load_config, meta_model
from hf_llmc.model.cache import folder_architecture, read_config
from hf_llmc.model.families import FAMILIES, folder_tensors, table_architecture
from hf_llmc.testing import MODEL_TYPES, init_model, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

#: Empties the family table in a CLI subprocess (the discovery path, for comparison).
NO_TABLE = "import hf_llmc.model.families as f; f.FAMILIES.clear(); "
#: config.json keys an older config may omit (then the family's default holds).
DEFAULTED = ("tie_word_embeddings", "attention_bias", "mlp_bias", "enable_bias", "bias", "qk_layernorm",
             "layer_norm_elementwise_affine")
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=300)
LLAMA_LIKE = dict(SMALL, intermediate_size=64, num_key_value_heads=2, head_dim=8)
PHI3_IDS = dict(pad_token_id=0, bos_token_id=0, eos_token_id=0)  # the defaults lie outside a tiny vocabulary
#: Variants tiny_config does not make (config switches, layouts) and the families it lacks:
#: case -> (transformers config class, its arguments).
EXTRA: dict[str, tuple[str, dict]] = {
    "llama-biases": ("LlamaConfig", dict(LLAMA_LIKE, attention_bias=True, mlp_bias=True)),
    "gpt_neox-no-bias": ("GPTNeoXConfig", dict(SMALL, intermediate_size=64, attention_bias=False)),
    "opt-projected-post-ln": ("OPTConfig", dict(SMALL, ffn_dim=64, word_embed_proj_dim=16, do_layer_norm_before=False)),
    "opt-no-bias-no-affine": ("OPTConfig", dict(SMALL, ffn_dim=64, enable_bias=False,
                                                layer_norm_elementwise_affine=False, tie_word_embeddings=False)),
    "phi-qk-layernorm": ("PhiConfig", dict(SMALL, intermediate_size=64, qk_layernorm=True)),
    "falcon-new-decoder-bias": ("FalconConfig", dict(SMALL, num_kv_heads=2, new_decoder_architecture=True, bias=True)),
    "falcon-sequential": ("FalconConfig", dict(SMALL, parallel_attn=False, tie_word_embeddings=False)),
    "qwen3-attention-bias": ("Qwen3Config", dict(LLAMA_LIKE, attention_bias=True)),
}
for _family, _cls in (("qwen3", "Qwen3Config"), ("gemma2", "Gemma2Config"), ("gemma3_text", "Gemma3TextConfig"),
                      ("phi3", "Phi3Config")):
    _base = dict(LLAMA_LIKE, **(PHI3_IDS if _family == "phi3" else {}))
    EXTRA[f"{_family}-tied"] = (_cls, dict(_base, tie_word_embeddings=True))
    EXTRA[f"{_family}-untied"] = (_cls, dict(_base, tie_word_embeddings=False))
    EXTRA[f"{_family}-defaults"] = (_cls, _base)

#: Every case: the tiny_config families tied, untied and with the defaulted keys left out, then EXTRA.
CASES = [f"{t}-{v}" for t in MODEL_TYPES for v in ("tied", "untied", "defaults")] + list(EXTRA)


@pytest.fixture
def saved(tmp_path, save_tiny_model) -> Callable[[str], Path]:
    """``saved(case) -> folder``: the case's tiny model saved with save_pretrained; a ``defaults``
    case has an older config.json, without the keys that hold their default."""
    import transformers

    def save(case: str) -> Path:
        folder = tmp_path / case
        family, variant = case.split("-", 1)
        if case in EXTRA:
            cls, kwargs = EXTRA[case]
            init_model(getattr(transformers, cls)(**kwargs)).save_pretrained(folder)
        elif variant == "defaults":
            save_tiny_model(family, folder, num_layers=2)
        else:
            save_tiny_model(family, folder, num_layers=2, tie_word_embeddings=variant == "tied")
        if variant == "defaults":
            config = read_config(folder)
            (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k not in DEFAULTED}))
        return folder

    return save


def _discovered(folder: Path):
    return discover(meta_model(load_config(folder)))


def test_every_family_has_cases():
    assert {case.split("-", 1)[0] for case in CASES} == set(FAMILIES)


@pytest.mark.parametrize("case", CASES)
def test_table_equals_discovery(case, saved):
    """Field by field: names, model order, groups, shapes, ties, stored names, class."""
    folder = saved(case)
    table = table_architecture(read_config(folder), folder_tensors(folder))
    assert table is not None, case
    assert dataclasses.asdict(table) == dataclasses.asdict(_discovered(folder))


# -- no transformers on the first use ------------------------------------------------------------
def _cli(args: list, cache: Path, prefix: str = "") -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run ``python -X importtime -m hf_llmc ARGS`` (with ``-c``: ``prefix`` first) in a subprocess;
    return it and the modules it imported."""
    code = ["-c", prefix + "import sys; from hf_llmc.cli import main; sys.exit(main(sys.argv[1:]))"]
    env = {**os.environ, "HF_LLMC_CACHE": str(cache), "COLUMNS": "120"}
    proc = subprocess.run([sys.executable, "-X", "importtime", *(code if prefix else ["-m", "hf_llmc"]),
                           *map(str, args)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    modules = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    return proc, modules


def _imports_transformers(modules: set[str]) -> bool:
    return any(re.fullmatch(r"transformers(\..+)?", m) for m in modules)


@pytest.mark.parametrize("model_type", ["gpt2", "gpt_neox", "llama"])
def test_first_merge_imports_no_transformers(model_type, save_tiny_model, tmp_path, monkeypatch):
    a = save_tiny_model(model_type, tmp_path / "a", seed=0)
    b = save_tiny_model(model_type, tmp_path / "b", seed=1)
    cache = tmp_path / "empty-cache"
    cache.mkdir()
    _, modules = _cli(["merge", a, b, "--layers", "attn.0", "--out", tmp_path / "x"], cache)  # α = 0.5
    assert "hf_llmc.model.families" in modules and not _imports_transformers(modules)
    assert not any(cache.rglob("*.json"))  # the table is cheap: nothing is cached
    # the same merge through discovery
    monkeypatch.setenv("HF_LLMC_CACHE", str(tmp_path / "other-cache"))
    monkeypatch.setattr("hf_llmc.model.families.FAMILIES", {})
    pair = lazy_pair(a, b)
    assert pair.model is not None  # discovered
    save_merged(pair, "attn.0=0.5", tmp_path / "y", card=False)
    table, discovered = (load_file(tmp_path / d / "model.safetensors") for d in ("x", "y"))
    assert list(table) == list(discovered)
    assert all(torch.equal(table[k], discovered[k]) for k in table)
    assert (tmp_path / "x" / "model.safetensors").read_bytes() == (tmp_path / "y" / "model.safetensors").read_bytes()


def test_layers_imports_no_transformers_and_prints_the_same(save_tiny_model, tmp_path):
    folder = save_tiny_model("gpt2", tmp_path / "gpt2", num_layers=2)
    table, modules = _cli(["layers", folder], tmp_path / "cache-1")
    assert not _imports_transformers(modules)
    discovered, modules = _cli(["layers", folder], tmp_path / "cache-2", prefix=NO_TABLE)
    assert _imports_transformers(modules)
    assert table.stdout == discovered.stdout and "tied: lm_head.weight is transformer.wte.weight" in table.stdout


def test_lazy_pair_uses_the_table(save_tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_LLMC_CACHE", str(tmp_path / "cache"))
    a = save_tiny_model("gpt_neox", tmp_path / "a", seed=0)
    b = save_tiny_model("gpt_neox", tmp_path / "b", seed=1)
    pair = lazy_pair(a, b)
    assert pair.model is None and pair.tokenizer is None
    assert pair.arch == _discovered(a) and pair.arch.stored_names == {"lm_head.weight": "embed_out.weight"}
    assert folder_architecture(a) == pair.arch
    assert not (tmp_path / "cache").exists()


# -- fallbacks -----------------------------------------------------------------------------------
def test_configs_only_folder_is_discovered(save_tiny_model, tmp_path, monkeypatch):
    """A Hub snapshot of the configs only (``layers`` downloads ``*.json``): no shapes, discovery."""
    monkeypatch.setenv("HF_LLMC_CACHE", str(tmp_path / "cache"))
    full = save_tiny_model("llama", tmp_path / "full", num_layers=2)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((full / "config.json").read_text())
    names = load_file(full / "model.safetensors")
    index = {"metadata": {}, "weight_map": {k: "model-00001-of-00001.safetensors" for k in names}}
    (bare / "model.safetensors.index.json").write_text(json.dumps(index))
    assert folder_tensors(bare) is None
    assert folder_architecture(bare) == _discovered(full)
    assert len(list((tmp_path / "cache" / "architectures").glob("*.json"))) == 1  # discovered, and cached


def test_unknown_family_and_custom_code_fall_back(tmp_path, tiny_tokenizer, monkeypatch):
    import transformers as tf

    monkeypatch.setenv("HF_LLMC_CACHE", str(tmp_path / "cache"))
    config = tf.OlmoConfig(**LLAMA_LIKE)
    folders = []
    for seed in (0, 1):
        folders.append(tmp_path / f"olmo{seed}")
        init_model(config, seed=seed).save_pretrained(folders[-1])
        tiny_tokenizer.save_pretrained(folders[-1])
    raw = read_config(folders[0])
    assert raw["model_type"] not in FAMILIES and table_architecture(raw, folder_tensors(folders[0])) is None
    pair = lazy_pair(*folders)
    assert pair.model is not None and pair.arch == _discovered(folders[0])  # discovery
    save_merged(pair, "attn.0=0.5", tmp_path / "merged", card=False)
    llama = tiny_config("llama", num_layers=2, hidden_size=32)
    llama_folder = tmp_path / "llama"
    init_model(llama).save_pretrained(llama_folder)
    raw = read_config(llama_folder)
    tensors = folder_tensors(llama_folder)
    assert table_architecture(raw, tensors) is not None
    for changed in ({"auto_map": {"AutoModelForCausalLM": "m.M"}}, {"quantization_config": {"quant_method": "x"}},
                    {"architectures": ["LlamaForSequenceClassification"]}, {"num_hidden_layers": 3},
                    {"vocab_size": 301}, {"attention_bias": True}):
        assert table_architecture({**raw, **changed}, tensors) is None, changed


def _tensors(folder: Path) -> dict[str, tuple[int, ...]]:
    return dict(folder_tensors(folder))


def test_checkpoints_of_another_layout_fall_back(save_tiny_model, tmp_path):
    folder = save_tiny_model("llama", tmp_path / "llama", num_layers=2)
    raw, tensors = read_config(folder), _tensors(folder)
    up = "model.layers.1.mlp.up_proj.weight"
    missing = {k: v for k, v in tensors.items() if k != up}
    extra = {**tensors, "model.layers.0.self_attn.extra.weight": (4, 4)}
    one_bias = {**tensors, "model.layers.0.self_attn.q_proj.bias": (32,)}  # in one block only
    for case in (missing, extra, one_bias):
        assert table_architecture(raw, case) is None
    biases = {**tensors, **{f"model.layers.{i}.self_attn.{p}_proj.bias": (32,) for i in (0, 1) for p in "qkvo"}}
    assert table_architecture(raw, biases) is None  # the config says attention_bias: false
    assert table_architecture({**raw, "attention_bias": True}, biases) is not None


def test_a_checkpoint_missing_a_tensor_gets_the_usual_error(save_tiny_model, tmp_path):
    good = save_tiny_model("llama", tmp_path / "good", num_layers=2)
    broken = save_tiny_model("llama", tmp_path / "broken", num_layers=2, seed=1)
    state = load_file(broken / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    assert table_architecture(read_config(broken), folder_tensors(broken)) is None
    with pytest.raises(PairError, match=r"B lacks parameters of A: model\.layers\.1\.mlp\.up_proj\.weight"):
        lazy_pair(good, broken)


def test_a_checkpoint_with_an_extra_tensor_is_discovered_and_kept(save_tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_LLMC_CACHE", str(tmp_path / "cache"))
    a = save_tiny_model("llama", tmp_path / "a", num_layers=2)
    b = save_tiny_model("llama", tmp_path / "b", num_layers=2, seed=1)
    state = load_file(a / "model.safetensors")
    state["model.layers.0.self_attn.extra.weight"] = torch.ones(4, 4)
    save_file(state, a / "model.safetensors", metadata={"format": "pt"})
    pair = lazy_pair(a, b)
    assert pair.model is not None  # the table refused; discovery passes
    save_merged(pair, "attn.0=0.5", tmp_path / "m", card=False)
    assert torch.equal(load_file(tmp_path / "m" / "model.safetensors")["model.layers.0.self_attn.extra.weight"],
                       torch.ones(4, 4))


def test_buffers_transformers_ignores_and_unprefixed_keys(save_tiny_model, tmp_path):
    """Older GPT-2 checkpoints: keys without ``transformer.`` and the causal-mask buffers."""
    folder = save_tiny_model("gpt2", tmp_path / "gpt2", num_layers=2)
    raw, tensors = read_config(folder), _tensors(folder)
    expected = dataclasses.asdict(_discovered(folder))
    old = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    old.update({f"h.{i}.attn.bias": (1, 1, 128, 128) for i in (0, 1)})
    assert dataclasses.asdict(table_architecture(raw, old)) == expected
    for unknown in ("h.0.attn.other", "h.0.crossattention.c_attn.bias"):  # another layout (cross-attention)
        assert table_architecture(raw, {**old, unknown: (1,)}) is None
    tied_copy = {**tensors, "lm_head.weight": tensors["transformer.wte.weight"]}  # left unread, as on load
    assert dataclasses.asdict(table_architecture(raw, tied_copy)) == expected
    assert table_architecture({**raw, "tie_word_embeddings": False}, tensors) is None  # an untied head is stored
