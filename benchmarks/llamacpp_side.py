"""The llama.cpp half of ``benchmarks/llamacpp.py``, run by the Python that
``benchmarks/llamacpp-setup.sh`` builds (llama-cpp-python, and llama.cpp's converter beside it).

Given a Hugging Face Gemma directory (HiLight's LLM as ``save_pretrained`` writes it), it writes
a SentencePiece ``tokenizer.model`` if there is none (the converter needs one; the benchmark's
prompts are token ids, so its pieces do not matter: the converter pads the vocabulary to the
model's size), converts to GGUF with llama.cpp's own ``convert_hf_to_gguf.py`` (bf16 and Q8_0),
quantizes the bf16 file to Q4_K_M with llama.cpp's quantizer, and times each format: prefill of
the prompt in one batch, then greedy decoding one token at a time. Prints one JSON object.

Each format is timed in a child process with llama.cpp's defaults, which repack quantized
weights into its CPU kernels' layouts ("extra buffer types"). Where that child crashes (this
release's repacked Q8_0 and Q4_K_M kernels segfault on some shapes, seen on a 256-wide model) the
format is timed again with the weights as stored, and the result says which (``repacked``).

    .venv-llamacpp/bin/python benchmarks/llamacpp_side.py --hf DIR --work DIR [--formats q8_0 q4_k_m]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONVERTER = Path(__file__).parent / ".cache" / "llama.cpp" / "convert_hf_to_gguf.py"


def tokenizer_model(hf: Path) -> None:
    """A small SentencePiece model in ``hf`` (with Gemma's first ids: pad 0, eos 1, bos 2, unk 3)."""
    if (hf / "tokenizer.model").is_file():
        return
    import sentencepiece as spm

    words = "which ball went into the pocket first and how many times did the cue hit a cushion red blue".split()
    lines = [" ".join(words[(i * 7 + k) % len(words)] for k in range(12)) for i in range(2000)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(hf / "tokenizer"), vocab_size=120,
                                   hard_vocab_limit=False, model_type="bpe", pad_id=0, eos_id=1, bos_id=2, unk_id=3, minloglevel=2)


def convert(hf: Path, work: Path, outtype: str) -> Path:
    out = work / f"hilight-llm-{outtype}.gguf"
    if not out.is_file():
        part = out.with_suffix(".part")
        subprocess.run([sys.executable, str(CONVERTER), str(hf), "--outtype", outtype, "--outfile", str(part)],
                       check=True, stdout=subprocess.DEVNULL)
        part.rename(out)
    return out


def quantize(source: Path, work: Path, name: str) -> Path:
    import llama_cpp

    out = work / f"hilight-llm-{name}.gguf"
    if not out.is_file():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name.upper()}")
        params.nthread = os.cpu_count() or 1
        part = out.with_suffix(".part")
        if llama_cpp.llama_model_quantize(str(source).encode(), str(part).encode(), params) != 0:
            raise RuntimeError(f"llama.cpp could not quantize {source} to {name}")
        part.rename(out)
    return out


def tensor_bytes(path: Path) -> int:
    """Bytes of the weights a decode step reads: every tensor (Gemma's output head is the tied
    token embedding, read whole for the logits)."""
    sys.path.insert(0, str(CONVERTER.parent / "gguf-py"))  # the same release's gguf package
    import gguf

    return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)


def timed(path: Path, prompt: list[int], new_tokens: int, repeats: int, threads: int, repack: bool) -> dict:
    """Prefill ``prompt`` in one batch and decode ``new_tokens`` greedily, ``repeats`` times after
    a warm-up; medians of the wall clock around llama.cpp's calls, and llama.cpp's own counters
    of the last repeat. ``repack`` is llama.cpp's ``use_extra_bufts`` (its default: on)."""
    import llama_cpp
    import llama_cpp.llama
    import numpy as np

    defaults = llama_cpp.llama_model_default_params

    def model_params():  # Llama() takes no use_extra_bufts of its own
        params = defaults()
        params.use_extra_bufts = repack
        return params

    llama_cpp.llama.llama_cpp.llama_model_default_params = model_params
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(prompt) + new_tokens + 8, n_batch=len(prompt),
                          n_ubatch=len(prompt), n_threads=threads, n_threads_batch=threads, verbose=False)
    prefill, decode = [], []
    for _ in range(repeats + 1):
        llm.reset()
        llama_cpp.llama_perf_context_reset(llm.ctx)
        start = time.perf_counter()
        llm.eval(prompt)
        prefilled = time.perf_counter()
        for _ in range(new_tokens):  # the last token's logits (Llama.scores keeps them only with logits_all)
            logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
            llm.eval([int(np.argmax(logits))])
        end = time.perf_counter()
        prefill.append(prefilled - start)
        decode.append(end - prefilled)
    perf = llama_cpp.llama_perf_context(llm.ctx)
    del llm
    prefill_s, decode_s = statistics.median(prefill[1:]), statistics.median(decode[1:])
    return {"repacked": repack, "prefill_tokens_per_s": len(prompt) / prefill_s,
            "decode_tokens_per_s": new_tokens / decode_s, "prefill_s": prefill_s, "decode_s": decode_s,
            "llamacpp_counters": {"prefill_tokens_per_s": 1e3 * perf.n_p_eval / perf.t_p_eval_ms,
                                  "decode_tokens_per_s": 1e3 * perf.n_eval / perf.t_eval_ms}}


def timed_apart(path: Path, args: argparse.Namespace) -> dict:
    """``timed`` in a child process, repacked first and as stored if that one crashes."""
    for repack in (True, False):
        child = subprocess.run([sys.executable, __file__, "--time", str(path), "--repack", str(int(repack)),
                                "--hf", str(args.hf), "--work", str(args.work), "--prompt", str(args.prompt),
                                "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats),
                                "--threads", str(args.threads)], stdout=subprocess.PIPE, text=True)
        if child.returncode == 0:
            return json.loads(child.stdout.strip().splitlines()[-1])
        print(f"llama.cpp on {path.name} with repack={repack} exited {child.returncode}", file=sys.stderr)
    raise RuntimeError(f"llama.cpp could not run {path.name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf", type=Path, required=True, help="HiLight's LLM as a Hugging Face Gemma directory")
    parser.add_argument("--work", type=Path, required=True, help="where the GGUF files go")
    parser.add_argument("--formats", nargs="+", default=["q8_0", "q4_k_m"])
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--time", type=Path, help=argparse.SUPPRESS)  # a child: time this file only
    parser.add_argument("--repack", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    import llama_cpp

    vocab = json.loads((args.hf / "config.json").read_text())["vocab_size"]
    prompt = [int(t) for t in __import__("numpy").random.default_rng(0).integers(4, vocab, args.prompt)]
    if args.time:
        print(json.dumps(timed(args.time, prompt, args.new_tokens, args.repeats, args.threads, bool(args.repack))))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    tokenizer_model(args.hf)
    files = {}
    for name in args.formats:
        if name in ("bf16", "f16", "q8_0"):
            files[name] = convert(args.hf, args.work, name)
        else:  # llama.cpp's k-quants are made by its quantizer, from the 16-bit file
            files[name] = quantize(convert(args.hf, args.work, "bf16"), args.work, name)
    out = {"llama_cpp_python": llama_cpp.__version__, "threads": args.threads, "system_info":
           llama_cpp.llama_print_system_info().decode(), "formats": {}}
    for name, path in files.items():
        out["formats"][name] = {"file_bytes": path.stat().st_size, "weight_bytes": tensor_bytes(path),
                                **timed_apart(path, args)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
