"""8/4-bit loading (bitsandbytes on CPU): runs complete, restores are exact, the result file
says how interpolated groups are held, and endpoint losses stay close to fp32.

bitsandbytes takes another 4-bit code path on CPUs with AVX512-BF16: ``Linear4bit.forward``
repacks the weight into a packed CPU layout in place. The tests below run whichever layout this
CPU gets, force the generic one, and apply the packing conversion itself (plain torch) so that
hf-llmc's re-quantization is checked against the packed state on every machine."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("bitsandbytes")

from helpers import build_full_pair, eval_ids, write_eval_text  # noqa: E402

from hf_llmc import ModelPair  # noqa: E402
from hf_llmc.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def pair_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    # every dimension a multiple of 64: every bitsandbytes layout accepts the 4-bit weights
    a, b = build_full_pair(root, "llama", intermediate_size=192)
    return a, b, eval_ids()


def _force_generic_layout(model) -> None:
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _state(param) -> tuple:
    """Everything bitsandbytes computes a 4-bit weight's forward from."""
    qs = param.quant_state
    return (param.data.clone(), qs.absmax.clone(), qs.dtype, tuple(qs.shape), qs.blocksize, qs.quant_type,
            bool(getattr(qs, "packing_format_for_cpu", False)))


def _same(x: tuple, y: tuple) -> bool:
    return all(torch.equal(u, v) if isinstance(u, torch.Tensor) else u == v for u, v in zip(x, y))


def test_8bit_cli_run_reports_distance_to_fp32(pair_dirs, tmp_path, capsys):
    a, b, ids = pair_dirs
    text = write_eval_text(tmp_path / "eval.txt", ids)
    out = tmp_path / "q.json"
    rc = main(["barrier", str(a), str(b), "--data", str(text), "--seq-len", "24", "--layers", "attn.1",
               "--alphas", "0,0.5,1", "--load-in-8bit", "--json-out", str(out)])
    assert rc == 0, capsys.readouterr().err
    got = json.loads(out.read_text())
    q = got["quantization"]
    assert q["bits"] == 8 and q["quantized_weights"] > 0
    assert q["interpolated_groups"].startswith("kept in the compute dtype")
    assert "model.layers.1.self_attn.q_proj" in q["kept_in_compute_dtype"]
    fp32 = ModelPair.from_pretrained(a, b).barrier(ids, layers="attn.1", alphas="0,0.5,1")
    da, db = abs(got["loss_a"] - fp32.loss_a), abs(got["loss_b"] - fp32.loss_b)
    print(f"8-bit endpoint loss - fp32: |dA| = {da:.2e}, |dB| = {db:.2e} nats")
    assert 0 < da < 0.02 and 0 < db < 0.02  # quantization changes the numbers, a little
    assert abs(got["barrier_mid"] - fp32.barrier_mid) < 0.02


@pytest.mark.parametrize("bits", [8, 4])
def test_requantized_path_restores_exactly(pair_dirs, bits):
    """Without --layers every linear weight is quantized; points are re-quantized after each
    set, and switching bases / restoring reproduces the endpoint numbers bit for bit."""
    a, b, ids = pair_dirs
    q = ModelPair.from_pretrained(a, b, **{f"load_in_{bits}bit": True})
    kinds = {type(m).__name__ for m in q.model.modules()}
    assert ("Linear8bitLt" if bits == 8 else "Linear4bit") in kinds
    # Shapes are the checkpoint's, not the packed storage's.
    name = "model.layers.0.mlp.up_proj.weight"
    assert q.arch.shapes[name] == tuple(q.ckpt_a.shape(name))
    r = q.barrier(ids, alphas="0,0.5,1", base="b")
    assert r.finite and r.loss[1] != r.loss_b  # the midpoint moved the quantized weights
    q.interp.set_base("a")
    ev = q.evaluator(q.blocks(ids))
    assert ev.run(state="again").loss == r.loss_a
    fp32 = ModelPair.from_pretrained(a, b).barrier(ids, alphas="0,0.5,1", base="b")
    assert abs(r.loss_a - fp32.loss_a) < (0.02 if bits == 8 else 0.1)


@pytest.mark.parametrize("layout", ["as-bitsandbytes-chooses", "generic"])
def test_4bit_endpoints_independent_of_evaluation_order(pair_dirs, layout):
    """A's and B's losses are bitwise the same whichever base a run starts from and after any
    number of base switches, in the layout bitsandbytes picks for this CPU and in the generic one."""
    a, b, ids = pair_dirs
    losses = {}
    for base in ("a", "b"):
        q = ModelPair.from_pretrained(a, b, load_in_4bit=True)
        if layout == "generic":
            _force_generic_layout(q.model)
        r = q.barrier(ids, alphas="0,0.5,1", base=base)
        losses[base] = (r.loss_a, r.loss_b)
        ev = q.evaluator(q.blocks(ids))
        for which in ("b", "a", "b"):
            q.interp.set_base(which)
            assert ev.run(state=f"again-{which}").loss == (r.loss_a if which == "a" else r.loss_b)
    assert losses["a"] == losses["b"]


def test_requantization_from_the_packed_cpu_layout(pair_dirs):
    """Restores write the canonical state whatever layout a weight is in: here every 4-bit weight
    is first converted to bitsandbytes' packed CPU layout (its own conversion, plain torch), as its
    forward does on AVX512-BF16 CPUs; switching bases and back then gives bitwise the state after
    loading, from which the packed layout is again the same."""
    F = pytest.importorskip("bitsandbytes.functional")
    pack = getattr(F, "_convert_weight_packed_for_cpu", None)
    if pack is None:
        pytest.skip("this bitsandbytes has no packed CPU layout")
    a, b, _ = pair_dirs
    q = ModelPair.from_pretrained(a, b, load_in_4bit=True)
    params = {n: p for n, p in q.model.named_parameters() if type(p).__name__ == "Params4bit"}
    assert params
    loaded = {n: _state(p) for n, p in params.items()}

    def pack_all():
        for p in params.values():
            p.data, p.quant_state = pack(p.data, p.quant_state)
        return {n: _state(p) for n, p in params.items()}

    packed = pack_all()
    assert all(s[2] == torch.bfloat16 and s[-1] for s in packed.values())  # what the old code quantized from
    q.interp.set_base("b")
    pack_all()
    q.interp.set_base("a")
    assert all(_same(_state(p), loaded[n]) for n, p in params.items())
    assert all(_same(s, packed[n]) for n, s in pack_all().items())


def test_shapes_the_packed_layout_cannot_hold(tmp_path):
    """Odd 4-bit shapes (intermediate size 176: rows not in blocks of 32) never reach a
    bitsandbytes assertion: they stay in the generic layout and the result file names them."""
    from helpers import build_full_pair

    from hf_llmc.config.errors import PlacementError
    from hf_llmc.model.placement import _bnb_packs_on_cpu, cpu_packable, keep_unpackable_unpacked, quantization_info

    assert not cpu_packable((176, 64), 64) and not cpu_packable((64, 176), 64) and cpu_packable((192, 64), 64)
    a, b = build_full_pair(tmp_path, "llama", intermediate_size=176)
    ids = eval_ids()
    q = ModelPair.from_pretrained(a, b, load_in_4bit=True)
    info = quantization_info(q)
    kept = set(info["kept_in_generic_layout"])
    modules = {n: m for n, m in q.model.named_modules()}
    if _bnb_packs_on_cpu():  # bitsandbytes would pack here: the odd modules are kept generic
        assert kept == {f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj", "down_proj")}
        assert all(not modules[n].support_avx512bf16_for_cpu for n in kept)
    else:  # it never packs on this CPU: nothing to keep
        assert kept == set()
    r = q.barrier(ids, alphas="0,0.5,1", base="b")
    assert r.finite
    q.interp.set_base("a")
    assert q.evaluator(q.blocks(ids)).run(state="again").loss == r.loss_a
    # A bitsandbytes without the per-module switch: a one-line error naming the module where it
    # would pack on this CPU, nothing to do where it would not.
    q2 = ModelPair.from_pretrained(a, b, load_in_4bit=True, device="cpu")
    for module in q2.model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            del module.support_avx512bf16_for_cpu
    if _bnb_packs_on_cpu():
        with pytest.raises(PlacementError, match=r"^model\.layers\.0\.mlp\.gate_proj: its 4-bit weight \(176, 64\) cannot use"):
            keep_unpackable_unpacked(q2.model)
    else:
        assert keep_unpackable_unpacked(q2.model) == []


def test_cli_4bit_loss_a_equal_for_either_base(pair_dirs, tmp_path, capsys):
    a, b, ids = pair_dirs
    text = write_eval_text(tmp_path / "eval.txt", ids)
    got = {}
    for base in ("a", "b"):
        out = tmp_path / f"{base}.json"
        rc = main(["barrier", str(a), str(b), "--data", str(text), "--seq-len", "24", "--alphas", "0,0.5,1",
                   "--load-in-4bit", "--base", base, "--json-out", str(out)])
        assert rc == 0, capsys.readouterr().err
        got[base] = json.loads(out.read_text())
    assert (got["a"]["loss_a"], got["a"]["loss_b"]) == (got["b"]["loss_a"], got["b"]["loss_b"])
    assert got["a"]["quantization"]["kept_in_generic_layout"] == []
