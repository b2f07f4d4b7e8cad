"""``hf-llmc scan A B --data TEXT --out DIR``: barriers of many groups, resumable, with a report."""

from __future__ import annotations

import argparse
import json

from ..config.scan import ScanConfig
from ..engine.io import RESULTS, check_run_dir, output_path
from .common import cli_sources, data_config, sequential_config
from .parser import from_args


def run(args: argparse.Namespace) -> int:
    cfg = from_args(ScanConfig, args, prefix=not args.no_prefix, sequential=sequential_config(args))
    cfg.validate()
    out = output_path(args.out)
    parallel = getattr(args, "parallel", "none")
    if parallel == "none":  # every option is checked before torch is imported
        check_run_dir(args.out, resume=args.resume, overwrite=args.overwrite, sources=cli_sources(args))
    data = data_config(args)
    if data.multiple and parallel != "none":
        from ..config.errors import UsageError

        raise UsageError("several named evaluation sets (--data NAME=PATH) cannot be combined with --parallel yet")

    from ..analyses.distributed import init_processes, is_main_process, run_scan_parallel, setup_parallel

    if parallel != "none":
        init_processes()
        if is_main_process():  # only process 0 owns the output folder
            check_run_dir(args.out, resume=args.resume, overwrite=args.overwrite, sources=cli_sources(args))

    from ..analyses.scan import ScanRunner, run_scan
    from ..engine.data import blocks_for
    from ..outputs.report import render
    from .common import console, load_pair, print_chat_data, print_scan_summary

    shard = setup_parallel(args)
    pair = load_pair(args)
    pair.shard = shard
    if pair.vocab is not None and is_main_process():
        console.print(pair.vocab.summary())
    if data.multiple:
        from ..analyses.multiset import run_scan_sets
        from ..engine.data import sets_for

        sets = sets_for(pair, data)
        run_scan_sets(pair, sets, cfg, out, resume=args.resume, overwrite=args.overwrite, progress=True)
        parallel = "sets"
    blocks = sets if data.multiple else blocks_for(pair, data)
    if parallel == "none":
        run_scan(pair, blocks, cfg, out, resume=args.resume, overwrite=args.overwrite, progress=True)
    elif parallel != "sets":  # one set
        runner = ScanRunner(pair, blocks, cfg, out, progress=False)
        run_scan_parallel(runner, parallel, resume=args.resume, overwrite=args.overwrite)
        if not is_main_process():
            return 0  # only process 0 reports
    written = render(out)
    print_chat_data(blocks)
    print_scan_summary(json.loads(written["summary"].read_text()))
    console.print(f"results: {out / RESULTS}; report: {written['html']}")
    return 0
