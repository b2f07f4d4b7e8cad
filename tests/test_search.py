"""Merge search (``hf-llmc search``): the Pareto logic and pick rules on constructed points, the
settings' checks, a search on a tiny trained pair (resume gives the same result as an
uninterrupted run), the card, and the written merge against the α map applied in plain torch."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from helpers import plain_loss
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hf_llmc import DataConfig, ModelPair
from hf_llmc.analyses.search import dominates, judge, pareto_front, pick_point, worst_increase
from hf_llmc.cli import main
from hf_llmc.config.errors import ScanSettingsError, SearchError
from hf_llmc.config.search import SearchConfig, parse_named_sets
from hf_llmc.outputs.search import search_and_merge, search_command
from hf_llmc.testing import synthetic_text

pytestmark = pytest.mark.usefixtures("one_thread")

SEQ = 32
BLOCKS = 48  # per set: 36 searched, 12 held out
#: Small, quick settings that still take several looks (fast rule, first look after 8 blocks).
QUICK = {"directions": "0.5,1", "max_sweeps": 1, "rule": "fast", "min_blocks": 8, "resolution": 0.002}


# -- Pareto logic on constructed points ------------------------------------------------------------------
def test_dominance_and_front_on_constructed_points():
    assert dominates((1.0, 1.0), (1.0, 2.0)) and dominates((0.5, 0.5), (1.0, 1.0))
    assert not dominates((1.0, 1.0), (1.0, 1.0))  # equal points do not dominate each other
    assert not dominates((0.5, 2.0), (1.0, 1.0)) and not dominates((1.0, 1.0), (0.5, 2.0))
    points = {"A": (1.0, 3.0), "B": (3.0, 1.0), "U": (2.5, 2.5), "p": (1.5, 2.0), "q": (2.0, 1.5),
              "dominated": (2.1, 2.1), "twin": (1.5, 2.0), "worse": (3.5, 3.5)}
    assert pareto_front(points) == ["A", "p", "twin", "q", "B"]  # sorted by the first loss; equal points kept
    # the uniform average U is off the front and dominated by a front point
    assert any(dominates(points[k], points["U"]) for k in pareto_front(points))


def test_pick_rules_on_constructed_points():
    front = {"A": (1.0, 3.0), "p": (1.1, 1.6), "q": (1.4, 1.2), "B": (3.0, 1.0)}
    best = (1.0, 1.0)
    assert worst_increase(front["p"], best) == pytest.approx(0.6)
    # balanced: smallest larger increase: p 0.6, q 0.4 -> q
    assert pick_point(front, best, ("balanced", None), ["x", "y"]) == "q"
    # set x within 0.15 nats of its better endpoint (A, p), the smallest loss on y: p
    assert pick_point(front, best, ("set", "x"), ["x", "y"], tolerance=0.15) == "p"
    assert pick_point(front, best, ("set", "x"), ["x", "y"], tolerance=0.05) == "A"
    assert pick_point(front, best, ("set", "y"), ["x", "y"], tolerance=0.25) == "q"
    # weights: 0.9 * x + 0.1 * y: A 1.2, p 1.15, q 1.38, B 2.8 -> p; 0.1/0.9: q 1.22, B 1.2 -> B
    assert pick_point(front, best, ("weights", (0.9, 0.1)), ["x", "y"]) == "p"
    assert pick_point(front, best, ("weights", (0.1, 0.9)), ["x", "y"]) == "B"
    with pytest.raises(SearchError, match="front is empty"):
        pick_point({}, best, ("balanced", None), ["x", "y"])


def test_moves_are_judged_from_both_comparisons():
    def cmp(verdict: str, low: float, high: float) -> dict:
        return {"verdict": verdict, "interval": [low, high]}

    assert judge([cmp("worse", 0.01, 0.03), cmp("tie", -0.001, 0.002)], [0.5, 0.5]) == ("dominated", False)
    assert judge([cmp("better", -0.03, -0.01), cmp("tie", -0.001, 0.002)], [0.5, 0.5]) == ("dominates", True)
    assert judge([cmp("tie", -0.002, 0.001), cmp("tie", -0.001, 0.002)], [0.5, 0.5]) == ("tie", False)
    # a trade-off is accepted when the weighted upper ends stay below 0
    trade = [cmp("better", -0.10, -0.08), cmp("worse", 0.01, 0.02)]
    assert judge(trade, [0.5, 0.5]) == ("trade-off", True)  # 0.5 * -0.08 + 0.5 * 0.02 < 0
    assert judge(trade, [0.1, 0.9]) == ("trade-off", False)  # 0.1 * -0.08 + 0.9 * 0.02 > 0


def test_settings_are_checked_without_a_model():
    assert list(parse_named_sets(["code=a.txt", "prose=b.txt"])) == ["code", "prose"]
    # the grammar of every command's --data / --dataset: a Hub dataset set, shared settings
    sets = parse_named_sets(DataConfig(data=["code=a.txt"], dataset=["prose=org/prose:validation"], seq_len=32))
    assert sets["code"].data == "a.txt" and sets["prose"].dataset == "org/prose:validation"
    assert sets["prose"].data is None and sets["code"].seq_len == sets["prose"].seq_len == 32
    assert parse_named_sets({"x": "p.txt", "y": "q.txt"})["y"].data == "q.txt"
    for items, message in ((["code=a.txt"], "exactly 2 named sets .* got 1"), (["a.txt"], "got one unnamed set"),
                           ([], "got 0"), (["code=a.txt", "code=b.txt"], "given twice"),
                           (["code", "prose=b.txt"], "need names"), (["balanced=a", "x=b"], "pick keyword"),
                           (["a=x", "b=y", "c=z"], "got 3")):
        with pytest.raises(SearchError, match=message):
            parse_named_sets(items)
    for kwargs, message in (({"pick": "weights=1"}, "two non-negative"), ({"pick": "z"}, "set name"),
                            ({"alphas": "0,2"}, "alphas"), ({"directions": "0.5,2"}, "not in"),
                            ({"holdout": 1.0}, "holdout"), ({"resolution": 0}, "resolution"),
                            ({"granularity": "module"}, "granularity"), ({"max_sweeps": 0}, "max_sweeps")):
        with pytest.raises(SearchError, match=message):
            SearchConfig(**kwargs).validate(["x", "y"])
    assert SearchConfig(pick="weights=0.3,0.7").pick_rule(["x", "y"]) == ("weights", (0.3, 0.7))


# -- a search on a tiny trained pair ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def setup(gpt2_pair, tmp_path_factory):
    root = tmp_path_factory.mktemp("search-sets")
    (root / "recipes.txt").write_text(synthetic_text("a", 160, 501))
    (root / "reports.txt").write_text(synthetic_text("b", 160, 502))
    sets = {"recipes": str(root / "recipes.txt"), "reports": str(root / "reports.txt")}
    data = DataConfig(data="unused", seq_len=SEQ, max_tokens=SEQ * BLOCKS)
    pair = ModelPair.from_pretrained(gpt2_pair.a, gpt2_pair.b)
    out = root / "search"
    outcome = search_and_merge(pair, sets, SearchConfig(**QUICK), out, data=data)
    return {"pair": pair, "sets": sets, "data": data, "out": out, "outcome": outcome, "root": root, "demo": gpt2_pair}


def test_search_result_is_consistent(setup):
    m = setup["outcome"].manifest
    r = m["result"]
    assert m["status"] == "complete"
    assert r["sets"] == ["recipes", "reports"]
    assert r["front"] and r["chosen"]["key"] in [p["key"] for p in r["front"]]
    # the uniform average lies on the front or is dominated by a front point (on the search blocks)
    assert r["uniform_on_front"] or r["uniform_dominated_by"]
    rows = [json.loads(line) for line in (setup["out"] / "search.jsonl").read_text().splitlines()]
    comparisons = [row for row in rows if row["kind"] == "comparison"]
    assert comparisons and all(row["sets"] for row in comparisons)
    # the sequential rule's looks: decided comparisons stop before the 36 searched blocks
    assert any(v["blocks"] < 36 for row in comparisons for v in row["sets"].values())
    assert sum(row["tokens"] for row in comparisons) == m["tokens"]["search"]
    # held-out numbers: paired differences are the differences of the losses, on the same blocks
    a, b = r["endpoints"]["a"], r["endpoints"]["b"]
    for p in r["front"]:
        for n in r["sets"]:
            h = p["heldout"][n]
            assert h["vs_a"]["mean"] == pytest.approx(h["loss"] - a["heldout"][n]["loss"], abs=1e-9)
            assert h["vs_b"]["mean"] == pytest.approx(h["loss"] - b["heldout"][n]["loss"], abs=1e-9)
            lo, hi = h["vs_a"]["interval"]
            assert lo <= h["vs_a"]["mean"] <= hi
    best = {n: min(a["heldout"][n]["loss"], b["heldout"][n]["loss"]) for n in r["sets"]}
    assert r["chosen"]["worst_increase"] == pytest.approx(max(r["chosen"]["heldout"][n]["loss"] - best[n] for n in r["sets"]))
    for name in ("report.html", "front.png", "alpha_heatmap.png", "search.json"):
        assert (setup["out"] / name).is_file()


def test_heldout_loss_matches_plain_transformers(setup):
    """The chosen point's held-out loss on one set: the written merge, loaded by transformers, on the
    last blocks of the set tokenized independently (a .txt file is one document; GPT-2 adds no BOS)."""
    r = setup["outcome"].manifest["result"]
    ids = setup["pair"].tokenizer(setup["root"].joinpath("recipes.txt").read_text())["input_ids"][: SEQ * BLOCKS]
    blocks = torch.tensor(ids[: len(ids) // SEQ * SEQ]).view(-1, SEQ)
    held = blocks[-r["chosen"]["heldout"]["recipes"]["blocks"]:]
    model = AutoModelForCausalLM.from_pretrained(setup["outcome"].merge.folder, dtype=torch.float32)
    assert plain_loss(model, held) == pytest.approx(r["chosen"]["heldout"]["recipes"]["loss"], rel=2e-5)


def test_written_merge_is_the_alpha_map_in_plain_torch(setup):
    """Every tensor of merged/ equals (1 - α)·A + α·B with α from the chosen map, read with safetensors."""
    chosen = setup["outcome"].manifest["result"]["chosen"]["alphas"]
    sd_a = load_file(setup["demo"].a / "model.safetensors")
    sd_b = load_file(setup["demo"].b / "model.safetensors")
    merged = load_file(setup["outcome"].merge.folder / "model.safetensors")

    def alpha_of(name: str) -> float:  # GPT-2 names: transformer.h.<i>.* is block i; wte, wpe, ln_f are "other"
        parts = name.split(".")
        if parts[:2] == ["transformer", "h"]:
            return chosen[f"block.{parts[2]}"]
        assert parts[1] in ("wte", "wpe", "ln_f"), name
        return chosen["other"]

    assert set(merged) == set(sd_a)
    assert len({alpha_of(k) for k in sd_a}) >= 1
    for name, a in sd_a.items():
        alpha = alpha_of(name)
        expected = (1 - alpha) * a.float() + alpha * sd_b[name].float()
        torch.testing.assert_close(merged[name].float(), expected, rtol=1e-6, atol=1e-7, msg=name)


def test_card_shows_front_choice_and_command(setup):
    m = setup["outcome"].manifest
    folder = setup["outcome"].merge.folder
    card = (folder / "README.md").read_text()
    assert (folder / "front.png").is_file() and "](front.png)" in card
    assert "## Merge search" in card and "**chosen**" in card
    for p in m["result"]["front"]:
        for n in m["result"]["sets"]:
            assert f"{p['heldout'][n]['loss']:.4f} ± {p['heldout'][n]['se']:.4f}" in card
    c = m["result"]["chosen"]
    for n in m["result"]["sets"]:
        for ref in ("vs_a", "vs_b", "vs_uniform"):
            e = c["heldout"][n][ref]
            assert f"{e['mean']:+.4f} [{e['interval'][0]:+.4f}, {e['interval'][1]:+.4f}]" in card
    for label, alpha in c["alphas"].items():  # the α map, in the "What was merged" table
        spec = next(g["spec"] for g in m["groups"] if g["label"] == label)
        for item in spec.split(","):  # one row per resolved group
            assert f"| `{item}` | {alpha:g} |" in card
    command = setup["outcome"].command
    assert command.startswith("hf-llmc search ") and "--data recipes=recipes.txt --data reports=reports.txt" in command
    assert command in card and str(setup["root"]) not in card


def test_resume_gives_the_uninterrupted_result(setup, tmp_path):
    full = setup["outcome"].manifest
    # 1. stopped by a token budget, then resumed without one
    out = tmp_path / "budget"
    first = search_and_merge(setup["pair"], setup["sets"], SearchConfig(**QUICK, budget_tokens=2000), out,
                             data=setup["data"], write_merge=False)
    assert first.manifest["status"] == "budget"
    assert first.manifest["tokens"]["search"] < full["tokens"]["search"]
    again = search_and_merge(setup["pair"], setup["sets"], SearchConfig(**QUICK), out, data=setup["data"], resume=True)
    assert again.manifest["status"] == "complete"
    assert again.manifest["result"] == full["result"]
    # recorded comparisons count their tokens once; after the resume the incumbent's blocks are evaluated again
    assert again.manifest["tokens"]["search"] >= full["tokens"]["search"]
    # 2. killed mid-write: a truncated last line is dropped and the search continues
    out2 = tmp_path / "killed"
    shutil.copytree(setup["out"], out2, ignore=shutil.ignore_patterns("merged"))
    lines = (out2 / "search.jsonl").read_text().splitlines(keepends=True)
    (out2 / "search.jsonl").write_text("".join(lines[: len(lines) // 2]) + lines[len(lines) // 2][:20])
    resumed = search_and_merge(setup["pair"], setup["sets"], SearchConfig(**QUICK), out2, data=setup["data"],
                               resume=True, write_merge=False)
    assert resumed.manifest["result"] == full["result"]
    # 3. other settings are refused
    with pytest.raises(ScanSettingsError, match="different settings"):
        search_and_merge(setup["pair"], setup["sets"], SearchConfig(**{**QUICK, "alphas": "0,0.5,1"}), out2,
                         data=setup["data"], resume=True)


def test_full_budget_search_evaluates_every_search_block(setup, tmp_path):
    out = tmp_path / "full"
    outcome = search_and_merge(setup["pair"], setup["sets"], SearchConfig(**{**QUICK, "directions": "0.5", "full_budget": True}), out,
                               data=setup["data"], write_merge=False)
    rows = [json.loads(line) for line in (out / "search.jsonl").read_text().splitlines()]
    assert all(v["blocks"] == 36 for row in rows if row["kind"] == "comparison" for v in row["sets"].values())
    seq = [json.loads(line) for line in (setup["out"] / "search.jsonl").read_text().splitlines()]
    first = next(r for r in seq if r["kind"] == "comparison")  # the same first move, on more blocks
    assert rows[0]["candidate"] == first["candidate"] and rows[0]["tokens"] >= first["tokens"]
    assert outcome.manifest["interval_method"] == "student-t-fixed" and outcome.manifest["status"] == "complete"


def test_command_line(setup, tmp_path, capsys):
    s = setup["sets"]
    folder = tmp_path / "reports-dataset"  # a dataset folder, as --dataset takes a Hub dataset
    folder.mkdir()
    (folder / "validation.txt").write_text(Path(s["reports"]).read_text())
    argv = ["search", str(setup["demo"].a), str(setup["demo"].b), "--data", f"recipes={s['recipes']}",
            "--dataset", f"reports={folder}", "--seq-len", str(SEQ), "--max-tokens", str(SEQ * BLOCKS),
            "--directions", "0.5", "--max-sweeps", "1", "--sequential-rule", "fast", "--min-blocks", "8",
            "--pick", "weights=0.3,0.7", "--out", str(tmp_path / "cli")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Pareto front" in out and "chosen (weights=0.3,0.7)" in out
    m = json.loads((tmp_path / "cli" / "search.json").read_text())
    assert m["result"]["pick"] == "weights=0.3,0.7"
    assert (tmp_path / "cli" / "merged" / "model.safetensors").is_file()
    card = (tmp_path / "cli" / "merged" / "README.md").read_text()
    assert "--data recipes=recipes.txt --dataset reports=reports-dataset" in card and str(tmp_path) not in card
    assert main(argv) == 2  # the folder is taken: --resume or --overwrite
    err = capsys.readouterr().err
    assert "exists and is not empty" in err and "--overwrite" in err and "--resume" in err
    assert main(argv[:-2] + ["--pick", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "--pick nope" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert math.isfinite(m["result"]["chosen"]["worst_increase"])


def test_sets_named_in_data_settings_give_the_same_search(setup, tmp_path):
    """search_and_merge(pair, DataConfig naming the two sets) is the search of the {name: path} mapping."""
    s, data = setup["sets"], setup["data"]
    named = DataConfig(data=[f"recipes={s['recipes']}", f"reports={s['reports']}"], seq_len=data.seq_len,
                       max_tokens=data.max_tokens)
    outcome = search_and_merge(setup["pair"], named, SearchConfig(**QUICK), tmp_path / "named", write_merge=False)
    assert outcome.manifest["result"] == setup["outcome"].manifest["result"]
    assert outcome.command.startswith("hf-llmc search a b --data recipes=recipes.txt --data reports=reports.txt")


def test_recipe_search_step_is_checked(setup, tmp_path, capsys):
    s = setup["sets"]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"pairs: [{{name: p, a: {{model: {setup['demo'].a}}}, b: {{model: {setup['demo'].b}}}}}]\n"
        f"steps:\n  - search: {{sets: [recipes={s['recipes']}, reports={s['reports']}], pick: recipes, directions: '0.5'}}\n")
    assert main(["run", str(recipe), "--check", "--out", str(tmp_path / "runs")]) == 0
    assert "p/search" in capsys.readouterr().out
    recipe.write_text(recipe.read_text().replace(f", reports={s['reports']}", ""))
    assert main(["run", str(recipe), "--check", "--out", str(tmp_path / "runs")]) == 2
    assert "exactly 2 named sets" in capsys.readouterr().err


def test_prefix_reuse_gives_the_numbers_of_full_forwards(setup, tmp_path):
    """Candidates evaluated from the incumbent's cached hidden states (the default) and through the
    whole model (prefix=False) give the same comparisons."""
    out = tmp_path / "no-prefix"
    search_and_merge(setup["pair"], setup["sets"], SearchConfig(**{**QUICK, "directions": "0.5", "prefix": False}), out,
                     data=setup["data"], write_merge=False)
    plain = [json.loads(line) for line in (out / "search.jsonl").read_text().splitlines()]
    plain = [r for r in plain if r["kind"] == "comparison"]
    reused = [json.loads(line) for line in (setup["out"] / "search.jsonl").read_text().splitlines()]
    reused = [r for r in reused if r["kind"] == "comparison" and r["direction"] == 0.5]
    assert [r["candidate"] for r in plain] == [r["candidate"] for r in reused]
    for p, r in zip(plain, reused):
        assert p["accepted"] == r["accepted"]
        for name, v in p["sets"].items():
            assert v["estimate"] == pytest.approx(r["sets"][name]["estimate"], rel=1e-6, abs=1e-9)


def test_search_command_keeps_every_data_option():
    """The reproduce command carries the data settings that differ from their defaults, chat ones too."""
    data = DataConfig(seq_len=64, chat=True, messages_column="turns", loss_on="all", no_bos=True)
    cmd = search_command("/x/a", "/x/b", {"p": "/d/p.jsonl", "q": "/d/q.jsonl"}, SearchConfig(), data, "/o/run")
    assert cmd == ("hf-llmc search a b --data p=p.jsonl --data q=q.jsonl --seq-len 64 --no-bos --chat "
                   "--messages-column turns --loss-on all --out run")
    cmd = search_command("a", "b", {"p": DataConfig(data="/d/p.jsonl"), "q": DataConfig(dataset="org/q:test")},
                         SearchConfig(), None, "run")
    assert cmd == "hf-llmc search a b --data p=p.jsonl --dataset q=org/q:test --out run"
