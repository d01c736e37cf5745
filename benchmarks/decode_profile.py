"""Where a decode step of HiLight-2B's LLM spends its time, per ``--quantize`` format: the
weight products against everything else (attention, norms, rotary, sampling, framework).

One random-weight Gemma-2B (``benchmarks/e2e.py``'s draw), a short prompt (so the prefill is a
small part), ``--new-tokens`` greedy tokens through ``generate`` under ``torch.profiler``; each
operator's self CPU time is put in one group (weight products, attention, element-wise,
copies and layout, the rest), divided by the tokens decoded, and the weight products are set
against the time this run's read rate needs for the bytes a token reads.

    .venv/bin/python benchmarks/decode_profile.py [--modes int4 packed] [--new-tokens 48] \
        [--out benchmarks/results/decode-profile.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from e2e import decode_bytes_per_token, random_model, read_bandwidth_gbs
from torch.profiler import ProfilerActivity, profile

from hilight.config import preset
from hilight.inference.quantize import quantize_llm

HERE = Path(__file__).resolve().parent
# operator name -> group; the first pattern an operator's name holds decides
GROUPS = (
    ("weight products", ("int4pack", "_weight_int8", "aten::mm", "aten::addmm", "aten::linear", "aten::matmul",
                         "aten::bmm", "mkldnn", "onednn", "packed")),
    ("attention", ("scaled_dot_product", "flash_attention", "softmax")),
    ("element-wise", ("aten::mul", "aten::add", "aten::sub", "aten::div", "aten::gelu", "aten::rsqrt",
                      "aten::pow", "aten::mean", "aten::neg", "aten::tanh", "aten::exp", "aten::sum", "aten::cat",
                      "aten::where", "aten::argmax", "aten::max", "aten::cos", "aten::sin")),
    ("copies and layout", ("aten::copy_", "aten::to", "aten::_to_copy", "aten::contiguous", "aten::clone",
                           "aten::empty", "aten::index", "aten::embedding", "aten::slice", "aten::view",
                           "aten::transpose", "aten::reshape", "aten::expand", "aten::cat", "aten::t")),
)


def group(name: str) -> str:
    for label, patterns in GROUPS:
        if any(p in name for p in patterns):
            return label
    return "the rest"


def profile_mode(config, mode: str, prompt: list[int], new_tokens: int, bandwidth: float) -> dict:
    model = random_model(config, torch.bfloat16)
    quantize_llm(model, mode=mode)
    ids = torch.tensor([prompt])
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                  min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                  pad_token_id=model.config.llm.pad_token_id)
    with torch.inference_mode():
        model.llm.generate(**kwargs)  # warm-up
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model.llm.generate(**kwargs)
        wall = time.perf_counter() - start
    seconds: dict[str, float] = defaultdict(float)
    top = []
    for event in prof.key_averages():
        seconds[group(event.key)] += event.self_cpu_time_total / 1e6
        top.append((event.self_cpu_time_total / 1e6, event.key))
    per_token = decode_bytes_per_token(model, len(prompt) + new_tokens // 2)
    steps = new_tokens  # the prefill of a short prompt is counted as one more step's worth
    ms = {k: round(v / steps * 1e3, 2) for k, v in sorted(seconds.items(), key=lambda kv: -kv[1])}
    total = sum(seconds.values())
    del model
    return {
        "wall_ms_per_token": round(wall / steps * 1e3, 2),
        "profiled_ms_per_token": ms,
        "share": {k: round(v / total, 3) for k, v in seconds.items()},
        "read_bound_ms_per_token": round(per_token / (bandwidth * 1e9) * 1e3, 2),
        "top_operators_ms_per_token": [[key, round(s / steps * 1e3, 2)] for s, key in sorted(top, reverse=True)[:12]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="hilight-2b")
    parser.add_argument("--modes", nargs="+", default=["int4", "packed"], choices=["packed", "int8", "int4"])
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "decode-profile.json")
    args = parser.parse_args()
    config = preset(args.preset)
    prompt = [int(t) for t in np.random.default_rng(0).integers(4, config.llm.vocab_size, args.prompt)]
    bandwidth = read_bandwidth_gbs(2048)
    result = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                          "torch": torch.__version__, "read_bandwidth_gbs": round(bandwidth, 1)},
              "prompt": args.prompt, "new_tokens": args.new_tokens, "modes": {}}
    for mode in args.modes:
        result["modes"][mode] = profile_mode(config, mode, prompt, args.new_tokens, bandwidth)
        print(mode, json.dumps(result["modes"][mode]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
