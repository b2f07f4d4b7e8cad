"""Set the live model's selected tensors to a point on a path between A and B, in place.

The live model always holds one *base* state (A or B). A path point replaces the tensors of a
group G by ``mix(θA_G, θB_G, α)``; :meth:`Interpolator.restore` copies the base tensors back from
the memory-mapped base checkpoint, so nothing but the tensor being written is ever held twice.
Arithmetic is float32.

A point is exact at any live dtype: in a bfloat16 / float16 model the moved tensors are held in
float32 while at the point (their modules compute in float32 and cast their outputs back to the
live dtype; everything else stays as it is). Rounding the mix to bfloat16 instead would not stay
on the path: with fine-tune deltas of 0.1-1 % of the weights, the rounding error is of the order
of α·(B − A) itself. Where every tensor moves (the full path) holding float32 would mean a
float32 copy of the whole model, so there the mix is cast to the live dtype; the effective α of
that rounded point and its error are measured on the stored tensors (:attr:`Interpolator.rounding`)
and reported once with a :class:`~hf_llmc.config.errors.PrecisionWarning`.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from ..config.errors import PrecisionWarning, UsageError
from ..config.scan import METHODS
from .architecture import Architecture
from .checkpoint.lazy import LazyCheckpoint
from .selection import Group

SLERP_PARALLEL_COS = 0.9995


def lerp(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """(1-α)·a + α·b in float32."""
    a32, b32 = a.float(), b.float()
    return a32 * (1.0 - alpha) + b32 * alpha


def slerp(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """Spherical interpolation of the flattened tensors (lerp when nearly parallel)."""
    a32, b32 = a.float(), b.float()
    na, nb = a32.norm(), b32.norm()
    if na == 0 or nb == 0:
        return lerp(a32, b32, alpha)
    cos = torch.clamp((a32.flatten() @ b32.flatten()) / (na * nb), -1.0, 1.0)
    if cos.abs() > SLERP_PARALLEL_COS:
        return lerp(a32, b32, alpha)
    omega = torch.arccos(cos)
    sin = torch.sin(omega)
    return (torch.sin((1.0 - alpha) * omega) / sin) * a32 + (torch.sin(alpha * omega) / sin) * b32


def mix(a: torch.Tensor, b: torch.Tensor, alpha: float, method: str = "lerp") -> torch.Tensor:
    if method == "lerp":
        return lerp(a, b, alpha)
    if method == "slerp":
        return slerp(a, b, alpha)
    raise UsageError(f"method={method!r}: use one of {', '.join(METHODS)}")


class Interpolator:
    """Moves groups of the live model along the A–B path and restores them exactly."""

    def __init__(self, model: nn.Module | None, arch: Architecture, ckpt_a: LazyCheckpoint, ckpt_b: LazyCheckpoint):
        self.model = model
        self.arch = arch
        self.ckpts = {"a": ckpt_a, "b": ckpt_b}
        # No live model: a pair opened only to stream a merge (hf_llmc.model.pair.lazy_pair).
        self.params = {} if model is None else dict(model.named_parameters(remove_duplicate=False))
        self.base = "a"
        # Names that can differ between A and B (None = all); set when both share stored base
        # weights, e.g. two LoRA adapters on one base (see hf_llmc.model.checkpoint.adapters.attach).
        self.varying: set[str] | None = None
        # Optional writer for tensors a plain ``copy_`` cannot update: disk-offloaded (meta)
        # parameters, bitsandbytes-quantized weights (see hf_llmc.model.placement.ParamWriter).
        self.writer = None
        # Low-precision parameters held in float32 at the current point: name -> live dtype,
        # and the float32 hooks of the modules owning them.
        self._held: dict[str, torch.dtype] = {}
        self._hooks: dict[str, list] = {}
        self.modules = {} if model is None else dict(model.named_modules())
        #: α -> how a rounded (not held) low-precision point sits on the path: ``dtype``,
        #: ``effective_alpha`` (the α of the rounded point projected on B − A) and
        #: ``relative_error`` (‖rounded − exact‖ / ‖α·(B − A)‖), over the tensors moved.
        self.rounding: dict[float, dict] = {}
        self._rounding_sums: dict[float, list] = {}
        self._warned = False
        #: Row map of vocabularies that differ by added tokens or padding (hf_llmc.model.vocab):
        #: its tensors change rows with the state (A's, B's, or the union's at a path point).
        self.vocab = None

    # -- tensors ------------------------------------------------------------------------------
    def stored(self, which: str, name: str) -> torch.Tensor:
        """The tensor ``name`` of checkpoint ``which`` ("a" or "b"), as stored (CPU)."""
        return self.ckpts[which].get(name, self.arch.aliases)

    def canonical_names(self, groups: Iterable[Group]) -> list[str]:
        names: dict[str, None] = {}
        for group in groups:
            for p in group.parameters:
                names.setdefault(self.arch.canonical(p), None)
        return list(names)

    def is_vocab(self, name: str) -> bool:
        """Whether ``name`` is indexed by token id and the vocabularies differ (its rows change)."""
        return self.vocab is not None and name in self.vocab.params

    def endpoint_tensors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A's and B's tensor ``name`` on the parameter's device; a vocabulary-indexed tensor in the
        union layout, float32, the rows one side lacks filled by the ``added_rows`` rule."""
        device = self._device(name)
        a = self.stored("a", name).to(device)
        b = self.stored("b", name).to(device)
        if self.is_vocab(name):
            return self.vocab.endpoints(a, b, self.vocab.params[name])
        return a, b

    def point_tensor(self, name: str, alpha: float, method: str = "lerp") -> torch.Tensor:
        """float32 value of tensor ``name`` at α (on the parameter's device)."""
        a, b = self.endpoint_tensors(name)
        value = mix(a, b, alpha, method)
        if self.is_vocab(name):
            self.vocab.fix_rows(value, a, b, self.vocab.params[name])
        return value

    def _device(self, name: str) -> torch.device:
        param = self.params[name]
        return param.device if param.device.type != "meta" else torch.device("cpu")

    @torch.no_grad()
    def _write(self, name: str, value: torch.Tensor) -> None:
        if self.is_vocab(name):  # its rows change with the state: new storage of the value's shape
            param = self.params[name]
            param.data = value.to(param.device, param.dtype, copy=True)
        elif self.writer is not None:
            self.writer.write(name, value)
        else:
            self.params[name].data.copy_(value)

    def _direct(self, name: str) -> bool:
        """Whether the parameter's own storage can be written in place."""
        return self.writer is None and self.params[name].device.type != "meta"

    @torch.no_grad()
    def _load(self, which: str, name: str) -> None:
        """Write checkpoint ``which``'s tensor into the parameter (read in place when possible)."""
        if name in self._held:
            self._release(name)
        if self.is_vocab(name):
            self._write(name, self.stored(which, name))
            return
        if not (self._direct(name) and self.ckpts[which].read_into(name, self.params[name].data, self.arch.aliases)):
            self._write(name, self.stored(which, name).to(self._device(name)))

    @torch.no_grad()
    def _set_mix(self, name: str, alpha: float, method: str, hold: bool = True) -> None:
        param = self.params[name]
        if method == "lerp" and param.dtype == torch.float32 and self._direct(name) and not self.is_vocab(name):
            # Same float32 operations as lerp(), in the parameter's own storage:
            # param = A·(1-α) + (B·α), streaming B in small chunks.
            self._load("a", name)
            flat = param.data.view(-1)
            for start, chunk in self.ckpts["b"].iter_chunks(name, aliases=self.arch.aliases):
                piece = flat[start : start + chunk.numel()]
                piece.mul_(1.0 - alpha).add_(chunk.to(param.device, torch.float32).mul_(alpha))
            return
        value = self.point_tensor(name, alpha, method)
        if param.dtype in (torch.bfloat16, torch.float16) and self._direct(name):
            if hold:
                self._hold(name, value)
                return
            self._measure_rounding(name, alpha, value, param.dtype)
        self._write(name, value)

    # -- float32 holding ------------------------------------------------------------------------
    def _owners(self, name: str) -> list[str]:
        """The modules whose forward reads parameter ``name`` (its tied aliases' modules too)."""
        names = [name, *(a for a, c in self.arch.aliases.items() if c == name)]
        return sorted({n.rsplit(".", 1)[0] if "." in n else "" for n in names})

    def _hold(self, name: str, value: torch.Tensor) -> None:
        param = self.params[name]
        self._held.setdefault(name, param.dtype)
        param.data = value  # float32, the exact point
        for module_name in self._owners(name):
            if module_name not in self._hooks:
                module = self.modules[module_name]
                dtype = self._held[name]
                self._hooks[module_name] = [
                    module.register_forward_pre_hook(_to_float32, with_kwargs=True),
                    module.register_forward_hook(_back_to(dtype)),
                ]

    def _release(self, name: str) -> None:
        """Give a held parameter its live dtype back (the caller then loads its value)."""
        dtype = self._held.pop(name)
        param = self.params[name]
        param.data = torch.empty(param.shape, dtype=dtype, device=param.device)
        still = {m for n in self._held for m in self._owners(n)}
        for module_name in self._owners(name):
            if module_name not in still:
                for handle in self._hooks.pop(module_name, []):
                    handle.remove()

    @property
    def held(self) -> list[str]:
        """Parameters currently held in float32 (moved, low-precision, at a path point)."""
        return list(self._held)

    def _measure_rounding(self, name: str, alpha: float, value: torch.Tensor, dtype: torch.dtype) -> None:
        a, b = (t.to(value.device).float() for t in self.endpoint_tensors(name))
        step, rounded = b - a, value.to(dtype).float()
        sums = self._rounding_sums.setdefault(alpha, [0.0, 0.0, 0.0])
        sums[0] += float((rounded - a).double().flatten() @ step.double().flatten())
        sums[1] += float(step.double().pow(2).sum())
        sums[2] += float((rounded - value).double().pow(2).sum())
        dot, norm2, err2 = sums
        effective = dot / norm2 if norm2 > 0 else alpha
        relative = math.sqrt(err2 / (alpha * alpha * norm2)) if norm2 > 0 and alpha != 0 else 0.0
        self.rounding[alpha] = {"dtype": str(dtype).removeprefix("torch."), "alpha": alpha,
                                "effective_alpha": effective, "relative_error": relative}

    def _warn_rounding(self) -> None:
        if self.rounding and not self._warned:
            self._warned = True
            worst = max(self.rounding.values(), key=lambda r: r["relative_error"])
            warnings.warn(
                f"the full path is evaluated in {worst['dtype']}: its points are rounded to {worst['dtype']} "
                f"(at alpha={worst['alpha']:g} the effective alpha is {worst['effective_alpha']:.4f}, a rounding "
                f"error of {100 * worst['relative_error']:.0f} % of alpha*(B - A)); load with dtype='float32' "
                "for exact full-path points",
                PrecisionWarning, stacklevel=4,
            )

    # -- base state ---------------------------------------------------------------------------
    @torch.no_grad()
    def set_base(self, base: str) -> None:
        """Make the live model hold checkpoint ``base`` ("a" or "b"), streaming tensor by tensor."""
        if base not in self.ckpts:
            raise UsageError(f"base={base!r}: use 'a' or 'b'")
        if base == self.base:
            return
        for name in self.arch.parameters:
            if self.varying is None or name in self.varying:
                self._load(base, name)
        self.base = base
        if self.vocab is not None and self.model is not None:  # the model's own rows again
            self.model.config.vocab_size = self.vocab.rows_a if base == "a" else self.vocab.rows_b

    # -- points -------------------------------------------------------------------------------
    @torch.no_grad()
    def set_point(self, groups: Iterable[Group], alpha: float, method: str = "lerp", *,
                  hold: bool | None = None) -> list[str]:
        """Set the tensors of ``groups`` to their α mix; returns the canonical names written.

        ``hold``: keep low-precision tensors in float32 at the point (default: unless every
        parameter moves; see the module docstring). False rounds them to the live dtype, as a
        merge that is saved in that dtype is."""
        names = self.canonical_names(groups)
        if hold is None:
            hold = len(names) < len(self.arch.parameters)
        for name in names:
            self._set_mix(name, alpha, method, hold)
        if alpha in self.rounding and not hold:
            self._warn_rounding()
        return names

    @torch.no_grad()
    def restore(self, names: Iterable[str]) -> None:
        """Copy the base checkpoint's tensors back (bitwise the loaded values)."""
        for name in names:
            self._load(self.base, name)

    @contextlib.contextmanager
    def at(self, groups: Iterable[Group], alpha: float, method: str = "lerp", base: str | None = None) -> Iterator[None]:
        """Context in which the live model is at the path point; restored on exit (also on error)."""
        if base is not None:
            self.set_base(base)
        names: list[str] = []
        try:
            if alpha == 0.0 and self.base == "a" or alpha == 1.0 and self.base == "b":
                yield  # the base itself: nothing to move
                return
            names = self.set_point(groups, alpha, method)
            yield
        finally:
            self.restore(names)


def _convert(value, fn):
    """``value`` with ``fn`` applied to every tensor in it (also in tuples, lists and dicts)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple
        return type(value)(*(_convert(v, fn) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_convert(v, fn) for v in value)
    if isinstance(value, dict):
        return type(value)({k: _convert(v, fn) for k, v in value.items()})
    return value


_LOW = (torch.bfloat16, torch.float16)


def _to_float32(module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook of a module holding float32 tensors: its low-precision inputs as float32."""
    def up(t: torch.Tensor) -> torch.Tensor:
        return t.float() if t.dtype in _LOW else t

    return _convert(args, up), _convert(kwargs, up)


def _back_to(dtype: torch.dtype):
    """Forward hook of such a module: its float32 outputs back in the live ``dtype``."""
    def hook(module: nn.Module, args: tuple, output):
        return _convert(output, lambda t: t.to(dtype) if t.dtype == torch.float32 else t)

    return hook
