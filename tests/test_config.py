import json

import pytest

from hilight.cli import main
from hilight.config import (
    PRESETS,
    ConfigError,
    HiLightConfig,
    TokenMiningConfig,
    apply_overrides,
    from_dict,
    preset,
    to_dict,
)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_dicts(name):
    cfg = preset(name)
    assert from_dict(HiLightConfig, json.loads(json.dumps(to_dict(cfg)))) == cfg


def test_dimension_cross_checks():
    with pytest.raises(ConfigError, match="token_mining.llm_dim=1024 must equal llm.hidden_size=2048"):
        HiLightConfig(token_mining=TokenMiningConfig(llm_dim=1024))


def test_unknown_fields_and_wrong_types_are_rejected():
    with pytest.raises(ConfigError, match="unknown field"):
        from_dict(HiLightConfig, {"llm": {"hidden": 3}})
    with pytest.raises(ConfigError, match="llm.num_layers: expected int"):
        from_dict(HiLightConfig, {"llm": {"num_layers": "many"}})
    with pytest.raises(ConfigError, match="truncation"):
        from_dict(HiLightConfig, {"text": {"truncation": "sometimes"}})


def test_dotted_overrides():
    cfg = apply_overrides(preset("tiny"), ["token_mining.frame_local=true", "text.max_length=64", "llm.rms_norm_eps=1e-5"])
    assert cfg.token_mining.frame_local and cfg.text.max_length == 64 and cfg.llm.rms_norm_eps == 1e-5
    with pytest.raises(ConfigError, match="unknown field"):
        apply_overrides(cfg, ["llm.nope=1"])
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(cfg, ["llm.hidden_size"])


def test_info_preset_counts_match_the_real_model(capsys):
    assert main(["info", "--preset", "hilight-2b", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    counts = info["parameters"]
    assert counts["token_mining"] == 6_892_864
    assert counts["llm"] == 2_506_172_416
    assert counts["video_tower"] == 86_204_160  # CLIP-ViP B/16 incl. proxies, temporal table, projection
    assert counts["image_tower"] == 86_192_640  # Long-CLIP visual B/16 incl. projection
    assert info["tokens_per_video"] == 384
