"""Generation for HiLight: prompts with videos in, answer tokens out.

Decoding runs through transformers' ``generate`` on ``inputs_embeds`` with a KV cache, so
greedy, sampling and beam search behave exactly as for any Gemma. Every interface (CLI, web
UI, API server, evaluation) goes through this module.

A conversation keeps the KV cache of everything said so far (:class:`PromptCache`): a
follow-up turn runs the model only over the positions the cache does not already hold, and
videos already in the conversation are neither decoded nor encoded again.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from hilight.errors import ConfigError, NoVideoError, VideoError
from hilight.files import file_digest, torch_dtype
from hilight.model import HiLight
from hilight.sampling import Clip, Segment, as_clip, segment_label
from hilight.text import (
    VIDEO_PLACEHOLDER_ID,
    VIDEO_TOKEN,
    Batch,
    ChatTokenizer,
    ConversationError,
    Encoded,
    Message,
    collate,
)
from hilight.video import FrameIndex, decode_frames, plan_video, preprocess

ENCODE_BATCH = 16  # segments decoded and run through the towers together (bounds memory for long videos)
ANSWER_ROOM = 256  # context positions a prompt must leave for the answer (fewer when fewer new tokens are asked)


@dataclass
class GenerationSettings:
    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    num_beams: int = 1

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")
        if self.num_beams < 1:
            raise ConfigError(f"num_beams must be >= 1, got {self.num_beams}")

    @classmethod
    def from_request(cls, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                     num_beams: int = 1) -> GenerationSettings:
        """The settings every interface (CLI, web UI, API) asks for: temperature 0 is greedy,
        anything above samples at that temperature."""
        if temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {temperature}")
        return cls(max_new_tokens=int(max_new_tokens), do_sample=temperature > 0, temperature=temperature or 1.0,
                   top_p=top_p, top_k=int(top_k), num_beams=int(num_beams))


@torch.inference_mode()
def generate(
    model: HiLight,
    batch: Batch,
    stop_ids: list[int],
    settings: GenerationSettings | None = None,
    pixel_values: torch.Tensor | None = None,
    video_embeds: torch.Tensor | None = None,
    streamer=None,
    stopping=None,
    cache: DynamicCache | None = None,
) -> torch.Tensor:
    """New token ids [B, <= max_new_tokens] for a left-padded batch of prompts.

    Rows that stop early are padded with ``pad_token_id``. ``stop_ids`` end a row (for chat:
    ``<end_of_turn>`` and ``<eos>``). ``cache``, if given, is filled in place; if it already
    holds the first positions of a one-row prompt, only the rest is run, and ``video_embeds``
    are then the videos after those positions.
    """
    settings = settings or GenerationSettings()
    device = next(model.llm.parameters()).device
    cached = 0 if cache is None else cache.get_seq_length()
    if cached and (batch.input_ids.shape[0] != 1 or settings.num_beams != 1):
        raise ValueError("a filled cache continues one prompt with greedy search or sampling, not a batch or beams")
    if video_embeds is None and pixel_values is not None:
        video_embeds = model.video_embeddings(model.encode_videos(pixel_values.to(device)))
    input_ids = batch.input_ids.to(device)
    inputs_embeds = model.embed(input_ids[:, cached:], video_embeds)  # [B, L - cached, D]
    if cached:
        # generate() takes the embeddings of the whole prompt and runs only those past the
        # cache, so the cached positions are never read: zeros stand in for them
        held = inputs_embeds.new_zeros(1, cached, inputs_embeds.shape[-1])  # [1, cached, D]
        inputs_embeds = torch.cat([held, inputs_embeds], dim=1)  # [1, L, D]
    options = {} if cache is None else {"cache": cache}
    room = model.config.llm.max_position_embeddings - input_ids.shape[1]  # the answer stops at the context's end
    if settings.do_sample:
        options.update(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k)
    runner = llamacpp_runner(model)  # the LLM in llama.cpp (--quantize q4_k_m / q8_0), else transformers
    return (runner or model.llm).generate(
        inputs_embeds=inputs_embeds,
        attention_mask=batch.attention_mask.to(device),
        max_new_tokens=max(1, min(settings.max_new_tokens, room)),
        do_sample=settings.do_sample,
        num_beams=settings.num_beams,
        eos_token_id=stop_ids,
        pad_token_id=model.config.llm.pad_token_id,
        use_cache=True,
        streamer=streamer,
        stopping_criteria=stopping,
        **options,
    )


def llamacpp_runner(model: HiLight):
    """The llama.cpp LLM that replaced ``model``'s decoder layers (:mod:`hilight.inference.llamacpp`), if any."""
    return getattr(model, "llamacpp", None)


def resolve_dtype(name: str) -> torch.dtype:
    """``auto``: bf16 on a GPU that has it or a CPU with native bf16 (AVX512-BF16 / AMX), else fp32."""
    if name != "auto":
        return torch_dtype(name)
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    from hilight.inference.quantize import cpu_has_native_bf16

    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


@dataclass
class Planned:
    """A clip as the model will see it: its segments (one unless more frames were asked), the
    cache key of each, and the time of every frame shown (from the demux pass)."""

    clip: Clip
    index: FrameIndex
    segments: list[Segment]
    keys: list[str]

    @property
    def labels(self) -> list[str] | None:
        """The time-span markers of the segments; none for a video in one segment (read
        exactly as the model was trained)."""
        if len(self.segments) == 1:
            return None
        return [segment_label(s, self.index.duration) for s in self.segments]

    def info(self) -> dict:
        """What the answer was based on: the sampling asked for, and each segment's span and
        its frames' times (seconds), for ``--json`` and the API's response."""
        return {"sampling": self.clip.sampling.to_json(), "duration": round(self.index.duration, 3),
                "total_frames": len(self.index.pts), "frames": sum(len(s.indices) for s in self.segments),
                "segments": [{"start": round(s.start, 3), "end": round(s.end, 3),
                              "timestamps": [round(self.index.seconds(self.index.pts[i]), 3) for i in s.indices]}
                             for s in self.segments]}


class Engine:
    """A loaded model plus its tokenizer, with segment embeddings cached by content.

    Each segment of a video (its T frames) is decoded and encoded once (towers + TokenMining);
    later questions about it, in any conversation, reuse the embeddings, so a follow-up about
    another range of the same video encodes only the segments that are new.
    """

    def __init__(self, model: HiLight, tokenizer, cache_size: int = 128):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.chat = ChatTokenizer(tokenizer, model.config.tokens_per_video)
        self.stop_ids = [self.chat.end_of_turn_id, self.chat.eos_id]
        self.cache_size = cache_size  # segments
        self._videos: OrderedDict[str, torch.Tensor] = OrderedDict()  # segment key -> [T*Q, D]
        self._indexes: OrderedDict[str, FrameIndex] = OrderedDict()  # content hash -> demux pass
        self._digests: dict[tuple[str, int, int], str] = {}  # (path, size, mtime) -> content hash
        self._compiled = None  # the towers and TokenMining through torch.compile, once compile() ran

    @classmethod
    def from_checkpoint(cls, path: str | Path, dtype: torch.dtype | None = None, device: str = "cpu",
                        quantize: str = "auto") -> Engine:
        """``quantize="int8"`` / ``"int4"``: weight-only int8 / 4-bit for the LLM's linear layers; ``"packed"``: the
        LLM's bf16 weights prepacked for oneDNN; ``"auto"``: packed for a full-width bf16 model on
        a CPU with native bf16, else none (see hilight.inference.quantize.resolve_quantize)."""
        from hilight.checkpoint import load_checkpoint
        from hilight.inference import llamacpp
        from hilight.inference.quantize import QUANTIZE, quantize_llm, resolve_quantize

        if quantize not in QUANTIZE:  # before the (long) load
            raise ConfigError(f"unknown quantization {quantize!r} ({', '.join(QUANTIZE)})")
        if quantize in llamacpp.FORMATS:
            if device != "cpu":
                raise ConfigError(f"--quantize {quantize} runs the LLM in llama.cpp, on CPU only")
            gguf = llamacpp.gguf_file(path, quantize, dtype)  # once written, the decoder layers are not even read
            model, tokenizer = load_checkpoint(path, dtype=dtype, device=device, mapped=False,
                                               llm_layers=not gguf.is_file())
            llamacpp.attach(model, tokenizer, quantize, gguf)
            return cls(model, tokenizer)
        # unless plain layers are asked for, the weights may be packed or quantized (auto decides
        # once the model is built), so they are read into memory of our own tensor by tensor, not
        # mapped: the file's pages would otherwise count on top (full hilight-2b packed: peak
        # 11.4 -> 6.5 GiB)
        model, tokenizer = load_checkpoint(path, dtype=dtype, device=device, mapped=quantize == "none")
        mode = resolve_quantize(quantize, model, device)
        if mode != "none":
            if device != "cpu":
                raise ConfigError(f"--quantize {mode} runs on CPU only (torch's CPU kernels)")
            quantize_llm(model, mode=mode)
        return cls(model, tokenizer)

    @property
    def device(self) -> torch.device:
        return next(self.model.llm.parameters()).device

    def compile(self) -> float:
        """Run the video encoding (both towers and TokenMining) through ``torch.compile``
        (inductor, weights frozen as constants) from now on; returns the seconds compiling took.

        For a long-running server: compiling costs tens of seconds once, each video's encode is
        then faster (docs/performance.md). One video's shape is compiled, so segments are then
        encoded one at a time. Raises ConfigError where inductor cannot build (no C++ compiler)."""
        import time

        import torch._inductor.config as inductor

        model = self.model
        cfg = model.config.video
        inductor.freezing = True  # the frozen weights become constants: prepacked for oneDNN

        def encode(pixels: torch.Tensor) -> torch.Tensor:
            return model.video_embeddings(model.encode_videos(pixels))

        compiled = torch.compile(encode, dynamic=False)
        # a black clip made as every video's frames are (dtype included): the same graph serves them
        blank = preprocess(np.zeros((cfg.num_frames, cfg.image_size, cfg.image_size, 3), np.uint8), cfg)
        start = time.perf_counter()
        try:
            with torch.inference_mode():
                compiled(blank[None].to(self.device))
        except Exception as e:  # inductor's failures (no compiler, unsupported op) are many kinds
            raise ConfigError(f"--compile: torch.compile could not build the video encoder here "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
        self._compiled = compiled
        return time.perf_counter() - start

    def digest(self, path: str | Path) -> str:
        """Content hash of a video file; an unchanged file (path, size, mtime) is not read again."""
        path = Path(path)
        if not path.exists():
            raise VideoError(path, "no such file")
        if not path.is_file():
            raise VideoError(path, "not a regular file")
        stat = path.stat()
        ident = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
        if ident not in self._digests:
            self._digests[ident] = file_digest(path)
            while len(self._digests) > 4 * self.cache_size:  # one entry per file seen: bounded
                self._digests.pop(next(iter(self._digests)))
        return self._digests[ident]

    @property
    def context(self) -> int:
        """Positions the LLM can attend over: prompt and answer together."""
        return self.model.config.llm.max_position_embeddings

    def plan(self, video: str | Path | Clip) -> Planned:
        """Which frames of ``video`` the model will see, in which segments (a demux pass, cached
        per file content; nothing is decoded). A range outside the video raises VideoError."""
        clip = as_clip(video)
        digest = self.digest(clip.path)
        index, segments = plan_video(clip.path, self.model.config.video, clip.sampling, self._indexes.get(digest))
        self._indexes[digest] = index
        self._indexes.move_to_end(digest)
        while len(self._indexes) > 4 * self.cache_size:
            self._indexes.popitem(last=False)
        keys = [f"{digest}:{hashlib.blake2b(repr(s.indices).encode(), digest_size=8).hexdigest()}" for s in segments]
        return Planned(clip, index, segments, keys)

    @torch.inference_mode()
    def segment_embeddings(self, planned: Sequence[Planned], skip: int = 0) -> torch.Tensor | None:
        """TokenMining outputs [N, T*Q, D] of every segment of ``planned`` in order, but the first
        ``skip``. Segments not cached yet are decoded (seeking to each) and run through the towers
        and TokenMining, ``ENCODE_BATCH`` at a time."""
        keys = [k for p in planned for k in p.keys][skip:]
        if not keys:
            return None
        needed, todo, seen = set(keys), [], set()
        for p in planned:
            for key, segment in zip(p.keys, p.segments, strict=True):
                if key in needed and key not in self._videos and key not in seen:
                    todo.append((p, key, segment))
                    seen.add(key)
        pixels: list[torch.Tensor] = []
        pending: list[str] = []
        cfg = self.model.config.video
        for start in range(0, len(todo), ENCODE_BATCH):
            chunk = todo[start:start + ENCODE_BATCH]
            by_clip: dict[int, list] = {}
            for item in chunk:  # one decode per file: a seek (or pass) plan over all its segments
                by_clip.setdefault(id(item[0]), []).append(item)
            for items in by_clip.values():
                p = items[0][0]
                chosen = [i for _, _, seg in items for i in seg.indices]
                frames = preprocess(decode_frames(p.clip.path, p.index, chosen, cfg).frames, cfg)  # [n*T, 3, S, S]
                pixels += list(frames.view(len(items), cfg.num_frames, *frames.shape[1:]))
                pending += [key for _, key, _ in items]
            batch = torch.stack(pixels).to(self.device)
            if self._compiled is not None:  # compiled for one video's shape
                embeds = torch.cat([self._compiled(batch[k:k + 1]) for k in range(len(batch))])
            else:
                embeds = self.model.video_embeddings(self.model.encode_videos(batch))
            for key, row in zip(pending, embeds, strict=True):
                self._videos[key] = row
            pixels, pending = [], []
        rows = []
        for key in keys:
            self._videos.move_to_end(key)
            rows.append(self._videos[key])
        while len(self._videos) > max(self.cache_size, len(needed)):
            self._videos.popitem(last=False)
        return torch.stack(rows)

    def video_embeddings(self, video: str | Path | Clip) -> torch.Tensor:
        """TokenMining output [T*Q, D] of a video read in one segment (cached)."""
        return self.video_embeddings_many([video])[0]

    def video_embeddings_many(self, videos: Sequence[str | Path | Clip]) -> torch.Tensor | None:
        """TokenMining outputs [N, T*Q, D] of every segment of ``videos``, in order (one per video
        sampled the model's own way); the ones not cached yet are encoded together."""
        return self.segment_embeddings([self.plan(v) for v in videos])

    def encode_prompt(self, messages: Sequence[Message], planned: Sequence[Planned],
                      settings: GenerationSettings | None = None) -> Encoded:
        """The prompt's ids with each video's segments laid out; refused when it would leave the
        LLM's context less than room for the answer, saying how many segments would fit."""
        self.chat.check_length(messages, self.context)
        encoded = self.chat.encode(messages, generation=True, layouts=[p.labels for p in planned])
        answer = min((settings or GenerationSettings()).max_new_tokens, ANSWER_ROOM)
        limit = self.context - answer
        if len(encoded) <= limit:
            return encoded
        segments = sum(len(p.segments) for p in planned)
        visual = sum(len(self.chat.video_ids(p.labels)) for p in planned)
        text = len(encoded) - visual
        if segments <= len(planned):
            raise ConversationError(f"the prompt is {len(encoded)} tokens ({text} of text, {len(planned)} video(s) "
                                    f"of {self.chat.tokens_per_video}); the model's context of {self.context} "
                                    f"leaves room for {limit} with {answer} kept for the answer")
        fits = max(0, (limit - text) // max(1, visual // segments))
        raise ConversationError(
            f"{segments} video segments ({visual} tokens) and {text} tokens of text exceed the model's context of "
            f"{self.context} with {answer} kept for the answer: {fits} segment(s) of {self.model.config.video.num_frames} frames would "
            f"fit; ask for fewer frames (num_frames, or fps with max_frames) or a shorter range")

    def answer_batch(
        self, prompts: Sequence[tuple[Sequence[Message], Sequence[str | Path | Clip]]],
        settings: GenerationSettings | None = None,
    ) -> list[str]:
        """Answers for several (conversation ending in a user turn, its videos) prompts at once."""
        planned = [[self.plan(v) for v in videos] for _, videos in prompts]
        encoded = [self.encode_prompt(messages, plans, settings)
                   for (messages, _), plans in zip(prompts, planned, strict=True)]
        embeds = self.segment_embeddings([p for plans in planned for p in plans])
        batch = collate(encoded, self.chat.pad_id, padding_side="left")
        out = generate(self.model, batch, self.stop_ids, settings, video_embeds=embeds)
        return [self.chat.decode(row.tolist()).strip() for row in out]

    def answer(self, messages: Sequence[Message], videos: Sequence[str | Path | Clip] = (),
               settings: GenerationSettings | None = None) -> str:
        return self.answer_batch([(messages, videos)], settings)[0]

    @torch.inference_mode()
    def loglikelihood(self, messages: Sequence[Message], videos: Sequence[str | Path | Clip],
                      continuations: Sequence[str]) -> list[tuple[float, bool]]:
        """For each continuation of the model's reply to ``messages``: the sum of its tokens' log
        probabilities, and whether greedy decoding would produce exactly those tokens. All
        continuations run as one batch over the same prompt (the videos encoded once)."""
        planned = [self.plan(v) for v in videos]
        prompt = self.encode_prompt(messages, planned).input_ids
        embeds = self.segment_embeddings(planned)
        rows = []
        for text in continuations:
            tokens = self.chat._text(text)
            if not tokens:
                raise ConversationError(f"the continuation {text!r} has no tokens")
            rows.append(tokens)
        width = len(prompt) + max(len(r) for r in rows)
        if width > self.context:
            raise ConversationError(f"{width} tokens exceed the model's context of {self.context}")
        ids = torch.full((len(rows), width), self.chat.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, tokens in enumerate(rows):
            ids[i, :len(prompt) + len(tokens)] = torch.tensor(prompt + tokens)
            mask[i, :len(prompt) + len(tokens)] = 1
        runner = llamacpp_runner(self.model)
        if runner is not None:  # one row at a time: llama.cpp keeps the prompt's positions between them
            return [self._scored(runner.logits(self.model.embed(torch.tensor([prompt + tokens]), embeds)[0],
                                               len(prompt) - 1)[:len(tokens)], tokens) for tokens in rows]
        video_embeds = None if embeds is None else embeds.repeat(len(rows), 1, 1)  # one copy per row
        logits = self.model(ids.to(self.device), mask.to(self.device), video_embeds=video_embeds).logits.float()
        # the positions predicting each continuation's tokens
        return [self._scored(logits[i, len(prompt) - 1:len(prompt) - 1 + len(tokens)], tokens)
                for i, tokens in enumerate(rows)]

    @staticmethod
    def _scored(logits: torch.Tensor, tokens: list[int]) -> tuple[float, bool]:
        """(sum of the log probabilities of ``tokens``, whether each is the argmax) from the logits
        [len(tokens), V] of the positions predicting them."""
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        target = torch.tensor(tokens, device=logprobs.device)
        return float(logprobs.gather(1, target[:, None]).sum()), bool((logprobs.argmax(-1) == target).all())


class Cancelled(Exception):
    """Generation was stopped by the caller."""


@dataclass
class PromptCache:
    """The KV cache of a conversation so far and exactly what it holds: one key per cached
    position, the token id, or at a visual position the content hash of the video there (the
    placeholder id alone would not say which video filled it). It is valid for ``model`` only."""

    model: HiLight
    keys: list[int | str]
    kv: DynamicCache

    def reusable(self, keys: Sequence[int | str]) -> int:
        """How many leading positions of a prompt with ``keys`` the cache already holds: the
        common prefix, short of the last position (its logits start the reply). A prefix never
        ends inside a video: cached prompts hold whole videos, and replies hold only text."""
        return common_prefix(self.keys, keys, len(keys) - 1)


def common_prefix(held: Sequence, keys: Sequence, limit: int) -> int:
    """How many leading items ``held`` and ``keys`` share, at most ``limit``."""
    n, limit = 0, min(limit, len(held), len(keys))
    while n < limit and held[n] == keys[n]:
        n += 1
    return n


def position_keys(input_ids: Sequence[int], block_keys: Sequence[str], tokens_per_video: int) -> list[int | str]:
    """One key per prompt position: the token id, or at a visual position the key of the video
    segment there (each fills ``tokens_per_video`` positions)."""
    keys: list[int | str] = []
    visual = 0  # visual positions so far
    for token in input_ids:
        if token == VIDEO_PLACEHOLDER_ID:
            keys.append(block_keys[visual // tokens_per_video])
            visual += 1
        else:
            keys.append(token)
    return keys


@dataclass
class Conversation:
    """A chat: alternating user/model messages; ``videos`` (each a :class:`Clip`: a file and its
    sampling) follow the ``<video>`` markers in reading order. A user turn is only committed once
    its videos have been read, so a bad video never leaves the conversation half-changed.
    ``cache`` holds the KV cache of the conversation so far (one per conversation; dropped with it)."""

    messages: list[Message] = field(default_factory=list)
    videos: list[Clip] = field(default_factory=list)
    cache: PromptCache | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.videos = [as_clip(v) for v in self.videos]

    def to_json(self) -> dict:
        return {"messages": [{"role": m.role, "content": m.content} for m in self.messages],
                "videos": [{"path": str(v.path), **v.sampling.to_json()} if not v.sampling.is_default
                           else str(v.path) for v in self.videos]}


def place_videos(text: str, count: int) -> str:
    """``text`` with ``count`` videos: kept where ``<video>`` markers already are, otherwise put
    before the text (the layout the original trained on)."""
    markers = text.count(VIDEO_TOKEN)
    if markers == count:
        return text
    if markers:
        raise ConversationError(f"the message has {markers} {VIDEO_TOKEN} marker(s) for {count} video(s)")
    return f"{VIDEO_TOKEN}\n" * count + text


class _CountingStreamer(TextIteratorStreamer):
    """Counts the generated tokens (the first ``put`` is the prompt, skipped)."""

    def __init__(self, tokenizer, **kwargs):
        super().__init__(tokenizer, **kwargs)
        self.generated = 0
        self._prompt_seen = False

    def put(self, value):
        if self._prompt_seen:
            self.generated += value.numel()
        self._prompt_seen = True
        super().put(value)


class _Stop(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def _resume(engine: Engine, cache: PromptCache | None, keys: Sequence[int | str],
            settings: GenerationSettings) -> tuple[DynamicCache | None, int]:
    """The KV cache to run a prompt with ``keys`` into, and how many of its positions it holds
    already (the rest of it is dropped). Beam search would leave one cache per beam: it starts
    afresh and keeps none."""
    if settings.num_beams != 1 or llamacpp_runner(engine.model) is not None:  # llama.cpp keeps its own cache
        return None, 0
    if cache is None or cache.model is not engine.model:
        return DynamicCache(config=engine.model.llm.config), 0
    held = cache.reusable(keys)
    cache.kv.crop(held - cache.kv.get_seq_length())  # a non-positive count: how many positions to drop
    return cache.kv, held


def stream_reply(engine: Engine, conversation: Conversation, text: str, videos: Sequence[str | Path | Clip] = (),
                 settings: GenerationSettings | None = None, cancel: threading.Event | None = None,
                 usage: dict | None = None, allow_no_video: bool = False) -> Iterator[str]:
    """Add a user turn and stream the model's reply, chunk by chunk; the reply is appended to
    the conversation when it finishes (also when cancelled, with what was generated).

    The model runs only over the prompt positions that the conversation's KV cache does not
    hold yet (the previous reply and the new turn, in a plain follow-up), so videos already in
    the conversation are not decoded, encoded, nor even fetched from the segment cache.
    ``usage``, if given, receives ``prompt_tokens``, ``cached_tokens`` (of the prompt, not run
    again), ``completion_tokens``, and ``videos``: what each video of the conversation was read
    as (:meth:`Planned.info`: segments and frame times).

    A conversation with no video at all is refused (:class:`NoVideoError`): a video model asked
    about nothing answers blind, and confidently. ``allow_no_video`` asks it without one."""
    settings = settings or GenerationSettings()
    if not videos and not conversation.videos and not allow_no_video:
        raise NoVideoError("no video in this conversation: add a video to the question, or ask without one "
                           "explicitly")
    text = place_videos(text, len(videos))
    clips = [as_clip(v) for v in videos]
    all_videos = [*conversation.videos, *clips]
    # plan, check the length, decode and encode first: a bad video or request raises before
    # anything changes
    planned = [engine.plan(v) for v in all_videos]
    messages = [*conversation.messages, Message("user", text)]
    encoded = engine.encode_prompt(messages, planned, settings)
    earlier = sum(len(p.keys) for p in planned[:len(conversation.videos)])
    engine.segment_embeddings(planned, skip=earlier)  # the new videos' segments
    keys = position_keys(encoded.input_ids, [k for p in planned for k in p.keys], engine.chat.tokens_per_video)
    kv, cached = _resume(engine, conversation.cache, keys, settings)
    conversation.cache = None  # in flux until the reply is in: a failed turn leaves no cache
    covered = encoded.input_ids[:cached].count(VIDEO_PLACEHOLDER_ID) // engine.chat.tokens_per_video
    embeds = engine.segment_embeddings(planned, skip=covered)  # the segments the cache does not hold
    batch = collate([encoded], engine.chat.pad_id, padding_side="left")
    cancel = cancel or threading.Event()
    streamer = _CountingStreamer(engine.tokenizer, skip_prompt=True, skip_special_tokens=True)
    output: list[torch.Tensor] = []
    failure: list[BaseException] = []

    beams = settings.num_beams != 1  # transformers cannot stream beam search: the reply comes whole

    def run() -> None:
        try:
            output.append(generate(engine.model, batch, engine.stop_ids, settings, video_embeds=embeds,
                                   streamer=None if beams else streamer,
                                   stopping=StoppingCriteriaList([_Stop(cancel)]), cache=kv))
            if beams:
                streamer.put(batch.input_ids)  # the prompt: skipped
                streamer.put(output[0][:1])
                streamer.end()
        except BaseException as exc:  # reported to the caller below
            failure.append(exc)
            streamer.end()

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    reply = []
    try:
        for chunk in streamer:
            reply.append(chunk)
            yield chunk
    finally:
        cancel.set()  # a consumer that stops early stops the generation too
        worker.join()
        if not failure:
            conversation.messages[:] = [*messages, Message("model", "".join(reply).strip())]
            conversation.videos[:] = all_videos
            if kv is not None:
                # the cache holds the prompt and every generated token but the last (never run);
                # the next turn re-renders the reply as text and reuses what still matches
                held = [*keys, *output[0][0].tolist()][: kv.get_seq_length()]
                conversation.cache = PromptCache(engine.model, held, kv)
        if usage is not None:
            # "length": the answer was cut by max_new_tokens (or the context's end), as OpenAI says
            tokens = output[0][0].tolist() if output else []
            limit = min(settings.max_new_tokens, engine.context - len(encoded))
            cut = bool(tokens) and tokens[-1] not in engine.stop_ids and streamer.generated >= limit
            runner = llamacpp_runner(engine.model)
            usage.update(prompt_tokens=len(encoded), cached_tokens=runner.reused if runner else cached, completion_tokens=streamer.generated,
                         videos=[p.info() for p in planned], finish_reason="length" if cut else "stop")
    if failure:
        raise failure[0]
