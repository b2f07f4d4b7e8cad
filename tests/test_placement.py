"""Placement: a model offloaded to CPU and disk by accelerate gives the single-device numbers
(interpolation, restore and prefix reuse write through accelerate's offload hooks)."""

from __future__ import annotations

import hashlib
import json

import pytest
from helpers import assert_same_result, build_full_pair, eval_ids, write_eval_text

from hf_llmc import ModelPair
from hf_llmc.cli import main
from hf_llmc.config.errors import PlacementError
from hf_llmc.model.placement import parse_device_map, parse_max_memory

# "head" skips both blocks (block 1 lives on disk): its offload hook must be back afterwards.
CASES = ((None, "a"), ("attn.1", "a"), ("head", "a"), ("block.1", "b"), ("mlp.0,attn.1", "b"))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("place_llama")
    a, b = build_full_pair(root, "llama")
    return a, b, eval_ids()


def _digest(folder) -> str:
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def test_cpu_and_disk_offload_gives_single_device_numbers(llama, tmp_path):
    a, b, ids = llama
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                  "model.layers.1": "disk", "model.norm": "disk", "lm_head": "disk"}
    map_file = tmp_path / "map.json"
    map_file.write_text(json.dumps(device_map))
    before = _digest(a), _digest(b)
    plain = ModelPair.from_pretrained(a, b)
    off = ModelPair.from_pretrained(a, b, device_map=str(map_file), offload_folder=tmp_path / "offload")
    metas = [n for n, p in off.model.named_parameters() if p.device.type == "meta"]
    assert metas and any("layers.1" in n for n in metas) and not any("layers.0" in n for n in metas)
    assert set(off.interp.writer.offloaded) >= set(metas)
    for layers, base in CASES:
        r_off = off.barrier(ids, layers=layers, base=base, alphas="0,0.25,0.5,1")
        r_plain = plain.barrier(ids, layers=layers, base=base, alphas="0,0.25,0.5,1")
        assert_same_result(r_off.to_dict(), r_plain.to_dict())
    hooked = off.model.model.layers[1]
    assert "forward" in hooked.__dict__  # accelerate's hook survived the skipped-block patching
    # Restored exactly, and the checkpoints on disk were never written.
    off.interp.set_base("a")
    assert off.endpoint("a", off.evaluator(off.blocks(ids)), off.blocks(ids)).loss == plain.barrier(ids).loss_a
    assert (_digest(a), _digest(b)) == before


def test_tied_model_fully_on_disk(tmp_path):
    a, b = build_full_pair(tmp_path, "gpt2")
    ids = eval_ids()
    plain = ModelPair.from_pretrained(a, b)
    off = ModelPair.from_pretrained(a, b, max_memory="cpu=100KB", offload_folder=tmp_path / "off")
    assert off.model.hf_device_map == {"": "disk"}
    for layers, base in ((None, "b"), ("embed", "a"), ("attn.1", "a")):  # embed moves the tied head too
        assert_same_result(
            off.barrier(ids, layers=layers, base=base, alphas="0,0.5,1").to_dict(),
            plain.barrier(ids, layers=layers, base=base, alphas="0,0.5,1").to_dict(),
        )


def test_cli_offload_matches_plain(llama, tmp_path, capsys):
    a, b, ids = llama
    text = write_eval_text(tmp_path / "eval.txt", ids)
    common = ["barrier", str(a), str(b), "--data", str(text), "--seq-len", "24", "--layers", "block.1", "--base", "b"]
    assert main(common + ["--json-out", str(tmp_path / "plain.json")]) == 0
    assert main(common + ["--max-memory", "cpu=60KB", "--offload-folder", str(tmp_path / "off"),
                          "--json-out", str(tmp_path / "off.json")]) == 0
    plain = json.loads((tmp_path / "plain.json").read_text())
    off = json.loads((tmp_path / "off.json").read_text())
    assert_same_result(off, plain)
    assert off["placement"]["offloaded_parameters"] > 0 and "disk" in off["placement"]["devices"]
    assert "placement" not in plain
    capsys.readouterr()
    assert main(common + ["--max-memory", "cpu:64GB"]) == 2
    assert "--max-memory" in capsys.readouterr().err


def test_option_parsing(tmp_path):
    assert parse_max_memory("0=20GiB, 1=20GiB,cpu=64GiB") == {0: "20GiB", 1: "20GiB", "cpu": "64GiB"}
    assert parse_device_map("balanced") == "balanced"
    (tmp_path / "m.json").write_text('{"model.layers.0": "0", "lm_head": "cpu"}')
    assert parse_device_map(str(tmp_path / "m.json")) == {"model.layers.0": 0, "lm_head": "cpu"}
    for bad in ("0=lots", "cpu", ""):
        with pytest.raises(PlacementError):
            parse_max_memory(bad)
    with pytest.raises(PlacementError, match="no such file"):
        parse_device_map(str(tmp_path / "missing.json"))
    with pytest.raises(PlacementError):
        parse_device_map("everywhere")
