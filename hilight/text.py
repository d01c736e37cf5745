"""Gemma chat template, ``<video>`` placeholders, label masking, truncation and batching.

A conversation is rendered exactly as the original training did::

    <bos><start_of_turn>user\\n{text}<end_of_turn>\\n<start_of_turn>model\\n{answer}<end_of_turn>\\n<eos>...

Every ``<video>`` in a user turn becomes ``tokens_per_video`` placeholder ids
(:data:`VIDEO_PLACEHOLDER_ID`), which the model overwrites with that video's TokenMining
embeddings. Labels train exactly the model turns: the answer, ``<end_of_turn>``, the newline
and the ``<eos>``; everything else, including the visual positions, is ``IGNORE_INDEX``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from hilight.errors import ConversationError

VIDEO_TOKEN = "<video>"
VIDEO_PLACEHOLDER_ID = -200
IGNORE_INDEX = -100
START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"
ROLES = ("user", "model")
LLAVA_ROLES = {"human": "user", "gpt": "model", "user": "user", "model": "model", "assistant": "model"}


@dataclass(frozen=True)
class Message:
    role: Literal["user", "model"]
    content: str


@dataclass
class Encoded:
    """One tokenized conversation. ``num_videos`` counts the ``<video>`` blocks kept."""

    input_ids: list[int]
    labels: list[int]
    num_videos: int

    def __len__(self) -> int:
        return len(self.input_ids)


def from_llava(turns: Sequence[dict]) -> list[Message]:
    """Convert LLaVA / VideoInstruct ``conversations`` (``from``/``value``) into messages."""
    if not isinstance(turns, list | tuple):
        raise ConversationError(f"'conversations' must be a list of turns, not {type(turns).__name__}")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise ConversationError(f"turn {i} is not an object with a string 'value'")
        role = LLAVA_ROLES.get(turn.get("from", ""))
        if role is None:
            raise ConversationError(f"turn {i} has unknown speaker {turn.get('from')!r}")
        messages.append(Message(role, turn["value"]))
    return messages


def count_videos(messages: Sequence[Message]) -> int:
    return sum(m.content.count(VIDEO_TOKEN) for m in messages)


def validate(messages: Sequence[Message], generation: bool) -> None:
    """Turns alternate user/model starting with the user; a prompt for generation ends on a user turn."""
    if not messages:
        raise ConversationError("the conversation is empty")
    for i, msg in enumerate(messages):
        if msg.role != ROLES[i % 2]:
            raise ConversationError(f"turn {i} should be from {ROLES[i % 2]!r}, not {msg.role!r}")
        if msg.role == "model" and VIDEO_TOKEN in msg.content:
            raise ConversationError(f"turn {i}: {VIDEO_TOKEN} may only appear in user turns")
    if generation and messages[-1].role != "user":
        raise ConversationError("a prompt for generation must end with a user turn")
    if not generation and messages[-1].role != "model":
        raise ConversationError("a training conversation must end with a model turn")


class ChatTokenizer:
    """Renders conversations to ids/labels with a Hugging Face tokenizer."""

    def __init__(self, tokenizer, tokens_per_video: int):
        self.tok = tokenizer
        self.tokens_per_video = tokens_per_video
        self.bos_id = self._special(tokenizer.bos_token)
        self.eos_id = self._special(tokenizer.eos_token)
        self.end_of_turn_id = self._special(END_OF_TURN)
        self.pad_id = self._special(tokenizer.pad_token)

    @functools.cached_property
    def longest_token(self) -> int:
        """The most characters one token stands for (a bound, read from the vocabulary)."""
        return max(1, max((len(t) for t in self.tok.get_vocab()), default=1))

    def check_length(self, messages: Sequence[Message], limit: int) -> None:
        """Refuse, before any tokenizing, text that cannot fit in ``limit`` tokens whatever its
        tokens are (none stands for more than :attr:`longest_token` characters): a 50 MB message
        costs a length check, not a tokenizer pass."""
        chars = sum(len(m.content) for m in messages)
        if chars > limit * self.longest_token:
            raise ConversationError(f"the conversation's text is {chars:,} characters, more than "
                                    f"{limit:,} tokens can hold (at most {limit * self.longest_token:,})")

    def _special(self, token: str | None) -> int:
        ids = self.tok.convert_tokens_to_ids([token]) if token else [None]
        if ids[0] is None or ids[0] == self.tok.unk_token_id:
            raise ConversationError(f"the tokenizer has no special token {token!r}")
        return ids[0]

    def _text(self, text: str) -> list[int]:
        """The template's own text: ``<start_of_turn>`` and the like are control tokens."""
        return self.tok(text, add_special_tokens=False)["input_ids"] if text else []

    def _content(self, text: str) -> list[int]:
        """What a user or the model said: typed ``<start_of_turn>``, ``<eos>``... stay plain text,
        never control tokens (a message cannot end its turn or forge another speaker's)."""
        return self.tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] if text else []

    def content_ids(self, text: str, layouts: Iterator[Sequence[str] | None] | None = None) -> list[int]:
        """Text with each ``<video>`` expanded into placeholder ids (see :meth:`video_ids`;
        ``layouts`` gives each video's segment labels in turn)."""
        ids: list[int] = []
        for i, chunk in enumerate(text.split(VIDEO_TOKEN)):
            if i:
                ids += self.video_ids(next(layouts, None) if layouts is not None else None)
            ids += self._content(chunk)
        return ids

    def video_ids(self, labels: Sequence[str] | None = None) -> list[int]:
        """One video's ids: ``tokens_per_video`` placeholders, or, for a video read in several
        segments, each segment's label (its time span, as text) followed by its placeholders."""
        if not labels:
            return [VIDEO_PLACEHOLDER_ID] * self.tokens_per_video
        ids: list[int] = []
        for label in labels:
            ids += self._text(label) + [VIDEO_PLACEHOLDER_ID] * self.tokens_per_video
        return ids

    def encode(
        self,
        messages: Sequence[Message],
        *,
        generation: bool = False,
        max_length: int | None = None,
        truncation: Literal["error", "right"] = "error",
        layouts: Sequence[Sequence[str] | None] | None = None,
    ) -> Encoded:
        """Tokenize a conversation. With ``generation=True`` it must end on a user turn and
        the model header is appended; over-long prompts always raise then. ``layouts`` has one
        entry per ``<video>`` in reading order: ``None`` for a video in one block, or the labels
        of its segments."""
        validate(messages, generation)
        if max_length is not None and (generation or truncation == "error"):
            self.check_length(messages, max_length)
        if layouts is not None and len(layouts) != count_videos(messages):
            raise ConversationError(f"{count_videos(messages)} {VIDEO_TOKEN} marker(s) for {len(layouts)} video(s)")
        order = iter(layouts) if layouts is not None else None
        ids, labels = [self.bos_id], [IGNORE_INDEX]
        for msg in messages:
            header = self._text(f"{START_OF_TURN}{msg.role}\n")
            body = self.content_ids(msg.content, order)
            footer = [self.end_of_turn_id, *self._text("\n")]
            if msg.role == "user":
                chunk = header + body + footer
                ids += chunk
                labels += [IGNORE_INDEX] * len(chunk)
            else:
                trained = body + footer + [self.eos_id]
                ids += header + trained
                labels += [IGNORE_INDEX] * len(header) + trained
        if generation:
            header = self._text(f"{START_OF_TURN}model\n")
            ids += header
            labels += [IGNORE_INDEX] * len(header)
        encoded = Encoded(ids, labels, count_videos(messages))
        if max_length is not None and len(encoded) > max_length:
            if truncation == "error" or generation:
                raise ConversationError(
                    f"{len(encoded)} tokens (each video counts {self.tokens_per_video}) "
                    f"exceed max_length {max_length}"
                )
            encoded = truncate_right(encoded, max_length, self.tokens_per_video)
        return encoded

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([i for i in ids if i >= 0], skip_special_tokens=True)


def truncate_right(encoded: Encoded, max_length: int, tokens_per_video: int) -> Encoded:
    """Cut the end of a training sample, never inside a video block (a video that does not
    fit entirely is dropped with everything after it). Raises if no trained token is left."""
    cut = max_length
    ids = encoded.input_ids
    if cut < len(ids) and ids[cut] == VIDEO_PLACEHOLDER_ID:
        while cut > 0 and ids[cut - 1] == VIDEO_PLACEHOLDER_ID:
            cut -= 1
    kept_ids, kept_labels = ids[:cut], encoded.labels[:cut]
    if all(label == IGNORE_INDEX for label in kept_labels):
        raise ConversationError(
            f"truncating {len(ids)} tokens to max_length {max_length} leaves no answer token to train"
        )
    kept_videos = kept_ids.count(VIDEO_PLACEHOLDER_ID) // tokens_per_video
    return Encoded(kept_ids, kept_labels, kept_videos)


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, L]; VIDEO_PLACEHOLDER_ID at visual positions
    attention_mask: torch.Tensor  # [B, L]
    labels: torch.Tensor | None  # [B, L]


def collate(
    samples: Sequence[Encoded], pad_id: int, padding_side: Literal["left", "right"] = "right"
) -> Batch:
    """Pad a list of encoded conversations. Training pads right; batched generation pads left."""
    width = max(len(s) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, s in enumerate(samples):
        span = slice(width - len(s), width) if padding_side == "left" else slice(0, len(s))
        ids[row, span] = torch.tensor(s.input_ids)
        labels[row, span] = torch.tensor(s.labels)
        mask[row, span] = 1
    return Batch(ids, mask, labels)
