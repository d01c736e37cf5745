import json
import shutil

import pytest
import torch

from hilight.checkpoint import BUNDLED_MODEL


@pytest.mark.slow
def test_recipe_end_to_end_at_a_toy_budget(tmp_path):
    from hilight.data import read_records
    from hilight.recipes.billiards_small.questions import INVENTORY_QUESTIONS
    from hilight.recipes.billiards_small.recipe import RecipeError, billiards_small, bundle, load_recipe

    cfg = load_recipe(None, ["seed=1", "clips=10", "long_clips=3", "align_steps=2", "image_align_steps=2", "stage1_steps=2",
                             "stage2_steps=2", "batch_size=4", "vocab_size=400"])
    summary = billiards_small(tmp_path / "run", cfg, workers=1)
    assert list(summary["seconds"]) == ["1 data", "2 tokenizer + model", "3 align video tower", "4 align image tower",
                                        "5 tower features", "6 stage 1 (TokenMining on frame facts)",
                                        "7 stage 2 (full fine-tune)", "8 evaluation"]
    report = json.loads((tmp_path / "run" / "report" / "report.json").read_text())
    assert summary["accuracy"]["overall"] == report["overall"] and report["overall"]["n"] >= 1
    assert (tmp_path / "run" / "report" / "accuracy.png").is_file()
    assert json.loads((tmp_path / "run" / "recipe.json").read_text())["settings"]["config"]["seed"] == 1
    # started again, a finished run keeps every step and says the same
    again = billiards_small(tmp_path / "run", cfg, workers=1)
    assert again["seconds"] == summary["seconds"] and again["accuracy"] == summary["accuracy"]
    # an interrupted run goes on from the first unfinished step
    shutil.rmtree(tmp_path / "run" / "stage2")
    report_file = tmp_path / "run" / "report" / "report.json"
    report_file.write_text("{}")  # step 8's output is there, but step 7 runs again, so step 8 must too
    resumed = billiards_small(tmp_path / "run", cfg, workers=1)
    assert {k: v for k, v in resumed["seconds"].items() if not k.startswith(("7", "8"))} == \
        {k: v for k, v in summary["seconds"].items() if not k.startswith(("7", "8"))}
    assert "single_video" in json.loads(report_file.read_text())
    # a run stopped inside a training step continues from that step's newest checkpoint
    stage2 = tmp_path / "run" / "stage2"
    shutil.rmtree(stage2 / "final")
    shutil.rmtree(stage2 / "checkpoint-2")
    assert (stage2 / "checkpoint-1").is_dir()
    continued = billiards_small(tmp_path / "run", cfg, workers=1)
    assert continued["resumed_at_step"] == {"7 stage 2 (full fine-tune)": 1}
    assert [json.loads(x)["step"] for x in (stage2 / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    with pytest.raises(RecipeError, match="other settings"):
        billiards_small(tmp_path / "run", load_recipe(None, ["seed=2", "clips=10"]), workers=1)
    # stage 2 trains on the questions plus three inventory questions per training clip
    questions, stage2 = (read_records(p) for p in (tmp_path / "run" / "data" / "train.json",
                                                   tmp_path / "run" / "stage2-train.json"))
    inventory = [r for r in stage2 if r["meta"]["types"][0] in INVENTORY_QUESTIONS]
    long = read_records(tmp_path / "run" / "data" / "train-long.json")
    assert len(stage2) == len(questions) + 3 * 8 + len(long) and len(inventory) == 3 * 8 and long
    # the long clips' test questions are read in segments, with a first-segment-only baseline
    long_report = json.loads((tmp_path / "run" / "report-long" / "report.json").read_text())
    assert summary["accuracy"]["long_clips"] == long_report["overall"] and "first_segment" in long_report["overall"]
    from hilight.checkpoint import load_checkpoint

    bundle(tmp_path / "run", tmp_path / "asset", tmp_path / "examples", count=2)
    assert load_checkpoint(tmp_path / "asset")[0].config == load_checkpoint(summary["model"])[0].config
    assert (tmp_path / "asset" / "eval-report.md").is_file()
    card = json.loads((tmp_path / "asset" / "card.json").read_text())
    assert card["name"] == "billiards-small" and card["accuracy"]["single-video questions"] == \
        round(report["single_video"]["accuracy"], 3)
    assert card["accuracy"]["long-clip questions (read in segments)"] == round(long_report["overall"]["accuracy"], 3)
    assert "long-clip first segment" in card["baselines"]
    video = cfg.model.video
    assert card["frames"] == {"num_frames": video.num_frames, "image_size": video.image_size, "sampling": video.sampling}
    assert set(card["accuracy_per_type"]) == set(report["per_type"])
    for name, row in card["accuracy_per_type"].items():
        assert row["n"] == report["per_type"][name]["n"] and row["accuracy"] == round(report["per_type"][name]["accuracy"], 3)
    assert card["recipe_seconds"]["total"] == json.loads((tmp_path / "run" / "recipe.json").read_text())["total_seconds"]
    assert 1 <= len(list((tmp_path / "examples").glob("*.mp4"))) <= 2  # the toy test split may hold one clip
    assert set(json.loads((tmp_path / "examples" / "truth.json").read_text())) == \
        {p.name for p in (tmp_path / "examples").glob("*.mp4")}


def test_the_recipe_config_file_is_the_bundled_models_settings():
    from hilight.config import to_dict
    from hilight.recipes.billiards_small.recipe import CONFIG, RecipeConfig, load_recipe

    assert CONFIG.is_file() and to_dict(load_recipe()) == to_dict(RecipeConfig())
    bundled = json.loads((BUNDLED_MODEL / "config.json").read_text())["config"]
    recipe = json.loads(json.dumps(to_dict(RecipeConfig().model)))
    recipe["llm"]["vocab_size"] = bundled["llm"]["vocab_size"]  # the trained tokenizer's size
    assert recipe == bundled
    assert load_recipe(None, ["stage2_steps=6000", "model.llm.num_layers=6"]).model.llm.num_layers == 6
    from hilight.config import ConfigError

    with pytest.raises(ConfigError, match="unknown field"):
        load_recipe(None, ["towers=video"])


@pytest.mark.skipif(not (BUNDLED_MODEL / "config.json").is_file(), reason="no bundled model in this build")
def test_bundled_model_answers_an_example(capsys):
    from hilight.cli import main

    assert main(["examples", "--dtype", "fp32"]) == 0
    out = capsys.readouterr().out
    # the bundled model's own score on its 16 example questions (as `hilight examples` printed it
    # before the package was reorganised: its answers must stay the same)
    assert out.strip().splitlines()[-1] == "7 of 16 right"
    assert out.count("[right]") == 7 and out.count("[wrong]") == 9


@pytest.mark.skipif(not (BUNDLED_MODEL / "config.json").is_file(), reason="no bundled model in this build")
def test_bundled_model_keeps_its_answers_in_bf16_packed_int8_and_int4():
    """The faster number formats answer the example questions as fp32 does (the full-test-split
    figures are benchmarks/precision_accuracy.py's). Cue-direction answers are left out: the
    model is at the blind level there (13 %), its top answers are near ties that any rounding
    flips, and the whole-split accuracy rule covers them."""
    from pathlib import Path

    from hilight.evaluation.qa import load_items, run
    from hilight.evaluation.scoring import extract
    from hilight.inference.engine import Engine, GenerationSettings

    examples = Path(__file__).resolve().parents[1] / "examples"
    extracted = {}
    for label, dtype, quantize in (("fp32", torch.float32, "none"), ("bf16", torch.bfloat16, "none"),
                                   ("packed", torch.bfloat16, "packed"), ("int8", torch.bfloat16, "int8"),
                                   ("int4", torch.bfloat16, "int4")):
        items, problems = load_items(examples / "questions.json", examples)
        assert not problems and not run(Engine.from_checkpoint(BUNDLED_MODEL, dtype=dtype, quantize=quantize),
                                        items, GenerationSettings(max_new_tokens=24), batch_size=8, blind=False)
        assert all(extract(it.kind, it.answer) is not None for it in items)  # every answer parses
        extracted[label] = [extract(it.kind, it.answer) for it in items if it.qtype != "cue_direction"]
    assert len(extracted["fp32"]) >= 8
    for label in ("bf16", "packed", "int8", "int4"):
        same = sum(a == b for a, b in zip(extracted[label], extracted["fp32"], strict=True))
        assert same >= len(extracted["fp32"]) - 1, (label, extracted[label], extracted["fp32"])
