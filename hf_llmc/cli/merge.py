"""``hf-llmc merge A B --layers SPEC --out DIR``: write a merged model (streamed, with its card)."""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

from ..config.errors import UsageError
from ..config.merge import AutoConfig, ExportConfig, MergeSpec, PushConfig, check_merge_options
from ..engine.io import check_output_dir
from .common import cli_sources, data_config
from .parser import from_args


def run(args: argparse.Namespace) -> int:
    # Every option is checked before torch is imported or a model is loaded.
    spec = from_args(MergeSpec, args, sets=args.sets or [])
    auto = from_args(AutoConfig, args)
    export = from_args(ExportConfig, args)
    push = from_args(PushConfig, args)
    if not export.out:
        raise UsageError("--out DIR is required")
    data = data_config(args) if (args.data or args.dataset) else None
    alpha = check_merge_options(spec, auto, export, evaluates=data is not None)
    if auto.auto and data is not None and data.multiple and auto.auto_objective not in ("max", "mean"):
        names = [n for n, _ in data.named()]
        if auto.auto_objective not in names:
            raise UsageError(f"auto_objective={auto.auto_objective!r}: not an evaluation set ({', '.join(names)}); "
                             "use max, mean or a set's name")
    if push.push_to_hub is None and (push.private or push.revision or push.commit_message):
        raise UsageError("--private, --revision and --commit-message need --push-to-hub")
    check_output_dir(export.out, export.overwrite, sources=cli_sources(args))

    from rich.table import Table

    from ..analyses.autoselect import auto_select
    from ..model.pair import lazy_pair
    from ..outputs.merge.save import save_merged
    from .common import console, load_pair

    if data is not None:
        pair = load_pair(args)
    else:  # writing needs no model: both checkpoints are read tensor by tensor
        pair = lazy_pair(args.model_a, args.model_b, revision_a=args.revision_a, revision_b=args.revision_b,
                         trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle,
                         base_model=args.base_model, added_rows=args.added_rows)
    choice = None
    if auto.auto:
        choice = auto_select(pair, data, auto, alpha=alpha, base=spec.base, method=spec.method, batch_size=args.batch_size)
        unit = "bits/byte" if auto.metric == "bpb" else "nats"
        objective = f"; cap on {'every set' if choice.objective == 'max' else 'the token-weighted mean' if choice.objective == 'mean' else 'set ' + choice.objective}" if choice.objective else ""
        table = Table(title=f"automatic choice at alpha={alpha:g} (max barrier {auto.max_barrier:g} {unit}{objective}; {choice.source})")
        for col in ("step", "group", "single barrier", "set barrier", "kept"):
            table.add_column(col, justify="left" if col in ("group", "kept") else "right")
        for i, step in enumerate(choice.steps, 1):
            table.add_row(str(i), step["group"], f"{step['single_barrier']:+.4f}", f"{step['set_barrier']:+.4f}",
                          "yes" if step["accepted"] else "no (stop)")
        console.print(table)
        console.print(f"chosen: {', '.join(choice.chosen)}; merged perplexity {choice.perplexity_merged:.3f} "
                      f"(A {math.exp(choice.loss_a):.3f}, B {math.exp(choice.loss_b):.3f})")
        spec = dataclasses.replace(choice.spec(), allow_extrapolation=spec.allow_extrapolation)
    result = save_merged(
        pair, spec, export.out, max_shard_size=export.max_shard_size, dtype=export.dtype, overwrite=export.overwrite,
        data=data, batch_size=args.batch_size, auto=choice, push=push, progress=True,
        hub_id_a=export.hub_id_a, hub_id_b=export.hub_id_b,
    )
    table = Table(title=f"merged into {Path(result.folder).name} (method {result.spec.method}, base {result.spec.base.upper()})")
    for col in ("group", "alpha", "parameters"):
        table.add_column(col, justify="left" if col == "group" else "right")
    for row in result.plan.rows:
        table.add_row(row.group, row.alpha_text, f"{row.numel:,}")
    console.print(table)
    shards = sum(f.endswith(".safetensors") for f in result.files)
    console.print(
        f"changed {result.plan.numel_changed:,} of {result.plan.numel_total:,} parameters "
        f"({100 * result.plan.fraction_changed:.2f} %); {shards} safetensors file(s) in {result.seconds:.1f} s"
    )
    ev = result.evaluation
    if ev:
        console.print(
            f"perplexity: A {ev['a']['perplexity']:.3f}, B {ev['b']['perplexity']:.3f}, merged {ev['merged']['perplexity']:.3f}; "
            f"barrier of the merged groups: mid {ev['barrier_mid']:+.4f}, max {ev['barrier_max']:+.4f} nats"
            + (" (token-weighted mean over the evaluation sets)" if ev.get("sets") else "")
        )
        for name, part in (ev.get("sets") or {}).items():
            console.print(f"  {name}: perplexity A {part['a']['perplexity']:.3f}, B {part['b']['perplexity']:.3f}, "
                          f"merged {part['merged']['perplexity']:.3f}; barrier mid {part['barrier_mid']:+.4f}, "
                          f"max {part['barrier_max']:+.4f} nats")
    if result.url:
        print(f"pushed to {push.push_to_hub}: {result.url}")
    return 0
