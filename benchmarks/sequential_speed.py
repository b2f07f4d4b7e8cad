"""Sequential estimation speed: a single-block scan at the default token budget, with and without
``--decide 0.05``.

A 12-block pair is built locally with :func:`hf_llmc.demo.build_pair`: one shared initialisation,
briefly pre-trained on mixed synthetic text, then fine-tuned twice on two different synthetic
domains (recipes vs market/weather reports), so the single-block barriers are real and varied.
The evaluation text is fresh mixed-domain text; the data settings are the defaults (262,144
tokens, seq_len = min(1024, max positions)).

Both scans (base A, α = 0.5, every decoder block plus the full-model row) run in one process over
the same token blocks:

* full budget: :func:`hf_llmc.scan.run_scan` with ``ScanConfig()``;
* sequential: the same with ``ScanConfig(sequential=SequentialConfig(decide=0.05))``.

Printed: per group the full-budget barrier and its fixed-budget 95 % t interval, the sequential
estimate, interval, decision and tokens used; then the ratio of tokens evaluated (every block fed
to a forward, endpoints included: full / sequential), the ratio of wall-clock time, and how many
sequential decisions agree with the full-budget run where its interval excludes the threshold.

Each of ``--runs`` runs (default 3) is a fresh process started by the shared harness
(``benchmarks/harness.py``) that builds the pair, then runs both scans, the order alternating
between runs; CPU time (``time.process_time``) and tokens of each scan are reported with their
median and range, and written to ``benchmarks/results/sequential_speed.json``.

    python benchmarks/sequential_speed.py            # 12 blocks, default budget, 3 runs (~6 min on 2 cores)
    python benchmarks/sequential_speed.py --quick    # 4 blocks, 16k tokens, 3 runs (~2 min)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from harness import Harness, Method, child_env, common_arguments, report, results_path  # noqa: E402

FULL = {"num_layers": 12, "hidden_size": 64, "num_heads": 4, "vocab_size": 512, "max_positions": 256,
        "pretrain_steps": 10, "finetune_steps": 120, "seq_len": 64, "batch_size": 8, "lr": 5e-3,
        "max_tokens": None}
QUICK = {"num_layers": 4, "hidden_size": 32, "num_heads": 4, "vocab_size": 512, "max_positions": 128,
         "pretrain_steps": 2, "finetune_steps": 60, "seq_len": 64, "batch_size": 8, "lr": 5e-3,
         "max_tokens": 16384}


def eval_text(tokenizer, n_tokens: int, seed: int = 4242) -> str:
    """Mixed-domain text of at least ``n_tokens`` tokens (documents no training set used)."""
    from hf_llmc.testing import synthetic_documents

    docs: list[str] = []
    chunk = 0
    while True:
        docs += synthetic_documents("mixed", 200, seed * 1000 + chunk)
        chunk += 1
        text = "\n\n".join(docs) + "\n"
        if len(tokenizer(text)["input_ids"]) > n_tokens * 1.02:
            return text


def fixed_decision(mean: float, se: float, n: int, threshold: float, confidence: float) -> tuple[list[float], str]:
    """The full-budget run's own interval (one fixed n, no looks) and its decision."""
    from hf_llmc.engine.stats import t_quantile

    half = t_quantile(1 - (1 - confidence) / 2, n - 1) * se
    low, high = mean - half, mean + half
    return [low, high], "above" if low > threshold else "below" if high < threshold else "undecided"


def evaluated_tokens(rows: list[dict]) -> int:
    """Tokens fed to forwards: the endpoints' blocks (last row per endpoint) plus every point's."""
    ends = {r["base"]: r["tokens"] for r in rows if r.get("kind") == "endpoint"}
    return sum(ends.values()) + sum(r["tokens"] for r in rows if r.get("kind") != "endpoint")


def run(sizes: dict, threshold: float, threads: int | None, root: Path,
        order: tuple[str, ...] = ("full", "sequential")) -> dict:
    import torch

    from hf_llmc import DataConfig
    from hf_llmc.config.data import DEFAULT_MAX_TOKENS
    from hf_llmc.testing import build_pair
    from hf_llmc import ModelPair
    from hf_llmc import ScanConfig, run_scan
    from hf_llmc import SequentialConfig

    if threads:
        torch.set_num_threads(threads)
    build = {k: v for k, v in sizes.items() if k != "max_tokens"}
    t0 = time.perf_counter()
    demo = build_pair(root / "pair", model_type="llama", **build)
    build_s = time.perf_counter() - t0
    pair = ModelPair.from_pretrained(demo.a, demo.b, device="cpu")
    max_tokens = sizes["max_tokens"] or DEFAULT_MAX_TOKENS
    text = root / "eval.txt"
    text.write_text(eval_text(pair.tokenizer, max_tokens))
    blocks = pair.blocks(DataConfig(data=str(text), max_tokens=max_tokens))
    pair.evaluator(blocks).run([0])  # warm-up (first-forward costs) outside both timings

    seq_cfg = SequentialConfig(decide=threshold)
    timings, cpu, rows = {}, {}, {}
    configs = {"full": ScanConfig(), "sequential": ScanConfig(sequential=seq_cfg)}
    for name in order:
        t0, c0 = time.perf_counter(), time.process_time()
        rows[name] = run_scan(pair, blocks, configs[name], root / name, progress=False)
        timings[name] = time.perf_counter() - t0
        cpu[name] = time.process_time() - c0

    full = {r["group"]: r for r in rows["full"] if r.get("kind") != "endpoint"}
    seq = {r["group"]: r for r in rows["sequential"] if r.get("kind") != "endpoint"}
    table, agree, disagree, undecided_seq, decided_full = [], 0, 0, 0, 0
    for group, f in full.items():
        s = seq[group]
        interval, verdict = fixed_decision(f["barrier"], f["barrier_se"], blocks.num_blocks, threshold,
                                           seq_cfg.confidence)
        if verdict != "undecided":
            decided_full += 1
            if s["decision"] == verdict:
                agree += 1
            elif s["decision"] == "undecided":
                undecided_seq += 1
            else:
                disagree += 1
        table.append({"group": group, "full_barrier": f["barrier"], "full_interval": interval, "full_decision": verdict,
                      "seq_barrier": s["barrier"], "seq_interval": s["interval"], "seq_decision": s["decision"],
                      "stop_reason": s["stop_reason"], "tokens_used": s["tokens"],
                      "endpoint_blocks": s["endpoint_blocks"]})
    tokens = {name: evaluated_tokens(r) for name, r in rows.items()}
    return {
        "sizes": {**sizes, "max_tokens": max_tokens}, "threshold": threshold, "threads": torch.get_num_threads(),
        "blocks": blocks.num_blocks, "seq_len": blocks.seq_len, "build_s": round(build_s, 1),
        "wall_s": {k: round(v, 2) for k, v in timings.items()}, "tokens_evaluated": tokens,
        "cpu_s": {k: round(v, 2) for k, v in cpu.items()}, "order": list(order),
        "token_ratio": tokens["full"] / tokens["sequential"], "time_ratio": timings["full"] / timings["sequential"],
        "cpu_ratio": cpu["full"] / cpu["sequential"],
        "decided_full": decided_full, "agree": agree, "undecided_sequential": undecided_seq, "disagree": disagree,
        "groups": table,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common_arguments(parser)
    parser.add_argument("--decide", type=float, default=0.05, help="Threshold T of the sequential run (nats).")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 gives stable numbers on a shared machine).")
    parser.add_argument("--json-out", help="Also write the last run's full results (every group) as JSON here.")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:  # one run, in a fresh process started by the harness
        order = ("sequential", "full") if os.environ.get("SEQ_BENCH_ORDER") == "sequential-first" else ("full", "sequential")
        with tempfile.TemporaryDirectory(prefix="hf-llmc-seq-speed-") as tmp:
            res = run(QUICK if args.quick else FULL, args.decide, args.threads, Path(tmp), order)
        Path(args.child).write_text(json.dumps(res, indent=2) + "\n")
        t = res["tokens_evaluated"]
        report(tokens_full=t["full"], tokens_sequential=t["sequential"], token_ratio=res["token_ratio"],
               cpu_full_s=res["cpu_s"]["full"], cpu_sequential_s=res["cpu_s"]["sequential"], cpu_ratio=res["cpu_ratio"],
               wall_full_s=res["wall_s"]["full"], wall_sequential_s=res["wall_s"]["sequential"],
               wall_ratio=res["time_ratio"], build_s=res["build_s"], decided_full=res["decided_full"],
               agree=res["agree"], undecided_sequential=res["undecided_sequential"], disagree=res["disagree"])
        return 0

    with tempfile.TemporaryDirectory(prefix="hf-llmc-seq-speed-runs-") as tmp:
        last = Path(tmp) / "last.json"
        argv_child = [sys.executable, __file__, "--child", str(last), "--decide", repr(args.decide),
                      "--threads", str(args.threads)] + (["--quick"] if args.quick else [])
        method = Method("both scans", argv_child, env=child_env(OMP_NUM_THREADS=str(args.threads)))
        rounds = [0]

        def alternate() -> None:  # the two scans' order alternates between runs
            method.env["SEQ_BENCH_ORDER"] = "full-first" if rounds[0] % 2 == 0 else "sequential-first"
            rounds[0] += 1

        method.prepare = alternate
        bench = Harness("sequential_speed", "Sequential estimation", quick=args.quick or args.runs < 3, note=args.note)
        cond = bench.run("single-block scan", [method], runs=args.runs, warmup=0,
                         description="in-process warm-up: one forward before both scans")
        res = json.loads(last.read_text())
    print(f"{res['blocks']} blocks x {res['seq_len']} tokens, threshold T = {res['threshold']} nats, "
          f"{res['threads']} thread(s); pair built in {res['build_s']} s (last run)")
    print(f"{'group':<10} {'full barrier':>13} {'full 95% CI':>19} {'full':>9} | {'seq barrier':>12} "
          f"{'seq interval':>19} {'decision':>9} {'stop':>9} {'tokens':>8} {'end.blk':>7}")
    for g in res["groups"]:
        si = g["seq_interval"] or [math.nan, math.nan]
        fi = g["full_interval"]
        print(f"{g['group']:<10} {g['full_barrier']:>+13.4f} [{fi[0]:+.3f},{fi[1]:+.3f}] "
              f"{g['full_decision']:>9} | {g['seq_barrier']:>+12.4f} [{si[0]:+.3f},{si[1]:+.3f}] "
              f"{g['seq_decision']:>9} {g['stop_reason']:>9} {g['tokens_used']:>8} {g['endpoint_blocks']:>7}")
    sm = cond["methods"]["both scans"]["summary"]

    def show(key: str, digits: int = 1) -> str:
        x = sm[key]
        return f"{x['median']:.{digits}f} ({x['min']:.{digits}f}-{x['max']:.{digits}f})"

    print(f"tokens evaluated: full {sm['tokens_full']['median']:,.0f}, sequential {sm['tokens_sequential']['median']:,.0f} "
          f"-> ratio {show('token_ratio')}x")
    print(f"CPU time: full {show('cpu_full_s')} s, sequential {show('cpu_sequential_s')} s -> ratio {show('cpu_ratio')}x; "
          f"wall-time ratio {show('wall_ratio')}x")
    print(f"decisions (last run): the full-budget interval excludes T for {res['decided_full']} of {len(res['groups'])} points; "
          f"sequential agrees on {res['agree']}, undecided on {res['undecided_sequential']}, "
          f"disagrees on {res['disagree']}")
    path = results_path(args, "sequential_speed")
    if path:
        bench.save(params={"sizes": res["sizes"], "threshold": res["threshold"], "threads": res["threads"],
                           "blocks": res["blocks"], "seq_len": res["seq_len"]}, path=path,
                   last_run={"points": len(res["groups"]), "groups": res["groups"], "order": res["order"]})
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(res, indent=2) + "\n")
    return 0 if sm["disagree"]["max"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
