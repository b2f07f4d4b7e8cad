"""``hf-llmc search A B --data a=A.txt --data b=B.txt --out DIR``: per-group α for two sets, the
Pareto front, and the picked merge with its card."""

from __future__ import annotations

import argparse

from ..config.search import SearchConfig, parse_named_sets
from ..engine.io import check_run_dir, output_path
from .common import cli_sources, data_config
from .parser import from_args


def run(args: argparse.Namespace) -> int:
    # Every option is checked before torch is imported or a model is loaded.
    data = data_config(args)  # checked, local files found
    sets = parse_named_sets(data)
    cfg = from_args(SearchConfig, args, prefix=not args.no_prefix)
    cfg.validate(list(sets))
    check_run_dir(args.out, resume=args.resume, overwrite=args.overwrite, sources=cli_sources(args))

    from rich.table import Table

    from ..outputs.search import front_rows, search_and_merge
    from .common import console, load_pair

    pair = load_pair(args)
    outcome = search_and_merge(pair, sets, cfg, args.out, data=data,
                               batch_size=args.batch_size, resume=args.resume, overwrite=args.overwrite,
                               sources=cli_sources(args), write_merge=not args.no_merge, progress=True)
    m = outcome.manifest
    names = m["result"]["sets"]
    table = Table(title=f"Pareto front ({m['status']}; held-out losses in nats)")
    for col in ["point", *(f"loss {n}" for n in names), "worst-case increase", ""]:
        table.add_column(col, justify="left" if col in ("point", "") else "right")
    for row in front_rows(m):
        table.add_row(row["name"], *(f"{row['loss'][n]:.4f} ± {row['se'][n]:.4f}" for n in names),
                      f"{row['worst']:+.4f}", row["note"].strip("*"))
    console.print(table)
    d = m["result"]["chosen_vs_uniform_worst_increase"]
    t = m["tokens"]
    console.print(f"chosen ({m['result']['pick']}): worst-case increase {m['result']['chosen']['worst_increase']:+.4f} nats; "
                  f"minus the uniform average's: {d['mean']:+.4f} [{d['interval'][0]:+.4f}, {d['interval'][1]:+.4f}]")
    console.print(f"tokens: search {t['search']:,}, front {t['front']:,}, held-out {t['heldout']:,}")
    out = output_path(args.out)
    merged = f"; merge: {outcome.merge.folder}" if outcome.merge else ""
    console.print(f"results: {out / 'search.jsonl'}; report: {outcome.report['html']}{merged}")
    return 0
