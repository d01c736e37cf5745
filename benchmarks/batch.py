"""``hilight batch`` on Ray Data over many billiards clips: clips per second with 1 and 2
actors per stage, where the actors' time goes (decoding, towers + TokenMining, generation), and
a one-process loop over ``Engine.answer`` (a shell loop over ``hilight ask`` without its start-up
cost, so a generous baseline) on the first clips.

    python benchmarks/batch.py [--clips 1000] [--configs 1x1,2x2] [--baseline 100] [--model DIR]

Needs a Python with Ray (``scripts/test-integrations.sh`` builds one: .venv-integrations). The
clips (rendered once, test split, seed 0) and outputs stay in benchmarks/.cache/batch. Writes
benchmarks/results/batch.json and batch.png.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from hilight.checkpoint import default_model
from hilight.synth.dataset import clip_name, generate_split

ROOT = Path(__file__).resolve().parents[1]
FALLBACK_QUESTION = "What happens in this video?"


def make_manifest(work: Path, clips: int) -> Path:
    """``clips`` rendered clips and a JSONL manifest: per clip, the first single-video question
    the dataset asks about it."""
    manifest = work / f"manifest-{clips}.jsonl"
    if manifest.is_file():
        return manifest
    if not (work / "videos" / clip_name("test", clips - 1)).is_file() or not (work / "test.json").is_file():
        generate_split(work, "test", clips, seed=0, workers=os.cpu_count() or 1)
    questions: dict[str, str] = {}
    for record in json.loads((work / "test.json").read_text()):
        video = record["video"]
        if isinstance(video, str):
            questions.setdefault(video, record["conversations"][0]["value"])
    rows = [{"id": f"clip-{i:05d}", "video": f"videos/{clip_name('test', i)}",
             "question": questions.get(clip_name("test", i), FALLBACK_QUESTION)} for i in range(clips)]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def run_batch(manifest: Path, out: Path, model: Path, dtype: str, encode: int, generate: int,
              batch_size: int) -> dict:
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "hilight", "batch", str(manifest), "--out", str(out), "--model", str(model),
           "--dtype", dtype, "--encode-actors", str(encode), "--generate-actors", str(generate),
           "--batch-size", str(batch_size)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    first_row = None  # when the first answer reached the output: start-up (Ray, actors, models) is over
    while proc.poll() is None:
        if first_row is None and out.is_file() and out.stat().st_size:
            first_row = time.perf_counter() - start
        time.sleep(0.1)
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"hilight batch failed ({proc.returncode}):\n{stderr[-3000:]}")
    line = stdout.strip().splitlines()[-1]
    pipeline_s = float(re.search(r"videos in ([0-9.]+) s", line).group(1))
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    steady = (len(rows) - 1) / (wall - first_row) if first_row and wall > first_row else None
    sums = {k: sum(r[k] for r in rows) for k in ("decode_s", "encode_s", "generate_s")}
    return {"encode_actors": encode, "generate_actors": generate, "batch_size": batch_size, "items": len(rows),
            "failed": sum(r["error"] is not None for r in rows), "wall_s": round(wall, 1),
            "first_row_s": round(first_row or wall, 1), "pipeline_s": pipeline_s,
            "clips_per_s": round(steady, 2) if steady else None,
            "clips_per_s_with_startup": round(len(rows) / wall, 2),
            "actor_seconds": {k: round(v, 1) for k, v in sums.items()},
            "answers": {r["id"]: r["answer"] for r in rows}, "summary": line}


def baseline(manifest: Path, model: Path, dtype: str, count: int) -> dict:
    """One process, one item at a time: ``Engine.answer`` as ``hilight ask`` calls it."""
    import torch

    from hilight.inference.engine import Engine, GenerationSettings, place_videos, resolve_dtype
    from hilight.text import Message

    items = [json.loads(x) for x in manifest.read_text().splitlines()[:count]]
    engine = Engine.from_checkpoint(model, dtype=resolve_dtype(dtype))
    start = time.perf_counter()
    answers = {}
    for item in items:
        answers[item["id"]] = engine.answer([Message("user", place_videos(item["question"], 1))],
                                            [manifest.parent / item["video"]], GenerationSettings(128)).strip()
    seconds = time.perf_counter() - start
    return {"items": len(items), "seconds": round(seconds, 1), "clips_per_s": round(len(items) / seconds, 2),
            "threads": torch.get_num_threads(), "answers": answers}


def plot(results: list[dict], base: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.2))
    names = [f"{r['encode_actors']} enc + {r['generate_actors']} gen" for r in results]
    left.barh(["loop (1 process)", *names], [base["clips_per_s"], *[r["clips_per_s"] for r in results]],
              color=["#999999"] + ["#3b7dd8"] * len(results))
    left.set_xlabel("clips / s (after the first answer)")
    bottom = [0.0] * len(results)
    for key, colour in (("decode_s", "#e0a030"), ("encode_s", "#50a050"), ("generate_s", "#3b7dd8")):
        values = [r["actor_seconds"][key] for r in results]
        right.barh(names, values, left=bottom, color=colour, label=key.removesuffix("_s"))
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    right.set_xlabel("actor-seconds for all clips")
    right.legend(loc="lower right", fontsize=8)
    fig.suptitle(f"hilight batch on Ray Data, {results[0]['items']} billiards clips, {os.cpu_count()} CPU cores")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=1000)
    parser.add_argument("--configs", default="1x1,2x2", help="encode x generate actors, comma-separated")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--baseline", type=int, default=100, help="items the one-process loop answers")
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / ".cache" / "batch")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "batch.json")
    args = parser.parse_args()
    model = args.model or default_model()
    args.work.mkdir(parents=True, exist_ok=True)
    manifest = make_manifest(args.work, args.clips)
    base = baseline(manifest, model, args.dtype, args.baseline)
    print(f"loop: {base['clips_per_s']} clips/s over {base['items']} items", flush=True)
    results = []
    for config in args.configs.split(","):
        encode, generate = (int(n) for n in config.split("x"))
        result = run_batch(manifest, args.work / f"out-{config}.jsonl", model, args.dtype, encode, generate,
                           args.batch_size)
        print(f"{config}: {result['summary']} (wall {result['wall_s']} s); actor-seconds {result['actor_seconds']}",
              flush=True)
        results.append(result)
    first = results[0]["answers"]
    same = {f"{r['encode_actors']}x{r['generate_actors']}": r["answers"] == first for r in results}
    same["loop"] = all(first[k] == v for k, v in base["answers"].items())
    report = {"model": str(model), "dtype": args.dtype, "clips": args.clips, "cpu_cores": os.cpu_count(),
              "answers_identical": same, "loop": {k: v for k, v in base.items() if k != "answers"},
              "runs": [{k: v for k, v in r.items() if k != "answers"} for r in results]}
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    plot(results, base, args.out.with_suffix(".png"))
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=1))


if __name__ == "__main__":
    main()
