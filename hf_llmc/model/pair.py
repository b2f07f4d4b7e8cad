"""ModelPair: one live transformers model plus lazy access to both checkpoints (state only:
loading and compatibility).

Only A is instantiated. B's tensors are read on demand from its checkpoint; nothing of B is
materialised at load time. The pair checks compatibility (architecture, parameter names and
shapes, tokenizer vocabulary) before any number is computed. Evaluating, scanning and merging a
pair are functions of the layers above (:mod:`hf_llmc.engine`, :mod:`hf_llmc.analyses`,
:mod:`hf_llmc.outputs`); :class:`hf_llmc.ModelPair` adds them as one-line methods.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from ..config.errors import CheckpointError, PairError
from ..config.load import LoadConfig
from ..config.security import display_name
from .architecture import Architecture, discover, load_config, meta_model
from .cache import architecture_key, load_architecture, read_config, store_architecture
from .checkpoint import open_source
from .checkpoint.adapters import AdapterCheckpoint, attach as attach_adapters, base_identity
from .checkpoint.folders import TOKENIZER_PATTERNS
from .checkpoint.fused import FusedAssembler, fused_pieces
from .checkpoint.lazy import LazyCheckpoint
from .families import checkpoint_tensors, table_architecture
from .interpolation import Interpolator
from .placement import attach as attach_placement, load_kwargs, resolve_device
from .selection import Group, make_group, resolve
from .tokenizer import check_same_tokenizer, load_tokenizer
from .vocab import VocabMap, build_vocab_map, config_vocab_size

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_same_architecture(a: tuple, b: tuple) -> None:
    """A's and B's ``(model_type, architectures)`` must agree.

    Raises:
        PairError: naming both.
    """
    if a != b:
        raise PairError(f"architecture mismatch: A is {a[0]} {a[1]}, B is {b[0]} {b[1]}")


#: Config fields that decide tensor shapes, each under the names the families use for it.
SHAPE_FIELDS: dict[str, tuple[str, ...]] = {
    "layers": ("num_hidden_layers", "n_layer", "num_layers", "n_layers"),
    "hidden size": ("hidden_size", "n_embd", "d_model"),
    "attention heads": ("num_attention_heads", "n_head", "num_heads", "n_heads"),
    "key/value heads": ("num_key_value_heads", "num_kv_heads"),
    "vocabulary": ("vocab_size",),
    "intermediate size": ("intermediate_size", "n_inner", "ffn_dim", "d_ff"),
}


def _shape_fields(config: dict, which: str, prefix: str = "") -> dict[str, tuple[str, object]]:
    """``{field: (attribute name, value)}`` of ``config``'s shape-deciding fields, each value checked."""
    out: dict[str, tuple[str, object]] = {}
    for label, names in SHAPE_FIELDS.items():
        name = next((n for n in names if n in config), None)
        if name is None:
            continue
        value = config[name]
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise CheckpointError(f"model {which}'s config.json: {prefix}{name} is {value!r}, not a non-negative integer")
        out[label] = (prefix + name, value)
    nested = config.get("text_config")
    if isinstance(nested, dict) and not prefix:
        out.update({f"text {k}": v for k, v in _shape_fields(nested, which, "text_config.").items()})
    return out


def check_config_fields(config_a: dict | None, config_b: dict | None, *, vocabulary: bool = True) -> None:
    """A's and B's ``config.json`` agree field by field on what decides shapes (layers, hidden size,
    heads, vocabulary, intermediate size), each under the family's own attribute names.

    Values are checked in both configs; they are compared when both have the same ``model_type``
    (otherwise the architecture check reports the difference).

    Args:
        config_a: A's ``config.json`` as a dict (None: not checked).
        config_b: B's.
        vocabulary: compare the vocabulary sizes too (False: they may differ; the pair then
            compares the tokenizers and the embedding rows, :mod:`hf_llmc.model.vocab`).

    Raises:
        CheckpointError: a negative or non-integer value in either config.
        PairError: a field that differs (or is present in one config only), naming both values.
    """
    fields_a = _shape_fields(config_a, "A") if config_a is not None else None
    fields_b = _shape_fields(config_b, "B") if config_b is not None else None
    if fields_a is None or fields_b is None or config_a.get("model_type") != config_b.get("model_type"):
        return  # another family: the architecture check names both
    for label in [k for k in {**fields_a, **fields_b} if vocabulary or not k.endswith("vocabulary")]:
        a, b = fields_a.get(label, ("it unset", None)), fields_b.get(label, ("it unset", None))
        if a[1] != b[1]:
            raise PairError(f"config mismatch in the {label}: A has {a[0]} {a[1]}, B has {b[0]} {b[1]}".replace(" None", ""))


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
        # Endpoint statistics per (model, token set, blocks), filled by hf_llmc.engine.evaluation.endpoint.
        self.endpoint_cache: dict[tuple, object] = {}
        # Data-parallel evaluation across processes (hf_llmc.analyses.distributed.DataShard) or None.
        self.shard = None
        #: How the rows of A's and B's vocabularies map onto the union (None: identical vocabularies
        #: and row counts); ``tokenizer`` is then the union tokenizer, ``tokenizer_a`` A's own.
        self.vocab: VocabMap | None = None
        self.tokenizer_a = tokenizer

    @property
    def source_a(self) -> str:
        return self.ckpt_a.source

    @property
    def source_b(self) -> str:
        return self.ckpt_b.source

    @property
    def config(self):
        return self.model.config

    def source_folders(self) -> list[tuple[str, Path]]:
        """The folders the pair reads, which no output may replace, lie in or contain.

        Returns:
            ``(label, folder)`` for A and B (for an adapter: its folder and its base model's).
        """
        out: list[tuple[str, Path]] = []
        for label, ckpt in (("model A", self.ckpt_a), ("model B", self.ckpt_b)):
            if isinstance(ckpt, AdapterCheckpoint):
                out += [(label, Path(ckpt.adapter_folder)), (f"the base model of {label[-1]}", Path(ckpt.base.folder))]
            else:
                out.append((label, Path(ckpt.folder)))
        return out

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
        added_rows: str = "own",
    ) -> "ModelPair":
        """Load A as the live model and open both checkpoints lazily; verify compatibility.

        A or B may be a PEFT LoRA adapter (its base + the adapter; ``base_model`` overrides the
        recorded base). ``device_map`` / ``max_memory`` / ``offload_folder`` place the model
        across devices, CPU and disk; ``load_in_8bit`` / ``load_in_4bit`` quantize every weight
        outside ``keep_modules`` (see :mod:`hf_llmc.model.placement`). When the vocabularies differ
        by added tokens or padding rows, ``added_rows`` (``own`` or ``mean-init``) decides the rows
        only one model has (see :mod:`hf_llmc.model.vocab`)."""
        from transformers import AutoModelForCausalLM

        if isinstance(dtype, torch.dtype):
            dtype = str(dtype).removeprefix("torch.")
        load = LoadConfig(
            revision_a, revision_b, dtype, device, device_map, trust_remote_code, allow_pickle,
            base_model=None if base_model is None else str(base_model),
            max_memory=max_memory, offload_folder=None if offload_folder is None else str(offload_folder),
            load_in_8bit=load_in_8bit, load_in_4bit=load_in_4bit, keep_modules=keep_modules, added_rows=added_rows,
        )
        load.validate()
        ckpt_a = open_source(a, revision=revision_a, allow_pickle=allow_pickle, token=token, base_model=base_model)
        ckpt_b = open_source(b, revision=revision_b, allow_pickle=allow_pickle, token=token, base_model=base_model)
        raw_a, raw_b = read_config(ckpt_a.folder), read_config(ckpt_b.folder)
        check_config_fields(raw_a, raw_b, vocabulary=False)
        cfg_a = load_config(ckpt_a.folder, trust_remote_code)
        cfg_b = load_config(ckpt_b.folder, trust_remote_code)
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
        pair = cls(model, load_tokenizer(ckpt_a.folder, trust_remote_code), arch, ckpt_a, ckpt_b, load)
        attach_placement(pair)  # offloaded / quantized weights: a writer, checkpoint shapes
        pair.check_compatible(load_tokenizer(ckpt_b.folder, trust_remote_code),
                              (config_vocab_size(raw_a), config_vocab_size(raw_b)))
        if pair.vocab is not None and pair.interp.writer is not None:
            raise PairError("pairs whose vocabularies differ need the whole model on one device, unquantized "
                            "(no --device-map, --max-memory, --load-in-8bit/4bit)")
        attach_adapters(pair)  # adapters: the live model holds A's merged values
        return pair

    def check_compatible(self, tokenizer_b, vocab_sizes: tuple[int | None, int | None] = (None, None)) -> None:
        """Same parameter names and shapes in B (fused parameters: the same stored pieces) and the
        same vocabulary, up to added tokens and padding rows (:mod:`hf_llmc.model.vocab`): then the
        vocabulary-indexed tensors may differ in their rows, and ``self.vocab`` maps them.

        Args:
            tokenizer_b: B's tokenizer (None: not compared).
            vocab_sizes: ``vocab_size`` of A's and B's ``config.json`` (None: unknown).

        Raises:
            PairError: what differs, in one line.
        """
        rows_a, rows_b = vocab_sizes
        vocab_params = self._vocab_params(rows_a, rows_b)
        mismatches, missing = [], []
        for name in self.arch.parameters:
            key = self.ckpt_b.key_for(name, self.arch.aliases)
            if key is None:
                missing.append(name)
                continue
            shape_b = self.ckpt_b.shape(key)
            if shape_b != self.arch.shapes[name] and not (name in vocab_params and shape_b[1:] == tuple(self.arch.shapes[name][1:])):
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
        tokenizer_a = self.tokenizer
        differ = rows_a != rows_b or (tokenizer_a is not None and tokenizer_b is not None
                                      and tokenizer_a.get_vocab() != tokenizer_b.get_vocab())
        if not differ:
            if tokenizer_a is not None and tokenizer_b is not None:
                check_same_tokenizer(tokenizer_a, tokenizer_b)
            return
        if tokenizer_a is None or tokenizer_b is None:
            which = "A" if tokenizer_a is None else "B"
            raise PairError(f"the vocabulary sizes differ (A {rows_a}, B {rows_b}) and model {which} has no tokenizer "
                            "to tell which tokens the rows belong to")
        if rows_a is None or rows_b is None or not vocab_params:
            raise PairError("different tokenizer vocabularies, and the vocabulary-indexed tensors (embedding, head) "
                            "cannot be found from the configs' vocab_size")
        self.vocab = build_vocab_map(tokenizer_a, tokenizer_b, rows_a, rows_b, self.load.added_rows)
        self.vocab.params = vocab_params
        self.interp.vocab = self.vocab
        self.tokenizer_a, self.tokenizer = tokenizer_a, self.vocab.tokenizer  # text is tokenized with the union

    def _vocab_params(self, rows_a: int | None, rows_b: int | None) -> dict[str, int]:
        """The embedding / head tensors indexed by token id (rows = ``vocab_size``): name -> dimension 0.

        Raises:
            PairError: B's tensor has other rows than B's config says.
        """
        if rows_a is None or rows_b is None:
            return {}
        out: dict[str, int] = {}
        for name in dict.fromkeys(self.arch.canonical(n) for n in self.arch.embed + self.arch.head):
            shape = tuple(self.arch.shapes.get(name, ()))
            key = self.ckpt_b.key_for(name, self.arch.aliases)
            if not shape or shape[0] != rows_a or key is None:
                continue
            rows = self.ckpt_b.shape(key)[0]
            if rows != rows_b:
                raise PairError(f"config mismatch in the vocabulary: A has vocab_size {rows_a}, B has vocab_size {rows_b}, "
                                f"but B's {name} has {rows} rows")
            out[name] = 0
        return out

    def groups(self, spec: str | None) -> list[Group]:
        """Resolve a layer spec (None = the whole model as one group named ``full``)."""
        if spec is None:
            return [self.full_group()]
        return resolve(spec, self.arch)

    def full_group(self) -> Group:
        return make_group(self.arch, "full", "full", self.arch.parameters)


def same_tokenizer_files(a: Path, b: Path) -> bool:
    """Whether both folders hold the same tokenizer files, byte for byte (then their
    vocabularies are equal without loading either tokenizer)."""
    def files(folder: Path) -> dict[str, Path]:
        return {f.name: f for f in Path(folder).iterdir()
                if f.is_file() and any(fnmatch.fnmatch(f.name, p) for p in TOKENIZER_PATTERNS)}

    fa, fb = files(a), files(b)
    return fa.keys() == fb.keys() and all(fa[n].stat().st_size == fb[n].stat().st_size and fa[n].read_bytes() == fb[n].read_bytes() for n in fa)


def known_architectures(key: str | None, config: dict, ckpt: LazyCheckpoint) -> Iterator[Architecture]:
    """The architectures known without transformers, in the order to try them: the cached entry
    for ``key``, then the family table's reading of ``config`` and ``ckpt``'s safetensors headers."""
    cached = load_architecture(key)
    if cached is not None:
        yield cached
    table = table_architecture(config, checkpoint_tensors(ckpt))
    if table is not None:
        yield table


def lazy_pair(a: str | os.PathLike, b: str | os.PathLike, *, revision_a: str | None = None, revision_b: str | None = None,
              trust_remote_code: bool = False, allow_pickle: bool = False, token: str | bool | None = None,
              base_model: str | os.PathLike | None = None, added_rows: str = "own") -> ModelPair:
    """A :class:`ModelPair` without a live model, for streaming a merge or computing distances:
    both checkpoints are opened lazily and checked for compatibility, nothing is loaded.

    A or B may be a PEFT adapter (``base_model`` overrides its recorded base). When both folders
    hold the same tokenizer files, no tokenizer is loaded (``pair.tokenizer`` is None); otherwise
    their vocabularies are compared. When, as well, this config was seen before
    (:mod:`hf_llmc.model.cache`) or its family is in the table (:mod:`hf_llmc.model.families`),
    nothing of transformers is imported and ``pair.model`` is None; otherwise the model is
    instantiated on the meta device to discover its architecture (``pair.model`` is that meta model).
    Vocabularies that differ by added tokens or padding rows are mapped onto their union
    (``added_rows``: see :mod:`hf_llmc.model.vocab`).

    Raises:
        CheckpointError: a checkpoint cannot be opened.
        PairError: the two checkpoints are not compatible.
    """
    opts = dict(allow_pickle=allow_pickle, token=token, base_model=base_model)
    ckpt_a = open_source(a, revision=revision_a, **opts)
    ckpt_b = open_source(b, revision=revision_b, **opts)
    if isinstance(ckpt_a, AdapterCheckpoint) and isinstance(ckpt_b, AdapterCheckpoint) and base_identity(ckpt_a) != base_identity(ckpt_b):
        raise PairError(
            f"the adapters are on different base models: A on {display_name(ckpt_a.base.source)}, "
            f"B on {display_name(ckpt_b.base.source)}; pass base_model= to use one base for both"
        )
    load = LoadConfig(revision_a=revision_a, revision_b=revision_b, trust_remote_code=trust_remote_code,
                      allow_pickle=allow_pickle, base_model=None if base_model is None else str(base_model),
                      added_rows=added_rows)
    load.validate()
    raw_a, raw_b = read_config(ckpt_a.folder), read_config(ckpt_b.folder)
    check_config_fields(raw_a, raw_b, vocabulary=False)
    sizes = (config_vocab_size(raw_a), config_vocab_size(raw_b))
    same_tokenizer = same_tokenizer_files(ckpt_a.folder, ckpt_b.folder) and sizes[0] == sizes[1]
    key = architecture_key(raw_a) if raw_a is not None and raw_b is not None and not trust_remote_code else None
    if same_tokenizer and key is not None:
        for arch in known_architectures(key, raw_a, ckpt_a):
            check_same_architecture(*[(c.get("model_type"), c.get("architectures")) for c in (raw_a, raw_b)])
            pair = ModelPair(None, None, arch, ckpt_a, ckpt_b, load)
            try:
                pair.check_compatible(None, sizes)
                return pair
            except PairError:
                pass  # the checkpoints disagree with this entry: try the next (discovery reports the error)
    cfg_a = load_config(ckpt_a.folder, trust_remote_code)
    cfg_b = load_config(ckpt_b.folder, trust_remote_code)
    check_same_architecture((cfg_a.model_type, cfg_a.architectures), (cfg_b.model_type, cfg_b.architectures))
    model = meta_model(cfg_a, trust_remote_code=trust_remote_code)
    tokenizer = None if same_tokenizer else load_tokenizer(ckpt_a.folder, trust_remote_code)
    pair = ModelPair(model, tokenizer, discover(model), ckpt_a, ckpt_b, load)
    pair.check_compatible(None if same_tokenizer else load_tokenizer(ckpt_b.folder, trust_remote_code), sizes)
    store_architecture(key, pair.arch)  # only once the checkpoints agree with it
    return pair
