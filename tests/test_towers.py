import torch

from hilight.config import ImageTowerConfig, TokenMiningConfig, VideoTowerConfig, tiny_config
from hilight.convert import map_keys
from hilight.model.clip_vip import CLIPViPVideoTower, proxy_guided_attention_reference, proxy_guided_sdpa
from hilight.model.long_clip import LongCLIPImageTower
from hilight.model.token_mining import TokenMining
from tests import reference, synthetic


def _tower_from_source(cls, cfg, state, fmt, prefix):
    module = cls(cfg)
    mapped = {k.removeprefix(prefix): v for k, v in map_keys(state, fmt, "test").items()}
    module.load_state_dict(mapped, strict=True)
    return module.eval()


def test_clipvip_shapes_and_reference_parity():
    cfg = tiny_config().video_tower
    state = synthetic.clipvip_state(cfg)
    tower = _tower_from_source(CLIPViPVideoTower, cfg, state, "clipvip", "video_tower.")
    pixels = torch.randn(2, cfg.temporal_size, 3, cfg.image_size, cfg.image_size)
    out = tower(pixels)
    assert out.shape == (2, cfg.num_tokens(cfg.temporal_size), cfg.hidden_size)
    ref = reference.clipvip_forward(state, pixels, cfg.num_heads)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_clipvip_interpolates_temporal_embedding_for_other_frame_counts():
    cfg = tiny_config().video_tower
    state = synthetic.clipvip_state(cfg, seed=3)
    tower = _tower_from_source(CLIPViPVideoTower, cfg, state, "clipvip", "video_tower.")
    for frames in (1, 3, 7):
        pixels = torch.randn(1, frames, 3, cfg.image_size, cfg.image_size)
        out = tower(pixels)
        assert out.shape == (1, cfg.num_tokens(frames), cfg.hidden_size)
        torch.testing.assert_close(out, reference.clipvip_forward(state, pixels, cfg.num_heads), atol=1e-5, rtol=1e-5)


def test_full_size_clipvip_layout():
    cfg = VideoTowerConfig()
    assert cfg.num_tokens(12) == 2356  # 1 CLS + 3 proxies + 12 x 196 patches


def test_sdpa_block_attention_matches_masked_reference():
    torch.manual_seed(0)
    m, n, length = 4, 5, 9
    q, k, v = (torch.randn(2, 3, m + n * length, 8) for _ in range(3))
    torch.testing.assert_close(
        proxy_guided_sdpa(q, k, v, m, n), proxy_guided_attention_reference(q, k, v, m, n), atol=1e-6, rtol=1e-5
    )


def test_single_layer_patches_do_not_see_other_frames():
    # In one layer, frame 0's patch outputs depend only on the proxy inputs and frame 0.
    cfg = VideoTowerConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, image_size=16,
                           patch_size=8, temporal_size=3, projection_dim=8)
    torch.manual_seed(0)
    tower = CLIPViPVideoTower(cfg).eval()
    pixels = torch.randn(1, 3, 3, 16, 16)
    changed = pixels.clone()
    changed[:, 2] += 1.0
    a, b = tower(pixels), tower(changed)
    m, length = cfg.num_proxy_tokens, cfg.patches_per_frame
    torch.testing.assert_close(a[:, m:m + length], b[:, m:m + length])  # frame 0 unchanged
    assert not torch.allclose(a[:, :m], b[:, :m])  # proxies see frame 2
    assert not torch.allclose(a[:, m + 2 * length:], b[:, m + 2 * length:])


def test_longclip_batched_frames_match_per_frame_reference():
    cfg = tiny_config().image_tower
    state = synthetic.longclip_state(cfg)
    tower = _tower_from_source(LongCLIPImageTower, cfg, state, "longclip", "image_tower.")
    pixels = torch.randn(3, 5, 3, cfg.image_size, cfg.image_size)
    out = tower(pixels)
    assert out.shape == (3, 5, cfg.output_dim)
    torch.testing.assert_close(out, reference.longclip_forward(state, pixels, cfg.num_heads), atol=1e-5, rtol=1e-5)


def test_token_mining_matches_original_arithmetic():
    cfg = TokenMiningConfig(video_dim=12, image_dim=8, llm_dim=20, queries_per_frame=4)
    state = synthetic.token_mining_state(cfg, seed=1)
    tm = TokenMining(cfg)
    tm.load_state_dict(state, strict=True)
    videos, aux = torch.randn(2, 23, 12), torch.randn(2, 3, 8)
    out = tm(videos, aux)
    assert out.shape == (2, 3 * 4, 20)
    torch.testing.assert_close(out, reference.token_mining_forward(state, videos, aux), atol=1e-6, rtol=1e-5)
    assert (out >= 0).all()  # the projector ends in a ReLU


def test_token_mining_keeps_the_scrambled_query_layout():
    cfg = TokenMiningConfig(video_dim=6, image_dim=8, llm_dim=4, queries_per_frame=4)
    tm = TokenMining(cfg)
    w, b = tm.LongCLIP_projector[0].weight[:, 0], tm.LongCLIP_projector[0].bias
    aux = torch.randn(1, 2, 8)
    queries = tm.queries(aux)  # [1, 2*4, 8]
    for frame in range(2):
        for i in range(4):
            for j in range(8):
                d, k = divmod(i * 8 + j, 4)  # channel j of query i = expansion k of dim d
                expected = torch.relu(w[k] * aux[0, frame, d] + b[k])
                torch.testing.assert_close(queries[0, frame * 4 + i, j], expected)


def test_token_mining_golden_numbers():
    torch.manual_seed(1234)
    tm = TokenMining(TokenMiningConfig(video_dim=16, image_dim=8, llm_dim=12, queries_per_frame=4))
    out = tm(torch.randn(1, 10, 16), torch.randn(1, 2, 8))
    assert out.shape == (1, 8, 12)
    # pinned on torch 2.13 CPU; a change means the arithmetic (or the init) changed
    assert abs(out.sum().item() - GOLDEN_TM_SUM) < 1e-4
    assert abs(out.square().sum().item() - GOLDEN_TM_SQ) < 1e-4
    assert int((out > 0).sum()) == GOLDEN_TM_POSITIVE


def test_full_size_token_mining_parameter_count():
    assert sum(p.numel() for p in TokenMining(TokenMiningConfig()).parameters()) == 6_892_864
    assert ImageTowerConfig().output_dim == TokenMiningConfig().image_dim


GOLDEN_TM_SUM = 19.624204635620117
GOLDEN_TM_SQ = 11.770562171936035
GOLDEN_TM_POSITIVE = 58
