"""GPU check: hf-llmc on a ~1B-parameter Llama-shaped pair built locally (no downloads).

Measures, on one device:

* bf16 full-model barrier (α = 0, 0.5, 1) — time, barrier, peak memory;
* evaluation throughput (tokens/s) of hf-llmc's evaluator against a plain transformers forward
  loop over the same batches, and the largest relative difference of their losses;
* a single-block scan (every decoder block at α = 0.5, base A, prefix reuse) against the
  straightforward method (interpolated state dict -> ``load_state_dict`` -> full forward per
  point, timed on a few points): time per point and speed-up;
* peak GPU memory of each phase;
* 4-bit loading (bitsandbytes NF4, the interpolated group kept in bf16): load time, barrier of
  ``attn.0`` and its endpoint loss next to the bf16 one.

Prints one table (markdown) and writes ``gpu_check.json``. ``--smoke`` runs the same code on a
tiny pair (CPU unless ``--device`` says otherwise) in well under a minute.

Usage: python benchmarks/gpu_check.py [--smoke] [--out DIR] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FULL = dict(hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=16, num_kv_heads=8,
            vocab_size=32000, seq_len=512, blocks=64, batch_size=16, naive_points=3)
# Every dimension a multiple of 64: every bitsandbytes backend accepts the 4-bit weights (the
# packed CPU layout used on AVX512-BF16 CPUs needs output rows in blocks of 32).
SMOKE = dict(hidden_size=128, intermediate_size=384, num_layers=2, num_heads=4, num_kv_heads=2,
             vocab_size=320, seq_len=32, blocks=4, batch_size=2, naive_points=1)


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


def naive_point_seconds(a: Path, b: Path, groups, ids, s: dict, device: torch.device, dtype) -> tuple[float, list[float]]:
    """The straightforward method: per point, the interpolated state dict is built from A and B
    held in memory and loaded into a model with ``load_state_dict``; the full model runs."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    sa = load_file(str(a / "model.safetensors"), device=str(device))
    sb = load_file(str(b / "model.safetensors"), device=str(device))
    model = AutoModelForCausalLM.from_pretrained(a, dtype=dtype).to(device).eval()
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
    del sa, sb, model
    return sum(times) / len(times), losses


def run(args) -> dict:
    from hf_llmc import ModelPair
    from hf_llmc import ScanConfig
    from hf_llmc.analyses.scan import ScanRunner

    s = SMOKE if args.smoke else FULL
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="hf-llmc-gpu-check-", dir=args.workdir))
    res: dict = {"mode": "smoke" if args.smoke else "full", "device": str(device),
                 "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
                 "torch": torch.__version__, "sizes": s}
    try:
        a, b, numel, t_build = build_pair(work, s, device)
        res.update(parameters=numel, build_s=round(t_build, 2))
        ids = torch.randint(1, s["vocab_size"], (s["blocks"], s["seq_len"]), generator=torch.Generator().manual_seed(0))
        tokens = s["blocks"] * (s["seq_len"] - 1)

        # 1. load + bf16 barrier
        _reset_peak(device)
        t0 = time.perf_counter()
        pair = ModelPair.from_pretrained(a, b, dtype="bfloat16", device=str(device))
        res["load_s"] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        barrier = pair.barrier(ids, alphas="0,0.5,1", batch_size=s["batch_size"])
        _sync(device)
        res["barrier"] = {"seconds": round(time.perf_counter() - t0, 2), "loss_a": barrier.loss_a,
                          "loss_b": barrier.loss_b, "barrier_mid": barrier.barrier_mid,
                          "peak_gib": _peak_gib(device)}

        # 2. evaluation throughput: hf-llmc evaluator vs a plain forward loop, same batches
        ev = pair.evaluator(pair.blocks(ids), s["batch_size"])
        pair.interp.set_base("a")
        ev.run(state="warm")  # warm-up (kernels, allocator)
        _sync(device)
        t0 = time.perf_counter()
        ours = ev.run(state="timed")
        _sync(device)
        ours_tps = ids.numel() / (time.perf_counter() - t0)
        plain_eval(pair.model, ids[: s["batch_size"]], s["batch_size"], device)  # warm-up
        plain_loss, plain_tps = plain_eval(pair.model, ids, s["batch_size"], device)
        res["eval"] = {"tokens": tokens, "ours_tokens_per_s": ours_tps, "plain_tokens_per_s": plain_tps,
                       "ratio": ours_tps / plain_tps, "loss_ours": ours.loss, "loss_plain": plain_loss,
                       "loss_rel_diff": abs(ours.loss - plain_loss) / abs(plain_loss)}

        # 3. single-block scan vs the straightforward method
        _reset_peak(device)
        cfg = ScanConfig(mode="single", granularity="block", base="a", alphas="0.5", batch_size=s["batch_size"])
        runner = ScanRunner(pair, pair.blocks(ids), cfg, work / "scan", progress=False)
        t0 = time.perf_counter()
        rows = runner.run()
        _sync(device)
        scan_s = time.perf_counter() - t0
        evaluated = [r for r in rows if r.get("kind") != "endpoint" and r["group"] != "full"]
        per_point = scan_s / len(rows)  # every evaluated row, the two endpoints included
        scan_peak = _peak_gib(device)
        groups = runner.plan.groups[: s["naive_points"]]
        del pair, ev, runner
        if device.type == "cuda":
            torch.cuda.empty_cache()
        _reset_peak(device)
        naive_s, naive_losses = naive_point_seconds(a, b, groups, ids, s, device, dtype)
        ours_by_group = {r["group"]: r["loss"] for r in evaluated}
        res["scan"] = {"points": len(rows), "seconds": round(scan_s, 2), "seconds_per_point": per_point,
                       "naive_seconds_per_point": naive_s, "speedup": naive_s / per_point, "peak_gib": scan_peak,
                       "naive_peak_gib": _peak_gib(device),
                       "max_loss_rel_diff_vs_naive": max(abs(ours_by_group[g.name] - l) / abs(l)
                                                         for g, l in zip(groups, naive_losses))}

        # 4. 4-bit loading (bitsandbytes); the interpolated group stays in bf16
        try:
            from hf_llmc.model.placement import keep_modules_for

            _reset_peak(device)
            t0 = time.perf_counter()
            q = ModelPair.from_pretrained(a, b, dtype="bfloat16", device=str(device), load_in_4bit=True,
                                          keep_modules=keep_modules_for(a, "attn.0"))
            load4 = time.perf_counter() - t0
            t0 = time.perf_counter()
            qb = q.barrier(ids, layers="attn.0", alphas="0,0.5,1", batch_size=s["batch_size"])
            _sync(device)
            res["load_4bit"] = {"load_s": round(load4, 2), "barrier_s": round(time.perf_counter() - t0, 2),
                                "loss_a": qb.loss_a, "loss_a_bf16": barrier.loss_a,
                                "abs_diff_loss_a": abs(qb.loss_a - barrier.loss_a), "barrier_mid": qb.barrier_mid,
                                "quantized_weights": len(q.interp.writer.quantized) if q.interp.writer else 0,
                                "peak_gib": _peak_gib(device)}
            del q
        except Exception as err:  # noqa: BLE001 - reported in the table, the other numbers stand
            res["load_4bit"] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"}
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


def table(res: dict) -> str:
    e, sc, br, q = res["eval"], res["scan"], res["barrier"], res["load_4bit"]
    rows = [
        ("device", f"{res['device_name']} ({res['device']})"),
        ("model", f"Llama-shaped, {res['sizes']['num_layers']} blocks, {_f(res['parameters'])} parameters, bf16"),
        ("eval tokens", f"{_f(e['tokens'])} ({res['sizes']['blocks']} x {res['sizes']['seq_len']}, batch {res['sizes']['batch_size']})"),
        ("build pair (s)", _f(res["build_s"], 1)),
        ("load pair (s)", _f(res["load_s"], 1)),
        ("bf16 full barrier, 3 alphas (s)", _f(br["seconds"], 2)),
        ("barrier_mid (nats)", _f(br["barrier_mid"], 4)),
        ("peak GPU memory, barrier (GiB)", _f(br["peak_gib"], 2)),
        ("eval tokens/s: hf-llmc", _f(e["ours_tokens_per_s"], 0)),
        ("eval tokens/s: plain forward", _f(e["plain_tokens_per_s"], 0)),
        ("hf-llmc / plain throughput", _f(e["ratio"], 3)),
        ("loss rel. diff hf-llmc vs plain", _f(e["loss_rel_diff"], 2)),
        ("single-block scan: rows (endpoints incl.), total (s)", f"{sc['points']}, {_f(sc['seconds'], 2)}"),
        ("s/row: hf-llmc scan", _f(sc["seconds_per_point"], 3)),
        ("s/point: straightforward (state dict + full forward)", _f(sc["naive_seconds_per_point"], 3)),
        ("scan speed-up", f"x{_f(sc['speedup'], 2)}"),
        ("loss rel. diff scan vs straightforward", _f(sc["max_loss_rel_diff_vs_naive"], 2)),
        ("peak GPU memory, scan / straightforward (GiB)", f"{_f(sc['peak_gib'], 2)} / {_f(sc['naive_peak_gib'], 2)}"),
    ]
    if "error" in q:
        rows.append(("4-bit loading", q["error"]))
    else:
        rows += [
            ("4-bit load (s), quantized weights", f"{_f(q['load_s'], 1)}, {q['quantized_weights']}"),
            ("4-bit barrier attn.0, 3 alphas (s)", _f(q["barrier_s"], 2)),
            ("4-bit endpoint loss A vs bf16", f"{_f(q['loss_a'], 4)} vs {_f(q['loss_a_bf16'], 4)} (abs diff {_f(q['abs_diff_loss_a'], 4)})"),
            ("peak GPU memory, 4-bit (GiB)", _f(q["peak_gib"], 2)),
        ]
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
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    t0 = time.perf_counter()
    res = run(args)
    print(table(res))
    print(f"\ntotal {time.perf_counter() - t0:.1f} s; details in {Path(args.out) / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
