"""A merged model folder, written atomically: streamed weights, the base's config and tokenizer
files, ``hf_llmc_config.yaml`` (a recipe that rebuilds it) and a model card; optionally evaluated
and pushed to the Hub."""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...analyses.autoselect import AutoChoice, auto_select
from ...config.data import DataConfig
from ...config.errors import MergeSpecError
from ...config.files import write_text_atomic
from ...config.merge import (
    DEFAULT_MAX_BARRIER,
    DEFAULT_MAX_SHARD_SIZE,
    AutoConfig,
    ExportConfig,
    MergeSpec,
    PushConfig,
    as_spec,
)
from ...config.scan import Method, Which
from ...config.security import redact
from ...engine.data import DataSource
from ...engine.io import atomic_output_dir, check_output_dir, output_path
from ...model.checkpoint.folders import COPY_PATTERNS, TOKENIZER_PATTERNS
from ..card import merge_card
from ..hub import push_folder
from .evaluate import evaluate_merge
from .plan import MergePlan, plan_merge
from .reproduce import merge_command, merge_provenance, reproduction_recipe
from .writer import INDEX_FILE, OUT_DTYPES, Progress, plan_tensors, shard_size_bytes, write_tensors

if TYPE_CHECKING:
    from ...model.pair import ModelPair

CONFIG_FILE = "hf_llmc_config.yaml"
CARD_FILE = "README.md"


def _base_files(folder: Path) -> list[Path]:
    return [item for item in sorted(Path(folder).iterdir())
            if item.is_file() and any(fnmatch.fnmatch(item.name, p) for p in COPY_PATTERNS)]


def estimate_size(pair: ModelPair, plan: MergePlan, dtype: str | None = None) -> int:
    """The bytes a merged folder will take: its tensors, headers, the base's copied files and the card.

    Args:
        pair: the pair.
        plan: the merge plan.
        dtype: the output dtype (default: as stored).

    Returns:
        The estimated size in bytes (checked against the free disk space before any work).
    """
    jobs = plan_tensors(pair, plan, OUT_DTYPES[dtype] if dtype else None)
    base = pair.ckpt_a if plan.base == "a" else pair.ckpt_b
    copied = sum(item.stat().st_size for item in _base_files(base.folder))
    return sum(job.nbytes + 200 for job in jobs) + copied + (1 << 20)


def copy_base_files(folder: Path, dest: Path, dtype: str | None = None) -> list[str]:
    """Copy the base's config, generation config and tokenizer files next to the merged weights.

    Args:
        folder: the base checkpoint's folder.
        dest: the folder being written.
        dtype: the output dtype, recorded in ``config.json`` (``dtype`` / ``torch_dtype``) when given.

    Returns:
        The names of the files copied, sorted.
    """
    copied = []
    for item in _base_files(folder):
        shutil.copyfile(item, dest / item.name)
        copied.append(item.name)
    if dtype is not None and (dest / "config.json").is_file():
        config = json.loads((dest / "config.json").read_text())
        keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]
        for k in keys:
            config[k] = dtype
        (dest / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return copied


def write_union_vocabulary(pair: ModelPair, dest: Path) -> list[str]:
    """Write the union vocabulary of a pair whose vocabularies differ (:mod:`hf_llmc.model.vocab`).

    The superset tokenizer (or the built union) replaces the base's tokenizer files, and
    ``vocab_size`` in ``config.json`` becomes the union matrices' rows.

    Args:
        pair: the pair (``pair.vocab`` set).
        dest: the folder being written (the base's files already copied).

    Returns:
        The names of the tokenizer files written, sorted.
    """
    vocab = pair.vocab
    for item in sorted(Path(dest).iterdir()):
        if item.is_file() and any(fnmatch.fnmatch(item.name, p) for p in TOKENIZER_PATTERNS + ("chat_template.*",)):
            item.unlink()
    side = {"a": pair.ckpt_a, "b": pair.ckpt_b}.get(vocab.source)
    if side is not None:  # one side's tokenizer is the superset: its files, unchanged
        names = []
        for item in sorted(Path(side.folder).iterdir()):
            if item.is_file() and any(fnmatch.fnmatch(item.name, p) for p in TOKENIZER_PATTERNS + ("chat_template.*",)):
                shutil.copyfile(item, dest / item.name)
                names.append(item.name)
    else:
        names = [Path(f).name for f in vocab.tokenizer.save_pretrained(dest)]
    config_file = dest / "config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        target = config["text_config"] if "vocab_size" not in config and isinstance(config.get("text_config"), dict) else config
        target["vocab_size"] = vocab.rows
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return sorted(set(names))


@dataclass
class MergeResult:
    """What :func:`save_merged` wrote.

    Attributes:
        folder: the output folder.
        files: the files written, in writing order.
        plan: α per tensor and the rows shown in the card.
        spec: the merge spec.
        evaluation: perplexities and barrier added to the card (None without data).
        command: the ``hf-llmc merge`` command that reproduces the folder.
        url: the Hub commit URL when pushed.
        seconds: wall time of the merge.
    """

    folder: Path
    files: list[str]
    plan: MergePlan
    spec: MergeSpec
    evaluation: dict | None = None
    command: str = ""
    url: str | None = None
    seconds: float = 0.0

    @property
    def sharded(self) -> bool:
        """Whether the weights were written as several shards with an index file."""
        return INDEX_FILE in self.files


def save_merged(
    pair: ModelPair,
    spec: MergeSpec | str | dict,
    out_dir: str | os.PathLike,
    *,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    dtype: str | None = None,
    overwrite: bool = False,
    data: DataSource | None = None,
    batch_size: int | None = None,
    evaluation: dict | None = None,
    auto: AutoChoice | None = None,
    push: PushConfig | None = None,
    card: bool = True,
    progress: Progress = False,
    hub_id_a: str | None = None,
    hub_id_b: str | None = None,
    search: dict | None = None,
    extra_files: dict[str, bytes] | None = None,
) -> MergeResult:
    """Write a merged model folder (weights, config, tokenizer, recipe, model card) atomically.

    Each tensor is read from the pair's lazy checkpoints (the live model, if any, is not used for
    writing), so models larger than memory can be merged.

    Args:
        pair: the pair (loaded, or from :func:`hf_llmc.lazy_pair`).
        spec: a :class:`~hf_llmc.config.merge.MergeSpec`, its text form ``"attn.0-3=0.5; mlp.*=0.25"``
            or a dict of its fields.
        out_dir: the output folder (built beside it and renamed into place when complete).
        max_shard_size: largest safetensors shard, e.g. ``"5GB"``, ``"500MB"`` or a byte count.
        dtype: output dtype of floating tensors (``float32``, ``bfloat16``, ``float16``; default: as stored).
        overwrite: replace an existing non-empty folder (kept intact until the new one is complete).
        data: evaluation data (a :class:`~hf_llmc.config.data.DataConfig`, path or token blocks); adds
            A's, B's and the merged model's perplexity and the merged groups' barrier to the card
            (needs a live model).
        batch_size: blocks per forward for ``data`` (default: automatic).
        evaluation: such numbers precomputed (then ``data`` is not evaluated again).
        auto: an automatic choice to record in the card and recipe.
        push: upload the finished folder with :func:`hf_llmc.outputs.hub.push_folder`.
        card: write ``README.md`` (the model card).
        progress: True shows a bar on a terminal; a callable is called as ``progress(done, total)``
            after each tensor.
        hub_id_a: the Hub repo id model A came from (a local folder), for the card's ``base_model``.
        hub_id_b: the same for model B.
        search: the card section of a merge chosen by ``hf-llmc search`` (see
            :func:`hf_llmc.outputs.search.card_section`).
        extra_files: more files for the folder, ``{name: bytes}`` (e.g. the search's ``front.png``).

    Returns:
        A :class:`MergeResult` (folder, files, plan, evaluation, reproduction command, URL).

    Raises:
        MergeSpecError: a bad spec, dtype, shard size or Hub repo id.
        SpecError: a layer spec that is malformed or out of range for the model.
        OutputExistsError: ``out_dir`` cannot be used: a source model's folder (or inside or around
            one), the Hub cache, the current or home folder; not empty without ``overwrite``, or not
            written by hf-llmc; not writable, or too little free disk space
            (:func:`hf_llmc.engine.io.check_output_dir`).
        NonFiniteTensorError: a merged tensor holds NaN/inf (nothing is written).
        HubError: the upload failed (the folder is written).
    """
    t0 = time.perf_counter()
    spec = as_spec(spec)
    plan = plan_merge(pair.arch, spec)
    export = ExportConfig(out=str(out_dir), max_shard_size=str(max_shard_size), dtype=dtype, overwrite=overwrite,
                          hub_id_a=hub_id_a, hub_id_b=hub_id_b)
    export.validate()
    shard_size_bytes(max_shard_size)
    sources = pair.source_folders()
    size = estimate_size(pair, plan, dtype)
    check_output_dir(out_dir, overwrite, sources=sources, size=size)  # before any evaluation or write
    if isinstance(data, (str, os.PathLike)):
        data = DataConfig(data=str(data))
    data_cfg = data
    if data is not None and evaluation is None:
        evaluation = evaluate_merge(pair, spec, data, batch_size=batch_size)
    if data_cfg is not None and not hasattr(data_cfg, "max_tokens"):
        data_cfg = None  # token blocks / tensors: nothing reproducible to record
    base_ckpt = pair.ckpt_a if spec.base == "a" else pair.ckpt_b
    command = merge_command(pair.source_a, pair.source_b, spec, export, load=pair.load, data=data_cfg, push=push)
    if auto is not None:
        auto = {**auto.to_dict(), "command": merge_command(pair.source_a, pair.source_b, spec, export, load=pair.load,
                                                           data=data_cfg, push=push, auto=auto)}
    recipe = reproduction_recipe(pair.source_a, pair.source_b, pair.ckpt_a.revision, pair.ckpt_b.revision, spec, export,
                                 load=pair.load, data=data_cfg)
    recipe["provenance"] = merge_provenance(pair, base_ckpt, dtype, evaluation)
    with atomic_output_dir(out_dir, overwrite=overwrite, sources=sources, size=size, kind="merge") as tmp:
        files = write_tensors(pair, plan, tmp, max_shard_size=max_shard_size,
                              dtype=OUT_DTYPES[dtype] if dtype else None, progress=progress)
        files += copy_base_files(base_ckpt.folder, tmp, dtype)
        if getattr(pair, "vocab", None) is not None:
            written = write_union_vocabulary(pair, tmp)
            files = [f for f in files if (tmp / f).exists() and f not in written] + written
        import yaml

        config_text = redact(
            "# hf-llmc merge configuration; reproduce with: hf-llmc run hf_llmc_config.yaml\n"
            + yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True)
        )
        write_text_atomic(tmp / CONFIG_FILE, config_text)
        files.append(CONFIG_FILE)
        for name, content in (extra_files or {}).items():
            if "/" in name or name in files or name.startswith("."):
                raise MergeSpecError(f"extra file {name!r}: a plain file name that is not taken")
            (tmp / name).write_bytes(content)
            files.append(name)
        if card:
            text = merge_card(
                source_a=pair.source_a, source_b=pair.source_b,
                revision_a=pair.ckpt_a.revision, revision_b=pair.ckpt_b.revision,
                plan=plan, spec=spec, command=command, config_yaml=config_text,
                evaluation=evaluation, auto=auto, license_folder=pair.ckpt_a.folder,
                model_name=output_path(out_dir).name, repo_id=push.push_to_hub if push else None,
                hub_id_a=hub_id_a, hub_id_b=hub_id_b, search=search,
                vocabulary=pair.vocab.summary().removeprefix("vocabulary: ") if getattr(pair, "vocab", None) else None,
            )
            write_text_atomic(tmp / CARD_FILE, text)
            files.append(CARD_FILE)
    result = MergeResult(output_path(out_dir), files, plan, spec, evaluation, command, seconds=time.perf_counter() - t0)
    if push is not None and push.push_to_hub:
        result.url = push_folder(result.folder, push.push_to_hub, private=push.private, revision=push.revision,
                                 commit_message=push.commit_message)
    return result


def auto_merge(pair: ModelPair, data: DataSource, out_dir: str | os.PathLike, *,
               max_barrier: float = DEFAULT_MAX_BARRIER, alpha: float = 0.5, base: Which = "a",
               method: Method = "lerp", candidates: str | None = None, scan_dir: str | None = None,
               batch_size: int | None = None, **save_kwargs: Any) -> tuple[AutoChoice, MergeResult]:
    """Choose the groups to merge automatically, then write the merge (what ``hf-llmc merge --auto`` does).

    Runs :func:`~hf_llmc.analyses.autoselect.auto_select`, then :func:`save_merged` with the choice
    recorded in the card and evaluated on the same data.

    Args:
        pair: the loaded pair (the choice measures barriers on its live model).
        data: evaluation data, as for :func:`~hf_llmc.engine.data.blocks_for`.
        out_dir: the output folder.
        max_barrier: largest barrier (nats) the chosen set may have.
        alpha: the merge α.
        base: the model the unchosen tensors come from.
        method: ``"lerp"`` or ``"slerp"`` per tensor.
        candidates: the candidate groups (layer spec); default: ``attn.*,mlp.*`` when measuring,
            every group of the scan with ``scan_dir``.
        scan_dir: a single-group scan folder to rank the candidates; default: measure them now.
        batch_size: blocks per forward (default: automatic).
        **save_kwargs: further arguments of :func:`save_merged` (``overwrite``, ``dtype``, ``push``, ...).

    Returns:
        ``(choice, result)``: the :class:`~hf_llmc.analyses.autoselect.AutoChoice` and the :class:`MergeResult`.

    Raises:
        AutoSelectError: a non-finite ``max_barrier`` or an unusable ``scan_dir``.
        NoMergeableGroupError: no candidate stays under ``max_barrier``.
        OutputExistsError: ``out_dir`` is not empty without ``overwrite``, or not writable.
    """
    check_output_dir(out_dir, save_kwargs.get("overwrite", False), sources=pair.source_folders())  # before the choice's evaluations
    cfg = AutoConfig(auto=True, scan_dir=scan_dir, max_barrier=max_barrier, auto_layers=candidates)
    choice = auto_select(pair, data, cfg, alpha=alpha, base=base, method=method, batch_size=batch_size)
    result = save_merged(pair, choice.spec(), out_dir, data=data, batch_size=batch_size, auto=choice, **save_kwargs)
    return choice, result
