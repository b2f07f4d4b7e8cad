"""``hf-llmc demo`` wall time, as the README runs it: build the pair, scan it, merge it, chat step.

Each run is a fresh process (``python -m hf_llmc demo --out DIR --overwrite``, so the interpreter
start and the imports count), after one untimed warm-up run; the median and range over the runs go
to ``benchmarks/results/demo_time.json``. Each run also records what the demo promises besides its
time: the largest standard error of a scanned group's barrier (≤ 0.02 nats) and the largest
barrier. Target: ≤ 60 s on 2 cores.

    python benchmarks/demo_time.py [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from harness import Harness, Method, child_env, common_arguments, results_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_arguments(parser, runs=3)
    args = parser.parse_args()
    runs, warmup = (1, 0) if args.quick else (args.runs, 1)
    bench = Harness("demo_time", "Demo wall time", quick=args.quick, note=args.note)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "demo"

        def check(record: dict) -> None:
            summary = json.loads((out / "scan" / "summary.json").read_text())
            values = [v for g in summary["groups"] for v in g["bases"].values()]
            record["max_se"] = max(v["barrier_mid_se"] for v in values)
            record["max_barrier"] = max(v["barrier_mid"] for v in values)
            record["chat_barrier"] = json.loads((out / "chat" / "barrier.json").read_text())["barrier_mid"]

        demo = Method("hf-llmc demo", [sys.executable, "-m", "hf_llmc", "demo", "--out", str(out), "--overwrite"],
                      env=child_env(), prepare=lambda: shutil.rmtree(out, ignore_errors=True), check=check,
                      cwd=tmp)
        bench.run("demo", [demo], runs=runs, warmup=warmup)
    path = results_path(args, "demo_time")
    if path is not None:
        bench.save(params={"target_s": 60}, path=path)


if __name__ == "__main__":
    main()
