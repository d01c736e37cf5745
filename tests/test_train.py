import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from hilight.checkpoint import load_checkpoint
from hilight.cli import main
from hilight.config import TrainConfig, apply_overrides, from_dict, load_yaml
from hilight.data import FeatureCache, extract_features, read_records, record_videos, tower_identity
from hilight.synth.billiards import TableConfig
from hilight.synth.dataset import generate_split
from hilight.text import Message, collate
from hilight.training.loop import epoch_batches as _batches
from hilight.training.vlm import set_stage, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny billiards set, a random tiny model and its feature cache."""
    root = tmp_path_factory.mktemp("train")
    table = TableConfig(image_size=64)
    generate_split(root / "bil", "train", 10, seed=4, cfg=table)
    generate_split(root / "bil", "val", 2, seed=4, cfg=table)
    assert main(["init", "--preset", "tiny", "--train-tokenizer", str(root / "bil" / "train.json"),
                 "--vocab-size", "400", "--out", str(root / "base")]) == 0
    assert main(["extract-features", "--data", str(root / "bil" / "train.json"), str(root / "bil" / "val.json"),
                 "--videos", str(root / "bil" / "videos"), "--model", str(root / "base"),
                 "--out", str(root / "cache")]) == 0
    return root


def _config(root: Path, out: str, **overrides) -> TrainConfig:
    data = {"model": str(root / "base"), "output_dir": str(root / out),
            "data": {"train": str(root / "bil" / "train.json"), "val": str(root / "bil" / "val.json"),
                     "videos": str(root / "bil" / "videos"), "cache": str(root / "cache")},
            "max_steps": 8, "batch_size": 4, "lr": 3e-3, "save_every": 4, "eval_every": 4, "log_every": 1}
    cfg = from_dict(TrainConfig, data)
    return apply_overrides(cfg, [f"{k}={v}" for k, v in overrides.items()])


STAGES = {
    "stage1": ({"trainable.token_mining": "true"}, lambda n: n.startswith("token_mining.")),
    "lora": ({"trainable.token_mining": "false", "lora.enabled": "true", "lora.r": "4"},
             lambda n: n.startswith("llm.") and ".lora_" in n),
    "lora+tm": ({"trainable.token_mining": "true", "lora.enabled": "true", "lora.r": "4"},
                lambda n: n.startswith("token_mining.") or (n.startswith("llm.") and ".lora_" in n)),
    "full": ({"trainable.token_mining": "true", "trainable.llm": "true"},
             lambda n: n.startswith(("token_mining.", "llm."))),
}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_trainable_parameter_names_per_stage(workspace, stage):
    overrides, expected = STAGES[stage]
    cfg = _config(workspace, "unused", **overrides)
    model, _ = load_checkpoint(cfg.model)
    set_stage(model, cfg)
    names = {n for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in names if expected(n)} and trainable
    assert not any("lm_head" in n or "tower" in n for n in trainable)


def test_batches_give_each_rank_a_distinct_share():
    shares = [sum(_batches(10, 3, seed=1, epoch=0, rank=r, world=2), []) for r in range(2)]
    assert len(shares[0]) == len(shares[1])  # equal step counts on every rank
    assert set(range(10)) <= set(shares[0]) | set(shares[1])
    assert not set(shares[0][:5]) & set(shares[1][:5])  # disjoint before padding wraps around
    assert _batches(10, 3, 1, 0, 0, 1) == _batches(10, 3, 1, 0, 0, 1)
    assert _batches(10, 3, 1, 0, 0, 1) != _batches(10, 3, 1, 1, 0, 1)  # a new order each epoch


def test_batches_grouped_by_length_pad_less_and_keep_every_sample():
    lengths = [30 if i % 7 == 0 else 10 for i in range(700)]  # one long sample in seven
    plain = _batches(700, 16, seed=0, epoch=0, rank=0, world=1)
    grouped = _batches(700, 16, seed=0, epoch=0, rank=0, world=1, lengths=lengths)
    assert sorted(sum(grouped, [])) == sorted(sum(plain, []))  # the same samples, once each
    def padded(batches):
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)
    assert padded(grouped) < 0.6 * padded(plain)
    assert grouped != _batches(700, 16, seed=0, epoch=1, rank=0, world=1, lengths=lengths)
    # two ranks: disjoint shares, and each global batch holds samples of one length
    shares = [_batches(700, 4, seed=0, epoch=0, rank=r, world=2, lengths=lengths) for r in range(2)]
    assert not set(sum(shares[0], [])) & set(sum(shares[1], []))
    mixed = sum(len({lengths[i] for i in a + b}) > 1 for a, b in zip(*shares, strict=True))
    assert mixed <= 2  # only where a window's long samples run out


@pytest.mark.parametrize("stage", ["stage1", "lora+tm"])
def test_resume_ends_where_an_uninterrupted_run_ends(workspace, stage):
    overrides = STAGES[stage][0]
    full = train(_config(workspace, f"{stage}-full", **overrides))
    # a second run picks up from the step-4 checkpoint that the first run wrote
    # (and its metrics.jsonl as a kill after step 8 leaves it, a cut-off line at its end)
    resumed_dir = workspace / f"{stage}-resumed"
    resumed_dir.mkdir()
    shutil.copytree(workspace / f"{stage}-full" / "checkpoint-4", resumed_dir / "checkpoint-4")
    logged = (workspace / f"{stage}-full" / "metrics.jsonl").read_text()
    (resumed_dir / "metrics.jsonl").write_text(logged + '{"step": 9, "lo')
    resumed = train(_config(workspace, f"{stage}-resumed", **overrides), resume=True)
    assert resumed["final_loss"] == pytest.approx(full["final_loss"], rel=1e-5, abs=1e-6)
    ranks = [json.loads((workspace / d / "ranks" / "rank-0.json").read_text()) for d in (f"{stage}-full", f"{stage}-resumed")]
    assert ranks[0]["trainable_sha256"] == ranks[1]["trainable_sha256"]
    steps = [json.loads(x)["step"] for x in (resumed_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))  # the steps after the checkpoint are logged once
    rows = [json.loads(x) for x in (workspace / f"{stage}-full" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"]  # the loss falls
    assert (workspace / f"{stage}-full" / "loss.png").is_file()


def test_full_finetune_and_lora_merge_match(workspace, tokenizer=None):
    cfg = _config(workspace, "lora-merge", **STAGES["lora+tm"][0])
    train(cfg)
    adapter = workspace / "lora-merge" / "final"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "extra_weights.safetensors").is_file()
    out = workspace / "merged"
    assert main(["merge-lora", "--base", str(workspace / "base"), "--adapter", str(adapter), "--out", str(out)]) == 0
    merged, tok = load_checkpoint(out)
    # base + adapter, applied the peft way, must give the merged model's outputs
    from peft import PeftModel
    from safetensors.torch import load_file

    base, _ = load_checkpoint(workspace / "base")
    base.llm = PeftModel.from_pretrained(base.llm, str(adapter))
    with torch.no_grad():
        for name, value in load_file(adapter / "extra_weights.safetensors").items():
            dict(base.named_parameters())[name].copy_(value)
    from hilight.text import ChatTokenizer

    chat = ChatTokenizer(tok, merged.config.tokens_per_video)
    batch = collate([chat.encode([Message("user", "<video>\nWhich ball went in?"), Message("model", "The red ball.")])],
                    chat.pad_id)
    pixels = torch.randn(1, merged.config.video.num_frames, 3, 32, 32)
    with torch.no_grad():
        a = merged(batch.input_ids, batch.attention_mask, pixel_values=pixels).logits
        b = base(batch.input_ids, batch.attention_mask, pixel_values=pixels).logits
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert not torch.equal(merged.token_mining.query_projector[1].weight,
                           load_checkpoint(workspace / "base")[0].token_mining.query_projector[1].weight)


def test_bad_samples_are_excluded_and_reported(workspace):
    records = read_records(workspace / "bil" / "train.json")[:12]
    records[0] = dict(records[0], video="missing.mp4")
    records[1] = dict(records[1], conversations=[{"from": "robot", "value": "<video>"}])
    records[2] = dict(records[2], video=[records[2]["video"], records[3]["video"]])  # 2 videos, 1 marker
    (workspace / "bil" / "videos" / "broken.mp4").write_bytes(b"not a video")
    records[3] = dict(records[3], video="broken.mp4")
    path = workspace / "bil" / "with-bad.json"
    path.write_text(json.dumps(records))
    result = train(_config(workspace, "bad", **{"data.train": str(path), "max_steps": 2, "data.val": "''"}))
    bad = json.loads((workspace / "bad" / "bad_samples.json").read_text())
    reasons = {b["id"]: b["reason"] for b in bad}
    assert result["excluded"] == 4 and result["samples"] == 8
    assert "missing video" in reasons[records[0]["id"]]
    assert "unknown speaker" in reasons[records[1]["id"]]
    assert "marker" in reasons[records[2]["id"]]
    assert "feature cache" in reasons[records[3]["id"]]


def test_data_check_lists_bad_samples(workspace, capsys):
    records = read_records(workspace / "bil" / "train.json")[:5]
    records[0] = dict(records[0], video="missing.mp4")
    path = workspace / "bil" / "check.json"
    path.write_text(json.dumps(records))
    report = workspace / "check-report.json"
    check = ["data", "check", str(path), "--videos", str(workspace / "bil" / "videos"), "--model", str(workspace / "base"),
             "--out", str(report)]
    assert main(check) == 0
    out = capsys.readouterr().out
    assert "5 records: 4 usable; 1 missing file" in out and "1 unusable" in out
    bad = json.loads(report.read_text())
    assert [b["id"] for b in bad] == [str(records[0]["id"])] and "missing.mp4" in bad[0]["reason"]
    assert main([*check, "--max-length", "40", "--strict"]) == 1  # every sample is now too long
    assert "5 records: 0 usable; 5 over-long samples" in capsys.readouterr().out
    bad = json.loads(report.read_text())
    assert len(bad) == 5 and all("exceed max_length 40" in b["reason"] for b in bad)


def test_data_check_on_videoinstruct_style_records(tmp_path, capsys, monkeypatch):
    """VideoInstruct-100K names v_xxx.pkl (the original's pickled frames): the raw v_xxx.mp4
    beside it is used; the bundled model's settings apply by default; the report goes to the
    current directory."""
    videos = tmp_path / "videos"
    videos.mkdir()
    shutil.copy(ROOT / "examples" / "test-00001.mp4", videos / "v_real.mp4")
    for name in ("v_empty1.mp4", "v_empty2.mp4"):
        (videos / name).write_bytes(b"")
    (videos / "v_gone0.pkl").write_bytes(b"\x80\x04not really a pickle")  # a pickle is never read
    names = ["v_real", "v_empty1", "v_empty2", *(f"v_gone{i}" for i in range(7))]
    records = [{"id": n, "video": f"{n}.pkl", "conversations": [
        {"from": "human", "value": "<video>\nWhat happens in the video?"}, {"from": "gpt", "value": "A shot."}]}
        for n in names]
    data = tmp_path / "VideoInstruct-10.json"
    data.write_text(json.dumps(records))
    monkeypatch.chdir(tmp_path / "videos")
    assert main(["data", "check", str(data), "--videos", str(videos)]) == 0
    out = capsys.readouterr().out
    assert "10 records: 1 usable; 7 missing files; 2 empty files" in out
    assert "v_empty1.mp4 (record v_empty1), v_empty2.mp4 (record v_empty2)" in out
    assert all(f"v_gone{i}.pkl (record v_gone{i})" in out for i in range(7))
    assert "pickled frames are never unpickled" in out and "billiards-small" in out
    bad = json.loads((videos / "VideoInstruct-10.bad.json").read_text())
    assert sorted(b["id"] for b in bad) == sorted(names[1:])
    assert record_videos(records[0], videos) == [videos / "v_real.mp4"]  # what training reads, too
    assert record_videos(records[3], videos) == [videos / "v_gone0.pkl"]  # refused where it is read


def test_feature_cache_keys_follow_towers_and_preprocessing(workspace):
    model, _ = load_checkpoint(workspace / "base", with_tokenizer=False)
    video = record_videos(read_records(workspace / "bil" / "train.json")[0], workspace / "bil" / "videos")[0]
    ident = tower_identity(model)
    key = FeatureCache(workspace / "cache", ident).key(video)
    with torch.no_grad():
        model.video_tower.pre_layernorm.weight.add_(0.01)
    assert tower_identity(model) != ident
    model.video_tower.pre_layernorm.weight.data.sub_(0.01)
    model.config.video.resize = "center_crop"
    assert tower_identity(model) != ident
    assert FeatureCache(workspace / "cache", "other").key(video) != key


def test_extraction_is_resumable_and_shards_without_overlap(workspace, tmp_path):
    model, _ = load_checkpoint(workspace / "base", with_tokenizer=False)
    videos = [v for r in read_records(workspace / "bil" / "train.json") for v in record_videos(r, workspace / "bil" / "videos")]
    cache = FeatureCache(tmp_path / "c", tower_identity(model))
    parts = [extract_features(model, videos, cache, torch.float16, rank=r, world=2) for r in range(2)]
    assigned = [set(p["assigned"]) for p in parts]
    assert not assigned[0] & assigned[1] and assigned[0] | assigned[1] == set(videos)
    again = extract_features(model, videos, cache, torch.float16)
    assert not again["extracted"] and len(again["cached"]) == len(set(videos))
    feats = cache.load(videos[0])
    assert feats.video.dtype == torch.float16 and feats.video.shape[0] == model.config.video_tower.num_tokens(4)


def test_shipped_configs_load():
    from hilight.config import AlignConfig

    for path in sorted((ROOT / "configs").glob("*.yaml")):
        load_yaml(AlignConfig if path.name.startswith("align") else TrainConfig, path)
    for path in sorted((ROOT / "configs" / "deepspeed").glob("*.json")):
        assert json.loads(path.read_text())["zero_optimization"]["stage"] in (2, 3)
    for path in sorted((ROOT / "configs" / "accelerate").glob("*.yaml")):
        assert "distributed_type" in yaml.safe_load(path.read_text())


@pytest.mark.slow
def test_two_processes_share_data_and_end_identical(workspace):
    cfg = _config(workspace, "ddp", max_steps=3)
    config_file = workspace / "ddp.yaml"
    from dataclasses import asdict

    config_file.write_text(yaml.safe_dump(asdict(cfg)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           "29533", "-m", "hilight", "train", "--config", str(config_file)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((workspace / "ddp" / "ranks" / f"rank-{r}.json").read_text()) for r in range(2)]
    assert all(r["world_size"] == 2 for r in ranks)
    assert ranks[0]["trainable_sha256"] == ranks[1]["trainable_sha256"]  # DDP kept the replicas equal
    assert not set(ranks[0]["samples"]) & set(ranks[1]["samples"])  # distinct shares


@pytest.mark.slow
def test_deepspeed_zero2_smoke(workspace):
    pytest.importorskip("deepspeed")
    cfg = _config(workspace, "ds", max_steps=2, deepspeed=str(ROOT / "configs" / "deepspeed" / "zero2.json"))
    config_file = workspace / "ds.yaml"
    from dataclasses import asdict

    config_file.write_text(yaml.safe_dump(asdict(cfg)))
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT="29541", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    proc = subprocess.run([sys.executable, "-m", "hilight", "train", "--config", str(config_file)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (workspace / "ds" / "final" / "model.safetensors").is_file()
    assert json.loads((workspace / "ds" / "ranks" / "rank-0.json").read_text())["engine"] == "DEEPSPEED"


def test_bf16_autocast_trains_from_the_fp16_feature_cache(workspace):
    cfg = _config(workspace, "bf16", max_steps=2, precision="bf16", **{"data.val": "''"})
    result = train(cfg)
    assert result["steps"] == 2 and result["final_loss"] == result["final_loss"]


def test_gradient_checkpointing_and_accumulation(workspace):
    cfg = _config(workspace, "gc", max_steps=2, grad_accum=2, gradient_checkpointing="true",
                  **{"trainable.llm": "true", "data.val": "''"})
    result = train(cfg)
    ranks = json.loads((workspace / "gc" / "ranks" / "rank-0.json").read_text())
    assert result["steps"] == 2 and len(ranks["samples"]) == 2 * 2 * cfg.batch_size  # 2 micro-batches per step
    assert result["final_loss"] == result["final_loss"]  # finite, not NaN
    model, _ = load_checkpoint(workspace / "gc" / "final")
    assert "trainable" not in json.loads((workspace / "gc" / "final" / "config.json").read_text())["config"]


def _facts_config(root: Path, out: str, model: Path, lm_weight: float, llm: bool) -> TrainConfig:
    from hilight.recipes.billiards_small.facts import MINED_FACTS

    cfg = _config(root, out, **{"trainable.token_mining": "true", "trainable.llm": str(llm).lower()})
    cfg.model = str(model)
    cfg.auxiliary.objective = MINED_FACTS
    cfg.auxiliary.data = [str(root / "bil" / "train-captions.json"), str(root / "bil" / "val-captions.json")]
    cfg.lm_weight = lm_weight
    cfg.__post_init__()
    return cfg


def test_frame_facts_stage_trains_token_mining_alone_then_hands_its_head_on(workspace, caplog):
    from hilight.recipes.billiards_small.facts import HEAD_FILE

    base, _ = load_checkpoint(workspace / "base")
    stage1 = train(_facts_config(workspace, "facts1", workspace / "base", lm_weight=0.0, llm=False))
    tuned, _ = load_checkpoint(stage1["final"])
    before, after = base.state_dict(), tuned.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("token_mining."))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("token_mining."))
    assert (Path(stage1["final"]) / HEAD_FILE).is_file()
    assert not any(k.startswith(("auxiliary.", "model.")) for k in after)  # the head is not in the model
    rows = [json.loads(x) for x in (workspace / "facts1" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss"] == r["loss"] for r in rows) and any("val_loss" in r for r in rows)
    with caplog.at_level("INFO", logger="hilight.training.vlm"):
        stage2 = train(_facts_config(workspace, "facts2", Path(stage1["final"]), lm_weight=1.0, llm=True))
    assert "auxiliary head continued" in caplog.text
    assert (Path(stage2["final"]) / HEAD_FILE).is_file()


def test_a_frame_facts_head_for_other_balls_is_not_continued(workspace, tmp_path, caplog):
    from hilight.checkpoint import read_config
    from hilight.recipes.billiards_small.facts import MinedFacts

    config = read_config(workspace / "base")
    captions = json.loads((workspace / "bil" / "train-captions.json").read_text())
    (tmp_path / "all.json").write_text(json.dumps(captions))
    head = MinedFacts([str(tmp_path / "all.json")], workspace / "bil" / "videos", config)
    head.save(tmp_path)
    assert MinedFacts([str(tmp_path / "all.json")], workspace / "bil" / "videos", config).load(tmp_path)
    fewer = [dict(c, tracks={**c["tracks"], "names": c["tracks"]["names"][:1], "xy": [xy[:2] for xy in c["tracks"]["xy"]]})
             for c in captions]
    (tmp_path / "fewer.json").write_text(json.dumps(fewer))
    with caplog.at_level("WARNING", logger="hilight.recipes.billiards_small.facts"):
        assert not MinedFacts([str(tmp_path / "fewer.json")], workspace / "bil" / "videos", config).load(tmp_path)
    assert "starting a fresh one" in caplog.text


def test_frame_facts_config_errors(workspace, tmp_path):
    from hilight.config import ConfigError
    from hilight.errors import DataError

    with pytest.raises(ConfigError, match="no LLM training"):
        _facts_config(workspace, "x", workspace / "base", lm_weight=0.0, llm=True)
    with pytest.raises(ConfigError, match="expected 'module:Class'"):
        train(_config(workspace, "x", **{"auxiliary.objective": "nothing"}))
    captions = json.loads((workspace / "bil" / "train-captions.json").read_text())
    (tmp_path / "few.json").write_text(json.dumps(captions[:2]))
    cfg = _facts_config(workspace, "facts-missing", workspace / "base", lm_weight=0.0, llm=False)
    cfg.auxiliary.data = [str(tmp_path / "few.json")]
    with pytest.raises(DataError, match="few.json: no auxiliary targets for"):
        train(cfg)


def test_a_run_goes_on_past_records_that_turn_out_bad(workspace, tmp_path):
    """Without a feature cache a video that does not decode is found only when its sample is
    loaded: the run excludes it there and goes on (and a resume does the same); a record whose
    conversations are not a list is excluded up front, without a traceback."""
    import shutil

    videos = tmp_path / "videos"
    shutil.copytree(workspace / "bil" / "videos", videos)
    records = json.loads((workspace / "bil" / "train.json").read_text())
    (videos / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 40)
    bad = [{**records[0], "id": "broken", "video": "broken.mp4"}, {**records[1], "id": "not-a-list", "conversations": 5}]
    (tmp_path / "train.json").write_text(json.dumps(bad + records))
    from dataclasses import replace

    steps = len(records) // 8 + 2  # a whole epoch: every sample is loaded once
    cfg = _config(workspace, "bad-records", batch_size=8, max_steps=steps, **STAGES["stage1"][0])
    cfg = replace(cfg, data=replace(cfg.data, train=str(tmp_path / "train.json"), val="", videos=str(videos), cache=""))
    result = train(cfg)
    assert result["steps"] == steps
    listed = {b["id"]: b["reason"] for b in json.loads((workspace / "bad-records" / "bad_samples.json").read_text())}
    assert "must be a list of turns" in listed["not-a-list"]
    assert "broken.mp4" in listed["broken"] and "Traceback" not in listed["broken"]


def test_resume_skips_a_checkpoint_cut_short_and_stale_writes(workspace, caplog):
    import logging
    import shutil

    cfg = _config(workspace, "cut-short", **STAGES["stage1"][0])
    full = train(cfg)
    out = workspace / "cut-short"
    shutil.rmtree(out / "final")
    # the newest checkpoint's optimizer file cut short, and a kill's leftover temp directory
    optimizer = out / "checkpoint-8" / "optimizer.safetensors"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    (out / ".checkpoint-12.x1y2").mkdir()
    with caplog.at_level(logging.WARNING):
        resumed = train(cfg, resume=True)
    assert "checkpoint-8/optimizer.safetensors: unreadable" in caplog.text
    assert resumed["final_loss"] == pytest.approx(full["final_loss"], rel=1e-5, abs=1e-6)  # from checkpoint-4
    assert not (out / ".checkpoint-12.x1y2").exists()
    # a trainer state cut short names its file; with no whole checkpoint left, resume says so
    for ckpt in ("checkpoint-4", "checkpoint-8"):
        (out / ckpt / "trainer_state.json").write_text('{"progress": {"st')
    from hilight.errors import CheckpointError

    with pytest.raises(CheckpointError, match="none of its 2 checkpoint"):
        train(cfg, resume=True)
    assert "checkpoint-4/trainer_state.json: unreadable" in caplog.text


@pytest.mark.slow
def test_killed_during_checkpoint_writes_a_resume_ends_with_the_same_weights(workspace, tmp_path):
    """kill -9 the moment a checkpoint's temporary directory appears, ten times in a row, each
    time resuming: the run ends with the weights of a run never interrupted."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    from hilight.config import to_dict

    def config(out: str) -> Path:
        cfg = _config(workspace, out, max_steps=24, save_every=2, eval_every=100, **STAGES["stage1"][0])
        path = tmp_path / f"{out}.yaml"
        path.write_text(yaml.safe_dump(to_dict(cfg)))
        return path

    def command(path: Path, resume: bool) -> list[str]:
        return [sys.executable, "-m", "hilight", "train", "--config", str(path), *(["--resume"] if resume else [])]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(command(config("uninterrupted"), False), check=True, env=env, capture_output=True, timeout=300)
    path, out = config("killed"), workspace / "killed"
    kills = 0
    def writing(after: int) -> bool:  # a checkpoint write past step ``after`` has begun
        return any(int(p.name.split("-")[1].split(".")[0]) > after for p in out.glob(".checkpoint-*"))

    while kills < 10:
        done = [int(p.name.split("-")[1]) for p in out.glob("checkpoint-*")]
        proc = subprocess.Popen(command(path, resume=bool(done)), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 300
        # each attempt lets one checkpoint through, then dies inside the write of the next
        while proc.poll() is None and not writing(max(done, default=0) + 2) and time.monotonic() < deadline:
            time.sleep(0.002)
        if proc.poll() is not None:  # the run finished before another write began
            assert proc.returncode == 0, proc.stderr.read()
            break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
    if not (out / "final").exists():
        subprocess.run(command(path, True), check=True, env=env, capture_output=True, timeout=300)
    digests = [json.loads((workspace / d / "ranks" / "rank-0.json").read_text())["trainable_sha256"]
               for d in ("uninterrupted", "killed")]
    assert kills >= 5 and digests[0] == digests[1]
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # each step logged once
