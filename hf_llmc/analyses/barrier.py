"""Barrier curves from per-block losses (definitions in docs/design.md).

The reference line always uses the *full* endpoint models: R(α) = (1-α)·L_A + α·L_B. Standard
errors come from paired per-block differences (the same blocks at every α and both endpoints).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from ..config.alphas import DEFAULT_ALPHAS, AlphaGrid, parse_alphas
from ..config.errors import NonFiniteLossError, UsageError
from ..config.scan import METHODS, Method, Metric, SequentialConfig, Which
from ..engine.data import DataSource, SetsSource, blocks_for, sets_for
from ..engine.evaluation import BlockStats, Evaluator, check_finite, endpoint, evaluator_for, point
from ..engine.stats import paired_standard_error
from ..model.selection import union
from .sequential import SequentialEstimator, estimate

if TYPE_CHECKING:
    from ..model.pair import ModelPair
    from ..model.selection import Group


@dataclass
class BarrierResult:
    """A barrier curve: per-α loss / perplexity / accuracy, endpoint values and barriers.

    Barriers are in nats above the reference line R(α) = (1-α)·L_A + α·L_B of the full endpoint
    models; error barriers are the same on the top-1 error rate.

    Attributes:
        alphas: the α grid, sorted.
        loss: mean loss at each α (nats).
        perplexity: perplexity at each α.
        accuracy: top-1 accuracy at each α.
        loss_a: loss of the full model A.
        loss_b: loss of the full model B.
        accuracy_a: accuracy of the full model A.
        accuracy_b: accuracy of the full model B.
        barrier_max: largest barrier over the whole α grid (0 and 1 included: on a layer-wise path
            α = 1 into A is A with B's group, a real point of the path; on the full path they give 0).
        barrier_mid: barrier at α = 0.5.
        barrier_mid_se: paired standard error of ``barrier_mid`` over the token blocks.
        error_barrier_max: largest error-rate barrier over the whole α grid.
        error_barrier_mid: error-rate barrier at α = 0.5.
        error_barrier_mid_se: paired standard error of ``error_barrier_mid``.
        tokens: predicted tokens of the endpoint evaluation.
        layers: the layer spec of the path (None = the full model).
        base: the model the unselected tensors come from.
        method: the interpolation method.
        bits_per_byte: bits per byte at each α (None when the data has no byte counts; so are the
            other ``*bits_per_byte*`` / ``bpb_*`` fields).
        bits_per_byte_a: bits per byte of the full model A.
        bits_per_byte_b: bits per byte of the full model B.
        bpb_barrier_max: ``barrier_max`` in bits per byte.
        bpb_barrier_mid: ``barrier_mid`` in bits per byte (the barrier of the bits per byte at α = 0.5).
        bpb_barrier_mid_se: its standard error.
        bytes: UTF-8 bytes covered by the predicted tokens of the endpoint evaluation.
        extra: further fields merged into :meth:`to_dict` (sequential estimation: interval,
            decision, tokens evaluated, ...).
    """

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
    bits_per_byte: list[float] | None = None
    bits_per_byte_a: float | None = None
    bits_per_byte_b: float | None = None
    bpb_barrier_max: float | None = None
    bpb_barrier_mid: float | None = None
    bpb_barrier_mid_se: float | None = None
    bytes: int | None = None
    extra: dict = field(default_factory=dict)

    def set_bpb(self, curve: dict[float, BlockStats], stat_a: BlockStats, stat_b: BlockStats) -> None:
        """Fill the bits-per-byte fields from the statistics (nothing when the bytes are unknown).

        Every point is on the endpoints' blocks, so a bits-per-byte barrier is the nats barrier times
        tokens / (ln 2 · bytes) of those blocks.

        Args:
            curve: statistics per α.
            stat_a: statistics of the full model A.
            stat_b: statistics of the full model B.
        """
        scale = bpb_scale(stat_a)
        if scale is None or any(curve[a].bits_per_byte is None for a in self.alphas):
            return
        self.bits_per_byte = [curve[a].bits_per_byte for a in self.alphas]
        self.bits_per_byte_a, self.bits_per_byte_b = stat_a.bits_per_byte, stat_b.bits_per_byte
        self.bytes = stat_a.bytes
        self.bpb_barrier_max = self.barrier_max * scale
        self.bpb_barrier_mid = self.barrier_mid * scale
        self.bpb_barrier_mid_se = self.barrier_mid_se * scale

    @property
    def barrier_mid_ratio(self) -> float:
        """Barrier as a perplexity ratio exp(barrier_mid)."""
        return math.exp(self.barrier_mid) if self.barrier_mid < 700 else float("inf")

    @property
    def barrier_max_ratio(self) -> float:
        """Largest barrier as a perplexity ratio exp(barrier_max)."""
        return math.exp(self.barrier_max) if self.barrier_max < 700 else float("inf")

    @property
    def finite(self) -> bool:
        """Whether every loss of the curve and both endpoints is finite."""
        return all(math.isfinite(v) for v in self.loss + [self.loss_a, self.loss_b])

    def to_dict(self) -> dict:
        """The result as one flat JSON-ready dict (what ``hf-llmc barrier --json`` prints).

        Returns:
            Every field except ``extra``, whose items are merged in, plus ``barrier_mid_ratio`` and
            ``barrier_max_ratio``.
        """
        out = asdict(self)
        extra = out.pop("extra")
        out.update(barrier_mid_ratio=self.barrier_mid_ratio, barrier_max_ratio=self.barrier_max_ratio)
        out.update(extra)
        return out


def bpb_scale(stats: BlockStats) -> float | None:
    """The factor that turns nats per token into bits per byte on these blocks.

    Args:
        stats: statistics of some blocks.

    Returns:
        tokens / (ln 2 · bytes), or None when the bytes are unknown (or 0).
    """
    return stats.tokens / (math.log(2) * stats.bytes) if stats.bytes else None


def barrier_from_stats(
    curve: dict[float, BlockStats], stat_a: BlockStats, stat_b: BlockStats, **meta: Any
) -> BarrierResult:
    """A :class:`BarrierResult` from the statistics of each path point and of both full endpoint models.

    Args:
        curve: statistics per α, on the same blocks as the endpoints (paired).
        stat_a: statistics of the full model A.
        stat_b: statistics of the full model B.
        **meta: ``layers``, ``base``, ``method`` (or ``extra``) of the result.

    Returns:
        The result; without α = 0.5 in ``curve`` the ``*_mid`` fields are NaN.
    """
    alphas = sorted(curve)
    la, lb = stat_a.loss, stat_b.loss
    ea, eb = 1.0 - stat_a.accuracy, 1.0 - stat_b.accuracy
    barrier_max = max(curve[a].loss - ((1 - a) * la + a * lb) for a in alphas)  # the sup over the path
    err_max = max((1.0 - curve[a].accuracy) - ((1 - a) * ea + a * eb) for a in alphas)
    mid = curve.get(0.5)
    if mid is not None:
        d = mid.block_loss - 0.5 * (stat_a.block_loss + stat_b.block_loss)
        de = mid.block_error - 0.5 * (stat_a.block_error + stat_b.block_error)
        b_mid = mid.loss - 0.5 * (la + lb)
        b_mid_se, se_method, lag1 = paired_standard_error(d, mid.indices, mid.weights)
        e_mid, (e_mid_se, _, _) = (1.0 - mid.accuracy) - 0.5 * (ea + eb), paired_standard_error(de, mid.indices, mid.weights)
        meta = {**meta, "extra": {**meta.get("extra", {}), "se_method": se_method, "lag1_correlation": lag1}}
    else:
        b_mid = b_mid_se = e_mid = e_mid_se = float("nan")
    result = BarrierResult(
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
    result.set_bpb(curve, stat_a, stat_b)
    return result


def is_endpoint(alpha: float, base: str, full_path: bool) -> str | None:
    """Which endpoint model a path point is, if any, so that it is not evaluated twice.

    Args:
        alpha: the point.
        base: the model the unselected tensors come from.
        full_path: whether the path moves the full model.

    Returns:
        ``"a"`` for α = 0 into A, ``"b"`` for α = 1 into B, and on the full path ``"a"`` / ``"b"``
        for α = 0 / 1 whatever the base; None for every other point.
    """
    if alpha == 0.0 and (base == "a" or full_path):
        return "a"
    if alpha == 1.0 and (base == "b" or full_path):
        return "b"
    return None


def barrier(
    pair: ModelPair,
    data: DataSource,
    layers: str | None = None,
    alphas: AlphaGrid = DEFAULT_ALPHAS,
    base: Which = "a",
    method: Method = "lerp",
    *,
    batch_size: int | None = None,
    prefix: bool = True,
    allow_extrapolation: bool = False,
    sequential: SequentialConfig | None = None,
    metric: Metric = "loss",
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
        metric: what the sequential rule decides on: ``"loss"`` (nats) or ``"bpb"`` (bits per byte;
            its interval and ``decide`` threshold are then in bits per byte).

    Returns:
        The :class:`BarrierResult` (losses, accuracies, barriers with paired standard errors).

    Raises:
        UsageError: a bad method, base, α list (:class:`~hf_llmc.config.errors.AlphaError`) or
            layer spec (:class:`~hf_llmc.config.errors.SpecError`), or ``metric="bpb"`` on data without
            byte counts (token ids, chat data).
        DataError: the data cannot be read or cut into blocks.
        PairError: text was given but the pair has no tokenizer.
        NonFiniteLossError: an evaluation gave NaN or inf.
    """
    if method not in METHODS:
        raise UsageError(f"method={method!r}: use one of {', '.join(METHODS)}")
    if base not in ("a", "b"):
        raise UsageError(f"base={base!r}: use a or b")
    alphas = parse_alphas(alphas, allow_extrapolation=allow_extrapolation)
    blocks = blocks_for(pair, data)
    if metric == "bpb" and blocks.bpb_missing:
        raise UsageError(blocks.bpb_missing)
    ev = evaluator_for(pair, blocks, batch_size)
    group = pair.full_group() if layers is None else union(pair.groups(layers), pair.arch, layers)
    if sequential is not None:
        result = sequential_barrier(pair, ev, group, alphas, sequential, base=base, method=method, prefix=prefix,
                                    layers=layers, scale=blocks.bpb_scale if metric == "bpb" else 1.0)
    else:
        # Endpoints first, ending on the base so the path points need no extra switch.
        order = ("b", "a") if base == "a" else ("a", "b")
        stats = {w: endpoint(pair, w, ev, blocks) for w in order}
        curve: dict[float, BlockStats] = {}
        for alpha in alphas:
            which = is_endpoint(alpha, base, group.name == "full")
            curve[alpha] = stats[which] if which else check_finite(
                point(pair, ev, group, alpha, base=base, method=method, prefix=prefix), f"{group.name} at alpha={alpha}")
        result = barrier_from_stats(curve, stats["a"], stats["b"], layers=layers, base=base, method=method)
    rounded = [pair.interp.rounding[a] for a in result.alphas if a in pair.interp.rounding]
    if rounded and group.name == "full":  # a low-precision full path: how far its points are off the path
        result.extra["rounded_points"] = rounded
    if getattr(pair, "vocab", None) is not None:  # vocabularies that differ by added tokens
        result.extra["vocabulary"] = pair.vocab.describe()
    return result


def sequential_barrier(pair: ModelPair, ev: Evaluator, group: Group, alphas: list[float], cfg: SequentialConfig, *,
                       base: Which = "a", method: Method = "lerp", prefix: bool = True,
                       layers: str | None = None, scale: float = 1.0) -> BarrierResult:
    """:func:`barrier` with sequential estimation, evaluating only as many blocks as the error bar needs.

    The α = 0.5 point runs the stopping rule; every other α is then evaluated on the same n blocks.

    Args:
        pair: the loaded pair.
        ev: an evaluator of the pair's live model on the token blocks.
        group: the tensors moved along the path.
        alphas: the α grid (parsed).
        cfg: the stopping rule and block order.
        base: the model the unselected tensors come from.
        method: ``"lerp"`` or ``"slerp"`` per tensor.
        prefix: reuse the base model's hidden states before the group's first block.
        layers: the layer spec recorded in the result.
        scale: the rule runs on per-block losses times ``scale`` (bits per byte: the blocks'
            ``bpb_scale``); barriers are reported in nats, the interval in the rule's unit.

    Returns:
        The result. Losses and accuracies are measured on the n blocks; ``barrier_mid`` /
        ``barrier_max`` and ``extra["barrier_curve"]`` (per α) are the regression estimates (they
        also use the endpoints' m >= n blocks); ``barrier_mid_se`` and ``extra["barrier_mid_interval"]``
        belong to ``barrier_mid``.

    Raises:
        NonFiniteLossError: an evaluation gave NaN or inf.
    """
    est = SequentialEstimator(pair, ev, ev.blocks.shape[0], cfg, scale=scale)
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
        barriers[alpha] = (look.mean if alpha == 0.5 else estimate(
            est.differences(curve[alpha], alpha), g, look.i, look.j, est.rule).mean) / scale
    result = barrier_from_stats(curve, stat_a, stat_b, layers=layers, base=base, method=method)
    result.barrier_mid, result.barrier_mid_se = look.mean / scale, look.se / scale
    result.extra.update(se_method="sequential", lag1_correlation=None)  # its own interval (random block order)
    result.barrier_max = max(barriers.values())
    result.set_bpb(curve, stat_a, stat_b)
    fields = outcome.fields(mid.tokens_per_block)
    result.extra.update(
        barrier_curve=[barriers[a] for a in result.alphas],
        barrier_mid_interval=fields.pop("interval"), **fields, confidence=cfg.confidence, threshold=cfg.decide,
        target_se=cfg.target_se, tokens_evaluated=round(est.blocks_evaluated * mid.tokens_per_block),
        sequential=cfg.result_settings(), interval_description=est.rule.description(),
        assumption=est.rule.assumption(), **({"metric": "bpb"} if scale != 1.0 else {}),
    )
    return result


def barrier_sets(
    pair: ModelPair,
    data: SetsSource,
    layers: str | None = None,
    alphas: AlphaGrid = DEFAULT_ALPHAS,
    base: Which = "a",
    method: Method = "lerp",
    *,
    batch_size: int | None = None,
    prefix: bool = True,
    allow_extrapolation: bool = False,
    sequential: SequentialConfig | None = None,
    metric: Metric = "loss",
) -> dict[str, BarrierResult]:
    """:func:`barrier` on several named evaluation sets in one run.

    The endpoints are evaluated once per set; each path point is set in the live model once and
    evaluated on every set (prefix reuse per set). With ``sequential`` every set runs its own
    stopping rule (the same seeded block order).

    Args:
        pair: a loaded :class:`~hf_llmc.ModelPair`.
        data: the sets (see :func:`~hf_llmc.engine.data.sets_for`), e.g. ``{"docs": "docs.txt", "code": "code.txt"}``.
        layers: a layer spec; None = the full model.
        alphas: the α grid; 0.5 is always added.
        base: the model the unselected tensors come from.
        method: ``"lerp"`` or ``"slerp"`` per tensor.
        batch_size: blocks per forward (default: automatic).
        prefix: reuse the base model's hidden states before the group's first block.
        allow_extrapolation: allow α outside [0, 1].
        sequential: sequential estimation per set; None = every block.
        metric: what each set's sequential rule decides on (see :func:`barrier`).

    Returns:
        Set name -> its :class:`BarrierResult` (a single unnamed set is named ``"data"``), in the order given.

    Raises:
        UsageError: a bad method, base, α list or layer spec.
        DataError: the data cannot be read or cut into blocks.
        PairError: text was given but the pair has no tokenizer.
        NonFiniteLossError: an evaluation gave NaN or inf.
    """
    if method not in METHODS:
        raise UsageError(f"method={method!r}: use one of {', '.join(METHODS)}")
    if base not in ("a", "b"):
        raise UsageError(f"base={base!r}: use a or b")
    alphas = parse_alphas(alphas, allow_extrapolation=allow_extrapolation)
    sets = sets_for(pair, data)
    names = [b.name or "data" for b in sets]
    if sequential is not None:  # each set stops on its own
        return {n: barrier(pair, b, layers, alphas, base, method, batch_size=batch_size, prefix=prefix,
                           allow_extrapolation=allow_extrapolation, sequential=sequential, metric=metric)
                for n, b in zip(names, sets)}
    evs = [evaluator_for(pair, b, batch_size) for b in sets]
    group = pair.full_group() if layers is None else union(pair.groups(layers), pair.arch, layers)
    ends: list[dict[str, BlockStats]] = [{} for _ in sets]
    for which in ("b", "a") if base == "a" else ("a", "b"):  # ending on the base
        for k, (b, ev) in enumerate(zip(sets, evs)):
            ends[k][which] = endpoint(pair, which, ev, b)
    curves: list[dict[float, BlockStats]] = [{} for _ in sets]
    start = group.first_block if prefix and group.first_block else None
    for alpha in alphas:
        which = is_endpoint(alpha, base, group.name == "full")
        if which:
            for k in range(len(sets)):
                curves[k][alpha] = ends[k][which]
            continue
        pair.interp.set_base(base)
        with pair.interp.at([group], alpha, method):  # set once, evaluated on every set
            for k, ev in enumerate(evs):
                curves[k][alpha] = check_finite(ev.run(None, start_block=start, state=base),
                                                f"{group.name} at alpha={alpha} ({names[k]})")
    out = {}
    for k, name in enumerate(names):
        result = barrier_from_stats(curves[k], ends[k]["a"], ends[k]["b"], layers=layers, base=base, method=method)
        rounded = [pair.interp.rounding[a] for a in result.alphas if a in pair.interp.rounding]
        if rounded and group.name == "full":
            result.extra["rounded_points"] = rounded
        out[name] = result
    return out


def average_barriers(results: dict[str, BarrierResult]) -> dict[str, dict]:
    """The token-weighted (``mean``) and the plain (``macro``) average of barriers over sets.

    Standard errors combine as for independent sets: sqrt(Σ w_s² se_s²).

    Args:
        results: set name -> its result.

    Returns:
        ``{"mean": {...}, "macro": {...}}``, each with ``barrier_mid``, ``barrier_mid_se``,
        ``barrier_max`` (the average curve's largest value) and, when every set has byte counts,
        ``bpb_barrier_mid`` / ``bpb_barrier_max`` (the ``mean`` weighted by bytes).
    """
    rs = list(results.values())
    out = {}
    total_tokens = sum(r.tokens for r in rs)
    for how in ("mean", "macro"):
        w = [r.tokens / total_tokens if how == "mean" else 1.0 / len(rs) for r in rs]
        curve = [sum(wk * (r.loss[i] - ((1 - a) * r.loss_a + a * r.loss_b)) for wk, r in zip(w, rs))
                 for i, a in enumerate(rs[0].alphas)]
        entry = {"barrier_mid": sum(wk * r.barrier_mid for wk, r in zip(w, rs)),
                 "barrier_mid_se": math.sqrt(sum((wk * r.barrier_mid_se) ** 2 for wk, r in zip(w, rs))),
                 "barrier_max": max(curve) if all(r.alphas == rs[0].alphas for r in rs) else None,
                 "tokens": total_tokens}
        if all(r.bpb_barrier_mid is not None for r in rs):
            nbytes = [r.bytes for r in rs]
            wb = [b / sum(nbytes) for b in nbytes] if how == "mean" else w
            entry["bpb_barrier_mid"] = sum(wk * r.bpb_barrier_mid for wk, r in zip(wb, rs))
            entry["bpb_barrier_mid_se"] = math.sqrt(sum((wk * r.bpb_barrier_mid_se) ** 2 for wk, r in zip(wb, rs)))
        out[how] = entry
    return out
