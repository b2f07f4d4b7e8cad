"""The benchmark harness measures what it says, and benchmarks/RESULTS.md is generated from the
result files (no figure typed by hand). Torch-free and quick."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import harness  # noqa: E402

CHILD = """
import sys, time
from harness import report
data = bytearray(int(sys.argv[1]) * 2**20)   # touched: resident
for i in range(0, len(data), 4096):
    data[i] = 1
t = time.process_time()
while time.process_time() - t < float(sys.argv[2]):
    pass
report(work=float(sys.argv[2]), name=sys.argv[3])
"""


def test_results_md_is_generated_from_the_result_files():
    assert (ROOT / "benchmarks" / "RESULTS.md").read_text() == harness.render(), \
        "benchmarks/RESULTS.md differs from the result files: run python benchmarks/harness.py --render"


def test_every_result_file_names_its_machine_and_command():
    files = sorted(harness.RESULTS_DIR.glob("*.json"))
    assert files
    for path in files:
        data = json.loads(path.read_text())
        assert data["benchmark"] == path.stem
        assert data["machine"]["cpu"] and data["machine"]["python"] and data["command"]
        assert "quick" in data and "started" in data


def test_results_md_keeps_the_static_section_and_the_gpu_section():
    text = harness.render()
    assert "## bitsandbytes 4-bit layouts on CPU" in text
    if not (harness.RESULTS_DIR / "gpu_check.json").exists():
        assert "Not yet measured on a GPU: no GPU was lent to the session" in text


DRIVER = """
import json, sys
import harness
script, out = sys.argv[1], sys.argv[2]
env = {"PYTHONPATH": harness.HERE.as_posix()}
big = harness.Method("big", [sys.executable, script, "150", "0.3", "big"], env=env)
small = harness.Method("small", [sys.executable, script, "10", "0.1", "small"], env=env)
bench = harness.Harness("unit", "Unit", quick=True, verbose=False)
bench.run("only", [big, small], runs=3, warmup=1)
bench.ratio("only", "small", "big", ("cpu_s",))
bench.save(params={"x": 1}, path=harness.Path(out))
"""


def test_harness_runs_each_method_in_a_fresh_process_and_rotates(tmp_path):
    # The orchestrating process must be small (a child's ru_maxrss starts from its parent's
    # high-water mark), as in the benchmarks; pytest's own process is not, so a fresh one drives.
    (tmp_path / "child.py").write_text(CHILD)
    (tmp_path / "driver.py").write_text(DRIVER)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "benchmarks")}
    subprocess.run([sys.executable, str(tmp_path / "driver.py"), str(tmp_path / "child.py"), str(tmp_path / "unit.json")],
                   env=env, check=True, timeout=120)
    saved = json.loads((tmp_path / "unit.json").read_text())
    cond = saved["conditions"]["only"]
    assert cond["order"] == [["big", "small"], ["small", "big"], ["big", "small"]]
    runs = cond["methods"]["big"]["runs"]
    assert len(runs) == 3 and all(r["name"] == "big" and r["work"] == 0.3 for r in runs)  # the child's report
    assert all(r["peak_rss_mb"] >= 150 for r in runs)  # the child's own memory ...
    assert all(r["peak_rss_mb"] < 100 for r in cond["methods"]["small"]["runs"])  # ... not the other child's
    assert all(r["cpu_s"] >= 0.3 and r["wall_s"] >= r["cpu_s"] * 0.5 for r in runs)
    s = cond["methods"]["big"]["summary"]["cpu_s"]
    assert s["min"] <= s["median"] <= s["max"] and s["n"] == 3
    ratio = cond["ratios"]["small / big"]["cpu_s"]
    assert len(ratio["values"]) == 3 and ratio["median"] < 1
    assert saved["quick"] is True and saved["machine"]["cores"] >= 1 and saved["rss_floor_mb"] < 100


def test_a_failing_method_is_reported(tmp_path):
    bad = harness.Method("bad", [sys.executable, "-c", "import sys; sys.exit(3)"])
    with pytest.raises(harness.MethodFailed, match="exited with 3"):
        harness.run_once(bad)


def test_stat_and_verdict_formatting():
    assert harness.stat({"median": 1.234, "min": 1.0, "max": 2.0, "n": 3}) == "1.23 (1.00–2.00)"
    assert harness.stat({"median": 1.0, "min": 1.0, "max": 1.0, "n": 3}, bold=True) == "**1.00**"
    assert harness._verdict(0.4, 0.5, "max").startswith("met")
    assert "off by 20 %" in harness._verdict(0.6, 0.5, "max")
    assert "off by 25 %" in harness._verdict(1.2, 1.5, "min")


def test_mergekit_config_is_the_hf_llmc_merge():
    import merge_speed

    text = merge_speed.mergekit_config(Path("/m/a"), Path("/m/b"), "attn.0-11", 0.5, 24)
    cfg = yaml.safe_load(text)
    assert cfg["merge_method"] == "linear" and cfg["dtype"] == "float32"
    first, rest = cfg["slices"]
    (sa, sb), (only,) = first["sources"], rest["sources"]
    assert sa["layer_range"] == sb["layer_range"] == [0, 12] and only["layer_range"] == [12, 24]
    assert sa["parameters"]["weight"] == [{"filter": ".attn.", "value": 0.5}, {"value": 1.0}]
    assert sb["parameters"]["weight"] == [{"filter": ".attn.", "value": 0.5}, {"value": 0.0}]
    assert only["model"] == "/m/a" and only["parameters"]["weight"] == 1.0
    middle = yaml.safe_load(merge_speed.mergekit_config(Path("a"), Path("b"), "attn.2-3", 0.25, 6))
    assert [s["sources"][0]["layer_range"] for s in middle["slices"]] == [[0, 2], [2, 4], [4, 6]]
    assert middle["slices"][1]["sources"][1]["parameters"]["weight"][0]["value"] == 0.25
