"""Samples/s of a stage-2 (LoRA + TokenMining) training step, reading cached tower features
versus running both towers every step, at the ``tiny`` preset and at a mid size (ViT-B/16
towers, 12 frames at 224 px, a small Gemma). Each variant runs in its own process so its peak
memory (max RSS) is its own.

    .venv/bin/python benchmarks/train_step.py [--out benchmarks/results/train_step.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from hilight.config import (
    HiLightConfig,
    LLMConfig,
    LoraConfig,
    TokenMiningConfig,
    TrainableConfig,
    TrainConfig,
    tiny_config,
)
from hilight.model import HiLight, TowerOutputs
from hilight.text import IGNORE_INDEX, VIDEO_PLACEHOLDER_ID
from hilight.training.vlm import set_stage

BATCH = 2
TEXT_TOKENS = 48


def mid_config() -> HiLightConfig:
    return HiLightConfig(
        token_mining=TokenMiningConfig(llm_dim=512),
        llm=LLMConfig(vocab_size=2000, hidden_size=512, intermediate_size=2048, num_layers=4, num_heads=8,
                      num_kv_heads=1, head_dim=64, hidden_act="gelu_pytorch_tanh"),
    )


def run_variant(size: str, mode: str, steps: int) -> dict:
    torch.manual_seed(0)
    config = tiny_config(vocab_size=2000) if size == "tiny" else mid_config()
    model = HiLight(config)
    set_stage(model, TrainConfig(trainable=TrainableConfig(token_mining=True), lora=LoraConfig(enabled=True, r=8)))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    v, vt = config.video, config.video_tower
    pixels = torch.randn(BATCH, v.num_frames, 3, v.image_size, v.image_size)
    cached = TowerOutputs(
        video=torch.randn(BATCH, vt.num_tokens(v.num_frames), vt.hidden_size).half(),
        image=torch.randn(BATCH, v.num_frames, config.image_tower.output_dim).half(),
    )
    ids = torch.randint(10, 2000, (BATCH, TEXT_TOKENS + config.tokens_per_video))
    ids[:, 1:1 + config.tokens_per_video] = VIDEO_PLACEHOLDER_ID
    labels = ids.clone()
    labels[:, : 1 + config.tokens_per_video] = IGNORE_INDEX
    mask = torch.ones_like(ids)

    def step() -> None:
        videos = {"towers": cached} if mode == "cached" else {"pixel_values": pixels}
        loss = model(ids, mask, labels, **videos).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step()  # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {"size": size, "mode": mode, "step_s": seconds, "samples_per_s": BATCH / seconds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "parameters": model.parameter_counts()["total"], "batch": BATCH}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", nargs=3, metavar=("SIZE", "MODE", "STEPS"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/train_step.json"))
    args = parser.parse_args()
    if args.variant:
        size, mode, steps = args.variant
        print(json.dumps(run_variant(size, mode, int(steps))))
        return
    rows = []
    for size, mode, steps in (("tiny", "cached", 20), ("tiny", "towers", 20), ("mid", "cached", 8), ("mid", "towers", 3)):
        out = subprocess.run([sys.executable, __file__, "--variant", size, mode, str(steps)],
                             capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{size:5s} {mode:7s} {row['step_s']:.3f} s/step  {row['samples_per_s']:7.2f} samples/s  "
              f"peak {row['peak_rss_mb']:.0f} MB  ({row['parameters']:,} parameters)")
    for size in ("tiny", "mid"):
        cached, towers = (next(r for r in rows if r["size"] == size and r["mode"] == m) for m in ("cached", "towers"))
        print(f"{size}: cached features are {towers['step_s'] / cached['step_s']:.1f}x faster per step")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
