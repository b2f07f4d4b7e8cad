"""ModelPair loading and compatibility checks."""

import json

import pytest
import torch

from hf_llmc import ModelPair, PairError


@pytest.fixture(scope="module")
def dirs(save_tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    return {
        "llama0": save_tiny_model("llama", root / "llama0", seed=0),
        "llama1": save_tiny_model("llama", root / "llama1", seed=1),
        "llama_wide": save_tiny_model("llama", root / "llama_wide", seed=1, hidden_size=48),
        "gpt2": save_tiny_model("gpt2", root / "gpt2", seed=1),
    }


def test_pair_loads_a_and_reads_b_lazily(dirs):
    pair = ModelPair.from_pretrained(dirs["llama0"], dirs["llama1"], device="cpu")
    live = dict(pair.model.named_parameters())
    for name in pair.arch.parameters:
        assert torch.equal(live[name], pair.ckpt_a.get(name))
    assert pair.interp.base == "a"
    name = pair.arch.parameters[3]
    assert not torch.equal(pair.ckpt_b.get(name), live[name])


def test_architecture_mismatch(dirs):
    with pytest.raises(PairError, match=r"architecture mismatch: A is llama .* B is gpt2"):
        ModelPair.from_pretrained(dirs["llama0"], dirs["gpt2"], device="cpu")


def test_size_mismatch_lists_first_names(dirs, tmp_path):
    import shutil

    # B's config.json is compared field by field first, under the family's own names
    with pytest.raises(PairError, match=r"config mismatch in the hidden size: A has hidden_size 32, B has hidden_size 48"):
        ModelPair.from_pretrained(dirs["llama0"], dirs["llama_wide"], device="cpu")
    # a checkpoint whose tensors disagree with a config that agrees: the shapes are compared too
    wide = tmp_path / "wide"
    shutil.copytree(dirs["llama_wide"], wide)
    shutil.copy(dirs["llama0"] / "config.json", wide / "config.json")
    with pytest.raises(PairError, match=r"shape mismatch between A and B: model\.embed_tokens\.weight \(\d+, 32\) vs \(\d+, 48\)"):
        ModelPair.from_pretrained(dirs["llama0"], wide, device="cpu")


def test_vocabulary_mismatch(dirs, tmp_path):
    import shutil

    other = tmp_path / "other_vocab"
    shutil.copytree(dirs["llama1"], other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    first = next(iter(vocab))
    vocab["renamed_token"] = vocab.pop(first)
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(PairError, match="different tokenizer vocabularies"):
        ModelPair.from_pretrained(dirs["llama0"], other, device="cpu")


def test_trust_remote_code_is_off_by_default(dirs, tmp_path):
    import shutil

    remote = tmp_path / "remote"
    shutil.copytree(dirs["llama0"], remote)
    cfg = json.loads((remote / "config.json").read_text())
    cfg["model_type"] = "evil_arch"
    cfg["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (remote / "config.json").write_text(json.dumps(cfg))
    (remote / "configuration_evil.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(PairError, match="trust_remote_code=True"):
        ModelPair.from_pretrained(remote, dirs["llama1"], device="cpu")


def _with_tokenizer(src, dst, edit):
    import shutil

    shutil.copytree(src, dst)
    tok = json.loads((dst / "tokenizer.json").read_text())
    edit(tok)
    (dst / "tokenizer.json").write_text(json.dumps(tok))
    return dst


def test_tokenizers_that_encode_text_differently_are_refused(dirs, tmp_path):
    """Same vocabulary, another normalizer: B would cut the text differently, so the pair is refused."""
    lower = _with_tokenizer(dirs["llama1"], tmp_path / "lower", lambda t: t.update(normalizer={"type": "Lowercase"}))
    with pytest.raises(PairError, match=r"encode text differently"):
        ModelPair.from_pretrained(dirs["llama0"], lower, device="cpu")
    from hf_llmc import lazy_pair

    with pytest.raises(PairError, match=r"encode text differently"):
        lazy_pair(dirs["llama0"], lower)


def test_a_tokenizer_that_does_not_load_is_an_error(dirs, tmp_path):
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(dirs["llama1"], broken)
    (broken / "tokenizer.json").write_text("{not json")
    with pytest.raises(PairError, match=r"broken: its tokenizer files do not load"):
        ModelPair.from_pretrained(dirs["llama0"], broken, device="cpu")
