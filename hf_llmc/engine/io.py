"""The one policy for what hf-llmc writes: result rows, JSON files and output folders.

* Result rows are JSON lines, each flushed and fsynced before the next (:class:`RowWriter`); a
  truncated last line (an interrupted write) is dropped on reading (:func:`read_rows`).
* Files are written to a temporary sibling, fsynced and renamed (:func:`write_json_atomic`,
  :func:`~hf_llmc.config.files.atomic_file`); a temporary sibling never outlives an error.
* Output folders are checked before any work (:func:`check_output_dir`, :func:`check_run_dir`,
  :func:`check_location`, :func:`check_free_space`):

  - an output folder is never equal to, inside or around a source model's folder or the Hugging
    Face Hub cache, and never equal to or around the current folder, the home folder or ``/``;
  - ``~`` is expanded; a symbolic link in the place of the output folder is refused;
  - an existing non-empty folder is replaced (``overwrite``) only when a previous hf-llmc run
    wrote it, recognised by its marker file :data:`MARKER`;
  - the folder must be writable and its disk must hold the estimated output size + 10 %.

* A merged model (and the demo) is built in a temporary sibling, every file and the folder are
  fsynced, and it is renamed into place only when complete (:func:`atomic_output_dir`); scan
  folders are written in place and resumed (:func:`prepare_run_dir`). Temporary siblings left by
  processes that ended are removed wherever hf-llmc writes.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..config.errors import OutputExistsError, ScanError
from ..config.files import (
    TMP_MARK,
    clean_stale,
    fsync_path,
    fsync_tree,
    temp_name,
    write_json_atomic,
    write_text_atomic,
)
from ..config.version import __version__

__all__ = ["RowWriter", "read_rows", "write_json_atomic", "check_writable", "check_location", "check_free_space",
           "check_output_dir", "check_run_dir", "prepare_run_dir", "atomic_output_dir", "clean_stale",
           "is_hf_llmc_folder", "write_marker", "output_path", "source_folders", "TMP_MARK", "MARKER", "RESULTS",
           "MANIFEST", "Sources"]

#: The marker file hf-llmc writes into every output folder it creates; only a folder holding it may be replaced.
MARKER = ".hf-llmc"
#: A run folder's result rows and its manifest (settings, models, data, hash of what changes numbers).
RESULTS = "results.jsonl"
MANIFEST = "scan.json"
#: Free space asked for beyond the estimated output size.
SPACE_MARGIN = 0.10
#: What a scan or robustness folder takes at most, for the free-space check (rows, manifest, report, figures).
RUN_DIR_SIZE = 16 * 1000 * 1000
#: Source folders of a run: ``(label, path)`` pairs such as ``("model A", "/models/a")``.
Sources = Iterable[tuple[str, "str | os.PathLike | None"]]


# -- result rows ------------------------------------------------------------------------------------
def read_rows(path: str | os.PathLike, *, repair: bool = False, key: str = "group") -> list[dict]:
    """The rows of a results file, tolerating the truncated last line of an interrupted write.

    Args:
        path: the JSON-lines file.
        repair: cut a truncated last line off the file (and end the file with a newline).
        key: the key every row has (``group`` for scans, ``kind`` for searches).

    Returns:
        The rows (dicts with a ``key`` key) in file order; empty when the file does not exist.

    Raises:
        ScanError: a damaged line other than the last.
    """
    path = Path(path)
    if not path.is_file():
        return []
    raw = path.read_bytes()
    rows: list[dict] = []
    pos = good_end = 0
    while pos < len(raw):
        nl = raw.find(b"\n", pos)
        end = len(raw) if nl == -1 else nl + 1
        line = raw[pos:end].strip()
        if line:
            try:
                row = json.loads(line)
                if not isinstance(row, dict) or key not in row:
                    raise ValueError("not a result row")
            except ValueError:
                if raw[end:].strip():
                    lineno = raw.count(b"\n", 0, pos) + 1
                    raise ScanError(f"{path}: line {lineno} is damaged; remove it and resume") from None
                break  # an interrupted final write
            rows.append(row)
        good_end = end
        pos = end
    if repair and good_end < len(raw):
        with open(path, "r+b") as fh:
            fh.truncate(good_end)
    if repair and good_end and not raw[:good_end].endswith(b"\n"):
        with open(path, "ab") as fh:
            fh.write(b"\n")
    return rows


class RowWriter:
    """Appends rows to a JSON-lines file; each line is flushed and fsynced before the next.

    Args:
        path: the file, opened for appending (created if missing).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        created = not Path(path).exists()
        self._fh = open(path, "ab")
        if created:  # the new file's folder entry is durable too
            fsync_path(Path(path).parent)

    def write(self, row: dict) -> None:
        """Append one row as a line, durable before this returns.

        Args:
            row: the row (NaN and infinities are refused with ``ValueError``).
        """
        self._fh.write((json.dumps(row, allow_nan=False) + "\n").encode())
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        """Close the file."""
        self._fh.close()

    def __enter__(self) -> "RowWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- output folders ---------------------------------------------------------------------------------
def output_path(out: str | os.PathLike) -> Path:
    """An output path as hf-llmc uses it: ``~`` expanded, absolute, ``.``/``..`` parts folded.

    Args:
        out: the path as given.

    Returns:
        The absolute path (symbolic links are not resolved).
    """
    return Path(os.path.abspath(os.path.expanduser(os.fspath(out))))


def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.expanduser(os.fspath(path))))


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def hub_cache() -> Path | None:
    """The Hugging Face Hub cache (``huggingface_hub.constants.HF_HUB_CACHE``), or None without huggingface_hub.

    Returns:
        The cache folder as configured now (``HF_HUB_CACHE``, ``HF_HOME``/hub, ``~/.cache/huggingface/hub``).
    """
    try:
        from huggingface_hub import constants
    except ImportError:
        return None
    return Path(constants.HF_HUB_CACHE)


def source_folders(models: Iterable[tuple[str, str | os.PathLike | None]]) -> list[tuple[str, Path]]:
    """The local folders among model arguments (Hub ids are skipped: their snapshots lie in the Hub cache).

    Args:
        models: ``(label, model argument)`` pairs, e.g. ``("model A", "./a")``; None values are skipped.

    Returns:
        ``(label, folder)`` for every argument that names an existing local path.
    """
    out = []
    for label, model in models:
        if model is None:
            continue
        path = Path(os.path.expanduser(os.fspath(model)))
        if path.exists():
            out.append((label, path))
    return out


def check_location(out: str | os.PathLike, sources: Sources = (), *, shown: str | None = None,
                   error: type[Exception] = OutputExistsError) -> Path:
    """Refuse an output location that would put anything hf-llmc did not make at risk.

    Args:
        out: the output folder (or file).
        sources: ``(label, folder)`` of the run's source models (see :func:`source_folders`).
        shown: how to name it in messages (default: ``out={out!r}``).
        error: the exception class to raise.

    Returns:
        ``out`` as :func:`output_path` gives it.

    Raises:
        error: ``out`` is equal to, inside or around a source folder or the Hub cache, or equal to
            or around the current folder, the home folder or ``/``.
    """
    path = output_path(out)
    real = _real(path)
    where = shown if shown is not None else f"out={os.fspath(out)!r}"
    guarded: list[tuple[str, Path | None, bool]] = [("the root folder /", Path(path.anchor or "/"), False)]
    guarded += [(f"{label}'s folder", Path(folder), True) for label, folder in sources if folder is not None]
    guarded.append(("the Hugging Face Hub cache", hub_cache(), True))
    guarded += [("the current folder", Path.cwd(), False), ("your home folder", Path.home(), False)]
    for label, folder, inside_refused in guarded:
        if folder is None:
            continue
        target = _real(folder)
        if real == target:
            raise error(f"{where}: is {label}; choose a new folder for the output")
        if inside_refused and _within(real, target):
            raise error(f"{where}: lies inside {label}; choose a folder outside it")
        if _within(target, real):
            raise error(f"{where}: contains {label}; choose a new folder that does not")
    return path


def check_writable(folder: str | os.PathLike, shown: str | os.PathLike | None = None) -> None:
    """Refuse a folder that cannot be written, before any work, so a result is never computed and lost.

    Args:
        folder: the folder; where it does not exist yet, its nearest existing parent is checked.
        shown: how to name it in the message (default: ``folder``).

    Raises:
        OutputExistsError: the folder (or parent) is not a folder or not writable.
    """
    path = output_path(folder)
    while not path.exists() and path != path.parent:
        path = path.parent
    where = shown if shown is not None else folder
    if not path.is_dir():
        raise OutputExistsError(f"{where}: {path.name} is not a folder")
    if not os.access(path, os.W_OK | os.X_OK):
        raise OutputExistsError(f"{where}: cannot write there ({path.name or path} is not writable)")


def _size_text(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def check_free_space(folder: str | os.PathLike, size: int | None, shown: str) -> None:
    """Refuse an output whose disk cannot hold it: the estimated size plus :data:`SPACE_MARGIN`.

    Args:
        folder: the output folder (its nearest existing parent's disk is asked).
        size: the estimated output size in bytes (None or 0: nothing to check).
        shown: how to name the output in the message.

    Raises:
        OutputExistsError: less free space than ``size`` × 1.1.
    """
    if not size:
        return
    path = output_path(folder)
    while not path.exists() and path != path.parent:
        path = path.parent
    free = shutil.disk_usage(path).free
    need = int(size * (1 + SPACE_MARGIN))
    if free < need:
        raise OutputExistsError(
            f"{shown}: needs about {_size_text(need)} of free disk space (the output + 10 %), "
            f"only {_size_text(free)} is free there"
        )


def is_hf_llmc_folder(folder: str | os.PathLike) -> bool:
    """Whether a folder was written by hf-llmc (it holds the marker file :data:`MARKER`).

    Args:
        folder: the folder.

    Returns:
        True when ``folder/.hf-llmc`` is a regular file recording ``"written_by": "hf-llmc"``.
    """
    marker = Path(folder) / MARKER
    if marker.is_symlink() or not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("written_by") == "hf-llmc"
    except (OSError, ValueError, AttributeError):
        return False


def write_marker(folder: str | os.PathLike, kind: str) -> Path:
    """Mark a folder as written by hf-llmc (only folders hf-llmc made, or that were empty).

    Args:
        folder: the folder.
        kind: what it holds: ``merge``, ``scan``, ``robustness``, ``demo`` or ``barrier``.

    Returns:
        The marker file.
    """
    marker = Path(folder) / MARKER
    payload = {"written_by": "hf-llmc", "version": __version__, "kind": kind,
               "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_text_atomic(marker, json.dumps(payload) + "\n")
    return marker


def _check_existing(path: Path, where: str, overwrite: bool, error: type[Exception], *, resumable: bool = False) -> None:
    """A symbolic link or a file in the folder's place, or a non-empty folder hf-llmc may not replace."""
    if path.is_symlink():
        raise error(f"{where}: is a symbolic link; give the folder itself")
    if path.exists() and not path.is_dir():
        raise error(f"{where}: exists and is not a folder")
    if not path.is_dir() or not any(path.iterdir()):
        return
    if not overwrite:
        more = " or resume=True to continue" if resumable else ""
        raise error(f"{where}: exists and is not empty; pass overwrite=True to replace it{more}")
    if not is_hf_llmc_folder(path):
        raise error(f"{where}: was not written by hf-llmc (no {MARKER} marker file), so overwrite=True will not "
                    "replace it; remove it yourself or choose another folder")


def check_output_dir(out_dir: str | os.PathLike, overwrite: bool = False, *, sources: Sources = (),
                     size: int | None = None) -> Path:
    """Refuse an output folder that a merge could not write or may not replace (before any work).

    Args:
        out_dir: the output folder (``~`` is expanded; written beside it, then renamed into place).
        overwrite: allow replacing an existing non-empty folder that hf-llmc wrote.
        sources: ``(label, folder)`` of the source models (see :func:`source_folders`).
        size: the estimated output size in bytes, checked against the free disk space.

    Returns:
        ``out_dir`` as an absolute path.

    Raises:
        OutputExistsError: a protected location (:func:`check_location`), a file or link in its
            place, a non-empty folder without ``overwrite`` or not written by hf-llmc, a parent
            that is not writable, or too little free space.
    """
    where = f"out={os.fspath(out_dir)!r}"
    out = check_location(out_dir, sources, shown=where)
    _check_existing(out, where, overwrite, OutputExistsError)
    check_writable(out.parent, where)
    check_free_space(out.parent, size, where)
    return out


def _missing_parents(path: Path) -> list[Path]:
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, *, overwrite: bool = False, sources: Sources = (),
                      size: int | None = None, kind: str = "merge") -> Iterator[Path]:
    """A temporary folder beside ``out_dir`` that replaces it at once when the ``with`` block succeeds.

    The output is checked first (:func:`check_output_dir`). An existing non-empty ``out_dir`` needs
    ``overwrite`` and its :data:`MARKER`, and stays intact until the new folder is complete (then
    the two are swapped atomically where the OS allows). On success the marker is written, every
    file and folder is fsynced, the folder renamed into place and its parent fsynced. On error, or
    if the process is killed, ``out_dir`` is untouched and the temporary folder (and any parent
    folder made for it) is removed; a killed run's temporary folder is removed by the next run.

    Args:
        out_dir: the output folder.
        overwrite: allow replacing an existing non-empty folder that hf-llmc wrote.
        sources: ``(label, folder)`` of the source models (see :func:`source_folders`).
        size: the estimated output size in bytes (checked against the free disk space).
        kind: what the folder holds, recorded in its marker.

    Yields:
        The temporary folder to write into.

    Raises:
        OutputExistsError: ``out_dir`` cannot be used (see :func:`check_output_dir`), checked on
            entry and again before the rename.
    """
    sources = list(sources)
    out = check_output_dir(out_dir, overwrite, sources=sources, size=size)
    made = _missing_parents(out.parent)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out.parent)
    tmp = out.parent / temp_name(out.name)
    try:
        tmp.mkdir()
        yield tmp
        write_marker(tmp, kind)
        fsync_tree(tmp)
        check_output_dir(out_dir, overwrite, sources=sources)
        if out.is_dir() and any(out.iterdir()):
            if not _exchange(tmp, out):
                old = out.parent / temp_name(out.name, "old")
                os.rename(out, old)
                os.rename(tmp, out)
                tmp = old
            fsync_path(out.parent)
            shutil.rmtree(tmp, ignore_errors=True)  # the previous content
        else:
            if out.is_dir():
                out.rmdir()
            os.rename(tmp, out)
            fsync_path(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in made:  # parents made for this output, innermost first, if still empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def check_run_dir(out: str | os.PathLike, *, resume: bool = False, overwrite: bool = False, sources: Sources = (),
                  size: int | None = RUN_DIR_SIZE) -> Path:
    """Refuse an output folder a resumable run (scan, robustness) cannot use, before any work.

    Args:
        out: the run folder (``~`` is expanded).
        resume: the run continues the rows already in the folder.
        overwrite: the run replaces the folder's results (only in a folder hf-llmc wrote).
        sources: ``(label, folder)`` of the source models (see :func:`source_folders`).
        size: the estimated output size in bytes (checked against the free disk space; default
            :data:`RUN_DIR_SIZE`).

    Returns:
        ``out`` as an absolute path.

    Raises:
        ScanError: ``resume`` and ``overwrite`` together, a file or link in its place, a non-empty
            folder without either option, or ``overwrite`` of a folder hf-llmc did not write.
        OutputExistsError: a protected location (:func:`check_location`), a folder (or its
            nearest existing parent) that is not writable, or too little free space.
    """
    where = f"out={os.fspath(out)!r}"
    if resume and overwrite:
        raise ScanError("resume=True and overwrite=True exclude each other")
    path = check_location(out, sources, shown=where)
    if not resume:
        _check_existing(path, where, overwrite, ScanError, resumable=True)
    elif path.is_symlink() or (path.exists() and not path.is_dir()):
        _check_existing(path, where, False, ScanError)
    check_writable(path, where)
    check_free_space(path, size, where)
    return path


def prepare_run_dir(out: str | os.PathLike, kind: str) -> Path:
    """Create a run folder written in place (a scan's), with its marker; remove stale temporary files in it.

    Args:
        out: the run folder, checked with :func:`check_run_dir` (it may exist).
        kind: what it holds (``scan`` or ``robustness``), recorded in its marker.

    Returns:
        The folder.
    """
    path = output_path(out)
    made = not path.is_dir() or not any(path.iterdir())
    if not path.is_dir():
        path.mkdir(parents=True, exist_ok=True)
        fsync_path(path.parent)
    if made or not is_hf_llmc_folder(path):
        write_marker(path, kind)
    clean_stale(path)
    return path
