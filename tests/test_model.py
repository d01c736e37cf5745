import pytest
import torch

from hilight.config import LLMConfig, TrainableConfig, tiny_config
from hilight.inference.engine import GenerationSettings, generate
from hilight.model import HiLight
from hilight.text import IGNORE_INDEX, Message, collate
from tests.conftest import clips

SAMPLES = [
    [Message("user", "<video>\nWhich ball went in?"), Message("model", "The red ball.")],
    [Message("user", "Compare <video> and <video>."), Message("model", "In the first clip."),
     Message("user", "Sure?"), Message("model", "Yes.")],
    [Message("user", "Hello there."), Message("model", "Hi.")],  # text only
]


def _sharpen(model):
    """Random init gives near-uniform logits; larger weights make greedy decoding discriminative."""
    with torch.no_grad():
        for p in model.llm.parameters():
            p.normal_(0, 0.3) if p.dim() > 1 else p.normal_(0, 0.1)
    return model


def test_forward_shapes_and_loss(model, chat, config):
    enc = chat.encode(SAMPLES[0])
    batch = collate([enc], chat.pad_id)
    out = model(batch.input_ids, batch.attention_mask, batch.labels, pixel_values=clips(config, 1))
    assert out.logits.shape == (1, len(enc), config.llm.vocab_size)
    assert torch.isfinite(out.loss)


def test_batch_with_mixed_video_counts_matches_single_samples(model, chat, config):
    encs = [chat.encode(s) for s in SAMPLES]
    videos = clips(config, 3)  # sample 0 has 1 video, sample 1 has 2, sample 2 none
    batch = collate(encs, chat.pad_id)
    with torch.no_grad():
        out = model(batch.input_ids, batch.attention_mask, batch.labels, pixel_values=videos)
        per_video = [videos[:1], videos[1:3], None]
        total, count = 0.0, 0
        for row, (enc, vids) in enumerate(zip(encs, per_video, strict=True)):
            single = collate([enc], chat.pad_id)
            ref = model(single.input_ids, single.attention_mask, single.labels, pixel_values=vids)
            torch.testing.assert_close(out.logits[row, :len(enc)], ref.logits[0], atol=2e-5, rtol=1e-4)
            n = sum(1 for lab in enc.labels[1:] if lab != IGNORE_INDEX)
            total, count = total + ref.loss.item() * n, count + n
    assert out.loss.item() == pytest.approx(total / count, rel=1e-5)


def test_video_count_mismatch_raises(model, chat, config):
    batch = collate([chat.encode(SAMPLES[1])], chat.pad_id)
    with pytest.raises(ValueError, match="2 video placeholder"):
        model(batch.input_ids, batch.attention_mask, pixel_values=clips(config, 1))


def test_visual_tokens_scaled_like_gemma_438_inputs_embeds():
    # Gemma-2B width: sqrt(2048) = 45.2548..., rounded to 45.25 in bf16 as transformers 4.38 did
    cfg = tiny_config(vocab_size=64)
    cfg.token_mining.llm_dim = 2048
    cfg.llm = LLMConfig(vocab_size=64, hidden_size=2048, intermediate_size=16, num_layers=1, num_heads=8,
                        num_kv_heads=1, head_dim=256)
    model = HiLight(cfg)
    ids = torch.tensor([[2, -200, -200, 7]])
    visual = torch.randn(1, 2, 2048)
    for dtype, scale in ((torch.float32, 45.254833995939045), (torch.bfloat16, 45.25)):
        model.to(dtype)
        embeds = model.embed(ids, visual)
        torch.testing.assert_close(embeds[0, 1:3], (visual[0].to(dtype) * scale).to(dtype), atol=0, rtol=0)
        text = model.llm.get_input_embeddings().weight[7] * torch.tensor(scale, dtype=dtype)
        torch.testing.assert_close(embeds[0, 3], text, atol=0, rtol=0)


def _greedy_by_recomputation(model, ids, video_embeds, steps, stops):
    ids = list(ids)
    new = []
    for _ in range(steps):
        x = torch.tensor([ids])
        with torch.no_grad():
            logits = model.llm(inputs_embeds=model.embed(x, video_embeds), use_cache=False).logits
        token = int(logits[0, -1].argmax())
        new.append(token)
        if token in stops:
            break
        ids.append(token)
    return new


def test_kv_cached_generation_matches_full_recomputation(model, chat, config):
    _sharpen(model)
    prompt = chat.encode([Message("user", "Compare <video> with <video>, please.")], generation=True)
    videos = clips(config, 2)
    stops = [chat.end_of_turn_id, chat.eos_id]
    batch = collate([prompt], chat.pad_id, padding_side="left")
    out = generate(model, batch, stops, GenerationSettings(max_new_tokens=20), pixel_values=videos)[0].tolist()
    with torch.no_grad():
        embeds = model.video_embeddings(model.encode_videos(videos))
    ref = _greedy_by_recomputation(model, prompt.input_ids, embeds, 20, stops)
    assert out[: len(ref)] == ref
    assert len(set(ref)) > 1  # the check is not vacuous


def test_left_padded_batch_generation_matches_single_prompts(model, chat, config):
    _sharpen(model)
    prompts = [chat.encode([Message("user", "<video>\nWhat happens?")], generation=True),
               chat.encode([Message("user", "Describe <video> then <video> in detail please.")], generation=True)]
    videos = clips(config, 3, seed=5)
    stops = [chat.end_of_turn_id, chat.eos_id]
    settings = GenerationSettings(max_new_tokens=10)
    both = generate(model, collate(prompts, chat.pad_id, "left"), stops, settings, pixel_values=videos)
    for row, vids in ((0, videos[:1]), (1, videos[1:])):
        single = generate(model, collate([prompts[row]], chat.pad_id, "left"), stops, settings, pixel_values=vids)[0]
        got = both[row, : len(single)]
        assert got.tolist() == single.tolist()


STAGES = {
    "stage1": TrainableConfig(token_mining=True),
    "stage2-full": TrainableConfig(token_mining=True, llm=True),
    "frozen": TrainableConfig(),
}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_trainable_parameter_names_per_stage(model, stage):
    model.set_trainable(STAGES[stage])
    trainable = {n.split(".", 1)[0] for n, p in model.named_parameters() if p.requires_grad}
    expected = {name for name, on in vars(STAGES[stage]).items() if on}
    assert trainable == expected


def test_stage1_gradients_reach_only_token_mining(model, chat, config):
    model.set_trainable(STAGES["stage1"])
    batch = collate([chat.encode(SAMPLES[0])], chat.pad_id)
    model(batch.input_ids, batch.attention_mask, batch.labels, pixel_values=clips(config, 1)).loss.backward()
    with_grad = {n.split(".", 1)[0] for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {"token_mining"}


def test_generation_settings_are_validated():
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationSettings(max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        GenerationSettings(do_sample=True, temperature=0)


def test_the_lm_head_gets_a_contiguous_input(model):
    seen = []
    handle = model.llm.lm_head.register_forward_pre_hook(lambda m, args: seen.append(args[0].stride()))
    d = model.config.llm.hidden_size
    hidden = torch.randn(1, 7, d)
    out = model.llm.lm_head(hidden[:, -1:, :])  # what a prefill passes: the prompt's strides, (7 d, d, 1)
    handle.remove()
    assert seen == [(d, d, 1)]  # the strides torch's matmul folds into one matrix product
    torch.testing.assert_close(out, hidden[:, -1:] @ model.llm.lm_head.weight.T)


def _mining(frame_local: bool):
    from hilight.config import TokenMiningConfig
    from hilight.model.token_mining import TokenMining

    torch.manual_seed(0)
    return TokenMining(TokenMiningConfig(video_dim=8, image_dim=6, llm_dim=10, queries_per_frame=3,
                                         frame_local=frame_local, slot_queries=True))


def test_frame_local_token_mining_reads_only_its_own_frame():
    tm = _mining(frame_local=True)
    frames, per_frame, glob = 4, 5, 2
    video, embeds = torch.randn(1, glob + frames * per_frame, 8), torch.randn(1, frames, 6)
    base = tm(video, embeds, glob)
    changed = video.clone()
    changed[:, glob + 2 * per_frame: glob + 3 * per_frame] += 1.0  # frame 2's patches only
    moved = (tm(changed, embeds, glob) - base).abs().amax(-1)[0]  # [T*Q]
    assert (moved[6:9] > 1e-4).all() and moved[:6].max() == 0 and moved[9:].max() == 0
    clip_level = video.clone()
    clip_level[:, :glob] += 1.0  # CLS and proxy tokens are not read frame-locally
    assert torch.equal(tm(clip_level, embeds, glob), base)
    # the slots of one frame differ even when every frame embedding is the same
    same = tm(video, torch.zeros(1, frames, 6), glob)[0]
    assert (same[0] - same[1]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="not 2 global tokens plus 4 frames"):
        tm(torch.randn(1, glob + frames * per_frame + 1, 8), embeds, glob)


def test_clip_wide_token_mining_mixes_all_frames():
    tm = _mining(frame_local=False)
    video, embeds = torch.randn(1, 22, 8), torch.randn(1, 4, 6)
    changed = video.clone()
    changed[:, 12:17] += 1.0
    assert ((tm(changed, embeds, 2) - tm(video, embeds, 2)).abs().amax(-1) > 1e-4).all()


def test_released_layout_has_no_new_token_mining_parameters():
    from hilight.config import TokenMiningConfig
    from hilight.model.token_mining import TokenMining
    from tests.synthetic import token_mining_state

    cfg = TokenMiningConfig(video_dim=8, image_dim=6, llm_dim=10, queries_per_frame=3)
    assert set(TokenMining(cfg).state_dict()) == set(token_mining_state(cfg))  # the released key names, no more


def test_cpu_decoding_attention_matches_sdpa():
    """One new position per row (decoding) takes two plain products instead of the CPU flash
    kernel: the same output, with a padding mask, grouped KV heads, bool or additive masks."""
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from hilight.model import attention

    torch.manual_seed(0)
    module = SimpleNamespace(num_key_value_groups=4, is_causal=True, training=False)
    query, key, value = torch.randn(2, 8, 1, 16), torch.randn(2, 2, 7, 16), torch.randn(2, 2, 7, 16)
    allowed = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    allowed[0, ..., :3] = False  # row 0 is left-padded
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    with torch.no_grad():
        for mask in (None, allowed, additive):
            ours, _ = attention.attention(module, query, key, value, mask, scaling=0.25)
            ref, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.25)
            torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert HiLight(tiny_config()).llm.config._attn_implementation == attention.NAME


def test_llm_attention_keeps_padding_masks_as_sdpa_does():
    """The LLM's own attention name gets SDPA's masks: a left-padded batch gives SDPA's logits in
    the prefill and in a decoding step."""
    torch.manual_seed(0)
    config = tiny_config()
    model = HiLight(config).eval()
    ids = torch.randint(3, config.llm.vocab_size, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0

    def logits():
        with torch.no_grad():
            full = model.llm(input_ids=ids, attention_mask=mask).logits
            past = model.llm(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True).past_key_values
            step = model.llm(input_ids=ids[:, -1:], attention_mask=mask, past_key_values=past, use_cache=True).logits
        return full, step

    ours = logits()
    model.llm.set_attn_implementation("sdpa")
    for a, b in zip(ours, logits(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    unmasked = model.llm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert not torch.allclose(unmasked[0], ours[0][0], atol=1e-3)  # the padding mask does change row 0
