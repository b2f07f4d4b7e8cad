"""Set the live model's selected tensors to a point on a path between A and B, in place.

The live model always holds one *base* state (A or B). A path point replaces the tensors of a
group G by ``mix(θA_G, θB_G, α)``; :meth:`Interpolator.restore` copies the base tensors back from
the memory-mapped base checkpoint, so nothing but the tensor being written is ever held twice.
Arithmetic is float32; the result is cast once to the parameter's dtype.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from ..config.errors import UsageError
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

    def point_tensor(self, name: str, alpha: float, method: str = "lerp") -> torch.Tensor:
        """float32 value of tensor ``name`` at α (on the parameter's device)."""
        device = self._device(name)
        a = self.stored("a", name).to(device)
        b = self.stored("b", name).to(device)
        return mix(a, b, alpha, method)

    def _device(self, name: str) -> torch.device:
        param = self.params[name]
        return param.device if param.device.type != "meta" else torch.device("cpu")

    @torch.no_grad()
    def _write(self, name: str, value: torch.Tensor) -> None:
        if self.writer is not None:
            self.writer.write(name, value)
        else:
            self.params[name].data.copy_(value)

    def _direct(self, name: str) -> bool:
        """Whether the parameter's own storage can be written in place."""
        return self.writer is None and self.params[name].device.type != "meta"

    @torch.no_grad()
    def _load(self, which: str, name: str) -> None:
        """Write checkpoint ``which``'s tensor into the parameter (read in place when possible)."""
        if not (self._direct(name) and self.ckpts[which].read_into(name, self.params[name].data, self.arch.aliases)):
            self._write(name, self.stored(which, name).to(self._device(name)))

    @torch.no_grad()
    def _set_mix(self, name: str, alpha: float, method: str) -> None:
        param = self.params[name]
        if method == "lerp" and param.dtype == torch.float32 and self._direct(name):
            # Same float32 operations as lerp(), in the parameter's own storage:
            # param = A·(1-α) + (B·α), streaming B in small chunks.
            self._load("a", name)
            flat = param.data.view(-1)
            for start, chunk in self.ckpts["b"].iter_chunks(name, aliases=self.arch.aliases):
                piece = flat[start : start + chunk.numel()]
                piece.mul_(1.0 - alpha).add_(chunk.to(param.device, torch.float32).mul_(alpha))
        else:
            self._write(name, self.point_tensor(name, alpha, method))

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

    # -- points -------------------------------------------------------------------------------
    @torch.no_grad()
    def set_point(self, groups: Iterable[Group], alpha: float, method: str = "lerp") -> list[str]:
        """Set the tensors of ``groups`` to their α mix; returns the canonical names written."""
        names = self.canonical_names(groups)
        for name in names:
            self._set_mix(name, alpha, method)
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
