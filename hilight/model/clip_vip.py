"""CLIP-ViP video tower: a CLIP ViT over T frames with video proxy tokens.

Sequence layout: ``[CLS, proxy_1 .. proxy_k, frame_0 patches, frame_1 patches, ...]``.
Proxy-guided attention: the M = 1 + k proxy tokens attend to every token; the patches of a
frame attend to the proxy tokens plus the patches of their own frame only. Module and
parameter names follow the original checkpoint (``embeddings.*``, ``encoder.layers.*``) so
conversion is a plain prefix map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from hilight.config import VideoTowerConfig


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


class CLIPViPEmbeddings(nn.Module):
    def __init__(self, cfg: VideoTowerConfig):
        super().__init__()
        d = cfg.hidden_size
        self.cfg = cfg
        self.class_embedding = nn.Parameter(torch.randn(d) * d**-0.5)
        self.added_cls = nn.Parameter(torch.zeros(cfg.add_cls_num, d))
        self.patch_embedding = nn.Conv2d(3, d, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding(cfg.patches_per_frame + 1, d)
        self.temporal_embedding = nn.Parameter(torch.zeros(1, cfg.temporal_size, d))

    def temporal(self, num_frames: int) -> torch.Tensor:
        """[1, T, D] temporal embedding, linearly interpolated when T differs from training."""
        if num_frames == self.cfg.temporal_size:
            return self.temporal_embedding
        emb = self.temporal_embedding.transpose(1, 2)  # [1, D, T0]
        emb = F.interpolate(emb, size=num_frames, mode="linear")  # [1, D, T]
        return emb.transpose(1, 2)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        b, t, c, h, w = pixel_values.shape
        dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(pixel_values.reshape(b * t, c, h, w).to(dtype))  # [B*T, D, g, g]
        patches = patches.flatten(2).transpose(1, 2)  # [B*T, L, D]
        patches = patches.reshape(b, t, -1, patches.shape[-1])  # [B, T, L, D]
        pos = self.position_embedding.weight  # [L+1, D]; row 0 belongs to the proxy tokens
        patches = patches + self.temporal(t).unsqueeze(2) + pos[1:]  # shared spatial table per frame
        cls = (self.class_embedding + pos[0]).expand(b, 1, -1)  # [B, 1, D]
        proxies = (self.added_cls + pos[0]).expand(b, -1, -1)  # [B, k, D]
        return torch.cat([cls, proxies, patches.flatten(1, 2)], dim=1)  # [B, M + T*L, D]


class ProxyGuidedAttention(nn.Module):
    """Multi-head attention restricted to CLIP-ViP's block structure, run with SDPA."""

    def __init__(self, cfg: VideoTowerConfig):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.num_proxy = cfg.num_proxy_tokens
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        b, s, d = x.shape
        h, m, n = self.num_heads, self.num_proxy, num_frames
        q, k, v = (p(x).view(b, s, h, d // h).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = proxy_guided_sdpa(q, k, v, m, n)  # [B, H, S, hd]
        return self.out_proj(out.transpose(1, 2).reshape(b, s, d))


def proxy_guided_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_proxy: int, num_frames: int) -> torch.Tensor:
    """CLIP-ViP attention on [B, H, M + N*L, hd] tensors, as two SDPA calls on the blocks.

    Never materialises the full (M + N*L)^2 score matrix: proxies use one [M x S] block,
    and each frame's patches one [L x (M + L)] block.
    """
    b, h, s, hd = q.shape
    m, n = num_proxy, num_frames
    length = (s - m) // n
    proxy_out = F.scaled_dot_product_attention(q[:, :, :m], k, v)  # [B, H, M, hd]

    def frame_blocks(t: torch.Tensor) -> torch.Tensor:
        # keys/values of frame i = [proxies, patches of frame i]
        proxies = t[:, :, :m].unsqueeze(2).expand(b, h, n, m, hd)  # [B, H, N, M, hd]
        patches = t[:, :, m:].reshape(b, h, n, length, hd)  # [B, H, N, L, hd]
        return torch.cat([proxies, patches], dim=3).reshape(b, h * n, m + length, hd)  # [B, H*N, M+L, hd]

    # 4-D inputs reach the fused CPU kernel; 5-D ones fall back to the slower math path
    q_patch = q[:, :, m:].reshape(b, h * n, length, hd)  # [B, H*N, L, hd]
    patch_out = F.scaled_dot_product_attention(q_patch, frame_blocks(k), frame_blocks(v))  # [B, H*N, L, hd]
    return torch.cat([proxy_out, patch_out.reshape(b, h, n * length, hd)], dim=2)


def proxy_guided_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_proxy: int, num_frames: int
) -> torch.Tensor:
    """Plain bmm/softmax version of :func:`proxy_guided_sdpa` with an explicit mask over the
    full sequence. Slow and memory-hungry; used only by tests and the benchmark."""
    s, hd = q.shape[-2], q.shape[-1]
    m = num_proxy
    length = (s - m) // num_frames
    frame = torch.full((s,), -1, dtype=torch.long, device=q.device)
    frame[m:] = torch.arange(num_frames, device=q.device).repeat_interleave(length)
    allowed = (frame[:, None] == -1) | (frame[None, :] == -1) | (frame[:, None] == frame[None, :])
    scores = (q * hd**-0.5) @ k.transpose(-1, -2)  # [B, H, S, S]
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


class CLIPViPMLP(nn.Module):
    def __init__(self, cfg: VideoTowerConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(quick_gelu(self.fc1(x)))


class CLIPViPLayer(nn.Module):
    def __init__(self, cfg: VideoTowerConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = ProxyGuidedAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPViPMLP(cfg)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), num_frames)
        return x + self.mlp(self.layer_norm2(x))


class CLIPViPEncoder(nn.Module):
    def __init__(self, cfg: VideoTowerConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPViPLayer(cfg) for _ in range(cfg.num_layers))


class CLIPViPVideoTower(nn.Module):
    """``forward(pixels [B, T, 3, H, W]) -> last hidden state [B, M + T*L, D]``
    (before ``post_layernorm``, which only the pooled embedding uses)."""

    def __init__(self, cfg: VideoTowerConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = CLIPViPEmbeddings(cfg)
        self.pre_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.encoder = CLIPViPEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.visual_projection = nn.Linear(cfg.hidden_size, cfg.projection_dim, bias=False)
        self.gradient_checkpointing = False

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        num_frames = pixel_values.shape[1]
        x = self.pre_layernorm(self.embeddings(pixel_values))
        for layer in self.encoder.layers:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, num_frames, use_reentrant=False)
            else:
                x = layer(x, num_frames)
        return x

    def normalized(self, last_hidden: torch.Tensor) -> torch.Tensor:
        """The final layer norm of every token [..., D] (what the pooled and patch embeddings project)."""
        return self.post_layernorm(last_hidden)

    def projection(self, states: torch.Tensor) -> torch.Tensor:
        """Normalised states [..., D] -> the contrastive embedding space [..., projection_dim]."""
        return self.visual_projection(states)

    def pooled(self, last_hidden: torch.Tensor) -> torch.Tensor:
        """Projected CLS embedding [B, projection_dim] (not normalised)."""
        return self.projection(self.normalized(last_hidden[:, 0]))

    def patch_tokens(self, last_hidden: torch.Tensor, num_frames: int) -> torch.Tensor:
        """Normalised patch states [B, T, L, D] (the CLS and proxy tokens left out)."""
        patches = self.normalized(last_hidden[:, self.cfg.num_proxy_tokens:])  # [B, T*L, D]
        return patches.view(len(patches), num_frames, -1, patches.shape[-1])
