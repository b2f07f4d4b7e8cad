"""``hf-llmc distance A B``: per-group weight distances (no data, no model instantiated)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config.files import write_json_atomic
from ..config.spec import parse_spec
from .common import check_json_out


def run(args: argparse.Namespace) -> int:
    if args.layers:
        parse_spec(args.layers)
    check_json_out(args)

    from rich.table import Table

    from ..analyses.distances import distances
    from .common import console

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
        write_json_atomic(Path(args.json_out).expanduser(), result)
    return 0
