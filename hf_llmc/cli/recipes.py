"""YAML recipes: experiments (model pairs, data, barriers, scans, merges, pushes) as files.

A recipe names one or more model pairs (with revisions), the evaluation data and an ordered list
of steps; ``hf-llmc run RECIPE.yaml`` runs every step on every pair with the same API calls the
other commands make. The schema is derived from the settings dataclasses (:class:`LoadConfig`,
:class:`DataConfig`, :class:`ScanConfig`, :class:`MergeSpec`, ...) and their help texts, so a
recipe accepts exactly the options of the command line, and :func:`load_recipe` rejects unknown
keys, wrong types and missing fields with messages that name the offending key::

    description: GPT-2 fine-tunes, attention merge
    out: runs/gpt2                         # output root; steps write to {pair}/{step} below it
    pairs:
      - name: imdb-vs-dialog
        a: {model: lvwerra/gpt2-imdb}
        b: {model: microsoft/DialoGPT-small, revision: main}
    data: {dataset: "Salesforce/wikitext:wikitext-2-raw-v1:validation", max_tokens: 65536}
    steps:
      - barrier: {}                        # the full-model barrier
      - scan: {granularity: sublayer}
      - merge: {layers: "attn.*", alpha: 0.5, eval: true}

Paths (``out``, ``scan_dir``, ``folder``, ``offload_folder``) may use ``{pair}`` and ``{step}`` and are
relative to the output root; local model folders and data files are relative to the working directory.

A recipe may come from anyone, so it is confined (:func:`plan_outputs`, run by ``--check`` and before
every run): every path it produces is resolved (symbolic links included) and must stay inside the
output root (``--out``, else the recipe's relative ``out`` below the working folder); pair and step
names are plain folder names; every output follows the output-folder policy of
:mod:`hf_llmc.engine.io`; no two steps write into one another's folders. A recipe cannot switch on
code execution: ``load.trust_remote_code`` / ``load.allow_pickle`` only declare what it needs, and
``hf-llmc run`` refuses it unless the same flag is given on the command line.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..config.alphas import parse_alpha, parse_alphas
from ..config.data import DataConfig
from ..config.errors import OutputExistsError, RecipeError, ScanError, UnsafePathError
from ..config.fields import choices as literal_choices
from ..config.files import write_json_atomic
from ..config.load import LoadConfig
from ..config.merge import AutoConfig, ExportConfig, MergeSpec, PushConfig, check_merge_options
from ..config.scan import Method, ScanConfig
from ..config.search import SearchConfig, parse_named_sets
from ..config.security import display_name, is_hub_id, safe_join
from ..engine.io import (
    check_location,
    check_output_dir,
    check_run_dir,
    is_hf_llmc_folder,
    output_path,
    source_folders,
    write_marker,
)

STEP_KINDS = ("barrier", "scan", "merge", "search", "push")
DEFAULT_STEP_OUT = "{pair}/{step}"


# -- schema dataclasses --------------------------------------------------------------------------
@dataclass
class ModelRef:
    """One model of a pair."""

    model: str = field(metadata={"help": "Local folder (relative to the working directory), Hub id, or PEFT adapter."})
    revision: str | None = field(default=None, metadata={"help": "Hub revision: branch, tag (e.g. step143000) or commit."})
    hub_id: str | None = field(default=None, metadata={"help": "For a local folder: the Hub repo id it came from (the merge card's base_model)."})


@dataclass
class PairEntry:
    """Two checkpoints to compare."""

    a: ModelRef = field(metadata={"help": "Model A."})
    b: ModelRef = field(metadata={"help": "Model B."})
    name: str | None = field(default=None, metadata={"help": "Name of the pair's output folder, a plain folder name (default: pair-N)."})


@dataclass
class StepCommon:
    """Options every step takes."""

    name: str | None = field(default=None, metadata={"help": "Step name, a plain folder name used in output paths as {step} (default: the step kind, numbered when repeated)."})
    out: str | None = field(default=None, metadata={"help": "Output path below the output root; may use {pair} and {step} (default: {pair}/{step})."})
    overwrite: bool = field(default=False, metadata={"help": "Replace existing output."})


@dataclass
class BarrierStep:
    """The barrier of one layer-wise (or the full) path."""

    layers: str | None = field(default=None, metadata={"help": "Layer spec (default: the full model), e.g. attn.0-3,mlp.7 or re:<regex>."})
    alphas: str | float = field(default="0,0.25,0.5,0.75,1", metadata={"help": "Comma-separated α values or a count N of evenly spaced points (0.5 always included)."})
    base: Literal["a", "b"] = field(default="a", metadata={"help": "Which model the unselected tensors come from."})
    method: Method = field(default="lerp", metadata={"help": "Interpolation method per tensor."})
    allow_extrapolation: bool = field(default=False, metadata={"help": "Allow α outside [0, 1]."})


@dataclass
class ScanStepOptions:
    resume: bool = field(default=False, metadata={"help": "Continue an interrupted scan in the same folder."})


@dataclass
class MergeStepOptions:
    eval: bool = field(default=False, metadata={"help": "Evaluate A, B and the merge on the recipe's data and put the numbers in the model card."})


@dataclass
class SearchStepOptions:
    """A merge search's evaluation sets and folder options."""

    sets: list[str] = field(metadata={"help": "Exactly two named evaluation sets, NAME=PATH (local text files relative to the working directory), e.g. [code=code.txt, prose=prose.txt]; the recipe's data section gives the shared settings (seq_len, max_tokens)."})
    resume: bool = field(default=False, metadata={"help": "Continue an interrupted search in the same folder."})
    merge: bool = field(default=True, metadata={"help": "Write the picked merge into the step's folder (merged/, with its card)."})


@dataclass
class PushStep:
    """Upload an existing folder to the Hub."""

    folder: str = field(metadata={"help": "Folder to upload, relative to the output root; may use {pair}."})


@dataclass
class RunSettings:
    """Top-level recipe settings."""

    description: str | None = field(default=None, metadata={"help": "What the experiment is for."})
    out: str | None = field(default=None, metadata={"help": "Output root, a relative path below the working folder (default: a folder named after the recipe file; hf-llmc run --out overrides it)."})
    batch_size: int | None = field(default=None, metadata={"help": "Blocks per forward (default: automatic)."})


#: Settings classes whose fields make up each step kind (first class wins a shared field name).
STEP_SCHEMAS: dict[str, tuple] = {
    "barrier": (StepCommon, BarrierStep),
    "scan": (StepCommon, ScanStepOptions, ScanConfig),
    "merge": (StepCommon, MergeSpec, ExportConfig, MergeStepOptions, AutoConfig, PushConfig),
    "search": (StepCommon, SearchStepOptions, SearchConfig),
    "push": (StepCommon, PushStep, PushConfig),
}
#: Fields a recipe may not set: revisions belong to each model, the rest is internal.
EXCLUDED = {LoadConfig: {"revision_a", "revision_b"}}
#: Loading switches that run code from a checkpoint: a recipe may only declare that it needs them;
#: they are switched on by the command line alone (``hf-llmc run --trust-remote-code / --allow-pickle``).
CODE_SWITCHES = {"trust_remote_code": "--trust-remote-code", "allow_pickle": "--allow-pickle"}
TOP_KEYS = ("description", "out", "batch_size", "pairs", "load", "data", "steps", "provenance")


# -- validation ----------------------------------------------------------------------------------
def _classes(kind: str) -> list[type]:
    return list(STEP_SCHEMAS[kind])


def schema_fields(classes: list[type]) -> dict[str, tuple[type, dataclasses.Field]]:
    """Recipe key -> (owning class, field) for the union of ``classes``' fields."""
    out: dict[str, tuple[type, dataclasses.Field]] = {}
    for cls in classes:
        for f in dataclasses.fields(cls):
            if f.name not in EXCLUDED.get(cls, set()) and f.metadata.get("recipe", True):
                out.setdefault(f.name, (cls, f))
    return out


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        text = " or ".join(_type_name(a) for a in args)
        return text + (" or null" if len(args) < len(typing.get_args(tp)) else "")
    if origin is list or tp is list:
        args = typing.get_args(tp)
        return f"a list of {_type_name(args[0])}s" if args else "a list"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {str: "a string", int: "an integer", float: "a number", bool: "true/false"}.get(tp, getattr(tp, "__name__", str(tp)))


def _value_name(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {value}".lower()
    kind = {int: "integer", float: "number", str: "string", list: "list", dict: "mapping"}.get(type(value), type(value).__name__)
    text = repr(value)
    return f"{kind} {text}" if len(text) <= 40 else kind


def _coerce(value, tp, path: str):
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise RecipeError(f"{path}: {value!r} is not one of {', '.join(map(str, typing.get_args(tp)))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except RecipeError:
                continue
        hint = " (quote it)" if str in args and isinstance(value, (int, float)) and not isinstance(value, bool) else ""
        raise RecipeError(f"{path}: expected {_type_name(tp)}, got {_value_name(value)}{hint}")
    if origin is list or tp is list:
        if not isinstance(value, list):
            raise RecipeError(f"{path}: expected {_type_name(tp)}, got {_value_name(value)}")
        args = typing.get_args(tp)
        return [_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path)
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(tp)
    if ok is None:
        return value
    if not ok:
        hint = " (quote it)" if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool) else ""
        raise RecipeError(f"{path}: expected {_type_name(tp)}, got {_value_name(value)}{hint}")
    return float(value) if tp is float else value


def _check_keys(mapping, known: list[str], path: str) -> None:
    if not isinstance(mapping, dict):
        raise RecipeError(f"{path}: expected a mapping with keys {', '.join(known)}, got {_value_name(mapping)}")
    for key in mapping:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f" (known keys: {', '.join(known)})"
            raise RecipeError(f"{path}.{key}: unknown key{hint}")


def build_many(classes: list[type], mapping, path: str) -> dict[type, object]:
    """Validate ``mapping`` against the union of ``classes``' fields; one instance per class."""
    schema = schema_fields(classes)
    _check_keys(mapping if mapping is not None else {}, list(schema), path)
    mapping = mapping or {}
    values: dict[str, object] = {}
    for key, (cls, f) in schema.items():
        hints = typing.get_type_hints(cls)
        if key in mapping:
            values[key] = _coerce(mapping[key], hints[f.name], f"{path}.{key}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecipeError(f"{path}: missing required key '{key}' ({f.metadata.get('help', '')})")
    out = {}
    for cls in classes:
        names = {f.name for f in dataclasses.fields(cls)}
        out[cls] = cls(**{k: v for k, v in values.items() if k in names})
    return out


def build(cls: type, mapping, path: str):
    """One settings dataclass from a recipe mapping (see :func:`build_many`)."""
    return build_many([cls], mapping, path)[cls]


# -- recipes -------------------------------------------------------------------------------------
@dataclass
class Step:
    """One validated step: its kind, name, output path template and settings objects."""

    kind: str
    name: str
    settings: dict[type, object]
    path: str

    def get(self, cls):
        return self.settings[cls]

    @property
    def common(self) -> StepCommon:
        return self.settings[StepCommon]


@dataclass
class Recipe:
    """A validated recipe."""

    source: str
    settings: RunSettings
    pairs: list[PairEntry]
    load: LoadConfig
    data: DataConfig | None
    steps: list[Step]

    def pair_name(self, i: int) -> str:
        return self.pairs[i].name or f"pair-{i + 1}"

    @property
    def where(self) -> str:
        return Path(self.source).name

    def root(self, out: str | os.PathLike | None = None) -> Path:
        """The output root: ``out`` (the command line's ``--out``), else the recipe's ``out`` below
        the working folder, else a folder named after the recipe file there.

        Raises:
            RecipeError: the recipe's ``out`` is absolute or leads outside the working folder.
        """
        if out is not None:
            return output_path(out)
        cwd = Path.cwd()
        text = self.settings.out
        if text is None:
            return output_path(cwd / Path(self.source).stem)
        try:
            safe_join(cwd, text)
        except UnsafePathError:
            raise RecipeError(f"{self.where}.out: {text!r} leads outside the working folder; a recipe's out is a relative "
                              "path below the folder it is run from (pass --out to write elsewhere)") from None
        root = output_path(cwd / text)
        if not _inside(root, cwd):
            raise RecipeError(f"{self.where}.out: {text!r} leads outside the working folder through a symbolic link; "
                              "pass --out to write elsewhere")
        return root

    def output(self, step: Step, pair_index: int, root: Path, template: str | None = None) -> Path:
        text = template or step.common.out or DEFAULT_STEP_OUT
        return root / text.format(pair=self.pair_name(pair_index), step=step.name)

    def needs(self) -> list[tuple[str, str]]:
        """The code-execution switches the recipe declares: ``(flag, recipe key)``."""
        return [(flag, f"{self.where}.load.{key}") for key, flag in CODE_SWITCHES.items() if getattr(self.load, key)]


def _inside(path: Path, root: Path) -> bool:
    """Whether ``path`` lies in ``root`` (or is it) once every symbolic link is resolved."""
    real, base = Path(os.path.realpath(path)), Path(os.path.realpath(root))
    return real == base or base in real.parents


def _check_name(name: str | None, path: str) -> None:
    """A pair or step name becomes a folder name: one plain path component."""
    if name is None:
        return
    if (not name.strip() or name in (".", "..") or any(c in name for c in "/\\\x00")
            or name.startswith("~") or Path(name).is_absolute()):
        raise RecipeError(f"{path}: {name!r} must be a plain folder name (no '/', '\\', '..' or '~'); "
                          "it would lead outside the output folder")


def _check_template(text: str, path: str) -> None:
    try:
        filled = text.format(pair="p", step="s")
    except (KeyError, IndexError, ValueError, AttributeError, TypeError) as err:
        raise RecipeError(f"{path}: bad placeholder in {text!r} ({err}); use {{pair}} and {{step}}") from None
    try:  # outputs never escape the output root (a recipe from elsewhere cannot write anywhere)
        safe_join(".", filled)
        if filled.startswith("~"):
            raise UnsafePathError(filled)
    except UnsafePathError:
        raise RecipeError(f"{path}: {text!r} must stay inside the output folder (a relative path without '..')") from None


def _validate_step(kind: str, step: Step, recipe_data: DataConfig | None, n_pairs: int, path: str) -> None:
    common = step.common
    for key in ("out",):
        if getattr(common, key):
            _check_template(getattr(common, key), f"{path}.{key}")
    if n_pairs > 1 and common.out and "{pair}" not in common.out:
        raise RecipeError(f"{path}.out: {n_pairs} pairs would write to the same folder; include {{pair}}")
    needs_data = kind in ("barrier", "scan")
    try:
        if kind == "barrier":
            settings = step.get(BarrierStep)
            parse_alphas(settings.alphas, allow_extrapolation=settings.allow_extrapolation)
        elif kind == "scan":
            step.get(ScanConfig).validate()
        elif kind == "merge":
            spec, auto, opts = step.get(MergeSpec), step.get(AutoConfig), step.get(MergeStepOptions)
            needs_data = auto.auto or opts.eval
            check_merge_options(spec, auto, step.get(ExportConfig), evaluates=True)  # data: checked below
            if auto.scan_dir:
                _check_template(auto.scan_dir, f"{path}.scan_dir")
        elif kind == "search":
            names = list(parse_named_sets(step.get(SearchStepOptions).sets))
            step.get(SearchConfig).validate(names)
            needs_data = False
        elif kind == "push":
            if not step.get(PushConfig).push_to_hub:
                raise RecipeError(f"{path}: missing required key 'push_to_hub' (the Hub repo id)")
            _check_template(step.get(PushStep).folder, f"{path}.folder")
    except RecipeError:
        raise
    except ValueError as err:
        raise RecipeError(f"{path}: {err}") from None
    if needs_data and recipe_data is None:
        raise RecipeError(f"{path}: this step evaluates the models; add a top-level 'data' section")


def parse_recipe(payload, source: str = "<recipe>") -> Recipe:
    """Validate a parsed YAML document; raise :class:`RecipeError` naming the offending key."""
    where = Path(source).name
    _check_keys(payload, list(TOP_KEYS), where)
    for key in ("pairs", "steps"):
        if key not in payload:
            raise RecipeError(f"{where}: missing required key '{key}'")
        if not isinstance(payload[key], list) or not payload[key]:
            raise RecipeError(f"{where}.{key}: expected a non-empty list, got {_value_name(payload[key])}")
    settings = build(RunSettings, {k: payload[k] for k in ("description", "out", "batch_size") if k in payload}, where)
    pairs = [build(PairEntry, p, f"{where}.pairs[{i}]") for i, p in enumerate(payload["pairs"])]
    for i, pair in enumerate(pairs):
        _check_name(pair.name, f"{where}.pairs[{i}].name")
        for which in ("a", "b"):
            hub_id = getattr(pair, which).hub_id
            if hub_id is not None and not is_hub_id(hub_id):
                raise RecipeError(f"{where}.pairs[{i}].{which}.hub_id: {hub_id!r} is not a Hub repo id (name or namespace/name)")
    names = [p.name or f"pair-{i + 1}" for i, p in enumerate(pairs)]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise RecipeError(f"{where}.pairs: two pairs are named {dup!r}")
    load = build(LoadConfig, payload.get("load"), f"{where}.load")
    if load.offload_folder is not None:
        _check_template(load.offload_folder, f"{where}.load.offload_folder")
    data = None
    if payload.get("data") is not None:
        data = build(DataConfig, payload["data"], f"{where}.data")
        try:
            data.validate()
        except ValueError as err:
            raise RecipeError(f"{where}.data: {err}") from None
    steps: list[Step] = []
    counts: dict[str, int] = {}
    for i, raw in enumerate(payload["steps"]):
        path = f"{where}.steps[{i}]"
        if not isinstance(raw, dict) or len(raw) != 1:
            raise RecipeError(f"{path}: expected a mapping with one key, the step kind ({', '.join(STEP_KINDS)})")
        kind, body = next(iter(raw.items()))
        if kind not in STEP_KINDS:
            close = difflib.get_close_matches(str(kind), STEP_KINDS, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f" (known: {', '.join(STEP_KINDS)})"
            raise RecipeError(f"{path}.{kind}: unknown step kind{hint}")
        built = build_many(_classes(kind), body, f"{path}.{kind}")
        counts[kind] = counts.get(kind, 0) + 1
        step = Step(kind, "", built, f"{path}.{kind}")
        steps.append(step)
        _validate_step(kind, step, data, len(pairs), f"{path}.{kind}")
    totals = {k: sum(s.kind == k for s in steps) for k in STEP_KINDS}
    seen: dict[str, int] = {}
    for step in steps:
        seen[step.kind] = seen.get(step.kind, 0) + 1
        step.name = step.common.name or (step.kind if totals[step.kind] == 1 else f"{step.kind}-{seen[step.kind]}")
    for i, step in enumerate(steps):
        _check_name(step.common.name, f"{step.path}.name")
    step_names = [s.name for s in steps]
    dup = next((n for n in step_names if step_names.count(n) > 1), None)
    if dup:
        raise RecipeError(f"{where}.steps: two steps are named {dup!r}")
    return Recipe(str(source), settings, pairs, load, data, steps)


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read and validate a YAML recipe file (nothing is downloaded or loaded)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: no such recipe file")
    try:
        payload = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise RecipeError(f"{path.name}: not UTF-8 text") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise RecipeError(f"{path.name}: not valid YAML{where} ({getattr(err, 'problem', None) or err})") from None
    if payload is None:
        raise RecipeError(f"{path.name}: empty recipe")
    return parse_recipe(payload, str(path))


def recipe_schema() -> dict:
    """Every recipe key with its type and help text, derived from the settings dataclasses."""

    def describe(classes) -> dict:
        out = {}
        for key, (cls, f) in schema_fields(list(classes)).items():
            tp = typing.get_type_hints(cls)[f.name]
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            entry = {"type": _type_name(tp), "help": f.metadata.get("help", "")}
            if dataclasses.is_dataclass(tp):
                entry["keys"] = describe([tp])
            allowed = literal_choices(tp)
            if allowed is not None:
                entry["choices"] = list(allowed)
            if required:
                entry["required"] = True
            elif f.default is not dataclasses.MISSING and f.default is not None:
                entry["default"] = f.default
            out[key] = entry
        return out

    return {
        **describe([RunSettings]),
        "pairs": {"type": "a list of mappings", "required": True, "keys": describe([PairEntry])},
        "load": {"type": "a mapping", "keys": describe([LoadConfig])},
        "data": {"type": "a mapping", "keys": describe([DataConfig])},
        "steps": {"type": "a list of {KIND: mapping}", "required": True,
                  "kinds": {kind: describe(_classes(kind)) for kind in STEP_KINDS}},
        "provenance": {"type": "a mapping", "help": "Written by hf-llmc into hf_llmc_config.yaml (library versions, "
                       "device, dtype, data fingerprint of the run); informational, ignored when the recipe runs."},
    }


# -- running -------------------------------------------------------------------------------------
def _needs_live(recipe: Recipe) -> bool:
    for step in recipe.steps:
        if step.kind in ("barrier", "scan", "search"):
            return True
        if step.kind == "merge" and (step.get(AutoConfig).auto or step.get(MergeStepOptions).eval):
            return True
    return False


@dataclass
class PlannedOutput:
    """Where one step writes (or reads) for one pair, resolved and checked."""

    pair_index: int
    step: Step
    output: Path  # the step's folder (barrier: its barrier.json); push: the folder uploaded
    scan_dir: Path | None = None
    field: str = ""  # the recipe key that produced ``output``


def _resolved(recipe: Recipe, root: Path, text: str, pair_index: int, step: Step | None, field_path: str) -> Path:
    """``root / text`` with the pair's and step's real names, refused when it leads outside ``root``."""
    filled = text.format(pair=recipe.pair_name(pair_index), step=step.name if step else "")
    try:
        safe_join(root, filled)
        if filled.startswith("~"):
            raise UnsafePathError(filled)
    except UnsafePathError:
        raise RecipeError(f"{field_path}: {text!r} gives {filled!r}, which leads outside the output folder {root.name}") from None
    target = output_path(root / filled)
    if not _inside(target, root):
        raise RecipeError(f"{field_path}: {text!r} gives {filled!r}, which leads outside the output folder "
                          f"{root.name} through a symbolic link")
    return target


def _sources(recipe: Recipe) -> list[tuple[str, Path]]:
    models = []
    for i, pair in enumerate(recipe.pairs):
        models += [(f"model A of {recipe.pair_name(i)}", pair.a.model), (f"model B of {recipe.pair_name(i)}", pair.b.model)]
    models.append(("the base model", recipe.load.base_model))
    return source_folders(models)


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix() or "."
    except ValueError:
        return str(path)


def _overlap(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def check_outputs(recipe: Recipe, out: str | os.PathLike | None = None, *, overwrite: bool = False) -> list[PlannedOutput]:
    """Resolve and check every path the recipe produces, before anything is loaded or written.

    Args:
        recipe: the validated recipe.
        out: the output root given on the command line (default: the recipe's).
        overwrite: ``--overwrite`` (every step may replace its output).

    Returns:
        One :class:`PlannedOutput` per (pair, step), in running order.

    Raises:
        RecipeError: a path (the recipe's ``out``, a step's ``out``, ``scan_dir``, ``folder``,
            ``load.offload_folder``; pair and step names are checked when the recipe is parsed)
            that leads outside the output root, symbolic links included; two steps writing into
            one another's folders.
        OutputExistsError, ScanError: a step's output that the output-folder policy refuses
            (a source model's folder, the Hub cache, an existing output without overwrite, or one
            hf-llmc did not write).
    """
    root = recipe.root(out)
    sources = _sources(recipe)
    if out is not None:  # the folder given on the command line: the policy's protected places
        check_location(out, sources)
    if recipe.load.offload_folder is not None:
        _resolved(recipe, root, recipe.load.offload_folder, 0, None, f"{recipe.where}.load.offload_folder")
    planned: list[PlannedOutput] = []
    written: list[tuple[Path, str]] = []
    for i in range(len(recipe.pairs)):
        for step in recipe.steps:
            replace = overwrite or step.common.overwrite
            field_path = f"{step.path}.out"
            target = _resolved(recipe, root, step.common.out or DEFAULT_STEP_OUT, i, step, field_path)
            scan_dir = None
            if step.kind == "push":
                field_path = f"{step.path}.folder"
                target = _resolved(recipe, root, step.get(PushStep).folder, i, step, field_path)
            else:
                shown = f"{field_path} ({_relative(target, root)})"
                folder = target
                try:
                    if step.kind == "merge":
                        check_output_dir(target, replace, sources=sources)
                    elif step.kind == "scan":
                        check_run_dir(target, resume=step.get(ScanStepOptions).resume, overwrite=replace, sources=sources)
                    elif step.kind == "search":
                        check_run_dir(target, resume=step.get(SearchStepOptions).resume, overwrite=replace, sources=sources)
                    else:
                        check_location(target, sources)
                except (OutputExistsError, ScanError) as err:
                    text = str(err)
                    if text.startswith("out="):
                        text = text.split(": ", 1)[1]
                    raise RecipeError(f"{shown}: {text}") from None
                auto = step.get(AutoConfig) if step.kind == "merge" else None
                if auto is not None and auto.auto and auto.scan_dir:
                    scan_dir = _resolved(recipe, root, auto.scan_dir, i, step, f"{step.path}.scan_dir")
                if step.kind == "barrier":  # STEP/barrier.json
                    if (target / "barrier.json").exists():
                        if not replace:
                            raise RecipeError(f"{shown}/barrier.json: exists; pass --overwrite (or overwrite: true) to replace it")
                        if not is_hf_llmc_folder(target):
                            raise RecipeError(f"{shown}: was not written by hf-llmc (no .hf-llmc marker file), so its "
                                              "barrier.json is not replaced; remove it yourself or choose another out")
                    target = target / "barrier.json"
                for other, other_field in written:
                    if _overlap(folder, other):
                        raise RecipeError(f"{field_path}: writes to {_relative(folder, root)}, "
                                          f"which overlaps the output of {other_field}; give each step its own folder")
                written.append((folder, f"{step.path} ({recipe.pair_name(i)})"))
            planned.append(PlannedOutput(i, step, target, scan_dir, field_path))
    return planned


def plan_outputs(recipe: Recipe, out: str | os.PathLike | None = None, *, overwrite: bool = False) -> list[dict]:
    """What :func:`run_recipe` will do: one entry per (pair, step) with its checked output path.

    Args:
        recipe: the validated recipe.
        out: the output root given on the command line.
        overwrite: ``--overwrite``.

    Returns:
        Rows with the pair, its models and revisions, the step, its kind and its output path.

    Raises:
        RecipeError: see :func:`check_outputs`.
    """
    rows = []
    for item in check_outputs(recipe, out, overwrite=overwrite):
        pair = recipe.pairs[item.pair_index]
        rows.append({"pair": recipe.pair_name(item.pair_index), "a": pair.a.model, "revision_a": pair.a.revision,
                     "b": pair.b.model, "revision_b": pair.b.revision, "step": item.step.name, "kind": item.step.kind,
                     "output": str(item.output)})
    return rows


def code_needs(recipe: Recipe) -> list[str]:
    """What the recipe would need to run custom code or unpickle weights, for ``--check``.

    Returns:
        One line per need: the switches ``load`` declares, and local model folders whose
        ``config.json`` ships code (``auto_map``) or that hold only pickled weights.
    """
    from ..model.checkpoint.folders import PICKLE_INDEX, PICKLE_SINGLE, SAFE_INDEX, SAFE_SINGLE

    lines = [f"needs {flag} (declared by {key}; a recipe cannot switch it on)" for flag, key in recipe.needs()]
    seen = set()
    for label, folder in _sources(recipe):
        if folder in seen or not folder.is_dir():
            continue
        seen.add(folder)
        try:
            config = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError):
            config = {}
        if isinstance(config, dict) and config.get("auto_map"):
            lines.append(f"may need --trust-remote-code: {label} ({folder.name}) ships custom code (auto_map in config.json)")
        if not (folder / SAFE_INDEX).is_file() and not (folder / SAFE_SINGLE).is_file() and (
                (folder / PICKLE_INDEX).is_file() or any((folder / n).is_file() for n in PICKLE_SINGLE)):
            lines.append(f"needs --allow-pickle: {label} ({folder.name}) holds only pickled weights")
    return lines


def check_switches(recipe: Recipe, *, trust_remote_code: bool, allow_pickle: bool) -> None:
    """Refuse a recipe that declares a code-execution switch the command line did not give.

    Args:
        recipe: the validated recipe.
        trust_remote_code: ``hf-llmc run --trust-remote-code``.
        allow_pickle: ``hf-llmc run --allow-pickle``.

    Raises:
        RecipeError: ``load.trust_remote_code`` or ``load.allow_pickle`` without its flag.
    """
    given = {"--trust-remote-code": trust_remote_code, "--allow-pickle": allow_pickle}
    for flag, key in recipe.needs():
        if not given[flag]:
            what = "run code shipped with a checkpoint" if flag == "--trust-remote-code" else "unpickle weights"
            raise RecipeError(f"{key}: a recipe cannot switch this on (it would {what}); "
                              f"pass {flag} to hf-llmc run if you trust the checkpoints")


def run_recipe(recipe: Recipe, *, out: str | os.PathLike | None = None, overwrite: bool = False,
               progress: bool = True, echo=print, trust_remote_code: bool = False, allow_pickle: bool = False) -> list[dict]:
    """Run every step of ``recipe`` on every pair; return one summary dict per (pair, step).

    Every path is resolved and checked (:func:`check_outputs`) and the code-execution switches
    (:func:`check_switches`) before anything is loaded.

    Args:
        recipe: the validated recipe.
        out: the output root (default: the recipe's).
        overwrite: replace every step's output (only outputs hf-llmc wrote).
        progress: show progress bars on a terminal.
        echo: prints one line per step.
        trust_remote_code: run code shipped with the checkpoints, for every pair (never from the recipe).
        allow_pickle: allow pickled weights, for every pair (never from the recipe).

    Returns:
        One summary dict per (pair, step).

    Raises:
        RecipeError: an escaping path, or a declared switch without its flag.
    """
    from types import SimpleNamespace

    from ..analyses.barrier import average_barriers, barrier_sets
    from ..analyses.multiset import run_scan_sets
    from ..analyses.scan import run_scan
    from ..api import ModelPair
    from ..engine.data import sets_for
    from ..model.pair import lazy_pair
    from ..outputs.hub import push_folder

    check_switches(recipe, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    planned = {(item.pair_index, item.step.name): item for item in check_outputs(recipe, out, overwrite=overwrite)}
    root = recipe.root(out)
    load = dataclasses.replace(recipe.load, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    if load.offload_folder is not None:
        load.offload_folder = str(_resolved(recipe, root, load.offload_folder, 0, None, f"{recipe.where}.load.offload_folder"))
    live = _needs_live(recipe)
    summaries = []
    for i, entry in enumerate(recipe.pairs):
        name = recipe.pair_name(i)
        echo(f"[{name}] {entry.a.model} vs {entry.b.model}")
        options = {f.name: getattr(load, f.name) for f in dataclasses.fields(LoadConfig)
                   if f.name not in ("revision_a", "revision_b")}
        if live:
            pair = ModelPair.from_pretrained(entry.a.model, entry.b.model, revision_a=entry.a.revision,
                                             revision_b=entry.b.revision, **options)
        else:
            pair = lazy_pair(entry.a.model, entry.b.model, revision_a=entry.a.revision, revision_b=entry.b.revision,
                             trust_remote_code=load.trust_remote_code, allow_pickle=load.allow_pickle,
                             base_model=load.base_model, added_rows=load.added_rows)
        blocks = None
        if live and recipe.data is not None:  # several named sets: a list of named token blocks
            blocks = sets_for(pair, recipe.data) if recipe.data.multiple else pair.blocks(recipe.data)
        for step in recipe.steps:
            summary = {"pair": name, "step": step.name, "kind": step.kind}
            replace = overwrite or step.common.overwrite
            item = planned[(i, step.name)]
            target = item.output
            if step.kind == "barrier":
                s = step.get(BarrierStep)
                if isinstance(blocks, list):
                    results = barrier_sets(pair, blocks, layers=s.layers, alphas=s.alphas, base=s.base, method=s.method,
                                           batch_size=recipe.settings.batch_size, allow_extrapolation=s.allow_extrapolation)
                    averages = average_barriers(results)
                    payload = {"datasets": {n: r.to_dict() for n, r in results.items()}, "averages": averages}
                    result = SimpleNamespace(barrier_mid=averages["mean"]["barrier_mid"],
                                             barrier_max=averages["mean"]["barrier_max"], to_dict=lambda p=payload: p)
                else:
                    result = pair.barrier(blocks, layers=s.layers, alphas=s.alphas, base=s.base, method=s.method,
                                          batch_size=recipe.settings.batch_size, allow_extrapolation=s.allow_extrapolation)
                folder = target.parent
                fresh = not folder.is_dir() or not any(folder.iterdir())
                if target.exists() and not (replace and is_hf_llmc_folder(folder)):
                    raise RecipeError(f"{target}: exists; pass --overwrite (or overwrite: true) to replace it")
                write_json_atomic(target, {"model_a": display_name(entry.a.model), "revision_a": entry.a.revision,
                                           "model_b": display_name(entry.b.model), "revision_b": entry.b.revision,
                                           **result.to_dict()})
                if fresh:
                    write_marker(folder, "barrier")
                summary.update(output=str(target), barrier_mid=result.barrier_mid, barrier_max=result.barrier_max)
                echo(f"  {step.name}: barrier_mid {result.barrier_mid:+.4f} nats, barrier_max {result.barrier_max:+.4f} -> {target}")
            elif step.kind == "scan":
                cfg = step.get(ScanConfig)
                if cfg.batch_size is None and recipe.settings.batch_size:
                    cfg = dataclasses.replace(cfg, batch_size=recipe.settings.batch_size)
                run = run_scan_sets if isinstance(blocks, list) else run_scan
                rows = run(pair, blocks, cfg, target, resume=step.get(ScanStepOptions).resume, progress=progress,
                           overwrite=replace)
                summary.update(output=str(target), rows=len(rows))
                echo(f"  {step.name}: {len(rows)} result rows -> {target}")
            elif step.kind == "merge":
                summary.update(_run_merge(recipe, step, pair, blocks, i, item, replace, progress, echo))
            elif step.kind == "search":
                summary.update(_run_search(recipe, step, pair, target, replace, echo))
            elif step.kind == "push":
                push = step.get(PushConfig)
                url = push_folder(target, push.push_to_hub, private=push.private, revision=push.revision,
                                  commit_message=push.commit_message)
                summary.update(output=str(target), url=url)
                echo(f"  {step.name}: pushed {target.name} to {push.push_to_hub}: {url}")
            summaries.append(summary)
    return summaries


def _run_search(recipe: Recipe, step: Step, pair, target: Path, overwrite: bool, echo) -> dict:
    from ..outputs.search import search_and_merge

    opts = step.get(SearchStepOptions)
    sets = parse_named_sets(dataclasses.replace(recipe.data or DataConfig(), data=opts.sets, dataset=None))
    outcome = search_and_merge(pair, sets, step.get(SearchConfig), target, data=recipe.data,
                               batch_size=recipe.settings.batch_size, resume=opts.resume, overwrite=overwrite,
                               sources=_sources(recipe), write_merge=opts.merge)
    chosen = outcome.manifest["result"]["chosen"]
    echo(f"  {step.name}: front of {len(outcome.manifest['result']['front'])} points; chosen "
         f"{outcome.manifest['result']['pick']}: worst-case increase {chosen['worst_increase']:+.4f} nats -> {target}")
    return {"output": str(target), "chosen": chosen["key"], "worst_increase": chosen["worst_increase"]}


def _run_merge(recipe: Recipe, step: Step, pair, blocks, i: int, item: PlannedOutput, overwrite: bool, progress: bool, echo) -> dict:
    from ..analyses.autoselect import auto_select
    from ..outputs.merge.save import save_merged

    spec, auto, export = step.get(MergeSpec), step.get(AutoConfig), step.get(ExportConfig)
    push = step.get(PushConfig)
    target = item.output
    choice = None
    if auto.auto:
        if auto.scan_dir:
            auto = dataclasses.replace(auto, scan_dir=str(item.scan_dir))
        alpha, _ = parse_alpha(0.5 if spec.alpha is None else spec.alpha, allow_extrapolation=spec.allow_extrapolation)
        choice = auto_select(pair, blocks, auto, alpha=alpha, base=spec.base, method=spec.method,
                             batch_size=recipe.settings.batch_size)
        spec = dataclasses.replace(choice.spec(), allow_extrapolation=spec.allow_extrapolation)
        echo(f"  {step.name}: auto chose {', '.join(choice.chosen)} (merged perplexity {choice.perplexity_merged:.3f})")
    evaluate = auto.auto or step.get(MergeStepOptions).eval
    result = save_merged(pair, spec, target, max_shard_size=export.max_shard_size, dtype=export.dtype,
                         overwrite=overwrite, data=recipe.data if evaluate else None,
                         batch_size=recipe.settings.batch_size, auto=choice, push=push, progress=progress,
                         hub_id_a=recipe.pairs[i].a.hub_id, hub_id_b=recipe.pairs[i].b.hub_id)
    echo(f"  {step.name}: merged {spec.describe()} ({100 * result.plan.fraction_changed:.2f} % of the parameters) -> {target}")
    out = {"output": str(target), "fraction_changed": result.plan.fraction_changed, "spec": spec.describe()}
    if result.evaluation:
        out["perplexity"] = result.evaluation["merged"]["perplexity"]
    if result.url:
        out["url"] = result.url
    return out
