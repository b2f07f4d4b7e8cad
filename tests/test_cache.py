"""The architecture cache: a repeated streamed merge reuses the discovered architecture, imports no
transformers, and writes the same bytes; stale entries, other configs and custom code miss it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_llmc import lazy_pair, save_merged
from hf_llmc.model.architecture import discover
from hf_llmc.model.cache import architecture_key, load_architecture, read_config

#: Empties the family table (tests/test_families.py) in a CLI subprocess, so that it discovers.
NO_TABLE = "import hf_llmc.model.families as f; f.FAMILIES.clear(); "


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty ``HF_LLMC_CACHE``, and no family table: these tests are about the cache, which
    comes before the table (and discovery after both)."""
    root = tmp_path / "cache"
    monkeypatch.setenv("HF_LLMC_CACHE", str(root))
    monkeypatch.setattr("hf_llmc.model.families.FAMILIES", {})
    return root


def _weights(folder: Path) -> bytes:
    return (folder / "model.safetensors").read_bytes()


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "gpt_neox"])
def test_second_pair_uses_the_cache_and_merges_the_same(model_type, save_tiny_model, tiny_model, tmp_path, cache):
    a = save_tiny_model(model_type, tmp_path / "a", seed=0)
    b = save_tiny_model(model_type, tmp_path / "b", seed=1)
    first = lazy_pair(a, b)
    assert first.model is not None and first.model.device.type == "meta"  # discovered
    assert len(list((cache / "architectures").glob("*.json"))) == 1
    second = lazy_pair(a, b)
    assert second.model is None and second.tokenizer is None  # nothing of transformers needed
    assert second.arch == first.arch == discover(tiny_model(model_type))
    save_merged(first, "attn.0=0.3; mlp.1=0.7", tmp_path / "m1", card=False)
    save_merged(second, "attn.0=0.3; mlp.1=0.7", tmp_path / "m2", card=False)
    assert _weights(tmp_path / "m1") == _weights(tmp_path / "m2")


def test_cli_repeat_commands_import_no_transformers(save_tiny_model, tmp_path, cache):
    a = save_tiny_model("llama", tmp_path / "a", seed=0)
    b = save_tiny_model("llama", tmp_path / "b", seed=1)
    code = NO_TABLE + (
        "import sys; from hf_llmc.cli import main; rc = main(sys.argv[1:]); "
        "print('transformers' in sys.modules); sys.exit(rc)"
    )
    imported = []
    merge = ["merge", str(a), str(b), "--layers", "attn.1", "--alpha", "0.5", "--out"]
    for args in ([*merge, str(tmp_path / "m1")], [*merge, str(tmp_path / "m2")], ["layers", str(b), "--select", "attn.1"]):
        proc = subprocess.run([sys.executable, "-c", code, *args], env={**os.environ, "HF_LLMC_CACHE": str(cache)},
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        imported.append(proc.stdout.strip().splitlines()[-1])
    assert imported == ["True", "False", "False"]  # `layers` reuses the entry of the same config
    assert _weights(tmp_path / "m1") == _weights(tmp_path / "m2")
    # the merged tensors are the straightforward mix (independent reads of A and B)
    from safetensors.torch import load_file

    sa, sb, sm = (load_file(p / "model.safetensors") for p in (a, b, tmp_path / "m2"))
    for key, value in sm.items():
        expected = 0.5 * sa[key] + 0.5 * sb[key] if ".layers.1.self_attn." in key else sa[key]
        assert torch.equal(value, expected), key


def test_stale_entry_is_rediscovered(save_tiny_model, tmp_path, cache):
    a = save_tiny_model("gpt2", tmp_path / "a", seed=0)
    b = save_tiny_model("gpt2", tmp_path / "b", seed=1)
    true_arch = lazy_pair(a, b).arch
    (entry,) = (cache / "architectures").glob("*.json")
    data = json.loads(entry.read_text())
    name = data["parameters"][3]
    data["shapes"][name] = [7, 7]  # the checkpoints disagree with this entry
    entry.write_text(json.dumps(data))
    pair = lazy_pair(a, b)
    assert pair.model is not None and pair.arch == true_arch
    assert json.loads(entry.read_text())["shapes"][name] == list(true_arch.shapes[name])  # repaired
    entry.write_text("{not json")  # a damaged entry is a miss, not an error
    assert lazy_pair(a, b).model is not None


def test_key_follows_the_layout_only(save_tiny_model, tmp_path, cache):
    config = read_config(save_tiny_model("gpt2", tmp_path / "a"))
    key = architecture_key(config)
    assert key == architecture_key({**config, "_name_or_path": "/home/someone/x", "dtype": "bfloat16", "transformers_version": "0"})
    assert key != architecture_key({**config, "n_layer": config["n_layer"] + 1})
    assert architecture_key({**config, "auto_map": {"AutoModelForCausalLM": "m.M"}}) is None
    assert load_architecture(key) is None and load_architecture(None) is None


def test_remote_code_and_other_tokenizers_skip_the_cache(save_tiny_model, tmp_path, cache):
    a = save_tiny_model("gpt2", tmp_path / "a", seed=0)
    b = save_tiny_model("gpt2", tmp_path / "b", seed=1)
    assert lazy_pair(a, b, trust_remote_code=True).model is not None
    assert not (cache / "architectures").exists()  # custom code is never cached
    lazy_pair(a, b)
    tok = json.loads((b / "tokenizer_config.json").read_text())
    (b / "tokenizer_config.json").write_text(json.dumps({**tok, "model_max_length": 77}))
    pair = lazy_pair(a, b)  # files differ: the vocabularies are compared with transformers
    assert pair.tokenizer is not None and pair.model is not None
