"""An end-to-end run of the whole pipeline on the ``tiny`` preset with random weights.

It proves the plumbing (decode -> both towers -> TokenMining -> Gemma forward and KV-cached
generation -> checkpoint save/load) on a generated clip. The weights are UNTRAINED, so the
answer text is meaningless by design.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hilight.checkpoint import load_checkpoint, save_checkpoint
from hilight.config import tiny_config
from hilight.inference.engine import GenerationSettings, generate
from hilight.model import HiLight
from hilight.text import ChatTokenizer, Message, collate
from hilight.tokenizer import DEMO_CORPUS, train_tokenizer
from hilight.video import load_video, write_video


def moving_balls_clip(num_frames: int = 24, size: int = 64, seed: int = 0) -> np.ndarray:
    """uint8 ``[N, size, size, 3]``: coloured discs gliding over green cloth."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    pos = rng.uniform(0.2 * size, 0.8 * size, (3, 2))
    vel = rng.uniform(-2.0, 2.0, (3, 2))
    colours = np.array([[255, 255, 255], [220, 30, 30], [240, 200, 20]], dtype=np.uint8)
    frames = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    for t in range(num_frames):
        frame = np.empty((size, size, 3), dtype=np.uint8)
        frame[:] = (20, 110, 50)
        for (y, x), colour in zip(pos, colours, strict=True):
            frame[(yy - y) ** 2 + (xx - x) ** 2 <= (size / 16) ** 2] = colour
        frames[t] = frame
        pos = pos + vel
        bounce = (pos < 4) | (pos > size - 4)
        vel[bounce] *= -1
    return frames


@dataclass
class DemoReport:
    clip: Path
    pixel_shape: tuple[int, ...]
    tokens_per_video: int
    prompt_tokens: int
    loss: float
    answer: str
    reloaded_answer: str
    seconds: float


def run_demo(workdir: str | Path, seed: int = 0) -> DemoReport:
    """Run the untrained end-to-end pipeline in ``workdir`` and report what happened."""
    start = time.perf_counter()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    clip = write_video(workdir / "clip.mp4", moving_balls_clip(seed=seed))

    tokenizer = train_tokenizer(DEMO_CORPUS * 20, vocab_size=400)
    config = tiny_config(vocab_size=len(tokenizer))
    model = HiLight(config).eval()
    chat = ChatTokenizer(tokenizer, config.tokens_per_video)
    pixels = load_video(clip, config.video).unsqueeze(0)  # [1, T, 3, S, S]

    sample = chat.encode([Message("user", "<video>\nWhat happens in this video?"),
                          Message("model", "A white ball moves to the right.")])
    batch = collate([sample], chat.pad_id)
    with torch.inference_mode():
        loss = model(batch.input_ids, batch.attention_mask, batch.labels, pixel_values=pixels).loss.item()

    prompt = chat.encode([Message("user", "<video>\nWhat happens in this video?")], generation=True)
    prompt_batch = collate([prompt], chat.pad_id, padding_side="left")
    settings = GenerationSettings(max_new_tokens=12)
    stops = [chat.end_of_turn_id, chat.eos_id]
    answer = chat.decode(generate(model, prompt_batch, stops, settings, pixel_values=pixels)[0].tolist())

    save_checkpoint(model, workdir / "tiny-untrained", tokenizer)
    reloaded, _ = load_checkpoint(workdir / "tiny-untrained")
    again = chat.decode(generate(reloaded, prompt_batch, stops, settings, pixel_values=pixels)[0].tolist())
    return DemoReport(clip, tuple(pixels.shape), config.tokens_per_video, len(prompt), loss, answer, again,
                      time.perf_counter() - start)
