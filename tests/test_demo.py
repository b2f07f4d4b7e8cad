"""Tests of the synthetic demo pair builder (hf_llmc.demo) and the shared fixtures."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_llmc import OutputExistsError
from hf_llmc.cli.demo import DEMO_DEFAULTS
from hf_llmc.testing import (
    EOS_TOKEN,
    MODEL_TYPES,
    DemoPair,
    build_pair,
    synthetic_documents,
    synthetic_text,
    tiny_config,
)


def _eval_blocks(pair: DemoPair, n_blocks: int = 16, seq_len: int = 64) -> torch.Tensor:
    tok = AutoTokenizer.from_pretrained(pair.a)
    ids = tok(pair.eval_text.read_text(encoding="utf-8"))["input_ids"]
    assert len(ids) >= n_blocks * seq_len
    return torch.tensor(ids[: n_blocks * seq_len]).view(n_blocks, seq_len)


@torch.no_grad()
def _loss(model, blocks: torch.Tensor) -> float:
    return float(model(input_ids=blocks, labels=blocks).loss)


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


# ---------------------------------------------------------------------------------------
# Text and tokenizer
# ---------------------------------------------------------------------------------------


def test_synthetic_documents_are_deterministic_and_domains_differ():
    a = synthetic_documents("a", 20, 0)
    assert a == synthetic_documents("a", 20, 0)
    assert a != synthetic_documents("a", 20, 1)
    assert synthetic_documents("a", 5, 0) == a[:5]  # prefix-stable
    b = synthetic_documents("b", 20, 0)
    words_a = set(" ".join(a).split())
    words_b = set(" ".join(b).split())
    assert len(words_a & words_b) < 0.1 * min(len(words_a), len(words_b))
    mixed = synthetic_documents("mixed", 40, 0)
    assert any(d.startswith("recipe") for d in mixed)
    assert any(d.startswith("REPORT") for d in mixed)
    assert synthetic_text("b", 3, 0) == "\n\n".join(synthetic_documents("b", 3, 0)) + "\n"
    with pytest.raises(ValueError):
        synthetic_documents("c", 1, 0)


def test_tokenizer_round_trip(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tok) == len(tiny_tokenizer) == 300
    assert tok.eos_token == tok.bos_token == tok.unk_token == EOS_TOKEN
    assert tok.convert_tokens_to_ids(EOS_TOKEN) == 0
    text = synthetic_text("mixed", 2, 5) + "Ünïcode ✓ and $9.99"
    ids = tok(text)["input_ids"]
    assert ids == tiny_tokenizer(text)["input_ids"]
    assert tok.decode(ids) == text


# ---------------------------------------------------------------------------------------
# Configs of every architecture
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_tiny_model_of_every_architecture(model_type, tiny_model, save_tiny_model, tmp_path):
    model = tiny_model(model_type)
    assert model.config.model_type == model_type
    assert model.config.num_hidden_layers == 3
    assert model.config.hidden_size == 32
    x = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(input_ids=x, labels=x)
    assert out.logits.shape == (2, 16, model.config.vocab_size)
    assert math.isfinite(float(out.loss))
    # Seeded: the same call gives the same weights.
    again = tiny_model(model_type)
    for (name, p), q in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(p, q), name
    # Saved with the tokenizer, it loads back through the Auto classes.
    path = save_tiny_model(model_type, tmp_path / model_type)
    loaded = _load(path)
    assert AutoTokenizer.from_pretrained(path).eos_token == EOS_TOKEN
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, out.logits)


def test_architecture_specific_fields():
    falcon = tiny_config("falcon")
    assert falcon.parallel_attn and not falcon.new_decoder_architecture and not falcon.alibi
    assert tiny_config("phi").rope_parameters["partial_rotary_factor"] == 0.5
    assert tiny_config("gpt_neox").rope_parameters["partial_rotary_factor"] == 0.25
    gptj = tiny_config("gptj", hidden_size=64, num_heads=4)
    assert gptj.rotary_dim == 8 and gptj.n_embd == 64
    gemma = tiny_config("gemma", hidden_size=64, num_heads=4)
    assert gemma.head_dim == 16
    opt = tiny_config("opt", hidden_size=64, intermediate_size=96)
    assert opt.ffn_dim == 96 and opt.word_embed_proj_dim == 64
    gpt2 = tiny_config("gpt2", num_layers=5, hidden_size=48, num_heads=4, max_positions=99)
    assert (gpt2.n_layer, gpt2.n_embd, gpt2.n_head, gpt2.n_positions, gpt2.n_inner) == (5, 48, 4, 99, 192)
    assert tiny_config("llama", hidden_size=96).intermediate_size == 256
    assert tiny_config("gpt2").tie_word_embeddings
    assert not tiny_config("gpt2", tie_word_embeddings=False).tie_word_embeddings
    with pytest.raises(ValueError):
        tiny_config("bert")
    with pytest.raises(ValueError):
        tiny_config("gpt2", hidden_size=30, num_heads=4)


# ---------------------------------------------------------------------------------------
# The trained pair
# ---------------------------------------------------------------------------------------


def test_pair_builds_and_loads(gpt2_pair):
    pair = gpt2_pair
    for side in (pair.a, pair.b):
        assert (side / "model.safetensors").is_file()
        assert (side / "config.json").is_file()
        tok = AutoTokenizer.from_pretrained(side)
        assert len(tok) == pair.tokenizer_vocab_size
        model = _load(side)
        assert model.config.model_type == "gpt2"
        assert model.config.vocab_size == pair.tokenizer_vocab_size
        assert model.config.eos_token_id == tok.eos_token_id
    meta = json.loads((pair.a.parent / "demo.json").read_text())
    assert meta["finetune_steps"] == 150
    _eval_blocks(pair)  # at least 16 blocks of 64 tokens
    with pytest.raises(Exception):  # frozen dataclass
        pair.a = pair.b  # type: ignore[misc]


def test_build_is_deterministic(tmp_path):
    kwargs = dict(model_type="llama", num_layers=1, hidden_size=32, num_heads=2,
                  vocab_size=280, pretrain_steps=2, finetune_steps=3, seq_len=32,
                  batch_size=2, eval_blocks=2)
    p1 = build_pair(tmp_path / "one", **kwargs)
    p2 = build_pair(tmp_path / "two", **kwargs)
    for side in ("a", "b"):
        f1 = (getattr(p1, side) / "model.safetensors").read_bytes()
        f2 = (getattr(p2, side) / "model.safetensors").read_bytes()
        assert f1 == f2
    assert p1.eval_text.read_text() == p2.eval_text.read_text()
    assert (tmp_path / "one" / "demo.json").read_text() == (tmp_path / "two" / "demo.json").read_text()
    p3 = build_pair(tmp_path / "three", **{**kwargs, "seed": 1})
    w1 = load_file(p1.a / "model.safetensors")
    w3 = load_file(p3.a / "model.safetensors")
    assert any(not torch.equal(w1[k], w3[k]) for k in w1)


def test_finetunes_in_two_threads_equal_one_after_the_other():
    """build_pair trains A and B at once, one thread each: the weights equal a sequential run."""
    from concurrent.futures import ThreadPoolExecutor

    from hf_llmc.testing import _train, init_model

    base = init_model(tiny_config("gpt2", num_layers=2, hidden_size=32, vocab_size=300), seed=0)
    data = torch.randint(300, (64, 32), generator=torch.Generator().manual_seed(0))
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sequential = [copy.deepcopy(base) for _ in range(2)]
        for seed, model in enumerate(sequential):
            _train(model, data, steps=6, batch_size=4, lr=3e-3, seed=seed)
        threaded = [copy.deepcopy(base) for _ in range(2)]
        with ThreadPoolExecutor(max_workers=2) as pool:
            for run in [pool.submit(_train, model, data, steps=6, batch_size=4, lr=3e-3, seed=seed)
                        for seed, model in enumerate(threaded)]:
                run.result()
    finally:
        torch.set_num_threads(previous)
    for one, other in zip(sequential, threaded):
        assert all(torch.equal(x, y) for x, y in zip(one.state_dict().values(), other.state_dict().values()))
    assert not torch.equal(sequential[0].lm_head.weight, base.lm_head.weight)


def test_finetunes_differ(gpt2_pair):
    a = load_file(gpt2_pair.a / "model.safetensors")
    b = load_file(gpt2_pair.b / "model.safetensors")
    assert a.keys() == b.keys()
    diff = torch.sqrt(sum(((a[k] - b[k]) ** 2).sum() for k in a))
    norm = torch.sqrt(sum((a[k] ** 2).sum() for k in a))
    assert diff / norm > 0.05
    # Each block moved.
    for i in range(3):
        key = f"transformer.h.{i}.attn.c_attn.weight"
        assert not torch.allclose(a[key], b[key])


def test_full_interpolation_midpoint_has_a_barrier(gpt2_pair):
    blocks = _eval_blocks(gpt2_pair)
    model = _load(gpt2_pair.a)
    sd_a = {k: v.clone() for k, v in model.state_dict().items()}
    sd_b = _load(gpt2_pair.b).state_dict()
    loss_a = _loss(model, blocks)
    model.load_state_dict({k: 0.5 * sd_a[k] + 0.5 * sd_b[k] for k in sd_a})
    loss_mid = _loss(model, blocks)
    model.load_state_dict(sd_b)
    loss_b = _loss(model, blocks)
    # Both endpoints learned the mixed eval text (uniform would be log(vocab) ~ 6.2).
    assert max(loss_a, loss_b) < 3.5
    barrier = loss_mid - (loss_a + loss_b) / 2
    assert barrier > 0.1, (loss_a, loss_mid, loss_b)


def test_other_architecture_pairs_load(llama_pair, neox_pair):
    llama = _load(llama_pair.a)
    assert llama.config.model_type == "llama" and llama.config.num_hidden_layers == 6
    assert len(llama.model.layers) == 6
    neox = _load(neox_pair.b)
    assert neox.config.model_type == "gpt_neox"
    blocks = _eval_blocks(neox_pair, n_blocks=4)
    assert _loss(neox, blocks) < math.log(neox_pair.tokenizer_vocab_size)


def test_demo_defaults_are_the_documented_size():
    assert DEMO_DEFAULTS["model_type"] == "gpt2"
    assert 4 <= DEMO_DEFAULTS["num_layers"] <= 6
    assert DEMO_DEFAULTS["hidden_size"] == 128


def test_run_demo_writes_scan_report_merge_and_card(tmp_path):
    """`hf-llmc demo` end to end on a tiny pair: scan + report, automatic merge, model card."""
    import json

    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM

    from hf_llmc.cli.demo import run_demo

    out = tmp_path / "demo"
    tiny = dict(num_layers=2, hidden_size=32, vocab_size=300, pretrain_steps=2, finetune_steps=10, eval_blocks=4)
    parts = run_demo(out, progress=False, **tiny)
    assert parts["report"].is_file() and (parts["scan"] / "heatmap.png").is_file()
    rows = [json.loads(line) for line in (parts["scan"] / "results.jsonl").read_text().splitlines()]
    assert {r["base"] for r in rows if r["group"] not in ("A", "B")} >= {"a", "b"}
    card = ModelCard.load(parts["card"])
    assert card.data.base_model_relation == "merge" and str(tmp_path) not in card.content
    AutoModelForCausalLM.from_pretrained(parts["merged"])
    with pytest.raises(OutputExistsError):
        run_demo(out, progress=False, **tiny)
    assert not list(tmp_path.glob(".demo.tmp-*"))  # no temporary folder left behind


@pytest.mark.slow
def test_default_demo_resolves_every_group(tmp_path):
    """``hf-llmc demo`` as shipped: every group's barrier has a standard error of at most 0.02
    nats, so the heatmap tells a costly layer from a free one (35–50 s on 2 cores)."""
    from hf_llmc.cli.demo import run_demo

    parts = run_demo(tmp_path / "demo", progress=False)
    summary = json.loads((parts["scan"] / "summary.json").read_text())
    ses = [v["barrier_mid_se"] for g in summary["groups"] for v in g["bases"].values()]
    assert len(ses) == 2 * len(summary["groups"]) and max(ses) <= 0.02, max(ses)
    # some groups are clearly costly
    assert max(v["barrier_mid"] for g in summary["groups"] for v in g["bases"].values()) > 0.1
    assert (parts["scan"] / "heatmap.png").is_file()
    # the chat step: a pair whose vocabularies differ by added tokens, barrier on chat data
    chat = json.loads(parts["chat"].read_text())
    assert chat["vocabulary"]["added_a"] == ["<pad>"] and len(chat["vocabulary"]["added_b"]) == 3
    assert chat["vocabulary"]["rows_b"] % 8 == 0 and chat["chat"]["conversations"] == 96
    assert chat["chat"]["loss_on"] == "assistant" and math.isfinite(chat["barrier_mid"])
