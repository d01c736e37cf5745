import json

import pytest
import torch

from hilight.checkpoint import (
    CheckpointError,
    describe,
    load_checkpoint,
    load_state_strict,
    save_checkpoint,
    weight_files,
)
from hilight.config import HiLightConfig, from_dict
from hilight.text import Message, collate
from tests.conftest import clips


def _logits(model, chat, config):
    batch = collate([chat.encode([Message("user", "<video>\nWhat happens?"), Message("model", "A ball.")])],
                    chat.pad_id)
    with torch.no_grad():
        return model(batch.input_ids, batch.attention_mask, pixel_values=clips(config, 1)).logits


@pytest.mark.parametrize("shard", [False, True])
def test_round_trip_reproduces_outputs(tmp_path, model, tokenizer, chat, config, shard):
    path = save_checkpoint(model, tmp_path / "ckpt", tokenizer, max_shard_size=50_000 if shard else "4GB")
    assert (len(weight_files(path)) > 1) == shard
    loaded, tok = load_checkpoint(path)
    assert tok.convert_tokens_to_ids("<end_of_turn>") == chat.end_of_turn_id
    torch.testing.assert_close(_logits(loaded, chat, config), _logits(model, chat, config), atol=0, rtol=0)
    assert loaded.llm.lm_head.weight is loaded.llm.model.embed_tokens.weight  # tied again
    assert loaded.config == model.config
    copied, _ = load_checkpoint(path, mapped=False, with_tokenizer=False)  # tensors read into memory of its own
    torch.testing.assert_close(_logits(copied, chat, config), _logits(model, chat, config), atol=0, rtol=0)


def test_bf16_load(tmp_path, model, tokenizer):
    path = save_checkpoint(model, tmp_path / "ckpt", tokenizer)
    for mapped in (True, False):
        loaded, _ = load_checkpoint(path, dtype=torch.bfloat16, mapped=mapped)
        assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}


def test_saving_over_an_existing_checkpoint_replaces_it(tmp_path, model, tokenizer):
    path = save_checkpoint(model, tmp_path / "ckpt", tokenizer)
    (path / "stale.txt").write_text("old")
    save_checkpoint(model, path, tokenizer)
    assert not (path / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary leftovers


def test_describe_reads_headers(tmp_path, model, tokenizer):
    path = save_checkpoint(model, tmp_path / "ckpt", tokenizer)
    info = describe(path)
    counts = model.parameter_counts()
    assert info["parameters"] == counts  # the tied head is stored once
    assert info["dtype"] == "float32" and info["tokenizer"]


def test_strict_load_names_missing_unexpected_and_misshapen(model):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state.pop("token_mining.query_projector.1.bias")
    state["token_mining.extra"] = torch.zeros(1)
    state["video_tower.pre_layernorm.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError) as err:
        load_state_strict(model, state, where="x")
    msg = str(err.value)
    assert "missing 1: token_mining.query_projector.1.bias" in msg
    assert "unexpected 1: token_mining.extra" in msg
    assert "wrong shape 1: video_tower.pre_layernorm.weight [3]" in msg


def test_bad_directories_give_clear_errors(tmp_path, model, tokenizer):
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        load_checkpoint(tmp_path / "nope")
    other = tmp_path / "hf"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "hilight_gemma"}))
    with pytest.raises(CheckpointError, match="hilight convert"):
        load_checkpoint(other)
    path = save_checkpoint(model, tmp_path / "ckpt", tokenizer)
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_checkpoint(path)


def test_config_json_is_a_serialized_config(tmp_path, model, tokenizer):
    path = save_checkpoint(model, tmp_path / "ckpt", tokenizer)
    meta = json.loads((path / "config.json").read_text())
    assert from_dict(HiLightConfig, meta["config"]) == model.config


def test_loading_leaves_trainability_to_the_caller(tmp_path, model, tokenizer):
    from hilight.checkpoint import load_checkpoint, save_checkpoint
    from hilight.config import TrainableConfig

    model.set_trainable(TrainableConfig(token_mining=True))
    save_checkpoint(model, tmp_path / "ckpt", tokenizer)
    assert "trainable" not in json.loads((tmp_path / "ckpt" / "config.json").read_text())["config"]
    loaded, _ = load_checkpoint(tmp_path / "ckpt")
    assert all(p.requires_grad for p in loaded.parameters())  # torch's default, as for a model just built


def test_a_version_1_checkpoint_loads_without_its_training_state(tmp_path, model, tokenizer):
    from hilight.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

    save_checkpoint(model, tmp_path / "ckpt", tokenizer)
    meta = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    meta["format_version"] = 1
    meta["config"].update(trainable={"video_tower": False, "image_tower": False, "token_mining": True, "llm": True},
                          towers="both")
    meta["config"]["token_mining"]["token_positions"] = 0
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(meta))
    loaded, _ = load_checkpoint(tmp_path / "ckpt")
    assert loaded.config == model.config
    meta["config"]["towers"] = "video"
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="towers='video', an option this version of HiLight no longer has"):
        load_checkpoint(tmp_path / "ckpt")
