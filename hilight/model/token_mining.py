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
    """``forward(video_tokens [B, S, Dv], frame_embeds [B, T, Di]) -> [B, T*Q, D_llm]``.

    The two options of :class:`TokenMiningConfig` (both off for the released weights) add a
    learned ``slot_queries`` [Q, Di] to every frame's queries and restrict each frame's queries
    to its own patch tokens (``frame_local``)."""

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
        if cfg.slot_queries:
            self.slot_queries = nn.Parameter(torch.empty(q, di))
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
        if self.cfg.slot_queries:
            nn.init.normal_(self.slot_queries, std=0.5)

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

    def frame_mask(self, num_tokens: int, num_frames: int, global_tokens: int) -> torch.Tensor:
        """[T*Q, S] True where a query may look: its own frame's patch tokens. The video tokens
        are ``global_tokens`` clip-level tokens, then T frames of equally many patches."""
        patches = num_tokens - global_tokens
        if global_tokens < 0 or patches <= 0 or patches % num_frames:
            raise ValueError(f"TokenMining: {num_tokens} video tokens are not {global_tokens} global tokens plus "
                             f"{num_frames} frames of equally many patches")
        per_frame, q = patches // num_frames, self.cfg.queries_per_frame
        frame_of_token = torch.arange(patches) // per_frame  # [T*L]
        allowed = frame_of_token.unsqueeze(0) == (torch.arange(num_frames * q) // q).unsqueeze(1)  # [T*Q, T*L]
        return torch.cat([torch.zeros(num_frames * q, global_tokens, dtype=torch.bool), allowed], dim=1)

    def forward(self, video_tokens: torch.Tensor, frame_embeds: torch.Tensor, global_tokens: int = 0) -> torch.Tensor:
        """``global_tokens``: how many leading video tokens are clip-level (CLS and proxies),
        used only by ``frame_local``."""
        video = self.CLIP_VIP_projector(video_tokens)  # [B, S, Dv]
        queries = self.queries(frame_embeds)  # [B, T*Q, Di]
        if self.cfg.slot_queries:
            queries = queries + self.slot_queries.repeat(frame_embeds.shape[1], 1)
        q = self.query_projector(queries)
        k = self.key_projector(video)  # [B, S, Di]
        v = self.val_projector(video)  # [B, S, Di]
        # Single-head attention; the original divides the keys before the product and maps
        # NaN/inf to finite values before the softmax.
        scores = (q @ (k.transpose(-1, -2) / math.sqrt(self.cfg.image_dim))).nan_to_num()  # [B, T*Q, S]
        if self.cfg.frame_local:
            allowed = self.frame_mask(video_tokens.shape[1], frame_embeds.shape[1], global_tokens).to(scores.device)
            scores = scores.masked_fill(~allowed, float("-inf"))
        mined = torch.softmax(scores, dim=-1) @ v  # [B, T*Q, Di]
        return self.tokenizer_projector(mined)  # [B, T*Q, D_llm]
