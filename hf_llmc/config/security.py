"""What may be shown and where files may go: tokens never appear in logs, cards or errors; a
name read from a checkpoint or recipe never leads outside its folder; local paths are published
by their last component only."""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath, PureWindowsPath

from .errors import UnsafePathError, UsageError

_TOKEN_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_TOKEN")
#: Shorter values are never treated as tokens (redacting them would blank ordinary words).
MIN_TOKEN_LENGTH = 4
_HUB_ID_RE = re.compile(r"(?:[\w.-]{1,96}/)?[\w.-]{1,96}", re.ASCII)


def known_tokens() -> list[str]:
    """Tokens this process could use, so that they can be kept out of every output.

    Returns:
        The tokens in ``HF_TOKEN`` / ``HUGGING_FACE_HUB_TOKEN`` / ``HUGGINGFACE_TOKEN``,
        huggingface_hub's active token (``hf auth login``: the token file) and every stored
        login token; those of at least :data:`MIN_TOKEN_LENGTH` characters.
    """
    tokens = [os.environ[k] for k in _TOKEN_ENV if os.environ.get(k)]
    try:
        from huggingface_hub import get_token

        stored = get_token()
        if stored:
            tokens.append(stored)
    except Exception:  # noqa: BLE001 - redaction must never fail
        pass
    try:
        from huggingface_hub.utils import get_stored_tokens

        tokens += [t for t in get_stored_tokens().values() if isinstance(t, str)]
    except Exception:  # noqa: BLE001
        pass
    return list(dict.fromkeys(t.strip() for t in tokens if len(t.strip()) >= MIN_TOKEN_LENGTH))


def redact(text: str, extra: list[str] | tuple[str, ...] = ()) -> str:
    """Replace every occurrence of the actual token values in a text by ``***`` before it is shown or written.

    Only real token values are removed (from the environment, the token files, or ``extra``);
    text that merely looks like a token (a model named ``hf_tinyllama7b``) is kept.

    Args:
        text: the text to clean.
        extra: more tokens to remove (e.g. one passed as an argument).

    Returns:
        ``text`` with :func:`known_tokens` and ``extra`` replaced.
    """
    values = {*known_tokens(), *(t for t in extra if t and len(t) >= MIN_TOKEN_LENGTH)}
    for token in sorted(values, key=len, reverse=True):
        text = text.replace(token, "***")
    return text


def is_hub_id(value: str | None) -> bool:
    """Whether ``value`` has the form of a Hub repo id (``name`` or ``namespace/name``).

    The rules of ``huggingface_hub.utils.validate_repo_id``: letters, digits, ``-``, ``_``, ``.``;
    not starting or ending with ``-`` or ``.``; no ``--`` or ``..``; not ending in ``.git``; at
    most 96 characters per part.

    Args:
        value: the text.

    Returns:
        True for a well-formed repo id (whether the repo exists is not checked).
    """
    if not isinstance(value, str) or not _HUB_ID_RE.fullmatch(value):
        return False
    if "--" in value or ".." in value or value.endswith(".git"):
        return False
    return all(part and part[0] not in "-." and part[-1] not in "-." for part in value.split("/"))


def check_hub_id(value: str | None, name: str) -> str | None:
    """Refuse a parameter value that should be a Hub repo id and is not.

    Args:
        value: the value (None passes).
        name: the parameter's name, for the message.

    Returns:
        ``value``.

    Raises:
        UsageError: ``value`` is not a repo id (see :func:`is_hub_id`).
    """
    if value is not None and not is_hub_id(value):
        raise UsageError(f"{name}={value!r}: not a Hub repo id (name or namespace/name)")
    return value


def is_local_source(source: str | os.PathLike) -> bool:
    """Whether a model argument names a local folder (rather than a Hub repo id).

    Args:
        source: a model argument.

    Returns:
        True when it exists on disk, is written as a path (absolute, ``.``, ``~``, backslashes,
        more than one ``/``) or is not a well-formed repo id.
    """
    text = os.fspath(source)
    if Path(text).expanduser().exists():
        return True
    if text.startswith((".", "/", "~", "\\")) or "\\" in text or text.count("/") > 1:
        return True
    return not is_hub_id(text)


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
