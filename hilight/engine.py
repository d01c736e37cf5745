"""Generation for HiLight: prompts with videos in, answer tokens out.

Decoding runs through transformers' ``generate`` on ``inputs_embeds`` with a KV cache, so
greedy, sampling and beam search behave exactly as for any Gemma. Every interface (CLI, web
UI, API server, evaluation) goes through this module.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from hilight.model import HiLight
from hilight.text import VIDEO_TOKEN, Batch, ChatTokenizer, ConversationError, Message, collate
from hilight.video import load_video


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
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")


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
) -> torch.Tensor:
    """New token ids [B, <= max_new_tokens] for a left-padded batch of prompts.

    Rows that stop early are padded with ``pad_token_id``. ``stop_ids`` end a row (for chat:
    ``<end_of_turn>`` and ``<eos>``).
    """
    settings = settings or GenerationSettings()
    device = next(model.llm.parameters()).device
    if video_embeds is None and pixel_values is not None:
        video_embeds = model.video_embeddings(model.encode_videos(pixel_values.to(device)))
    inputs_embeds = model.embed(batch.input_ids.to(device), video_embeds)
    sampling = {}
    if settings.do_sample:
        sampling = {"temperature": settings.temperature, "top_p": settings.top_p, "top_k": settings.top_k}
    return model.llm.generate(
        inputs_embeds=inputs_embeds,
        attention_mask=batch.attention_mask.to(device),
        max_new_tokens=settings.max_new_tokens,
        do_sample=settings.do_sample,
        num_beams=settings.num_beams,
        eos_token_id=stop_ids,
        pad_token_id=model.config.llm.pad_token_id,
        use_cache=True,
        streamer=streamer,
        stopping_criteria=stopping,
        **sampling,
    )


BUNDLED_MODEL = Path(__file__).parent / "assets" / "billiards-small"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype:
    """``auto``: bf16 on a GPU that has it or a CPU with native bf16 (AVX512-BF16 / AMX), else fp32."""
    if name != "auto":
        return DTYPES[name]
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    return torch.bfloat16 if native else torch.float32


def default_model() -> Path:
    """The model shipped inside the package."""
    if not (BUNDLED_MODEL / "config.json").is_file():
        from hilight.checkpoint import CheckpointError

        raise CheckpointError(f"{BUNDLED_MODEL}: this build has no bundled model yet; pass --model DIR")
    return BUNDLED_MODEL


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's content: the identity of a video, whatever its name."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class Engine:
    """A loaded model plus its tokenizer, with per-video embeddings cached by content hash.

    Each video is decoded and encoded once (towers + TokenMining); later questions about it,
    in any conversation, reuse the embeddings.
    """

    def __init__(self, model: HiLight, tokenizer, cache_size: int = 64):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.chat = ChatTokenizer(tokenizer, model.config.tokens_per_video)
        self.stop_ids = [self.chat.end_of_turn_id, self.chat.eos_id]
        self.cache_size = cache_size
        self._videos: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._digests: dict[tuple[str, int, int], str] = {}  # (path, size, mtime) -> content hash

    @classmethod
    def from_checkpoint(cls, path: str | Path, dtype: torch.dtype | None = None, device: str = "cpu") -> Engine:
        from hilight.checkpoint import load_checkpoint

        model, tokenizer = load_checkpoint(path, dtype=dtype, device=device)
        return cls(model, tokenizer)

    @property
    def device(self) -> torch.device:
        return next(self.model.llm.parameters()).device

    @torch.inference_mode()
    def video_embeddings(self, path: str | Path) -> torch.Tensor:
        """TokenMining output [T*Q, D] for one video file (cached by content hash)."""
        stat = Path(path).stat()
        ident = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
        if ident not in self._digests:  # an unchanged file is not read again to hash it
            self._digests[ident] = file_digest(path)
        key = self._digests[ident]
        if key in self._videos:
            self._videos.move_to_end(key)
            return self._videos[key]
        pixels = load_video(path, self.model.config.video).unsqueeze(0).to(self.device)
        embeds = self.model.video_embeddings(self.model.encode_videos(pixels))[0]
        self._videos[key] = embeds
        if len(self._videos) > self.cache_size:
            self._videos.popitem(last=False)
        return embeds

    def answer_batch(
        self, prompts: Sequence[tuple[Sequence[Message], Sequence[str | Path]]], settings: GenerationSettings | None = None
    ) -> list[str]:
        """Answers for several (conversation ending in a user turn, its videos) prompts at once."""
        encoded = [self.chat.encode(messages, generation=True, max_length=self.model.config.text.max_length)
                   for messages, _ in prompts]
        videos = [self.video_embeddings(v) for _, paths in prompts for v in paths]
        embeds = torch.stack(videos) if videos else None
        batch = collate(encoded, self.chat.pad_id, padding_side="left")
        out = generate(self.model, batch, self.stop_ids, settings, video_embeds=embeds)
        return [self.chat.decode(row.tolist()).strip() for row in out]

    def answer(self, messages: Sequence[Message], videos: Sequence[str | Path] = (),
               settings: GenerationSettings | None = None) -> str:
        return self.answer_batch([(messages, videos)], settings)[0]


class Cancelled(Exception):
    """Generation was stopped by the caller."""


@dataclass
class Conversation:
    """A chat: alternating user/model messages; ``videos`` follow the ``<video>`` markers in
    reading order. A user turn is only committed once its videos have been read, so a bad
    video never leaves the conversation half-changed."""

    messages: list[Message] = field(default_factory=list)
    videos: list[Path] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"messages": [{"role": m.role, "content": m.content} for m in self.messages],
                "videos": [str(v) for v in self.videos]}


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


def stream_reply(engine: Engine, conversation: Conversation, text: str, videos: Sequence[str | Path] = (),
                 settings: GenerationSettings | None = None, cancel: threading.Event | None = None,
                 usage: dict | None = None) -> Iterator[str]:
    """Add a user turn and stream the model's reply, chunk by chunk; the reply is appended to
    the conversation when it finishes (also when cancelled, with what was generated). ``usage``,
    if given, receives ``prompt_tokens`` and ``completion_tokens``."""
    settings = settings or GenerationSettings()
    text = place_videos(text, len(videos))
    paths = [Path(v) for v in videos]
    # decode and encode first: a bad video raises before anything changes
    new = [engine.video_embeddings(path) for path in paths]
    messages = [*conversation.messages, Message("user", text)]
    all_videos = [*conversation.videos, *paths]
    encoded = engine.chat.encode(messages, generation=True, max_length=engine.model.config.text.max_length)
    earlier = [engine.video_embeddings(v) for v in conversation.videos]
    embeds = torch.stack(earlier + new) if all_videos else None
    batch = collate([encoded], engine.chat.pad_id, padding_side="left")
    cancel = cancel or threading.Event()
    streamer = _CountingStreamer(engine.tokenizer, skip_prompt=True, skip_special_tokens=True)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            generate(engine.model, batch, engine.stop_ids, settings, video_embeds=embeds, streamer=streamer,
                     stopping=StoppingCriteriaList([_Stop(cancel)]))
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
        if usage is not None:
            usage.update(prompt_tokens=len(encoded), completion_tokens=streamer.generated)
    if failure:
        raise failure[0]
