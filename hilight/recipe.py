"""``hilight recipe billiards-small``: the bundled model, trained end to end by the project's
own pipeline on synthetic billiards clips, reproducible from a seed.

Steps (each timed): generate the data set; train a Gemma-style tokenizer and build the
``billiards-small`` model; align the video tower (CLIP-ViP+: global + SPARC local loss +
language mask) and then the image tower (Long-CLIP role, frame by frame) on the captions;
cache both towers' outputs; VLM stage 1 (TokenMining); VLM stage 2 as a *full* fine-tune of
TokenMining and the LLM (a 4-layer LLM that starts from random weights has no language to
preserve, so LoRA would only slow it down); evaluate on the held-out test split.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from hilight.config import (
    AlignConfig,
    AlignDataConfig,
    AlignLossConfig,
    DataConfig,
    TextTowerConfig,
    TrainableConfig,
    TrainConfig,
    apply_overrides,
    preset,
)

log = logging.getLogger(__name__)


@dataclass
class RecipeBudget:
    clips: int = 1000
    align_steps: int = 400
    image_align_steps: int = 200
    stage1_steps: int = 300
    stage2_steps: int = 1500
    batch_size: int = 16
    vocab_size: int = 1000


def billiards_small(out: Path, seed: int = 0, budget: RecipeBudget | None = None, workers: int = 2) -> dict:
    """Run the whole recipe under ``out``; returns the per-step times and the evaluation."""
    import torch

    from hilight.align import align
    from hilight.checkpoint import load_checkpoint, save_checkpoint
    from hilight.data import FeatureCache, extract_features, read_records, record_videos, tower_identity
    from hilight.engine import Engine, GenerationSettings
    from hilight.eval import evaluate
    from hilight.model import HiLight
    from hilight.synth.dataset import generate_split, split_sizes
    from hilight.text import from_llava
    from hilight.tokenizer import train_tokenizer
    from hilight.train import train

    budget = budget or RecipeBudget()
    out.mkdir(parents=True, exist_ok=True)
    data, times = out / "data", {}

    def step(name: str):
        start = time.perf_counter()

        def done():
            times[name] = round(time.perf_counter() - start, 1)
            log.info("%s: %.1f s", name, times[name])
        return done

    done = step("1 data")
    for split, n in split_sizes(budget.clips).items():
        generate_split(data, split, n, seed, workers=workers)
    done()

    done = step("2 tokenizer + model")
    texts = [c["caption"] for c in json.loads((data / "train-captions.json").read_text())]
    for rec in read_records(data / "train.json"):
        texts += [m.content.replace("<video>", " ") for m in from_llava(rec["conversations"])]
    tokenizer = train_tokenizer(texts, budget.vocab_size)
    config = apply_overrides(preset("billiards-small"), [f"llm.vocab_size={len(tokenizer)}"])
    torch.manual_seed(seed)
    save_checkpoint(HiLight(config), out / "base", tokenizer)
    done()

    text_tower = TextTowerConfig(vocab_size=len(tokenizer), hidden_size=96, intermediate_size=384, num_layers=2,
                                 num_heads=4, max_positions=96, projection_dim=64)
    align_data = AlignDataConfig(train=str(data / "train-captions.json"), val=str(data / "val-captions.json"),
                                 videos=str(data / "videos"), frames_cache=str(out / "frames"))
    for name, tower, model, steps in (("3 align video tower", "video", out / "base", budget.align_steps),
                                      ("4 align image tower", "image", out / "align-video" / "final",
                                       budget.image_align_steps)):
        done = step(name)
        align(AlignConfig(model=str(model), tower=tower, output_dir=str(out / f"align-{tower}"), text_tower=text_tower,
                          data=align_data, loss=AlignLossConfig(), max_steps=steps, batch_size=budget.batch_size,
                          lr=1e-3, warmup_ratio=0.05, eval_every=steps, save_every=steps, seed=seed))
        done()

    done = step("5 tower features")
    aligned = out / "align-image" / "final"
    model, _ = load_checkpoint(aligned, with_tokenizer=False)
    cache = FeatureCache(out / "features", tower_identity(model))
    videos = [v for split in ("train", "val", "test") for r in read_records(data / f"{split}.json")
              for v in record_videos(r, data / "videos")]
    extract_features(model, videos, cache, torch.float16)
    done()

    vlm_data = DataConfig(train=str(data / "train.json"), val=str(data / "val.json"), videos=str(data / "videos"),
                          cache=str(out / "features"))
    stages = (("6 stage 1 (TokenMining)", aligned, "stage1", TrainableConfig(token_mining=True), budget.stage1_steps,
               2e-3),
              ("7 stage 2 (full fine-tune)", out / "stage1" / "final", "stage2",
               TrainableConfig(token_mining=True, llm=True), budget.stage2_steps, 1e-3))
    for name, start_from, folder, trainable, steps, lr in stages:
        done = step(name)
        train(TrainConfig(model=str(start_from), output_dir=str(out / folder), data=vlm_data, trainable=trainable,
                          max_steps=steps, batch_size=budget.batch_size, lr=lr, warmup_ratio=0.03,
                          eval_every=max(1, steps // 4), save_every=steps, max_length=512, seed=seed))
        done()

    done = step("8 evaluation")
    engine = Engine.from_checkpoint(out / "stage2" / "final")
    result = evaluate(engine, data / "test.json", data / "videos", out / "report", GenerationSettings(max_new_tokens=24),
                      batch_size=16, title="billiards-small on the held-out test split")
    done()
    summary = {"seed": seed, "budget": asdict(budget), "seconds": times, "total_seconds": round(sum(times.values()), 1),
               "model": str(out / "stage2" / "final"),
               "accuracy": {k: result[k] for k in ("single_video", "two_video", "overall") if k in result}}
    (out / "recipe.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def bundle(run: Path, target: Path, examples: Path, count: int = 4) -> None:
    """Copy the trained model into the package and a few test clips (with truth) to ``examples``."""
    from hilight.checkpoint import load_checkpoint, save_checkpoint

    model, tokenizer = load_checkpoint(run / "stage2" / "final")
    save_checkpoint(model, target, tokenizer)
    shutil.copy(run / "report" / "report.md", target / "eval-report.md")
    examples.mkdir(parents=True, exist_ok=True)
    truth = json.loads((run / "data" / "test-truth.json").read_text())
    records = json.loads((run / "data" / "test.json").read_text())
    chosen = sorted(truth)[:count]
    questions = [r for r in records if isinstance(r["video"], str) and r["video"] in chosen
                 and len(r["conversations"]) == 2 and r["meta"]["types"][0] in ("first_pocketed", "scratch",
                                                                                  "cue_direction", "balls_left")]
    for name in chosen:
        shutil.copy(run / "data" / "videos" / name, examples / name)
    (examples / "questions.json").write_text(json.dumps(questions, indent=1) + "\n")
    (examples / "truth.json").write_text(json.dumps({n: truth[n] for n in chosen}, indent=1) + "\n")
