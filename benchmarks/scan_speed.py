"""Scan speed: hf-llmc (in-place points + prefix reuse) vs the straightforward method.

On a 12-block Llama-shaped pair (hidden 512) built locally (random init for A, B = A plus a
seeded perturbation), runs the single-block scan and the deep-first cumulative scan at α = 0.5
for both bases, twice over the same token blocks in one process:

* hf-llmc: :func:`hf_llmc.scan.run_scan` (endpoints once, the full row once, every group point
  set in place and evaluated from its first block on);
* straightforward: per point a ``copy.deepcopy`` of the base state dict, the group's tensors
  interpolated, ``load_state_dict``, a full forward (endpoints and the full row included).

It checks that both give the same losses (1e-5 relative), then prints
time(straightforward) / time(hf-llmc) and time(hf-llmc) / lower bound, where the lower bound is
the sum over the scan's points of the FLOP share of the blocks each point must run (its suffix
from the group's first block, plus the head) times the time of one full forward (the median of
the straightforward method's forwards, measured in the same run).

Times are process CPU seconds (``time.process_time``), which other jobs on a shared machine do not
inflate; wall-clock seconds are printed too. Use ``--threads 1`` there for stable numbers.

    python benchmarks/scan_speed.py            # full size (a few minutes on 2 CPU cores)
    python benchmarks/scan_speed.py --quick    # tiny sizes, seconds
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

FULL = {"num_layers": 12, "hidden_size": 512, "num_heads": 8, "vocab_size": 4096, "seq_len": 128, "blocks": 4}
QUICK = {"num_layers": 4, "hidden_size": 64, "num_heads": 4, "vocab_size": 512, "seq_len": 32, "blocks": 4}


def build_pair(root: Path, sizes: dict, seed: int = 0) -> tuple[Path, Path]:
    """A (random init) and B (A + 0.5·std-scaled Gaussian noise per tensor), saved as safetensors."""
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
    """(one decoder block, the head) in multiply-add FLOPs per token (embeddings are lookups)."""
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


def straightforward(model, sd: dict, ids: torch.Tensor, points, batch_size: int) -> tuple[dict, list[float]]:
    """Per point: deepcopy of the base state dict, interpolate, load_state_dict, full forward.
    Returns the losses and the CPU seconds of each point's forward."""
    losses, forwards = {}, []
    for key, names, alpha, base in points:
        state = copy.deepcopy(sd[base])
        for name in names:
            state[name] = ((1 - alpha) * sd["a"][name].float() + alpha * sd["b"][name].float()).to(state[name].dtype)
        model.load_state_dict(state)
        total, count = 0.0, 0
        with torch.inference_mode(), Timer() as t:
            for i in range(0, ids.shape[0], batch_size):
                batch = ids[i : i + batch_size]
                n = batch.shape[0] * (batch.shape[1] - 1)
                total += float(model(input_ids=batch, labels=batch).loss) * n
                count += n
        losses[key] = total / count
        forwards.append(t.cpu)
    return losses, forwards


def distinct_points(points):
    """The scan's points with the full-model row once (it is the same point for every group)."""
    seen_full = False
    for p in points:
        if p.group.name == "full":
            if seen_full:
                continue
            seen_full = True
        yield p


def run(sizes: dict, threads: int | None, store: bool = True) -> dict:
    with tempfile.TemporaryDirectory(prefix="hf-llmc-scan-speed-") as tmp:
        return _run(sizes, threads, Path(tmp), store)


def _run(sizes: dict, threads: int | None, tmp: Path, store: bool) -> dict:
    from transformers import AutoModelForCausalLM

    from hf_llmc import ModelPair
    from hf_llmc import ScanConfig
    from hf_llmc.analyses.scan import ScanRunner, row_key
    from safetensors.torch import load_file

    if threads:
        torch.set_num_threads(threads)
    a, b = build_pair(tmp, sizes)
    pair = ModelPair.from_pretrained(a, b, device="cpu")
    gen = torch.Generator().manual_seed(1234)
    ids = torch.randint(pair.config.vocab_size, (sizes["blocks"], sizes["seq_len"]), generator=gen)
    blocks = pair.blocks(ids)
    batch_size = sizes["blocks"]

    reference = AutoModelForCausalLM.from_pretrained(a).eval()
    sd = {"a": load_file(a / "model.safetensors"), "b": load_file(b / "model.safetensors")}
    block_f, head_f = flops_per_token(pair.config, sizes["seq_len"])
    n_blocks = pair.arch.num_blocks
    full_f = n_blocks * block_f + head_f

    pair.evaluator(blocks, batch_size).run(state="a")  # warm-up
    report = {"sizes": sizes, "threads": torch.get_num_threads(), "prefix_store": store,
              "block_flops_per_token": block_f, "head_flops_per_token": head_f, "scans": {}}
    for label, cfg in (("single-block", ScanConfig(granularity="block", base="both", alphas="0.5")),
                       ("cumulative-deep", ScanConfig(mode="cumulative", order="deep", base="both", alphas="0.5"))):
        out = tmp / f"scan-{label}"
        pair.endpoint_cache.clear()  # both methods evaluate the endpoints inside the timing
        runner = ScanRunner(pair, blocks, dataclasses.replace(cfg, batch_size=batch_size), out, progress=False,
                            prefix_store_bytes=None if store else 0)
        with Timer() as t_hf:
            rows = runner.run(overwrite=True)

        # The same points for the straightforward method (endpoints and full row once).
        points = [(("A", "a", 0.0, "interp", None), [], 0.0, "a"), (("B", "b", 1.0, "interp", None), [], 0.0, "b")]
        for p in distinct_points(runner.points):
            names = [pair.arch.canonical(n) for n in p.group.parameters]
            points.append((p.key, names, p.alpha, p.base))
        with Timer() as t_sf:
            losses, forwards = straightforward(reference, sd, ids, points, batch_size)
        # One full forward: the median of the straightforward method's forwards (same shapes,
        # same tokens, measured under the same conditions as the scan).
        t_full = statistics.median(forwards)

        hf = {row_key(r): r["loss"] for r in rows}
        worst = 0.0
        for key, loss in losses.items():
            mine = hf[key] if key in hf else hf[(key[0], "a" if key[1] == "b" else "b", *key[2:])]
            worst = max(worst, abs(mine - loss) / abs(loss))
        # Lower bound: every point runs at least its suffix (first block .. head); the full row
        # counts once; endpoints are full forwards.
        share = 2.0
        for p in distinct_points(runner.points):
            k = p.group.first_block or 0
            share += ((n_blocks - k) * block_f + head_f) / full_f
        bound = share * t_full
        report["scans"][label] = {
            "points": len(points), "t_hf_llmc_s": t_hf.cpu, "t_straightforward_s": t_sf.cpu,
            "wall_hf_llmc_s": t_hf.wall, "wall_straightforward_s": t_sf.wall,
            "speedup": t_sf.cpu / t_hf.cpu, "speedup_wall": t_sf.wall / t_hf.wall, "lower_bound_s": bound,
            "full_forward_equivalents": share, "ratio_to_lower_bound": t_hf.cpu / bound,
            "t_full_forward_s": t_full,
            "max_relative_loss_difference": worst,
            "forward_calls": runner.ev.forward_calls,
        }
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Tiny sizes (seconds), for a smoke test.")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's).")
    parser.add_argument("--blocks", type=int, default=None, help="Token blocks (default: 4).")
    parser.add_argument("--seq-len", type=int, default=None, help="Tokens per block (default: 128; quick: 32).")
    parser.add_argument("--no-store", action="store_true", help="Do not keep the base hidden states of every block from the endpoint runs (prefixes are then built incrementally, one pass over the blocks per base).")
    parser.add_argument("--json-out", help="Also write the numbers as JSON to this file.")
    args = parser.parse_args(argv)
    sizes = dict(QUICK if args.quick else FULL)
    if args.blocks:
        sizes["blocks"] = args.blocks
    if args.seq_len:
        sizes["seq_len"] = args.seq_len
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    t0 = time.perf_counter()
    report = run(sizes, args.threads, store=not args.no_store)
    report["total_s"] = time.perf_counter() - t0
    s = sizes
    print(f"Llama-shaped pair: {s['num_layers']} blocks, hidden {s['hidden_size']}, vocab {s['vocab_size']}; "
          f"{s['blocks']} x {s['seq_len']} tokens; {report['threads']} thread(s); "
          f"prefix store {'on' if report['prefix_store'] else 'off'}")
    ok = True
    for label, r in report["scans"].items():
        print(f"{label:16s} points {r['points']:3d}  CPU s: hf-llmc {r['t_hf_llmc_s']:7.2f}  straightforward "
              f"{r['t_straightforward_s']:7.2f}  speedup x{r['speedup']:.2f} (wall x{r['speedup_wall']:.2f})  "
              f"hf-llmc / lower bound {r['ratio_to_lower_bound']:.2f} "
              f"({r['full_forward_equivalents']:.2f} full forwards of {r['t_full_forward_s']:.3f} s)  "
              f"max rel. loss diff {r['max_relative_loss_difference']:.1e}")
        ok &= r["max_relative_loss_difference"] <= 1e-5
    print(f"total {report['total_s']:.1f} s; losses agree: {'yes' if ok else 'NO'}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
