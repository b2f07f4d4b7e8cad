"""Where a model argument's files are: a local folder, or a Hub snapshot in huggingface_hub's
cache (honouring ``HF_HUB_OFFLINE``). Torch-free."""

from __future__ import annotations

import os
from pathlib import Path

from ...config.errors import CheckpointError

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = ("pytorch_model.bin", "model.pt", "pytorch_model.pt")
#: Tokenizer files (compared byte for byte between A and B, copied into merges).
TOKENIZER_PATTERNS = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "*.tiktoken",
)
#: Files a merge copies from its base checkpoint's folder (config, generation config, tokenizer, processor).
COPY_PATTERNS = (
    "config.json", "generation_config.json", *TOKENIZER_PATTERNS, "chat_template.json", "chat_template.jinja",
    "preprocessor_config.json", "processor_config.json",
)
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja", "*.md"]


def _looks_like_path(source: str) -> bool:
    return (
        source.startswith((".", "/", "~"))
        or os.sep in source.strip("/").replace("/", "", 1)
        or source.count("/") > 1
    )


def resolve_folder(
    source: str | os.PathLike,
    revision: str | None = None,
    *,
    token: str | bool | None = None,
    allow_patterns: list[str] | None = None,
) -> Path:
    """Return a local folder for ``source``: the folder itself, or a Hub snapshot in the cache."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{source}: is a file; pass the model folder")
    text = str(source)
    if _looks_like_path(text):
        raise CheckpointError(f"{source}: no such model folder")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(
            snapshot_download(
                text,
                revision=revision,
                token=token,
                allow_patterns=allow_patterns or HUB_PATTERNS,
            )
        )
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"{source}: not a local folder, and the Hub cannot be reached (offline, or not cached); "
            "check the path, or connect / unset HF_HUB_OFFLINE"
        ) from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{source}: revision {revision!r} not found on the Hub") from None
    except GatedRepoError:
        raise CheckpointError(f"{source}: gated repository; request access and log in") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{source}: no such local folder or Hub repository") from None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{source}: cannot be fetched from the Hub ({type(err).__name__})") from None
