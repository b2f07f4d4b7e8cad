"""Merge speed and memory: ``hf-llmc merge`` (streamed) vs mergekit and vs the straightforward method.

Builds a ~0.3 B-parameter GPT-2-style pair locally (24 blocks, hidden 1024, vocabulary 8192:
1.25 GB of float32 weights each; A random, B = A + noise), then merges ``attn.0-11`` at α = 0.5,
every other tensor from A, with

* ``hf-llmc-first``: ``python -m hf_llmc merge A B --layers attn.0-11 --alpha 0.5 --out DIR``
  with an empty ``HF_LLMC_CACHE`` for every run (a first merge);
* ``hf-llmc``: the same command with the cache kept from an untimed merge (a cached merge);
* ``mergekit`` (``--mergekit``): ``mergekit-yaml CONFIG DIR`` with mergekit 0.1.5 in its own venv
  (created once under ``~/.cache/hf_llmc_bench/mergekit-venv`` with the same torch), the linear
  method and the equivalent ``slices`` / ``parameters`` config: blocks 0-11 from A and B with
  ``weight`` 0.5 / 0.5 for tensors whose name contains ``.attn.`` and 1 / 0 otherwise, blocks
  12-23 from A alone;
* ``straightforward``: ``from_pretrained`` A and B, average the selected parameters,
  ``save_pretrained``.

Every run is a fresh process started by the shared harness (``benchmarks/harness.py``): wall time
(interpreter start and imports included), CPU time and peak RSS of the process, median and range
over ``--runs`` rotated runs after one untimed warm-up round of every method, with the two
checkpoints' page cache ``cold`` (evicted with ``posix_fadvise(DONTNEED)`` after ``sync``) and
``warm`` (read once) before every run. The last outputs of every method are compared tensor by
tensor. The orchestrating process imports no torch (a child's ``ru_maxrss`` starts from its
parent's); building the pair and comparing the outputs run in children too.

    python benchmarks/merge_speed.py --mergekit                     # full: 3 runs x 4 methods x 2 page-cache states (~6 min on 2 cores, ~9 GB of disk)
    python benchmarks/merge_speed.py --mergekit --quick --runs 1    # tiny sizes, validates the benchmark in ~1 min
    python benchmarks/merge_speed.py --mergekit --profile           # also: where hf-llmc's first merge spends its time
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from harness import Harness, Method, child_env, common_arguments, page_cache, report, results_path, run_child  # noqa: E402

FULL = dict(n_layer=24, n_embd=1024, n_head=16, vocab_size=8192, n_positions=1024)
QUICK = dict(n_layer=4, n_embd=128, n_head=4, vocab_size=1000, n_positions=128)
MERGEKIT_VERSION = "0.1.5"
DEFAULT_VENV = Path.home() / ".cache" / "hf_llmc_bench" / "mergekit-venv"


# -- children (each runs in its own process) -----------------------------------------------------
def _selected_names(model, layers: str) -> list[str]:
    from hf_llmc import resolve
    from hf_llmc.model.architecture import discover

    arch = discover(model)
    return sorted({arch.canonical(p) for g in resolve(layers, arch) for p in g.parameters})


def worker(kind: str, a: str, b: str, out: str, layers: str, alpha: float) -> None:
    """The straightforward method (the other methods are their own commands)."""
    if kind != "straightforward":
        raise ValueError(kind)
    import torch
    from transformers import AutoModelForCausalLM

    model_a = AutoModelForCausalLM.from_pretrained(a)
    model_b = AutoModelForCausalLM.from_pretrained(b)
    params_b = dict(model_b.named_parameters())
    selected = set(_selected_names(model_a, layers))
    with torch.no_grad():
        for name, param in model_a.named_parameters():
            if name in selected:
                param.copy_((1 - alpha) * param + alpha * params_b[name])
    model_a.save_pretrained(out)


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
    stamp.write_text(json.dumps(sizes))
    return a, b


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
    return {"tensors": len(tx), "mismatched": mismatched[:10], "max_abs_diff": max_diff, "equal": not mismatched}


def checkpoint_size(a: Path) -> tuple[float, float]:
    """(parameters in millions, GB of float32 weights) of a saved checkpoint, from its header."""
    from safetensors import safe_open

    numel, size = 0, 0
    for file in sorted(a.glob("*.safetensors")):
        size += file.stat().st_size
        with safe_open(file, "pt") as fh:
            numel += sum(math.prod(fh.get_slice(k).get_shape()) for k in fh.keys())
    return numel / 1e6, size / 1e9


# -- mergekit ------------------------------------------------------------------------------------
def ensure_mergekit(venv: Path) -> Path:
    """``venv/bin/mergekit-yaml``, creating the venv once: mergekit==0.1.5 beside the torch of this
    environment (its release, e.g. 2.13.0; a pinned version, so no range pulls a CUDA build)."""
    exe = venv / "bin" / "mergekit-yaml"
    python = venv / "bin" / "python"
    if exe.exists():
        probe = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('mergekit'))"],
                               capture_output=True, text=True)
        if probe.returncode == 0 and probe.stdout.strip() == MERGEKIT_VERSION:
            return exe
    torch_version = metadata.version("torch").split("+")[0]
    print(f"creating {venv} (torch=={torch_version}, mergekit=={MERGEKIT_VERSION}); this takes a few minutes", flush=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", f"torch=={torch_version}",
                    f"mergekit=={MERGEKIT_VERSION}"], check=True)
    return exe


def mergekit_config(a: Path, b: Path, layers: str, alpha: float, n_layer: int) -> str:
    """The mergekit config equal to ``hf-llmc merge A B --layers attn.S-E --alpha α``: blocks S..E
    from A and B (weight 1-α / α on ``.attn.`` tensors, 1 / 0 elsewhere), the other blocks from A
    alone, embeddings and final norm (planned with the first and last slice) from A."""
    m = re.fullmatch(r"attn\.(\d+)(?:-(\d+))?", layers)
    if not m:
        raise SystemExit(f"--mergekit supports --layers attn.S-E only (got {layers!r})")
    start, end = int(m.group(1)), int(m.group(2) or m.group(1)) + 1
    if end > n_layer:
        raise SystemExit(f"--layers {layers}: the model has {n_layer} blocks")

    def source(model: Path, lo: int, hi: int, weight: str) -> str:
        return f"      - model: {model}\n        layer_range: [{lo}, {hi}]\n        parameters:\n          weight:{weight}\n"

    def filtered(inside: float, outside: float) -> str:
        return f"\n            - filter: .attn.\n              value: {inside!r}\n            - value: {outside!r}"

    slices = []
    if start > 0:
        slices.append("  - sources:\n" + source(a, 0, start, " 1.0"))
    slices.append("  - sources:\n" + source(a, start, end, filtered(1 - alpha, 1.0))
                  + source(b, start, end, filtered(alpha, 0.0)))
    if end < n_layer:
        slices.append("  - sources:\n" + source(a, end, n_layer, " 1.0"))
    return "merge_method: linear\ndtype: float32\nslices:\n" + "".join(slices)


# -- profile -------------------------------------------------------------------------------------
def import_profile(argv: list[str], env: dict) -> dict:
    """Seconds spent importing (``python -X importtime``): in all, and in torch / transformers / hf_llmc."""
    t0 = time.perf_counter()
    proc = subprocess.run([argv[0], "-X", "importtime", *argv[1:]], capture_output=True, text=True,
                          env={**os.environ, **env})
    wall = time.perf_counter() - t0
    entries = []
    for line in proc.stderr.splitlines():
        parts = line[len("import time:"):].split("|") if line.startswith("import time:") else []
        if len(parts) == 3 and parts[1].strip().isdigit():
            raw = parts[2].rstrip()
            entries.append((len(raw) - len(raw.lstrip(" ")), raw.strip(), int(parts[1]) / 1e6))
    top = min((d for d, _, _ in entries), default=0)
    tops: dict[str, float] = {}
    for depth, name, seconds in entries:
        if depth == top:
            tops[name.split(".")[0]] = tops.get(name.split(".")[0], 0.0) + seconds
    total = sum(tops.values())
    keep: dict[str, float] = {}
    for _, name, seconds in entries:  # a package's own import, wherever it happened
        if name in ("torch", "transformers", "safetensors", "huggingface_hub", "hf_llmc") and name not in keep:
            keep[name] = round(seconds, 3)
    return {"imports_s": round(total, 3), "by_package_s": keep, "imports_transformers": "transformers" in keep,
            "wall_s": round(wall, 3)}


# -- driver --------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common_arguments(parser)
    parser.add_argument("--mergekit", action="store_true", help=f"Also run mergekit {MERGEKIT_VERSION} (its venv is created once).")
    parser.add_argument("--mergekit-venv", default=str(DEFAULT_VENV), help="Where mergekit's venv lives (default: %(default)s).")
    parser.add_argument("--no-straightforward", action="store_true", help="Leave out the from_pretrained/save_pretrained method.")
    parser.add_argument("--cache", choices=["cold", "warm", "both"], default="both", help="Page-cache state of the two checkpoints before each run.")
    parser.add_argument("--profile", action="store_true", help="Also measure the import time of hf-llmc's first merge (python -X importtime).")
    parser.add_argument("--workdir", help="Where the pair and the outputs go (default: a temporary folder, removed after).")
    parser.add_argument("--layers", default=None, help="Layers to merge (default attn.0-11; quick: attn.0-1).")
    parser.add_argument("--alpha", type=float, default=0.5)
    # children
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--build", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", help=argparse.SUPPRESS)
    parser.add_argument("--compare", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--a", help=argparse.SUPPRESS)
    parser.add_argument("--b", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.a, args.b, args.out, args.layers, args.alpha)
        return 0
    if args.build:
        a, b = build_pair(Path(args.build), json.loads(args.sizes))
        params_m, gb = checkpoint_size(a)
        report(params_m=params_m, checkpoint_gb=gb)
        return 0
    if args.compare:
        report(**compare(Path(args.compare[0]), Path(args.compare[1])))
        return 0

    sizes = QUICK if args.quick else FULL
    layers = args.layers or ("attn.0-1" if args.quick else "attn.0-11")
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="hf-llmc-merge-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    try:
        built = run_child([py, __file__, "--build", str(work / "pair"), "--sizes", json.dumps(sizes)])
        a, b = work / "pair" / "a", work / "pair" / "b"
        inputs = sorted(a.glob("*.safetensors")) + sorted(b.glob("*.safetensors"))
        cached, first = work / "cache-cached", work / "cache-first"
        env = child_env()
        outs = {}

        def fresh(name: str, cache_state: str, extra=None):
            def prepare() -> None:
                shutil.rmtree(outs[name], ignore_errors=True)
                if extra:
                    extra()
                page_cache(inputs, cache_state)  # syncs the last outputs too
            return prepare

        def hf_argv(out: Path) -> list[str]:
            return [py, "-m", "hf_llmc", "merge", str(a), str(b), "--layers", layers, "--alpha", repr(args.alpha),
                    "--out", str(out), "--overwrite"]

        kinds = ["hf-llmc-first", "hf-llmc"]
        mk_exe = mk_config = None
        if args.mergekit:
            mk_exe = ensure_mergekit(Path(args.mergekit_venv).expanduser())
            mk_config = work / "mergekit.yml"
            mk_config.write_text(mergekit_config(a, b, layers, args.alpha, sizes["n_layer"]))
            kinds.append("mergekit")
        if not args.no_straightforward:
            kinds.append("straightforward")
        outs = {k: work / f"out-{k}" for k in kinds}
        # prime the cached case's architecture cache (untimed)
        run_child(hf_argv(work / "out-prime"), env={"HF_LLMC_CACHE": str(cached)})
        shutil.rmtree(work / "out-prime", ignore_errors=True)

        # With the family table, a known family's merge writes nothing to the cache: both cases are the same work.
        cache_written = cached.is_dir() and any(cached.rglob("*"))
        bench = Harness("merge_speed", "Merge speed and memory", quick=args.quick or args.runs < 3, note=args.note)
        params = {"sizes": sizes, "layers": layers, "alpha": args.alpha, "params_m": built["params_m"],
                  "checkpoint_gb": built["checkpoint_gb"], "methods": kinds, "architecture_cache_written": cache_written}
        if mk_exe:
            params["mergekit_version"] = MERGEKIT_VERSION
            params["mergekit_config"] = mk_config.read_text().replace(str(a), "A").replace(str(b), "B")
            params["mergekit_command"] = "mergekit-yaml config.yml OUT (default options)"
        states = ("cold", "warm") if args.cache == "both" else (args.cache,)
        equal = {}
        for state in states:
            methods = []
            for kind in kinds:
                out = outs[kind]
                if kind == "hf-llmc-first":
                    m = Method(kind, hf_argv(out), env={**env, "HF_LLMC_CACHE": str(first)},
                               prepare=fresh(kind, state, lambda: shutil.rmtree(first, ignore_errors=True)))
                elif kind == "hf-llmc":
                    m = Method(kind, hf_argv(out), env={**env, "HF_LLMC_CACHE": str(cached)}, prepare=fresh(kind, state))
                elif kind == "mergekit":
                    m = Method(kind, [str(mk_exe), str(mk_config), str(out)], env=env, prepare=fresh(kind, state))
                else:
                    m = Method(kind, [py, __file__, "--worker", kind, "--a", str(a), "--b", str(b), "--out", str(out),
                                      "--layers", layers, "--alpha", repr(args.alpha)], env=env, prepare=fresh(kind, state))
                m.timeout = 3600
                methods.append(m)
            bench.run(state, methods, runs=args.runs, warmup=1, page_cache=state)
            for kind in kinds[1:]:
                check = run_child([py, __file__, "--compare", str(outs["hf-llmc-first"]), str(outs[kind])])
                equal[f"hf-llmc-first vs {kind} ({state})"] = check
                print(f"[{state}] outputs hf-llmc-first vs {kind}: {'equal' if check['equal'] else 'DIFFERENT'} "
                      f"({check['tensors']} tensors, max abs diff {check['max_abs_diff']:g})")
            for ref in ("mergekit", "straightforward"):
                if ref in kinds:
                    for kind in ("hf-llmc-first", "hf-llmc"):
                        r = bench.ratio(state, kind, ref, ("wall_s", "cpu_s", "peak_rss_mb"))
                        print(f"[{state}] {kind} / {ref}: wall x{r['wall_s']['median']:.2f} "
                              f"({r['wall_s']['min']:.2f}-{r['wall_s']['max']:.2f}), "
                              f"peak RSS x{r['peak_rss_mb']['median']:.2f}")
        bench.checks["outputs_equal"] = equal
        if args.profile:
            shutil.rmtree(first, ignore_errors=True)
            shutil.rmtree(work / "out-profile", ignore_errors=True)
            prof = import_profile(hf_argv(work / "out-profile"), {**env, "HF_LLMC_CACHE": str(first)})
            bench.checks["import_profile_first_merge"] = prof
            print(f"imports of a first merge: {prof}")
        path = results_path(args, "merge_speed")
        if path:
            bench.save(params=params, path=path)
        return 0 if all(v["equal"] for v in equal.values()) else 1
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
