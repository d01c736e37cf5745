"""The HiLight model: two frozen vision towers, TokenMining, and a Gemma decoder.

The model is pure: ``forward`` returns loss and logits. Generation, sampling and caching of
per-video features live in :mod:`hilight.inference.engine`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import GemmaForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

from hilight.config import HiLightConfig, TrainableConfig
from hilight.model import attention
from hilight.model.clip_vip import CLIPViPVideoTower
from hilight.model.long_clip import LongCLIPImageTower
from hilight.model.token_mining import TokenMining
from hilight.text import VIDEO_PLACEHOLDER_ID

COMPONENTS = ("video_tower", "image_tower", "token_mining", "llm")


@dataclass
class TowerOutputs:
    """What the frozen towers produce for V videos; this is what a feature cache stores."""

    video: torch.Tensor  # CLIP-ViP last hidden state [V, M + T*L, Dv]
    image: torch.Tensor  # Long-CLIP projected CLS per frame [V, T, Di]


def _contiguous_input(module: nn.Module, args: tuple) -> tuple:
    x = args[0]
    standard, step = [], 1
    for size in reversed(x.shape):
        standard.insert(0, step)
        step *= size
    if list(x.stride()) == standard:
        return args
    # is_contiguous() ignores the stride of a size-1 dim, torch's matmul does not: a fresh copy
    return (x.clone(memory_format=torch.contiguous_format), *args[1:])


def mine_tokens(token_mining: TokenMining, towers: TowerOutputs, num_proxy_tokens: int) -> torch.Tensor:
    """TokenMining output [V, T*Q, D_llm] for the tower outputs of V videos (in TokenMining's dtype).
    CLIP-ViP's output starts with its CLS and proxy tokens (clip-level, not of one frame)."""
    dtype = token_mining.CLIP_VIP_projector[0].weight.dtype
    return token_mining(towers.video.to(dtype), towers.image.to(dtype), num_proxy_tokens)


def scale_visual(video_embeds: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Visual tokens as they enter the LLM: multiplied by sqrt(hidden_size) in the embedding
    dtype, as Gemma scales its token embeddings (see :meth:`HiLight.embed` for why)."""
    scale = torch.tensor(video_embeds.shape[-1] ** 0.5, dtype=dtype)
    return video_embeds.to(dtype) * scale


class HiLight(nn.Module):
    def __init__(self, config: HiLightConfig):
        super().__init__()
        self.config = config
        self.video_tower = CLIPViPVideoTower(config.video_tower)
        self.image_tower = LongCLIPImageTower(config.image_tower)
        self.token_mining = TokenMining(config.token_mining)
        self.llm = GemmaForCausalLM(config.llm.to_gemma())
        self.llm.set_attn_implementation(attention.register())  # SDPA, with a faster CPU decoding step
        # In a prefill the LM head reads a slice (the last position) of the hidden states, a
        # [B, 1, D] view with the prompt's strides; torch's CPU matmul then takes the bmm path and
        # copies the whole transposed weight first (1 GB for Gemma's 256k vocabulary: 5.6 s of a
        # 6.7 s follow-up prefill here). Standard strides keep it one plain matrix product.
        self.llm.lm_head.register_forward_pre_hook(_contiguous_input)

    def set_trainable(self, trainable: TrainableConfig) -> None:
        """Freeze or unfreeze whole components; a training stage is a value of ``trainable``
        (it belongs to the training config, never to a checkpoint)."""
        for name in COMPONENTS:
            getattr(self, name).requires_grad_(getattr(trainable, name))

    def encode_videos(self, pixel_values: torch.Tensor) -> TowerOutputs:
        """Run both towers on V clips [V, T, 3, H, W]; all frames go through Long-CLIP as one batch."""
        return TowerOutputs(video=self.video_tower(pixel_values), image=self.image_tower(pixel_values))

    def video_embeddings(self, towers: TowerOutputs) -> torch.Tensor:
        """TokenMining output [V, T*Q, D_llm] for tower outputs of V videos."""
        return mine_tokens(self.token_mining, towers, self.config.video_tower.num_proxy_tokens)

    def embed(self, input_ids: torch.Tensor, video_embeds: torch.Tensor | None) -> torch.Tensor:
        """Text embeddings with every placeholder run replaced by its video's embeddings.

        Videos are consumed in reading order (row by row, left to right). The visual tokens are
        multiplied by sqrt(hidden_size) in the embedding dtype: the original ran under
        transformers 4.38, where Gemma scaled *all* ``inputs_embeds`` that way; 5.x scales only
        inside the token embedding, so without this the released weights would see visual
        tokens 45x too small.
        """
        is_video = input_ids == VIDEO_PLACEHOLDER_ID  # [B, L]
        embed_tokens = self.llm.get_input_embeddings()
        embeds = embed_tokens(input_ids.masked_fill(is_video, self.config.llm.pad_token_id))  # [B, L, D]
        n_slots = int(is_video.sum())
        n_given = 0 if video_embeds is None else video_embeds.shape[0] * video_embeds.shape[1]
        if n_slots != n_given:
            per_video = self.config.tokens_per_video
            raise ValueError(
                f"the text has {n_slots // per_video} video placeholder(s) "
                f"but {n_given // per_video} video(s) were given"
            )
        if n_slots == 0:
            return embeds
        visual = scale_visual(video_embeds, embeds.dtype)  # [V, T*Q, D]
        return embeds.masked_scatter(is_video.unsqueeze(-1), visual.reshape(-1, visual.shape[-1]))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        towers: TowerOutputs | None = None,
        video_embeds: torch.Tensor | None = None,
    ) -> CausalLMOutputWithPast:
        """Loss and logits. Videos come as raw clips (``pixel_values`` [V, T, 3, H, W]), as
        cached tower outputs (``towers``), or as finished ``video_embeds`` [V, T*Q, D]."""
        if video_embeds is None:
            if towers is None and pixel_values is not None:
                towers = self.encode_videos(pixel_values)
            if towers is not None:
                video_embeds = self.video_embeddings(towers)
        inputs_embeds = self.embed(input_ids, video_embeds)
        position_ids = None
        if attention_mask is not None:
            # left padding: positions count real tokens only
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return self.llm(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            labels=labels,
            use_cache=False,
        )

    def parameter_counts(self) -> dict[str, int]:
        """Unique parameters per component (tied embeddings counted once)."""
        counts = {name: sum(p.numel() for p in getattr(self, name).parameters()) for name in COMPONENTS}
        counts["total"] = sum(counts.values())
        return counts
