"""``hf-llmc merge --auto``: which groups can be averaged without a barrier?

Groups are ranked by their single-group barrier at the merge α (from a single-group scan in
``--scan-dir``, or measured here), then added in that order while the measured barrier of the
chosen set stays <= ``--max-barrier``; the first group that pushes it over stops the search.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from .selection import Group, resolve, union

DEFAULT_MAX_BARRIER = 0.02
DEFAULT_CANDIDATES = "attn.*,mlp.*"


class AutoSelectError(ValueError):
    """No usable candidates, or a scan folder that does not fit this merge (usage error)."""


class NoMergeableGroupError(RuntimeError):
    """Every candidate group's barrier exceeds ``--max-barrier`` (a result, not a usage error)."""


@dataclass
class AutoConfig:
    """Automatic choice of the merged groups."""

    auto: bool = field(default=False, metadata={"help": "Choose the groups automatically: lowest single-group barriers first, while the chosen set's barrier stays <= --max-barrier."})
    scan_dir: str | None = field(default=None, metadata={"help": "Folder of a single-group `hf-llmc scan` (same data, method and base) to rank the groups; default: measure them now."})
    max_barrier: float = field(default=DEFAULT_MAX_BARRIER, metadata={"help": "Largest barrier (nats, loss - reference line at α) the chosen set may have."})
    auto_layers: str | None = field(default=None, metadata={"help": f"Candidate groups (layer spec); default: {DEFAULT_CANDIDATES} when measuring, every group of the scan with --scan-dir."})


@dataclass
class AutoChoice:
    """The result of :func:`auto_select`: the ranking, each greedy step and the chosen groups."""

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

    @property
    def perplexity_merged(self) -> float:
        return math.exp(self.loss_merged) if self.loss_merged < 700 else float("inf")

    def spec(self):
        """The :class:`~hf_llmc.export.MergeSpec` of the chosen groups at α."""
        from .export import MergeSpec, format_alpha

        alpha = format_alpha(self.alpha, None)
        plain = [item for item in self.items if not item.startswith("re:")]  # one comma list
        sets = ([f"{','.join(plain)}={alpha}"] if plain else []) + [
            f"{item}={alpha}" for item in self.items if item.startswith("re:")]
        return MergeSpec(sets=sets, method=self.method, base=self.base)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__} | {"perplexity_merged": self.perplexity_merged}


def spec_item(name: str, arch) -> str:
    """A layer-spec item selecting exactly the group ``name`` (a module path becomes a regex)."""
    try:
        groups = resolve(name, arch)
        if len(groups) == 1 and groups[0].name == name:
            return name
    except ValueError:
        pass
    return f"re:^{re.escape(name)}\\.[^.]+$"


def _group_for(name: str, arch) -> Group:
    item = spec_item(name, arch)
    groups = resolve(item, arch)
    return groups[0] if len(groups) == 1 else union(groups, arch, name)


def _scan_barriers(scan_dir: Path, arch, *, alpha: float, base: str, method: str, fingerprint: str | None,
                   candidates: set[str] | None) -> list[tuple[str, float]]:
    from .scan import MANIFEST, RESULTS, read_rows

    manifest_file = scan_dir / MANIFEST
    if not (scan_dir / RESULTS).is_file():
        raise AutoSelectError(f"--scan-dir {scan_dir.name}: no {RESULTS}; run `hf-llmc scan` into it first")
    if manifest_file.is_file():
        manifest = json.loads(manifest_file.read_text())
        settings = manifest.get("settings", {})
        if settings.get("mode", "single") != "single":
            raise AutoSelectError(f"--scan-dir {scan_dir.name}: a {settings.get('mode')} scan; --auto needs a single-group scan")
        if settings.get("method", method) != method:
            raise AutoSelectError(f"--scan-dir {scan_dir.name}: scanned with --method {settings.get('method')}, merging with {method}")
        scanned = (manifest.get("data") or {}).get("fingerprint")
        if fingerprint and scanned and scanned != fingerprint:
            raise AutoSelectError(f"--scan-dir {scan_dir.name}: the scan used other evaluation data; pass the scan's data")
    out: dict[str, float] = {}
    for row in read_rows(scan_dir / RESULTS):
        if row.get("kind") in ("endpoint", "full") or row.get("group") == "full" or row.get("direction", "interp") != "interp":
            continue
        if row.get("base") != base or not math.isclose(float(row.get("alpha", -1)), alpha, abs_tol=1e-9):
            continue
        if row.get("barrier") is None or (candidates is not None and row["group"] not in candidates):
            continue
        out[row["group"]] = float(row["barrier"])
    if not out:
        raise AutoSelectError(
            f"--scan-dir {scan_dir.name}: no single-group results at alpha={alpha:g} into base {base.upper()}; "
            "scan with that α and base"
        )
    order = {name: i for i, name in enumerate(arch.parameters)}
    return sorted(out.items(), key=lambda kv: order.get(_group_for(kv[0], arch).parameters[0], 0))


def auto_select(pair, data, cfg: AutoConfig, *, alpha: float = 0.5, base: str = "a", method: str = "lerp",
                batch_size: int | None = None) -> AutoChoice:
    """Choose the groups to merge at ``alpha`` (see the module docstring); ``data`` as for
    :meth:`~hf_llmc.pair.ModelPair.blocks`."""
    from .pair import check_finite

    if cfg.max_barrier is None or not math.isfinite(cfg.max_barrier):
        raise AutoSelectError("--max-barrier: give a finite number of nats, e.g. 0.02")
    arch = pair.arch
    blocks = pair.blocks(data)
    ev = pair.evaluator(blocks, batch_size)
    order = ("b", "a") if base == "a" else ("a", "b")
    ends = {w: pair.endpoint(w, ev, blocks) for w in order}
    ref = (1 - alpha) * ends["a"].loss + alpha * ends["b"].loss

    def measure(group: Group) -> float:
        stats = pair.point(ev, group, alpha, base=base, method=method)
        return check_finite(stats, f"{group.name} at alpha={alpha:g}").loss

    if cfg.scan_dir:
        wanted = {g.name for g in resolve(cfg.auto_layers, arch)} if cfg.auto_layers else None
        ranked = _scan_barriers(Path(cfg.scan_dir), arch, alpha=alpha, base=base, method=method,
                                fingerprint=blocks.fingerprint, candidates=wanted)
        source = f"single-group scan in {Path(cfg.scan_dir).name}"
    else:
        ranked = [(g.name, measure(g) - ref) for g in resolve(cfg.auto_layers or DEFAULT_CANDIDATES, arch)]
        source = "single-group barriers measured for this merge"
    position = {name: i for i, (name, _) in enumerate(ranked)}
    ranked.sort(key=lambda kv: (kv[1], position[kv[0]]))
    candidates = [{"group": name, "barrier": value} for name, value in ranked]
    if ranked[0][1] > cfg.max_barrier:
        name, value = ranked[0]
        raise NoMergeableGroupError(
            f"no group stays under --max-barrier {cfg.max_barrier:g}: the lowest single-group barrier is "
            f"{name} at {value:+.4f} nats"
        )

    steps: list[dict] = []
    chosen: list[Group] = []
    loss_merged = float("nan")
    for name, single in ranked:
        group = _group_for(name, arch)
        trial = chosen + [group]
        if len(trial) == 1 and not cfg.scan_dir:
            set_loss = single + ref  # measured above
        else:
            set_loss = measure(union(trial, arch, ",".join(g.name for g in trial)) if len(trial) > 1 else group)
        accepted = set_loss - ref <= cfg.max_barrier
        steps.append({"group": name, "single_barrier": single, "set_barrier": set_loss - ref, "accepted": accepted})
        if not accepted:
            break
        chosen.append(group)
        loss_merged = set_loss
    if not chosen:
        raise NoMergeableGroupError(
            f"no group stays under --max-barrier {cfg.max_barrier:g} when measured (first candidate {ranked[0][0]})"
        )
    return AutoChoice(
        alpha=alpha, base=base, method=method, max_barrier=cfg.max_barrier, source=source,
        candidates=candidates, steps=steps, chosen=[g.name for g in chosen],
        items=[spec_item(g.name, arch) for g in chosen],
        loss_a=ends["a"].loss, loss_b=ends["b"].loss, loss_merged=loss_merged,
        auto_layers=cfg.auto_layers, scan_dir=Path(cfg.scan_dir).name if cfg.scan_dir else None,
    )


def auto_merge(pair, data, out_dir, *, max_barrier: float = DEFAULT_MAX_BARRIER, alpha: float = 0.5, base: str = "a",
               method: str = "lerp", candidates: str | None = None, scan_dir: str | None = None,
               batch_size: int | None = None, **save_kwargs):
    """:func:`auto_select` then :func:`~hf_llmc.export.save_merged` with the choice recorded in the
    card (what ``hf-llmc merge --auto`` does); returns ``(choice, MergeResult)``."""
    from .export import save_merged

    cfg = AutoConfig(auto=True, scan_dir=scan_dir, max_barrier=max_barrier, auto_layers=candidates)
    choice = auto_select(pair, data, cfg, alpha=alpha, base=base, method=method, batch_size=batch_size)
    result = save_merged(pair, choice.spec(), out_dir, data=data, batch_size=batch_size, auto=choice, **save_kwargs)
    return choice, result
