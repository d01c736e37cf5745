"""``hilight recipe billiards-small``: the bundled model, trained end to end by HiLight's own
pipeline on synthetic billiards clips, reproducible from its config (and so from a seed).

Steps (each timed): generate the data set (one-shot clips, and long clips of several shots in a
row asked about one shot, read in segments); train a Gemma-style tokenizer and build the
``billiards-small`` model; align the video tower (CLIP-ViP+: global + SPARC local loss +
language mask, plus the frame-facts objective on the generator's ball tracks) and then the
image tower (Long-CLIP role, frame by frame, same losses); cache both towers' outputs; VLM
stage 1 (TokenMining, trained on the frame facts of its outputs: the LLM still has random
weights, so its caption loss would carry no signal, and is skipped); VLM stage 2 as a *full*
fine-tune of TokenMining and the LLM on the questions, the inventory questions and the
long-clip questions, the frame-facts loss kept beside it (a 4-layer LLM that starts from random
weights has no language to preserve, so LoRA would only slow it down); evaluate on the held-out
test split (and its long clips, with a first-segment-only baseline).

``recipe.json`` is rewritten after every step, so an interrupted run started again with the
same ``--out`` goes on from the first unfinished step.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from hilight.checkpoint import CARD_FILE
from hilight.config import (
    AlignConfig,
    AlignDataConfig,
    AlignLossConfig,
    AuxiliaryConfig,
    DataConfig,
    HiLightConfig,
    TextTowerConfig,
    TrainableConfig,
    TrainConfig,
    apply_overrides,
    billiards_small_config,
    load_yaml,
    to_dict,
)
from hilight.errors import ConfigError, HiLightError
from hilight.recipes.billiards_small.facts import MINED_FACTS, TOWER_FACTS

log = logging.getLogger(__name__)

CONFIG = Path(__file__).resolve().parents[3] / "configs" / "recipes" / "billiards-small.yaml"
STEPS = ("1 data", "2 tokenizer + model", "3 align video tower", "4 align image tower", "5 tower features",
         "6 stage 1 (TokenMining on frame facts)", "7 stage 2 (full fine-tune)", "8 evaluation")


@dataclass
class RecipeConfig:
    """Everything the recipe's result depends on; ``configs/recipes/billiards-small.yaml`` is
    the bundled model's. ``model.llm.vocab_size`` is replaced by the trained tokenizer's size."""

    seed: int = 0
    clips: int = 3000  # split 80 / 10 / 10 into train / val / test
    long_clips: int = 600  # clips of `shots` shots in a row, split the same way
    shots: int = 3
    vocab_size: int = 1000  # the tokenizer trained on the training split's text
    align_steps: int = 600  # video tower
    image_align_steps: int = 300
    stage1_steps: int = 1500
    stage2_steps: int = 4000
    batch_size: int = 16
    frame_facts_weight: float = 1.0  # the frame-facts objectives, in alignment and both VLM stages
    align_precision: str = "bf16"  # autocast: 1.4x faster alignment steps on AVX512-BF16 CPUs
    vlm_precision: str = "bf16"  # VLM stages' autocast: stage 2 1.6x faster than fp32 on AVX512-BF16 CPUs
    model: HiLightConfig = field(default_factory=billiards_small_config)

    def __post_init__(self) -> None:
        for name in ("clips", "long_clips", "shots", "vocab_size", "align_steps", "image_align_steps",
                     "stage1_steps", "stage2_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("align_precision", "vlm_precision"):
            if getattr(self, name) not in ("fp32", "bf16", "fp16"):
                raise ConfigError(f"{name} must be fp32, bf16 or fp16, got {getattr(self, name)!r}")


class RecipeError(HiLightError, ValueError):
    pass


def load_recipe(path: Path | None = None, overrides: list[str] = ()) -> RecipeConfig:
    """The recipe config from ``path`` (default: the bundled model's, whose values are also
    :class:`RecipeConfig`'s defaults), then dotted overrides."""
    if path is None and not CONFIG.is_file():  # an installed package without the repository's configs/
        return apply_overrides(RecipeConfig(), list(overrides))
    return load_yaml(RecipeConfig, path or CONFIG, list(overrides))


class Progress:
    """The per-step times of a recipe run, kept in ``recipe.json`` after every step."""

    def __init__(self, out: Path, settings: dict):
        self.file = out / "recipe.json"
        self.settings = json.loads(json.dumps(settings))  # as recipe.json holds them (tuples are lists)
        self.seconds: dict[str, float] = {}
        self.ran = False  # once a step runs, every later step runs again too
        self.resumed: dict[str, int] = {}  # training steps continued from a checkpoint: its step
        if self.file.is_file():
            previous = json.loads(self.file.read_text())
            if previous.get("settings") != self.settings:
                raise RecipeError(f"{out}: holds a recipe run with other settings; choose another --out")
            self.seconds = previous.get("seconds", {})
            self.resumed = previous.get("resumed_at_step", {})

    def step(self, name: str, output: Path, work: Callable[[], None]) -> None:
        """Run ``work`` unless this step (and every step before it) finished before and its
        ``output`` is still there."""
        if not self.ran and name in self.seconds and output.exists():
            log.info("%s: done before (%.1f s), kept", name, self.seconds[name])
            return
        self.ran = True
        start = time.perf_counter()
        work()
        self.seconds[name] = round(time.perf_counter() - start, 1)
        log.info("%s: %.1f s", name, self.seconds[name])
        self.save()

    def training(self, name: str, cfg, run: Callable[..., dict]) -> None:
        """A training step, ``run(cfg, resume)``: checkpointed as it goes, and picked up from its
        newest checkpoint when an earlier invocation stopped inside it; started afresh (its old
        checkpoints removed) when an earlier step ran again in this invocation."""
        from hilight.training.loop import latest_checkpoint

        folder = Path(cfg.output_dir)
        afresh = self.ran

        def work() -> None:
            if afresh and folder.exists():
                shutil.rmtree(folder)
            checkpoint = latest_checkpoint(folder) if folder.exists() else None
            if checkpoint is not None:
                log.info("%s: continues from %s", name, checkpoint)
                self.resumed[name] = int(checkpoint.name.split("-")[1])
            run(cfg, resume=checkpoint is not None)

        self.step(name, folder / "final" / "config.json", work)

    def save(self, **extra) -> dict:
        summary = {"settings": self.settings, "seconds": self.seconds,
                   "total_seconds": round(sum(self.seconds.values()), 1), **extra}
        if self.resumed:  # those steps' seconds are of their last part only
            summary["resumed_at_step"] = self.resumed
        self.file.write_text(json.dumps(summary, indent=1) + "\n")
        return summary


def billiards_small(out: Path, cfg: RecipeConfig | None = None, workers: int = 2) -> dict:
    """Run the whole recipe under ``out``; returns the per-step times and the evaluation."""
    cfg = cfg or load_recipe()
    out.mkdir(parents=True, exist_ok=True)
    progress = Progress(out, {"recipe": "billiards-small", "config": to_dict(cfg)})
    data, aligned, features = out / "data", out / "align-image" / "final", out / "features"
    _prepare(out, data, cfg, workers, progress)
    model = _vlm(out, data, aligned, features, cfg, progress)
    result = {}
    progress.step(STEPS[7], out / "report-long" / "report.json",
                  lambda: result.update(_evaluate(model, data, out)))
    if not result:
        result = json.loads((out / "report" / "report.json").read_text())
    accuracy = {k: result[k] for k in ("single_video", "two_video", "overall") if k in result}
    long = json.loads((out / "report-long" / "report.json").read_text()).get("overall")
    return progress.save(model=str(model), accuracy={**accuracy, "long_clips": long})


def _prepare(out: Path, data: Path, cfg: RecipeConfig, workers: int, progress: Progress) -> None:
    """Steps 1-4: data, tokenizer and model, both towers aligned."""
    from hilight.synth.dataset import generate_long_split, generate_split, split_sizes
    from hilight.training.align import align

    def make_data() -> None:
        for split, n in split_sizes(cfg.clips).items():
            generate_split(data, split, n, cfg.seed, workers=workers)
        for split, n in split_sizes(cfg.long_clips).items():
            generate_long_split(data, split, n, cfg.seed, cfg.model.video.num_frames, cfg.shots, workers=workers)

    progress.step(STEPS[0], data / "test-long.json", make_data)
    progress.step(STEPS[1], out / "base" / "config.json", lambda: make_base(data, out / "base", cfg))

    for name, tower, model, steps in ((STEPS[2], "video", out / "base", cfg.align_steps),
                                      (STEPS[3], "image", out / "align-video" / "final", cfg.image_align_steps)):
        align_cfg = align_config(model, tower, data, out / f"align-{tower}", out / "frames", steps, cfg)
        progress.training(name, align_cfg, align)


def make_base(data: Path, out: Path, cfg: RecipeConfig) -> None:
    """Step 2: a tokenizer trained on the training split's captions and questions and the model
    with random weights, saved to ``out``."""
    import torch

    from hilight.checkpoint import save_checkpoint
    from hilight.data import read_records
    from hilight.model import HiLight
    from hilight.text import from_llava
    from hilight.tokenizer import train_tokenizer

    texts = [c["caption"] for c in json.loads((data / "train-captions.json").read_text())]
    for rec in read_records(data / "train.json"):
        texts += [m.content.replace("<video>", " ") for m in from_llava(rec["conversations"])]
    tokenizer = train_tokenizer(texts, cfg.vocab_size)
    model_cfg = replace(cfg.model, llm=replace(cfg.model.llm, vocab_size=len(tokenizer)))
    torch.manual_seed(cfg.seed)
    save_checkpoint(HiLight(model_cfg), out, tokenizer)


def checkpoint_every(steps: int) -> int:
    """A training step of the recipe saves ten checkpoints, so a stopped run loses little."""
    return max(1, steps // 10)


def align_config(model: Path, tower: str, data: Path, output: Path, frames: Path, steps: int,
                 cfg: RecipeConfig) -> AlignConfig:
    """The recipe's alignment of ``model``'s ``tower`` ("video" or "image") on the captions and
    tracks of a billiards data set (steps 3 and 4)."""
    text_tower = TextTowerConfig(vocab_size=cfg.vocab_size, hidden_size=96, intermediate_size=384, num_layers=2,
                                 num_heads=4, max_positions=96, projection_dim=64)
    align_data = AlignDataConfig(train=str(data / "train-captions.json"), val=str(data / "val-captions.json"),
                                 videos=str(data / "videos"), frames_cache=str(frames))
    auxiliary = AuxiliaryConfig(objective=TOWER_FACTS if cfg.frame_facts_weight else "", weight=cfg.frame_facts_weight)
    return AlignConfig(model=str(model), tower=tower, output_dir=str(output), text_tower=text_tower, data=align_data,
                       loss=AlignLossConfig(), auxiliary=auxiliary, max_steps=steps, batch_size=cfg.batch_size,
                       lr=1e-3, warmup_ratio=0.05, eval_every=steps, save_every=checkpoint_every(steps), seed=cfg.seed,
                       precision=cfg.align_precision)


def _vlm(out: Path, data: Path, aligned: Path, features: Path, cfg: RecipeConfig, progress: Progress,
         stage1_lm: float | None = None, stage2_extra: list[dict] | None = None) -> Path:
    """Steps 5-7: tower features, stage 1, stage 2; returns the final model's directory.
    ``stage1_lm``: the answers' weight in stage 1 (default: none beside the frame facts);
    ``stage2_extra``: training records stage 2 gets besides the recipe's (research probes)."""
    import torch

    from hilight.checkpoint import load_checkpoint, read_config
    from hilight.data import FeatureCache, extract_features, read_records, record_blocks, tower_identity
    from hilight.recipes.billiards_small.questions import inventory_records
    from hilight.training.vlm import train

    def extract() -> None:
        model, _ = load_checkpoint(aligned, with_tokenizer=False)
        cache = FeatureCache(features, tower_identity(model))
        videos = [b for name in ("train", "val", "test", "train-long", "val-long") for r in
                  read_records(data / f"{name}.json") for b in record_blocks(r, data / "videos", model.config.video)]
        extract_features(model, videos, cache, torch.float16)
        (out / "features-complete").write_text("")

    progress.step(STEPS[4], out / "features-complete", extract)
    # stage 2 trains on the questions, the inventory questions of every training clip and the
    # long clips' questions
    train_records = out / "stage2-train.json"
    records = (read_records(data / "train.json") + inventory_records(data, read_config(aligned).video)
               + read_records(data / "train-long.json") + list(stage2_extra or ()))
    train_records.write_text(json.dumps(records) + "\n")
    vlm_data = DataConfig(train=str(data / "train.json"), val=str(data / "val.json"), videos=str(data / "videos"),
                          cache=str(features))
    auxiliary = AuxiliaryConfig(objective=MINED_FACTS if cfg.frame_facts_weight else "", weight=cfg.frame_facts_weight,
                                data=[str(data / "train-captions.json"), str(data / "val-captions.json")])
    # stage 1: frame facts only (lm_weight 0); stage 2: answers and frame facts together
    if stage1_lm is None:
        stage1_lm = 0.0 if cfg.frame_facts_weight else 1.0
    stages = ((STEPS[5], aligned, "stage1", TrainableConfig(token_mining=True), cfg.stage1_steps, 2e-3, stage1_lm),
              (STEPS[6], out / "stage1" / "final", "stage2", TrainableConfig(token_mining=True, llm=True),
               cfg.stage2_steps, 1e-3, 1.0))
    for name, start_from, folder, trainable, steps, lr, lm_weight in stages:
        stage_data = vlm_data if folder == "stage1" else replace(vlm_data, train=str(train_records))
        train_cfg = TrainConfig(model=str(start_from), output_dir=str(out / folder), data=stage_data,
                                trainable=trainable, max_steps=steps, batch_size=cfg.batch_size, lr=lr,
                                warmup_ratio=0.03, eval_every=max(1, steps // 4), save_every=checkpoint_every(steps),
                                max_length=512, seed=cfg.seed, auxiliary=auxiliary, lm_weight=lm_weight,
                                precision=cfg.vlm_precision, group_by_length=True)
        progress.training(name, train_cfg, train)
    return out / "stage2" / "final"


def _evaluate(model: Path, data: Path, out: Path) -> dict:
    from hilight.evaluation.qa import evaluate
    from hilight.inference.engine import Engine, GenerationSettings

    engine = Engine.from_checkpoint(model)
    settings = GenerationSettings(max_new_tokens=24)
    result = evaluate(engine, data / "test.json", data / "videos", out / "report", settings, batch_size=16,
                      title=f"billiards-small on the held-out test split ({out.name})")
    evaluate(engine, data / "test-long.json", data / "videos", out / "report-long", settings, batch_size=16,
             title=f"billiards-small on the held-out long clips, read in segments ({out.name})")
    return result


def model_card(report: dict, run: Path) -> dict:
    """What the bundled model knows and how well, from its evaluation report."""
    groups = {"single_video": "single-video", "two_video": "two-video"}
    accuracy = {f"{label} questions": round(report[k]["accuracy"], 3) for k, label in groups.items() if k in report}
    baselines = {f"{label} {b}": round(report[k][b], 3) for k, label in groups.items() if k in report
                 for b in ("blind", "majority")}
    n = report.get("overall", {}).get("n", 0)
    long_file = run / "report-long" / "report.json"
    long = json.loads(long_file.read_text()).get("overall", {}) if long_file.is_file() else {}
    if long:
        accuracy["long-clip questions (read in segments)"] = round(long["accuracy"], 3)
        baselines.update({f"long-clip {b.replace('_', ' ')}": round(long[b], 3)
                          for b in ("blind", "majority", "first_segment") if b in long})
    per_type = {name: {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()
                       if k in ("n", "accuracy", "blind", "majority", "majority_answer")}
                for name, row in sorted(report.get("per_type", {}).items())}
    recipe = json.loads((run / "recipe.json").read_text()) if (run / "recipe.json").is_file() else {}
    video = recipe.get("settings", {}).get("config", {}).get("model", {}).get("video", {})
    return {
        "name": "billiards-small",
        "summary": "HiLight's bundled demonstration model, trained from scratch by `hilight recipe billiards-small`",
        "domain": "top-down clips of HiLight's synthetic billiards table only; about any other video its answers "
                  "mean nothing",
        "questions": sorted(report.get("per_type", {})),
        "frames": {k: video[k] for k in ("num_frames", "image_size", "sampling") if k in video},
        "accuracy": accuracy,
        "baselines": baselines,
        "accuracy_per_type": per_type,
        "recipe_seconds": {**recipe.get("seconds", {}), "total": recipe.get("total_seconds")},
        "measured_on": f"the recipe's held-out test split ({n:,} questions), greedy (eval-report.md; run {run.name})",
        "license": "Apache-2.0",
        "source": "trained by HiLight's own recipe on generated data; configs/recipes/billiards-small.yaml",
    }


def bundle(run: Path, target: Path, examples: Path, count: int = 4) -> None:
    """Copy the trained model into the package and a few test clips (with truth) to ``examples``."""
    from hilight.checkpoint import load_checkpoint, save_checkpoint

    model, tokenizer = load_checkpoint(run / "stage2" / "final")
    save_checkpoint(model, target, tokenizer)
    shutil.copy(run / "report" / "report.md", target / "eval-report.md")
    if (run / "report-long" / "report.md").is_file():
        shutil.copy(run / "report-long" / "report.md", target / "eval-report-long.md")
    (target / CARD_FILE).write_text(json.dumps(model_card(json.loads((run / "report" / "report.json").read_text()),
                                                          run), indent=1) + "\n")
    examples.mkdir(parents=True, exist_ok=True)
    data = run / "data"
    truth = json.loads((data / "test-truth.json").read_text())
    records = json.loads((data / "test.json").read_text())
    chosen = sorted(truth)[:count]
    questions = [r for r in records if isinstance(r["video"], str) and r["video"] in chosen
                 and len(r["conversations"]) == 2 and r["meta"]["types"][0] in ("first_pocketed", "scratch",
                                                                                  "cue_direction", "balls_left")]
    for name in chosen:
        shutil.copy(data / "videos" / name, examples / name)
    # one long clip of several shots, asked about its shots (read in segments)
    long_records = json.loads((data / "test-long.json").read_text()) if (data / "test-long.json").is_file() else []
    if long_records:
        name = long_records[0]["video"]
        kinds = ("which_shot_pocketed", "shot_first_pocketed", "shot_balls_left")
        asked = [r for r in long_records if r["video"] == name and r["meta"]["types"][0] in kinds]
        questions += asked[:4]
        shutil.copy(data / "videos" / name, examples / name)
        chosen.append(name)
        truth[name] = json.loads((data / "test-long-truth.json").read_text())[name]
    (examples / "questions.json").write_text(json.dumps(questions, indent=1) + "\n")
    (examples / "truth.json").write_text(json.dumps({n: truth[n] for n in chosen}, indent=1) + "\n")
