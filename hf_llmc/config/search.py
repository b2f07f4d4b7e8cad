"""Settings of the merge search (``hf-llmc search``): per-group α values that keep two evaluation
sets' losses low, found with paired sequential comparisons (:mod:`hf_llmc.analyses.search`)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal, get_args

from .alphas import parse_alphas
from .data import DataConfig
from .errors import AlphaError, DataError, SearchError
from .fields import check_choice, setting
from .scan import Rule

SearchGranularity = Literal["block", "sublayer"]
SEARCH_GRANULARITIES: tuple[str, ...] = get_args(SearchGranularity)
DEFAULT_SEARCH_ALPHAS = "0,0.25,0.5,0.75,1"
DEFAULT_DIRECTIONS = "0.5,0.75,1,0.25,0"
PICKS = ("balanced", "weights=WA,WB", "SET")
#: Exactly this many named evaluation sets.
NUM_SETS = 2


@dataclass
class SearchConfig:
    """How the merge search explores per-group α values and which front point it writes."""

    granularity: SearchGranularity = setting("block", "Groups that get their own α: block (one per decoder block) or sublayer (attn.i and mlp.i); the tensors outside them (embeddings, final norm, head; with sublayer also the norms) form one more group.")
    alphas: str = setting(DEFAULT_SEARCH_ALPHAS, "The α grid every group takes its value from (0 = A's tensors, 1 = B's); 0.5 is always added (the uniform average is the start).")
    directions: str = setting(DEFAULT_DIRECTIONS, "Weights w of the first set for the coordinate descents, in order: descent w minimises w·loss(first set) + (1-w)·loss(second set), starting from the uniform average, then from the previous descent's end.")
    max_sweeps: int = setting(2, "Passes over every group per descent (a descent also stops after a pass that accepts no move).")
    budget_tokens: int | None = setting(None, "Stop the search once this many tokens were evaluated (comparisons; the held-out check comes on top) and report the front it has.")
    pick: str = setting("balanced", "The front point to write: balanced (smallest worst-case loss increase over the better endpoint per set), a set's name (keep that set's loss within --tolerance of its better endpoint, minimise the other's) or weights=WA,WB (smallest weighted sum).")
    tolerance: float = setting(0.02, "Nats a set's loss may exceed its better endpoint's with --pick SET.")
    holdout: float = setting(0.25, "Share of each set's token blocks (its last blocks) the search never sees; the front's losses and paired intervals are reported on them.")
    resolution: float = setting(0.005, "A comparison also stops (a tie) once the standard error of its paired loss difference is <= X nats.")
    confidence: float = setting(0.95, "Confidence of each sequential comparison and of the reported intervals.")
    rule: Rule = setting("robust", "Sequential rule of the comparisons: robust or fast (see `hf-llmc scan --sequential-rule`).", flag="--sequential-rule")
    min_blocks: int | None = setting(None, "Blocks every comparison evaluates before its first look (default: the rule's, 96 for robust).")
    block_seed: int = setting(0, "Seed of the random order in which each set's search blocks are visited.")
    full_budget: bool = setting(False, "Evaluate every comparison on every search block (no early stopping): the baseline the sequential search is measured against.")
    prefix: bool = setting(True, "Reuse the hidden states before the first changed block (same numbers, faster).", cli=False)

    def alpha_grid(self) -> list[float]:
        """The α grid, sorted, with 0.5.

        Returns:
            The values.

        Raises:
            AlphaError: a malformed grid or a value outside [0, 1].
        """
        return parse_alphas(self.alphas)

    def direction_weights(self) -> list[float]:
        """The descents' weights of the first set, in order, without repeats.

        Returns:
            The weights.

        Raises:
            SearchError: a value that is not a number in [0, 1], or none.
        """
        out: list[float] = []
        for item in str(self.directions).split(","):
            try:
                w = float(item)
            except ValueError:
                raise SearchError(f"directions={self.directions!r}: expected comma-separated numbers in [0, 1]") from None
            if not (math.isfinite(w) and 0.0 <= w <= 1.0):
                raise SearchError(f"directions={self.directions!r}: {item.strip()} is not in [0, 1]")
            if w not in out:
                out.append(w)
        if not out:
            raise SearchError("directions: give at least one weight, e.g. 0.5")
        return out

    def pick_rule(self, set_names: list[str] | None = None) -> tuple[str, object]:
        """The pick rule, parsed.

        Args:
            set_names: the two sets' names (None: a set name is not checked).

        Returns:
            ``("balanced", None)``, ``("set", NAME)`` or ``("weights", (wa, wb))``.

        Raises:
            SearchError: an unknown rule, or weights that are not two non-negative numbers with a positive sum.
        """
        text = str(self.pick).strip()
        if text == "balanced":
            return "balanced", None
        if text.startswith("weights="):
            try:
                ws = tuple(float(v) for v in text.removeprefix("weights=").split(","))
            except ValueError:
                ws = ()
            if len(ws) != NUM_SETS or not all(math.isfinite(w) and w >= 0 for w in ws) or sum(ws) <= 0:
                raise SearchError(f"pick={text!r}: weights=WA,WB takes two non-negative numbers with a positive sum")
            return "weights", ws
        if set_names is not None and text not in set_names:
            raise SearchError(f"pick={text!r}: use balanced, weights=WA,WB or a set name ({', '.join(set_names)})")
        if not text or "=" in text or "," in text:
            raise SearchError(f"pick={text!r}: use balanced, weights=WA,WB or a set name")
        return "set", text

    def validate(self, set_names: list[str] | None = None) -> None:
        """Check every value without a model.

        Args:
            set_names: the two sets' names, to check ``pick`` against (None: not checked).

        Raises:
            SearchError: a bad value (named by its field).
            AlphaError: a malformed α grid.
        """
        check_choice(SearchConfig, self, "granularity", SearchError)
        check_choice(SearchConfig, self, "rule", SearchError)
        try:
            self.alpha_grid()
        except AlphaError as err:
            raise SearchError(f"alphas={self.alphas!r}: {err}") from None
        self.direction_weights()
        self.pick_rule(set_names)
        if self.max_sweeps < 1:
            raise SearchError(f"max_sweeps={self.max_sweeps}: must be at least 1")
        if self.budget_tokens is not None and self.budget_tokens < 1:
            raise SearchError(f"budget_tokens={self.budget_tokens}: must be at least 1")
        for name in ("tolerance",):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise SearchError(f"{name}={value}: must be a number >= 0")
        if not (math.isfinite(self.resolution) and self.resolution > 0):
            raise SearchError(f"resolution={self.resolution}: must be a number > 0")
        if not 0.0 < self.holdout < 1.0:
            raise SearchError(f"holdout={self.holdout}: must be in (0, 1)")
        if not 0.5 <= self.confidence < 1.0:
            raise SearchError(f"confidence={self.confidence}: must be in [0.5, 1)")
        if self.min_blocks is not None and self.min_blocks < 2:
            raise SearchError(f"min_blocks={self.min_blocks}: must be at least 2")

    def to_dict(self) -> dict:
        """The settings as a plain dict (JSON, recipes).

        Returns:
            ``dataclasses.asdict`` of the settings.
        """
        return asdict(self)


def parse_named_sets(sets: DataConfig | list[str] | dict[str, str] | None) -> dict[str, DataConfig]:
    """The two named evaluation sets of a search, in the grammar of ``--data`` / ``--dataset``.

    The names are parsed by :meth:`DataConfig.named`, as for every command's evaluation sets.

    Args:
        sets: data settings naming the sets (``--data code=code.txt --dataset prose=NAME``), or
            ``NAME=PATH`` items, or a ``{name: path}`` mapping (local files, default settings).

    Returns:
        ``{name: settings of that set}`` in the order given.

    Raises:
        SearchError: not exactly two named sets, a bad or repeated name, or a name that is a ``pick`` keyword.
    """
    if not isinstance(sets, DataConfig):
        items = [f"{k}={v}" for k, v in sets.items()] if isinstance(sets, dict) else list(sets or [])
        sets = DataConfig(data=items or None)
    try:
        named = sets.named() if sets.data or sets.dataset else []
    except DataError as e:
        raise SearchError(str(e)) from None
    if len(named) != NUM_SETS or named[0][0] is None:
        got = "one unnamed set" if named and named[0][0] is None else len(named)
        raise SearchError(f"data: give exactly {NUM_SETS} named sets (--data NAME=PATH or --dataset NAME=HUB_NAME), got {got}")
    for name, _ in named:
        if name == "balanced" or name.startswith("weights"):
            raise SearchError(f"data {name}=...: {name!r} is a pick keyword; name the set otherwise")
    return dict(named)
