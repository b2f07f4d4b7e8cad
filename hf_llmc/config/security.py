"""What may be shown and where files may go: tokens never appear in logs, cards or errors; a
name read from a checkpoint or recipe never leads outside its folder; local paths are published
by their last component only."""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath, PureWindowsPath

from .errors import UnsafePathError

_TOKEN_RE = re.compile(r"hf_[A-Za-z0-9]{8,}")
_TOKEN_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_TOKEN")


def known_tokens() -> list[str]:
    """Tokens this process could use, so that they can be kept out of every output.

    Returns:
        The tokens in ``HF_TOKEN`` / ``HUGGING_FACE_HUB_TOKEN`` / ``HUGGINGFACE_TOKEN`` and
        huggingface_hub's stored token (those of at least 4 characters).
    """
    tokens = [os.environ[k] for k in _TOKEN_ENV if os.environ.get(k)]
    try:
        from huggingface_hub import get_token

        stored = get_token()
        if stored:
            tokens.append(stored)
    except Exception:  # noqa: BLE001 - redaction must never fail
        pass
    return [t for t in tokens if len(t) >= 4]


def redact(text: str, extra: list[str] | tuple[str, ...] = ()) -> str:
    """Replace every known token in a text by ``***`` before it is shown or written.

    Args:
        text: the text to clean.
        extra: more tokens to remove (e.g. one passed as an argument).

    Returns:
        ``text`` with :func:`known_tokens`, ``extra`` and anything shaped like an ``hf_`` token replaced.
    """
    for token in sorted({*known_tokens(), *extra}, key=len, reverse=True):
        text = text.replace(token, "***")
    return _TOKEN_RE.sub("***", text)


def safe_join(root: str | os.PathLike, name: str) -> Path:
    """``root / name`` for a file name read from a checkpoint, index or recipe, kept inside ``root``.

    Checked on the text (absolute paths, drive letters, ``..`` parts, NUL), not by resolving
    links: Hub cache snapshots are links into the cache's blob store.

    Args:
        root: the folder the name belongs to.
        name: a relative file name.

    Returns:
        The joined path.

    Raises:
        UnsafePathError: ``name`` is empty, absolute, has a drive letter, a ``..`` part or a NUL.
    """
    text = str(name)
    parts = PurePosixPath(text.replace("\\", "/")).parts
    if not text or text.startswith(("/", "\\")) or PureWindowsPath(text).drive or ".." in parts or "\x00" in text:
        raise UnsafePathError(f"{name}: lies outside {Path(root).name or root}")
    return Path(root) / text


def display_name(source: str | os.PathLike) -> str:
    """A model name safe to publish in cards and results (no local directory layout).

    Args:
        source: a Hub id or a local path.

    Returns:
        The last component of a local path (an existing one resolved first; an absolute or
        ``~`` path also when it does not exist), else ``source`` as text (a Hub id).
    """
    text = str(source)
    path = Path(text).expanduser()
    if path.exists():
        return path.resolve().name
    if path.is_absolute() or text.startswith("~"):
        return path.name
    return text


def public_name(value: str | os.PathLike | None) -> str | None:
    """A data or model reference safe to publish: a local path by its last component only.

    Args:
        value: a local path, a Hub id, a dataset name or None.

    Returns:
        None for None, else :func:`display_name` of ``value`` (an existing local path by its last component).
    """
    if value is None:
        return None
    path = Path(str(value)).expanduser()
    if path.is_absolute() or path.exists():
        return display_name(value)
    return str(value)
