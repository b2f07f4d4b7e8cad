"""hf-llmc: layer-wise linear mode connectivity for Hugging Face transformer checkpoints."""

from .barrier import BarrierResult
from .export import MergeSpec, save_merged
from .pair import LoadConfig, ModelPair
from .selection import Group, parse_spec, resolve

__version__ = "0.1.0"

__all__ = ["BarrierResult", "Group", "LoadConfig", "MergeSpec", "ModelPair", "parse_spec", "resolve", "save_merged", "__version__"]
