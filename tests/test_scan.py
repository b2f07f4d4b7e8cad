"""Scans: plans, numbers against freshly built interpolated models, prefix reuse, resume.

Every loss a scan reports is checked against an independent computation: the interpolated
state dict built with plain torch from the two saved safetensors files, loaded with
``load_state_dict`` into a freshly built model, then a plain loop of
``model(input_ids=block, labels=block)`` over the token blocks.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import Reference, close

from hf_llmc import DataConfig, ModelPair, ScanConfig, ScanError, cli, run_scan
from hf_llmc.analyses.scan import ScanRunner, build_plan, cumulative_order, row_key
from hf_llmc.config.errors import ScanSettingsError
from hf_llmc.engine.io import RESULTS, read_rows
from hf_llmc.model.architecture import find_block_list

SEQ = 32
N_BLOCKS = 4
REL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


class Setup:
    def __init__(self, demo):
        self.demo = demo
        self.pair = ModelPair.from_pretrained(demo.a, demo.b, device="cpu")
        self.blocks = self.pair.blocks(DataConfig(data=str(demo.eval_text), seq_len=SEQ, max_tokens=SEQ * N_BLOCKS))
        assert self.blocks.num_blocks == N_BLOCKS
        self.ref = Reference(demo.a, demo.b, self.blocks.ids)


# The shared pairs are requested lazily, after ``one_thread`` (a direct session-scoped argument
# would be built first, at the default thread count).
@pytest.fixture(scope="module")
def gpt2(one_thread, request):
    return Setup(request.getfixturevalue("gpt2_pair"))


@pytest.fixture(scope="module")
def llama(one_thread, request):
    return Setup(request.getfixturevalue("llama_pair"))


def _close(x: float, y: float, rel: float = REL) -> bool:
    return close(x, y, rel, abs_tol=1e-9)


def _check_rows(setup: Setup, rows: list[dict], pick) -> int:
    """Compare the picked rows with the reference; returns how many were checked."""
    plan_groups = {g.name: g for g in build_plan(setup.pair.arch, pick.cfg).groups}
    plan_groups["full"] = setup.pair.full_group()
    la, lb = setup.ref.endpoints()
    ends = {r["base"]: r for r in rows if r["kind"] == "endpoint"}
    assert _close(ends["a"]["loss"], float(la.mean())) and _close(ends["b"]["loss"], float(lb.mean()))
    checked = 0
    for row in rows:
        if row["kind"] == "endpoint" or row["group"] not in pick.names:
            continue
        group = plan_groups[row["group"]]
        assert row["blocks"] == list(group.blocks)
        losses = setup.ref.point(group.parameters, row["alpha"], row["base"])
        assert _close(row["loss"], float(losses.mean())), (row["group"], row["base"], row["alpha"])
        alpha = row["alpha"]
        ref_line = (1 - alpha) * la + alpha * lb
        d = losses - ref_line  # a difference of close numbers: compare on the loss scale
        assert math.isclose(row["barrier"], float(d.mean()), rel_tol=0, abs_tol=REL * row["loss"])
        assert math.isclose(row["barrier_se"], float(d.std(unbiased=True) / math.sqrt(d.numel())), rel_tol=1e-3,
                            abs_tol=REL * row["loss"])
        assert row["tokens"] == N_BLOCKS * (SEQ - 1)
        checked += 1
    return checked


class Pick:
    def __init__(self, cfg: ScanConfig, names):
        self.cfg = cfg
        self.names = set(names)


def _spread(names: list[str]) -> list[str]:
    """First, middle and last of a list (representative points, not every one)."""
    return sorted({names[0], names[len(names) // 2], names[-1]}, key=names.index)


@pytest.mark.parametrize("model", ["gpt2", "llama"])
def test_scan_losses_equal_fresh_interpolated_models(model, request, tmp_path):
    setup: Setup = request.getfixturevalue(model)
    arch = setup.pair.arch
    n = arch.num_blocks
    cases = [
        ScanConfig(mode="single", granularity="block", base="both", alphas="0.5"),
        ScanConfig(mode="single", granularity="sublayer", base="a", alphas="0.3,0.5"),
        ScanConfig(mode="single", granularity="module", base="b", alphas="0.5"),
        ScanConfig(mode="cumulative", order="shallow,deep,random", seed=3, base="a", alphas="0.5"),
        ScanConfig(mode="window", window=2, base="b", alphas="0.5,1"),
    ]
    total = 0
    for i, cfg in enumerate(cases):
        rows = run_scan(setup.pair, setup.blocks, cfg, tmp_path / f"scan{i}", progress=False)
        names = [g.name for g in build_plan(arch, cfg).groups]
        expected = len(cfg.bases) * len(cfg.alpha_list()) * (len(names) + 1) + 2
        assert len(rows) == expected and len({row_key(r) for r in rows}) == expected
        picked = names if cfg.granularity == "block" and cfg.mode == "single" else _spread(names)
        if cfg.granularity == "sublayer":
            picked += ["embed", "head", f"norm.{n - 1}"]
        total += _check_rows(setup, rows, Pick(cfg, picked + ["full"]))
    assert total >= 30


def test_prefix_reuse_gives_identical_numbers_and_skips_prefix_blocks(gpt2, tmp_path):
    pair, blocks = gpt2.pair, gpt2.blocks
    n = pair.arch.num_blocks
    counts: dict[int, int] = {}
    handles = []
    _, block_list = find_block_list(pair.model)
    for j, block in enumerate(block_list):  # a skipped block never calls its attention module
        handles.append(block.attn.register_forward_pre_hook(lambda *_a, j=j: counts.__setitem__(j, counts.get(j, 0) + 1)))
    batches = math.ceil(blocks.num_blocks / pair.evaluator(blocks).batch_size)
    # "store": base hidden states recorded during the endpoint runs; "chain": prefixes computed
    # incrementally (store disabled); "off": every point runs the whole model.
    settings = {"store": (True, None), "chain": (True, 0), "off": (False, None)}
    results = {}
    try:
        for label, (prefix, store) in settings.items():
            counts.clear()
            cfg = ScanConfig(granularity="block", base="a", alphas="0.5", prefix=prefix)
            runner = ScanRunner(pair, blocks, cfg, tmp_path / label, progress=False, prefix_store_bytes=store)
            results[label] = runner.run()
            for j in range(n):
                # endpoints (2) + full row (1) + the block groups starting at or before j; with the
                # chain, one more pass through j while building the next group's prefix; with
                # reuse, the evaluator's one-off 2-token probe of the block output formats.
                expected = {
                    "store": (3 + (j + 1)) * batches + 1,
                    "chain": (3 + (j + 1) + (1 if j < n - 1 else 0)) * batches + 1,
                    "off": (3 + n) * batches,
                }[label]
                assert counts.get(j, 0) == expected, (label, j, counts)
    finally:
        for h in handles:
            h.remove()
    off = {row_key(r): r for r in results["off"]}
    for label in ("store", "chain"):
        on = {row_key(r): r for r in results[label]}
        assert on.keys() == off.keys()
        for key in on:
            assert _close(on[key]["loss"], off[key]["loss"], 1e-9), (label, key)
            assert on[key]["accuracy"] == off[key]["accuracy"]


def test_plans(gpt2, llama):
    arch = llama.pair.arch
    n = arch.num_blocks
    plan = build_plan(arch, ScanConfig(mode="cumulative", order="shallow,deep,random", seed=7))
    by_name = {g.name: g for g in plan.groups}
    for k, name in enumerate(plan.sequences["shallow"], 1):
        assert by_name[name].blocks == tuple(range(k))
    for k, name in enumerate(plan.sequences["deep"], 1):
        assert by_name[name].blocks == tuple(range(n - k, n))
        assert by_name[name].first_block == n - k
    perm = cumulative_order(n, "random", 7)
    assert sorted(perm) == list(range(n)) and perm == cumulative_order(n, "random", 7)
    assert perm != cumulative_order(n, "random", 8) or n < 3
    for k, name in enumerate(plan.sequences["random"], 1):
        assert set(by_name[name].blocks) == set(perm[:k])
    # A cumulative group is the union of whole blocks (every parameter of those blocks).
    last = by_name[plan.sequences["deep"][-1]]
    assert set(last.parameters) == {p for p in arch.parameters if p.startswith(arch.block_prefix + ".")}

    window = build_plan(arch, ScanConfig(mode="window", window=3)).groups
    assert [g.blocks for g in window] == [tuple(range(i, i + 3)) for i in range(n - 2)]
    with pytest.raises(ScanError):
        build_plan(arch, ScanConfig(mode="window", window=n + 1))
    with pytest.raises(ScanError):
        ScanConfig(mode="cumulative", order="sideways").validate()
    with pytest.raises(ScanError):
        ScanConfig(mode="window", granularity="module").validate()

    for setup in (gpt2, llama):
        arch = setup.pair.arch
        modules = build_plan(arch, ScanConfig(granularity="module")).groups
        canon = [arch.canonical(p) for g in modules for p in g.parameters]
        assert sorted(canon) == sorted(arch.parameters) and len(set(canon)) == len(canon)
        named = dict(setup.pair.model.named_modules())
        for g in modules:  # each group is exactly one module's own parameters
            own = {f"{g.name}.{p}" for p, _ in named[g.name].named_parameters(recurse=False)}
            assert {arch.canonical(p) for p in own} == set(g.parameters)
        sub = [g.name for g in build_plan(arch, ScanConfig(granularity="sublayer")).groups]
        assert sub[0] == "embed" and "attn.0" in sub and "mlp.0" in sub and sub[-1] in ("head", "final_norm")


def _cli_scan(demo, out: Path, *extra: str, alphas: str = "0.25,0.5,0.75") -> list[str]:
    return [sys.executable, "-m", "hf_llmc", "scan", str(demo.a), str(demo.b), "--data", str(demo.eval_text),
            "--seq-len", str(SEQ), "--max-tokens", str(SEQ * 16), "--granularity", "module", "--base", "both",
            "--alphas", alphas, "--device", "cpu", "--out", str(out), *extra]


def _by_key(rows: list[dict]) -> dict:
    out = {}
    for r in rows:
        key = row_key(r)
        assert key not in out, f"duplicate row {key}"
        out[key] = r
    return out


def _same(rows_a: list[dict], rows_b: list[dict], rel: float = 1e-9) -> None:
    a, b = _by_key(rows_a), _by_key(rows_b)
    assert a.keys() == b.keys()
    for key in a:
        for field in ("loss", "accuracy", "barrier", "barrier_se", "tokens"):
            assert _close(a[key][field], b[key][field], rel), (key, field)


def test_sigkill_midway_then_resume_matches_uninterrupted(gpt2, tmp_path):
    gpt2_pair = gpt2.demo
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONUNBUFFERED": "1"}
    out = tmp_path / "killed"
    proc = subprocess.Popen(_cli_scan(gpt2_pair, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    results = out / RESULTS
    deadline = time.time() + 240
    lines = 0
    while time.time() < deadline and proc.poll() is None:
        lines = results.read_bytes().count(b"\n") if results.is_file() else 0
        if lines >= 12:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    killed_rows = read_rows(results)
    assert 12 <= len(killed_rows)
    manifest = json.loads((out / "scan.json").read_text())
    assert manifest["status"] == "running" and len(killed_rows) < manifest["num_points"] + 2

    assert cli.main(_cli_scan(gpt2_pair, out, "--resume")[3:]) == 0  # the same command, in this process
    resumed = read_rows(results)
    assert resumed[: len(killed_rows)] == killed_rows  # nothing finished was recomputed or rewritten
    assert json.loads((out / "scan.json").read_text())["status"] == "complete"
    assert (out / "heatmap.png").is_file() and (out / "report.html").is_file()

    # The same scan without interruption (in this process, same thread count).
    pair = ModelPair.from_pretrained(gpt2_pair.a, gpt2_pair.b, device="cpu")
    blocks = pair.blocks(DataConfig(data=str(gpt2_pair.eval_text), seq_len=SEQ, max_tokens=SEQ * 16))
    cfg = ScanConfig(granularity="module", base="both", alphas="0.25,0.5,0.75")
    _same(resumed, run_scan(pair, blocks, cfg, tmp_path / "straight", progress=False))

    # Different settings on the same folder are refused (exit code 2), nothing is appended.
    before = results.read_bytes()
    argv = _cli_scan(gpt2_pair, out, "--resume", alphas="0.5")[3:]
    assert cli.main(argv) == 2
    assert results.read_bytes() == before


def test_resume_ignores_truncated_last_line_and_refuses_other_settings(gpt2, tmp_path):
    pair, blocks = gpt2.pair, gpt2.blocks
    cfg = ScanConfig(granularity="sublayer", base="both", alphas="0.5")
    full = run_scan(pair, blocks, cfg, tmp_path / "full", progress=False)
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "full", part)
    raw = (part / RESULTS).read_bytes()
    lines = raw.split(b"\n")
    keep = b"\n".join(lines[:7]) + b"\n" + lines[7][: len(lines[7]) // 2]  # 7 rows + half a row
    (part / RESULTS).write_bytes(keep)
    assert len(read_rows(part / RESULTS)) == 7
    resumed = run_scan(pair, blocks, cfg, part, resume=True, progress=False)
    _same(full, resumed, REL)
    for line in (part / RESULTS).read_bytes().splitlines():
        json.loads(line)  # every line is whole again

    with pytest.raises(ScanSettingsError, match="alphas"):
        run_scan(pair, blocks, ScanConfig(granularity="sublayer", base="both", alphas="0.25"), part, resume=True,
                 progress=False)
    other = DataConfig(data=str(gpt2.demo.eval_text), seq_len=SEQ, max_tokens=SEQ * (N_BLOCKS + 1))
    with pytest.raises(ScanSettingsError, match="evaluation data"):
        run_scan(pair, pair.blocks(other), cfg, part, resume=True, progress=False)
    # A damaged line in the middle is an error, not silently skipped.
    lines = (part / RESULTS).read_bytes().split(b"\n")
    lines[3] = b"{not json"
    (part / RESULTS).write_bytes(b"\n".join(lines))
    with pytest.raises(ScanError, match="line 4"):
        run_scan(pair, blocks, cfg, part, resume=True, progress=False)


def test_output_folder_rules(gpt2, tmp_path):
    pair, blocks = gpt2.pair, gpt2.blocks
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    cfg = ScanConfig(granularity="block", alphas="0.5")
    with pytest.raises(ScanError, match="overwrite=True"):
        run_scan(pair, blocks, cfg, out, progress=False)
    with pytest.raises(ScanSettingsError, match="nothing to resume"):
        run_scan(pair, blocks, cfg, out, resume=True, progress=False)
    with pytest.raises(ScanError, match="was not written by hf-llmc"):  # never replaces a folder it did not write
        run_scan(pair, blocks, cfg, out, overwrite=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    out = tmp_path / "scan"
    run_scan(pair, blocks, cfg, out, progress=False)
    assert (out / ".hf-llmc").is_file()  # the scan's folder carries the marker
    (out / "notes.txt").write_text("mine")
    rows = run_scan(pair, blocks, cfg, out, overwrite=True, progress=False)
    assert (out / "notes.txt").read_text() == "mine"  # only the scan's own files are replaced
    assert len(read_rows(out / RESULTS)) == len(rows)
    manifest = json.loads((out / "scan.json").read_text())
    assert manifest["status"] == "complete" and manifest["data"]["fingerprint"] == blocks.fingerprint
    assert manifest["models"]["a"]["name"] == "a" and "torch" in manifest["libraries"]
    assert str(tmp_path) not in (out / "scan.json").read_text()  # local paths are not published
    # Resuming a finished scan evaluates nothing and changes nothing.
    before = (out / RESULTS).read_bytes()
    assert run_scan(pair, blocks, cfg, out, resume=True, progress=False) == rows
    assert (out / RESULTS).read_bytes() == before
    # CLI: a non-empty folder without --overwrite / --resume is a usage error.
    code = cli.main(["scan", str(gpt2.demo.a), str(gpt2.demo.b), "--data", str(gpt2.demo.eval_text), "--out", str(out)])
    assert code == 2
