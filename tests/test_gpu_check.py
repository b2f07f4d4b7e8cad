"""benchmarks/gpu_check.sh --smoke: the GPU check's own code path on a tiny pair, on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_smoke(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--smoke", "--device", "cpu", "--dp", "on",
                           "--out", str(tmp_path / "out"), "--workdir", str(tmp_path),
                           "--results", str(tmp_path / "results" / "gpu_check.json")],
                          env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    assert len(table) > 15 and "scan speed-up" in proc.stdout and "4-bit load" in proc.stdout and "8-bit load" in proc.stdout
    res = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert res["mode"] == "smoke" and res["device"] == "cpu"
    # The measured paths compute the same numbers as the plain / straightforward baselines.
    assert res["eval"]["loss_rel_diff"] < 2e-5
    assert res["scan"]["max_loss_rel_diff_vs_naive"] < 2e-5
    # the printed table shows the measured numbers, and the ratio is the one of the two timings
    sc = res["scan"]
    assert sc["speedup"] == pytest.approx(sc["plain_seconds"] / sc["seconds"])  # best plain way, same points
    assert sc["paper_speedup_per_point"] == pytest.approx(sc["naive_seconds_per_point"] / sc["seconds_per_point"])
    assert sc["points"] == sc["plain_points"] == 2 + 1 + 2  # the endpoints, the full row, one row per block (2 blocks)
    assert f"x{sc['speedup']:.2f}" in proc.stdout
    for kind in ("load_8bit", "load_4bit"):
        q = res[kind]
        assert "error" not in q, q
        assert q["quantized_weights"] > 0 and q["abs_diff_loss_a"] < 0.1
    dp = res["data_parallel"]  # two CPU processes (gloo) run the GPU check's data-parallel path
    assert "error" not in dp and "skipped" not in dp, dp
    assert dp["processes"] == 2 and dp["loss_rel_diff"] < 1e-4
    # the result file RESULTS.md is rendered from: marked as not a GPU figure, with the printed table
    saved = json.loads((tmp_path / "results" / "gpu_check.json").read_text())
    assert saved["benchmark"] == "gpu_check" and saved["quick"] is True and saved["table"] in proc.stdout
    assert not any(p.name.startswith("hf-llmc-gpu-check-") for p in tmp_path.iterdir())  # cleaned up
