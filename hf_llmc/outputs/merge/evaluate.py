"""Evaluation of a merge: A, B and the merged model on the same token blocks, and the barrier of
the merged groups along their own path (the numbers a merge's model card shows)."""

from __future__ import annotations

import math

from ...analyses.barrier import barrier_from_stats, is_endpoint
from ...config.data import DataConfig
from ...config.merge import MergeSpec
from ...config.security import public_name
from ...engine.data import blocks_for, sets_for
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

    With several named evaluation sets, every set is evaluated (endpoints once per set) and the
    result holds ``sets`` (name -> the numbers above) and ``averages`` (``mean``: token-weighted,
    ``macro``: equal weights); its top-level numbers are the token-weighted means.
    """
    if isinstance(data, DataConfig) and data.multiple or isinstance(data, (dict, list, tuple)):
        return _evaluate_sets(pair, spec, data, batch_size=batch_size)
    return _evaluate_one(pair, spec, blocks_for(pair, data), getattr(data, "dataset", None), batch_size=batch_size)


def _evaluate_sets(pair, spec: MergeSpec, data, *, batch_size: int | None = None) -> dict:
    configs = dict(data.named()) if isinstance(data, DataConfig) else {}
    sets = sets_for(pair, data)
    per = {b.name: _evaluate_one(pair, spec, b, getattr(configs.get(b.name), "dataset", None), batch_size=batch_size)
           for b in sets}
    averages = {how: _average(list(per.values()), how) for how in ("mean", "macro")}
    out = {**averages["mean"], "data": f"{len(per)} evaluation sets", "dataset": None,
           "fingerprint": {n: e["fingerprint"] for n, e in per.items()}, "sets": per, "averages": averages}
    return out


def _average(results: list[dict], how: str) -> dict:
    """The token-weighted (``mean``) or plain (``macro``) average of per-set merge evaluations."""
    tokens = [e["tokens"] for e in results]
    w = [t / sum(tokens) if how == "mean" else 1.0 / len(results) for t in tokens]

    def avg(get) -> float:
        return sum(wk * get(e) for wk, e in zip(w, results))

    def model(which: str) -> dict:
        loss = avg(lambda e: e[which]["loss"])
        return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else float("inf"),
                "accuracy": avg(lambda e: e[which]["accuracy"]), "tokens": sum(e[which]["tokens"] for e in results)}

    first = results[0]
    curve = [avg(lambda e, i=i: e["curve"]["barrier"][i]) for i in range(len(first["curve"]["alphas"]))]
    out = {"tokens": sum(tokens), "a": model("a"), "b": model("b"), "merged": model("merged"),
           "barrier_max": max(curve), "barrier_mid": avg(lambda e: e["barrier_mid"]),
           "barrier_mid_se": math.sqrt(sum((wk * e["barrier_mid_se"]) ** 2 for wk, e in zip(w, results))),
           "curve": {"alphas": first["curve"]["alphas"], "barrier": curve}}
    if "merge_barrier" in first:
        out["alpha"] = first["alpha"]
        out["merge_barrier"] = avg(lambda e: e["merge_barrier"])
    return out


def _evaluate_one(pair, spec: MergeSpec, blocks, dataset: str | None, *, batch_size: int | None = None) -> dict:
    """:func:`evaluate_merge` on one set of token blocks."""
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
    if alpha is not None and getattr(pair, "vocab", None) is None:
        merged = curve[alpha]
    else:  # several α, or the union rows of vocabularies that differ (also where embed / head stay)
        with merged_state(pair, spec):
            merged = check_finite(ev.run(state=MERGED), "the merged model")
    out = {
        "data": public_name(blocks.source),
        "dataset": dataset,
        "fingerprint": blocks.fingerprint,
        "tokens": merged.tokens,
        **({"chat": blocks.chat} if blocks.chat else {}),
        "a": stats["a"].to_dict(),
        "b": stats["b"].to_dict(),
        "merged": merged.to_dict(),
        "barrier_max": result.barrier_max,
        "barrier_mid": result.barrier_mid,
        "barrier_mid_se": result.barrier_mid_se,
        "curve": {"alphas": result.alphas, "loss": result.loss,
                  "barrier": [loss - ((1 - a) * result.loss_a + a * result.loss_b) for a, loss in zip(result.alphas, result.loss)]},
    }
    if result.bpb_barrier_mid is not None:
        out.update(bpb_barrier_mid=result.bpb_barrier_mid, bpb_barrier_max=result.bpb_barrier_max)
    if alpha is not None:
        out["alpha"] = alpha
        out["merge_barrier"] = merged.loss - ((1 - alpha) * stats["a"].loss + alpha * stats["b"].loss)
    return out
