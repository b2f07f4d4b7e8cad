"""8/4-bit loading (bitsandbytes on CPU): runs complete, restores are exact, the result file
says how interpolated groups are held, and endpoint losses stay close to fp32."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("bitsandbytes")

from hf_llmc.cli import main  # noqa: E402
from hf_llmc.pair import ModelPair  # noqa: E402

from scale_utils import build_full_pair, eval_ids, write_eval_text  # noqa: E402


@pytest.fixture(scope="module")
def pair_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    a, b = build_full_pair(root, "llama")
    return a, b, eval_ids()


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
