"""Revision sweeps: many scans of one model family at different Hub revisions -> one
step × layer heatmap (the paper's figure for Pythia training steps).

A sweep is a set of finished scan folders (e.g. the ``{pair}/scan`` outputs of a recipe whose
``pairs`` list revision pairs such as ``step1000`` vs ``step143000``). :func:`collect_sweep` reads
their manifests and results; rows are the pairs (labelled by the revision that varies, in natural
order: ``step2000`` before ``step10000``), columns the groups in model order, values the
``barrier_mid`` into the chosen base. :func:`write_sweep` writes ``sweep.json`` and
``sweep_heatmap.png``.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

from ..config.errors import SweepError
from ..config.files import atomic_file, write_text_atomic
from ..engine.io import MANIFEST, RESULTS, read_rows
from .report import summarize


def natural_key(text: str) -> list:
    """``step2000`` < ``step10000``: digit runs compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(text))]


def _label(models: dict, vary: str) -> str:
    a, b = models.get("a", {}), models.get("b", {})
    ra, rb = a.get("revision") or a.get("name"), b.get("revision") or b.get("name")
    if vary == "both" and ra == rb:  # e.g. two training runs compared at the same step
        return str(ra)
    return {"a": str(ra), "b": str(rb)}.get(vary, f"{ra} ↔ {rb}")


def find_scans(roots: list[str | os.PathLike]) -> list[Path]:
    """Scan folders (a ``scan.json`` manifest of command ``scan``) at or under ``roots``."""

    found: list[Path] = []
    for root in roots:
        root = Path(root)
        candidates = [root / MANIFEST] if (root / MANIFEST).is_file() else sorted(root.rglob(MANIFEST))
        for path in candidates:
            try:
                if json.loads(path.read_text()).get("command") == "scan":
                    found.append(path.parent)
            except (OSError, ValueError):
                continue
    return found


def scan_summary(folder: Path) -> dict:
    """The summary of one scan folder, computed from its manifest and results (as the report does)."""

    return summarize(json.loads((folder / MANIFEST).read_text()), read_rows(folder / RESULTS))


def collect_sweep(roots: list[str | os.PathLike], base: str = "a") -> dict:
    """The sweep matrix of the scans under ``roots`` (see the module docstring)."""
    folders = find_scans(roots)
    if not folders:
        raise SweepError(f"no scan folder (scan.json) under {', '.join(str(r) for r in roots)}")
    summaries = [(f, scan_summary(f)) for f in folders]
    revs_a = {json.dumps(s["models"].get("a")) for _, s in summaries}
    revs_b = {json.dumps(s["models"].get("b")) for _, s in summaries}
    vary = "b" if len(revs_a) == 1 and len(revs_b) > 1 else "a" if len(revs_b) == 1 and len(revs_a) > 1 else "both"
    columns: list[str] = []
    rows = []
    for path, summary in summaries:
        values = {}
        for group in summary.get("groups", []):
            stats = group.get("bases", {}).get(base)
            if stats is None:
                continue
            if group["group"] not in columns:
                columns.append(group["group"])
            values[group["group"]] = stats.get("barrier_mid")
        if not values:
            raise SweepError(f"{path}: the scan has no rows into base {base.upper()}; use --base with a scanned base")
        rows.append({"label": _label(summary["models"], vary), "models": summary["models"], "scan": str(path),
                     "values": values, "endpoints": summary.get("endpoints")})
    rows.sort(key=lambda r: natural_key(r["label"]))
    labels = [r["label"] for r in rows]
    if len(set(labels)) != len(labels):
        raise SweepError(f"two scans of the same pair ({', '.join(sorted({x for x in labels if labels.count(x) > 1}))}); pass one folder per pair")
    return {
        "base": base,
        "varies": vary,
        "rows": labels,
        "columns": columns,
        "barrier_mid": [[r["values"].get(c) for c in columns] for r in rows],
        "scans": [{k: r[k] for k in ("label", "models", "scan", "endpoints")} for r in rows],
    }


def plot_sweep(sweep: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    data = np.array([[math.nan if v is None else v for v in row] for row in sweep["barrier_mid"]], dtype=float)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * len(sweep["columns"]) + 2), max(2.5, 0.4 * len(sweep["rows"]) + 1.5)))
    finite = data[np.isfinite(data)]
    bound = float(np.abs(finite).max()) if finite.size else 1.0
    image = ax.imshow(data, aspect="auto", cmap="RdBu_r", vmin=-bound, vmax=bound)
    ax.set_xticks(range(len(sweep["columns"])), sweep["columns"], rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(sweep["rows"])), sweep["rows"], fontsize=8)
    ax.set_xlabel("group")
    ax.set_ylabel({"a": "revision of A", "b": "revision of B"}.get(sweep["varies"], "pair"))
    ax.set_title(f"barrier at α=0.5 (nats), base {sweep['base'].upper()}")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path


def write_sweep(roots: list[str | os.PathLike], out: str | os.PathLike, base: str = "a") -> dict[str, Path]:
    """Collect the sweep, write ``sweep.json`` and ``sweep_heatmap.png`` into ``out``."""
    sweep = collect_sweep(roots, base)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    target = out / "sweep.json"
    write_text_atomic(target, json.dumps(sweep, indent=2) + "\n")
    return {"json": target, "heatmap": plot_sweep(sweep, out / "sweep_heatmap.png")}
