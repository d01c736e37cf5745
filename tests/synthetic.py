"""Writers of synthetic checkpoints in exactly the original HiLight formats, at tiny sizes.

Key names and shape relations come from the format descriptions of the original files
(``pretrain_clipvip_base_16.pt``, ``longclip-B.pt``, TokenMining ``.pt``/``.bin``, released
merged directories, transformers Gemma directories), not from HiLight's own modules.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from huggingface_hub import save_torch_state_dict
from transformers import GemmaForCausalLM

from hilight.config import HiLightConfig, ImageTowerConfig, TokenMiningConfig, VideoTowerConfig


class _Rand:
    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)

    def w(self, *shape, std=0.2):
        return torch.randn(*shape, generator=self.g) * std

    def ln(self, d):
        return 1.0 + self.w(d, std=0.1), self.w(d, std=0.1)


def clipvip_state(cfg: VideoTowerConfig, seed: int = 0, text_width: int = 16, text_vocab: int = 50) -> dict:
    """A ``pretrain_clipvip_base_16.pt`` state dict: ``clipmodel.*`` vision and text weights."""
    r = _Rand(seed)
    d, i, g = cfg.hidden_size, cfg.intermediate_size, cfg.image_size // cfg.patch_size
    v = "clipmodel.vision_model."
    sd = {
        v + "embeddings.class_embedding": r.w(d),
        v + "embeddings.added_cls": r.w(cfg.add_cls_num, d),
        v + "embeddings.patch_embedding.weight": r.w(d, 3, cfg.patch_size, cfg.patch_size, std=0.05),
        v + "embeddings.position_embedding.weight": r.w(g * g + 1, d),
        v + "embeddings.position_ids": torch.arange(g * g + 1).unsqueeze(0),
        v + "embeddings.temporal_embedding": r.w(1, cfg.temporal_size, d),
    }
    sd[v + "pre_layrnorm.weight"], sd[v + "pre_layrnorm.bias"] = r.ln(d)
    for n in range(cfg.num_layers):
        pre = f"{v}encoder.layers.{n}."
        for proj in ("q", "k", "v", "out"):
            sd[f"{pre}self_attn.{proj}_proj.weight"] = r.w(d, d)
            sd[f"{pre}self_attn.{proj}_proj.bias"] = r.w(d)
        sd[pre + "layer_norm1.weight"], sd[pre + "layer_norm1.bias"] = r.ln(d)
        sd[pre + "mlp.fc1.weight"], sd[pre + "mlp.fc1.bias"] = r.w(i, d), r.w(i)
        sd[pre + "mlp.fc2.weight"], sd[pre + "mlp.fc2.bias"] = r.w(d, i), r.w(d)
        sd[pre + "layer_norm2.weight"], sd[pre + "layer_norm2.bias"] = r.ln(d)
    sd[v + "post_layernorm.weight"], sd[v + "post_layernorm.bias"] = r.ln(d)
    sd["clipmodel.visual_projection.weight"] = r.w(cfg.projection_dim, d)
    sd["clipmodel.logit_scale"] = torch.tensor(4.6)
    t = "clipmodel.text_model."
    sd[t + "embeddings.token_embedding.weight"] = r.w(text_vocab, text_width)
    sd[t + "embeddings.position_embedding.weight"] = r.w(77, text_width)
    sd[t + "embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
    sd[t + "encoder.layers.0.self_attn.q_proj.weight"] = r.w(text_width, text_width)
    sd[t + "final_layer_norm.weight"], sd[t + "final_layer_norm.bias"] = r.ln(text_width)
    sd["clipmodel.text_projection.weight"] = r.w(cfg.projection_dim, text_width)
    return sd


def longclip_state(cfg: ImageTowerConfig, seed: int = 0, text_width: int = 16, text_vocab: int = 50) -> dict:
    """A ``longclip-B.pt`` state dict: OpenAI-CLIP layout with 248-position text tables."""
    r = _Rand(seed)
    d, i, g = cfg.width, cfg.intermediate_size, cfg.image_size // cfg.patch_size
    sd = {
        "visual.conv1.weight": r.w(d, 3, cfg.patch_size, cfg.patch_size, std=0.05),
        "visual.class_embedding": r.w(d),
        "visual.positional_embedding": r.w(g * g + 1, d),
        "visual.proj": r.w(d, cfg.output_dim),
    }
    sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"] = r.ln(d)
    sd["visual.ln_post.weight"], sd["visual.ln_post.bias"] = r.ln(d)
    for n in range(cfg.num_layers):
        pre = f"visual.transformer.resblocks.{n}."
        sd[pre + "attn.in_proj_weight"], sd[pre + "attn.in_proj_bias"] = r.w(3 * d, d), r.w(3 * d)
        sd[pre + "attn.out_proj.weight"], sd[pre + "attn.out_proj.bias"] = r.w(d, d), r.w(d)
        sd[pre + "ln_1.weight"], sd[pre + "ln_1.bias"] = r.ln(d)
        sd[pre + "mlp.c_fc.weight"], sd[pre + "mlp.c_fc.bias"] = r.w(i, d), r.w(i)
        sd[pre + "mlp.c_proj.weight"], sd[pre + "mlp.c_proj.bias"] = r.w(d, i), r.w(d)
        sd[pre + "ln_2.weight"], sd[pre + "ln_2.bias"] = r.ln(d)
    sd["token_embedding.weight"] = r.w(text_vocab, text_width)
    sd["positional_embedding"] = r.w(248, text_width)
    sd["positional_embedding_res"] = r.w(248, text_width)
    sd["transformer.resblocks.0.attn.in_proj_weight"] = r.w(3 * text_width, text_width)
    sd["ln_final.weight"], sd["ln_final.bias"] = r.ln(text_width)
    sd["text_projection"] = r.w(text_width, text_width)
    sd["logit_scale"] = torch.tensor(4.6)
    return sd


def token_mining_state(cfg: TokenMiningConfig, seed: int = 0, prefix: str = "") -> dict:
    """The 22 TokenMining tensors; ``prefix="model.token_mining."`` gives the ``.bin`` layout."""
    r = _Rand(seed)
    dv, di, dl, q = cfg.video_dim, cfg.image_dim, cfg.llm_dim, cfg.queries_per_frame
    sd = {}

    def ln(name, d):
        sd[name + ".weight"], sd[name + ".bias"] = r.ln(d)

    def lin(name, dout, din):
        sd[name + ".weight"], sd[name + ".bias"] = r.w(dout, din, std=din**-0.5), r.w(dout, std=0.1)

    ln("query_projector.0", di), lin("query_projector.1", di, di)
    ln("key_projector.0", dv), lin("key_projector.1", di, dv)
    ln("val_projector.0", dv), lin("val_projector.1", di, dv)
    lin("LongCLIP_projector.0", q, 1)
    lin("CLIP_VIP_projector.0", dv, dv)
    ln("tokenizer_projector.0", di), lin("tokenizer_projector.1", dl, di), lin("tokenizer_projector.3", dl, dl)
    return {prefix + k: v for k, v in sd.items()}


def gemma_model(config: HiLightConfig, hidden_act: str, seed: int = 0) -> GemmaForCausalLM:
    torch.manual_seed(seed)
    gemma_cfg = config.llm.to_gemma()
    gemma_cfg.hidden_act = hidden_act
    model = GemmaForCausalLM(gemma_cfg).eval()
    with torch.no_grad():  # larger than the default init so the logits are far from uniform
        for p in model.parameters():
            p.normal_(0, 0.3) if p.dim() > 1 else p.normal_(0, 0.1)
    return model


def write_gemma_dir(path: Path, config: HiLightConfig, tokenizer, seed: int = 0) -> GemmaForCausalLM:
    """A transformers Gemma directory (``save_pretrained``) with tokenizer files."""
    model = gemma_model(config, "gelu_pytorch_tanh", seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


def write_merged_dir(
    path: Path, config: HiLightConfig, seed: int = 0, file_format: str = "safetensors", shard: bool = True,
    with_towers: bool = True,
) -> tuple[GemmaForCausalLM, dict]:
    """A released ``HiLight-2B-LoRA-Merge-*`` directory: Gemma keys plus ``model.token_mining.*``
    (and, as in stage-1 trainer checkpoints, tower keys), ``model_type: hilight_gemma``."""
    path.mkdir(parents=True)
    model = gemma_model(config, "gelu", seed)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    tm = token_mining_state(config.token_mining, seed + 1, prefix="model.token_mining.")
    state.update(tm)
    if with_towers:
        state["model.vision_tower.vision_tower.model.vision_model.pre_layrnorm.weight"] = torch.ones(4)
        state["model.vision_tower_aux.vision_tower.visual.proj"] = torch.ones(4, 2)
    hf = model.config.to_dict()
    hf.update(model_type="hilight_gemma", architectures=["HiLightGemmaForCausalLM"], hidden_act="gelu",
              mm_vision_tower="model_zoo/CLIP-ViP/pretrain_clipvip_base_16.pt",
              mm_vision_tower_aux="model_zoo/Long-CLIP/longclip-B.pt", torch_dtype="float32")
    (path / "config.json").write_text(json.dumps(hf))
    if file_format == "safetensors":
        save_torch_state_dict(state, path, max_shard_size=20_000 if shard else "5GB")
    else:
        torch.save(state, path / "pytorch_model.bin")
    return model, {k.removeprefix("model.token_mining."): v for k, v in tm.items()}
