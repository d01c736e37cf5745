"""HiLight's LLM run by llama.cpp: the towers and TokenMining stay in torch, the Gemma decoder
runs as a GGUF file (``--quantize q4_k_m`` or ``q8_0``) in llama.cpp's CPU kernels.

llama.cpp has no video input, but it takes a prompt as embeddings (``llama_batch.embd``): HiLight
builds every position's embedding as it always does (text tokens from its own embedding table,
each video's tokens from TokenMining) and hands the rows to llama.cpp; answer tokens go back in
the same way, so every input row comes from HiLight's exact table. llama.cpp's Gemma graph
multiplies its input by sqrt(hidden_size), as HiLight's token embedding already did, so the rows
are divided by that factor on the way in.

The GGUF file is written once per checkpoint and format (the ``gguf`` package writes the
weights as they are; llama.cpp's own quantizer makes Q4_K_M / Q8_0 of them) into
``$HILIGHT_CACHE`` (default ``~/.cache/hilight``)/gguf. Its vocabulary is HiLight's token
strings, only so that llama.cpp loads it: HiLight tokenizes and detokenizes itself. Gemma's
norm weights are stored as ``1 + w`` (llama.cpp multiplies by the weight as stored).

Numerics differ from HiLight's torch path in the quantization and in one known place: llama.cpp's
Gemma computes the tanh GELU where ``hilight-2b`` computes the exact one (the released weights were
trained with it); docs/performance.md gives the accuracy measured on the bundled model.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import math
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from hilight.errors import ConfigError

log = logging.getLogger(__name__)

FORMATS = ("q4_k_m", "q8_0")  # the --quantize names that run the LLM in llama.cpp
_FTYPES = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0"}
BATCH = 512  # prompt positions per llama_decode call
GGUF_VERSION = 1  # bump when the file written for a checkpoint changes


def _missing(e: ImportError) -> ConfigError:
    return ConfigError(f"--quantize {'/'.join(FORMATS)} runs the LLM in llama.cpp, which is not installed "
                       f"({e.name}): pip install 'hilight[llamacpp]'")


def _gguf():
    try:
        import gguf
    except ImportError as e:
        raise _missing(e) from e
    return gguf


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError as e:
        raise _missing(e) from e
    if not _CALLBACK:
        _CALLBACK.append(llama_cpp.llama_log_callback(_relay))
        llama_cpp.llama_log_set(_CALLBACK[0], ctypes.c_void_p(0))
    return llama_cpp


def _digest(row: np.ndarray) -> bytes:
    """What identifies an input row in llama.cpp's cache: its bytes, hashed."""
    return hashlib.blake2b(row.tobytes(), digest_size=16).digest()


def require() -> None:
    """Raise the install hint now, before a long model load, where llama.cpp is missing."""
    _gguf()
    _llama_cpp()


_CALLBACK = []  # the one log callback, kept alive for as long as llama.cpp may call it


def _relay(level: int, text: bytes, user_data) -> None:
    """llama.cpp's log: warnings and errors only, through Python's logging. The vocabulary has
    no SentencePiece newline piece (HiLight tokenizes itself): that warning is expected."""
    message = (text or b"").decode(errors="replace").rstrip()
    if level in (3, 4) and message and "newline token not found" not in message:  # GGML_LOG_LEVEL_WARN, _ERROR
        log.warning(message)


def cache_dir() -> Path:
    return Path(os.environ.get("HILIGHT_CACHE") or Path.home() / ".cache" / "hilight") / "gguf"


def checkpoint_key(files: Sequence[Path], config: dict, dtype: torch.dtype) -> str:
    """Names a checkpoint's GGUF files: its weight files (path, size, modification time), its
    config and the dtype it was loaded in."""
    parts = [json.dumps(config, sort_keys=True), str(dtype), str(GGUF_VERSION)]
    for f in files:
        stat = Path(f).stat()
        parts.append(f"{Path(f).resolve()}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]


def _vocabulary(tokenizer, size: int) -> list[str]:
    """``size`` distinct token strings: the tokenizer's, then placeholders for unused rows."""
    names = tokenizer.convert_ids_to_tokens(list(range(min(len(tokenizer), size))))
    seen, out = set(), []
    for i, name in enumerate(names):
        name = name if name and name not in seen else f"<unused_{i}>"
        seen.add(name)
        out.append(name)
    out += [f"<unused_{i}>" for i in range(len(out), size)]
    return out


def write_gguf(model, tokenizer, path: str | Path) -> None:
    """Write HiLight's LLM (a transformers Gemma) as a GGUF file, weights as they are: bf16 for a
    bf16 model, f32 otherwise (norms always f32)."""
    gguf = _gguf()
    cfg = model.config.llm
    llm = model.llm.model
    bf16 = next(llm.parameters()).dtype == torch.bfloat16
    writer = gguf.GGUFWriter(str(path), "gemma")
    writer.add_name("HiLight LLM")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_BF16 if bf16 else gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.num_kv_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta)
    special = {tokenizer.convert_tokens_to_ids(t) for t in tokenizer.all_special_tokens}
    tokens = _vocabulary(tokenizer, cfg.vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.UNUSED
                            if t.startswith("<unused_") else gguf.TokenType.NORMAL for i, t in enumerate(tokens)])
    writer.add_bos_token_id(cfg.bos_token_id)
    writer.add_eos_token_id(cfg.eos_token_id)
    writer.add_pad_token_id(cfg.pad_token_id)
    writer.add_add_bos_token(False)

    def matrix(name: str, weight: torch.Tensor) -> None:
        weight = weight.detach().cpu()
        if bf16:
            data = weight.to(torch.bfloat16).contiguous().view(torch.uint8).numpy()  # [rows, 2 * cols] bytes
            writer.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType.BF16)
        else:
            writer.add_tensor(name, weight.float().numpy())

    def norm(name: str, weight: torch.Tensor) -> None:
        writer.add_tensor(name, (1.0 + weight.detach().float().cpu()).numpy())  # Gemma: x * (1 + w)

    matrix("token_embd.weight", llm.embed_tokens.weight)
    for i, layer in enumerate(llm.layers):
        attn, mlp = layer.self_attn, layer.mlp
        norm(f"blk.{i}.attn_norm.weight", layer.input_layernorm.weight)
        for short, proj in (("q", attn.q_proj), ("k", attn.k_proj), ("v", attn.v_proj), ("output", attn.o_proj)):
            matrix(f"blk.{i}.attn_{short}.weight", proj.weight)
        norm(f"blk.{i}.ffn_norm.weight", layer.post_attention_layernorm.weight)
        for short, proj in (("gate", mlp.gate_proj), ("up", mlp.up_proj), ("down", mlp.down_proj)):
            matrix(f"blk.{i}.ffn_{short}.weight", proj.weight)
    norm("output_norm.weight", llm.norm.weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def export(model, tokenizer, fmt: str, out: Path) -> Path:
    """``out``, the GGUF file of this LLM in ``fmt`` (written and quantized once, then reused)."""
    llama_cpp = _llama_cpp()
    if out.is_file():
        return out
    directory = out.parent
    source = out.with_name(f"{out.name}.{os.getpid()}.source.part")
    part = out.with_name(f"{out.name}.{os.getpid()}.part")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        log.info("writing the LLM as GGUF (%s) for llama.cpp, once for this checkpoint: %s", fmt, out)
        with tqdm(total=2, desc=f"LLM to GGUF {fmt} (once per checkpoint)", unit="step") as bar:
            write_gguf(model, tokenizer, source)
            bar.update()
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = getattr(llama_cpp, _FTYPES[fmt])
            params.nthread = torch.get_num_threads()
            if llama_cpp.llama_model_quantize(str(source).encode(), str(part).encode(), params) != 0:
                raise ConfigError(f"llama.cpp could not quantize the LLM to {fmt} (in {directory}: is the disk full?)")
            bar.update()
        part.replace(out)  # whole or absent: a crash leaves only .part files
    except OSError as e:
        raise ConfigError(f"cannot write the LLM's GGUF file in {directory} ({e.strerror or e}); "
                          f"set HILIGHT_CACHE to a writable folder") from e
    finally:
        for leftover in (source, part):
            with contextlib.suppress(OSError):  # absent, or the folder never was
                leftover.unlink()
    return out


def gguf_file(checkpoint: str | Path, fmt: str, dtype: torch.dtype | None) -> Path:
    """Where the GGUF file of this checkpoint's LLM in ``fmt`` is kept (it may not exist yet).
    Checks that llama.cpp is installed first: the hint comes before a long load."""
    from hilight.checkpoint import read_config, weight_files
    from hilight.config import to_dict

    require()
    if fmt not in FORMATS:
        raise ConfigError(f"unknown llama.cpp format {fmt!r} ({', '.join(FORMATS)})")
    key = checkpoint_key(weight_files(checkpoint), to_dict(read_config(checkpoint)), dtype)
    return cache_dir() / f"{key}-{fmt}.gguf"


def attach(model, tokenizer, fmt: str, path: Path) -> None:
    """Run ``model``'s LLM in llama.cpp from now on, from the GGUF file ``path`` (written from the
    model's decoder layers first where it does not exist); the torch decoder layers are freed,
    the token embedding stays: HiLight builds the prompt's rows with it."""
    llm = model.llm
    if not path.is_file():
        if not len(llm.model.layers):
            raise ConfigError(f"{path} is gone: load the model with its LLM layers to write it again")
        export(model, tokenizer, fmt, path)
    model.llamacpp = LlamaCppLLM(path, llm.get_input_embeddings(), model.config.llm.max_position_embeddings)
    llm.model.layers = torch.nn.ModuleList()  # llama.cpp holds the decoder now


def _has_amx() -> bool:
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


class LlamaCppLLM:
    """A GGUF LLM in llama.cpp, fed HiLight's embeddings.

    One context at a time, sized for what a call needs (recreated when a call needs more
    sequences or positions). A one-row call keeps its KV cache: the next one-row call runs only
    the positions after the longest prefix whose input rows match (a follow-up turn of a
    conversation, or the same video asked again). Calls from several threads take turns (a
    llama.cpp context runs one batch at a time); the server's batcher puts concurrent requests
    into one call."""

    def __init__(self, path: str | Path, embed_tokens: torch.nn.Module, context: int, threads: int | None = None):
        llama_cpp = _llama_cpp()
        self.lib = llama_cpp
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        # llama.cpp's repacked kernels are what make it fast; on AMX machines this release's
        # AMX layouts crashed on some shapes (docs/performance.md), so the weights stay as stored
        params.use_extra_bufts = not _has_amx()
        self.path = Path(path)
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            raise ConfigError(f"llama.cpp could not load {path}")
        self.width = llama_cpp.llama_model_n_embd(self.model)
        self.vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.embed_tokens = embed_tokens
        self.scale = math.sqrt(self.width)  # what llama.cpp's Gemma multiplies its input by
        self.context = context
        self.threads = threads or torch.get_num_threads()
        self.ctx = None
        self.shape = (0, 0)  # (sequences, positions) of the context
        self.held: list[bytes] = []  # digests of the input rows in sequence 0's cache
        self.batch = llama_cpp.llama_batch_init(BATCH, self.width, 1)
        self.reused = 0  # positions the last call took from the cache
        self.lock = threading.RLock()

    def close(self) -> None:
        if self.ctx:
            self.lib.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            self.lib.llama_batch_free(self.batch)
            self.lib.llama_model_free(self.model)
            self.model = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the library may be gone already
            pass

    def _context(self, sequences: int, positions: int) -> None:
        if self.ctx and sequences <= self.shape[0] and positions <= self.shape[1]:
            return
        lib = self.lib
        if self.ctx:
            lib.llama_free(self.ctx)
        sequences = max(sequences, self.shape[0])
        positions = max(positions, self.shape[1], 256)
        positions = -(-positions // 256) * 256
        params = lib.llama_context_default_params()
        params.n_ctx = positions
        params.n_batch = params.n_ubatch = BATCH
        params.n_seq_max = sequences
        params.kv_unified = True  # the sequences share one pool of `positions` cells
        params.n_threads = params.n_threads_batch = self.threads
        params.no_perf = True
        self.ctx = lib.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise ConfigError(f"llama.cpp could not make a context of {positions} positions")
        self.shape = (sequences, positions)
        self.held = []

    def _decode(self, rows: np.ndarray, seqs: Sequence[int], positions: Sequence[int],
                logits: Sequence[bool]) -> None:
        """One llama_decode over ``rows`` [n <= BATCH, D] (float32, divided by the scale)."""
        batch, n = self.batch, rows.shape[0]
        ctypes.memmove(batch.embd, rows.ctypes.data, rows.nbytes)
        for i in range(n):
            batch.pos[i] = positions[i]
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seqs[i]
            batch.logits[i] = logits[i]
        batch.n_tokens = n
        code = self.lib.llama_decode(self.ctx, batch)
        if code != 0:
            self.held = []
            raise RuntimeError(f"llama.cpp could not run the batch (llama_decode returned {code})")

    def _rows(self, embeds: torch.Tensor) -> np.ndarray:
        return np.ascontiguousarray((embeds.float() / self.scale).cpu().numpy())

    def _logits(self, index: int, copy: bool = True) -> torch.Tensor:
        """The logits of the last batch's ``index``-th output row; without ``copy``, a view that
        the next llama_decode overwrites."""
        pointer = self.lib.llama_get_logits_ith(self.ctx, index)
        view = np.ctypeslib.as_array(pointer, shape=(self.vocab,))
        return torch.from_numpy(view.copy() if copy else view)

    def _prefill(self, rows: np.ndarray, seq: int, start: int, every: bool = False) -> list[torch.Tensor]:
        """Run ``rows`` from position ``start`` of sequence ``seq``: the last row's logits, or
        every row's with ``every``."""
        out = []
        for lo in range(0, len(rows), BATCH):
            chunk = rows[lo:lo + BATCH]
            n = len(chunk)
            wanted = [every or lo + i == len(rows) - 1 for i in range(n)]
            self._decode(chunk, [seq] * n, range(start + lo, start + lo + n), wanted)
            out += [self._logits(i) for i in range(n) if wanted[i]]
        return out

    def _resume(self, rows: np.ndarray, limit: int) -> tuple[int, list[bytes]]:
        """How many leading positions of sequence 0's cache ``rows`` can keep (at most ``limit``;
        the rest is dropped), and every row's digest, to record once the rows have run."""
        from hilight.inference.engine import common_prefix

        digests = [_digest(r) for r in rows]
        held = common_prefix(self.held, digests, limit)
        memory = self.lib.llama_get_memory(self.ctx)
        if not self.lib.llama_memory_seq_rm(memory, 0, held, -1):
            self.lib.llama_memory_clear(memory, True)
            held = 0
        self.held = digests[:held]
        return held, digests

    def generate(self, *args, **kwargs) -> torch.Tensor:
        """New token ids [B, <= max_new_tokens] for left-padded prompt embeddings [B, L, D], as
        transformers' ``generate`` returns them (finished rows padded with ``pad_token_id``)."""
        with self.lock:
            return self._generate(*args, **kwargs)

    @torch.inference_mode()
    def _generate(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                 do_sample: bool, num_beams: int, eos_token_id: Sequence[int], pad_token_id: int,
                 streamer=None, stopping_criteria=None, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int = 0, **_) -> torch.Tensor:
        if num_beams != 1:
            raise ConfigError("beam search is not available with the llama.cpp formats (q4_k_m, q8_0)")
        prompts = [self._rows(e[m.bool()]) for e, m in zip(inputs_embeds, attention_mask, strict=True)]
        one = len(prompts) == 1
        # one row: room for the whole context, so the next turn finds its cache
        self._context(len(prompts), max(self.context if one else 0, sum(len(p) + max_new_tokens for p in prompts)))
        if not one:
            self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)
            self.held = []
        warp = LogitsProcessorList()
        if do_sample:
            warp.append(TemperatureLogitsWarper(temperature))
            if top_k:
                warp.append(TopKLogitsWarper(top_k))
            if top_p < 1:
                warp.append(TopPLogitsWarper(top_p))
        self.reused = 0
        scores = []
        for seq, rows in enumerate(prompts):
            # one row: the last one runs again, its logits start the reply
            start, digests = self._resume(rows, len(rows) - 1) if one else (0, [])
            self.reused = start
            scores.append(self._prefill(rows[start:], seq, start)[0])
            if one:
                self.held = digests
        if streamer is not None:
            streamer.put(torch.zeros(len(prompts), 0, dtype=torch.long))  # the prompt: skipped
        lengths = [len(p) for p in prompts]
        finished = [False] * len(prompts)
        out: list[list[int]] = [[] for _ in prompts]
        stops = set(eos_token_id)
        blank = torch.zeros(self.vocab)
        for step in range(max_new_tokens):
            logits = scores[0][None] if one else torch.stack(scores)  # [B, V]
            so_far = torch.tensor([row for row in out], dtype=torch.long).view(len(out), step)
            if do_sample:
                probs = torch.softmax(warp(so_far, logits), dim=-1)
                chosen = torch.multinomial(probs, 1)[:, 0]
            else:
                chosen = logits.argmax(-1)
            tokens = [pad_token_id if done else int(t) for t, done in zip(chosen, finished, strict=True)]
            for i, token in enumerate(tokens):
                out[i].append(token)
                finished[i] = finished[i] or token in stops
            if streamer is not None:
                streamer.put(torch.tensor(tokens))
            if stopping_criteria is not None:
                halted = stopping_criteria(torch.tensor(out), None)
                finished = [f or bool(h) for f, h in zip(finished, halted, strict=True)]
            if all(finished) or step == max_new_tokens - 1:
                break
            active = [i for i, done in enumerate(finished) if not done]
            rows = self._rows(self.embed_tokens(torch.tensor([tokens[i] for i in active])))  # [A, D]
            self._decode(rows, active, [lengths[i] + step for i in active], [True] * len(active))
            if one:
                self.held.append(_digest(rows[0]))
            fresh = {i: self._logits(j, copy=False) for j, i in enumerate(active)}  # read before the next decode
            scores = [fresh.get(i, blank) for i in range(len(prompts))]  # finished rows: pad comes anyway
        if streamer is not None:
            streamer.end()
        return torch.tensor(out, dtype=torch.long)

    @torch.inference_mode()
    def logits(self, embeds: torch.Tensor, start: int) -> torch.Tensor:
        """Logits [L - start, V] of positions ``start`` .. L-1 of one prompt's embeddings [L, D]
        (the positions before ``start`` come from the cache where they match)."""
        with self.lock:
            return self._all_logits(embeds, start)

    def _all_logits(self, embeds: torch.Tensor, start: int) -> torch.Tensor:
        rows = self._rows(embeds)
        self._context(1, max(self.context, len(rows)))
        held, digests = self._resume(rows, start)
        out = self._prefill(rows[held:], 0, held, every=True)
        self.held = digests
        return torch.stack(out[start - held:])
