"""Barriers: in-place path points vs freshly built interpolated models."""

import json
import math
import shutil

import pytest
import torch
from helpers import interpolated_state, plain_eval, rel, state_dict

from hf_llmc import DataConfig, ModelPair
from hf_llmc.config.alphas import parse_alphas
from hf_llmc.config.errors import PrecisionWarning

TOL = 1e-5


@pytest.fixture(scope="module")
def llama(llama_pair):
    pair = ModelPair.from_pretrained(llama_pair.a, llama_pair.b, device="cpu")
    blocks = pair.blocks(DataConfig(data=str(llama_pair.eval_text), seq_len=32, max_tokens=32 * 6))
    return llama_pair, pair, blocks, state_dict(llama_pair.a), state_dict(llama_pair.b)


@pytest.fixture(scope="module")
def gpt2(gpt2_pair):
    pair = ModelPair.from_pretrained(gpt2_pair.a, gpt2_pair.b, device="cpu")
    blocks = pair.blocks(DataConfig(data=str(gpt2_pair.eval_text), seq_len=32, max_tokens=32 * 6))
    return gpt2_pair, pair, blocks, state_dict(gpt2_pair.a), state_dict(gpt2_pair.b)


def _names(pair, layers):
    return None if layers is None else [p for g in pair.groups(layers) for p in g.parameters]


@pytest.mark.parametrize(
    "layers,base,method",
    [
        (None, "a", "lerp"),
        (None, "b", "slerp"),
        ("block.2", "a", "lerp"),
        ("block.2", "b", "lerp"),
        ("attn.1", "a", "slerp"),
        ("attn.4", "b", "lerp"),
        ("mlp.0", "a", "lerp"),
        ("mlp.5", "b", "slerp"),
        ("attn.0-1,mlp.3", "a", "lerp"),
        ("final_norm,head", "b", "lerp"),
    ],
)
def test_in_place_path_equals_fresh_model(llama, layers, base, method):
    demo, pair, blocks, sd_a, sd_b = llama
    result = pair.barrier(blocks, layers=layers, alphas=[0.3, 0.5], base=base, method=method)
    if layers is None:  # endpoints once is enough
        loss_a, _ = plain_eval(demo.a, sd_a, blocks.ids)
        loss_b, _ = plain_eval(demo.b, sd_b, blocks.ids)
        assert rel(result.loss_a, loss_a) < TOL and rel(result.loss_b, loss_b) < TOL
    for alpha in (0.3, 0.5):
        state = interpolated_state(sd_a, sd_b, _names(pair, layers), alpha, base, method, pair.arch.tied)
        loss, acc = plain_eval(demo.a, state, blocks.ids)
        i = result.alphas.index(alpha)
        assert rel(result.loss[i], loss) < TOL, (layers, base, alpha)
        assert abs(result.accuracy[i] - acc) < 1e-9
    mid = result.loss[result.alphas.index(0.5)]
    assert result.barrier_mid == pytest.approx(mid - (result.loss_a + result.loss_b) / 2, abs=1e-12)


def test_gpt2_tied_embedding_moves_the_head(gpt2):
    demo, pair, blocks, sd_a, sd_b = gpt2
    (group,) = pair.groups("embed")
    assert "transformer.wte.weight" in group.parameters and group.first_block is None
    result = pair.barrier(blocks, layers="embed", alphas=[0.5])
    state = interpolated_state(sd_a, sd_b, group.parameters, 0.5, "a", "lerp", pair.arch.tied)
    assert torch.equal(state["lm_head.weight"], state["transformer.wte.weight"])
    loss, _ = plain_eval(demo.a, state, blocks.ids)
    assert rel(result.loss[result.alphas.index(0.5)], loss) < TOL
    # the head group is the same tensor: same number
    head = pair.barrier(blocks, layers="head", alphas=[0.5])
    other = pair.barrier(blocks, layers="re:transformer\\.wte\\.weight", alphas=[0.5])
    assert head.loss == other.loss


def test_full_barrier_is_positive_on_the_demo_pair(gpt2):
    _, pair, blocks, _, _ = gpt2
    result = pair.barrier(blocks)
    assert result.alphas == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert result.loss[0] == result.loss_a and result.loss[-1] == result.loss_b
    assert result.barrier_mid > 3 * result.barrier_mid_se > 0
    assert result.barrier_max >= result.barrier_mid
    assert result.perplexity[2] == pytest.approx(math.exp(result.loss[2]))


def test_paired_standard_error(llama):
    demo, pair, blocks, sd_a, sd_b = llama
    result = pair.barrier(blocks, layers="mlp.2", alphas=[0.5])
    names = _names(pair, "mlp.2")
    mid_state = interpolated_state(sd_a, sd_b, names, 0.5, "a", "lerp")
    la, _ = plain_eval(demo.a, sd_a, blocks.ids, per_block=True)
    lb, _ = plain_eval(demo.b, sd_b, blocks.ids, per_block=True)
    lm, _ = plain_eval(demo.a, mid_state, blocks.ids, per_block=True)
    d = torch.tensor([m - (x + y) / 2 for m, x, y in zip(lm, la, lb)], dtype=torch.float64)
    assert result.barrier_mid == pytest.approx(float(d.mean()), rel=1e-4, abs=1e-7)
    assert result.barrier_mid_se == pytest.approx(float(d.std() / math.sqrt(len(d))), rel=1e-3, abs=1e-7)


def test_restore_is_bitwise(llama):
    _, pair, blocks, _, _ = llama
    before = {n: p.detach().clone() for n, p in pair.model.named_parameters()}
    for layers, base in ((None, "a"), ("attn.2", "b"), ("mlp.1", "a")):
        pair.barrier(blocks, layers=layers, alphas=[0.5], base=base, method="slerp")
    pair.interp.set_base("a")
    for name, param in pair.model.named_parameters():
        assert torch.equal(param, before[name]), name


def test_restore_after_an_error_inside_the_point(llama):
    _, pair, _, _, _ = llama
    before = {n: p.detach().clone() for n, p in pair.model.named_parameters()}
    with pytest.raises(RuntimeError, match="boom"):
        with pair.interp.at(pair.groups("block.1"), 0.5):
            raise RuntimeError("boom")
    assert all(torch.equal(p, before[n]) for n, p in pair.model.named_parameters())


def test_prefix_reuse_gives_identical_numbers(llama):
    _, pair, blocks, _, _ = llama
    for layers in ("attn.3", "mlp.5", "block.1", "final_norm"):
        on = pair.barrier(blocks, layers=layers, alphas=[0.5], prefix=True)
        off = pair.barrier(blocks, layers=layers, alphas=[0.5], prefix=False)
        assert on.loss == pytest.approx(off.loss, rel=1e-6)


def test_bf16_layer_point_is_held_in_float32(llama_pair):
    """In a bfloat16 live model a layer group at a path point holds the exact float32 mix (its
    modules compute in float32); the base comes back bitwise, and no hook is left behind."""
    pair = ModelPair.from_pretrained(llama_pair.a, llama_pair.b, device="cpu", dtype="bfloat16")
    name = pair.groups("attn.1")[0].parameters[0]
    a, b = pair.ckpt_a.get(name), pair.ckpt_b.get(name)
    param = dict(pair.model.named_parameters())[name]
    before = param.detach().clone()
    with pair.interp.at(pair.groups("attn.1"), 0.3):
        assert param.dtype == torch.float32
        assert torch.equal(param.detach(), a.float() * 0.7 + b.float() * 0.3)
        ids = torch.randint(0, 100, (1, 8))
        assert pair.model(input_ids=ids).logits.dtype == torch.bfloat16  # the rest stays in bfloat16
    assert param.dtype == torch.bfloat16 and torch.equal(param.detach(), before)
    assert pair.interp.held == [] and not any(m._forward_hooks for m in pair.model.modules())


def test_bf16_full_path_is_rounded_and_says_how_much(llama_pair):
    pair = ModelPair.from_pretrained(llama_pair.a, llama_pair.b, device="cpu", dtype="bfloat16")
    name = pair.full_group().parameters[1]
    a, b = pair.ckpt_a.get(name).float(), pair.ckpt_b.get(name).float()
    with pytest.warns(PrecisionWarning, match=r"effective alpha"):
        with pair.interp.at([pair.full_group()], 0.3):
            value = dict(pair.model.named_parameters())[name].detach().clone()
    assert value.dtype == torch.bfloat16 and torch.equal(value, (a * 0.7 + b * 0.3).to(torch.bfloat16))
    rounded = pair.interp.rounding[0.3]
    assert rounded["dtype"] == "bfloat16" and 0 < rounded["relative_error"] < 1 and rounded["effective_alpha"] != 0.3


def _small_delta_pair(root, src, dtype=torch.bfloat16, relative=0.005):
    """A = the trained A; B = A + a step along the fine-tune direction (B - A) of relative size
    ``relative`` per tensor; both stored in ``dtype``."""
    from safetensors.torch import load_file, save_file

    sa, sb = load_file(src.a / "model.safetensors"), load_file(src.b / "model.safetensors")
    out = {}
    for which in ("a", "b"):
        folder = root / which
        shutil.copytree(getattr(src, which), folder)
        state = {}
        for key, ta in sa.items():
            step = sb[key].float() - ta.float()
            scale = relative * ta.float().norm() / step.norm() if step.norm() > 0 else 0.0
            state[key] = (ta.float() + (scale * step if which == "b" else 0)).to(dtype)
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        config = json.loads((folder / "config.json").read_text())
        config["dtype"] = str(dtype).removeprefix("torch.")  # loads as stored, like most LLMs
        (folder / "config.json").write_text(json.dumps(config))
        out[which] = folder
    return out["a"], out["b"]


def test_bf16_layer_barrier_equals_float32_computation(llama_pair, tmp_path):
    """On a bfloat16 pair 0.5 % apart, the layer barrier at α = 0.25 of the bfloat16 live model
    equals the float32 computation (the same checkpoints loaded in float32) within 1e-3 nats."""
    a, b = _small_delta_pair(tmp_path, llama_pair)
    ids = ModelPair.from_pretrained(a, b, device="cpu").blocks(str(llama_pair.eval_text)).ids[:8]
    low = ModelPair.from_pretrained(a, b, device="cpu").barrier(ids, layers="block.1-2", alphas=[0, 0.25, 1])
    exact = ModelPair.from_pretrained(a, b, device="cpu", dtype="float32").barrier(ids, layers="block.1-2", alphas=[0, 0.25, 1])
    at = low.alphas.index(0.25)
    assert next(iter(ModelPair.from_pretrained(a, b, device="cpu").model.parameters())).dtype == torch.bfloat16
    barrier_low = low.loss[at] - 0.75 * low.loss_a - 0.25 * low.loss_b
    barrier_exact = exact.loss[at] - 0.75 * exact.loss_a - 0.25 * exact.loss_b
    assert abs(barrier_low - barrier_exact) < 1e-3, (barrier_low, barrier_exact)


@pytest.mark.parametrize(
    "text,expected",
    [("0,0.25,1", [0.0, 0.25, 0.5, 1.0]), ("5", [0.0, 0.25, 0.5, 0.75, 1.0]), ("0.5", [0.5]), ([0.1], [0.1, 0.5])],
)
def test_parse_alphas(text, expected):
    assert parse_alphas(text) == expected


@pytest.mark.parametrize("text,message", [("", "empty"), ("a,b", "not a comma-separated"), ("1.5", "outside"), ("-0.1", "outside"), ("nan", "finite"),
                                          ("100000000", "at most 1001 points"), (",".join(["0.5"] * 1002), "at most 1001")])
def test_parse_alphas_errors(text, message):
    with pytest.raises(ValueError, match=message):
        parse_alphas(text)


def test_extrapolation_opt_in():
    assert parse_alphas("-0.5,1.5", allow_extrapolation=True) == [-0.5, 0.5, 1.5]


def test_gpt_neox_renamed_head(neox_pair, tmp_path):
    """Pythia's layout: the model's ``lm_head.weight`` is stored as ``embed_out.weight`` (a
    transformers load-time rename); barriers and merges read and write it under that key."""
    from safetensors import safe_open

    from hf_llmc import lazy_pair, save_merged

    with safe_open(neox_pair.a / "model.safetensors", "pt") as fh:
        assert "embed_out.weight" in fh.keys() and "lm_head.weight" not in fh.keys()
    pair = ModelPair.from_pretrained(neox_pair.a, neox_pair.b, device="cpu")
    assert pair.arch.stored_names == {"lm_head.weight": "embed_out.weight"}
    blocks = pair.blocks(DataConfig(data=str(neox_pair.eval_text), seq_len=32, max_tokens=32 * 4))
    sd_a, sd_b = state_dict(neox_pair.a), state_dict(neox_pair.b)
    for layers in ("head", None):
        result = pair.barrier(blocks, layers=layers, alphas=[0.5])
        state = interpolated_state(sd_a, sd_b, _names(pair, layers), 0.5, "a", "lerp", pair.arch.tied)
        loss, _ = plain_eval(neox_pair.a, state, blocks.ids)
        assert rel(result.loss[result.alphas.index(0.5)], loss) < TOL, layers
    save_merged(lazy_pair(neox_pair.a, neox_pair.b), "head=0.5", tmp_path / "m", card=False)
    with safe_open(tmp_path / "m" / "model.safetensors", "pt") as fh:
        head = fh.get_tensor("embed_out.weight")
    assert torch.equal(head, 0.5 * sd_a["lm_head.weight"] + 0.5 * sd_b["lm_head.weight"])


def test_fused_experts_barrier_equals_fresh_model(moe_pair_dirs, tmp_path):
    """Mixtral (per-expert tensors on disk, fused parameters in the model): B's fused tensors
    are assembled from their pieces; every path point equals a fresh model holding the
    interpolated state dict, and restoring A is exact."""
    from hf_llmc.testing import synthetic_text

    a, b = moe_pair_dirs["a"], moe_pair_dirs["b"]
    (tmp_path / "eval.txt").write_text(synthetic_text("mixed", 10, 5))
    pair = ModelPair.from_pretrained(a, b, device="cpu")
    assert "model.layers.1.mlp.experts.gate_up_proj" in pair.arch.fused
    blocks = pair.blocks(DataConfig(data=str(tmp_path / "eval.txt"), seq_len=32, max_tokens=32 * 4))
    sd_a, sd_b = state_dict(a), state_dict(b)
    for layers, base, method in (("mlp.1", "a", "lerp"), ("block.0", "b", "lerp"), (None, "a", "lerp"), ("mlp.0", "a", "slerp")):
        result = pair.barrier(blocks, layers=layers, alphas=[0.3], base=base, method=method)
        state = interpolated_state(sd_a, sd_b, _names(pair, layers), 0.3, base, method, pair.arch.tied)
        loss, _ = plain_eval(a, state, blocks.ids)
        assert rel(result.loss[result.alphas.index(0.3)], loss) < TOL, (layers, base, method)
    pair.interp.set_base("a")
    for name, param in pair.model.named_parameters():
        assert torch.equal(param, sd_a[name]), name
