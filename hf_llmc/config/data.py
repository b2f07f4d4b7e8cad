"""Where the evaluation tokens come from and how they are cut into blocks."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Literal

from .errors import DataError
from .fields import check_choice, setting

DEFAULT_MAX_TOKENS = 262144
#: A name of an evaluation set (``--data NAME=PATH``): a letter, then letters, digits, ``_``, ``.`` or ``-``.
SET_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,39}")
#: Names the averages over several sets use in results and reports.
AVERAGE_NAMES = ("mean", "macro")


@dataclass
class DataConfig:
    """Where the evaluation tokens come from and how they are cut."""

    data: str | list[str] | None = setting(None, "Local evaluation text: .txt (one document) or .jsonl/.json/.csv/.parquet (one document per row). Several named sets: NAME=PATH, repeated (or a list).")
    dataset: str | list[str] | None = setting(None, "Hub dataset NAME[:CONFIG][:SPLIT] (split default: validation, else test, else train). Several named sets: SET=NAME[:CONFIG][:SPLIT], repeated (or a list).")
    text_column: str = setting("text", "Column holding the text in tabular data.")
    seq_len: int | None = setting(None, "Tokens per block (default: min(1024, the model's maximum positions)).")
    max_tokens: int = setting(DEFAULT_MAX_TOKENS, "Cap on evaluation tokens (the stream is cut before blocking).")
    no_bos: bool = setting(False, "Do not start every block with BOS (by default blocks start with BOS when A's tokenizer adds one to a text, as Llama-family models are trained; documents are then joined without it).")
    chat: bool = setting(False, "Chat data: each row's messages (a list of {role, content}) is one conversation, rendered with A's chat template into one row of at most seq_len tokens (longer ones are truncated); the conversation is the paired unit, weighted by its scored tokens.")
    messages_column: str = setting("messages", "Column holding the conversations of chat data.")
    loss_on: Literal["assistant", "all"] | None = setting(None, "Tokens the loss is taken over: 'assistant' (the assistant turns of chat data; the default with chat) or 'all' (every predicted token; the default and the only choice for plain text).")

    def validate(self) -> None:
        """Check the options without reading any data.

        Raises:
            DataError: no ``data`` / ``dataset``, a single set given both ways, bad or repeated set
                names, a ``seq_len`` / ``max_tokens`` below 2, or ``loss_on`` that is not a choice or is
                ``"assistant"`` without ``chat``.
        """
        self.named()
        if self.seq_len is not None and self.seq_len < 2:
            raise DataError(f"seq_len={self.seq_len}: must be at least 2 (one predicted token per block)")
        if self.max_tokens < 2:
            raise DataError(f"max_tokens={self.max_tokens}: must be at least 2")
        check_choice(DataConfig, self, "loss_on", DataError)
        if self.loss_on == "assistant" and not self.chat:
            raise DataError("loss_on='assistant': needs chat=True (plain text has no assistant turns)")

    @property
    def resolved_loss_on(self) -> str:
        """The tokens the loss is taken over: ``loss_on``, or its default (``"assistant"`` with chat, else ``"all"``)."""
        return self.loss_on or ("assistant" if self.chat else "all")

    @property
    def multiple(self) -> bool:
        """Whether the settings name evaluation sets (``NAME=PATH``), even a single one."""
        return self.named()[0][0] is not None

    def named(self) -> list[tuple[str | None, DataConfig]]:
        """The evaluation sets, each as a single-set :class:`DataConfig` with the shared settings.

        Returns:
            ``[(None, self)]`` for one unnamed set; else ``(name, settings)`` per ``NAME=VALUE``,
            ``data`` entries first, in the order given.

        Raises:
            DataError: no data, an unnamed entry among several, a bad or repeated name.
        """
        entries = [("data", v) for v in _as_list(self.data)] + [("dataset", v) for v in _as_list(self.dataset)]
        unnamed = [e for e in entries if split_set_name(e[1])[0] is None]
        if not entries or (len(entries) == 2 and len(unnamed) == 2 and entries[0][0] != entries[1][0]):
            raise DataError("give exactly one of data=PATH or dataset=NAME")
        if len(entries) == 1 and unnamed:
            key, value = entries[0]
            return [(None, dataclasses.replace(self, data=value if key == "data" else None,
                                               dataset=value if key == "dataset" else None))]
        out: list[tuple[str | None, DataConfig]] = []
        for key, value in entries:
            name, rest = split_set_name(value)
            if name is None:
                raise DataError(f"{key}={value!r}: several evaluation sets need names: {key}=NAME=VALUE "
                                f"(--{key} NAME={value})")
            if name in AVERAGE_NAMES:
                raise DataError(f"{key}={value!r}: {name!r} names an average over the sets; choose another name")
            if any(name == n for n, _ in out):
                raise DataError(f"{key}={value!r}: the set name {name!r} is given twice")
            single = dataclasses.replace(self, data=rest if key == "data" else None,
                                         dataset=rest if key == "dataset" else None)
            out.append((name, single))
        return out


def _as_list(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


def split_set_name(value: str) -> tuple[str | None, str]:
    """Split ``NAME=VALUE`` into the set's name and its path or dataset.

    Args:
        value: a ``data`` or ``dataset`` entry.

    Returns:
        ``(name, rest)``, or ``(None, value)`` when it does not start with a set name and ``=``.
    """
    name, sep, rest = value.partition("=")
    if sep and rest and SET_NAME.fullmatch(name):
        return name, rest
    return None, value
