"""``hf-llmc demo``: build a small pair (two fine-tunes of one tiny GPT-2, trained here in
seconds, :func:`hf_llmc.testing.build_pair`), scan every sublayer for both bases with its report,
choose the mergeable groups from that scan, and write the merged model with its card. A second
step turns the pair into two chat fine-tunes whose vocabularies differ (A adds a pad token, B
three chat tokens and padding rows, :func:`hf_llmc.testing.build_chat_pair`) and measures the
full-model barrier on held-out conversations, assistant tokens only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config.data import DataConfig
from ..config.merge import AutoConfig
from ..config.scan import ScanConfig
from ..engine.io import atomic_output_dir, check_output_dir

#: Settings of the demo pair built by :func:`build_demo_pair` (GPT-2, 4 blocks, width 128;
#: ~15 s on two cores: the two fine-tunes run at once). On its ``eval.txt`` the endpoints reach
#: 1.17 / 1.16 nats per token and the full-model midpoint 1.36: a barrier of +0.20 nats (seed 0),
#: +0.25 for ``attn.0`` alone, under +0.03 for every group after block 0.
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
    # Each fine-tune also sees the other domain (half as many blocks as its own): the endpoints
    # then differ less block by block, which is what sets the barriers' standard errors (with
    # replay 0.25 the same 0.017 needs 512 blocks).
    "replay": 0.5,
    # 384 blocks of 64 tokens: every group's barrier gets a standard error of at most 0.02 nats
    # (0.017), so the heatmap tells a costly layer from a free one.
    "eval_blocks": 384,
}

#: Blocks per forward in the demo's evaluations: this model is so small that 32 blocks of 64
#: tokens fit easily and run ~20% faster on CPU than the general default of 8.
DEMO_EVAL_BATCH = 32


#: The chat step: conversations evaluated, rows of at most this many tokens.
DEMO_CHAT: dict[str, Any] = {"conversations": 96, "seq_len": 128}

#: What the demo folder takes on disk, at most (five small models, a scan and its report).
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
    model with its card; then build the chat pair and write its barrier on chat data
    (``chat/barrier.json``). Everything goes to ``out_dir`` (built beside it, renamed at the end);
    returns the paths of the parts."""
    out = check_output_dir(out_dir, overwrite, size=DEMO_SIZE)
    from ..analyses.autoselect import auto_select
    from ..analyses.barrier import barrier
    from ..analyses.scan import run_scan
    from ..config.files import write_json_atomic
    from ..engine.data import blocks_for
    from ..model.pair import ModelPair
    from ..outputs.merge.save import save_merged
    from ..outputs.report import render
    from ..testing import build_chat_pair

    with atomic_output_dir(out, overwrite=overwrite, size=DEMO_SIZE, kind="demo") as work:
        demo = build_demo_pair(work / "pair", **pair_overrides)
        pair = ModelPair.from_pretrained(demo.a, demo.b, device="cpu")
        data = DataConfig(data=str(demo.eval_text), seq_len=64)
        blocks = blocks_for(pair, data)
        run_scan(pair, blocks, ScanConfig(granularity="sublayer", base="both", batch_size=DEMO_EVAL_BATCH),
                 work / "scan", progress=progress)
        render(work / "scan")
        choice = auto_select(pair, data, AutoConfig(auto=True, scan_dir=str(work / "scan")), alpha=0.5,
                             batch_size=DEMO_EVAL_BATCH)
        save_merged(pair, choice.spec(), work / "merged", data=data, auto=choice, batch_size=DEMO_EVAL_BATCH,
                    progress=progress)
        del pair
        chat = build_chat_pair(demo, work / "chat", conversations=DEMO_CHAT["conversations"])
        chat_pair = ModelPair.from_pretrained(chat.a, chat.b, device="cpu")
        chat_data = DataConfig(data=str(chat.conversations), chat=True, seq_len=DEMO_CHAT["seq_len"])
        chat_blocks = blocks_for(chat_pair, chat_data)
        result = barrier(chat_pair, chat_blocks, batch_size=DEMO_EVAL_BATCH)
        write_json_atomic(work / "chat" / "barrier.json", {
            "vocabulary": chat_pair.vocab.describe(), "chat": chat_blocks.chat, **result.to_dict()})
    return {"pair": out / "pair", "scan": out / "scan", "report": out / "scan" / "report.html",
            "merged": out / "merged", "card": out / "merged" / "README.md", "chat": out / "chat" / "barrier.json"}


def run(args) -> int:
    """``hf-llmc demo``: the demo into ``--out``, then its scan summary and the paths written."""
    import json

    from .common import console, print_scan_summary

    check_output_dir(args.out, args.overwrite, size=DEMO_SIZE)  # before torch is imported
    parts = run_demo(args.out, overwrite=args.overwrite)
    print_scan_summary(json.loads((parts["scan"] / "summary.json").read_text()))
    chat = json.loads(parts["chat"].read_text())
    vocab = chat["vocabulary"]
    console.print(f"chat pair: {vocab['shared_tokens']} shared tokens, A adds {vocab['added_a']}, B adds {vocab['added_b']} "
                  f"(rows A {vocab['rows_a']}, B {vocab['rows_b']}); full-model barrier on {chat['chat']['conversations']} "
                  f"conversations, assistant tokens only: {chat['barrier_mid']:+.4f} ± {chat['barrier_mid_se']:.4f} nats")
    for name, path in parts.items():
        console.print(f"{name}: {path}")
    return 0
