"""Long-CLIP image tower: the visual half of an OpenAI-CLIP ViT, one projected CLS per frame.

Parameter names follow the OpenAI/Long-CLIP state dict under ``visual.`` (``conv1``,
``transformer.resblocks.N.attn.in_proj_weight``, ``proj``...), so conversion strips a prefix.
All frames of all videos run as one batch (the original looped over frames).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from hilight.config import ImageTowerConfig
from hilight.model.clip_vip import quick_gelu


class PackedSelfAttention(nn.Module):
    """Self-attention with a packed q/k/v projection (``in_proj_weight``), via SDPA."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # [B, S, 3D]
        qkv = qkv.view(b, s, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)  # [3, B, H, S, hd]
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # [B, H, S, hd]
        return self.out_proj(out.transpose(1, 2).reshape(b, s, d))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(quick_gelu(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, cfg: ImageTowerConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn = PackedSelfAttention(cfg.width, cfg.num_heads)
        self.ln_2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg.width, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ImageTowerConfig):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(cfg) for _ in range(cfg.num_layers))


class LongCLIPImageTower(nn.Module):
    """``forward(pixels [B, T, 3, H, W]) -> projected CLS per frame [B, T, output_dim]``."""

    def __init__(self, cfg: ImageTowerConfig):
        super().__init__()
        self.cfg = cfg
        scale = cfg.width**-0.5
        grid = cfg.image_size // cfg.patch_size
        self.conv1 = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(cfg.width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, cfg.width))
        self.ln_pre = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.transformer = Transformer(cfg)
        self.ln_post = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.proj = nn.Parameter(scale * torch.randn(cfg.width, cfg.output_dim))
        self.gradient_checkpointing = False

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> [N, output_dim]."""
        return self.project(self.tokens(images)[:, 0])  # [N, output_dim]

    def normalized(self, tokens: torch.Tensor) -> torch.Tensor:
        """Transformer outputs [..., D] after the final layer norm."""
        return self.ln_post(tokens)

    def projection(self, states: torch.Tensor) -> torch.Tensor:
        """Normalised states [..., D] -> embeddings [..., output_dim]."""
        return states @ self.proj

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """Transformer outputs [..., D] -> embeddings [..., output_dim] (ln_post, proj)."""
        return self.projection(self.normalized(tokens))

    def pooled(self, images: torch.Tensor) -> torch.Tensor:
        """Projected CLS embedding [N, output_dim] of each image [N, 3, H, W]."""
        return self.encode_images(images)

    def patch_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised patch states [N, L, D] of each image [N, 3, H, W] (CLS left out)."""
        return self.normalized(self.tokens(images)[:, 1:])

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Transformer outputs [N, 1 + g*g, D] (CLS first), before ln_post."""
        x = self.conv1(images.to(self.conv1.weight.dtype))  # [N, D, g, g]
        x = x.flatten(2).transpose(1, 2)  # [N, g*g, D]
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding  # [N, 1 + g*g, D]
        x = self.ln_pre(x)
        for block in self.transformer.resblocks:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        b, t = pixel_values.shape[:2]
        feats = self.encode_images(pixel_values.flatten(0, 1))  # [B*T, out]
        return feats.view(b, t, -1)  # [B, T, out]
