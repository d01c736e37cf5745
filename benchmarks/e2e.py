"""End to end at full size on this machine: one 12-frame video, a 30-token question, 64 greedy
new tokens, and a follow-up question, with random weights (the figures do not depend on them).

Ours: weights built straight into bf16 (parameters start on the meta device and each is
allocated once, in bf16: no fp32 copy of the model ever exists), the LLM's layers as ``hilight``
runs them by default (``--quantize auto``: oneDNN-packed bf16 on a CPU with native bf16),
per-video embedding cache and multi-turn KV reuse. The plain baseline, in the same process
after ours is freed, on weights drawn the same way: fp32, and a follow-up turn decodes, encodes
and prefills everything again. The bounds come from this
machine: decode tokens/s <= measured memory read bandwidth / bytes read per token (weights + KV
cache); encode and prefill take >= counted FLOPs / measured matmul rate.

    .venv/bin/python benchmarks/e2e.py [--preset hilight-2b] [--quantize auto|none|int8|int4|packed] [--compile] [--skip-baseline]

Writes benchmarks/results/e2e.json only for the full ``hilight-2b`` preset. Peak memory is the
process's peak RSS (Linux ``VmHWM``), reset between ours and the baseline.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import gflop, matmul_gflops, median_time, run_times, synchronize
from torch import nn

from hilight.checkpoint import build_empty, load_state_strict, tie_llm_embeddings, tied_keys
from hilight.config import HiLightConfig, preset
from hilight.demo import moving_balls_clip
from hilight.inference.engine import Conversation, Engine, GenerationSettings, stream_reply
from hilight.inference.quantize import QUANTIZE, quantize_llm, resolve_quantize
from hilight.model import HiLight
from hilight.text import Message
from hilight.tokenizer import DEMO_CORPUS, train_tokenizer
from hilight.video import load_video, write_video

FULL_PRESET = "hilight-2b"
WORDS = "which ball went into the pocket first and how many times did the cue ball hit a cushion".split()


def random_model(config: HiLightConfig, dtype: torch.dtype, seed: int = 0, device: str = "cpu") -> HiLight:
    """Random weights allocated once each, directly in ``dtype``. Matrices are N(0, 0.02);
    LayerNorm scales are 1 and other vectors 0 (Gemma's RMSNorm scales by 1 + w), so
    activations keep their size: with all-random vectors they shrink layer by layer into
    subnormal floats, which the CPU computes many times slower."""
    model = build_empty(config)  # parameters on the meta device, buffers (rotary tables) real
    g = torch.Generator(device).manual_seed(seed)
    state, seen = {}, set()
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:  # a tied weight is allocated once
                continue
            seen.add(id(p))
            t = torch.empty(p.shape, dtype=dtype, device=device)
            if p.dim() > 1:
                t.normal_(0, 0.02, generator=g)
            else:
                t.fill_(1.0 if isinstance(module, nn.LayerNorm) and name == "weight" else 0.0)
            state[f"{module_name}.{name}"] = t
    load_state_strict(model, state, tied=tied_keys(config), where="random")
    tie_llm_embeddings(model)
    return model.to(device).eval()  # the buffers (rotary tables) too


def peak_gpu_gb() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_initialized() else None


def peak_rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20  # kB -> GiB
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := current RSS
    if torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()


def read_bandwidth_gbs(mib: int, device: str = "cpu") -> float:
    """Memory read bandwidth (GB/s) of summing a tensor far larger than the caches."""
    x = torch.ones(mib << 18, device=device)  # fp32: mib MiB
    seconds = median_time(lambda: x.sum(), repeats=5)
    return x.numel() * x.element_size() / seconds / 1e9


def question(tokenizer, count: int, offset: int = 0) -> str:
    """A question of exactly ``count`` tokens, its words taken in turn from a list (a word that
    would overshoot is skipped)."""

    def length(words: list[str]) -> int:
        return len(tokenizer(" ".join(words) + "?", add_special_tokens=False)["input_ids"])

    words: list[str] = []
    for i in range(offset, offset + 50 * count):
        if length([*words, WORDS[i % len(WORDS)]]) <= count:
            words.append(WORDS[i % len(WORDS)])
        if length(words) == count:
            return " ".join(words) + "?"
    raise ValueError(f"could not make a {count}-token question")


class Clock:
    """(start, end) of every LLM forward: a turn's first forward is its prefill, each later
    one decodes one token."""

    def __init__(self, model: HiLight):
        self.marks: list[list[float]] = []
        self.hooks = [model.llm.register_forward_pre_hook(lambda *_: self.marks.append([self.now()])),
                      model.llm.register_forward_hook(lambda *_: self.marks[-1].append(self.now()))]

    @staticmethod
    def now() -> float:
        synchronize()  # on a GPU, a forward's end is when its kernels are done
        return time.perf_counter()

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()


def run_turn(engine: Engine, clock: Clock, conversation: Conversation, text: str, videos: list[Path],
             new_tokens: int) -> dict:
    """Time one turn: TTFT from the call to the end of the prefill; decode tokens/s after it."""
    usage: dict = {}
    clock.marks.clear()
    start = time.perf_counter()
    for _ in stream_reply(engine, conversation, text, videos, GenerationSettings(new_tokens), usage=usage):
        pass
    (p0, p1), last = clock.marks[0], clock.marks[-1][1]
    steps = len(clock.marks) - 1
    return {"ttft_s": p1 - start, "prefill_s": p1 - p0,
            "prefill_positions": usage["prompt_tokens"] - usage["cached_tokens"],
            "generated": usage["completion_tokens"],
            "decode_tokens_per_s": steps / (last - p1) if steps else float("nan")}


def forget_videos(engine: Engine) -> None:
    """Empty the per-video caches: the next use of a video decodes, hashes and encodes it."""
    engine._videos.clear()
    engine._digests.clear()


def measure(engine: Engine, clip: Path, questions: list[str], new_tokens: int, repeats: int, reuse: bool) -> dict:
    """One system's figures; ``reuse`` false is the plain way: a follow-up runs everything again."""

    def encode() -> None:
        forget_videos(engine)
        engine.video_embeddings(clip)

    runs = run_times(encode, repeats)
    out = {"encode_s": statistics.median(runs), "encode_runs_s": runs}
    clock = Clock(engine.model)
    forget_videos(engine)  # turn 1 starts cold: decode and encode are part of its TTFT
    conversation = Conversation()
    out["turn1"] = run_turn(engine, clock, conversation, questions[0], [clip], new_tokens)
    if not reuse:
        conversation = Conversation(list(conversation.messages), list(conversation.videos))  # no KV cache
        forget_videos(engine)
    out["turn2"] = run_turn(engine, clock, conversation, questions[1], [], 1)
    clock.close()
    return out


def count_gflop(engine: Engine, clip: Path, text: str) -> dict:
    """FLOPs (counted, not estimated) of encoding the video and of the turn-1 prefill."""
    model = engine.model
    embeds = []
    with torch.inference_mode():
        encode = gflop(lambda: embeds.append(model.video_embeddings(
            model.encode_videos(load_video(clip, model.config.video).unsqueeze(0).to(engine.device)))))
        ids = engine.chat.encode([Message("user", f"<video>\n{text}")], generation=True).input_ids
        prefill = gflop(lambda: model.llm(inputs_embeds=model.embed(torch.tensor([ids], device=engine.device), embeds[0]),
                                          logits_to_keep=1))
    return {"encode": encode, "prefill": prefill}


def decode_bytes_per_token(model: HiLight, context: int) -> int:
    """Bytes one decode step reads: every LLM weight once (the tied embedding as the LM head;
    with int8 the head is its own copy and the embedding only a one-row lookup) plus the KV cache
    of ``context`` positions."""
    tied = model.llm.config.tie_word_embeddings
    tensors = [*model.llm.named_parameters(), *model.llm.named_buffers()]
    weights = sum(t.numel() * t.element_size() for name, t in tensors if tied or "embed_tokens" not in name)
    llm = model.config.llm
    kv = 2 * llm.num_layers * llm.num_kv_heads * llm.head_dim * context * next(model.llm.parameters()).element_size()
    return weights + kv


def bounds(model: HiLight, figures: dict, counted: dict, bandwidth: float, gflops: float, new_tokens: int) -> dict:
    context = figures["turn1"]["prefill_positions"] + new_tokens // 2  # the mean context while decoding
    per_token = decode_bytes_per_token(model, context)
    encode = counted["encode"] / gflops
    return {"encode_s": encode, "prefill_s": counted["prefill"] / gflops,
            "encode_share_of_bound_per_run": [round(encode / s, 3) for s in figures["encode_runs_s"]],
            "decode_tokens_per_s": bandwidth * 1e9 / per_token, "decode_bytes_per_token": per_token}


def table(ours: dict, base: dict | None, bound: dict, label: str = "ours bf16") -> str:
    """Rows of figures: ours, the plain baseline, the hardware bound, and the ratios (vs plain:
    how many times better ours is; of bound: the fraction of the hardware limit ours reaches)."""

    def cell(x: float | None, spec: str) -> str:
        return f"{x:{spec}}" if x is not None else f"{'-':>{spec.split('.')[0]}}"

    def row(name: str, get, limit: float | None = None, rate: bool = False) -> str:
        o, b = get(ours), get(base) if base else None
        vs_plain = None if b is None else o / b if rate else b / o
        of_bound = None if limit is None else o / limit if rate else limit / o
        return (f"{name:34}{cell(o, '12.4g')} {cell(b, '12.4g')} {cell(limit, '12.4g')} "
                f"{cell(vs_plain, '10.2f')}x {cell(of_bound, '10.1%')}")

    turn1, turn2 = ours["turn1"], ours["turn2"]
    lines = [
        f"{'':34}{label:>12} {'fp32 plain':>12} {'bound':>12} {'vs plain':>11} {'of bound':>10}",
        row("video encode (s)", lambda f: f["encode_s"], bound["encode_s"]),
        row(f"prefill, {turn1['prefill_positions']} positions (s)", lambda f: f["turn1"]["prefill_s"],
            bound["prefill_s"]),
        row("decode (tokens/s)", lambda f: f["turn1"]["decode_tokens_per_s"], bound["decode_tokens_per_s"], rate=True),
        row("TTFT turn 1, video cold (s)", lambda f: f["turn1"]["ttft_s"]),
        row("TTFT turn 2, same video (s)", lambda f: f["turn2"]["ttft_s"]),
        row("turn 1 / turn 2 TTFT", lambda f: f["turn1"]["ttft_s"] / f["turn2"]["ttft_s"], rate=True),
        row("peak RSS (GiB)", lambda f: f["peak_rss_gb"]),
        *([row("peak GPU memory (GiB)", lambda f: f["peak_gpu_gb"])] if ours.get("peak_gpu_gb") is not None else []),
        f"turn 2 prefill: {turn2['prefill_positions']} positions with reuse"
        + (f", {base['turn2']['prefill_positions']} without" if base else "")
        + f"; turn 1 generated {turn1['generated']} tokens",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default=FULL_PRESET, help="model sizes (hilight-2b, or tiny to check the script)")
    parser.add_argument("--skip-baseline", action="store_true", help="skip the fp32 plain run (it needs ~11 GB)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--question-tokens", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of the video encode")
    parser.add_argument("--bandwidth-mib", type=int, default=2048, help="size of the tensor summed for bandwidth")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda: ours bf16 and the plain fp32 run on the GPU "
                        "(bounds: the GPU's measured HBM read rate and matmul rate; own results file)")
    parser.add_argument("--quantize", choices=QUANTIZE, default="auto",
                        help="ours: auto (what `hilight` does: packed bf16 on a CPU with native bf16), none (plain "
                             "bf16 layers), int8 / int4 (weight-only LLM layers) or packed; not auto: own results file")
    parser.add_argument("--compile", action="store_true", help="run the video encode through torch.compile "
                        "(Engine.compile, as `hilight serve --compile`); reports the compile time")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/e2e.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    work = Path(tempfile.mkdtemp(prefix="hilight-e2e-"))
    config = preset(args.preset)
    tokenizer = train_tokenizer(DEMO_CORPUS * 20, vocab_size=400)
    frames = config.video.num_frames
    clip = write_video(work / "clip.mp4", moving_balls_clip(frames, 2 * config.video.image_size))
    questions = [question(tokenizer, args.question_tokens), question(tokenizer, args.question_tokens, offset=5)]
    device = args.device
    bandwidth = read_bandwidth_gbs(args.bandwidth_mib, device)
    rates = {dtype: matmul_gflops(dtype, device=device) for dtype in (torch.bfloat16, torch.float32)}

    reset_peak_rss()
    start = time.perf_counter()
    model = random_model(config, torch.bfloat16, device=device)
    build = {"build_s": time.perf_counter() - start, "build_peak_rss_gb": peak_rss_gb(),
             "weights_gb": sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())) / 2**30}
    counted = count_gflop(Engine(model, tokenizer), clip, questions[0])  # the same FLOPs in every format
    mode = resolve_quantize(args.quantize, model, device)
    if mode != "none":
        start = time.perf_counter()
        quantize_llm(model, mode=mode)
        build["quantize_s"] = time.perf_counter() - start
    engine = Engine(model, tokenizer)
    if args.compile:  # the same engine's encode before compiling, then what compiling costs
        build["encode_uncompiled_s"] = median_time(lambda: (forget_videos(engine), engine.video_embeddings(clip)),
                                                   args.repeats)
        build["compile_s"] = engine.compile()
    ours = measure(engine, clip, questions, args.new_tokens, args.repeats, reuse=True)
    ours["peak_rss_gb"], ours["peak_gpu_gb"] = peak_rss_gb(), peak_gpu_gb()
    bound = bounds(model, ours, counted, bandwidth, rates[torch.bfloat16], args.new_tokens)
    base = base_bound = None
    if not args.skip_baseline:
        del engine, model  # the plain run gets its own fp32 model (packed or int8 layers cannot become fp32)
        gc.collect()
        reset_peak_rss()
        if device != "cpu":
            torch.cuda.empty_cache()
        model = random_model(config, torch.float32, device=device)
        engine = Engine(model, tokenizer)
        base = measure(engine, clip, questions, args.new_tokens, args.repeats, reuse=False)
        base["peak_rss_gb"], base["peak_gpu_gb"] = peak_rss_gb(), peak_gpu_gb()
        base_bound = bounds(model, base, counted, bandwidth, rates[torch.float32], args.new_tokens)

    print(f"{args.preset}: one {frames}-frame video, a {args.question_tokens}-token question, "
          f"{args.new_tokens} greedy new tokens; {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}"
          + (f", {torch.cuda.get_device_name()}" if device != "cpu" else ""))
    print(f"machine: read bandwidth {bandwidth:.1f} GB/s; matmul bf16 {rates[torch.bfloat16]:.0f} GFLOP/s, "
          f"fp32 {rates[torch.float32]:.0f} GFLOP/s")
    print(f"built in bf16 in {build['build_s']:.1f} s: weights {build['weights_gb']:.2f} GiB, "
          f"peak RSS while building {build['build_peak_rss_gb']:.2f} GiB")
    print(f"bound: decode reads {bound['decode_bytes_per_token'] / 2**30:.2f} GiB a token "
          f"({mode + ' weights' if mode in ('int8', 'int4') else 'bf16'})"
          + (f", {base_bound['decode_bytes_per_token'] / 2**30:.2f} GiB (fp32, plain decode bound "
             f"{base_bound['decode_tokens_per_s']:.2f} tokens/s)" if base_bound else ""))
    if args.compile:
        print(f"torch.compile of the video encode: {build['compile_s']:.1f} s once; encode "
              f"{build['encode_uncompiled_s']:.2f} s before, {ours['encode_s']:.2f} s after")
    print(table(ours, base, bound, {"none": "ours bf16", "packed": "ours packed"}.get(mode, f"ours {mode}")))
    print("video encode, each run: " + ", ".join(f"{s:.2f} s ({share:.0%} of the bound)" for s, share in
                                                 zip(ours["encode_runs_s"], bound["encode_share_of_bound_per_run"],
                                                     strict=True)))

    if args.preset == FULL_PRESET:
        if args.out == Path("benchmarks/results/e2e.json") and (device != "cpu" or args.quantize != "auto"
                                                                or args.compile):
            name = device if device != "cpu" else args.quantize if args.quantize != "auto" else ""
            args.out = Path(f"benchmarks/results/e2e-{'-'.join(filter(None, (name, 'compile' * args.compile)))}.json")
        results = {"preset": args.preset, "quantize": mode, "compile": args.compile, "frames": frames, "question_tokens": args.question_tokens,
                   "new_tokens": args.new_tokens, "threads": torch.get_num_threads(), "torch": torch.__version__,
                   "machine": platform.processor() or platform.machine(), "read_bandwidth_gbs": bandwidth,
                   "device": torch.cuda.get_device_name() if device != "cpu" else "cpu",
                   "matmul_gflops": {"bf16": rates[torch.bfloat16], "fp32": rates[torch.float32]},
                   "gflop": counted, "build": build, "ours": ours, "ours_bound": bound,
                   "baseline": base, "baseline_bound": base_bound}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
