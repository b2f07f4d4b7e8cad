"""How the two checkpoints are resolved and the live model is loaded."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .errors import UsageError
from .fields import check_choice, setting

DType = Literal["float32", "bfloat16", "float16"]
DTYPE_NAMES: tuple[str, ...] = ("float32", "bfloat16", "float16")
AddedRows = Literal["own", "mean-init"]


@dataclass
class LoadConfig:
    """How the two checkpoints are resolved and the live model is loaded."""

    revision_a: str | None = setting(None, "Hub revision (branch, tag or commit) of model A.")
    revision_b: str | None = setting(None, "Hub revision (branch, tag or commit) of model B.")
    dtype: DType | None = setting(None, "Live model dtype: float32, bfloat16 or float16 (default: as stored).")
    device: str = setting("auto", "Compute device: auto, cpu, cuda or cuda:N.")
    device_map: str | None = setting(None, "Placement across devices: auto, balanced, sequential, or a FILE.json mapping module names to devices (0, cpu, disk).")
    trust_remote_code: bool = setting(False, "Run custom modelling code shipped with a checkpoint (off unless you trust it).")
    allow_pickle: bool = setting(False, "Allow pickled .bin/.pt weights (loaded with torch.load(weights_only=True)).")
    base_model: str | None = setting(None, "Base model (folder or Hub id) for PEFT adapter arguments, overriding the base recorded in adapter_config.json.")
    max_memory: str | None = setting(None, "Memory per device for --device-map, e.g. 0=20GiB,1=20GiB,cpu=64GiB (implies --device-map auto).")
    offload_folder: str | None = setting(None, "Folder for weights offloaded to disk by --device-map/--max-memory.")
    load_in_8bit: bool = setting(False, "Load the weights that are not interpolated in 8 bit (bitsandbytes; pip install 'hf-llmc[quant]').")
    load_in_4bit: bool = setting(False, "Load the weights that are not interpolated in 4 bit NF4 (bitsandbytes).")
    keep_modules: list | None = setting(None, "Modules loaded unquantized (the interpolated groups' modules).", cli=False, recipe=False)
    added_rows: AddedRows = setting("own", "Embedding/head rows only one model has (its added tokens, padding rows) when the vocabularies differ by added tokens: own = taken from that model at every alpha; mean-init = the other model's value is the mean of its shared rows, then interpolated.")

    def validate(self) -> None:
        """Check the options before anything is loaded.

        Raises:
            UsageError: ``dtype`` is not one of float32, bfloat16, float16, or ``added_rows`` not own
                or mean-init.
        """
        check_choice(LoadConfig, self, "dtype", UsageError)
        check_choice(LoadConfig, self, "added_rows", UsageError)
