import json
import math

import pytest
import torch

from hilight.checkpoint import load_state_strict
from hilight.cli import main
from hilight.config import AlignLossConfig, TextTowerConfig, VideoInputConfig, tiny_config
from hilight.convert import clipvip_aligner_state
from hilight.evaluation.retrieval import eval_retrieval, retrieval_metrics
from hilight.model.clip_vip import CLIPViPVideoTower
from hilight.recipes.billiards_small.facts import TOWER_FACTS, TowerFacts, frame_facts
from hilight.synth.billiards import TableConfig
from hilight.synth.dataset import generate_split
from hilight.training.align import (
    CaptionTokenizer,
    TextTower,
    VideoTextAligner,
    global_loss,
    sparc_loss,
    sparc_weights,
)
from tests import synthetic

T1, T2 = [1.0, 0.0], [0.0, 1.0]
PATCHES = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]])  # [1, P=3, d=2]
TOKENS = torch.tensor([[T1, T2]])  # [1, L=2, d=2]


def test_sparc_weights_on_a_hand_built_example():
    w = sparc_weights(TOKENS, PATCHES, threshold=0.0)  # default threshold 1/P = 1/3
    # token 1: similarities [1, 0, .5] -> min-max [1, 0, .5] -> weights [2/3, 0, 1/3]
    torch.testing.assert_close(w[0], torch.tensor([[2 / 3, 0, 1 / 3], [0, 2 / 3, 1 / 3]]))
    sparse = sparc_weights(TOKENS, PATCHES, threshold=0.6)  # 0.5 falls under the threshold
    torch.testing.assert_close(sparse[0], torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]))


def test_sparc_loss_on_a_hand_built_example():
    # grouped embeddings [5/6, 1/6] and [1/6, 5/6]: cosine 5/sqrt(26) with their own token, 1/sqrt(26) with the other
    gap = (5 - 1) / math.sqrt(26)
    expected = math.log(1 + math.exp(-gap))
    loss = sparc_loss(TOKENS, PATCHES, torch.tensor([[1, 1]]), threshold=0.0, temperature=1.0)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_masked_tokens_do_not_change_the_local_loss():
    torch.manual_seed(0)
    tokens, patches = torch.randn(2, 6, 8), torch.randn(2, 10, 8)
    mask = torch.tensor([[1, 1, 1, 0, 1, 0], [1, 1, 0, 0, 0, 0]])
    base = sparc_loss(tokens, patches, mask, 0.0, 0.07)
    changed = tokens.clone()
    changed[mask == 0] = torch.randn(int((mask == 0).sum()), 8) * 5
    torch.testing.assert_close(sparc_loss(changed, patches, mask, 0.0, 0.07), base)
    assert not torch.allclose(sparc_loss(tokens, patches, torch.ones_like(mask), 0.0, 0.07), base)


def test_global_loss_prefers_matching_pairs():
    v = torch.eye(4)
    assert global_loss(v, v, torch.tensor(math.log(10))) < global_loss(v, v.flip(0), torch.tensor(math.log(10)))


def test_language_mask_keeps_content_words(tokenizer):
    captions = CaptionTokenizer(tokenizer, 64, ["the", "ball", "a"])
    ids, mask, local = captions(["The red ball."], language_mask=True)
    words = [tokenizer.decode([i]).strip() for i in ids[0].tolist()]
    kept = [w for w, keep in zip(words, local[0].tolist(), strict=True) if keep]
    assert "red" in kept and not {"The", "ball", ".", "<bos>", "<eos>"} & set(kept)
    _, _, everything = captions(["The red ball."], language_mask=False)
    assert everything[0].all()


def _aligner(tokenizer, cfg=None):
    cfg = cfg or tiny_config(len(tokenizer)).video_tower
    text_cfg = TextTowerConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_layers=1,
                               num_heads=2, max_positions=64, projection_dim=cfg.projection_dim)
    text = TextTower(text_cfg, tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    return VideoTextAligner(CLIPViPVideoTower(cfg), text)


def test_gradients_reach_both_towers(tokenizer):
    torch.manual_seed(0)
    aligner = _aligner(tokenizer)
    captions = CaptionTokenizer(tokenizer, 64, ["the"])
    ids, mask, local = captions(["The red ball went in.", "The blue ball stayed."], True)
    loss = aligner(torch.randn(2, 4, 3, 32, 32), ids, mask, local, AlignLossConfig())
    loss.backward()
    assert aligner.video_tower.encoder.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert aligner.text.encoder.encoder.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert aligner.logit_scale.grad is not None


def test_retrieval_metrics_on_a_constructed_case():
    sim = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.5, 0.1], [0.0, 0.2, 0.1]])
    # text ranks: caption 0 -> 1st, caption 1 -> 2nd (0.8 beats 0.5), caption 2 -> 2nd
    r = retrieval_metrics(sim)
    assert r["text_to_video"]["R@1"] == pytest.approx(1 / 3) and r["text_to_video"]["median_rank"] == 2
    # video ranks: video 0 -> 1st, video 1 -> 1st (0.5 beats 0.2, 0.1), video 2 -> 1st (0.1 vs 0.0 and 0.1: tie kept)
    assert r["video_to_text"]["R@1"] == pytest.approx(1.0)


def test_clipvip_text_weights_load_into_the_text_tower(tmp_path, tokenizer):
    aligner = _aligner(tokenizer)
    torch.manual_seed(3)
    source = _aligner(tokenizer)
    state = synthetic.clipvip_state(tiny_config(len(tokenizer)).video_tower, seed=5)
    state = {k: v for k, v in state.items() if not k.startswith(("clipmodel.text_model.", "clipmodel.text_projection"))}
    for name, value in source.text.encoder.state_dict().items():
        state["clipmodel.text_model." + name] = value
    state["clipmodel.text_projection.weight"] = source.text.text_projection.weight.detach()
    torch.save(state, tmp_path / "pretrain_clipvip_base_16.pt")
    load_state_strict(aligner, clipvip_aligner_state(tmp_path / "pretrain_clipvip_base_16.pt"))
    for a, b in zip(aligner.text.state_dict().values(), source.text.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    assert aligner.logit_scale.item() == pytest.approx(4.6)


@pytest.mark.slow
def test_align_command_end_to_end(tmp_path, capsys):
    data = tmp_path / "bil"
    generate_split(data, "train", 6, seed=2, cfg=TableConfig(image_size=64))
    generate_split(data, "val", 4, seed=2, cfg=TableConfig(image_size=64))
    assert main(["init", "--preset", "tiny", "--train-tokenizer", str(data / "train-captions.json"),
                 "--vocab-size", "300", "--out", str(tmp_path / "base")]) == 0
    config = tmp_path / "align.yaml"
    config.write_text(json.dumps({
        "model": str(tmp_path / "base"), "output_dir": str(tmp_path / "run"),
        "text_tower": {"vocab_size": 300, "hidden_size": 32, "intermediate_size": 64, "num_layers": 1,
                       "num_heads": 2, "max_positions": 96, "projection_dim": 16},
        "data": {"train": str(data / "train-captions.json"), "val": str(data / "val-captions.json"),
                 "videos": str(data / "videos"), "frames_cache": str(tmp_path / "frames")},
        "auxiliary": {"objective": TOWER_FACTS, "weight": 1.0},
        "max_steps": 3, "batch_size": 4, "lr": 1e-3, "save_every": 3, "eval_every": 3, "log_every": 1}))
    assert main(["align", "--config", str(config)]) == 0
    final = tmp_path / "run" / "final"
    from hilight.checkpoint import load_checkpoint

    aligned, _ = load_checkpoint(final)  # a plain HiLight checkpoint: the VLM uses it directly
    base, _ = load_checkpoint(tmp_path / "base")
    assert not torch.equal(aligned.video_tower.pre_layernorm.weight, base.video_tower.pre_layernorm.weight)
    assert torch.equal(aligned.llm.model.embed_tokens.weight, base.llm.model.embed_tokens.weight)
    result = eval_retrieval(final, data / "val-captions.json", data / "videos")
    assert result["pairs"] == 4 and result["text_to_video"]["R@1"] in (0, 0.25, 0.5, 0.75, 1.0)
    assert any((tmp_path / "frames").iterdir())  # frames were cached
    assert main(["eval-retrieval", "--model", str(final), "--data", str(data / "val-captions.json"),
                 "--videos", str(data / "videos"), "--out", str(tmp_path / "r")]) == 0
    assert "| text to video |" in (tmp_path / "r" / "retrieval.md").read_text()


def test_image_tower_alignment_frame_by_frame(tokenizer):
    from hilight.model.long_clip import LongCLIPImageTower

    cfg = tiny_config(len(tokenizer))
    text_cfg = TextTowerConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_layers=1,
                               num_heads=2, max_positions=64, projection_dim=cfg.image_tower.output_dim)
    text = TextTower(text_cfg, tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    tower = LongCLIPImageTower(cfg.image_tower)
    aligner = VideoTextAligner(tower, text)
    pixels = torch.randn(2, 4, 3, 32, 32)
    pooled, patches = aligner.encode_video(pixels)
    torch.testing.assert_close(pooled, tower(pixels).mean(1), atol=1e-5, rtol=1e-5)  # mean of the frames' CLS
    assert patches.shape == (2, 4 * 16, cfg.image_tower.output_dim)
    ids, mask, local = CaptionTokenizer(tokenizer, 64, [])(["The red ball.", "A blue ball."], True)
    aligner(pixels, ids, mask, local, AlignLossConfig()).backward()
    assert tower.conv1.weight.grad.abs().sum() > 0


def test_frame_facts_targets_on_a_hand_built_track():
    # 5 frames, two balls; the red ball leaves the table after frame 2
    xy = [[0.10, 0.20, 0.90, 0.55], [0.15, 0.20, 0.80, 0.55], [0.30, 0.20, 0.70, 0.60],
          [0.45, 0.20, -1, -1], [0.50, 0.21, -1, -1]]
    tracks = {"names": ["cue", "red"], "fps": 10, "radius": 0.02, "xy": xy}
    facts = frame_facts(tracks, ["blue", "cue", "red"], VideoInputConfig(num_frames=3), grid=4)
    # uniform sampling of 3 of 5 frames: 0, 2, 4
    assert facts["present"].tolist() == [[0, 1, 1], [0, 1, 1], [0, 1, 0]]
    torch.testing.assert_close(facts["xy"][1, 2], torch.tensor([0.70, 0.60]))
    assert facts["xy"][2, 2].tolist() == [0, 0]
    # grid 4: (0.10, 0.20) is column 0, row 0 -> patch 0; (0.90, 0.55) is column 3, row 2 -> patch 11
    expected = torch.zeros(3, 16, dtype=torch.long)
    expected[0, 0], expected[0, 11] = 2, 3
    expected[1, 1], expected[1, 10] = 2, 3
    expected[2, 2] = 2
    assert torch.equal(facts["patch"], expected)


@pytest.mark.parametrize("tower", ["video", "image"])
def test_frame_facts_loss_trains_the_tower(tokenizer, tower):
    from hilight.model.long_clip import LongCLIPImageTower

    torch.manual_seed(0)
    cfg = tiny_config(len(tokenizer))
    visual = CLIPViPVideoTower(cfg.video_tower) if tower == "video" else LongCLIPImageTower(cfg.image_tower)
    dim = cfg.video_tower.projection_dim if tower == "video" else cfg.image_tower.output_dim
    text_cfg = TextTowerConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_layers=1,
                               num_heads=2, max_positions=64, projection_dim=dim)
    text = TextTower(text_cfg, tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    tracks = {"names": ["cue", "red"], "fps": 10, "radius": 0.02,
              "xy": [[0.1, 0.1, 0.6, 0.6]] * 2 + [[0.2, 0.1, -1, -1]] * 2}
    records = [{"video": "a.mp4", "caption": "x", "tracks": tracks}] * 2
    facts = TowerFacts(records, None, visual, VideoInputConfig(num_frames=4, image_size=32))
    aligner = VideoTextAligner(visual, text, facts, auxiliary_weight=1.0)
    ids, mask, local = CaptionTokenizer(tokenizer, 64, [])(["The red ball.", "A blue ball."], True)
    targets = facts.targets(records)
    assert targets["patch"].shape == (2, 4, 16) and targets["present"].shape == (2, 4, 2)
    pixels = torch.randn(2, 4, 3, 32, 32)
    plain = aligner(pixels, ids, mask, local, AlignLossConfig())  # no targets: the objective is left out
    with_facts = aligner(pixels, ids, mask, local, AlignLossConfig(), targets)
    assert with_facts > plain  # the facts term is added, and it is positive
    (with_facts - plain).backward()  # the facts term alone
    first = visual.conv1.weight if tower == "image" else visual.embeddings.patch_embedding.weight
    assert first.grad.abs().sum() > 0 and aligner.auxiliary.patch.weight.grad.abs().sum() > 0


def test_frame_facts_need_tracks(tmp_path, capsys):
    data = tmp_path / "bil"
    generate_split(data, "train", 3, seed=2, cfg=TableConfig(image_size=64))
    captions = json.loads((data / "train-captions.json").read_text())
    del captions[1]["tracks"]
    (data / "train-captions.json").write_text(json.dumps(captions))
    assert main(["init", "--preset", "tiny", "--out", str(tmp_path / "base")]) == 0
    config = tmp_path / "align.yaml"
    config.write_text(json.dumps({
        "model": str(tmp_path / "base"), "output_dir": str(tmp_path / "run"),
        "data": {"train": str(data / "train-captions.json"), "videos": str(data / "videos")},
        "auxiliary": {"objective": TOWER_FACTS}, "max_steps": 1, "batch_size": 2}))
    assert main(["align", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "train-captions.json" in err and "tracks" in err and "1 without" in err


def test_towers_public_patch_and_pooled_outputs_are_what_alignment_reads(tokenizer):
    from hilight.model.long_clip import LongCLIPImageTower

    torch.manual_seed(0)
    cfg = tiny_config(len(tokenizer))
    pixels = torch.randn(2, 4, 3, 32, 32)
    text_cfg = TextTowerConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_layers=1,
                               num_heads=2, max_positions=64, projection_dim=16)
    text = TextTower(text_cfg, tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    video = CLIPViPVideoTower(cfg.video_tower)
    out = VideoTextAligner(video, text).visual(pixels)
    hidden = video(pixels)
    torch.testing.assert_close(video.patch_tokens(hidden, 4), out.patch_states)  # [B, T, L, D]
    torch.testing.assert_close(video.pooled(hidden), out.pooled)
    image = LongCLIPImageTower(cfg.image_tower)
    out = VideoTextAligner(image, text).visual(pixels)
    torch.testing.assert_close(image.patch_tokens(pixels.flatten(0, 1)).view(2, 4, 16, -1), out.patch_states)
    torch.testing.assert_close(image.pooled(pixels.flatten(0, 1)).view(2, 4, -1), out.frames)
