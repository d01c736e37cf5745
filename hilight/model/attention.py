"""The LLM's attention: transformers' SDPA, except for one new position per row on CPU.

Decoding asks attention for one query per head against the whole KV cache. torch's CPU flash
kernel spends 0.8 ms on that for one Gemma-2B layer (8 heads, one KV head of 256, ~470 cached
positions; 14 ms of a ~100 ms decode step); two plain matrix products with the query heads
grouped by their KV head take 0.14 ms. Prompts (several positions), GPUs and training keep
SDPA exactly as transformers runs it.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "hilight_sdpa"


def attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None, **kwargs):
    """query [B, H, Q, D], key and value [B, KV, S, D]; returns ([B, Q, H, D], None)."""
    if query.shape[2] != 1 or query.device.type != "cpu" or dropout or torch.is_grad_enabled():
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    batch, heads, _, dim = query.shape
    groups = key.shape[1]
    scale = scaling if scaling is not None else dim**-0.5
    grouped = query.reshape(batch, groups, heads // groups, dim)  # a KV head's query heads as rows
    scores = torch.matmul(grouped, key.transpose(-1, -2)).float() * scale  # [B, KV, H / KV, S]
    if attention_mask is not None:
        mask = attention_mask[..., -key.shape[2]:]  # [B, 1, 1, S]
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    out = torch.matmul(probs, value)  # [B, KV, H / KV, D]
    return out.reshape(batch, heads, 1, dim).transpose(1, 2), None


def register() -> str:
    """Make the attention known to transformers under :data:`NAME` (done when a model is
    built; registering again is harmless). Returns the name."""
    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # masks as SDPA gets them (without one: no padding mask at all)
    return NAME
