"""Render a scan (or robustness) folder: ``summary.json``, ``report.md``, PNG figures and a
self-contained ``report.html``, all from ``results.jsonl`` + ``scan.json`` (no model needed).

Figures (matplotlib, Agg): ``heatmap.png`` (rows = groups in model order with the full model on
top, columns = base × α, barrier annotated, diverging colormap centred at 0), ``cumulative.png``
(barrier at α=0.5 against the number of averaged blocks, one line per order and base) and
``robustness.png`` (loss along the interpolation path vs random directions, mean ± spread).
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from ..analyses.multiset import average_rows, dataset_names
from ..config.errors import ScanError
from ..config.files import atomic_file, write_json_atomic, write_text_atomic
from ..engine.io import MANIFEST, RESULTS, read_rows

if TYPE_CHECKING:
    from matplotlib.axes import Axes

MID = 0.5
MAX_ANNOTATED_CELLS = 1500
MAX_ROBUSTNESS_PANELS = 16


# -- sequential fields -----------------------------------------------------------------------------

def _save_figure(fig, path: Path, **kwargs) -> None:
    """``fig.savefig`` through a temporary sibling (fsynced, renamed): never a half-written PNG."""
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", **kwargs)

def summary_fields(row: dict | None) -> dict:
    """The sequential-estimation fields of a group's α = 0.5 row, for ``summary.json``.

    Args:
        row: the row (or None).

    Returns:
        ``tokens``, ``barrier_mid_interval``, ``decision``, ``stop_reason``, ``endpoint_blocks`` and
        ``tokens_ceiling``; empty for None or a fixed-budget row.
    """
    if not row or "stop_reason" not in row:
        return {}
    return {"tokens": row.get("tokens"), "barrier_mid_interval": row.get("interval"), "decision": row.get("decision"),
            "stop_reason": row.get("stop_reason"), "endpoint_blocks": row.get("endpoint_blocks"),
            "tokens_ceiling": row.get("tokens_ceiling")}


def curve_fields(row: dict) -> dict:
    """The sequential-estimation fields of one curve point, for ``summary.json``.

    Args:
        row: the point's row.

    Returns:
        ``tokens``, ``interval`` and ``decision``; empty for a fixed-budget row.
    """
    if "stop_reason" not in row:
        return {}
    return {"tokens": row.get("tokens"), "interval": row.get("interval"), "decision": row.get("decision")}


def is_sequential(summary: dict) -> bool:
    """Whether a run used sequential estimation, so the tables show intervals and decisions.

    Args:
        summary: the run's summary (see :func:`summarize`).

    Returns:
        True when some group's base entry has a ``stop_reason``.
    """
    return any("stop_reason" in s for g in summary.get("groups", []) for s in g["bases"].values())


def mark_undecided(ax: Axes, summary: dict, cols: list[tuple[str, float]]) -> int:
    """Hatch the heatmap cells whose point stopped undecided (sequential estimation).

    Args:
        ax: the heatmap's axes (rows = the summary's groups).
        summary: the run's summary.
        cols: the heatmap's ``(base, alpha)`` columns.

    Returns:
        How many cells were hatched.
    """
    from matplotlib.patches import Rectangle

    marked = 0
    for i, j, point in _cells(summary, cols):
        if point.get("decision") == "undecided":
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///", edgecolor="black",
                                   linewidth=0.0, alpha=0.6))
            marked += 1
    return marked


def _cells(summary: dict, cols: list[tuple[str, float]]):
    """``(row, column, curve point)`` of every heatmap cell that has a point."""
    for i, g in enumerate(summary.get("groups", [])):
        for j, (base, alpha) in enumerate(cols):
            point = {p["alpha"]: p for p in g["bases"].get(base, {}).get("curve", [])}.get(alpha)
            if point is not None:
                yield i, j, point


def interval_contains_zero(point: dict, z: float = 1.96) -> bool:
    """Whether a curve point's barrier is not told apart from 0.

    Its sequential interval, else barrier ± 1.96 standard errors (95 %), contains 0.

    Args:
        point: a curve entry of the summary (``barrier``, ``barrier_se``, maybe ``interval``).
        z: the normal quantile of the fixed-budget interval.

    Returns:
        True when 0 lies inside the interval (False without a barrier or an error bar).
    """
    if point.get("interval"):
        low, high = point["interval"]
        return low <= 0.0 <= high
    barrier, se = point.get("barrier"), point.get("barrier_se")
    return barrier is not None and se is not None and abs(barrier) <= z * se


def mark_zero_inside(ax: Axes, summary: dict, cols: list[tuple[str, float]]) -> int:
    """Frame the heatmap cells whose interval contains 0 (:func:`interval_contains_zero`) with a dotted line.

    Args:
        ax: the heatmap's axes (rows = the summary's groups).
        summary: the run's summary.
        cols: the heatmap's ``(base, alpha)`` columns.

    Returns:
        How many cells were framed.
    """
    from matplotlib.patches import Rectangle

    marked = 0
    for i, j, point in _cells(summary, cols):
        if interval_contains_zero(point):
            ax.add_patch(Rectangle((j - 0.46, i - 0.42), 0.92, 0.84, fill=False, linestyle=":", edgecolor="black",
                                   linewidth=1.2))
            marked += 1
    return marked


def robustness_summary(rows: Iterable[dict]) -> list[dict]:
    """Robustness statistics per group and step t, comparing the path with the random directions.

    Args:
        rows: result rows of a robustness run (endpoint rows and rows without a loss are skipped).

    Returns:
        One entry per (group, t) in row order: group, kind, blocks, t, ``interp`` (the path's loss),
        ``random_mean``, ``random_std`` (sample standard deviation; 0 for one sample), ``random_min``,
        ``random_max`` and ``samples``.
    """
    by: dict[tuple[str, float], dict] = {}
    order: list[tuple[str, float]] = []
    for r in rows:
        if r.get("kind") == "endpoint" or r.get("loss") is None:
            continue
        key = (r["group"], float(r["alpha"]))
        if key not in by:
            by[key] = {"group": r["group"], "kind": r["kind"], "blocks": r["blocks"], "t": float(r["alpha"]),
                       "interp": None, "random": []}
            order.append(key)
        if r.get("direction", "interp") == "interp":
            by[key]["interp"] = r["loss"]
        else:
            by[key]["random"].append(r["loss"])
    out = []
    for key in order:
        e = by[key]
        losses = e.pop("random")
        n = len(losses)
        mean = sum(losses) / n if n else None
        std = math.sqrt(sum((x - mean) ** 2 for x in losses) / (n - 1)) if n > 1 else (0.0 if n else None)
        e.update(random_mean=mean, random_std=std, random_min=min(losses) if n else None,
                 random_max=max(losses) if n else None, samples=n)
        out.append(e)
    return out


# -- summary ---------------------------------------------------------------------------------------
def load_run(out_dir: str | os.PathLike) -> tuple[dict, list[dict]]:
    """Read a scan or robustness folder.

    Args:
        out_dir: the run folder.

    Returns:
        ``(manifest, rows)``: ``scan.json`` and the rows of ``results.jsonl``.

    Raises:
        ScanError: no or unreadable ``scan.json``, no results, or a damaged results line.
    """
    out = Path(out_dir)
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except FileNotFoundError:
        raise ScanError(f"{out}: no {MANIFEST}; not a scan or robustness folder") from None
    except ValueError:
        raise ScanError(f"{out}/{MANIFEST}: unreadable JSON") from None
    rows = read_rows(out / RESULTS)
    if not rows:
        raise ScanError(f"{out}: no results in {RESULTS}")
    return manifest, rows


def _endpoints(rows: list[dict]) -> dict[str, dict]:
    ends = {r["base"]: r for r in rows if r.get("kind") == "endpoint"}
    return {w: {k: ends[w][k] for k in ("loss", "perplexity", "accuracy", "tokens", "bits_per_byte") if k in ends[w]}
            for w in ends}


def metric_of(manifest: dict) -> str:
    """The barrier unit a run's report uses: ``loss`` (nats) or ``bpb`` (bits per byte).

    Args:
        manifest: the run's ``scan.json``.

    Returns:
        The ``metric`` setting (``loss`` when absent).
    """
    return (manifest.get("settings") or {}).get("metric") or "loss"


def _in_metric(rows: list[dict], metric: str) -> list[dict]:
    """Rows whose ``barrier`` / ``barrier_se`` are in the metric's unit (bits per byte: ``barrier_bpb``)."""
    if metric != "bpb":
        return rows
    return [{**r, "barrier_nats": r.get("barrier"), "barrier": r.get("barrier_bpb"), "barrier_se": r.get("barrier_bpb_se")}
            for r in rows]


def _group_order(manifest: dict, rows: list[dict]) -> list[str]:
    names = [g["name"] for g in manifest.get("plan", {}).get("groups", [])]
    seen = set(names)
    for r in rows:  # groups not in the plan (should not happen) go last
        if r.get("kind") not in ("endpoint", "full") and r["group"] not in seen:
            names.append(r["group"])
            seen.add(r["group"])
    return names


def _exp(x: float | None) -> float | None:
    return None if x is None else (math.exp(x) if x < 700 else float("inf"))


def summarize(manifest: dict, rows: list[dict]) -> dict:
    """The numbers of a run folder's report, as written to ``summary.json``.

    Args:
        manifest: the run's ``scan.json``.
        rows: its result rows.

    Returns:
        Command, models, data, settings, status, α grid and endpoints, then ``groups``: per group
        (full model first, then plan order) and base, barrier_mid, barrier_max (over the whole α grid),
        their standard errors, perplexity ratios, error barriers and the curve; plus ``cumulative``
        curves for a cumulative scan, ``robustness`` statistics and ``sequential`` settings when present.
    """
    names = dataset_names(rows)
    if names and all(r.get("dataset") in names for r in rows):
        return summarize_sets(manifest, rows)
    metric = metric_of(manifest)
    rows = _in_metric(rows, metric)
    interp = [r for r in rows if r.get("kind") != "endpoint" and r.get("direction", "interp") == "interp"]
    by_group: dict[str, dict[str, list[dict]]] = {}
    meta: dict[str, dict] = {}
    for r in interp:
        by_group.setdefault(r["group"], {}).setdefault(r["base"], []).append(r)
        meta.setdefault(r["group"], {"kind": r["kind"], "blocks": r["blocks"], "numel": r.get("numel")})
    names = (["full"] if "full" in by_group else []) + [n for n in _group_order(manifest, rows) if n in by_group]
    groups = []
    for name in names:
        entry = {"group": name, **meta[name], "bases": {}}
        for base, rs in sorted(by_group[name].items()):
            rs = sorted({float(r["alpha"]): r for r in rs}.values(), key=lambda r: r["alpha"])
            mid = next((r for r in rs if r["alpha"] == MID), None)
            known = [r for r in rs if r["barrier"] is not None]  # the whole α grid, 0 and 1 included
            top = max(known, key=lambda r: r["barrier"], default=None)
            entry["bases"][base] = {
                "barrier_mid": mid["barrier"] if mid else None,
                "barrier_mid_se": mid.get("barrier_se") if mid else None,
                "barrier_mid_ratio": _exp(mid["barrier"]) if mid else None,
                "barrier_max": top["barrier"] if top else None,
                "barrier_max_se": top.get("barrier_se") if top else None,
                "barrier_max_alpha": top["alpha"] if top else None,
                "barrier_max_ratio": _exp(top["barrier"]) if top else None,
                "error_barrier_mid": mid.get("error_barrier") if mid else None,
                "error_barrier_max": max((r["error_barrier"] for r in known), default=None),
                "curve": [{"alpha": r["alpha"], "loss": r["loss"], "accuracy": r["accuracy"], "barrier": r["barrier"],
                           "barrier_se": r.get("barrier_se"),
                           **({"bits_per_byte": r["bits_per_byte"]} if "bits_per_byte" in r else {}),
                           **({"barrier_bpb": r["barrier_bpb"]} if "barrier_bpb" in r and metric == "loss" else {}),
                           **curve_fields(r)} for r in rs],
                **summary_fields(mid),  # sequential estimation: tokens used, interval, decision
            }
        groups.append(entry)
    summary = {
        "command": manifest.get("command", "scan"),
        "models": manifest.get("models"),
        "data": manifest.get("data"),
        "settings": manifest.get("settings"),
        "settings_hash": manifest.get("settings_hash"),
        "status": manifest.get("status"),
        "alphas": manifest.get("alphas"),
        "endpoints": _endpoints(rows),
        "groups": groups,
    }
    if metric != "loss":
        summary["metric"] = metric
    if manifest.get("sequential"):
        summary["sequential"] = manifest["sequential"]
    sequences = manifest.get("plan", {}).get("sequences") or {}
    if sequences:
        lookup = {g["group"]: g for g in groups}
        cumulative: dict[str, list[dict]] = {}
        for order, seq in sequences.items():
            points = []
            for k, name in enumerate(seq, 1):
                point = {"k": k, "group": name}
                for base, s in lookup.get(name, {}).get("bases", {}).items():
                    point[base] = s["barrier_mid"]
                    point[f"{base}_se"] = s["barrier_mid_se"]
                points.append(point)
            cumulative[order] = points
        summary["cumulative"] = cumulative
    if summary["command"] == "robustness":
        summary["robustness"] = robustness_summary(rows)
    return summary


def summarize_sets(manifest: dict, rows: list[dict]) -> dict:
    """The summary of a run on several named evaluation sets.

    Args:
        manifest: the run's ``scan.json`` (``data.sets`` per set).
        rows: its result rows, each with ``dataset``.

    Returns:
        :func:`summarize` of the token-weighted average over sets (``dataset`` = ``mean``) at the top
        level, plus ``datasets``: per set, then ``mean`` and ``macro``, its ``data``, ``endpoints``,
        ``groups`` (and ``cumulative`` / ``robustness`` when present); ``dataset_names`` lists the sets.
    """
    names = dataset_names(rows)
    views = {n: [r for r in rows if r.get("dataset") == n] for n in names}
    views["mean"], views["macro"] = average_rows(rows, "mean"), average_rows(rows, "macro")
    sets = (manifest.get("data") or {}).get("sets") or {}
    datasets = {}
    for name, rs in views.items():
        part = summarize({**manifest, "data": sets.get(name, {"sets": names})}, [{**r, "dataset": None} for r in rs])
        datasets[name] = {k: part[k] for k in ("data", "endpoints", "groups", "cumulative", "robustness") if k in part}
    summary = summarize(manifest, [{**r, "dataset": None} for r in views["mean"]])
    summary.update(dataset="mean", dataset_names=names, datasets=datasets)
    return summary


#: How the averages over sets are titled in reports.
AVERAGE_TITLES = {"mean": "token-weighted mean over the sets", "macro": "macro average over the sets"}


# -- figures ----------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def short_name(name: str, block_prefix: str | None = None) -> str:
    """A compact label for a figure: ``model.layers.3.self_attn.q_proj`` -> ``3.self_attn.q_proj``.

    Args:
        name: a group name.
        block_prefix: the model's decoder-block prefix (e.g. ``model.layers``), removed first.

    Returns:
        ``name`` without the block prefix, else without a leading ``model.``, ``transformer.``,
        ``gpt_neox.`` or ``base_model.``.
    """
    if block_prefix and name.startswith(block_prefix + "."):
        return name[len(block_prefix) + 1:]
    for head in ("model.", "transformer.", "gpt_neox.", "base_model."):
        if name.startswith(head):
            return name[len(head):]
    return name


def heatmap_matrix(summary: dict) -> tuple[list[str], list[tuple[str, float]], list[list[float | None]]]:
    """The heatmap's rows, columns and values.

    Args:
        summary: the run's summary (see :func:`summarize`).

    Returns:
        ``(names, cols, values)``: group names (summary order, full first), ``(base, alpha)`` columns
        without the trivial ones (α = 0 into A, α = 1 into B), and the barrier of each cell (None if missing).
    """
    groups = summary["groups"]
    bases = sorted({b for g in groups for b in g["bases"]})
    alphas = sorted({p["alpha"] for g in groups for b in g["bases"].values() for p in b["curve"]})
    cols = [(b, a) for b in bases for a in alphas if not (b == "a" and a == 0.0) and not (b == "b" and a == 1.0)]
    values = []
    for g in groups:
        row = []
        for base, alpha in cols:
            curve = {p["alpha"]: p["barrier"] for p in g["bases"].get(base, {}).get("curve", [])}
            row.append(curve.get(alpha))
        values.append(row)
    return [g["group"] for g in groups], cols, values


def plot_heatmap(summary: dict, path: Path, block_prefix: str | None = None) -> Path | None:
    """Draw ``heatmap.png``: the barrier of every group (rows) at every base and α (columns).

    Args:
        summary: the run's summary.
        path: the PNG file to write.
        block_prefix: the model's decoder-block prefix, removed from the row labels.

    Returns:
        ``path``, or None when there is nothing to draw.
    """
    plt = _plt()
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm

    names, cols, values = heatmap_matrix(summary)
    if not names or not cols:
        return None
    data = np.array([[np.nan if v is None else v for v in row] for row in values], dtype=float)
    # Colour scale from the group rows: the full-model barrier is usually far larger and would wash
    # every layer out; it saturates instead (its number is still printed).
    body = data[1:] if names[0] == "full" and len(names) > 1 else data
    finite = body[np.isfinite(body)]
    half = float(np.max(np.abs(finite))) if finite.size else 1.0
    half = half if half > 0 else 1e-6
    norm = TwoSlopeNorm(vmin=-half, vcenter=0.0, vmax=half)
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="#d9d9d9")
    n_rows, n_cols = data.shape
    fig_w = min(3.2 + 1.15 * n_cols + max(len(short_name(n, block_prefix)) for n in names) * 0.075, 22)
    fig_h = min(1.6 + 0.34 * n_rows, 40)
    fig, ax = plt.subplots(figsize=(fig_w, fig_h), dpi=110)
    im = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(n_cols))
    ax.set_xticklabels([f"base {b.upper()}\nα={a:g}" for b, a in cols], fontsize=9)
    ax.xaxis.tick_top()
    ax.set_yticks(range(n_rows))
    ax.set_yticklabels([("full model" if n == "full" else short_name(n, block_prefix)) for n in names],
                       fontsize=9 if n_rows <= 40 else 7)
    if names[0] == "full" and n_rows > 1:
        ax.axhline(0.5, color="black", linewidth=1.5)
    if n_rows * n_cols <= MAX_ANNOTATED_CELLS:
        size = 8 if n_rows <= 40 else 6
        for i in range(n_rows):
            for j in range(n_cols):
                v = data[i, j]
                text = "n/a" if not np.isfinite(v) else f"{v:+.3f}"
                dark = np.isfinite(v) and abs(norm(v) - 0.5) > 0.32
                ax.text(j, i, text, ha="center", va="center", fontsize=size, color="white" if dark else "black")
    undecided = mark_undecided(ax, summary, cols)
    unresolved = mark_zero_inside(ax, summary, cols)
    cbar = fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    bpb = summary.get("metric") == "bpb"
    cbar.set_label("barrier: bits per byte − R(α) (bits/byte)" if bpb else "barrier: loss − R(α) (nats)", fontsize=9)
    models = summary.get("models") or {}
    title = f"Layer-wise barrier: {models.get('a', {}).get('name', 'A')} ↔ {models.get('b', {}).get('name', 'B')}"
    if summary.get("dataset"):
        title += f"\n{AVERAGE_TITLES.get(summary['dataset'], 'evaluation set: ' + summary['dataset'])}"
    ax.set_title(title, fontsize=10, pad=12)
    ax.set_xlabel("R(α) = (1−α)·L_A + α·L_B with the full endpoint models; full-model row may saturate the colours"
                  + ("\ndotted frame: its 95 % interval contains 0 (no barrier resolved)" if unresolved else "")
                  + ("\nhatched: undecided (sequential estimation stopped with T inside the interval)" if undecided else ""),
                  fontsize=8)
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)
    return path


def plot_cumulative(summary: dict, path: Path) -> Path | None:
    """Draw ``cumulative.png``: the barrier at α = 0.5 against the number of averaged blocks.

    Args:
        summary: the run's summary.
        path: the PNG file to write.

    Returns:
        ``path``, or None for a run without cumulative curves.
    """
    cum = summary.get("cumulative")
    if not cum:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    bases = sorted({g for g_ in summary["groups"] for g in g_["bases"]})
    for order, points in cum.items():
        for base in bases:
            ks = [p["k"] for p in points if p.get(base) is not None]
            ys = [p[base] for p in points if p.get(base) is not None]
            es = [p.get(f"{base}_se") or 0.0 for p in points if p.get(base) is not None]
            if ks:
                label = order if len(bases) == 1 else f"{order}, base {base.upper()}"
                ax.errorbar(ks, ys, yerr=es, marker="o", capsize=3, label=label)
    ax.axhline(0.0, color="grey", linewidth=0.8)
    full = next((g for g in summary["groups"] if g["group"] == "full"), None)
    if full:
        mid = next(iter(full["bases"].values()))["barrier_mid"]
        if mid is not None:
            ax.axhline(mid, color="black", linestyle="--", linewidth=1, label="full model")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("number of averaged blocks k")
    ax.set_ylabel("barrier at α=0.5 (nats)")
    ax.set_title("Cumulative barrier")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)
    return path


def plot_robustness(summary: dict, path: Path, block_prefix: str | None = None) -> Path | None:
    """Draw ``robustness.png``: the loss along the path and the random directions (mean ± std) per group.

    Args:
        summary: the run's summary.
        path: the PNG file to write.
        block_prefix: the model's decoder-block prefix, removed from the panel titles.

    Returns:
        ``path``, or None for a run without robustness statistics. At most 16 groups are drawn.
    """
    rob = summary.get("robustness")
    if not rob:
        return None
    plt = _plt()
    groups: dict[str, list[dict]] = {}
    for e in rob:
        groups.setdefault(e["group"], []).append(e)
    names = list(groups)[:MAX_ROBUSTNESS_PANELS]
    ncols = min(4, len(names))
    nrows = math.ceil(len(names) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols, 2.8 * nrows), dpi=110, squeeze=False)
    ends = summary.get("endpoints", {})
    la = ends.get("a", {}).get("loss")
    for ax, name in zip(axes.flat, names):
        es = sorted(groups[name], key=lambda e: e["t"])
        t = [e["t"] for e in es]
        ax.plot(t, [e["interp"] for e in es], marker="o", color="tab:blue", label="towards B")
        mean = [e["random_mean"] for e in es]
        std = [e["random_std"] or 0.0 for e in es]
        ax.plot(t, mean, marker="s", color="tab:red", label=f"random (n={es[0]['samples']})")
        ax.fill_between(t, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                        color="tab:red", alpha=0.2)
        if la is not None:
            ax.axhline(la, linestyle="--", color="grey", linewidth=1, label="L_A")
        ax.set_title(short_name(name, block_prefix), fontsize=9)
        ax.set_xlabel("t", fontsize=8)
        ax.set_ylabel("loss", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("Robustness: interpolation direction vs random directions of equal norm (mean ± std)", fontsize=10)
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)
    return path


# -- tables -----------------------------------------------------------------------------------------
def _f(x, fmt: str = "{:+.4f}") -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else fmt.format(x)


def group_table(summary: dict) -> tuple[list[str], list[list[str]]]:
    """The report's table of groups.

    Args:
        summary: the run's summary.

    Returns:
        ``(header, rows)``: group, kind, blocks, then per base barrier_mid ± SE, barrier_max (at α)
        and perplexity ratio (sequential runs: also interval, decision and tokens), as text.
    """
    bases = sorted({b for g in summary["groups"] for b in g["bases"]})
    header = ["group", "kind", "blocks"]
    sequential = is_sequential(summary)
    for b in bases:
        header += [f"barrier_mid ({b.upper()})", f"barrier_max ({b.upper()})", f"ppl ratio ({b.upper()})"]
        if sequential:
            header += [f"interval ({b.upper()})", f"decision ({b.upper()})", f"tokens ({b.upper()})"]
    body = []
    for g in summary["groups"]:
        blocks = g["blocks"]
        shown = "all" if g["group"] == "full" else (",".join(map(str, blocks)) if len(blocks) <= 6 else f"{blocks[0]}…{blocks[-1]} ({len(blocks)})")
        cells = [g["group"], g["kind"], shown]
        for b in bases:
            s = g["bases"].get(b)
            if s is None:
                cells += ["", "", ""]
                continue
            cells.append(f"{_f(s['barrier_mid'])} ± {_f(s['barrier_mid_se'], '{:.4f}')}")
            cells.append(f"{_f(s['barrier_max'])} (α={_f(s['barrier_max_alpha'], '{:g}')})")
            cells.append(_f(s["barrier_mid_ratio"], "{:.4f}"))
            if sequential:
                low, high = s.get("barrier_mid_interval") or (None, None)
                cells += [f"[{_f(low)}, {_f(high)}]", str(s.get("decision") or s.get("stop_reason") or ""),
                          _f(s.get("tokens"), "{:,}")]
        body.append(cells)
    return header, body


def compact_table(summary: dict) -> tuple[list[str], list[list[str]]]:
    """A narrow table of groups, for the terminal.

    Args:
        summary: the run's summary.

    Returns:
        ``(header, rows)``: group, then per base barrier_mid ± SE and barrier_max (sequential runs:
        also tokens and decision), as text.
    """
    bases = sorted({b for g in summary["groups"] for b in g["bases"]})
    header = ["group"]
    sequential = is_sequential(summary)
    for b in bases:
        header += [f"mid {b.upper()} ± se", f"max {b.upper()}"] + ([f"tokens {b.upper()}"] if sequential else [])
    body = []
    for g in summary["groups"]:
        cells = [g["group"]]
        for b in bases:
            s = g["bases"].get(b)
            cells += ["", ""] if s is None else [
                f"{_f(s['barrier_mid'], '{:+.3f}')} ± {_f(s['barrier_mid_se'], '{:.3f}')}", _f(s["barrier_max"], "{:+.3f}")]
            if sequential:  # tokens the α=0.5 point used, and its decision
                cells.append("" if s is None else f"{_f(s.get('tokens'), '{:,}')} {s.get('decision') or s.get('stop_reason') or ''}".strip())
        body.append(cells)
    return header, body


def robustness_table(summary: dict) -> tuple[list[str], list[list[str]]]:
    """The report's robustness table.

    Args:
        summary: the run's summary.

    Returns:
        ``(header, rows)``: group, t, loss towards B and the random directions' mean, std, min and max, as text.
    """
    header = ["group", "t", "loss towards B", "random mean", "random std", "random min", "random max"]
    body = [[e["group"], f"{e['t']:g}", _f(e["interp"], "{:.4f}"), _f(e["random_mean"], "{:.4f}"),
             _f(e["random_std"], "{:.4f}"), _f(e["random_min"], "{:.4f}"), _f(e["random_max"], "{:.4f}")]
            for e in summary.get("robustness", [])]
    return header, body


def _md_table(header: list[str], body: list[list[str]]) -> str:
    esc = lambda c: str(c).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(esc, row)) + " |" for row in body]
    return "\n".join(lines)


def _html_table(header: list[str], body: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in body)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _data_line(data: dict) -> str:
    chat = data.get("chat")
    if chat:
        return (f"{data.get('source')} — chat, {chat.get('conversations')} conversations of at most {chat.get('seq_len')} "
                f"tokens ({chat.get('truncated')} truncated, {chat.get('dropped')} without scored tokens dropped), "
                f"loss on {chat.get('loss_on')} tokens ({data.get('tokens')}), fingerprint {data.get('fingerprint')}")
    return (f"{data.get('source')} — {data.get('num_blocks')} blocks × {data.get('seq_len')} tokens "
            f"({data.get('tokens')} predicted tokens), fingerprint {data.get('fingerprint')}")


def _intro(summary: dict) -> list[tuple[str, str]]:
    models, data, ends = summary.get("models") or {}, summary.get("data") or {}, summary.get("endpoints", {})
    settings = summary.get("settings") or {}
    items = [
        ("Model A", f"{models.get('a', {}).get('name')}" + (f" @ {models['a']['revision']}" if models.get("a", {}).get("revision") else "")),
        ("Model B", f"{models.get('b', {}).get('name')}" + (f" @ {models['b']['revision']}" if models.get("b", {}).get("revision") else "")),
        *([("Data", _data_line(data))] if "sets" not in data else
          [(f"Data: {name}", _data_line(d)) for name, d in data["sets"].items()]),
        ("Settings", ", ".join(f"{k}={v}" for k, v in settings.items() if v is not None)),
        ("Status", f"{summary.get('status')} (settings hash {summary.get('settings_hash')})"),
    ]
    for w in ("a", "b"):
        if w in ends:
            e = ends[w]
            items.append((f"L_{w.upper()}", f"{e['loss']:.4f} nats (perplexity {e['perplexity']:.3f}, accuracy {e['accuracy']:.4f})"))
    for name, part in (summary.get("datasets") or {}).items():
        ends = part.get("endpoints", {})
        if "a" in ends and "b" in ends:
            items.append((f"L_A, L_B: {name}", f"{ends['a']['loss']:.4f}, {ends['b']['loss']:.4f} nats"
                          + (f" ({ends['a']['bits_per_byte']:.4f}, {ends['b']['bits_per_byte']:.4f} bits/byte)"
                             if ends["a"].get("bits_per_byte") is not None and ends["b"].get("bits_per_byte") is not None else "")))
    return items


def _set_views(summary: dict) -> list[tuple[str, dict]]:
    """``(title, summary)`` of every evaluation set and average of a multi-set run (none for one set)."""
    out = []
    for name, part in (summary.get("datasets") or {}).items():
        title = AVERAGE_TITLES.get(name, f"evaluation set {name}")
        out.append((title, {**summary, **part, "dataset": name}))
    return out


def write_markdown(summary: dict, path: Path, figures: dict[str, Path]) -> Path:
    """Write ``report.md`` (atomically): run details, figures and tables.

    Args:
        summary: the run's summary.
        path: the file to write.
        figures: title -> PNG file, linked by file name (the files sit beside the report).

    Returns:
        ``path``.
    """
    title = "hf-llmc robustness report" if summary["command"] == "robustness" else "hf-llmc scan report"
    lines = [f"# {title}", ""]
    lines += [f"- **{k}**: {v}" for k, v in _intro(summary)]
    lines += ["", "Barrier = loss on the path − R(α), R(α) = (1−α)·L_A + α·L_B (full endpoint models); "
              "± is the paired standard error over token blocks.", ""]
    for name, fig in figures.items():
        lines += [f"![{name}]({fig.name})", ""]
    if summary["command"] == "robustness":
        lines += ["## Robustness", "", _md_table(*robustness_table(summary)), ""]
    views = _set_views(summary)
    if not views:
        lines += ["## Groups", "", _md_table(*group_table(summary)), ""]
    for title, view in views:
        lines += [f"## Groups: {title}", "", _md_table(*group_table(view)), ""]
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path


_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1200px;color:#222}
table{border-collapse:collapse;font-size:13px;margin:1em 0}th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}img{max-width:100%;border:1px solid #eee}
dt{font-weight:600}dd{margin:0 0 .4em 1em}"""


def write_html(summary: dict, path: Path, figures: dict[str, Path]) -> Path:
    """Write a self-contained ``report.html`` (atomically): run details, embedded figures and tables.

    Args:
        summary: the run's summary.
        path: the file to write.
        figures: title -> PNG file, embedded as data URIs.

    Returns:
        ``path``.
    """
    title = "hf-llmc robustness report" if summary["command"] == "robustness" else "hf-llmc scan report"
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1><dl>"]
    parts += [f"<dt>{html.escape(k)}</dt><dd>{html.escape(str(v))}</dd>" for k, v in _intro(summary)]
    parts.append("</dl><p>Barrier = loss on the path − R(α), R(α) = (1−α)·L<sub>A</sub> + α·L<sub>B</sub> "
                 "(full endpoint models); ± is the paired standard error over token blocks.</p>")
    for name, fig in figures.items():
        data = base64.b64encode(fig.read_bytes()).decode()
        parts.append(f"<h2>{html.escape(name)}</h2><img alt='{html.escape(name)}' src='data:image/png;base64,{data}'>")
    if summary["command"] == "robustness":
        parts += ["<h2>Robustness</h2>", _html_table(*robustness_table(summary))]
    views = _set_views(summary)
    if not views:
        parts += ["<h2>Groups</h2>", _html_table(*group_table(summary))]
    for title, view in views:
        parts += [f"<h2>Groups: {html.escape(title)}</h2>", _html_table(*group_table(view))]
    parts.append("</body></html>")
    write_text_atomic(path, "".join(parts))
    return path


def render(out_dir: str | os.PathLike) -> dict[str, Path]:
    """(Re-)render every report file of a scan or robustness folder from its results (no model needed).

    Args:
        out_dir: the run folder (``results.jsonl`` + ``scan.json``).

    Returns:
        The files written: ``summary``, ``markdown``, ``html`` and each figure by its stem
        (``heatmap``, ``cumulative`` or ``robustness``).

    Raises:
        ScanError: the folder holds no readable run (see :func:`load_run`).
    """
    out = Path(out_dir)
    manifest, rows = load_run(out)
    summary = summarize(manifest, rows)
    prefix = (manifest.get("architecture") or {}).get("block_prefix")
    written: dict[str, Path] = {}
    write_json_atomic(out / "summary.json", summary)
    written["summary"] = out / "summary.json"
    figures: dict[str, Path] = {}
    if summary["command"] == "robustness":
        fig = plot_robustness(summary, out / "robustness.png", prefix)
        if fig:
            figures["Robustness curves"] = fig
    else:
        fig = plot_heatmap(summary, out / "heatmap.png", prefix)
        if fig:
            figures["Barrier heatmap" + (f" ({AVERAGE_TITLES['mean']})" if summary.get("datasets") else "")] = fig
        for title, view in _set_views(summary):
            if view["dataset"] == "mean":
                continue
            fig = plot_heatmap(view, out / f"heatmap-{view['dataset']}.png", prefix)
            if fig:
                figures[f"Barrier heatmap ({title})"] = fig
        fig = plot_cumulative(summary, out / "cumulative.png")
        if fig:
            figures["Cumulative barrier"] = fig
    written.update({p.stem: p for p in figures.values()})
    written["markdown"] = write_markdown(summary, out / "report.md", figures)
    written["html"] = write_html(summary, out / "report.html", figures)
    return written
