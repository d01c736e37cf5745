"""Does a faster number format change the answers? The bundled model's held-out accuracy in
fp32, bf16 and bf16 with weight-only int8 or int4 LLM layers (``--quantize int8``, ``int4``) or the LLM in
llama.cpp (``--quantize q8_0``, ``q4_k_m``), side by side.

The rule (README, Performance): bf16, int8, int4, Q8_0 and Q4_K_M may move the evaluation accuracy by at most one
point from fp32. Besides accuracy this counts how many answers are word for word the fp32 ones,
and times each evaluation (greedy, no blind pass).

    .venv/bin/python benchmarks/precision_accuracy.py --data runs/r1/data/test.json --videos runs/r1/data/videos
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from hilight.checkpoint import default_model
from hilight.evaluation.qa import load_items, report, run
from hilight.inference.engine import Engine, GenerationSettings

VARIANTS = (("fp32", torch.float32, "none"), ("bf16", torch.bfloat16, "none"), ("bf16 packed", torch.bfloat16, "packed"),
            ("bf16 + int8 LLM", torch.bfloat16, "int8"), ("bf16 + int4 LLM", torch.bfloat16, "int4"),
            ("bf16 + Q8_0 llama.cpp", torch.bfloat16, "q8_0"), ("bf16 + Q4_K_M llama.cpp", torch.bfloat16, "q4_k_m"))
GROUPS = ("single_video", "two_video", "overall")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, help="checkpoint (default: the bundled model)")
    parser.add_argument("--data", type=Path, required=True, help="the billiards test split JSON")
    parser.add_argument("--videos", type=Path, required=True)
    parser.add_argument("--limit", type=int, help="only the first N questions")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--variants", nargs="+", choices=[v[0] for v in VARIANTS], default=[v[0] for v in VARIANTS],
                        help="which to run (the first is the reference of 'vs' and 'same answer')")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/precision_accuracy.json"))
    args = parser.parse_args()
    model = args.model or default_model()
    settings = GenerationSettings(max_new_tokens=24)  # what the recipe's evaluation uses

    results: dict[str, dict] = {}
    answers: dict[str, list[str]] = {}
    chosen = [v for name in args.variants for v in VARIANTS if v[0] == name]
    for label, dtype, quantize in chosen:
        engine = Engine.from_checkpoint(model, dtype=dtype, quantize=quantize)
        items, _ = load_items(args.data, args.videos)
        items = items[:args.limit] if args.limit else items
        start = time.perf_counter()
        failed = run(engine, items, settings, args.batch_size, blind=False)
        seconds = time.perf_counter() - start
        result = report([it for it in items if it.id not in failed], failed, [])
        answers[label] = [it.answer for it in items]
        results[label] = {g: {"n": result[g]["n"], "accuracy": result[g]["accuracy"]} for g in GROUPS if g in result}
        results[label]["per_type"] = {t: v["accuracy"] for t, v in result["per_type"].items()}
        results[label]["eval_seconds"] = round(seconds, 1)

    reference = chosen[0][0]
    lines = [f"{'':24}{'single-video':>14}{'two-video':>11}{'overall':>9}{'vs ' + reference:>10}{'same answer':>13}{'eval s':>8}"]
    for label, r in results.items():
        delta = 100 * (r["overall"]["accuracy"] - results[reference]["overall"]["accuracy"])
        same = sum(a == b for a, b in zip(answers[label], answers[reference], strict=True)) / len(answers[label])
        r[f"overall_points_vs_{reference}"] = round(delta, 2)
        r[f"same_answer_as_{reference}"] = same
        cells = [f"{r[g]['accuracy']:.1%}" if g in r else "-" for g in GROUPS]
        lines.append(f"{label:24}{cells[0]:>14}{cells[1]:>11}{cells[2]:>9}{delta:>+9.2f}p{same:>13.1%}"
                     f"{r['eval_seconds']:>8.0f}")
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": str(model), "data": str(args.data), "threads": torch.get_num_threads(),
                                    "torch": torch.__version__, "reference": reference,
                                    "variants": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
