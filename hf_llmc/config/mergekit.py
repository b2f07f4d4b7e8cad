"""mergekit configs (YAML) read and written without a model: the keys hf-llmc understands, checked
before anything is loaded.

hf-llmc reads mergekit's ``linear`` and ``slerp`` merges of two models: ``models`` or ``slices``
(each slice the same ``layer_range`` of both models, slices in layer order), ``parameters``
(``weight`` / ``normalize`` for linear, ``t`` for slerp) at the top, slice and model levels, with
scalar values, gradient lists and ``filter`` conditions, ``base_model``, ``dtype`` / ``out_dtype``
and ``tokenizer_source: base|union``. Every other key is refused, by name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import MergeSpecError
from .fields import setting

METHODS = {"linear": ("weight", "normalize"), "slerp": ("t",)}
#: Parameters given per model (the others are global, read at the slice and top levels only).
PER_MODEL = {"weight"}
DTYPES = ("float32", "bfloat16", "float16")
TOP_KEYS = ("merge_method", "models", "slices", "base_model", "dtype", "out_dtype", "tokenizer_source", "parameters")

#: A parameter value: a number, a gradient list, or a list of ``{filter, value}`` conditions.
Setting = Any


@dataclass
class Source:
    """One model's part of a slice: its layer range and per-model parameters.

    Attributes:
        model: the model reference.
        layer_range: ``(start, end)`` of its layers; None in a ``models`` config (every layer).
        parameters: the per-model parameters (``weight``).
    """

    model: str
    layer_range: tuple[int, int] | None
    parameters: dict[str, Setting] = field(default_factory=dict)


@dataclass
class Slice:
    """An output slice: the same layers of one or both models, and slice-level parameters.

    Attributes:
        sources: the models' parts.
        parameters: the slice-level parameters.
    """

    sources: list[Source]
    parameters: dict[str, Setting] = field(default_factory=dict)


@dataclass
class MergekitConfig:
    """A mergekit config hf-llmc can run, normalised to slices.

    A ``models`` config becomes one slice whose layer range is filled in once the model is known.

    Attributes:
        method: ``linear`` or ``slerp``.
        models: the two model references, in order of appearance (the first is A, the second B).
        slices: the output slices, in layer order.
        base_model: the ``base_model`` reference, if given.
        dtype: mergekit's ``dtype``.
        out_dtype: mergekit's ``out_dtype``.
        tokenizer_source: ``base``, ``union`` or a model reference.
        parameters: the top-level parameters.
    """

    method: str
    models: list[str]
    slices: list[Slice]
    base_model: str | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    parameters: dict[str, Setting] = field(default_factory=dict)

    @property
    def base(self) -> str:
        """``a`` or ``b``: which model ``base_model`` names (``a`` without one)."""
        return "b" if self.base_model is not None and self.base_model == self.models[1] else "a"

    @property
    def output_dtype(self) -> str | None:
        """The dtype mergekit writes: ``out_dtype``, else ``dtype`` (None: as stored)."""
        return self.out_dtype or self.dtype


@dataclass
class MergekitOptions:
    """mergekit interoperability of ``hf-llmc merge``."""

    from_mergekit: str | None = setting(None, "Run the merge a mergekit YAML config describes (linear or slerp over two models; the models come from the config, so give no A B).")
    emit_mergekit: str | None = setting(None, "Also write the mergekit YAML config that produces the same merge to this file (refused, writing nothing, where mergekit cannot express the merge exactly); without --out only the config is written.")


def split_reference(ref: str) -> tuple[str, str | None]:
    """A mergekit model reference ``path_or_id[@revision]`` as ``(path_or_id, revision)``.

    Args:
        ref: the reference.

    Returns:
        The model and its revision (None when not given).

    Raises:
        MergeSpecError: a LoRA reference ``model+adapter``.
    """
    if "+" in ref:
        raise MergeSpecError(f"model {ref!r}: LoRA references (model+adapter) are not supported")
    name, at, revision = ref.partition("@")
    return (name, revision) if at and revision else (ref, None)


def _where(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _check_keys(data: Any, allowed: tuple[str, ...], path: str) -> dict:
    if not isinstance(data, dict):
        raise MergeSpecError(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
    for key in data:
        if key not in allowed:
            raise MergeSpecError(f"mergekit key {_where(path, str(key))!r} is not supported by hf-llmc "
                                 f"(supported here: {', '.join(allowed)})")
    return data


def _number(value: Any, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise MergeSpecError(f"{path}: {value!r} is not a finite number")
    return float(value)


def _check_setting(name: str, value: Any, path: str, *, conditions: bool = True) -> Setting:
    if name == "normalize":
        if not isinstance(value, bool):
            raise MergeSpecError(f"{path}: normalize must be true or false")
        return value
    if isinstance(value, dict) and conditions:
        value = [value]
    if isinstance(value, list):
        if not value:
            raise MergeSpecError(f"{path}: an empty list")
        if all(isinstance(v, dict) for v in value) and conditions:
            out = []
            for i, cond in enumerate(value):
                cond = _check_keys(cond, ("filter", "value"), f"{path}[{i}]")
                if "value" not in cond:
                    raise MergeSpecError(f"{path}[{i}]: a condition needs a value")
                flt = cond.get("filter")
                if flt is not None and not isinstance(flt, str):
                    raise MergeSpecError(f"{path}[{i}].filter: expected a string")
                out.append({"filter": flt, "value": _check_setting(name, cond["value"], f"{path}[{i}].value", conditions=False)})
            return out
        return [_number(v, f"{path}[{i}]") for i, v in enumerate(value)]
    return _number(value, path)


def _check_parameters(data: Any, method: str, path: str, *, per_model: bool) -> dict[str, Setting]:
    if data is None:
        return {}
    allowed = tuple(p for p in METHODS[method] if p in PER_MODEL or not per_model)
    data = _check_keys(data, allowed or ("(none for " + method + ")",), path)
    return {name: _check_setting(name, value, f"{path}.{name}") for name, value in data.items()}


def _reference(value: Any, path: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise MergeSpecError(f"{path}: expected a model path or Hub id")
    split_reference(value)
    return value.strip()


def parse_mergekit(data: Any) -> MergekitConfig:
    """Check a loaded mergekit config and normalise it (no model is needed).

    Args:
        data: the YAML document as loaded (a mapping).

    Returns:
        The config, with ``models`` turned into one slice without a layer range.

    Raises:
        MergeSpecError: a key hf-llmc does not support (named in the message), a merge method
            other than linear / slerp, not exactly two models, a bad value.
    """
    data = _check_keys(data, TOP_KEYS, "")
    method = data.get("merge_method")
    if method not in METHODS:
        raise MergeSpecError(f"mergekit merge_method {method!r} is not supported by hf-llmc (supported: linear, slerp)")
    if ("models" in data) == ("slices" in data):
        raise MergeSpecError("mergekit config: give exactly one of models and slices")
    params = _check_parameters(data.get("parameters"), method, "parameters", per_model=False)
    slices: list[Slice] = []
    if "models" in data:
        models = data["models"]
        if not isinstance(models, list):
            raise MergeSpecError("models: expected a list")
        sources = []
        for i, item in enumerate(models):
            item = _check_keys(item, ("model", "parameters"), f"models[{i}]")
            sources.append(Source(_reference(item.get("model"), f"models[{i}].model"), None,
                                  _check_parameters(item.get("parameters"), method, f"models[{i}].parameters", per_model=True)))
        slices.append(Slice(sources))
    else:
        raw = data["slices"]
        if not isinstance(raw, list) or not raw:
            raise MergeSpecError("slices: expected a non-empty list")
        for i, item in enumerate(raw):
            item = _check_keys(item, ("sources", "parameters"), f"slices[{i}]")
            raw_sources = item.get("sources")
            if not isinstance(raw_sources, list) or not raw_sources:
                raise MergeSpecError(f"slices[{i}].sources: expected a non-empty list")
            sources = []
            for j, src in enumerate(raw_sources):
                where = f"slices[{i}].sources[{j}]"
                src = _check_keys(src, ("model", "layer_range", "parameters"), where)
                lr = src.get("layer_range")
                if (not isinstance(lr, list) or len(lr) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in lr)
                        or not 0 <= lr[0] < lr[1]):
                    raise MergeSpecError(f"{where}.layer_range: expected [START, END] with 0 <= START < END")
                sources.append(Source(_reference(src.get("model"), f"{where}.model"), (lr[0], lr[1]),
                                      _check_parameters(src.get("parameters"), method, f"{where}.parameters", per_model=True)))
            slices.append(Slice(sources, _check_parameters(item.get("parameters"), method, f"slices[{i}].parameters", per_model=False)))
    models: list[str] = []
    for sl in slices:
        names = [s.model for s in sl.sources]
        if len(set(names)) != len(names):
            raise MergeSpecError(f"model {names[0]!r} appears twice in one slice; hf-llmc merges two different models")
        for name in names:
            if name not in models:
                models.append(name)
    base_model = data.get("base_model")
    if base_model is not None:
        base_model = _reference(base_model, "base_model")
        if base_model not in models:
            models.append(base_model)
    if len(models) != 2:
        raise MergeSpecError(f"mergekit config names {len(models)} model(s) ({', '.join(models)}); hf-llmc merges exactly two")
    if method == "slerp" and base_model is None:
        raise MergeSpecError("merge_method slerp needs base_model (mergekit interpolates from it)")
    for key in ("dtype", "out_dtype"):
        if data.get(key) is not None and data[key] not in DTYPES:
            raise MergeSpecError(f"{key}: {data[key]!r} is not supported (use one of {', '.join(DTYPES)})")
    tok = data.get("tokenizer_source")
    if tok is not None and tok not in ("base", "union") and tok != base_model and not (base_model is None and tok == models[0]):
        raise MergeSpecError(f"tokenizer_source {tok!r}: hf-llmc takes the tokenizer from the base model; use base or union")
    return MergekitConfig(method, models, slices, base_model, data.get("dtype"), data.get("out_dtype"), tok, params)


def load_mergekit(path: str | Path) -> MergekitConfig:
    """Read and check a mergekit YAML file (see :func:`parse_mergekit`).

    Args:
        path: the YAML file.

    Returns:
        The checked config.

    Raises:
        MergeSpecError: the file is missing, is not YAML, or holds something hf-llmc does not support.
    """
    import yaml

    try:
        text = Path(path).read_text()
    except OSError as err:
        raise MergeSpecError(f"from_mergekit={str(path)!r}: cannot read ({err.strerror or err})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise MergeSpecError(f"from_mergekit={str(path)!r}: not valid YAML ({str(err).splitlines()[0]})") from None
    return parse_mergekit(data)


def dump_mergekit(data: dict, header: str = "") -> str:
    """A mergekit config as YAML text (lists of numbers in flow style).

    Args:
        data: the config.
        header: comment lines put first (each written with a leading ``# ``).

    Returns:
        The YAML text.
    """
    import yaml

    class Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data):
            return True

        def represent_list(self, items):
            flow = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in items)
            return self.represent_sequence("tag:yaml.org,2002:seq", items, flow_style=flow)

    Dumper.add_representer(list, Dumper.represent_list)
    body = yaml.dump(data, Dumper=Dumper, sort_keys=False, default_flow_style=False)
    lines = "".join(f"# {line}\n" for line in header.splitlines())
    return lines + body
