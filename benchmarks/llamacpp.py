"""HiLight-2B's LLM decoding on this CPU side by side with llama.cpp, the engine a CPU user who
wants speed would pick (it has no video support; the LLM is the part to compare).

One run: the same random-weight Gemma-2B (HiLight's LLM at full size; N(0, 0.02) matrices, as
``benchmarks/e2e.py`` draws them) runs a 512-token prompt (random token ids, the same for every
engine) and 64 greedy new tokens in HiLight's formats (``--quantize packed``, ``int8``,
``int4``: the LLM alone, through ``generate`` as ``hilight`` runs it; ``q8_0``, ``q4_k_m``: HiLight's
LLM in llama.cpp, the GGUF written by HiLight, the prompt handed over as embeddings), then the model is saved
as a Hugging Face Gemma directory, converted to GGUF by llama.cpp's own converter (Q8_0) and
quantized by llama.cpp (Q4_K_M), and the same prompt runs in llama.cpp (llama-cpp-python, built
for this CPU by ``benchmarks/llamacpp-setup.sh``; ``benchmarks/llamacpp_side.py`` there). Each
figure is set against its own bound from this run's measured read rate: decode tokens/s <=
bandwidth / bytes a token reads (weights, with the tied embedding read whole as the LM head,
plus the KV cache: bf16 in HiLight, f16 in llama.cpp).

Numerics differ in one known place: HiLight-2B computes the exact GELU (as the released weights
were trained), llama.cpp's Gemma graph the tanh approximation; neither changes the bytes read.

    bash benchmarks/llamacpp-setup.sh   # once: .venv-llamacpp (~15 min)
    .venv/bin/python benchmarks/llamacpp.py [--prompt 512] [--new-tokens 64] [--out benchmarks/results/llamacpp.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
from common import matmul_gflops
from e2e import decode_bytes_per_token, peak_rss_gb, random_model, read_bandwidth_gbs, reset_peak_rss

from hilight.config import preset
from hilight.inference.quantize import quantize_llm

HERE = Path(__file__).resolve().parent
MODES = ("packed", "int8", "int4", "q8_0", "q4_k_m")  # the last two: HiLight's LLM in llama.cpp (hilight[llamacpp])


class Marks:
    """(start, end) of every LLM forward: the first is the prefill, each later one a token."""

    def __init__(self, llm):
        self.marks: list[list[float]] = []
        self.hooks = [llm.register_forward_pre_hook(lambda *_: self.marks.append([time.perf_counter()])),
                      llm.register_forward_hook(lambda *_: self.marks[-1].append(time.perf_counter()))]

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()


def hilight_side(model, prompt: list[int], new_tokens: int, repeats: int) -> dict:
    """Prefill and decode through ``model.llm.generate`` (greedy, exactly ``new_tokens``), medians
    of ``repeats`` runs after a warm-up."""
    marks = Marks(model.llm)
    ids = torch.tensor([prompt])
    prefill, decode = [], []
    with torch.inference_mode():
        for _ in range(repeats + 1):
            marks.marks.clear()
            model.llm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                               min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                               pad_token_id=model.config.llm.pad_token_id)
            (p0, p1), last = marks.marks[0], marks.marks[-1][1]
            prefill.append(p1 - p0)
            decode.append((len(marks.marks) - 1) / (last - p1))
    marks.close()
    prefill_s = statistics.median(prefill[1:])
    return {"prefill_s": prefill_s, "prefill_tokens_per_s": len(prompt) / prefill_s,
            "decode_tokens_per_s": statistics.median(decode[1:])}


class _Clock:
    """A streamer that notes when each put arrives: the (skipped) prompt, then every token."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def llamacpp_side(model, fmt: str, work: Path, prompt: list[int], new_tokens: int, repeats: int) -> dict:
    """HiLight's LLM through ``--quantize q4_k_m`` / ``q8_0``: written as GGUF by HiLight, quantized by
    llama.cpp, run on the prompt's embeddings as HiLight builds them (``model.embed``), decoded
    with no stop token; medians of ``repeats`` runs after a warm-up, each from an empty cache."""
    from hilight.inference.llamacpp import LlamaCppLLM, export
    from hilight.tokenizer import DEMO_CORPUS, train_tokenizer

    tokenizer = train_tokenizer(DEMO_CORPUS, vocab_size=300)  # token strings only: prompts are ids
    work.mkdir(parents=True, exist_ok=True)
    path = export(model, tokenizer, fmt, work / f"random-{model.config.llm.hidden_size}-{fmt}.gguf")
    runner = LlamaCppLLM(path, model.llm.get_input_embeddings(), len(prompt) + new_tokens)
    model.llm.model.layers = torch.nn.ModuleList()  # llama.cpp holds the decoder: free torch's copy
    gc.collect()
    reset_peak_rss()  # from here: what a running HiLight holds (towers, embedding, llama.cpp's weights)
    embeds = model.embed(torch.tensor([prompt]), None)
    mask = torch.ones(1, len(prompt), dtype=torch.long)
    prefill, decode = [], []
    for _ in range(repeats + 1):
        runner.held = []  # nothing reused: the whole prompt runs
        clock = _Clock()
        start = time.perf_counter()
        runner.generate(embeds, mask, new_tokens, False, 1, [], model.config.llm.pad_token_id, streamer=clock)
        prefill.append(clock.times[0] - start)
        decode.append((len(clock.times) - 2) / (clock.times[-1] - clock.times[1]))
    prefill_s = statistics.median(prefill[1:])
    weights = tensor_bytes(path)
    runner.close()
    return {"prefill_s": prefill_s, "prefill_tokens_per_s": len(prompt) / prefill_s,
            "decode_tokens_per_s": statistics.median(decode[1:]), "weight_bytes": weights, "gguf": path.name,
            "peak_rss_running_gb": peak_rss_gb()}


def tensor_bytes(path: Path) -> int:
    """Bytes of a GGUF file's tensors (the tied embedding is read whole as the LM head)."""
    import gguf

    return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="hilight-2b")
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--llamacpp-python", type=Path, default=HERE.parent / ".venv-llamacpp" / "bin" / "python")
    parser.add_argument("--work", type=Path, default=HERE / ".cache" / "llamacpp", help="HF and GGUF files (kept)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "llamacpp.json")
    args = parser.parse_args()
    if not args.llamacpp_python.is_file():
        raise SystemExit(f"no llama.cpp Python at {args.llamacpp_python}: run benchmarks/llamacpp-setup.sh first")
    config = preset(args.preset)
    llm = config.llm
    prompt = [int(t) for t in np.random.default_rng(0).integers(4, llm.vocab_size, args.prompt)]
    context = args.prompt + args.new_tokens // 2  # the mean context while decoding
    bandwidth = read_bandwidth_gbs(2048)
    machine = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "read_bandwidth_gbs": bandwidth,
               "matmul_bf16_gflops": matmul_gflops(torch.bfloat16)}

    hf = args.work / f"{args.preset}-hf"
    results: dict = {}
    for mode in args.modes:
        gc.collect()
        reset_peak_rss()
        model = random_model(config, torch.bfloat16)  # seed 0: the same weights every time
        if not (hf / "model.safetensors").is_file() and not (hf / "model.safetensors.index.json").is_file():
            model.llm.save_pretrained(hf)  # what llama.cpp's converter reads
        start = time.perf_counter()
        if mode in ("q8_0", "q4_k_m"):
            figures = llamacpp_side(model, mode, args.work, prompt, args.new_tokens, args.repeats)
            per_token = figures["weight_bytes"] + 2 * llm.num_layers * llm.num_kv_heads * llm.head_dim * context * 2
            mode = f"{mode.upper()} (llama.cpp)"
        else:
            quantize_llm(model, mode=mode)
            figures = hilight_side(model, prompt, args.new_tokens, args.repeats)
            per_token = decode_bytes_per_token(model, context)
        results[f"hilight {mode}"] = {**figures, "quantize_and_run_s": time.perf_counter() - start,
                                      "decode_bytes_per_token": per_token,
                                      "decode_bound_tokens_per_s": bandwidth * 1e9 / per_token,
                                      "peak_rss_gb": peak_rss_gb()}
        print(f"hilight {mode}: {json.dumps(results[f'hilight {mode}'])}", flush=True)
        del model
    gc.collect()

    side = subprocess.run([str(args.llamacpp_python), str(HERE / "llamacpp_side.py"), "--hf", str(hf), "--work",
                           str(args.work), "--prompt", str(args.prompt), "--new-tokens", str(args.new_tokens),
                           "--repeats", str(args.repeats), "--threads", str(torch.get_num_threads())],
                          check=True, stdout=subprocess.PIPE, text=True)  # its progress and errors show
    llama = json.loads(side.stdout.strip().splitlines()[-1])
    kv = 2 * llm.num_layers * llm.num_kv_heads * llm.head_dim * context * 2  # f16 KV cache
    for name, figures in llama["formats"].items():
        per_token = figures["weight_bytes"] + kv
        results[f"llama.cpp {name.upper()}"] = {**figures, "decode_bytes_per_token": per_token,
                                                "decode_bound_tokens_per_s": bandwidth * 1e9 / per_token}

    print(f"{args.preset} LLM, {args.prompt}-token prompt, {args.new_tokens} greedy tokens, "
          f"{machine['threads']} threads, read bandwidth {bandwidth:.1f} GB/s")
    print(f"{'':22}{'prefill tok/s':>14}{'decode tok/s':>14}{'GiB/token':>11}{'bound tok/s':>13}{'of bound':>10}")
    for name, r in results.items():
        print(f"{name:22}{r['prefill_tokens_per_s']:14.1f}{r['decode_tokens_per_s']:14.2f}"
              f"{r['decode_bytes_per_token'] / 2**30:11.2f}{r['decode_bound_tokens_per_s']:13.2f}"
              f"{r['decode_tokens_per_s'] / r['decode_bound_tokens_per_s']:10.1%}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"preset": args.preset, "prompt_tokens": args.prompt, "new_tokens": args.new_tokens,
                                    "machine": machine, "llama_cpp": {k: v for k, v in llama.items() if k != "formats"},
                                    "results": results}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
