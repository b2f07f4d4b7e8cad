"""``hf-llmc layers MODEL [MODEL_B]``: the groups a layer spec can address (no weights are read); with
a second model, how the two vocabularies differ."""

from __future__ import annotations

import argparse
import json

from ..config.errors import UsageError


def run(args: argparse.Namespace) -> int:
    from rich.table import Table

    from ..model.cache import folder_architecture
    from ..model.checkpoint.adapters import is_adapter_folder, read_adapter_config
    from ..model.checkpoint.folders import resolve_folder
    from ..model.selection import all_groups, resolve
    from .common import console

    folder = resolve_folder(args.model, args.revision, allow_patterns=["*.json"])
    if is_adapter_folder(folder):  # a PEFT adapter: the groups are its base model's
        base = read_adapter_config(folder).get("base_model_name_or_path")
        if not base:
            raise UsageError(f"{args.model}: the adapter records no base model")
        folder = resolve_folder(base, None, allow_patterns=["*.json"])
    arch = folder_architecture(folder, args.trust_remote_code)
    groups = resolve(args.select, arch) if args.select else all_groups(arch)
    vocabulary = _vocabulary(args) if args.model_b else None
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
        if args.model_b:
            payload["vocabulary"] = vocabulary.describe() if vocabulary is not None else None
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
    if args.model_b:
        console.print(vocabulary.summary() if vocabulary is not None else "vocabulary: the same tokenizer and embedding rows in both models")
    return 0


def _vocabulary(args: argparse.Namespace):
    """How the two models' vocabularies differ (None: not at all); refuses an incompatible pair."""
    from ..model.pair import lazy_pair

    return lazy_pair(args.model, args.model_b, revision_a=args.revision, trust_remote_code=args.trust_remote_code).vocab
