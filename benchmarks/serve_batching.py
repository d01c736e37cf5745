"""The built-in server with and without batching: N concurrent requests (each a video and a
question, greedy), served one at a time (``--max-batch 1``) and generated together
(``--max-batch N``); total tokens/s and p50 / p95 request latency, in one run.

    .venv/bin/python benchmarks/serve_batching.py [--model DIR] [--concurrency 8 32] [--max-new-tokens 64]

Default model: the bundled one. Writes benchmarks/results/serve_batching.json.
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import torch
from common import start_server

from hilight.checkpoint import default_model
from hilight.inference.engine import Engine
from hilight.server import create_app

ROOT = Path(__file__).resolve().parents[1]


def serve(engine: Engine, max_batch: int):
    app = create_app(engine, "bench", max_batch=max_batch, queue_limit=128)
    server, port = start_server(app)
    return server, openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=900)


def run(client, urls: list[str], n: int, max_new_tokens: int) -> dict:
    def one(i: int) -> tuple[float, int, str]:
        start = time.perf_counter()
        reply = client.chat.completions.create(model="bench", max_tokens=max_new_tokens, messages=[
            {"role": "user", "content": [{"type": "video_url", "video_url": {"url": urls[i % len(urls)]}},
                                         {"type": "text", "text": f"Question {i}: which ball went in first?"}]}])
        return time.perf_counter() - start, reply.usage.completion_tokens, reply.choices[0].message.content

    start = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(one, range(n)))
    wall = time.perf_counter() - start
    latencies = sorted(r[0] for r in results)
    tokens = sum(r[1] for r in results)
    return {"requests": n, "wall_s": round(wall, 2), "tokens": tokens, "tokens_per_s": round(tokens / wall, 1),
            "p50_s": round(statistics.median(latencies), 2),
            "p95_s": round(latencies[min(n - 1, round(0.95 * (n - 1)))], 2), "answers": [r[2] for r in results]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="checkpoint (default: the bundled model)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32], help="requests sent at once")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="longest answer")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve_batching.json")
    args = parser.parse_args()
    model = args.model or default_model()
    engine = Engine.from_checkpoint(model)
    clips = sorted((ROOT / "examples").glob("*.mp4"))
    urls = ["data:video/mp4;base64," + base64.b64encode(c.read_bytes()).decode() for c in clips]
    rows = []
    for n in args.concurrency:
        for max_batch in (1, n):
            server, client = serve(engine, max_batch)
            engine._videos.clear()  # every configuration decodes and encodes the clips itself
            row = {"concurrency": n, "max_batch": max_batch, **run(client, urls, n, args.max_new_tokens)}
            server.should_exit = True
            time.sleep(0.5)
            rows.append(row)
            print(f"{n:3d} concurrent, max batch {max_batch:3d}: {row['tokens_per_s']:7.1f} tokens/s, "
                  f"p50 {row['p50_s']:.2f} s, p95 {row['p95_s']:.2f} s ({row['tokens']} tokens in {row['wall_s']} s)")
        same = rows[-1]["answers"] == rows[-2]["answers"]
        rows[-1]["answers_same_as_one_at_a_time"] = same
        print(f"    answers identical to one at a time: {same}; speed-up "
              f"{rows[-1]['tokens_per_s'] / rows[-2]['tokens_per_s']:.2f}x")
    result = {"model": str(model), "threads": torch.get_num_threads(), "max_new_tokens": args.max_new_tokens,
              "runs": [{k: v for k, v in r.items() if k != "answers"} for r in rows]}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
