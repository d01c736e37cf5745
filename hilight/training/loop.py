"""The optimisation loop shared by every training recipe (VLM stages, video-text alignment).

:func:`fit` runs a model through ``max_steps`` optimizer steps with accelerate (one CPU, DDP,
or DeepSpeed), gradient accumulation, clipping, a cosine schedule, periodic validation,
metrics (``metrics.jsonl``, ``loss.png``) and resumable checkpoints: directories written
atomically with the trainable weights, optimizer, scheduler, RNG states and data position, as
safetensors + JSON (no pickle).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from hilight.config import LoopConfig
from hilight.errors import CheckpointError
from hilight.files import atomic_dir

log = logging.getLogger(__name__)


def make_accelerator(cfg: LoopConfig) -> Accelerator:
    precision = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[cfg.precision]
    plugin = None
    if cfg.deepspeed:
        from accelerate.utils import DeepSpeedPlugin

        plugin = DeepSpeedPlugin(hf_ds_config=cfg.deepspeed, gradient_accumulation_steps=cfg.grad_accum,
                                 gradient_clipping=cfg.max_grad_norm)
    # accelerate keeps one global state per process and refuses another precision in it; runs
    # in one process (the recipe: bf16 alignment, then fp32 stages) start from a fresh one
    AcceleratorState._reset_state()
    # accelerate drops a DeepSpeed plugin when told cpu=True; DeepSpeed picks its CPU accelerator itself
    accelerator = Accelerator(cpu=not torch.cuda.is_available() and plugin is None, mixed_precision=precision,
                              gradient_accumulation_steps=cfg.grad_accum, deepspeed_plugin=plugin)
    if accelerator.state.deepspeed_plugin is not None:  # no DataLoader is prepared: give DeepSpeed the batch size
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.batch_size
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    return accelerator


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


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


def save_training_state(path: Path, model, optimizer, scheduler, progress: dict, config: LoopConfig) -> None:
    """Write a resumable checkpoint directory atomically."""
    with atomic_dir(path) as tmp:
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


def _read_checkpoint(path: Path) -> tuple[dict, dict, dict | None, torch.Tensor]:
    """Every file of a checkpoint, read and checked before any of it is applied: (weights,
    trainer state, optimizer tensors or None, torch RNG). A truncated or missing file raises
    CheckpointError naming it."""
    from safetensors import SafetensorError

    def read(name: str, load):
        try:
            return load(path / name)
        except FileNotFoundError:
            raise CheckpointError(f"{path / name}: missing") from None
        except (SafetensorError, json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
            raise CheckpointError(f"{path / name}: unreadable, cut short or damaged ({type(exc).__name__})") from None

    state = read("trainer_state.json", lambda f: json.loads(f.read_text()))
    if not isinstance(state, dict) or not {"progress", "optimizer", "scheduler"} <= set(state):
        raise CheckpointError(f"{path / 'trainer_state.json'}: not a trainer state")
    weights = read("trainable.safetensors", load_file)
    optimizer = read("optimizer.safetensors", load_file) if state["optimizer"] is not None else None
    rng = read("rng.safetensors", load_file)["torch"]
    return weights, state, optimizer, rng


def load_training_state(path: Path, model, optimizer, scheduler) -> dict:
    """Restore weights, optimizer, scheduler and RNG; returns the saved progress."""
    return _apply_checkpoint(path, _read_checkpoint(path), model, optimizer, scheduler)


def _apply_checkpoint(path: Path, read: tuple, model, optimizer, scheduler) -> dict:
    weights, state, optimizer_tensors, rng = read
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(weights) != expected:
        raise CheckpointError(f"{path}: trainable weights do not match this stage "
                              f"(missing {sorted(expected - set(weights))[:5]}, unexpected {sorted(set(weights) - expected)[:5]})")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    if optimizer_tensors is not None:
        optimizer.load_state_dict(_unflatten_optimizer(optimizer_tensors, state["optimizer"]))
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(rng)
    random.setstate(_from_json(state["python_rng"]))
    np.random.set_state(_from_json(state["numpy_rng"]))
    return state["progress"]


def resume_training_state(output_dir: Path, model, optimizer, scheduler) -> dict:
    """Restore the newest checkpoint of ``output_dir`` that reads whole; a newer one that does
    not (a write cut short by a crash or a full disk) is skipped with a warning."""
    checkpoints = all_checkpoints(output_dir)
    if not checkpoints:
        raise CheckpointError(f"{output_dir}: no checkpoint to resume from")
    for ckpt in reversed(checkpoints):
        try:
            read = _read_checkpoint(ckpt)
        except CheckpointError as exc:
            log.warning("%s; resuming from an earlier checkpoint", exc)
            continue
        progress = _apply_checkpoint(ckpt, read, model, optimizer, scheduler)
        log.info("resumed from %s at step %d", ckpt, progress["step"])
        return progress
    raise CheckpointError(f"{output_dir}: none of its {len(checkpoints)} checkpoint(s) reads whole")


def remove_stale_writes(output_dir: Path) -> None:
    """Temporary directories of checkpoint writes that a kill interrupted; a checkpoint set
    aside for its replacement (``.checkpoint-N.old``) that never came goes back in place."""
    for tmp in output_dir.glob(".checkpoint-*"):
        target = output_dir / tmp.name[1:].removesuffix(".old")
        if tmp.name.endswith(".old") and not target.exists():
            tmp.rename(target)
        elif tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)


def all_checkpoints(output_dir: Path) -> list[Path]:
    """The complete checkpoints, oldest first (temporary directories never count)."""
    return sorted((p for p in output_dir.glob("checkpoint-*") if p.name.split("-")[1].isdigit()),
                  key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint (temporary directories never count)."""
    done = all_checkpoints(output_dir)
    return done[-1] if done else None


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int, world: int,
                  lengths: list[int] | None = None) -> list[list[int]]:
    """This rank's micro-batches of one epoch: a seeded permutation, padded to a multiple of the
    world size, split round-robin so ranks never share a sample.

    With ``lengths`` (each sample's sequence length) the permutation is grouped by length, as
    transformers' ``group_by_length`` does: within windows of 50 global batches, samples are
    sorted longest first and cut into global batches, whose order is shuffled again, so a batch
    pads to samples of about its own length instead of the longest of the data set."""
    generator = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(n, generator=generator).tolist()
    total = math.ceil(n / (batch_size * world)) * batch_size * world
    order = (order * math.ceil(total / n))[:total]
    if lengths is not None:
        step, window = batch_size * world, batch_size * world * 50
        chunks = []
        for start in range(0, total, window):
            ranked = sorted(order[start:start + window], key=lambda i: -lengths[i])
            chunks += [ranked[i:i + step] for i in range(0, len(ranked), step)]
        order = [i for c in torch.randperm(len(chunks), generator=generator).tolist() for i in chunks[c]]
    mine = order[rank::world]
    return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]


def fit(
    cfg: LoopConfig,
    accelerator: Accelerator,
    model: torch.nn.Module,
    n_samples: int,
    batch_loss: Callable[[torch.nn.Module, list[int]], torch.Tensor],
    sample_id: Callable[[int], str],
    validate: Callable[[torch.nn.Module], float] | None = None,
    resume: bool = False,
    lengths: list[int] | None = None,
) -> dict:
    """Optimise the trainable parameters of ``model`` on ``n_samples`` samples.

    ``batch_loss(model, indices)`` returns the loss of one micro-batch (the indices are this
    rank's share); ``lengths`` (with ``cfg.group_by_length``) groups batches by sample length
    (:func:`epoch_batches`). Returns the final loss, steps, world size and the unwrapped model.
    """
    from transformers import get_cosine_schedule_with_warmup

    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * cfg.max_steps), cfg.max_steps)
    progress = {"step": 0, "epoch": 0, "batch_in_epoch": 0}
    if main:
        remove_stale_writes(out_dir)
    if resume:
        progress = resume_training_state(out_dir, model, optimizer, scheduler)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw = accelerator.unwrap_model(model)

    metrics_file = out_dir / "metrics.jsonl"
    if main and metrics_file.exists():
        if resume:  # the steps after the checkpoint run again; keep their records once
            kept = [line for line in metrics_file.read_text().splitlines()
                    if (step := _logged_step(line)) is not None and step <= progress["step"]]
            metrics_file.write_text("".join(line + "\n" for line in kept))
        else:
            metrics_file.unlink()
    bar = tqdm(total=cfg.max_steps, initial=progress["step"], desc="training", disable=not main, unit="step")
    seen, started, last_loss = 0, time.perf_counter(), float("nan")
    shown: list[str] = []  # ids of the samples this rank trained on (diagnostics)
    window: list[float] = []
    while progress["step"] < cfg.max_steps:
        batches = epoch_batches(n_samples, cfg.batch_size, cfg.seed, progress["epoch"], rank, world,
                                lengths if cfg.group_by_length else None)
        for b in range(progress["batch_in_epoch"], len(batches)):
            shown += [sample_id(i) for i in batches[b]]
            with accelerator.accumulate(model), accelerator.autocast():
                loss = batch_loss(model, batches[b])
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm:
                    accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad()
            window.append(loss.item())
            seen += len(batches[b]) * world
            progress["batch_in_epoch"] = b + 1
            if not accelerator.sync_gradients:
                continue
            progress["step"] += 1
            mean = torch.tensor(sum(window) / len(window), device=accelerator.device)
            last_loss = accelerator.gather(mean).mean().item()
            window = []
            rate = seen / (time.perf_counter() - started)
            bar.update(1)
            bar.set_postfix(loss=f"{last_loss:.4f}", samples_s=f"{rate:.1f}")
            record = {"step": progress["step"], "loss": last_loss, "lr": scheduler.get_last_lr()[0], "samples_per_s": rate}
            if validate is not None and progress["step"] % cfg.eval_every == 0:
                model.eval()
                with torch.no_grad(), accelerator.autocast():
                    record["val_loss"] = validate(model)
                model.train()
            last = progress["step"] == cfg.max_steps
            if main and (progress["step"] % cfg.log_every == 0 or "val_loss" in record or last):
                with metrics_file.open("a") as f:
                    f.write(json.dumps(record) + "\n")
            if progress["step"] % cfg.save_every == 0 or last:
                accelerator.wait_for_everyone()
                if main:
                    save_training_state(out_dir / f"checkpoint-{progress['step']}", raw, optimizer, scheduler,
                                        dict(progress), cfg)
                    for old in all_checkpoints(out_dir)[:-cfg.keep_checkpoints]:
                        shutil.rmtree(old)
            if progress["step"] >= cfg.max_steps:
                break
        else:
            progress["epoch"] += 1
            progress["batch_in_epoch"] = 0
    bar.close()

    digest = hashlib.sha256(b"".join(t.numpy().tobytes() for t in trainable_state(raw).values())).hexdigest()
    (out_dir / "ranks").mkdir(parents=True, exist_ok=True)
    (out_dir / "ranks" / f"rank-{rank}.json").write_text(json.dumps(
        {"rank": rank, "world_size": world, "engine": accelerator.distributed_type.value,
         "trainable_sha256": digest, "samples": shown}) + "\n")
    accelerator.wait_for_everyone()
    if main:
        plot_losses(metrics_file, out_dir / "loss.png")
    return {"final_loss": last_loss, "steps": progress["step"], "world_size": world, "model": raw}


def finish(accelerator: Accelerator) -> None:
    """End the run cleanly (a barrier before tearing down avoids crashes at exit)."""
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def _logged_step(line: str) -> int | None:
    """The step of one ``metrics.jsonl`` line; None for a line a kill cut short."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


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


