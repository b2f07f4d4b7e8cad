"""How a merge is reproduced: the ``hf-llmc merge`` command, a one-step recipe
(``hf_llmc_config.yaml``, runnable with ``hf-llmc run``) and the provenance it records. Local
paths appear by their last component only."""

from __future__ import annotations

import shlex
from dataclasses import fields
from pathlib import Path

from ...config.alphas import format_number
from ...config.data import DataConfig
from ...config.fields import option_argv
from ...config.merge import DEFAULT_ALPHA, DEFAULT_MAX_SHARD_SIZE, ExportConfig, MergeSpec, PushConfig
from ...config.security import public_name
from ...config.version import __version__
from ...engine.provenance import environment, model_device_dtype


def _public_entries(value, local: bool = True) -> list[str]:
    """``data`` / ``dataset`` entries safe to publish: ``NAME=PATH`` keeps its name, a local path only
    its last component."""
    from ...config.data import split_set_name

    out = []
    for entry in ([] if value is None else [value] if isinstance(value, str) else list(value)):
        name, rest = split_set_name(str(entry))
        rest = public_name(rest) if local else rest
        out.append(rest if name is None else f"{name}={rest}")
    return out


def merge_command(source_a: str, source_b: str, spec: MergeSpec, export: ExportConfig, *, load=None, data=None,
                  push: PushConfig | None = None, auto=None) -> str:
    """The ``hf-llmc merge`` command that reproduces this merge (local paths by their name only)."""
    argv = ["hf-llmc", "merge", public_name(source_a), public_name(source_b)]
    if auto is not None:  # the automatic choice (an AutoChoice), as the user asked for it
        argv += ["--auto", "--max-barrier", format_number(auto.max_barrier)]
        if auto.alpha != DEFAULT_ALPHA:
            argv += ["--alpha", format_number(auto.alpha)]
        if auto.auto_layers:
            argv += ["--auto-layers", auto.auto_layers]
        if auto.scan_dir:
            argv += ["--scan-dir", Path(auto.scan_dir).name]
        if getattr(auto, "objective", None) and auto.objective != "max":
            argv += ["--auto-objective", auto.objective]
        if getattr(auto, "metric", "loss") != "loss":
            argv += ["--metric", auto.metric]
    else:
        if spec.layers:
            argv += ["--layers", spec.layers]
            if spec.alpha is not None:
                argv += ["--alpha", str(spec.alpha)]
        for item in spec.sets:
            argv += ["--set", item]
    if spec.method != "lerp":
        argv += ["--method", spec.method]
    if spec.base != "a":
        argv += ["--base", spec.base]
    if spec.lerp_ops != "plain":
        argv += ["--lerp-ops", spec.lerp_ops]
    if spec.allow_extrapolation:
        argv.append("--allow-extrapolation")
    if load is not None:
        for name in ("revision_a", "revision_b"):
            if getattr(load, name, None):
                argv += ["--" + name.replace("_", "-"), str(getattr(load, name))]
        if getattr(load, "base_model", None):
            argv += ["--base-model", public_name(load.base_model)]
        if getattr(load, "trust_remote_code", False):
            argv.append("--trust-remote-code")
        if getattr(load, "allow_pickle", False):
            argv.append("--allow-pickle")
        if getattr(load, "added_rows", "own") != "own":
            argv += ["--added-rows", load.added_rows]
    if data is not None:
        for entry in _public_entries(data.data):
            argv += ["--eval-data", entry]
        for entry in _public_entries(data.dataset, local=False):
            argv += ["--eval-dataset", entry]
        argv += option_argv(data, exclude=("data", "dataset"))
    if export.dtype:
        argv += ["--dtype", export.dtype]
    for name in ("hub_id_a", "hub_id_b"):
        if getattr(export, name, None):
            argv += ["--" + name.replace("_", "-"), getattr(export, name)]
    if export.max_shard_size != DEFAULT_MAX_SHARD_SIZE:
        argv += ["--max-shard-size", str(export.max_shard_size)]
    argv += ["--out", Path(export.out or "merged").name]
    if push is not None and push.push_to_hub:
        argv += ["--push-to-hub", push.push_to_hub]
        if push.private:
            argv.append("--private")
        if push.revision:
            argv += ["--revision", push.revision]
    return shlex.join(argv)


def reproduction_recipe(source_a: str, source_b: str, revision_a: str | None, revision_b: str | None, spec: MergeSpec,
                        export: ExportConfig, *, load=None, data=None) -> dict:
    """A recipe (``hf-llmc run``) with one pair and one merge step that rebuilds this folder.

    ``trust_remote_code`` / ``allow_pickle`` are recorded in ``load`` as what the recipe needs; a
    recipe cannot switch them on, so the description names the flags to pass to ``hf-llmc run``."""
    step: dict = {"sets": [f"{layers}={alpha}" for layers, alpha in spec.entries()],
                  "method": spec.method, "base": spec.base}
    if spec.lerp_ops != "plain":
        step["lerp_ops"] = spec.lerp_ops
    if spec.allow_extrapolation:
        step["allow_extrapolation"] = True
    step["out"] = Path(export.out or "merged").name
    step["max_shard_size"] = str(export.max_shard_size)
    if export.dtype:
        step["dtype"] = export.dtype
    flags = "".join(f" --{k.replace('_', '-')}" for k in ("trust_remote_code", "allow_pickle")
                    if load is not None and getattr(load, k, False))
    recipe: dict = {
        "description": f"Reproduces this merge (written by hf-llmc {__version__}). Run from the folder "
                       f"holding the local models named below: hf-llmc run hf_llmc_config.yaml{flags}",
        "out": ".",
        "pairs": [{"name": "merge",
                   "a": {"model": public_name(source_a), "revision": revision_a},
                   "b": {"model": public_name(source_b), "revision": revision_b}}],
    }
    for which in ("a", "b"):
        if getattr(export, f"hub_id_{which}", None):
            recipe["pairs"][0][which]["hub_id"] = getattr(export, f"hub_id_{which}")
    if load is not None:
        loading = {k: getattr(load, k) for k in ("dtype", "trust_remote_code", "allow_pickle", "base_model")
                   if getattr(load, k, None)}
        if getattr(load, "added_rows", "own") != "own":
            loading["added_rows"] = load.added_rows
        if "base_model" in loading:
            loading["base_model"] = public_name(loading["base_model"])
        if loading:
            recipe["load"] = loading
    if data is not None:
        d = {f.name: getattr(data, f.name) for f in fields(DataConfig) if getattr(data, f.name) != f.default}
        if "data" in d:
            entries = _public_entries(d["data"])
            d["data"] = entries if isinstance(d["data"], list) else entries[0]
        recipe["data"] = d
        step["eval"] = True
    recipe["steps"] = [{"merge": step}]
    return recipe


def merge_provenance(pair, base_ckpt, dtype: str | None, evaluation: dict | None) -> dict:
    """What ``hf_llmc_config.yaml`` records besides the recipe (ignored when it is run): library
    versions, platform, the writer's device and output dtype, and the evaluation's device, dtype
    and data fingerprint. No paths."""
    if dtype is None:  # as stored: the base's floating dtype(s)
        stored = {str(base_ckpt.dtype(k)).removeprefix("torch.") for k in base_ckpt.keys()}
        dtype = "+".join(sorted(d for d in stored if d.startswith(("float", "bfloat")))) or None
    out = environment(device="cpu", dtype=dtype)
    if evaluation is not None:
        device, live_dtype = model_device_dtype(pair.model)
        out["evaluation"] = {"device": device, "dtype": live_dtype, "data": evaluation.get("data"),
                             "dataset": evaluation.get("dataset"), "fingerprint": evaluation.get("fingerprint"),
                             "tokens": evaluation.get("tokens")}
    return out
