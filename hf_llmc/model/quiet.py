"""Keep transformers quiet: no progress bars or warnings where hf-llmc shows its own progress."""

from __future__ import annotations


def quiet_transformers() -> None:
    """No transformers progress bars or warnings (hf-llmc shows its own progress and errors)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
