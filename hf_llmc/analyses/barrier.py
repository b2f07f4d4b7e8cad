"""Barrier curves from per-block losses (definitions in docs/design.md).

The reference line always uses the *full* endpoint models: R(α) = (1-α)·L_A + α·L_B. Standard
errors come from paired per-block differences (the same blocks at every α and both endpoints).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from ..config.alphas import DEFAULT_ALPHAS, parse_alphas
from ..config.errors import NonFiniteLossError, UsageError
from ..config.scan import METHODS, SequentialConfig
from ..engine.data import blocks_for
from ..engine.evaluation import BlockStats, check_finite, endpoint, evaluator_for, point
from ..engine.stats import standard_error
from ..model.selection import union
from .sequential import INTERVAL_DESCRIPTION, SequentialEstimator, estimate


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


def is_endpoint(alpha: float, base: str, full_path: bool) -> str | None:
    """Which endpoint model a path point is, if any: α = 0 into A is A, α = 1 into B is B, and on
    the full path α = 0 / 1 are A / B whatever the base. None for every other point."""
    if alpha == 0.0 and (base == "a" or full_path):
        return "a"
    if alpha == 1.0 and (base == "b" or full_path):
        return "b"
    return None


def barrier(
    pair,
    data,
    layers: str | None = None,
    alphas=DEFAULT_ALPHAS,
    base: str = "a",
    method: str = "lerp",
    *,
    batch_size: int | None = None,
    prefix: bool = True,
    allow_extrapolation: bool = False,
    sequential: SequentialConfig | None = None,
) -> BarrierResult:
    """The barrier of the layer-wise path of ``layers`` into ``base``.

    Args:
        pair: a loaded :class:`~hf_llmc.ModelPair`.
        data: a :class:`~hf_llmc.DataConfig`, a local text file, token blocks or an id tensor.
        layers: a layer spec (e.g. ``"attn.0-3"``); None = the full model.
        alphas: the α grid (``"0,0.25,0.5,0.75,1"``, a count, or a sequence); 0.5 is always added.
        base: the model the unselected tensors come from, ``"a"`` or ``"b"``.
        method: ``"lerp"`` or ``"slerp"`` per tensor.
        batch_size: blocks per forward (default: automatic).
        prefix: reuse the base model's hidden states before the group's first block.
        allow_extrapolation: allow α outside [0, 1].
        sequential: stop as soon as the α = 0.5 point's error bar allows, on a seeded random
            subset of the blocks (see :mod:`hf_llmc.analyses.sequential`); None = every block.

    Returns:
        The :class:`BarrierResult` (losses, accuracies, barriers with paired standard errors).

    Raises:
        UsageError: a bad method, base, α list or layer spec.
        NonFiniteLossError: an evaluation gave NaN or inf.
    """
    if method not in METHODS:
        raise UsageError(f"method={method!r}: use one of {', '.join(METHODS)}")
    if base not in ("a", "b"):
        raise UsageError(f"base={base!r}: use a or b")
    alphas = parse_alphas(alphas, allow_extrapolation=allow_extrapolation)
    blocks = blocks_for(pair, data)
    ev = evaluator_for(pair, blocks, batch_size)
    group = pair.full_group() if layers is None else union(pair.groups(layers), pair.arch, layers)
    if sequential is not None:
        return sequential_barrier(pair, ev, group, alphas, sequential, base=base, method=method, prefix=prefix,
                                  layers=layers)
    # Endpoints first, ending on the base so the path points need no extra switch.
    order = ("b", "a") if base == "a" else ("a", "b")
    stats = {w: endpoint(pair, w, ev, blocks) for w in order}
    curve: dict[float, BlockStats] = {}
    for alpha in alphas:
        which = is_endpoint(alpha, base, group.name == "full")
        curve[alpha] = stats[which] if which else check_finite(
            point(pair, ev, group, alpha, base=base, method=method, prefix=prefix), f"{group.name} at alpha={alpha}")
    return barrier_from_stats(curve, stats["a"], stats["b"], layers=layers, base=base, method=method)


def sequential_barrier(pair, ev, group, alphas: list[float], cfg: SequentialConfig, *, base: str = "a",
                       method: str = "lerp", prefix: bool = True, layers: str | None = None):
    """:func:`barrier` with sequential estimation: the α=0.5 point runs the stopping rule;
    every other α is then evaluated on the same n blocks. Losses and accuracies are measured on
    those n blocks; ``barrier_mid`` / ``barrier_max`` and ``extra["barrier_curve"]`` (per α) are the
    regression estimates (they also use the endpoints' m >= n blocks), ``barrier_mid_se`` and
    ``barrier_mid_interval`` belong to barrier_mid."""
    est = SequentialEstimator(pair, ev, ev.blocks.shape[0], cfg)
    mid, outcome = est.evaluate(group, 0.5, base, method, prefix)
    if outcome.stop_reason == "nonfinite":
        raise NonFiniteLossError(f"{group.name} at alpha=0.5: non-finite loss; a checkpoint holds NaN/inf weights "
                                 "or the dtype overflows")
    look = outcome.look
    n, m = look.n, look.m
    stat_a, stat_b = est.endpoint("a", n), est.endpoint("b", n)
    g = est.block_losses("a", 0, m) - est.block_losses("b", 0, m)
    curve: dict[float, BlockStats] = {}
    barriers: dict[float, float] = {}
    ends = {"a": stat_a, "b": stat_b}
    for alpha in alphas:
        which = is_endpoint(alpha, base, group.name == "full")
        if alpha == 0.5:
            curve[alpha] = mid
        elif which:
            curve[alpha] = ends[which]
        else:
            curve[alpha] = check_finite(est.evaluate_fixed(group, alpha, n, base, method, prefix),
                                        f"{group.name} at alpha={alpha}")
        barriers[alpha] = look.mean if alpha == 0.5 else estimate(
            est.differences(curve[alpha], alpha), g, look.i, look.j, cfg.confidence, len(est.schedule)).mean
    result = barrier_from_stats(curve, stat_a, stat_b, layers=layers, base=base, method=method)
    interior = [a for a in barriers if 0.0 < a < 1.0] or list(barriers)
    result.barrier_mid, result.barrier_mid_se = look.mean, look.se
    result.barrier_max = max(barriers[a] for a in interior)
    fields = outcome.fields(mid.tokens_per_block)
    result.extra.update(
        barrier_curve=[barriers[a] for a in result.alphas],
        barrier_mid_interval=fields.pop("interval"), **fields, confidence=cfg.confidence, threshold=cfg.decide,
        target_se=cfg.target_se, tokens_evaluated=est.blocks_evaluated * mid.tokens_per_block,
        sequential=cfg.result_settings(), interval_description=INTERVAL_DESCRIPTION,
    )
    return result
