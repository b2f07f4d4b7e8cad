"""PEFT LoRA adapters as models: every barrier number equals the one computed on checkpoints
merged by PEFT itself (``merge_and_unload`` + ``save_pretrained``)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import close
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from hf_llmc import CheckpointError, ModelPair, PairError
from hf_llmc.cli import main
from hf_llmc.model.checkpoint import open_source
from hf_llmc.model.checkpoint.adapters import AdapterCheckpoint
from hf_llmc.testing import init_model, tiny_config

REL = 2e-5
NUMBERS = ("loss_a", "loss_b", "accuracy_a", "accuracy_b", "barrier_max", "barrier_mid", "barrier_mid_se",
           "error_barrier_max", "error_barrier_mid")

ADAPTERS = {
    # GPT-2: Conv1D targets (fan_in_fan_out), a rank pattern, rsLoRA, LoRA biases.
    "gpt2": (
        dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], rank_pattern={"h.1.attn.c_attn": 2}),
        dict(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj"], use_rslora=True, lora_bias=True),
    ),
    # Llama: alpha pattern, embedding LoRA, modules_to_save (lm_head).
    "llama": (
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "embed_tokens"],
             alpha_pattern={"up_proj": 3}, modules_to_save=["lm_head"]),
        dict(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj", "down_proj"],
             rank_pattern={"layers.0.self_attn.q_proj": 3}),
    ),
}


def _make_adapter(base_dir, out, seed: int, kwargs: dict) -> None:
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(init_lora_weights=False, **kwargs))
    with torch.no_grad():  # a visible, non-zero update
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.mul_(3.0)
            if "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(out)
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out).merge_and_unload()
    merged.save_pretrained(str(out) + "_merged")


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def lora(request, tmp_path_factory):
    model_type = request.param
    root = tmp_path_factory.mktemp(f"lora_{model_type}")
    init_model(tiny_config(model_type, num_layers=2, hidden_size=64), seed=0).save_pretrained(root / "base")
    for name, seed, kwargs in (("a", 1, ADAPTERS[model_type][0]), ("b", 2, ADAPTERS[model_type][1])):
        _make_adapter(root / "base", root / name, seed, kwargs)
    ids = torch.randint(0, 300, (6, 24), generator=torch.Generator().manual_seed(0))
    return model_type, root, ids


def _assert_same(r1, r2):
    assert r1.alphas == r2.alphas
    for x, y in zip(r1.loss + r1.accuracy, r2.loss + r2.accuracy):
        assert close(x, y, REL), (r1.loss, r2.loss)
    for key in NUMBERS:
        assert close(getattr(r1, key), getattr(r2, key), REL), key


def test_adapter_pair_matches_merged_checkpoints(lora):
    model_type, root, ids = lora
    ad = ModelPair.from_pretrained(root / "a", root / "b")
    merged = ModelPair.from_pretrained(str(root / "a") + "_merged", str(root / "b") + "_merged")
    assert isinstance(ad.ckpt_a, AdapterCheckpoint) and isinstance(ad.ckpt_b, AdapterCheckpoint)
    # The live model is the base, loaded once; only adapter-touched tensors ever switch.
    touched = ad.interp.varying
    assert touched and len(touched) < len(ad.arch.parameters)
    assert all(("attn" in n or "mlp" in n or "embed" in n or "lm_head" in n) for n in touched)
    assert abs(ad.barrier(ids).barrier_mid) > 1e-3  # the adapters really differ: a visible effect
    for layers, base in ((None, "a"), ("attn.1", "a"), ("mlp.0,attn.1", "b")):
        r1 = ad.barrier(ids, layers=layers, alphas="0,0.25,0.5,1", base=base)
        r2 = merged.barrier(ids, layers=layers, alphas="0,0.25,0.5,1", base=base)
        _assert_same(r1, r2)
    # Every tensor the pair reads equals PEFT's merged tensor.
    for name in ad.arch.parameters:
        for which in ("a", "b"):
            got, want = ad.interp.stored(which, name), merged.interp.stored(which, name)
            assert got.dtype == want.dtype
            torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)


def test_adapter_midpoint_against_plain_forward(lora):
    """Independent check: a fresh model loaded with the averaged merged state dict."""
    model_type, root, ids = lora
    if model_type != "llama":
        pytest.skip("Llama has the most adapter features (embedding LoRA, modules_to_save)")
    ad = ModelPair.from_pretrained(root / "a", root / "b")
    result = ad.barrier(ids, alphas="0,0.5,1")
    sa = AutoModelForCausalLM.from_pretrained(str(root / "a") + "_merged").state_dict()
    sb = AutoModelForCausalLM.from_pretrained(str(root / "b") + "_merged").state_dict()
    model = AutoModelForCausalLM.from_pretrained(root / "base").eval()
    model.load_state_dict({k: 0.5 * sa[k] + 0.5 * sb[k] for k in sa})
    with torch.no_grad():
        losses = [model(input_ids=ids[i : i + 1], labels=ids[i : i + 1]).loss.item() for i in range(ids.shape[0])]
    assert close(result.loss[1], sum(losses) / len(losses), REL)


def test_mixed_pair_full_vs_adapter(lora):
    model_type, root, ids = lora
    mixed = ModelPair.from_pretrained(root / "base", root / "b")
    merged = ModelPair.from_pretrained(root / "base", str(root / "b") + "_merged")
    assert mixed.interp.varying is not None  # the adapter's base is A itself
    _assert_same(mixed.barrier(ids, layers="attn.0", base="b"), merged.barrier(ids, layers="attn.0", base="b"))
    if model_type != "gpt2":
        return
    rev = ModelPair.from_pretrained(str(root / "a") + "_merged", root / "b")  # full fine-tune vs adapter
    rev_m = ModelPair.from_pretrained(str(root / "a") + "_merged", str(root / "b") + "_merged")
    assert rev.interp.varying is None
    _assert_same(rev.barrier(ids), rev_m.barrier(ids))


def test_base_model_override_and_different_bases(lora, tmp_path):
    model_type, root, ids = lora
    if model_type != "gpt2":
        pytest.skip("one architecture is enough for base resolution")
    # An adapter whose recorded base is gone: a clear error, then --base-model fixes it.
    moved = tmp_path / "moved_base"
    shutil.copytree(root / "base", moved)
    adapter = tmp_path / "adapter"
    shutil.copytree(root / "a", adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "deleted")
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="base_model="):
        open_source(adapter)
    ck = open_source(adapter, base_model=moved)
    assert ck.folder == moved
    # Two adapters on different (if identical-looking) bases: refused.
    with pytest.raises(PairError, match="different base"):
        _pair_on_two_bases(adapter, moved, root)
    # With --base-model both adapters use one base and the numbers are the merged ones.
    one = ModelPair.from_pretrained(adapter, root / "b", base_model=moved)
    merged = ModelPair.from_pretrained(str(root / "a") + "_merged", str(root / "b") + "_merged")
    _assert_same(one.barrier(ids, layers="attn.1"), merged.barrier(ids, layers="attn.1"))


def _pair_on_two_bases(adapter, moved, root):
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(moved)
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    return ModelPair.from_pretrained(adapter, root / "b")


def test_cli_barrier_on_adapters(lora, tmp_path, capsys):
    model_type, root, ids = lora
    if model_type != "gpt2":
        pytest.skip("one architecture is enough for the CLI path")
    # The base has no tokenizer; the CLI needs one: give a copy of the base a word-level one
    # whose ids are the token blocks' ids.
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(300)} | {"[UNK]": 299}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="w0")
    base = tmp_path / "base"
    shutil.copytree(root / "base", base)
    fast.save_pretrained(base)
    text = tmp_path / "eval.txt"
    text.write_text(" ".join(f"w{int(t)}" for t in ids.flatten()))
    out = tmp_path / "r.json"
    rc = main(["barrier", str(root / "a"), str(root / "b"), "--base-model", str(base), "--data", str(text),
               "--seq-len", "24", "--layers", "attn.1", "--json-out", str(out)])
    assert rc == 0, capsys.readouterr()
    got = json.loads(out.read_text())
    merged = ModelPair.from_pretrained(str(root / "a") + "_merged", str(root / "b") + "_merged")
    want = merged.barrier(ids, layers="attn.1")
    for key in NUMBERS:
        assert close(got[key], getattr(want, key)), key
    assert got["adapters"]["a"]["adapter"] == "a" and got["adapters"]["b"]["base_model"] == "base"


def test_unsupported_adapters_are_refused(lora, tmp_path):
    _, root, _ = lora
    bad = tmp_path / "dora"
    shutil.copytree(root / "a", bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="DoRA"):
        open_source(bad)
    cfg.update(use_dora=False, peft_type="IA3")
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="IA3"):
        open_source(bad)
