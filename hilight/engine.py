"""Generation for HiLight: prompts with videos in, answer tokens out.

Decoding runs through transformers' ``generate`` on ``inputs_embeds`` with a KV cache, so
greedy, sampling and beam search behave exactly as for any Gemma. Every interface (CLI, web
UI, API server, evaluation) goes through this module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hilight.model import HiLight
from hilight.text import Batch


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
        **sampling,
    )
