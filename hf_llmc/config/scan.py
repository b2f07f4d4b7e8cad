"""Settings of scans, sequential estimation and random-direction robustness."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal, get_args

from .alphas import parse_alphas
from .errors import AlphaError, ScanError
from .fields import check_choice, setting

Mode = Literal["single", "cumulative", "window"]
Granularity = Literal["block", "sublayer", "module"]
Base = Literal["a", "b", "both"]
#: One of the two endpoint models (also the base of a path into one of them).
Which = Literal["a", "b"]
Method = Literal["lerp", "slerp"]
#: What barriers are measured in: ``loss`` (nats per token) or ``bpb`` (bits per UTF-8 byte).
Metric = Literal["loss", "bpb"]
METRIC_HELP = ("What barriers are ranked, drawn and decided in: loss (nats per token) or bpb (bits per UTF-8 byte, "
               "comparable across tokenizers).")
MODES: tuple[str, ...] = get_args(Mode)
GRANULARITIES: tuple[str, ...] = get_args(Granularity)
BASES: tuple[str, ...] = get_args(Base)
METHODS: tuple[str, ...] = get_args(Method)
ORDERS = ("shallow", "deep", "random")

#: Sequential stopping rules: ``robust`` (the default) and ``fast`` (stronger assumption, fewer blocks).
Rule = Literal["robust", "fast"]
RULES: tuple[str, ...] = get_args(Rule)
#: Name of each rule's interval (recorded with every sequential result).
INTERVAL_METHODS = {"robust": "skew-t-union-bound", "fast": "student-t-union-bound"}
#: Robust rule: share of the error rate 1 - confidence kept for a rare group of blocks missing from the first look.
RARE_SHARE = 0.2
#: Robust rule: multiple of the first-order Cornish-Fisher skewness correction added on the skewed side.
SKEW_FACTOR = 3.0
#: Fast rule: blocks before the first look when ``min_blocks`` is not set.
FAST_MIN_BLOCKS = 8


@dataclass
class SequentialConfig:
    """When a point may stop early (set ``target_se`` and/or ``decide``) and how blocks are visited."""

    target_se: float | None = setting(None, "Sequential estimation: stop a point once the standard error of its barrier is <= X nats.")
    decide: float | None = setting(None, "Sequential estimation: stop a point once the confidence interval of its barrier excludes T nats (decision above/below; undecided when it cannot), or --target-se is met.")
    confidence: float = setting(0.95, "Confidence of the sequential intervals (valid at the data-dependent stopping time).")
    rule: Rule = setting("robust", "Sequential rule: robust (skew-corrected intervals, first look after enough blocks to see a group of --rare-fraction of the blocks) or fast (Student-t from 8 blocks on; assumes near-Gaussian per-block differences).", flag="--sequential-rule")
    rare_fraction: float = setting(0.05, "Robust rule: the smallest share of blocks that may behave differently (e.g. code in prose); sets the default --min-blocks.")
    min_blocks: int | None = setting(None, "Blocks every point evaluates before its first look (at least 2; default: robust rule 90 at the default --confidence and --rare-fraction, rounded up to the chunk; fast rule 8).")
    block_seed: int = setting(0, "Seed of the random block order shared by every point and both endpoints.")
    chunk_blocks: int | None = setting(None, "Looks fall on multiples of this many blocks (default: the batch size, so batches repeat across points and prefixes are reused).")
    growth: float = setting(1.5, "Look schedule: each look has at least GROWTH times the blocks of the previous one (fewer looks spend less of the error rate).")

    @property
    def enabled(self) -> bool:
        """Whether a stopping rule is set (``target_se`` or ``decide``)."""
        return self.target_se is not None or self.decide is not None

    @property
    def interval_method(self) -> str:
        """The name of the rule's interval (:data:`INTERVAL_METHODS`)."""
        return INTERVAL_METHODS.get(self.rule, str(self.rule))

    @property
    def rare_alpha(self) -> float:
        """The error rate kept for a rare group of blocks missing from the first look (0 for the fast rule)."""
        return RARE_SHARE * (1.0 - self.confidence) if self.rule == "robust" else 0.0

    def first_look(self) -> int:
        """Blocks before the first look: ``min_blocks``, else the rule's default.

        Returns:
            ``min_blocks`` when set; for the robust rule the smallest n with
            (1 - rare_fraction)^n <= :attr:`rare_alpha` (a group holding ``rare_fraction`` of the blocks is
            then among the first n with probability >= 1 - rare_alpha: 90 at the defaults); 8 for the fast rule.
        """
        if self.min_blocks is not None:
            return self.min_blocks
        if self.rule == "fast":
            return FAST_MIN_BLOCKS
        return max(2, math.ceil(math.log(self.rare_alpha) / math.log1p(-self.rare_fraction) - 1e-9))

    def covered_fraction(self, first: int) -> float:
        """The smallest share of blocks a group may hold and be seen in the first look almost surely.

        "Almost surely": among the first ``first`` blocks with probability >= 1 - :attr:`rare_alpha`
        (fast rule: >= 0.99).

        Args:
            first: blocks before the first look (the schedule's first value).

        Returns:
            1 - delta^(1/first), delta = :attr:`rare_alpha` (0.01 for the fast rule).
        """
        delta = self.rare_alpha or 0.01
        return 1.0 - delta ** (1.0 / max(1, first))

    def validate(self) -> None:
        """Check the settings before any evaluation.

        Raises:
            ScanError: no stopping rule, or a value out of range (one-line message naming it).
        """
        if not self.enabled:
            raise ScanError("sequential estimation needs target_se=X and/or decide=T")
        if self.target_se is not None and not (math.isfinite(self.target_se) and self.target_se > 0):
            raise ScanError(f"target_se={self.target_se}: must be a positive number")
        if self.decide is not None and not math.isfinite(self.decide):
            raise ScanError(f"decide={self.decide}: must be a finite number")
        if not 0.0 < self.confidence < 1.0:
            raise ScanError(f"confidence={self.confidence}: must be between 0 and 1 (e.g. 0.95)")
        check_choice(SequentialConfig, self, "rule", ScanError)
        if not 0.0 < self.rare_fraction < 1.0:
            raise ScanError(f"rare_fraction={self.rare_fraction}: must be between 0 and 1 (e.g. 0.05)")
        if self.min_blocks is not None and self.min_blocks < 2:
            raise ScanError(f"min_blocks={self.min_blocks}: must be at least 2 (a standard error needs two blocks)")
        if self.chunk_blocks is not None and self.chunk_blocks < 1:
            raise ScanError(f"chunk_blocks={self.chunk_blocks}: must be at least 1")
        if not (math.isfinite(self.growth) and self.growth > 1.0):
            raise ScanError(f"growth={self.growth}: must be greater than 1")

    def result_settings(self) -> dict:
        """The settings that change the numbers, hashed so that ``resume`` refuses other settings.

        Returns:
            Every field plus ``interval_method`` (:data:`INTERVAL_METHODS` of the rule).
        """
        return {**asdict(self), "interval_method": self.interval_method}


@dataclass
class ScanConfig:
    """What a scan evaluates (plan, bases, α grid) and how."""

    mode: Mode = setting("single", "single: each group alone; cumulative: the first/last k blocks together; window: blocks i..i+W-1.")
    granularity: Granularity = setting("block", "Groups of a single scan: block (whole decoder blocks), sublayer (attn, mlp, norm of each block, plus embed, final_norm, head) or module (every parameter-owning module).")
    order: str = setting("shallow", "Cumulative order(s), comma-separated: shallow (first k blocks), deep (last k), random (seeded).")
    seed: int = setting(0, "Seed of the random cumulative order.")
    window: int = setting(2, "Blocks per moving window (--mode window).")
    base: Base = setting("a", "Which model the unselected tensors come from: a, b or both.")
    alphas: str = setting("0.5", "Comma-separated α values or a count N of evenly spaced points (0.5 always included).")
    method: Method = setting("lerp", "Interpolation method per tensor.")
    metric: Metric = setting("loss", METRIC_HELP + " Scans record both; this chooses the heatmaps, tables and --decide.")
    prefix: bool = setting(True, "Reuse the base model's hidden states before a group's first block.", cli=False)
    batch_size: int | None = setting(None, "Blocks per forward (default: automatic).", cli=False)
    sequential: SequentialConfig | None = setting(None, "Sequential estimation: stop each point once its error bar allows (a SequentialConfig; None = every block).", cli=False)

    # -- derived ------------------------------------------------------------------------------
    @property
    def orders(self) -> list[str]:
        """The cumulative orders, parsed from ``order``."""
        return [o.strip() for o in str(self.order).split(",") if o.strip()]

    @property
    def bases(self) -> list[str]:
        """The bases scanned (``both`` = ``["a", "b"]``)."""
        return ["a", "b"] if self.base == "both" else [self.base]

    def alpha_list(self) -> list[float]:
        """The α grid the scan evaluates, parsed from ``alphas``.

        Returns:
            Sorted unique α values, 0.5 always included.

        Raises:
            AlphaError: ``alphas`` cannot be parsed (see :func:`~hf_llmc.config.alphas.parse_alphas`).
        """
        return parse_alphas(self.alphas)

    def validate(self) -> None:
        """Check the settings before any model is loaded.

        Raises:
            ScanError: a bad choice, order, window, batch size, α list or sequential setting
                (one-line message naming it).
        """
        for name in ("mode", "granularity", "base", "method", "metric"):
            check_choice(ScanConfig, self, name, ScanError)
        if self.mode != "single" and self.granularity != "block":
            raise ScanError(f"granularity={self.granularity!r}: only mode='single' takes a granularity; cumulative and window scans move whole blocks")
        if not self.orders:
            raise ScanError("order: empty; use shallow, deep or random (comma-separated)")
        for order in self.orders:
            if order not in ORDERS:
                raise ScanError(f"order={order!r}: use one of {', '.join(ORDERS)} (comma-separated)")
        if self.window < 1:
            raise ScanError(f"window={self.window}: must be at least 1")
        if self.batch_size is not None and self.batch_size < 1:
            raise ScanError(f"batch_size={self.batch_size}: must be at least 1")
        if self.sequential is not None:
            self.sequential.validate()
        try:
            self.alpha_list()
        except AlphaError as err:
            raise ScanError(str(err)) from None

    def result_settings(self) -> dict:
        """The settings that change the numbers, hashed so that ``resume`` refuses other settings.

        Returns:
            ``mode``, ``base``, the α list and ``method``, plus what the mode uses (``granularity``,
            ``order`` / ``seed``, ``window``) and ``sequential``; ``prefix`` and ``batch_size`` are left out.
        """
        out = {"mode": self.mode, "base": self.base, "alphas": self.alpha_list(), "method": self.method}
        if self.mode == "single":
            out["granularity"] = self.granularity
        if self.mode == "cumulative":
            out["order"] = self.orders
            if "random" in self.orders:
                out["seed"] = self.seed
        if self.mode == "window":
            out["window"] = self.window
        if self.sequential is not None:  # absent otherwise: fixed-budget hashes stay as they were
            out["sequential"] = self.sequential.result_settings()
            if self.metric != "loss":  # the stopping rule runs in bits per byte
                out["metric"] = self.metric
        return out


@dataclass
class RobustnessConfig:
    """Random-direction robustness: which groups, how many directions, which t grid."""

    layers: str | None = setting(None, "Layer spec; each resolved group is tested separately (default: every group of --granularity).")
    granularity: Granularity = setting("block", "Groups when --layers is not given: block, sublayer or module.")
    samples: int = setting(5, "Random directions per group (mean and spread are reported).")
    seed: int = setting(0, "Seed of the random directions.")
    alphas: str = setting("0,0.25,0.5,0.75,1", "Step sizes t along both directions: comma-separated values or a count N.")
    prefix: bool = setting(True, "Reuse the base model's hidden states before a group's first block.", cli=False)
    batch_size: int | None = setting(None, "Blocks per forward (default: automatic).", cli=False)

    def validate(self) -> None:
        """Check the settings before any model is loaded.

        Raises:
            ScanError: a bad granularity, sample count, t grid or batch size (one-line message naming it).
        """
        check_choice(RobustnessConfig, self, "granularity", ScanError)
        if self.samples < 1:
            raise ScanError(f"samples={self.samples}: must be at least 1")
        self.scan_config().validate()

    def scan_config(self) -> ScanConfig:
        """The scan settings the robustness runner evaluates with.

        Returns:
            A :class:`ScanConfig` into base A with the t grid as α, the same granularity, prefix and batch size.
        """
        return ScanConfig(granularity=self.granularity, base="a", alphas=self.alphas, prefix=self.prefix,
                          batch_size=self.batch_size)
