"""Where the evaluation tokens come from and how they are cut into blocks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .errors import DataError
from .fields import check_choice, setting

DEFAULT_MAX_TOKENS = 262144


@dataclass
class DataConfig:
    """Where the evaluation tokens come from and how they are cut."""

    data: str | None = setting(None, "Local evaluation text: .txt (one document) or .jsonl/.json/.csv/.parquet (one document per row).")
    dataset: str | None = setting(None, "Hub dataset NAME[:CONFIG][:SPLIT] (split default: validation, else test, else train).")
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
            DataError: not exactly one of ``data`` / ``dataset``, a ``seq_len`` / ``max_tokens``
                below 2, or ``loss_on`` that is not a choice or is ``"assistant"`` without ``chat``.
        """
        if (self.data is None) == (self.dataset is None):
            raise DataError("give exactly one of data=PATH or dataset=NAME")
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
