import torch
import torch.nn.functional as F

from hilight.inference.engine import Conversation, Engine, GenerationSettings, resolve_dtype, stream_reply
from hilight.model import HiLight
from tests.conftest import clips, talkative_checkpoint


def test_resolve_dtype():
    assert resolve_dtype("fp32") == torch.float32 and resolve_dtype("bf16") == torch.bfloat16
    assert resolve_dtype("auto") in (torch.float32, torch.bfloat16, torch.float16)


def test_bf16_towers_stay_close_to_fp32(config):
    torch.manual_seed(0)
    model = HiLight(config).eval()
    pixels = clips(config, 2)
    with torch.no_grad():
        ref = model.encode_videos(pixels)
        ref_tokens = model.video_embeddings(ref)
        model.to(torch.bfloat16)
        low = model.encode_videos(pixels)
        low_tokens = model.video_embeddings(low)
    for a, b in ((ref.video, low.video), (ref.image, low.image), (ref_tokens, low_tokens)):
        cos = F.cosine_similarity(a.flatten(1).float(), b.flatten(1).float(), dim=-1)
        assert (cos > 0.99).all(), cos


def test_bf16_engine_answers(tmp_path, tokenizer):
    path = talkative_checkpoint(tmp_path / "m", tokenizer)
    engine = Engine.from_checkpoint(path, dtype=torch.bfloat16)
    assert {p.dtype for p in engine.model.parameters()} == {torch.bfloat16}
    from hilight.demo import moving_balls_clip
    from hilight.video import write_video

    clip = write_video(tmp_path / "c.mp4", moving_balls_clip(12, 64))
    answer = "".join(stream_reply(engine, Conversation(), "What happens?", [clip], GenerationSettings(8)))
    assert isinstance(answer, str) and engine.video_embeddings(clip).dtype == torch.bfloat16


def _converted(tmp_path, tokenizer, quantize: str, kind: type):
    """The talkative bf16 checkpoint as a plain and a ``quantize`` engine (every LLM linear layer
    and the LM head replaced by ``kind``), their logits on one batch, and a clip to ask about."""
    from hilight.demo import moving_balls_clip
    from hilight.video import write_video

    path = talkative_checkpoint(tmp_path / "m", tokenizer)
    plain = Engine.from_checkpoint(path, dtype=torch.bfloat16, quantize="none")
    converted = Engine.from_checkpoint(path, dtype=torch.bfloat16, quantize=quantize)
    linears = [m for m in converted.model.llm.modules() if isinstance(m, kind)]
    assert len(linears) == 7 * converted.model.config.llm.num_layers + 1  # q k v o gate up down, + LM head
    assert not any(isinstance(m, torch.nn.Linear) for m in converted.model.llm.modules())
    ids = torch.randint(3, len(tokenizer), (2, 9))
    with torch.no_grad():
        ref, out = (e.model.llm(input_ids=ids).logits.float() for e in (plain, converted))
    return path, plain, converted, ref, out, write_video(tmp_path / "c.mp4", moving_balls_clip(12, 64))


def _answer(engine: Engine, clip) -> str:
    return "".join(stream_reply(engine, Conversation(), "What happens?", [clip], GenerationSettings(8)))


def test_int8_llm_stays_close_and_answers(tmp_path, tokenizer):
    import pytest

    from hilight.inference.quantize import Int8Linear, quantize_llm

    path, _, quantized, ref, low, clip = _converted(tmp_path, tokenizer, "int8", Int8Linear)
    assert (F.cosine_similarity(ref, low, dim=-1) > 0.99).all()
    assert quantize_llm(HiLight(quantized.model.config), include_lm_head=False) == 7 * quantized.model.config.llm.num_layers
    assert isinstance(_answer(quantized, clip), str)
    with pytest.raises(ValueError, match="unknown quantization"):
        Engine.from_checkpoint(path, quantize="int3")


def test_int4_layer_is_its_groups_rounded_and_both_paths_agree():
    import pytest

    from hilight.errors import ConfigError
    from hilight.inference.quantize import Int4Linear

    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 192, bias=True).to(torch.bfloat16)
    layer, chunked = Int4Linear(linear), Int4Linear(linear, chunk_rows=64)
    assert torch.equal(layer.packed, chunked.packed) and torch.equal(layer.scale_zero, chunked.scale_zero)
    assert layer.packed.numel() == 192 * 96 // 2  # two weights a byte
    weight, restored = linear.weight.float(), layer.dequantized().float()
    groups = weight.reshape(192, 96 // Int4Linear.GROUP, Int4Linear.GROUP)
    step = (groups.amax(-1) - groups.amin(-1)) / 15  # each group's own 16 levels
    error = (restored - weight).abs().reshape_as(groups)
    assert (error <= step[..., None] * 0.5 + groups.abs().amax(-1, keepdim=True) / 64).all()  # half a level, + bf16
    assert (error > 0).any()  # it is rounded
    few, many = torch.randn(3, 96).to(torch.bfloat16), torch.randn(Int4Linear.DENSE_ROWS, 96).to(torch.bfloat16)
    for x in (few, many):  # the int4 kernel (few rows) and the widened dense product (many)
        expected = x.float() @ restored.t() + linear.bias.float()
        torch.testing.assert_close(layer(x).float(), expected, atol=0.05, rtol=0.02)
    with pytest.raises(ConfigError, match="int4 needs out_features % 64"):
        Int4Linear(torch.nn.Linear(96, 100))


def test_int4_llm_stays_close_and_answers(tmp_path, tokenizer):
    from hilight.inference.quantize import Int4Linear, Int8Linear, int4_fits

    path = talkative_checkpoint(tmp_path / "m", tokenizer)
    plain = Engine.from_checkpoint(path, dtype=torch.bfloat16, quantize="none")
    fits = [int4_fits(m) for m in plain.model.llm.modules() if isinstance(m, torch.nn.Linear)]
    quantized = Engine.from_checkpoint(path, dtype=torch.bfloat16, quantize="int4")
    kinds = [type(m) for m in quantized.model.llm.modules() if isinstance(m, (Int4Linear, Int8Linear))]
    assert kinds == [Int4Linear if f else Int8Linear for f in fits] and Int4Linear in kinds
    assert not any(isinstance(m, torch.nn.Linear) for m in quantized.model.llm.modules())
    ids = torch.randint(3, len(tokenizer), (2, 9))
    with torch.no_grad():
        ref, low = (e.model.llm(input_ids=ids).logits.float() for e in (plain, quantized))
    # 16 levels a group: further than int8 (> 0.99 everywhere) on these deliberately loud weights
    cosine = F.cosine_similarity(ref, low, dim=-1)
    assert cosine.mean() > 0.95 and (cosine > 0.8).all()
    from hilight.demo import moving_balls_clip
    from hilight.video import write_video

    assert isinstance(_answer(quantized, write_video(tmp_path / "c.mp4", moving_balls_clip(12, 64))), str)


def test_packed_llm_gives_the_same_answers(tmp_path, tokenizer):
    import pytest

    from hilight.inference.quantize import PackedLinear

    path, plain, packed, ref, out, clip = _converted(tmp_path, tokenizer, "packed", PackedLinear)
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)  # the same bf16 values, another summation order
    assert _answer(plain, clip) == _answer(packed, clip)
    with pytest.raises(ValueError, match="bf16 models on CPU"):
        Engine.from_checkpoint(path, dtype=torch.float32, quantize="packed")


def test_auto_packs_only_wide_bf16_models_on_a_cpu_with_native_bf16(monkeypatch, config):
    import pytest

    from hilight.inference import quantize
    from hilight.inference.quantize import resolve_quantize

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    if not quantize._packing_works():
        pytest.skip("this torch build has no oneDNN bf16 linear")
    narrow = HiLight(config).to(torch.bfloat16)
    monkeypatch.setattr(quantize, "PACK_FROM_HIDDEN", config.llm.hidden_size)
    assert resolve_quantize("auto", narrow, "cpu") == "packed"
    assert resolve_quantize("auto", narrow, "cuda") == "none"
    assert resolve_quantize("auto", HiLight(config), "cpu") == "none"  # fp32
    assert resolve_quantize("int8", HiLight(config), "cpu") == "int8"
    monkeypatch.setattr(quantize, "PACK_FROM_HIDDEN", config.llm.hidden_size + 1)
    assert resolve_quantize("auto", narrow, "cpu") == "none"  # too narrow for packing to win
    monkeypatch.setattr(quantize, "PACK_FROM_HIDDEN", config.llm.hidden_size)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    assert resolve_quantize("auto", narrow, "cpu") == "none"  # oneDNN would emulate bf16
    with pytest.raises(ValueError, match="unknown quantization"):
        resolve_quantize("int3", narrow, "cpu")


def test_int8_linear_paths_agree_and_quantize_in_chunks():
    from hilight.inference.quantize import Int8Linear

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 300).to(torch.bfloat16)
    whole, chunked = Int8Linear(linear, chunk_rows=10**6), Int8Linear(linear, chunk_rows=7)
    assert torch.equal(whole.weight_int8, chunked.weight_int8) and torch.equal(whole.scales, chunked.scales)
    rows = torch.randn(Int8Linear.DENSE_ROWS, 64).to(torch.bfloat16)
    dense = chunked(rows)  # enough rows: widened weight and the dense kernel
    kernel = torch.cat([chunked(rows[i:i + 1]) for i in range(len(rows))])  # one row: the int8 kernel
    exact = rows.float() @ (chunked.weight_int8.float() * chunked.scales.float()[:, None]).T + linear.bias.float()
    for out in (dense, kernel):
        assert F.cosine_similarity(out.float(), exact, dim=-1).min() > 0.999
    assert F.cosine_similarity(chunked(rows).float(), linear(rows).float(), dim=-1).min() > 0.99
