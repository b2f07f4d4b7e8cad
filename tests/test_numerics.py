"""Numerical guards and provenance: half-precision tensors are computed in float32 and cast once,
NaN/inf never becomes a reported number or a written weight, and every result file records the
library versions, device, dtype and data fingerprint it was computed with."""

from __future__ import annotations

import json
import platform
import shutil
from importlib import metadata
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from safetensors.torch import load_file, save_file

from hf_llmc import DataConfig, MergeSpec, ModelPair, ScanConfig, distances, lazy_pair, run_scan, save_merged
from hf_llmc.cli import main
from hf_llmc.cli.recipes import load_recipe
from hf_llmc.config.errors import NonFiniteTensorError, PrecisionWarning
from hf_llmc.engine.io import TMP_MARK
from hf_llmc.engine.provenance import environment
from hf_llmc.testing import synthetic_text

ATTN = "model.layers.1.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("numerics")


@pytest.fixture(scope="module")
def bf16(root, tiny_model, tiny_tokenizer) -> dict[str, Path]:
    """Llama A and B stored in bfloat16."""
    out = {}
    for which, seed in (("a", 0), ("b", 1)):
        out[which] = root / f"bf16-{which}"
        tiny_model("llama", seed=seed).to(torch.bfloat16).save_pretrained(out[which])
        tiny_tokenizer.save_pretrained(out[which])
    return out


@pytest.fixture(scope="module")
def gpt2(root, save_tiny_model) -> dict[str, Path]:
    out = {"a": save_tiny_model("gpt2", root / "gpt2-a", seed=0), "b": save_tiny_model("gpt2", root / "gpt2-b", seed=1),
           "data": root / "eval.txt"}
    out["data"].write_text(synthetic_text("mixed", 20, 0))
    return out


def _expected(a: torch.Tensor, b: torch.Tensor, alpha: float, dtype: torch.dtype) -> torch.Tensor:
    return (a.float() * (1 - alpha) + b.float() * alpha).to(dtype)


# -- float32 arithmetic, one cast ----------------------------------------------------------------------
def test_bf16_checkpoints_live_path_is_float32(bf16):
    """A layer point of a bfloat16 model is the float32 mix itself (held in float32); the full
    path is the float32 mix cast once to bfloat16 (never bfloat16 arithmetic)."""
    pair = ModelPair.from_pretrained(bf16["a"], bf16["b"], device="cpu", dtype="bfloat16")
    a, b = pair.ckpt_a.get(ATTN), pair.ckpt_b.get(ATTN)
    assert a.dtype == b.dtype == torch.bfloat16
    param = dict(pair.model.named_parameters())[ATTN]
    for alpha in (0.3, 0.7):
        naive = a * (1 - alpha) + b * alpha  # bf16 arithmetic, rounded at every step
        with pair.interp.at(pair.groups("attn.1"), alpha):
            value = param.detach().clone()
        assert value.dtype == torch.float32 and torch.equal(value, _expected(a, b, alpha, torch.float32))
        with pytest.warns(PrecisionWarning):
            with pair.interp.at([pair.full_group()], alpha):
                value = param.detach().clone()
        assert value.dtype == torch.bfloat16 and torch.equal(value, _expected(a, b, alpha, torch.bfloat16))
        assert not torch.equal(naive, _expected(a, b, alpha, torch.bfloat16))  # the check can tell the two apart
        pair.interp._warned = False
    assert param.dtype == torch.bfloat16 and torch.equal(param.detach(), a)  # restored exactly


@pytest.mark.parametrize("out_dtype", [None, "float16"])
def test_bf16_checkpoints_merge_writer_is_float32_cast_once(bf16, tmp_path, out_dtype):
    save_merged(lazy_pair(bf16["a"], bf16["b"]), "attn.1=0.3", tmp_path / "m", dtype=out_dtype)
    merged = load_file(tmp_path / "m" / "model.safetensors")
    a, b = load_file(bf16["a"] / "model.safetensors"), load_file(bf16["b"] / "model.safetensors")
    dtype = torch.float16 if out_dtype else torch.bfloat16
    assert torch.equal(merged[ATTN], _expected(a[ATTN], b[ATTN], 0.3, dtype))
    untouched = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(merged[untouched], a[untouched].to(dtype))


# -- no silent NaN ------------------------------------------------------------------------------------
def _with_value(src: Path, dst: Path, name: str, value: float, *, whole: bool = False) -> Path:
    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    if whole:
        state[name].fill_(value)
    else:
        state[name][0, 0] = value
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_nan_in_b_stops_merge_and_distance(gpt2, tmp_path):
    name = "transformer.h.1.mlp.c_fc.weight"
    b_nan = _with_value(gpt2["b"], tmp_path / "b_nan", name, float("nan"))
    with pytest.raises(NonFiniteTensorError, match=rf"{name}: non-finite values \(NaN/inf\) at alpha=0.5"):
        save_merged(lazy_pair(gpt2["a"], b_nan), "mlp.1=0.5", tmp_path / "merged")
    assert not (tmp_path / "merged").exists() and not list(tmp_path.glob(f".*{TMP_MARK}*"))  # nothing partial
    with pytest.raises(NonFiniteTensorError, match=rf"{name}: non-finite values \(NaN/inf\) in B"):
        distances(gpt2["a"], b_nan)
    # a NaN outside the merged groups is not part of the merge: no false alarm
    result = save_merged(lazy_pair(gpt2["a"], b_nan), "attn.0=0.5", tmp_path / "elsewhere")
    merged = load_file(tmp_path / "elsewhere" / result.files[0])
    assert all(torch.isfinite(t).all() for t in merged.values() if t.is_floating_point())


def test_extrapolation_overflowing_the_output_dtype_is_refused(gpt2, tmp_path):
    name = "transformer.h.0.attn.c_attn.weight"
    big = _with_value(gpt2["b"], tmp_path / "b_big", name, 1000.0, whole=True)
    spec = MergeSpec(layers="attn.0", alpha=100.0, allow_extrapolation=True)
    save_merged(lazy_pair(gpt2["a"], big), spec, tmp_path / "fp32")  # 1e5 fits in float32
    with pytest.raises(NonFiniteTensorError, match="or the output dtype overflows"):
        save_merged(lazy_pair(gpt2["a"], big), spec, tmp_path / "fp16", dtype="float16")  # not in float16
    assert not (tmp_path / "fp16").exists()


# -- provenance ----------------------------------------------------------------------------------------
def _check_environment(env: dict, device: str, dtype: str) -> None:
    assert env["libraries"]["torch"] == torch.__version__
    assert env["libraries"]["transformers"] == transformers.__version__
    assert env["libraries"]["hf-llmc"] == metadata.version("hf-llmc")
    assert env["python"] == platform.python_version()
    assert env["device"] == device and env["dtype"] == dtype


def test_environment_helper(bf16, gpt2):
    _check_environment(environment(device="cpu", dtype=torch.float16), "cpu", "float16")
    pair = ModelPair.from_pretrained(bf16["a"], bf16["b"], device="cpu", dtype="bfloat16")
    _check_environment(environment(pair.model), "cpu", "bfloat16")
    assert environment()["device"] is None and environment()["dtype"] is None
    text = json.dumps(environment(pair.model))
    assert str(bf16["a"].parent) not in text  # no local paths


def test_result_files_record_versions_device_dtype_and_data(gpt2, tmp_path, capsys):
    cfg = DataConfig(data=str(gpt2["data"]), seq_len=32, max_tokens=512)
    pair = ModelPair.from_pretrained(gpt2["a"], gpt2["b"], device="cpu")
    blocks = pair.blocks(cfg)
    # barrier --json-out
    out = tmp_path / "barrier.json"
    assert main(["barrier", str(gpt2["a"]), str(gpt2["b"]), "--data", str(gpt2["data"]), "--seq-len", "32",
                 "--max-tokens", "512", "--alphas", "0.5", "--device", "cpu", "--json-out", str(out)]) == 0
    capsys.readouterr()
    payload = json.loads(out.read_text())
    _check_environment(payload["environment"], "cpu", "float32")
    assert payload["data"] == {"source": "eval.txt", "fingerprint": blocks.fingerprint,
                               "num_blocks": blocks.num_blocks, "seq_len": 32}
    other = tmp_path / "other.txt"
    other.write_text(synthetic_text("mixed", 20, 1))
    assert pair.blocks(DataConfig(data=str(other), seq_len=32, max_tokens=512)).fingerprint != blocks.fingerprint
    # scan.json
    run_scan(pair, blocks, ScanConfig(alphas="0.5"), tmp_path / "scan", progress=False)
    manifest = json.loads((tmp_path / "scan" / "scan.json").read_text())
    assert manifest["libraries"]["torch"] == torch.__version__ and manifest["device"] == "cpu"
    assert manifest["hashed"]["dtype"] == "float32" and manifest["data"]["fingerprint"] == blocks.fingerprint
    # a merge's hf_llmc_config.yaml (evaluated: also the evaluation's device, dtype and data)
    save_merged(pair, "attn.0=0.5", tmp_path / "merged", data=cfg)
    config_file = tmp_path / "merged" / "hf_llmc_config.yaml"
    prov = yaml.safe_load(config_file.read_text())["provenance"]
    _check_environment(prov, "cpu", "float32")
    assert prov["evaluation"] == {"device": "cpu", "dtype": "float32", "data": "eval.txt", "dataset": None,
                                  "fingerprint": blocks.fingerprint, "tokens": blocks.num_blocks * 31}
    assert str(tmp_path) not in config_file.read_text()
    recipe = load_recipe(config_file)  # still a runnable recipe: provenance is informational
    assert len(recipe.steps) == 1 and recipe.steps[0].kind == "merge"
