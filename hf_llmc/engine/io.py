"""The one policy for what hf-llmc writes: result rows, JSON files and output folders.

* Result rows are JSON lines, each flushed and fsynced before the next (:class:`RowWriter`); a
  truncated last line (an interrupted write) is dropped on reading (:func:`read_rows`).
* JSON files are written to a temporary file and renamed (:func:`write_json_atomic`).
* Output folders are checked before any work (:func:`check_writable`, :func:`check_output_dir`,
  :func:`check_run_dir`); a merged model is built in a temporary folder beside its destination
  and renamed into place only when complete (:func:`atomic_output_dir`).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

from ..config.errors import OutputExistsError, ScanError
from ..config.files import write_json_atomic

__all__ = ["RowWriter", "read_rows", "write_json_atomic", "check_writable", "check_output_dir", "check_run_dir",
           "atomic_output_dir", "clean_stale", "TMP_MARK", "RESULTS", "MANIFEST"]

#: Marks the temporary folder of an unfinished output: ``.NAME.hf-llmc-tmp-PID-RANDOM``.
TMP_MARK = ".hf-llmc-tmp-"
#: A run folder's result rows and its manifest (settings, models, data, hash of what changes numbers).
RESULTS = "results.jsonl"
MANIFEST = "scan.json"


# -- result rows ------------------------------------------------------------------------------------
def read_rows(path: str | os.PathLike, *, repair: bool = False) -> list[dict]:
    """The rows of a results file, tolerating the truncated last line of an interrupted write.

    Args:
        path: the JSON-lines file.
        repair: cut a truncated last line off the file (and end the file with a newline).

    Returns:
        The rows (dicts with a ``group`` key) in file order; empty when the file does not exist.

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
                if not isinstance(row, dict) or "group" not in row:
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
        self._fh = open(path, "ab")

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
def check_writable(folder: str | os.PathLike, shown: str | os.PathLike | None = None) -> None:
    """Refuse a folder that cannot be written, before any work, so a result is never computed and lost.

    Args:
        folder: the folder; where it does not exist yet, its nearest existing parent is checked.
        shown: how to name it in the message (default: ``folder``).

    Raises:
        OutputExistsError: the folder (or parent) is not a folder or not writable.
    """
    path = Path(folder).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    where = shown if shown is not None else folder
    if not path.is_dir():
        raise OutputExistsError(f"{where}: {path.name} is not a folder")
    if not os.access(path, os.W_OK | os.X_OK):
        raise OutputExistsError(f"{where}: cannot write there ({path.name or path} is not writable)")


def check_output_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse an output folder that a merge could not write or would overwrite without permission.

    Args:
        out_dir: the output folder (written beside it, then renamed into place).
        overwrite: allow an existing non-empty folder.

    Returns:
        ``out_dir`` as a path.

    Raises:
        OutputExistsError: a file in its place, a non-empty folder without ``overwrite``, or a
            parent that is not writable.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(f"{out}: exists and is not empty; pass overwrite=True to replace it")
    check_writable(out.absolute().parent, out)
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(out_dir: str | os.PathLike) -> list[Path]:
    """Remove temporary folders beside ``out_dir`` left by killed runs.

    Args:
        out_dir: the output folder whose ``.NAME.hf-llmc-tmp-PID-...`` siblings are checked.

    Returns:
        The folders removed: those whose process is gone (never this process's).
    """
    out = Path(out_dir)
    removed = []
    if not out.parent.is_dir():
        return removed
    prefix = f".{out.name}{TMP_MARK}"
    for entry in out.parent.iterdir():
        if not entry.name.startswith(prefix) or not entry.is_dir():
            continue
        pid = entry.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


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
def atomic_output_dir(out_dir: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """A temporary folder beside ``out_dir`` that replaces it at once when the ``with`` block succeeds.

    An existing non-empty ``out_dir`` needs ``overwrite`` and stays intact until the new folder is
    complete (then the two are swapped atomically where the OS allows). On error, or if the process
    is killed, ``out_dir`` is untouched; stale temporary folders are removed at the next run.

    Args:
        out_dir: the output folder.
        overwrite: allow replacing an existing non-empty folder.

    Yields:
        The temporary folder to write into.

    Raises:
        OutputExistsError: ``out_dir`` cannot be used (see :func:`check_output_dir`), checked on
            entry and again before the rename.
    """
    out = check_output_dir(out_dir, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
    tmp = out.parent / f".{out.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        check_output_dir(out, overwrite)
        if out.is_dir() and any(out.iterdir()):
            if not _exchange(tmp, out):
                old = out.parent / f".{out.name}{TMP_MARK}{os.getpid()}-old-{uuid.uuid4().hex[:8]}"
                os.rename(out, old)
                os.rename(tmp, out)
                tmp = old
            shutil.rmtree(tmp, ignore_errors=True)  # the previous content
        else:
            if out.is_dir():
                out.rmdir()
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_run_dir(out: str | os.PathLike, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Refuse an output folder a resumable run (scan, robustness) cannot use, before any work.

    Args:
        out: the run folder.
        resume: the run continues the rows already in the folder.
        overwrite: the run replaces the folder's results.

    Returns:
        ``out`` as a path.

    Raises:
        ScanError: ``resume`` and ``overwrite`` together, a file in its place, or a non-empty
            folder without either option.
        OutputExistsError: the folder (or its nearest existing parent) is not writable.
    """
    out = Path(out)
    if resume and overwrite:
        raise ScanError("resume=True and overwrite=True exclude each other")
    if out.exists() and not out.is_dir():
        raise ScanError(f"out={str(out)!r}: exists and is not a folder")
    if not resume and not overwrite and out.is_dir() and any(out.iterdir()):
        raise ScanError(f"out={str(out)!r}: folder is not empty; pass overwrite=True to replace it or resume=True to continue")
    check_writable(out, f"out={str(out)!r}")
    return out
