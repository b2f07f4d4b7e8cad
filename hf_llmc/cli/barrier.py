"""``hf-llmc barrier A B --data TEXT [--layers SPEC]``: the barrier of one path."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config.alphas import parse_alphas
from ..config.files import write_json_atomic
from ..config.spec import parse_spec
from .common import check_json_out, data_config, sequential_config


def run(args: argparse.Namespace) -> int:
    # Every option is checked before torch is imported or a model is loaded.
    alphas = parse_alphas(args.alphas, allow_extrapolation=args.allow_extrapolation)
    if args.layers:
        parse_spec(args.layers)
    data = data_config(args)
    sequential = sequential_config(args)
    check_json_out(args)

    from rich.table import Table

    from ..analyses.barrier import barrier
    from ..analyses.distributed import is_main_process, setup_parallel
    from ..config.security import display_name
    from ..engine.data import blocks_for
    from ..engine.provenance import environment
    from ..model.placement import loading_info
    from .common import console, fmt, load_pair, print_chat_data, quant_overrides

    shard = setup_parallel(args)
    pair = load_pair(args, **quant_overrides(args))
    pair.shard = shard
    if args.layers:
        pair.groups(args.layers)  # validate the spec against the model before any data work
    if data.multiple:
        return run_sets(args, pair, data, alphas, sequential)
    blocks = blocks_for(pair, data)  # kept for the data fingerprint of --json-out
    result = barrier(pair, blocks, layers=args.layers, alphas=alphas, base=args.base, method=args.method,
                     batch_size=args.batch_size, sequential=sequential, metric=args.metric)
    if not is_main_process():
        return 0  # only process 0 prints and writes
    if pair.vocab is not None:
        console.print(pair.vocab.summary())
    print_chat_data(blocks)
    table = Table(title=f"barrier of {args.layers or 'the full model'} (base {args.base.upper()}, {args.method})")
    estimates = result.extra.get("barrier_curve")  # sequential: regression estimates per alpha
    for col in ("alpha", "loss", "perplexity", "accuracy", "loss - reference" if estimates is None else "barrier (estimate)"):
        table.add_column(col, justify="right")
    for k, (a, loss, ppl, acc) in enumerate(zip(result.alphas, result.loss, result.perplexity, result.accuracy)):
        ref = (1 - a) * result.loss_a + a * result.loss_b
        table.add_row(f"{a:g}", fmt(loss), f"{ppl:.3f}", fmt(acc), f"{loss - ref if estimates is None else estimates[k]:+.4f}")
    console.print(table)
    console.print(
        f"barrier_mid = {result.barrier_mid:+.4f} ± {result.barrier_mid_se:.4f} nats "
        f"(perplexity x{result.barrier_mid_ratio:.4f}); barrier_max = {result.barrier_max:+.4f}; "
        f"tokens = {result.tokens:,}"
    )
    if args.metric == "bpb" and result.bpb_barrier_mid is not None:
        console.print(f"bits per byte: A {result.bits_per_byte_a:.4f}, B {result.bits_per_byte_b:.4f}; "
                      f"barrier_mid = {result.bpb_barrier_mid:+.4f} ± {result.bpb_barrier_mid_se:.4f}, "
                      f"barrier_max = {result.bpb_barrier_max:+.4f} bits/byte")
    if sequential is not None:
        x = result.extra
        low, high = x["barrier_mid_interval"] or (float("nan"), float("nan"))
        verdict = f"decision {x['decision']} (T = {sequential.decide:g}); " if sequential.decide is not None else ""
        console.print(
            f"sequential: {verdict}{100 * sequential.confidence:g}% interval [{low:+.4f}, {high:+.4f}] "
            f"({x['interval_method']}); tokens used {result.tokens:,} of {x['tokens_ceiling']:,} "
            f"(stop: {x['stop_reason']}; endpoints on {x['endpoint_blocks']} blocks)"
        )
    if args.json_out:
        payload = {"model_a": display_name(args.model_a), "model_b": display_name(args.model_b),
                   "revision_a": args.revision_a, "revision_b": args.revision_b, **result.to_dict()}
        payload.update(loading_info(pair))
        if shard is not None:
            payload["parallel"] = {"mode": "data", "processes": shard.num_processes}
        payload["data"] = {"source": display_name(blocks.source), "fingerprint": blocks.fingerprint,
                           "num_blocks": blocks.num_blocks, "seq_len": blocks.seq_len,
                           **({"chat": blocks.chat} if blocks.chat else {})}
        payload["environment"] = environment(pair.model)
        write_json_atomic(Path(args.json_out).expanduser(), payload)
    return 0


def run_sets(args: argparse.Namespace, pair, data, alphas: list[float], sequential) -> int:
    """``barrier`` on several named evaluation sets: one table per set, then the averages."""
    from rich.table import Table

    from ..analyses.barrier import average_barriers, barrier_sets
    from ..analyses.distributed import is_main_process
    from ..config.security import display_name
    from ..engine.data import sets_for
    from ..engine.provenance import environment
    from ..model.placement import loading_info
    from .common import console, fmt, print_chat_data

    sets = sets_for(pair, data)
    results = barrier_sets(pair, sets, layers=args.layers, alphas=alphas, base=args.base, method=args.method,
                           batch_size=args.batch_size, sequential=sequential, metric=args.metric)
    if not is_main_process():
        return 0
    averages = average_barriers(results)
    print_chat_data(sets)
    for name, result in results.items():
        table = Table(title=f"{name}: barrier of {args.layers or 'the full model'} (base {args.base.upper()}, {args.method})")
        for col in ("alpha", "loss", "perplexity", "accuracy", "bits/byte", "loss - reference"):
            table.add_column(col, justify="right")
        for k, (a, loss, ppl, acc) in enumerate(zip(result.alphas, result.loss, result.perplexity, result.accuracy)):
            ref = (1 - a) * result.loss_a + a * result.loss_b
            bpb = result.bits_per_byte[k] if result.bits_per_byte else None
            table.add_row(f"{a:g}", fmt(loss), f"{ppl:.3f}", fmt(acc), "-" if bpb is None else fmt(bpb), f"{loss - ref:+.4f}")
        console.print(table)
    for name, result in results.items():
        bpb = "" if result.bpb_barrier_mid is None else f" ({result.bpb_barrier_mid:+.4f} bits/byte)"
        verdict = f"; decision {result.extra['decision']}" if result.extra.get("decision") else ""
        console.print(f"{name}: barrier_mid = {result.barrier_mid:+.4f} ± {result.barrier_mid_se:.4f} nats{bpb}; "
                      f"barrier_max = {result.barrier_max:+.4f}; tokens = {result.tokens:,}{verdict}")
    for how, label in (("mean", "token-weighted mean"), ("macro", "macro average")):
        a = averages[how]
        console.print(f"{label}: barrier_mid = {a['barrier_mid']:+.4f} ± {a['barrier_mid_se']:.4f} nats")
    if args.json_out:
        payload = {"model_a": display_name(args.model_a), "model_b": display_name(args.model_b),
                   "revision_a": args.revision_a, "revision_b": args.revision_b,
                   "datasets": {n: r.to_dict() for n, r in results.items()}, "averages": averages}
        payload.update(loading_info(pair))
        payload["data"] = {b.name: {"source": display_name(b.source), "fingerprint": b.fingerprint,
                                    "num_blocks": b.num_blocks, "seq_len": b.seq_len} for b in sets}
        payload["environment"] = environment(pair.model)
        write_json_atomic(Path(args.json_out).expanduser(), payload)
    return 0
