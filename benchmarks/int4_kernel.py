"""torch's int4 CPU kernel on one decode row, per layer shape of an LLM and per group size: how
much of the machine's read rate it reaches, and so which group size brings ``--quantize int4``
nearest its bandwidth bound.

For each linear layer shape of the preset's LLM (one decoder layer's seven, and the LM head),
a [1, K] bf16 row times the [N, K] weight packed by ``torch._convert_weight_to_int4pack_for_cpu``
with one bf16 scale and zero per ``group`` inputs (as ``hilight.inference.quantize.Int4Linear``
keeps it), through ``torch._weight_int4pack_mm_for_cpu``; bytes read per call = the packed
nibbles + the scales and zeros. A whole decode step's weight time is the sum over the model's
layers. Also the error of the group size on a Gaussian weight (relative RMS of w - dequantized w).

    .venv/bin/python benchmarks/int4_kernel.py [--groups 32 64 128 256] [--out benchmarks/results/int4-kernel.json]
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
from common import median_time
from e2e import read_bandwidth_gbs

from hilight.config import preset

HERE = Path(__file__).resolve().parent


def shapes(preset_name: str) -> dict[str, tuple[int, int, int]]:
    """name -> (out_features N, in_features K, count in the model) of the LLM's linear layers."""
    llm = preset(preset_name).llm
    q, kv = llm.num_heads * llm.head_dim, llm.num_kv_heads * llm.head_dim
    layers = llm.num_layers
    return {"q_proj": (q, llm.hidden_size, layers), "k_proj": (kv, llm.hidden_size, layers),
            "v_proj": (kv, llm.hidden_size, layers), "o_proj": (llm.hidden_size, q, layers),
            "gate_proj": (llm.intermediate_size, llm.hidden_size, layers),
            "up_proj": (llm.intermediate_size, llm.hidden_size, layers),
            "down_proj": (llm.hidden_size, llm.intermediate_size, layers), "lm_head": (llm.vocab_size, llm.hidden_size, 1)}


def packed(n: int, k: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random 4-bit weights in torch's CPU layout and their scales/zeros [K / group, N, 2]."""
    q = torch.randint(0, 16, (n, k), dtype=torch.int32)
    scale_zero = torch.randn(k // group, n, 2).to(torch.bfloat16) * 0.01
    return torch._convert_weight_to_int4pack_for_cpu(q, 1), scale_zero


def group_error(group: int, n: int = 1024, k: int = 2048) -> float:
    """Relative RMS error of min-max 4-bit groups of ``group`` on a Gaussian weight."""
    w = torch.randn(n, k).reshape(n, k // group, group)
    low, high = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    scale = ((high - low) / 15).clamp(min=1e-12)
    back = torch.round((w - low) / scale).clamp(0, 15) * scale + low
    return float((w - back).pow(2).mean().sqrt() / w.pow(2).mean().sqrt())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="hilight-2b")
    parser.add_argument("--groups", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "int4-kernel.json")
    args = parser.parse_args()
    bandwidth = read_bandwidth_gbs(2048)
    layers = shapes(args.preset)
    results = {}
    for group in args.groups:
        per_layer, step_s, step_bytes = {}, 0.0, 0
        for name, (n, k, count) in layers.items():
            weight, scale_zero = packed(n, k, group)
            x = torch.randn(1, k).to(torch.bfloat16)
            seconds = median_time(lambda x=x, w=weight, g=group, sz=scale_zero:
                                  torch._weight_int4pack_mm_for_cpu(x, w, g, sz), args.repeats)
            nbytes = weight.numel() + scale_zero.numel() * 2
            per_layer[name] = {"n": n, "k": k, "ms": seconds * 1e3, "gb_per_s": nbytes / seconds / 1e9,
                               "of_read_rate": nbytes / seconds / 1e9 / bandwidth}
            step_s, step_bytes = step_s + seconds * count, step_bytes + nbytes * count
            del weight, scale_zero
        results[str(group)] = {"layers": per_layer, "weights_ms_per_token": step_s * 1e3,
                               "weight_gib_per_token": step_bytes / 2**30,
                               "of_read_rate": step_bytes / step_s / 1e9 / bandwidth,
                               "relative_rms_error": group_error(group)}
        print(f"group {group:4d}: {step_s * 1e3:7.1f} ms of weight products a token, "
              f"{step_bytes / 2**30:.2f} GiB, {results[str(group)]['of_read_rate']:.1%} of the read rate, "
              f"error {results[str(group)]['relative_rms_error']:.4f}", flush=True)
    summary = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                           "torch": torch.__version__, "read_bandwidth_gbs": bandwidth},
               "preset": args.preset, "groups": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
