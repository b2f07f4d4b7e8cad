"""The shared benchmark harness: every method in a fresh subprocess, rotated runs, CPU / wall /
peak-RSS figures with median and range, one JSON file per benchmark, RESULTS.md rendered from them.

How a benchmark uses it::

    bench = Harness("merge_speed", "Merge speed and memory", quick=args.quick, note=args.note)
    bench.run("cold", [Method("hf-llmc", [...argv...], prepare=evict), Method("mergekit", [...])],
              runs=3, warmup=1, page_cache="cold")
    bench.ratio("cold", "hf-llmc", "mergekit", ("wall_s", "cpu_s", "peak_rss_mb"))
    bench.save(params={...})            # -> benchmarks/results/merge_speed.json

What is measured, per run of a method (``os.wait4`` on the child):

* ``wall_s``: from spawning the child to its exit (interpreter start and imports included);
* ``cpu_s``: user + system CPU seconds of the child and of the children it waited for;
* ``peak_rss_mb``: the child's ``ru_maxrss``. Linux starts that high-water mark from the spawning
  process's, so the orchestrating process never imports torch and keeps tens of MB: every heavy
  step (building models, comparing outputs) runs in a child too. ``rss_floor_mb`` records the
  orchestrator's own high-water mark, below which no figure can go;
* whatever the child prints as one JSON object on a line starting with ``@bench`` (the work
  alone, measured inside the process: ``work_cpu_s``, losses, token counts ...), merged into the run.

Runs: ``warmup`` untimed rounds of every method first (page cache of the libraries, .pyc files),
then ``runs`` rounds, each method once per round, the order rotated by one every round. A ratio
of two methods is computed per round and reported as its median and range over the rounds.

    python benchmarks/harness.py --render     # writes benchmarks/RESULTS.md from benchmarks/results/*.json
    python benchmarks/harness.py --check      # exit 1 when RESULTS.md differs from what --render writes

Standard library only (it must stay small, see ``peak_rss_mb``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS_DIR = HERE / "results"
RESULTS_MD = HERE / "RESULTS.md"
STATIC_DIR = RESULTS_DIR / "static"
REPORT_PREFIX = "@bench "


# -- machine ------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def machine() -> dict:
    """The machine and software a result was measured on (no heavy import)."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpu": _cpu_model(), "cores": os.cpu_count(), "usable_cores": usable, "ram_gib": _ram_gib(),
        "os": platform.platform(terse=True), "python": platform.python_version(),
        "torch": _version("torch"), "transformers": _version("transformers"), "hf_llmc": _hf_llmc_version(),
        "gpu": None,
    }


def _hf_llmc_version() -> str | None:
    text = (ROOT / "hf_llmc" / "config" / "version.py")
    try:
        for line in text.read_text().splitlines():
            if line.startswith("__version__"):
                return line.split("=", 1)[1].strip().strip("\"'")
    except OSError:
        pass
    return None


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def self_peak_mb() -> float:
    """This (orchestrating) process's own peak RSS: the floor of every child's ``ru_maxrss``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- page cache ---------------------------------------------------------------------------------------
def page_cache(files: Iterable[str | os.PathLike], state: str) -> None:
    """Sync the disk, then evict ``files`` from the page cache (``cold``: ``posix_fadvise(DONTNEED)``)
    or read them once (``warm``)."""
    os.sync()
    for f in files:
        with open(f, "rb") as fh:
            if state == "warm":
                while fh.read(1 << 24):
                    pass
            elif state == "cold":
                os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            else:
                raise ValueError(state)


# -- running ------------------------------------------------------------------------------------------
@dataclass
class Method:
    """One way of doing the benchmarked work: a command run as a fresh process.

    ``prepare`` runs before every run (untimed: page-cache state, removing the last output);
    ``env`` is added to this process's environment; ``check`` sees each finished run's record."""

    name: str
    argv: Sequence[str]
    env: dict[str, str] = field(default_factory=dict)
    prepare: Callable[[], None] | None = None
    check: Callable[[dict], None] | None = None
    cwd: str | None = None
    timeout: float | None = None


class MethodFailed(RuntimeError):
    pass


def run_once(method: Method) -> dict:
    """Run ``method`` once; return wall / CPU / peak RSS and the child's own ``@bench`` report."""
    if method.prepare is not None:
        method.prepare()
    env = {**os.environ, **method.env}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        load = loadavg()
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(method.argv), stdout=out, stderr=err, env=env, cwd=method.cwd)
        deadline = None if method.timeout is None else t0 + method.timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG if deadline else 0)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise MethodFailed(f"{method.name} exited with {proc.returncode}: {' '.join(map(str, method.argv))}\n"
                           f"{stdout[-2000:]}\n{stderr[-4000:]}")
    record = {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "user_s": usage.ru_utime,
              "sys_s": usage.ru_stime, "peak_rss_mb": usage.ru_maxrss / 1024, "loadavg_start": load}
    reports = [line[len(REPORT_PREFIX):] for line in stdout.splitlines() if line.startswith(REPORT_PREFIX)]
    if reports:
        record.update(json.loads(reports[-1]))
    if method.check is not None:
        method.check(record)
    return record


def report(**values) -> None:
    """For a child process: hand measurements to the harness (one ``@bench {...}`` line)."""
    print(REPORT_PREFIX + json.dumps(values), flush=True)


def summary(values: Sequence[float]) -> dict:
    vals = [float(v) for v in values]
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def _numeric(runs: list[dict]) -> list[str]:
    keys = []
    for k, v in runs[0].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and all(isinstance(r.get(k), (int, float)) for r in runs):
            keys.append(k)
    return keys


class Harness:
    """Runs methods as described in the module docstring and collects one result file."""

    def __init__(self, name: str, title: str, *, quick: bool = False, note: str | None = None,
                 command: str | None = None, verbose: bool = True) -> None:
        self.name, self.title, self.quick, self.note = name, title, quick, note
        self.command = command or "python " + shlex.join([_rel(sys.argv[0])] + sys.argv[1:])
        self.verbose = verbose
        self.started = now()
        self.t0 = time.perf_counter()
        self.load_before = loadavg()
        self.conditions: dict[str, dict] = {}
        self.checks: dict[str, object] = {}
        self.extra: dict[str, object] = {}

    def log(self, *args) -> None:
        if self.verbose:
            print(*args, flush=True)

    def run(self, condition: str, methods: Sequence[Method], *, runs: int = 3, warmup: int = 0,
            page_cache: str | None = None, description: str = "") -> dict:
        """``warmup`` untimed rounds, then ``runs`` rounds in rotated order; returns the condition's record."""
        names = [m.name for m in methods]
        if self_peak_mb() > 200:
            print(f"warning: this process has held {self_peak_mb():.0f} MB; the children's peak RSS figures cannot "
                  "be lower (drive the harness from a small process)", file=sys.stderr)
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate method names: {names}")
        for w in range(warmup):
            for m in methods:
                self.log(f"[{condition}] warm-up {w + 1}/{warmup}: {m.name}")
                run_once(m)
        records: dict[str, list[dict]] = {n: [] for n in names}
        orders = []
        for i in range(runs):
            k = i % len(methods)
            order = list(methods[k:]) + list(methods[:k])
            orders.append([m.name for m in order])
            for m in order:
                rec = run_once(m)
                rec["round"] = i
                records[m.name].append(rec)
                self.log(f"[{condition}] run {i + 1}/{runs}: {m.name}: wall {rec['wall_s']:.2f} s, "
                         f"CPU {rec['cpu_s']:.2f} s, peak RSS {rec['peak_rss_mb']:.0f} MB"
                         + "".join(f", {k}={_short(v)}" for k, v in rec.items()
                                   if k not in ("wall_s", "cpu_s", "user_s", "sys_s", "peak_rss_mb", "round",
                                                "loadavg_start") and isinstance(v, (int, float))))
        cond = {
            "page_cache": page_cache, "description": description, "runs": runs, "warmup_rounds": warmup,
            "order": orders,
            "methods": {n: {"runs": r, "summary": {k: summary([x[k] for x in r]) for k in _numeric(r)}}
                        for n, r in records.items()},
            "ratios": {},
        }
        self.conditions[condition] = cond
        return cond

    def ratio(self, condition: str, num: str, den: str, metrics: Sequence[str], *, label: str | None = None,
              den_scale: Callable[[dict, dict], float] | None = None) -> dict:
        """Per-round ratio ``num / den`` of each metric; median and range over the rounds.

        ``den_scale(num_run, den_run)`` replaces the denominator's metric (e.g. a lower bound)."""
        cond = self.conditions[condition]
        a, b = cond["methods"][num]["runs"], cond["methods"][den]["runs"]
        out = {}
        for metric in metrics:
            values = []
            for ra, rb in zip(a, b):
                d = den_scale(ra, rb) if den_scale else rb[metric]
                values.append(ra[metric] / d)
            out[metric] = {**summary(values), "values": values}
        cond["ratios"][label or f"{num} / {den}"] = out
        return out

    def save(self, *, params: dict | None = None, path: Path | None = None, **extra) -> Path:
        self.extra.update(extra)
        data = {
            "benchmark": self.name, "title": self.title, "quick": self.quick, "note": self.note,
            "command": self.command, "started": self.started, "finished": now(),
            "duration_s": round(time.perf_counter() - self.t0, 1),
            "load": {"before": self.load_before, "after": loadavg()},
            "rss_floor_mb": round(self_peak_mb(), 1),
            "machine": machine(), "params": params or {}, "conditions": self.conditions, "checks": self.checks,
            **self.extra,
        }
        path = path or RESULTS_DIR / f"{self.name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1, default=_jsonable) + "\n")
        self.log(f"wrote {_rel(path)}")
        return path


def _jsonable(x):
    if isinstance(x, Path):
        return str(x)
    raise TypeError(type(x))


def _short(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _rel(p) -> str:
    try:
        return str(Path(p).resolve().relative_to(ROOT))
    except ValueError:
        return str(p)


def child_env(**more: str) -> dict[str, str]:
    """The environment every benchmark child gets: offline, this checkout first on the path."""
    path = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": str(ROOT) + (os.pathsep + path if path else ""), "HF_HUB_OFFLINE": "1",
            "HF_HUB_DISABLE_XET": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", **more}


def run_child(argv: Sequence[str], env: dict | None = None) -> dict:
    """Run a helper step (building models, comparing outputs) in a child; return its ``@bench`` report."""
    return run_once(Method("helper", argv, env={**child_env(), **(env or {})}))


def common_arguments(parser: argparse.ArgumentParser, runs: int = 3) -> None:
    """The options every benchmark takes."""
    parser.add_argument("--runs", type=int, default=runs, help=f"Timed runs of every method (default {runs}), rotated.")
    parser.add_argument("--quick", action="store_true", help="Tiny sizes: validates the benchmark in seconds; marked quick in the result.")
    parser.add_argument("--note", help="A note stored with the result (e.g. 'loaded machine').")
    parser.add_argument("--results", help="Result file (default: benchmarks/results/NAME.json; '-' writes none).")


def results_path(args, name: str) -> Path | None:
    if args.results == "-":
        return None
    return Path(args.results) if args.results else RESULTS_DIR / f"{name}.json"


# =====================================================================================================
# RESULTS.md
# =====================================================================================================
def fmt(x, digits: int = 2) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if x != 0 and abs(x) < 10 ** -digits:
            return f"{x:.1e}"
        return f"{x:,.{digits}f}"
    return str(x)


def stat(s: dict | None, digits: int = 2, bold: bool = False) -> str:
    """``median (min–max)`` of a summary."""
    if not s:
        return "n/a"
    med = fmt(s["median"], digits)
    med = f"**{med}**" if bold else med
    if s.get("n", 1) > 1 and fmt(s["min"], digits) != fmt(s["max"], digits):
        return f"{med} ({fmt(s['min'], digits)}–{fmt(s['max'], digits)})"
    return med


def _machine_line(r: dict) -> str:
    m = r["machine"]
    load = r.get("load", {})
    parts = [f"{m['cpu']}, {m['cores']} cores, {fmt(m['ram_gib'], 0)} GiB RAM" if m.get("ram_gib") else m["cpu"],
             f"Python {m['python']}", f"torch {m['torch']}", f"transformers {m['transformers']}"]
    if m.get("gpu"):
        parts.insert(0, m["gpu"])
    text = "; ".join(parts)
    b, a = load.get("before") or [], load.get("after") or []
    if b:
        text += f"; load average {b[0]:.1f} before, {a[0]:.1f} after" if a else f"; load average {b[0]:.1f}"
    return text


def provenance(r: dict) -> str:
    """Where and how a result was measured, with the quick / loaded flags spelled out."""
    lines = [f"Command: `{r['command']}` ({r['started']}, {fmt(r['duration_s'] / 60, 1)} min).",
             f"Machine: {_machine_line(r)}."]
    flags = []
    if r.get("quick"):
        flags.append("**quick run** (reduced sizes or runs, to validate the benchmark; not the reference figures)")
    if r.get("note"):
        flags.append(f"note: {r['note']}")
    if flags:
        lines.append("Status: " + "; ".join(flags) + ".")
    return "\n".join(lines)


def _runs_line(cond: dict) -> str:
    w = cond.get("warmup_rounds", 0)
    return (f"{cond['runs']} run(s) of every method in rotated order"
            + (f" after {w} untimed warm-up round(s) of every method" if w else "")
            + "; each figure is the median (range) over the runs.")


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(sep) + "|"]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(out)


def _targets(r: dict) -> str:
    """How a targets line starts: quick runs say that their sizes are not the ones targets are set for."""
    if r.get("quick"):
        return "Targets (set for the full sizes and runs; this quick run only validates the benchmark): "
    return "Targets: "


def _verdict(value: float | None, target: float, kind: str) -> str:
    if value is None:
        return "n/a"
    ok = value <= target if kind == "max" else value >= target
    sign = "≤" if kind == "max" else "≥"
    if ok:
        return f"met ({sign} {target:g})"
    miss = value / target if kind == "max" else target / value
    return f"**missed** ({sign} {target:g}; off by {100 * (miss - 1):.0f} %)"


# -- merge -------------------------------------------------------------------------------------------
def render_merge(r: dict) -> str:
    p = r["params"]
    out = [f"## {r['title']} (`benchmarks/merge_speed.py`)", ""]
    out.append(
        f"Pair: GPT-2 architecture, {p['sizes']['n_layer']} blocks, hidden {p['sizes']['n_embd']}, vocabulary "
        f"{p['sizes']['vocab_size']}: {fmt(p['params_m'], 1)} M parameters, {fmt(p['checkpoint_gb'], 2)} GB float32 "
        f"each, built locally (A random, B = A + noise). Merge `{p['layers']}` at α = {p['alpha']:g}, every other "
        "tensor from A. Methods (each run is a fresh process; wall time includes the interpreter start and the imports):")
    out.append("")
    desc = {
        "hf-llmc-first": "`python -m hf_llmc merge A B --layers ... --alpha ... --out DIR` with an empty "
                         "`HF_LLMC_CACHE` for every run (a first merge)",
        "hf-llmc": "the same command with `HF_LLMC_CACHE` kept from an untimed merge before the runs (the cached merge)",
        "mergekit": f"`mergekit-yaml config.yml DIR` (mergekit {p.get('mergekit_version') or 'n/a'}, in its own "
                    "venv with the same torch): the linear method with the equivalent `slices`/`parameters` "
                    "config below (A and B read for the blocks of the merged layers, A alone for the other blocks)",
        "straightforward": "`AutoModelForCausalLM.from_pretrained` A and B, average the selected parameters, "
                           "`save_pretrained`",
    }
    methods = list(next(iter(r["conditions"].values()))["methods"])
    for m in methods:
        out.append(f"* **{m}**: {desc.get(m, m)}.")
    out.append("")
    if p.get("architecture_cache_written") is False:
        out.append("For this family the untimed merge left `HF_LLMC_CACHE` empty: the architecture comes from "
                   "hf-llmc's table of known families, so a first and a cached merge do the same work (their "
                   "difference below is run-to-run noise).")
        out.append("")
    first = next(iter(r["conditions"].values()))
    out.append(f"{_runs_line(first)} `cold`: both checkpoints evicted from the page cache "
               "(`posix_fadvise(DONTNEED)` after `sync`) before every run; `warm`: read once before every run. "
               "The outputs of the previous run are removed and synced to disk before each run (untimed). "
               "CPU = user + system seconds of the process; peak RSS = its `ru_maxrss`.")
    out += ["", provenance(r), ""]
    rows = []
    for cname, cond in r["conditions"].items():
        for m, rec in cond["methods"].items():
            s = rec["summary"]
            rows.append([cname, m, stat(s["wall_s"]), stat(s["cpu_s"]), stat(s["peak_rss_mb"], 0)])
    out.append(_table(["page cache", "method", "wall (s)", "CPU (s)", "peak RSS (MB)"], rows, "llrrr"))
    out.append("")
    checks = r.get("checks", {})
    eq = checks.get("outputs_equal", {})
    if eq:
        out.append("Outputs compared tensor by tensor with the first method's: " + "; ".join(
            f"{k}: {'equal' if v['equal'] else 'DIFFERENT'} ({v['tensors']} tensors, max abs diff {v['max_abs_diff']:g})"
            for k, v in eq.items()) + ".")
        out.append("")
    ref = "mergekit" if "mergekit" in methods else "straightforward"
    rows = []
    for cname, cond in r["conditions"].items():
        for label, ratio in cond["ratios"].items():
            rows.append([cname, label, stat(ratio["wall_s"], 2, True), stat(ratio["cpu_s"], 2),
                         stat(ratio["peak_rss_mb"], 2, True)])
    out.append("Ratios, per run (round) then median (range):")
    out.append("")
    out.append(_table(["page cache", "ratio", "wall time", "CPU time", "peak RSS"], rows, "llrrr"))
    out.append("")
    if ref == "mergekit":
        worst_wall = max(c["ratios"][f"{m} / mergekit"]["wall_s"]["median"] for c in r["conditions"].values()
                         for m in ("hf-llmc", "hf-llmc-first") if f"{m} / mergekit" in c["ratios"])
        worst_rss = max(c["ratios"][f"{m} / mergekit"]["peak_rss_mb"]["median"] for c in r["conditions"].values()
                        for m in ("hf-llmc", "hf-llmc-first") if f"{m} / mergekit" in c["ratios"])
        worst_run = max(c["ratios"][f"{m} / mergekit"][k]["max"] for c in r["conditions"].values()
                        for m in ("hf-llmc", "hf-llmc-first") if f"{m} / mergekit" in c["ratios"]
                        for k in ("wall_s",))
        out.append(f"{_targets(r)}against mergekit, first merge included (worst median over the page-cache states): "
                   f"wall time {fmt(worst_wall)}x: {_verdict(worst_wall, 0.5, 'max')} (worst single run "
                   f"{fmt(worst_run)}x); peak RSS {fmt(worst_rss)}x: {_verdict(worst_rss, 0.3, 'max')}.")
        out.append("")
    else:
        out.append("mergekit was not part of this run (`--mergekit` adds it).")
        out.append("")
    prof = checks.get("import_profile_first_merge")
    if prof:
        pk = prof.get("by_package_s", {})
        out.append(f"Where a first merge's time goes (one run under `python -X importtime`, {fmt(prof.get('wall_s'), 1)} s "
                   f"wall): imports {fmt(prof['imports_s'], 2)} s, of which torch {fmt(pk.get('torch'), 2)} s; "
                   f"transformers imported: {fmt(prof['imports_transformers'])}. The rest is reading, mixing and "
                   "writing the tensors.")
        out.append("")
    if p.get("mergekit_config"):
        out += ["The mergekit configuration (paths shortened):", "", "```yaml", p["mergekit_config"].rstrip(), "```", ""]
    return "\n".join(out)


# -- scan --------------------------------------------------------------------------------------------
def render_scan(r: dict) -> str:
    p = r["params"]
    s = p["sizes"]
    out = [f"## {r['title']} (`benchmarks/scan_speed.py`)", ""]
    out.append(
        f"Pair: Llama-shaped, {s['num_layers']} blocks, hidden {s['hidden_size']}, vocabulary {s['vocab_size']}, built "
        f"locally (A random, B = A + noise); {s['blocks']} blocks × {s['seq_len']} tokens, {s['batch_size']} blocks "
        f"per forward, {p['threads']} torch thread(s). Each scan at α = 0.5 into both bases (endpoints, the "
        "full-model row once, every group into A and into B). Methods, each in a fresh process that loads the "
        "pair, then runs one untimed warm-up forward, then the timed scan:")
    out += ["",
            "* **paper**: per point `copy.deepcopy` of the base state dict, the group interpolated, `load_state_dict`, "
            "a full forward;",
            "* **plain**: the best plain way: one model, the group's tensors set in place and restored after the "
            "point, a full forward per point (no prefix reuse);",
            "* **hf-llmc**: `ScanRunner(...).run()` (in-place points, prefixes of the base recorded by the endpoint "
            "runs, each point evaluated from its group's first block).",
            "",
            "Times are the CPU seconds of the timed scan inside the process (`time.process_time`, 1 thread: other "
            "jobs do not inflate them). Lower bound: the scan's minimal forward work, counted in block forwards (a "
            "point whose group starts at block k costs L − k block forwards + the head, in FLOPs; endpoints are full "
            "forwards; the full row counts once) times the CPU time of one full forward (the median of the plain "
            "method's per-point forwards in the same round). Ceiling = the plain method's forward work / that "
            "lower bound: the largest speed-up prefix reuse can give.",
            ""]
    out.append(_runs_line(next(iter(r["conditions"].values()))))
    out += ["", provenance(r), ""]
    rows = []
    for cname, cond in r["conditions"].items():
        ms = cond["methods"]
        h = ms["hf-llmc"]["runs"][0]
        rat = cond["ratios"]
        rows.append([
            cname, str(h["points"]), fmt(h["full_forward_equivalents"], 2),
            *(stat(ms[m]["summary"]["work_cpu_s"], 1) if m in ms else "n/a" for m in ("paper", "plain", "hf-llmc")),
            stat(rat.get("paper / hf-llmc", {}).get("work_cpu_s"), 2, True),
            stat(rat.get("plain / hf-llmc", {}).get("work_cpu_s"), 2, True),
            fmt(h["points"] / h["full_forward_equivalents"], 2),
            stat(rat.get("hf-llmc / lower bound", {}).get("work_cpu_s"), 2, True),
        ])
    out.append(_table(["scan", "points", "lower bound (full fwd)", "paper CPU s", "plain CPU s", "hf-llmc CPU s",
                       "paper / hf-llmc", "plain / hf-llmc", "ceiling", "hf-llmc / lower bound"], rows))
    out.append("")
    rows = []
    for cname, cond in r["conditions"].items():
        ms = cond["methods"]
        rows.append([cname] + [stat(ms[m]["summary"].get("work_wall_s"), 1) if m in ms else "n/a"
                               for m in ("paper", "plain", "hf-llmc")]
                    + [stat(cond["ratios"].get("plain / hf-llmc", {}).get("work_wall_s"), 2),
                       stat(ms["plain"]["summary"].get("t_full_forward_s"), 3) if "plain" in ms else "n/a",
                       fmt(r.get("checks", {}).get(f"max_rel_loss_diff_{cname}"), 1)])
    out.append("Wall-clock seconds of the same scans, one full forward (plain, CPU s) and the largest relative "
               "loss difference between the methods:")
    out.append("")
    out.append(_table(["scan", "paper wall s", "plain wall s", "hf-llmc wall s", "plain / hf-llmc (wall)",
                       "one full forward (CPU s)", "max rel. loss diff"], rows))
    out.append("")
    verdicts = []
    for cname, cond in r["conditions"].items():
        sp = cond["ratios"].get("plain / hf-llmc", {}).get("work_cpu_s", {}).get("median")
        lb = cond["ratios"].get("hf-llmc / lower bound", {}).get("work_cpu_s", {}).get("median")
        verdicts.append(f"{cname}: speed-up over plain {fmt(sp)}x, {_verdict(sp, 1.4, 'min')}; "
                        f"hf-llmc / lower bound {fmt(lb)}, {_verdict(lb, 1.15, 'max')}")
    out.append(_targets(r) + "; ".join(verdicts) + ".")
    out.append("")
    return "\n".join(out)


# -- barrier memory ----------------------------------------------------------------------------------
def render_barrier_memory(r: dict) -> str:
    p = r["params"]
    out = [f"## {r['title']} (`benchmarks/barrier_memory.py`)", ""]
    out.append(
        f"GPT-2 architecture, {p['num_layers']} blocks, hidden {p['hidden_size']}, vocabulary {p['vocab_size']}: "
        f"{fmt(p['params_m'], 1)} M parameters, {fmt(p['model_mib'], 0)} MiB float32, two random initialisations "
        f"saved with `save_pretrained`. Full-model barrier at α = 0, 0.5, 1 on {p['blocks']} blocks of "
        f"{p['seq_len']} tokens, one block per forward, with")
    out += ["",
            "* **hf-llmc**: `ModelPair.from_pretrained(A, B).barrier(...)`: one live model; B's tensors streamed "
            "from its safetensors file into the live parameters in place, restored from A's file the same way;",
            "* **two-model**: the plain approach: A loaded as the live model and B's state dict "
            "(`safetensors.torch.load_file`); A evaluated, then the midpoint written into the live parameters in "
            "place, then B copied in;",
            "* **paper**: `from_pretrained` A, B and a third model for the midpoint, built with `load_state_dict` "
            "from a fourth (interpolated) state dict; all three evaluated.",
            "",
            "Each method runs in a fresh process; the figure is (peak RSS (`VmHWM`) − RSS after the imports and the "
            "token setup) / the float32 size of one model; the methods use 2 torch threads.",
            "", _runs_line(next(iter(r["conditions"].values()))), "", provenance(r), ""]
    rows = []
    for cname, cond in r["conditions"].items():
        for m, rec in cond["methods"].items():
            s = rec["summary"]
            rows.append([cname, m, stat(s["peak_mib"], 0), stat(s["over_baseline_mib"], 0),
                         stat(s["ratio_to_model"], 2, True), fmt(s["loss_mid"]["median"], 4)])
    out.append(_table(["malloc", "method", "peak RSS MiB", "over baseline MiB", "× one model", "midpoint loss"], rows,
                      "llrrrr"))
    out.append("")
    if len(r["conditions"]) > 1:
        out.append("`fixed mmap threshold`: the same runs with `MALLOC_MMAP_THRESHOLD_=1048576`. glibc otherwise "
                   "raises its mmap threshold after large frees (buffers of a few MiB: streamed chunks, logits), "
                   "after which such buffers come from the heap and may stay resident; which of them do varies "
                   "from run to run, hence the range of the default row.")
        out.append("")
    conds = list(r["conditions"].items())
    cname, cond = conds[0]
    h = cond["methods"]["hf-llmc"]["summary"]["ratio_to_model"]
    rat = cond["ratios"]
    within = sum(x["ratio_to_model"] <= 1.5 for x in cond["methods"]["hf-llmc"]["runs"])
    line = f"{_targets(r)}hf-llmc ≤ 1.5x one model ({cname}): {stat(h, 2)}x, {_verdict(h['median'], 1.5, 'max')}"
    line += f"; {within} of {h['n']} runs within it." if h.get("n", 1) > 1 else "."
    for other_name, other in conds[1:]:
        ho = other["methods"]["hf-llmc"]["summary"]["ratio_to_model"]
        line += f" With a {other_name}: {stat(ho, 2)}x, {_verdict(ho['median'], 1.5, 'max')}."
    for label in ("hf-llmc / two-model", "hf-llmc / paper"):
        if label in rat:
            line += f" {label} (memory over the baseline, {cname}): {stat(rat[label]['over_baseline_mib'], 2, True)}."
    model = r["params"]["model_mib"]
    over = cond["methods"]["hf-llmc"]["summary"]["over_baseline_mib"]["min"]
    out += [line, "",
            f"Of hf-llmc's smallest {fmt(over, 0)} MiB over the baseline, {fmt(model, 0)} MiB are the live weights; "
            "the rest is the activations and logits of one block and the streaming buffers.", ""]
    return "\n".join(out)


# -- sequential --------------------------------------------------------------------------------------
def render_sequential(r: dict) -> str:
    p = r["params"]
    out = [f"## {r['title']} (`benchmarks/sequential_speed.py`)", ""]
    s = p["sizes"]
    out.append(
        f"Pair: Llama-shaped, {s['num_layers']} blocks, hidden {s['hidden_size']}, vocabulary {s['vocab_size']}, "
        "built locally with `hf_llmc.testing.build_pair` (one shared initialisation, brief pre-training on mixed "
        "synthetic text, then fine-tuning on two different synthetic domains). Evaluation: fresh mixed-domain text, "
        f"{fmt(p['blocks'])} blocks × {p['seq_len']} tokens. Both scans are single-block scans into A at α = 0.5: "
        f"`ScanConfig()` (full budget) and `ScanConfig(sequential=SequentialConfig(decide={p['threshold']:g}))` "
        f"(= `--decide {p['threshold']:g}`), {p['threads']} torch thread(s). Every run is a fresh process that "
        "builds the pair, runs one untimed warm-up forward, then both scans over the same blocks (the order "
        "alternating between runs). \"Tokens evaluated\" counts every block fed to a forward, endpoints included.")
    out += ["", _runs_line(next(iter(r["conditions"].values()))), "", provenance(r), ""]
    cond = next(iter(r["conditions"].values()))
    sm = cond["methods"]["both scans"]["summary"]
    rows = [
        ["tokens evaluated", stat(sm["tokens_full"], 0), stat(sm["tokens_sequential"], 0), stat(sm["token_ratio"], 2, True)],
        ["CPU time (s)", stat(sm["cpu_full_s"], 1), stat(sm["cpu_sequential_s"], 1), stat(sm["cpu_ratio"], 2, True)],
        ["wall time (s)", stat(sm["wall_full_s"], 1), stat(sm["wall_sequential_s"], 1), stat(sm["wall_ratio"], 2)],
    ]
    out.append(_table(["", "full budget", f"`--decide {p['threshold']:g}`", "ratio"], rows))
    out.append("")
    last = r.get("last_run", {})
    if last:
        out.append(f"Decisions (every run): the full-budget interval excludes T for {stat(sm['decided_full'], 0)} of "
                   f"{last['points']} points; the sequential run agrees on {stat(sm['agree'], 0)}, is undecided on "
                   f"{stat(sm['undecided_sequential'], 0)} and disagrees on {stat(sm['disagree'], 0)}.")
        out.append("")
    if last.get("groups"):
        gaps = [abs(g["full_barrier"] - p["threshold"]) for g in last["groups"]]
        out.append(f"How hard the decisions are: the full-budget barriers lie {fmt(min(gaps), 3)}–{fmt(max(gaps), 3)} "
                   f"nats from T (median {fmt(statistics.median(gaps), 3)}); the closer a point is to T, the more "
                   "blocks the sequential run needs before its interval excludes T, so the token ratio depends on "
                   "the pair.")
        out.append("")
    tr, cr = sm["token_ratio"]["median"], sm["cpu_ratio"]["median"]
    out.append(f"{_targets(r)}≥ 5x fewer tokens: {fmt(tr)}x, {_verdict(tr, 5, 'min')}; ≥ 3x less time (CPU): "
               f"{fmt(cr)}x, {_verdict(cr, 3, 'min')}; no disagreement: "
               f"{'met' if sm['disagree']['max'] == 0 else '**missed**'}.")
    out.append("")
    return "\n".join(out)


def render_search(r: dict) -> str:
    p, last = r["params"], r.get("last_run", {})
    out = [f"## {r['title']} (`benchmarks/search.py`)", ""]
    sets = last.get("sets", {})
    shown = ", ".join(f"`{n}` ({v['search_blocks']} searched + {v['holdout_blocks']} held-out blocks)" for n, v in sets.items())
    out.append(
        "Pair: the 12-block `stdlib` pair of `sequential_speed.py` (Llama-shaped, hidden 64, vocabulary 512; A fine-tuned "
        "on the interpreter's documentation prose, B on its standard-library source). Sets from files no training used: "
        f"{shown}, {p['seq_len']} tokens per block. Both searches: α grid {p['alphas']}, directions {p['directions']}, "
        f"{p['max_sweeps']} sweep(s), {p['threads']} torch thread(s); `sequential` is `hf-llmc search` as shipped, "
        "`full budget` the same coordinate search with `--full-budget` (every comparison and the front on every search "
        "block). Each run is a fresh process that runs both searches over the same blocks (the order alternating between "
        "runs). Tokens: comparisons + front (the held-out check, the same for both, apart).")
    cond = next(iter(r["conditions"].values()))
    out += ["", _runs_line(cond), "", provenance(r), ""]
    sm = cond["methods"]["both searches"]["summary"]
    rows = [
        ["tokens evaluated", stat(sm["tokens_full"], 0), stat(sm["tokens_sequential"], 0), stat(sm["token_ratio"], 2, True)],
        ["CPU time (s)", stat(sm["cpu_full_s"], 1), stat(sm["cpu_sequential_s"], 1), stat(sm["cpu_ratio"], 2, True)],
        ["wall time (s)", stat(sm["wall_full_s"], 1), stat(sm["wall_sequential_s"], 1), stat(sm["wall_ratio"], 2)],
    ]
    out += [_table(["", "full budget", "sequential", "ratio"], rows), ""]
    if last:
        fm = last["front_match"]
        out.append(f"Fronts (last run): sequential {fm['sizes']['sequential']} points, {fm['sequential_in_full']} of them "
                   f"within the 95 % paired held-out intervals of a full-budget front point (or the same α map); full "
                   f"budget {fm['sizes']['full']} points, {fm['full_in_sequential']} within those of a sequential one; "
                   f"the same balanced pick: {'yes' if last['picks_same'] else 'no'}.")
        out.append("")
        ends, ch, d = last["endpoints"], last["chosen"], last["chosen_minus_uniform"]
        names = list(sets)
        body = [[label] + [fmt(ends[k][n], 4) for n in names]
                for k, label in (("a", "A"), ("b", "B"), ("uniform", "uniform average"))]
        body.append(["balanced point (sequential search)"] + [fmt(ch[n]["loss"], 4) for n in names])
        out += [_table(["held-out loss (nats)"] + names, body), ""]
        amap = ", ".join(f"{g} {a:g}" for g, a in ch["alphas"].items())
        out.append(f"α map of the balanced point (0 = A, 1 = B): {amap}.")
        out.append("")
        versus = "; ".join(f"`{n}` {ch[n]['vs_uniform']['mean']:+.4f} [{ch[n]['vs_uniform']['interval'][0]:+.4f}, "
                           f"{ch[n]['vs_uniform']['interval'][1]:+.4f}]" for n in names)
        out.append(f"Balanced point − uniform average on held-out blocks, per set (paired, 95 %): {versus}. Worst-case "
                   f"loss increase (over the better endpoint per set): balanced {ch['worst_increase']:+.4f}, uniform "
                   f"{last['uniform_worst_increase']:+.4f}; difference {d['mean']:+.4f} [{d['interval'][0]:+.4f}, "
                   f"{d['interval'][1]:+.4f}] (conservative interval, docs/search.md).")
        out.append("")
    tr = sm["token_ratio"]["median"]
    beats = sm["beats_uniform"]["min"] == 1
    out.append(f"{_targets(r)}≥ 10x fewer tokens than the full-budget search: {fmt(tr)}x, {_verdict(tr, 10, 'min')}; "
               f"balanced point better than the uniform average by more than the interval: {'met' if beats else '**missed**'}.")
    out.append("")
    return "\n".join(out)


# -- demo ------------------------------------------------------------------------------------------------
def render_demo(r: dict) -> str:
    cond = next(iter(r["conditions"].values()))
    s = cond["methods"]["hf-llmc demo"]["summary"]
    target = r["params"]["target_s"]
    out = [f"## {r['title']} (`benchmarks/demo_time.py`)", "",
           "`python -m hf_llmc demo --out DIR --overwrite` as a fresh process (interpreter start and imports "
           "included; the output folder removed before each run): the pair built and trained, the sublayer scan "
           "into both bases with its report, the automatic merge with its card, the chat pair and its barrier.",
           "", _runs_line(cond), "", provenance(r), "",
           _table(["", "wall (s)", "CPU (s)", "largest barrier SE (nats)", "largest barrier (nats)", "chat barrier (nats)"],
                  [["hf-llmc demo", stat(s["wall_s"], 1, True), stat(s["cpu_s"], 1), stat(s["max_se"], 4),
                    stat(s["max_barrier"], 3), stat(s["chat_barrier"], 3)]]),
           "",
           f"{_targets(r)}≤ {target:g} s: {fmt(s['wall_s']['median'], 1)} s, {_verdict(s['wall_s']['median'], target, 'max')} "
           f"(slowest run {fmt(s['wall_s']['max'], 1)} s); every group's standard error ≤ 0.02 nats: "
           f"{'met' if s['max_se']['max'] <= 0.02 else '**missed**'}.", ""]
    return "\n".join(out)


# -- GPU ---------------------------------------------------------------------------------------------
def render_gpu(r: dict | None) -> str:
    out = ["## GPU check (`benchmarks/gpu_check.sh`)", ""]
    if r is None:
        out += ["Not yet measured on a GPU: no GPU was lent to the session. `bash benchmarks/gpu_check.sh --results "
                "benchmarks/results/gpu_check.json` on one H100/H200-class GPU (≤ 6 minutes) writes the result "
                "this section is generated from: evaluation tokens/s of hf-llmc against a plain transformers forward "
                "at the same batch (bf16, target ≥ 0.9x), full barrier and single-block scan wall time, the scan's "
                "speed-up over the best plain way, peak GPU memory against one model's weights, 8-bit and 4-bit "
                "loading, and two-process data parallel where more than one GPU is present. `--smoke` runs the "
                "same code on a tiny pair on CPU (part of the tests).", ""]
        return "\n".join(out)
    out += [f"Command: `{r.get('command', 'bash benchmarks/gpu_check.sh')}` ({r.get('started', '')}).",
            f"Device: {r.get('device_name')} ({r.get('device')}); torch {r.get('torch')}.", ""]
    if r.get("mode") != "full":
        out += ["Status: **smoke run** on a tiny pair (checks the code path; not GPU figures).", ""]
    out.append("\n".join(line for line in r.get("table", "").splitlines()))
    out.append("")
    return "\n".join(out)


RENDERERS = {"merge_speed": render_merge, "scan_speed": render_scan, "barrier_memory": render_barrier_memory,
             "sequential_speed": render_sequential, "search": render_search, "demo_time": render_demo}
ORDER = ["merge_speed", "scan_speed", "barrier_memory", "sequential_speed", "search", "demo_time"]


def render(results_dir: Path = RESULTS_DIR) -> str:
    """RESULTS.md from the result files (and the static sections)."""
    results = {}
    for path in sorted(results_dir.glob("*.json")):
        data = json.loads(path.read_text())
        results[data.get("benchmark", path.stem)] = data
    parts = ["# Benchmark results", "",
             "<!-- Generated by `python benchmarks/harness.py --render` from benchmarks/results/*.json; "
             "do not edit by hand (tests/test_benchmarks.py checks it). -->", "",
             "Every figure below comes from a result file in [results/](results/), written by the benchmark named "
             "in its section through the shared harness ([harness.py](harness.py)): each method runs as a fresh "
             "process, every method gets the same warm-up, the order of the methods rotates between runs, and each "
             "figure is the median (range) over the runs; ratios are computed per run, then summarised. "
             "How to rerun them: [docs/development.md](../docs/development.md#benchmarks).", ""]
    flagged = [n for n in ORDER if n in results and (results[n].get("quick") or results[n].get("note"))]
    if flagged:
        parts += ["**Status of these figures**: " + "; ".join(
            f"`{n}`: " + " and ".join(x for x in ("quick run (reduced sizes or runs)" if results[n].get("quick") else "",
                                                 "see the note in its section" if results[n].get("note") else "") if x)
            for n in flagged)
            + ". The reference figures come from rerunning the documented commands on a quiet machine.", ""]
    for name in ORDER:
        if name in results:
            parts.append(RENDERERS[name](results[name]))
        else:
            parts += [f"## {name}", "", f"No result yet: run `python benchmarks/{name}.py`.", ""]
    parts.append(render_gpu(results.get("gpu_check")))
    for static in sorted(STATIC_DIR.glob("*.md")):
        parts.append(static.read_text().rstrip() + "\n")
    return "\n".join(parts).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--render", action="store_true", help="Write benchmarks/RESULTS.md from benchmarks/results/*.json.")
    parser.add_argument("--check", action="store_true", help="Exit 1 when RESULTS.md is not what --render writes.")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if RESULTS_MD.read_text() != text:
            print("benchmarks/RESULTS.md is out of date: run python benchmarks/harness.py --render", file=sys.stderr)
            return 1
        return 0
    if args.render:
        RESULTS_MD.write_text(text)
        print(f"wrote {_rel(RESULTS_MD)}")
        return 0
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
