"""Barrier curves from per-block losses (definitions in DESIGN.md).

The reference line always uses the *full* endpoint models: R(α) = (1-α)·L_A + α·L_B. Standard
errors come from paired per-block differences (the same blocks at every α and both endpoints).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from .evaluation import BlockStats

DEFAULT_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


#: Most points on one path: each costs an evaluation of the whole data set.
MAX_ALPHAS = 1001


def parse_alphas(text: str | int | list | tuple, *, allow_extrapolation: bool = False, ensure_mid: bool = True) -> list[float]:
    """``"0,0.25,0.5"`` or ``"N"`` (N evenly spaced points on [0, 1]) -> sorted unique floats."""
    if isinstance(text, (list, tuple)):
        values = [float(v) for v in text]
    else:
        raw = str(text).strip()
        if not raw:
            raise ValueError("--alphas: empty list; give e.g. 0,0.25,0.5,0.75,1 or a count like 5")
        if raw.isdigit() and "," not in raw and int(raw) >= 2:
            n = int(raw)
            if n > MAX_ALPHAS:
                raise ValueError(f"--alphas {raw}: at most {MAX_ALPHAS} points (each is a full evaluation)")
            values = [i / (n - 1) for i in range(n)]
        else:
            try:
                values = [float(v) for v in raw.split(",")]
            except ValueError:
                raise ValueError(f"--alphas {raw}: not a comma-separated list of numbers or a count >= 2") from None
    if not values:
        raise ValueError("--alphas: empty list")
    if len(values) > MAX_ALPHAS:
        raise ValueError(f"--alphas: {len(values)} values; at most {MAX_ALPHAS} points (each is a full evaluation)")
    for v in values:
        check_alpha(v, allow_extrapolation=allow_extrapolation)
    if ensure_mid:
        values.append(0.5)
    return sorted(set(values))


def check_alpha(value: float, *, allow_extrapolation: bool = False, what: str = "--alphas",
                error: type[ValueError] = ValueError) -> None:
    """Refuse a non-finite α, and one outside [0, 1] unless extrapolation is allowed."""
    if not math.isfinite(value):
        raise error(f"{what}: {value} is not a finite number")
    if not allow_extrapolation and not 0.0 <= value <= 1.0:
        raise error(f"alpha {value:g} is outside [0, 1]; pass --allow-extrapolation to extrapolate")


def standard_error(x: torch.Tensor) -> float:
    """Standard error of the mean of ``x`` (NaN for fewer than two values)."""
    n = x.numel()
    return float(x.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")


@dataclass
class BarrierResult:
    """A barrier curve: per-α loss / perplexity / accuracy, endpoint values and barriers."""

    alphas: list[float]
    loss: list[float]
    perplexity: list[float]
    accuracy: list[float]
    loss_a: float
    loss_b: float
    accuracy_a: float
    accuracy_b: float
    barrier_max: float
    barrier_mid: float
    barrier_mid_se: float
    error_barrier_max: float
    error_barrier_mid: float
    error_barrier_mid_se: float
    tokens: int
    layers: str | None = None
    base: str = "a"
    method: str = "lerp"
    extra: dict = field(default_factory=dict)

    @property
    def barrier_mid_ratio(self) -> float:
        """Barrier as a perplexity ratio exp(barrier_mid)."""
        return math.exp(self.barrier_mid) if self.barrier_mid < 700 else float("inf")

    @property
    def barrier_max_ratio(self) -> float:
        return math.exp(self.barrier_max) if self.barrier_max < 700 else float("inf")

    @property
    def finite(self) -> bool:
        return all(math.isfinite(v) for v in self.loss + [self.loss_a, self.loss_b])

    def to_dict(self) -> dict:
        out = asdict(self)
        extra = out.pop("extra")
        out.update(barrier_mid_ratio=self.barrier_mid_ratio, barrier_max_ratio=self.barrier_max_ratio)
        out.update(extra)
        return out


def barrier_from_stats(
    curve: dict[float, BlockStats], stat_a: BlockStats, stat_b: BlockStats, **meta
) -> BarrierResult:
    """Build a :class:`BarrierResult` from per-α stats and the full endpoint models' stats."""
    alphas = sorted(curve)
    la, lb = stat_a.loss, stat_b.loss
    ea, eb = 1.0 - stat_a.accuracy, 1.0 - stat_b.accuracy
    interior = [a for a in alphas if 0.0 < a < 1.0] or alphas
    barrier_max = max(curve[a].loss - ((1 - a) * la + a * lb) for a in interior)
    err_max = max((1.0 - curve[a].accuracy) - ((1 - a) * ea + a * eb) for a in interior)
    mid = curve.get(0.5)
    if mid is not None:
        d = mid.block_loss - 0.5 * (stat_a.block_loss + stat_b.block_loss)
        de = mid.block_error - 0.5 * (stat_a.block_error + stat_b.block_error)
        b_mid, b_mid_se = mid.loss - 0.5 * (la + lb), standard_error(d)
        e_mid, e_mid_se = (1.0 - mid.accuracy) - 0.5 * (ea + eb), standard_error(de)
    else:
        b_mid = b_mid_se = e_mid = e_mid_se = float("nan")
    return BarrierResult(
        alphas=alphas,
        loss=[curve[a].loss for a in alphas],
        perplexity=[curve[a].perplexity for a in alphas],
        accuracy=[curve[a].accuracy for a in alphas],
        loss_a=la,
        loss_b=lb,
        accuracy_a=stat_a.accuracy,
        accuracy_b=stat_b.accuracy,
        barrier_max=barrier_max,
        barrier_mid=b_mid,
        barrier_mid_se=b_mid_se,
        error_barrier_max=err_max,
        error_barrier_mid=e_mid,
        error_barrier_mid_se=e_mid_se,
        tokens=stat_a.tokens,
        **meta,
    )
