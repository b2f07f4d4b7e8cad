"""``hf-llmc sweep-report DIR...``: the step × layer heatmap of scans at several revision pairs."""

from __future__ import annotations

import argparse
import json


def run(args: argparse.Namespace) -> int:
    from rich.table import Table

    from ..outputs.sweep import write_sweep
    from .common import console

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
