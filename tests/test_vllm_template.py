"""What the vLLM plugin does to prompts, checked without vLLM: its chat template (plain Jinja)
and its re-tokenizing give exactly the ids of HiLight's own prompt."""

import pytest

from hilight.integrations.vllm import CHAT_TEMPLATE
from hilight.integrations.vllm.prompt import as_messages, prompt_ids
from hilight.text import VIDEO_TOKEN, Message


def render(tokenizer, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=CHAT_TEMPLATE.read_text(), tokenize=False,
                                         add_generation_prompt=True)


def test_rendered_chat_gives_hilights_prompt_ids(tokenizer, chat):
    messages = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": f"{VIDEO_TOKEN}\nWhich ball went into the pocket? "},
                {"role": "assistant", "content": "The red ball."},
                {"role": "user", "content": f"And here? {VIDEO_TOKEN}\nHow many balls are left on the table?"}]
    ours = chat.encode([Message("user", f"Answer briefly.\n{VIDEO_TOKEN}\nWhich ball went into the pocket?"),
                        Message("model", "The red ball."),
                        Message("user", f"And here? {VIDEO_TOKEN}\nHow many balls are left on the table?")],
                       generation=True)
    text = render(tokenizer, messages)
    assert prompt_ids(chat, text) == ours.input_ids
    # vLLM's one-piece tokenizing of the same text differs (merges across the video marker):
    # the reason the plugin re-tokenizes
    assert tokenizer(text, add_special_tokens=False)["input_ids"] != ours.input_ids
    # HiLight's own rendering (an <eos> after a model turn) parses the same
    decoded = tokenizer.decode([t if t >= 0 else chat.pad_id for t in ours.input_ids])
    assert as_messages(chat, decoded.replace("<pad>" * chat.tokens_per_video, VIDEO_TOKEN)) is not None


@pytest.mark.parametrize("text", ["<video>\nWhat happens?", "<bos><start_of_turn>user\nhi", "plain text"])
def test_raw_prompt_is_tokenized_around_videos(chat, text):
    assert as_messages(chat, text) is None
    assert prompt_ids(chat, text) == chat.content_ids(text)
