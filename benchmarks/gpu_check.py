"""GPU check: hf-llmc on a ~1.1 B-parameter Llama-shaped pair built locally (no downloads).

Measures, on one device, in bf16:

* evaluation throughput (tokens/s) of hf-llmc's evaluator against a plain transformers forward
  loop over the same batches (3 alternating timed passes each after a warm-up; target >= 0.9x),
  and the largest relative difference of their losses;
* a full-model barrier (α = 0, 0.5, 1): wall time, barrier, peak memory;
* a single-block scan (every decoder block at α = 0.5, base A, prefix reuse): wall time, against
  the best plain way over the same points (one model, the group's tensors set in place and
  restored, a full forward per point) and the paper's way on a few points (interpolated state
  dict, ``load_state_dict``, full forward);
* peak device memory of each phase against the size of one model's weights;
* 8-bit and 4-bit loading (bitsandbytes; the interpolated group ``attn.0`` kept in bf16): load
  time, barrier of ``attn.0``, endpoint loss next to the bf16 one;
* two-process data parallel (``torchrun``, ``--parallel data`` semantics: blocks split, per-block
  sums gathered) when more than one GPU is present (``--dp on`` forces it, e.g. CPU processes).

Prints one table (markdown) and writes ``OUT/gpu_check.json``; ``--results FILE`` also writes the
result file ``benchmarks/RESULTS.md`` is rendered from. ``--smoke`` runs the same code on a tiny
pair (CPU unless ``--device`` says otherwise) in well under a minute.

Usage: python benchmarks/gpu_check.py [--smoke] [--out DIR] [--device cuda] [--dp auto|on|off] [--results FILE]
(``bash benchmarks/gpu_check.sh`` wraps it with a time limit; sized for <= 6 minutes on one H100/H200.)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (ROOT, HERE):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

FULL = dict(hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=16, num_kv_heads=8,
            vocab_size=32000, seq_len=512, blocks=128, batch_size=16, paper_points=2, reps=3)
# Every dimension a multiple of 64: every bitsandbytes backend accepts the 4-bit weights (the
# packed CPU layout used on AVX512-BF16 CPUs needs output rows in blocks of 32).
SMOKE = dict(hidden_size=128, intermediate_size=384, num_layers=2, num_heads=4, num_kv_heads=2,
             vocab_size=320, seq_len=32, blocks=4, batch_size=2, paper_points=1, reps=2)


def llama_config(s: dict):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"], num_hidden_layers=s["num_layers"],
        num_attention_heads=s["num_heads"], num_key_value_heads=s["num_kv_heads"], vocab_size=s["vocab_size"],
        max_position_embeddings=max(2048, s["seq_len"]), tie_word_embeddings=False, bos_token_id=0,
        eos_token_id=0, attention_dropout=0.0,
    )


def build_pair(root: Path, s: dict, device: torch.device) -> tuple[Path, Path, int, float]:
    """A = seeded random init, B = A + noise (a shared ancestor, like two fine-tunes); bf16."""
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(llama_config(s), dtype=torch.bfloat16)
    numel = sum(p.numel() for p in model.parameters())
    model.save_pretrained(root / "a")
    gen = torch.Generator(device=device).manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() > 1:
                scale = 0.3 * float(p.float().std())
                p.add_((torch.randn(p.shape, generator=gen, device=device) * scale).to(p.dtype))
    model.save_pretrained(root / "b")
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return root / "a", root / "b", numel, time.perf_counter() - t0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _ratio(x: float | None, y: float) -> float | None:
    return None if x is None else x / y


def plain_eval(model, ids: torch.Tensor, batch_size: int, device: torch.device) -> tuple[float, float]:
    """Mean next-token loss of a plain ``model(input_ids=...)`` loop and its tokens/s."""
    total, count = 0.0, 0
    _sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, ids.shape[0], batch_size):
            batch = ids[i : i + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                                     reduction="sum")
            total += float(loss)
            count += batch[:, 1:].numel()
    _sync(device)
    elapsed = time.perf_counter() - t0
    return total / count, ids.numel() / elapsed


def plain_scan(model, sa: dict, sb: dict, points: list[tuple[str, list[str]]], ids, s: dict, device) -> tuple[float, dict]:
    """The best plain way: the live model holds A; per point the group's tensors are set in place
    (``"B"``: every tensor) and restored from A's state dict; a full forward per point."""
    live = dict(model.named_parameters())
    losses = {}
    _sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        for name, names in points:
            for k in names:
                if name == "B":
                    live[k].copy_(sb[k])
                else:
                    live[k].copy_((0.5 * sa[k].float() + 0.5 * sb[k].float()).to(live[k].dtype))
            losses[name], _ = plain_eval(model, ids, s["batch_size"], device)
            for k in names:
                live[k].copy_(sa[k])
    _sync(device)
    return time.perf_counter() - t0, losses


def paper_point_seconds(model, sa: dict, sb: dict, groups, ids, s: dict, device, dtype) -> tuple[float, list[float]]:
    """The paper's way on a few points: the interpolated state dict is built from A and B held in
    memory and loaded with ``load_state_dict``; the full model runs."""
    times, losses = [], []
    for group in groups:
        _sync(device)
        t0 = time.perf_counter()
        names = set(group.parameters)
        state = {k: ((0.5 * sa[k].float() + 0.5 * sb[k].float()).to(dtype) if k in names else sa[k]) for k in sa}
        model.load_state_dict(state, strict=False)
        loss, _ = plain_eval(model, ids, s["batch_size"], device)
        _sync(device)
        times.append(time.perf_counter() - t0)
        losses.append(loss)
    model.load_state_dict(sa, strict=False)
    return sum(times) / len(times), losses


def quantized(kind: str, a: Path, b: Path, ids, s: dict, device, loss_a_bf16: float) -> dict:
    """Load the pair in 8 or 4 bit (``attn.0`` kept in bf16) and measure the barrier of ``attn.0``."""
    from hf_llmc import ModelPair
    from hf_llmc.model.placement import keep_modules_for

    try:
        _reset_peak(device)
        t0 = time.perf_counter()
        q = ModelPair.from_pretrained(a, b, dtype="bfloat16", device=str(device), keep_modules=keep_modules_for(a, "attn.0"),
                                      **{f"load_in_{kind}": True})
        load = time.perf_counter() - t0
        t0 = time.perf_counter()
        qb = q.barrier(ids, layers="attn.0", alphas="0,0.5,1", batch_size=s["batch_size"])
        _sync(device)
        out = {"load_s": round(load, 2), "barrier_s": round(time.perf_counter() - t0, 2), "loss_a": qb.loss_a,
               "loss_a_bf16": loss_a_bf16, "abs_diff_loss_a": abs(qb.loss_a - loss_a_bf16), "barrier_mid": qb.barrier_mid,
               "quantized_weights": len(q.interp.writer.quantized) if q.interp.writer else 0,
               "peak_gib": _peak_gib(device)}
        del q
        return out
    except Exception as err:  # noqa: BLE001 - reported in the table, the other numbers stand
        return {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"}


# -- two-process data parallel ----------------------------------------------------------------------
def dp_worker(a: str, b: str, ids_file: str, batch_size: int, out: str) -> None:
    """One of two processes (torchrun): the full barrier with the blocks split between them."""
    from hf_llmc import ModelPair
    from hf_llmc.analyses.distributed import DataShard, init_processes

    state = init_processes()
    pair = ModelPair.from_pretrained(a, b, dtype="bfloat16", device=str(state.device))
    pair.shard = DataShard(state)
    ids = torch.load(ids_file)
    device = torch.device(state.device)
    pair.evaluator(pair.blocks(ids[:batch_size]), batch_size).run(state="warm")  # warm-up
    _sync(device)
    state.wait_for_everyone()
    t0 = time.perf_counter()
    result = pair.barrier(ids, alphas="0,0.5,1", batch_size=batch_size)
    _sync(device)
    state.wait_for_everyone()
    seconds = time.perf_counter() - t0
    if state.is_main_process:
        Path(out).write_text(json.dumps({"seconds": seconds, "loss_a": result.loss_a, "barrier_mid": result.barrier_mid,
                                         "processes": state.num_processes, "device": str(state.device)}))
    state.wait_for_everyone()
    os._exit(0)  # as hf-llmc's own launched processes: no gloo teardown at interpreter exit


def run_dp(a: Path, b: Path, ids: torch.Tensor, s: dict, work: Path, single: dict) -> dict:
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    free = port.getsockname()[1]
    port.close()
    torch.save(ids, work / "ids.pt")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free),
           str(Path(__file__).resolve()), "--dp-worker", str(a), str(b), str(work / "ids.pt"), str(s["batch_size"]),
           str(work / "dp.json")]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 or not (work / "dp.json").exists():
        return {"error": f"torchrun exited with {proc.returncode}: {proc.stderr.strip().splitlines()[-1][:160] if proc.stderr.strip() else ''}"}
    res = json.loads((work / "dp.json").read_text())
    res.update(launch_s=round(time.perf_counter() - t0, 2), single_seconds=single["seconds"],
               speedup=single["seconds"] / res["seconds"],
               loss_rel_diff=abs(res["loss_a"] - single["loss_a"]) / abs(single["loss_a"]))
    return res


# -- the check ----------------------------------------------------------------------------------------
def run(args) -> dict:
    from hf_llmc import ModelPair, ScanConfig
    from hf_llmc.analyses.scan import ScanRunner

    s = SMOKE if args.smoke else FULL
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="hf-llmc-gpu-check-", dir=args.workdir))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    res: dict = {"mode": "smoke" if args.smoke else "full", "device": str(device), "gpus": gpus,
                 "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
                 "torch": torch.__version__, "cuda": torch.version.cuda, "sizes": s}
    try:
        a, b, numel, t_build = build_pair(work, s, device)
        res.update(parameters=numel, build_s=round(t_build, 2))
        ids = torch.randint(1, s["vocab_size"], (s["blocks"], s["seq_len"]), generator=torch.Generator().manual_seed(0))
        tokens = s["blocks"] * (s["seq_len"] - 1)
        bs = s["batch_size"]

        # 1. load; evaluation throughput: hf-llmc evaluator vs a plain forward loop, same batches
        _reset_peak(device)
        t0 = time.perf_counter()
        pair = ModelPair.from_pretrained(a, b, dtype="bfloat16", device=str(device))
        res["load_s"] = round(time.perf_counter() - t0, 2)
        model_gib = sum(p.numel() * p.element_size() for p in pair.model.parameters()) / 2**30
        res["model_gib"] = model_gib
        ev = pair.evaluator(pair.blocks(ids), bs)
        pair.interp.set_base("a")
        ev.run(state="warm")  # warm-up (kernels, allocator)
        plain_eval(pair.model, ids[:bs], bs, device)  # warm-up
        ours_tps, plain_tps = [], []
        for _ in range(s["reps"]):
            _sync(device)
            t0 = time.perf_counter()
            ours = ev.run(state=f"timed-{_}")
            _sync(device)
            ours_tps.append(ids.numel() / (time.perf_counter() - t0))
            plain_loss, tps = plain_eval(pair.model, ids, bs, device)
            plain_tps.append(tps)
        res["eval"] = {"tokens": tokens, "reps": s["reps"], "ours_tokens_per_s": statistics.median(ours_tps),
                       "plain_tokens_per_s": statistics.median(plain_tps),
                       "ratio": statistics.median(o / p for o, p in zip(ours_tps, plain_tps)),
                       "ratio_range": [min(o / p for o, p in zip(ours_tps, plain_tps)),
                                       max(o / p for o, p in zip(ours_tps, plain_tps))],
                       "loss_ours": ours.loss, "loss_plain": plain_loss,
                       "loss_rel_diff": abs(ours.loss - plain_loss) / abs(plain_loss)}

        # 2. full barrier (after the warm-up above)
        _reset_peak(device)
        t0 = time.perf_counter()
        barrier = pair.barrier(ids, alphas="0,0.5,1", batch_size=bs)
        _sync(device)
        res["barrier"] = {"seconds": round(time.perf_counter() - t0, 3), "loss_a": barrier.loss_a,
                          "loss_b": barrier.loss_b, "barrier_mid": barrier.barrier_mid, "peak_gib": _peak_gib(device),
                          "peak_over_model": _ratio(_peak_gib(device), model_gib)}

        # 3. single-block scan vs the best plain way (same points) and the paper's way (a few points)
        _reset_peak(device)
        cfg = ScanConfig(mode="single", granularity="block", base="a", alphas="0.5", batch_size=bs)
        runner = ScanRunner(pair, pair.blocks(ids), cfg, work / "scan", progress=False)
        t0 = time.perf_counter()
        rows = runner.run()
        _sync(device)
        scan_s = time.perf_counter() - t0
        scan_peak = _peak_gib(device)
        evaluated = {r["group"]: r["loss"] for r in rows if r.get("kind") != "endpoint"}
        groups = runner.plan.groups
        full_names = [n for n in pair.arch.parameters]
        pair.interp.set_base("a")
        model = pair.model
        from safetensors.torch import load_file

        sa = load_file(str(a / "model.safetensors"), device=str(device))
        sb = load_file(str(b / "model.safetensors"), device=str(device))
        live_names = set(dict(model.named_parameters()))
        canon = {n: pair.arch.canonical(n) for n in full_names}
        points = [("A", []), ("B", [k for k in sa if k in live_names])]
        points.append(("full", [k for k in (canon[n] for n in full_names) if k in live_names and k in sa]))
        points += [(g.name, [pair.arch.canonical(n) for n in g.parameters]) for g in groups]
        _reset_peak(device)
        plain_s, plain_losses = plain_scan(model, sa, sb, points, ids, s, device)
        plain_peak = _peak_gib(device)
        worst = max(abs(evaluated[name] - plain_losses[name]) / abs(plain_losses[name])
                    for name, _ in points if name in evaluated)
        paper_s, paper_losses = paper_point_seconds(model, sa, sb, groups[: s["paper_points"]], ids, s, device, dtype)
        worst = max([worst] + [abs(evaluated[g.name] - loss) / abs(loss)
                               for g, loss in zip(groups[: s["paper_points"]], paper_losses)])
        per_row = scan_s / len(rows)
        res["scan"] = {"points": len(rows), "seconds": scan_s, "seconds_per_point": per_row,
                       "plain_seconds": plain_s, "plain_points": len(points),
                       "speedup": plain_s / scan_s,
                       "naive_seconds_per_point": paper_s, "paper_speedup_per_point": paper_s / per_row,
                       "peak_gib": scan_peak, "peak_over_model": _ratio(scan_peak, model_gib),
                       "plain_peak_gib": plain_peak, "max_loss_rel_diff_vs_naive": worst}
        del sa, sb, pair, ev, runner, model
        if device.type == "cuda":
            torch.cuda.empty_cache()

        # 4. 8-bit and 4-bit loading (bitsandbytes); the interpolated group stays in bf16
        res["load_8bit"] = quantized("8bit", a, b, ids, s, device, barrier.loss_a)
        res["load_4bit"] = quantized("4bit", a, b, ids, s, device, barrier.loss_a)

        # 5. two-process data parallel
        dp = args.dp == "on" or (args.dp == "auto" and gpus > 1)
        if dp:
            res["data_parallel"] = run_dp(a, b, ids, s, work, res["barrier"])
        else:
            res["data_parallel"] = {"skipped": f"{gpus} GPU(s) present; two-process data parallel needs two (--dp on forces it)"}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    (out / "gpu_check.json").write_text(json.dumps(res, indent=2) + "\n")
    return res


def _f(x, digits=3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        return f"{x:,.{digits}f}" if abs(x) >= 10 ** -digits or x == 0 else f"{x:.2e}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def _mem(gib, ratio) -> str:
    return "n/a (not a CUDA device)" if gib is None else f"{_f(gib, 2)}; x{_f(ratio, 2)}"


def table(res: dict) -> str:
    e, sc, br = res["eval"], res["scan"], res["barrier"]
    rows = [
        ("device", f"{res['device_name']} ({res['device']}, {res['gpus']} GPU(s) present)"),
        ("model", f"Llama-shaped, {res['sizes']['num_layers']} blocks, {_f(res['parameters'])} parameters, bf16, "
                  f"{_f(res['model_gib'], 2)} GiB of weights"),
        ("eval tokens", f"{_f(e['tokens'])} ({res['sizes']['blocks']} x {res['sizes']['seq_len']}, batch {res['sizes']['batch_size']})"),
        ("build pair / load pair (s)", f"{_f(res['build_s'], 1)} / {_f(res['load_s'], 1)}"),
        ("eval tokens/s: hf-llmc", _f(e["ours_tokens_per_s"], 0)),
        ("eval tokens/s: plain forward, same batch", _f(e["plain_tokens_per_s"], 0)),
        ("hf-llmc / plain throughput (target >= 0.9)",
         f"{_f(e['ratio'], 3)} ({_f(e['ratio_range'][0], 3)}-{_f(e['ratio_range'][1], 3)} over {e['reps']} passes)"),
        ("loss rel. diff hf-llmc vs plain", _f(e["loss_rel_diff"], 2)),
        ("full barrier, 3 alphas (s)", _f(br["seconds"], 2)),
        ("barrier_mid (nats)", _f(br["barrier_mid"], 4)),
        ("peak memory, barrier (GiB; x one model)", _mem(br["peak_gib"], br["peak_over_model"])),
        ("single-block scan: rows (endpoints incl.), wall (s)", f"{sc['points']}, {_f(sc['seconds'], 2)}"),
        ("best plain way, same points (s)", f"{sc['plain_points']}, {_f(sc['plain_seconds'], 2)}"),
        ("scan speed-up over the best plain way", f"x{_f(sc['speedup'], 2)}"),
        ("s/point: paper's way (state dict + load_state_dict + full forward)", _f(sc["naive_seconds_per_point"], 3)),
        ("s/row: hf-llmc scan", _f(sc["seconds_per_point"], 3)),
        ("scan speed-up per point over the paper's way", f"x{_f(sc['paper_speedup_per_point'], 2)}"),
        ("loss rel. diff scan vs plain / paper", _f(sc["max_loss_rel_diff_vs_naive"], 2)),
        ("peak memory, scan (GiB; x one model) / plain scan (GiB)",
         f"{_mem(sc['peak_gib'], sc['peak_over_model'])} / {_f(sc['plain_peak_gib'], 2)}"),
    ]
    for kind in ("8bit", "4bit"):
        q = res[f"load_{kind}"]
        label = kind.replace("bit", "-bit")
        if "error" in q:
            rows.append((f"{label} loading", q["error"]))
            continue
        rows += [
            (f"{label} load (s), quantized weights", f"{_f(q['load_s'], 1)}, {q['quantized_weights']}"),
            (f"{label} barrier attn.0, 3 alphas (s)", _f(q["barrier_s"], 2)),
            (f"{label} endpoint loss A vs bf16", f"{_f(q['loss_a'], 4)} vs {_f(q['loss_a_bf16'], 4)} (abs diff {_f(q['abs_diff_loss_a'], 4)})"),
            (f"peak memory, {label} (GiB)", _f(q["peak_gib"], 2)),
        ]
    dp = res["data_parallel"]
    if "skipped" in dp:
        rows.append(("two-process data parallel", f"skipped: {dp['skipped']}"))
    elif "error" in dp:
        rows.append(("two-process data parallel", dp["error"]))
    else:
        rows += [("two-process data parallel: full barrier (s)", f"{_f(dp['seconds'], 2)} vs {_f(dp['single_seconds'], 2)} in one process"),
                 ("data-parallel speed-up; loss rel. diff", f"x{_f(dp['speedup'], 2)}; {_f(dp['loss_rel_diff'], 2)}")]
    width = max(len(k) for k, _ in rows)
    lines = [f"| {'measure'.ljust(width)} | value |", f"|{'-' * (width + 2)}|-------|"]
    lines += [f"| {k.ljust(width)} | {v} |" for k, v in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="Tiny sizes (CPU unless --device), < 1 minute.")
    parser.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available).")
    parser.add_argument("--out", default="benchmarks/out/gpu_check", help="Folder for gpu_check.json.")
    parser.add_argument("--workdir", help="Where the temporary pair is written (default: the system temp dir).")
    parser.add_argument("--dp", choices=["auto", "on", "off"], default="auto",
                        help="Two-process data parallel: auto = when more than one GPU is present.")
    parser.add_argument("--results", help="Also write the harness result file (e.g. benchmarks/results/gpu_check.json).")
    parser.add_argument("--dp-worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.dp_worker:
        a, b, ids_file, batch_size, out = args.dp_worker
        dp_worker(a, b, ids_file, int(batch_size), out)
        return 0
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    import harness

    started = harness.now()
    t0 = time.perf_counter()
    res = run(args)
    text = table(res)
    print(text)
    total = time.perf_counter() - t0
    print(f"\ntotal {total:.1f} s; details in {Path(args.out) / 'gpu_check.json'}")
    if args.results:
        machine = harness.machine()
        machine["gpu"] = res["device_name"] if res["device"].startswith("cuda") else None
        Path(args.results).parent.mkdir(parents=True, exist_ok=True)
        Path(args.results).write_text(json.dumps({
            "benchmark": "gpu_check", "title": "GPU check", "quick": res["mode"] != "full", "note": None,
            "command": "bash benchmarks/gpu_check.sh " + " ".join(sys.argv[1:]), "started": started,
            "duration_s": round(total, 1), "machine": machine, "table": text, **res}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
