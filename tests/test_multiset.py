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


def test_sequential_scan_decides_each_set_on_its_own(setup, tmp_path):
    from hf_llmc import SequentialConfig

    _, pair, data, _ = setup
    sets = sets_for(pair, data)
    seq = SequentialConfig(decide=0.05, rule="fast", min_blocks=2, chunk_blocks=2)
    cfg = ScanConfig(alphas="0.5", sequential=seq, batch_size=2)
    rows = MultiSetRunner(pair, sets, cfg, tmp_path / "multi", progress=False).run()
    for blocks in sets:  # each (point, set) pair: the same stopping, interval and decision as the set alone
        single = run_scan(pair, blocks, cfg, tmp_path / f"single-{blocks.name}", progress=False)
        want, got = _by_key(single, None), _by_key(rows, blocks.name)
        assert want.keys() == got.keys()
        for key in want:
            for field in ("barrier", "barrier_se", "decision", "stop_reason", "tokens", "interval"):
                w, g = want[key].get(field), got[key].get(field)
                assert g == pytest.approx(w, rel=1e-6, abs=1e-9) if isinstance(w, (int, float, list)) else g == w, (key, field)
    manifest = json.loads((tmp_path / "multi" / "scan.json").read_text())
    assert manifest["datasets"] == ["recipes", "reports"] and manifest["status"] == "complete"


def test_resume_skips_finished_points_and_endpoints(setup, tmp_path):
    _, pair, data, _ = setup
    sets = sets_for(pair, data)
    cfg = ScanConfig(alphas="0.5", batch_size=16)
    out = tmp_path / "multi"
    full = MultiSetRunner(pair, sets, cfg, out, progress=False).run()
    lines = (out / "results.jsonl").read_text().splitlines(keepends=True)
    (out / "results.jsonl").write_text("".join(lines[:7]))  # both endpoints of both sets and 3 points
    counter = ForwardCounter(pair.model, sets)
    try:
        resumed = MultiSetRunner(pair, sets, cfg, out, progress=False).run(resume=True)
    finally:
        counter.handle.remove()
    n_points = pair.arch.num_blocks + 1
    assert sum(counter.counts.values()) == 2 * n_points - 3  # no endpoint, no finished point again
    assert resumed[:7] == full[:7]
    want = {(r["dataset"], *_key(r)): r for r in full}
    for r in resumed:
        assert r["barrier"] == pytest.approx(want[(r["dataset"], *_key(r))]["barrier"], rel=1e-9, abs=1e-12)
    assert len(resumed) == len(full)


def _key(r):
    return r["group"], r["base"], r["alpha"]


def test_scan_in_bits_per_byte_and_robustness_on_two_sets(setup, tmp_path, capsys):
    demo, pair, data, root = setup
    out = tmp_path / "bpb"
    assert cli.main(["scan", str(demo.a), str(demo.b), "--data", f"recipes={root / 'recipes.txt'}",
                     "--data", f"reports={root / 'reports.txt'}", "--seq-len", str(SEQ), "--max-tokens", str(SEQ * 4),
                     "--alphas", "0.5", "--metric", "bpb", "--out", str(out)]) == 0
    assert "barriers in bits per byte" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    rows = read_rows(out / "results.jsonl")
    assert summary["metric"] == "bpb"
    for name in ("recipes", "reports"):
        by = _by_key(rows, name)
        for g in summary["datasets"][name]["groups"]:
            assert g["bases"]["a"]["barrier_mid"] == by[(g["group"], "a", 0.5)]["barrier_bpb"]
    rec, rep = _by_key(rows, "recipes"), _by_key(rows, "reports")
    g = summary["groups"][0]
    key = (g["group"], "a", 0.5)
    br, bp = rec[key]["bytes"], rep[key]["bytes"]
    assert g["bases"]["a"]["barrier_mid"] == pytest.approx(
        (br * rec[key]["barrier_bpb"] + bp * rep[key]["barrier_bpb"]) / (br + bp), rel=1e-9)

    rob = tmp_path / "rob"
    assert cli.main(["robustness", str(demo.a), str(demo.b), "--data", f"recipes={root / 'recipes.txt'}",
                     "--data", f"reports={root / 'reports.txt'}", "--seq-len", str(SEQ), "--max-tokens", str(SEQ * 2),
                     "--layers", "block.0", "--samples", "1", "--alphas", "0,0.5", "--out", str(rob)]) == 0
    rows = read_rows(rob / "results.jsonl")
    assert {r["dataset"] for r in rows} == {"recipes", "reports"}
    assert {(r["dataset"], r.get("direction")) for r in rows if r["kind"] != "endpoint"} == {
        (n, d) for n in ("recipes", "reports") for d in ("interp", "random")}
    summary = json.loads((rob / "summary.json").read_text())
    assert set(summary["datasets"]) == {"recipes", "reports", "mean", "macro"}


def test_named_sets_from_files_and_hub_datasets():
    cfg = DataConfig(data=["docs=eval_docs.txt"], dataset=["wiki=Salesforce/wikitext:wikitext-2-raw-v1"], seq_len=64)
    named = cfg.named()
    assert [n for n, _ in named] == ["docs", "wiki"] and cfg.multiple
    assert (named[0][1].data, named[0][1].dataset, named[0][1].seq_len) == ("eval_docs.txt", None, 64)
    assert (named[1][1].data, named[1][1].dataset) == (None, "Salesforce/wikitext:wikitext-2-raw-v1")
    assert not DataConfig(data="eval.txt").multiple and DataConfig(data="docs=eval.txt").multiple
