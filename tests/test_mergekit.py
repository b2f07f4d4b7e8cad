"""mergekit configs in and out: reading mergekit's linear / slerp examples gives the documented
tensors, the outputs equal mergekit 0.1.5's committed merges (bit for bit for lerp, within 1e-6 for
slerp), emitting then reading gives the same merge, and what hf-llmc cannot follow is refused.

The reference data (tests/data/mergekit, README.md there) was produced once with mergekit in its
own virtual environment; mergekit is not needed to run these tests."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from hf_llmc import MergeSpec, lazy_pair
from hf_llmc.cli import main
from hf_llmc.config.mergekit import dump_mergekit, load_mergekit, parse_mergekit
from hf_llmc.outputs.merge.mergekit import mergekit_config, spec_from_mergekit
from hf_llmc.outputs.merge.plan import plan_merge

DATA = Path(__file__).parent / "data" / "mergekit"
SPEC = ["--set", "attn.0-1=0.25", "--set", "mlp.*=0,0.5,0.3,1", "--set", "norm.3=0.75", "--set", "embed=0.5"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def here(tmp_path, monkeypatch) -> Path:
    """A copy of the data folder as the working directory (configs name the models a and b)."""
    work = tmp_path / "work"
    shutil.copytree(DATA, work)
    monkeypatch.chdir(work)
    return work


@pytest.fixture(scope="module")
def ab() -> dict[str, dict[str, torch.Tensor]]:
    return {m: load_file(DATA / m / "model.safetensors") for m in ("a", "b")}


def _slerp64(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.double().flatten(), b.double().flatten()
    cos = float(a @ b / (a.norm() * b.norm()))
    if abs(cos) > 0.9995:
        return (1 - t) * a + t * b
    omega = math.acos(cos)
    return (math.sin((1 - t) * omega) * a + math.sin(t * omega) * b) / math.sin(omega)


def _merge(args: list[str], out: Path, capsys) -> dict[str, torch.Tensor]:
    rc = main(["merge", *args, "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    return load_file(out / "model.safetensors")


# -- reading -------------------------------------------------------------------------------------
def test_linear_example_gives_documented_tensors_bit_for_bit(here, ab, tmp_path, capsys):
    merged = _merge(["--from-mergekit", "linear.yml"], tmp_path / "lin", capsys)
    reference = load_file(DATA / "out" / "linear.safetensors")
    assert set(merged) == set(reference) == set(ab["a"])
    for key, value in merged.items():
        # mergekit's documented linear merge: (w_A·A + w_B·B) / (w_A + w_B), weights 0.7 and 0.3
        expected = (0.7 * ab["a"][key].double() + 0.3 * ab["b"][key].double()) / 1.0
        torch.testing.assert_close(value.double(), expected, rtol=0, atol=1e-6)
        assert value.dtype == torch.float32 and torch.equal(value, reference[key]), key


def test_gradient_slerp_example_gives_documented_tensors(here, ab, tmp_path, capsys):
    merged = _merge(["--from-mergekit", "slerp.yml"], tmp_path / "slerp", capsys)
    reference = load_file(DATA / "out" / "slerp.safetensors")
    attn, mlp = [0, 0.5, 0.3, 0.7, 1], [1, 0.5, 0.7, 0.3, 0]
    n_layers, n_gradient = 4, 0
    for key, value in merged.items():
        # documented: t per layer runs piecewise linearly through the anchors over layers 0..3;
        # every other tensor takes the fallback 0.5
        t = 0.5
        if key.startswith("model.layers."):
            layer = int(key.split(".")[2])
            position = layer / (n_layers - 1) * (len(attn) - 1)
            if "self_attn" in key:
                t, n_gradient = float(np.interp(position, range(len(attn)), attn)), n_gradient + 1
            elif "mlp" in key:
                t, n_gradient = float(np.interp(position, range(len(mlp)), mlp)), n_gradient + 1
        expected = _slerp64(t, ab["a"][key], ab["b"][key]).reshape(value.shape)
        torch.testing.assert_close(value.double(), expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(value, reference[key], rtol=0, atol=1e-6)
    assert n_gradient == 4 * 7
    # not a lerp: the test can tell slerp from lerp on this pair
    key = "model.layers.1.mlp.up_proj.weight"
    assert (merged[key].double() - (0.5 * ab["a"][key].double() + 0.5 * ab["b"][key].double())).abs().max() > 1e-3


def test_emitted_config_is_exact_with_mergekit(here, ab, tmp_path, capsys):
    rc = main(["merge", "a", "b", *SPEC, "--emit-mergekit", str(tmp_path / "emitted.yml")])
    assert rc == 0, capsys.readouterr().err
    assert (tmp_path / "emitted.yml").read_text() == (DATA / "emitted.yml").read_text()
    assert "[0.0, 0.5]" in (DATA / "emitted.yml").read_text()  # a gradient in mergekit's list form
    reference = load_file(DATA / "out" / "emitted.safetensors")
    same_ops = _merge(["a", "b", *SPEC, "--lerp-ops", "mergekit"], tmp_path / "ops", capsys)
    read = _merge(["--from-mergekit", str(tmp_path / "emitted.yml")], tmp_path / "read", capsys)
    plain = _merge(["a", "b", *SPEC], tmp_path / "plain", capsys)
    n_differ = 0
    for key, value in reference.items():
        assert torch.equal(same_ops[key], value) and torch.equal(read[key], value), key
        # hf-llmc's own (1-α)·A + α·B rounds each product: within float32 rounding of the products
        bound = torch.finfo(torch.float32).eps * torch.maximum(ab["a"][key].abs(), ab["b"][key].abs())
        assert bool(((plain[key] - value).abs() <= bound).all()), key
        n_differ += not torch.equal(plain[key], value)
    assert n_differ > 0  # the two orders of operations do differ on this pair


@pytest.mark.parametrize("items, method, base", [
    ("attn.0-1=0.25; mlp.*=0,0.5,0.3,1; norm.3=0.75; embed=0.5", "lerp", "a"),
    ("block.*=0.1:0.9; head=0.3", "lerp", "b"),
    ("re:q_proj=0.6; mlp.0=0.1; final_norm=1.5", "lerp", "a"),
    ("attn.*=0,1; head=0.25", "slerp", "a"),
    ("mlp.1-2=0.25,0.75; final_norm=0.5; norm.*=0.1:0.3", "slerp", "b"),
])
def test_round_trip(items, method, base):
    pair = lazy_pair(DATA / "a", DATA / "b")
    spec = MergeSpec.parse(items, method=method, base=base, allow_extrapolation=True)
    text = dump_mergekit(mergekit_config(pair, spec, "a", "b"))
    back = spec_from_mergekit(parse_mergekit(yaml.safe_load(text)), pair.arch)
    assert (back.method, back.base) == (method, base)
    want, got = plan_merge(pair.arch, spec), plan_merge(pair.arch, back)
    keep = 0.0 if base == "a" else 1.0
    names = [n for n in pair.arch.parameters if n not in pair.arch.aliases]
    want_alphas = {n: want.alphas.get(n, keep) for n in names}
    got_alphas = {n: got.alphas.get(n, keep) for n in names}
    if method == "slerp" and base == "b":  # mergekit's t = 1 - α keeps α to a double's rounding
        assert got_alphas == pytest.approx(want_alphas, rel=0, abs=1e-15)
        assert sum(got_alphas[n] == want_alphas[n] for n in names) > len(names) // 2
    else:
        assert got_alphas == want_alphas
        assert want.changed() == got.changed()


def test_gradient_list_becomes_mergekits_list_form():
    pair = lazy_pair(DATA / "a", DATA / "b")
    lerp = mergekit_config(pair, "mlp.*=0,0.5,0.3,1; attn.*=0.25", "a", "b")
    assert len(lerp["slices"]) == 1 and lerp["slices"][0]["sources"][0]["layer_range"] == [0, 4]
    weight_b = lerp["slices"][0]["sources"][1]["parameters"]["weight"]
    assert {"filter": ".mlp.", "value": [0.0, 0.5, 0.3, 1.0]} in weight_b
    assert {"filter": ".self_attn.", "value": 0.25} in weight_b and weight_b[-1] == {"value": 0.0}
    slerp = mergekit_config(pair, MergeSpec.parse("mlp.*=0,0.5,0.3,1", method="slerp", base="b"), "a", "b")
    assert slerp["base_model"] == "b" and {"filter": ".mlp.", "value": [1.0, 0.5, 0.7, 0.0]} in slerp["slices"][0]["parameters"]["t"]


def test_read_spec_is_readable(here):
    pair = lazy_pair(DATA / "a", DATA / "b")
    assert spec_from_mergekit(load_mergekit("emitted.yml"), pair.arch).describe() == \
        "embed=0.5; attn.0-1=0.25; mlp.0-3=0,0.5,0.3,1; norm.3=0.75"
    assert spec_from_mergekit(load_mergekit("slerp.yml"), pair.arch).describe() == \
        "embed=0.5; final_norm=0.5; head=0.5; attn.0-3=0,0.5,0.3,0.7,1; mlp.0-3=1,0.5,0.7,0.3,0; norm.0-3=0.5"


# -- refusals ------------------------------------------------------------------------------------
LINEAR = {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 0.5}},
                                               {"model": "b", "parameters": {"weight": 0.5}}]}


@pytest.mark.parametrize("change, message", [
    ({"merge_method": "ties"}, "merge_method 'ties' is not supported"),
    ({"tokenizer": {"source": "union"}}, "mergekit key 'tokenizer' is not supported"),
    ({"chat_template": "auto"}, "mergekit key 'chat_template' is not supported"),
    ({"parameters": {"density": 0.5}}, "mergekit key 'parameters.density' is not supported"),
    ({"models": [{"model": "a", "parameters": {"weight": 1}}, {"model": "b", "parameters": {"weight": 1}},
                 {"model": "c", "parameters": {"weight": 1}}]}, "names 3 model(s)"),
    ({"dtype": "int8"}, "dtype: 'int8' is not supported"),
    ({"tokenizer_source": "c"}, "tokenizer_source 'c'"),
    ({"slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}, {"model": "b", "layer_range": [2, 4]}]}],
      "models": None}, "slices[0]: layer_range [0, 2]"),
    ({"models": [{"model": "a", "parameters": {"weight": 0.5}}, {"model": "b"}]}, "no weight for model b"),
    ({"models": [{"model": "a", "parameters": {"weight": 0.5}}, {"model": "b", "parameters": {"weight": 0.6}}],
      "parameters": {"normalize": False}}, "do not sum to 1"),
])
def test_unsupported_configs_are_refused(here, tmp_path, capsys, change, message):
    config = {**LINEAR, **change}
    config = {k: v for k, v in config.items() if v is not None}
    (here / "bad.yml").write_text(yaml.safe_dump(config))
    rc = main(["merge", "--from-mergekit", "bad.yml", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("args, message", [
    (["a", "b", "--from-mergekit", "linear.yml"], "drop A B"),
    (["--from-mergekit", "linear.yml", "--layers", "attn.0"], "the config says what to merge"),
    (["--from-mergekit", "linear.yml", "--dtype", "bfloat16"], "the mergekit config writes float32"),
    (["--from-mergekit", "missing.yml"], "cannot read"),
    (["a", "b", "--layers", "attn.0", "--emit-mergekit", "linear.yml"], "the file exists"),
    (["--layers", "attn.0"], "give the models A and B"),
])
def test_cli_usage_errors(here, tmp_path, capsys, args, message):
    rc = main(["merge", *args, "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()


def test_union_of_identical_tokenizers_is_the_base(here, ab, tmp_path, capsys):
    config = yaml.safe_load((here / "linear.yml").read_text())
    (here / "union.yml").write_text(yaml.safe_dump({**config, "tokenizer_source": "union"}))
    merged = _merge(["--from-mergekit", "union.yml"], tmp_path / "u", capsys)
    assert torch.equal(merged["lm_head.weight"], load_file(DATA / "out" / "linear.safetensors")["lm_head.weight"])


def test_what_mergekit_cannot_express_writes_nothing(moe_pair_dirs, tmp_path, capsys):
    out = tmp_path / "moe.yml"
    rc = main(["merge", str(moe_pair_dirs["a"]), str(moe_pair_dirs["b"]), "--layers", "attn.0",
               "--emit-mergekit", str(out), "--out", str(tmp_path / "m")])
    err = capsys.readouterr().err
    assert rc == 2 and "fused expert tensors" in err and err.count("\n") == 1, err
    assert not out.exists() and not (tmp_path / "m").exists()


def test_pairs_whose_vocabularies_differ_are_refused(tiny_model, tiny_tokenizer, tmp_path, capsys, monkeypatch):
    # hf-llmc writes its union vocabulary for such a pair; mergekit builds merged vocabularies differently
    model = tiny_model("gpt2", hidden_size=32)
    model.save_pretrained(tmp_path / "a")
    tiny_tokenizer.save_pretrained(tmp_path / "a")
    tok = type(tiny_tokenizer).from_pretrained(tmp_path / "a")
    tok.add_tokens(["<|tool|>"], special_tokens=True)
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(tmp_path / "b")
    tok.save_pretrained(tmp_path / "b")
    monkeypatch.chdir(tmp_path)
    rc = main(["merge", "a", "b", "--layers", "attn.0", "--emit-mergekit", "m.yml"])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot express the union vocabulary" in err and not (tmp_path / "m.yml").exists(), err
    (tmp_path / "c.yml").write_text(yaml.safe_dump({**LINEAR, "tokenizer_source": "union"}))
    rc = main(["merge", "--from-mergekit", "c.yml", "--out", "x"])
    err = capsys.readouterr().err
    assert rc == 2 and "vocabularies differ (tokenizer_source: union)" in err and not (tmp_path / "x").exists(), err
