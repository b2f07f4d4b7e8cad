"""Every error hf-llmc raises on purpose, each with the exit code the command line uses.

* :class:`UsageError` (exit code 2): a value the caller passed cannot be used (a layer spec, an α
  list, data options, an output folder, a recipe key...). Nothing was loaded or written.
* :class:`HfLlmcError` and its other subclasses (exit code 1): a model, file or service cannot be
  used (a missing checkpoint, two incompatible models, a non-finite loss, a Hub failure).

Messages name the Python parameter (``seq_len=0: must be at least 2``); the command line shows
the same message with its flags (``--seq-len 0: ...``), see :func:`hf_llmc.cli.errors.cli_message`.
Several classes also derive from the built-in they used to be (``ValueError``, ``RuntimeError``)
so that ``except ValueError`` keeps working.
"""

from __future__ import annotations


class HfLlmcError(Exception):
    """Base class of hf-llmc's errors; ``exit_code`` is what the command line returns (1)."""

    exit_code: int = 1


class UsageError(HfLlmcError, ValueError):
    """A value passed by the caller cannot be used (command-line exit code 2)."""

    exit_code = 2


# -- usage errors (exit code 2) --------------------------------------------------------------------
class SpecError(UsageError):
    """A layer spec is malformed, out of range for the model, or selects nothing."""


class AlphaError(UsageError):
    """An α value or list cannot be used (empty, not a number, outside [0, 1] without extrapolation)."""


class DataError(UsageError):
    """Evaluation data cannot be turned into token blocks; the message says why."""


class ScanError(UsageError):
    """Bad scan / robustness settings, or an output folder that cannot be used."""


class ScanSettingsError(ScanError):
    """``resume`` on a folder whose run used different settings, models or data."""


class MergeSpecError(UsageError):
    """A merge spec is malformed or out of range."""


class OutputExistsError(UsageError):
    """An output folder cannot be used (a protected place, not empty, not hf-llmc's, not writable, no room).

    Protected places are a source model's folder, the Hub cache, the current and the home folder.
    A non-empty folder is replaced only with ``overwrite`` and only when hf-llmc wrote it.
    """


class PlacementError(UsageError):
    """A placement / quantization option cannot be used; the message says why."""


class AutoSelectError(UsageError):
    """No usable candidates for ``--auto``, or a scan folder that does not fit the merge."""


class RecipeError(UsageError):
    """A recipe file is malformed; the message names the file and the offending key."""


class ModelFolderError(UsageError):
    """The folder to publish is not a complete model."""


class SweepError(UsageError):
    """No usable scan summaries, or summaries that cannot share one heatmap."""


class SearchError(UsageError):
    """Bad merge-search settings or evaluation sets (``hf-llmc search``)."""


class UnsafePathError(UsageError):
    """A file name from a checkpoint, index or recipe would lead outside its folder."""


# -- failures (exit code 1) ------------------------------------------------------------------------
class CheckpointError(HfLlmcError, RuntimeError):
    """A checkpoint cannot be found, read or trusted (missing, truncated, pickled without opt-in)."""


class PairError(HfLlmcError, ValueError):
    """The two checkpoints cannot be compared (different architecture, shapes or vocabulary)."""


class ArchitectureError(HfLlmcError, ValueError):
    """The model cannot be decomposed into the groups of the layer grammar."""


class NonFiniteLossError(HfLlmcError, RuntimeError):
    """An evaluation produced NaN or infinite loss; no number is reported as a result."""


class NonFiniteTensorError(HfLlmcError, RuntimeError):
    """A merged (or compared) tensor holds NaN or inf; nothing is written or reported."""


class NoMergeableGroupError(HfLlmcError, RuntimeError):
    """Every candidate group's barrier exceeds ``max_barrier`` (a result, not a usage error)."""


class HubError(HfLlmcError, RuntimeError):
    """A Hub operation failed. The message is one line and never contains a token."""


# -- warnings --------------------------------------------------------------------------------------
class HfLlmcWarning(UserWarning):
    """Something hf-llmc changed or skipped on the way, and went on (the command line shows it as one line)."""


class PrecisionWarning(HfLlmcWarning):
    """A number was computed at a lower precision than the path needs.

    E.g. a full-path point rounded to bfloat16; the message gives the measured error.
    """


def exit_code(err: BaseException) -> int:
    """The command-line exit code of an error, so scripts can tell bad input from a failed run.

    Args:
        err: any exception.

    Returns:
        ``err.exit_code`` for an :class:`HfLlmcError` (2 for usage errors, else 1); 1 for every other exception.
    """
    if isinstance(err, HfLlmcError):
        return err.exit_code
    return 1
