"""Model cards of merges: metadata and numbers round-trip through ``ModelCard.load``; no absolute
path and no token is ever written; the template ships inside the package."""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import pytest
import tomllib
from helpers import plain_loss
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM

from hf_llmc import MergeSpec, ModelPair, lazy_pair, save_merged
from hf_llmc.cli import main
from hf_llmc.outputs.card import TAGS, template_text

REPO = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dirs(merge_pair_dirs):
    return merge_pair_dirs


def test_card_round_trips_with_evaluation(dirs, tmp_path):
    pair = ModelPair.from_pretrained(dirs["a"], dirs["b"])
    out = tmp_path / "gpt2-attn-merge"
    result = save_merged(pair, MergeSpec(layers="attn.0-1", alpha=0.25), out, data=str(dirs["eval"]),
                         hub_id_a="org/model-a", hub_id_b="org/model-b")
    card = ModelCard.load(out / "README.md")
    data = card.data
    assert data.base_model == ["org/model-a", "org/model-b"]  # Hub ids only: the Hub resolves them
    assert data.base_model_relation == "merge"
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "text-generation"
    assert set(TAGS) <= set(data.tags)
    assert data.license == "mit"  # from A's card
    ev = result.evaluation
    # the merged model's perplexity, recomputed independently from the written folder
    ppl = math.exp(plain_loss(AutoModelForCausalLM.from_pretrained(out), pair.blocks(str(dirs["eval"])).ids))
    metrics = {r.metric_type: r.metric_value for r in data.eval_results}
    assert metrics["perplexity"] == pytest.approx(ppl, rel=1e-4)
    assert metrics["accuracy"] == pytest.approx(ev["merged"]["accuracy"], abs=1e-4)
    assert metrics["barrier"] == pytest.approx(ev["barrier_mid"], abs=1e-6)
    assert data.eval_results[0].dataset_name == "eval.txt"
    text = card.text
    for number in (ev["a"]["perplexity"], ev["b"]["perplexity"], ev["merged"]["perplexity"]):
        assert f"{number:.3f}" in text
    assert f"{ev['barrier_mid']:+.4f}" in text
    assert "| `attn.0` | 0.25 |" in text and "| `attn.1` | 0.25 |" in text
    assert f"({100 * result.plan.fraction_changed:.2f} %)" in text
    assert "Model A, `model-a`, is a local folder, from the Hub repo `org/model-a`." in text
    assert ("hf-llmc merge model-a model-b --layers attn.0-1 --alpha 0.25 --eval-data eval.txt "
            "--hub-id-a org/model-a --hub-id-b org/model-b --out gpt2-attn-merge") in text
    assert "hub_id: org/model-a" in (out / "hf_llmc_config.yaml").read_text()
    assert (out / "hf_llmc_config.yaml").read_text().strip() in text  # the exact config


def test_no_absolute_path_and_no_token(dirs, tmp_path, monkeypatch):
    token = "hf_" + "Zq7" * 12
    monkeypatch.setenv("HF_TOKEN", token)
    a = tmp_path / f"a-{token}"
    shutil.copytree(dirs["a"], a)
    out = tmp_path / "merged"
    assert main(["merge", str(a), str(dirs["b"]), "--set", "mlp.*=0.5", "--out", str(out),
                 "--eval-data", str(dirs["eval"])]) == 0
    for name in ("README.md", "hf_llmc_config.yaml"):
        text = (out / name).read_text()
        assert token not in text and "***" in text
        assert str(tmp_path) not in text and str(dirs["root"]) not in text
        assert not re.search(r"(?<![\w.])/(tmp|home|root|work|Users)/", text), name
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model is None  # local folders are no Hub ids: named in the text only
    assert "Model A, `a-***`, is a local folder" in card.text and "Model B, `model-b`, is a local folder" in card.text


def test_card_without_evaluation_or_license(dirs, tmp_path):
    a = tmp_path / "plain-a"
    shutil.copytree(dirs["a"], a)
    (a / "README.md").unlink()
    save_merged(lazy_pair(a, dirs["b"]), MergeSpec(layers="mlp.0", alpha=0.5, base="b", method="slerp"), tmp_path / "m")
    card = ModelCard.load(tmp_path / "m" / "README.md")
    assert card.data.license is None and not card.data.eval_results
    assert "model-index" not in (tmp_path / "m" / "README.md").read_text()
    assert "## Evaluation" not in card.text
    assert "the config and the tokenizer come from\n**model-b**" in card.text
    assert "--base b" in card.text and "--method slerp" in card.text


def test_base_model_lists_hub_ids_only(tmp_path, monkeypatch):
    """A model given as a Hub id is a base model; a local folder only with the Hub repo it came from."""
    from hf_llmc.outputs.card import merge_card
    from hf_llmc.outputs.merge.plan import MergePlan

    monkeypatch.chdir(tmp_path)
    (tmp_path / "hf_tinyllama7b").mkdir()  # a local folder whose name looks like a token
    plan = MergePlan(alphas={}, rows=[], base="a", method="lerp", numel_total=1, numel_changed=0, groups=[])
    spec = MergeSpec(layers="attn.0")
    card = lambda a, b, **kw: ModelCard(merge_card(source_a=a, source_b=b, plan=plan, spec=spec, command="hf-llmc merge",
                                                   config_yaml="x: 1", **kw))
    assert card("EleutherAI/pythia-70m", "hf_tinyllama7b").data.base_model == ["EleutherAI/pythia-70m"]
    both = card("hf_tinyllama7b", "/abs/path/other", hub_id_a="TinyLlama/TinyLlama-1.1B", hub_id_b="org/other")
    assert both.data.base_model == ["TinyLlama/TinyLlama-1.1B", "org/other"]
    assert "`hf_tinyllama7b`, is a local folder, from the Hub repo `TinyLlama/TinyLlama-1.1B`" in both.text
    assert card("./x", "../y").data.base_model is None


def test_template_ships_in_the_package():
    assert template_text() == (REPO / "model_cards" / "hf_llmc_merge.md").read_text(encoding="utf-8")
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "templates/*.md" in package_data["hf_llmc"]
    assert (REPO / "hf_llmc" / "templates" / "hf_llmc_merge.md").is_file()
    assert "{{ card_data }}" in template_text()
