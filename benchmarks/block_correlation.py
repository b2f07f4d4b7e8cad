"""How much neighbouring token blocks correlate on real text, and what that does to standard errors.

Blocks are consecutive pieces of the evaluation stream, so neighbours often come from one
document. On the real-text pair of ``sequential_speed.py`` (a 12-block Llama-shaped model
fine-tuned on the interpreter's prose (A) and standard-library source (B), evaluated on held-out
files, 1024 blocks of 256 tokens), this prints for every single-block path point at α = 0.5:
the lag-1 correlation of the paired per-block differences (stream order), the plain standard
error, the batch-means one, and which one hf-llmc reports
(:func:`hf_llmc.engine.stats.paired_standard_error`).

    python benchmarks/block_correlation.py [--quick]      # about 3 minutes on 2 cores (quick: 30 s)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sequential_speed import FULL, QUICK, STDLIB_STEPS, stdlib_pair  # noqa: E402


def main() -> None:
    from hf_llmc import DataConfig, ModelPair
    from hf_llmc.config.data import DEFAULT_MAX_TOKENS
    from hf_llmc.engine.stats import paired_standard_error, standard_error

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    sizes = {**(QUICK if args.quick else FULL), **STDLIB_STEPS["quick" if args.quick else "full"]}
    max_tokens = sizes["max_tokens"] or DEFAULT_MAX_TOKENS
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        a, b, text = stdlib_pair(Path(tmp), sizes, max_tokens)
        pair = ModelPair.from_pretrained(a, b, device="cpu")
        blocks = pair.blocks(DataConfig(data=str(text), max_tokens=max_tokens))
        ev = pair.evaluator(blocks)
        ends = {w: pair.endpoint(w, ev, blocks) for w in ("b", "a")}
        print(f"{blocks.num_blocks} blocks of {blocks.seq_len} tokens; L_A {ends['a'].loss:.3f}, L_B {ends['b'].loss:.3f}\n")
        print("| point | lag-1 corr. | plain SE | batch-means SE | ratio | reported |")
        print("|---|---:|---:|---:|---:|---|")
        ref = 0.5 * (ends["a"].block_loss + ends["b"].block_loss)
        for i in range(pair.arch.num_blocks):
            group = pair.groups(f"block.{i}")[0]
            stats = pair.point(ev, group, 0.5)
            d = stats.block_loss - ref
            se, method, r1 = paired_standard_error(d, stats.indices)
            x = d.double()
            k = max(4, x.numel() // int(x.numel() ** 0.5 + 0.999))
            bm = torch.stack([c.mean() for c in torch.tensor_split(x, k)])
            batch = float(bm.std() / bm.numel() ** 0.5)
            plain = standard_error(x)
            print(f"| block.{i} | {r1:+.3f} | {plain:.4f} | {batch:.4f} | {batch / plain:.2f} | {method} |")


if __name__ == "__main__":
    main()
