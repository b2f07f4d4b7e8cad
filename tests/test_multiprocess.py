"""Two real processes (torchrun, accelerate launch) give the single-process numbers:
``--parallel data`` (blocks split, per-block sums gathered) and ``--parallel points`` (scan
points split, per-process results files merged by process 0)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import assert_same_result, close

from hf_llmc.cli import main

BIN = Path(sys.executable).parent
pytestmark = [pytest.mark.skipif(not (BIN / "torchrun").exists(), reason="torchrun not installed"), pytest.mark.slow]


@pytest.fixture(scope="module")
def tiny(gpt2_pair):
    """The shared trained GPT-2 pair (a real barrier), evaluated on 5 blocks of 48 tokens
    (5 blocks: an uneven split between 2 processes)."""
    return gpt2_pair.a.parent, gpt2_pair.a, gpt2_pair.b, gpt2_pair.eval_text


DATA = ["--seq-len", "48", "--max-tokens", "240"]


def free_port() -> int:
    """A TCP port the OS says is free now (never a fixed one: parallel runs would collide)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(prefix: list[str], args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run(prefix + ["-m", "hf_llmc", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def test_torchrun_scan_points_matches_single_process(tiny, tmp_path, capsys):
    root, a, b, text = tiny
    common = ["scan", str(a), str(b), "--data", str(text), *DATA, "--base", "both", "--alphas", "0.25,0.5"]
    assert main(common + ["--out", str(tmp_path / "single")]) == 0
    capsys.readouterr()
    proc = _launch([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port())],
                   common + ["--out", str(tmp_path / "par"), "--parallel", "points"], tmp_path)
    assert proc.stdout.count("results:") == 1  # only process 0 reports
    single = {(r["group"], r["base"], r["alpha"]): r for r in map(json.loads, open(tmp_path / "single/results.jsonl"))}
    par = {(r["group"], r["base"], r["alpha"]): r for r in map(json.loads, open(tmp_path / "par/results.jsonl"))}
    assert single.keys() == par.keys() and len(par) > 8
    for key, row in single.items():
        for field in ("loss", "accuracy", "barrier", "barrier_se", "error_barrier"):
            if row[field] is not None:
                assert close(par[key][field], row[field]), (key, field)
    manifest = json.loads((tmp_path / "par/scan.json").read_text())
    assert manifest["status"] == "complete" and manifest["parallel"] == {"mode": "points", "processes": 2}
    assert not list((tmp_path / "par").glob("results.rank*.jsonl"))  # merged and removed


def test_accelerate_launch_barrier_data_matches_single_process(tiny, tmp_path, capsys):
    root, a, b, text = tiny
    common = ["barrier", str(a), str(b), "--data", str(text), *DATA, "--layers", "mlp.1", "--base", "b"]
    assert main(common + ["--json-out", str(tmp_path / "single.json")]) == 0
    capsys.readouterr()
    proc = _launch([str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                    "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())],
                   common + ["--parallel", "data", "--json-out", str(tmp_path / "par.json")], tmp_path)
    assert proc.stdout.count("barrier_mid =") == 1
    single = json.loads((tmp_path / "single.json").read_text())
    par = json.loads((tmp_path / "par.json").read_text())
    assert par["parallel"] == {"mode": "data", "processes": 2}
    assert_same_result(par, single)
    assert par["tokens"] == single["tokens"] == 5 * 47
    assert single["barrier_max"] > 0.01  # a trained pair: a visible barrier to agree on



def test_accelerate_launch_barrier_data_on_chat_data_matches_single_process(gpt2_pair, tmp_path, capsys):
    """Chat data (one conversation per row, different scored tokens per row) split across processes."""
    from transformers import AutoTokenizer

    from hf_llmc.testing import CHAT_TEMPLATE, synthetic_conversations

    dirs = {}
    for side, src in (("a", gpt2_pair.a), ("b", gpt2_pair.b)):
        dirs[side] = tmp_path / side
        shutil.copytree(src, dirs[side])
        tok = AutoTokenizer.from_pretrained(src)
        tok.chat_template = CHAT_TEMPLATE
        tok.save_pretrained(dirs[side])
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in synthetic_conversations(9, 3)))
    common = ["barrier", str(dirs["a"]), str(dirs["b"]), "--data", str(data), "--chat", "--seq-len", "96",
              "--layers", "block.1-2", "--batch-size", "2"]
    assert main(common + ["--json-out", str(tmp_path / "single.json")]) == 0
    capsys.readouterr()
    proc = _launch([str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                    "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())],
                   common + ["--parallel", "data", "--json-out", str(tmp_path / "par.json")], tmp_path)
    assert proc.stdout.count("chat data: 9 conversations") == 1
    single = json.loads((tmp_path / "single.json").read_text())
    par = json.loads((tmp_path / "par.json").read_text())
    assert par["parallel"] == {"mode": "data", "processes": 2}
    assert_same_result(par, single)
    assert par["tokens"] == single["tokens"] == single["data"]["chat"]["scored_tokens"]
