"""Multi-turn reuse: a follow-up turn runs the LLM only over the positions the conversation's
KV cache does not hold, never runs the towers again for videos already in the conversation,
and answers token for token as a full prefill of the same conversation does."""

import threading

import pytest
import torch

import hilight.inference.engine as engine_module
from hilight.config import tiny_config
from hilight.demo import moving_balls_clip
from hilight.inference.engine import Conversation, Engine, GenerationSettings, PromptCache, position_keys, stream_reply
from hilight.model import HiLight
from hilight.text import Message
from hilight.video import write_video

TURNS = [("What happens in this clip?", 0), ("And in this one, which ball moves?", 1), ("Which is faster?", None)]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    return [write_video(root / f"c{i}.mp4", moving_balls_clip(12, 64, seed=i)) for i in range(2)]


def _engine(tokenizer, seed: int = 2) -> Engine:
    """A tiny model whose random LLM weights are wide enough to emit varied tokens."""
    torch.manual_seed(seed)
    model = HiLight(tiny_config(len(tokenizer)))
    with torch.no_grad():
        for p in model.llm.parameters():
            p.normal_(0, 0.3) if p.dim() > 1 else p.normal_(0, 0.1)
    return Engine(model, tokenizer)


class Probe:
    """Counts tower runs, records how many positions each LLM prefill runs and the greedy
    token each LLM forward picks."""

    def __init__(self, engine: Engine):
        self.tower_calls = 0
        self.prefills: list[int] = []
        self.tokens: list[int] = []
        engine.model.video_tower.register_forward_hook(self._tower)
        engine.model.image_tower.register_forward_hook(self._tower)
        engine.model.llm.model.register_forward_pre_hook(self._prefill, with_kwargs=True)
        engine.model.llm.register_forward_hook(self._token)

    def _tower(self, module, args, output):
        self.tower_calls += 1

    def _prefill(self, module, args, kwargs):
        if not self.tokens:  # the first forward of a turn is its prefill
            self.prefills.append(kwargs["inputs_embeds"].shape[1])

    def _token(self, module, args, output):
        self.tokens.append(int(output.logits[0, -1].argmax()))

    def turn(self) -> list[int]:
        """The tokens of the turn that just ended; counting starts again."""
        tokens, self.tokens, self.tower_calls = self.tokens, [], 0
        return tokens


def _reply(engine, conversation, text, videos, settings, usage=None, cancel=None) -> str:
    return "".join(stream_reply(engine, conversation, text, videos, settings, cancel, usage,
                                allow_no_video=not videos and not conversation.videos))


def test_position_keys_name_the_video_at_each_visual_position():
    assert position_keys([2, -200, -200, 7, -200, -200, 1], ["a", "b"], 2) == [2, "a", "a", 7, "b", "b", 1]


def test_follow_up_turns_reuse_the_cache_and_answer_as_a_full_prefill(tokenizer, clips):
    engine = _engine(tokenizer)
    probe = Probe(engine)
    settings = GenerationSettings(16)
    conversation = Conversation()
    replies, previous_prompt = [], 0
    for text, video in TURNS:
        videos = [] if video is None else [clips[video]]
        plain = Conversation(list(conversation.messages), list(conversation.videos))  # no cache: full prefill
        probe.turn()
        usage = {}
        reply = _reply(engine, conversation, text, videos, settings, usage)
        towers, prefill = probe.tower_calls, probe.prefills[-1]
        tokens = probe.turn()
        _reply(engine, plain, text, videos, settings)
        assert tokens == probe.turn() and conversation.messages == plain.messages
        assert towers == 2 * len(videos)  # only a new video runs the towers (both of them, once)
        assert prefill == usage["prompt_tokens"] - usage["cached_tokens"] > 0
        # everything up to the previous reply is held: at most that reply and the new turn run
        assert usage["cached_tokens"] >= previous_prompt
        assert prefill <= usage["prompt_tokens"] - previous_prompt
        previous_prompt = usage["prompt_tokens"]
        replies.append(reply)
    assert len(set(replies)) == 3 and all(replies)  # the comparison is not vacuous


def test_reply_tokens_that_survive_as_text_are_not_run_again(tokenizer):
    engine = _engine(tokenizer)
    conversation = Conversation()
    _reply(engine, conversation, "Say something.", [], GenerationSettings(12))
    first = engine.chat.encode(conversation.messages[:1], generation=True)
    second = engine.chat.encode([*conversation.messages, Message("user", "More?")], generation=True)
    cache = conversation.cache
    shared = 0
    while shared < len(cache.keys) and cache.keys[shared] == second.input_ids[shared]:
        shared += 1
    usage = {}
    _reply(engine, conversation, "More?", [], GenerationSettings(4), usage)
    assert usage["cached_tokens"] == shared >= len(first)
    assert cache.keys[: len(first)] == first.input_ids


def test_a_question_with_no_video_is_refused_unless_asked_for(tokenizer, clips):
    from hilight.errors import NoVideoError

    engine = _engine(tokenizer)
    conversation = Conversation()
    with pytest.raises(NoVideoError, match="no video in this conversation"):
        "".join(stream_reply(engine, conversation, "What happens?", [], GenerationSettings(4)))
    assert conversation.messages == []  # nothing was added
    text = "".join(stream_reply(engine, conversation, "What happens?", [], GenerationSettings(4), allow_no_video=True))
    assert conversation.messages[-1].content == text.strip()
    _reply(engine, conversation, "And here?", clips[:1], GenerationSettings(4))
    # once the conversation holds a video, a follow-up without a new one is about it
    "".join(stream_reply(engine, conversation, "Anything else?", [], GenerationSettings(4)))
    assert len(conversation.messages) == 6


def test_earlier_videos_are_not_looked_up_again(tokenizer, clips):
    engine = _engine(tokenizer)
    probe = Probe(engine)
    conversation = Conversation()
    _reply(engine, conversation, "What happens?", clips[:1], GenerationSettings(6))
    engine._videos.clear()  # even with the per-video cache gone, the KV cache holds the video
    probe.turn()
    usage = {}
    _reply(engine, conversation, "Sure?", [], GenerationSettings(6), usage)
    assert probe.tower_calls == 0 and usage["cached_tokens"] > engine.chat.tokens_per_video


def test_after_a_cancelled_turn_the_next_turn_matches_a_full_prefill(tokenizer, clips):
    engine = _engine(tokenizer)
    settings = GenerationSettings(16)
    conversation = Conversation()
    cancel = threading.Event()
    cancel.set()  # stops after one token, as a Ctrl-C or a closed browser tab does
    _reply(engine, conversation, "Tell me everything.", clips[:1], settings, cancel=cancel)
    stream = stream_reply(engine, conversation, "And this one?", clips[1:], settings)
    next(stream)
    stream.close()  # the consumer went away mid-reply
    assert conversation.cache is not None
    assert conversation.cache.kv.get_seq_length() == len(conversation.cache.keys)
    plain = Conversation(list(conversation.messages), list(conversation.videos))
    probe = Probe(engine)
    usage = {}
    _reply(engine, conversation, "Which is faster?", [], settings, usage)
    tokens = probe.turn()
    _reply(engine, plain, "Which is faster?", [], settings)
    assert usage["cached_tokens"] > 2 * engine.chat.tokens_per_video
    assert tokens == probe.turn() and len(set(tokens)) > 1


def test_full_prefill_when_the_cache_does_not_apply(tokenizer, clips):
    engine = _engine(tokenizer)
    conversation = Conversation()
    _reply(engine, conversation, "What happens?", clips[:1], GenerationSettings(6))
    other = _engine(tokenizer)  # same weights, another model object: its cache is not ours
    usage = {}
    reply = _reply(other, conversation, "Sure?", [], GenerationSettings(6), usage)
    assert usage["cached_tokens"] == 0 and conversation.cache.model is other.model
    # an edited history shares only its common prefix with the cache
    conversation.messages[:] = [Message("user", "<video>\nSomething else?"), Message("model", reply)]
    usage = {}
    _reply(other, conversation, "Sure?", [], GenerationSettings(6), usage)
    assert engine.chat.tokens_per_video < usage["cached_tokens"] < usage["prompt_tokens"] - len(reply)


def test_a_failed_turn_drops_the_cache_and_changes_nothing(tokenizer, clips, monkeypatch):
    engine = _engine(tokenizer)
    conversation = Conversation()
    _reply(engine, conversation, "What happens?", clips[:1], GenerationSettings(6))
    messages = list(conversation.messages)

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(engine_module, "generate", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        _reply(engine, conversation, "Sure?", [], GenerationSettings(6))
    assert conversation.messages == messages and conversation.cache is None


def test_reusable_prefix_leaves_the_last_position_to_run():
    cache = PromptCache(model=None, keys=[2, "a", "a", 5, 6], kv=None)
    assert cache.reusable([2, "a", "a", 5, 6, 9]) == 5
    assert cache.reusable([2, "a", "a", 5, 6]) == 4  # the same prompt again: its last position runs
    assert cache.reusable([2, "b", "b", 5, 6]) == 1  # another video at the same place


def test_beam_search_replies_arrive_whole_and_match_the_batch_path(tokenizer, clips):
    engine = _engine(tokenizer)
    settings = GenerationSettings(10, num_beams=3)
    conversation = Conversation()
    usage = {}
    chunks = list(stream_reply(engine, conversation, "What happens?", clips[:1], settings, usage=usage))
    expected = engine.answer([Message("user", "<video>\nWhat happens?")], clips[:1], settings)
    assert "".join(chunks).strip() == expected.strip() and expected.strip()
    assert 0 < usage["completion_tokens"] <= 10 and conversation.messages[-1].content == expected.strip()
    assert conversation.cache is None  # beams keep no cache; the next turn is a full prefill
    assert _reply(engine, conversation, "Sure?", [], settings)


def test_the_file_digest_memo_is_bounded(tmp_path, tokenizer):
    engine = _engine(tokenizer)
    engine.cache_size = 2
    for i in range(20):
        (tmp_path / f"f{i}").write_bytes(bytes([i]))
        engine.digest(tmp_path / f"f{i}")
    assert len(engine._digests) == 8  # 4 x cache_size, the oldest out first
    assert str(tmp_path / "f19") in {k[0] for k in engine._digests}


@pytest.mark.slow
def test_a_compiled_encoder_gives_the_same_embeddings_and_answers(tokenizer, clips):
    plain, compiled = _engine(tokenizer), _engine(tokenizer)
    assert compiled.compile() > 0
    for clip in clips:
        torch.testing.assert_close(compiled.video_embeddings(clip), plain.video_embeddings(clip), atol=1e-5, rtol=1e-4)
    two = compiled.segment_embeddings([compiled.plan(c) for c in clips])  # segments one at a time, same shape
    assert two.shape[0] == 2
    settings = GenerationSettings(max_new_tokens=8)
    assert _reply(compiled, Conversation(), "What happens?", clips[:1], settings) == \
        _reply(plain, Conversation(), "What happens?", clips[:1], settings)


def test_compile_that_cannot_build_is_one_clear_error(tokenizer, monkeypatch):
    from hilight.errors import ConfigError

    def no_compiler(fn, **_):
        def run(*args):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore lines")
        return run

    monkeypatch.setattr(torch, "compile", no_compiler)
    engine = _engine(tokenizer)
    with pytest.raises(ConfigError, match=r"^--compile: torch.compile could not build .*No working C\+\+ compiler found\)$"):
        engine.compile()
    assert engine._compiled is None  # the engine goes on encoding as before
