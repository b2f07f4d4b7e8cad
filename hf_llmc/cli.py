"""``hf-llmc`` command line: parses arguments, calls the Python API, prints tables.

Exit codes: 0 success, 2 usage errors (bad spec, bad option values), 1 other failures. No
traceback is printed unless ``--debug`` is given.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from collections.abc import Callable
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
def _add_pair_args(p: argparse.ArgumentParser) -> None:
    from .pair import LoadConfig

    p.add_argument("model_a", help="Model A: local folder or Hub id.")
    p.add_argument("model_b", help="Model B: local folder or Hub id.")
    add_fields(p, LoadConfig, group="loading")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    from .data import DataConfig

    add_fields(p, DataConfig, group="evaluation data")
    p.add_argument("--batch-size", type=int, default=None, metavar="N", help="Blocks per forward (default: automatic, halving on out-of-memory).")


def load_pair(args):
    """ModelPair from the common options (used by every pair command)."""
    from .pair import ModelPair

    return ModelPair.from_pretrained(
        args.model_a,
        args.model_b,
        revision_a=args.revision_a,
        revision_b=args.revision_b,
        dtype=args.dtype,
        device=args.device,
        device_map=args.device_map,
        trust_remote_code=args.trust_remote_code,
        allow_pickle=args.allow_pickle,
    )


def data_config(args):
    from .data import DataConfig

    cfg = from_args(DataConfig, args)
    try:
        cfg.validate()
    except ValueError as err:
        raise UsageError(str(err)) from None
    return cfg


def _fmt(x: float, digits: int = 4) -> str:
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def write_json(path: str | os.PathLike, payload: dict) -> None:
    """Write JSON atomically (temporary file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)


# -- commands ------------------------------------------------------------------------------------
def cmd_layers(args) -> int:
    from .architecture import discover, meta_model
    from .checkpoint import resolve_folder
    from .pair import _load_config
    from .selection import all_groups, resolve

    folder = resolve_folder(args.model, args.revision, allow_patterns=["*.json"])
    config = _load_config(folder, args.trust_remote_code)
    arch = discover(meta_model(config, trust_remote_code=args.trust_remote_code))
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
    pair = load_pair(args)
    if args.layers:
        pair.groups(args.layers)  # validate the spec before any data work
    result = pair.barrier(data, layers=args.layers, alphas=alphas, base=args.base, method=args.method, batch_size=args.batch_size)
    table = Table(title=f"barrier of {args.layers or 'the full model'} (base {args.base.upper()}, {args.method})")
    for col in ("alpha", "loss", "perplexity", "accuracy", "loss - reference"):
        table.add_column(col, justify="right")
    for a, loss, ppl, acc in zip(result.alphas, result.loss, result.perplexity, result.accuracy):
        ref = (1 - a) * result.loss_a + a * result.loss_b
        table.add_row(f"{a:g}", _fmt(loss), f"{ppl:.3f}", _fmt(acc), f"{loss - ref:+.4f}")
    console.print(table)
    console.print(
        f"barrier_mid = {result.barrier_mid:+.4f} ± {result.barrier_mid_se:.4f} nats "
        f"(perplexity x{result.barrier_mid_ratio:.4f}); barrier_max = {result.barrier_max:+.4f}; "
        f"tokens = {result.tokens:,}"
    )
    if args.json_out:
        from .checkpoint import display_name

        payload = {"model_a": display_name(args.model_a), "model_b": display_name(args.model_b), **result.to_dict()}
        write_json(args.json_out, payload)
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(Path(args.out), overwrite=args.overwrite)
    return 0


# -- parser --------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-llmc", description="Layer-wise linear mode connectivity for Hugging Face checkpoints.")
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
    p.set_defaults(func=cmd_barrier)

    p = sub.add_parser("demo", help="Build a small demo pair and run a scan, a merge and a model card on it.")
    p.add_argument("--out", default="hf-llmc-demo", help="Output folder.")
    p.add_argument("--overwrite", action="store_true", help="Replace an existing output folder.")
    p.set_defaults(func=cmd_demo)

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


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
    except Exception as err:  # noqa: BLE001 - the CLI maps every failure to a one-line message
        if args.debug:
            raise
        from .security import redact

        message = redact(str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)
        print(f"hf-llmc {args.command}: error: {message}", file=sys.stderr)
        return _classify(err)


if __name__ == "__main__":
    sys.exit(main())
