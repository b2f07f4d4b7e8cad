"""Recipes: the shipped files validate without downloading anything, bad files give one clear
RecipeError naming the key, and a recipe runs the same merges and barriers as the commands."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import plain_loss, stored_state
from transformers import AutoModelForCausalLM

from hf_llmc import MergeSpec
from hf_llmc.cli import main
from hf_llmc.cli.recipes import load_recipe, parse_recipe, recipe_schema
from hf_llmc.config.errors import RecipeError
from hf_llmc.config.scan import GRANULARITIES

REPO = Path(__file__).resolve().parent.parent
SHIPPED = sorted((REPO / "recipes").glob("*.yaml"))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # validation must never need the network


def test_shipped_recipes_validate(capsys):
    names = {p.name for p in SHIPPED}
    assert {"pythia-410m-deduped-vs-standard.yaml", "gpt2-finetunes-attn-merge.yaml", "llama-lora-adapters.yaml"} <= names
    for path in SHIPPED:
        recipe = load_recipe(path)
        assert recipe.pairs and recipe.steps
        assert main(["run", str(path), "--check"]) == 0
        assert "recipe is valid" in capsys.readouterr().out
    pythia = load_recipe(REPO / "recipes" / "pythia-410m-deduped-vs-standard.yaml")
    assert len(pythia.pairs) >= 3
    assert {p.a.model for p in pythia.pairs} == {"EleutherAI/pythia-410m-deduped"}
    assert {p.b.model for p in pythia.pairs} == {"EleutherAI/pythia-410m"}
    assert all(p.a.revision == p.b.revision and p.a.revision.startswith("step") for p in pythia.pairs)
    assert "wikitext-103" in pythia.data.dataset and pythia.data.dataset.endswith(":validation")
    lora = load_recipe(REPO / "recipes" / "llama-lora-adapters.yaml")
    assert lora.load.base_model


BASE = {
    "pairs": [{"a": {"model": "x/a"}, "b": {"model": "x/b"}}],
    "data": {"dataset": "wikitext"},
    "steps": [{"merge": {"layers": "attn.0", "alpha": 0.5}}],
}


def _with(path: str, value):
    """BASE with the value at a dotted path replaced (``None`` deletes the key)."""
    doc = json.loads(json.dumps(BASE))
    keys = path.split(".")
    target = doc
    for key in keys[:-1]:
        target = target[int(key)] if isinstance(target, list) else target[key]
    last = keys[-1]
    if value is None:
        del target[last]
    elif isinstance(target, list):
        target[int(last)] = value
    else:
        target[last] = value
    return doc


@pytest.mark.parametrize("path, value, message", [
    ("outt", "runs", "r.yaml.outt: unknown key; did you mean 'out'?"),
    ("steps.0.merge", {"layers": "attn.0", "alpah": 0.5}, "steps[0].merge.alpah: unknown key; did you mean 'alpha'?"),
    ("steps.0", {"merj": {}}, "steps[0].merj: unknown step kind; did you mean 'merge'?"),
    ("data", {"dataset": "wikitext", "seq_len": "long"}, "r.yaml.data.seq_len: expected an integer or null, got string 'long'"),
    ("pairs.0.a", {"model": "x/a", "revision": 1000}, "pairs[0].a.revision: expected a string or null, got integer 1000 (quote it)"),
    ("pairs.0.a", {"revision": "main"}, "pairs[0].a: missing required key 'model'"),
    ("pairs.0", {"a": {"model": "x/a"}}, "pairs[0]: missing required key 'b'"),
    ("steps", None, "missing required key 'steps'"),
    ("steps", [], "steps: expected a non-empty list"),
    ("steps.0.merge", {"layers": "attn.0", "base": "c"}, "steps[0].merge.base: 'c' is not one of a, b"),
    ("steps.0.merge", {"layers": "attn.0", "alpha": 1.5}, "outside [0, 1]"),
    ("steps.0.merge", {"layers": "bogus.0"}, "unknown kind 'bogus'"),
    ("steps.0.merge", {"alpha": 0.5}, "alpha needs layers=SPEC"),
    ("steps.0.merge", {"layers": "attn.0", "overwrite": "yes"}, "overwrite: expected true/false, got string 'yes'"),
    ("steps.0.merge", {"auto": True, "layers": "attn.0"}, "auto=True chooses the groups"),
    ("steps.0", {"scan": {"mode": "diagonal"}}, "'diagonal' is not one of single, cumulative, window"),
    ("steps.0", {"scan": {"window": 0, "mode": "window"}}, "window=0: must be at least 1"),
    ("steps.0", {"push": {"folder": "{pair}/merge"}}, "missing required key 'push_to_hub'"),
    ("steps.0", {"barrier": {"out": "{pear}"}}, "bad placeholder"),
    ("load", {"dtype": "float64"}, "load.dtype: expected one of float32, bfloat16, float16 or null, got string 'float64'"),
    ("load", {"revision_a": "main"}, "load.revision_a: unknown key"),
    ("pairs", [{"name": "p", "a": {"model": "a"}, "b": {"model": "b"}}] * 2, "two pairs are named 'p'"),
    ("steps", [{"merge": {"layers": "attn.0", "name": "m"}}, {"barrier": {"name": "m"}}], "two steps are named 'm'"),
])
def test_bad_recipes_are_clear_errors(path, value, message):
    doc = _with(path, value)
    with pytest.raises(RecipeError) as info:
        parse_recipe(doc, "r.yaml")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_several_pairs_need_the_pair_placeholder():
    doc = _with("pairs", [{"a": {"model": "a"}, "b": {"model": "b"}}, {"a": {"model": "c"}, "b": {"model": "d"}}])
    doc["steps"] = [{"merge": {"layers": "attn.0", "out": "merged"}}]
    with pytest.raises(RecipeError, match=r"2 pairs would write to the same folder; include \{pair\}"):
        parse_recipe(doc, "r.yaml")
    doc["steps"] = [{"merge": {"layers": "attn.0", "out": "merged-{pair}"}}]
    recipe = parse_recipe(doc, "r.yaml")
    assert [recipe.output(recipe.steps[0], i, Path("root")) for i in range(2)] == [
        Path("root/merged-pair-1"), Path("root/merged-pair-2")]


def test_data_is_required_for_evaluating_steps():
    doc = _with("data", None)
    doc["steps"] = [{"barrier": {}}]
    with pytest.raises(RecipeError, match=r"steps\[0\]\.barrier: this step evaluates the models; add a top-level 'data'"):
        parse_recipe(doc, "r.yaml")
    doc["steps"] = [{"merge": {"layers": "attn.0"}}]  # a plain merge needs no data
    assert parse_recipe(doc, "r.yaml").steps[0].kind == "merge"


def test_bad_recipe_file_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("pairs: [\n")
    assert main(["run", str(bad), "--check"]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    bad.write_text(json.dumps(_with("outt", "x")))
    assert main(["run", str(bad)]) == 2
    assert "did you mean 'out'" in capsys.readouterr().err


def test_schema_comes_from_the_settings_dataclasses():
    schema = recipe_schema()
    merge = schema["steps"]["kinds"]["merge"]
    alpha_help = next(f for f in MergeSpec.__dataclass_fields__.values() if f.name == "alpha").metadata["help"]
    assert merge["alpha"]["help"] == alpha_help
    assert merge["max_shard_size"]["default"] == "5GB"
    assert {"auto", "scan_dir", "max_barrier", "push_to_hub", "eval", "dtype"} <= set(merge)
    assert schema["steps"]["kinds"]["scan"]["granularity"]["choices"] == list(GRANULARITIES)
    assert schema["pairs"]["keys"]["a"]["keys"]["model"]["required"] is True
    assert "revision_a" not in schema["load"]["keys"]


# -- running -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dirs(merge_pair_dirs):
    return merge_pair_dirs


def test_run_recipe_end_to_end(dirs, monkeypatch, capsys):
    root = dirs["root"]
    monkeypatch.chdir(root)  # local models and data are relative to the working directory
    (root / "exp.yaml").write_text(textwrap.dedent("""\
        out: runs
        pairs:
          - name: tiny
            a: {model: model-a}
            b: {model: model-b}
        data: {data: eval.txt}
        steps:
          - barrier: {name: attn0, layers: attn.0, alphas: "0,0.5,1"}
          - merge: {name: merged, layers: attn.0-1, alpha: 0.3, eval: true, max_shard_size: 60KB}
        """))
    assert main(["run", "exp.yaml"]) == 0, capsys.readouterr().err
    ids = None
    barrier = json.loads((root / "runs" / "tiny" / "attn0" / "barrier.json").read_text())
    model_a = AutoModelForCausalLM.from_pretrained(dirs["a"])
    from transformers import AutoTokenizer

    from hf_llmc import DataConfig, load_blocks

    ids = load_blocks(AutoTokenizer.from_pretrained(dirs["a"]), DataConfig(data="eval.txt"), model_a.config).ids
    assert barrier["loss_a"] == pytest.approx(plain_loss(model_a, ids), rel=1e-5)
    assert barrier["alphas"] == [0.0, 0.5, 1.0]
    out = root / "runs" / "tiny" / "merged"
    merged, sa, sb = stored_state(out), stored_state(dirs["a"]), stored_state(dirs["b"])
    assert len(list(out.glob("model-*.safetensors"))) > 1
    for key, value in merged.items():
        if key.startswith(("transformer.h.0.attn.", "transformer.h.1.attn.")):
            torch.testing.assert_close(value, 0.7 * sa[key] + 0.3 * sb[key])
        else:
            assert torch.equal(value, sa[key])
    assert "## Evaluation" in (out / "README.md").read_text()
    ppl = math.exp(plain_loss(AutoModelForCausalLM.from_pretrained(out), ids))
    assert f"{ppl:.3f}" in (out / "README.md").read_text()
    # a second run refuses to replace outputs unless asked
    assert main(["run", "exp.yaml"]) == 2
    assert "exists" in capsys.readouterr().err


def test_hf_llmc_config_reproduces_the_merge(dirs, monkeypatch):
    root = dirs["root"]
    monkeypatch.chdir(root)
    assert main(["merge", "model-a", "model-b", "--set", "attn.*=0.25", "--set", "mlp.1=0.1:0.9", "--base", "b",
                 "--dtype", "bfloat16", "--out", "first"]) == 0
    config = root / "first" / "hf_llmc_config.yaml"
    recipe = load_recipe(config)
    assert recipe.steps[0].kind == "merge" and recipe.pairs[0].a.model == "model-a"
    assert main(["run", str(config), "--out", "again"]) == 0
    first, again = stored_state(root / "first"), stored_state(root / "again" / "first")
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert (root / "again" / "first" / "config.json").read_text() == (root / "first" / "config.json").read_text()


def test_recipe_with_two_named_evaluation_sets(dirs, monkeypatch, capsys):
    root = dirs["root"]
    monkeypatch.chdir(root)
    (root / "other.txt").write_text(" ".join(reversed((root / "eval.txt").read_text().split())))
    (root / "sets.yaml").write_text(textwrap.dedent("""\
        out: runs-sets
        pairs:
          - name: tiny
            a: {model: model-a}
            b: {model: model-b}
        data: {data: [one=eval.txt, two=other.txt], seq_len: 16}
        steps:
          - barrier: {name: attn0, layers: attn.0, alphas: "0,0.5,1"}
          - scan: {name: scan, alphas: "0.5"}
          - merge: {name: merged, layers: attn.0-1, alpha: 0.3, eval: true}
        """))
    assert main(["run", "sets.yaml"]) == 0, capsys.readouterr().err
    out = root / "runs-sets" / "tiny"
    barrier = json.loads((out / "attn0" / "barrier.json").read_text())
    assert set(barrier["datasets"]) == {"one", "two"} and set(barrier["averages"]) == {"mean", "macro"}
    rows = [json.loads(line) for line in (out / "scan" / "results.jsonl").read_text().splitlines()]
    assert {r["dataset"] for r in rows} == {"one", "two"}
    card = (out / "merged" / "README.md").read_text()
    assert "| `one` (" in card and "| `two` (" in card
    config = (out / "merged" / "hf_llmc_config.yaml").read_text()
    assert "one=eval.txt" in config and "two=other.txt" in config
