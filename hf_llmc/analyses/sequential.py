"""Sequential estimation: evaluate each barrier on as few token blocks as its error bar needs.

A barrier is the mean of *paired* per-block differences d_i = L_i(θ_G(α)) − ((1−α)·L_A,i + α·L_B,i)
(the same token blocks at the path point and at both endpoints). Instead of a fixed budget per
point, blocks are visited in one seeded random order shared by every point and both endpoints (so
the differences stay paired), and each point stops at the first *look* where

* its standard error is <= ``target_se``, or
* its confidence interval excludes the threshold ``decide`` (decision ``above`` / ``below``), or
* every block is used (``--max-tokens`` is the ceiling; decision ``undecided``), or no block the
  point could still add can decide it (``futile``; decision ``undecided``).

Endpoint per-block losses are computed lazily, only on the blocks some point uses, and cached for
the whole run. Prefix reuse keeps working: looks fall on fixed multiples of ``chunk_blocks``
(default: the batch size), so every point evaluates the same batches of block indices.

**Estimator.** For a layer-wise path most of the per-block variance of d_i comes from the reference
line, i.e. from g_i = L_A,i − L_B,i (A and B differ most on different texts), not from the point
itself. A point therefore uses its own n blocks plus the m >= n blocks on which the endpoints are
already known (shared by every point) through the regression (two-phase sampling) estimator

    barrier = mean_n(d) − β·(mean_n(g) − mean_m(g)),   β = cov_n(d, g) / var_n(g),
    SE² = s_r²/n + β²·s_g²/m   (s_r: residual standard deviation of d on g; s_g on the m blocks),

with Welch–Satterthwaite degrees of freedom. With m = n it is the plain paired mean with
SE = sd(d)/√n and n − 1 degrees of freedom (then the interval is exactly Student's t for Gaussian
differences); at the ceiling (n = m = all blocks) it equals the fixed-budget number. Each look
extends whichever of n (cost: one block) or m (cost: a block of A and of B) shrinks the variance
most per block evaluated.

**Interval valid under optional stopping** (``interval_method = "student-t-union-bound"``):
n and m only take values on one fixed geometric schedule s_1 < ... < s_L (s_1 = ``min_blocks``
rounded up to the chunk, then at least ``growth`` times the previous value, on chunk multiples, the
last at the ceiling; L is known before the first forward). The interval at the grid cell
(n, m) = (s_i, s_j), i <= j, is the Student-t interval estimate ± t_df(1 − α_ij/2)·SE with

    α_ij = α·u_i/L,   u_i = (L+1)/(L·i·(i+1))   (Σ_i u_i = 1),   α = 1 − confidence,

so the rates of all cells sum to at most α and the union bound gives P(some cell's interval misses
the mean) <= α: the interval at *any* data-dependent stopping cell — also one reached because other
points extended the shared endpoint blocks — covers the mean with probability >= ``confidence``.
This is exact for Gaussian differences at cells with m = n (Student's t at a fixed n) and
CLT-approximate otherwise. Most of the rate goes to small n (points decide early, and small n is
where a t interval is least robust to skewed differences), and it is uniform over m (the shared
endpoint blocks are often many because other points already paid for them). The price of the
union bound is a t quantile of about 3-3.5 instead of 1.96 at late looks (roughly 3x the blocks of
one fixed-n 95 % interval near the threshold); early decisions on clear barriers cost a handful of
blocks. A confidence sequence for bounded variables (Hoeffding or empirical Bernstein) would need a
known range of the per-block differences, which losses do not have. ``tests/test_sequential.py``
checks the coverage by simulation, also for skewed, heavy-tailed and bimodal differences and for
points sharing endpoint blocks.
"""

from __future__ import annotations

import bisect
import contextlib
import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from ..config.scan import INTERVAL_METHOD, SequentialConfig
from ..engine.evaluation import BlockStats, check_finite
from ..engine.stats import df_floor, t_quantile

INTERVAL_DESCRIPTION = (
    "Regression (two-phase sampling) estimate of the mean paired difference with the endpoint gap "
    "L_A - L_B as control variate; Student-t interval (Welch df) at each cell (n, m) = (s_i, s_j), i <= j, "
    "of a fixed geometric look grid of L levels, at level 1 - alpha*u_i/L with u_i = (L+1)/(L*i*(i+1)) and "
    "alpha = 1 - confidence; the cell rates sum to at most alpha, so by the union bound the interval at a "
    "data-dependent stopping time covers the mean with probability >= confidence (exact for Gaussian "
    "differences when m = n, CLT-approximate otherwise)."
)
DECISIONS = ("above", "below", "undecided")
STOP_REASONS = ("decided", "target_se", "ceiling", "futile", "exact", "nonfinite")


# -- looks --------------------------------------------------------------------------------------------
def look_schedule(num_blocks: int, min_blocks: int = 8, chunk: int = 8, growth: float = 1.5) -> list[int]:
    """Block counts a point (n) or the endpoints (m) may have at a look: fixed in advance (the union
    bound needs that), on chunk multiples, geometric with ratio >= ``growth``, the last at
    ``num_blocks`` (the ceiling)."""
    if num_blocks < 2:
        raise ValueError(f"sequential estimation needs at least 2 token blocks, got {num_blocks}")
    first = min(num_blocks, max(2, math.ceil(min_blocks / chunk) * chunk))
    sizes = [first]
    while sizes[-1] < num_blocks:
        n = sizes[-1]
        sizes.append(min(max(n + chunk, math.ceil(n * growth / chunk) * chunk), num_blocks))
    return sizes


def cell_alpha(i: int, j: int, confidence: float, levels: int) -> float:
    """Error rate of grid cell (i, j), 1-based, i <= j <= ``levels`` (the schedule's length):
    α·u_i/L with u_i = (L+1)/(L·i·(i+1)). Σ_i u_i = 1 and each i has at most L cells, so the rates of
    all cells sum to at most α = 1 − confidence. Most of the rate goes to small n (a point's own
    blocks: decisions come early) and it is uniform over m (the shared endpoint blocks, often many
    because other points already paid for them)."""
    if not 1 <= i <= j <= levels:
        raise ValueError(f"look cell ({i}, {j}): need 1 <= i <= j <= {levels}")
    return (1.0 - confidence) * (levels + 1) / (levels * i * (i + 1)) / levels


def block_order(num_blocks: int, seed: int) -> torch.Tensor:
    """The seeded random visiting order of the token blocks (one for the whole run)."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randperm(num_blocks, generator=gen)


@dataclass
class Look:
    """The estimate of a point after n own blocks and m endpoint blocks, at grid cell (i, j)."""

    i: int
    j: int
    n: int
    m: int
    mean: float
    se: float
    low: float
    high: float
    df: float
    beta: float = 0.0
    point_var: float = 0.0  # s_r²/n: shrinks with n
    control_var: float = 0.0  # β²·s_g²/m: shrinks with m


def estimate(d, g, i: int, j: int, confidence: float, levels: int) -> Look:
    """Estimate and interval at grid cell (i, j) of a ``levels``-long schedule from the differences
    ``d`` of the first n blocks and the endpoint gaps ``g`` = L_A − L_B of the first m >= n blocks
    (None: the plain paired mean).
    Arrays or CPU tensors; float64 arithmetic."""
    d = np.asarray(d, dtype=np.float64)
    g = None if g is None else np.asarray(g, dtype=np.float64)
    n = d.size
    m = n if g is None else g.size
    dbar = float(d.sum()) / n
    dc = d - dbar
    var_d = float(dc @ dc) / (n - 1) if n > 1 else math.inf
    gc = None
    if g is not None and n >= 4:
        gbar_n = float(g[:n].sum()) / n
        gc = g[:n] - gbar_n
        sxx = float(gc @ gc)
        gc = gc if sxx > 0.0 else None
    if gc is None:  # no control variate: the plain paired mean
        a, b, beta, mean, df, se2 = var_d / n, 0.0, 0.0, dbar, n - 1, var_d / n
    else:
        beta = float(gc @ dc) / sxx
        r = dc - beta * gc
        a = float(r @ r) / (n - 2) / n
        gbar_m = float(g.sum()) / m
        gm = g - gbar_m
        b = beta * beta * float(gm @ gm) / (m - 1) / m
        if m > n:
            mean = dbar - beta * (gbar_n - gbar_m)
            denom = a * a / (n - 2) + b * b / (m - 1)
            df = (a + b) ** 2 / denom if denom > 0 else float(n - 2)
            se2 = a + b
        else:  # m = n: the plain paired mean (exact t); a and b only say which blocks to add next
            mean, df, se2 = dbar, n - 1, var_d / n
    se = math.sqrt(se2)
    if not math.isfinite(se):
        return Look(i, j, n, m, mean, se, -math.inf, math.inf, df, beta, a, b)
    dfq = df if isinstance(df, int) else df_floor(df)  # Welch df: rounded down onto a grid
    half = t_quantile(1.0 - cell_alpha(i, j, confidence, levels) / 2.0, dfq) * se if se > 0 else 0.0
    return Look(i, j, n, m, mean, se, mean - half, mean + half, df, beta, a, b)


def decision(look: Look, threshold: float | None) -> str | None:
    """``above`` (interval > T), ``below`` (interval < T), ``undecided``; None without a threshold."""
    if threshold is None:
        return None
    if look.low > threshold:
        return "above"
    if look.high < threshold:
        return "below"
    return "undecided"


@dataclass
class Outcome:
    """Where a point stopped and why (``stop_reason``: one of :data:`STOP_REASONS`)."""

    look: Look | None
    stop_reason: str
    decision: str | None
    blocks_available: int
    looks: int = 0

    def fields(self, tokens_per_block: int) -> dict:
        """Per-point result fields (results.jsonl rows, barrier JSON)."""
        look = self.look
        finite = look is not None and math.isfinite(look.low) and math.isfinite(look.high)
        return {
            "interval": [look.low, look.high] if finite else None,
            "decision": self.decision,
            "stop_reason": self.stop_reason,
            "looks": self.looks,
            "blocks_used": look.n if look is not None else None,
            "endpoint_blocks": look.m if look is not None else None,
            "control_beta": look.beta if look is not None else None,
            "tokens_ceiling": self.blocks_available * tokens_per_block,
            "interval_method": INTERVAL_METHOD,
        }


class Stream(Protocol):
    """Per-block data of one point in visiting order (the model, or a simulation in the tests)."""

    def available(self) -> int:
        """Blocks on which both endpoints are known (shared by every point)."""

    def extend(self, m: int) -> None:
        """Make both endpoints known on the first ``m`` blocks."""

    def control(self, m: int) -> torch.Tensor:
        """g = L_A − L_B per block, first ``m`` blocks."""

    def point(self, lo: int, hi: int) -> torch.Tensor:
        """d of blocks lo..hi−1 (the endpoints are known there)."""


def _futile(look: Look, cfg: SequentialConfig, levels: int) -> bool:
    """With every endpoint block in, the control part of the variance is fixed: no further point
    block can meet the stopping rule when even a zero point variance at the next cell (the widest
    rate any later cell gets) would leave T inside — the estimate may still move by about
    2·sqrt(point variance) — and the SE stays above ``target_se``."""
    floor_se = math.sqrt(look.control_var)
    if cfg.target_se is not None and floor_se <= cfg.target_se:
        return False
    if cfg.decide is None:
        return True
    q = t_quantile(1.0 - cell_alpha(look.i + 1, levels, cfg.confidence, levels) / 2.0, df_floor(look.m - 1))
    return abs(look.mean - cfg.decide) + 2.0 * math.sqrt(look.point_var) < q * floor_se


def run_looks(stream: Stream, schedule: list[int], cfg: SequentialConfig, *, endpoint_cost: float = 2.0) -> Outcome:
    """The sequential loop of one point: look at cell (n, m) = (s_i, s_j); stop by ``cfg``'s rule;
    otherwise extend n (cost 1 per block) or m (``endpoint_cost`` per block), whichever removes more
    variance per cost. Endpoint blocks other points already paid for are used at once."""
    s, last = schedule, len(schedule) - 1

    def index(count: int) -> int:  # largest schedule index with s[idx] <= count
        return bisect.bisect_right(s, count) - 1

    def fetch(lo: int, hi: int) -> np.ndarray:
        return np.asarray(stream.point(lo, hi), dtype=np.float64)

    i, j = 0, max(0, index(stream.available()))
    stream.extend(s[j])
    parts = [fetch(0, s[0])]
    looks = 0
    while True:
        looks += 1
        j = max(j, index(stream.available()))
        d = np.concatenate(parts)
        if not np.isfinite(d).all():
            return Outcome(None, "nonfinite", None, s[-1], looks)
        look = estimate(d, stream.control(s[j]), i + 1, j + 1, cfg.confidence, last + 1)
        verdict = decision(look, cfg.decide)
        if verdict in ("above", "below"):
            return Outcome(look, "decided", verdict, s[-1], looks)
        if cfg.target_se is not None and look.se <= cfg.target_se:
            return Outcome(look, "target_se", verdict, s[-1], looks)
        if i == last:
            return Outcome(look, "ceiling", verdict, s[-1], looks)
        if j == last and _futile(look, cfg, last + 1):
            return Outcome(look, "futile", verdict, s[-1], looks)

        def drop(var: float, k: int) -> float:  # variance removed by going from s[k] to s[k+1] blocks
            return var * (1.0 - s[k] / s[k + 1])

        grow_m = j < last and drop(look.control_var, j) / (endpoint_cost * (s[j + 1] - s[j])) > (
            (drop(look.point_var, i) + (drop(look.control_var, j) if i == j else 0.0))
            / ((s[i + 1] - s[i]) + (endpoint_cost * (s[j + 1] - s[j]) if i == j else 0.0)))
        if grow_m:
            j += 1
            stream.extend(s[j])
        else:
            i += 1
            j = max(i, j)
            stream.extend(s[j])
            parts.append(fetch(s[i - 1], s[i]))


def _cat(parts: list[BlockStats]) -> BlockStats:
    return BlockStats(indices=torch.cat([p.indices for p in parts]), loss_sum=torch.cat([p.loss_sum for p in parts]),
                      correct=torch.cat([p.correct for p in parts]), tokens_per_block=parts[0].tokens_per_block)


# -- evaluation ---------------------------------------------------------------------------------------
class SequentialEstimator:
    """Per-point sequential loops on the live model, with lazily computed, shared endpoint blocks.

    ``order`` is the seeded block order and ``schedule`` the look grid. The endpoint caches hold the
    per-block sums of A and B on ``order[:m]``, extended (ending on the point's base) only when a
    point asks for more. ``blocks_evaluated`` counts every block fed to a forward (endpoints too).
    """

    def __init__(self, pair, ev, num_blocks: int, cfg: SequentialConfig, *, record: bool = False):
        cfg.validate()
        self.pair, self.ev, self.cfg = pair, ev, cfg
        self.order = block_order(num_blocks, cfg.block_seed)
        self.chunk = cfg.chunk_blocks or ev.batch_size
        self.schedule = look_schedule(num_blocks, cfg.min_blocks, self.chunk, cfg.growth)
        self.record = record
        self._ends: dict[str, list[BlockStats]] = {"a": [], "b": []}
        self.blocks_evaluated = 0

    def have(self, which: str | None = None) -> int:
        """Blocks on which endpoint ``which`` (None: both) is known."""
        if which is None:
            return min(self.have("a"), self.have("b"))
        return sum(p.indices.numel() for p in self._ends[which])

    def endpoint(self, which: str, n: int) -> BlockStats:
        """Stats of the full model ``which`` on ``order[:n]`` (computed now if missing)."""
        self._extend(which, n)
        stats = _cat(self._ends[which])
        if stats.indices.numel() == n:
            return stats
        return BlockStats(stats.indices[:n], stats.loss_sum[:n], stats.correct[:n], stats.tokens_per_block)

    def _extend(self, which: str, n: int) -> None:
        have = self.have(which)
        if have >= n:
            return
        self.pair.interp.set_base(which)
        stats = self.ev.run(self.order[have:n], state=which, record=self.record)
        self._ends[which].append(check_finite(stats, f"model {which.upper()}"))
        self.blocks_evaluated += n - have

    def seed(self, which: str, stats: BlockStats) -> None:
        """Reuse endpoint blocks computed earlier (a resumed scan) if they follow this block order."""
        k = stats.indices.numel()
        if k > self.have(which) and torch.equal(stats.indices, self.order[:k]):
            self._ends[which] = [stats]

    def ensure(self, n: int, last: str) -> None:
        """Both endpoints on ``order[:n]``; the live model ends on ``last``."""
        for which in ("b", "a") if last == "a" else ("a", "b"):
            self._extend(which, n)

    def block_losses(self, which: str, lo: int, hi: int) -> torch.Tensor:
        return _cat(self._ends[which]).block_loss[lo:hi]

    def evaluate(self, group, alpha: float, base: str = "a", method: str = "lerp",
                 prefix: bool = True) -> tuple[BlockStats, Outcome]:
        """Run the point (group at α into ``base``) look by look; its stats on the blocks it used and
        the outcome. The path point stays set between looks unless endpoint blocks must be added."""
        est = self
        parts: list[BlockStats] = []

        class PointStream:
            def __init__(self):
                self.stack = contextlib.ExitStack()
                self.at_point = False  # the path point is set in the live model

            def available(self) -> int:
                return est.have()

            def extend(self, m: int) -> None:
                if est.have() < m:
                    self.stack.close()  # back to the base: the endpoints run on the plain models
                    self.at_point = False
                    est.ensure(m, base)

            def control(self, m: int) -> torch.Tensor:
                return est.block_losses("a", 0, m) - est.block_losses("b", 0, m)

            def point(self, lo: int, hi: int) -> torch.Tensor:
                if not self.at_point:
                    est.pair.interp.set_base(base)
                    self.stack.enter_context(est.pair.interp.at([group], alpha, method))
                    self.at_point = True
                start = group.first_block if prefix and group.first_block else None
                stats = est.ev.run(est.order[lo:hi], start_block=start, state=base)
                est.blocks_evaluated += hi - lo
                parts.append(stats)
                ref = (1.0 - alpha) * est.block_losses("a", lo, hi) + alpha * est.block_losses("b", lo, hi)
                return stats.block_loss - ref

        stream = PointStream()
        try:
            outcome = run_looks(stream, self.schedule, self.cfg)
        finally:
            stream.stack.close()
        return _cat(parts), outcome

    def evaluate_fixed(self, group, alpha: float, n: int, base: str = "a", method: str = "lerp",
                       prefix: bool = True) -> BlockStats:
        """The point on ``order[:n]`` (no stopping rule): the other α of a sequential barrier."""
        self.ensure(n, base)
        start = group.first_block if prefix and group.first_block else None
        with self.pair.interp.at([group], alpha, method, base=base):
            stats = self.ev.run(self.order[:n], start_block=start, state=base)
        self.blocks_evaluated += n
        return stats

    def differences(self, stats: BlockStats, alpha: float) -> torch.Tensor:
        n = stats.indices.numel()
        return stats.block_loss - ((1.0 - alpha) * self.block_losses("a", 0, n) + alpha * self.block_losses("b", 0, n))

    def exact(self, n: int) -> Outcome:
        """Outcome of a point that is an endpoint itself (its differences are exactly 0)."""
        look = estimate(np.zeros(n), None, 1, 1, self.cfg.confidence, len(self.schedule))
        return Outcome(look, "exact", decision(look, self.cfg.decide), self.schedule[-1], 0)
