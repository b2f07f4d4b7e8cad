"""The CLI: `hf-llmc layers`, `hf-llmc barrier`, exit codes and one-line errors."""

import json
import subprocess
import sys

import pytest

from hf_llmc.cli import main


@pytest.fixture(scope="module")
def llama6(save_tiny_model, tmp_path_factory):
    return save_tiny_model("llama", tmp_path_factory.mktemp("cli") / "llama6", num_layers=6)


@pytest.fixture(scope="module")
def gpt2_dir(save_tiny_model, tmp_path_factory):
    return save_tiny_model("gpt2", tmp_path_factory.mktemp("cli") / "gpt2")


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "hf_llmc", *map(str, args)], capture_output=True, text=True)


def test_layers_json_on_llama(llama6, capsys):
    assert main(["layers", str(llama6), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["architecture"] == "LlamaForCausalLM" and out["num_blocks"] == 6
    names = [g["name"] for g in out["groups"]]
    for kind in ("block", "attn", "mlp", "norm"):
        assert [n for n in names if n.startswith(kind + ".")] == [f"{kind}.{i}" for i in range(6)]
    assert {"embed", "final_norm", "head"} <= set(names)
    assert set(out["groups"][0]) == {"name", "kind", "block", "parameters", "numel"}
    assert out["tied"] == []


def test_layers_select(llama6, capsys):
    assert main(["layers", str(llama6), "--json", "--select", "attn.0-3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [g["name"] for g in out["groups"]] == ["attn.0", "attn.1", "attn.2", "attn.3"]
    params = [p for g in out["groups"] for p in g["parameters"]]
    assert len(params) == 16 and all(p.rsplit(".", 2)[-2] in {"q_proj", "k_proj", "v_proj", "o_proj"} for p in params)


def test_layers_bad_spec_is_usage_error_in_a_real_process(llama6):
    proc = run_cli("layers", llama6, "--select", "attn.0-9")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == ["hf-llmc layers: error: attn.0-9: block 9 is out of range; the model has 6 blocks (0-5)"]
    assert "Traceback" not in proc.stderr


def test_layers_gpt2_tied(gpt2_dir, capsys):
    assert main(["layers", str(gpt2_dir), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert ["lm_head.weight", "transformer.wte.weight"] in out["tied"]
    assert main(["layers", str(gpt2_dir)]) == 0
    assert "tied" in capsys.readouterr().out


def test_layers_missing_model_exit_1(tmp_path, capsys):
    assert main(["layers", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err
    assert "no such model folder" in err and len(err.strip().splitlines()) == 1


def test_debug_shows_traceback(llama6):
    proc = run_cli("--debug", "layers", llama6, "--select", "nope.1")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_barrier_cli_json(gpt2_pair, tmp_path, capsys):
    out = tmp_path / "b.json"
    code = main(["barrier", str(gpt2_pair.a), str(gpt2_pair.b), "--data", str(gpt2_pair.eval_text),
                 "--layers", "attn.0-1", "--seq-len", "32", "--max-tokens", "256", "--json-out", str(out), "--device", "cpu"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "barrier_mid" in printed and "perplexity" in printed
    data = json.loads(out.read_text())
    for key in ("model_a", "model_b", "layers", "base", "method", "alphas", "loss", "perplexity", "accuracy",
                "loss_a", "loss_b", "accuracy_a", "accuracy_b", "barrier_max", "barrier_mid", "barrier_mid_se", "tokens"):
        assert key in data, key
    assert data["alphas"] == [0.0, 0.25, 0.5, 0.75, 1.0] and data["layers"] == "attn.0-1"
    assert data["model_a"] == "a" and str(tmp_path) not in json.dumps(data)
    assert data["tokens"] == (256 // 32) * 31


@pytest.mark.parametrize(
    "extra,code,message",
    [
        (["--layers", "attn.7"], 2, "out of range"),
        (["--alphas", "0,2"], 2, "outside [0, 1]"),
        (["--alphas", "x"], 2, "not a comma-separated"),
        (["--seq-len", "0"], 2, "at least 2"),
    ],
)
def test_barrier_usage_errors(gpt2_pair, capsys, extra, code, message):
    args = ["barrier", str(gpt2_pair.a), str(gpt2_pair.b), "--data", str(gpt2_pair.eval_text), "--device", "cpu", *extra]
    assert main(args) == code
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
