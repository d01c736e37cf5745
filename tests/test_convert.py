import json
import pickle
from dataclasses import replace

import pytest
import torch
from transformers import GemmaForCausalLM

from hilight.checkpoint import load_checkpoint
from hilight.cli import main
from hilight.convert import ConversionError, Sources, assemble, map_keys
from tests import reference, synthetic
from tests.conftest import clips


@pytest.fixture
def originals(tmp_path, config, tokenizer):
    """Every original format at tiny size; returns the paths and the source state dicts."""
    clipvip = synthetic.clipvip_state(config.video_tower, seed=1)
    ddp = {"module." + k: v for k, v in clipvip.items()}  # saved from a DDP-wrapped model
    longclip = synthetic.longclip_state(config.image_tower, seed=2)
    tm = synthetic.token_mining_state(config.token_mining, seed=3)
    paths = {
        "clipvip": tmp_path / "pretrain_clipvip_base_16.pt",
        "longclip": tmp_path / "longclip-B.pt",
        "tm_pt": tmp_path / "TokenMining.pt",
        "tm_bin": tmp_path / "token_mining.bin",
        "gemma": tmp_path / "gemma-2b",
    }
    torch.save(ddp, paths["clipvip"])
    torch.save(longclip, paths["longclip"])
    torch.save(tm, paths["tm_pt"])
    torch.save({"model.token_mining." + k: v.half() for k, v in tm.items()}, paths["tm_bin"])  # fp16, as trained
    gemma = synthetic.write_gemma_dir(paths["gemma"], config, tokenizer, seed=4)
    return paths, {"clipvip": clipvip, "longclip": longclip, "tm": tm, "gemma": gemma}


def _check_components(model, sources, config, tm_state, tm_atol=1e-5):
    pixels = clips(config, 2)
    with torch.no_grad():
        towers = model.encode_videos(pixels)
        torch.testing.assert_close(
            towers.video, reference.clipvip_forward(sources["clipvip"], pixels, config.video_tower.num_heads),
            atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            towers.image, reference.longclip_forward(sources["longclip"], pixels, config.image_tower.num_heads),
            atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            model.video_embeddings(towers), reference.token_mining_forward(tm_state, towers.video, towers.image),
            atol=tm_atol, rtol=1e-4)


def _llm_logits(llm):
    ids = torch.tensor([[2, 10, 50, 77, 5, 9]])
    with torch.no_grad():
        return llm(input_ids=ids).logits


def test_assemble_from_gemma_dir_and_separate_files(originals, config):
    paths, src = originals
    model = assemble(Sources(clipvip=paths["clipvip"], longclip=paths["longclip"], token_mining=paths["tm_pt"],
                             gemma=paths["gemma"]), config)
    _check_components(model, src, config, src["tm"])
    reloaded = GemmaForCausalLM.from_pretrained(paths["gemma"]).eval()  # transformers' own loader
    torch.testing.assert_close(_llm_logits(model.llm), _llm_logits(reloaded), atol=1e-5, rtol=1e-5)


def test_token_mining_bin_layout_in_fp16(originals, config):
    paths, src = originals
    model = assemble(Sources(clipvip=paths["clipvip"], longclip=paths["longclip"], token_mining=paths["tm_bin"],
                             gemma=paths["gemma"]), config)
    half = {k: v.half().float() for k, v in src["tm"].items()}
    _check_components(model, src, config, half)
    assert model.token_mining.query_projector[1].weight.dtype == torch.float32


@pytest.mark.parametrize("file_format, shard", [("safetensors", True), ("safetensors", False), ("bin", False)])
def test_released_merged_directory(tmp_path, originals, config, file_format, shard):
    paths, src = originals
    merged = tmp_path / "HiLight-2B-LoRA-Merge-stage2-VT1K-2epoch"
    gemma, tm = synthetic.write_merged_dir(merged, config, seed=7, file_format=file_format, shard=shard)
    model = assemble(Sources(clipvip=paths["clipvip"], longclip=paths["longclip"], hilight_merged=merged), config)
    _check_components(model, src, config, tm)
    torch.testing.assert_close(_llm_logits(model.llm), _llm_logits(gemma), atol=1e-5, rtol=1e-5)
    # trained under transformers 4.38 with the exact GELU: kept, not rewritten to tanh
    assert model.config.llm.hidden_act == "gelu"
    act = model.llm.model.layers[0].mlp.act_fn
    x = torch.linspace(-3, 3, 7)
    torch.testing.assert_close(act(x), torch.nn.functional.gelu(x), atol=0, rtol=0)


def test_unknown_and_missing_names_are_listed(tmp_path, originals, config):
    paths, src = originals
    bad = dict(src["clipvip"])
    bad["clipmodel.adapter.weight"] = torch.zeros(1)
    with pytest.raises(ConversionError, match=r"unknown to the clipvip format: clipmodel\.adapter\.weight"):
        map_keys(bad, "clipvip", "bad.pt")
    bad = dict(src["clipvip"])
    bad["clipmodel.vision_model.encoder.layers.0.self_attn.extra.weight"] = torch.zeros(1)
    torch.save(bad, tmp_path / "extra.pt")
    with pytest.raises(Exception, match=r"unexpected 1: video_tower\.encoder\.layers\.0\.self_attn\.extra"):
        assemble(Sources(clipvip=tmp_path / "extra.pt", longclip=paths["longclip"], token_mining=paths["tm_pt"],
                         gemma=paths["gemma"]), config)
    short = dict(src["longclip"])
    del short["visual.ln_post.bias"]
    torch.save(short, tmp_path / "short.pt")
    with pytest.raises(Exception, match=r"missing 1: image_tower\.ln_post\.bias"):
        assemble(Sources(clipvip=paths["clipvip"], longclip=tmp_path / "short.pt", token_mining=paths["tm_pt"],
                         gemma=paths["gemma"]), config)


def test_wrong_format_for_a_file_is_refused(originals, config):
    paths, _ = originals
    with pytest.raises(ConversionError, match="unknown to the longclip format"):
        assemble(Sources(clipvip=paths["clipvip"], longclip=paths["clipvip"], token_mining=paths["tm_pt"],
                         gemma=paths["gemma"]), config)
    with pytest.raises(ConversionError, match="model_type 'gemma'"):
        assemble(Sources(clipvip=paths["clipvip"], longclip=paths["longclip"], hilight_merged=paths["gemma"]),
                 config)


def test_missing_parts_need_an_explicit_choice(originals, config):
    paths, _ = originals
    parts = Sources(clipvip=paths["clipvip"], longclip=paths["longclip"], gemma=paths["gemma"])
    with pytest.raises(ConversionError, match="token_mining is missing"):
        assemble(parts, config)
    model = assemble(parts, config, init=frozenset({"token_mining"}))  # fresh TokenMining for stage 1
    assert model.token_mining.tokenizer_projector[1].bias.abs().sum() == 0


def test_pickles_with_code_are_never_executed(tmp_path, originals, config):
    paths, _ = originals

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"visual.proj": Evil()}))
    with pytest.raises(ConversionError, match="weights-only"):
        assemble(Sources(clipvip=paths["clipvip"], longclip=evil, token_mining=paths["tm_pt"],
                         gemma=paths["gemma"]), config)


def test_cli_convert_writes_a_loadable_checkpoint(tmp_path, originals, config, capsys):
    paths, src = originals
    out = tmp_path / "hilight-converted"
    overrides = _tiny_overrides(config)
    rc = main(["convert", "--from", "clipvip", str(paths["clipvip"]), "--from", "longclip", str(paths["longclip"]),
               "--from", "token-mining", str(paths["tm_bin"]), "--from", "gemma", str(paths["gemma"]),
               "--preset", "tiny", "--set", *overrides, "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    model, tokenizer = load_checkpoint(out)
    _check_components(model, src, config, {k: v.half().float() for k, v in src["tm"].items()})
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert info["parameters"]["token_mining"] == sum(v.numel() for v in src["tm"].values())


def test_cli_convert_error_is_one_line(tmp_path, capsys):
    rc = main(["convert", "--from", "clipvip", str(tmp_path / "nope.pt"), "--from", "gemma", str(tmp_path),
               "--tokenizer", str(tmp_path), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("hilight convert:")


def _tiny_overrides(config):
    return [f"llm.vocab_size={config.llm.vocab_size}"]


def test_sizes_are_read_from_the_files_and_a_contradiction_is_an_error(tmp_path, tokenizer):
    """Towers and TokenMining at sizes no preset has: nothing is guessed. Long-CLIP's heads are
    width // 64, as the original derives them; CLIP-ViP's come from its vision config JSON."""
    from dataclasses import replace

    from hilight.config import ImageTowerConfig, TokenMiningConfig, VideoTowerConfig, tiny_config

    base = tiny_config(len(tokenizer))
    video = VideoTowerConfig(hidden_size=64, num_layers=3, num_heads=4, intermediate_size=96, image_size=48,
                             patch_size=16, temporal_size=5, add_cls_num=2, projection_dim=20)
    image = ImageTowerConfig(width=128, num_layers=1, num_heads=2, intermediate_size=80, image_size=48, patch_size=16,
                             output_dim=40)
    real = replace(base, video_tower=video, image_tower=replace(image, num_heads=128 // 64),
                   token_mining=TokenMiningConfig(video_dim=64, image_dim=40, llm_dim=base.llm.hidden_size,
                                                  queries_per_frame=3),
                   video=replace(base.video, image_size=48))
    torch.save(synthetic.clipvip_state(video, seed=1), tmp_path / "clipvip.pt")
    torch.save(synthetic.longclip_state(image, seed=2), tmp_path / "longclip.pt")
    torch.save(synthetic.token_mining_state(real.token_mining, seed=3), tmp_path / "tm.pt")
    synthetic.write_gemma_dir(tmp_path / "gemma", base, tokenizer, seed=4)
    (tmp_path / "vision.json").write_text(json.dumps({"vision_config": {"num_attention_heads": 4}}))
    sources = Sources(clipvip=tmp_path / "clipvip.pt", longclip=tmp_path / "longclip.pt",
                      token_mining=tmp_path / "tm.pt", gemma=tmp_path / "gemma")
    model = assemble(sources, base, clipvip_config=tmp_path / "vision.json")  # the tiny preset: other sizes
    assert model.config == real
    with torch.no_grad():  # the heads were right: the towers compute what the originals do
        pixels = torch.randn(1, 4, 3, 48, 48)
        torch.testing.assert_close(model.image_tower(pixels), reference.longclip_forward(
            synthetic.longclip_state(image, seed=2), pixels, 2), atol=1e-5, rtol=1e-5)
    with pytest.raises(ConversionError, match=r"--set image_tower.num_heads=4 contradicts .*longclip.pt, which records 2"):
        assemble(sources, base, explicit={"image_tower.num_heads": 4}, clipvip_config=tmp_path / "vision.json")
    with pytest.raises(ConversionError, match=r"--set token_mining.llm_dim=32 contradicts .*tm.pt, which records 64"):
        assemble(sources, base, explicit={"token_mining.llm_dim": 32})


def test_one_component_alone_replaces_it_in_a_base_checkpoint(tmp_path, originals, config, capsys):
    """A stage-1 TokenMining (.bin) seeds stage 2: the base checkpoint's other weights stay."""
    paths, src = originals
    base = tmp_path / "base"
    assert main(["convert", "--from", "clipvip", str(paths["clipvip"]), "--from", "longclip", str(paths["longclip"]),
                 "--init", "token_mining", "--from", "gemma", str(paths["gemma"]), "--preset", "tiny",
                 "--set", *_tiny_overrides(config), "--out", str(base)]) == 0
    out = tmp_path / "seeded"
    assert main(["convert", "--from", "token-mining", str(paths["tm_bin"]), "--base", str(base), "--out", str(out)]) == 0
    seeded, _ = load_checkpoint(out)
    before, _ = load_checkpoint(base)
    for name, value in seeded.state_dict().items():
        if name.startswith("token_mining."):
            torch.testing.assert_close(value, src["tm"][name.removeprefix("token_mining.")].half().float())
        else:
            assert torch.equal(value, before.state_dict()[name]), name
    wrong = synthetic.token_mining_state(replace(config.token_mining, queries_per_frame=7), seed=1)
    torch.save(wrong, tmp_path / "other.pt")
    capsys.readouterr()
    assert main(["convert", "--from", "token-mining", str(tmp_path / "other.pt"), "--base", str(base),
                 "--out", str(tmp_path / "x")]) == 2
    assert "records token_mining.queries_per_frame=7, the base checkpoint has 4" in capsys.readouterr().err


def test_the_original_layout_converts_with_one_command(tmp_path, originals, config, tokenizer, capsys):
    paths, src = originals
    root = tmp_path / "HiLight"
    (root / "model_zoo" / "CLIP-ViP").mkdir(parents=True)
    (root / "model_zoo" / "Long-CLIP").mkdir(parents=True)
    paths["clipvip"].rename(root / "model_zoo" / "CLIP-ViP" / "pretrain_clipvip_base_16.pt")
    paths["longclip"].rename(root / "model_zoo" / "Long-CLIP" / "longclip-B.pt")
    heads = config.video_tower.num_heads
    (root / "model_zoo" / "CLIP-ViP" / "clipvip-vision_config.json").write_text(
        json.dumps({"vision_config": {"num_attention_heads": heads}}))
    tokenizer.save_pretrained(root / "model_zoo" / "LLM" / "gemma" / "tokenizer")
    gemma, tm = synthetic.write_merged_dir(root / "work_dirs" / "HiLight-2B-LoRA-Merge-stage2-VT1K-2epoch", config,
                                           seed=7)
    out = tmp_path / "converted"
    assert main(["convert", "--original", str(root), "--preset", "tiny", "--set", *_tiny_overrides(config),
                 "--out", str(out)]) == 0, capsys.readouterr().err
    model, _ = load_checkpoint(out)
    _check_components(model, src, config, tm)
    torch.testing.assert_close(_llm_logits(model.llm), _llm_logits(gemma), atol=1e-5, rtol=1e-5)
    # two runs: the command asks which
    synthetic.write_merged_dir(root / "work_dirs" / "HiLight-2B-LoRA-Merge-stage2-M101K-2epoch", config, seed=8)
    capsys.readouterr()
    assert main(["convert", "--original", str(root), "--preset", "tiny", "--out", str(tmp_path / "x")]) == 2
    assert "2 merged directories under work_dirs or work_dir" in capsys.readouterr().err
    assert main(["convert", "--original", str(root), "--run", "HiLight-2B-LoRA-Merge-stage2-M101K-2epoch",
                 "--preset", "tiny", "--set", *_tiny_overrides(config), "--out", str(tmp_path / "m101k")]) == 0
