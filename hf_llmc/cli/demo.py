"""``hf-llmc demo``: build a small pair (two fine-tunes of one tiny GPT-2, trained here in
seconds, :func:`hf_llmc.testing.build_pair`), scan every sublayer for both bases with its report,
choose the mergeable groups from that scan, and write the merged model with its card."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config.data import DataConfig
from ..config.merge import AutoConfig
from ..config.scan import ScanConfig
from ..engine.io import atomic_output_dir, check_output_dir

#: Settings of the demo pair built by :func:`build_demo_pair` (GPT-2, 4 blocks, width 128;
#: ~40 CPU-seconds on one thread). On its ``eval.txt`` the endpoints reach 1.30 / 1.31
#: nats per token and the full-model midpoint 1.64: a barrier of +0.33 nats (seed 0;
#: +0.26 for seed 1).
DEMO_DEFAULTS: dict[str, Any] = {
    "model_type": "gpt2",
    "num_layers": 4,
    "hidden_size": 128,
    "num_heads": 4,
    "vocab_size": 512,
    "max_positions": 256,
    "pretrain_steps": 20,
    "finetune_steps": 200,
    "seq_len": 64,
    "batch_size": 8,
    "lr": 3e-3,
    "seed": 0,
    "replay": 0.25,
    # 512 blocks of 64 tokens: every group's barrier gets a standard error of at most 0.02 nats,
    # so the heatmap tells a costly layer from a free one.
    "eval_blocks": 512,
}


#: What the demo folder takes on disk, at most (three small models, a scan and its report).
DEMO_SIZE = 64 * 1000 * 1000


def build_demo_pair(out_dir: str | Path, **overrides: Any):
    """Build the default demo pair (:data:`DEMO_DEFAULTS`, overridable) into ``out_dir``; returns
    a :class:`hf_llmc.testing.DemoPair`."""
    from ..testing import build_pair

    kwargs = {**DEMO_DEFAULTS, **overrides}
    return build_pair(out_dir, **kwargs)


def run_demo(out_dir: str | Path, *, overwrite: bool = False, progress: bool = True,
             **pair_overrides: Any) -> dict[str, Path]:
    """``hf-llmc demo``: build the demo pair, scan every sublayer for both bases (with its
    report), choose the mergeable groups automatically from that scan, and write the merged
    model with its card. Everything goes to ``out_dir`` (built beside it, renamed at the end);
    returns the paths of the parts."""
    out = check_output_dir(out_dir, overwrite, size=DEMO_SIZE)
    from ..analyses.autoselect import auto_select
    from ..analyses.scan import run_scan
    from ..engine.data import blocks_for
    from ..model.pair import ModelPair
    from ..outputs.merge.save import save_merged
    from ..outputs.report import render

    with atomic_output_dir(out, overwrite=overwrite, size=DEMO_SIZE, kind="demo") as work:
        demo = build_demo_pair(work / "pair", **pair_overrides)
        pair = ModelPair.from_pretrained(demo.a, demo.b, device="cpu")
        data = DataConfig(data=str(demo.eval_text), seq_len=64)
        blocks = blocks_for(pair, data)
        run_scan(pair, blocks, ScanConfig(granularity="sublayer", base="both"), work / "scan", progress=progress)
        render(work / "scan")
        choice = auto_select(pair, data, AutoConfig(auto=True, scan_dir=str(work / "scan")), alpha=0.5)
        save_merged(pair, choice.spec(), work / "merged", data=data, auto=choice, progress=progress)
    return {"pair": out / "pair", "scan": out / "scan", "report": out / "scan" / "report.html",
            "merged": out / "merged", "card": out / "merged" / "README.md"}


def run(args) -> int:
    """``hf-llmc demo``: the demo into ``--out``, then its scan summary and the paths written."""
    import json

    from .common import console, print_scan_summary

    check_output_dir(args.out, args.overwrite, size=DEMO_SIZE)  # before torch is imported
    parts = run_demo(args.out, overwrite=args.overwrite)
    print_scan_summary(json.loads((parts["scan"] / "summary.json").read_text()))
    for name, path in parts.items():
        console.print(f"{name}: {path}")
    return 0
