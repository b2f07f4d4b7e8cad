"""Evaluation of a merge: A, B and the merged model on the same token blocks, and the barrier of
the merged groups along their own path (the numbers a merge's model card shows)."""

from __future__ import annotations

from ...analyses.barrier import barrier_from_stats, is_endpoint
from ...config.merge import MergeSpec
from ...config.security import public_name
from ...engine.data import blocks_for
from ...engine.evaluation import check_finite, endpoint, evaluator_for, point
from ...model.selection import union
from .live import MERGED, merged_state
from .plan import plan_merge

EVAL_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def evaluate_merge(pair, spec: MergeSpec, data, *, batch_size: int | None = None) -> dict:
    """Loss / perplexity / accuracy of A, B and the merged model, and the barrier of the merged groups.

    The barrier is that of the union of the merged groups along its own path into the base
    (docs/design.md definitions, α grid 0, 0.25, 0.5, 0.75, 1 plus the merge α). ``merge_barrier`` is
    L(merged) − ((1−α)·L_A + α·L_B) when the spec uses one α.
    """
    blocks = blocks_for(pair, data)
    ev = evaluator_for(pair, blocks, batch_size)
    order = ("b", "a") if spec.base == "a" else ("a", "b")
    stats = {w: endpoint(pair, w, ev, blocks) for w in order}
    plan = plan_merge(pair.arch, spec)
    group = union(plan.groups, pair.arch, spec.describe())
    alpha = spec.single_alpha
    grid = sorted(set(EVAL_ALPHAS) | ({alpha} if alpha is not None else set()))
    curve = {}
    for a in grid:
        which = is_endpoint(a, spec.base, full_path=False)
        curve[a] = stats[which] if which else check_finite(
            point(pair, ev, group, a, base=spec.base, method=spec.method), f"{group.name} at alpha={a:g}")
    result = barrier_from_stats(curve, stats["a"], stats["b"], layers=spec.describe(), base=spec.base, method=spec.method)
    if alpha is not None:
        merged = curve[alpha]
    else:
        with merged_state(pair, spec):
            merged = check_finite(ev.run(state=MERGED), "the merged model")
    out = {
        "data": public_name(blocks.source),
        "dataset": getattr(data, "dataset", None),
        "fingerprint": blocks.fingerprint,
        "tokens": merged.tokens,
        **({"chat": blocks.chat} if blocks.chat else {}),
        "a": stats["a"].to_dict(),
        "b": stats["b"].to_dict(),
        "merged": merged.to_dict(),
        "barrier_max": result.barrier_max,
        "barrier_mid": result.barrier_mid,
        "barrier_mid_se": result.barrier_mid_se,
        "curve": {"alphas": result.alphas, "loss": result.loss},
    }
    if alpha is not None:
        out["alpha"] = alpha
        out["merge_barrier"] = merged.loss - ((1 - alpha) * stats["a"].loss + alpha * stats["b"].loss)
    return out
