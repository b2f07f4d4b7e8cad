"""Lazy checkpoints: single and sharded safetensors, aliases, truncation, pickles."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from hf_llmc import CheckpointError
from hf_llmc.config.security import display_name
from hf_llmc.model.checkpoint import open_source
from hf_llmc.model.checkpoint.folders import resolve_folder


@pytest.fixture(scope="module")
def gpt2_dir(save_tiny_model, tmp_path_factory):
    return save_tiny_model("gpt2", tmp_path_factory.mktemp("ck") / "gpt2")


def test_single_file_reads_equal_safetensors(gpt2_dir):
    ckpt = open_source(gpt2_dir)
    ref = load_file(gpt2_dir / "model.safetensors")
    assert sorted(ckpt.keys()) == sorted(ref)
    for name, tensor in ref.items():
        got = ckpt.get(name)
        assert got.dtype == tensor.dtype and torch.equal(got, tensor)
        assert ckpt.shape(name) == tuple(tensor.shape)
    # chunked reads reassemble the tensor exactly
    name = "transformer.wte.weight"
    pieces = [c for _, c in ckpt.iter_chunks(name, chunk_bytes=1000)]
    assert len(pieces) > 1 and torch.equal(torch.cat(pieces).view(ref[name].shape), ref[name])
    out = torch.empty_like(ref[name])
    assert ckpt.read_into(name, out) and torch.equal(out, ref[name])


def test_tied_alias_resolves(gpt2_dir):
    ckpt = open_source(gpt2_dir)
    assert "lm_head.weight" not in ckpt.keys()
    aliases = {"lm_head.weight": "transformer.wte.weight"}
    assert torch.equal(ckpt.get("lm_head.weight", aliases), ckpt.get("transformer.wte.weight"))
    # a dropped base-model prefix (old GPT-2 checkpoints) resolves too
    assert ckpt.key_for("model_prefix.transformer.h.0.ln_1.weight") == "transformer.h.0.ln_1.weight"


def test_sharded(tiny_model, tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    ckpt = open_source(tmp_path)
    for name, param in model.named_parameters():
        assert torch.equal(ckpt.get(name), param.detach())


def test_missing_shard(tiny_model, tmp_path):
    tiny_model("llama").save_pretrained(tmp_path, max_shard_size="20KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"shard {shard.name} is listed in model.safetensors.index.json but missing"):
        open_source(tmp_path)


def test_truncated_file(gpt2_dir, tmp_path):
    target = tmp_path / "m"
    shutil.copytree(gpt2_dir, target)
    data = (target / "model.safetensors").read_bytes()
    (target / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        open_source(target)


def test_pickle_refused_unless_opted_in(tiny_model, tmp_path):
    model = tiny_model("gpt2")
    state = {k: v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    model.config.save_pretrained(tmp_path)
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"only pickled weights \(pytorch_model.bin\); refusing.*allow_pickle=True"):
        open_source(tmp_path)
    ckpt = open_source(tmp_path, allow_pickle=True)
    assert ckpt.pickled and torch.equal(ckpt.get("transformer.h.0.attn.c_attn.weight"), state["transformer.h.0.attn.c_attn.weight"])


def test_missing_and_offline(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="no such model folder"):
        resolve_folder(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no model weights"):
        open_source(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="Hub cannot be reached"):
        resolve_folder("someone/some-model-that-is-not-cached")


def test_display_name_never_shows_local_paths(gpt2_dir):
    assert display_name(gpt2_dir) == "gpt2"
    assert display_name("EleutherAI/pythia-410m") == "EleutherAI/pythia-410m"
