"""A prompt vLLM rendered, tokenized the way HiLight tokenizes it (no vLLM needed here).

vLLM's renderer tokenizes the rendered chat in one piece; HiLight's :class:`ChatTokenizer`
tokenizes each turn's header, text and footer apart, and the text around every ``<video>``
apart, so byte-level merges never cross those boundaries. Parsing the rendered text back into
turns and encoding them with HiLight's own tokenizer gives exactly HiLight's ids.
"""

from __future__ import annotations

import re

from hilight.text import END_OF_TURN, START_OF_TURN, ChatTokenizer, Message


def prompt_ids(chat: ChatTokenizer, text: str) -> list[int]:
    """HiLight's ids for ``text``: a rendered conversation (``<bos>``, Gemma turns, the model
    header) or else a raw prompt; each ``<video>`` becomes its placeholder positions."""
    messages = as_messages(chat, text)
    if messages is None:
        return chat.content_ids(text)
    return chat.encode(messages, generation=True).input_ids


def as_messages(chat: ChatTokenizer, text: str) -> list[Message] | None:
    """The turns of a rendered generation prompt, or None if ``text`` is not one."""
    bos, header = chat.tok.bos_token, f"{START_OF_TURN}model\n"
    if not (text.startswith(bos) and text.endswith(header)):
        return None
    # a model turn may end in <eos>, as HiLight itself renders it
    turn = re.compile(f"{re.escape(START_OF_TURN)}(user|model)\n(.*?){re.escape(END_OF_TURN)}\n"
                      f"(?:{re.escape(chat.tok.eos_token)})?", re.S)
    body, messages, pos = text[len(bos): -len(header)], [], 0
    for match in turn.finditer(body):
        if match.start() != pos:
            return None
        messages.append(Message(match.group(1), match.group(2)))
        pos = match.end()
    if pos != len(body) or not messages:
        return None
    return messages
