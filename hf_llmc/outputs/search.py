"""Outputs of a merge search: the front figure, the α heatmap, ``report.html``, and the picked merge
written through the streamed writer with its card (:func:`search_and_merge`)."""

from __future__ import annotations

import base64
import html
import math
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..analyses.search import parse_key, run_search
from ..config.data import DataConfig
from ..config.fields import option_argv
from ..config.files import write_text_atomic
from ..config.merge import MergeSpec
from ..config.search import SearchConfig, parse_named_sets
from ..config.security import public_name
from ..engine.data import DataSource
from ..engine.io import Sources, is_hf_llmc_folder, output_path
from .merge.save import MergeResult, save_merged
from .report import _CSS, _html_table, _md_table, _plt, _save_figure

if TYPE_CHECKING:
    from ..model.pair import ModelPair

MERGED = "merged"
FRONT_PNG = "front.png"
HEATMAP_PNG = "alpha_heatmap.png"
REPORT = "report.html"
METHOD_TEXT = ("coordinate descents over per-group α from the uniform average, one per weighting of the two "
               "sets, each move compared with the incumbent by paired sequential comparisons on shared token "
               "blocks (dominated moves discarded at the first look); the front is the non-dominated set of the "
               "descents' end points and the uniform path points (docs/search.md).")


# -- figures --------------------------------------------------------------------------------------------
def plot_front(manifest: dict, path: Path) -> Path:
    """The front on held-out text: both losses with error bars, the uniform-α line and the endpoints.

    Args:
        manifest: a finished search's ``search.json``.
        path: the PNG to write.

    Returns:
        ``path``.
    """
    plt = _plt()
    r = manifest["result"]
    n1, n2 = r["sets"]
    conf = manifest["settings"].get("confidence", 0.95)
    from ..engine.stats import t_quantile

    z = t_quantile(1 - (1 - conf) / 2, 1000)
    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    xs = [p[n1] for p in r["path"]]
    ys = [p[n2] for p in r["path"]]
    ax.plot(xs, ys, "-", color="0.6", lw=1.2, zorder=1, label="uniform α (full path)")
    for p in r["path"]:
        ax.annotate(f"α={p['alpha']:g}", (p[n1], p[n2]), textcoords="offset points", xytext=(5, -10), fontsize=7,
                    color="0.4")
    front = r["front"]
    fx = [p["heldout"][n1]["loss"] for p in front]
    fy = [p["heldout"][n2]["loss"] for p in front]
    ax.errorbar(fx, fy, xerr=[z * p["heldout"][n1]["se"] for p in front],
                yerr=[z * p["heldout"][n2]["se"] for p in front], fmt="o", color="tab:blue", ms=5, capsize=2,
                zorder=3, label=f"front ({100 * conf:g} % intervals)")
    order = sorted(range(len(front)), key=lambda i: fx[i])
    ax.plot([fx[i] for i in order], [fy[i] for i in order], "--", color="tab:blue", lw=0.8, zorder=2)
    ends = r["endpoints"]
    for key, marker, color, label in (("a", "s", "tab:green", "A"), ("b", "D", "tab:purple", "B"),
                                      ("uniform", "^", "tab:orange", "uniform average")):
        p = ends[key]
        ax.plot(p["heldout"][n1]["loss"], p["heldout"][n2]["loss"], marker, color=color, ms=8, zorder=4, label=label)
    c = r["chosen"]
    ax.plot(c["heldout"][n1]["loss"], c["heldout"][n2]["loss"], "*", color="tab:red", ms=15, zorder=5,
            label=f"chosen ({r['pick']})")
    ax.set_xlabel(f"loss on {n1} (nats, held out)")
    ax.set_ylabel(f"loss on {n2} (nats, held out)")
    ax.set_title("Merge search: Pareto front")
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def alpha_matrix(manifest: dict, key: str) -> tuple[list[str], list[str], list[list[float | None]]]:
    """The α map of a point as a heatmap: rows = kinds (``block`` or ``attn`` / ``mlp``), columns = blocks.

    Args:
        manifest: a search's ``search.json``.
        key: the point's key.

    Returns:
        ``(row labels, column labels, values)``; ``other`` is the last column of the first row.
    """
    alphas = dict(zip([g["label"] for g in manifest["groups"]], parse_key(key)))
    kinds = sorted({lbl.split(".")[0] for lbl in alphas if lbl != "other"}, key=lambda k: ("block", "attn", "mlp").index(k))
    blocks = sorted({int(lbl.split(".")[1]) for lbl in alphas if lbl != "other"})
    cols = [str(b) for b in blocks] + (["other"] if "other" in alphas else [])
    rows = []
    for kind in kinds:
        row: list[float | None] = [alphas.get(f"{kind}.{b}") for b in blocks]
        if "other" in alphas:
            row.append(alphas["other"] if kind == kinds[0] else None)
        rows.append(row)
    return kinds, cols, rows


def plot_alpha_heatmap(manifest: dict, path: Path) -> Path:
    """Heatmap of the chosen α per group (0 = A, 1 = B).

    Args:
        manifest: a finished search's ``search.json``.
        path: the PNG to write.

    Returns:
        ``path``.
    """
    plt = _plt()
    import numpy as np

    kinds, cols, rows = alpha_matrix(manifest, manifest["result"]["chosen"]["key"])
    data = np.array([[math.nan if v is None else v for v in row] for row in rows], dtype=float)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * len(cols) + 1.5), 0.6 * len(kinds) + 1.6))
    im = ax.imshow(data, cmap="coolwarm", vmin=0, vmax=1, aspect="auto")
    for i in range(len(kinds)):
        for j in range(len(cols)):
            if not math.isnan(data[i, j]):
                ax.text(j, i, f"{data[i, j]:g}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(cols)), cols, fontsize=7)
    ax.set_yticks(range(len(kinds)), kinds, fontsize=8)
    ax.set_xlabel("decoder block")
    ax.set_title(f"chosen α per group ({manifest['result']['pick']}; 0 = A, 1 = B)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    _save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


# -- tables ---------------------------------------------------------------------------------------------
def _ci(entry: dict) -> str:
    lo, hi = entry["interval"]
    return f"{entry['mean']:+.4f} [{lo:+.4f}, {hi:+.4f}]"


def point_name(manifest: dict, key: str) -> str:
    """A short name of a point: ``A``, ``B``, ``uniform``, ``α=0.25 everywhere``, else ``point i``.

    Args:
        manifest: a search's ``search.json``.
        key: the point's key.

    Returns:
        The name.
    """
    values = set(parse_key(key))
    if len(values) == 1:
        v = values.pop()
        return {0.0: "A", 1.0: "B", 0.5: "uniform average"}.get(v, f"α={v:g} everywhere")
    ends = manifest["result"].get("ends", [])
    return f"descent end {ends.index(key) + 1}" if key in ends else "point"


def front_rows(manifest: dict) -> list[dict]:
    """One row per front point (and the endpoints / uniform average when off the front), held-out numbers.

    Args:
        manifest: a finished search's ``search.json``.

    Returns:
        Rows with ``name``, ``key``, ``loss`` / ``se`` per set, ``worst`` and ``note`` (front / chosen).
    """
    r = manifest["result"]
    seen = {}
    for p in r["front"]:
        seen[p["key"]] = (p, "front")
    for name in ("a", "b", "uniform"):
        p = r["endpoints"][name]
        seen.setdefault(p["key"], (p, "off the front (dominated)"))
    out = []
    for key, (p, note) in seen.items():
        if key == r["chosen"]["key"]:
            note = "**chosen**"
        out.append({"name": point_name(manifest, key), "key": key,
                    "loss": {n: p["heldout"][n]["loss"] for n in r["sets"]},
                    "se": {n: p["heldout"][n]["se"] for n in r["sets"]}, "worst": p["worst_increase"], "note": note})
    return out


def card_section(manifest: dict, command: str) -> dict:
    """What the merge card's "Merge search" section shows.

    Args:
        manifest: a finished search's ``search.json``.
        command: the ``hf-llmc search`` command that reproduces the search.

    Returns:
        ``sets``, ``sources``, ``heldout_blocks``, ``pick``, ``method``, ``table`` (:func:`front_rows`),
        ``versus`` (chosen − A / B / uniform per set), ``worst_vs_uniform``, ``confidence`` and ``command``.
    """
    r = manifest["result"]
    c = r["chosen"]
    d = r["chosen_vs_uniform_worst_increase"]
    return {
        "sets": r["sets"],
        "sources": {n: manifest["sets"][n]["source"] for n in r["sets"]},
        "heldout_blocks": {n: manifest["sets"][n]["holdout_blocks"] for n in r["sets"]},
        "pick": r["pick"],
        "method": METHOD_TEXT,
        "table": front_rows(manifest),
        "versus": [{"set": n, "a": _ci(c["heldout"][n]["vs_a"]), "b": _ci(c["heldout"][n]["vs_b"]),
                    "u": _ci(c["heldout"][n]["vs_uniform"])} for n in r["sets"]],
        "worst_vs_uniform": (f"{d['mean']:+.4f} nats, interval [{d['interval'][0]:+.4f}, {d['interval'][1]:+.4f}] "
                             f"(conservative; worst sets {d['sets'][0]} / {d['sets'][1]})"),
        "confidence": manifest["settings"].get("confidence", 0.95),
        "command": command,
    }


def merge_spec(manifest: dict, key: str) -> MergeSpec:
    """The merge of a point: one ``LAYERS=ALPHA`` item per group.

    Args:
        manifest: a search's ``search.json``.
        key: the point's key.

    Returns:
        The spec (base A, lerp).
    """
    from ..config.alphas import format_number

    return MergeSpec(sets=[f"{g['spec']}={format_number(a)}" for g, a in zip(manifest["groups"], parse_key(key))])


# -- report ---------------------------------------------------------------------------------------------
def write_report(out_dir: str | os.PathLike, manifest: dict) -> dict[str, Path]:
    """``front.png``, ``alpha_heatmap.png`` and a self-contained ``report.html`` of a finished search.

    Args:
        out_dir: the search folder.
        manifest: its ``search.json``.

    Returns:
        The files written by name (``front``, ``heatmap``, ``html``).
    """
    out = Path(out_dir)
    r = manifest["result"]
    front = plot_front(manifest, out / FRONT_PNG)
    heat = plot_alpha_heatmap(manifest, out / HEATMAP_PNG)
    names = r["sets"]
    header = ["point"] + [f"loss {n}" for n in names] + ["worst-case increase", ""]
    body = [[row["name"]] + [f"{row['loss'][n]:.4f} ± {row['se'][n]:.4f}" for n in names]
            + [f"{row['worst']:+.4f}", row["note"].strip("*")] for row in front_rows(manifest)]
    c = r["chosen"]
    vs = [[n, _ci(c["heldout"][n]["vs_a"]), _ci(c["heldout"][n]["vs_b"]), _ci(c["heldout"][n]["vs_uniform"])]
          for n in names]
    alphas = [[lbl, f"{a:g}"] for lbl, a in c["alphas"].items()]
    d = r["chosen_vs_uniform_worst_increase"]
    toks = manifest.get("tokens", {})
    intro = [
        ("Model A", manifest["models"]["a"]["name"]), ("Model B", manifest["models"]["b"]["name"]),
        ("Sets", "; ".join(f"{n}: {s['source']} ({s['search_blocks']} search + {s['holdout_blocks']} held-out blocks "
                           f"× {s['seq_len']} tokens)" for n, s in manifest["sets"].items())),
        ("Method", METHOD_TEXT),
        ("Settings", ", ".join(f"{k}={v}" for k, v in manifest["settings"].items() if v is not None)),
        ("Status", f"{manifest['status']}; tokens: search {toks.get('search', 0):,}, front {toks.get('front', 0):,}, "
                   f"held-out check {toks.get('heldout', 0):,}; {manifest.get('seconds', 0):.1f} s"),
        ("Chosen − uniform, worst-case increase", f"{d['mean']:+.4f} [{d['interval'][0]:+.4f}, {d['interval'][1]:+.4f}] nats"),
    ]
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>hf-llmc merge search</title>",
             f"<style>{_CSS}</style></head><body><h1>hf-llmc merge search</h1><dl>"]
    parts += [f"<dt>{html.escape(k)}</dt><dd>{html.escape(str(v))}</dd>" for k, v in intro]
    parts.append("</dl><p>Losses on held-out blocks (never seen by the search), ± one standard error; intervals are "
                 f"{100 * manifest['settings'].get('confidence', 0.95):g} % paired intervals.</p>")
    for title, fig in (("Pareto front", front), ("Chosen α per group", heat)):
        data = base64.b64encode(fig.read_bytes()).decode()
        parts.append(f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' src='data:image/png;base64,{data}'>")
    parts += ["<h2>Front</h2>", _html_table(header, body),
              "<h2>Chosen point − A, B and the uniform average (paired, held out)</h2>",
              _html_table(["set", "− A", "− B", "− uniform"], vs),
              "<h2>Chosen α map</h2>", _html_table(["group", "α"], alphas), "</body></html>"]
    page = out / REPORT
    write_text_atomic(page, "".join(parts))
    write_text_atomic(out / "report.md", "\n\n".join(["# hf-llmc merge search", *(f"- **{k}**: {v}" for k, v in intro),
                                                       f"![front]({FRONT_PNG})", f"![alpha]({HEATMAP_PNG})",
                                                       _md_table(header, body), _md_table(["set", "− A", "− B", "− uniform"], vs)]) + "\n")
    return {"front": front, "heatmap": heat, "html": page}


# -- the command ----------------------------------------------------------------------------------------
def search_command(source_a: str, source_b: str, sets: dict[str, str | DataConfig], cfg: SearchConfig,
                   data: DataConfig | None, out: str | os.PathLike) -> str:
    """The ``hf-llmc search`` command that reproduces a search (local paths by their name only).

    Args:
        source_a: model A.
        source_b: model B.
        sets: ``{name: path or settings}`` of the two sets (a Hub dataset becomes ``--dataset``).
        cfg: the settings.
        data: the shared data settings.
        out: the output folder.

    Returns:
        The command line.
    """
    argv = ["hf-llmc", "search", public_name(source_a), public_name(source_b)]
    for name, source in sets.items():
        if isinstance(source, DataConfig):
            flag, value = ("--dataset", source.dataset) if source.dataset else ("--data", source.data)
        else:
            flag, value = "--data", source
        argv += [flag, f"{name}={public_name(str(value))}"]
    argv += option_argv(cfg)
    if not cfg.prefix:
        argv.append("--no-prefix")
    if data is not None:
        argv += option_argv(data, exclude=("data", "dataset"))
    argv += ["--out", Path(out).name]
    return shlex.join(argv)


@dataclass
class SearchOutcome:
    """What :func:`search_and_merge` wrote.

    Attributes:
        manifest: the search's ``search.json`` (settings, tokens, front, pick, held-out numbers).
        folder: the search folder.
        report: the report files (``front``, ``heatmap``, ``html``).
        merge: the written merge (None with ``write_merge=False``).
        command: the ``hf-llmc search`` command that reproduces it.
    """

    manifest: dict
    folder: Path
    report: dict
    merge: MergeResult | None
    command: str


def search_and_merge(pair: ModelPair, sets: dict[str, DataSource] | DataConfig, cfg: SearchConfig, out_dir: str | os.PathLike, *,
                     data: DataConfig | None = None, batch_size: int | None = None, resume: bool = False,
                     overwrite: bool = False, sources: Sources = (), write_merge: bool = True, dtype: str | None = None,
                     progress: bool = False) -> SearchOutcome:
    """Run a merge search, render its report and write the picked merge into ``OUT/merged`` with its card.

    Args:
        pair: the loaded pair.
        sets: exactly two named evaluation sets (``{name: path, DataConfig or TokenBlocks}``), or
            data settings naming them (``DataConfig(data=["code=code.txt", "prose=prose.txt"])``; they are
            then also the shared settings).
        cfg: the search settings.
        out_dir: the search folder (``search.jsonl``, ``search.json``, report, ``merged/``).
        data: shared data settings for sets given as paths.
        batch_size: blocks per forward (default: automatic).
        resume: continue an interrupted search.
        overwrite: replace a previous search in ``out_dir``.
        sources: ``(label, folder)`` of the source models.
        write_merge: write the picked merge.
        dtype: output dtype of the merge (default: as stored).
        progress: print accepted moves on stderr.

    Returns:
        A :class:`SearchOutcome`.

    Raises:
        SearchError: bad settings or sets.
        ScanError: the output folder cannot be used.
        ScanSettingsError: ``resume`` on a folder of another search.
        NonFiniteLossError: a candidate's loss is NaN or infinite.
    """
    if isinstance(sets, DataConfig):
        data, sets = sets, parse_named_sets(sets)
    manifest = run_search(pair, sets, cfg, out_dir, data=data, batch_size=batch_size, resume=resume,
                          overwrite=overwrite, sources=sources, progress=progress)
    out = output_path(out_dir)
    shown_sets = {n: s if isinstance(s, DataConfig) else str(getattr(s, "source", s)) for n, s in sets.items()}
    command = search_command(pair.source_a, pair.source_b, shown_sets, cfg, data, out)
    report = write_report(out, manifest)
    merged = None
    if write_merge:
        target = out / MERGED
        replace = target.exists() and is_hf_llmc_folder(target)
        merged = save_merged(pair, merge_spec(manifest, manifest["result"]["chosen"]["key"]), target, dtype=dtype,
                             overwrite=replace, search=card_section(manifest, command),
                             extra_files={FRONT_PNG: report["front"].read_bytes(),
                                          HEATMAP_PNG: report["heatmap"].read_bytes()})
    return SearchOutcome(manifest, out, report, merged, command)

