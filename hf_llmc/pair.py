"""ModelPair: one live transformers model plus lazy access to both checkpoints.

Only A is instantiated. B's tensors are read on demand from its checkpoint; nothing of B is
materialised at load time. The pair checks compatibility (architecture, parameter names and
shapes, tokenizer vocabulary) before any number is computed.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .architecture import Architecture, discover, find_block_list
from .barrier import DEFAULT_ALPHAS, BarrierResult, barrier_from_stats, parse_alphas
from .checkpoint import CheckpointError, LazyCheckpoint, display_name
from .data import DataConfig, TokenBlocks, load_blocks
from .evaluation import BlockStats, Evaluator, resolve_device
from .interpolation import METHODS, Interpolator
from .selection import Group, make_group, resolve, union

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class PairError(ValueError):
    """The two checkpoints cannot be compared (different architecture, shapes or vocabulary)."""


class NonFiniteLossError(RuntimeError):
    """An evaluation produced NaN or infinite loss; no number is reported as a result."""


@dataclass
class LoadConfig:
    """How the two checkpoints are resolved and the live model is loaded."""

    revision_a: str | None = field(default=None, metadata={"help": "Hub revision (branch, tag or commit) of model A."})
    revision_b: str | None = field(default=None, metadata={"help": "Hub revision (branch, tag or commit) of model B."})
    dtype: str | None = field(default=None, metadata={"help": "Live model dtype: float32, bfloat16 or float16 (default: as stored).", "choices": list(DTYPES)})
    device: str = field(default="auto", metadata={"help": "Compute device: auto, cpu, cuda or cuda:N."})
    device_map: str | None = field(default=None, metadata={"help": "Placement across devices: auto, balanced, sequential, or a FILE.json mapping module names to devices (0, cpu, disk)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Run custom modelling code shipped with a checkpoint (off unless you trust it)."})
    allow_pickle: bool = field(default=False, metadata={"help": "Allow pickled .bin/.pt weights (loaded with torch.load(weights_only=True))."})
    base_model: str | None = field(default=None, metadata={"help": "Base model (folder or Hub id) for PEFT adapter arguments, overriding the base recorded in adapter_config.json."})
    max_memory: str | None = field(default=None, metadata={"help": "Memory per device for --device-map, e.g. 0=20GiB,1=20GiB,cpu=64GiB (implies --device-map auto)."})
    offload_folder: str | None = field(default=None, metadata={"help": "Folder for weights offloaded to disk by --device-map/--max-memory."})
    load_in_8bit: bool = field(default=False, metadata={"help": "Load the weights that are not interpolated in 8 bit (bitsandbytes; pip install 'hf-llmc[quant]')."})
    load_in_4bit: bool = field(default=False, metadata={"help": "Load the weights that are not interpolated in 4 bit NF4 (bitsandbytes)."})
    keep_modules: list | None = field(default=None, metadata={"cli": False, "help": "Modules loaded unquantized (the interpolated groups' modules)."})


def _load_config(folder: Path, trust_remote_code: bool):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise PairError(
                f"{folder.name}: the config needs custom code; pass --trust-remote-code only if you trust it"
            ) from None
        raise PairError(f"{folder.name}: unreadable config ({str(err).splitlines()[0][:200]})") from None
    except OSError as err:
        raise PairError(f"{folder.name}: no usable config.json ({str(err).splitlines()[0][:200]})") from None


def check_same_architecture(a: tuple, b: tuple) -> None:
    """A's and B's ``(model_type, architectures)`` must agree."""
    if a != b:
        raise PairError(f"architecture mismatch: A is {a[0]} {a[1]}, B is {b[0]} {b[1]}")


def _load_tokenizer(folder: Path, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError):
        return None


def fused_pieces(arch: Architecture, ckpt: LazyCheckpoint) -> dict[int, tuple[list[str], list[str]]]:
    """``{block: (fused parameters, stored keys)}`` for the parameters transformers assembles
    from several stored tensors (``arch.fused``, e.g. MoE experts stored one tensor per expert).

    A block's pieces are its stored keys that belong to no parameter and lie under the fused
    parameters' module (``...experts.``); their element counts must add up to the fused
    parameters', else the layout is refused. Elementwise operations (lerp) on the pieces equal
    the same operations on the assembled tensors."""
    out: dict[int, tuple[list[str], list[str]]] = {}
    if not arch.fused:
        return out
    mapped = {ckpt.key_for(n, arch.aliases) for n in [*arch.parameters, *arch.aliases]} - {None}
    for name in arch.fused:
        block = arch.block_of(name)
        if block is None or block >= arch.num_blocks:
            raise PairError(f"{arch.model_class}: fused tensor {name} lies outside the decoder blocks; not supported")
        out.setdefault(block, ([], []))[0].append(name)
    word = arch.block_prefix.rsplit(".", 1)[-1]
    for block, (names, keys) in out.items():
        modules = {f".{n.rsplit('.', 2)[-2]}." for n in names}  # e.g. ".experts."
        keys.extend(k for k in ckpt.keys() if k not in mapped and f".{word}.{block}." in f".{k}"
                    and any(m in k for m in modules))
        if sum(math.prod(ckpt.shape(k)) for k in keys) != sum(arch.numel[n] for n in names):
            raise PairError(
                f"{arch.model_class}: cannot match the fused tensors of block {block} ({', '.join(names)}) to the "
                f"checkpoint's stored tensors; this layout is not supported"
            )
    return out


class FusedAssembler:
    """Builds the fused parameters (MoE experts) of one checkpoint from their stored pieces with
    transformers' own load-time converters: the operations ``from_pretrained`` applies, on one
    parameter at a time."""

    def __init__(self, model, arch: Architecture, ckpt: LazyCheckpoint):
        try:  # transformers-internal API (5.x): where a new release would break this
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import WeightRenaming, dot_natural_key, rename_source_key
        except ImportError as err:
            raise PairError(f"{arch.model_class}: fused tensors need transformers' conversion API ({err})") from None

        self.model, self.ckpt = model, ckpt
        conversions = get_model_conversion_mapping(model)
        renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
        converters = [c for c in conversions if not isinstance(c, WeightRenaming) and hasattr(c, "source_patterns")]
        self.by_pattern = {p: c for c in converters for p in c.source_patterns}
        self.sources: dict[str, list[tuple[str, str]]] = {}  # parameter -> [(stored key, pattern)]
        for _, keys in fused_pieces(arch, ckpt).values():
            for key in sorted(keys, key=dot_natural_key):  # expert 2 before expert 10, as transformers does
                target, pattern = rename_source_key(key, renamings, converters)
                if pattern in self.by_pattern:
                    self.sources.setdefault(target, []).append((key, pattern))
        unmatched = sorted(set(arch.fused) - set(self.sources))
        if unmatched:
            raise PairError(f"{arch.model_class}: no stored pieces found for the fused tensor {unmatched[0]}")

    def __call__(self, name: str) -> torch.Tensor:
        from copy import deepcopy

        sources = self.sources[name]
        converter = deepcopy(self.by_pattern[sources[0][1]])
        for key, pattern in sources:
            converter.add_tensor(name, key, pattern, self.ckpt.get(key))
        value = converter.convert(name, model=self.model, config=self.model.config)[name]
        return value[0] if isinstance(value, list) else value


class ModelPair:
    """A live model holding A (or B), with lazy checkpoints of both."""

    def __init__(self, model, tokenizer, arch: Architecture, ckpt_a: LazyCheckpoint, ckpt_b: LazyCheckpoint, load: LoadConfig):
        self.model = model
        self.tokenizer = tokenizer
        self.arch = arch
        self.ckpt_a = ckpt_a
        self.ckpt_b = ckpt_b
        live = model is not None and next(iter(model.parameters())).device.type != "meta"
        for ckpt in (ckpt_a, ckpt_b):
            ckpt.stored_names = arch.stored_names
            if arch.fused and live:  # the live model's fused parameters are read assembled
                ckpt.fused, ckpt.assembler = frozenset(arch.fused), FusedAssembler(model, arch, ckpt)
        self.load = load
        self.interp = Interpolator(model, arch, ckpt_a, ckpt_b)
        self._endpoint_cache: dict[tuple, BlockStats] = {}
        # Data-parallel evaluation across processes (hf_llmc.distributed.DataShard) or None.
        self.shard = None

    @property
    def source_a(self) -> str:
        return self.ckpt_a.source

    @property
    def source_b(self) -> str:
        return self.ckpt_b.source

    @property
    def config(self):
        return self.model.config

    # -- loading ------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        a: str | os.PathLike,
        b: str | os.PathLike,
        *,
        revision_a: str | None = None,
        revision_b: str | None = None,
        dtype: str | torch.dtype | None = None,
        device: str = "auto",
        device_map: str | dict | None = None,
        trust_remote_code: bool = False,
        allow_pickle: bool = False,
        token: str | bool | None = None,
        base_model: str | os.PathLike | None = None,
        max_memory: str | dict | None = None,
        offload_folder: str | os.PathLike | None = None,
        load_in_8bit: bool = False,
        load_in_4bit: bool = False,
        keep_modules: list[str] | None = None,
    ) -> "ModelPair":
        """Load A as the live model and open both checkpoints lazily; verify compatibility.

        A or B may be a PEFT LoRA adapter (its base + the adapter; ``base_model`` overrides the
        recorded base). ``device_map`` / ``max_memory`` / ``offload_folder`` place the model
        across devices, CPU and disk; ``load_in_8bit`` / ``load_in_4bit`` quantize every weight
        outside ``keep_modules`` (see :mod:`hf_llmc.placement`)."""
        from .placement import load_kwargs
        from transformers import AutoModelForCausalLM

        if isinstance(dtype, torch.dtype):
            dtype = str(dtype).removeprefix("torch.")
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"--dtype {dtype}: use one of {', '.join(DTYPES)}")
        load = LoadConfig(
            revision_a, revision_b, dtype, device, device_map, trust_remote_code, allow_pickle,
            base_model=None if base_model is None else str(base_model),
            max_memory=max_memory, offload_folder=None if offload_folder is None else str(offload_folder),
            load_in_8bit=load_in_8bit, load_in_4bit=load_in_4bit, keep_modules=keep_modules,
        )
        ckpt_a = LazyCheckpoint.open(a, revision=revision_a, allow_pickle=allow_pickle, token=token, base_model=base_model)
        ckpt_b = LazyCheckpoint.open(b, revision=revision_b, allow_pickle=allow_pickle, token=token, base_model=base_model)
        cfg_a = _load_config(ckpt_a.folder, trust_remote_code)
        cfg_b = _load_config(ckpt_b.folder, trust_remote_code)
        check_same_architecture((cfg_a.model_type, cfg_a.architectures), (cfg_b.model_type, cfg_b.architectures))
        kwargs = dict(trust_remote_code=trust_remote_code, use_safetensors=not ckpt_a.pickled)
        if dtype is not None:
            kwargs["dtype"] = DTYPES[dtype]
        placed = load_kwargs(
            device=resolve_device(device), device_map=device_map, max_memory=max_memory, offload_folder=offload_folder,
            load_in_8bit=load_in_8bit, load_in_4bit=load_in_4bit, keep_modules=keep_modules,
            dtype=kwargs.get("dtype"),
        )
        kwargs.update(placed)
        try:
            model = AutoModelForCausalLM.from_pretrained(ckpt_a.folder, **kwargs)
        except (OSError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"{display_name(a)}: cannot load the model ({str(err).splitlines()[0][:200]})") from None
        model.eval()
        if "device_map" not in placed:
            model.to(resolve_device(device))
        arch = discover(model)
        pair = cls(model, _load_tokenizer(ckpt_a.folder, trust_remote_code), arch, ckpt_a, ckpt_b, load)
        from . import adapters, placement

        placement.attach(pair)  # offloaded / quantized weights: a writer, checkpoint shapes
        pair._check_compatible(_load_tokenizer(ckpt_b.folder, trust_remote_code))
        adapters.attach(pair)  # adapters: the live model holds A's merged values
        return pair

    def _check_compatible(self, tokenizer_b) -> None:
        """Same parameter names and shapes in B (fused parameters: the same stored pieces) and
        the same vocabulary."""
        mismatches, missing = [], []
        for name in self.arch.parameters:
            key = self.ckpt_b.key_for(name, self.arch.aliases)
            if key is None:
                missing.append(name)
                continue
            shape_b = self.ckpt_b.shape(key)
            if shape_b != self.arch.shapes[name]:
                mismatches.append(f"{name} {tuple(self.arch.shapes[name])} vs {shape_b}")
        if mismatches:
            more = f" (+{len(mismatches) - 3} more)" if len(mismatches) > 3 else ""
            raise PairError(f"shape mismatch between A and B: {'; '.join(mismatches[:3])}{more}")
        fused = [n for n in missing if n in self.arch.fused]
        if fused:
            pieces_a = {k: self.ckpt_a.shape(k) for _, keys in fused_pieces(self.arch, self.ckpt_a).values() for k in keys}
            pieces_b = {k: self.ckpt_b.shape(k) for _, keys in fused_pieces(self.arch, self.ckpt_b).values() for k in keys}
            if pieces_a != pieces_b:
                diff = sorted(set(pieces_a.items()) ^ set(pieces_b.items()))[:1]
                raise PairError(f"the stored pieces of the fused tensors differ between A and B (first: {diff[0][0]})")
            missing = [n for n in missing if n not in fused]
        if missing:
            more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
            raise PairError(f"B lacks parameters of A: {', '.join(missing[:3])}{more}")
        if self.tokenizer is not None and tokenizer_b is not None:
            va, vb = self.tokenizer.get_vocab(), tokenizer_b.get_vocab()
            if va != vb:
                diff = sorted(set(va.items()) ^ set(vb.items()))[:3]
                raise PairError(
                    f"different tokenizer vocabularies (A {len(va)} tokens, B {len(vb)}; first differences: "
                    f"{', '.join(repr(t) for t, _ in diff)})"
                )

    # -- groups and data ----------------------------------------------------------------------
    def groups(self, spec: str | None) -> list[Group]:
        """Resolve a layer spec (None = the whole model as one group named ``full``)."""
        if spec is None:
            return [self.full_group()]
        return resolve(spec, self.arch)

    def full_group(self) -> Group:
        return make_group(self.arch, "full", "full", self.arch.parameters)

    def blocks(self, data: DataConfig | TokenBlocks | str | torch.Tensor) -> TokenBlocks:
        """Token blocks from a config, a local file path, ready blocks or an id tensor."""
        if isinstance(data, TokenBlocks):
            return data
        if isinstance(data, torch.Tensor):
            return TokenBlocks(data, "tensor", "tensor")
        if isinstance(data, (str, os.PathLike)):
            data = DataConfig(data=str(data))
        if self.tokenizer is None:
            raise PairError(f"{display_name(self.source_a)}: no tokenizer; pass token blocks instead")
        return load_blocks(self.tokenizer, data, self.model.config)

    def evaluator(self, blocks: TokenBlocks, batch_size: int | None = None) -> Evaluator:
        _, block_list = find_block_list(self.model)
        return Evaluator(self.model, blocks.ids, block_list, batch_size=batch_size, shard=self.shard)

    # -- evaluation ---------------------------------------------------------------------------
    def endpoint(self, which: str, ev: Evaluator, blocks: TokenBlocks, indices=None) -> BlockStats:
        """Stats of the full model ``which`` (cached per token set)."""
        idx = torch.arange(blocks.num_blocks) if indices is None else torch.as_tensor(indices)
        key = (which, blocks.fingerprint, tuple(idx.tolist()))
        if key not in self._endpoint_cache:
            self.interp.set_base(which)
            self._endpoint_cache[key] = check_finite(ev.run(idx, state=which), f"model {which.upper()}")
        return self._endpoint_cache[key]

    def point(self, ev: Evaluator, group: Group, alpha: float, *, base: str = "a", method: str = "lerp",
              indices=None, prefix: bool = True) -> BlockStats:
        """Stats of the path point of ``group`` at α into ``base`` (restored afterwards)."""
        self.interp.set_base(base)
        start = group.first_block if prefix and group.first_block else None
        with self.interp.at([group], alpha, method):
            return ev.run(indices, start_block=start, state=base)

    def barrier(
        self,
        data,
        layers: str | None = None,
        alphas=DEFAULT_ALPHAS,
        base: str = "a",
        method: str = "lerp",
        *,
        batch_size: int | None = None,
        prefix: bool = True,
        allow_extrapolation: bool = False,
        sequential=None,
    ) -> BarrierResult:
        """The barrier of the layer-wise path of ``layers`` (None = full model) into ``base``.

        ``sequential`` (a :class:`~hf_llmc.sequential.SequentialConfig`) stops as soon as the
        α=0.5 point's error bar allows, on a seeded random subset of the blocks (see
        :mod:`hf_llmc.sequential`); None evaluates every block."""
        if method not in METHODS:
            raise ValueError(f"--method {method}: use one of {', '.join(METHODS)}")
        if base not in ("a", "b"):
            raise ValueError(f"--base {base}: use a or b")
        alphas = parse_alphas(alphas, allow_extrapolation=allow_extrapolation)
        blocks = self.blocks(data)
        ev = self.evaluator(blocks, batch_size)
        group = self.full_group() if layers is None else union(self.groups(layers), self.arch, layers)
        if sequential is not None:
            from .sequential import sequential_barrier

            return sequential_barrier(self, ev, group, alphas, sequential, base=base, method=method, prefix=prefix,
                                      layers=layers)
        # Endpoints first, ending on the base so the path points need no extra switch.
        order = ("b", "a") if base == "a" else ("a", "b")
        stats = {w: self.endpoint(w, ev, blocks) for w in order}
        curve: dict[float, BlockStats] = {}
        for alpha in alphas:
            if alpha == 0.0 and (base == "a" or group.name == "full"):
                curve[alpha] = stats["a"]
            elif alpha == 1.0 and (base == "b" or group.name == "full"):
                curve[alpha] = stats["b"]
            else:
                curve[alpha] = check_finite(
                    self.point(ev, group, alpha, base=base, method=method, prefix=prefix), f"{group.name} at alpha={alpha}"
                )
        return barrier_from_stats(curve, stats["a"], stats["b"], layers=layers, base=base, method=method)

    # -- merging ------------------------------------------------------------------------------
    def merge(self, spec):
        """Set the live model to the merge ``spec`` (a :class:`~hf_llmc.export.MergeSpec`, or
        ``"attn.0-3=0.5; mlp.*=0.25"``) and return it, ready for ``save_pretrained``/``push_to_hub``.

        No second model is built: the returned model *is* ``self.model``, now holding the merged
        weights. The pair's next evaluation streams its base back in first. To write a merge
        without touching the live model (and with a model card), use :func:`hf_llmc.save_merged`.
        """
        from .export import merge_live

        return merge_live(self, spec)


def check_finite(stats: BlockStats, what: str) -> BlockStats:
    if not math.isfinite(stats.loss):
        raise NonFiniteLossError(
            f"{what}: non-finite loss ({stats.loss}); a checkpoint holds NaN/inf weights or the dtype overflows"
        )
    return stats
