"""Model cards of merged checkpoints, rendered with huggingface_hub ``ModelCard``/``ModelCardData``.

The template ships inside the package (``hf_llmc/templates/hf_llmc_merge.md``; the repository's
``model_cards/hf_llmc_merge.md`` is a link to it). The card's ``base_model`` lists Hub repo ids only
(the Hub resolves them): a model given as a Hub id, or the Hub repo a local folder came from
(``hub_id_a`` / ``hub_id_b``). Local folders are named in the card's body, by their basename only.
Cards pass through :func:`hf_llmc.config.security.redact`, so no token and no absolute path of
the user's machine is ever written.
"""

from __future__ import annotations

import math
import os
from importlib import resources
from pathlib import Path

from ..config.security import display_name, is_local_source, redact
from ..config.version import __version__

TEMPLATE = "hf_llmc_merge.md"
TAGS = ["merge", "hf-llmc", "layer-wise-lmc"]
PIPELINE_TAG = "text-generation"


def template_text() -> str:
    """The merge card template (a Jinja2 Markdown file with ``{{ card_data }}`` front matter)."""
    return resources.files("hf_llmc").joinpath("templates", TEMPLATE).read_text(encoding="utf-8")


def license_of(folder: str | os.PathLike | None) -> str | None:
    """The ``license`` of the model card (README.md) in ``folder``, if it has one."""
    if folder is None:
        return None
    readme = Path(folder) / "README.md"
    if not readme.is_file():
        return None
    from huggingface_hub import ModelCard

    try:
        value = ModelCard.load(readme, ignore_metadata_errors=True).data.license
    except Exception:  # noqa: BLE001 - a malformed card of A must not stop the merge
        return None
    return value if isinstance(value, str) and value.strip() else None


def _dataset_fields(evaluation: dict) -> dict:
    """EvalResult dataset fields: a Hub dataset ``NAME[:CONFIG][:SPLIT]``, or a local file's name."""
    if evaluation.get("dataset"):
        parts = str(evaluation["dataset"]).split(":")
        out = {"dataset_type": parts[0], "dataset_name": parts[0]}
        if len(parts) > 1 and parts[1]:
            out["dataset_config"] = parts[1]
        if len(parts) > 2 and parts[2]:
            out["dataset_split"] = parts[2]
        return out
    return {"dataset_type": "text", "dataset_name": str(evaluation.get("data") or "local text")}


def eval_results(evaluation: dict) -> list:
    """``model-index`` entries: the merged model's perplexity, accuracy and its groups' barrier."""
    from huggingface_hub import EvalResult

    if evaluation.get("sets"):  # several evaluation sets: the entries of each
        return [r for part in evaluation["sets"].values() for r in eval_results(part)]
    common = {"task_type": "text-generation", "task_name": "Causal language modeling", **_dataset_fields(evaluation)}
    merged = evaluation["merged"]
    out = [
        EvalResult(**common, metric_type="perplexity", metric_name="Perplexity", metric_value=round(merged["perplexity"], 4)),
        EvalResult(**common, metric_type="accuracy", metric_name="Top-1 next-token accuracy", metric_value=round(merged["accuracy"], 4)),
    ]
    if math.isfinite(evaluation.get("barrier_mid", float("nan"))):
        out.append(EvalResult(**common, metric_type="barrier", metric_name="Layer-wise LMC barrier_mid of the merged groups (nats)",
                              metric_value=round(evaluation["barrier_mid"], 6)))
    return out


def merge_card(
    *,
    source_a: str,
    source_b: str,
    plan,
    spec,
    command: str,
    config_yaml: str,
    revision_a: str | None = None,
    revision_b: str | None = None,
    evaluation: dict | None = None,
    auto=None,
    license_folder: str | os.PathLike | None = None,
    model_name: str | None = None,
    repo_id: str | None = None,
    hub_id_a: str | None = None,
    hub_id_b: str | None = None,
    vocabulary: str | None = None,
    search: dict | None = None,
) -> str:
    """Render the card of a merge (``plan``/``spec`` from :mod:`hf_llmc.outputs.merge`) as README.md text.

    ``base_model`` holds Hub repo ids only: ``hub_id_a`` / ``hub_id_b`` where given, else a model
    given as a Hub id; a local folder without a Hub id is named in the card's body only.
    ``vocabulary``: how the two vocabularies differ, when they do (a line of the card).
    ``search``: the section of a merge chosen by ``hf-llmc search``
    (:func:`hf_llmc.outputs.search.card_section`).
    """
    from huggingface_hub import ModelCard, ModelCardData

    name_a, name_b = display_name(source_a), display_name(source_b)
    bases, notes = [], []
    for which, source, name, hub_id in (("A", source_a, name_a, hub_id_a), ("B", source_b, name_b, hub_id_b)):
        local = is_local_source(source)
        if hub_id:
            bases.append(hub_id)
        elif not local:
            bases.append(str(source))
        if local:
            origin = f", from the Hub repo `{hub_id}`" if hub_id else " (no Hub repo given, so it is not in base_model)"
            notes.append(f"Model {which}, `{name}`, is a local folder{origin}.")
    bases = list(dict.fromkeys(bases))
    model_name = model_name or f"{name_a.rsplit('/', 1)[-1]}-{name_b.rsplit('/', 1)[-1]}-merge"
    data = ModelCardData(
        base_model=bases or None,
        base_model_relation="merge",
        library_name="transformers",
        tags=list(TAGS),
        pipeline_tag=PIPELINE_TAG,
        license=license_of(license_folder),
        model_name=model_name,
        eval_results=eval_results(evaluation) if evaluation else None,
    )
    evaluation = dict(evaluation) if evaluation else None
    if evaluation is not None:
        evaluation["barrier_mid_ratio"] = math.exp(min(evaluation["barrier_mid"], 700))
    revisions = ", ".join(f"{w} at `{r}`" for w, r in (("A", revision_a), ("B", revision_b)) if r)
    method_text = "(1−α)·A + α·B per tensor" if spec.method == "lerp" else "spherical interpolation per tensor"
    card = ModelCard.from_template(
        data,
        template_str=template_text(),
        model_name=model_name,
        model_a=name_a,
        model_b=name_b,
        local_note=" ".join(notes),
        base=spec.base,
        base_name=name_a if spec.base == "a" else name_b,
        method=spec.method,
        method_text=method_text,
        rows=[{"group": r.group, "alpha": r.alpha_text, "numel": r.numel} for r in plan.rows],
        numel_changed=plan.numel_changed,
        numel_total=plan.numel_total,
        fraction_changed=plan.fraction_changed,
        revisions=revisions,
        vocabulary=vocabulary,
        evaluation=evaluation,
        auto=auto.to_dict() if hasattr(auto, "to_dict") else auto,
        search=search,
        command=command,
        config_yaml=config_yaml.strip(),
        repo_hint=repo_id or model_name,
        version=__version__,
    )
    return redact(str(card))
