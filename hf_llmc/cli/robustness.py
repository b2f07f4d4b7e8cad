"""``hf-llmc robustness A B --data TEXT --out DIR``: loss along random directions vs the path."""

from __future__ import annotations

import argparse
import json

from ..config.scan import RobustnessConfig
from ..config.spec import parse_spec
from ..engine.io import RESULTS, check_run_dir, output_path
from .common import cli_sources, data_config
from .parser import from_args


def run(args: argparse.Namespace) -> int:
    cfg = from_args(RobustnessConfig, args, prefix=not args.no_prefix)
    cfg.validate()
    if cfg.layers:
        parse_spec(cfg.layers)
    out = output_path(args.out)
    check_run_dir(args.out, resume=args.resume, overwrite=args.overwrite, sources=cli_sources(args))
    data = data_config(args)

    from ..analyses.robustness import run_robustness
    from ..engine.data import blocks_for, sets_for
    from ..outputs.report import render
    from .common import console, load_pair, print_chat_data, print_scan_summary

    pair = load_pair(args)
    if cfg.layers:
        pair.groups(cfg.layers)  # validate the spec against the model before any data work
    blocks = sets_for(pair, data) if data.multiple else blocks_for(pair, data)
    run_robustness(pair, blocks, cfg, out, resume=args.resume, overwrite=args.overwrite, progress=True)
    written = render(out)
    print_chat_data(blocks)
    print_scan_summary(json.loads(written["summary"].read_text()))
    console.print(f"results: {out / RESULTS}; report: {written['html']}")
    return 0
