"""The VLM training recipe: setup, train loop, save, cleanup.

One recipe serves every stage; the stage is the config's ``trainable`` flags plus ``lora``:

- stage 1: ``trainable.token_mining`` only;
- stage 2: ``lora.enabled`` (LoRA on every Gemma linear layer), TokenMining frozen or trained
  together with it; or ``trainable.llm`` for a full fine-tune of small models.

Runs on one CPU, or on many processes / GPUs through accelerate (DDP, or DeepSpeed via an
accelerate config). Checkpoints are directories written atomically and hold everything
needed to resume exactly: trainable weights, optimizer, scheduler, RNG states and the data
position, all as safetensors + JSON (no pickle).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup

from hilight.checkpoint import load_checkpoint, save_checkpoint
from hilight.config import TrainConfig
from hilight.data import FeatureCache, VideoQADataset, collate_samples, encode_records, read_records, tower_identity
from hilight.model import HiLight
from hilight.text import ChatTokenizer

log = logging.getLogger(__name__)

ADAPTER_EXTRA = "extra_weights.safetensors"  # non-LoRA weights trained with the adapter (TokenMining)


# ---------------------------------------------------------------------------------------------
# model setup


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


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------------------------
# checkpoints (atomic directories, safetensors + JSON only)


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = opt.state_dict()
    tensors, meta = {}, {"param_groups": state["param_groups"], "scalars": {}}
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value.contiguous()
            else:
                meta["scalars"][f"{idx}.{key}"] = value
    return tensors, meta


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_training_state(path: Path, model, optimizer, scheduler, progress: dict, config: TrainConfig) -> None:
    """Write a resumable checkpoint directory atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        save_file(trainable_state(model), tmp / "trainable.safetensors")
        opt_meta = None
        if config.deepspeed:  # ZeRO shards its optimizer state in its own (pickled) format: not kept
            log.warning("DeepSpeed run: the checkpoint keeps weights, schedule, RNG and data position, "
                        "not the optimizer moments")
        else:
            opt_tensors, opt_meta = _flatten_optimizer(optimizer)
            save_file(opt_tensors, tmp / "optimizer.safetensors")
        save_file({"torch": torch.get_rng_state()}, tmp / "rng.safetensors")
        state = {"progress": progress, "optimizer": opt_meta, "scheduler": scheduler.state_dict(),
                 "python_rng": _jsonable(random.getstate()), "numpy_rng": _jsonable(np.random.get_state()),
                 "config": asdict(config)}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _jsonable(value):
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return {"ndarray": value.tolist(), "dtype": str(value.dtype)}
    return value


def _from_json(value):
    if isinstance(value, dict) and "ndarray" in value:
        return np.array(value["ndarray"], dtype=value["dtype"])
    if isinstance(value, list):
        return tuple(_from_json(v) for v in value)
    return value


def load_training_state(path: Path, model, optimizer, scheduler) -> dict:
    """Restore weights, optimizer, scheduler and RNG; returns the saved progress."""
    from hilight.checkpoint import CheckpointError

    weights = load_file(path / "trainable.safetensors")
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(weights) != expected:
        raise CheckpointError(f"{path}: trainable weights do not match this stage "
                              f"(missing {sorted(expected - set(weights))[:5]}, unexpected {sorted(set(weights) - expected)[:5]})")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    state = json.loads((path / "trainer_state.json").read_text())
    if state["optimizer"] is not None:
        optimizer.load_state_dict(_unflatten_optimizer(load_file(path / "optimizer.safetensors"), state["optimizer"]))
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(load_file(path / "rng.safetensors")["torch"])
    random.setstate(_from_json(state["python_rng"]))
    np.random.set_state(_from_json(state["numpy_rng"]))
    return state["progress"]


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint (temporary directories never count)."""
    done = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return done[-1] if done else None


def save_final(model: HiLight, tokenizer, cfg: TrainConfig, out: Path) -> Path:
    """A plain HiLight checkpoint, or for LoRA an adapter directory (peft format) plus the
    other weights trained with it, for ``hilight merge-lora``."""
    if not cfg.lora.enabled:
        return save_checkpoint(model, out, tokenizer)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    model.llm.save_pretrained(tmp)
    extra = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters()
             if p.requires_grad and not n.startswith("llm.")}
    save_file(extra, tmp / ADAPTER_EXTRA)
    (tmp / "hilight_base.json").write_text(json.dumps({"base": cfg.model}) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


# ---------------------------------------------------------------------------------------------
# the recipe


def _batches(n: int, batch_size: int, seed: int, epoch: int, rank: int, world: int) -> list[list[int]]:
    """This rank's micro-batches of one epoch: a seeded permutation, padded to a multiple of the
    world size, split round-robin so ranks never share a sample."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
    total = math.ceil(n / (batch_size * world)) * batch_size * world
    order = (order * math.ceil(total / n))[:total]
    mine = order[rank::world]
    return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]


def _dataset(path: str, cfg: TrainConfig, chat: ChatTokenizer, model: HiLight, cache: FeatureCache | None):
    samples, bad = encode_records(read_records(path), Path(cfg.data.videos), chat, cfg.max_length, cfg.truncation)
    return VideoQADataset(samples, model.config.video, cache, bad)


@torch.no_grad()
def validation_loss(model, dataset, pad_id, batch_size, accelerator) -> float:
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        batch = collate_samples([dataset[i] for i in range(start, min(len(dataset), start + batch_size))], pad_id)
        n = int((batch["labels"][:, 1:] != -100).sum())
        with accelerator.autocast():
            loss = model(**_to(batch, accelerator.device)).loss
        total, count = total + loss.item() * n, count + n
    model.train()
    return total / max(count, 1)


def _to(batch: dict, device) -> dict:
    from hilight.model import TowerOutputs

    out = {}
    for k, v in batch.items():
        out[k] = TowerOutputs(v.video.to(device), v.image.to(device)) if isinstance(v, TowerOutputs) else v.to(device)
    return out


def train(cfg: TrainConfig, resume: bool = False) -> dict:
    """Run one stage; returns a summary (final loss, steps, bad samples, paths)."""
    # ---- setup
    precision = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[cfg.precision]
    plugin = None
    if cfg.deepspeed:
        from accelerate.utils import DeepSpeedPlugin

        plugin = DeepSpeedPlugin(hf_ds_config=cfg.deepspeed, gradient_accumulation_steps=cfg.grad_accum,
                                 gradient_clipping=cfg.max_grad_norm)
    # accelerate drops a DeepSpeed plugin when told cpu=True; DeepSpeed picks its CPU accelerator itself
    accelerator = Accelerator(cpu=not torch.cuda.is_available() and plugin is None, mixed_precision=precision,
                              gradient_accumulation_steps=cfg.grad_accum, deepspeed_plugin=plugin)
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    if accelerator.state.deepspeed_plugin is not None:  # no DataLoader is prepared: give DeepSpeed the batch size
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.batch_size
    out_dir = Path(cfg.output_dir)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)

    model, tokenizer = load_checkpoint(cfg.model)
    chat = ChatTokenizer(tokenizer, model.config.tokens_per_video)
    cache = FeatureCache(cfg.data.cache, tower_identity(model)) if cfg.data.cache else None
    train_set = _dataset(cfg.data.train, cfg, chat, model, cache)
    val_set = _dataset(cfg.data.val, cfg, chat, model, cache) if cfg.data.val else None
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        bad = [asdict(b) for b in train_set.bad]
        (out_dir / "bad_samples.json").write_text(json.dumps(bad, indent=1) + "\n")
        log.info("%d training samples, %d excluded (see %s)", len(train_set), len(bad), out_dir / "bad_samples.json")
    if len(train_set) == 0:
        raise ValueError(f"{cfg.data.train}: no usable training sample ({len(train_set.bad)} excluded)")

    set_stage(model, cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * cfg.max_steps), cfg.max_steps)

    progress = {"step": 0, "epoch": 0, "batch_in_epoch": 0}
    if resume:
        ckpt = latest_checkpoint(out_dir)
        if ckpt is None:
            raise FileNotFoundError(f"{out_dir}: no checkpoint to resume from")
        progress = load_training_state(ckpt, model, optimizer, scheduler)
        log.info("resumed from %s at step %d", ckpt, progress["step"])
    model, optimizer = accelerator.prepare(model, optimizer)
    raw = accelerator.unwrap_model(model)

    # ---- train loop
    metrics_file = out_dir / "metrics.jsonl"
    if main and not resume and metrics_file.exists():
        metrics_file.unlink()
    bar = tqdm(total=cfg.max_steps, initial=progress["step"], desc="training", disable=not main, unit="step")
    seen, started, last_loss = 0, time.perf_counter(), float("nan")
    shown: list[str] = []  # ids of the samples this rank trained on (diagnostics)
    window: list[float] = []
    while progress["step"] < cfg.max_steps:
        batches = _batches(len(train_set), cfg.batch_size, cfg.seed, progress["epoch"], rank, world)
        for b in range(progress["batch_in_epoch"], len(batches)):
            batch = collate_samples([train_set[i] for i in batches[b]], chat.pad_id)
            shown += [train_set.samples[i].id for i in batches[b]]
            with accelerator.accumulate(model), accelerator.autocast():
                loss = model(**_to(batch, accelerator.device)).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm:
                    accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                scheduler.step() if accelerator.sync_gradients else None
                optimizer.zero_grad()
            window.append(loss.item())
            seen += len(batches[b]) * world
            progress["batch_in_epoch"] = b + 1
            if not accelerator.sync_gradients:
                continue
            progress["step"] += 1
            last_loss = accelerator.gather(torch.tensor(sum(window) / len(window), device=accelerator.device)).mean().item()
            window = []
            rate = seen / (time.perf_counter() - started)
            bar.update(1)
            bar.set_postfix(loss=f"{last_loss:.4f}", samples_s=f"{rate:.1f}")
            record = {"step": progress["step"], "loss": last_loss, "lr": scheduler.get_last_lr()[0], "samples_per_s": rate}
            if val_set is not None and progress["step"] % cfg.eval_every == 0 and len(val_set):
                record["val_loss"] = validation_loss(model, val_set, chat.pad_id, cfg.batch_size, accelerator)
            if main and (progress["step"] % cfg.log_every == 0 or "val_loss" in record or progress["step"] == cfg.max_steps):
                with metrics_file.open("a") as f:
                    f.write(json.dumps(record) + "\n")
            if progress["step"] % cfg.save_every == 0 or progress["step"] == cfg.max_steps:
                accelerator.wait_for_everyone()
                if main:
                    save_training_state(out_dir / f"checkpoint-{progress['step']}", raw, optimizer, scheduler,
                                        dict(progress), cfg)
                    for old in sorted(out_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[:-cfg.keep_checkpoints]:
                        shutil.rmtree(old)
            if progress["step"] >= cfg.max_steps:
                break
        else:
            progress["epoch"] += 1
            progress["batch_in_epoch"] = 0
    bar.close()

    # ---- save and clean up
    digest = hashlib.sha256(b"".join(t.numpy().tobytes() for t in trainable_state(raw).values())).hexdigest()
    (out_dir / "ranks").mkdir(parents=True, exist_ok=True)
    (out_dir / "ranks" / f"rank-{rank}.json").write_text(json.dumps(
        {"rank": rank, "world_size": world, "engine": accelerator.distributed_type.value,
         "trainable_sha256": digest, "samples": shown}) + "\n")
    accelerator.wait_for_everyone()
    final = out_dir / "final"
    if main:
        save_final(raw, tokenizer, cfg, final)
        plot_losses(metrics_file, out_dir / "loss.png")
    accelerator.end_training()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return {"final_loss": last_loss, "steps": progress["step"], "samples": len(train_set),
            "excluded": len(train_set.bad), "final": str(final), "world_size": world}


def plot_losses(metrics_file: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not metrics_file.exists():
        return
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train")
    val = [r for r in rows if "val_loss" in r]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


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
