"""``hf-llmc`` command line: parses arguments, calls the Python API, prints tables.

Exit codes: 0 success, 2 usage errors (bad spec, bad option values), 1 other failures. No
traceback is printed unless ``--debug`` is given.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import sys
import typing
import warnings
from pathlib import Path

from rich.console import Console
from rich.table import Table

console = Console(stderr=False, highlight=False)
err_console = Console(stderr=True, highlight=False)


class UsageError(ValueError):
    """Bad command-line usage (exit code 2)."""


# -- dataclass settings -> arguments -----------------------------------------------------------
def _base_type(tp):
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", typing.Union)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if args else str
    return tp


def add_fields(parser: argparse.ArgumentParser, cls, *, exclude: tuple[str, ...] = (), group: str | None = None) -> None:
    """Add one ``--option`` per dataclass field of ``cls``, with the field's help text."""
    target = parser.add_argument_group(group) if group else parser
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in exclude or f.metadata.get("cli") is False:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        tp = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        if tp is bool:
            target.add_argument(flag, action="store_true", default=default, help=help_text)
            continue
        kwargs = dict(default=default, help=help_text, dest=f.name)
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if tp in (int, float):
            kwargs["type"] = tp
            kwargs["metavar"] = "N" if tp is int else "X"
        target.add_argument(flag, **kwargs)


def from_args(cls, args: argparse.Namespace, **overrides):
    """Build ``cls`` from the parsed arguments that match its fields."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    values.update(overrides)
    return cls(**values)


# -- shared options ------------------------------------------------------------------------------
def _add_pair_args(p: argparse.ArgumentParser, *, exclude: tuple[str, ...] = (), only: tuple[str, ...] | None = None) -> None:
    """The two model arguments and the loading options (all, all but ``exclude``, or ``only`` these)."""
    from .pair import LoadConfig

    if only is not None:
        exclude = tuple(f.name for f in dataclasses.fields(LoadConfig) if f.name not in only)
    p.add_argument("model_a", help="Model A: local folder or Hub id.")
    p.add_argument("model_b", help="Model B: local folder or Hub id.")
    add_fields(p, LoadConfig, group="loading", exclude=exclude)


def _add_data_args(p: argparse.ArgumentParser) -> None:
    from .data import DataConfig

    add_fields(p, DataConfig, group="evaluation data")
    p.add_argument("--batch-size", type=int, default=None, metavar="N", help="Blocks per forward (default: automatic, halving on out-of-memory).")


#: Commands that may finish without importing transformers (cached architectures, an
#: upload, reports); :func:`load_pair` silences transformers when they do load a model.
LIGHT_COMMANDS = ("layers", "distance", "merge", "push", "report", "sweep-report")


def quiet_transformers() -> None:
    """No transformers progress bars or warnings on the command line (ours show progress)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_pair(args, **overrides):
    """ModelPair from the common options (used by every pair command); ``overrides`` replace
    loading options (e.g. ``keep_modules``)."""
    from .pair import LoadConfig, ModelPair

    quiet_transformers()
    # Every LoadConfig option the command line carries (placement, adapters, quantization...).
    options = {f.name: getattr(args, f.name) for f in dataclasses.fields(LoadConfig) if hasattr(args, f.name)}
    options.update(overrides)
    return ModelPair.from_pretrained(args.model_a, args.model_b, **options)


def _quant_overrides(args) -> dict:
    """With --load-in-8bit/4bit and --layers: keep the interpolated groups' modules unquantized."""
    if not (getattr(args, "load_in_8bit", False) or getattr(args, "load_in_4bit", False)) or not getattr(args, "layers", None):
        return {}
    from .placement import keep_modules_for

    return {"keep_modules": keep_modules_for(
        args.model_a, args.layers, revision=args.revision_a, base_model=args.base_model,
        trust_remote_code=args.trust_remote_code,
    )}


def data_config(args):
    from .data import DataConfig

    cfg = from_args(DataConfig, args)
    try:
        cfg.validate()
    except ValueError as err:
        raise UsageError(str(err)) from None
    if cfg.data is not None and not Path(cfg.data).expanduser().is_file():  # before any model is loaded
        raise UsageError(f"--data {cfg.data}: no such file")
    return cfg


def sequential_config(args):
    """SequentialConfig from --target-se/--decide/... (None when neither --target-se nor --decide)."""
    from .sequential import SequentialConfig

    cfg = from_args(SequentialConfig, args)
    if not cfg.enabled:
        return None
    try:
        cfg.validate()
    except ValueError as err:
        raise UsageError(str(err)) from None
    if getattr(args, "parallel", "none") != "none":
        raise UsageError("--target-se/--decide (sequential estimation) cannot be combined with --parallel yet")
    return cfg


def _fmt(x: float, digits: int = 4) -> str:
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def write_json(path: str | os.PathLike, payload: dict) -> None:
    """Write JSON atomically (temporary file + rename)."""
    from .scan import write_json_atomic

    write_json_atomic(path, payload)


# -- commands ------------------------------------------------------------------------------------
def cmd_layers(args) -> int:
    from .cache import folder_architecture
    from .checkpoint import resolve_folder
    from .selection import all_groups, resolve

    folder = resolve_folder(args.model, args.revision, allow_patterns=["*.json"])
    from .adapters import is_adapter_folder, read_adapter_config

    if is_adapter_folder(folder):  # a PEFT adapter: the groups are its base model's
        base = read_adapter_config(folder).get("base_model_name_or_path")
        if not base:
            raise UsageError(f"{args.model}: the adapter records no base model")
        folder = resolve_folder(base, None, allow_patterns=["*.json"])
    arch = folder_architecture(folder, args.trust_remote_code)
    groups = resolve(args.select, arch) if args.select else all_groups(arch)
    if args.json:
        payload = {
            "architecture": arch.model_class,
            "num_blocks": arch.num_blocks,
            "groups": [
                {k: v for k, v in g.to_dict().items() if k in ("name", "kind", "block", "parameters", "numel")}
                for g in groups
            ],
            "tied": arch.tied,
        }
        print(json.dumps(payload, indent=2))
        return 0
    table = Table(title=f"{arch.model_class}: {arch.num_blocks} blocks")
    for col in ("group", "kind", "block", "parameters", "elements"):
        table.add_column(col, justify="right" if col in ("block", "elements") else "left")
    tied = {alias for alias, _ in arch.tied} | {canon for _, canon in arch.tied}
    for g in groups:
        names = [p + (" (tied)" if p in tied else "") for p in g.parameters]
        shown = ", ".join(n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1] if "." in n else n for n in names[:6])
        if len(names) > 6:
            shown += f", … ({len(names)})"
        block = "" if len(g.blocks) != 1 else str(g.blocks[0])
        table.add_row(g.name, g.kind, block, shown, f"{g.numel:,}")
    console.print(table)
    for alias, canon in arch.tied:
        console.print(f"tied: {alias} is {canon} (selecting one moves both)")
    return 0


def cmd_barrier(args) -> int:
    from .barrier import parse_alphas

    try:
        alphas = parse_alphas(args.alphas, allow_extrapolation=args.allow_extrapolation)
    except ValueError as err:
        raise UsageError(str(err)) from None
    data = data_config(args)
    sequential = sequential_config(args)
    if args.json_out:
        from .export import check_writable

        check_writable(Path(args.json_out).parent, f"--json-out {args.json_out}")  # before any work
    from .distributed import is_main_process, setup_parallel

    shard = setup_parallel(args)
    pair = load_pair(args, **_quant_overrides(args))
    pair.shard = shard
    if args.layers:
        pair.groups(args.layers)  # validate the spec before any data work
    blocks = pair.blocks(data)  # kept for the data fingerprint of --json-out
    result = pair.barrier(blocks, layers=args.layers, alphas=alphas, base=args.base, method=args.method, batch_size=args.batch_size,
                          sequential=sequential)
    if not is_main_process():
        return 0  # only process 0 prints and writes
    table = Table(title=f"barrier of {args.layers or 'the full model'} (base {args.base.upper()}, {args.method})")
    estimates = result.extra.get("barrier_curve")  # sequential: regression estimates per alpha
    for col in ("alpha", "loss", "perplexity", "accuracy", "loss - reference" if estimates is None else "barrier (estimate)"):
        table.add_column(col, justify="right")
    for k, (a, loss, ppl, acc) in enumerate(zip(result.alphas, result.loss, result.perplexity, result.accuracy)):
        ref = (1 - a) * result.loss_a + a * result.loss_b
        table.add_row(f"{a:g}", _fmt(loss), f"{ppl:.3f}", _fmt(acc), f"{loss - ref if estimates is None else estimates[k]:+.4f}")
    console.print(table)
    console.print(
        f"barrier_mid = {result.barrier_mid:+.4f} ± {result.barrier_mid_se:.4f} nats "
        f"(perplexity x{result.barrier_mid_ratio:.4f}); barrier_max = {result.barrier_max:+.4f}; "
        f"tokens = {result.tokens:,}"
    )
    if sequential is not None:
        x = result.extra
        low, high = x["barrier_mid_interval"] or (float("nan"), float("nan"))
        verdict = f"decision {x['decision']} (T = {sequential.decide:g}); " if sequential.decide is not None else ""
        console.print(
            f"sequential: {verdict}{100 * sequential.confidence:g}% interval [{low:+.4f}, {high:+.4f}] "
            f"({x['interval_method']}); tokens used {result.tokens:,} of {x['tokens_ceiling']:,} "
            f"(stop: {x['stop_reason']}; endpoints on {x['endpoint_blocks']} blocks)"
        )
    if args.json_out:
        from .checkpoint import display_name

        from .placement import loading_info

        payload = {"model_a": display_name(args.model_a), "model_b": display_name(args.model_b),
                   "revision_a": args.revision_a, "revision_b": args.revision_b, **result.to_dict()}
        payload.update(loading_info(pair))
        if shard is not None:
            payload["parallel"] = {"mode": "data", "processes": shard.num_processes}
        from .provenance import environment

        payload["data"] = {"source": display_name(blocks.source), "fingerprint": blocks.fingerprint,
                           "num_blocks": blocks.num_blocks, "seq_len": blocks.seq_len}
        payload["environment"] = environment(pair.model)
        write_json(args.json_out, payload)
    return 0


def cmd_sweep_report(args) -> int:
    from .sweep import write_sweep

    written = write_sweep(args.scans, args.out or args.scans[0], base=args.base)
    sweep = json.loads(written["json"].read_text())
    table = Table(title=f"barrier_mid (nats) into base {args.base.upper()}: {len(sweep['rows'])} pairs × {len(sweep['columns'])} groups")
    table.add_column("pair")
    for col in sweep["columns"]:
        table.add_column(col, justify="right")
    for label, values in zip(sweep["rows"], sweep["barrier_mid"]):
        table.add_row(label, *("" if v is None else f"{v:+.3f}" for v in values))
    console.print(table)
    print(f"wrote {written['json']} and {written['heatmap']}")  # plain print: paths are never wrapped
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    try:
        parts = run_demo(Path(args.out), overwrite=args.overwrite)
    except FileExistsError as err:
        raise UsageError(str(err)) from None
    _print_scan_summary(json.loads((parts["scan"] / "summary.json").read_text()))
    for name, path in parts.items():
        console.print(f"{name}: {path}")
    return 0


def cmd_push(args) -> int:
    from .checkpoint import display_name
    from .hub import check_model_folder, push_folder

    if args.create_pr and args.revision not in (None, "main"):
        raise UsageError("--create-pr opens a pull request against main; it cannot be combined with --revision")
    check_model_folder(args.dir)  # a usage error (exit 2) before any network traffic
    if not sys.stderr.isatty():
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    url = push_folder(
        args.dir,
        args.repo,
        private=args.private,
        revision=args.revision,
        commit_message=args.commit_message,
        create_pr=args.create_pr,
    )
    where = args.repo + (f"@{args.revision}" if args.revision else "")
    print(f"pushed {display_name(args.dir)} to {where}: {url}")  # plain print: never wrap the URL
    return 0


def _merge_summary(result, auto_choice=None) -> None:
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
        )


def cmd_merge(args) -> int:
    from .autoselect import AutoConfig, auto_select
    from .export import ExportConfig, MergeSpec, PushConfig, check_output_dir, lazy_pair, parse_alpha, save_merged

    spec = from_args(MergeSpec, args, sets=args.sets or [])
    auto = from_args(AutoConfig, args)
    export = from_args(ExportConfig, args)
    push = from_args(PushConfig, args)
    if not export.out:
        raise UsageError("--out DIR is required")
    if auto.auto:
        if spec.layers or spec.sets:
            raise UsageError("--auto chooses the groups itself; drop --layers / --set")
        alpha, end = parse_alpha(0.5 if spec.alpha is None else spec.alpha, allow_extrapolation=spec.allow_extrapolation)
        if end is not None:
            raise UsageError("--auto merges at one alpha; a gradient START:END is not supported")
    else:
        if auto.scan_dir or auto.auto_layers:
            raise UsageError("--scan-dir and --auto-layers need --auto")
        spec.validate()
    data = data_config(args) if (args.data or args.dataset) else None
    if auto.auto and data is None:
        raise UsageError("--auto measures barriers: give --eval-data PATH or --eval-dataset NAME")
    if push.push_to_hub is None and (push.private or push.revision or push.commit_message):
        raise UsageError("--private, --revision and --commit-message need --push-to-hub")
    check_output_dir(export.out, export.overwrite)
    if data is not None:
        pair = load_pair(args)
    else:  # writing needs no model: both checkpoints are read tensor by tensor
        pair = lazy_pair(args.model_a, args.model_b, revision_a=args.revision_a, revision_b=args.revision_b,
                         trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle,
                         base_model=args.base_model)
    choice = None
    if auto.auto:
        choice = auto_select(pair, data, auto, alpha=alpha, base=spec.base, method=spec.method, batch_size=args.batch_size)
        table = Table(title=f"automatic choice at alpha={alpha:g} (max barrier {auto.max_barrier:g} nats; {choice.source})")
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
    )
    _merge_summary(result)
    if result.url:
        print(f"pushed to {push.push_to_hub}: {result.url}")
    return 0


def cmd_run(args) -> int:
    from .recipes import load_recipe, plan_outputs, recipe_schema, run_recipe

    if args.schema:
        import yaml

        print(yaml.safe_dump(recipe_schema(), sort_keys=False, allow_unicode=True, width=100))
        return 0
    if not args.recipe:
        raise UsageError("give a RECIPE.yaml (or --schema)")
    recipe = load_recipe(args.recipe)
    if args.check:
        print(f"{Path(args.recipe).name}: {len(recipe.pairs)} pair(s), {len(recipe.steps)} step(s)")
        current = None
        for row in plan_outputs(recipe, args.out):
            if row["pair"] != current:
                current = row["pair"]
                a = row["a"] + (f"@{row['revision_a']}" if row["revision_a"] else "")
                b = row["b"] + (f"@{row['revision_b']}" if row["revision_b"] else "")
                print(f"{current}: {a} vs {b}")
            print(f"  {row['step']} ({row['kind']}) -> {row['output']}")
        print("recipe is valid")
        return 0
    run_recipe(recipe, out=args.out, overwrite=args.overwrite, echo=print)
    return 0


# -- scans, reports, distances, robustness ------------------------------------------------------
def _check_out_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse an unusable output folder before any model is loaded."""
    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder")
    if not resume and not overwrite and out.is_dir() and any(out.iterdir()):
        raise UsageError(f"--out {out}: folder is not empty; pass --overwrite to replace it or --resume to continue")
    from .export import check_writable

    check_writable(out, f"--out {out}")


def _print_scan_summary(summary: dict) -> None:
    from .report import compact_table, robustness_table

    header, body = robustness_table(summary) if summary.get("command") == "robustness" else compact_table(summary)
    table = Table(title=f"{summary.get('command', 'scan')}: {len(summary.get('groups', []))} groups (barriers in nats)")
    for i, col in enumerate(header):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row in body:
        table.add_row(*row)
    console.print(table)
    ends = summary.get("endpoints", {})
    if "a" in ends and "b" in ends:
        console.print(f"L_A = {ends['a']['loss']:.4f}, L_B = {ends['b']['loss']:.4f} nats; tokens = {ends['a']['tokens']:,}")


def cmd_scan(args) -> int:
    from .report import render
    from .scan import ScanConfig, run_scan

    cfg = from_args(ScanConfig, args, prefix=not args.no_prefix, sequential=sequential_config(args))
    try:
        cfg.validate()
    except ValueError as err:
        raise UsageError(str(err)) from None
    out = Path(args.out)
    from .distributed import init_processes, is_main_process, run_scan_parallel, setup_parallel

    parallel = getattr(args, "parallel", "none")
    if parallel != "none":
        init_processes()
    if is_main_process():
        _check_out_dir(out, args.resume, args.overwrite)
    data = data_config(args)
    shard = setup_parallel(args)
    pair = load_pair(args)
    pair.shard = shard
    blocks = pair.blocks(data)
    if parallel == "none":
        run_scan(pair, blocks, cfg, out, resume=args.resume, overwrite=args.overwrite, progress=True)
    else:
        from .scan import ScanRunner

        runner = ScanRunner(pair, blocks, cfg, out, progress=False)
        run_scan_parallel(runner, parallel, resume=args.resume, overwrite=args.overwrite)
        if not is_main_process():
            return 0  # only process 0 reports
    written = render(out)
    _print_scan_summary(json.loads(written["summary"].read_text()))
    console.print(f"results: {out / 'results.jsonl'}; report: {written['html']}")
    return 0


def cmd_report(args) -> int:
    from .report import render

    written = render(Path(args.out))
    _print_scan_summary(json.loads(written["summary"].read_text()))
    for path in written.values():
        console.print(f"wrote {path}")
    return 0


def cmd_distance(args) -> int:
    from .analysis import distances

    if args.json_out:
        from .export import check_writable

        check_writable(Path(args.json_out).parent, f"--json-out {args.json_out}")  # before any work
    result = distances(
        args.model_a, args.model_b, granularity=args.granularity, layers=args.layers, revision_a=args.revision_a,
        revision_b=args.revision_b, trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle,
    )
    table = Table(title=f"distances {result['model_a']} ↔ {result['model_b']} ({result['architecture']})")
    for col in ("group", "elements", "‖ΔW‖", "relative", "cosine"):
        table.add_column(col, justify="left" if col == "group" else "right")
    for row in result["groups"]:
        rel, cos = row["relative_distance"], row["cosine"]
        table.add_row(row["group"], f"{row['numel']:,}", f"{row['distance']:.4f}",
                      "n/a" if rel is None else f"{rel:.4f}", "n/a" if cos is None else f"{cos:.6f}")
    console.print(table)
    if args.json_out:
        write_json(args.json_out, result)
    return 0


def cmd_robustness(args) -> int:
    from .analysis import RobustnessConfig, run_robustness
    from .report import render

    cfg = from_args(RobustnessConfig, args, prefix=not args.no_prefix)
    try:
        cfg.validate()
    except ValueError as err:
        raise UsageError(str(err)) from None
    out = Path(args.out)
    _check_out_dir(out, args.resume, args.overwrite)
    data = data_config(args)
    pair = load_pair(args)
    if cfg.layers:
        pair.groups(cfg.layers)  # validate the spec before any data work
    blocks = pair.blocks(data)
    run_robustness(pair, blocks, cfg, out, resume=args.resume, overwrite=args.overwrite, progress=True)
    written = render(out)
    _print_scan_summary(json.loads(written["summary"].read_text()))
    console.print(f"results: {out / 'results.jsonl'}; report: {written['html']}")
    return 0


# -- parser --------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """argparse whose errors are short (no usage dump) and never echo a token (exit code 2)."""

    def error(self, message: str) -> typing.NoReturn:
        from .security import redact

        self.exit(2, f"{self.prog}: error: {redact(message)} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hf-llmc", description="Layer-wise linear mode connectivity for Hugging Face checkpoints.")
    parser.add_argument("--debug", action="store_true", help="Show tracebacks on errors.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("layers", help="List the addressable layer groups of a model.")
    p.add_argument("model", help="Local folder or Hub id.")
    p.add_argument("--select", help="Only the groups this spec resolves to, e.g. attn.0-3.")
    p.add_argument("--json", action="store_true", help="Print JSON instead of a table.")
    p.add_argument("--revision", help="Hub revision.")
    p.add_argument("--trust-remote-code", action="store_true", help="Run custom modelling code shipped with the checkpoint.")
    p.set_defaults(func=cmd_layers)

    p = sub.add_parser("barrier", help="Barrier of a layer-wise (or full) interpolation path.")
    _add_pair_args(p)
    _add_data_args(p)
    p.add_argument("--layers", help="Layer spec (default: the full model), e.g. attn.0-3,mlp.7 or re:<regex>.")
    p.add_argument("--alphas", default="0,0.25,0.5,0.75,1", help="Comma-separated α values or a count N of evenly spaced points (0.5 always included).")
    p.add_argument("--base", choices=["a", "b"], default="a", help="Which model the unselected tensors come from.")
    p.add_argument("--method", choices=["lerp", "slerp"], default="lerp", help="Interpolation method per tensor.")
    p.add_argument("--allow-extrapolation", action="store_true", help="Allow α outside [0, 1].")
    p.add_argument("--json-out", help="Write the result as JSON to this file.")
    p.add_argument("--parallel", choices=["none", "data"], default="none", help="Under torchrun / accelerate launch: 'data' splits the token blocks across processes (per-block sums gathered).")
    from .sequential import SequentialConfig

    add_fields(p, SequentialConfig, group="sequential estimation (stop once the error bar allows)")
    p.set_defaults(func=cmd_barrier)

    p = sub.add_parser("demo", help="Build a small demo pair and run a scan, a merge and a model card on it.")
    p.add_argument("--out", default="hf-llmc-demo", help="Output folder.")
    p.add_argument("--overwrite", action="store_true", help="Replace an existing output folder.")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("push", help="Upload a model folder to the Hugging Face Hub (token from HF_TOKEN or `hf auth login`).")
    p.add_argument("dir", help="Model folder (config.json + weights, or a PEFT adapter).")
    p.add_argument("repo", help="Hub model repo id, e.g. user/name (created if missing).")
    p.add_argument("--private", action="store_true", help="Create the repo as private (an existing repo keeps its visibility).")
    p.add_argument("--revision", metavar="BRANCH", help="Branch to commit to (created from main if missing).")
    p.add_argument("--commit-message", metavar="M", help="Commit message.")
    p.add_argument("--create-pr", action="store_true", help="Open a pull request against main instead of committing.")
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("merge", help="Write a layer-wise merge of A and B (streamed safetensors + model card).")
    _add_pair_args(p, exclude=("dtype",))
    from .autoselect import AutoConfig
    from .data import DataConfig
    from .export import ExportConfig, MergeSpec, PushConfig

    g = p.add_argument_group("what to merge")
    add_fields(g, MergeSpec)
    g.add_argument("--set", dest="sets", action="append", metavar="LAYERS=ALPHA", help=dataclasses.fields(MergeSpec)[2].metadata["help"])
    add_fields(p, AutoConfig, group="automatic choice")
    add_fields(p, ExportConfig, group="output")
    g = p.add_argument_group("evaluation (perplexities and barrier in the model card)")
    g.add_argument("--eval-data", "--data", dest="data", metavar="PATH", help=dataclasses.fields(DataConfig)[0].metadata["help"])
    g.add_argument("--eval-dataset", "--dataset", dest="dataset", metavar="NAME", help=dataclasses.fields(DataConfig)[1].metadata["help"])
    add_fields(g, DataConfig, exclude=("data", "dataset"))
    g.add_argument("--batch-size", type=int, default=None, metavar="N", help="Blocks per forward (default: automatic).")
    add_fields(p, PushConfig, group="publishing")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("run", help="Run a YAML recipe: model pairs, data, barriers, scans, merges, pushes.")
    p.add_argument("recipe", nargs="?", help="Recipe file (see recipes/ and `hf-llmc run --schema`).")
    p.add_argument("--check", action="store_true", help="Validate the recipe and print what it would write; load nothing.")
    p.add_argument("--schema", action="store_true", help="Print every recipe key with its type and help, then exit.")
    p.add_argument("--out", help="Output root (default: the recipe's out, else a folder named after the recipe).")
    p.add_argument("--overwrite", action="store_true", help="Replace existing outputs of every step.")
    p.set_defaults(func=cmd_run)

    from .analysis import RobustnessConfig
    from .scan import ScanConfig

    p = sub.add_parser("scan", help="Barriers of every layer, cumulative groups or moving windows; resumable, with a report.")
    _add_pair_args(p)
    _add_data_args(p)
    add_fields(p, ScanConfig, group="scan")
    add_fields(p, SequentialConfig, group="sequential estimation (stop each point once its error bar allows)")
    p.add_argument("--no-prefix", action="store_true", help="Run every point through the whole model (no prefix reuse; same numbers, slower).")
    p.add_argument("--out", default="hf-llmc-scan", help="Output folder (results.jsonl, scan.json, summary.json, report.md/html, PNGs).")
    p.add_argument("--resume", action="store_true", help="Continue an interrupted scan in --out (refused if its settings differ).")
    p.add_argument("--overwrite", action="store_true", help="Replace the results in an existing, non-empty --out.")
    p.add_argument("--parallel", choices=["none", "data", "points"], default="none", help="Under torchrun / accelerate launch: 'data' splits the token blocks across processes, 'points' splits the scan points (each process writes results.rank{r}.jsonl; process 0 merges).")
    p.set_defaults(func=cmd_scan)

    p = sub.add_parser("report", help="Re-render summary.json, report.md/html and the figures of a scan or robustness folder.")
    p.add_argument("out", metavar="OUT", help="Folder written by `hf-llmc scan` or `hf-llmc robustness`.")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("distance", help="Per-group weight distance, relative distance and cosine similarity (no data needed).")
    _add_pair_args(p, only=("revision_a", "revision_b", "trust_remote_code", "allow_pickle"))
    p.add_argument("--granularity", choices=["block", "sublayer", "module"], default="block", help="Groups: block, sublayer or module.")
    p.add_argument("--layers", help="Layer spec instead of --granularity, e.g. attn.0-3,mlp.7.")
    p.add_argument("--json-out", help="Write the rows as JSON to this file.")
    p.set_defaults(func=cmd_distance)

    p = sub.add_parser("robustness", help="Loss along random directions of the same norm as B − A, per group (paper, Section 5).")
    _add_pair_args(p)
    _add_data_args(p)
    add_fields(p, RobustnessConfig, group="robustness")
    p.add_argument("--no-prefix", action="store_true", help="Run every point through the whole model (no prefix reuse).")
    p.add_argument("--out", default="hf-llmc-robustness", help="Output folder (results.jsonl, scan.json, summary.json, report, robustness.png).")
    p.add_argument("--resume", action="store_true", help="Continue an interrupted run in --out (refused if its settings differ).")
    p.add_argument("--overwrite", action="store_true", help="Replace the results in an existing, non-empty --out.")
    p.set_defaults(func=cmd_robustness)

    p = sub.add_parser("sweep-report", help="Step × layer heatmap of scans at several revision pairs (e.g. a recipe sweeping Pythia steps).")
    p.add_argument("scans", nargs="+", metavar="DIR", help="Scan folders, or folders holding them (e.g. a recipe's output root).")
    p.add_argument("--base", choices=["a", "b"], default="a", help="Which scanned base to show.")
    p.add_argument("--out", help="Where sweep.json and sweep_heatmap.png go (default: the first DIR).")
    p.set_defaults(func=cmd_sweep_report)

    # (more commands register below)
    return parser


USAGE_ERRORS: tuple[type[BaseException], ...] = (UsageError,)


def _classify(err: BaseException) -> int:
    from .architecture import ArchitectureError
    from .data import DataError
    from .pair import PairError

    if isinstance(err, (UsageError, DataError)):
        return 2
    if isinstance(err, ValueError) and not isinstance(err, (PairError, ArchitectureError)):
        return 2  # spec / option values
    return 1


@contextlib.contextmanager
def third_parties_quiet(debug: bool):
    """Without ``--debug``, no warning or log line of a library (bitsandbytes, peft, transformers,
    torch ...) reaches the terminal, so an error stays one line; with it, they all do."""
    if debug:
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        previous = logging.root.manager.disable
        logging.disable(logging.CRITICAL)
        try:
            yield
        finally:
            logging.disable(previous)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not sys.stderr.isatty():  # no datasets progress bars in logs (an error stays one line)
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    parser = build_parser()
    args = parser.parse_args(argv)
    with third_parties_quiet(args.debug):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        if args.command not in LIGHT_COMMANDS:
            quiet_transformers()
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
    except Exception as err:  # noqa: BLE001 - the CLI maps every failure to a one-line message
        from .security import redact

        if args.debug:  # the full traceback, with any token in it redacted
            import traceback

            print(redact(traceback.format_exc()), end="", file=sys.stderr)
            return _classify(err)

        message = redact(str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)
        print(f"hf-llmc {args.command}: error: {message}", file=sys.stderr)
        return _classify(err)


if __name__ == "__main__":
    sys.exit(main())
