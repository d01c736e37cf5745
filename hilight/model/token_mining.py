"""TokenMining: Long-CLIP frame embeddings, expanded to queries, cross-attend to CLIP-ViP tokens.

The arithmetic reproduces the original module exactly, quirks included, so that the released
weights work. Parameter names follow the original (``query_projector.0.weight`` ...).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from hilight.config import TokenMiningConfig


class TokenMining(nn.Module):
    """``forward(video_tokens [B, S, Dv], frame_embeds [B, T, Di]) -> [B, T*Q, D_llm]``."""

    def __init__(self, cfg: TokenMiningConfig):
        super().__init__()
        self.cfg = cfg
        dv, di, dl, q = cfg.video_dim, cfg.image_dim, cfg.llm_dim, cfg.queries_per_frame
        self.query_projector = nn.Sequential(nn.LayerNorm(di), nn.Linear(di, di))
        self.key_projector = nn.Sequential(nn.LayerNorm(dv), nn.Linear(dv, di))
        self.val_projector = nn.Sequential(nn.LayerNorm(dv), nn.Linear(dv, di))
        self.LongCLIP_projector = nn.Sequential(nn.Linear(1, q), nn.ReLU())
        self.CLIP_VIP_projector = nn.Sequential(nn.Linear(dv, dv), nn.ReLU())
        self.tokenizer_projector = nn.Sequential(
            nn.LayerNorm(di), nn.Linear(di, dl), nn.ReLU(), nn.Linear(dl, dl), nn.ReLU()
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform Linear weights, zero biases, unit LayerNorms (as the original)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def queries(self, frame_embeds: torch.Tensor) -> torch.Tensor:
        """[B, T, Di] -> [B, T*Q, Di]: every scalar of every frame embedding expanded Q ways."""
        b, t, di = frame_embeds.shape
        q = self.cfg.queries_per_frame
        expanded = self.LongCLIP_projector(frame_embeds.reshape(b * t * di, 1))  # [B*T*Di, Q]
        # The memory is logically [B, T, Di, Q]. The original *views* (not transposes) it as
        # [B, T, Q, Di], so channel j of query i is expansion k of Long-CLIP dim d where
        # i*Di + j = d*Q + k: each query mixes a few dims, each repeated Q ways. The released
        # weights were trained on this scrambled layout, so it must stay.
        return expanded.view(b, t, q, di).view(b, t * q, di)

    def forward(self, video_tokens: torch.Tensor, frame_embeds: torch.Tensor) -> torch.Tensor:
        video = self.CLIP_VIP_projector(video_tokens)  # [B, S, Dv]
        q = self.query_projector(self.queries(frame_embeds))  # [B, T*Q, Di]
        k = self.key_projector(video)  # [B, S, Di]
        v = self.val_projector(video)  # [B, S, Di]
        # Single-head attention, no mask; the original divides the keys before the product
        # and maps NaN/inf to finite values before the softmax.
        scores = q @ (k.transpose(-1, -2) / math.sqrt(self.cfg.image_dim))  # [B, T*Q, S]
        mined = torch.softmax(scores.nan_to_num(), dim=-1) @ v  # [B, T*Q, Di]
        return self.tokenizer_projector(mined)  # [B, T*Q, D_llm]
