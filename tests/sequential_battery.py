"""The simulation battery of the sequential rule: coverage at the stopping time and wrong decisions
on realistic per-block distributions (numpy only, seconds).

Each scenario is a population of N = 1024 token blocks (the ceiling), drawn afresh per repetition,
whose per-block differences d and endpoint gaps g are

    g = 0.6·Z (nats; the gap between two fine-tunes varies from block to block),
    d = c + β·g + e,   e = 0.03 nats × (noise of the scenario),

in two regimes: ``independent`` (β = 0.05: the layer's effect barely follows the endpoints) and
``layer`` (β = 0.5: the path point is close to endpoint A, so d ≈ g/2 + e, as measured on the
real-text pair of ``benchmarks/sequential_speed.py``). Per-block spreads of d: 0.04-0.3 nats. The
true mean is the mean of d over the N blocks (the full-budget value): c is set so that it is
exactly T + offset. Scenarios (the noise e, or a rare group of blocks):

* ``normal``, ``t3`` (Student t, 3 df), ``lognormal1`` / ``lognormal1.5`` (σ = 1, 1.5; centred,
  unit variance, right-skewed): the residual e;
* ``gap5``: 5 % of blocks have an endpoint gap 2 nats larger (d linear in g: a different text type
  that A and B treat very differently);
* ``mode5``: 5 % of blocks have d 1 nat larger, not explained by g (code blocks in a prose set that
  the layer breaks);
* ``mode20``: 20 % of blocks have d 0.3 nats larger, not explained by g.

The rule runs at its defaults (``robust``, confidence 0.95, first look after 90 blocks rounded up to
96, chunks of 8, growth 1.5, threshold T = 0.05) through :func:`hf_llmc.analyses.sequential.replay_many`,
the vectorised form of the looks every scan runs (``tests/test_sequential.py`` checks that it equals
:func:`hf_llmc.sequential_decision` block for block). A repetition's interval *covers* when it
contains the true mean; its decision is *wrong* when it is ``below`` with the mean above T,
``above`` with the mean below T, and any decision with the mean at T.

    python tests/sequential_battery.py            # the table of docs/sequential.md (2000 repetitions)
    python tests/sequential_battery.py --rule fast
    python tests/sequential_battery.py --endpoint-blocks 1024   # points that start with every endpoint block
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

import numpy as np

N = 1024
T = 0.05
SIGMA_G = 0.6
SIGMA_E = 0.03
REGIMES = {"independent": 0.05, "layer": 0.5}
SCENARIOS = ("normal", "t3", "lognormal1", "lognormal1.5", "gap5", "mode5", "mode20")
OFFSETS = (-0.1, -0.03, -0.01, 0.0, 0.01, 0.03, 0.1)
REPS = 2000


def _unit(kind: str, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Centred unit-variance noise of a scenario."""
    if kind == "t3":
        return rng.standard_t(3, size) / np.sqrt(3.0)
    if kind.startswith("lognormal"):
        s = float(kind[len("lognormal"):])
        x = rng.lognormal(0.0, s, size)
        return (x - np.exp(s * s / 2)) / np.sqrt((np.exp(s * s) - 1) * np.exp(s * s))
    return rng.standard_normal(size)


def population(kind: str, beta: float, reps: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``reps`` populations of N blocks: d with mean exactly 0 (add the true mean) and g."""
    g = SIGMA_G * rng.standard_normal((reps, N))
    noise = kind if kind in ("t3", "lognormal1", "lognormal1.5") else "normal"
    e = SIGMA_E * _unit(noise, (reps, N), rng)
    if kind == "gap5":
        g = g + 2.0 * (rng.random((reps, N)) < 0.05)
    elif kind == "mode5":
        e = e + 1.0 * (rng.random((reps, N)) < 0.05)
    elif kind == "mode20":
        e = e + 0.3 * (rng.random((reps, N)) < 0.20)
    d = beta * g + e
    return d - d.mean(axis=1, keepdims=True), g


@dataclass
class Cell:
    regime: str
    scenario: str
    offset: float
    coverage: float
    wrong: float
    decided: float
    blocks: float  # mean blocks evaluated: own blocks n + 2 x endpoint blocks m


def run_battery(reps: int = REPS, seed: int = 0, rule: str = "robust", regimes: dict[str, float] | None = None,
                scenarios: tuple[str, ...] = SCENARIOS, offsets: tuple[float, ...] = OFFSETS,
                endpoint_blocks: int = 0) -> list[Cell]:
    """Every (regime, scenario, true mean) cell, ``reps`` repetitions each, at the rule's defaults.

    ``endpoint_blocks``: endpoint blocks known before a point's first look (0: a scan's first point;
    N: a later point, after another one paid for every endpoint block)."""
    from hf_llmc.analyses.sequential import make_rule, replay_many
    from hf_llmc.config.scan import SequentialConfig

    spec = make_rule(SequentialConfig(decide=T, rule=rule), N, 8)
    cells = []
    for r, (regime, beta) in enumerate((regimes or REGIMES).items()):
        for k, kind in enumerate(scenarios):
            rng = np.random.default_rng([seed, r, k])
            d0, g = population(kind, beta, reps, rng)
            for off in offsets:
                mu = T + off
                out = replay_many(d0 + mu, g, spec, endpoint_blocks=endpoint_blocks)
                covered = (out["low"] <= mu) & (mu <= out["high"])
                dec = out["decision"]
                wrong = dec != 0 if off == 0 else dec == (-1 if off > 0 else 1)
                cells.append(Cell(regime, kind, off, float(covered.mean()), float(wrong.mean()),
                                  float((dec != 0).mean()), float((out["n"] + 2 * out["m"]).mean())))
    return cells


def table(cells: list[Cell]) -> str:
    """Markdown: one row per regime and scenario, ``coverage / wrong`` per true mean."""
    offsets = sorted({c.offset for c in cells})
    head = "| regime | scenario | " + " | ".join(f"T{o:+.2f}" if o else "T" for o in offsets) + " | blocks (mean n + 2m) |"
    lines = [head, "|" + "---|" * (len(offsets) + 3)]
    rows: dict[tuple[str, str], list[Cell]] = {}
    for c in cells:
        rows.setdefault((c.regime, c.scenario), []).append(c)
    for (regime, kind), row in rows.items():
        row.sort(key=lambda c: c.offset)
        blocks = "/".join(f"{c.blocks:.0f}" for c in row)
        lines.append(f"| {regime} | {kind} | " + " | ".join(f"{c.coverage:.3f} / {c.wrong:.3f}" for c in row)
                     + f" | {blocks} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Coverage / wrong-decision battery of the sequential rule.")
    parser.add_argument("--reps", type=int, default=REPS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rule", default="robust", choices=["robust", "fast"])
    parser.add_argument("--endpoint-blocks", type=int, default=0,
                        help="Endpoint blocks known before the first look (1024: a scan's later points).")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    cells = run_battery(args.reps, args.seed, args.rule, endpoint_blocks=args.endpoint_blocks)
    print(table(cells))
    worst_cov = min(cells, key=lambda c: c.coverage)
    worst_wrong = max(cells, key=lambda c: c.wrong)
    print(f"\nrule {args.rule}, {args.reps} repetitions per cell, {time.perf_counter() - t0:.1f} s; "
          f"lowest coverage {worst_cov.coverage:.3f} ({worst_cov.regime}, {worst_cov.scenario}, T{worst_cov.offset:+.2f}); "
          f"most wrong decisions {worst_wrong.wrong:.3f} ({worst_wrong.regime}, {worst_wrong.scenario}, "
          f"T{worst_wrong.offset:+.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
