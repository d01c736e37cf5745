"""Plain reference implementations that read *source-format* state dicts directly.

They follow the original code's structure (per-frame loops, bmm + softmax, nn.functional
multi-head attention), independently of HiLight's modules, so agreement with them checks both
the fast paths and the conversion key maps.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


def clipvip_forward(sd: dict, pixels: torch.Tensor, num_heads: int, eps: float = 1e-5) -> torch.Tensor:
    """CLIP-ViP last hidden state from ``clipmodel.vision_model.*`` weights; pixels [B, T, 3, H, W]."""

    def p(name):
        return sd["clipmodel.vision_model." + name]

    b, t, c, h, w = pixels.shape
    patch_w = p("embeddings.patch_embedding.weight")
    x = F.conv2d(pixels.reshape(b * t, c, h, w), patch_w, stride=patch_w.shape[-1])
    d = x.shape[1]
    x = x.flatten(2).transpose(1, 2).reshape(b, t, -1, d)
    temporal = p("embeddings.temporal_embedding")
    if temporal.shape[1] != t:
        temporal = F.interpolate(temporal.transpose(1, 2), t, mode="linear").transpose(1, 2)
    pos = p("embeddings.position_embedding.weight")
    x = x + temporal[:, :, None, :]
    x = x + pos[1:][None, None]
    cls = (p("embeddings.class_embedding") + pos[0]).expand(b, 1, d)
    added = (p("embeddings.added_cls") + pos[0]).expand(b, -1, d)
    x = torch.cat([cls, added, x.reshape(b, -1, d)], dim=1)
    m = 1 + added.shape[1]
    length = (x.shape[1] - m) // t
    x = F.layer_norm(x, (d,), p("pre_layrnorm.weight"), p("pre_layrnorm.bias"), eps)
    hd = d // num_heads
    i = 0
    while f"clipmodel.vision_model.encoder.layers.{i}.layer_norm1.weight" in sd:
        pre = f"encoder.layers.{i}."

        def lin(v, name, pre=pre):
            return F.linear(v, p(pre + name + ".weight"), p(pre + name + ".bias"))

        hsn = F.layer_norm(x, (d,), p(pre + "layer_norm1.weight"), p(pre + "layer_norm1.bias"), eps)
        q, k, v = (lin(hsn, f"self_attn.{n}_proj").view(b, -1, num_heads, hd).transpose(1, 2) for n in "qkv")
        q = q * hd**-0.5
        outs = [torch.softmax(q[:, :, :m] @ k.transpose(-1, -2), -1) @ v]  # proxies see everything
        for f in range(t):  # each frame's patches see the proxies and their own frame
            sl = slice(m + f * length, m + (f + 1) * length)
            kk = torch.cat([k[:, :, :m], k[:, :, sl]], dim=2)
            vv = torch.cat([v[:, :, :m], v[:, :, sl]], dim=2)
            outs.append(torch.softmax(q[:, :, sl] @ kk.transpose(-1, -2), -1) @ vv)
        attn = torch.cat(outs, dim=2).transpose(1, 2).reshape(b, -1, d)
        x = x + lin(attn, "self_attn.out_proj")
        hsn = F.layer_norm(x, (d,), p(pre + "layer_norm2.weight"), p(pre + "layer_norm2.bias"), eps)
        x = x + lin(quick_gelu(lin(hsn, "mlp.fc1")), "mlp.fc2")
        i += 1
    return x


def longclip_forward(sd: dict, pixels: torch.Tensor, num_heads: int, eps: float = 1e-5) -> torch.Tensor:
    """OpenAI-CLIP ``encode_image`` frame by frame from ``visual.*`` weights -> [B, T, out]."""

    def p(name):
        return sd["visual." + name]

    outs = []
    for frame in pixels.unbind(1):  # the original's per-frame loop
        conv = p("conv1.weight")
        x = F.conv2d(frame, conv, stride=conv.shape[-1])
        d = x.shape[1]
        x = x.reshape(x.shape[0], d, -1).permute(0, 2, 1)
        cls = p("class_embedding") + torch.zeros(x.shape[0], 1, d)
        x = torch.cat([cls, x], dim=1) + p("positional_embedding")
        x = F.layer_norm(x, (d,), p("ln_pre.weight"), p("ln_pre.bias"), eps)
        x = x.permute(1, 0, 2)  # [S, N, D] as nn.MultiheadAttention expects
        i = 0
        while f"visual.transformer.resblocks.{i}.ln_1.weight" in sd:
            pre = f"transformer.resblocks.{i}."
            hsn = F.layer_norm(x, (d,), p(pre + "ln_1.weight"), p(pre + "ln_1.bias"), eps)
            attn, _ = F.multi_head_attention_forward(
                hsn, hsn, hsn, d, num_heads, p(pre + "attn.in_proj_weight"), p(pre + "attn.in_proj_bias"),
                None, None, False, 0.0, p(pre + "attn.out_proj.weight"), p(pre + "attn.out_proj.bias"),
                training=False, need_weights=False,
            )
            x = x + attn
            hsn = F.layer_norm(x, (d,), p(pre + "ln_2.weight"), p(pre + "ln_2.bias"), eps)
            hid = quick_gelu(F.linear(hsn, p(pre + "mlp.c_fc.weight"), p(pre + "mlp.c_fc.bias")))
            x = x + F.linear(hid, p(pre + "mlp.c_proj.weight"), p(pre + "mlp.c_proj.bias"))
            i += 1
        x = x.permute(1, 0, 2)
        x = F.layer_norm(x[:, 0], (d,), p("ln_post.weight"), p("ln_post.bias"), eps)
        outs.append(x @ p("proj"))
    return torch.stack(outs, dim=1)


def token_mining_forward(sd: dict, videos: torch.Tensor, videos_aux: torch.Tensor) -> torch.Tensor:
    """The original UniLMProjectors.forward, step by step, from bare TokenMining keys."""

    def lin(x, name):
        return F.linear(x, sd[name + ".weight"], sd[name + ".bias"])

    def ln(x, name):
        return F.layer_norm(x, (x.shape[-1],), sd[name + ".weight"], sd[name + ".bias"])

    videos = torch.relu(lin(videos, "CLIP_VIP_projector.0"))
    b, n, d = videos_aux.shape
    q_per_frame = sd["LongCLIP_projector.0.weight"].shape[0]
    x = videos_aux.unsqueeze(2).view(b * n * d, 1)
    x = torch.relu(lin(x, "LongCLIP_projector.0"))
    x = x.view(b, n, q_per_frame, d).view(b, n * q_per_frame, d)
    q = lin(ln(x, "query_projector.0"), "query_projector.1")
    k = lin(ln(videos, "key_projector.0"), "key_projector.1")
    v = lin(ln(videos, "val_projector.0"), "val_projector.1")
    att = q @ (k.transpose(1, 2) / math.sqrt(d))
    att = torch.softmax(att.nan_to_num(), dim=-1)
    feat = att @ v
    feat = torch.relu(lin(ln(feat, "tokenizer_projector.0"), "tokenizer_projector.1"))
    return torch.relu(lin(feat, "tokenizer_projector.3"))
