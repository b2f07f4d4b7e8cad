"""Scan speed: hf-llmc (in-place points + prefix reuse) vs the paper's way and the best plain way.

On a 12-block Llama-shaped pair (hidden 512, vocabulary 4096; A random init, B = A plus a seeded
perturbation) and 64 token blocks of 256 tokens, runs the single-block scan and the deep-first
cumulative scan at α = 0.5 into both bases with three methods:

* ``paper``: per point a ``copy.deepcopy`` of the base state dict, the group's tensors
  interpolated, ``load_state_dict``, a full forward (endpoints and the full row included);
* ``plain``: the best plain way: one model; per point the group's tensors are set in place and
  restored from the base's state dict afterwards (the base switches once, A -> B, by copying B in
  place); a full forward per point, no prefix reuse;
* ``hf-llmc``: :class:`hf_llmc.analyses.scan.ScanRunner` (in-place points; the endpoint runs record
  every block's input, and each point is evaluated from its group's first block on).

Every run of a method is a fresh process (the shared harness, ``benchmarks/harness.py``) that
loads the pair, runs one untimed warm-up forward of the first batch, then the timed scan; the
methods' order rotates between runs. Times are the CPU seconds of the timed scan inside the
process (``time.process_time``; with ``--threads 1``, the default, other jobs on the machine do
not inflate them); wall-clock seconds are kept too. The losses of every point must agree between
the methods (1e-5 relative).

Lower bound: the scan's minimal forward work counted in block forwards (a point whose group starts
at block k costs L - k block forwards plus the head, weighted by their FLOPs; the endpoints are
full forwards; the full-model row counts once), times the CPU time of one full forward (the median
of the plain method's per-point forwards in the same round). Ceiling = plain's forwards / that
bound: the best speed-up prefix reuse can give over the plain way.

    python benchmarks/scan_speed.py                           # full: 64 x 256 tokens, 3 runs (~2 h on one core)
    python benchmarks/scan_speed.py --blocks 16 --runs 3      # reduced: 16 x 256 tokens (~30 min)
    python benchmarks/scan_speed.py --quick --runs 1          # tiny sizes, validates the benchmark in ~1 min
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from harness import Harness, Method, child_env, common_arguments, report, results_path, run_child  # noqa: E402

FULL = {"num_layers": 12, "hidden_size": 512, "num_heads": 8, "vocab_size": 4096, "seq_len": 256, "blocks": 64,
        "batch_size": 8}
QUICK = {"num_layers": 4, "hidden_size": 64, "num_heads": 4, "vocab_size": 512, "seq_len": 32, "blocks": 8,
         "batch_size": 4}
SCANS = {"single-block": {"granularity": "block"},
         "cumulative-deep": {"mode": "cumulative", "order": "deep"}}
METHODS = ("paper", "plain", "hf-llmc")


# -- children ------------------------------------------------------------------------------------
def build_pair(root: Path, sizes: dict, seed: int = 0) -> tuple[Path, Path]:
    """A (random init) and B (A + 0.5·std-scaled Gaussian noise per tensor), saved as safetensors."""
    import torch

    from hf_llmc.testing import init_model, tiny_config

    config = tiny_config("llama", num_layers=sizes["num_layers"], hidden_size=sizes["hidden_size"],
                         num_heads=sizes["num_heads"], vocab_size=sizes["vocab_size"],
                         max_positions=max(128, sizes["seq_len"]), tie_word_embeddings=False)
    model = init_model(config, seed=seed)
    model.save_pretrained(root / "a")
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            scale = float(p.std()) if p.numel() > 1 and float(p.std()) > 0 else 0.02
            p.add_(0.5 * scale * torch.randn(p.shape, generator=gen))
    model.save_pretrained(root / "b")
    return root / "a", root / "b"


def flops_per_token(config, seq_len: int) -> tuple[float, float]:
    """(one decoder block, the head) in FLOPs per token (2 per multiply-add; embeddings are lookups)."""
    h, inter, v = config.hidden_size, config.intermediate_size, config.vocab_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    attn = 2 * (2 * h * h + 2 * h * kv) + 2 * 2 * seq_len * h  # q,o + k,v projections; scores and values
    mlp = 2 * 3 * h * inter  # gate, up, down
    return attn + mlp, 2 * h * v


class Timer:
    """Process CPU time and wall-clock time of a block."""

    def __enter__(self) -> "Timer":
        self._cpu, self._wall = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.cpu = time.process_time() - self._cpu
        self.wall = time.perf_counter() - self._wall


def scan_config(scan: str, batch_size: int):
    from hf_llmc import ScanConfig

    return ScanConfig(base="both", alphas="0.5", batch_size=batch_size, **SCANS[scan])


def scan_points(a: Path, b: Path, cfg):
    """The plan's distinct points as ``(key, parameter names, alpha, base, first block)``: the endpoints, the
    full-model row once (it is the same point into A and into B), every group into each base."""
    from hf_llmc import lazy_pair
    from hf_llmc.analyses.scan import build_plan, plan_points

    pair = lazy_pair(a, b)
    full = pair.full_group()
    points = [(("A", "a", 0.0, "interp", None), [], 0.0, "a", None), (("B", "b", 1.0, "interp", None), [], 0.0, "b", None)]
    seen_full = False
    for p in plan_points(build_plan(pair.arch, cfg), full, cfg):
        if p.group.name == full.name:
            if seen_full:
                continue
            seen_full = True
        points.append((p.key, [pair.arch.canonical(n) for n in p.group.parameters], p.alpha, p.base, p.group.first_block))
    return pair, points


def lower_bound_share(num_blocks: int, points, config, seq_len: int) -> float:
    """The points' minimal forward work in full forwards (see the module docstring)."""
    block_f, head_f = flops_per_token(config, seq_len)
    full_f = num_blocks * block_f + head_f
    return sum(1.0 if k is None else ((num_blocks - k) * block_f + head_f) / full_f for *_, k in points)


def plain_loss(model, ids, batch_size: int, forwards: list[float]) -> float:
    """Mean next-token loss of ``model(input_ids, labels)`` over the batches; appends its CPU seconds."""
    import torch

    total, count = 0.0, 0
    with torch.inference_mode(), Timer() as t:
        for i in range(0, ids.shape[0], batch_size):
            batch = ids[i : i + batch_size]
            n = batch.shape[0] * (batch.shape[1] - 1)
            total += float(model(input_ids=batch, labels=batch).loss) * n
            count += n
    forwards.append(t.cpu)
    return total / count


def child(method: str, scan: str, pair_dir: Path, sizes: dict, threads: int, losses_out: Path) -> None:
    import copy

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(threads)
    a, b = pair_dir / "a", pair_dir / "b"
    cfg = scan_config(scan, sizes["batch_size"])
    lazy, points = scan_points(a, b, cfg)
    gen = torch.Generator().manual_seed(1234)
    bs = sizes["batch_size"]
    losses: dict[str, float] = {}
    forwards: list[float] = []
    extra = {}
    if method in ("paper", "plain"):
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(a)
        model = AutoModelForCausalLM.from_pretrained(a).eval()
        ids = torch.randint(config.vocab_size, (sizes["blocks"], sizes["seq_len"]), generator=gen)
        sd = {"a": load_file(a / "model.safetensors"), "b": load_file(b / "model.safetensors")}
        with torch.inference_mode():
            model(input_ids=ids[:bs], labels=ids[:bs])  # warm-up, as for every method
        if method == "paper":
            with Timer() as t:
                for key, names, alpha, base, _ in points:
                    state = copy.deepcopy(sd[base])
                    for name in names:
                        state[name] = ((1 - alpha) * sd["a"][name].float() + alpha * sd["b"][name].float()).to(state[name].dtype)
                    model.load_state_dict(state)
                    losses[repr(key)] = plain_loss(model, ids, bs, forwards)
        else:
            live = dict(model.state_dict())
            current = "a"
            with Timer() as t, torch.no_grad():
                for key, names, alpha, base, _ in sorted(points, key=lambda p: p[3]):  # base A first, then B
                    if base != current:  # switch the live model to the other base, in place
                        for name, tensor in live.items():
                            tensor.copy_(sd[base][name])
                        current = base
                    for name in names:
                        live[name].copy_((1 - alpha) * sd["a"][name].float() + alpha * sd["b"][name].float())
                    losses[repr(key)] = plain_loss(model, ids, bs, forwards)
                    for name in names:  # restore the base
                        live[name].copy_(sd[base][name])
            extra["t_full_forward_s"] = statistics.median(forwards)
    else:
        from hf_llmc import ModelPair
        from hf_llmc.analyses.scan import ScanRunner, row_key

        pair = ModelPair.from_pretrained(a, b, device="cpu")
        config = pair.config
        ids = torch.randint(config.vocab_size, (sizes["blocks"], sizes["seq_len"]), generator=gen)
        blocks = pair.blocks(ids)
        with torch.inference_mode():
            pair.model(input_ids=ids[:bs], labels=ids[:bs])  # warm-up, as for every method
        out = losses_out.with_suffix(".scan")
        shutil.rmtree(out, ignore_errors=True)
        with Timer() as t:
            runner = ScanRunner(pair, blocks, cfg, out, progress=False)
            rows = runner.run(overwrite=True)
        hf = {row_key(r): r["loss"] for r in rows}
        for key, *_ in points:
            if key[0] in ("A", "B"):
                losses[repr(key)] = runner.ends[key[1]].loss
            else:
                losses[repr(key)] = hf[key]
        extra["forward_calls"] = runner.ev.forward_calls
        shutil.rmtree(out, ignore_errors=True)
    share = lower_bound_share(lazy.arch.num_blocks, points, config, sizes["seq_len"])
    losses_out.write_text(json.dumps(losses))
    report(work_cpu_s=t.cpu, work_wall_s=t.wall, points=len(points), full_forward_equivalents=share,
           threads=torch.get_num_threads(), **extra)


# -- driver --------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_arguments(parser)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads in every method (default 1).")
    parser.add_argument("--blocks", type=int, default=None, help="Token blocks (default 64; quick: 8).")
    parser.add_argument("--seq-len", type=int, default=None, help="Tokens per block (default 256; quick: 32).")
    parser.add_argument("--scans", default=",".join(SCANS), help="Scans to run (default: %(default)s).")
    parser.add_argument("--methods", default=",".join(METHODS), help="Methods (default: %(default)s).")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "SCAN"), help=argparse.SUPPRESS)
    parser.add_argument("--pair", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", help=argparse.SUPPRESS)
    parser.add_argument("--losses", help=argparse.SUPPRESS)
    parser.add_argument("--build", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.build:
        build_pair(Path(args.build), json.loads(args.sizes))
        return 0
    if args.child:
        child(args.child[0], args.child[1], Path(args.pair), json.loads(args.sizes), args.threads, Path(args.losses))
        return 0

    sizes = dict(QUICK if args.quick else FULL)
    if args.blocks:
        sizes["blocks"] = args.blocks
    if args.seq_len:
        sizes["seq_len"] = args.seq_len
    scans = [s for s in args.scans.split(",") if s]
    methods = [m for m in args.methods.split(",") if m]
    unknown = [s for s in scans if s not in SCANS] + [m for m in methods if m not in METHODS]
    if unknown or "hf-llmc" not in methods:
        parser.error(f"unknown scans/methods {unknown}, or no hf-llmc")
    threads = {k: str(args.threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env = child_env(**threads)
    py = sys.executable
    with tempfile.TemporaryDirectory(prefix="hf-llmc-scan-speed-") as tmp:
        tmp = Path(tmp)
        run_child([py, __file__, "--build", str(tmp / "pair"), "--sizes", json.dumps(sizes)], env=threads)
        reduced = sizes != FULL or args.runs < 3 or scans != list(SCANS) or methods != list(METHODS)
        bench = Harness("scan_speed", "Scan speed", quick=args.quick or reduced, note=args.note)
        for scan in scans:
            ms = [Method(m, [py, __file__, "--child", m, scan, "--pair", str(tmp / "pair"), "--sizes", json.dumps(sizes),
                             "--threads", str(args.threads), "--losses", str(tmp / f"{m}-{scan}.json")], env=env)
                  for m in methods]
            worst = [0.0]

            def check(_rec, scan=scan):  # the methods' losses of the last round agree
                got = {m: json.loads((tmp / f"{m}-{scan}.json").read_text()) for m in methods
                       if (tmp / f"{m}-{scan}.json").exists()}
                ref = got.get("hf-llmc")
                for m, losses in got.items():
                    if ref is None or m == "hf-llmc":
                        continue
                    if losses.keys() != ref.keys():
                        raise RuntimeError(f"{scan}: {m} evaluated other points than hf-llmc")
                    worst[0] = max([worst[0]] + [abs(losses[k] - ref[k]) / abs(ref[k]) for k in ref])

            for m in ms:
                m.check = check
            bench.run(scan, ms, runs=args.runs, warmup=0,
                      description="in-process warm-up: one forward of the first batch in every method")
            bench.checks[f"max_rel_loss_diff_{scan}"] = worst[0]
            for m in methods:
                if m != "hf-llmc":
                    bench.ratio(scan, m, "hf-llmc", ("work_cpu_s", "work_wall_s"))
            if "plain" in methods:
                bench.ratio(scan, "hf-llmc", "plain", ("work_cpu_s",), label="hf-llmc / lower bound",
                            den_scale=lambda h, p: h["full_forward_equivalents"] * p["t_full_forward_s"])
            cond = bench.conditions[scan]
            line = [f"{scan}: max rel. loss diff {worst[0]:.1e}"]
            for label, r in cond["ratios"].items():
                s = r["work_cpu_s"]
                line.append(f"{label} x{s['median']:.3f} ({s['min']:.3f}-{s['max']:.3f})")
            print("; ".join(line), flush=True)
            if worst[0] > 1e-5:
                print(f"{scan}: losses disagree", file=sys.stderr)
                return 1
        path = results_path(args, "scan_speed")
        if path:
            bench.save(params={"sizes": sizes, "threads": args.threads, "scans": scans, "methods": methods}, path=path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
