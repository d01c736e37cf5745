"""Forward time of both vision towers at full ViT-B/16 size (random weights) for one 12-frame
video, and of CLIP-ViP's proxy-guided attention: HiLight's block-structured SDPA against a
manual bmm/softmax implementation of the same math (the original's approach). Each tower's
FLOPs are counted (torch's FlopCounterMode) and its achieved GFLOP/s set against the bf16 and
fp32 matmul rates this machine reaches at the towers' own matrix shapes (2,352 x 768 x 3,072),
which bound what any implementation of the same arithmetic can do here.

    .venv/bin/python benchmarks/towers.py [--repeats 5] [--compile] [--out benchmarks/results/towers.json]

``--compile`` also times ``torch.compile`` (inductor, weights frozen) in bf16 and its compile time.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from unittest import mock

import torch
from common import gflop, matmul_gflops, median_time

from hilight.config import HiLightConfig
from hilight.model import clip_vip
from hilight.model.clip_vip import CLIPViPVideoTower
from hilight.model.long_clip import LongCLIPImageTower


def manual_proxy_attention(q, k, v, num_proxy: int, num_frames: int):
    """bmm + softmax with the original's layout: proxies over all tokens; per frame, the
    patches over [proxies (repeated per frame), own patches]."""
    b, h, s, hd = q.shape
    m, n = num_proxy, num_frames
    length = (s - m) // n
    q = q * hd**-0.5
    qf, kf, vf = (t.reshape(b * h, s, hd) for t in (q, k, v))
    proxy = torch.bmm(torch.softmax(torch.bmm(qf[:, :m], kf.transpose(1, 2)), -1), vf)  # [BH, M, hd]
    qp = qf[:, m:].reshape(b * h * n, length, hd)
    k_cls = kf[:, :m].repeat_interleave(n, dim=0)  # [BH*N, M, hd]
    v_cls = vf[:, :m].repeat_interleave(n, dim=0)
    kp = torch.cat([k_cls, kf[:, m:].reshape(b * h * n, length, hd)], dim=1)
    vp = torch.cat([v_cls, vf[:, m:].reshape(b * h * n, length, hd)], dim=1)
    patch = torch.bmm(torch.softmax(torch.bmm(qp, kp.transpose(1, 2)), -1), vp)  # [BH*N, L, hd]
    out = torch.cat([proxy, patch.reshape(b * h, n * length, hd)], dim=1)
    return out.view(b, h, s, hd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (inductor, frozen weights)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/towers.json"))
    args = parser.parse_args()

    torch.manual_seed(0)
    cfg = HiLightConfig()
    frames = cfg.video.num_frames
    video_tower = CLIPViPVideoTower(cfg.video_tower).eval()
    image_tower = LongCLIPImageTower(cfg.image_tower).eval()
    pixels = torch.randn(1, frames, 3, cfg.video.image_size, cfg.video.image_size)
    vt = cfg.video_tower
    q, k, v = (torch.randn(1, vt.num_heads, vt.num_tokens(frames), vt.hidden_size // vt.num_heads) for _ in range(3))

    tokens = frames * cfg.video_tower.patches_per_frame
    rates = {name: matmul_gflops(dtype, tokens, cfg.video_tower.hidden_size, cfg.video_tower.intermediate_size,
                                 args.repeats * 4) for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32))}
    with torch.inference_mode():
        counted = {"video_tower": gflop(lambda: video_tower(pixels)), "image_tower": gflop(lambda: image_tower(pixels))}
        results = {
            "video_tower_s": median_time(lambda: video_tower(pixels), args.repeats),
            "image_tower_s": median_time(lambda: image_tower(pixels), args.repeats),
            "attention_sdpa_ms": 1e3 * median_time(
                lambda: clip_vip.proxy_guided_sdpa(q, k, v, vt.num_proxy_tokens, frames), args.repeats * 6),
            "attention_manual_ms": 1e3 * median_time(
                lambda: manual_proxy_attention(q, k, v, vt.num_proxy_tokens, frames), args.repeats * 6),
        }
        results["attention_full_mask_ms"] = 1e3 * median_time(
            lambda: clip_vip.proxy_guided_attention_reference(q, k, v, vt.num_proxy_tokens, frames), args.repeats)
        with mock.patch.object(clip_vip, "proxy_guided_sdpa", manual_proxy_attention):
            results["video_tower_manual_attention_s"] = median_time(lambda: video_tower(pixels), args.repeats)
        torch.testing.assert_close(
            clip_vip.proxy_guided_sdpa(q, k, v, vt.num_proxy_tokens, frames),
            manual_proxy_attention(q, k, v, vt.num_proxy_tokens, frames), atol=1e-4, rtol=1e-4)
        # bf16 weights and compute (the dtype policy's choice on CPUs with native bf16)
        ref_video, ref_image = video_tower(pixels), image_tower(pixels)
        video_tower.to(torch.bfloat16)
        image_tower.to(torch.bfloat16)
        results["video_tower_bf16_s"] = median_time(lambda: video_tower(pixels), args.repeats)
        results["image_tower_bf16_s"] = median_time(lambda: image_tower(pixels), args.repeats)
        cos = torch.nn.functional.cosine_similarity
        results["video_tower_bf16_cosine_min"] = cos(video_tower(pixels).float(), ref_video, dim=-1).min().item()
        results["image_tower_bf16_cosine_min"] = cos(image_tower(pixels).float(), ref_image, dim=-1).min().item()
        if args.compile:
            import torch._inductor.config as inductor

            inductor.freezing = True  # weights become constants: prepacked for oneDNN
            compiled = {"video": torch.compile(video_tower), "image": torch.compile(image_tower)}
            start = time.perf_counter()
            compiled["video"](pixels), compiled["image"](pixels)
            results["compile_s"] = time.perf_counter() - start
            for name, fn in compiled.items():
                results[f"{name}_tower_bf16_compiled_s"] = median_time(lambda fn=fn: fn(pixels), args.repeats)
    results["gflop"] = counted
    results["matmul_gflops_at_tower_shapes"] = rates
    for name in ("video_tower", "image_tower"):
        for precision, key in (("fp32", f"{name}_s"), ("bf16", f"{name}_bf16_s")):
            achieved = counted[name] / results[key]
            results[f"{name}_{precision}_gflops"] = achieved
            results[f"{name}_{precision}_of_matmul_rate"] = achieved / rates[precision]
    results["attention_speedup"] = results["attention_manual_ms"] / results["attention_sdpa_ms"]
    results["video_tower_speedup"] = results["video_tower_manual_attention_s"] / results["video_tower_s"]
    results.update(frames=frames, video_tokens=vt.num_tokens(frames), threads=torch.get_num_threads(),
                   torch=torch.__version__, machine=platform.processor() or platform.machine())

    print(f"one {frames}-frame video, ViT-B/16 at {cfg.video.image_size}px, {results['threads']} threads")
    print(f"  CLIP-ViP video tower   {results['video_tower_s']:.3f} s  ({results['video_tokens']} tokens)")
    print(f"  Long-CLIP image tower  {results['image_tower_s']:.3f} s  ({frames} frames in one batch)")
    print(f"  proxy attention, one layer: SDPA blocks {results['attention_sdpa_ms']:.1f} ms, "
          f"manual bmm/softmax {results['attention_manual_ms']:.1f} ms -> {results['attention_speedup']:.2f}x")
    print(f"  (a single masked softmax over all {results['video_tokens']} tokens: "
          f"{results['attention_full_mask_ms']:.1f} ms)")
    print(f"  whole video tower with manual attention {results['video_tower_manual_attention_s']:.3f} s "
          f"-> {results['video_tower_speedup']:.2f}x")
    print(f"  bf16: video tower {results['video_tower_bf16_s']:.3f} s (min cosine to fp32 "
          f"{results['video_tower_bf16_cosine_min']:.4f}), image tower {results['image_tower_bf16_s']:.3f} s "
          f"(min cosine {results['image_tower_bf16_cosine_min']:.4f})")
    print(f"  matmul at the towers' shapes: bf16 {rates['bf16']:.0f} GFLOP/s, fp32 {rates['fp32']:.0f} GFLOP/s")
    for name in ("video_tower", "image_tower"):
        print(f"  {name}: {counted[name]:.0f} GFLOP; fp32 {results[f'{name}_fp32_gflops']:.0f} GFLOP/s "
              f"({results[f'{name}_fp32_of_matmul_rate']:.0%} of matmul), bf16 {results[f'{name}_bf16_gflops']:.0f} "
              f"GFLOP/s ({results[f'{name}_bf16_of_matmul_rate']:.0%}); at the bf16 matmul rate it needs >= "
              f"{counted[name] / rates['bf16']:.2f} s")
    if args.compile:
        print(f"  torch.compile (bf16, frozen): video {results['video_tower_bf16_compiled_s']:.3f} s, image "
              f"{results['image_tower_bf16_compiled_s']:.3f} s, after {results['compile_s']:.0f} s of compiling")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
