"""Merge search: per-group α values that keep two evaluation sets' losses low (``hf-llmc search``).

Method (docs/search.md says why): every group (one per decoder block, or ``attn.i`` / ``mlp.i``,
plus one group for the tensors outside them) takes an α from a grid. Coordinate descents start
from the uniform average (every group at 0.5); descent ``w`` minimises ``w·L₁ + (1-w)·L₂`` (L₁, L₂
the losses on the two sets), one direction after the other, each starting where the previous one
ended. A move changes one group's α; the candidate is compared with the incumbent on each set by
the sequential rule of :mod:`hf_llmc.analyses.sequential` over the *paired* per-block loss
differences (threshold 0, a tie once the standard error is <= ``resolution``), so a clearly
dominated candidate is discarded after the rule's first look. A move is accepted when it dominates
the incumbent (better on one set, not worse on the other) or, as a trade-off, when the weighted sum
of the two intervals' upper ends is below 0.

Every point a descent ends at, and the uniform path points (every group at one α), are candidates
of the front: they are compared on the same first search blocks of both sets and the
non-dominated ones form the Pareto front; the pick rule chooses one. Finally the front and the
path points are evaluated on every *held-out* block (never seen by the search) of both sets: losses
with standard errors and paired differences to A, B and the uniform average with intervals.

``OUT/search.jsonl`` gets one row per comparison, front evaluation and held-out evaluation,
flushed one at a time; ``resume`` replays the finished rows (the descent takes the same path) and
continues. ``OUT/search.json`` holds the settings, models, sets, groups and the result.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..config.alphas import format_number
from ..config.data import DataConfig
from ..config.errors import ScanSettingsError, SearchError
from ..config.files import write_json_atomic
from ..config.scan import SequentialConfig
from ..config.search import SearchConfig, parse_named_sets
from ..config.security import display_name
from ..engine.data import DataSource, TokenBlocks, blocks_for
from ..engine.evaluation import check_finite, evaluator_for
from ..engine.io import RowWriter, Sources, check_run_dir, output_path, prepare_run_dir, read_rows
from ..engine.provenance import library_versions
from ..engine.stats import paired_standard_error, t_quantile
from ..model.checkpoint.lazy import fingerprint
from ..model.selection import Group, block_group, make_group
from .scan import settings_hash
from .sequential import block_order, make_rule, run_looks

if TYPE_CHECKING:
    from ..model.architecture import Architecture
    from ..model.pair import ModelPair

ROWS = "search.jsonl"
MANIFEST = "search.json"
REST = "other"


# -- sets ---------------------------------------------------------------------------------------------
def load_sets(pair: ModelPair, sets: dict[str, DataSource], base: DataConfig | None = None) -> dict[str, TokenBlocks]:
    """Token blocks of each named evaluation set (one :class:`DataConfig` per set).

    Args:
        pair: the loaded pair (text is tokenized with A's tokenizer).
        sets: ``{name: source}``; a path becomes ``base`` with ``data=path``.
        base: the shared data settings (``seq_len``, ``max_tokens``, ...; default: the defaults).

    Returns:
        ``{name: blocks}`` in the order given.

    Raises:
        DataError: a set cannot be read or cut into blocks.
    """
    out = {}
    for name, source in sets.items():
        if isinstance(source, (str, os.PathLike)):
            fields_ = {k: v for k, v in vars(base).items() if k not in ("data", "dataset")} if base else {}
            source = DataConfig(data=str(source), **fields_)
        out[name] = blocks_for(pair, source)
    return out


# -- groups -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SearchGroup:
    """A group that gets its own α: its label, the layer spec a merge writes it with, and its tensors.

    Attributes:
        label: ``block.3``, ``attn.3`` ... or ``other`` (every tensor outside the other groups).
        spec: the layer spec of the group (``block.3``; for ``other`` e.g. ``embed,final_norm,head``).
        group: the resolved group.
    """

    label: str
    spec: str
    group: Group


def search_groups(arch: Architecture, granularity: str) -> list[SearchGroup]:
    """The groups of a search: per block (``block``) or per attention / MLP (``sublayer``), then ``other``.

    Every parameter lies in exactly one group, so α = 0 everywhere is A and α = 1 everywhere is B.

    Args:
        arch: the model's architecture.
        granularity: ``block`` or ``sublayer``.

    Returns:
        The groups, decoder groups in block order, ``other`` last.

    Raises:
        SearchError: an unknown granularity.
    """
    kinds = {"block": ("block",), "sublayer": ("attn", "mlp")}.get(granularity)
    if kinds is None:
        raise SearchError(f"granularity={granularity!r}: use block or sublayer")
    out: list[SearchGroup] = []
    covered: set[str] = set()
    for i in range(arch.num_blocks):
        for kind in kinds:
            g = block_group(arch, kind, i)
            if g.parameters:
                out.append(SearchGroup(g.name, g.name, g))
                covered.update(arch.canonical(p) for p in g.parameters)
    rest = [p for p in arch.parameters if p not in covered]
    if rest:
        items = []
        if granularity == "sublayer" and any(arch.blocks[i]["norm"] for i in range(arch.num_blocks)):
            items.append("norm.*")
        items += [k for k in ("embed", "final_norm", "head") if getattr(arch, k)]
        named = set()
        for k in ("embed", "final_norm", "head"):
            named.update(arch.canonical(p) for p in getattr(arch, k))
        if "norm.*" in items:
            named.update(arch.canonical(p) for i in range(arch.num_blocks) for p in arch.blocks[i]["norm"])
        left = [p for p in rest if p not in named]
        if left:  # tensors no kind names (rare): by their names
            import re

            items.append("re:^(" + "|".join(re.escape(p) for p in left) + ")$")
        out.append(SearchGroup(REST, ",".join(items), make_group(arch, REST, "set", rest)))
    return out


def alpha_key(alphas: tuple[float, ...] | list[float]) -> str:
    """The text key of an α map (one value per group, in group order): ``"0.5,0.5,0.25"``.

    Args:
        alphas: the values.

    Returns:
        The key.
    """
    return ",".join(format_number(a) for a in alphas)


def parse_key(key: str) -> tuple[float, ...]:
    """The α map of a key written by :func:`alpha_key`.

    Args:
        key: the key.

    Returns:
        The values.
    """
    return tuple(float(v) for v in key.split(","))


# -- Pareto logic and pick rules (pure) ------------------------------------------------------------------
def dominates(p: tuple[float, float], q: tuple[float, float]) -> bool:
    """Whether point ``p`` dominates ``q``: no larger loss on either set, smaller on one.

    Args:
        p: ``(loss on set 1, loss on set 2)``.
        q: the same for the other point.

    Returns:
        True when ``p`` dominates ``q``.
    """
    return p[0] <= q[0] and p[1] <= q[1] and (p[0] < q[0] or p[1] < q[1])


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """The non-dominated points (equal points are all kept), sorted by the first set's loss.

    Args:
        points: ``{key: (loss on set 1, loss on set 2)}``.

    Returns:
        The keys of the front.
    """
    keep = [k for k, p in points.items() if not any(dominates(q, p) for j, q in points.items() if j != k)]
    return sorted(keep, key=lambda k: (points[k][0], points[k][1], k))


def worst_increase(point: tuple[float, float], best: tuple[float, float]) -> float:
    """The larger of a point's two loss increases over the better endpoint's loss on each set.

    Args:
        point: ``(loss on set 1, loss on set 2)``.
        best: the better endpoint's loss on each set.

    Returns:
        ``max(point[0] - best[0], point[1] - best[1])``.
    """
    return max(point[0] - best[0], point[1] - best[1])


def pick_point(points: dict[str, tuple[float, float]], best: tuple[float, float], rule: tuple[str, object],
               set_names: list[str], tolerance: float = 0.02) -> str:
    """The front point a pick rule chooses.

    Args:
        points: ``{key: (loss on set 1, loss on set 2)}`` of the front.
        best: the better endpoint's loss on each set.
        rule: from :meth:`~hf_llmc.config.search.SearchConfig.pick_rule`: ``("balanced", None)``,
            ``("set", NAME)`` or ``("weights", (w1, w2))``.
        set_names: the two sets' names (for ``("set", NAME)``).
        tolerance: nats a set's loss may exceed its better endpoint's with ``("set", NAME)``.

    Returns:
        The chosen key (ties: the first in key order).

    Raises:
        SearchError: no points, or an unknown rule or set.
    """
    if not points:
        raise SearchError("pick: the front is empty")
    kind, arg = rule
    keys = sorted(points)
    if kind == "balanced":
        return min(keys, key=lambda k: worst_increase(points[k], best))
    if kind == "weights":
        w1, w2 = arg
        return min(keys, key=lambda k: w1 * points[k][0] + w2 * points[k][1])
    if kind == "set":
        if arg not in set_names:
            raise SearchError(f"pick={arg!r}: not a set ({', '.join(set_names)})")
        s = set_names.index(arg)
        other = 1 - s
        within = [k for k in keys if points[k][s] - best[s] <= tolerance]
        if not within:  # nothing within the tolerance: the point closest to it
            return min(keys, key=lambda k: points[k][s])
        return min(within, key=lambda k: (points[k][other], points[k][s]))
    raise SearchError(f"pick: unknown rule {kind!r}")


# -- the live model at an α map -----------------------------------------------------------------------
class _Live:
    """Sets the live model to α maps (base A), moving only the groups whose α changes."""

    def __init__(self, pair: ModelPair, groups: list[SearchGroup]) -> None:
        pair.interp.set_base("a")
        self.interp = pair.interp
        self.groups = groups
        self.names = [pair.interp.canonical_names([g.group]) for g in groups]
        self.current = [0.0] * len(groups)

    def apply(self, alphas: tuple[float, ...]) -> None:
        for k, (now, new) in enumerate(zip(self.current, alphas)):
            if now == new:
                continue
            if new == 0.0:
                self.interp.restore(self.names[k])
            else:
                self.interp.set_point([self.groups[k].group], new)
            self.current[k] = new

    def reset(self) -> None:
        self.apply(tuple(0.0 for _ in self.groups))


class _Budget(Exception):
    """The token budget is spent."""


@dataclass
class _Set:
    """One evaluation set: its blocks, evaluator, search order and held-out blocks, and loss caches."""

    name: str
    blocks: TokenBlocks
    ev: object
    order: torch.Tensor  # search blocks in visiting order
    holdout: torch.Tensor  # held-out block indices (stream order)
    cache: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def tokens_per_block(self) -> int:
        return self.blocks.seq_len - 1


# -- the search ---------------------------------------------------------------------------------------
class SearchRunner:
    """One merge search into an output folder (see the module docstring).

    Args:
        pair: the loaded pair.
        sets: ``{name: blocks}`` of exactly two evaluation sets.
        cfg: the search settings (validated here).
        out_dir: the output folder.
        batch_size: blocks per forward (default: automatic).
        progress: print one line per accepted move and per phase on stderr.

    Raises:
        SearchError: not exactly two sets, bad settings, or a set with fewer than 4 token blocks.
    """

    def __init__(self, pair: ModelPair, sets: dict[str, TokenBlocks], cfg: SearchConfig, out_dir: str | os.PathLike, *,
                 batch_size: int | None = None, progress: bool = False) -> None:
        names = list(sets)
        if len(names) != 2:
            raise SearchError(f"sets: give exactly 2 named evaluation sets, got {len(names)}")
        cfg.validate(names)
        self.pair, self.cfg, self.out, self.progress = pair, cfg, output_path(out_dir), progress
        self.names = names
        self.groups = search_groups(pair.arch, cfg.granularity)
        self.grid = cfg.alpha_grid()
        self.sets: list[_Set] = []
        for name in names:
            blocks = sets[name]
            n = blocks.num_blocks
            n_hold = max(1, int(round(cfg.holdout * n)))
            if n - n_hold < 2 or n_hold < 2:
                raise SearchError(f"set {name}: {n} token blocks; need at least 4 (2 to search, 2 held out); "
                                  "give more text or a smaller --seq-len")
            ev = evaluator_for(pair, blocks, batch_size)
            order = block_order(n - n_hold, cfg.block_seed)
            self.sets.append(_Set(name, blocks, ev, order, torch.arange(n - n_hold, n)))
        self.live = _Live(pair, self.groups)
        self.rules = {}
        for s in self.sets:
            seq = SequentialConfig(decide=0.0, target_se=cfg.resolution, confidence=cfg.confidence, rule=cfg.rule,
                                   min_blocks=cfg.min_blocks, block_seed=cfg.block_seed)
            self.rules[s.name] = make_rule(seq, s.order.numel(), s.ev.batch_size)
        self.tokens = {"search": 0, "front": 0, "heldout": 0}
        self.done: dict[tuple, dict] = {}
        self.rows: list[dict] = []
        self.writer: RowWriter | None = None
        self.seconds = 0.0

    # -- identity -------------------------------------------------------------------------------------
    def hashed(self) -> dict:
        """Everything that changes the search's numbers (compared on ``resume``).

        Returns:
            ``command``, the settings that change the path, models, sets and dtype.
        """
        pair = self.pair
        settings = {k: v for k, v in self.cfg.to_dict().items() if k not in ("pick", "tolerance", "budget_tokens")}
        return {
            "command": "search",
            "settings": settings,
            "model_a": [display_name(pair.source_a), pair.ckpt_a.revision, fingerprint(pair.ckpt_a)],
            "model_b": [display_name(pair.source_b), pair.ckpt_b.revision, fingerprint(pair.ckpt_b)],
            "sets": {s.name: [s.blocks.fingerprint, s.blocks.num_blocks, s.blocks.seq_len] for s in self.sets},
            "batch_size": [s.ev.batch_size for s in self.sets],
            "dtype": str(next(iter(pair.model.parameters())).dtype).removeprefix("torch."),
        }

    def manifest(self, status: str, result: dict | None = None) -> dict:
        """The contents of ``search.json``.

        Args:
            status: ``running``, ``budget`` (stopped by the token budget) or ``complete``.
            result: the front, pick and held-out numbers (:meth:`result`), once known.

        Returns:
            The manifest.
        """
        pair = self.pair
        return {
            "command": "search",
            "status": status,
            "settings": self.cfg.to_dict(),
            "hashed": self.hashed(),
            "settings_hash": settings_hash(self.hashed()),
            "models": {"a": {"name": display_name(pair.source_a), "revision": pair.ckpt_a.revision},
                       "b": {"name": display_name(pair.source_b), "revision": pair.ckpt_b.revision}},
            "sets": {s.name: {"source": display_name(s.blocks.source), "fingerprint": s.blocks.fingerprint,
                              "num_blocks": s.blocks.num_blocks, "seq_len": s.blocks.seq_len,
                              "search_blocks": int(s.order.numel()), "holdout_blocks": int(s.holdout.numel()),
                              "first_look": self.rules[s.name].schedule[0]} for s in self.sets},
            "groups": [{"label": g.label, "spec": g.spec, "first_block": g.group.first_block, "numel": g.group.numel}
                       for g in self.groups],
            "alphas": self.grid,
            "interval_method": self.rules[self.names[0]].interval_method if not self.cfg.full_budget else "student-t-fixed",
            "assumption": self.rules[self.names[0]].assumption() if not self.cfg.full_budget else None,
            "tokens": dict(self.tokens),
            "seconds": round(self.seconds, 2),
            "versions": library_versions(),
            "result": result,
        }

    # -- evaluation -----------------------------------------------------------------------------------
    def _start(self, cand: tuple[float, ...], state: tuple[float, ...] | None) -> int | None:
        """Block whose input the candidate shares with ``state`` (None: run the whole model)."""
        if not self.cfg.prefix or state is None:
            return None
        firsts = [g.group.first_block for g, a, b in zip(self.groups, cand, state) if a != b]
        if not firsts or any(f is None for f in firsts):
            return None
        return min(firsts) or None

    def losses(self, s: _Set, cand: tuple[float, ...], n: int, state: tuple[float, ...] | None, phase: str) -> torch.Tensor:
        """Per-block losses of ``cand`` on the first ``n`` search blocks of ``s`` (cached, extended when needed).

        Args:
            s: the set.
            cand: the α map.
            n: how many blocks of the visiting order.
            state: the incumbent whose prefixes ``cand`` shares (None: no prefix reuse).
            phase: ``search`` or ``front`` (what the tokens are counted under).

        Returns:
            ``[n]`` float64 mean losses per block.

        Raises:
            NonFiniteLossError: a candidate's loss is NaN or infinite.
        """
        key = alpha_key(cand)
        have = s.cache.get(key)
        k = 0 if have is None else have.numel()
        if k >= n:
            return have[:n]
        self.live.apply(cand)
        start = self._start(cand, state)
        stats = s.ev.run(s.order[k:n], start_block=start, state=("search", alpha_key(state) if state else key))
        check_finite(stats, f"set {s.name}, candidate {key}")
        new = stats.block_loss.double()
        s.cache[key] = new if have is None else torch.cat([have, new])
        self.tokens[phase] += (n - k) * s.tokens_per_block
        return s.cache[key][:n]

    def _budget_left(self) -> bool:
        b = self.cfg.budget_tokens
        return b is None or self.tokens["search"] < b

    def compare(self, s: _Set, cand: tuple[float, ...], inc: tuple[float, ...]) -> dict:
        """The paired comparison of a candidate with the incumbent on one set (candidate − incumbent).

        Sequential (the rule of :func:`~hf_llmc.analyses.sequential.run_looks`, threshold 0, a tie once the
        standard error is <= ``resolution``), or on every search block with ``full_budget``.

        Args:
            s: the set.
            cand: the candidate's α map.
            inc: the incumbent's α map.

        Returns:
            ``estimate``, ``se``, ``interval``, ``verdict`` (``better`` / ``worse`` / ``tie``), ``blocks``
            and ``stop_reason``.

        Raises:
            SearchError: a non-finite loss difference.
        """
        N = s.order.numel()
        if self.cfg.full_budget:
            d = self.losses(s, cand, N, inc, "search") - self.losses(s, inc, N, None, "search")
            mean = float(d.mean())
            se = float(d.std(unbiased=True) / math.sqrt(N)) if N > 1 else 0.0
            half = t_quantile(1 - (1 - self.cfg.confidence) / 2, max(1, N - 1)) * se
            low, high = mean - half, mean + half
            verdict = "worse" if low > 0 else "better" if high < 0 else "tie"
            return {"estimate": mean, "se": se, "interval": [low, high], "verdict": verdict, "blocks": N,
                    "stop_reason": "full_budget"}
        runner = self

        class _Stream:
            def available(self) -> int:
                return 0

            def extend(self, m: int) -> None:
                return None

            def control(self, m: int) -> None:
                return None

            def point(self, lo: int, hi: int) -> torch.Tensor:
                x = runner.losses(s, inc, hi, None, "search")
                c = runner.losses(s, cand, hi, inc, "search")
                return (c - x)[lo:hi]

        out = run_looks(_Stream(), self.rules[s.name])
        look = out.look
        if look is None:
            raise SearchError(f"set {s.name}: non-finite loss difference for candidate {alpha_key(cand)}")
        verdict = {"above": "worse", "below": "better"}.get(out.decision or "", "tie")
        return {"estimate": look.mean, "se": look.se, "interval": [look.low, look.high], "verdict": verdict,
                "blocks": look.n, "stop_reason": out.stop_reason}

    def step(self, cand: tuple[float, ...], inc: tuple[float, ...], w: float, label: str) -> bool:
        """Compare a move with the incumbent for descent ``w``; record the row; whether it is accepted.

        Args:
            cand: the candidate (the incumbent with one group's α changed).
            inc: the incumbent.
            w: the descent's weight of the first set.
            label: the changed group's label.

        Returns:
            True when the move is accepted.
        """
        used = [s for s, weight in zip(self.sets, (w, 1 - w)) if weight > 0]
        key = (alpha_key(inc), alpha_key(cand), tuple(s.name for s in used))
        row = self.done.get(key)
        if row is None:
            if not self._budget_left():
                raise _Budget
            before = self.tokens["search"]
            res = {s.name: self.compare(s, cand, inc) for s in used}
            verdict, accepted = judge([res[s.name] for s in used], [w, 1 - w] if len(used) == 2 else [1.0])
            row = {"kind": "comparison", "group": label, "direction": w, "incumbent": key[0], "candidate": key[1],
                   "sets": res, "verdict": verdict, "accepted": accepted, "tokens": self.tokens["search"] - before}
            self._write(row)
            self.done[key] = row
        if row["accepted"] and self.progress:
            import sys

            ests = ", ".join(f"{n} {r['estimate']:+.4f}" for n, r in row["sets"].items())
            print(f"search w={w:g}: {label} -> {parse_key(row['candidate'])[self._index(label)]:g} ({ests})",
                  file=sys.stderr)
        return bool(row["accepted"])

    def _index(self, label: str) -> int:
        return next(i for i, g in enumerate(self.groups) if g.label == label)

    def descent(self, w: float, start: tuple[float, ...]) -> tuple[float, ...]:
        """One coordinate descent for weight ``w`` from ``start``.

        Args:
            w: the weight of the first set.
            start: the starting α map.

        Returns:
            The α map it ends at.
        """
        x = start
        order = sorted(range(len(self.groups)), key=lambda j: (self.groups[j].group.first_block is None,
                                                               self.groups[j].group.first_block or 0, j))
        for _sweep in range(self.cfg.max_sweeps):
            moved = False
            for j in order:
                values = sorted((v for v in self.grid if v != x[j]), key=lambda v: (abs(v - x[j]), v))
                for v in values:
                    if v == x[j]:
                        continue
                    cand = x[:j] + (v,) + x[j + 1:]
                    if self.step(cand, x, w, self.groups[j].label):
                        x, moved = cand, True
            if not moved:
                break
        return x

    # -- rows -----------------------------------------------------------------------------------------
    def _write(self, row: dict) -> None:
        self.rows.append(row)
        if self.writer is not None:
            self.writer.write(row)

    def _load_rows(self, rows: list[dict]) -> None:
        for row in rows:
            self.rows.append(row)
            if row.get("kind") == "comparison":
                key = (row["incumbent"], row["candidate"], tuple(row["sets"]))
                self.done[key] = row
                self.tokens["search"] += int(row.get("tokens", 0))
            elif row.get("kind") in ("front", "heldout"):
                self.tokens[row["kind"]] += int(row.get("tokens", 0))

    # -- phases ---------------------------------------------------------------------------------------
    def uniform(self, alpha: float) -> tuple[float, ...]:
        """The α map with every group at ``alpha`` (a point of the full path).

        Args:
            alpha: the value.

        Returns:
            The map.
        """
        return tuple(alpha for _ in self.groups)

    def search(self) -> tuple[list[tuple[float, ...]], str]:
        """Run the descents (replaying recorded comparisons).

        Returns:
            ``(ends, status)``: the α map each descent ended at (the last one possibly cut short), and
            ``complete`` or ``budget``.
        """
        x = self.uniform(0.5)
        ends = []
        status = "complete"
        for w in self.cfg.direction_weights():
            try:
                x = self.descent(w, x)
            except _Budget:
                status = "budget"
                ends.append(x)
                break
            ends.append(x)
        return ends, status

    def front_blocks(self, s: _Set) -> int:
        """Search blocks on which the front's candidates are compared (all with ``full_budget``, else the first look).

        Args:
            s: the set.

        Returns:
            The block count.
        """
        return s.order.numel() if self.cfg.full_budget else self.rules[s.name].schedule[0]

    def front(self, candidates: list[tuple[float, ...]]) -> dict[str, tuple[float, float]]:
        """Mean losses of the candidates on the same first search blocks of both sets (rows ``front``).

        Args:
            candidates: the α maps.

        Returns:
            ``{key: (loss on set 1, loss on set 2)}``.
        """
        recorded = {r["candidate"]: r for r in self.rows if r.get("kind") == "front"}
        out = {}
        for cand in candidates:
            key = alpha_key(cand)
            row = recorded.get(key)
            if row is None:
                means = {}
                before = self.tokens["front"]
                for s in self.sets:
                    means[s.name] = float(self.losses(s, cand, self.front_blocks(s), None, "front").mean())
                row = {"kind": "front", "group": "", "candidate": key, "means": means,
                       "blocks": {s.name: self.front_blocks(s) for s in self.sets},
                       "tokens": self.tokens["front"] - before}
                self._write(row)
                recorded[key] = row
            out[key] = (row["means"][self.names[0]], row["means"][self.names[1]])
        return out

    def heldout(self, candidates: list[tuple[float, ...]]) -> dict[str, dict[str, list[float]]]:
        """Per-block losses of the candidates on every held-out block of both sets (rows ``heldout``).

        Args:
            candidates: the α maps.

        Returns:
            ``{key: {set name: per-block losses}}``.
        """
        recorded: dict[str, dict[str, list[float]]] = {}
        for r in self.rows:
            if r.get("kind") == "heldout":
                recorded.setdefault(r["candidate"], {})[r["set"]] = r["losses"]
        for cand in candidates:
            key = alpha_key(cand)
            for s in self.sets:
                if s.name in recorded.get(key, {}):
                    continue
                self.live.apply(cand)
                stats = check_finite(s.ev.run(s.holdout, state=("heldout", key)), f"set {s.name}, candidate {key}")
                self.tokens["heldout"] += stats.tokens
                losses = [float(v) for v in stats.block_loss]
                self._write({"kind": "heldout", "group": "", "candidate": key, "set": s.name, "losses": losses,
                             "tokens": stats.tokens})
                recorded.setdefault(key, {})[s.name] = losses
        return {alpha_key(c): recorded[alpha_key(c)] for c in candidates}

    def run(self, *, resume: bool = False, overwrite: bool = False, sources: Sources = ()) -> dict:
        """Run (or resume) the search into the output folder.

        Args:
            resume: continue the rows in the folder (refused when its settings differ).
            overwrite: replace a previous search in the folder (only one hf-llmc wrote).
            sources: ``(label, folder)`` of the source models (kept out of the output folder).

        Returns:
            The manifest written to ``search.json`` (its ``result``: front, pick and held-out numbers).

        Raises:
            ScanError: the folder cannot be used (see :func:`~hf_llmc.engine.io.check_run_dir`).
            ScanSettingsError: ``resume`` on a folder of another search.
            NonFiniteLossError: a candidate's loss is NaN or infinite.
        """
        t0 = time.perf_counter()
        rows = _prepare(self.out, self.hashed(), resume=resume, overwrite=overwrite, sources=sources)
        self._load_rows(rows)
        write_json_atomic(self.out / MANIFEST, self.manifest("running"))
        try:
            with RowWriter(self.out / ROWS) as self.writer:
                ends, status = self.search()
                line = sorted(set(self.grid) | {0.0, 0.5, 1.0})  # A and B are path points whatever the grid
                paths = [self.uniform(a) for a in line]
                candidates = list(dict.fromkeys(paths + ends))
                means = self.front(candidates)
                keys = pareto_front(means)
                ends_ab = (means[alpha_key(self.uniform(0.0))], means[alpha_key(self.uniform(1.0))])
                best = (min(ends_ab[0][0], ends_ab[1][0]), min(ends_ab[0][1], ends_ab[1][1]))
                chosen = pick_point({k: means[k] for k in keys}, best, self.cfg.pick_rule(self.names), self.names,
                                    self.cfg.tolerance)
                checked = list(dict.fromkeys(paths + [parse_key(k) for k in keys]))
                held = self.heldout(checked)
        finally:
            self.writer = None
            self.live.reset()
            for s in self.sets:
                s.ev.invalidate()
        self.seconds = time.perf_counter() - t0
        result = summarize(self.names, [g.label for g in self.groups], line, ends, means, keys, chosen, held,
                           self.cfg)
        manifest = self.manifest(status, result)
        write_json_atomic(self.out / MANIFEST, manifest)
        return manifest


# -- numbers of the result ------------------------------------------------------------------------------
def _interval(x: torch.Tensor, confidence: float) -> dict:
    """Mean, standard error (neighbour-correlation aware) and t interval of per-block values."""
    n = x.numel()
    mean = float(x.mean())
    se = paired_standard_error(x)[0] if n > 1 else float("nan")
    half = t_quantile(1 - (1 - confidence) / 2, max(1, n - 1)) * se if n > 1 else float("nan")
    return {"mean": mean, "se": se, "interval": [mean - half, mean + half]}


def summarize(names: list[str], labels: list[str], grid: list[float], ends: list[tuple[float, ...]],
              search_means: dict[str, tuple[float, float]], front: list[str], chosen: str,
              held: dict[str, dict[str, list[float]]], cfg: SearchConfig) -> dict:
    """The result of a search: front points with held-out losses and paired intervals, and the pick.

    Args:
        names: the two sets' names.
        labels: the groups' labels.
        grid: the α grid (the uniform path points).
        ends: where the descents ended.
        search_means: ``{key: (loss 1, loss 2)}`` on the front's search blocks.
        front: the keys of the front.
        chosen: the picked key.
        held: ``{key: {set: per-block held-out losses}}`` (front and path points).
        cfg: the settings.

    Returns:
        ``front`` (per point: ``key``, ``alphas`` {label: α}, ``search`` losses, ``heldout`` per set:
        ``loss`` ± ``se``, ``vs_a`` / ``vs_b`` / ``vs_uniform`` paired differences with intervals,
        ``worst_increase``), ``path`` (the uniform points' held-out losses), ``chosen``, ``pick``,
        ``best`` (better endpoint per set, held out), ``uniform_key``, ``chosen_vs_uniform``.
    """
    key_a, key_b, key_u = (alpha_key(tuple(a for _ in labels)) for a in (0.0, 1.0, 0.5))
    tens = {k: {n: torch.tensor(v, dtype=torch.float64) for n, v in per.items()} for k, per in held.items()}
    best = {n: min(float(tens[key_a][n].mean()), float(tens[key_b][n].mean())) for n in names}

    def point(key: str) -> dict:
        out = {"key": key, "alphas": dict(zip(labels, parse_key(key))), "search": dict(zip(names, search_means.get(key, (None, None)))),
               "heldout": {}}
        for n in names:
            x = tens[key][n]
            entry = {"loss": float(x.mean()), "se": paired_standard_error(x)[0], "blocks": x.numel()}
            for ref, rk in (("vs_a", key_a), ("vs_b", key_b), ("vs_uniform", key_u)):
                entry[ref] = _interval(x - tens[rk][n], cfg.confidence)
            out["heldout"][n] = entry
        out["worst_increase"] = max(out["heldout"][n]["loss"] - best[n] for n in names)
        return out

    points = {k: point(k) for k in dict.fromkeys(front + [key_a, key_b, key_u])}
    chosen_pt = points[chosen]
    diff = worst_increase_difference(tens, chosen, key_u, {n: key_a if best[n] == float(tens[key_a][n].mean()) else key_b
                                                            for n in names}, names, cfg.confidence)
    return {
        "sets": names,
        "groups": labels,
        "front": [points[k] for k in front],
        "endpoints": {"a": points[key_a], "b": points[key_b], "uniform": points[key_u]},
        "path": [{"alpha": a, **{n: float(tens[alpha_key(tuple(a for _ in labels))][n].mean()) for n in names},
                  "se": {n: paired_standard_error(tens[alpha_key(tuple(a for _ in labels))][n])[0] for n in names}}
                 for a in grid],
        "ends": [alpha_key(e) for e in ends],
        "best": best,
        "chosen": chosen_pt,
        "pick": cfg.pick,
        "uniform_key": key_u,
        "uniform_on_front": key_u in front,
        "uniform_dominated_by": [k for k in front if dominates(search_means[k], search_means[key_u])],
        "chosen_vs_uniform_worst_increase": diff,
    }


def worst_increase_difference(tens: dict[str, dict[str, torch.Tensor]], p: str, q: str, best_key: dict[str, str],
                              names: list[str], confidence: float) -> dict:
    """W(p) − W(q), W the worst-case loss increase over the better endpoint, with a conservative interval.

    Δ_n(x) = mean over the held-out blocks of set n of (loss of x − loss of the better endpoint on n), a
    paired mean. W(x) = max_n Δ_n(x). With s_q the set where q is worst and s_p the one where p is,
    ``W(p) − W(q) <= max_n [Δ_n(p) − Δ_{s_q}(q)]`` and ``>= min_m [Δ_{s_p}(p) − Δ_m(q)]``; each bracket is
    a paired difference on one set (same blocks) or the difference of two independent paired means
    (two sets), so the interval is the largest upper end and the smallest lower end of those intervals,
    each at level 1 − (1 − confidence)/(2·len(names)) (Bonferroni).

    Args:
        tens: ``{key: {set: per-block losses}}``.
        p: the point (e.g. the chosen one).
        q: the reference point (e.g. the uniform average).
        best_key: per set, the key of the better endpoint.
        names: the sets.
        confidence: the interval's confidence.

    Returns:
        ``mean`` (plug-in W(p) − W(q)), ``interval`` [low, high], ``sets`` [s_p, s_q], ``upper_terms``.
    """
    level = 1 - (1 - confidence) / (2 * len(names))

    def delta(x: str, n: str) -> torch.Tensor:
        return tens[x][n] - tens[best_key[n]][n]

    def between(x: str, n: str, y: str, m: str) -> dict:
        if n == m:
            return _interval(tens[x][n] - tens[y][n], level)
        one, two = _interval(delta(x, n), level), _interval(delta(y, m), level)
        se = math.sqrt(one["se"] ** 2 + two["se"] ** 2)
        mean = one["mean"] - two["mean"]
        z = t_quantile(level, max(1, min(tens[x][n].numel(), tens[y][m].numel()) - 1))
        return {"mean": mean, "se": se, "interval": [mean - z * se, mean + z * se]}

    s_p = max(names, key=lambda n: float(delta(p, n).mean()))
    s_q = max(names, key=lambda n: float(delta(q, n).mean()))
    uppers = {n: between(p, n, q, s_q) for n in names}
    lowers = {m: between(p, s_p, q, m) for m in names}
    mean = float(delta(p, s_p).mean()) - float(delta(q, s_q).mean())
    return {"mean": mean, "interval": [min(v["interval"][0] for v in lowers.values()),
                                       max(v["interval"][1] for v in uppers.values())],
            "sets": [s_p, s_q], "level": level}


def _prepare(out: Path, hashed: dict, *, resume: bool, overwrite: bool, sources: Sources) -> list[dict]:
    """Check the folder; on resume return its rows (refused when the settings differ)."""
    check_run_dir(out, resume=resume, overwrite=overwrite, sources=sources)
    fresh = not out.is_dir() or not any(out.iterdir())
    if resume and not fresh:
        try:
            old = json.loads((out / MANIFEST).read_text())
        except (FileNotFoundError, ValueError):
            raise ScanSettingsError(f"{out}: no readable {MANIFEST}; nothing to resume") from None
        if not isinstance(old, dict) or old.get("settings_hash") != settings_hash(hashed):
            before = old.get("hashed") if isinstance(old, dict) and isinstance(old.get("hashed"), dict) else {}
            differ = [k for k in sorted(set(before) | set(hashed)) if before.get(k) != hashed.get(k)]
            raise ScanSettingsError(f"{out}: holds a search with different {', '.join(differ) or 'settings'}; "
                                    "resume with the same settings, or use another --out or --overwrite")
        prepare_run_dir(out, "search")
        return read_rows(out / ROWS, repair=True, key="kind")
    if not fresh:  # overwrite: check_run_dir found the folder's marker
        for name in (ROWS, MANIFEST):
            (out / name).unlink(missing_ok=True)
    prepare_run_dir(out, "search")
    return []


def judge(results: list[dict], weights: list[float]) -> tuple[str, bool]:
    """Whether a move is accepted, from its comparisons on the sets it is judged on.

    Args:
        results: per set, a comparison of :meth:`SearchRunner.compare` (candidate − incumbent).
        weights: the weight of each set.

    Returns:
        ``(verdict, accepted)``: ``dominated`` (worse on a set, not better on any: discarded),
        ``dominates`` (better on a set, not worse on any: accepted), ``tie`` (not accepted) or
        ``trade-off`` (accepted when the weighted sum of the intervals' upper ends is below 0).
    """
    verdicts = [r["verdict"] for r in results]
    if "worse" in verdicts and "better" not in verdicts:
        return "dominated", False
    if "better" in verdicts and "worse" not in verdicts:
        return "dominates", True
    if "better" not in verdicts:
        return "tie", False
    high = sum(w * r["interval"][1] for w, r in zip(weights, results))
    return "trade-off", high < 0


def run_search(pair: ModelPair, sets: dict[str, DataSource] | DataConfig, cfg: SearchConfig, out_dir: str | os.PathLike, *,
               data: DataConfig | None = None, batch_size: int | None = None, resume: bool = False,
               overwrite: bool = False, sources: Sources = (), progress: bool = False) -> dict:
    """Search per-group α values for two evaluation sets; write ``search.jsonl`` and ``search.json``.

    Args:
        pair: the loaded pair.
        sets: exactly two named sets ``{name: path, DataConfig or TokenBlocks}``, or
            data settings naming them (``DataConfig(data=["code=code.txt", "prose=prose.txt"])``; they are
            then also the shared settings).
        cfg: the search settings.
        out_dir: the output folder (resumable).
        data: shared data settings for sets given as paths (``seq_len``, ``max_tokens``, ...).
        batch_size: blocks per forward (default: automatic).
        resume: continue an interrupted search in ``out_dir``.
        overwrite: replace a previous search in ``out_dir``.
        sources: ``(label, folder)`` of the source models (kept out of the output folder).
        progress: print accepted moves on stderr.

    Returns:
        The manifest (``search.json``); its ``result`` holds the front, the pick and the held-out numbers.

    Raises:
        SearchError: bad settings or not exactly two sets.
        DataError: a set cannot be read.
        ScanError: the output folder cannot be used.
        ScanSettingsError: ``resume`` on a folder of another search.
        NonFiniteLossError: a candidate's loss is NaN or infinite.
    """
    if isinstance(sets, DataConfig):
        data, sets = sets, parse_named_sets(sets)
    names = list(sets)
    if len(names) != 2:
        raise SearchError(f"sets: give exactly 2 named evaluation sets, got {len(names)}")
    cfg.validate(names)
    check_run_dir(out_dir, resume=resume, overwrite=overwrite, sources=sources)
    blocks = load_sets(pair, sets, data)
    runner = SearchRunner(pair, blocks, cfg, out_dir, batch_size=batch_size, progress=progress)
    return runner.run(resume=resume, overwrite=overwrite, sources=sources)
