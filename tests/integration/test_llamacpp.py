"""HiLight with its LLM in llama.cpp (``--quantize q4_k_m`` / ``q8_0``, the hilight[llamacpp]
extra): the same arithmetic as the torch LLM on an unquantized file, the bundled model's example
answers kept in both formats, batches, follow-up turns from llama.cpp's cache, log-likelihoods.
Run by scripts/test-integrations.sh; skipped where llama-cpp-python is not installed."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

pytest.importorskip("llama_cpp")

from hilight.checkpoint import default_model, load_checkpoint  # noqa: E402
from hilight.errors import ConfigError  # noqa: E402
from hilight.evaluation.qa import load_items, run  # noqa: E402
from hilight.evaluation.scoring import extract  # noqa: E402
from hilight.inference.batching import Batcher, Job  # noqa: E402
from hilight.inference.engine import Conversation, Engine, GenerationSettings, stream_reply  # noqa: E402
from hilight.inference.llamacpp import LlamaCppLLM, write_gguf  # noqa: E402
from hilight.text import Message  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
BUNDLED = default_model()
SETTINGS = GenerationSettings(max_new_tokens=24)


@pytest.fixture(autouse=True, scope="module")
def gguf_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HILIGHT_CACHE", str(tmp_path_factory.mktemp("hilight-cache")))
        yield


@pytest.fixture(scope="module")
def engines():
    return {fmt: Engine.from_checkpoint(BUNDLED, quantize=fmt) for fmt in ("q4_k_m", "q8_0")}


def test_unquantized_gguf_computes_what_the_torch_llm_computes(tmp_path):
    """An f32 GGUF of the bundled LLM in llama.cpp: the logits of a prompt with visual tokens
    match transformers' (llama.cpp's GELU reads an fp16 table: ~1e-3 of the logits' scale), and
    greedy decoding gives the same tokens."""
    model, tokenizer = load_checkpoint(BUNDLED)
    model.eval()
    write_gguf(model, tokenizer, tmp_path / "llm.gguf")
    runner = LlamaCppLLM(tmp_path / "llm.gguf", model.llm.get_input_embeddings(), 1024)
    torch.manual_seed(0)
    # 600 positions: llama.cpp runs them in two batches
    embeds = model.embed(torch.randint(6, 600, (1, 600)), None)  # [1, 600, D]
    embeds[:, 10:74] = torch.randn(1, 64, embeds.shape[-1]) * 2  # rows as TokenMining's would be
    with torch.inference_mode():
        expected = model.llm(inputs_embeds=embeds).logits[0]
    got = runner.logits(embeds[0], 0)
    assert (got - expected).abs().max() < 0.02 * expected.abs().max()
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    mask = torch.ones(1, 600, dtype=torch.long)
    with torch.inference_mode():
        reference = model.llm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=16, do_sample=False,
                                       eos_token_id=[1], pad_token_id=0)
    assert torch.equal(runner.generate(embeds, mask, 16, False, 1, [1], 0), reference)


def test_quantized_formats_keep_the_example_answers(engines):
    """The rule the torch formats follow (tests/test_recipe.py): the example questions answered
    as fp32 answers them, but for at most one (cue direction left out: near ties). Batches of 8
    run as 8 llama.cpp sequences."""
    extracted = {}
    for label, engine in (("fp32", Engine.from_checkpoint(BUNDLED, quantize="none")), *engines.items()):
        items, problems = load_items(EXAMPLES / "questions.json", EXAMPLES)
        assert not problems and not run(engine, items, SETTINGS, batch_size=8, blind=False)
        assert all(extract(it.kind, it.answer) is not None for it in items)
        extracted[label] = [extract(it.kind, it.answer) for it in items if it.qtype != "cue_direction"]
    assert len(extracted["fp32"]) >= 8
    for label in engines:
        same = sum(a == b for a, b in zip(extracted[label], extracted["fp32"], strict=True))
        assert same >= len(extracted["fp32"]) - 1, (label, extracted[label], extracted["fp32"])


def test_batches_answer_as_single_prompts(engines):
    engine = engines["q8_0"]
    prompts = [([Message("user", f"<video>\n{q}")], [EXAMPLES / video]) for q, video in
               (("How many balls are left on the table?", "test-00000.mp4"),
                ("Was the cue ball pocketed?", "test-00001.mp4"),
                ("Which ball did the cue ball hit first?", "test-00002.mp4"))]
    together = engine.answer_batch(prompts, SETTINGS)
    assert together == [engine.answer(m, v, SETTINGS) for m, v in prompts]
    assert all(together)

    done = threading.Event()
    streamed: dict[int, list[str]] = {0: [], 1: [], 2: []}
    finished = []

    def emit(i):
        def take(kind, value):
            if kind == "text":
                streamed[i].append(value)
            elif kind == "done":
                finished.append(i)
                if len(finished) == 3:
                    done.set()
            else:
                raise AssertionError(value)
        return take

    batcher = Batcher(engine, max_batch=3)
    for i, (messages, videos) in enumerate(prompts):
        batcher.submit(Job(messages, videos, SETTINGS, emit(i)))
    assert done.wait(120)
    assert ["".join(streamed[i]).strip() for i in range(3)] == together


def test_follow_up_runs_only_what_llama_cpp_does_not_hold(engines):
    engine = engines["q4_k_m"]
    conversation = Conversation()
    usage: dict = {}
    first = "".join(stream_reply(engine, conversation, "Was the cue ball pocketed?",
                                 [EXAMPLES / "test-00000.mp4"], SETTINGS, usage=usage))
    assert first and usage["cached_tokens"] == 0
    second = "".join(stream_reply(engine, conversation, "How many balls are left on the table?", [], SETTINGS,
                                  usage=usage))
    assert usage["cached_tokens"] > engine.chat.tokens_per_video  # the video's positions were not run again
    # the same conversation asked of an engine whose llama.cpp cache is empty
    fresh = Engine.from_checkpoint(BUNDLED, quantize="q4_k_m")
    again = fresh.answer(conversation.messages[:-1], conversation.videos, SETTINGS)
    assert second.strip() == again


def test_loglikelihood_prefers_the_greedy_answer(engines):
    engine = engines["q8_0"]
    messages = [Message("user", "<video>\nWas the cue ball pocketed?")]
    video = [EXAMPLES / "test-00000.mp4"]
    answer = engine.answer(messages, video, SETTINGS)
    (own, own_greedy), (other, other_greedy) = engine.loglikelihood(messages, video, [answer, "Seven balls."])
    assert own_greedy and not other_greedy and own > other
    torch_engine = Engine.from_checkpoint(BUNDLED, quantize="none")
    (reference, _), _ = torch_engine.loglikelihood(messages, video, [answer, "Seven balls."])
    assert abs(own - reference) < 0.5


def test_beam_search_is_refused_and_the_gguf_is_written_once(engines, monkeypatch):
    import hilight.checkpoint

    engine = engines["q8_0"]
    with pytest.raises(ConfigError, match="beam search"):
        engine.answer([Message("user", "<video>\nWas the cue ball pocketed?")], [EXAMPLES / "test-00000.mp4"],
                      GenerationSettings(max_new_tokens=8, num_beams=2))
    files = sorted(Path(p) for p in Path(engine.model.llamacpp.path).parent.glob("*.gguf"))
    stamps = [f.stat().st_mtime_ns for f in files]
    read = []
    load_weights = hilight.checkpoint.load_weights
    monkeypatch.setattr(hilight.checkpoint, "load_weights", lambda *a, **k: read.append(load_weights(*a, **k)) or read[-1])
    again = Engine.from_checkpoint(BUNDLED, quantize="q8_0")
    assert [f.stat().st_mtime_ns for f in files] == stamps and len(files) == 2  # q4_k_m and q8_0, nothing else
    # the file was there: the LLM's decoder layers were not even read
    assert read and not any(name.startswith("llm.model.layers.") for name in read[0])
    assert "llm.model.embed_tokens.weight" in read[0] and not len(again.model.llm.model.layers)
    messages = [Message("user", "<video>\nWas the cue ball pocketed?")]
    assert again.answer(messages, [EXAMPLES / "test-00000.mp4"], SETTINGS) == engine.answer(
        messages, [EXAMPLES / "test-00000.mp4"], SETTINGS)


def test_an_unwritable_cache_is_a_clear_error(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("HILIGHT_CACHE", str(blocker))
    with pytest.raises(ConfigError, match="HILIGHT_CACHE"):
        Engine.from_checkpoint(BUNDLED, quantize="q8_0")
    assert blocker.read_text() == "not a folder"
