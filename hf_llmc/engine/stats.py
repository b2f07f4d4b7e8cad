"""Statistics of per-block numbers: standard errors of paired means and Student's t quantiles
(without SciPy)."""

from __future__ import annotations

import math
from functools import lru_cache
from statistics import NormalDist

import torch


def standard_error(x: torch.Tensor) -> float:
    """Standard error of the mean of ``x`` (NaN for fewer than two values)."""
    n = x.numel()
    return float(x.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")


def ratio_values(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-unit values whose plain mean and standard error are those of the ratio estimator.

    Units of different sizes (conversations with their scored tokens) estimate R = Σx / Σw, where
    ``x`` holds each unit's value and ``weights`` its size on the same scale. The linearised ratio
    estimator has the residuals e_i = (x_i − R·w_i) / mean(w); the returned values are R + e_i: their
    mean is R and their standard error the ratio estimator's. Equal weights return ``x``.

    Args:
        x: per-unit values (e.g. summed nats over a constant).
        weights: per-unit sizes on the scale of ``x`` (positive).

    Returns:
        R + e_i per unit (float64).
    """
    x, w = x.double(), weights.double()
    ratio = x.sum() / w.sum()
    return ratio + (x - ratio * w) / w.mean()


def paired_standard_error(x: torch.Tensor, order: torch.Tensor | None = None,
                          weights: torch.Tensor | None = None) -> tuple[float, str, float | None]:
    """Standard error of the mean of per-block differences that may correlate between neighbours.

    Blocks are consecutive pieces of the token stream, so neighbouring blocks often come from one
    document and their differences correlate. Where the lag-1 correlation (in stream order) is
    significantly positive (above 2/√n, with at least 16 blocks), the standard error is the
    batch-means one: the standard error of the means of about √n contiguous batches of blocks.
    Otherwise it is the plain one of :func:`standard_error`.

    Args:
        x: per-block values.
        order: the blocks' positions in the stream (default: ``x`` is in stream order).
        weights: per-block sizes of the ratio estimator (:func:`ratio_values`; chat data: scored tokens
            per conversation over their mean); None: equal blocks.

    Returns:
        ``(standard error, method, lag-1 correlation)``; method ``"iid"`` or ``"batch-means"``;
        the correlation is None for fewer than 16 blocks.
    """
    if weights is not None:
        x = ratio_values(x, weights)
    if order is not None:
        x = x[torch.as_tensor(order).argsort()]
    x = x.double()
    n = x.numel()
    plain = standard_error(x)
    if n < 16:
        return plain, "iid", None
    centred = x - x.mean()
    denom = float(centred @ centred)
    r1 = float(centred[1:] @ centred[:-1]) / denom if denom > 0 else 0.0
    if r1 <= 2.0 / math.sqrt(n):
        return plain, "iid", r1
    batches = torch.tensor_split(x, max(4, n // math.ceil(math.sqrt(n))))
    means = torch.stack([b.mean() for b in batches])
    return float(means.std(unbiased=True) / math.sqrt(means.numel())), "batch-means", r1


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return tail if t >= 0 else 1.0 - tail


def _t_pdf(t: float, df: float) -> float:
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(log_c - (df + 1) / 2 * math.log1p(t * t / df))


@lru_cache(maxsize=8192)
def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t: Newton steps from the normal quantile, kept inside a
    bracket (bisection when a step leaves it)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"quantile level {p}: must be in (0, 1)")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    if p == 0.5:
        return 0.0
    tail = 1.0 - p
    lo = NormalDist().inv_cdf(p)  # t quantiles lie above the normal one
    hi = 2.0 * lo
    while t_sf(hi, df) > tail:
        lo, hi = hi, 2.0 * hi
    t = lo
    for _ in range(100):
        f = t_sf(t, df) - tail  # decreasing in t
        if f > 0:
            lo = t
        else:
            hi = t
        step = t + f / _t_pdf(t, df)
        if abs(step - t) <= 1e-13 * t:
            return step
        t = step if lo < step < hi else 0.5 * (lo + hi)
        if hi - lo <= 1e-12 * hi:
            break
    return t


def df_floor(df: float) -> int:
    """Degrees of freedom rounded *down* onto a coarse grid (exact up to 30, then 5 % steps up to
    10^4): a slightly wider interval, and few distinct quantiles to compute."""
    if df <= 30:
        return max(1, math.floor(df))
    k = math.floor(math.log(min(df, 1e4) / 30) / math.log(1.05))
    return math.floor(30 * 1.05**k)
