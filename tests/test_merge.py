"""Merged checkpoints: every written tensor equals the straightforward mix of A and B, the folder
loads with transformers, its perplexity equals the barrier curve, and interrupted or repeated
merges never leave a partial output folder."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import plain_loss, stored_state
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_llmc import MergeSpec, MergeSpecError, ModelPair, lazy_pair, resolve, save_merged
from hf_llmc.cli import main
from hf_llmc.config.alphas import parse_alpha
from hf_llmc.engine.io import TMP_MARK

REL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dirs(merge_pair_dirs):
    return merge_pair_dirs


@pytest.fixture(scope="module")
def sd(dirs):
    return {"a": stored_state(dirs["a"]), "b": stored_state(dirs["b"])}


@pytest.fixture(scope="module")
def live(dirs):
    return ModelPair.from_pretrained(dirs["a"], dirs["b"])


def _selected(key: str, prefixes: dict[str, float]) -> float | None:
    return next((alpha for prefix, alpha in prefixes.items() if key.startswith(prefix)), None)


# -- tensors -------------------------------------------------------------------------------------
def test_cli_merge_sharded_tensors_load(dirs, sd, tmp_path, capsys):
    out = tmp_path / "merged"
    rc = main(["merge", str(dirs["a"]), str(dirs["b"]), "--set", "attn.0-1=0.3", "--set", "mlp.2=0.75",
               "--out", str(out), "--max-shard-size", "40KB"])
    assert rc == 0, capsys.readouterr().err
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and all((out / s).is_file() for s in shards)
    for shard in shards:  # a shard exceeds the limit only when it holds one oversized tensor
        with safe_open(out / shard, "pt") as fh:
            keys = list(fh.keys())
        assert (out / shard).stat().st_size <= 40_000 + 4096 or len(keys) == 1
    merged = stored_state(out)
    assert set(merged) == set(sd["a"])  # the base's keys: no separate lm_head.weight (tied)
    assert "lm_head.weight" not in merged
    prefixes = {"transformer.h.0.attn.": 0.3, "transformer.h.1.attn.": 0.3, "transformer.h.2.mlp.": 0.75}
    n_mixed = 0
    for key, value in merged.items():
        alpha = _selected(key, prefixes)
        assert value.dtype == sd["a"][key].dtype
        if alpha is None:
            assert torch.equal(value, sd["a"][key]), key
        else:
            n_mixed += 1
            expected = (1 - alpha) * sd["a"][key].double() + alpha * sd["b"][key].double()
            torch.testing.assert_close(value.double(), expected, rtol=1e-6, atol=1e-7)
    assert n_mixed == 12
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    torch.testing.assert_close(model.state_dict()["transformer.h.2.mlp.c_fc.weight"], merged["transformer.h.2.mlp.c_fc.weight"])
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(dirs["a"]).get_vocab()
    assert {"config.json", "generation_config.json", "README.md", "hf_llmc_config.yaml"} <= {p.name for p in out.iterdir()}
    assert not list(tmp_path.glob(f".merged{TMP_MARK}*"))


def test_gradient_base_b_and_dtype(dirs, sd, tmp_path):
    pair = lazy_pair(dirs["a"], dirs["b"])
    spec = MergeSpec(layers="attn.0-2", alpha="0.1:0.9", base="b")
    result = save_merged(pair, spec, tmp_path / "grad", dtype="bfloat16")
    assert [(r.group, r.alpha_min) for r in result.plan.rows] == [("attn.0", 0.1), ("attn.1", 0.5), ("attn.2", 0.9)]
    merged = stored_state(tmp_path / "grad")
    alphas = {f"transformer.h.{i}.attn.": 0.1 + 0.4 * i for i in range(3)}
    for key, value in merged.items():
        assert value.dtype == torch.bfloat16
        alpha = _selected(key, alphas)
        if alpha is None:
            assert torch.equal(value, sd["b"][key].to(torch.bfloat16)), key
        else:
            expected = ((1 - alpha) * sd["a"][key].double() + alpha * sd["b"][key].double()).to(torch.bfloat16)
            torch.testing.assert_close(value, expected, rtol=1e-2, atol=1e-3)
    assert json.loads((tmp_path / "grad" / "config.json").read_text())["dtype"] == "bfloat16"
    # the fraction of changed parameters counts the moved tensors only
    numel = {k: v.numel() for k, v in sd["a"].items()}
    moved = sum(n for k, n in numel.items() if _selected(k, alphas) is not None)
    assert result.plan.numel_changed == moved and result.plan.numel_total == sum(numel.values())


def test_gradient_lists_spread_like_mergekit(dirs, sd, tmp_path):
    # anchors spread piecewise linearly over the selected blocks (block i of n at t = i/(n-1), one
    # block at t = 1); tensors outside the blocks take the first anchor (mergekit evaluates them at t = 0)
    spec = MergeSpec(sets=["mlp.*=0,0.1,0.5,1", "attn.1-2=0.2,0.6", "norm.1=0.2,0.8", "embed=0.3,0.9"])
    assert spec.describe() == "mlp.*=0,0.1,0.5,1; attn.1-2=0.2,0.6; norm.1=0.2,0.8; embed=0.3,0.9"
    result = save_merged(lazy_pair(dirs["a"], dirs["b"]), spec, tmp_path / "g")
    # by hand: mlp at t = 0, 0.5, 1 of the anchors 0, 0.1, 0.5, 1 -> 0, (0.1 + 0.5) / 2, 1
    prefixes = {"transformer.h.0.mlp.": 0.0, "transformer.h.1.mlp.": 0.3, "transformer.h.2.mlp.": 1.0,
                "transformer.h.1.attn.": 0.2, "transformer.h.2.attn.": 0.6,
                "transformer.h.1.ln_": 0.8, "transformer.wte.": 0.3, "transformer.wpe.": 0.3}
    merged = stored_state(tmp_path / "g")
    for key, value in merged.items():
        alpha = _selected(key, prefixes)
        if alpha is None:
            assert torch.equal(value, sd["a"][key]), key
        else:
            expected = (1 - alpha) * sd["a"][key].double() + alpha * sd["b"][key].double()
            torch.testing.assert_close(value.double(), expected, rtol=1e-6, atol=1e-7)
    assert {r.group: r.alpha_min for r in result.plan.rows}["mlp.1"] == pytest.approx(0.3, abs=1e-15)
    for bad, message in [("0,x", "expected anchors"), ("0:1,2", "either START:END or anchors"), ("0,1.5", "outside [0, 1]")]:
        with pytest.raises(MergeSpecError, match=message.replace("[", r"\[")):
            MergeSpec(sets=[f"attn.0={bad}"]).validate()


def test_slerp_matches_formula(dirs, sd, tmp_path):
    save_merged(lazy_pair(dirs["a"], dirs["b"]), MergeSpec(layers="mlp.1", alpha=0.4, method="slerp"), tmp_path / "s")
    merged = stored_state(tmp_path / "s")
    for key in [k for k in merged if k.startswith("transformer.h.1.mlp.")]:
        a, b = sd["a"][key].double().flatten(), sd["b"][key].double().flatten()
        if a.norm() == 0 or b.norm() == 0:  # (zero-initialised biases) slerp falls back to lerp
            expected = 0.6 * a + 0.4 * b
        else:
            omega = torch.arccos(torch.clamp(a @ b / (a.norm() * b.norm()), -1, 1))
            expected = (torch.sin(0.6 * omega) * a + torch.sin(0.4 * omega) * b) / torch.sin(omega)
            assert not torch.allclose(expected, 0.6 * a + 0.4 * b, rtol=1e-3, atol=1e-5)
        torch.testing.assert_close(merged[key].double().flatten(), expected, rtol=1e-5, atol=1e-6)


# -- evaluation ----------------------------------------------------------------------------------
def test_perplexity_equals_barrier_curve(dirs, live, tmp_path):
    out = tmp_path / "eval-merge"
    result = save_merged(live, MergeSpec(layers="attn.0-1", alpha=0.3), out, data=str(dirs["eval"]))
    ev = result.evaluation
    curve = live.barrier(str(dirs["eval"]), layers="attn.0-1", alphas=[0.0, 0.3, 1.0])
    at = curve.alphas.index(0.3)
    assert ev["merged"]["perplexity"] == pytest.approx(curve.perplexity[at], rel=REL)
    # independent: the written folder, loaded by transformers, evaluated block by block
    ids = live.blocks(str(dirs["eval"])).ids
    loss = plain_loss(AutoModelForCausalLM.from_pretrained(out), ids)
    assert math.exp(loss) == pytest.approx(curve.perplexity[at], rel=REL)
    assert ev["a"]["loss"] == pytest.approx(plain_loss(AutoModelForCausalLM.from_pretrained(dirs["a"]), ids), rel=REL)
    assert ev["b"]["loss"] == pytest.approx(plain_loss(AutoModelForCausalLM.from_pretrained(dirs["b"]), ids), rel=REL)
    assert ev["merge_barrier"] == pytest.approx(loss - (0.7 * ev["a"]["loss"] + 0.3 * ev["b"]["loss"]), rel=1e-4, abs=1e-6)
    mid = live.barrier(str(dirs["eval"]), layers="attn.0-1", alphas=[0.0, 0.5, 1.0])
    assert ev["barrier_mid"] == pytest.approx(mid.barrier_mid, rel=1e-6, abs=1e-9)


def test_pair_merge_returns_the_live_model(dirs, live, tmp_path):
    # several α: the card's perplexity comes from the live model set to the merge
    result = save_merged(live, "attn.0-1=0.3; mlp.2=0.75", tmp_path / "ref", data=str(dirs["eval"]))
    expected = stored_state(tmp_path / "ref")
    ids = live.blocks(str(dirs["eval"])).ids
    reloaded = plain_loss(AutoModelForCausalLM.from_pretrained(tmp_path / "ref"), ids)
    assert result.evaluation["merged"]["loss"] == pytest.approx(reloaded, rel=REL)
    assert "merge_barrier" not in result.evaluation
    model = live.merge(MergeSpec(sets=["attn.0-1=0.3", "mlp.2=0.75"]))
    assert model is live.model
    current = model.state_dict()
    for key, value in expected.items():
        assert torch.equal(current[key], value), key
    merged_loss = plain_loss(model, ids)
    # the pair stays usable: its next evaluation puts A back first
    result = live.barrier(str(dirs["eval"]), layers="mlp.2", alphas=[0.0, 1.0])
    assert result.loss_a == pytest.approx(plain_loss(AutoModelForCausalLM.from_pretrained(dirs["a"]), ids), rel=REL)
    assert merged_loss != pytest.approx(result.loss_a, rel=1e-4)


def test_auto_choice(dirs, live, tmp_path):
    from hf_llmc import AutoConfig, ScanConfig, auto_select, run_scan
    from hf_llmc.config.errors import NoMergeableGroupError

    data = str(dirs["eval"])
    ids = live.blocks(data).ids
    everything = auto_select(live, data, AutoConfig(auto=True, max_barrier=1e9))
    la, lb = everything.loss_a, everything.loss_b
    ref = 0.5 * (la + lb)
    assert len(everything.chosen) == 6 and all(s["accepted"] for s in everything.steps)
    singles = [c["barrier"] for c in everything.candidates]
    assert singles == sorted(singles)
    # independent check of one ranking entry and one set: state dicts built by hand
    sa, sb = stored_state(dirs["a"]), stored_state(dirs["b"])

    def loss_of(prefixes):
        model = AutoModelForCausalLM.from_pretrained(dirs["a"])
        mixed = {k: (0.5 * sa[k] + 0.5 * sb[k]) if any(k.startswith(p) for p in prefixes) else sa[k] for k in sa}
        model.load_state_dict(mixed, strict=False)
        model.tie_weights()
        return plain_loss(model, ids)

    def prefix(name):
        kind, i = name.split(".")
        return f"transformer.h.{i}.{'attn' if kind == 'attn' else 'mlp'}."

    first = everything.candidates[0]
    assert loss_of([prefix(first["group"])]) - ref == pytest.approx(first["barrier"], rel=1e-4, abs=1e-6)
    two = everything.steps[1]
    assert loss_of([prefix(s["group"]) for s in everything.steps[:2]]) - ref == pytest.approx(two["set_barrier"], rel=1e-4, abs=1e-6)
    # a threshold between two measured set barriers stops the greedy search right there
    barriers = [s["set_barrier"] for s in everything.steps]
    k = next(i for i in range(1, len(barriers)) if barriers[i] > max(barriers[:i]))
    limit = (max(barriers[:k]) + barriers[k]) / 2
    choice = auto_select(live, data, AutoConfig(auto=True, max_barrier=limit))
    assert choice.chosen == [s["group"] for s in everything.steps[:k]]
    assert choice.steps[-1]["accepted"] is False and choice.steps[-1]["set_barrier"] > limit
    assert choice.loss_merged == pytest.approx(barriers[k - 1] + ref, rel=1e-9)
    # the same ranking read from a single-group scan folder
    scan_dir = tmp_path / "scan"
    run_scan(live, live.blocks(data), ScanConfig(granularity="sublayer", alphas="0.5"), scan_dir, progress=False)
    from_scan = auto_select(live, data, AutoConfig(auto=True, max_barrier=limit, scan_dir=str(scan_dir), auto_layers="attn.*,mlp.*"))
    assert from_scan.chosen == choice.chosen
    for c, d in zip(from_scan.candidates, choice.candidates):
        assert c["group"] == d["group"] and c["barrier"] == pytest.approx(d["barrier"], rel=1e-6, abs=1e-9)
    with pytest.raises(NoMergeableGroupError, match="lowest single-group barrier"):
        auto_select(live, data, AutoConfig(auto=True, max_barrier=singles[0] - 1e-3, scan_dir=str(scan_dir)))
    # the CLI prints the choice and records it in the card
    out = tmp_path / "auto"
    assert main(["merge", str(dirs["a"]), str(dirs["b"]), "--auto", "--max-barrier", repr(limit),
                 "--eval-data", data, "--out", str(out)]) == 0
    card = (out / "README.md").read_text()
    assert "Automatic layer choice" in card and all(f"`{g}`" in card for g in choice.chosen)
    merged = stored_state(out)
    chosen_prefixes = [prefix(g) for g in choice.chosen]
    for key, value in merged.items():
        if any(key.startswith(p) for p in chosen_prefixes):
            torch.testing.assert_close(value, 0.5 * sa[key] + 0.5 * sb[key])
        else:
            assert torch.equal(value, sa[key])


# -- usage errors and output folders ------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["--layers", "attn.0", "--alpha", "1.5"], "outside [0, 1]"),
    (["--set", "attn.0=-0.1"], "outside [0, 1]"),
    (["--set", "attn.0"], "expected LAYERS=ALPHA"),
    (["--alpha", "0.5"], "alpha needs --layers"),
    (["--layers", "attn.9"], "out of range"),
    (["--layers", "bogus.1"], "unknown kind"),
    (["--layers", "attn.0", "--alpha", "x"], "expected a number"),
    ([], "nothing to merge"),
    (["--auto", "--layers", "attn.0"], "--auto chooses"),
    (["--auto"], "--auto measures barriers"),
    (["--layers", "attn.0", "--max-shard-size", "lots"], "--max-shard-size"),
])
def test_usage_errors_exit_2(dirs, tmp_path, capsys, args, message):
    rc = main(["merge", str(dirs["a"]), str(dirs["b"]), "--out", str(tmp_path / "x"), *args])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(f".x{TMP_MARK}*"))


def test_extrapolation_allowed_on_request(dirs, sd, tmp_path):
    rc = main(["merge", str(dirs["a"]), str(dirs["b"]), "--layers", "mlp.0", "--alpha", "1.5",
               "--allow-extrapolation", "--out", str(tmp_path / "x")])
    assert rc == 0
    key = "transformer.h.0.mlp.c_fc.weight"
    torch.testing.assert_close(stored_state(tmp_path / "x")[key], -0.5 * sd["a"][key] + 1.5 * sd["b"][key])
    assert parse_alpha("0.1:0.9") == (0.1, 0.9)
    with pytest.raises(MergeSpecError):
        parse_alpha("2:3")


def test_overwrite_semantics(dirs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()  # an existing empty folder is fine
    cmd = ["merge", str(dirs["a"]), str(dirs["b"]), "--layers", "attn.0", "--out", str(out)]
    assert main(cmd) == 0
    (out / "marker.txt").write_text("old")
    assert main(cmd) == 2 and "--overwrite" in capsys.readouterr().err
    assert (out / "marker.txt").is_file()
    assert main(cmd + ["--overwrite"]) == 0
    assert not (out / "marker.txt").exists() and (out / "model.safetensors").is_file()
    (tmp_path / "file").write_text("x")
    assert main(["merge", str(dirs["a"]), str(dirs["b"]), "--layers", "attn.0", "--out", str(tmp_path / "file")]) == 2
    assert not list(tmp_path.glob(f".*{TMP_MARK}*"))


#: A merge in a child process that writes one tensor every 0.2 s (its progress callback sleeps),
#: so the test can kill it midway.
SLOW_MERGE = """
import sys, time
from hf_llmc import lazy_pair, save_merged
a, b, out, overwrite = sys.argv[1:5]
save_merged(lazy_pair(a, b), "attn.*=0.5", out, max_shard_size="40KB", overwrite=overwrite == "1",
            progress=lambda done, total: time.sleep(0.2))
"""


def _start(dirs, out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", SLOW_MERGE, str(dirs["a"]), str(dirs["b"]), str(out), "1" if "--overwrite" in extra else "0"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_midway(proc: subprocess.Popen, out: Path, timeout: float = 120) -> Path:
    """Wait until the temporary folder holds a finished shard (the merge is midway)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for tmp in out.parent.glob(f".{out.name}{TMP_MARK}*"):
            if len(list(tmp.glob("model-*.safetensors"))) >= 2:
                return tmp
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.05)
    raise AssertionError("the merge never got midway")


def test_sigkill_never_leaves_a_partial_folder(dirs, tmp_path):
    fresh, existing = tmp_path / "fresh", tmp_path / "existing"
    assert main(["merge", str(dirs["a"]), str(dirs["b"]), "--layers", "mlp.0", "--out", str(existing)]) == 0
    before = {p.name: p.read_bytes() for p in existing.iterdir()}
    procs = {fresh: _start(dirs, fresh), existing: _start(dirs, existing, "--overwrite")}
    for out, proc in procs.items():
        stale = _wait_midway(proc, out)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert stale.is_dir()  # killed midway: its temporary folder is left behind...
    assert not fresh.exists()  # ...but never a partial destination
    assert {p.name: p.read_bytes() for p in existing.iterdir()} == before  # the old folder is intact
    # the next run cleans the stale temporary folders and completes
    assert main(["merge", str(dirs["a"]), str(dirs["b"]), "--layers", "attn.*", "--out", str(fresh)]) == 0
    assert main(["merge", str(dirs["a"]), str(dirs["b"]), "--layers", "attn.*", "--out", str(existing), "--overwrite"]) == 0
    assert not list(tmp_path.glob(f".*{TMP_MARK}*"))
    assert AutoModelForCausalLM.from_pretrained(fresh) is not None
    assert stored_state(fresh).keys() == stored_state(existing).keys()


def test_fused_experts_merge_equals_straightforward(moe_pair_dirs, tmp_path):
    """Mixtral (experts stored one tensor per expert, fused into one parameter on load): the
    streamed merge mixes the stored pieces; the result equals from_pretrained + lerp of the fused
    parameters + save_pretrained, key for key and bit for bit, and loads as that model."""
    from hf_llmc.model.architecture import discover

    a, b = moe_pair_dirs["a"], moe_pair_dirs["b"]
    out = tmp_path / "merged"
    assert main(["merge", str(a), str(b), "--set", "attn.0=0.3", "--set", "mlp.1=0.7", "--out", str(out)]) == 0
    model_a = AutoModelForCausalLM.from_pretrained(a)
    params_b = dict(AutoModelForCausalLM.from_pretrained(b).named_parameters())
    arch = discover(model_a)
    assert "model.layers.1.mlp.experts.gate_up_proj" in arch.fused
    alphas = {p: alpha for spec, alpha in (("attn.0", 0.3), ("mlp.1", 0.7)) for g in resolve(spec, arch) for p in g.parameters}
    with torch.no_grad():
        for name, param in model_a.named_parameters():
            if name in alphas:
                param.copy_((1 - alphas[name]) * param + alphas[name] * params_b[name])
    model_a.save_pretrained(tmp_path / "reference")
    merged, reference = stored_state(out), stored_state(tmp_path / "reference")
    assert merged.keys() == reference.keys() and any(".experts.0." in k for k in merged)
    for key, value in merged.items():
        assert torch.equal(value, reference[key]), key
    loaded = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in model_a.state_dict().items())
    pair = lazy_pair(a, b)
    with pytest.raises(MergeSpecError, match="use method='lerp'"):
        save_merged(pair, MergeSpec(layers="mlp.1", alpha=0.5, method="slerp"), tmp_path / "slerp")
    with pytest.raises(MergeSpecError, match=r"must move together; select them as one group \(mlp\.0\)"):
        save_merged(pair, MergeSpec(layers=r"re:model\.layers\.0\.mlp\.experts\.down_proj"), tmp_path / "half")
    assert not (tmp_path / "slerp").exists() and not (tmp_path / "half").exists()


# -- several evaluation sets ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_sets(dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("two-sets")
    words = Path(dirs["eval"]).read_text().split()
    (root / "two.txt").write_text(" ".join(reversed(words)) + " naïve 東京\n")
    return {"one": str(dirs["eval"]), "two": str(root / "two.txt")}


def test_merge_card_has_a_row_per_evaluation_set(dirs, live, two_sets, tmp_path):
    from hf_llmc import DataConfig

    data = DataConfig(data=[f"{n}={p}" for n, p in two_sets.items()])
    result = save_merged(live, MergeSpec(layers="attn.0-1", alpha=0.3), tmp_path / "m", data=data)
    ev = result.evaluation
    assert list(ev["sets"]) == ["one", "two"] and set(ev["averages"]) == {"mean", "macro"}
    for name, path in two_sets.items():  # each set: the same numbers as a barrier on that set alone
        curve = live.barrier(path, layers="attn.0-1", alphas=[0.0, 0.3, 1.0])
        assert ev["sets"][name]["merged"]["perplexity"] == pytest.approx(curve.perplexity[1], rel=REL)
        assert ev["sets"][name]["a"]["loss"] == pytest.approx(curve.loss_a, rel=REL)
    t1, t2 = ev["sets"]["one"]["tokens"], ev["sets"]["two"]["tokens"]
    want = (t1 * ev["sets"]["one"]["barrier_mid"] + t2 * ev["sets"]["two"]["barrier_mid"]) / (t1 + t2)
    assert ev["barrier_mid"] == pytest.approx(want, rel=1e-9)
    card = (tmp_path / "m" / "README.md").read_text()
    assert "| `one` (" in card and "| `two` (" in card and "token-weighted mean" in card and "macro average" in card
    config = (tmp_path / "m" / "hf_llmc_config.yaml").read_text()
    assert "one=" in config and str(Path(two_sets["two"]).parent) not in config  # local paths by their name only


@pytest.mark.parametrize("objective", ["max", "mean", "two"])
def test_auto_objective_over_sets(dirs, live, two_sets, objective):
    from hf_llmc import AutoConfig, auto_select

    singles = {n: auto_select(live, p, AutoConfig(auto=True, max_barrier=1e9)) for n, p in two_sets.items()}
    per = {n: {c["group"]: c["barrier"] for c in s.candidates} for n, s in singles.items()}
    tokens = {n: live.blocks(p).num_blocks * (live.blocks(p).seq_len - 1) for n, p in two_sets.items()}
    multi = auto_select(live, two_sets, AutoConfig(auto=True, max_barrier=1e9, auto_objective=objective))
    for c in multi.candidates:
        one, two = per["one"][c["group"]], per["two"][c["group"]]
        want = {"max": max(one, two), "two": two,
                "mean": (tokens["one"] * one + tokens["two"] * two) / (tokens["one"] + tokens["two"])}[objective]
        assert c["barrier"] == pytest.approx(want, rel=1e-6, abs=1e-9)
    assert multi.objective == objective and set(multi.per_set) == {"one", "two"}
    for step in multi.steps:
        assert step["set_barrier"] == pytest.approx(
            {"max": max, "two": lambda a, b: b, "mean": lambda a, b: (tokens["one"] * a + tokens["two"] * b)
             / (tokens["one"] + tokens["two"])}[objective](step["set_barriers"]["one"], step["set_barriers"]["two"]), rel=1e-9)
    # a cap between two steps' objective values stops there: the cap holds on every set (max)
    if objective == "max" and len(multi.steps) > 2:
        limit = multi.steps[0]["set_barrier"] + 1e-9
        capped = auto_select(live, two_sets, AutoConfig(auto=True, max_barrier=limit))
        assert all(v <= limit for v in capped.steps[0]["set_barriers"].values())


def test_auto_in_bits_per_byte(dirs, live):
    from hf_llmc import AutoConfig, auto_select

    data = str(dirs["eval"])
    nats = auto_select(live, data, AutoConfig(auto=True, max_barrier=1e9))
    bpb = auto_select(live, data, AutoConfig(auto=True, max_barrier=1e9, metric="bpb"))
    blocks = live.blocks(data)
    nbytes = int(blocks.bytes[:, 1:].sum())
    scale = blocks.num_blocks * (blocks.seq_len - 1) / (math.log(2) * nbytes)
    for c, d in zip(nats.candidates, bpb.candidates):
        assert d["barrier"] == pytest.approx(c["barrier"] * scale, rel=1e-9)
    assert bpb.to_dict()["metric"] == "bpb" and "metric" not in nats.to_dict()


def test_cli_auto_objective_and_sets(dirs, two_sets, tmp_path, capsys):
    out = tmp_path / "auto-sets"
    args = ["merge", str(dirs["a"]), str(dirs["b"]), "--auto", "--max-barrier", "1e9", "--auto-objective", "two",
            "--out", str(out)] + [x for n, p in two_sets.items() for x in ("--data", f"{n}={p}")]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "cap on set two" in printed and "  one: perplexity" in printed
    card = (out / "README.md").read_text()
    assert "--auto-objective two" in card and "| `two` (" in card and "the cap held on the set `two`" in card
    assert main(args[:-4] + ["--auto-objective", "three"] + args[-4:] + ["--overwrite"]) == 2  # before loading
    assert "not an evaluation set" in capsys.readouterr().err
