"""Serving figures through the OpenAI-compatible API on this machine: time to first token and
tokens/s of one streamed request, throughput of 8 concurrent requests, and the second question
about the same video with and without the per-video feature cache.

    .venv/bin/python benchmarks/serve.py [--model DIR] [--out benchmarks/results/serve.json]

Without ``--model`` (and while no model is bundled) it builds a ``billiards-small`` model
with random weights, which has the bundled model's sizes.
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import torch
from common import start_server

from hilight.checkpoint import BUNDLED_MODEL, save_checkpoint
from hilight.config import billiards_small_config
from hilight.inference.engine import Conversation, Engine, GenerationSettings, stream_reply
from hilight.model import HiLight
from hilight.server import create_app
from hilight.synth.billiards import TableConfig
from hilight.synth.dataset import render_clip
from hilight.tokenizer import DEMO_CORPUS, train_tokenizer
from hilight.video import write_video

NEW_TOKENS = 64


def random_model(root: Path) -> Path:
    tokenizer = train_tokenizer(DEMO_CORPUS * 50, vocab_size=800)
    torch.manual_seed(0)
    model = HiLight(billiards_small_config(len(tokenizer)))
    with torch.no_grad():  # random init mostly emits padding; wider weights emit tokens to time
        for p in model.llm.parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else p.normal_(0, 0.1)
    return save_checkpoint(model, root / "billiards-small-random", tokenizer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/serve.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hilight-serve-bench-"))
    model_dir = args.model or (BUNDLED_MODEL if (BUNDLED_MODEL / "config.json").is_file() else random_model(work))
    truth, frames, _ = render_clip(TableConfig(), 0, "test", 0)
    clip = write_video(work / "clip.mp4", frames, fps=truth.fps)
    engine = Engine.from_checkpoint(model_dir)
    app = create_app(engine, model_dir.name, queue_limit=16)
    server, port = start_server(app)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=600)
    url = "data:video/mp4;base64," + base64.b64encode(clip.read_bytes()).decode()

    def request(question: str, stream: bool = True) -> tuple[float, float, int]:
        """(time to first token, total time, tokens)"""
        start = time.perf_counter()
        first, text = None, ""
        reply = client.chat.completions.create(
            model=model_dir.name, max_tokens=NEW_TOKENS, stream=True,
            messages=[{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                                   {"type": "text", "text": question}]}])
        tokens = 0
        for chunk in reply:
            piece = chunk.choices[0].delta.content or ""
            if piece and first is None:
                first = time.perf_counter() - start
            text += piece
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        total = time.perf_counter() - start
        return first or total, total, tokens

    request("warm-up")
    engine._videos.clear()  # the first request below pays for decoding and encoding the video
    cold = request("Which ball was pocketed first?")
    warm = [request(f"Question {i}: how many cushions did the cue ball hit?") for i in range(3)]
    one = {"ttft_cold_s": cold[0], "ttft_cached_video_s": statistics.median(w[0] for w in warm),
           "tokens": cold[2], "tokens_per_s": cold[2] / max(cold[1] - cold[0], 1e-9)}
    start = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: request(f"Concurrent question {i}?"), range(8)))
    wall = time.perf_counter() - start
    concurrent = {"requests": 8, "wall_s": wall, "tokens": sum(r[2] for r in results),
                  "tokens_per_s": sum(r[2] for r in results) / wall, "requests_per_s": 8 / wall}

    def second_question(cache: bool) -> float:
        conversation = Conversation()
        settings = GenerationSettings(max_new_tokens=1)
        list(stream_reply(engine, conversation, "Which ball went in?", [clip], settings))
        if not cache:
            engine._videos.clear()
        start = time.perf_counter()
        list(stream_reply(engine, Conversation(), "How many balls are left?", [clip], settings))
        return time.perf_counter() - start

    cache = {"second_question_with_cache_s": statistics.median(second_question(True) for _ in range(3)),
             "second_question_without_cache_s": statistics.median(second_question(False) for _ in range(3))}
    results = {"model": str(model_dir), "new_tokens_cap": NEW_TOKENS, "single": one, "concurrent": concurrent,
               "feature_cache": cache, "threads": torch.get_num_threads()}
    print(json.dumps(results, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    server.should_exit = True


if __name__ == "__main__":
    main()
