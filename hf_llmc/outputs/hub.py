"""Publish a model folder to the Hugging Face Hub.

:func:`push_folder` is ``HfApi.create_repo(exist_ok=True)`` (+ ``create_branch`` for a
branch) + ``upload_folder``, with the token taken from huggingface_hub's usual sources
(argument, ``HF_TOKEN``, the stored ``hf auth login`` token). Every failure becomes a
:class:`HubError` whose message is one line, says what to do, and never contains a
token; the original exception (whose request headers hold the token) is not chained.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from ..config.errors import HfLlmcWarning, HubError, ModelFolderError
from ..config.security import is_hub_id, known_tokens, redact

__all__ = ["HubError", "ModelFolderError", "check_model_folder", "push_folder"]

NOT_LOGGED_IN = "not logged in: run `hf auth login` or set HF_TOKEN"

_WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin", "tf_model.h5", "flax_model.msgpack", "*.gguf")
_ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SCAN_CHUNK_BYTES = 16 * 1024 * 1024  # every file is scanned whole, in chunks of this size
#: Files of hf-llmc's own that are not published (the output-folder marker).
NOT_PUBLISHED = (".hf-llmc",)
#: What ``upload_folder`` never uploads (huggingface_hub's ``DEFAULT_IGNORE_PATTERNS``).
_ALWAYS_IGNORED = (".git", ".git/*", "*/.git", "**/.git/**", ".cache/huggingface", ".cache/huggingface/*",
                   "*/.cache/huggingface", "**/.cache/huggingface/**")


def check_model_folder(folder: str | os.PathLike) -> Path:
    """Check that a folder holds a complete model or PEFT adapter before it is published.

    Also checks that every shard named in an index file exists and that no file is a
    symbolic link leading outside the folder (``upload_folder`` follows links, so a link
    to e.g. the stored token would be published).

    Args:
        folder: the folder to publish.

    Returns:
        The resolved folder.

    Raises:
        ModelFolderError: no such folder, no ``config.json`` + weights nor ``adapter_config.json`` +
            adapter weights, an invalid index file or a missing shard, or a link leading outside.
    """
    path = Path(folder)
    if not path.exists():
        raise ModelFolderError(f"{folder}: no such folder")
    if not path.is_dir():
        raise ModelFolderError(f"{folder}: not a folder")
    root = path.resolve()
    is_model = (root / "config.json").is_file() and any(any(root.glob(g)) for g in _WEIGHT_GLOBS)
    is_adapter = (root / "adapter_config.json").is_file() and any((root / w).is_file() for w in _ADAPTER_WEIGHTS)
    if not (is_model or is_adapter):
        raise ModelFolderError(
            f"{folder} does not contain a model: expected config.json and weights (*.safetensors), "
            "or adapter_config.json and adapter_model.safetensors"
        )
    for index_name in _INDEX_FILES:
        index = root / index_name
        if index.is_file():
            import json

            try:
                shards = set(json.loads(index.read_text())["weight_map"].values())
            except (ValueError, KeyError, TypeError, AttributeError):
                raise ModelFolderError(f"{folder}/{index_name} is not a valid index file") from None
            missing = sorted(s for s in shards if not (root / s).is_file())
            if missing:
                raise ModelFolderError(f"{folder} is incomplete: {index_name} lists {missing[0]}, which is missing")
    for item in root.rglob("*"):
        if item.is_symlink():
            target = item.resolve()
            if target != root and root not in target.parents:
                raise ModelFolderError(
                    f"{folder}: {item.relative_to(root).as_posix()} is a link to a file outside the folder; "
                    "copy the file in or remove the link"
                )
    return root


def _resolve_token(token: str | None) -> str | None:
    if token:
        return token
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:  # noqa: BLE001 - e.g. a failing OIDC exchange: treat as not logged in
        return None


def _file_contains(path: Path, needles: list[bytes]) -> bool:
    """Whether a file holds one of ``needles``, read whole in chunks (a needle across two chunks is found)."""
    keep = max(len(n) for n in needles) - 1
    tail = b""
    with open(path, "rb", buffering=0) as fh:
        while True:
            chunk = fh.read(_SCAN_CHUNK_BYTES)
            if not chunk:
                return False
            window = tail + chunk
            if any(n in window for n in needles):
                return True
            tail = window[-keep:] if keep else b""


def _find_token_in_files(root: Path, tokens: list[str]) -> str | None:
    """Relative path of the first file that contains one of ``tokens`` (a leak guard; every byte of every file)."""
    needles = [t.encode() for t in dict.fromkeys(tokens) if t and len(t) >= 8]
    if not needles:
        return None
    for item in sorted(root.rglob("*")):
        if not item.is_file() or ".git" in item.relative_to(root).parts:
            continue
        if _file_contains(item, needles):
            return item.relative_to(root).as_posix()
    return None


def card_base_models(root: Path) -> list:
    """The ``base_model`` entries of a folder's README.md card, in the card's order.

    Args:
        root: the model folder.

    Returns:
        The entries (empty without a card, an unreadable card or no ``base_model``).
    """
    readme = root / "README.md"
    if not readme.is_file():
        return []
    from huggingface_hub import ModelCard

    try:
        value = ModelCard.load(readme, ignore_metadata_errors=True).data.base_model
    except Exception:  # noqa: BLE001 - an unreadable card is reported by the Hub's own validation
        return []
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def _card_without(root: Path, dropped: list[str]) -> bytes:
    """README.md with the ``dropped`` entries removed from ``base_model`` (the file itself is not changed)."""
    from huggingface_hub import ModelCard

    card = ModelCard.load(root / "README.md", ignore_metadata_errors=True)
    value = card.data.base_model
    kept = [e for e in (value if isinstance(value, list) else [value]) if str(e) not in dropped]
    card.data.base_model = kept or None
    if not kept:
        card.data.base_model_relation = None
    return str(card).encode("utf-8")


def _model_exists(api, repo_id: str) -> bool:
    """Whether a Hub model exists (a gated or private one counts); a 404 of any kind means no."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return api.repo_exists(repo_id, repo_type="model")
    except HfHubHTTPError as err:
        if getattr(getattr(err, "response", None), "status_code", None) == 404:
            return False
        raise


def _operations(root: Path, replaced: dict[str, bytes]) -> list:
    """The commit operations ``upload_folder`` would make for ``root`` (same ignore rules), with
    the files in ``replaced`` uploaded from memory instead."""
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.utils import filter_repo_objects

    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    kept = filter_repo_objects(files, ignore_patterns=[*_ALWAYS_IGNORED, *NOT_PUBLISHED])
    return [CommitOperationAdd(path_in_repo=name, path_or_fileobj=replaced.get(name, str(root / name))) for name in kept]


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _describe(err: BaseException, *, endpoint: str, repo_id: str, step: str) -> str:
    """One-line description of a failure of ``step`` (what happened and what to do)."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    # upload helpers wrap the real cause ("Error while uploading 'x' to the Hub."); a
    # ValueError (e.g. "Invalid metadata in README.md") already says what is wrong
    chain, seen = (None if isinstance(err, ValueError) else err), set()
    while chain is not None and id(chain) not in seen:
        seen.add(id(chain))
        if isinstance(chain, (HfHubHTTPError, OfflineModeIsEnabled, httpx2.HTTPError, ConnectionError, TimeoutError)):
            err = chain
            break
        chain = chain.__cause__ or chain.__context__

    if isinstance(err, OfflineModeIsEnabled):
        return f"cannot reach {endpoint}: offline mode is on (unset HF_HUB_OFFLINE to publish)"
    if isinstance(err, HfHubHTTPError):
        response = getattr(err, "response", None)
        status = getattr(response, "status_code", None)
        reason = getattr(response, "reason_phrase", "") or ""
        detail = getattr(err, "server_message", None) or ""
        if status == 401:
            return (
                f"authentication failed at {endpoint} (HTTP 401): the token was rejected; "
                "run `hf auth login` or set HF_TOKEN to a valid token"
            )
        if status == 403:
            return (
                f"permission denied at {endpoint} (HTTP 403) while {step} for {repo_id}: "
                "use a token with write access to this namespace"
            )
        if status == 404:
            return f"not found at {endpoint} (HTTP 404) while {step} for {repo_id}" + (f": {_one_line(detail)}" if detail else "")
        head = f"{endpoint} answered HTTP {status} {reason}".rstrip()
        return f"{head} while {step} for {repo_id}" + (f": {_one_line(detail)}" if detail else "")
    if isinstance(err, (httpx2.TimeoutException, TimeoutError)):
        return f"cannot reach {endpoint}: timed out while {step}; check your network or HF_ENDPOINT"
    if isinstance(err, (httpx2.TransportError, ConnectionError)):
        reason = _one_line(str(err) or type(err).__name__, 120)
        return f"cannot reach {endpoint} ({reason}); check your network or HF_ENDPOINT"
    if isinstance(err, ValueError):  # e.g. invalid README.md metadata, malformed server reply
        return f"{step} for {repo_id} failed: {_one_line(err)}"
    return f"{step} for {repo_id} failed: {type(err).__name__}: {_one_line(err)}"


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    create_pr: bool = False,
    endpoint: str | None = None,
) -> str:
    """Upload a model folder to a Hub model repo, creating the repo and branch if needed.

    Args:
        folder: the model folder (checked with :func:`check_model_folder`).
        repo_id: the Hub repo id (``user/name``).
        private: make a newly created repo private (an existing repo keeps its visibility).
        revision: the branch to push to, created from ``main`` if it does not exist.
        commit_message: the commit message (default: ``Upload NAME with hf-llmc``).
        token: a Hub token (default: ``HF_TOKEN``, else the stored ``hf auth login`` token).
        create_pr: open a pull request against ``main`` instead of committing.
        endpoint: the Hub URL (default: ``HF_ENDPOINT`` read at call time).

    Every file is scanned for the token first (whole files, streamed). A ``base_model`` of the
    card that is not a Hub model (a local folder's name, a path, a repo that does not exist) is
    dropped from the uploaded card with a :class:`~hf_llmc.config.errors.HfLlmcWarning`; the folder
    itself is not changed. hf-llmc's marker file ``.hf-llmc`` is not uploaded.

    Returns:
        The commit URL (the pull request's URL with ``create_pr``), without any token.

    Raises:
        ModelFolderError: the folder is not a complete model, or ``create_pr`` with a branch ``revision``.
        HubError: not logged in, a file in the folder contains a token, or an authentication,
            network or server failure (one line, no token).
    """
    from huggingface_hub import HfApi, constants

    root = check_model_folder(folder)
    if create_pr and revision not in (None, "main"):
        raise ModelFolderError("create_pr opens a pull request against main: do not pass a revision with it")
    token = _resolve_token(token)
    if not token:
        raise HubError(NOT_LOGGED_IN)
    leaked = _find_token_in_files(root, [token, *known_tokens()])
    if leaked is not None:
        raise HubError(f"refusing to upload: {leaked} contains an access token; remove it from the folder first")

    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    api = HfApi(endpoint=endpoint, token=token)
    message = commit_message or f"Upload {root.name} with hf-llmc"
    branch = revision if revision and revision != "main" else None
    step = "creating the repository"
    failure: str | None = None
    try:
        api.create_repo(repo_id, private=True if private else None, exist_ok=True, repo_type="model")
        if branch is not None:
            step = f"creating branch {branch}"
            api.create_branch(repo_id, branch=branch, exist_ok=True, repo_type="model")
        step = "checking the card's base_model"
        dropped = [str(entry) for entry in card_base_models(root)
                   if not (isinstance(entry, str) and is_hub_id(entry) and _model_exists(api, entry))]
        if dropped:
            warnings.warn(HfLlmcWarning(
                f"README.md names base_model {', '.join(repr(d) for d in dropped)}, which "
                f"{'is not a Hub model' if len(dropped) == 1 else 'are not Hub models'}; dropped from the "
                "uploaded card (the folder is unchanged; a merge names its Hub repos with --hub-id-a/--hub-id-b)"),
                stacklevel=2)
        step = "uploading the folder"
        if dropped:  # the folder's files as they are, but the card without the dropped entries
            info = api.create_commit(
                repo_id=repo_id, repo_type="model", revision=branch, commit_message=message, create_pr=create_pr,
                operations=_operations(root, {"README.md": _card_without(root, dropped)}),
            )
        else:
            info = api.upload_folder(
                repo_id=repo_id,
                folder_path=root,
                repo_type="model",
                revision=branch,
                commit_message=message,
                create_pr=create_pr,
                ignore_patterns=list(NOT_PUBLISHED),
            )
    except Exception as err:  # noqa: BLE001 - mapped to a one-line HubError below
        failure = _describe(err, endpoint=endpoint, repo_id=repo_id, step=step)
    if failure is not None:
        # raised outside the except block: no __context__ holding requests with the token
        raise HubError(redact(failure, extra=[token])) from None
    url = (info.pr_url if create_pr and info.pr_url else info.commit_url) or ""
    return redact(str(url), extra=[token])
