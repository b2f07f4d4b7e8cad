"""Chat data: conversations -> one right-padded row each, with the tokens the loss is taken over.

Protocol (``chat=True``): every row of the data holds one conversation, a list of ``{role,
content}`` messages. It is rendered with model A's chat template (``apply_chat_template``, no
generation prompt) and tokenized as the template's text (no extra special tokens: the template
writes BOS and its turn markers itself). The tokens the loss is taken over (``loss_on``):

* ``"assistant"`` (the default): the tokens of the assistant turns. When the template marks them
  with ``{% generation %}`` ... ``{% endgeneration %}``, they are what
  ``apply_chat_template(return_assistant_tokens_mask=True)`` marks. Otherwise (the fallback)
  assistant turn k spans the characters from the end of the rendering of messages ``0..k-1`` with
  the generation prompt (the assistant header) to the end of the rendering of messages ``0..k``
  (so its end-of-turn marker counts); a template whose renderings are not prefixes of one
  another is refused. Either way a token counts when its characters overlap an assistant span.
* ``"all"``: every token of the conversation.

The first token of a row is never predicted. A conversation longer than ``seq_len`` tokens is
truncated to its first ``seq_len`` tokens (counted as ``truncated``); one left without a scored
token is dropped (``dropped``). Conversations are taken in order while their tokens (after
truncation) stay within ``max_tokens``. Each conversation is one row, right-padded to the
longest row: attention never crosses a conversation, and padding positions are neither attended
by real tokens (causal attention, padding only after them) nor scored. The conversation is the
paired unit of the standard errors, weighted by its scored tokens (ratio estimator).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..config.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

#: A ``{% generation %}`` block in a chat template (what transformers looks for too).
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


@dataclass
class ChatRows:
    """Conversations as right-padded rows.

    Attributes:
        ids: ``[N, T]`` token ids, right-padded (T: the longest row).
        scored: ``[N, T]`` bool, the tokens the loss is taken over (never position 0 or padding).
        lengths: ``[N]`` real tokens per row.
        summary: ``conversations`` (rows kept), ``truncated``, ``dropped`` (no scored token left),
            ``scored_tokens``, ``loss_on``, ``assistant_tokens_by`` (``"generation-markers"``,
            ``"prefix-rendering"`` or None for ``loss_on="all"``).
    """

    ids: torch.Tensor
    scored: torch.Tensor
    lengths: torch.Tensor
    summary: dict = field(default_factory=dict)


def chat_template(tokenizer: PreTrainedTokenizerBase, template: str | None = None) -> str:
    """Model A's chat template, or a one-line error when it has none.

    Args:
        tokenizer: the tokenizer the text is tokenized with (model A's, or the union tokenizer).
        template: the template to use instead of the tokenizer's own (None: the tokenizer's).

    Returns:
        The template (the ``default`` one when the tokenizer holds several).

    Raises:
        DataError: no chat template, or a slow tokenizer (no character offsets).
    """
    template = template or getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    if not template:
        raise DataError("chat=True: model A's tokenizer has no chat template (set tokenizer.chat_template, "
                        "or evaluate the text without chat)")
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("chat=True: model A's tokenizer is a slow tokenizer; chat data needs a fast one (character offsets)")
    return template


def _check_messages(messages: object, row: int, column: str) -> list[dict]:
    ok = isinstance(messages, list) and messages and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages)
    if not ok:
        raise DataError(f"messages_column={column!r}: row {row} is not a non-empty list of {{role, content}} messages")
    return [{k: v for k, v in m.items() if v is not None} for m in messages]


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], template: str | None, **kwargs) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, chat_template=template, **kwargs)


def assistant_spans(tokenizer: PreTrainedTokenizerBase, messages: list[dict],
                    template: str | None = None) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns, by rendering prefixes.

    Args:
        tokenizer: the tokenizer with the chat template.
        messages: the conversation.
        template: the chat template (None: the tokenizer's).

    Returns:
        ``(text, spans)``: the whole rendering and one ``(start, end)`` per assistant message.

    Raises:
        DataError: the rendering of a prefix of the conversation is not a prefix of the whole rendering.
    """
    text = _render(tokenizer, messages, template)
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        head = _render(tokenizer, messages[:k], template, add_generation_prompt=True) if k else ""
        upto = _render(tokenizer, messages[: k + 1], template)
        if not (text.startswith(upto) and upto.startswith(head)):
            raise DataError("chat=True: the chat template does not render a conversation prefix by prefix, so its "
                            "assistant turns cannot be located; add {% generation %} markers to it")
        spans.append((len(head), len(upto)))
    return text, spans


def encode_conversation(tokenizer: PreTrainedTokenizerBase, messages: list[dict], loss_on: str,
                        markers: bool, template: str | None = None) -> tuple[list[int], list[bool]]:
    """Token ids of one conversation and which of them the loss is taken over.

    Args:
        tokenizer: the tokenizer with the chat template (fast).
        messages: the conversation.
        loss_on: ``"assistant"`` or ``"all"``.
        markers: the template has ``{% generation %}`` markers.
        template: the chat template (None: the tokenizer's).

    Returns:
        ``(ids, scored)`` of equal length (position 0 is never scored).
    """
    if loss_on == "all":
        ids = tokenizer(_render(tokenizer, messages, template), add_special_tokens=False)["input_ids"]
        scored = [True] * len(ids)
    elif markers:
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                            chat_template=template)
        ids, scored = list(out["input_ids"]), [bool(x) for x in out["assistant_masks"]]
    else:
        text, spans = assistant_spans(tokenizer, messages, template)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        scored = [any(end > s and start < e for s, e in spans) for start, end in enc["offset_mapping"]]
    if scored:
        scored[0] = False
    return ids, scored


def render_rows(tokenizer: PreTrainedTokenizerBase, conversations: list, *, seq_len: int, max_tokens: int,
                loss_on: str, column: str = "messages", template: str | None = None) -> ChatRows:
    """Render, tokenize, truncate and pad conversations (see the module docstring for the protocol).

    Args:
        tokenizer: model A's tokenizer (with a chat template).
        conversations: one list of ``{role, content}`` messages per row.
        seq_len: the longest row; longer conversations are truncated.
        max_tokens: the cap on the tokens of all rows.
        loss_on: ``"assistant"`` or ``"all"``.
        column: the column the conversations came from (for messages).
        template: the chat template (None: the tokenizer's).

    Returns:
        The rows.

    Raises:
        DataError: no chat template, a malformed conversation, a template whose assistant turns cannot be
            located, or no conversation with a scored token.
    """
    template = chat_template(tokenizer, template)
    markers = loss_on == "assistant" and GENERATION_TAG.search(template) is not None
    rows: list[tuple[list[int], list[bool]]] = []
    truncated = dropped = total = 0
    for i, raw in enumerate(conversations):
        messages = _check_messages(raw, i, column)
        ids, scored = encode_conversation(tokenizer, messages, loss_on, markers, template)
        if len(ids) > seq_len:
            truncated += 1
            ids, scored = ids[:seq_len], scored[:seq_len]
        if not any(scored):
            dropped += 1
            continue
        if total + len(ids) > max_tokens:
            break
        total += len(ids)
        rows.append((ids, scored))
    if not rows:
        raise DataError(f"messages_column={column!r}: no conversation with a scored token within max_tokens={max_tokens}")
    width = max(len(ids) for ids, _ in rows)
    pad = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    out_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    out_scored = torch.zeros((len(rows), width), dtype=torch.bool)
    for r, (ids, scored) in enumerate(rows):
        out_ids[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        out_scored[r, : len(ids)] = torch.tensor(scored, dtype=torch.bool)
    lengths = torch.tensor([len(ids) for ids, _ in rows], dtype=torch.long)
    summary = {"conversations": len(rows), "truncated": truncated, "dropped": dropped,
               "scored_tokens": int(out_scored.sum()), "loss_on": loss_on,
               "assistant_tokens_by": None if loss_on == "all" else ("generation-markers" if markers else "prefix-rendering")}
    return ChatRows(out_ids, out_scored, lengths, summary)


def fits(rows: object, vocab_size: int) -> bool:
    """Whether a cached entry is well-formed chat rows of this vocabulary.

    Args:
        rows: what the cache file held.
        vocab_size: the tokenizer's size.

    Returns:
        True when the ids, masks and lengths have matching shapes, types and ranges.
    """
    if not isinstance(rows, dict):
        return False
    ids, scored, lengths, summary = rows.get("ids"), rows.get("scored"), rows.get("lengths"), rows.get("summary")
    if not (isinstance(ids, torch.Tensor) and isinstance(scored, torch.Tensor) and isinstance(lengths, torch.Tensor)
            and isinstance(summary, dict)):
        return False
    return (ids.dtype == torch.long and ids.dim() == 2 and ids.shape[0] > 0 and scored.dtype == torch.bool
            and scored.shape == ids.shape and lengths.dtype == torch.long and lengths.shape == ids.shape[:1]
            and int(ids.min()) >= 0 and int(ids.max()) < vocab_size and int(lengths.min()) >= 1
            and int(lengths.max()) <= ids.shape[1] and bool(scored.any(dim=1).all()))
