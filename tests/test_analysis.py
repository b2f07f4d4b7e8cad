"""Distances and random-direction robustness against direct computations on the saved weights."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import Reference  # plain-torch reference evaluation (saved state dicts + fresh model)
from safetensors.torch import load_file

from hf_llmc import DataConfig, ModelPair, RobustnessConfig, ScanError, cli, distances, run_robustness
from hf_llmc.analyses.robustness import random_direction
from hf_llmc.engine.io import RESULTS, read_rows
from hf_llmc.outputs.report import render, robustness_summary

SEQ = 32
N_BLOCKS = 4


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def gpt2_demo(one_thread, request):
    return request.getfixturevalue("gpt2_pair")


def _direct(sd_a: dict, sd_b: dict, keys: list[str]) -> dict:
    a = torch.cat([sd_a[k].double().flatten() for k in keys])
    b = torch.cat([sd_b[k].double().flatten() for k in keys])
    return {"distance": float((b - a).norm()), "relative_distance": float((b - a).norm() / a.norm()),
            "cosine": float(a @ b / (a.norm() * b.norm())), "norm_a": float(a.norm()), "norm_b": float(b.norm())}


def test_distances_match_direct_computation(gpt2_demo, tmp_path):
    sd_a = load_file(Path(gpt2_demo.a) / "model.safetensors")
    sd_b = load_file(Path(gpt2_demo.b) / "model.safetensors")
    result = distances(gpt2_demo.a, gpt2_demo.b, granularity="sublayer")
    rows = {r["group"]: r for r in result["groups"]}
    expected = {
        "full": sorted(sd_a),
        "embed": ["transformer.wte.weight", "transformer.wpe.weight"],
        "head": ["transformer.wte.weight"],  # tied: the head is the token embedding
        "attn.1": [k for k in sd_a if k.startswith("transformer.h.1.attn.")],
        "mlp.2": [k for k in sd_a if k.startswith("transformer.h.2.mlp.")],
        "norm.0": [k for k in sd_a if k.startswith("transformer.h.0.ln_")],
        "final_norm": ["transformer.ln_f.weight", "transformer.ln_f.bias"],
    }
    for group, keys in expected.items():
        direct = _direct(sd_a, sd_b, keys)
        for field, value in direct.items():
            assert math.isclose(rows[group][field], value, rel_tol=1e-9), (group, field)
        assert rows[group]["numel"] == sum(sd_a[k].numel() for k in keys)
    assert rows["full"]["distance"] > 0 and -1 <= rows["full"]["cosine"] <= 1
    assert result["model_a"] == "a" and str(tmp_path) not in json.dumps(result)

    out = tmp_path / "d.json"
    assert cli.main(["distance", str(gpt2_demo.a), str(gpt2_demo.b), "--granularity", "block", "--json-out", str(out)]) == 0
    saved = json.loads(out.read_text())
    blocks = {r["group"]: r for r in saved["groups"]}
    assert set(blocks) == {"full", "block.0", "block.1", "block.2"}
    direct = _direct(sd_a, sd_b, [k for k in sd_a if k.startswith("transformer.h.0.")])
    assert math.isclose(blocks["block.0"]["distance"], direct["distance"], rel_tol=1e-9)
    # an existing file is replaced only with --overwrite
    argv = ["distance", str(gpt2_demo.a), str(gpt2_demo.b), "--granularity", "sublayer", "--json-out", str(out)]
    assert cli.main(argv) == 2 and json.loads(out.read_text()) == saved
    assert cli.main([*argv, "--overwrite"]) == 0
    assert "attn.0" in {r["group"] for r in json.loads(out.read_text())["groups"]}
    with pytest.raises(ScanError):
        distances(gpt2_demo.a, gpt2_demo.b, granularity="neuron")


def test_distances_of_fused_experts(moe_pair_dirs):
    """Mixtral's experts are fused parameters on load and per-expert tensors on disk: the
    distances equal those of the fused parameters of the transformers-loaded models."""
    from transformers import AutoModelForCausalLM

    from hf_llmc import PairError

    a, b = moe_pair_dirs["a"], moe_pair_dirs["b"]
    sd_a, sd_b = (AutoModelForCausalLM.from_pretrained(d).state_dict() for d in (a, b))
    rows = {r["group"]: r for r in distances(a, b, granularity="sublayer")["groups"]}
    for group, prefix in (("mlp.1", "model.layers.1.mlp."), ("attn.0", "model.layers.0.self_attn.")):
        keys = [k for k in sd_a if k.startswith(prefix)]
        assert any("experts" in k for k in keys) == (group == "mlp.1")
        direct = _direct(sd_a, sd_b, keys)
        for field, value in direct.items():
            assert math.isclose(rows[group][field], value, rel_tol=1e-9), (group, field)
    with pytest.raises(PairError, match="select all of them or none"):
        distances(a, b, layers=r"re:model\.layers\.1\.mlp\.experts\.down_proj")


def test_robustness_points_and_directions(gpt2_demo, tmp_path):
    pair = ModelPair.from_pretrained(gpt2_demo.a, gpt2_demo.b, device="cpu")
    blocks = pair.blocks(DataConfig(data=str(gpt2_demo.eval_text), seq_len=SEQ, max_tokens=SEQ * N_BLOCKS))
    ref = Reference(gpt2_demo.a, gpt2_demo.b, blocks.ids)
    sd_a, sd_b = ref.sd["a"], ref.sd["b"]
    cfg = RobustnessConfig(layers="attn.1,block.2", samples=2, seed=5, alphas="0,0.5,1")
    out = tmp_path / "rob"
    rows = run_robustness(pair, blocks, cfg, out, progress=False)
    groups = {g.name: g for g in pair.groups(cfg.layers)}
    # 2 endpoints + per group (1 interp + 2 random) x 3 t values
    assert len(rows) == 2 + len(groups) * 3 * 3
    # the live model is back at A, bitwise
    for name, param in pair.model.named_parameters():
        if name in sd_a:
            assert torch.equal(param.detach(), sd_a[name]), name

    for name, group in groups.items():
        keys = sorted({ref.alias.get(p, p) for p in group.parameters})
        norm_diff = float(torch.cat([(sd_b[k].double() - sd_a[k].double()).flatten() for k in keys]).norm())
        d0 = random_direction(pair.interp, group, cfg.seed, 0)
        d1 = random_direction(pair.interp, group, cfg.seed, 1)
        assert sorted(d0) == keys
        assert math.isclose(float(torch.cat([v.double().flatten() for v in d0.values()]).norm()), norm_diff, rel_tol=1e-6)
        assert all(torch.equal(d0[k], random_direction(pair.interp, group, cfg.seed, 0)[k]) for k in keys)  # seeded
        assert not torch.equal(d0[keys[0]], d1[keys[0]])  # samples differ
        for r in (r for r in rows if r["group"] == name and r["alpha"] == 0.5):
            if r["direction"] == "interp":
                losses = ref.point(group.parameters, 0.5, "a")
            else:
                d = (d0, d1)[r["sample"]]
                sd = {k: v.clone() for k, v in sd_a.items()}
                for k in keys:
                    sd[k] = (sd_a[k].float() + 0.5 * d[k]).to(sd_a[k].dtype)
                losses = ref.block_losses(sd)
            assert math.isclose(r["loss"], float(losses.mean()), rel_tol=1e-5), r
            assert math.isclose(r["delta"], r["loss"] - float(ref.endpoints()[0].mean()), rel_tol=1e-4, abs_tol=1e-5)

    summary = {(e["group"], e["t"]): e for e in robustness_summary(rows)}
    for name in groups:
        mine = [r["loss"] for r in rows if r["group"] == name and r["alpha"] == 0.5 and r["direction"] == "random"]
        e = summary[(name, 0.5)]
        assert e["samples"] == 2 and math.isclose(e["random_mean"], sum(mine) / 2)
        assert math.isclose(e["random_std"], float(torch.tensor(mine, dtype=torch.float64).std(unbiased=True)))
    written = render(out)
    assert written["robustness"].read_bytes()[:4] == b"\x89PNG"
    assert "Robustness" in (out / "report.html").read_text()

    # resumable like a scan: finished points are kept, other settings refused
    before = (out / RESULTS).read_bytes()
    assert len(run_robustness(pair, blocks, cfg, out, resume=True, progress=False)) == len(rows)
    assert (out / RESULTS).read_bytes() == before
    with pytest.raises(ScanError):
        run_robustness(pair, blocks, RobustnessConfig(layers="attn.1", samples=3), out, resume=True, progress=False)
    assert len(read_rows(out / RESULTS)) == len(rows)
