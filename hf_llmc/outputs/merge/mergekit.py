"""mergekit configs against one architecture: the α mergekit would give every tensor, a config read
as a :class:`~hf_llmc.config.merge.MergeSpec`, and a merge plan written as a config.

How mergekit evaluates a config (mergekit 0.1.5, ``mergekit/plan.py`` and ``mergekit/config.py``):
the decoder layers of a slice sit at t = i/(n-1) (t = 1 for a one-layer slice); the tensors before
the blocks are planned with the first slice, those after with the last, both at t = 0. A parameter is
looked up on the model's source in the slice, then on the slice, then at the top level; a gradient
list is interpolated at t, and a list of conditions takes the first whose ``filter`` is a substring of
the tensor name (here: the name the checkpoint stores, which is mergekit's name for known families).
linear gives ``(w_A·A + w_B·B) / (w_A + w_B)`` (without the division when ``normalize: false``);
slerp goes from ``base_model`` to the other model at t.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ...config.alphas import ItemAlpha, anchor_value, format_number
from ...config.errors import MergeSpecError
from ...config.merge import MergeSpec, as_spec
from ...config.mergekit import MergekitConfig, Slice, Source, dump_mergekit, parse_mergekit
from ...config.spec import BLOCK_KINDS, GLOBAL_KINDS
from ...model.checkpoint.adapters import AdapterCheckpoint
from ...model.selection import block_group, global_group, resolve
from .plan import MergePlan, plan_merge

if TYPE_CHECKING:
    from ...model.architecture import Architecture
    from ...model.pair import ModelPair


def _f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def _names(arch) -> list[str]:
    if arch.fused:
        raise MergeSpecError(f"fused expert tensors ({arch.fused[0]}, ...) are stored in pieces that mergekit "
                             "names differently; mergekit configs are not supported for this model")
    return [p for p in arch.parameters if p not in arch.aliases]


def _tensor_name(arch, name: str) -> str:
    return arch.stored_names.get(name, name)


def _evaluate(setting, tensor: str, t: float):
    if isinstance(setting, (bool, int, float)):
        return setting
    if setting and all(isinstance(v, (int, float)) for v in setting):
        return anchor_value(setting, t)
    for cond in setting:
        if cond["filter"] is None or cond["filter"] == "*" or cond["filter"] in tensor:
            return _evaluate(cond["value"], tensor, t)
    return None


def _one_minus(t: float) -> float:
    """α = 1 - t, as the shortest decimal whose 1 - α is exactly t where there is one (so that
    α = 0.1 written as t = 1 - 0.1 reads back as 0.1, not 0.09999999999999998)."""
    for digits in range(1, 18):
        alpha = float(f"{1 - t:.{digits}g}")
        if 1 - alpha == t:
            return alpha
    return 1 - t


def _parameter(cfg: MergekitConfig, sl: Slice, name: str, tensor: str, t: float, model: str | None = None):
    levels = [s.parameters for s in sl.sources if s.model == model] if model is not None else []
    for params in [*levels, sl.parameters, cfg.parameters]:
        if name in params:
            value = _evaluate(params[name], tensor, t)
            if value is not None:
                return value
    return None


def normalized_slices(cfg: MergekitConfig, arch: Architecture) -> list[Slice]:
    """The config's slices with layer ranges filled in, checked to cover the layers in order.

    Args:
        cfg: the config.
        arch: the models' architecture.

    Returns:
        The slices (a ``models`` config: one slice over every layer, the base model added as mergekit does).

    Raises:
        MergeSpecError: slices that skip, repeat or reorder layers, or take other layers of A than of B.
    """
    n = arch.num_blocks
    slices = []
    for sl in cfg.slices:
        sources = [Source(s.model, s.layer_range or (0, n), s.parameters) for s in sl.sources]
        if sl.sources[0].layer_range is None and cfg.base_model and cfg.base_model not in [s.model for s in sources]:
            sources.append(Source(cfg.base_model, (0, n), {}))
        slices.append(Slice(sources, sl.parameters))
    start = 0
    for i, sl in enumerate(slices):
        ranges = {s.layer_range for s in sl.sources}
        lo, hi = sl.sources[0].layer_range
        if len(ranges) != 1 or lo != start or hi > n:
            raise MergeSpecError(f"slices[{i}]: layer_range {list(sl.sources[0].layer_range)}; hf-llmc merges each layer "
                                 f"with the same layer of the other model, so the slices must cover layers 0-{n} "
                                 "in order with one layer_range per slice")
        start = hi
    if start != n:
        raise MergeSpecError(f"the slices end at layer {start}; the models have {n} (hf-llmc keeps every layer)")
    return slices


def mergekit_weights(cfg: MergekitConfig, arch: Architecture) -> dict[str, dict]:
    """What mergekit would compute for every tensor of the architecture.

    Args:
        cfg: the config.
        arch: the models' architecture.

    Returns:
        Canonical name -> ``{"alpha": α, "weights": {model: w}}`` (linear) or ``{"alpha": α, "t": t}``
        (slerp); α is the point of the A-B line the tensor lands on (0 = A = ``cfg.models[0]``).

    Raises:
        MergeSpecError: a missing parameter, or weights that are not a point of the A-B line.
    """
    slices = normalized_slices(cfg, arch)
    a, b = cfg.models
    n = arch.num_blocks
    out: dict[str, dict] = {}
    for name in _names(arch):
        tensor = _tensor_name(arch, name)
        block = arch.block_of(name)
        if block is None:
            sl, t, models = slices[0], 0.0, [s.model for s in slices[0].sources]
        elif block >= n:
            sl, t = slices[-1], 0.0
            models = [s.model for s in slices[-1].sources][:len(slices[0].sources)]
        else:
            k = next(i for i, s in enumerate(slices) if s.sources[0].layer_range[0] <= block < s.sources[0].layer_range[1])
            sl = slices[k]
            lo, hi = sl.sources[0].layer_range
            t = (block - lo) / (hi - lo - 1) if hi - lo > 1 else 1
        if block is not None and block < n:
            models = [s.model for s in sl.sources]
        if cfg.method == "slerp":
            value = _parameter(cfg, sl, "t", tensor, t)
            if value is None:
                raise MergeSpecError(f"no t for {tensor} (slerp needs t)")
            if len(models) == 1:
                alpha = 0.0 if models[0] == a else 1.0
            else:
                alpha = value if cfg.base == "a" else _one_minus(value)
            out[name] = {"alpha": alpha, "t": value}
            continue
        weights = {}
        for m in models:
            w = _parameter(cfg, sl, "weight", tensor, t, model=m)
            if w is None:
                raise MergeSpecError(f"no weight for model {m} on {tensor}")
            weights[m] = float(w)
        normalize = _parameter(cfg, sl, "normalize", tensor, t)
        normalize = True if normalize is None else normalize
        total = sum(weights.values())
        if normalize and total == 0:
            raise MergeSpecError(f"{tensor}: the weights sum to 0 (normalize divides by their sum)")
        if not normalize and total != 1:
            raise MergeSpecError(f"{tensor}: weights {', '.join(format_number(w) for w in weights.values())} "
                                 "with normalize: false do not sum to 1, so the result is not a point of the A-B line")
        wb = weights.get(b, 0.0)
        alpha = wb if total == 1 else wb / total
        out[name] = {"alpha": alpha, "weights": weights}
    return out


def _lists(cfg: MergekitConfig) -> list[tuple[float, ...]]:
    found: list[tuple[float, ...]] = []

    def walk(setting):
        if isinstance(setting, list):
            if setting and all(isinstance(v, (int, float)) for v in setting):
                found.append(tuple(float(v) for v in setting))
                found.append(tuple(1 - float(v) for v in setting))
            else:
                for cond in setting:
                    walk(cond["value"])

    for sl in cfg.slices:
        for params in [sl.parameters, *[s.parameters for s in sl.sources]]:
            for value in params.values():
                walk(value)
    for value in cfg.parameters.values():
        walk(value)
    return found


def _fmt_list(values) -> str:
    return ",".join(format_number(v) for v in values)


def _run_items(kind: str, run: list[tuple[int, float]], bounds: set[int], keep: float, candidates) -> list[str]:
    pieces: list[list[tuple[int, float]]] = []
    for b, v in run:
        if not pieces or b in bounds:
            pieces.append([])
        pieces[-1].append((b, v))
    vals = [v for _, v in run]
    if len(pieces) > 1 and len(set(vals)) > 1:  # one gradient over the whole run, if one fits exactly
        full = [tuple(vals)] if all(len(p) == 1 or len({v for _, v in p}) > 1 for p in pieces) else []
        for anchors in [*candidates, (vals[0], vals[-1]), *full]:
            if ItemAlpha(tuple(anchors), anchors=True).block_values(len(vals)) == vals:
                lo, hi = run[0][0], run[-1][0]
                return [f"{kind}.{lo}-{hi}={_fmt_list(anchors)}"]
    merged: list[list[tuple[int, float]]] = []
    for piece in pieces:  # adjacent constant pieces of one value are one item
        if merged and len({v for _, v in merged[-1] + piece}) == 1:
            merged[-1] += piece
        else:
            merged.append(piece)
    items = []
    for piece in merged:
        vals = [v for _, v in piece]
        lo, hi = piece[0][0], piece[-1][0]
        rng = f"{kind}.{lo}" if lo == hi else f"{kind}.{lo}-{hi}"
        if all(v == keep for v in vals):
            continue
        if len(set(vals)) == 1:
            items.append(f"{rng}={format_number(vals[0])}")
            continue
        for anchors in [*candidates, (vals[0], vals[-1]), tuple(vals)]:
            if len(anchors) >= 2 and ItemAlpha(tuple(anchors), anchors=True).block_values(len(vals)) == vals:
                items.append(f"{rng}={_fmt_list(anchors)}")
                break
        else:
            items.extend(f"{kind}.{b}={format_number(v)}" for b, v in piece if v != keep)
    return items


def spec_items(alphas: dict[str, float], arch: Architecture, keep: float, *, bounds: set[int] | frozenset[int] = frozenset(),
               candidates: Sequence[tuple[float, ...]] = ()) -> list[str]:
    """``LAYERS=ALPHA`` items that give every tensor its α (groups where they can, ``re:`` otherwise).

    Args:
        alphas: canonical name -> α (missing names keep the base's value).
        arch: the architecture.
        keep: the base's α (0 for A, 1 for B).
        bounds: blocks where a gradient may restart (the first blocks of mergekit slices).
        candidates: anchor lists to try for per-block gradients.

    Returns:
        The items, non-overlapping.
    """
    def value(name: str) -> float:
        return alphas.get(arch.canonical(name), keep)

    covered: set[str] = set()
    items: list[str] = []
    for kind in GLOBAL_KINDS:
        if not getattr(arch, kind):
            continue
        canon = {arch.canonical(p) for p in global_group(arch, kind).parameters} - covered
        vals = {value(p) for p in canon}
        if canon and len(vals) == 1:
            covered |= canon
            v = vals.pop()
            if v != keep:
                items.append(f"{kind}={format_number(v)}")
    for kind in BLOCK_KINDS:
        run: list[tuple[int, float]] = []
        for i in range(arch.num_blocks + 1):
            canon = {arch.canonical(p) for p in block_group(arch, kind, i).parameters} if i < arch.num_blocks else set()
            vals = {value(p) for p in canon}
            if canon and not canon & covered and len(vals) == 1:
                covered |= canon
                run.append((i, vals.pop()))
                continue
            items.extend(_run_items(kind, run, bounds, keep, candidates))
            run = []
    for name in _names(arch):
        if name not in covered and value(name) != keep:
            items.append(f"re:^{re.escape(name)}$={format_number(value(name))}")
    return items


def spec_from_mergekit(cfg: MergekitConfig, arch: Architecture) -> MergeSpec:
    """The hf-llmc merge spec that gives every tensor the α mergekit would (A = ``cfg.models[0]``).

    Args:
        cfg: a checked config (:func:`~hf_llmc.config.mergekit.load_mergekit`).
        arch: the models' architecture.

    Returns:
        The spec: method lerp (linear, with ``lerp_ops="mergekit"``: bit-identical to mergekit where a
        tensor's float32 weights sum to 1) or slerp, base from ``base_model`` (A without one).

    Raises:
        MergeSpecError: slices hf-llmc cannot follow, a missing parameter, weights off the A-B
            line, or a config that changes nothing.
    """
    weights = mergekit_weights(cfg, arch)
    keep = 0.0 if cfg.base == "a" else 1.0
    alphas = {name: w["alpha"] for name, w in weights.items()}
    extrapolates = any(not 0 <= v <= 1 for v in alphas.values())
    method = "lerp" if cfg.method == "linear" else "slerp"
    bounds = {s.sources[0].layer_range[0] for s in normalized_slices(cfg, arch)}
    items = spec_items(alphas, arch, keep, bounds=bounds, candidates=_lists(cfg))
    if not items:
        raise MergeSpecError("the mergekit config reproduces the base model unchanged; nothing to merge")
    ops = "mergekit" if method == "lerp" else "plain"
    spec = MergeSpec(sets=items, method=method, base=cfg.base, lerp_ops=ops, allow_extrapolation=extrapolates)
    got = plan_merge(arch, spec).alphas
    if any(got.get(n, keep) != v for n, v in alphas.items()):  # one item per tensor is always exact
        items = [f"re:^{re.escape(n)}$={format_number(v)}" for n, v in alphas.items() if v != keep]
        spec = MergeSpec(sets=items, method=method, base=cfg.base, lerp_ops=ops, allow_extrapolation=extrapolates)
    return spec


def check_tokenizer_source(cfg: MergekitConfig, pair: ModelPair) -> None:
    """Refuse a pair whose vocabularies differ (whatever ``tokenizer_source`` says).

    For such a pair hf-llmc writes its union vocabulary (docs/merging.md), which mergekit's
    ``tokenizer_source: union`` / ``base`` build differently (token order, padding rows). With
    identical vocabularies, ``union`` and ``base`` are both the base's vocabulary, as hf-llmc writes.

    Args:
        cfg: the config.
        pair: the (lazy) pair.

    Returns:
        None.

    Raises:
        MergeSpecError: the vocabularies differ.
    """
    if pair.vocab is not None:
        raise MergeSpecError(f"the models' vocabularies differ (tokenizer_source: {cfg.tokenizer_source or 'none'}); "
                             "mergekit builds merged vocabularies differently from hf-llmc's union vocabulary, "
                             "so --from-mergekit needs identical vocabularies")


# -- writing -------------------------------------------------------------------------------------
def _unique_suffix(name: str, others: list[str]) -> str:
    parts = name.split(".")
    for k in range(len(parts) - 1, -1, -1):
        suffix = ".".join(parts[k:])
        if not any(suffix in o for o in others if o != name):
            return suffix
    return name


def _t(i: int, n: int) -> float:
    return i / (n - 1) if n > 1 else 1


def _exact(anchors, vals: list[float], method: str) -> bool:
    n = len(vals)
    for i, v in enumerate(vals):
        got = anchor_value(anchors, _t(i, n))
        if got != v:
            return False
        if method == "lerp" and _f32(anchor_value([1 - x for x in anchors], _t(i, n))) != _f32(1 - v):
            return False
    return True


def _setting(values: list[float], anchors_first, method: str):
    """A scalar for one value, else the first exact anchor list; None when none is exact."""
    if len(set(values)) == 1:
        return values[0]
    for anchors in [*anchors_first, [values[0], values[-1]], list(values)]:
        if len(anchors) >= 2 and _exact(anchors, values, method):
            return list(anchors)
    return None


def _block_filters(rels: list[str], chosen: list[str]) -> list[str]:
    children = {r.split(".", 1)[0] for r in chosen}
    if {r for r in rels if r.split(".", 1)[0] in children} == set(chosen):
        return [f".{c}." for c in sorted(children, key=lambda c: [r.split(".", 1)[0] for r in rels].index(c))]
    return [f".{r}" for r in chosen]


def mergekit_config(pair: ModelPair, spec: MergeSpec | str | dict, model_a: str, model_b: str, *, out_dtype: str | None = None) -> dict:
    """The mergekit config that produces the same merge as ``spec`` on ``pair``.

    The config is checked by evaluating it as mergekit would (:func:`mergekit_weights`).

    Args:
        pair: the (lazy) pair.
        spec: the merge (a :class:`MergeSpec`, its text form or a dict of its fields).
        model_a: how the config names A (a path or Hub id, ``@revision`` allowed).
        model_b: how it names B.
        out_dtype: the output dtype (default: as the base stores its tensors).

    Returns:
        The config (``merge_method`` linear with ``normalize: false``, or slerp).

    Raises:
        MergeSpecError: a part of the merge mergekit cannot express exactly (named in the message).
    """
    spec = as_spec(spec)
    spec.validate()
    arch = pair.arch
    if isinstance(pair.ckpt_a, AdapterCheckpoint) or isinstance(pair.ckpt_b, AdapterCheckpoint):
        raise MergeSpecError("mergekit cannot express a merge with a PEFT adapter as A or B; merge the adapter into its model first")
    if pair.vocab is not None:
        raise MergeSpecError("mergekit cannot express the union vocabulary hf-llmc writes for models whose vocabularies differ")
    names = _names(arch)
    plan: MergePlan = plan_merge(arch, spec)
    keep = 0.0 if spec.base == "a" else 1.0
    alpha = {n: plan.alphas.get(n, keep) for n in names}
    owner: dict[str, int] = {}
    entries = spec.entries()
    for k, (layers, _) in enumerate(entries):
        for g in resolve(layers, arch):
            for p in g.parameters:
                owner[arch.canonical(p)] = k
    n_blocks = arch.num_blocks
    rels: list[list[str]] = [[] for _ in range(n_blocks)]
    for name in names:
        b = arch.block_of(name)
        if b is not None and b < n_blocks:
            rels[b].append(name[len(f"{arch.block_prefix}.{b}."):])

    def token(b: int, rel: str):
        name = f"{arch.block_prefix}.{b}.{rel}"
        k = owner.get(name)
        if k is None or entries[k][1].constant is not None:
            return ("c", alpha[name])
        return ("g", k)

    def signature(b: int):
        return tuple((r, token(b, r)) for r in rels[b])

    segments: list[list[int]] = []
    for b in range(n_blocks):
        if segments and signature(segments[-1][-1]) == signature(b):
            segments[-1].append(b)
        else:
            segments.append([b])

    a_ref, b_ref = model_a, model_b
    base_ref = a_ref if spec.base == "a" else b_ref
    value = (lambda x: x) if spec.method == "lerp" or spec.base == "a" else (lambda x: 1 - x)

    def slice_settings(seg: list[int]):
        """Per class of tensors: (filters, values over the segment's blocks) or None if a gradient is inexact."""
        classes: dict = {}
        for r, tok in signature(seg[0]):
            classes.setdefault(tok, []).append(r)
        out = []
        for tok, chosen in classes.items():
            vals = [alpha[f"{arch.block_prefix}.{b}.{r}"] for b in seg for r in chosen[:1]]
            anchors_first = []
            if tok[0] == "g":
                item = entries[tok[1]][1]
                if item.anchors:
                    anchors_first.append(list(item.values))
            setting = _setting(vals, anchors_first, spec.method)
            if setting is None:
                return None
            out.append((tok, _block_filters(rels[seg[0]], chosen), setting))
        return out

    planned: list[tuple[list[int], list]] = []
    for seg in segments:
        settings = slice_settings(seg)
        if settings is None:  # one slice per block: every value a scalar
            planned.extend((([b], slice_settings([b])) for b in seg))
        else:
            planned.append((seg, settings))

    every = [_tensor_name(arch, n) for n in names]
    pre = [n for n in names if arch.block_of(n) is None]
    post = [n for n in names if arch.block_of(n) is not None and arch.block_of(n) >= n_blocks]

    def conditions(settings, extra: list[str], convert):
        def value_of(setting):
            return [convert(x) for x in setting] if isinstance(setting, list) else convert(setting)

        conds = [{"filter": _unique_suffix(_tensor_name(arch, n), every), "value": convert(alpha[n])} for n in extra]
        if len(settings) == 1:  # every block tensor alike: the value itself, or the fallback after the filters
            value = value_of(settings[0][2])
            return conds + [{"value": value}] if conds else value
        for tok, filters, setting in settings:
            if tok != ("c", keep):
                conds.extend({"filter": f, "value": value_of(setting)} for f in filters)
        conds.append({"value": convert(keep)})
        return conds

    slices = []
    for i, (seg, settings) in enumerate(planned):
        extra = (pre if i == 0 else []) + (post if i == len(planned) - 1 else [])
        lr = [seg[0], seg[-1] + 1]
        if spec.method == "lerp":
            sources = [{"model": a_ref, "layer_range": lr, "parameters": {"weight": conditions(settings, extra, lambda x: 1 - x)}},
                       {"model": b_ref, "layer_range": lr, "parameters": {"weight": conditions(settings, extra, lambda x: x)}}]
            slices.append({"sources": sources})
        else:
            slices.append({"sources": [{"model": a_ref, "layer_range": lr}, {"model": b_ref, "layer_range": lr}],
                           "parameters": {"t": conditions(settings, extra, value)}})
    config: dict = {"merge_method": "linear" if spec.method == "lerp" else "slerp", "base_model": base_ref, "slices": slices}
    if spec.method == "lerp":
        config["parameters"] = {"normalize": False}
    config["dtype"] = "float32"
    if out_dtype is None:
        base = pair.ckpt_a if spec.base == "a" else pair.ckpt_b
        stored = {str(base.dtype(k)).removeprefix("torch.") for k in base.keys() if base.dtype(k).is_floating_point}
        if len(stored) > 1:
            raise MergeSpecError(f"the base stores tensors in several dtypes ({', '.join(sorted(stored))}); "
                                 "mergekit writes one out_dtype: pass --dtype")
        out_dtype = stored.pop() if stored else None
    if out_dtype and out_dtype != "float32":
        config["out_dtype"] = out_dtype
    _check_same(config, arch, alpha, spec.method)
    return config


def _check_same(config: dict, arch, alpha: dict[str, float], method: str) -> None:
    got = mergekit_weights(parse_mergekit(config), arch)
    for name, want in alpha.items():
        have = got[name]
        # slerp toward base B writes t = 1 - α, which may come back 1 ulp (of a double) away
        same = have["alpha"] == want if method == "lerp" else abs(have["alpha"] - want) <= 1e-12
        if same and method == "lerp":
            w = list(have["weights"].values())
            same = _f32(w[0]) == _f32(1 - want) and _f32(w[1]) == _f32(want)
        if not same:
            raise MergeSpecError(f"mergekit cannot express this merge exactly: {name} is at alpha={format_number(want)}, "
                                 f"the nearest config gives {format_number(have['alpha'])}")


def emit_mergekit(pair: ModelPair, spec: MergeSpec | str | dict, model_a: str, model_b: str, *, out_dtype: str | None = None, header: str = "") -> str:
    """The mergekit config of :func:`mergekit_config` as YAML text.

    Args:
        pair: the (lazy) pair.
        spec: the merge (a :class:`MergeSpec`, its text form or a dict of its fields).
        model_a: how the config names A.
        model_b: how it names B.
        out_dtype: the output dtype (default: as the base stores its tensors).
        header: comment lines put first.

    Returns:
        The YAML text.

    Raises:
        MergeSpecError: a part of the merge mergekit cannot express exactly.
    """
    return dump_mergekit(mergekit_config(pair, spec, model_a, model_b, out_dtype=out_dtype), header)
