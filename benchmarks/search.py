"""Merge search: the sequential search against a full-budget coordinate search, and the balanced point
against the uniform average, on a 12-block pair fine-tuned on two real-text domains.

The pair is ``benchmarks/sequential_speed.py``'s ``stdlib`` pair (Llama-shaped, 12 blocks, hidden 64,
vocabulary 512; one shared initialisation pre-trained on mixed text, then A fine-tuned on the
interpreter's documentation prose, B on its standard-library source code). Two evaluation sets from
files no training set used: ``prose`` (held-out topics, docstrings, .txt/.rst) and ``code`` (held-out
modules). Each set: ``--blocks`` blocks of 64 tokens, the last quarter held out (never seen by either
search).

One run (a fresh process, through ``benchmarks/harness.py``) runs two searches with the same settings
over the same blocks, their order alternating between runs:

* ``sequential``: ``hf-llmc search`` as shipped (paired sequential comparisons, robust rule);
* ``full budget``: the same coordinate search with every comparison on every search block
  (``--full-budget``), the front compared on every search block.

Reported: tokens evaluated by each (comparisons + front; the held-out check is the same for both and
reported apart), CPU and wall time, whether both fronts agree within their intervals (each point of
one front has a point of the other whose paired held-out differences on both sets have 95 % intervals
containing 0, or the same α map), and the balanced point of the sequential search against the uniform
average on held-out blocks: the worst-case loss increase of each (loss minus the better endpoint's,
maximised over the sets), their difference with its interval, and the loss on each set with paired
intervals. Exit status 1 when the token ratio is below 10 or the balanced point does not beat the
uniform average by more than the interval (not checked with ``--quick``).

    python benchmarks/search.py              # 2048 blocks per set, 1 run (~15-20 min on one quiet core, pair built once and cached)
    python benchmarks/search.py --quick      # 512 blocks per set, 2 directions: a few minutes
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from harness import Harness, Method, child_env, common_arguments, report as harness_report, results_path, run_child  # noqa: E402

SEQ_LEN = 64
FULL = {"blocks": 2048, "alphas": "0,0.5,1", "directions": "0.5,1,0", "max_sweeps": 2}
QUICK = {"blocks": 512, "alphas": "0,0.5,1", "directions": "0.5,1", "max_sweeps": 1}
MIN_TOKEN_RATIO = 10.0
CACHE = Path(os.environ.get("HF_LLMC_BENCH_CACHE", Path.home() / ".cache" / "hf_llmc_bench"))


def build(root: Path) -> dict:
    """The stdlib pair and the two set files in ``root`` (built once; reused when present)."""
    import sequential_speed as ss

    done = root / "built.json"
    if done.is_file():
        return json.loads(done.read_text())
    t0 = time.perf_counter()
    sizes = {**ss.FULL, **ss.STDLIB_STEPS["full"]}
    a, b, _ = ss.stdlib_pair(root, sizes, 262144)
    docs = ss.stdlib_documents()
    sets = {}
    for name, key, share in (("prose", "prose_eval", 1.0), ("code", "code_eval", 0.0)):
        chosen = ss.interleave(docs[key] if share else [], [] if share else docs[key], 1_500_000, share, 5)
        (root / f"{name}.txt").write_text("\n\n".join(chosen) + "\n")
        sets[name] = str(root / f"{name}.txt")
    info = {"a": str(a), "b": str(b), "sets": sets, "build_s": round(time.perf_counter() - t0, 1)}
    done.write_text(json.dumps(info))
    return info


def _front_match(rows_x: dict, rows_y: dict, front_x: list[str], front_y: list[str], names: list[str]) -> int:
    """How many points of front x have a point of front y within the intervals (or the same α map)."""
    import torch

    from hf_llmc.engine.stats import paired_standard_error, t_quantile

    matched = 0
    for kx in front_x:
        for ky in front_y:
            if kx == ky:
                matched += 1
                break
            ok = True
            for n in names:
                d = torch.tensor(rows_x[kx][n], dtype=torch.float64) - torch.tensor(rows_y[ky][n], dtype=torch.float64)
                se = paired_standard_error(d)[0]
                half = t_quantile(0.975, d.numel() - 1) * se
                if not float(d.mean()) - half <= 0 <= float(d.mean()) + half:
                    ok = False
                    break
            if ok:
                matched += 1
                break
    return matched


def _heldout(path: Path) -> dict:
    out: dict = {}
    for line in (path / "search.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["kind"] == "heldout":
            out.setdefault(row["candidate"], {})[row["set"]] = row["losses"]
    return out


def run(sizes: dict, threads: int, info: dict, root: Path, order: tuple[str, ...]) -> dict:
    import torch

    from hf_llmc import DataConfig, ModelPair
    from hf_llmc.analyses.search import run_search
    from hf_llmc.config.search import SearchConfig

    torch.set_num_threads(threads)
    pair = ModelPair.from_pretrained(info["a"], info["b"], device="cpu")
    data = DataConfig(data="unused", seq_len=SEQ_LEN, max_tokens=SEQ_LEN * sizes["blocks"])
    pair.evaluator(pair.blocks(DataConfig(data=info["sets"]["prose"], seq_len=SEQ_LEN, max_tokens=SEQ_LEN * 8))).run([0])
    settings = {k: sizes[k] for k in ("alphas", "directions", "max_sweeps")}
    res, wall, cpu = {}, {}, {}
    for name in order:
        cfg = SearchConfig(**settings, full_budget=name == "full")
        t0, c0 = time.perf_counter(), time.process_time()
        res[name] = run_search(pair, info["sets"], cfg, root / name, data=data, overwrite=True)
        wall[name], cpu[name] = time.perf_counter() - t0, time.process_time() - c0
    seq, full = res["sequential"], res["full"]
    names = seq["result"]["sets"]
    tokens = {k: v["tokens"]["search"] + v["tokens"]["front"] for k, v in res.items()}
    held = {k: _heldout(root / k) for k in res}
    fronts = {k: [p["key"] for p in v["result"]["front"]] for k, v in res.items()}
    r = seq["result"]
    c, u = r["chosen"], r["endpoints"]["uniform"]
    d = r["chosen_vs_uniform_worst_increase"]
    comparisons = {}
    for k in res:
        rows = [json.loads(line) for line in (root / k / "search.jsonl").read_text().splitlines()]
        comp = [row for row in rows if row["kind"] == "comparison"]
        comparisons[k] = {"count": len(comp), "accepted": sum(row["accepted"] for row in comp),
                          "first_look_only": sum(all(v["blocks"] <= 96 for v in row["sets"].values()) for row in comp)}
    return {
        "sizes": sizes, "threads": threads, "build_s": info.get("build_s"), "order": list(order),
        "sets": {n: seq["sets"][n] for n in names},
        "tokens": tokens, "token_ratio": tokens["full"] / tokens["sequential"],
        "heldout_tokens": seq["tokens"]["heldout"],
        "wall_s": {k: round(v, 2) for k, v in wall.items()}, "cpu_s": {k: round(v, 2) for k, v in cpu.items()},
        "wall_ratio": wall["full"] / wall["sequential"], "cpu_ratio": cpu["full"] / cpu["sequential"],
        "comparisons": comparisons,
        "fronts": {k: [{"key": p["key"], **{n: p["heldout"][n]["loss"] for n in names}} for p in v["result"]["front"]]
                   for k, v in res.items()},
        "front_match": {"sequential_in_full": _front_match(held["sequential"], held["full"], fronts["sequential"], fronts["full"], names),
                        "full_in_sequential": _front_match(held["full"], held["sequential"], fronts["full"], fronts["sequential"], names),
                        "sizes": {k: len(v) for k, v in fronts.items()}},
        "picks_same": seq["result"]["chosen"]["key"] == full["result"]["chosen"]["key"],
        "endpoints": {k: {n: r["endpoints"][k]["heldout"][n]["loss"] for n in names} for k in ("a", "b", "uniform")},
        "chosen": {"key": c["key"], "alphas": c["alphas"], "worst_increase": c["worst_increase"],
                   **{n: {"loss": c["heldout"][n]["loss"], "se": c["heldout"][n]["se"],
                          "vs_uniform": c["heldout"][n]["vs_uniform"]} for n in names}},
        "uniform_worst_increase": u["worst_increase"],
        "chosen_minus_uniform": d,
        "beats_uniform": d["interval"][1] < 0,
        "uniform_on_front_or_dominated": bool(r["uniform_on_front"] or r["uniform_dominated_by"]),
    }


def show(res: dict) -> None:
    s, t, w, c = res["sizes"], res["tokens"], res["wall_s"], res["cpu_s"]
    shown = ", ".join(f"{n} ({v['search_blocks']}+{v['holdout_blocks']} blocks)" for n, v in res["sets"].items())
    print(f"\n== stdlib pair, sets {shown}; "
          f"alphas {s['alphas']}, directions {s['directions']}, {s['max_sweeps']} sweep(s), {res['threads']} thread(s)")
    print(f"tokens (comparisons + front): full budget {t['full']:,}, sequential {t['sequential']:,} -> {res['token_ratio']:.1f}x "
          f"(held-out check {res['heldout_tokens']:,} each)")
    print(f"CPU: full {c['full']:.1f} s, sequential {c['sequential']:.1f} s -> {res['cpu_ratio']:.1f}x; "
          f"wall: {w['full']:.1f} s vs {w['sequential']:.1f} s -> {res['wall_ratio']:.1f}x")
    print(f"comparisons: {res['comparisons']}")
    fm = res["front_match"]
    print(f"fronts: sequential {fm['sizes']['sequential']} points, {fm['sequential_in_full']} within the intervals of the "
          f"full-budget front; full budget {fm['sizes']['full']} points, {fm['full_in_sequential']} within those of the "
          f"sequential front; same balanced pick: {res['picks_same']}")
    for k, v in res["fronts"].items():
        points = ["{} ({})".format(p["key"], ", ".join(f"{x:.4f}" for n, x in p.items() if n != "key")) for p in v]
        print(f"  {k}: " + "; ".join(points))
    ch, d = res["chosen"], res["chosen_minus_uniform"]
    print(f"endpoints (held out): {res['endpoints']}")
    print(f"balanced point {ch['key']}: worst-case increase {ch['worst_increase']:+.4f} vs uniform {res['uniform_worst_increase']:+.4f}; "
          f"difference {d['mean']:+.4f} [{d['interval'][0]:+.4f}, {d['interval'][1]:+.4f}] -> beats uniform: {res['beats_uniform']}")
    for n in res["sets"]:
        v = ch[n]["vs_uniform"]
        print(f"  {n}: loss {ch[n]['loss']:.4f} ± {ch[n]['se']:.4f}; minus uniform {v['mean']:+.4f} "
              f"[{v['interval'][0]:+.4f}, {v['interval'][1]:+.4f}]")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common_arguments(parser, runs=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 gives stable numbers on a shared machine).")
    parser.add_argument("--pair-dir", help="Where the pair and sets are built and cached (default: ~/.cache/hf_llmc_bench/search-stdlib).")
    parser.add_argument("--build", metavar="DIR", help=argparse.SUPPRESS)
    parser.add_argument("--child", nargs=2, metavar=("PAIR_DIR", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.build:
        info = build(Path(args.build))
        harness_report(build_s=info["build_s"])
        return 0
    if args.child:
        pair_dir, out = args.child
        info = json.loads((Path(pair_dir) / "built.json").read_text())
        order = ("full", "sequential") if os.environ.get("SEARCH_BENCH_ORDER") == "full-first" else ("sequential", "full")
        with tempfile.TemporaryDirectory(prefix="hf-llmc-search-bench-") as tmp:
            res = run(sizes, args.threads, info, Path(tmp), order)
        Path(out).write_text(json.dumps(res, indent=2) + "\n")
        harness_report(tokens_full=res["tokens"]["full"], tokens_sequential=res["tokens"]["sequential"],
                       token_ratio=res["token_ratio"], cpu_full_s=res["cpu_s"]["full"],
                       cpu_sequential_s=res["cpu_s"]["sequential"], cpu_ratio=res["cpu_ratio"],
                       wall_full_s=res["wall_s"]["full"], wall_sequential_s=res["wall_s"]["sequential"],
                       wall_ratio=res["wall_ratio"], chosen_worst_increase=res["chosen"]["worst_increase"],
                       uniform_worst_increase=res["uniform_worst_increase"],
                       chosen_minus_uniform=res["chosen_minus_uniform"]["mean"],
                       chosen_minus_uniform_high=res["chosen_minus_uniform"]["interval"][1],
                       beats_uniform=int(res["beats_uniform"]),
                       front_points_matched=res["front_match"]["sequential_in_full"] + res["front_match"]["full_in_sequential"],
                       front_points=sum(res["front_match"]["sizes"].values()))
        return 0
    pair_dir = Path(args.pair_dir) if args.pair_dir else CACHE / "search-stdlib"
    pair_dir.mkdir(parents=True, exist_ok=True)
    env = child_env(OMP_NUM_THREADS=str(args.threads))
    if not (pair_dir / "built.json").is_file():
        print(f"building the stdlib pair in {pair_dir} (once) ...", flush=True)
        run_child([sys.executable, __file__, "--build", str(pair_dir)], env=env)
    bench = Harness("search", "Merge search", quick=args.quick or args.runs < 3, note=args.note)
    with tempfile.TemporaryDirectory(prefix="hf-llmc-search-runs-") as tmp:
        last = Path(tmp) / "last.json"
        argv_child = [sys.executable, __file__, "--child", str(pair_dir), str(last), "--threads", str(args.threads)]
        method = Method("both searches", argv_child + (["--quick"] if args.quick else []), env=env)
        rounds = [0]

        def alternate(method=method, rounds=rounds) -> None:
            method.env["SEARCH_BENCH_ORDER"] = "sequential-first" if rounds[0] % 2 == 0 else "full-first"
            rounds[0] += 1

        method.prepare = alternate
        cond = bench.run("stdlib pair", [method], runs=args.runs, warmup=0,
                         description="in-process warm-up: one forward before both searches")
        res = json.loads(last.read_text())
    sm = cond["methods"]["both searches"]["summary"]
    ok = args.quick or (sm["token_ratio"]["min"] >= MIN_TOKEN_RATIO and sm["beats_uniform"]["min"] == 1)
    path = results_path(args, "search")
    if path:
        bench.save(params={**sizes, "seq_len": SEQ_LEN, "threads": args.threads}, path=path, last_run=res)
    show(res)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
