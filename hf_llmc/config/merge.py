"""What a merge moves where (:class:`MergeSpec`), how it is written (:class:`ExportConfig`),
published (:class:`PushConfig`) or chosen automatically (:class:`AutoConfig`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from .alphas import ItemAlpha, parse_item_alpha
from .data import SET_NAME
from .errors import MergeSpecError
from .fields import check_choice, setting
from .load import DType
from .scan import Method
from .security import is_hub_id
from .spec import parse_spec

DEFAULT_ALPHA = 0.5
DEFAULT_MAX_SHARD_SIZE = "5GB"
DEFAULT_MAX_BARRIER = 0.02
DEFAULT_CANDIDATES = "attn.*,mlp.*"


@dataclass
class MergeSpec:
    """Which tensors move to which point of the A-B path; the rest comes from the base."""

    layers: str | None = setting(None, "Layer spec to merge at --alpha, e.g. attn.0-3 or attn.*,mlp.0 (grammar of `hf-llmc layers`).")
    alpha: str | float | None = setting(None, "α for --layers: a number (0 = A, 1 = B; default 0.5), START:END for a linear gradient over the selected blocks in order, or anchors A0,A1,... spread piecewise linearly over them (mergekit's gradient list).")
    sets: list[str] = setting(help="LAYERS=ALPHA items (repeatable --set), e.g. attn.0-3=0.5 or attn.*=0,0.5,1; a later item wins where items overlap.", cli=False, default_factory=list)
    method: Method = setting("lerp", "Interpolation per tensor: lerp ((1-α)·A + α·B) or slerp.")
    base: Literal["a", "b"] = setting("a", "Checkpoint the tensors outside the spec (and config, tokenizer) come from.")
    lerp_ops: Literal["plain", "mergekit"] = setting("plain", "float32 operations of lerp in written tensors: plain ((1-α)·A + α·B, each product rounded) or mergekit (A·(1-α) then B·α accumulated with addcmul, as mergekit's linear merge: bit-identical to mergekit; it differs from plain by float32 rounding of the products).")
    allow_extrapolation: bool = setting(False, "Allow α outside [0, 1].")

    def __post_init__(self) -> None:
        if isinstance(self.sets, str):
            self.sets = [self.sets]
        self.sets = list(self.sets or [])

    @classmethod
    def parse(cls, text: str, **kwargs: Any) -> "MergeSpec":
        """A spec from its one-line text form, as written by :meth:`describe`.

        Args:
            text: ``;``-separated ``LAYERS=ALPHA`` items, e.g. ``"attn.0-3=0.5; mlp.*=0.25"``.
            **kwargs: the other fields (``method``, ``base``, ``lerp_ops``, ``allow_extrapolation``).

        Returns:
            The spec with one ``sets`` item per non-empty item of ``text`` (not validated yet).
        """
        return cls(sets=[s.strip() for s in text.split(";") if s.strip()], **kwargs)

    def entries(self) -> list[tuple[str, ItemAlpha]]:
        """The validated items of the spec, in order (a later item wins where items overlap).

        Returns:
            ``(layers, alpha)`` per item (a number, a ``START:END`` gradient or a list of anchors).
            ``layers`` / ``alpha`` come first, then every item of ``sets``.

        Raises:
            MergeSpecError: a bad method or base, a malformed item or α, or nothing to merge.
            SpecError: a malformed layer spec.
        """
        check_choice(MergeSpec, self, "method", MergeSpecError)
        check_choice(MergeSpec, self, "base", MergeSpecError)
        check_choice(MergeSpec, self, "lerp_ops", MergeSpecError)
        out: list[tuple[str, ItemAlpha]] = []
        if self.layers:
            parse_spec(self.layers)
            alpha = DEFAULT_ALPHA if self.alpha is None else self.alpha
            out.append((self.layers, parse_item_alpha(alpha, allow_extrapolation=self.allow_extrapolation)))
        elif self.alpha is not None:
            raise MergeSpecError("alpha needs layers=SPEC (or write a LAYERS=ALPHA item in sets)")
        for item in self.sets:
            layers, eq, value = str(item).rpartition("=")
            if not eq or not layers.strip() or not value.strip():
                raise MergeSpecError(f"set {item}: expected LAYERS=ALPHA, e.g. attn.0-3=0.5")
            parse_spec(layers.strip())
            out.append((layers.strip(), parse_item_alpha(value, allow_extrapolation=self.allow_extrapolation, what=f"set {item}:")))
        if not out:
            raise MergeSpecError("nothing to merge: give layers=SPEC [alpha=X], set SPEC=X, or auto=True")
        return out

    def validate(self) -> None:
        """Check every value without a model (see :meth:`entries`).

        Raises:
            MergeSpecError: a bad method or base, a malformed item or α, or nothing to merge.
            SpecError: a malformed layer spec.
        """
        self.entries()

    @property
    def single_alpha(self) -> float | None:
        """The α when every item uses one constant α, else None."""
        values = {v for _, alpha in self.entries() for v in alpha.values}
        return values.pop() if len(values) == 1 else None

    def describe(self) -> str:
        """The spec as one line of text, for cards, logs and :meth:`parse`.

        Returns:
            Every item in its ``--set`` form, ``;``-separated: ``"attn.0-3=0.5; mlp.*=0.1:0.9; norm.*=0,0.5,1"``.

        Raises:
            MergeSpecError: the spec is invalid (see :meth:`entries`).
            SpecError: a malformed layer spec.
        """
        return "; ".join(f"{layers}={alpha}" for layers, alpha in self.entries())

    def to_dict(self) -> dict:
        """The spec's fields as a plain dict (for recipes and JSON).

        Returns:
            ``dataclasses.asdict`` of the spec.
        """
        return asdict(self)


def as_spec(spec: "MergeSpec | str | dict") -> MergeSpec:
    """A :class:`MergeSpec` from any form the API accepts for a merge.

    Args:
        spec: a :class:`MergeSpec` (returned as is), its ``;``-separated text form
            (see :meth:`MergeSpec.parse`) or a dict of its fields.

    Returns:
        The spec (not validated yet).

    Raises:
        TypeError: ``spec`` is none of these types.
    """
    if isinstance(spec, MergeSpec):
        return spec
    if isinstance(spec, str):
        return MergeSpec.parse(spec)
    if isinstance(spec, dict):
        return MergeSpec(**spec)
    raise TypeError(f"merge spec: expected MergeSpec, str or dict, got {type(spec).__name__}")


@dataclass
class ExportConfig:
    """Where and how the merged checkpoint is written."""

    out: str | None = setting(None, "Output folder (written atomically).")
    max_shard_size: str = setting(DEFAULT_MAX_SHARD_SIZE, "Largest safetensors shard, e.g. 5GB or 500MB (model.safetensors.index.json when sharded).")
    dtype: DType | None = setting(None, "Output dtype of floating tensors (default: as stored in the base).")
    overwrite: bool = setting(False, "Replace an existing non-empty output folder that hf-llmc wrote (kept intact until the new one is complete).")
    hub_id_a: str | None = setting(None, "Hub repo id model A came from, for the card's base_model (a local folder is otherwise named in the card's text only).", recipe=False)
    hub_id_b: str | None = setting(None, "Hub repo id model B came from, for the card's base_model.", recipe=False)

    def validate(self) -> None:
        """Check the options before anything is written.

        Raises:
            MergeSpecError: ``dtype`` is not one of float32, bfloat16, float16, or a ``hub_id_a`` /
                ``hub_id_b`` that is not a Hub repo id.
        """
        check_choice(ExportConfig, self, "dtype", MergeSpecError)
        for name in ("hub_id_a", "hub_id_b"):
            value = getattr(self, name)
            if value is not None and not is_hub_id(value):
                raise MergeSpecError(f"{name}={value!r}: not a Hub repo id (name or namespace/name)")


@dataclass
class PushConfig:
    """Publishing the merged folder on the Hugging Face Hub."""

    push_to_hub: str | None = setting(None, "Hub repo id (user/name) to upload the merged folder to.")
    private: bool = setting(False, "Create the Hub repo as private.")
    revision: str | None = setting(None, "Hub branch to push to (created from main if missing).")
    commit_message: str | None = setting(None, "Commit message of the upload.")


@dataclass
class AutoConfig:
    """Automatic choice of the merged groups."""

    auto: bool = setting(False, "Choose the groups automatically: lowest single-group barriers first, while the chosen set's barrier stays <= --max-barrier.")
    scan_dir: str | None = setting(None, "Folder of a single-group `hf-llmc scan` (same data, method and base) to rank the groups; default: measure them now.")
    max_barrier: float = setting(DEFAULT_MAX_BARRIER, "Largest barrier (nats, loss - reference line at α) the chosen set may have.")
    auto_layers: str | None = setting(None, f"Candidate groups (layer spec); default: {DEFAULT_CANDIDATES} when measuring, every group of the scan with --scan-dir.")
    auto_objective: str = setting("max", "With several evaluation sets: the barrier cap holds on every set (max), on the token-weighted mean (mean), or on one named set (SET).")
    metric: Literal["loss", "bpb"] = setting("loss", "What --auto ranks and caps: loss (nats per token; --max-barrier in nats) or bpb (bits per UTF-8 byte; --max-barrier in bits per byte).")


def check_merge_options(spec: MergeSpec, auto: AutoConfig, export: ExportConfig, *, evaluates: bool) -> float | None:
    """Check a merge's options together before anything is loaded (the CLI and recipes run the same checks).

    Args:
        spec: what to merge (ignored in its groups when ``auto.auto`` chooses them).
        auto: the automatic choice, if any.
        export: where and how the merge is written.
        evaluates: whether evaluation data is given (``auto`` measures barriers on it).

    Returns:
        The α of an automatic choice (None without ``auto``).

    Raises:
        MergeSpecError: options that contradict each other, or a bad spec / dtype.
        SpecError: a malformed layer spec.
    """
    export.validate()
    check_choice(AutoConfig, auto, "metric", MergeSpecError)
    if not auto.auto:
        if auto.scan_dir or auto.auto_layers or auto.auto_objective != "max" or auto.metric != "loss":
            raise MergeSpecError("scan_dir, auto_layers, auto_objective and metric need auto=True")
        spec.validate()
        return None
    if spec.layers or spec.sets:
        raise MergeSpecError("auto=True chooses the groups itself; drop layers / sets")
    item = parse_item_alpha(DEFAULT_ALPHA if spec.alpha is None else spec.alpha, allow_extrapolation=spec.allow_extrapolation)
    if item.constant is None:
        raise MergeSpecError("auto=True merges at one alpha; a gradient (START:END or a list) is not supported")
    alpha = item.constant
    if not evaluates:
        raise MergeSpecError("auto=True measures barriers: give evaluation data (data=PATH or dataset=NAME)")
    if auto.auto_objective not in ("max", "mean") and not SET_NAME.fullmatch(str(auto.auto_objective)):
        raise MergeSpecError(f"auto_objective={auto.auto_objective!r}: use max, mean or the name of an evaluation set")
    return alpha
