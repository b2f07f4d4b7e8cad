"""Find the addressable parts of a causal LM: decoder blocks, their attention / MLP / norms,
embeddings, final norm and output head.

Discovery is generic (the decoder's block ``ModuleList`` and the module structure and names of
each block's children); a small override table covers the few architectures whose naming the
generic rules cannot classify.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config.errors import ArchitectureError, PairError
from ..config.spec import BLOCK_KINDS

# Child-name overrides: model_type -> {child name inside a block: kind}.
OVERRIDES: dict[str, dict[str, str]] = {
    "opt": {"fc1": "mlp", "fc2": "mlp"},
}

_ATTN = re.compile(r"attn|attention", re.I)
_MLP = re.compile(r"mlp|feed_?forward|ffn|moe|experts", re.I)
_NORM = re.compile(r"norm|(^|_)ln(_|\d|$)|layernorm", re.I)


@dataclass
class Architecture:
    """Parameter names of every addressable part of one model, in model order.

    Parameter names are those of ``model.named_parameters(remove_duplicate=False)``; a tied
    alias (GPT-2's ``lm_head.weight``) is listed where it belongs and mapped to its canonical
    name in ``aliases``.
    """

    model_class: str
    model_type: str
    block_prefix: str
    blocks: list[dict[str, list[str]]]
    embed: list[str]
    final_norm: list[str]
    head: list[str]
    parameters: list[str]
    numel: dict[str, int]
    shapes: dict[str, tuple[int, ...]]
    aliases: dict[str, str] = field(default_factory=dict)
    #: Parameters that ``save_pretrained`` stores under another key (transformers' checkpoint
    #: conversion renames, e.g. GPT-NeoX's ``lm_head.weight`` is stored as ``embed_out.weight``).
    stored_names: dict[str, str] = field(default_factory=dict)
    #: Parameters transformers assembles from several stored tensors on load (fused MoE experts):
    #: checkpoints hold no tensor of that name, so hf-llmc cannot read them one by one.
    fused: list[str] = field(default_factory=list)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def tied(self) -> list[list[str]]:
        """Pairs ``[alias, canonical]`` of names that are one tensor."""
        return [[alias, canon] for alias, canon in self.aliases.items()]

    def canonical(self, name: str) -> str:
        return self.aliases.get(name, name)

    def block_of(self, name: str) -> int | None:
        """Index of the decoder block holding ``name``; None before the blocks, num_blocks after."""
        canon = self.canonical(name)
        prefix = self.block_prefix + "."
        if canon.startswith(prefix):
            return int(canon[len(prefix):].split(".", 1)[0])
        if canon in self.embed or name in self.embed:
            return None
        return self.num_blocks


def _is_norm(name: str, module: nn.Module) -> bool:
    cls = type(module).__name__
    return isinstance(module, nn.LayerNorm) or "Norm" in cls or bool(_NORM.search(name))


def _classify_child(model_type: str, name: str, module: nn.Module) -> str | None:
    override = OVERRIDES.get(model_type, {}).get(name)
    if override:
        return override
    cls = type(module).__name__
    if _is_norm(name, module):
        return "norm"
    if _ATTN.search(name) or "Attention" in cls:
        return "attn"
    if _MLP.search(name) or "MLP" in cls:
        return "mlp"
    return None


def find_block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return (qualified name, module) of the decoder block ``ModuleList``."""
    no_split = set(getattr(model, "_no_split_modules", None) or [])
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if not isinstance(decoder, nn.Module) or decoder is model:
        decoder = getattr(model, "base_model", model)
    decoder_ids = {id(m) for m in decoder.modules()}
    candidates = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and id(mod) in decoder_ids
    ]
    for name, mod in candidates:
        if no_split and type(mod[0]).__name__ in no_split:
            return name, mod
    if candidates:
        return candidates[0]
    raise ArchitectureError(
        f"{type(model).__name__}: no decoder block list found; select parameters with a "
        "'re:<regex>' spec instead"
    )


def discover(model: nn.Module) -> Architecture:
    """Decompose ``model`` (weights may be on the meta device) into addressable groups."""
    model_type = getattr(getattr(model, "config", None), "model_type", "") or ""
    cls = type(model).__name__
    block_prefix, block_list = find_block_list(model)

    # Canonical names and tied aliases from parameter identity.
    first_name: dict[int, str] = {}
    aliases: dict[str, str] = {}
    all_names: list[str] = []
    numel: dict[str, int] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        all_names.append(name)
        if id(param) in first_name:
            aliases[name] = first_name[id(param)]
        else:
            first_name[id(param)] = name
            numel[name] = param.numel()
            shapes[name] = tuple(param.shape)

    blocks: list[dict[str, list[str]]] = []
    for i, block in enumerate(block_list):
        parts: dict[str, list[str]] = {k: [] for k in BLOCK_KINDS}
        own = {f"{block_prefix}.{i}.{n}" for n, _ in block.named_parameters(recurse=False)}
        for child_name, child in block.named_children():
            names = [f"{block_prefix}.{i}.{child_name}.{n}" for n, _ in child.named_parameters()]
            if not names:
                continue
            kind = _classify_child(model_type, child_name, child)
            if kind is None:
                if isinstance(child, nn.Linear):
                    kind = "mlp"
                else:
                    raise ArchitectureError(
                        f"{cls}: cannot classify block child '{child_name}' "
                        f"({type(child).__name__}) as attn, mlp or norm; select parameters with a "
                        "'re:<regex>' spec instead"
                    )
            parts[kind].extend(names)
        if own:
            raise ArchitectureError(
                f"{cls}: block {i} holds parameters outside its children ({sorted(own)[0]}); "
                "select parameters with a 're:<regex>' spec instead"
            )
        if not parts["attn"] or not parts["mlp"]:
            raise ArchitectureError(
                f"{cls}: block {i} has no recognisable attention or MLP module; select "
                "parameters with a 're:<regex>' spec instead"
            )
        blocks.append(parts)

    head_module = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_name = next((n for n, m in model.named_modules() if m is head_module), None)
    head = (
        [f"{head_name}.{n}" for n, _ in head_module.named_parameters(remove_duplicate=False)]
        if head_module is not None and head_name is not None
        else []
    )

    embed: list[str] = []
    final_norm: list[str] = []
    seen_blocks = False
    for mod_name, module in model.named_modules():
        if mod_name == block_prefix:
            seen_blocks = True
            continue
        if mod_name.startswith(block_prefix + ".") or module is head_module:
            continue
        for pname, _ in module.named_parameters(recurse=False):
            full = f"{mod_name}.{pname}" if mod_name else pname
            if full in aliases:
                continue
            if isinstance(module, nn.Embedding) or "embed" in mod_name:
                embed.append(full)
            elif _is_norm(mod_name.rsplit(".", 1)[-1], module) or seen_blocks:
                final_norm.append(full)
            else:
                embed.append(full)
    return Architecture(
        model_class=cls,
        model_type=model_type,
        block_prefix=block_prefix,
        blocks=blocks,
        embed=embed,
        final_norm=final_norm,
        head=head,
        parameters=[n for n in all_names if n not in aliases],
        numel=numel,
        shapes=shapes,
        aliases=aliases,
        **checkpoint_names(model, all_names),
    )


def checkpoint_names(model: nn.Module, names: list[str]) -> dict:
    """How parameters map onto checkpoint keys, from transformers' load-time conversions:
    ``stored_names`` (``{parameter: key}`` where ``save_pretrained`` renames it) and ``fused``
    (parameters assembled from several stored tensors, which map onto no single key)."""
    renamed, fused = {}, []
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, apply_converters, apply_renamings

        conversions = get_model_conversion_mapping(model, add_legacy=False)
    except Exception:  # noqa: BLE001 - not a transformers model, or an older transformers
        conversions = []
    reverse = [c.reverse_transform() for c in conversions[::-1] if type(c).__name__ != "PrefixChange"]
    renamings = [c for c in reverse if isinstance(c, WeightRenaming)]
    converters = [c for c in reverse if not isinstance(c, WeightRenaming)]
    for name in names:
        if converters and apply_converters(name, converters)[1] is not None:
            fused.append(name)
            continue
        stored = apply_renamings(name, renamings)
        if stored != name:
            renamed[name] = stored
    return {"stored_names": renamed, "fused": fused}


def load_config(folder, trust_remote_code: bool = False):
    """``AutoConfig.from_pretrained(folder)``, with one-line :class:`PairError` messages for a
    config that needs custom code (without ``trust_remote_code``) or cannot be read."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise PairError(
                f"{folder.name}: the config needs custom code; pass trust_remote_code=True only if you trust it"
            ) from None
        raise PairError(f"{folder.name}: unreadable config ({str(err).splitlines()[0][:200]})") from None
    except OSError as err:
        raise PairError(f"{folder.name}: no usable config.json ({str(err).splitlines()[0][:200]})") from None


def meta_model(config, trust_remote_code: bool = False) -> nn.Module:
    """Instantiate a causal LM from ``config`` on the meta device (no memory, no weights)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
