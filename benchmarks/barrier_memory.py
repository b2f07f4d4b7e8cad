"""Peak memory of a full-model barrier: hf-llmc (one live model, B streamed) vs the
straightforward method (A and B loaded, interpolated model built from their state dicts).

Each method runs in its own subprocess; the reported number is
(peak RSS − RSS after imports and data setup) / fp32 size of one model. Both evaluate the
same 8 blocks of 128 tokens one block per forward, so activations stay small next to weights.
Usage: python benchmarks/barrier_memory.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


BATCH = 1  # blocks per forward, the same for both methods (activations are not the point here)


def build_pair(root: Path, quick: bool) -> tuple[Path, Path, int]:
    from hf_llmc.testing import init_model, tiny_config

    cfg = tiny_config("gpt2", num_layers=2 if quick else 10, hidden_size=64 if quick else 512,
                      num_heads=4 if quick else 8, vocab_size=1000 if quick else 16000, max_positions=256)
    paths = []
    for seed, name in ((0, "a"), (1, "b")):
        model = init_model(cfg, seed=seed)
        model.save_pretrained(root / name)
        paths.append(root / name)
    numel = sum(p.numel() for p in model.parameters())
    return paths[0], paths[1], numel


def _status(field: str) -> int:
    """A byte count from /proc/self/status (VmRSS now, VmHWM peak). VmHWM belongs to this
    process image only; ru_maxrss would also count the parent's memory at fork time."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(method: str, a: str, b: str, out: str) -> None:
    import torch
    import transformers.models.gpt2.modeling_gpt2  # noqa: F401 - import cost belongs to the baseline
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    from hf_llmc import ModelPair
    from hf_llmc import TokenBlocks

    torch.set_num_threads(2)
    cfg = json.loads((Path(a) / "config.json").read_text())
    ids = torch.randint(0, cfg["vocab_size"], (8, 128), generator=torch.Generator().manual_seed(0))
    baseline = _status("VmRSS")
    if method == "hf-llmc":
        pair = ModelPair.from_pretrained(a, b, device="cpu")
        result = pair.barrier(TokenBlocks(ids, "random", "random"), alphas=[0.5], batch_size=BATCH)
        loss = result.loss[0]
    else:
        ma = AutoModelForCausalLM.from_pretrained(a).eval()
        mb = AutoModelForCausalLM.from_pretrained(b).eval()
        sa, sb = ma.state_dict(), mb.state_dict()
        mid = AutoModelForCausalLM.from_pretrained(a).eval()
        mid.load_state_dict({k: 0.5 * sa[k] + 0.5 * sb[k] for k in sa})
        with torch.inference_mode():
            losses = [[m(ids[i : i + BATCH], labels=ids[i : i + BATCH]).loss for i in range(0, len(ids), BATCH)] for m in (ma, mb, mid)]
        loss = float(sum(losses[2]) / len(losses[2]))
    peak = _status("VmHWM")
    Path(out).write_text(json.dumps({"baseline": baseline, "peak": peak, "loss": loss}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        a, b, numel = build_pair(root, args.quick)
        size = numel * 4
        rows = {}
        for method in ("hf-llmc", "straightforward"):
            out = root / f"{method}.json"
            subprocess.run([sys.executable, __file__, "--child", method, str(a), str(b), str(out)], check=True)
            rows[method] = json.loads(out.read_text())
        print(f"model: {numel / 1e6:.1f} M parameters, fp32 size {size / 2**20:.0f} MiB")
        print(f"{'method':<16}{'peak RSS MiB':>14}{'over baseline MiB':>20}{'ratio to model':>16}{'mid loss':>10}")
        for method, r in rows.items():
            extra = r["peak"] - r["baseline"]
            print(f"{method:<16}{r['peak'] / 2**20:>14.0f}{extra / 2**20:>20.0f}{extra / size:>16.2f}{r['loss']:>10.4f}")
        assert abs(rows["hf-llmc"]["loss"] - rows["straightforward"]["loss"]) < 1e-4 * abs(rows["straightforward"]["loss"])


if __name__ == "__main__":
    main()
