"""Merges of the live model: set ``pair.model`` to merged weights in place (no second model)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from ...config.merge import MergeSpec, as_spec
from ...model.selection import make_group
from .plan import MergePlan, plan_merge

MERGED = "merged"  # Interpolator base marker: the live model holds a merge, not a checkpoint


def _set_points(pair, plan: MergePlan) -> list[str]:
    written: list[str] = []
    for alpha, names in plan.changed().items():
        group = make_group(pair.arch, f"merge@{alpha:g}", "set", names)
        written += pair.interp.set_point([group], alpha, plan.method, hold=False)  # as the saved merge
    vocab = getattr(pair, "vocab", None)
    if vocab is not None:  # vocabularies that differ: the merge holds every union row, also where unmoved
        keep = 0.0 if plan.base == "a" else 1.0
        for name in vocab.params:
            if name not in written:
                pair.interp._write(name, pair.interp.point_tensor(name, keep, plan.method))
                written.append(name)
    return written


@contextlib.contextmanager
def merged_state(pair, spec: MergeSpec) -> Iterator[MergePlan]:
    """Context in which ``pair.model`` holds the merged weights; the base is restored on exit."""
    plan = plan_merge(pair.arch, spec)
    pair.interp.set_base(spec.base)
    written: list[str] = []
    try:
        written = _set_points(pair, plan)
        yield plan
    finally:
        pair.interp.restore(written)


def merge_live(pair, spec: MergeSpec | str | dict):
    """Set the pair's live model to the merged weights and return it (no second model is built).

    The pair's next evaluation (``point``/``endpoint``/``barrier``) streams a full base back in
    first, so the pair stays usable; the returned model is ``pair.model`` itself.
    """
    spec = as_spec(spec)
    plan = plan_merge(pair.arch, spec)
    pair.interp.set_base(spec.base)
    _set_points(pair, plan)
    pair.interp.base = MERGED  # not a checkpoint: set_base("a"/"b") rewrites every tensor
    if getattr(pair, "vocab", None) is not None:
        pair.model.config.vocab_size = pair.vocab.rows  # as the saved merge's config.json
    return pair.model
