"""The VLM training recipe: setup, train loop, save, cleanup.

One recipe serves every stage; the stage is the config's ``trainable`` flags plus ``lora``:

- stage 1: ``trainable.token_mining`` only;
- stage 2: ``lora.enabled`` (LoRA on every Gemma linear layer), TokenMining frozen or trained
  together with it; or ``trainable.llm`` for a full fine-tune of small models.

Where the data carries each video's ball tracks (``data.facts``), a training-only head can
also predict every frame's facts from that frame's TokenMining outputs (``frame_facts_weight``);
with ``lm_weight`` 0 that is the whole loss and the LLM never runs.

The loop itself (accelerate, checkpoints, resume, metrics) is :func:`hilight.loop.fit`.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from hilight.checkpoint import load_checkpoint, replace_dir, save_checkpoint
from hilight.config import TrainConfig
from hilight.data import FeatureCache, VideoQADataset, collate_samples, encode_records, read_records, tower_identity
from hilight.loop import finish, fit, make_accelerator
from hilight.model import HiLight, TowerOutputs
from hilight.text import IGNORE_INDEX, ChatTokenizer

log = logging.getLogger(__name__)

ADAPTER_EXTRA = "extra_weights.safetensors"  # non-LoRA weights trained with the adapter (TokenMining)
FACTS_HEAD = "frame_facts_head.safetensors"  # the training-only frame-facts head, for the next stage
READOUT_HEADS, READOUT_DIM = 4, 32  # the attention readout of the frame-facts head: heads, width per head


class MinedFacts(nn.Module):
    """Training-only head: from the Q TokenMining outputs of each frame, which objects the
    frame shows (logits) and where (fractions of the frame). It gives TokenMining a signal that
    needs the video even while the LLM cannot use one yet; it is never part of the model.

    ``per_slot`` (one query slot per object, Q == C): slot k alone says whether object k is
    shown and where, so each of a frame's visual tokens stands for one named ball.

    ``attention``: each object is read the way an LLM attention head can read it: a learned
    query per object and head attends over the frame's Q tokens (RMS-normalised, as the LLM
    sees them) and the attended values say whether it is there and where. The readout cannot
    tell the slots apart by their order, so TokenMining must put an object's facts where its
    content can find them (the default reads all Q tokens side by side, slot order included)."""

    def __init__(self, names: list[str], queries_per_frame: int, llm_dim: int, per_slot: bool = False,
                 attention: bool = False):
        super().__init__()
        if per_slot and queries_per_frame != len(names):
            raise ValueError(f"per-slot frame facts need one query per object: {queries_per_frame} queries per "
                             f"frame, {len(names)} objects ({', '.join(names)})")
        if per_slot and attention:
            raise ValueError("frame facts are read per slot or by attention, not both")
        self.names = names
        self.queries_per_frame = queries_per_frame
        self.per_slot = per_slot
        self.attention = attention
        if per_slot:
            self.slot_weight = nn.Parameter(torch.randn(len(names), llm_dim, 3) / math.sqrt(llm_dim))
            self.slot_bias = nn.Parameter(torch.zeros(len(names), 3))
        elif attention:
            width = READOUT_HEADS * READOUT_DIM
            self.keys = nn.Linear(llm_dim, width, bias=False)
            self.values = nn.Linear(llm_dim, width, bias=False)
            self.object_queries = nn.Parameter(torch.randn(len(names), READOUT_HEADS, READOUT_DIM))
            self.object_out = nn.Parameter(torch.randn(len(names), width, 3) / math.sqrt(width))
            self.object_bias = nn.Parameter(torch.zeros(len(names), 3))
        else:
            self.head = nn.Linear(queries_per_frame * llm_dim, 3 * len(names))

    def predict(self, video_embeds: torch.Tensor) -> torch.Tensor:
        """``video_embeds`` [V, T*Q, D] -> [V, T, 3, C]: presence logit, x, y of every object."""
        v, tq, d = video_embeds.shape
        if self.per_slot:
            slots = video_embeds.float().view(v, tq // self.queries_per_frame, self.queries_per_frame, d)
            return (torch.einsum("vtcd,cdk->vtck", slots, self.slot_weight) + self.slot_bias).transpose(2, 3)
        if self.attention:
            slots = F.rms_norm(video_embeds.float(), (d,)).view(v, tq // self.queries_per_frame, self.queries_per_frame, d)
            keys = self.keys(slots).unflatten(-1, (READOUT_HEADS, READOUT_DIM))  # [V, T, Q, H, E]
            values = self.values(slots).unflatten(-1, (READOUT_HEADS, READOUT_DIM))
            weights = (torch.einsum("vtqhe,che->vtchq", keys, self.object_queries) / math.sqrt(READOUT_DIM)).softmax(-1)
            read = torch.einsum("vtchq,vtqhe->vtche", weights, values).flatten(-2)  # [V, T, C, H*E]
            return (torch.einsum("vtcf,cfk->vtck", read, self.object_out) + self.object_bias).transpose(2, 3)
        frames = video_embeds.reshape(v, tq // self.queries_per_frame, self.queries_per_frame * d)
        return self.head(frames.float()).view(v, -1, 3, len(self.names))

    def loss(self, video_embeds: torch.Tensor, present: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
        """``video_embeds`` [V, T*Q, D]; ``present`` [V, T, C] in {0, 1}; ``xy`` [V, T, C, 2]."""
        out = self.predict(video_embeds)  # [V, T, 3, C]
        loss = F.binary_cross_entropy_with_logits(out[:, :, 0], present)
        shown = present > 0
        if shown.any():  # positions only of the objects a frame shows
            loss = loss + (out[:, :, 1:].permute(0, 1, 3, 2)[shown] - xy[shown]).abs().mean()
        return loss

    def save(self, path: Path) -> None:
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, path,
                  metadata={"names": json.dumps(self.names)})

    @classmethod
    def saved(cls, path: Path, names: list[str], queries_per_frame: int, llm_dim: int) -> MinedFacts:
        """The head saved at ``path``, of whichever kind it was trained (for reading it back)."""
        with safe_open(str(path), "pt") as f:
            keys = set(f.keys())
        head = cls(names, queries_per_frame, llm_dim, per_slot="slot_weight" in keys, attention="object_queries" in keys)
        if not head.load_if_matching(path):
            raise ValueError(f"{path}: a frame-facts head for other objects or sizes")
        return head

    def load_if_matching(self, path: Path) -> bool:
        """Continue a previous stage's head (same objects and shapes); False if there is none."""
        if not path.is_file():
            return False
        with safe_open(str(path), "pt") as f:
            names = json.loads((f.metadata() or {}).get("names", "[]"))
        state = load_file(path)
        mine = self.state_dict()
        if names != self.names or set(state) != set(mine) or any(state[k].shape != v.shape for k, v in mine.items()):
            log.warning("%s: a frame-facts head for other objects or sizes; starting a fresh one", path)
            return False
        self.load_state_dict(state)
        return True


def read_facts(files: list[str], video_dir: Path, video_cfg) -> tuple[list[str], dict[Path, tuple]]:
    """Every video's frame-facts targets (``present`` [T, C], ``xy`` [T, C, 2]) from JSON lists
    of ``{"video", "tracks"}``, for the frames the model is shown."""
    from hilight.align import frame_facts

    tracks: dict[Path, dict] = {}
    for file in files:
        for n, rec in enumerate(read_records(file)):
            if not isinstance(rec, dict) or not isinstance(rec.get("video"), str) or not isinstance(rec.get("tracks"), dict):
                raise ValueError(f"{file}: record {n} has no 'video' name and 'tracks'")
            tracks[video_dir / rec["video"]] = rec["tracks"]
    names = sorted({name for t in tracks.values() for name in t["names"]})
    table = {}
    for video, t in tracks.items():
        try:
            f = frame_facts(t, names, video_cfg, grid=1)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(f"{video.name}: malformed tracks ({exc})") from None
        table[video] = (f["present"], f["xy"])
    return names, table


class FactsTrainee(nn.Module):
    """The model plus the frame-facts head; one forward gives the stage's weighted loss."""

    def __init__(self, model: HiLight, facts: MinedFacts, lm_weight: float, facts_weight: float):
        super().__init__()
        self.model = model
        self.facts = facts
        self.lm_weight = lm_weight
        self.facts_weight = facts_weight

    def forward(self, batch: dict, present: torch.Tensor | None, xy: torch.Tensor | None) -> torch.Tensor:
        towers = batch.get("towers")
        if towers is None and "pixel_values" in batch:
            towers = self.model.encode_videos(batch["pixel_values"])
        embeds = self.model.video_embeddings(towers) if towers is not None else None
        loss = torch.zeros((), device=batch["input_ids"].device)
        if embeds is not None and present is not None:
            loss = loss + self.facts_weight * self.facts.loss(embeds, present, xy)
        if self.lm_weight:
            out = self.model(batch["input_ids"], batch["attention_mask"], batch["labels"], video_embeds=embeds)
            loss = loss + self.lm_weight * out.loss
        return loss


def apply_lora(model: HiLight, cfg) -> None:
    """Wrap the LLM with peft LoRA. Only ``model.llm`` is wrapped, so TokenMining's trainability
    stays under our control (it can train together with the adapter)."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias="none",
                      target_modules=list(cfg.target_modules), task_type="CAUSAL_LM")
    model.llm = get_peft_model(model.llm, lora)


def set_stage(model: HiLight, cfg: TrainConfig) -> None:
    model.set_trainable(cfg.trainable)
    if cfg.lora.enabled:
        apply_lora(model, cfg.lora)  # peft freezes the LLM's base weights, trains lora_*
    if cfg.gradient_checkpointing:
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.llm.config.use_cache = False


def save_final(model: HiLight, tokenizer, cfg: TrainConfig, out: Path) -> Path:
    """A plain HiLight checkpoint, or for LoRA an adapter directory (peft format) plus the
    other weights trained with it, for ``hilight merge-lora``."""
    if not cfg.lora.enabled:
        return save_checkpoint(model, out, tokenizer)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.llm.save_pretrained(tmp)
        extra = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters()
                 if p.requires_grad and not n.startswith("llm.")}
        save_file(extra, tmp / ADAPTER_EXTRA)
        (tmp / "hilight_base.json").write_text(json.dumps({"base": cfg.model}) + "\n")
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _dataset(path: str, cfg: TrainConfig, chat: ChatTokenizer, model: HiLight, cache: FeatureCache | None):
    samples, bad = encode_records(read_records(path), Path(cfg.data.videos), chat, cfg.max_length, cfg.truncation)
    return VideoQADataset(samples, model.config.video, cache, bad)


def _to(batch: dict, device) -> dict:
    out = {}
    for k, v in batch.items():
        out[k] = TowerOutputs(v.video.to(device), v.image.to(device)) if isinstance(v, TowerOutputs) else v.to(device)
    return out


def train(cfg: TrainConfig, resume: bool = False) -> dict:
    """Run one stage; returns a summary (final loss, steps, bad samples, paths)."""
    accelerator = make_accelerator(cfg)
    out_dir = Path(cfg.output_dir)
    model, tokenizer = load_checkpoint(cfg.model)
    chat = ChatTokenizer(tokenizer, model.config.tokens_per_video)
    cache = FeatureCache(cfg.data.cache, tower_identity(model)) if cfg.data.cache else None
    train_set = _dataset(cfg.data.train, cfg, chat, model, cache)
    val_set = _dataset(cfg.data.val, cfg, chat, model, cache) if cfg.data.val else None
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        bad = [asdict(b) for b in train_set.bad]
        (out_dir / "bad_samples.json").write_text(json.dumps(bad, indent=1) + "\n")
        log.info("%d training samples, %d excluded (see %s)", len(train_set), len(bad), out_dir / "bad_samples.json")
    if len(train_set) == 0:
        raise ValueError(f"{cfg.data.train}: no usable training sample ({len(train_set.bad)} excluded)")
    set_stage(model, cfg)
    trainee, table = model, None
    if cfg.frame_facts_weight:
        names, table = read_facts(cfg.data.facts, Path(cfg.data.videos), model.config.video)
        missing = [v for s in train_set.samples for v in s.videos if v not in table]
        if missing:
            raise ValueError(f"{', '.join(cfg.data.facts)}: no ball tracks for {missing[0].name} "
                             f"({len(set(missing))} training video(s) without)")
        head = MinedFacts(names, model.config.token_mining.queries_per_frame, model.config.llm.hidden_size,
                          per_slot=cfg.frame_facts_per_slot, attention=cfg.frame_facts_attention)
        if head.load_if_matching(Path(cfg.model) / FACTS_HEAD):
            log.info("frame-facts head continued from %s", cfg.model)
        trainee = FactsTrainee(model, head, cfg.lm_weight, cfg.frame_facts_weight)

    def targets(samples) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        videos = [v for s in samples for v in s.videos]
        if table is None or not videos or any(v not in table for v in videos):
            return None, None
        device = accelerator.device
        return (torch.stack([table[v][0] for v in videos]).to(device), torch.stack([table[v][1] for v in videos]).to(device))

    def loss_of(module, dataset, indices: list[int]) -> torch.Tensor:
        batch = _to(collate_samples([dataset[i] for i in indices], chat.pad_id), accelerator.device)
        if table is None:
            return module(**batch).loss
        return module(batch, *targets([dataset.samples[i] for i in indices]))

    def validate(module) -> float:
        total, count = 0.0, 0
        for start in range(0, len(val_set), cfg.batch_size):
            indices = list(range(start, min(len(val_set), start + cfg.batch_size)))
            if cfg.lm_weight:  # the language-model loss per answer token, comparable across runs
                batch = _to(collate_samples([val_set[i] for i in indices], chat.pad_id), accelerator.device)
                n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
                lm = module.model if isinstance(module, FactsTrainee) else module
                total, count = total + lm(**batch).loss.item() * n, count + n
            else:  # facts only: the frame-facts loss of the samples with tracks
                present, _ = targets([val_set.samples[i] for i in indices])
                if present is not None:
                    total, count = total + loss_of(module, val_set, indices).item() * len(indices), count + len(indices)
        return total / max(count, 1)

    result = fit(cfg, accelerator, trainee, len(train_set), lambda m, idx: loss_of(m, train_set, idx),
                 lambda i: train_set.samples[i].id, validate if val_set is not None and len(val_set) else None, resume)
    final = out_dir / "final"
    if accelerator.is_main_process:
        trained = result["model"]
        save_final(trained.model if isinstance(trained, FactsTrainee) else trained, tokenizer, cfg, final)
        if isinstance(trained, FactsTrainee):
            trained.facts.save(final / FACTS_HEAD)
    finish(accelerator)
    return {"final_loss": result["final_loss"], "steps": result["steps"], "samples": len(train_set),
            "excluded": len(train_set.bad), "final": str(final), "world_size": result["world_size"]}


def merge_lora(base: Path, adapter: Path, out: Path) -> Path:
    """Base checkpoint + LoRA adapter (+ weights trained with it) -> a plain checkpoint."""
    from peft import PeftModel

    from hilight.checkpoint import CheckpointError

    model, tokenizer = load_checkpoint(base)
    model.llm = PeftModel.from_pretrained(model.llm, str(adapter)).merge_and_unload()
    extra_file = adapter / ADAPTER_EXTRA
    if extra_file.is_file():
        extra = load_file(extra_file)
        params = dict(model.named_parameters())
        unknown = sorted(set(extra) - set(params))
        if unknown:
            raise CheckpointError(f"{extra_file}: unknown weights {unknown[:5]}")
        with torch.no_grad():
            for name, value in extra.items():
                if params[name].shape != value.shape:
                    raise CheckpointError(f"{extra_file}: {name} has shape {list(value.shape)}, "
                                          f"the model {list(params[name].shape)}")
                params[name].copy_(value)
    return save_checkpoint(model, out, tokenizer)
