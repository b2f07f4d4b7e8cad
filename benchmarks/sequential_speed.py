"""Sequential estimation speed: a single-block scan at the default token budget, with and without
``--decide 0.05``, on two locally built pairs.

* ``synthetic``: a 12-block pair built with :func:`hf_llmc.testing.build_pair`: one shared
  initialisation, briefly pre-trained on mixed synthetic text, then fine-tuned twice on two
  different synthetic domains (recipes vs market/weather reports). Evaluation: fresh mixed-domain
  synthetic text.
* ``stdlib``: the same architecture trained the same way on *real* text that ships with the
  interpreter: A is fine-tuned on documentation prose (the language reference topics of
  ``pydoc_data``, the docstrings of the standard library, its ``.txt`` / ``.rst`` files), B on
  standard-library source code (docstrings removed). Evaluation: held-out modules and topics (a
  different 30 % of the files), prose and code documents interleaved, about 2/3 prose — code blocks
  in a prose set.

The data settings are the defaults (262,144 tokens, seq_len = min(1024, max positions) = 256:
1024 blocks). Both scans of a pair (base A, α = 0.5, every decoder block plus the full-model row) run
in one process over the same token blocks:

* full budget: :func:`hf_llmc.run_scan` with ``ScanConfig()``;
* sequential: the same with ``ScanConfig(sequential=SequentialConfig(decide=0.05))`` (the default
  rule, ``robust``; ``--rule fast`` for the other).

Printed per pair: per group the full-budget barrier and its fixed-budget 95 % t interval, the
sequential estimate, interval, decision and tokens used; then tokens evaluated (every block fed to a
forward, endpoints included), process CPU time (``time.process_time``) and wall time of each scan
with their ratios, and how many sequential decisions agree with the full-budget run where its
interval excludes the threshold. Exit status 1 when a pair saves less than 3x the tokens or a
decision disagrees.

Each of ``--runs`` runs (default 3) of a pair is a fresh process started by the shared harness
(``benchmarks/harness.py``) that builds the pair, then runs both scans, their order alternating
between runs; tokens, CPU time and wall time of each scan are reported with their median and range
and written to ``benchmarks/results/sequential_speed.json``.

    python benchmarks/sequential_speed.py                  # both pairs, default budget, 3 runs (~20 min on 2 cores)
    python benchmarks/sequential_speed.py --pairs stdlib   # one pair
    python benchmarks/sequential_speed.py --quick          # 4 blocks, 16k tokens, 3 runs (a few minutes)
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import random
import sys
import sysconfig
import tempfile
import time
import zlib
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from harness import Harness, Method, child_env, common_arguments, report as harness_report, results_path  # noqa: E402

FULL = {"num_layers": 12, "hidden_size": 64, "num_heads": 4, "vocab_size": 512, "max_positions": 256,
        "pretrain_steps": 10, "finetune_steps": 120, "seq_len": 64, "batch_size": 8, "lr": 5e-3,
        "max_tokens": None}
QUICK = {"num_layers": 4, "hidden_size": 32, "num_heads": 4, "vocab_size": 512, "max_positions": 128,
         "pretrain_steps": 2, "finetune_steps": 60, "seq_len": 64, "batch_size": 8, "lr": 5e-3,
         "max_tokens": 16384}
#: Real text needs more training than the templated synthetic domains (about a minute on 2 cores).
STDLIB_STEPS = {"full": {"pretrain_steps": 150, "finetune_steps": 400}, "quick": {"pretrain_steps": 20, "finetune_steps": 60}}
MIN_TOKEN_RATIO = 3.0
PAIRS = ("synthetic", "stdlib")


# -- synthetic pair -------------------------------------------------------------------------------------
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


def synthetic_pair(root: Path, sizes: dict, max_tokens: int) -> tuple[Path, Path, Path]:
    """The synthetic pair and its evaluation text: (A, B, text file)."""
    from transformers import AutoTokenizer

    from hf_llmc.testing import build_pair

    build = {k: v for k, v in sizes.items() if k != "max_tokens"}
    demo = build_pair(root / "pair", model_type="llama", **build)
    text = root / "eval.txt"
    text.write_text(eval_text(AutoTokenizer.from_pretrained(demo.a), max_tokens))
    return demo.a, demo.b, text


# -- real-text pair: the interpreter's documentation and standard library -------------------------------
SKIP_DIRS = {"site-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3"}


def _held_out(name: str, share: float) -> bool:
    return zlib.crc32(name.encode()) % 1000 < share * 1000


def stdlib_documents(eval_share: float = 0.3) -> dict[str, list[str]]:
    """Prose and code documents from the standard library on disk, split by file into train / eval.

    Prose: ``pydoc_data.topics`` (the language reference), docstrings of at least 200 characters, and
    ``.txt`` / ``.rst`` files. Code: each top-level function or class of the ``.py`` files, docstrings
    removed. Tests, ``site-packages`` and ``lib2to3`` are skipped.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    out: dict[str, list[str]] = {f"{k}_{s}": [] for k in ("prose", "code") for s in ("train", "eval")}

    def add(kind: str, name: str, doc: str) -> None:
        out[f"{kind}_{'eval' if _held_out(name, eval_share) else 'train'}"].append(doc)

    try:
        from pydoc_data.topics import topics
    except ImportError:  # pragma: no cover - some distributions strip it
        topics = {}
    for key in sorted(topics):
        add("prose", "topic:" + key, topics[key].strip())
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if set(rel.parts) & SKIP_DIRS or not path.is_file() or path.suffix not in (".py", ".txt", ".rst"):
            continue
        try:
            src = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if path.suffix != ".py":
            add("prose", str(rel), src.strip())
            continue
        try:
            tree = ast.parse(src)
        except (SyntaxError, ValueError):
            continue
        lines, drop = src.splitlines(), set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
                first = node.body[0]
                if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) >= 200:
                        add("prose", f"{rel}:{getattr(node, 'name', '')}:{first.lineno}", doc)
                    drop.update(range(first.lineno - 1, first.end_lineno))
        for node in tree.body:
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                code = "\n".join(line for k, line in enumerate(lines[start - 1:node.end_lineno], start - 1) if k not in drop)
                if len(code) >= 200:
                    add("code", f"{rel}:{node.name}", code.strip())
    return out


def interleave(prose: list[str], code: list[str], chars: int, prose_share: float, seed: int) -> list[str]:
    """Documents drawn at random from both lists until ``chars`` characters, ``prose_share`` of them prose."""
    rng = random.Random(seed)
    prose, code = prose[:], code[:]
    rng.shuffle(prose)
    rng.shuffle(code)
    docs, n_prose, n_code = [], 0, 0
    while n_prose + n_code < chars and (prose or code):
        take_prose = bool(prose) and (not code or n_prose <= prose_share * (n_prose + n_code))
        doc = (prose if take_prose else code).pop()
        docs.append(doc)
        if take_prose:
            n_prose += len(doc)
        else:
            n_code += len(doc)
    return docs


def stdlib_pair(root: Path, sizes: dict, max_tokens: int, seed: int = 0) -> tuple[Path, Path, Path]:
    """A pair fine-tuned on the interpreter's prose (A) and source code (B): (A, B, text file).

    Built like :func:`hf_llmc.testing.build_pair` (same tokenizer, model and training loop), on these
    documents instead of the synthetic domains.
    """
    from hf_llmc.testing import EOS_TOKEN, _blocks, _train_pair, tiny_config, train_tokenizer

    docs = stdlib_documents()
    bs, sl = sizes["batch_size"], sizes["seq_len"]
    tokenizer = train_tokenizer(interleave(docs["prose_train"], docs["code_train"], 400_000, 0.5, seed),
                                sizes["vocab_size"])
    eos = tokenizer.convert_tokens_to_ids(EOS_TOKEN)

    def chars(steps: int) -> int:  # about one fresh block per training sequence (>= 3 characters a token)
        return max(steps * bs * sl, 16 * sl) * 4

    mixed = _blocks(tokenizer, interleave(docs["prose_train"], docs["code_train"], chars(sizes["pretrain_steps"]), 0.5,
                                          seed + 1), sl)
    own_a = _blocks(tokenizer, interleave(docs["prose_train"], [], chars(sizes["finetune_steps"]), 1.0, seed + 2), sl)
    own_b = _blocks(tokenizer, interleave([], docs["code_train"], chars(sizes["finetune_steps"]), 0.0, seed + 3), sl)

    def with_replay(own: torch.Tensor, other: torch.Tensor) -> torch.Tensor:  # as build_pair: 25 % of the other
        return torch.cat([own, other[: int(round(0.25 * own.shape[0]))]])

    config = tiny_config("llama", num_layers=sizes["num_layers"], hidden_size=sizes["hidden_size"],
                         num_heads=sizes["num_heads"], vocab_size=len(tokenizer), max_positions=sizes["max_positions"],
                         bos_token_id=eos, eos_token_id=eos)
    out = root / "pair"
    out.mkdir(parents=True, exist_ok=True)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _train_pair(config, out, mixed, {"a": with_replay(own_a, own_b), "b": with_replay(own_b, own_a)}, tokenizer,
                    pretrain_steps=sizes["pretrain_steps"], finetune_steps=sizes["finetune_steps"], batch_size=bs,
                    lr=sizes["lr"], seed=seed, dtype=torch.float32)
    finally:
        torch.set_num_threads(previous)
    text = root / "eval.txt"
    evaluation = interleave(docs["prose_eval"], docs["code_eval"], 4 * max_tokens + 100_000, 2 / 3, seed + 4)
    text.write_text("\n\n".join(evaluation) + "\n")
    return out / "a", out / "b", text


# -- the two scans ----------------------------------------------------------------------------------------
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


def run(kind: str, sizes: dict, threshold: float, rule: str, threads: int | None, root: Path,
        order: tuple[str, ...] = ("full", "sequential")) -> dict:
    from hf_llmc import DataConfig, ModelPair, ScanConfig, SequentialConfig, run_scan
    from hf_llmc.config.data import DEFAULT_MAX_TOKENS

    if threads:
        torch.set_num_threads(threads)
    max_tokens = sizes["max_tokens"] or DEFAULT_MAX_TOKENS
    t0 = time.perf_counter()
    if kind == "synthetic":
        a, b, text = synthetic_pair(root, sizes, max_tokens)
    else:
        steps = STDLIB_STEPS["quick" if sizes["max_tokens"] else "full"]
        a, b, text = stdlib_pair(root, {**sizes, **steps}, max_tokens)
    build_s = time.perf_counter() - t0
    pair = ModelPair.from_pretrained(a, b, device="cpu")
    blocks = pair.blocks(DataConfig(data=str(text), max_tokens=max_tokens))
    pair.evaluator(blocks).run([0])  # warm-up (first-forward costs) outside both timings

    seq_cfg = SequentialConfig(decide=threshold, rule=rule)
    configs = {"full": ScanConfig(), "sequential": ScanConfig(sequential=seq_cfg)}
    wall, cpu, rows = {}, {}, {}
    for name in order:
        t0, c0 = time.perf_counter(), time.process_time()
        rows[name] = run_scan(pair, blocks, configs[name], root / name, progress=False)
        wall[name], cpu[name] = time.perf_counter() - t0, time.process_time() - c0

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
    ends = {r["base"]: r["loss"] for r in rows["full"] if r.get("kind") == "endpoint"}
    return {
        "pair": kind, "sizes": {**sizes, "max_tokens": max_tokens}, "threshold": threshold, "rule": rule,
        "threads": torch.get_num_threads(), "blocks": blocks.num_blocks, "seq_len": blocks.seq_len,
        "loss_a": ends.get("a"), "loss_b": ends.get("b"), "build_s": round(build_s, 1),
        "wall_s": {k: round(v, 2) for k, v in wall.items()}, "cpu_s": {k: round(v, 2) for k, v in cpu.items()},
        "tokens_evaluated": tokens, "token_ratio": tokens["full"] / tokens["sequential"],
        "wall_ratio": wall["full"] / wall["sequential"], "cpu_ratio": cpu["full"] / cpu["sequential"],
        "decided_full": decided_full, "agree": agree, "undecided_sequential": undecided_seq, "disagree": disagree,
        "groups": table, "order": list(order),
    }


def show(res: dict) -> None:
    print(f"\n== {res['pair']} pair: {res['blocks']} blocks x {res['seq_len']} tokens, L_A {res['loss_a']:.3f}, "
          f"L_B {res['loss_b']:.3f}, threshold T = {res['threshold']} nats, rule {res['rule']}, {res['threads']} "
          f"thread(s); pair built in {res['build_s']} s")
    print(f"{'group':<10} {'full barrier':>13} {'full 95% CI':>19} {'full':>9} | {'seq barrier':>12} "
          f"{'seq interval':>19} {'decision':>9} {'stop':>9} {'tokens':>8} {'end.blk':>7}")
    for g in res["groups"]:
        si = g["seq_interval"] or [math.nan, math.nan]
        fi = g["full_interval"]
        print(f"{g['group']:<10} {g['full_barrier']:>+13.4f} [{fi[0]:+.3f},{fi[1]:+.3f}] "
              f"{g['full_decision']:>9} | {g['seq_barrier']:>+12.4f} [{si[0]:+.3f},{si[1]:+.3f}] "
              f"{g['seq_decision']:>9} {g['stop_reason']:>9} {g['tokens_used']:>8} {g['endpoint_blocks']:>7}")
    t, w, c = res["tokens_evaluated"], res["wall_s"], res["cpu_s"]
    print(f"tokens evaluated: full {t['full']:,}, sequential {t['sequential']:,} -> ratio {res['token_ratio']:.1f}x")
    print(f"CPU time: full {c['full']:.1f} s, sequential {c['sequential']:.1f} s -> ratio {res['cpu_ratio']:.1f}x")
    print(f"wall time: full {w['full']:.1f} s, sequential {w['sequential']:.1f} s -> ratio {res['wall_ratio']:.1f}x")
    print(f"decisions: the full-budget interval excludes T for {res['decided_full']} of {len(res['groups'])} points; "
          f"sequential agrees on {res['agree']}, undecided on {res['undecided_sequential']}, "
          f"disagrees on {res['disagree']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common_arguments(parser)
    parser.add_argument("--pairs", default=",".join(PAIRS), help="Comma-separated: synthetic, stdlib.")
    parser.add_argument("--decide", type=float, default=0.05, help="Threshold T of the sequential run (nats).")
    parser.add_argument("--rule", default="robust", choices=["robust", "fast"], help="The sequential rule.")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 gives stable numbers on a shared machine).")
    parser.add_argument("--json-out", help="Also write the last run of every pair (every group) as JSON here.")
    parser.add_argument("--child", nargs=2, metavar=("PAIR", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.child:  # one run of one pair, in a fresh process started by the harness
        kind, out = args.child
        order = ("sequential", "full") if os.environ.get("SEQ_BENCH_ORDER") == "sequential-first" else ("full", "sequential")
        with tempfile.TemporaryDirectory(prefix=f"hf-llmc-seq-speed-{kind}-") as tmp:
            res = run(kind, sizes, args.decide, args.rule, args.threads, Path(tmp), order)
        Path(out).write_text(json.dumps(res, indent=2) + "\n")
        t = res["tokens_evaluated"]
        harness_report(tokens_full=t["full"], tokens_sequential=t["sequential"], token_ratio=res["token_ratio"],
                       cpu_full_s=res["cpu_s"]["full"], cpu_sequential_s=res["cpu_s"]["sequential"],
                       cpu_ratio=res["cpu_ratio"], wall_full_s=res["wall_s"]["full"],
                       wall_sequential_s=res["wall_s"]["sequential"], wall_ratio=res["wall_ratio"],
                       build_s=res["build_s"], decided_full=res["decided_full"], agree=res["agree"],
                       undecided_sequential=res["undecided_sequential"], disagree=res["disagree"])
        return 0
    kinds = [k.strip() for k in args.pairs.split(",") if k.strip()]
    if not kinds or set(kinds) - set(PAIRS):
        parser.error(f"--pairs: use {', '.join(PAIRS)}")
    bench = Harness("sequential_speed", "Sequential estimation", quick=args.quick or args.runs < 3, note=args.note)
    results, ok = [], True
    with tempfile.TemporaryDirectory(prefix="hf-llmc-seq-speed-runs-") as tmp:
        for kind in kinds:
            last = Path(tmp) / f"{kind}.json"
            argv_child = [sys.executable, __file__, "--child", kind, str(last), "--decide", repr(args.decide),
                          "--rule", args.rule, "--threads", str(args.threads)] + (["--quick"] if args.quick else [])
            method = Method("both scans", argv_child, env=child_env(OMP_NUM_THREADS=str(args.threads)))
            rounds = [0]

            def alternate(method=method, rounds=rounds) -> None:  # the two scans' order alternates between runs
                method.env["SEQ_BENCH_ORDER"] = "full-first" if rounds[0] % 2 == 0 else "sequential-first"
                rounds[0] += 1

            method.prepare = alternate
            cond = bench.run(f"{kind} pair, single-block scan", [method], runs=args.runs, warmup=0,
                             description="in-process warm-up: one forward before both scans")
            res = json.loads(last.read_text())
            show(res)
            sm = cond["methods"]["both scans"]["summary"]

            def spread(key: str, digits: int = 1, sm=sm) -> str:
                x = sm[key]
                return f"{x['median']:.{digits}f} ({x['min']:.{digits}f}-{x['max']:.{digits}f})"

            print(f"over {args.runs} runs: tokens ratio {spread('token_ratio')}x, CPU-time ratio {spread('cpu_ratio')}x, "
                  f"wall-time ratio {spread('wall_ratio')}x; disagreements at most {sm['disagree']['max']:.0f}")
            ok &= sm["disagree"]["max"] == 0 and (args.quick or sm["token_ratio"]["min"] >= MIN_TOKEN_RATIO)
            results.append(res)
    path = results_path(args, "sequential_speed")
    if path:
        bench.save(params={"sizes": results[-1]["sizes"], "threshold": args.decide, "rule": args.rule,
                           "threads": args.threads, "pairs": kinds},
                   path=path, last_run={r["pair"]: {"blocks": r["blocks"], "seq_len": r["seq_len"], "groups": r["groups"]}
                                        for r in results})
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
