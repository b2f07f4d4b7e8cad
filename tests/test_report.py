"""Reports: summary.json from the result rows, figures, a self-contained HTML file, re-rendering."""

from __future__ import annotations

import base64
import json
import re

import pytest

from hf_llmc import DataConfig, ModelPair, ScanConfig, cli, run_scan
from hf_llmc.analyses.scan import build_plan
from hf_llmc.engine.io import RESULTS, read_rows
from hf_llmc.outputs.report import heatmap_matrix, render

SEQ = 32


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(one_thread, request, tmp_path_factory):
    demo = request.getfixturevalue("gpt2_pair")
    pair = ModelPair.from_pretrained(demo.a, demo.b, device="cpu")
    blocks = pair.blocks(DataConfig(data=str(demo.eval_text), seq_len=SEQ, max_tokens=SEQ * 4))
    root = tmp_path_factory.mktemp("reports")
    single = root / "single"
    run_scan(pair, blocks, ScanConfig(granularity="sublayer", base="both", alphas="0.25,0.5,0.75"), single, progress=False)
    cumulative = root / "cumulative"
    run_scan(pair, blocks, ScanConfig(mode="cumulative", order="shallow,deep"), cumulative, progress=False)
    return {"single": single, "cumulative": cumulative, "pair": pair}


def _png(path) -> bytes:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    return data


def test_summary_matches_rows(runs):
    out = runs["single"]
    render(out)
    summary = json.loads((out / "summary.json").read_text())
    rows = [r for r in read_rows(out / RESULTS) if r["kind"] != "endpoint"]
    assert summary["groups"][0]["group"] == "full"
    names = [g["group"] for g in summary["groups"]]
    plan = [g.name for g in build_plan(runs["pair"].arch, ScanConfig(granularity="sublayer")).groups]
    assert names == ["full"] + plan  # model order, full model first
    for g in summary["groups"]:
        for base in ("a", "b"):
            mine = [r for r in rows if r["group"] == g["group"] and r["base"] == base]
            mid = next(r for r in mine if r["alpha"] == 0.5)
            top = max((r for r in mine if 0 < r["alpha"] < 1), key=lambda r: r["barrier"])
            s = g["bases"][base]
            assert s["barrier_mid"] == mid["barrier"] and s["barrier_mid_se"] == mid["barrier_se"]
            assert s["barrier_max"] == top["barrier"] and s["barrier_max_se"] == top["barrier_se"]
            assert s["barrier_max_alpha"] == top["alpha"]
            assert s["barrier_max"] >= s["barrier_mid"]
    ends = {r["base"]: r for r in read_rows(out / RESULTS) if r["kind"] == "endpoint"}
    assert summary["endpoints"]["a"]["loss"] == ends["a"]["loss"]


def test_heatmap_layout(runs):
    summary = json.loads(render(runs["single"])["summary"].read_text())
    names, cols, values = heatmap_matrix(summary)
    assert names[0] == "full"
    # base × α, without the columns that are the base model itself
    assert cols == [("a", 0.25), ("a", 0.5), ("a", 0.75), ("b", 0.25), ("b", 0.5), ("b", 0.75)]
    rows = {(r["group"], r["base"], r["alpha"]): r["barrier"] for r in read_rows(runs["single"] / RESULTS)}
    for name, row in zip(names, values):
        for (base, alpha), v in zip(cols, row):
            assert v == rows[(name, base, alpha)]


def test_report_files_html_self_contained_and_rerender(runs):
    out = runs["single"]
    written = render(out)
    for key in ("summary", "heatmap", "markdown", "html"):
        assert written[key].is_file()
    heat = _png(out / "heatmap.png")
    page = (out / "report.html").read_text()
    images = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    assert base64.b64decode(images[0]) == heat
    assert not re.search(r"(src|href)=['\"]?(https?:|//)", page)  # nothing fetched from the network
    assert "<script" not in page
    md = (out / "report.md").read_text()
    assert "![Barrier heatmap](heatmap.png)" in md and "attn.0" in md and "mlp.2" in md
    # `hf-llmc report OUT` re-renders everything from results.jsonl
    before = json.loads((out / "summary.json").read_text())
    for name in ("summary.json", "report.md", "report.html", "heatmap.png"):
        (out / name).unlink()
    assert cli.main(["report", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text()) == before
    _png(out / "heatmap.png")
    assert cli.main(["report", str(out.parent / "missing")]) == 2


def test_cumulative_curves(runs):
    out = runs["cumulative"]
    written = render(out)
    _png(written["cumulative"])
    summary = json.loads((out / "summary.json").read_text())
    n = runs["pair"].arch.num_blocks
    rows = {r["group"]: r for r in read_rows(out / RESULTS) if r["kind"] != "endpoint"}
    for order, first in (("shallow", lambda k: 0), ("deep", lambda k: n - k)):
        points = summary["cumulative"][order]
        assert [p["k"] for p in points] == list(range(1, n + 1))
        for p in points:
            row = rows[p["group"]]
            assert row["blocks"] == list(range(first(p["k"]), first(p["k"]) + p["k"]))
            assert p["a"] == row["barrier"]


def test_cells_whose_interval_contains_zero_are_framed():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hf_llmc.outputs.report import interval_contains_zero, mark_zero_inside

    assert interval_contains_zero({"barrier": 0.01, "barrier_se": 0.01})
    assert not interval_contains_zero({"barrier": 0.05, "barrier_se": 0.01})
    assert interval_contains_zero({"barrier": 0.2, "barrier_se": 0.001, "interval": [-0.01, 0.4]})  # sequential: its own
    assert not interval_contains_zero({"barrier": None, "barrier_se": None})
    summary = {"groups": [{"group": g, "bases": {"a": {"curve": [{"alpha": 0.5, "barrier": b, "barrier_se": 0.01}]}}}
                          for g, b in (("attn.0", 0.3), ("mlp.0", 0.005), ("norm.0", -0.015))]}
    fig, ax = plt.subplots()
    assert mark_zero_inside(ax, summary, [("a", 0.5)]) == 2
    framed = [p for p in ax.patches if p.get_linestyle() == ":"]
    assert sorted(round(p.get_y() + p.get_height() / 2) for p in framed) == [1, 2]  # the rows of mlp.0, norm.0
    plt.close(fig)
