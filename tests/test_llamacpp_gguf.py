"""The GGUF file HiLight writes for llama.cpp (``--quantize q4_k_m`` / ``q8_0``): every LLM
weight under llama.cpp's Gemma names, as stored (norms as 1 + w), and the model's shape in its
metadata. llama.cpp itself (loading, answers, caches) is tests/integration/test_llamacpp.py's."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from hilight.errors import ConfigError
from hilight.inference.llamacpp import write_gguf

gguf = pytest.importorskip("gguf")


def _field(reader, name: str):
    field = reader.fields[name]
    return field.contents()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gguf_holds_every_llm_weight_under_gemma_names(tmp_path, model, tokenizer, dtype):
    model = model.to(dtype)
    with torch.no_grad():
        for p in model.llm.parameters():
            p.normal_(0, 0.1)
    write_gguf(model, tokenizer, tmp_path / "llm.gguf")
    reader = gguf.GGUFReader(tmp_path / "llm.gguf")
    cfg = model.config.llm
    assert _field(reader, "general.architecture") == "gemma"
    assert _field(reader, "gemma.block_count") == cfg.num_layers
    assert _field(reader, "gemma.embedding_length") == cfg.hidden_size
    assert _field(reader, "gemma.feed_forward_length") == cfg.intermediate_size
    assert _field(reader, "gemma.attention.head_count") == cfg.num_heads
    assert _field(reader, "gemma.attention.head_count_kv") == cfg.num_kv_heads
    assert _field(reader, "gemma.attention.key_length") == cfg.head_dim
    assert _field(reader, "gemma.context_length") == cfg.max_position_embeddings
    assert _field(reader, "tokenizer.ggml.eos_token_id") == cfg.eos_token_id
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == len(set(tokens)) == cfg.vocab_size
    assert tokens[:len(tokenizer)] == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))

    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 2 + 9 * cfg.num_layers
    llm = model.llm.model

    def stored(name: str) -> torch.Tensor:
        t = tensors[name]
        shape = [int(n) for n in reversed(t.shape)]  # GGUF lists the fastest dimension first
        if t.tensor_type == gguf.GGMLQuantizationType.BF16:
            return torch.from_numpy(np.array(t.data).view(np.int16).reshape(shape)).view(torch.bfloat16)
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        return torch.from_numpy(np.array(t.data).reshape(shape))

    kind = gguf.GGMLQuantizationType.BF16 if dtype == torch.bfloat16 else gguf.GGMLQuantizationType.F32
    assert tensors["token_embd.weight"].tensor_type == kind
    assert torch.equal(stored("token_embd.weight"), llm.embed_tokens.weight.detach())
    last = llm.layers[-1]
    i = cfg.num_layers - 1
    assert torch.equal(stored(f"blk.{i}.attn_k.weight"), last.self_attn.k_proj.weight.detach())
    assert torch.equal(stored(f"blk.{i}.ffn_down.weight"), last.mlp.down_proj.weight.detach())
    assert torch.equal(stored(f"blk.{i}.attn_output.weight"), last.self_attn.o_proj.weight.detach())
    # Gemma multiplies by (1 + w); llama.cpp by the weight as stored
    assert torch.allclose(stored(f"blk.{i}.ffn_norm.weight"), 1 + last.post_attention_layernorm.weight.detach().float())
    assert torch.allclose(stored("output_norm.weight"), 1 + llm.norm.weight.detach().float())


def test_without_llama_cpp_the_format_is_refused_before_loading(tmp_path, monkeypatch):
    from hilight.inference.engine import Engine

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails as where it is not installed
    with pytest.raises(ConfigError, match=r"pip install 'hilight\[llamacpp\]'"):
        Engine.from_checkpoint(tmp_path / "no-such-model", quantize="q4_k_m")
    with pytest.raises(ConfigError, match="CPU only"):
        Engine.from_checkpoint(tmp_path / "no-such-model", quantize="q8_0", device="cuda")
