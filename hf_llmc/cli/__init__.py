"""The ``hf-llmc`` command line: a thin layer over the Python API.

:mod:`.parser` builds the argument parser from the settings dataclasses (torch-free, so
``--help`` and usage errors are fast); each command lives in its own module with a
``run(args) -> int`` (imported only when that command runs); :mod:`.recipes` runs YAML recipes and
:mod:`.demo` the demo. Exit codes: 0 success, 2 bad usage, 1 any other failure.
"""

from __future__ import annotations

from .main import main

__all__ = ["main"]
