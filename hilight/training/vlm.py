"""The VLM training recipe: setup, train loop, save, cleanup.

One recipe serves every stage; the stage is the config's ``trainable`` flags plus ``lora``:

- stage 1: ``trainable.token_mining`` only;
- stage 2: ``lora.enabled`` (LoRA on every Gemma linear layer), TokenMining frozen or trained
  together with it; or ``trainable.llm`` for a full fine-tune of small models.

An auxiliary objective (``auxiliary``, :mod:`hilight.training.objectives`) can add a loss on
the videos' TokenMining outputs; with ``lm_weight`` 0 it is the whole loss and the LLM never runs.

The loop itself (accelerate, checkpoints, resume, metrics) is :func:`hilight.training.loop.fit`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from hilight.checkpoint import load_checkpoint, save_checkpoint
from hilight.config import TrainConfig
from hilight.data import (
    BadSample,
    FeatureCache,
    VideoQADataset,
    collate_samples,
    encode_records,
    read_records,
    tower_identity,
)
from hilight.errors import CheckpointError, DataError, HiLightError
from hilight.files import atomic_dir
from hilight.model import HiLight, TowerOutputs
from hilight.text import IGNORE_INDEX, ChatTokenizer
from hilight.training.loop import finish, fit, make_accelerator
from hilight.training.objectives import objective_class

log = logging.getLogger(__name__)

ADAPTER_EXTRA = "extra_weights.safetensors"  # non-LoRA weights trained with the adapter (TokenMining)


class WithAuxiliary(nn.Module):
    """The model plus an auxiliary objective; one forward gives the stage's weighted loss."""

    def __init__(self, model: HiLight, auxiliary: nn.Module, lm_weight: float, auxiliary_weight: float):
        super().__init__()
        self.model = model
        self.auxiliary = auxiliary
        self.lm_weight = lm_weight
        self.auxiliary_weight = auxiliary_weight

    def forward(self, batch: dict, targets: dict | None) -> torch.Tensor:
        towers = batch.get("towers")
        if towers is None and "pixel_values" in batch:
            towers = self.model.encode_videos(batch["pixel_values"])
        embeds = self.model.video_embeddings(towers) if towers is not None else None
        loss = torch.zeros((), device=batch["input_ids"].device)
        if embeds is not None and targets is not None:
            targets = dict(targets)
            rows = targets.pop("rows")  # the blocks the objective has targets for (not a video's segments)
            loss = loss + self.auxiliary_weight * self.auxiliary.loss(embeds[rows], targets)
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
    with atomic_dir(out) as tmp:
        model.llm.save_pretrained(tmp)
        extra = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters()
                 if p.requires_grad and not n.startswith("llm.")}
        save_file(extra, tmp / ADAPTER_EXTRA)
        (tmp / "hilight_base.json").write_text(json.dumps({"base": cfg.model}) + "\n")
    return out


def _dataset(path: str, cfg: TrainConfig, chat: ChatTokenizer, model: HiLight, cache: FeatureCache | None):
    samples, bad = encode_records(read_records(path), Path(cfg.data.videos), chat, cfg.max_length, cfg.truncation,
                                  model.config.video)
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
        raise DataError(f"{cfg.data.train}: no usable training sample ({len(train_set.bad)} excluded)")
    set_stage(model, cfg)
    trainee = model
    auxiliary = None
    if cfg.auxiliary.objective:
        auxiliary = objective_class(cfg.auxiliary.objective)(cfg.auxiliary.data, Path(cfg.data.videos), model.config)
        missing = auxiliary.missing([v for s in train_set.samples for v, f in s.blocks() if f is None])
        if missing:
            raise DataError(f"{', '.join(cfg.auxiliary.data)}: no auxiliary targets for {missing[0].name} "
                            f"({len(set(missing))} training video(s) without)")
        if auxiliary.load(Path(cfg.model)):
            log.info("auxiliary head continued from %s", cfg.model)
        trainee = WithAuxiliary(model, auxiliary, cfg.lm_weight, cfg.auxiliary.weight)

    def targets(samples) -> dict | None:
        """The objective's targets for the blocks of whole videos (segments of a sampled video
        have none), and ``rows``: where those blocks are among the batch's."""
        blocks = [b for s in samples for b in s.blocks()]
        rows = [i for i, (_, frames) in enumerate(blocks) if frames is None]
        found = auxiliary.targets([blocks[i][0] for i in rows]) if rows else None
        if found is None:
            return None
        return {**{k: v.to(accelerator.device) for k, v in found.items()},
                "rows": torch.tensor(rows, device=accelerator.device)}

    def load(dataset, indices: list[int]) -> tuple[list[int], list]:
        """The samples of ``indices`` that load; one whose video does not decode (found only now
        without a feature cache) is excluded from the run, listed in bad_samples.json."""
        kept, items = [], []
        for i in indices:
            try:
                items.append(dataset[i])
                kept.append(i)
            except HiLightError as exc:
                exclude(dataset, i, exc)
        return kept, items

    def exclude(dataset, i: int, exc: HiLightError) -> None:
        sample = dataset.samples[i]
        if any(b.id == sample.id for b in dataset.bad):
            return
        log.warning("sample %s excluded: %s", sample.id, exc)
        dataset.bad.append(BadSample(sample.id, str(exc)))
        if accelerator.is_main_process and dataset is train_set:
            (out_dir / "bad_samples.json").write_text(json.dumps([asdict(b) for b in dataset.bad], indent=1) + "\n")

    def loss_of(module, dataset, indices: list[int]) -> torch.Tensor:
        kept, items = load(dataset, indices)
        if not items:  # every sample of the batch failed: a step with no gradient
            return torch.zeros((), device=accelerator.device, requires_grad=True)
        batch = _to(collate_samples(items, chat.pad_id), accelerator.device)
        if auxiliary is None:
            return module(**batch).loss
        return module(batch, targets([dataset.samples[i] for i in kept]))

    def validate(module) -> float:
        total, count = 0.0, 0
        for start in range(0, len(val_set), cfg.batch_size):
            indices = list(range(start, min(len(val_set), start + cfg.batch_size)))
            if cfg.lm_weight:  # the language-model loss per answer token, comparable across runs
                _, items = load(val_set, indices)
                if not items:
                    continue
                batch = _to(collate_samples(items, chat.pad_id), accelerator.device)
                n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
                lm = module.model if isinstance(module, WithAuxiliary) else module
                total, count = total + lm(**batch).loss.item() * n, count + n
            else:  # the auxiliary loss alone, of the samples it has targets for
                if targets([val_set.samples[i] for i in indices]) is not None:
                    total, count = total + loss_of(module, val_set, indices).item() * len(indices), count + len(indices)
        return total / max(count, 1)

    result = fit(cfg, accelerator, trainee, len(train_set), lambda m, idx: loss_of(m, train_set, idx),
                 lambda i: train_set.samples[i].id, validate if val_set is not None and len(val_set) else None,
                 resume, [len(s.encoded) for s in train_set.samples])
    final = out_dir / "final"
    if accelerator.is_main_process:
        trained = result["model"]
        save_final(trained.model if isinstance(trained, WithAuxiliary) else trained, tokenizer, cfg, final)
        if isinstance(trained, WithAuxiliary):
            trained.auxiliary.save(final)
    finish(accelerator)
    return {"final_loss": result["final_loss"], "steps": result["steps"], "samples": len(train_set),
            "excluded": len(train_set.bad), "final": str(final), "world_size": result["world_size"]}


def merge_lora(base: Path, adapter: Path, out: Path) -> Path:
    """Base checkpoint + LoRA adapter (+ weights trained with it) -> a plain checkpoint."""
    from peft import PeftModel

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
