"""Hub revisions (--revision-a/--revision-b) through huggingface_hub's cache (offline), and a
recipe sweeping revision pairs whose scans become one step × layer heatmap."""

from __future__ import annotations

import hashlib
import json
import shutil

import huggingface_hub.constants as hub_constants
import pytest
from helpers import assert_same_result, build_full_pair, eval_ids, write_eval_text

from hf_llmc.cli import main
from hf_llmc.outputs.sweep import collect_sweep, scan_summary

REPO = "org/tiny-run"


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """A Hub cache holding REPO at revisions step1, step2 (two checkpoints of one run) and
    step3, laid out exactly as huggingface_hub writes it (refs/<rev> -> snapshots/<commit>)."""
    root = tmp_path_factory.mktemp("revisions")
    a, b = build_full_pair(root / "p1", "gpt2", num_layers=2, hidden_size=32)
    _, c = build_full_pair(root / "p2", "gpt2", num_layers=2, hidden_size=32, noise=0.6)
    cache = root / "cache"
    repo = cache / ("models--" + REPO.replace("/", "--"))
    for rev, src in (("step1", a), ("step2", b), ("step3", c)):
        commit = hashlib.sha1(rev.encode()).hexdigest()
        shutil.copytree(src, repo / "snapshots" / commit)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / rev).write_text(commit)
    text = write_eval_text(root / "eval.txt", eval_ids(n_blocks=4, seq_len=16))
    return root, cache, a, b, text


@pytest.fixture
def offline(hub_cache, monkeypatch):
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(hub_cache[1]))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return hub_cache


def test_revisions_select_the_checkpoints(offline, tmp_path, capsys):
    root, _, a, b, text = offline
    data = ["--data", str(text), "--seq-len", "16", "--layers", "attn.0", "--alphas", "0,0.5,1"]
    assert main(["barrier", REPO, REPO, "--revision-a", "step1", "--revision-b", "step2", *data,
                 "--json-out", str(tmp_path / "hub.json")]) == 0
    assert main(["barrier", str(a), str(b), *data, "--json-out", str(tmp_path / "local.json")]) == 0
    hub = json.loads((tmp_path / "hub.json").read_text())
    assert (hub["model_a"], hub["revision_a"], hub["revision_b"]) == (REPO, "step1", "step2")
    assert_same_result(hub, json.loads((tmp_path / "local.json").read_text()))
    capsys.readouterr()
    assert main(["barrier", REPO, REPO, "--revision-a", "step9", *data]) == 1
    assert "not cached" in capsys.readouterr().err


def test_recipe_sweeps_revision_pairs_into_a_heatmap(offline, tmp_path, capsys):
    root, _, _, _, text = offline
    recipe = tmp_path / "sweep.yaml"
    recipe.write_text(f"""
description: one run at two steps against its last step
pairs:
  - name: s2
    a: {{model: {REPO}, revision: step2}}
    b: {{model: {REPO}, revision: step3}}
  - name: s1
    a: {{model: {REPO}, revision: step1}}
    b: {{model: {REPO}, revision: step3}}
data: {{data: {text}, seq_len: 16}}
steps:
  - scan: {{name: layers, granularity: sublayer, alphas: "0.5"}}
""")
    assert main(["run", str(recipe), "--out", str(tmp_path / "runs")]) == 0  # a recipe's own out stays below the working folder
    assert main(["sweep-report", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert "sweep_heatmap.png" in out
    sweep = json.loads((tmp_path / "runs" / "sweep.json").read_text())
    assert sweep["rows"] == ["step1", "step2"] and sweep["varies"] == "a"  # natural order of the revision of A
    assert (tmp_path / "runs" / "sweep_heatmap.png").stat().st_size > 1000
    assert {"attn.0", "mlp.1", "full"} <= set(sweep["columns"])
    for label, values in zip(sweep["rows"], sweep["barrier_mid"]):
        pair = {"step1": "s1", "step2": "s2"}[label]
        summary = scan_summary(tmp_path / "runs" / pair / "layers")
        assert summary["models"]["a"]["revision"] == label
        want = {g["group"]: g["bases"]["a"]["barrier_mid"] for g in summary["groups"]}
        assert values == [want[c] for c in sweep["columns"]]
    assert collect_sweep([tmp_path / "runs"], base="a")["rows"] == sweep["rows"]
