"""Sequential estimation: evaluate each barrier on as few token blocks as its error bar needs.

A barrier is the mean of *paired* per-block differences d_i = L_i(θ_G(α)) − ((1−α)·L_A,i + α·L_B,i)
(the same token blocks at the path point and at both endpoints). Instead of a fixed budget per
point, blocks are visited in one seeded random order shared by every point and both endpoints (so
the differences stay paired), and each point stops at the first *look* where

* its standard error is <= ``target_se``, or
* its confidence interval excludes the threshold ``decide`` (decision ``above`` / ``below``), or
* every block is used (``--max-tokens`` is the ceiling), or even a fixed-budget run on every block
  would leave the threshold inside its interval (``futile``; decision ``undecided``).

The rule itself is one function of the per-block numbers: :func:`run_looks` over a
:class:`Stream`. Scans and barriers run it over the live model (:class:`SequentialEstimator`);
:func:`sequential_decision` replays it over arrays (any per-block metric), and :func:`replay_many`
runs the same look computations vectorised over many arrays at once (the simulations of
``tests/sequential_battery.py``).

Endpoint per-block losses are computed lazily, only on the blocks some point uses, and cached for
the whole run. Prefix reuse keeps working: looks fall on fixed multiples of ``chunk_blocks``
(default: the batch size), so every point evaluates the same batches of block indices.

**Estimator.** For a layer-wise path most of the per-block variance of d_i comes from the reference
line, i.e. from g_i = L_A,i − L_B,i (A and B differ most on different texts), not from the point
itself. A point therefore uses its own n blocks plus the m >= n blocks on which the endpoints are
already known (shared by every point) through the regression (two-phase sampling) estimator

    barrier = mean_n(d) − β·(mean_n(g) − mean_m(g)),   β = cov_n(d, g) / var_n(g),
    SE² = s_r²·(1/n − 1/N + (mean_m(g) − mean_n(g))²/Sgg_n) + β²·s_g²·(1/m − 1/N),

(s_r: residual standard deviation of d on g, Sgg_n: Σ over the n blocks of (g − mean_n(g))², s_g:
standard deviation of g on the m blocks, N: the number of blocks, the ceiling) with
Welch–Satterthwaite degrees of freedom. The blocks are a sample *without replacement* of the N
blocks and the target is their mean (the full-budget number), hence the finite-population terms
−1/N: at the ceiling the estimate equals the full-budget number and its SE is 0. The
(mean_m(g) − mean_n(g))² term is the variance of the fitted line at mean_m(g) (β is estimated on the
same blocks). With m = n the estimate is the plain paired mean, SE² = s_d²·(1/n − 1/N). Each look
extends whichever of n (cost: one block) or m (cost: a block of A and of B) shrinks the variance
most per block evaluated.

**Intervals valid under optional stopping.** n and m only take values on one fixed geometric
schedule s_1 < ... < s_L (s_1 = the first look, rounded up to the chunk, then at least ``growth``
times the previous value, on chunk multiples, the last at the ceiling; L is known before the first
forward). The interval at grid cell (n, m) = (s_i, s_j), i <= j, has level 1 − α_ij with

    α_ij = α_grid·u_i/(L − i + 1),   u_i = 1/(i·H_L)   (H_L = 1 + 1/2 + ... + 1/L),

so the rates of all cells sum to α_grid and the union bound covers every data-dependent stopping
cell, also one reached because other points extended the shared endpoint blocks.

* Rule ``robust`` (the default, ``interval_method = "skew-t-union-bound"``): α_grid = 0.8·α
  (α = 1 − confidence); the other 0.2·α is spent on the first look: it waits for ``min_blocks``
  blocks, by default the smallest n with (1 − rare_fraction)^n <= 0.2·α (90 at 95 % and 5 %), so
  that a group of blocks holding ``rare_fraction`` of them (code in a prose set, a language, a
  template) is in the first look with probability >= 1 − 0.2·α. The Student-t interval
  estimate ± t·SE is widened on its skewed side by three times the first-order Cornish–Fisher
  correction of the studentized estimator under sampling without replacement,
  t → t + 3·max(0, ±(γ₂·t²/2 − γ₁·(t² − 1)/6)) with γ₁ the skewness of the estimate and γ₂ =
  Cov(estimate, SE²)/SE³ (both from the sample's third moments): a right-skewed sample whose
  tail is under-represented gets a longer upper arm. The factor 3 makes up for sample skewness
  under-estimating the skewness of heavy-tailed populations (set by simulation,
  ``tests/sequential_battery.py``).
* Rule ``fast`` (``interval_method = "student-t-union-bound"``): α_grid = α, the first look after 8
  blocks, plain Student-t intervals. Valid for near-Gaussian differences only: a group of blocks
  that behaves differently and is missing from the first few blocks puts a tight interval on the
  wrong side of T.

No interval is valid for every distribution of unbounded per-block losses: a handful of blocks
rarer than ``rare_fraction`` that moves the mean across T can stay unseen until the ceiling. The
assumption each rule rests on is recorded with its results (:meth:`Rule.assumption`).
"""

from __future__ import annotations

import bisect
import contextlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from ..config.errors import ScanError
from ..config.scan import SKEW_FACTOR, SequentialConfig
from ..engine.evaluation import BlockStats, check_finite
from ..engine.stats import t_quantile

if TYPE_CHECKING:
    from ..engine.evaluation import Evaluator
    from ..model.pair import ModelPair
    from ..model.selection import Group

DECISIONS = ("above", "below", "undecided")
STOP_REASONS = ("decided", "target_se", "ceiling", "futile", "exact", "nonfinite")
#: Endpoint blocks cost a forward of A and one of B.
ENDPOINT_COST = 2.0
#: Futility: a point stops undecided once T would stay inside the fixed-budget interval on all N blocks
#: even if the estimate moved this many standard errors away from T.
FUTILITY_SE = 2.0

# stop codes of one look (0: continue)
_ABOVE, _BELOW, _TARGET, _CEILING, _FUTILE = 1, 2, 3, 4, 5
_REASONS = {_ABOVE: "decided", _BELOW: "decided", _TARGET: "target_se", _CEILING: "ceiling", _FUTILE: "futile"}


# -- looks --------------------------------------------------------------------------------------------
def look_schedule(num_blocks: int, min_blocks: int = 8, chunk: int = 8, growth: float = 1.5) -> list[int]:
    """Block counts a point (n) or the endpoints (m) may have at a look, fixed before the first forward.

    Args:
        num_blocks: the ceiling N (every block).
        min_blocks: blocks before the first look (rounded up to the chunk).
        chunk: looks fall on multiples of this many blocks (the last one on N).
        growth: each value is at least ``growth`` times the previous one.

    Returns:
        s_1 < ... < s_L = N (the union bound needs them fixed in advance).

    Raises:
        ScanError: fewer than 2 blocks.
    """
    if num_blocks < 2:
        raise ScanError(f"sequential estimation needs at least 2 token blocks, got {num_blocks}")
    first = min(num_blocks, max(2, math.ceil(min_blocks / chunk) * chunk))
    sizes = [first]
    while sizes[-1] < num_blocks:
        n = sizes[-1]
        sizes.append(min(max(n + chunk, math.ceil(n * growth / chunk) * chunk), num_blocks))
    return sizes


def cell_alpha(i: int, j: int, alpha: float, levels: int) -> float:
    """Error rate of look-grid cell (i, j), 1-based, i <= j <= ``levels``.

    α·u_i/(L − i + 1) with u_i = 1/(i·H_L), H_L = 1 + 1/2 + ... + 1/L: row i has L − i + 1 cells
    and Σ_i u_i = 1, so the rates of all cells sum to ``alpha``. Early rows (few own blocks: clear
    barriers decide there) get more, and within a row the rate is uniform over m (the shared endpoint
    blocks, often many because other points already paid for them).

    Args:
        i: the row (the point's own blocks n = s_i).
        j: the column (the endpoint blocks m = s_j).
        alpha: the error rate of the whole grid.
        levels: L, the schedule's length.

    Returns:
        The cell's error rate.

    Raises:
        ScanError: a cell outside the grid.
    """
    if not 1 <= i <= j <= levels:
        raise ScanError(f"look cell ({i}, {j}): need 1 <= i <= j <= {levels}")
    return float(_cell_alpha(np.asarray(i, dtype=np.float64), alpha, levels))


def _cell_alpha(i: np.ndarray, alpha: float, levels: int) -> np.ndarray:
    harmonic = sum(1.0 / k for k in range(1, levels + 1))
    return alpha / (i * harmonic) / (levels - i + 1)


def block_order(num_blocks: int, seed: int) -> torch.Tensor:
    """The seeded random visiting order of the token blocks (one for the whole run).

    Args:
        num_blocks: how many blocks.
        seed: the seed (``block_seed``).

    Returns:
        A permutation of ``0..num_blocks-1``.
    """
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randperm(num_blocks, generator=gen)


@dataclass(frozen=True)
class Rule:
    """A stopping rule resolved for one run: settings, look schedule and error rates.

    Attributes:
        name: ``robust`` or ``fast``.
        confidence: confidence of the intervals.
        schedule: the look grid s_1 < ... < s_L = N.
        threshold: T of ``decide`` (None: no decisions).
        target_se: the standard error to reach (None: none).
        grid_alpha: error rate spread over the look grid (1 − confidence, less the rare-group share).
        skew_factor: multiple of the Cornish–Fisher skewness correction (0: plain Student-t).
        rare_fraction: the smallest share of blocks a group may hold and still be in the first look with
            probability >= 1 − (1 − confidence − grid_alpha) (robust rule; 0.01 for the fast rule).
        interval_method: the interval's name.
    """

    name: str
    confidence: float
    schedule: tuple[int, ...]
    threshold: float | None
    target_se: float | None
    grid_alpha: float
    skew_factor: float
    rare_fraction: float
    interval_method: str

    @property
    def num_blocks(self) -> int:
        """N, the ceiling (the schedule's last value)."""
        return self.schedule[-1]

    @property
    def levels(self) -> int:
        """L, the schedule's length."""
        return len(self.schedule)

    def assumption(self) -> str:
        """What the rule's guarantee rests on, in one paragraph (recorded with its results).

        Returns:
            The assumption, with this run's first look and rare-group share.
        """
        first = self.schedule[0]
        common = (f"Blocks are visited in a uniformly random order (a sample without replacement of the N = "
                  f"{self.num_blocks} blocks; the target is their mean, the full-budget value). ")
        if self.name == "fast":
            return common + (
                f"Per-block differences close to Gaussian: no group of blocks that behaves differently and is rarer "
                f"than {self.rare_fraction:.0%} of the blocks (such a group can be missing from the first {first} "
                "blocks), skewness below about 1. Student-t intervals at each look cell, union bound over the look "
                "grid; no skewness correction.")
        rare = 1.0 - self.confidence - self.grid_alpha
        return common + (
            f"Any group of blocks whose differences behave differently (a rare mode: code in prose, another "
            f"language) holds at least {self.rare_fraction:.1%} of the blocks, so the first look ({first} blocks) "
            f"contains one of them with probability >= {1 - rare:.3f}; given that, skew-corrected Student-t "
            "intervals (CLT with a Cornish-Fisher skewness term) hold their level at every look cell, union bound "
            "over the look grid. Checked by simulation (tests/sequential_battery.py) for normal, t(3) and "
            "lognormal (sigma <= 1.5) residuals and rare modes of 5-20 % of the blocks. Not covered: fewer blocks "
            "than that share moving the mean across the threshold, or heavier tails than lognormal sigma 1.5.")

    def description(self) -> str:
        """How the interval is computed, in one paragraph (recorded with scan and barrier results).

        Returns:
            The description.
        """
        skew = (f" widened on its skewed side by {self.skew_factor:g}x the first-order Cornish-Fisher correction "
                "(sampling without replacement)" if self.skew_factor else "")
        return (
            "Regression (two-phase sampling) estimate of the mean paired difference over the N blocks, with the "
            "endpoint gap L_A - L_B as control variate, finite-population (without replacement) variance and the "
            f"slope's own variance; Student-t interval (Welch df){skew} at each look cell (n, m) = (s_i, s_j), "
            "i <= j, of a fixed geometric grid of L levels, at level 1 - a*u_i/(L - i + 1), u_i = 1/(i*H_L), "
            f"a = {self.grid_alpha:.4g}; the cell rates sum to a, so by the union bound the interval at a "
            f"data-dependent stopping time covers the mean with probability >= {self.confidence:g}"
            + (f" (the remaining {1 - self.confidence - self.grid_alpha:.4g} covers a rare group of blocks missing "
               "from the first look)." if self.name == "robust" else "."))


def make_rule(cfg: SequentialConfig, num_blocks: int, chunk: int = 8) -> Rule:
    """Resolve ``cfg`` for ``num_blocks`` blocks and looks on multiples of ``chunk``.

    Args:
        cfg: the sequential settings (validated here).
        num_blocks: N, the ceiling.
        chunk: looks fall on multiples of this many blocks (``cfg.chunk_blocks`` wins when set).

    Returns:
        The rule.

    Raises:
        ScanError: bad settings, or fewer than 2 blocks.
    """
    cfg.validate()
    step = cfg.chunk_blocks or chunk
    schedule = look_schedule(num_blocks, cfg.first_look(), step, cfg.growth)
    alpha = 1.0 - cfg.confidence
    robust = cfg.rule == "robust"
    return Rule(name=cfg.rule, confidence=cfg.confidence, schedule=tuple(schedule), threshold=cfg.decide,
                target_se=cfg.target_se, grid_alpha=alpha - cfg.rare_alpha, skew_factor=SKEW_FACTOR if robust else 0.0,
                rare_fraction=cfg.covered_fraction(schedule[0]), interval_method=cfg.interval_method)


# -- the computations of one look, vectorised over points --------------------------------------------
def _segment_sums(d: np.ndarray, g: np.ndarray | None) -> np.ndarray:
    """Sums over the last axis of d, d², d³, g, g², g³, dg, d²g, dg² (shifted values) -> (..., 9)."""
    d2 = d * d
    if g is None:
        zero = np.zeros(d.shape[:-1])
        return np.stack([d.sum(-1), d2.sum(-1), (d2 * d).sum(-1)] + [zero] * 6, axis=-1)
    g2 = g * g
    return np.stack([d.sum(-1), d2.sum(-1), (d2 * d).sum(-1), g.sum(-1), g2.sum(-1), (g2 * g).sum(-1),
                     (d * g).sum(-1), (d2 * g).sum(-1), (d * g2).sum(-1)], axis=-1)


def _gap_sums(g: np.ndarray | None, shape: tuple[int, ...] = ()) -> np.ndarray:
    """Sums over the last axis of g, g², g³ (shifted values) -> (..., 3)."""
    if g is None:
        return np.zeros(shape + (3,))
    g2 = g * g
    return np.stack([g.sum(-1), g2.sum(-1), (g2 * g).sum(-1)], axis=-1)


def _df_grid(df: np.ndarray) -> np.ndarray:
    """Degrees of freedom rounded down onto a coarse grid (exact up to 30, then 5 % steps up to 10^4)."""
    df = np.asarray(df, dtype=np.float64)
    k = np.floor(np.log(np.clip(df, 30.0, 1e4) / 30.0) / math.log(1.05))
    return np.where(df <= 30, np.maximum(1.0, np.floor(df)), np.floor(30.0 * 1.05**k))


def _quantiles(p: np.ndarray, df: np.ndarray) -> np.ndarray:
    """Student-t p-quantiles, elementwise (few distinct (p, df) pairs: computed once each)."""
    keys = np.stack([np.broadcast_to(p, np.shape(df)).astype(np.float64), _df_grid(df)], axis=-1).reshape(-1, 2)
    if keys.shape[0] == 0:
        return np.zeros(np.shape(df))
    unique, inverse = np.unique(keys, axis=0, return_inverse=True)
    values = np.array([t_quantile(float(a), float(b)) for a, b in unique])
    return values[inverse.reshape(-1)].reshape(np.shape(df))


def _cells(S: np.ndarray, G: np.ndarray, i: np.ndarray, j: np.ndarray, shift: np.ndarray, rule: Rule,
           control: bool) -> dict[str, np.ndarray]:
    """Estimate, SE and interval of points at cells (i, j) (0-based arrays) from their sums.

    ``S`` (B, 9): the :func:`_segment_sums` of the first n = s_i blocks; ``G`` (B, 3): the
    :func:`_gap_sums` of the first m = s_j blocks; ``shift``: what was subtracted from d.
    """
    s = np.asarray(rule.schedule, dtype=np.float64)
    N = float(rule.num_blocks)
    n, m = s[i], s[j]
    sd_, sdd, sddd, sg, sgg, sggg, sdg, sddg, sdgg = (S[:, k] for k in range(9))
    a, b = sd_ / n, sg / n
    cdd = np.maximum(sdd - n * a * a, 0.0)
    cgg = np.maximum(sgg - n * b * b, 0.0)
    cdg = sdg - n * a * b
    cddd = sddd - 3.0 * a * sdd + 2.0 * n * a**3
    cggg = sggg - 3.0 * b * sgg + 2.0 * n * b**3
    cddg = sddg - b * sdd - 2.0 * a * sdg + 2.0 * n * a * a * b
    cdgg = sdgg - a * sgg - 2.0 * b * sdg + 2.0 * n * a * b * b
    gbar_m = G[:, 0] / m
    cgg_m = np.maximum(G[:, 1] - m * gbar_m * gbar_m, 0.0)
    cggg_m = G[:, 2] - 3.0 * gbar_m * G[:, 1] + 2.0 * m * gbar_m**3
    inv_n, inv_m = 1.0 / n - 1.0 / N, 1.0 / m - 1.0 / N  # without-replacement factors (0 at the ceiling)
    has_g = (n >= 4) & (cgg > 0.0) if control else np.zeros(n.shape, dtype=bool)
    regress = has_g & (m > n)
    sxx = np.where(has_g, cgg, 1.0)
    beta = np.where(has_g, cdg / sxx, 0.0)
    var_d = cdd / np.maximum(n - 1.0, 1.0)
    s2r = np.maximum(cdd - beta * cdg, 0.0) / np.maximum(n - 2.0, 1.0)
    s2g = cgg_m / np.maximum(m - 1.0, 1.0)
    gap = gbar_m - b
    # regression estimate and its variance: own blocks (residual, slope) and endpoint blocks (control)
    va_r = s2r * (inv_n + gap * gap / sxx)
    vb_r = beta * beta * s2g * inv_m
    denom = va_r * va_r / np.maximum(n - 2.0, 1.0) + vb_r * vb_r / np.maximum(m - 1.0, 1.0)
    df_r = np.where(denom > 0.0, (va_r + vb_r) ** 2 / np.where(denom > 0.0, denom, 1.0), n - 2.0)
    est = np.where(regress, a + beta * gap, a)
    var = np.where(regress, va_r + vb_r, var_d * inv_n)
    df = np.where(regress, df_r, n - 1.0)
    # which part shrinks with n and which with m (with m = n: only to choose what to extend)
    point_var = np.where(regress, va_r, np.where(has_g, s2r * inv_n, var))
    control_var = np.where(has_g, vb_r, 0.0)
    se = np.sqrt(var)
    # skewness of the estimate (g1) and of the studentization (g2), sampling without replacement
    k3e = (cddd - 3.0 * beta * cddg + 3.0 * beta**2 * cdgg - beta**3 * cggg) / n
    k3g = beta**3 * cggg_m / m
    fn, fm = n / N, m / N
    k3_mean = np.where(regress, k3e * (1 - fn) * (1 - 2 * fn) / n**2 + k3g * (1 - fm) * (1 - 2 * fm) / m**2,
                       cddd / n * (1 - fn) * (1 - 2 * fn) / n**2)
    k3_cov = np.where(regress, k3e * (1 - fn) / n * inv_n + k3g * (1 - fm) / m * inv_m, cddd / n * (1 - fn) / n * inv_n)
    scale = np.where(var > 0.0, var, 1.0) ** 1.5
    g1 = np.where(var > 0.0, k3_mean / scale, 0.0)
    g2 = np.where(var > 0.0, k3_cov / scale, 0.0)
    q = _quantiles(1.0 - _cell_alpha(i + 1.0, rule.grid_alpha, rule.levels) / 2.0, df)
    shift_q = rule.skew_factor * (g2 * q * q / 2.0 - g1 * (q * q - 1.0) / 6.0)  # > 0: longer upper arm
    floor = 1e-9 * (np.sqrt(var_d) + np.abs(est + shift)) + 1e-12  # the ceiling's zero-width interval
    high = est + np.maximum(se * (q + np.maximum(shift_q, 0.0)), floor)
    low = est - np.maximum(se * (q + np.maximum(-shift_q, 0.0)), floor)
    return {"est": est + shift, "se": se, "low": low + shift, "high": high + shift, "df": df, "beta": beta,
            "point_var": point_var, "control_var": control_var, "sd": np.sqrt(var_d), "n": n, "m": m}


def _step(c: dict[str, np.ndarray], i: np.ndarray, j: np.ndarray, rule: Rule) -> tuple[np.ndarray, np.ndarray]:
    """Stop codes of points at cells (i, j) (0: go on) and, for those going on, whether to extend m."""
    last = rule.levels - 1
    T = rule.threshold
    conditions, codes = [], []
    if T is not None:
        conditions += [c["low"] > T, c["high"] < T]
        codes += [_ABOVE, _BELOW]
    if rule.target_se is not None:
        conditions.append(c["se"] <= rule.target_se)
        codes.append(_TARGET)
    conditions.append(i == last)
    codes.append(_CEILING)
    if T is not None and rule.target_se is None:
        q_full = t_quantile(1.0 - (1.0 - rule.confidence) / 2.0, max(1, rule.num_blocks - 1))
        conditions.append(np.abs(c["est"] - T) + FUTILITY_SE * c["se"] < q_full * c["sd"] / math.sqrt(rule.num_blocks))
        codes.append(_FUTILE)
    code = np.select(conditions, codes, 0)
    s = np.asarray(rule.schedule, dtype=np.float64)
    inv = 1.0 / s - 1.0 / rule.num_blocks
    nxt_i, nxt_j = np.minimum(i + 1, last), np.minimum(j + 1, last)

    def drop(var: np.ndarray, k: np.ndarray, k1: np.ndarray) -> np.ndarray:  # variance removed from s_k to s_k1
        return np.where(k1 > k, var * (1.0 - inv[k1] / np.where(inv[k] > 0, inv[k], 1.0)), 0.0)

    same = i == j
    dm = drop(c["control_var"], j, nxt_j)
    cost_m = ENDPOINT_COST * (s[nxt_j] - s[j])
    cost_n = (s[nxt_i] - s[i]) + np.where(same, cost_m, 0.0)
    gain_n = (drop(c["point_var"], i, nxt_i) + np.where(same, dm, 0.0)) / np.where(cost_n > 0, cost_n, 1.0)
    grow_m = (j < last) & (dm / np.where(cost_m > 0, cost_m, 1.0) > gain_n)
    return code, grow_m


@dataclass
class Look:
    """The estimate of a point after n own blocks and m endpoint blocks, at grid cell (i, j) (1-based).

    Attributes:
        i: the row of the look grid (n = s_i).
        j: the column (m = s_j).
        n: the point's own blocks.
        m: the blocks on which the endpoints are known.
        mean: the estimate.
        se: its standard error.
        low: lower end of the interval.
        high: upper end of the interval.
        df: degrees of freedom of the t quantile (before rounding onto the grid).
        beta: slope of d on the endpoint gap (0 without control variate).
        point_var: the part of the variance that shrinks with n.
        control_var: the part that shrinks with m.
    """

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
    point_var: float = 0.0
    control_var: float = 0.0


def _look(c: dict[str, np.ndarray], k: int, i: int, j: int) -> Look:
    return Look(i + 1, j + 1, int(c["n"][k]), int(c["m"][k]), float(c["est"][k]), float(c["se"][k]), float(c["low"][k]),
                float(c["high"][k]), float(c["df"][k]), float(c["beta"][k]), float(c["point_var"][k]),
                float(c["control_var"][k]))


def _levels(rule: Rule, count: int) -> int:
    """Largest schedule index whose value is <= count (-1: none)."""
    return bisect.bisect_right(rule.schedule, count) - 1


def estimate(d: np.ndarray | torch.Tensor, g: np.ndarray | torch.Tensor | None, i: int, j: int, rule: Rule) -> Look:
    """Estimate and interval at grid cell (i, j) (1-based) of ``rule``'s look grid.

    The same computation as a look of :func:`run_looks`: from the differences ``d`` of the first n = s_i
    blocks and the endpoint gaps ``g`` = L_A − L_B of the first m = s_j blocks (None: the plain paired
    mean). Longer arrays are cut. Float64 arithmetic.

    Args:
        d: per-block differences in visiting order (at least s_i).
        g: endpoint gaps in the same order (at least s_j), or None.
        i: the row (1-based).
        j: the column (1-based, >= i).
        rule: the resolved rule.

    Returns:
        The look.

    Raises:
        ScanError: a cell outside the grid or arrays too short for it.
    """
    if not 1 <= i <= j <= rule.levels:
        raise ScanError(f"look cell ({i}, {j}): need 1 <= i <= j <= {rule.levels}")
    s = rule.schedule
    d = np.asarray(d, dtype=np.float64)
    g = None if g is None else np.asarray(g, dtype=np.float64)
    if d.size < s[i - 1] or (g is not None and g.size < s[j - 1]):
        raise ScanError(f"look cell ({i}, {j}) needs {s[i - 1]} differences and {s[j - 1]} endpoint gaps")
    shift_d = float(d[: s[0]].mean())
    shift_g = float(g[: s[0]].mean()) if g is not None else 0.0
    S, G = _prefix(d - shift_d, None if g is None else g - shift_g, s, i, j)
    c = _cells(S[None], G[None], np.array([i - 1]), np.array([j - 1]), np.array([shift_d]), rule, g is not None)
    return _look(c, 0, i - 1, j - 1)


def _prefix(d: np.ndarray, g: np.ndarray | None, s: tuple[int, ...], i: int, j: int) -> tuple[np.ndarray, np.ndarray]:
    """Sums of the first s_i blocks (9 features) and of the first s_j gaps (3), segment by segment."""
    S = np.zeros(d.shape[:-1] + (9,))
    G = np.zeros(d.shape[:-1] + (3,))
    lo = 0
    for k in range(j):
        hi = s[k]
        if k < i:
            S = S + _segment_sums(d[..., lo:hi], None if g is None else g[..., lo:hi])
        G = G + _gap_sums(None if g is None else g[..., lo:hi], d.shape[:-1])
        lo = hi
    return S, G


def decision(look: Look, threshold: float | None) -> str | None:
    """The decision a look's interval gives.

    Args:
        look: the look.
        threshold: T (None: no decision).

    Returns:
        ``above`` (interval > T), ``below`` (interval < T) or ``undecided``; None without a threshold.
    """
    if threshold is None:
        return None
    if look.low > threshold:
        return "above"
    if look.high < threshold:
        return "below"
    return "undecided"


@dataclass
class Outcome:
    """Where a point stopped and why.

    Attributes:
        look: the last look (None when a non-finite difference stopped the point).
        stop_reason: one of :data:`STOP_REASONS`.
        decision: ``above`` / ``below`` / ``undecided``, None without a threshold.
        blocks_available: N, the ceiling.
        looks: how many looks were taken.
        interval_method: the rule's interval.
    """

    look: Look | None
    stop_reason: str
    decision: str | None
    blocks_available: int
    looks: int = 0
    interval_method: str = "skew-t-union-bound"

    def fields(self, tokens_per_block: int) -> dict:
        """Per-point result fields (results.jsonl rows, barrier JSON).

        Args:
            tokens_per_block: predicted tokens per block (chat data: their mean over every conversation).

        Returns:
            ``interval``, ``decision``, ``stop_reason``, ``looks``, ``blocks_used``, ``endpoint_blocks``,
            ``control_beta``, ``tokens_ceiling`` and ``interval_method``.
        """
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
            "tokens_ceiling": round(self.blocks_available * tokens_per_block),
            "interval_method": self.interval_method,
        }


class Stream(Protocol):
    """Per-block data of one point in visiting order (the live model, or arrays)."""

    def available(self) -> int:
        """Blocks on which both endpoints are known (shared by every point).

        Returns:
            The count.
        """

    def extend(self, m: int) -> None:
        """Make both endpoints known on the first ``m`` blocks.

        Args:
            m: the block count.
        """

    def control(self, m: int) -> np.ndarray | torch.Tensor | None:
        """The endpoint gaps g = L_A − L_B of the first ``m`` blocks.

        Args:
            m: the block count (<= :meth:`available`).

        Returns:
            The gaps, or None when there is no control variate.
        """

    def point(self, lo: int, hi: int) -> np.ndarray | torch.Tensor:
        """The point's differences d on blocks lo..hi−1 (the endpoints are known there).

        Args:
            lo: first block.
            hi: one past the last block.

        Returns:
            The differences.
        """


def run_looks(stream: Stream, rule: Rule) -> Outcome:
    """The sequential loop of one point: the rule every scan, barrier and replay runs.

    At each look the point's cell (n, m) = (s_i, s_j) gives an estimate and an interval (the
    computation of :func:`estimate`); the point stops when ``rule`` says so (decided, target SE met,
    ceiling, futile), otherwise it extends n (cost 1 per block) or m (2 per block: A and B), whichever
    removes more variance per cost. Endpoint blocks other points already paid for are used at once.

    Args:
        stream: the point's per-block data.
        rule: the resolved rule.

    Returns:
        Where and why the point stopped.
    """
    s = rule.schedule

    def fetch(lo: int, hi: int) -> np.ndarray:
        return np.asarray(stream.point(lo, hi), dtype=np.float64)

    def gaps(m: int) -> np.ndarray | None:
        g = stream.control(m)
        return None if g is None else np.asarray(g, dtype=np.float64)

    i, j = 0, max(0, _levels(rule, stream.available()))
    stream.extend(s[j])
    d = fetch(0, s[0])
    looks = 1
    if not np.isfinite(d).all():
        return Outcome(None, "nonfinite", None, s[-1], looks, rule.interval_method)
    g = gaps(s[j])
    shift_d = float(d.mean())
    shift_g = float(g[: s[0]].mean()) if g is not None else 0.0
    S = _segment_sums(d - shift_d, None if g is None else g[: s[0]] - shift_g)
    G = [_gap_sums(None if g is None else g[: s[0]] - shift_g)]  # G[k]: gap sums of the first s_k blocks
    while True:
        j = max(j, _levels(rule, stream.available()))
        if len(G) <= j:
            g = gaps(s[j])
            for k in range(len(G), j + 1):
                G.append(G[-1] + _gap_sums(None if g is None else g[s[k - 1]:s[k]] - shift_g))
        c = _cells(S[None], G[j][None], np.array([i]), np.array([j]), np.array([shift_d]), rule, g is not None)
        code, grow_m = _step(c, np.array([i]), np.array([j]), rule)
        look = _look(c, 0, i, j)
        if code[0]:
            return Outcome(look, _REASONS[int(code[0])], decision(look, rule.threshold), s[-1], looks,
                           rule.interval_method)
        looks += 1
        if grow_m[0]:
            j += 1
            stream.extend(s[j])
            continue
        i += 1
        if j < i:
            j = i
        stream.extend(s[j])
        part = fetch(s[i - 1], s[i])
        if not np.isfinite(part).all():
            return Outcome(None, "nonfinite", None, s[-1], looks, rule.interval_method)
        if len(G) <= j:
            g = gaps(s[j])
            for k in range(len(G), j + 1):
                G.append(G[-1] + _gap_sums(None if g is None else g[s[k - 1]:s[k]] - shift_g))
        S = S + _segment_sums(part - shift_d, None if g is None else g[s[i - 1]:s[i]] - shift_g)


# -- replay on arrays ---------------------------------------------------------------------------------
class _ArrayStream:
    """A :class:`Stream` over arrays: d and g of every block, endpoints 'known' once extended."""

    def __init__(self, d: np.ndarray, g: np.ndarray | None, known: int = 0):
        self.d, self.g, self.known = d, g, known
        self.read = 0  # blocks of d the rule read

    def available(self) -> int:
        return self.known

    def extend(self, m: int) -> None:
        self.known = max(self.known, m)

    def control(self, m: int) -> np.ndarray | None:
        return None if self.g is None else self.g[:m]

    def point(self, lo: int, hi: int) -> np.ndarray:
        self.read = max(self.read, hi)
        return self.d[lo:hi]


def _as_series(name: str, x: object, ndim: int) -> np.ndarray:
    arr = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
    if arr.ndim != ndim:
        raise ScanError(f"{name}: expected a {ndim}-D array of per-block values, got shape {arr.shape}")
    return arr


def _replay_rule(num_blocks: int, threshold: float | None, target_se: float | None, confidence: float,
                 min_blocks: int | None, chunk: int | None, rule: str, rare_fraction: float, growth: float) -> Rule:
    if threshold is not None and not math.isfinite(threshold):
        raise ScanError(f"threshold={threshold}: must be a finite number")
    if threshold is None and target_se is None:
        raise ScanError("sequential_decision needs threshold=T and/or target_se=X")
    if chunk is not None and chunk < 1:
        raise ScanError(f"chunk={chunk}: must be at least 1")
    if num_blocks < 2:
        raise ScanError(f"d: needs at least 2 blocks, got {num_blocks}")
    cfg = SequentialConfig(target_se=target_se, decide=threshold, confidence=confidence, rule=rule,
                           rare_fraction=rare_fraction, min_blocks=min_blocks, growth=growth)
    return make_rule(cfg, num_blocks, chunk or 8)


def sequential_decision(
    d: np.ndarray | torch.Tensor | list[float],
    g: np.ndarray | torch.Tensor | list[float] | None = None,
    *,
    threshold: float | None = None,
    target_se: float | None = None,
    confidence: float = 0.95,
    min_blocks: int | None = None,
    chunk: int | None = None,
    rule: str = "robust",
    rare_fraction: float = 0.05,
    growth: float = 1.5,
    endpoint_blocks: int = 0,
) -> dict:
    """Replay the sequential stopping rule of scans and ``barrier --decide`` on per-block numbers.

    The same code path as a live scan (:func:`run_looks`), over arrays: apply it to any per-block
    metric to see where it stops, what it decides and how many blocks it reads. The blocks must
    already be in a random visiting order (a scan uses one seeded permutation).

    Args:
        d: per-block differences in visiting order, all N blocks (the ceiling); the rule reads only a
            prefix.
        g: the endpoint gap L_A − L_B per block in the same order (the control variate), or None (the
            plain paired mean).
        threshold: decide whether the mean of ``d`` is above or below T (None: no decision).
        target_se: stop once the standard error is <= X (None: no target).
        confidence: confidence of the intervals, valid at the stopping time.
        min_blocks: blocks before the first look (default: the rule's, see
            :meth:`~hf_llmc.SequentialConfig.first_look`).
        chunk: looks fall on multiples of this many blocks (default 8, a CPU scan's batch size).
        rule: ``robust`` (default) or ``fast``.
        rare_fraction: robust rule: the smallest share of blocks that may behave differently.
        growth: each look has at least this many times the blocks of the previous one.
        endpoint_blocks: blocks on which the endpoints are already known when the point starts (a scan's
            earlier points paid for them).

    Returns:
        ``n`` (own blocks read), ``m`` (blocks of ``g`` used), ``estimate``, ``se``, ``low``, ``high``,
        ``decision`` (``above`` / ``below`` / ``undecided``; None without a threshold), ``stop_reason``
        (``decided``, ``target_se``, ``ceiling``, ``futile``), ``looks``, ``beta`` (slope on ``g``),
        ``interval_method``, ``assumption`` and ``schedule``.

    Raises:
        ScanError: bad settings (named by their parameter), arrays of the wrong shape or length, or a
            non-finite value among the blocks the rule reads (or anywhere in ``g``).
    """
    d_arr = _as_series("d", d, 1)
    g_arr = None if g is None else _as_series("g", g, 1)
    if g_arr is not None and g_arr.size != d_arr.size:
        raise ScanError(f"g: {g_arr.size} values for {d_arr.size} differences (one per block, same order)")
    if g_arr is not None and not np.isfinite(g_arr).all():
        raise ScanError("g: non-finite endpoint gap")
    if endpoint_blocks < 0:
        raise ScanError(f"endpoint_blocks={endpoint_blocks}: must be at least 0")
    spec = _replay_rule(d_arr.size, threshold, target_se, confidence, min_blocks, chunk, rule, rare_fraction, growth)
    stream = _ArrayStream(d_arr, g_arr, min(endpoint_blocks, d_arr.size) if g_arr is not None else 0)
    out = run_looks(stream, spec)
    if out.look is None:
        raise ScanError(f"d: non-finite value among the first {stream.read} blocks")
    look = out.look
    return {"n": look.n, "m": look.m, "estimate": look.mean, "se": look.se, "low": look.low, "high": look.high,
            "decision": out.decision, "stop_reason": out.stop_reason, "looks": out.looks, "beta": look.beta,
            "interval_method": spec.interval_method, "assumption": spec.assumption(), "schedule": list(spec.schedule)}


def replay_many(d: np.ndarray, g: np.ndarray | None, rule: Rule, *, endpoint_blocks: int = 0) -> dict[str, np.ndarray]:
    """:func:`run_looks` over many series at once (vectorised; the same look computations).

    Args:
        d: (R, N) per-block differences, one series per row, in visiting order (finite).
        g: (R, N) endpoint gaps, or None.
        rule: the resolved rule (its ceiling is N).
        endpoint_blocks: endpoint blocks known before the first look.

    Returns:
        Arrays of length R: ``n``, ``m``, ``estimate``, ``se``, ``low``, ``high``, ``decision``
        (+1 above, −1 below, 0 undecided) and ``stop_code`` (1/2 decided, 3 target SE, 4 ceiling, 5 futile).

    Raises:
        ScanError: arrays of the wrong shape, or non-finite values.
    """
    d = _as_series("d", d, 2)
    g = None if g is None else _as_series("g", g, 2)
    if d.shape[1] != rule.num_blocks or (g is not None and g.shape != d.shape):
        raise ScanError(f"d, g: need shape (R, {rule.num_blocks}), got {d.shape} and {None if g is None else g.shape}")
    if not np.isfinite(d).all() or (g is not None and not np.isfinite(g).all()):
        raise ScanError("d, g: non-finite values")
    s, R = rule.schedule, d.shape[0]
    shift_d = d[:, : s[0]].mean(-1)
    shift_g = g[:, : s[0]].mean(-1) if g is not None else np.zeros(R)
    dc = d - shift_d[:, None]
    gc = None if g is None else g - shift_g[:, None]
    S, G = [np.zeros((R, 9))], [np.zeros((R, 3))]
    lo = 0
    for hi in s:  # S[k + 1], G[k + 1]: sums of the first s_k blocks
        S.append(S[-1] + _segment_sums(dc[:, lo:hi], None if gc is None else gc[:, lo:hi]))
        G.append(G[-1] + _gap_sums(None if gc is None else gc[:, lo:hi], (R,)))
        lo = hi
    S_all, G_all = np.stack(S[1:], axis=1), np.stack(G[1:], axis=1)
    i = np.zeros(R, dtype=int)
    j = np.full(R, max(0, _levels(rule, endpoint_blocks)) if g is not None else 0, dtype=int)
    out = {k: np.full(R, np.nan) for k in ("n", "m", "estimate", "se", "low", "high")}
    out["decision"] = np.zeros(R, dtype=int)
    out["stop_code"] = np.zeros(R, dtype=int)
    active = np.arange(R)
    while active.size:
        ii, jj = i[active], j[active]
        c = _cells(S_all[active, ii], G_all[active, jj], ii, jj, shift_d[active], rule, g is not None)
        code, grow_m = _step(c, ii, jj, rule)
        done = code > 0
        idx = active[done]
        for key, src in (("n", "n"), ("m", "m"), ("estimate", "est"), ("se", "se"), ("low", "low"), ("high", "high")):
            out[key][idx] = c[src][done]
        out["stop_code"][idx] = code[done]
        dec = np.where(c["low"] > (rule.threshold if rule.threshold is not None else np.inf), 1,
                       np.where(c["high"] < (rule.threshold if rule.threshold is not None else -np.inf), -1, 0))
        out["decision"][idx] = dec[done]
        go = active[~done]
        gm = grow_m[~done]
        j[go[gm]] += 1
        i[go[~gm]] += 1
        j[go] = np.maximum(j[go], i[go])
        active = go
    return out


def _cat(parts: list[BlockStats]) -> BlockStats:
    return BlockStats.cat(parts)


# -- evaluation ---------------------------------------------------------------------------------------
class SequentialEstimator:
    """Per-point sequential loops on the live model, with lazily computed, shared endpoint blocks.

    ``order`` is the seeded block order and ``rule`` the resolved stopping rule (``schedule`` its look
    grid). The endpoint caches hold the per-block sums of A and B on ``order[:m]``, extended (ending on
    the point's base) only when a point asks for more. ``blocks_evaluated`` counts every block fed to a
    forward (endpoints too).

    Args:
        pair: the loaded pair.
        ev: an evaluator of the pair's live model on the token blocks.
        num_blocks: N, the ceiling.
        cfg: the sequential settings.
        record: record the hidden states of endpoint batches (prefix reuse).
        scale: multiplies every per-block loss the rule sees (``--metric bpb``: the set's
            :attr:`~hf_llmc.engine.data.TokenBlocks.bpb_scale`, so intervals and the threshold are in bits per byte).

    Raises:
        ScanError: bad settings (see :meth:`SequentialConfig.validate`).
    """

    def __init__(self, pair: ModelPair, ev: Evaluator, num_blocks: int, cfg: SequentialConfig, *,
                 record: bool = False, scale: float = 1.0) -> None:
        self.pair, self.ev, self.cfg = pair, ev, cfg
        self.scale = scale
        self.rule = make_rule(cfg, num_blocks, ev.batch_size)
        self.order = block_order(num_blocks, cfg.block_seed)
        self.chunk = cfg.chunk_blocks or ev.batch_size
        self.schedule = list(self.rule.schedule)
        self.record = record
        self._ends: dict[str, list[BlockStats]] = {"a": [], "b": []}
        self.blocks_evaluated = 0

    def have(self, which: str | None = None) -> int:
        """Blocks on which an endpoint is known.

        Args:
            which: ``"a"``, ``"b"`` or None (both).

        Returns:
            The count.
        """
        if which is None:
            return min(self.have("a"), self.have("b"))
        return sum(p.indices.numel() for p in self._ends[which])

    def endpoint(self, which: str, n: int) -> BlockStats:
        """Stats of the full model ``which`` on ``order[:n]`` (computed now if missing).

        Args:
            which: ``"a"`` or ``"b"``.
            n: the block count.

        Returns:
            The stats.
        """
        self._extend(which, n)
        stats = _cat(self._ends[which])
        if stats.indices.numel() == n:
            return stats
        return stats.take(n)

    def _extend(self, which: str, n: int) -> None:
        have = self.have(which)
        if have >= n:
            return
        self.pair.interp.set_base(which)
        stats = self.ev.run(self.order[have:n], state=which, record=self.record)
        self._ends[which].append(check_finite(stats, f"model {which.upper()}"))
        self.blocks_evaluated += n - have

    def seed(self, which: str, stats: BlockStats) -> None:
        """Reuse endpoint blocks computed earlier (a resumed scan) if they follow this block order.

        Args:
            which: ``"a"`` or ``"b"``.
            stats: the endpoint's stats on a prefix of the block order.
        """
        k = stats.indices.numel()
        if k > self.have(which) and torch.equal(stats.indices, self.order[:k]):
            self._ends[which] = [stats]

    def ensure(self, n: int, last: str) -> None:
        """Both endpoints on ``order[:n]``; the live model ends on ``last``.

        Args:
            n: the block count.
            last: ``"a"`` or ``"b"``.
        """
        for which in ("b", "a") if last == "a" else ("a", "b"):
            self._extend(which, n)

    def block_losses(self, which: str, lo: int, hi: int) -> torch.Tensor:
        """Per-block mean losses of an endpoint on ``order[lo:hi]`` (already computed).

        Args:
            which: ``"a"`` or ``"b"``.
            lo: first position in the order.
            hi: one past the last.

        Returns:
            The losses.
        """
        losses = _cat(self._ends[which]).block_loss[lo:hi]
        return losses if self.scale == 1.0 else losses * self.scale

    def evaluate(self, group: Group, alpha: float, base: str = "a", method: str = "lerp",
                 prefix: bool = True) -> tuple[BlockStats, Outcome]:
        """Run the point (group at α into ``base``) look by look with :func:`run_looks`.

        The path point stays set between looks unless endpoint blocks must be added.

        Args:
            group: the tensors moved along the path.
            alpha: the point.
            base: the model the other tensors come from.
            method: ``"lerp"`` or ``"slerp"``.
            prefix: reuse the base model's hidden states before the group's first block.

        Returns:
            The point's stats on the blocks it used, and the outcome.
        """
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
                return (stats.block_loss if est.scale == 1.0 else stats.block_loss * est.scale) - ref

        stream = PointStream()
        try:
            outcome = run_looks(stream, self.rule)
        finally:
            stream.stack.close()
        return _cat(parts), outcome

    def evaluate_fixed(self, group: Group, alpha: float, n: int, base: str = "a", method: str = "lerp",
                       prefix: bool = True) -> BlockStats:
        """The point on ``order[:n]`` (no stopping rule): the other α of a sequential barrier.

        Args:
            group: the tensors moved along the path.
            alpha: the point.
            n: the block count.
            base: the model the other tensors come from.
            method: ``"lerp"`` or ``"slerp"``.
            prefix: reuse the base model's hidden states before the group's first block.

        Returns:
            The point's stats.
        """
        self.ensure(n, base)
        start = group.first_block if prefix and group.first_block else None
        with self.pair.interp.at([group], alpha, method, base=base):
            stats = self.ev.run(self.order[:n], start_block=start, state=base)
        self.blocks_evaluated += n
        return stats

    def differences(self, stats: BlockStats, alpha: float) -> torch.Tensor:
        """Per-block differences d of a point's stats against the reference line at α.

        Args:
            stats: the point's stats on ``order[:n]``.
            alpha: the point.

        Returns:
            d on those n blocks.
        """
        n = stats.indices.numel()
        own = stats.block_loss if self.scale == 1.0 else stats.block_loss * self.scale
        return own - ((1.0 - alpha) * self.block_losses("a", 0, n) + alpha * self.block_losses("b", 0, n))

    def exact(self, n: int) -> Outcome:
        """Outcome of a point that is an endpoint itself (its differences are exactly 0).

        Args:
            n: the blocks it is reported on (a schedule value).

        Returns:
            The outcome (stop reason ``exact``).
        """
        k = max(1, _levels(self.rule, n) + 1)
        look = estimate(np.zeros(self.rule.schedule[k - 1]), None, k, k, self.rule)
        return Outcome(look, "exact", decision(look, self.rule.threshold), self.rule.num_blocks, 0,
                       self.rule.interval_method)
