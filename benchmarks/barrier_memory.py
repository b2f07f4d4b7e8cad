"""Peak memory of a full-model barrier: hf-llmc (one live model, B streamed) vs the plain
two-model approach (A live, B's state dict) and the paper's way (A, B and a midpoint model).

GPT-2 architecture, 10 blocks, hidden 512, vocabulary 16000 (39.8 M parameters, 152 MiB float32),
two random initialisations saved with ``save_pretrained``. A full barrier at α = 0, 0.5, 1 on
8 blocks of 128 tokens, one block per forward (activations stay small next to the weights):

* ``hf-llmc``: ``ModelPair.from_pretrained(A, B).barrier(...)``;
* ``two-model``: A loaded as the live model, B's state dict read with ``safetensors``; A
  evaluated, the midpoint written into the live parameters in place, then B copied in;
* ``paper``: ``from_pretrained`` A and B, a third model for the midpoint loaded with
  ``load_state_dict`` from an interpolated (fourth) state dict; all three evaluated.

Each run of a method is a fresh process (the shared harness, ``benchmarks/harness.py``); the
figure is (peak RSS (``VmHWM``) - RSS after the imports and the token setup) / the float32 size of
one model, median and range over ``--runs`` rotated runs. The midpoint losses must agree. Every
method runs twice over: with glibc's malloc as it is, and with a fixed 1 MiB mmap threshold
(``MALLOC_MMAP_THRESHOLD_``): glibc otherwise raises the threshold after large frees, after which
large buffers come from the heap and may stay resident, which spreads the peak between runs.

    python benchmarks/barrier_memory.py               # full: 3 runs of 3 methods, 2 allocator settings (~4 min)
    python benchmarks/barrier_memory.py --quick       # tiny sizes (~40 s)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from harness import Harness, Method, child_env, common_arguments, report, results_path, run_child  # noqa: E402

BATCH = 1  # blocks per forward, the same for every method (activations are not the point here)
FULL = {"num_layers": 10, "hidden_size": 512, "num_heads": 8, "vocab_size": 16000, "blocks": 8, "seq_len": 128}
QUICK = {"num_layers": 2, "hidden_size": 64, "num_heads": 4, "vocab_size": 1000, "blocks": 8, "seq_len": 128}
METHODS = ("hf-llmc", "two-model", "paper")
# glibc raises its mmap threshold after large frees, after which large buffers come from the heap
# and may stay resident: the spread of peak RSS between runs. A fixed threshold shows the floor.
ALLOCATORS = ("default allocator", "fixed mmap threshold")
ALLOCATOR_ENV = {"default allocator": {}, "fixed mmap threshold": {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}}


def build_pair(root: Path, quick: bool) -> tuple[Path, Path, int]:
    from hf_llmc.testing import init_model, tiny_config

    s = QUICK if quick else FULL
    cfg = tiny_config("gpt2", num_layers=s["num_layers"], hidden_size=s["hidden_size"], num_heads=s["num_heads"],
                      vocab_size=s["vocab_size"], max_positions=256)
    paths = []
    for seed, name in ((0, "a"), (1, "b")):
        model = init_model(cfg, seed=seed)
        model.save_pretrained(root / name)
        paths.append(root / name)
    numel = sum(p.numel() for p in model.parameters())
    return paths[0], paths[1], numel


def _status(field: str) -> int:
    """A byte count from /proc/self/status (VmRSS now, VmHWM peak of this process image)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _mean_loss(model, ids) -> float:
    import torch

    with torch.inference_mode():
        losses = [float(model(ids[i : i + BATCH], labels=ids[i : i + BATCH]).loss) for i in range(0, len(ids), BATCH)]
    return sum(losses) / len(losses)


def child(method: str, a: str, b: str, seq_len: int, blocks: int) -> dict:
    import torch
    import transformers.models.gpt2.modeling_gpt2  # noqa: F401 - import cost belongs to the baseline
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    from hf_llmc import ModelPair, TokenBlocks

    torch.set_num_threads(2)
    cfg = json.loads((Path(a) / "config.json").read_text())
    ids = torch.randint(0, cfg["vocab_size"], (blocks, seq_len), generator=torch.Generator().manual_seed(0))
    baseline = _status("VmRSS")
    if method == "hf-llmc":
        pair = ModelPair.from_pretrained(a, b, device="cpu")
        result = pair.barrier(TokenBlocks(ids, "random", "random"), alphas=[0.0, 0.5, 1.0], batch_size=BATCH)
        loss = result.loss[1]
    elif method == "two-model":
        model = AutoModelForCausalLM.from_pretrained(a).eval()
        sb = load_file(str(Path(b) / "model.safetensors"))
        live = model.state_dict()
        _mean_loss(model, ids)  # A
        with torch.no_grad():
            for name, tensor in live.items():  # the midpoint, in place
                key = name if name in sb else None
                if key is None:  # a tied tensor stored once (GPT-2's head is the embedding)
                    continue
                tensor.mul_(0.5).add_(sb[key], alpha=0.5)
        loss = _mean_loss(model, ids)
        with torch.no_grad():
            for name, tensor in live.items():
                if name in sb:
                    tensor.copy_(sb[name])
        _mean_loss(model, ids)  # B
    else:
        ma = AutoModelForCausalLM.from_pretrained(a).eval()
        mb = AutoModelForCausalLM.from_pretrained(b).eval()
        sa, sb = ma.state_dict(), mb.state_dict()
        mid = AutoModelForCausalLM.from_pretrained(a).eval()
        mid.load_state_dict({k: 0.5 * sa[k] + 0.5 * sb[k] for k in sa})
        _mean_loss(ma, ids)
        _mean_loss(mb, ids)
        loss = _mean_loss(mid, ids)
    peak = _status("VmHWM")
    return {"baseline_mib": baseline / 2**20, "peak_mib": peak / 2**20, "over_baseline_mib": (peak - baseline) / 2**20,
            "loss_mid": float(loss)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_arguments(parser)
    parser.add_argument("--allocator", choices=["both", "default", "fixed"], default="both",
                        help="glibc malloc as is, with a fixed 1 MiB mmap threshold, or both (default).")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--build", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    s = QUICK if args.quick else FULL
    if args.build:
        _, _, numel = build_pair(Path(args.build), args.quick)
        report(numel=numel)
        return 0
    if args.child:
        method, a, b = args.child
        report(**child(method, a, b, s["seq_len"], s["blocks"]))
        return 0
    py = sys.executable
    with tempfile.TemporaryDirectory(prefix="hf-llmc-barrier-memory-") as tmp:
        root = Path(tmp)
        numel = run_child([py, __file__, "--build", str(root)] + (["--quick"] if args.quick else []))["numel"]
        size_mib = numel * 4 / 2**20
        bench = Harness("barrier_memory", "Barrier memory", quick=args.quick or args.runs < 3, note=args.note)
        spread = 0.0
        print(f"model: {numel / 1e6:.1f} M parameters, fp32 size {size_mib:.0f} MiB")
        chosen = {"both": ALLOCATORS, "default": ALLOCATORS[:1], "fixed": ALLOCATORS[1:]}[args.allocator]
        for allocator in chosen:
            env = child_env(**ALLOCATOR_ENV[allocator])
            methods = [Method(m, [py, __file__, "--child", m, str(root / "a"), str(root / "b")]
                              + (["--quick"] if args.quick else []), env=env) for m in METHODS]

            def ratio(rec: dict) -> None:
                rec["ratio_to_model"] = rec["over_baseline_mib"] / size_mib

            for m in methods:
                m.check = ratio
            cond = bench.run(allocator, methods, runs=args.runs, warmup=0,
                             description=" ".join(f"{k}={v}" for k, v in ALLOCATOR_ENV[allocator].items()))
            for other in METHODS[1:]:
                bench.ratio(allocator, "hf-llmc", other, ("over_baseline_mib", "peak_mib"))
            losses = [r["loss_mid"] for rec in cond["methods"].values() for r in rec["runs"]]
            spread = max(spread, (max(losses) - min(losses)) / abs(min(losses)))
            print(f"[{allocator}] {'method':<12}{'peak RSS MiB':>14}{'over baseline MiB':>20}{'x one model':>13}{'mid loss':>10}")
            for m, rec in cond["methods"].items():
                sm = rec["summary"]
                print(f"[{allocator}] {m:<12}{sm['peak_mib']['median']:>14.0f}{sm['over_baseline_mib']['median']:>20.0f}"
                      f"{sm['ratio_to_model']['median']:>13.2f}{sm['loss_mid']['median']:>10.4f}")
        bench.checks["midpoint_loss_rel_spread"] = spread
        path = results_path(args, "barrier_memory")
        if path:
            bench.save(params={**s, "params_m": numel / 1e6, "model_mib": size_mib, "alphas": [0.0, 0.5, 1.0],
                               "batch_blocks": BATCH}, path=path)
        if spread > 1e-4:
            print(f"midpoint losses disagree (relative spread {spread:.1e})", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
