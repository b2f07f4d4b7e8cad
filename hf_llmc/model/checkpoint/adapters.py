"""PEFT LoRA adapters as models: "the base checkpoint + the adapter", read lazily.

A model argument whose folder (or Hub snapshot) holds ``adapter_config.json`` and adapter
weights but no model weights is an adapter. :class:`AdapterCheckpoint` behaves like the
merged checkpoint that ``PeftModel.from_pretrained(base, dir).merge_and_unload()`` would
produce, without ever building it: ``get(name)`` reads the base tensor and, for a LoRA target,
adds ``scale · B @ A`` (transposed for ``fan_in_fan_out`` layers such as GPT-2's ``Conv1D`` and
for embeddings; per-module rank / alpha from ``rank_pattern`` / ``alpha_pattern``; rsLoRA scale
``alpha / sqrt(r)``; ``lora_bias``). Tensors of ``modules_to_save`` come from the adapter file;
everything else is the base's tensor, unchanged.

For a pair of adapters on one base the live model is that base, loaded once; only the tensors
the adapters touch are ever written (:func:`attach`).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ...config.errors import CheckpointError, PairError
from ...config.security import display_name
from .folders import PICKLE_INDEX, PICKLE_SINGLE, SAFE_INDEX, SAFE_SINGLE, resolve_folder
from .lazy import LazyCheckpoint, _load_pickle as load_pickle
from .safetensors import SafetensorsFile

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SAFE = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
# Features whose merge is not "W0 + scale · B @ A" (or that change the module structure).
_UNSUPPORTED = {
    "use_dora": "DoRA (use_dora=true)",
    "layer_replication": "layer_replication",
    "target_parameters": "target_parameters",
    "trainable_token_indices": "trainable_token_indices",
}


def is_adapter_folder(folder: str | os.PathLike) -> bool:
    """True when ``folder`` holds a PEFT adapter (config + weights) and no full model weights."""
    folder = Path(folder)
    if not (folder / ADAPTER_CONFIG).is_file():
        return False
    full = (SAFE_SINGLE, SAFE_INDEX, PICKLE_INDEX, *PICKLE_SINGLE)
    return not any((folder / name).is_file() for name in full)


@dataclass(frozen=True)
class LoraDelta:
    """One LoRA update of a base tensor: ``scale · (B @ A)`` (transposed when ``transpose``)."""

    module: str
    a_key: str
    b_key: str
    r: int
    alpha: float
    scale: float
    transpose: bool


def lora_scale(r: int, alpha: float, use_rslora: bool) -> float:
    """PEFT's scaling: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def read_adapter_config(folder: Path) -> dict:
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{folder.name}/{ADAPTER_CONFIG}: unreadable ({err})") from None
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise CheckpointError(
            f"{folder.name}: PEFT type {peft_type or '(none)'} is not supported; only LoRA adapters can be "
            "used as models (merge it with PEFT and pass the merged folder instead)"
        )
    for key, what in _UNSUPPORTED.items():
        if config.get(key):
            raise CheckpointError(
                f"{folder.name}: LoRA with {what} is not supported; merge it with "
                "PeftModel.merge_and_unload() and pass the merged folder"
            )
    return config


class AdapterCheckpoint(LazyCheckpoint):
    """The merged weights of ``base + LoRA adapter``, computed one tensor at a time.

    ``folder`` is the *base* folder (config and weights to instantiate the live model from);
    ``adapter_folder`` the adapter's. ``source`` / ``revision`` name the adapter as the user gave it.
    Keys, shapes and names are the base's.
    """

    def __init__(
        self,
        base: LazyCheckpoint,
        adapter_folder: Path,
        source: str,
        revision: str | None,
        config: dict,
        weights,
        deltas: dict[str, LoraDelta],
        bias_deltas: dict[str, tuple[str, float]],
        replaced: dict[str, str],
    ):
        super().__init__(base.folder, source, revision, base._files, base.pickled)
        self.base = base
        self.adapter_folder = adapter_folder
        self.adapter_config = config
        self._weights = weights
        self.deltas = deltas  # base key -> LoRA update of that tensor
        self.bias_deltas = bias_deltas  # base key of a bias -> (lora_B bias key, scale)
        self.replaced = replaced  # base key -> adapter key (modules_to_save)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def open_adapter(
        cls,
        adapter_folder: Path,
        source: str,
        revision: str | None = None,
        *,
        base_model: str | os.PathLike | None = None,
        base_revision: str | None = None,
        allow_pickle: bool = False,
        token: str | bool | None = None,
    ) -> "AdapterCheckpoint":
        config = read_adapter_config(adapter_folder)
        recorded = config.get("base_model_name_or_path")
        base_source = base_model if base_model is not None else recorded
        if not base_source:
            raise CheckpointError(
                f"{display_name(source)}: the adapter records no base model; pass base_model=..."
            )
        if base_model is None and base_revision is None:
            base_revision = config.get("revision")
        try:
            base_folder = resolve_folder(base_source, base_revision, token=token)
            nested = is_adapter_folder(base_folder)
            base = None if nested else LazyCheckpoint.open_folder(base_folder, str(base_source), base_revision,
                                                                   allow_pickle=allow_pickle)
        except CheckpointError as err:
            hint = "" if base_model is not None else " (recorded in adapter_config.json; pass base_model= to override)"
            raise CheckpointError(f"{display_name(source)}: base model: {err}{hint}") from None
        if base is None:
            raise CheckpointError(f"{display_name(source)}: its base {display_name(base_source)} is itself an adapter")
        weights = cls._open_weights(adapter_folder, allow_pickle)
        deltas, bias_deltas, replaced = cls._plan(config, weights, base, source)
        return cls(base, adapter_folder, str(source), revision, config, weights, deltas, bias_deltas, replaced)

    @staticmethod
    def _open_weights(folder: Path, allow_pickle: bool):
        if (folder / ADAPTER_SAFE).is_file():
            return SafetensorsFile(folder / ADAPTER_SAFE)
        if (folder / ADAPTER_PICKLE).is_file():
            if not allow_pickle:
                raise CheckpointError(
                    f"{folder.name}: only pickled adapter weights ({ADAPTER_PICKLE}); refusing to unpickle. "
                    "pass allow_pickle=True (loaded with weights_only=True)"
                )
            return load_pickle(folder / ADAPTER_PICKLE)
        raise CheckpointError(f"{folder.name}: {ADAPTER_CONFIG} but no {ADAPTER_SAFE}")

    @staticmethod
    def _plan(config: dict, weights, base: LazyCheckpoint, source: str):
        """Map every adapter tensor to the base tensor it changes; check shapes."""
        from peft.utils.other import get_pattern_key

        name = display_name(source)
        keys = list(weights.keys())
        shape = weights.shape if isinstance(weights, SafetensorsFile) else (lambda k: tuple(weights[k].shape))
        r_default, alpha_default = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
        rank_pattern = config.get("rank_pattern") or {}
        alpha_pattern = config.get("alpha_pattern") or {}
        use_rslora = bool(config.get("use_rslora", False))
        fan_in_fan_out = bool(config.get("fan_in_fan_out", False))

        modules: dict[str, dict[str, str]] = {}
        replaced: dict[str, str] = {}
        for key in keys:
            local = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
            for part, tag in ((".lora_A.weight", "A"), (".lora_B.weight", "B"), (".lora_B.bias", "bias"),
                              (".lora_embedding_A", "eA"), (".lora_embedding_B", "eB")):
                if local.endswith(part):
                    modules.setdefault(local[: -len(part)], {})[tag] = key
                    break
            else:
                # Layers saved whole next to their LoRA (e.g. a targeted embedding's base_layer).
                local = local.replace(".base_layer.", ".")
                if ".lora_" in local or local.endswith("lora_magnitude_vector"):
                    raise CheckpointError(f"{name}: adapter tensor {key} is not a plain LoRA weight; not supported")
                base_key = base.key_for(local)
                if base_key is None:
                    raise CheckpointError(f"{name}: adapter tensor {key} matches no tensor of the base model")
                if tuple(base.shape(base_key)) != shape(key):
                    raise CheckpointError(
                        f"{name}: adapter tensor {key} has shape {shape(key)}, the base's {base_key} "
                        f"{tuple(base.shape(base_key))}; wrong base model?"
                    )
                replaced[base_key] = key

        deltas: dict[str, LoraDelta] = {}
        bias_deltas: dict[str, tuple[str, float]] = {}
        for module, parts in modules.items():
            embedding = "eA" in parts or "eB" in parts
            a_key, b_key = (parts.get("eA"), parts.get("eB")) if embedding else (parts.get("A"), parts.get("B"))
            if a_key is None or b_key is None:
                raise CheckpointError(f"{name}: LoRA module {module} lacks its A or B matrix")
            a_shape, b_shape = shape(a_key), shape(b_key)
            if len(a_shape) != 2 or len(b_shape) != 2:
                raise CheckpointError(f"{name}: LoRA module {module} is not a linear/embedding layer; not supported")
            r = int(rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), r_default))
            alpha = float(alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), alpha_default))
            if a_shape[0] != r or b_shape[1] != r:
                raise CheckpointError(
                    f"{name}: LoRA module {module} has rank {a_shape[0]} but the config says r={r}"
                )
            base_key = base.key_for(f"{module}.weight")
            if base_key is None:
                raise CheckpointError(f"{name}: LoRA module {module} matches no tensor of the base model")
            target = tuple(base.shape(base_key))
            product = (b_shape[0], a_shape[1])
            transpose = True if embedding else fan_in_fan_out
            if not embedding and (product[::-1] if transpose else product) != target and (product if transpose else product[::-1]) == target:
                transpose = not transpose  # e.g. a Conv1D target saved without fan_in_fan_out
            if (product[::-1] if transpose else product) != target:
                raise CheckpointError(
                    f"{name}: LoRA update of {module} has shape {product}, the base's {base_key} {target}; wrong base model?"
                )
            scale = lora_scale(r, alpha, use_rslora)
            deltas[base_key] = LoraDelta(module, a_key, b_key, r, alpha, scale, transpose)
            if "bias" in parts:
                bias_key = base.key_for(f"{module}.bias")
                if bias_key is None:
                    raise CheckpointError(f"{name}: LoRA bias of {module} but the base layer has no bias")
                bias_deltas[bias_key] = (parts["bias"], scale)
        return deltas, bias_deltas, replaced

    # -- access -------------------------------------------------------------------------------
    def _adapter_tensor(self, key: str) -> torch.Tensor:
        return self._weights.get(key) if isinstance(self._weights, SafetensorsFile) else self._weights[key]

    def delta(self, key: str) -> torch.Tensor | None:
        """float32 LoRA update of the base tensor ``key`` (None if the adapter leaves it alone)."""
        if key in self.deltas:
            d = self.deltas[key]
            a = self._adapter_tensor(d.a_key).float()
            b = self._adapter_tensor(d.b_key).float()
            update = (b @ a) * d.scale
            return update.T if d.transpose else update
        if key in self.bias_deltas:
            bias_key, scale = self.bias_deltas[key]
            return self._adapter_tensor(bias_key).float() * scale
        return None

    def get(self, name: str, aliases: dict[str, str] | None = None) -> torch.Tensor:
        """The merged tensor (base dtype): base + LoRA update, the adapter's copy for
        ``modules_to_save``, otherwise the base tensor."""
        key = self._require(name, aliases)
        if key in self.replaced:
            base = self._adapter_tensor(self.replaced[key]).to(self.base.dtype(key))
        else:
            base = self.base.get(key)
        update = self.delta(key)
        if update is None:
            return base
        return (base.float() + update).to(base.dtype)

    def read_into(self, name: str, out: torch.Tensor, aliases: dict[str, str] | None = None) -> bool:
        """In-place read of an *unmodified* base tensor; False (use :meth:`get`) for the rest."""
        key = self._require(name, aliases)
        if key in self.replaced or key in self.deltas or key in self.bias_deltas:
            return False
        reader = getattr(self.base, "read_into", None)
        return bool(reader and reader(key, out))

    def iter_chunks(self, name: str, chunk_bytes: int = 8 << 20, aliases: dict[str, str] | None = None):
        """Chunks of the merged tensor (one piece for adapter-modified tensors)."""
        key = self._require(name, aliases)
        if key in self.replaced or key in self.deltas or key in self.bias_deltas:
            yield 0, self.get(key).reshape(-1)
            return
        yield from self.base.iter_chunks(key, chunk_bytes)

    def modified_keys(self) -> set[str]:
        """Base keys whose value the adapter changes."""
        return set(self.deltas) | set(self.bias_deltas) | set(self.replaced)

    def describe(self) -> dict:
        """What a result file records about the adapter (no local paths)."""
        c = self.adapter_config
        return {
            "adapter": display_name(self.source),
            "base_model": display_name(self.base.source),
            "base_revision": self.base.revision,
            "peft_type": "LORA",
            "r": c.get("r"),
            "lora_alpha": c.get("lora_alpha"),
            "use_rslora": bool(c.get("use_rslora", False)),
            "lora_tensors": len(self.deltas),
            "modules_to_save_tensors": len(self.replaced),
        }

    def close(self) -> None:
        self.base.close()
        super().close()


def base_identity(ckpt: LazyCheckpoint) -> tuple[str, str | None]:
    """Which stored weights a checkpoint's unmodified tensors come from (resolved folder)."""
    inner = ckpt.base if isinstance(ckpt, AdapterCheckpoint) else ckpt
    return str(Path(inner.folder).resolve()), inner.revision


def attach(pair) -> None:
    """Finish loading a pair in which A and/or B is an adapter.

    The live model was instantiated from A's base: write A's adapter tensors, check that two
    adapters share one base, and restrict base switches to the tensors that can differ when
    both sides share the same stored base weights.
    """
    a, b = pair.ckpt_a, pair.ckpt_b
    ad_a, ad_b = isinstance(a, AdapterCheckpoint), isinstance(b, AdapterCheckpoint)
    if not (ad_a or ad_b):
        return
    if ad_a and ad_b and base_identity(a) != base_identity(b):
        raise PairError(
            f"the adapters are on different base models: A on {display_name(a.base.source)}, "
            f"B on {display_name(b.base.source)}; pass base_model= to use one base for both"
        )
    aliases = pair.arch.aliases

    def names(ckpt) -> list[str]:
        keys = ckpt.modified_keys() if isinstance(ckpt, AdapterCheckpoint) else set()
        return [n for n in pair.arch.parameters if ckpt.key_for(n, aliases) in keys]

    touched_a = names(a)
    if touched_a:
        pair.interp.restore(touched_a)  # the live model holds A's base; now it holds A
    if base_identity(a) == base_identity(b):
        pair.interp.varying = set(touched_a) | set(names(b))
