"""CLIP-ViP+: video-text alignment of the video tower (the report's first stage).

Losses (weights, threshold and mask policy are config values):

1. **Global**: symmetric InfoNCE between the pooled video embedding (CLS -> post-LN ->
   projection) and the pooled caption embedding (EOS state -> projection), with a learned
   temperature.
2. **Local (SPARC, Bica et al. 2024)**: for each (video, caption) pair, token-to-patch
   similarities ``s[j, k] = <t_j, v_k>`` are min-max normalised over patches, values below a
   threshold (default ``1 / #patches``) are zeroed, and the rest, renormalised, weight the
   patches into one language-grouped visual embedding ``c_j`` per token. A per-pair
   token-level contrastive loss then pulls ``c_j`` towards ``t_j`` against the caption's other
   tokens, in both directions.
3. **Language mask**: the local loss only uses content tokens: never padding; with
   ``language_mask`` also no special tokens, punctuation or configured stop words, so the
   loss concentrates on words such as colours and pockets.
4. **Auxiliary** (optional, ``auxiliary``): an objective of the recipe's on the tower's
   outputs, its targets read from the caption records (:mod:`hilight.training.objectives`).
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from hilight.checkpoint import CheckpointError, load_checkpoint, load_state_strict, read_config, save_checkpoint
from hilight.config import AlignConfig, AlignLossConfig, TextTowerConfig, VideoInputConfig, from_dict
from hilight.convert import clipvip_aligner_state
from hilight.data import FeatureCache
from hilight.errors import DataError
from hilight.model.clip_vip import CLIPViPVideoTower
from hilight.model.long_clip import LongCLIPImageTower
from hilight.training.loop import finish, fit, make_accelerator
from hilight.training.objectives import objective_class
from hilight.video import VideoError, load_video

log = logging.getLogger(__name__)

TEXT_WEIGHTS = "text_tower.safetensors"
ALIGN_META = "align.json"


class TextTower(nn.Module):
    """transformers' CLIP text transformer plus a projection; pooled at the EOS token."""

    def __init__(self, cfg: TextTowerConfig, pad_id: int, bos_id: int, eos_id: int):
        super().__init__()
        self.cfg = cfg
        self.encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
            max_position_embeddings=cfg.max_positions, hidden_act="quick_gelu", layer_norm_eps=cfg.layer_norm_eps,
            projection_dim=cfg.projection_dim, pad_token_id=pad_id, bos_token_id=bos_id, eos_token_id=eos_id))
        self.text_projection = nn.Linear(cfg.hidden_size, cfg.projection_dim, bias=False)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected token embeddings [B, L, d] and pooled caption embeddings [B, d]."""
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, L, H], final LN applied
        tokens = self.text_projection(hidden)  # [B, L, d]
        eos = mask.long().sum(-1) - 1  # captions are right-padded and end with EOS
        return tokens, tokens[torch.arange(len(ids)), eos]


@dataclass
class VisualOutputs:
    pooled: torch.Tensor  # [B, d] projected video embedding
    patches: torch.Tensor  # [B, T*L, d] projected patch embeddings
    patch_states: torch.Tensor  # [B, T, L, D] normalised patch states (what TokenMining reads)
    frames: torch.Tensor  # [B, T, F] one vector per frame


class VideoTextAligner(nn.Module):
    """A visual tower and a text tower with a learned temperature. The visual tower is the
    CLIP-ViP video tower or, for the Long-CLIP role, the image tower run on every frame (its
    video embedding is the mean of the frames' projected CLS, its patches those of all frames)."""

    def __init__(self, video_tower: CLIPViPVideoTower | LongCLIPImageTower, text: TextTower,
                 auxiliary: nn.Module | None = None, auxiliary_weight: float = 0.0):
        super().__init__()
        self.video_tower = video_tower
        self.text = text
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.auxiliary = auxiliary
        self.auxiliary_weight = auxiliary_weight

    def forward(self, pixels, ids, mask, local, cfg: AlignLossConfig, targets: dict | None = None) -> torch.Tensor:
        """The weighted global + local (+ auxiliary) loss of one batch of matching (video, caption) pairs."""
        out = self.visual(pixels)
        tokens, text = self.text(ids, mask)
        loss = cfg.global_weight * global_loss(out.pooled, text, self.logit_scale)
        if cfg.local_weight:
            loss = loss + cfg.local_weight * sparc_loss(tokens, out.patches, local, cfg.threshold,
                                                        cfg.local_temperature)
        if self.auxiliary is not None and targets is not None:
            loss = loss + self.auxiliary_weight * self.auxiliary.loss(out, targets)
        return loss

    def visual(self, pixels: torch.Tensor) -> VisualOutputs:
        b, t = pixels.shape[:2]
        tower = self.video_tower
        if isinstance(tower, LongCLIPImageTower):
            states = tower.normalized(tower.tokens(pixels.flatten(0, 1)))  # [B*T, 1+L, D]
            projected = tower.projection(states).view(b, t, states.shape[1], -1)  # [B, T, 1+L, d]
            return VisualOutputs(projected[:, :, 0].mean(1), projected[:, :, 1:].flatten(1, 2),
                                 states[:, 1:].view(b, t, states.shape[1] - 1, -1), projected[:, :, 0])
        states = tower.normalized(tower(pixels))  # [B, M + T*L, D]
        projected = tower.projection(states)  # [B, M + T*L, d]
        m = tower.cfg.num_proxy_tokens
        patch_states = states[:, m:].view(b, t, -1, states.shape[-1])  # [B, T, L, D]
        return VisualOutputs(projected[:, 0], projected[:, m:], patch_states, patch_states.mean(2))

    def encode_video(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled [B, d] and per-patch [B, T*L, d] embeddings (proxy / CLS tokens excluded)."""
        out = self.visual(pixels)
        return out.pooled, out.patches


def global_loss(video: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over the batch; matching pairs share an index."""
    logits = logit_scale.clamp(max=math.log(100)).exp() * F.normalize(video, dim=-1) @ F.normalize(text, dim=-1).T
    target = torch.arange(len(video), device=video.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def sparc_weights(tokens: torch.Tensor, patches: torch.Tensor, threshold: float) -> torch.Tensor:
    """Alignment weights [B, L, P]: similarities min-max normalised over patches, sparsified
    below ``threshold`` (0 means 1 / P), renormalised to sum to one per token."""
    sim = tokens @ patches.transpose(1, 2)  # [B, L, P]
    low, high = sim.amin(-1, keepdim=True), sim.amax(-1, keepdim=True)
    sim = (sim - low) / (high - low).clamp_min(1e-6)  # [0, 1] per token
    cut = threshold or 1.0 / patches.shape[1]
    sim = torch.where(sim >= cut, sim, torch.zeros_like(sim))
    return sim / sim.sum(-1, keepdim=True).clamp_min(1e-6)


def sparc_loss(tokens: torch.Tensor, patches: torch.Tensor, mask: torch.Tensor, threshold: float,
               temperature: float) -> torch.Tensor:
    """Fine-grained loss of SPARC for [B, L, d] tokens, [B, P, d] patches and a [B, L] mask of
    the tokens that take part."""
    grouped = sparc_weights(tokens, patches, threshold) @ patches  # [B, L, d] language-grouped visual embeddings
    g, t = F.normalize(grouped, dim=-1), F.normalize(tokens, dim=-1)
    logits = g @ t.transpose(1, 2) / temperature  # [B, L, L]: grouped j vs token r of the same caption
    valid = mask.bool()
    pair_ok = valid[:, :, None] & valid[:, None, :]
    logits = logits.masked_fill(~pair_ok, float("-inf"))
    eye = torch.eye(logits.shape[1], dtype=torch.bool, device=logits.device)
    g2t = -(torch.log_softmax(logits, dim=2).masked_select(eye & valid[:, :, None]))  # grouped -> token
    t2g = -(torch.log_softmax(logits, dim=1).masked_select(eye & valid[:, :, None]))  # token -> grouped
    return (g2t.mean() + t2g.mean()) / 2


class CaptionTokenizer:
    """Captions -> [BOS] tokens [EOS] ids, padding, and the language mask of content tokens."""

    def __init__(self, tokenizer, max_positions: int, stop_words: list[str]):
        self.tok = tokenizer
        self.max_positions = max_positions
        self.stop_words = {w.lower() for w in stop_words}
        self.special = set(tokenizer.all_special_ids)
        self._content: dict[int, bool] = {}

    def is_content(self, token_id: int) -> bool:
        if token_id not in self._content:
            word = re.sub(r"[^a-z0-9]", "", self.tok.decode([token_id]).strip().lower())
            self._content[token_id] = token_id not in self.special and bool(word) and word not in self.stop_words
        return self._content[token_id]

    def __call__(self, captions: list[str], language_mask: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ids [B, L], attention mask [B, L], local-loss mask [B, L]."""
        rows = []
        for text in captions:
            body = self.tok(text, add_special_tokens=False)["input_ids"][: self.max_positions - 2]
            rows.append([self.tok.bos_token_id, *body, self.tok.eos_token_id])
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        local = torch.zeros_like(ids, dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
            local[i, : len(r)] = torch.tensor([self.is_content(t) if language_mask else True for t in r])
        return ids, mask, local


class Clips:
    """Caption pairs with their frames, decoded once (memory, or a safetensors cache on disk)."""

    def __init__(self, path: str, videos: str, video_cfg: VideoInputConfig, cache_dir: str):
        records = json.loads(Path(path).read_text())
        self.video_cfg = video_cfg
        self.cache = FeatureCache(cache_dir, json.dumps(asdict(video_cfg), sort_keys=True)) if cache_dir else None
        self.path = path
        self.pairs, self.records, self.bad = [], [], []
        for rec in records:
            video = Path(videos) / rec["video"]
            try:
                self._frames(video)
                self.pairs.append((video, rec["caption"]))
                self.records.append(rec)
            except VideoError as exc:
                self.bad.append(str(exc))
                log.warning("skipped %s", exc)
        self._memory: dict[Path, torch.Tensor] = {}

    def _frames(self, video: Path) -> torch.Tensor:
        """A clip's preprocessed frames in fp16 (as the disk cache keeps them)."""
        if self.cache is not None and self.cache.has(video):
            return self.cache.load_tensors(video)["frames"].half()
        frames = load_video(video, self.video_cfg).half()
        if self.cache is not None:
            self.cache.store_tensors(video, {"frames": frames})
        return frames

    def frames(self, i: int) -> torch.Tensor:
        """Clip ``i``'s frames [T, 3, H, W] in fp32; kept in memory in fp16 (half the memory)."""
        video = self.pairs[i][0]
        if video not in self._memory:
            self._memory[video] = self._frames(video)
        return self._memory[video].float()

    def __len__(self) -> int:
        return len(self.pairs)


def build_aligner(cfg: AlignConfig, train_set: Clips | None = None, val_set: Clips | None = None):
    """The checkpoint's model and tokenizer, and an aligner around the tower being aligned
    (with ``cfg.auxiliary``'s objective, built from the training clips' records)."""
    model, tokenizer = load_checkpoint(cfg.model)
    if len(tokenizer) > cfg.text_tower.vocab_size:
        raise CheckpointError(f"{cfg.model}: tokenizer has {len(tokenizer)} tokens, text_tower.vocab_size is "
                              f"{cfg.text_tower.vocab_size}")
    text = TextTower(cfg.text_tower, tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    tower = model.video_tower if cfg.tower == "video" else model.image_tower
    auxiliary = None
    if cfg.auxiliary.objective and train_set is not None:
        try:
            auxiliary = objective_class(cfg.auxiliary.objective)(
                train_set.records, val_set.records if val_set is not None else None, tower, model.config.video)
        except DataError as exc:
            raise DataError(f"{cfg.data.train}: {exc}") from None
    aligner = VideoTextAligner(tower, text, auxiliary, cfg.auxiliary.weight)
    if cfg.text_init:  # the text tower (and temperature) start from pretrain_clipvip_base_16.pt
        load_state_strict(aligner, clipvip_aligner_state(Path(cfg.text_init)), where=cfg.text_init)
    return model, tokenizer, aligner


def align(cfg: AlignConfig, resume: bool = False) -> dict:
    """Train the video tower (and a text tower) on caption pairs; writes ``final/`` (a HiLight
    checkpoint with the aligned video tower, plus the text tower for retrieval)."""
    accelerator = make_accelerator(cfg)
    video_cfg = read_config(cfg.model).video
    train_set = Clips(cfg.data.train, cfg.data.videos, video_cfg, cfg.data.frames_cache)
    val_set = Clips(cfg.data.val, cfg.data.videos, video_cfg, cfg.data.frames_cache) if cfg.data.val else None
    if len(train_set) < 2:
        raise DataError(f"{cfg.data.train}: need at least 2 usable caption pairs for a contrastive loss")
    model, tokenizer, aligner = build_aligner(cfg, train_set, val_set)
    aligner.requires_grad_(True)
    captions = CaptionTokenizer(tokenizer, cfg.text_tower.max_positions, cfg.loss.stop_words)

    def batch(clips: Clips, indices: list[int]):
        device = accelerator.device
        pixels = torch.stack([clips.frames(i) for i in indices]).to(device)
        ids, mask, local = captions([clips.pairs[i][1] for i in indices], cfg.loss.language_mask)
        targets = None
        if aligner.auxiliary is not None:
            targets = {k: v.to(device) for k, v in aligner.auxiliary.targets([clips.records[i] for i in indices]).items()}
        return (pixels, ids.to(device), mask.to(device), local.to(device)), targets

    def loss_of(module, clips: Clips, indices: list[int]) -> torch.Tensor:
        inputs, targets = batch(clips, indices)
        return module(*inputs, cfg.loss, targets)

    def batch_loss(module, indices: list[int]) -> torch.Tensor:
        return loss_of(module, train_set, indices)

    def validate(module) -> float:
        size = max(2, min(cfg.batch_size, len(val_set)))  # contrastive: whole batches of at least 2
        starts = range(0, len(val_set) - size + 1, size)
        losses = [loss_of(module, val_set, list(range(s, s + size))).item() for s in starts]
        return sum(losses) / max(len(losses), 1)

    result = fit(cfg, accelerator, aligner, len(train_set), batch_loss, lambda i: train_set.pairs[i][0].name,
                 validate if val_set is not None and len(val_set) >= 2 else None, resume)
    final = Path(cfg.output_dir) / "final"
    if accelerator.is_main_process:
        trained = result["model"]
        target = model.video_tower if cfg.tower == "video" else model.image_tower
        target.load_state_dict(trained.video_tower.state_dict())
        save_checkpoint(model, final, tokenizer)
        text_state = {f"text.{k}": v.detach().contiguous() for k, v in trained.text.state_dict().items()}
        text_state["logit_scale"] = trained.logit_scale.detach().clone()
        save_file(text_state, final / TEXT_WEIGHTS)
        (final / ALIGN_META).write_text(json.dumps({"text_tower": asdict(cfg.text_tower), "tower": cfg.tower,
                                                    "max_positions": cfg.text_tower.max_positions}, indent=1) + "\n")
    finish(accelerator)
    return {"final_loss": result["final_loss"], "steps": result["steps"], "pairs": len(train_set),
            "excluded": len(train_set.bad), "final": str(final)}


def load_aligner(path: str | Path):
    """(aligner, tokenizer, video config) from an alignment output directory (``final/``)."""
    path = Path(path)
    if not (path / ALIGN_META).is_file():
        raise CheckpointError(f"{path}: no {ALIGN_META}; not the output of `hilight align`")
    model, tokenizer = load_checkpoint(path)
    meta = json.loads((path / ALIGN_META).read_text())
    text_cfg = from_dict(TextTowerConfig, meta["text_tower"])
    tower = model.image_tower if meta.get("tower") == "image" else model.video_tower
    aligner = VideoTextAligner(tower, TextTower(text_cfg, tokenizer.pad_token_id, tokenizer.bos_token_id,
                                                tokenizer.eos_token_id))
    state = load_file(path / TEXT_WEIGHTS)
    video = {f"video_tower.{k}": v for k, v in tower.state_dict().items()}
    load_state_strict(aligner, {**state, **video}, where=str(path))
    return aligner.eval(), tokenizer, model.config.video
