"""Architectures as data: the parameter layout of the known model families, keyed by ``model_type``.

Generic discovery (:func:`~hf_llmc.model.architecture.discover`) instantiates the model on the meta
device, which imports the transformers modelling stack (seconds). For the families below the same
:class:`~hf_llmc.model.architecture.Architecture` follows from ``config.json`` plus the checkpoint's
tensor names and shapes (safetensors headers), with no model and no transformers.

Each :class:`Family` lists its parameters in model order (the order of ``named_parameters``): the
ones before the decoder blocks, one block's, the ones after, and the output head, each with its
group kind. A parameter is required, or optional with a ``when`` label: all parameters sharing a
label are stored together or not at all, in every block. A label with a ``default`` is a config
switch (``attention_bias``...) that must agree with the checkpoint (the default when config.json
lacks the key); other labels (OPT's projections, Falcon's norm layout) follow the checkpoint. Tied
embeddings follow ``tie_word_embeddings``; the checkpoint must agree (an untied head is stored).

The table applies only when the checkpoint holds exactly the expected tensors (plus the buffers
transformers itself ignores on load) and the config names the family's class; anything else
(unknown family, custom code, quantized weights, another layout) gives None and the caller falls
back to discovery. ``tests/test_families.py`` compares every family with discovery.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from ..config.errors import CheckpointError
from ..config.spec import BLOCK_KINDS
from .architecture import Architecture
from .checkpoint.lazy import LazyCheckpoint

#: config.json keys that make the table inapplicable (custom code, quantized or packed weights).
REFUSED_KEYS = ("auto_map", "quantization_config")


@dataclass(frozen=True)
class Param:
    """One parameter: ``name`` (relative to the model, or to a block), its group ``kind`` and its
    presence: required (``when`` None), or stored with every parameter labelled ``when``; with a
    ``default``, ``when`` is a config switch whose value must agree."""

    name: str
    kind: str
    when: str | None = None
    default: bool | None = None


@dataclass(frozen=True)
class Family:
    """The parameter layout of one ``model_type`` (see the module docstring)."""

    model_class: str
    block_prefix: str
    before: tuple[Param, ...]
    block: tuple[Param, ...]
    after: tuple[Param, ...]
    #: The token embedding (what a tied head is).
    embedding: str
    #: ``tie_word_embeddings`` when the config does not say.
    tied: bool
    head_bias: bool = False
    #: config keys holding the number of blocks (the first present counts).
    layer_keys: tuple[str, ...] = ("num_hidden_layers",)
    #: Save-time renames ``(parameter prefix, stored prefix)`` (transformers' checkpoint conversions).
    renames: tuple[tuple[str, str], ...] = ()
    #: Keys (full matches) of stored buffers transformers ignores on load (its model class's
    #: ``_keys_to_ignore_on_load_unexpected``: old checkpoints hold the causal-mask buffers).
    ignored: tuple[str, ...] = ()


def _params(kind: str, modules: Sequence[str], *, weight: str | None = "", bias: str | None = None,
            default: bool | None = None) -> tuple[Param, ...]:
    """``weight`` and ``bias`` of each module in ``modules``, in order. ``weight`` / ``bias``: ``""``
    required, None absent, a label: optional (a config switch when ``default`` is given)."""
    out: list[Param] = []
    for module in modules:
        if weight is not None:
            out.append(Param(f"{module}.weight", kind, weight or None, default if weight else None))
        if bias is not None:
            out.append(Param(f"{module}.bias", kind, bias or None, default if bias else None))
    return tuple(out)


def _attn(*modules: str, **kw) -> tuple[Param, ...]:
    return _params("attn", modules, **kw)


def _mlp(*modules: str, **kw) -> tuple[Param, ...]:
    return _params("mlp", modules, **kw)


def _norm(*modules: str, kind: str = "norm", **kw) -> tuple[Param, ...]:
    return _params(kind, modules, **kw)


def _embed(*modules: str) -> tuple[Param, ...]:
    return _params("embed", modules)


_QKVO = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_GATED = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_ATTN_BIAS = {"bias": "attention_bias", "default": False}
_AFFINE = {"weight": "layer_norm_elementwise_affine", "bias": "layer_norm_elementwise_affine", "default": True}


def _decoder(model_class: str, block: tuple[Param, ...], *, tied: bool, final: str = "model.norm",
             final_bias: bool = False, head_bias: bool = False) -> Family:
    """A ``model.embed_tokens`` / ``model.layers`` / ``model.norm`` / ``lm_head`` model."""
    return Family(model_class, "model.layers", _embed("model.embed_tokens"), block,
                  _norm(final, kind="final_norm", bias="" if final_bias else None),
                  "model.embed_tokens.weight", tied, head_bias)


def _rms_block(attn: tuple[Param, ...], mlp: tuple[Param, ...], norms: Sequence[str] = ()) -> tuple[Param, ...]:
    """attention, MLP, then ``input_layernorm``, ``post_attention_layernorm`` and ``norms``."""
    return attn + mlp + _norm("input_layernorm", "post_attention_layernorm", *norms)


_SANDWICH = ("pre_feedforward_layernorm", "post_feedforward_layernorm")
_QK_NORM = ("self_attn.q_norm", "self_attn.k_norm")


FAMILIES: dict[str, Family] = {
    "gpt2": Family(
        "GPT2LMHeadModel", "transformer.h", _embed("transformer.wte", "transformer.wpe"),
        _norm("ln_1", bias="") + _attn("attn.c_attn", "attn.c_proj", bias="") + _norm("ln_2", bias="")
        + _mlp("mlp.c_fc", "mlp.c_proj", bias=""),
        _norm("transformer.ln_f", kind="final_norm", bias=""), "transformer.wte.weight", True,
        layer_keys=("n_layer", "num_hidden_layers"), ignored=(r"(transformer\.)?h\.\d+\.attn\.(masked_)?bias",),
    ),
    "gpt_neox": Family(
        "GPTNeoXForCausalLM", "gpt_neox.layers", _embed("gpt_neox.embed_in"),
        _norm("input_layernorm", "post_attention_layernorm", bias="")
        + _attn("attention.query_key_value", "attention.dense", bias="attention_bias", default=True)
        + _mlp("mlp.dense_h_to_4h", "mlp.dense_4h_to_h", bias=""),
        _norm("gpt_neox.final_layer_norm", kind="final_norm", bias=""), "gpt_neox.embed_in.weight", False,
        renames=(("lm_head.", "embed_out."),), ignored=(r"(gpt_neox\.)?layers\.\d+\.attention\.(masked_)?bias",),
    ),
    "llama": _decoder("LlamaForCausalLM", _rms_block(_attn(*_QKVO, **_ATTN_BIAS),
                                                     _mlp(*_GATED, bias="mlp_bias", default=False)), tied=False),
    "mistral": _decoder("MistralForCausalLM", _rms_block(_attn(*_QKVO), _mlp(*_GATED)), tied=False),
    "qwen2": _decoder("Qwen2ForCausalLM", _rms_block(_attn(*_QKVO[:3], bias="") + _attn(_QKVO[3]), _mlp(*_GATED)),
                      tied=False),
    "qwen3": _decoder("Qwen3ForCausalLM", _rms_block(_attn(*_QKVO, **_ATTN_BIAS) + _attn(*_QK_NORM), _mlp(*_GATED)),
                      tied=False),
    "gemma": _decoder("GemmaForCausalLM", _rms_block(_attn(*_QKVO, **_ATTN_BIAS), _mlp(*_GATED)), tied=True),
    "gemma2": _decoder("Gemma2ForCausalLM", _rms_block(_attn(*_QKVO, **_ATTN_BIAS), _mlp(*_GATED), _SANDWICH),
                       tied=True),
    "gemma3_text": _decoder(
        "Gemma3ForCausalLM", _rms_block(_attn(*_QKVO, **_ATTN_BIAS) + _attn(*_QK_NORM), _mlp(*_GATED), _SANDWICH),
        tied=True),
    "phi3": _decoder("Phi3ForCausalLM", _rms_block(_attn("self_attn.o_proj", "self_attn.qkv_proj"),
                                                   _mlp("mlp.gate_up_proj", "mlp.down_proj")), tied=False),
    "phi": _decoder(
        "PhiForCausalLM",
        _attn("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense", bias="")
        + _attn("self_attn.q_layernorm", "self_attn.k_layernorm", weight="qk_layernorm", bias="qk_layernorm",
                default=False)
        + _mlp("mlp.fc1", "mlp.fc2", bias="") + _norm("input_layernorm", bias=""),
        tied=False, final="model.final_layernorm", final_bias=True, head_bias=True),
    "opt": Family(
        "OPTForCausalLM", "model.decoder.layers",
        _embed("model.decoder.embed_tokens", "model.decoder.embed_positions")
        + _params("embed", ("model.decoder.project_out", "model.decoder.project_in"), weight="project")
        + _norm("model.decoder.final_layer_norm", kind="final_norm", weight="final_layer_norm",
                bias="final_layer_norm"),
        _attn("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj",
              bias="enable_bias", default=True)
        + _norm("self_attn_layer_norm", **_AFFINE)
        + _mlp("fc1", "fc2", bias="enable_bias", default=True)
        + _norm("final_layer_norm", **_AFFINE),
        (), "model.decoder.embed_tokens.weight", True,
    ),
    "falcon": Family(
        "FalconForCausalLM", "transformer.h", _embed("transformer.word_embeddings"),
        _attn("self_attention.query_key_value", "self_attention.dense", bias="bias", default=False)
        + _mlp("mlp.dense_h_to_4h", "mlp.dense_4h_to_h", bias="bias", default=False)
        # sequential: post_attention_layernorm + input_layernorm; parallel: input_layernorm or ln_attn + ln_mlp
        + _norm("post_attention_layernorm", weight="sequential", bias="sequential")
        + _norm("input_layernorm", weight="one_ln", bias="one_ln")
        + _norm("ln_attn", "ln_mlp", weight="two_ln", bias="two_ln"),
        _norm("transformer.ln_f", kind="final_norm", bias=""), "transformer.word_embeddings.weight", True,
    ),
    "gptj": Family(
        "GPTJForCausalLM", "transformer.h", _embed("transformer.wte"),
        _norm("ln_1", bias="") + _attn("attn.k_proj", "attn.v_proj", "attn.q_proj", "attn.out_proj")
        + _mlp("mlp.fc_in", "mlp.fc_out", bias=""),
        _norm("transformer.ln_f", kind="final_norm", bias=""), "transformer.wte.weight", False, head_bias=True,
        layer_keys=("n_layer", "num_hidden_layers"), ignored=(r"(transformer\.)?h\.\d+\.attn\.(masked_)?bias",),
    ),
}


def _stored(name: str, renames: tuple[tuple[str, str], ...]) -> str:
    """The key ``save_pretrained`` writes for parameter ``name``."""
    for source, target in renames:
        if name.startswith(source):
            return target + name[len(source):]
    return name


def _key(name: str, stored: str, tensors: Mapping) -> str | None:
    """The checkpoint key of ``name``, as :meth:`LazyCheckpoint.key_for` finds it (the name, its
    stored name, either without the base-model prefix)."""
    candidates = [name] + ([stored] if stored != name else [])
    candidates += [c.partition(".")[2] for c in candidates if "." in c]
    return next((c for c in candidates if c in tensors), None)


def _block_count(config: dict, family: Family) -> int | None:
    count = next((config[k] for k in family.layer_keys if k in config), None)
    return count if isinstance(count, int) and not isinstance(count, bool) and count > 0 else None


def _layout(family: Family, blocks: int) -> list[tuple[str, Param, int | None]]:
    """``(parameter name, template, block index or None)`` of every parameter in model order."""
    rows = [(p.name, p, None) for p in family.before]
    rows += [(f"{family.block_prefix}.{i}.{p.name}", p, i) for i in range(blocks) for p in family.block]
    rows += [(p.name, p, None) for p in family.after]
    rows += [(p.name, p, None) for p in _params("head", ["lm_head"], bias="" if family.head_bias else None)]
    return rows


def _present(config: dict, rows, keys: dict[str, str | None]) -> list[str] | None:
    """The parameters present (stored, or a tied alias: ``keys`` maps it to its canonical name), in
    model order; None when a rule of the table breaks (a required parameter missing, a label stored
    only in part, a config switch the checkpoint contradicts)."""
    labels: dict[str, bool] = {}
    for name, param, _ in rows:
        found = keys[name] is not None
        if param.when is None:
            if not found:
                return None
            continue
        if labels.setdefault(param.when, found) != found:
            return None
        if param.default is not None and bool(config.get(param.when, param.default)) != found:
            return None
    return [name for name, _, _ in rows if keys[name] is not None]


def table_architecture(config: dict, tensors: Mapping[str, Sequence[int]] | None) -> Architecture | None:
    """The :class:`Architecture` of a known family from ``config`` (``config.json`` as a dict) and
    ``tensors`` (checkpoint key -> shape; None: unknown); None when the table does not apply (then
    discover)."""
    family = FAMILIES.get(config.get("model_type"))
    if family is None or tensors is None or any(k in config for k in REFUSED_KEYS):
        return None
    if config.get("architectures", [family.model_class]) != [family.model_class]:
        return None
    blocks = _block_count(config, family)
    tied = config.get("tie_word_embeddings", family.tied)
    if blocks is None or not isinstance(tied, bool):
        return None
    rows = _layout(family, blocks)
    stored = {name: _stored(name, family.renames) for name, _, _ in rows}
    keys = {name: _key(name, stored[name], tensors) for name, _, _ in rows}
    aliases = {"lm_head.weight": family.embedding} if tied else {}
    # A tied head is the embedding; a stored copy of it is left unread (transformers ties it on load).
    unread = {keys[alias] for alias in aliases} - {None}
    keys.update({alias: canon for alias, canon in aliases.items()})
    present = _present(config, rows, keys)
    if present is None:
        return None
    used = [keys[name] for name in present if name not in aliases]
    if len(set(used)) != len(used):
        return None
    extra = set(tensors) - set(used) - unread
    if any(not any(re.fullmatch(p, key) for p in family.ignored) for key in extra):
        return None
    shapes = {name: tuple(tensors[keys[name]]) for name in present if name not in aliases}
    if config.get("vocab_size") != shapes[family.embedding][0]:
        return None
    position = {name: (param, block) for name, param, block in rows}
    return _architecture(config["model_type"], family, blocks, [(n, *position[n]) for n in present], shapes,
                         {n: stored[n] for n in present if stored[n] != n}, aliases)


def _architecture(model_type: str, family: Family, blocks: int, rows, shapes: dict[str, tuple[int, ...]],
                  stored: dict[str, str], aliases: dict[str, str]) -> Architecture:
    """Assemble the :class:`Architecture` (the fields :func:`discover` fills) from the present rows."""
    parts = [{k: [] for k in BLOCK_KINDS} for _ in range(blocks)]
    groups: dict[str, list[str]] = {"embed": [], "final_norm": [], "head": []}
    for name, param, block in rows:
        (parts[block] if block is not None else groups)[param.kind].append(name)
    return Architecture(
        model_class=family.model_class,
        model_type=model_type,
        block_prefix=family.block_prefix,
        blocks=parts,
        embed=groups["embed"],
        final_norm=groups["final_norm"],
        head=groups["head"],
        parameters=list(shapes),
        numel={n: math.prod(s) for n, s in shapes.items()},
        shapes=shapes,
        aliases=aliases,
        stored_names=stored,
        fused=[],
    )


def checkpoint_tensors(ckpt: LazyCheckpoint) -> dict[str, tuple[int, ...]] | None:
    """Key -> shape of every tensor in ``ckpt``, from the safetensors headers (no weights read);
    None for pickled weights, whose shapes would need the pickles loaded."""
    return None if ckpt.pickled else {key: ckpt.shape(key) for key in ckpt.keys()}


def folder_tensors(folder: str | Path) -> dict[str, tuple[int, ...]] | None:
    """:func:`checkpoint_tensors` of the weights in ``folder``; None when it holds no complete
    safetensors weights (e.g. a Hub snapshot of the configs only) or they cannot be read."""
    try:
        return checkpoint_tensors(LazyCheckpoint.open_folder(Path(folder), str(folder)))
    except CheckpointError:
        return None
