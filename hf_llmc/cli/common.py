"""What several commands share: the console, loading the pair from the options, the data and
sequential settings, and the scan summary table."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..config.data import DataConfig
from ..config.errors import DataError, OutputExistsError, UsageError
from ..config.load import LoadConfig
from ..config.scan import SequentialConfig
from .parser import from_args

console = Console(stderr=False, highlight=False)
err_console = Console(stderr=True, highlight=False)


def load_pair(args: argparse.Namespace, **overrides):
    """The live :class:`~hf_llmc.ModelPair` from the command's loading options; ``overrides``
    replace loading options (e.g. ``keep_modules``)."""
    from ..api import ModelPair
    from ..model.quiet import quiet_transformers

    quiet_transformers()
    options = {f.name: getattr(args, f.name) for f in dataclasses.fields(LoadConfig) if hasattr(args, f.name)}
    options.update(overrides)
    return ModelPair.from_pretrained(args.model_a, args.model_b, **options)


def cli_sources(args: argparse.Namespace) -> list:
    """``(label, folder)`` of the local model folders a command reads (A, B, an adapter's base), so
    that no output replaces, lies in or contains them (checked before torch is imported)."""
    from ..engine.io import source_folders

    return source_folders([("model A", getattr(args, "model_a", None)), ("model B", getattr(args, "model_b", None)),
                           ("the base model", getattr(args, "base_model", None))])


def check_json_out(args: argparse.Namespace) -> None:
    """Before any work: ``--json-out`` is not in a model folder or the Hub cache, its folder is
    writable, and an existing file is replaced only with ``--overwrite``."""
    if not args.json_out:
        return
    from ..engine.io import check_location, check_writable

    where = f"json_out={args.json_out!r}"
    check_location(args.json_out, cli_sources(args), shown=where)
    path = Path(args.json_out).expanduser()
    if path.exists() and not args.overwrite:
        raise OutputExistsError(f"{where}: exists; pass --overwrite to replace it")
    check_writable(path.parent, where)


def quant_overrides(args: argparse.Namespace) -> dict:
    """With --load-in-8bit/4bit and --layers: keep the interpolated groups' modules unquantized."""
    if not (getattr(args, "load_in_8bit", False) or getattr(args, "load_in_4bit", False)) or not getattr(args, "layers", None):
        return {}
    from ..model.placement import keep_modules_for

    return {"keep_modules": keep_modules_for(
        args.model_a, args.layers, revision=args.revision_a, base_model=args.base_model,
        trust_remote_code=args.trust_remote_code,
    )}


def data_config(args: argparse.Namespace) -> DataConfig:
    """The evaluation data options, checked (and the local files found) before any model loads.
    One unnamed ``--data``/``--dataset`` gives the single-set settings as before; ``NAME=PATH``
    entries keep their lists (see :meth:`DataConfig.named`)."""
    cfg = from_args(DataConfig, args)
    for key in ("data", "dataset"):
        value = getattr(cfg, key)
        if isinstance(value, list) and len(value) == 1:
            setattr(cfg, key, value[0])
    cfg.validate()
    for _, single in cfg.named():
        if single.data is not None and not Path(single.data).expanduser().is_file():
            raise DataError(f"data={single.data!r}: no such file")
    return cfg


def sequential_config(args: argparse.Namespace) -> SequentialConfig | None:
    """SequentialConfig from --target-se/--decide/... (None when neither is given)."""
    cfg = from_args(SequentialConfig, args)
    if not cfg.enabled:
        return None
    cfg.validate()
    if getattr(args, "parallel", "none") != "none":
        raise UsageError("--target-se/--decide (sequential estimation) cannot be combined with --parallel yet")
    return cfg


def print_chat_data(blocks) -> None:
    """One line per chat evaluation set: conversations kept, truncated and dropped, and the scored tokens."""
    if isinstance(blocks, (list, tuple)):
        for one in blocks:
            print_chat_data(one)
        return
    chat = blocks.chat
    if not chat:
        return
    how = f", assistant turns found by {chat['assistant_tokens_by']}" if chat.get("assistant_tokens_by") else ""
    name = f"{blocks.name}: " if getattr(blocks, "name", None) else ""
    console.print(f"{name}chat data: {chat['conversations']:,} conversations; {chat['truncated']:,} truncated to "
                  f"--seq-len {chat['seq_len']}; {chat['dropped']:,} dropped (no scored token); loss on "
                  f"{chat['loss_on']} tokens ({chat['scored_tokens']:,}{how})")


def fmt(x: float, digits: int = 4) -> str:
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def print_scan_summary(summary: dict) -> None:
    """The compact table of a scan's (or robustness run's) summary.json, with the endpoints."""
    from ..outputs.report import AVERAGE_TITLES, compact_table, robustness_table

    if summary.get("datasets"):  # several evaluation sets: one table per set and per average
        for name, part in summary["datasets"].items():
            view = {**summary, **part}
            view.pop("datasets")
            title = AVERAGE_TITLES.get(name, f"evaluation set {name}")
            print_scan_summary({**view, "title": f"{summary.get('command', 'scan')} ({title})"})
        return
    header, body = robustness_table(summary) if summary.get("command") == "robustness" else compact_table(summary)
    unit = "bits per byte" if summary.get("metric") == "bpb" else "nats"
    table = Table(title=f"{summary.get('title') or summary.get('command', 'scan')}: {len(summary.get('groups', []))} groups (barriers in {unit})")
    for i, col in enumerate(header):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row in body:
        table.add_row(*row)
    console.print(table)
    ends = summary.get("endpoints", {})
    if "a" in ends and "b" in ends:
        console.print(f"L_A = {ends['a']['loss']:.4f}, L_B = {ends['b']['loss']:.4f} nats; tokens = {ends['a']['tokens']:,}")
