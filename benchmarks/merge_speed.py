"""Merge speed and memory: ``hf-llmc merge`` (streamed) vs. the straightforward method.

Builds a ~0.3 B-parameter GPT-2-style pair locally (24 blocks, hidden 1024, vocabulary 8192:
about 1.2 GB of float32 weights each), then merges ``attn.0-11`` at α = 0.5 with

* hf-llmc: ``hf-llmc merge A B --layers attn.0-11 --alpha 0.5 --out DIR`` (tensor by tensor from
  the two checkpoints, no model instantiated), twice: ``hf-llmc`` with the architecture in
  hf-llmc's cache (primed by one untimed merge: every merge after the first of a model family)
  and ``hf-llmc-first`` with an empty cache (discovers the architecture on the meta device), and
* the straightforward method: ``from_pretrained`` A and B, average the selected parameters of A
  in place, ``save_pretrained``.

Each method runs in its own subprocess; its peak resident memory is that process's high-water
mark (``VmHWM``; ``ru_maxrss`` elsewhere) and its wall time is measured by the parent (imports
included) and inside the process (the work alone). A third subprocess measures the import
baseline. The outputs are compared tensor by tensor. Runs start from a synced disk, either with
the two checkpoints evicted from the page cache (``cold``: the first merge after a download, or
models larger than the cache) or read once beforehand (``warm``).

    python benchmarks/merge_speed.py            # full size (~5 GB of disk in the work folder)
    python benchmarks/merge_speed.py --quick    # tiny sizes, seconds
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FULL = dict(n_layer=24, n_embd=1024, n_head=16, vocab_size=8192, n_positions=1024)
QUICK = dict(n_layer=4, n_embd=128, n_head=4, vocab_size=1000, n_positions=128)


# -- workers (run in subprocesses) ---------------------------------------------------------------
def _selected_names(model, layers: str) -> list[str]:
    from hf_llmc.model.architecture import discover
    from hf_llmc import resolve

    arch = discover(model)
    return sorted({arch.canonical(p) for g in resolve(layers, arch) for p in g.parameters})


def worker(kind: str, a: str, b: str, out: str, layers: str, alpha: float) -> dict:
    t0 = time.perf_counter()
    if kind == "baseline":
        import torch  # noqa: F401
        import transformers  # noqa: F401

        import hf_llmc.cli  # noqa: F401
    elif kind.startswith("hf-llmc"):  # imports exactly what the command imports
        from hf_llmc.cli import main

        t0 = time.perf_counter()
        rc = main(["merge", a, b, "--layers", layers, "--alpha", repr(alpha), "--out", out, "--overwrite"])
        if rc != 0:
            raise SystemExit(rc)
    elif kind == "straightforward":
        import torch
        from transformers import AutoModelForCausalLM

        t0 = time.perf_counter()
        model_a = AutoModelForCausalLM.from_pretrained(a)
        model_b = AutoModelForCausalLM.from_pretrained(b)
        params_b = dict(model_b.named_parameters())
        selected = set(_selected_names(model_a, layers))
        with torch.no_grad():
            for name, param in model_a.named_parameters():
                if name in selected:
                    param.copy_((1 - alpha) * param + alpha * params_b[name])
        if Path(out).exists():
            shutil.rmtree(out)
        model_a.save_pretrained(out)
    else:
        raise ValueError(kind)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"work_s": time.perf_counter() - t0, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM is reset at exec, unlike ru_maxrss)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- driver --------------------------------------------------------------------------------------
def build_pair(folder: Path, sizes: dict, seed: int = 0) -> tuple[Path, Path]:
    """A: random weights (std 0.02); B: A + noise. Saved with save_pretrained (float32)."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config

    a, b = folder / "a", folder / "b"
    stamp = folder / "sizes.json"
    if a.is_dir() and b.is_dir() and stamp.is_file() and json.loads(stamp.read_text()) == sizes:
        return a, b
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    config = GPT2Config(**sizes, bos_token_id=0, eos_token_id=0)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model = model.to_empty(device="cpu")
    model.tie_weights()  # to_empty gives every parameter its own storage; GPT-2's head is the embedding
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name and name.endswith("weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=gen)
    model.save_pretrained(a)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.01)
    model.save_pretrained(b)
    n = sum(p.numel() for p in model.parameters())
    stamp.write_text(json.dumps(sizes))
    del model
    print(f"built pair: {n / 1e6:.1f} M parameters, {n * 4 / 1e9:.2f} GB float32 each")
    return a, b


def set_cache(files: list[Path], state: str) -> None:
    """Sync the disk, then evict ``files`` from the page cache (cold) or read them once (warm)."""
    os.sync()
    for f in files:
        with open(f, "rb") as fh:
            if state == "warm":
                while fh.read(1 << 24):
                    pass
            else:
                os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def run_worker(kind: str, a: Path, b: Path, out: Path, layers: str, alpha: float, cache: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "HF_LLMC_CACHE": str(cache)}
    cmd = [sys.executable, __file__, "--worker", kind, "--a", str(a), "--b", str(b), "--out", str(out),
           "--layers", layers, "--alpha", repr(alpha)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = wall
    return result


def compare(x: Path, y: Path) -> dict:
    import torch
    from safetensors import safe_open

    def tensors(folder: Path) -> dict[str, tuple[Path, str]]:
        out = {}
        for file in sorted(folder.glob("*.safetensors")):
            with safe_open(file, "pt") as fh:
                out.update({k: (file, k) for k in fh.keys()})
        return out

    tx, ty = tensors(x), tensors(y)
    mismatched, max_diff = [], 0.0
    for key in sorted(set(tx) | set(ty)):
        if key not in tx or key not in ty:
            mismatched.append(key)
            continue
        with safe_open(tx[key][0], "pt") as fx, safe_open(ty[key][0], "pt") as fy:
            u, v = fx.get_tensor(key), fy.get_tensor(key)
        if u.shape != v.shape or u.dtype != v.dtype:
            mismatched.append(key)
        elif not torch.equal(u, v):
            max_diff = max(max_diff, float((u.float() - v.float()).abs().max()))
            mismatched.append(key)
    return {"tensors": len(tx), "mismatched": mismatched, "max_abs_diff": max_diff}


def main() -> None:
    from safetensors import safe_open

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="Tiny sizes (a smoke test).")
    parser.add_argument("--workdir", help="Where the pair and the outputs go (default: a temporary folder).")
    parser.add_argument("--keep", action="store_true", help="Keep the work folder (reused by the next run).")
    parser.add_argument("--layers", default="attn.0-11")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--repeat", type=int, default=1, help="Runs of each method (alternating); medians are reported.")
    parser.add_argument("--cache", choices=["cold", "warm", "both"], default="both", help="Page-cache state of the two checkpoints at the start of each run.")
    parser.add_argument("--json-out", help="Also write the results as JSON to this file.")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--a", help=argparse.SUPPRESS)
    parser.add_argument("--b", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.a, args.b, args.out, args.layers, args.alpha)))
        return

    sizes = QUICK if args.quick else FULL
    layers = args.layers if not args.quick else "attn.0-1"
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="hf-llmc-merge-bench-"))
    try:
        a, b = build_pair(work / "pair", sizes)
        inputs = sorted(a.glob("*.safetensors")) + sorted(b.glob("*.safetensors"))
        cache_dir = work / "hf-llmc-cache"  # hf-llmc's architecture cache, primed by one untimed merge
        baseline = run_worker("baseline", a, b, work / "none", layers, args.alpha, cache_dir)
        run_worker("hf-llmc", a, b, work / "out-hf-llmc", layers, args.alpha, cache_dir)
        with safe_open(inputs[0], "pt") as fh:
            params_m = sum(math.prod(fh.get_slice(k).get_shape()) for k in fh.keys()) / 1e6
        print(f"pair: {params_m:.1f} M parameters per model; merge {layers} at alpha={args.alpha:g}; "
              f"import baseline {baseline['peak_rss_mb']:.0f} MB")
        print("hf-llmc: architecture cached (every merge after the first of a model family); "
              "hf-llmc-first: empty cache (discovers the architecture with transformers)")
        result = {"sizes": sizes, "params_m": params_m, "layers": layers, "alpha": args.alpha, "repeat": args.repeat,
                  "baseline_rss_mb": baseline["peak_rss_mb"], "python": sys.version.split()[0], "cpus": os.cpu_count(),
                  "conditions": {}}
        equal = True
        kinds = ("hf-llmc", "hf-llmc-first", "straightforward")
        metrics = ("wall_s", "work_s", "cpu_s", "peak_rss_mb")
        for cache in (("cold", "warm") if args.cache == "both" else (args.cache,)):
            runs: dict[str, list[dict]] = {k: [] for k in kinds}
            for i in range(args.repeat):
                for kind in kinds[i % 3:] + kinds[:i % 3]:  # rotate the order
                    set_cache(inputs, cache)
                    fresh = work / "hf-llmc-cache-first"
                    shutil.rmtree(fresh, ignore_errors=True)
                    runs[kind].append(run_worker(kind, a, b, work / f"out-{kind}", layers, args.alpha,
                                                 fresh if kind == "hf-llmc-first" else cache_dir))
            med = {k: {m: statistics.median(r[m] for r in v) for m in metrics} for k, v in runs.items()}
            best = {k: {m: min(r[m] for r in v) for m in metrics} for k, v in runs.items()}
            ref = med["straightforward"]
            cond = {"runs": runs, "median": med, "best": best, "ratios": {}}
            print(f"\n{cache} page cache ({args.repeat} run(s) each, medians):")
            print("| method | wall time (s) | work time (s) | CPU time (s) | peak RSS (MB) |")
            print("|---|---:|---:|---:|---:|")
            for kind, m in med.items():
                print(f"| {kind} | {m['wall_s']:.1f} | {m['work_s']:.1f} | {m['cpu_s']:.1f} | {m['peak_rss_mb']:.0f} |")
            if args.repeat > 1:
                for kind, m in best.items():
                    print(f"| {kind} (best of {args.repeat}) | {m['wall_s']:.1f} | {m['work_s']:.1f} | {m['cpu_s']:.1f} | {m['peak_rss_mb']:.0f} |")
            for kind in kinds[:2]:
                check = compare(work / f"out-{kind}", work / "out-straightforward")
                ratios = {m.removesuffix("_s").removesuffix("_mb"): med[kind][m] / ref[m] for m in metrics}
                cond["ratios"][kind] = {**ratios, "equal": not check["mismatched"],
                                        "compare": {**check, "mismatched": check["mismatched"][:10]}}
                equal = equal and not check["mismatched"]
                if check["mismatched"]:
                    print("mismatched:", ", ".join(check["mismatched"][:10]))
                print(f"{kind} / straightforward: peak RSS x{ratios['peak_rss']:.3f}, wall time x{ratios['wall']:.3f} "
                      f"(work only x{ratios['work']:.3f}, CPU x{ratios['cpu']:.3f}); outputs equal: {not check['mismatched']} "
                      f"({check['tensors']} tensors, max abs diff {check['max_abs_diff']:g})")
            result["conditions"][cache] = cond
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
        if not equal:
            raise SystemExit(1)
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
