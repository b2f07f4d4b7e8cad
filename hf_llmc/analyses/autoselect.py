"""``hf-llmc merge --auto``: which groups can be averaged without a barrier?

Groups are ranked by their single-group barrier at the merge α (from a single-group scan in
``--scan-dir``, or measured here), then added in that order while the measured barrier of the
chosen set stays <= ``--max-barrier``; the first group that pushes it over stops the search.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..config.alphas import format_alpha
from ..config.errors import AutoSelectError, NoMergeableGroupError, SpecError
from ..config.merge import DEFAULT_CANDIDATES, AutoConfig, MergeSpec
from ..config.scan import Method, Which
from ..engine.data import SetsSource, sets_for
from ..engine.evaluation import check_finite, endpoint, evaluator_for, point, point_on_sets
from ..engine.io import read_rows
from ..model.selection import Group, resolve, union
from .scan import MANIFEST, RESULTS

if TYPE_CHECKING:
    from ..model.architecture import Architecture
    from ..model.pair import ModelPair


@dataclass
class AutoChoice:
    """The result of :func:`auto_select`: the ranking, each greedy step and the chosen groups.

    Attributes:
        alpha: the merge α.
        base: the model the unchosen tensors come from.
        method: the interpolation method.
        max_barrier: the largest barrier the chosen set may have (nats).
        source: where the single-group barriers came from (a scan folder or measured now).
        candidates: ``{"group", "barrier"}`` per candidate, lowest barrier first.
        steps: one ``{"group", "single_barrier", "set_barrier", "accepted"}`` per group tried.
        chosen: names of the chosen groups.
        items: a layer-spec item per chosen group (see :func:`spec_item`).
        loss_a: loss of the full model A.
        loss_b: loss of the full model B.
        loss_merged: loss of the chosen set merged at α.
        auto_layers: the candidate spec given, if any.
        scan_dir: the scan folder's name, if one was used.
        objective: with several evaluation sets, where the cap holds (``max``, ``mean`` or a set's name).
        metric: the unit of the barriers and of ``max_barrier``: ``loss`` (nats) or ``bpb`` (bits per byte).
        per_set: with several evaluation sets, per set ``loss_a``, ``loss_b``, ``loss_merged`` and
            ``barrier`` of the chosen set (``loss_*`` above are then token-weighted means).
    """

    alpha: float
    base: str
    method: str
    max_barrier: float
    source: str
    candidates: list[dict]
    steps: list[dict]
    chosen: list[str]
    items: list[str]
    loss_a: float
    loss_b: float
    loss_merged: float
    auto_layers: str | None = None
    scan_dir: str | None = None
    objective: str | None = None
    metric: str = "loss"
    per_set: dict | None = None

    @property
    def perplexity_merged(self) -> float:
        """``exp(loss_merged)`` (inf above 700 nats)."""
        return math.exp(self.loss_merged) if self.loss_merged < 700 else float("inf")

    def spec(self) -> MergeSpec:
        """The merge of the chosen groups at α, to pass to :func:`hf_llmc.save_merged`.

        Returns:
            A :class:`~hf_llmc.config.merge.MergeSpec` with the chosen items (block-kind items in one
            comma list, each regex item on its own), the method and base.
        """
        alpha = format_alpha(self.alpha, None)
        plain = [item for item in self.items if not item.startswith("re:")]  # one comma list
        sets = ([f"{','.join(plain)}={alpha}"] if plain else []) + [
            f"{item}={alpha}" for item in self.items if item.startswith("re:")]
        return MergeSpec(sets=sets, method=self.method, base=self.base)

    def to_dict(self) -> dict:
        """The choice as JSON-ready data (recorded in the model card and ``hf_llmc_config.yaml``).

        Returns:
            Every field plus ``perplexity_merged`` (``objective``, ``metric`` and ``per_set`` only when
            several sets or bits per byte were used).
        """
        out = {k: getattr(self, k) for k in self.__dataclass_fields__} | {"perplexity_merged": self.perplexity_merged}
        if self.per_set is None and self.metric == "loss":
            for key in ("objective", "metric", "per_set"):
                out.pop(key)
        return out


def spec_item(name: str, arch: Architecture) -> str:
    """A layer-spec item that selects exactly one group, so a choice can be written as a merge spec.

    Args:
        name: a group name (``attn.3``, ``embed``, or a module path from a module-granularity scan).
        arch: the model's architecture.

    Returns:
        ``name`` when it resolves to exactly that group, else ``re:^<escaped name>\\.[^.]+$``
        (the module's direct parameters).
    """
    try:
        groups = resolve(name, arch)
        if len(groups) == 1 and groups[0].name == name:
            return name
    except SpecError:
        pass
    return f"re:^{re.escape(name)}\\.[^.]+$"


def _group_for(name: str, arch) -> Group:
    item = spec_item(name, arch)
    groups = resolve(item, arch)
    return groups[0] if len(groups) == 1 else union(groups, arch, name)


def _scan_barriers(scan_dir: Path, arch, *, alpha: float, base: str, method: str, fingerprint: str | dict | None,
                   candidates: set[str] | None, combine=None, metric: str = "loss") -> list[tuple[str, float]]:
    manifest_file = scan_dir / MANIFEST
    if not (scan_dir / RESULTS).is_file():
        raise AutoSelectError(f"scan_dir={scan_dir.name!r}: no {RESULTS}; run a single-group scan into it first")
    if manifest_file.is_file():
        manifest = json.loads(manifest_file.read_text())
        settings = manifest.get("settings", {})
        if settings.get("mode", "single") != "single":
            raise AutoSelectError(f"scan_dir={scan_dir.name!r}: a {settings.get('mode')} scan; auto=True needs a single-group scan")
        if settings.get("method", method) != method:
            raise AutoSelectError(f"scan_dir={scan_dir.name!r}: scanned with method={settings.get('method')!r}, merging with {method}")
        data = manifest.get("data") or {}
        scanned = data.get("fingerprint") if "sets" not in data else {n: d.get("fingerprint") for n, d in data["sets"].items()}
        if fingerprint and scanned and scanned != fingerprint:
            raise AutoSelectError(f"scan_dir={scan_dir.name!r}: the scan used other evaluation data; pass the scan's data")
    out: dict[str, float] = {}
    per_set: dict[str, dict[str, tuple[float, float]]] = {}
    field = "barrier_bpb" if metric == "bpb" else "barrier"
    for row in read_rows(scan_dir / RESULTS):
        if row.get("kind") in ("endpoint", "full") or row.get("group") == "full" or row.get("direction", "interp") != "interp":
            continue
        if row.get("base") != base or not math.isclose(float(row.get("alpha", -1)), alpha, abs_tol=1e-9):
            continue
        if row.get(field) is None or (candidates is not None and row["group"] not in candidates):
            continue
        if row.get("dataset") is not None and combine is not None:
            weight = row.get("bytes" if metric == "bpb" else "tokens") or 0
            per_set.setdefault(row["group"], {})[row["dataset"]] = (float(row[field]), float(weight))
            continue
        out[row["group"]] = float(row[field])
    for name, values in per_set.items():
        value = combine(values)
        if value is not None:
            out[name] = value
    if not out:
        raise AutoSelectError(
            f"scan_dir={scan_dir.name!r}: no single-group results at alpha={alpha:g} into base {base.upper()}; "
            "scan with that α and base"
        )
    order = {name: i for i, name in enumerate(arch.parameters)}
    return sorted(out.items(), key=lambda kv: order.get(_group_for(kv[0], arch).parameters[0], 0))


def auto_select(pair: ModelPair, data: SetsSource, cfg: AutoConfig, *, alpha: float = 0.5, base: Which = "a",
                method: Method = "lerp", batch_size: int | None = None) -> AutoChoice:
    """Choose the groups that can be merged at ``alpha`` without a barrier (see the module docstring).

    Args:
        pair: the loaded pair.
        data: evaluation data, one set or several named ones (see :func:`~hf_llmc.engine.data.sets_for`).
        cfg: ``max_barrier``, the candidates (``auto_layers``), an optional ``scan_dir`` to rank them,
            ``metric`` and, with several sets, ``auto_objective`` (the cap on every set, the
            token-weighted mean, or one set).
        alpha: the merge α.
        base: the model the unchosen tensors come from.
        method: ``"lerp"`` or ``"slerp"`` per tensor.
        batch_size: blocks per forward (default: automatic).

    Returns:
        The choice: ranking, greedy steps, chosen groups and the merged loss.

    Raises:
        AutoSelectError: a non-finite ``max_barrier``, an ``auto_objective`` naming no set, data without
            byte counts for ``metric="bpb"``, or a ``scan_dir`` without results, of another mode, method
            or data, or without single-group rows at this α and base.
        NoMergeableGroupError: no candidate stays under ``max_barrier``.
        SpecError: a bad ``auto_layers``.
        DataError: the data cannot be read or cut into blocks.
        NonFiniteLossError: an evaluation gave NaN or inf.
    """
    if cfg.max_barrier is None or not math.isfinite(cfg.max_barrier):
        raise AutoSelectError("max_barrier: give a finite number of nats, e.g. 0.02")
    arch = pair.arch
    sets = sets_for(pair, data)
    names = [b.name or "data" for b in sets]
    multi = sets[0].name is not None
    objective = cfg.auto_objective
    if multi and objective not in ("max", "mean") and objective not in names:
        raise AutoSelectError(f"auto_objective={objective!r}: not an evaluation set ({', '.join(names)}); use max, mean or a set's name")
    scales = [1.0] * len(sets)
    if cfg.metric == "bpb":
        missing = [b.bpb_missing for b in sets if b.bpb_missing]
        if missing:
            raise AutoSelectError(missing[0])
        scales = [b.bpb_scale for b in sets]
    evs = [evaluator_for(pair, b, batch_size) for b in sets]
    order = ("b", "a") if base == "a" else ("a", "b")
    ends = [{w: endpoint(pair, w, ev, b) for w in order} for b, ev in zip(sets, evs)]
    refs = [(1 - alpha) * e["a"].loss + alpha * e["b"].loss for e in ends]
    tokens = [e["a"].tokens for e in ends]
    weights = [(e["a"].bytes or 0) if cfg.metric == "bpb" else e["a"].tokens for e in ends]

    def combine(barriers: list[float], w: list[float] = weights) -> float:
        if len(barriers) == 1:
            return barriers[0]
        if objective == "max":
            return max(barriers)
        if objective == "mean":
            return sum(wk * b for wk, b in zip(w, barriers)) / sum(w)
        return barriers[names.index(objective)]

    def measure(group: Group) -> tuple[float, list[float]]:
        """The objective's barrier of ``group`` at α, and its loss on every set (the point set once)."""
        if len(sets) == 1:
            losses = [check_finite(point(pair, evs[0], group, alpha, base=base, method=method),
                                   f"{group.name} at alpha={alpha:g}").loss]
        else:
            losses = [s.loss for s in point_on_sets(pair, evs, group, alpha, base=base, method=method)]
        return combine([(loss - r) * k for loss, r, k in zip(losses, refs, scales)]), losses

    measured: dict[str, tuple[float, list[float]]] = {}
    if cfg.scan_dir:
        wanted = {g.name for g in resolve(cfg.auto_layers, arch)} if cfg.auto_layers else None

        def from_scan(values: dict[str, tuple[float, float]]) -> float | None:
            if set(values) != set(names):
                return None
            return combine([values[n][0] for n in names], [values[n][1] for n in names])

        ranked = _scan_barriers(Path(cfg.scan_dir), arch, alpha=alpha, base=base, method=method,
                                fingerprint={b.name: b.fingerprint for b in sets} if multi else sets[0].fingerprint,
                                candidates=wanted, combine=from_scan if multi else None, metric=cfg.metric)
        source = f"single-group scan in {Path(cfg.scan_dir).name}"
    else:
        ranked = []
        for g in resolve(cfg.auto_layers or DEFAULT_CANDIDATES, arch):
            measured[g.name] = measure(g)
            ranked.append((g.name, measured[g.name][0]))
        source = "single-group barriers measured for this merge"
    position = {name: i for i, (name, _) in enumerate(ranked)}
    ranked.sort(key=lambda kv: (kv[1], position[kv[0]]))
    candidates = [{"group": name, "barrier": value} for name, value in ranked]
    if ranked[0][1] > cfg.max_barrier:
        name, value = ranked[0]
        raise NoMergeableGroupError(
            f"no group stays under max_barrier={cfg.max_barrier:g}: the lowest single-group barrier is "
            f"{name} at {value:+.4f} nats"
        )

    steps: list[dict] = []
    chosen: list[Group] = []
    loss_merged = float("nan")
    losses_merged: list[float] = []
    for name, single in ranked:
        group = _group_for(name, arch)
        trial = chosen + [group]
        if len(trial) == 1 and not cfg.scan_dir:
            set_barrier, losses = measured[name]  # measured above
        else:
            set_barrier, losses = measure(union(trial, arch, ",".join(g.name for g in trial)) if len(trial) > 1 else group)
        accepted = set_barrier <= cfg.max_barrier
        steps.append({"group": name, "single_barrier": single, "set_barrier": set_barrier, "accepted": accepted})
        if multi:
            steps[-1]["set_barriers"] = {n: (loss - r) * k for n, loss, r, k in zip(names, losses, refs, scales)}
        if not accepted:
            break
        chosen.append(group)
        losses_merged = losses
        loss_merged = sum(t * loss for t, loss in zip(tokens, losses)) / sum(tokens) if multi else losses[0]
    if not chosen:
        raise NoMergeableGroupError(
            f"no group stays under max_barrier={cfg.max_barrier:g} when measured (first candidate {ranked[0][0]})"
        )
    mean_a = sum(t * e["a"].loss for t, e in zip(tokens, ends)) / sum(tokens)
    mean_b = sum(t * e["b"].loss for t, e in zip(tokens, ends)) / sum(tokens)
    per_set = None
    if multi:
        per_set = {n: {"loss_a": e["a"].loss, "loss_b": e["b"].loss, "loss_merged": loss,
                       "barrier": (loss - r) * k}
                   for n, e, loss, r, k in zip(names, ends, losses_merged, refs, scales)}
    return AutoChoice(
        alpha=alpha, base=base, method=method, max_barrier=cfg.max_barrier, source=source,
        candidates=candidates, steps=steps, chosen=[g.name for g in chosen],
        items=[spec_item(g.name, arch) for g in chosen],
        loss_a=ends[0]["a"].loss if not multi else mean_a, loss_b=ends[0]["b"].loss if not multi else mean_b,
        loss_merged=loss_merged,
        auto_layers=cfg.auto_layers, scan_dir=Path(cfg.scan_dir).name if cfg.scan_dir else None,
        objective=objective if multi else None, metric=cfg.metric, per_set=per_set,
    )
