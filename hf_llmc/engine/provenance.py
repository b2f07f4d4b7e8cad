"""Provenance of result files: what a number was computed with, so it can be reproduced.

:func:`environment` gives the library versions, Python, platform, compute device and dtype that
``barrier --json-out`` and a merge's ``hf_llmc_config.yaml`` record next to their numbers (with the
evaluation data's fingerprint); ``scan.json`` records the same facts in its own fields. It holds
no paths, host names or tokens.
"""

from __future__ import annotations

import platform
from importlib import metadata

import torch

#: Distributions whose versions change numbers or files (missing optional ones are skipped).
LIBRARIES = ("hf-llmc", "torch", "transformers", "safetensors", "huggingface_hub", "accelerate", "peft",
             "datasets", "bitsandbytes")


def library_versions() -> dict[str, str]:
    """Installed versions of :data:`LIBRARIES` (those present)."""
    out = {}
    for dist in LIBRARIES:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def model_device_dtype(model: torch.nn.Module | None) -> tuple[str | None, str | None]:
    """(device, dtype) of a model's floating parameters; several devices are joined with ``+``."""
    if model is None:
        return None, None
    devices: dict[str, None] = {}
    dtypes: dict[str, None] = {}
    for p in model.parameters():
        devices.setdefault(str(p.device), None)
        if p.is_floating_point():
            dtypes.setdefault(str(p.dtype).removeprefix("torch."), None)
    return "+".join(devices) or None, "+".join(dtypes) or None


def environment(model: torch.nn.Module | None = None, *, device: str | torch.device | None = None,
                dtype: str | torch.dtype | None = None) -> dict:
    """Library versions, Python, platform, device and dtype of a computation.

    ``device`` / ``dtype`` default to those of ``model``'s parameters (None when neither is given).
    """
    model_device, model_dtype = model_device_dtype(model)
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    return {
        "libraries": library_versions(),
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "machine": platform.machine(),
        "device": str(device) if device is not None else model_device,
        "dtype": dtype if dtype is not None else model_dtype,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
    }
