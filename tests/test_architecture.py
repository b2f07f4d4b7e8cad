"""Architecture discovery on tiny configs of every supported family."""

import pytest
from torch import nn

from hf_llmc.config.errors import ArchitectureError
from hf_llmc.model.architecture import discover, meta_model
from hf_llmc.model.selection import all_groups
from hf_llmc.testing import MODEL_TYPES, tiny_config

TIED_BY_DEFAULT = {"gpt2", "opt", "gemma", "falcon"}


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_every_parameter_lands_in_exactly_one_part(model_type):
    model = meta_model(tiny_config(model_type, num_layers=3))
    arch = discover(model)
    assert arch.num_blocks == 3
    parts = [p for block in arch.blocks for k in ("attn", "mlp", "norm") for p in block[k]]
    parts += arch.embed + arch.final_norm + [p for p in arch.head if p not in arch.aliases]
    canonical = [n for n, _ in model.named_parameters()]
    assert sorted(parts) == sorted(canonical)
    for block in arch.blocks:
        assert block["attn"] and block["mlp"] and block["norm"]
        assert all("attn" in p or "attention" in p for p in block["attn"])
    assert arch.embed and arch.final_norm and arch.head
    assert all(k in {"embed", "block", "attn", "mlp", "norm", "final_norm", "head"} for k in (g.kind for g in all_groups(arch)))


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_tied_tensors_reported(model_type):
    arch = discover(meta_model(tiny_config(model_type)))
    if model_type in TIED_BY_DEFAULT:
        assert len(arch.tied) == 1
        alias, canon = arch.tied[0]
        assert alias in arch.head and canon in arch.embed
    else:
        assert arch.tied == []


def test_opt_fc_layers_are_mlp_and_falcon_is_parallel():
    opt = discover(meta_model(tiny_config("opt")))
    assert [p.split(".")[-2] for p in opt.blocks[0]["mlp"]] == ["fc1", "fc1", "fc2", "fc2"]
    falcon = discover(meta_model(tiny_config("falcon")))
    assert {p.split(".")[-2] for p in falcon.blocks[0]["norm"]} == {"input_layernorm"}  # one shared norm


def test_gpt2_names():
    arch = discover(meta_model(tiny_config("gpt2", num_layers=2)))
    assert arch.block_prefix == "transformer.h"
    assert arch.embed == ["transformer.wte.weight", "transformer.wpe.weight"]
    assert arch.final_norm == ["transformer.ln_f.weight", "transformer.ln_f.bias"]
    assert arch.tied == [["lm_head.weight", "transformer.wte.weight"]]
    assert arch.block_of("lm_head.weight") is None  # the head is the embedding
    assert arch.block_of("transformer.h.1.attn.c_attn.weight") == 1
    assert arch.block_of("transformer.ln_f.weight") == 2


class _NoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)


class _Odd(nn.Module):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.Linear(4, 4)
            self.mlp = nn.Linear(4, 4)
            self.mystery = nn.Conv1d(4, 4, 1)

    _no_split_modules = ["Block"]

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([self.Block()])


def test_undecomposable_models_get_clear_errors():
    with pytest.raises(ArchitectureError, match=r"_NoBlocks: no decoder block list found.*re:"):
        discover(_NoBlocks())
    with pytest.raises(ArchitectureError, match=r"_Odd: cannot classify block child 'mystery' \(Conv1d\).*re:"):
        discover(_Odd())
