"""Where the live model's weights live: device maps, CPU/disk offload, 8/4-bit loading.

Loading goes through transformers/accelerate (``device_map``, ``max_memory``,
``offload_folder``, ``BitsAndBytesConfig``). Writing a path point into such a model needs more
than ``param.copy_``:

* Offloaded parameters are ``meta`` tensors; accelerate's ``AlignDevicesHook`` loads the real
  value from its ``weights_map`` before each forward. A new value is written there: into the
  in-memory state dict of CPU-offloaded weights, or as a ``.dat`` file in the offload folder
  (``accelerate.utils.offload_weight``) whose index entry then replaces the pointer into the
  original safetensors file (which is never modified).
* bitsandbytes weights (``Int8Params`` / ``Params4bit``) are re-quantized from the new value,
  with bitsandbytes' own quantizers, exactly as at load time. After loading, every quantized
  weight is re-written once through this path, so "restore" gives bitwise the values every
  endpoint was evaluated with.
* bitsandbytes may change a 4-bit weight's layout at forward time: on CPUs with AVX512-BF16,
  ``Linear4bit.forward`` repacks the weight into a CPU layout in place (its ``quant_state`` then
  says bfloat16). Writes always quantize from the dtype recorded before any forward and store
  the canonical layout, which bitsandbytes repacks deterministically at the next forward; so a
  weight's state depends only on its value, never on what was evaluated before. Modules whose
  shape that layout cannot hold stay in the generic layout (and are reported).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..config.errors import PlacementError
from .cache import folder_architecture
from .checkpoint.adapters import AdapterCheckpoint, is_adapter_folder, read_adapter_config
from .checkpoint.folders import resolve_folder
from .selection import resolve

DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto`` (or None) -> ``cuda`` when a GPU is present, else ``cpu``; anything else as given."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# -- option parsing ------------------------------------------------------------------------------
def parse_device_map(value: str | dict | None) -> str | dict | None:
    """``auto`` / ``balanced`` / ``balanced_low_0`` / ``sequential``, a JSON file holding a
    ``{module name: device}`` map, or a ready dict."""
    if value is None or isinstance(value, dict):
        return value
    text = str(value).strip()
    if text in DEVICE_MAP_STRATEGIES:
        return text
    path = Path(text).expanduser()
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise PlacementError(f"device_map={text!r}: no such file")
        try:
            mapping = json.loads(path.read_text())
        except ValueError as err:
            raise PlacementError(f"device_map={text!r}: not valid JSON ({err})") from None
        if not isinstance(mapping, dict) or not all(isinstance(k, str) for k in mapping):
            raise PlacementError(f"device_map={text!r}: expected a JSON object {{module name: device}}")
        return {k: _device_value(v) for k, v in mapping.items()}
    raise PlacementError(
        f"device_map={text!r}: use {', '.join(DEVICE_MAP_STRATEGIES)} or a .json file mapping module names to devices"
    )


def _device_value(v):
    if isinstance(v, str) and v.isdigit():
        return int(v)
    return v


def parse_max_memory(text: str | dict | None) -> dict | None:
    """``0=20GiB,1=20GiB,cpu=64GiB`` -> ``{0: "20GiB", 1: "20GiB", "cpu": "64GiB"}``."""
    if text is None or isinstance(text, dict):
        return text
    out: dict = {}
    for item in str(text).split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, size = item.partition("=")
        key, size = key.strip(), size.strip()
        if not sep or not key or not re.fullmatch(r"\d+(\.\d+)?\s*([KMGT]i?B|B)?", size, re.I):
            raise PlacementError(f"max_memory={text!r}: expected DEVICE=SIZE items like 0=20GiB,cpu=64GiB")
        out[int(key) if key.isdigit() else key] = size
    if not out:
        raise PlacementError("max_memory: empty")
    return out


def quantization_config(load_in_8bit: bool, load_in_4bit: bool, keep_modules: list[str] | None, compute_dtype):
    """A ``BitsAndBytesConfig`` (None when neither flag is set)."""
    if not (load_in_8bit or load_in_4bit):
        return None
    if load_in_8bit and load_in_4bit:
        raise PlacementError("load_in_8bit=True and load_in_4bit=True: choose one")
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise PlacementError("quantized loading needs bitsandbytes: pip install 'hf-llmc[quant]'") from None
    skip = sorted(set(keep_modules)) if keep_modules else None
    if load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=compute_dtype or torch.float32,
        llm_int8_skip_modules=skip,
    )


def load_kwargs(
    *,
    device: torch.device,
    device_map=None,
    max_memory=None,
    offload_folder=None,
    load_in_8bit: bool = False,
    load_in_4bit: bool = False,
    keep_modules: list[str] | None = None,
    dtype=None,
) -> dict:
    """Keyword arguments for ``from_pretrained`` (empty when the model goes to one device)."""
    kwargs: dict = {}
    device_map = parse_device_map(device_map)
    max_memory = parse_max_memory(max_memory)
    if (max_memory is not None or offload_folder is not None) and device_map is None:
        device_map = "auto"  # a memory budget / offload folder only means something with a map
    quant = quantization_config(load_in_8bit, load_in_4bit, keep_modules, dtype)
    if quant is not None:
        kwargs["quantization_config"] = quant
        if device_map is None:
            if device.type == "cuda" and device.index is None:
                device = torch.device("cuda", torch.cuda.current_device())
            device_map = {"": str(device)}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if max_memory is not None:
        kwargs["max_memory"] = max_memory
    if offload_folder is not None:
        folder = Path(offload_folder)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # processes write path points there: one folder each
            folder = folder / f"rank{os.environ.get('RANK', '0')}"
        folder.mkdir(parents=True, exist_ok=True)
        kwargs["offload_folder"] = str(folder)
    return kwargs


# -- writing into placed / quantized models ------------------------------------------------------
def _align_hook(module: nn.Module):
    """The accelerate ``AlignDevicesHook`` of ``module`` that offloads its weights (or None)."""
    hook = getattr(module, "_hf_hook", None)
    hooks = getattr(hook, "hooks", None) or ([hook] if hook is not None else [])
    for h in hooks:
        if getattr(h, "offload", False) and getattr(h, "weights_map", None) is not None:
            return h
    return None


def _quant_kind(param) -> str | None:
    cls = type(param).__name__
    return {"Int8Params": "int8", "Params4bit": "nf4"}.get(cls)


#: bitsandbytes' packed CPU 4-bit layout (``_convert_weight_packed_for_cpu``) groups output rows
#: in blocks of 32 and reshapes the block scales to (out, in / blocksize).
CPU_PACK_BLOCK_N = 32


def cpu_packable(shape: tuple[int, ...], blocksize: int) -> bool:
    """Whether a 4-bit weight of ``shape`` (out, in) fits bitsandbytes' packed CPU layout."""
    return len(shape) == 2 and shape[0] % CPU_PACK_BLOCK_N == 0 and shape[1] % blocksize == 0


def _bnb_packs_on_cpu() -> bool:
    """Whether this bitsandbytes repacks 4-bit weights on this CPU at forward time."""
    try:
        from bitsandbytes.functional import has_avx512bf16
    except ImportError:
        return False
    return bool(has_avx512bf16())


def keep_unpackable_unpacked(model: nn.Module) -> list[str]:
    """Keep the CPU 4-bit modules whose shape bitsandbytes' packed CPU layout cannot hold in the
    generic layout (bitsandbytes would stop on an assertion at their first forward); returns their
    names. Raises :class:`PlacementError` naming the module where this bitsandbytes offers no way."""
    kept = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if _quant_kind(weight) != "nf4" or state is None or weight.device.type != "cpu":
            continue
        if cpu_packable(tuple(state.shape), weight.blocksize):
            continue
        if hasattr(module, "support_avx512bf16_for_cpu"):
            if module.support_avx512bf16_for_cpu:
                module.support_avx512bf16_for_cpu = False
                kept.append(name)
        elif _bnb_packs_on_cpu():
            raise PlacementError(
                f"{name}: its 4-bit weight {tuple(state.shape)} cannot use bitsandbytes' packed CPU layout "
                f"(needs out features divisible by {CPU_PACK_BLOCK_N} and in features by {weight.blocksize}); "
                "load it unquantized, in 8 bit, or on a GPU"
            )
    return kept


class ParamWriter:
    """Writes a full-precision value into a parameter wherever and however it is stored."""

    def __init__(self, model: nn.Module, aliases: dict[str, str] | None = None, scratch: str | os.PathLike | None = None):
        self.model = model
        self.params = dict(model.named_parameters(remove_duplicate=False))
        self.modules = dict(model.named_modules())
        self._aliases_of: dict[str, list[str]] = {}
        for alias, canon in (aliases or {}).items():
            self._aliases_of.setdefault(canon, []).append(alias)
        self._scratch = Path(scratch) if scratch else None
        self.offloaded: dict[str, tuple[Mapping, str]] = {}  # param name -> (weights map, key in it)
        for mname, module in self.modules.items():
            hook = _align_hook(module)
            if hook is None:
                continue
            recurse = bool(getattr(hook, "place_submodules", False))
            for pname, _ in module.named_parameters(recurse=recurse, remove_duplicate=False):
                full = f"{mname}.{pname}" if mname else pname
                self.offloaded[full] = (hook.weights_map, pname)
        self.quantized = {n: _quant_kind(p) for n, p in self.params.items() if _quant_kind(p)}
        # The dtype each 4-bit weight was quantized from, read before any forward could repack it
        # (the packed CPU layout's quant_state says bfloat16 and keeps the original aside).
        self._quantized_from = {
            n: getattr(p.quant_state, "original_dtype", p.quant_state.dtype)
            if getattr(p.quant_state, "packing_format_for_cpu", False) else p.quant_state.dtype
            for n, p in self.params.items() if self.quantized.get(n) == "nf4"
        }
        self.cpu_unpacked = keep_unpackable_unpacked(model) if "nf4" in self.quantized.values() else []

    @property
    def needed(self) -> bool:
        """Whether plain ``copy_`` would be wrong for some parameter of this model."""
        return bool(self.offloaded or self.quantized)

    @torch.no_grad()
    def write(self, name: str, value: torch.Tensor) -> None:
        for target in [name, *self._aliases_of.get(name, [])]:
            if target in self.offloaded:
                self._write_offloaded(target, value)
            elif target in self.quantized:
                self._write_quantized(target, value)
            elif target == name:
                self.params[target].data.copy_(value)

    # -- offload ------------------------------------------------------------------------------
    def _write_offloaded(self, name: str, value: torch.Tensor) -> None:
        from accelerate.utils import OffloadedWeightsLoader, PrefixedDataset, offload_weight

        wmap, key = self.offloaded[name]
        while isinstance(wmap, PrefixedDataset):
            wmap, key = wmap.dataset, wmap.prefix + key
        if isinstance(wmap, OffloadedWeightsLoader):
            if key in wmap.state_dict:  # CPU-offloaded: an in-memory tensor
                current = wmap.state_dict[key]
                current.copy_(value.to(current.dtype))
                return
            info = wmap.index[key]
            dtype = getattr(torch, info["dtype"]) if "dtype" in info else wmap[key].dtype
            if wmap.save_folder is None:
                wmap.save_folder = str(self._scratch_dir())
            # A .dat of our own; the index entry stops pointing into the original checkpoint.
            offload_weight(value.detach().to("cpu", dtype).contiguous(), key, wmap.save_folder, wmap.index)
            return
        current = wmap[key]
        if isinstance(current, torch.Tensor) and not current.is_meta:
            current.copy_(value.to(current.dtype))
            return
        raise PlacementError(f"{name}: offloaded in a way hf-llmc cannot update ({type(wmap).__name__})")

    def _scratch_dir(self) -> Path:
        if self._scratch is None:
            self._scratch = Path(tempfile.mkdtemp(prefix="hf-llmc-offload-"))
        self._scratch.mkdir(parents=True, exist_ok=True)
        return self._scratch

    # -- bitsandbytes -------------------------------------------------------------------------
    def _write_quantized(self, name: str, value: torch.Tensor) -> None:
        import bitsandbytes.functional as F

        param = self.params[name]
        module = self.modules[name.rsplit(".", 1)[0]]
        if self.quantized[name] == "int8":
            cb, scb, _ = F.int8_vectorwise_quant(value.to(param.device, torch.float16).contiguous())
            param.data = cb
            param.CB, param.SCB = cb, scb  # the layer's next forward moves them into its state
            state = getattr(module, "state", None)
            if state is not None:
                state.CB = state.SCB = None
            return
        # Quantized from the recorded dtype into the canonical layout, whatever layout the weight
        # is in now; bitsandbytes repacks it (deterministically) at the next forward where it does.
        data, quant_state = F.quantize_4bit(
            value.to(param.device, self._quantized_from[name]).contiguous(),
            blocksize=param.blocksize,
            compress_statistics=param.compress_statistics,
            quant_type=param.quant_type,
            quant_storage=param.quant_storage,
        )
        param.data = data
        param.quant_state = quant_state
        if hasattr(module, "quant_state"):
            module.quant_state = quant_state

    def describe(self) -> dict:
        return {"offloaded_parameters": len(self.offloaded), "quantized_parameters": len(self.quantized)}


def module_names(names: list[str]) -> list[str]:
    """The modules owning the parameter ``names`` (``x.y.weight`` -> ``x.y``)."""
    return sorted({n.rsplit(".", 1)[0] for n in names if "." in n})


def attach(pair) -> None:
    """Give the pair's interpolator a writer when offloaded or quantized weights need one;
    report the checkpoint shapes of packed quantized weights; re-write quantized weights once so
    that every later restore is bitwise the evaluated state."""
    scratch = None
    if pair.load.offload_folder:
        scratch = Path(pair.load.offload_folder) / f"hf-llmc-rank{os.environ.get('RANK', '0')}"
    writer = ParamWriter(pair.model, pair.arch.aliases, scratch=scratch)
    if not writer.needed:
        return
    pair.interp.writer = writer
    for name in writer.quantized:
        if name in pair.arch.shapes:
            shape = tuple(pair.ckpt_a.shape(pair.ckpt_a.key_for(name, pair.arch.aliases)))
            pair.arch.shapes[name] = shape
            pair.arch.numel[name] = int(torch.Size(shape).numel())
    quantized = [n for n in pair.arch.parameters if n in writer.quantized]
    if quantized:
        pair.interp.restore(quantized)


def quantization_info(pair) -> dict | None:
    """The ``"quantization"`` block of a result file (None for an unquantized model)."""
    load = pair.load
    if not (load.load_in_8bit or load.load_in_4bit):
        return None
    writer = pair.interp.writer
    quantized = sorted(writer.quantized) if writer is not None else []
    kept = [n for n in pair.arch.parameters if n not in writer.quantized and n.endswith(".weight")] if writer else []
    return {
        "method": "bitsandbytes",
        "bits": 8 if load.load_in_8bit else 4,
        "quant_type": "int8 (LLM.int8 vector-wise)" if load.load_in_8bit else "nf4",
        "quantized_weights": len(quantized),
        "unquantized_weights": len(kept),
        "kept_in_compute_dtype": [re.sub(r"\\(.)", r"\1", m) for m in (getattr(load, "keep_modules", None) or [])],
        "interpolated_groups": (
            "kept in the compute dtype (loaded unquantized)"
            if getattr(load, "keep_modules", None)
            else "re-quantized after each set (bitsandbytes quantizer)"
        ),
        "base_switch": "quantized weights of the base switch are re-quantized from the checkpoint values",
        "cpu_packed_layout": (
            "used where bitsandbytes packs 4-bit weights for this CPU (AVX512-BF16); weights are always "
            "re-quantized in the canonical layout and repacked by bitsandbytes at the next forward"
            if load.load_in_4bit and _bnb_packs_on_cpu() and pair.model.device.type == "cpu" else "not used"
        ),
        "kept_in_generic_layout": list(writer.cpu_unpacked) if writer else [],
    }


def loading_info(pair) -> dict:
    """What a result file records about how the pair was loaded: adapters, placement,
    quantization (only the parts that apply; no local paths)."""
    out: dict = {}
    adapters = {w: c.describe() for w, c in (("a", pair.ckpt_a), ("b", pair.ckpt_b)) if isinstance(c, AdapterCheckpoint)}
    if adapters:
        out["adapters"] = adapters
    device_map = getattr(pair.model, "hf_device_map", None)
    if pair.load.device_map or pair.load.max_memory or pair.load.offload_folder:
        devices = sorted({str(d) for d in (device_map or {}).values()})
        writer = pair.interp.writer
        out["placement"] = {
            "device_map": pair.load.device_map if isinstance(pair.load.device_map, str) else "custom",
            "devices": devices,
            "offloaded_parameters": len(writer.offloaded) if writer is not None else 0,
        }
    quant = quantization_info(pair)
    if quant:
        out["quantization"] = quant
    return out


def keep_modules_for(
    source: str | os.PathLike,
    spec: str,
    *,
    revision: str | None = None,
    base_model: str | os.PathLike | None = None,
    trust_remote_code: bool = False,
) -> list[str]:
    """Module-name patterns (for ``llm_int8_skip_modules``) of the groups ``spec`` selects, found
    from the architecture cache, the family table or a meta-device copy of the model
    (:func:`~hf_llmc.model.cache.folder_architecture`: configs and safetensors headers; no weights
    are read)."""
    folder = resolve_folder(source, revision, allow_patterns=["*.json"])
    if is_adapter_folder(folder):
        base = base_model or read_adapter_config(folder).get("base_model_name_or_path")
        folder = resolve_folder(base, None, allow_patterns=["*.json"])
    arch = folder_architecture(folder, trust_remote_code)
    names = [arch.canonical(p) for g in resolve(spec, arch) for p in g.parameters]
    names += [alias for alias, canon in arch.aliases.items() if canon in names]
    names += arch.head  # transformers' default: the output head stays unquantized
    return [re.escape(m) for m in module_names(names)]
