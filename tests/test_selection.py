"""The layer grammar: every form, every error, resolution to groups."""

import pytest

from hf_llmc import parse_spec, resolve
from hf_llmc.config.spec import SpecItem, format_spec
from hf_llmc.model.architecture import discover, meta_model
from hf_llmc.model.selection import all_groups, union
from hf_llmc.testing import tiny_config


@pytest.fixture(scope="module")
def llama():
    return discover(meta_model(tiny_config("llama", num_layers=6)))


@pytest.fixture(scope="module")
def gpt2():
    return discover(meta_model(tiny_config("gpt2", num_layers=4)))


def names(groups):
    return [g.name for g in groups]


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("attn.0-3", ["attn.0", "attn.1", "attn.2", "attn.3"]),
        ("attn.2", ["attn.2"]),
        ("mlp.*", [f"mlp.{i}" for i in range(6)]),
        ("mlp", [f"mlp.{i}" for i in range(6)]),
        ("block.-1", ["block.5"]),
        ("norm.-2--1", ["norm.4", "norm.5"]),
        ("attn.0-1,mlp.5", ["attn.0", "attn.1", "mlp.5"]),
        ("attn.1,attn.0-1", ["attn.1", "attn.0"]),  # de-duplicated, first occurrence kept
        ("embed,final_norm,head", ["embed", "final_norm", "head"]),
        (" attn.0 , mlp.0 ", ["attn.0", "mlp.0"]),
    ],
)
def test_forms(llama, spec, expected):
    assert names(resolve(spec, llama)) == expected


def test_attn_0_3_has_16_projection_tensors(llama):
    groups = resolve("attn.0-3", llama)
    params = [p for g in groups for p in g.parameters]
    assert len(params) == 16
    assert all(p.split(".")[-2] in {"q_proj", "k_proj", "v_proj", "o_proj"} for p in params)
    assert [g.first_block for g in groups] == [0, 1, 2, 3]
    assert groups[2].numel == sum(llama.numel[p] for p in groups[2].parameters)


def test_first_block(llama, gpt2):
    assert resolve("embed", llama)[0].first_block is None
    assert resolve("final_norm", llama)[0].first_block == 6
    assert resolve("head", llama)[0].first_block == 6
    # GPT-2's head is tied to the input embedding: moving it changes everything from the start
    assert resolve("head", gpt2)[0].first_block is None
    assert union(resolve("mlp.3,attn.1", llama), llama).first_block == 1


def test_regex(llama):
    (group,) = resolve(r"re:layers\.[01]\.mlp\.down_proj", llama)
    assert group.parameters == ("model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight")
    assert group.blocks == (0, 1) and group.first_block == 0


@pytest.mark.parametrize(
    "spec,message",
    [
        ("attn.9", r"attn.9: block 9 is out of range; the model has 6 blocks \(0-5\)"),
        ("attn.0-9", r"attn.0-9: block 9 is out of range; the model has 6 blocks \(0-5\)"),
        ("mlp.-7", r"block -7 is out of range"),
        ("attn.3-1", r"reversed range \(3 > 1\)"),
        ("attention.0", r"unknown kind 'attention'"),
        ("attn.x", r"bad block range 'x'"),
        ("attn.", r"missing block range"),
        ("attn.0,,mlp.1", r"empty item"),
        ("embed.0", r"takes no block range"),
        ("", r"empty layer spec"),
        ("re:(", r"bad regular expression"),
        ("re:nothing_matches_this", r"matches no parameter"),
        ("re:", r"needs a regular expression"),
    ],
)
def test_errors_are_one_line_value_errors(llama, spec, message):
    with pytest.raises(ValueError, match=message) as info:
        resolve(spec, llama)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("spec", ["attn.0-3", "mlp.*", "block.-1", "norm.-3--1", "embed,head", "re:.*q_proj.*", "attn.2,mlp.0-1"])
def test_format_round_trip(spec):
    items = parse_spec(spec)
    assert parse_spec(format_spec(items)) == items


def test_spec_item_str():
    assert str(SpecItem("attn", 0, 3)) == "attn.0-3"
    assert str(SpecItem("mlp")) == "mlp.*"


def test_all_groups_table(llama):
    table = names(all_groups(llama))
    assert table[0] == "embed" and table[-2:] == ["final_norm", "head"]
    for kind in ("block", "attn", "mlp", "norm"):
        assert [n for n in table if n.startswith(kind + ".")] == [f"{kind}.{i}" for i in range(6)]
