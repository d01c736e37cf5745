"""vLLM (the hilight[vllm] plugin) against HiLight's own server on the same requests: each
server started alone as a process, N concurrent streaming chat requests (a video and a
question each, greedy); total tokens/s, time to first token (p50 / p95), peak resident memory
of the server's process tree, and whether the answers are the same.

    python benchmarks/vllm_serve.py [--model DIR] [--concurrency 8] [--requests 16] [--max-new-tokens 64]

Needs a Python with vLLM (``scripts/test-integrations.sh`` builds one: .venv-integrations).
Default model: the bundled one. Writes benchmarks/results/vllm_serve.json.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import psutil

from hilight.checkpoint import default_model, read_config
from hilight.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
VLLM_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process on 127.0.0.1, its log, and the peak RSS of its process tree."""

    def __init__(self, name: str, cmd: list[str], port: int, log: Path):
        self.name, self.url, self.log = name, f"http://127.0.0.1:{port}", log
        # both get every core (vLLM otherwise drops to one thread per worker on a small machine)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count()))}
        with log.open("w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        self.started = time.perf_counter()
        self.peak_rss = 0
        self._stop = threading.Event()
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                root = psutil.Process(self.proc.pid)
                rss = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
                self.peak_rss = max(self.peak_rss, rss)
            except psutil.Error:
                pass
            time.sleep(0.25)

    def wait_ready(self, path: str, seconds: float = 600) -> float:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} exited; see {self.log}")
            try:
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    return time.perf_counter() - self.started
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise SystemExit(f"{self.name} did not start in {seconds:g} s; see {self.log}")

    def stop(self) -> None:
        self._stop.set()
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def run(url: str, model: str, questions: list[tuple[str, str]], concurrency: int, max_new_tokens: int,
        tokenizer) -> dict:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=1800)

    def one(item: tuple[str, str]) -> tuple[float, float, str]:
        video, question = item
        start = time.perf_counter()
        first, text = None, []
        stream = client.chat.completions.create(model=model, max_tokens=max_new_tokens, temperature=0, stream=True,
                                                messages=[{"role": "user", "content": [
                                                    {"type": "video_url", "video_url": {"url": video}},
                                                    {"type": "text", "text": question}]}])
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter() - start
                text.append(chunk.choices[0].delta.content)
        return first or 0.0, time.perf_counter() - start, "".join(text).strip()

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, questions))
    wall = time.perf_counter() - start
    tokens = sum(len(tokenizer(r[2], add_special_tokens=False)["input_ids"]) + 1 for r in results)  # + the stop
    ttft = sorted(r[0] for r in results)
    return {"requests": len(questions), "wall_s": round(wall, 2), "tokens": tokens,
            "tokens_per_s": round(tokens / wall, 1), "ttft_p50_s": round(statistics.median(ttft), 3),
            "ttft_p95_s": round(ttft[min(len(ttft) - 1, round(0.95 * (len(ttft) - 1)))], 3),
            "answers": [r[2] for r in results]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="checkpoint (default: the bundled model)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    parser.add_argument("--requests", type=int, default=16, help="requests in all")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="longest answer")
    parser.add_argument("--dtype", default="fp32", choices=sorted(VLLM_DTYPES), help="both servers' dtype")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "vllm_serve.json")
    args = parser.parse_args()
    model = args.model or default_model()
    records = json.loads((EXAMPLES / "questions.json").read_text())
    videos = {r["video"]: "data:video/mp4;base64," + base64.b64encode((EXAMPLES / r["video"]).read_bytes()).decode()
              for r in records}
    questions = [(videos[r["video"]], r["conversations"][0]["value"].replace("<video>", "").strip())
                 for r in (records * (args.requests // len(records) + 1))[: args.requests]]
    cfg = read_config(model)
    max_len = min(cfg.llm.max_position_embeddings, cfg.text.max_length)
    tokenizer = load_tokenizer(model)
    logs = ROOT / "benchmarks" / ".cache"
    logs.mkdir(parents=True, exist_ok=True)
    runs = {}
    for name in ("hilight", "vllm"):
        port = free_port()
        if name == "hilight":
            cmd = [sys.executable, "-m", "hilight", "serve", "--model", str(model), "--port", str(port),
                   "--dtype", args.dtype, "--max-batch", str(args.concurrency), "--queue", str(args.requests)]
            ready = "/v1/models"
        else:
            cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                   "--served-model-name", "bench", "--host", "127.0.0.1", "--port", str(port),
                   "--dtype", VLLM_DTYPES[args.dtype], "--enforce-eager", "--gpu-memory-utilization", "0.2", "--max-model-len", str(max_len),
                   "--max-num-seqs", str(args.concurrency), "--limit-mm-per-prompt", '{"video": 1}']
            ready = "/health"
        server = Server(name, cmd, port, logs / f"vllm_serve-{name}.log")
        try:
            startup = server.wait_ready(ready)
            served = httpx.get(server.url + "/v1/models", timeout=10).json()["data"][0]["id"]
            run(server.url, served, questions[:1], 1, 8, tokenizer)  # warm-up
            result = run(server.url, served, questions, args.concurrency, args.max_new_tokens, tokenizer)
        finally:
            server.stop()
        runs[name] = {"startup_s": round(startup, 1), "peak_rss_gib": round(server.peak_rss / 2**30, 2), **result}
        print(name, {k: v for k, v in runs[name].items() if k != "answers"}, flush=True)
    same = runs["hilight"]["answers"] == runs["vllm"]["answers"]
    report = {"model": str(model), "dtype": args.dtype, "threads": os.cpu_count(), "concurrency": args.concurrency,
              "max_new_tokens": args.max_new_tokens, "answers_same": same,
              "vllm_over_hilight_tokens_per_s": round(runs["vllm"]["tokens_per_s"] / runs["hilight"]["tokens_per_s"], 2),
              "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"answers same: {same}; vLLM / HiLight tokens/s: {report['vllm_over_hilight_tokens_per_s']}x; "
          f"wrote {args.out}")


if __name__ == "__main__":
    main()
