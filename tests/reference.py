"""Straightforward reference computations the tests compare hf-llmc against.

Deliberately naive: both models fully loaded, the interpolated state dict built with plain
torch, a fresh model loaded with ``load_state_dict``, and a plain loop over
``model(input_ids=block, labels=block)``.
"""

from __future__ import annotations

import math

import torch
from transformers import AutoModelForCausalLM


def state_dict(folder) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def slerp_ref(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    va, vb = a.double().flatten(), b.double().flatten()
    cos = float(va @ vb / (va.norm() * vb.norm()))
    if abs(cos) > 0.9995:
        return ((1 - t) * a.double() + t * b.double()).to(a.dtype)
    omega = math.acos(max(-1.0, min(1.0, cos)))
    out = (math.sin((1 - t) * omega) * va + math.sin(t * omega) * vb) / math.sin(omega)
    return out.view(a.shape).to(a.dtype)


def interpolated_state(sd_a, sd_b, names, alpha, base="a", method="lerp", tied=()):
    """θ_base with the tensors ``names`` (None = all) replaced by their α mix."""
    selected = set(sd_a) if names is None else set(names)
    for alias, canon in tied:  # one tensor under two names
        if alias in selected or canon in selected:
            selected |= {alias, canon}
    out = {}
    for key in sd_a:
        if key in selected:
            if method == "lerp":
                out[key] = (1 - alpha) * sd_a[key] + alpha * sd_b[key]
            else:
                out[key] = slerp_ref(sd_a[key], sd_b[key], alpha)
        else:
            out[key] = (sd_a if base == "a" else sd_b)[key].clone()
    return out


def plain_eval(folder, state, blocks: torch.Tensor, per_block: bool = False):
    """(mean loss, top-1 accuracy) of a fresh model holding ``state``, block by block
    (with ``per_block``: the list of block losses instead of their mean)."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model.load_state_dict(state)
    losses, hits, count = [], 0, 0
    with torch.no_grad():
        for block in blocks:
            out = model(input_ids=block[None], labels=block[None])
            losses.append(out.loss.item())
            pred = out.logits[0, :-1].argmax(-1)
            hits += int((pred == block[1:]).sum())
            count += block.numel() - 1
    return (losses if per_block else sum(losses) / len(losses)), hits / count


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)
