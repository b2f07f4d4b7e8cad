"""File primitives every layer shares: the cache root, temporary names, durable atomic writes and the
removal of temporary files left by processes that ended.

Everything hf-llmc writes goes to a temporary sibling named ``.NAME.hf-llmc-tmp-PID.START-RANDOM``
(PID and START identify the writing process: its id and its start time), is fsynced, renamed into
place, and the folder holding it is fsynced. On any error the temporary sibling is removed. A
temporary sibling whose process has ended (a killed run) is removed by the next write into the
same folder (:func:`clean_stale`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from functools import cache
from pathlib import Path

#: Marks a temporary file or folder: ``.NAME.hf-llmc-tmp-PID.START-RANDOM``.
TMP_MARK = ".hf-llmc-tmp-"


def cache_root() -> Path:
    """The folder hf-llmc caches into (token blocks, architectures), so repeated runs skip work.

    Returns:
        ``HF_LLMC_CACHE``, else ``$XDG_CACHE_HOME/hf_llmc`` (default ``~/.cache/hf_llmc``).
    """
    root = os.environ.get("HF_LLMC_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hf_llmc"
    return Path(root)


# -- processes ---------------------------------------------------------------------------------------
def process_start(pid: int) -> str | None:
    """When process ``pid`` started, as an opaque token (Linux: clock ticks since boot), or None.

    Args:
        pid: a process id.

    Returns:
        The start time read from ``/proc/PID/stat``; None where it cannot be read (no such
        process, or no ``/proc``).
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


@cache
def _own_start() -> str:
    return process_start(os.getpid()) or "0"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def temp_name(name: str, tag: str = "") -> str:
    """The name of a temporary sibling of ``name`` owned by this process.

    Args:
        name: the final file or folder name.
        tag: an optional word inside the name (e.g. ``old`` for a replaced folder).

    Returns:
        ``.NAME.hf-llmc-tmp-PID.START-[TAG-]RANDOM``.
    """
    return f".{name}{TMP_MARK}{os.getpid()}.{_own_start()}-{tag + '-' if tag else ''}{uuid.uuid4().hex[:8]}"


def is_stale(entry_name: str) -> bool:
    """Whether a temporary entry was left by a process that has ended.

    Args:
        entry_name: a file or folder name holding :data:`TMP_MARK`.

    Returns:
        True when the process that made it is gone (its id is unused, or used by a process that
        started later); False for this process's own entries, a running writer's, and any name
        that is not a temporary entry.
    """
    if TMP_MARK not in entry_name:
        return False
    owner = entry_name.rsplit(TMP_MARK, 1)[1].split("-", 1)[0]
    pid_text, _, start = owner.partition(".")
    if not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if not _pid_alive(pid):
        return True
    if start:  # the process id may have been reused by a later process
        now = process_start(pid)
        return now is not None and now != start
    return False


def clean_stale(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files and folders in ``folder`` left by processes that ended.

    Args:
        folder: a folder hf-llmc writes into.

    Returns:
        The entries removed (never a running process's, never this process's).
    """
    removed: list[Path] = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(".") or not is_stale(entry.name):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
        except OSError:
            pass
    return removed


# -- durable writes ----------------------------------------------------------------------------------
def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's or a folder's contents and metadata to disk.

    Args:
        path: the file or folder (folders are fsynced where the platform allows it).
    """
    flags = os.O_RDONLY | (os.O_DIRECTORY if Path(path).is_dir() and hasattr(os, "O_DIRECTORY") else 0)
    try:
        fd = os.open(path, flags)
    except (IsADirectoryError, PermissionError):
        return  # a folder on a platform that cannot open folders
    try:
        os.fsync(fd)
    except OSError:
        pass  # e.g. a folder on a file system that does not support fsync on folders
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file and folder under ``root`` (``root`` included), deepest first.

    Args:
        root: the folder.
    """
    root = Path(root)
    for folder, dirs, files in os.walk(root, topdown=False):
        for name in files:
            path = Path(folder) / name
            if not path.is_symlink():
                fsync_path(path)
        fsync_path(folder)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary sibling of ``path`` that becomes ``path`` when the ``with`` block succeeds.

    The parent folder is created; stale temporary entries in it are removed. On success the
    file is fsynced, renamed into place and the folder fsynced; on any error the temporary file
    is removed and ``path`` is untouched.

    Args:
        path: the file to write.

    Yields:
        The temporary path to write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path.parent)
    tmp = path.with_name(temp_name(path.name))
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_path(path.parent)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write bytes durably and atomically (see :func:`atomic_file`).

    Args:
        path: the file to write; its parent folder is created.
        data: the content.
    """
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 text durably and atomically (see :func:`atomic_file`).

    Args:
        path: the file to write; its parent folder is created.
        text: the content.
    """
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, payload: dict) -> None:
    """Write JSON atomically (temporary file, fsync, rename), so a reader never sees a half-written file.

    Args:
        path: the file to write; its parent folder is created.
        payload: the JSON content (values JSON cannot hold are written with ``str``).
    """
    write_text_atomic(path, json.dumps(payload, indent=2, default=str) + "\n")
