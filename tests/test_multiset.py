"""Several named evaluation sets in one run: endpoints once per set, the same numbers as one run per
set, per-set and average heatmaps, the barrier command and bad set names."""

import json
import math

import pytest
import torch

from hf_llmc import DataConfig, ModelPair, cli
from hf_llmc.analyses.barrier import barrier, barrier_sets
from hf_llmc.analyses.multiset import MultiSetRunner
from hf_llmc.analyses.scan import run_scan
from hf_llmc.config.errors import DataError
from hf_llmc.config.scan import ScanConfig
from hf_llmc.engine.data import sets_for
from hf_llmc.engine.io import read_rows
from hf_llmc.testing import synthetic_text

SEQ = 32


@pytest.fixture(scope="module")
def setup(gpt2_pair, tmp_path_factory):
    root = tmp_path_factory.mktemp("sets")
    (root / "recipes.txt").write_text(synthetic_text("a", 40, 7))
    (root / "reports.txt").write_text(synthetic_text("b", 40, 7) + "naïve café 東京 🙂\n" * 5)
    data = DataConfig(data=[f"recipes={root / 'recipes.txt'}", f"reports={root / 'reports.txt'}"], seq_len=SEQ,
                      max_tokens=SEQ * 6)
    pair = ModelPair.from_pretrained(gpt2_pair.a, gpt2_pair.b, device="cpu")
    return gpt2_pair, pair, data, root


class ForwardCounter:
    """Counts full-length forwards of the live model per evaluation set (by the token ids it sees)."""

    def __init__(self, model, sets):
        self.sets = {b.name: {tuple(row.tolist()) for row in b.ids} for b in sets}
        self.counts = {b.name: 0 for b in sets}
        self.handle = model.register_forward_hook(self.hook, with_kwargs=True)

    def hook(self, _mod, args, kwargs, _out):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None or ids.shape[1] < SEQ:
            return
        for name, rows in self.sets.items():
            if tuple(ids[0].tolist()) in rows:
                self.counts[name] += 1


def _by_key(rows, name):
    return {(r["group"], r["base"], r["alpha"]): r for r in rows if r.get("dataset", name) == name}


def test_two_set_scan_evaluates_endpoints_once_per_set(setup, tmp_path):
    demo, pair, data, _ = setup
    sets = sets_for(pair, data)
    assert [b.name for b in sets] == ["recipes", "reports"]
    cfg = ScanConfig(alphas="0.5", base="both", batch_size=16)  # one batch per evaluation
    counter = ForwardCounter(pair.model, sets)
    try:
        runner = MultiSetRunner(pair, sets, cfg, tmp_path / "multi", progress=False)
        rows = runner.run()
    finally:
        counter.handle.remove()
    n_points = pair.arch.num_blocks + 1  # every block and the full model at α = 0.5 ...
    for name in ("recipes", "reports"):  # ... into A and into B (the full path shared), plus A and B once
        assert counter.counts[name] == 2 + 2 * n_points - 1, counter.counts
        ends = [r for r in rows if r["kind"] == "endpoint" and r["dataset"] == name]
        assert sorted(r["base"] for r in ends) == ["a", "b"]
    assert all("dataset" in r for r in read_rows(tmp_path / "multi" / "results.jsonl"))

    # Each set's rows equal a scan of that set alone.
    for blocks in sets:
        single = run_scan(pair, blocks, cfg, tmp_path / f"single-{blocks.name}", progress=False)
        want, got = _by_key(single, None), _by_key(rows, blocks.name)
        assert want.keys() == got.keys()
        for key in want:
            for field in ("loss", "barrier", "barrier_se", "bits_per_byte", "barrier_bpb", "tokens"):
                assert math.isclose(got[key][field], want[key][field], rel_tol=1e-6, abs_tol=1e-9), (key, field)


def test_two_set_scan_cli_shows_both_heatmaps_and_the_averages(setup, tmp_path, capsys):
    demo, pair, data, root = setup
    out = tmp_path / "scan"
    assert cli.main(["scan", str(demo.a), str(demo.b), "--data", f"recipes={root / 'recipes.txt'}",
                     "--data", f"reports={root / 'reports.txt'}", "--seq-len", str(SEQ), "--max-tokens", str(SEQ * 6),
                     "--alphas", "0.5", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for title in ("evaluation set recipes", "evaluation set reports", "token-weighted mean", "macro average"):
        assert title in printed
    for png in ("heatmap.png", "heatmap-recipes.png", "heatmap-reports.png", "heatmap-macro.png"):
        assert (out / png).is_file(), png
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dataset_names"] == ["recipes", "reports"]
    assert list(summary["datasets"]) == ["recipes", "reports", "mean", "macro"]
    rows = read_rows(out / "results.jsonl")
    rec, rep = _by_key(rows, "recipes"), _by_key(rows, "reports")
    for g in summary["datasets"]["mean"]["groups"]:
        key = (g["group"], "a", 0.5)
        tr, tp = rec[key]["tokens"], rep[key]["tokens"]
        want = (tr * rec[key]["barrier"] + tp * rep[key]["barrier"]) / (tr + tp)
        assert math.isclose(g["bases"]["a"]["barrier_mid"], want, rel_tol=1e-9)
        macro = next(m for m in summary["datasets"]["macro"]["groups"] if m["group"] == g["group"])
        assert math.isclose(macro["bases"]["a"]["barrier_mid"], (rec[key]["barrier"] + rep[key]["barrier"]) / 2, rel_tol=1e-9)
        se = math.hypot(tr * rec[key]["barrier_se"], tp * rep[key]["barrier_se"]) / (tr + tp)
        assert math.isclose(g["bases"]["a"]["barrier_mid_se"], se, rel_tol=1e-9)
    assert summary["groups"] == summary["datasets"]["mean"]["groups"]
    report = (out / "report.md").read_text()
    assert "Groups: evaluation set recipes" in report and "Groups: macro average over the sets" in report


def test_barrier_sets_equal_one_barrier_per_set(setup):
    _, pair, data, _ = setup
    sets = sets_for(pair, data)
    results = barrier_sets(pair, sets, layers="block.1", alphas=[0, 0.5, 1])
    for blocks in sets:
        want = barrier(pair, blocks, layers="block.1", alphas=[0, 0.5, 1]).to_dict()
        got = results[blocks.name].to_dict()
        for key in ("loss", "bits_per_byte", "barrier_mid", "barrier_mid_se", "bpb_barrier_mid", "loss_a", "loss_b"):
            assert torch.allclose(torch.tensor(got[key], dtype=torch.float64), torch.tensor(want[key], dtype=torch.float64),
                                  rtol=1e-6), key


def test_barrier_cli_prints_each_set_and_the_averages(setup, tmp_path, capsys):
    demo, _, _, root = setup
    out = tmp_path / "b.json"
    assert cli.main(["barrier", str(demo.a), str(demo.b), "--data", f"recipes={root / 'recipes.txt'}",
                     "--data", f"reports={root / 'reports.txt'}", "--seq-len", str(SEQ), "--max-tokens", str(SEQ * 4),
                     "--layers", "block.0", "--alphas", "0.5", "--json-out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "recipes: barrier_mid" in printed and "reports: barrier_mid" in printed and "macro average" in printed
    payload = json.loads(out.read_text())
    assert set(payload["datasets"]) == {"recipes", "reports"} and set(payload["averages"]) == {"mean", "macro"}


@pytest.mark.parametrize("data,message", [
    (dict(data=["a.txt", "b.txt"]), "several evaluation sets need names"),
    (dict(data=["x=a.txt", "x=b.txt"]), "given twice"),
    (dict(data=["mean=a.txt", "b=b.txt"]), "names an average"),
])
def test_bad_set_names(data, message):
    with pytest.raises(DataError, match=message):
        DataConfig(**data).validate()


def test_bad_set_names_on_the_command_line(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("hello")
    code = cli.main(["scan", "a", "b", "--data", str(text), "--data", str(text), "--out", str(tmp_path / "o")])
    assert code == 2
    assert "several evaluation sets need names" in capsys.readouterr().err
