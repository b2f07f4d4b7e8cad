"""Command-line start-up: wall time of commands that should not load torch or transformers.

Each case is run ``--repeat`` times as a fresh process (``python -m hf_llmc ...``), in rotated
order after one untimed warm-up run of every case; the median and range of the wall time are
printed, with whether torch / transformers were imported (``python -X importtime``). For scale,
``python -c "import torch"`` and ``python -c "import torch, transformers"`` are measured the
same way. Target: ``hf-llmc --help`` <= 0.5 s.

    python benchmarks/startup.py [--repeat 7]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def cases(tmp: Path) -> dict[str, list[str]]:
    (tmp / "busy").mkdir(exist_ok=True)
    (tmp / "busy" / "notes.txt").write_text("earlier results\n")
    py = [sys.executable]
    return {
        "hf-llmc --help": py + ["-m", "hf_llmc", "--help"],
        "hf-llmc merge --help": py + ["-m", "hf_llmc", "merge", "--help"],
        "usage error (bad --alphas)": py + ["-m", "hf_llmc", "barrier", "a", "b", "--data", "x.txt", "--alphas", "0,2"],
        "usage error (busy --out)": py + ["-m", "hf_llmc", "merge", "a", "b", "--layers", "attn.0", "--out", "busy"],
        "python -c 'import torch'": py + ["-c", "import torch"],
        "python -c 'import torch, transformers'": py + ["-c", "import torch, transformers"],
    }


def heavy_imports(argv: list[str], cwd: Path) -> str:
    proc = subprocess.run([argv[0], "-X", "importtime", *argv[1:]], cwd=cwd, capture_output=True, text=True)
    found = {line.rsplit("|", 1)[1].strip().split(".")[0] for line in proc.stderr.splitlines()
             if line.startswith("import time:")}
    return ", ".join(sorted(found & {"torch", "transformers"})) or "none"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        todo = cases(tmp)
        names = list(todo)
        for argv in todo.values():  # warm-up: every case once (page cache, .pyc files)
            subprocess.run(argv, cwd=tmp, env=env, capture_output=True)
        times: dict[str, list[float]] = {n: [] for n in names}
        for r in range(args.repeat):
            for name in names[r % len(names):] + names[: r % len(names)]:  # rotated order
                t0 = time.perf_counter()
                subprocess.run(todo[name], cwd=tmp, env=env, capture_output=True)
                times[name].append(time.perf_counter() - t0)
        print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
              f"{args.repeat} runs each, rotated, after one warm-up run\n")
        print("| command | wall (s), median | range | imports torch / transformers |")
        print("|---|---:|---|---|")
        for name in names:
            t = times[name]
            print(f"| {name} | {statistics.median(t):.3f} | {min(t):.3f}-{max(t):.3f} | {heavy_imports(todo[name], tmp)} |")


if __name__ == "__main__":
    main()
