"""``hilight recipe billiards-small``: the bundled model, trained end to end by the project's
own pipeline on synthetic billiards clips, reproducible from a seed.

Steps (each timed): generate the data set; train a Gemma-style tokenizer and build the
``billiards-small`` model; align the video tower (CLIP-ViP+: global + SPARC local loss +
language mask, plus the frame-facts loss on the generator's ball tracks) and then the image
tower (Long-CLIP role, frame by frame, same losses); cache both towers' outputs; VLM stage 1
(TokenMining, trained to name each frame's balls and their positions from its outputs: the
LLM still has random weights, so its caption loss would carry no signal, and is skipped); VLM
stage 2 as a *full* fine-tune of TokenMining and the LLM on the questions, the frame-facts loss
kept beside it (a 4-layer LLM that starts from random weights has no language to preserve, so
LoRA would only slow it down); evaluate on the held-out test split.

``recipe.json`` is rewritten after every step, so an interrupted run started again with the same
``--out`` goes on from the first unfinished step. With ``source`` (a finished run), a run reuses
that run's data, tokenizer, aligned towers and tower features and repeats the VLM stages with a
fresh TokenMining and LLM from the current preset: this is how the ablations
(``towers="video"`` or ``"image"``) run, and how a change to the VLM side is tried without
aligning the towers again.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
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

STEPS = ("1 data", "2 tokenizer + model", "3 align video tower", "4 align image tower", "5 tower features",
         "6 stage 1 (TokenMining on frame facts)", "7 stage 2 (full fine-tune)", "8 evaluation")
SOURCE_STEPS = ("2 model from the source run's towers", *STEPS[4:])


@dataclass
class RecipeBudget:
    clips: int = 3000
    # 0: the training split is 80 % of ``clips``; more: that many training clips, val and test
    # still 10 % of ``clips`` each (the first 80 % are the same clips either way)
    train_clips: int = 0
    align_steps: int = 600
    image_align_steps: int = 300
    stage1_steps: int = 1500
    stage2_steps: int = 4000
    batch_size: int = 16
    vocab_size: int = 1000
    frame_facts_weight: float = 1.0
    # alignment: object patches also regress their exact position (sharper positions, measured;
    # not yet better answers: see the README)
    tower_position_weight: float = 0.0
    align_precision: str = "bf16"  # autocast: 1.4x faster alignment steps on AVX512-BF16 CPUs
    pack_questions: bool = False  # stage 2: a clip's single-video questions as one multi-turn conversation
    facts_per_slot: bool = False  # VLM stages: TokenMining slot q of every frame stands for ball q
    facts_attention: bool = False  # VLM stages: the frame-facts head reads each ball by attention
    vlm_precision: str = "bf16"  # VLM stages' autocast: stage 2 1.6x faster than fp32 on AVX512-BF16 CPUs
    position_questions: bool = False  # stage 2: training-only questions on where each ball is
    motion_question: bool = False  # stage 2: training-only question which coloured balls moved
    cue_path_question: bool = False  # stage 2: training-only question how the cue ball moves frame to frame

    def split_sizes(self) -> dict[str, int]:
        from hilight.synth.dataset import split_sizes

        sizes = split_sizes(self.clips)
        if self.train_clips:
            if self.train_clips < sizes["train"]:
                raise RecipeError(f"train_clips {self.train_clips}: at least the {sizes['train']} training clips "
                                  f"that {self.clips} clips give")
            sizes["train"] = self.train_clips
        return sizes


# what a run made before a budget field existed did, field by field (resuming such a run)
BEFORE_FIELD = {"pack_questions": False, "facts_per_slot": False, "vlm_precision": "fp32", "tower_position_weight": 0.0,
                "position_questions": False, "motion_question": False, "cue_path_question": False,
                "facts_attention": False, "train_clips": 0}


class RecipeError(ValueError):
    pass


class Progress:
    """The per-step times of a recipe run, kept in ``recipe.json`` after every step."""

    def __init__(self, out: Path, settings: dict):
        self.file = out / "recipe.json"
        self.settings = settings
        self.seconds: dict[str, float] = {}
        self.ran = False  # once a step runs, every later step runs again too
        if self.file.is_file():
            previous = json.loads(self.file.read_text())
            if isinstance(previous.get("settings", {}).get("budget"), dict):
                # a budget field added since that run was made: what the recipe did before it
                previous["settings"]["budget"] = {**asdict(RecipeBudget()), **BEFORE_FIELD,
                                                  **previous["settings"]["budget"]}
            if previous.get("settings") != settings:
                raise RecipeError(f"{out}: holds a recipe run with other settings; choose another --out")
            self.seconds = previous.get("seconds", {})

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

    def save(self, **extra) -> dict:
        summary = {"settings": self.settings, "seconds": self.seconds,
                   "total_seconds": round(sum(self.seconds.values()), 1), **extra}
        self.file.write_text(json.dumps(summary, indent=1) + "\n")
        return summary


def billiards_small(out: Path, seed: int = 0, budget: RecipeBudget | None = None, workers: int = 2,
                    towers: str = "both", source: Path | None = None, overrides: list[str] | None = None) -> dict:
    """Run the whole recipe under ``out``; returns the per-step times and the evaluation.

    With ``source`` (a finished run with aligned towers), steps 1-4 are that run's and only
    steps 5-8 run here; ``towers="video"`` (no image tower) or ``"image"`` (no video tower), the
    ablations, need one. ``overrides`` (``key=value``) change the ``billiards-small`` preset of
    the model built (e.g. ``token_mining.queries_per_frame=10``)."""
    budget = budget or RecipeBudget()
    out.mkdir(parents=True, exist_ok=True)
    settings = {"recipe": "billiards-small", "seed": seed, "budget": asdict(budget), "towers": towers}
    overrides = list(overrides or [])
    if overrides:  # only then, so that runs made before overrides existed can be resumed
        settings["overrides"] = overrides
    if source is not None or towers != "both":
        if source is None or not (source / "align-image" / "final" / "config.json").is_file():
            raise RecipeError(f"{source}: an ablation needs a full recipe run with aligned towers (--source)")
        settings["source"] = str(source)
    progress = Progress(out, settings)
    if source is None:
        data, aligned, features = out / "data", out / "align-image" / "final", out / "features"
        _prepare(out, data, seed, budget, workers, progress, overrides)
    else:  # the source's feature cache: keys name the towers and settings, so entries never mix
        data, aligned, features = source / "data", out / "model", source / "features"
        progress.step(SOURCE_STEPS[0], aligned,
                      lambda: _from_source(source / "align-image" / "final", aligned, towers, seed, overrides))
    model = _vlm(out, data, aligned, features, seed, budget, progress)
    result = {}
    progress.step(STEPS[7], out / "report" / "report.json", lambda: result.update(_evaluate(model, data, out)))
    if not result:
        result = json.loads((out / "report" / "report.json").read_text())
    accuracy = {k: result[k] for k in ("single_video", "two_video", "overall") if k in result}
    return progress.save(model=str(model), accuracy=accuracy)


def _prepare(out: Path, data: Path, seed: int, budget: RecipeBudget, workers: int, progress: Progress,
             overrides: list[str]) -> None:
    """Steps 1-4: data, tokenizer and model, both towers aligned."""
    import torch

    from hilight.align import align
    from hilight.checkpoint import save_checkpoint
    from hilight.data import read_records
    from hilight.model import HiLight
    from hilight.synth.dataset import generate_split
    from hilight.text import from_llava
    from hilight.tokenizer import train_tokenizer

    def make_data() -> None:
        for split, n in budget.split_sizes().items():
            generate_split(data, split, n, seed, workers=workers)

    progress.step(STEPS[0], data / "test.json", make_data)

    def make_model() -> None:
        texts = [c["caption"] for c in json.loads((data / "train-captions.json").read_text())]
        for rec in read_records(data / "train.json"):
            texts += [m.content.replace("<video>", " ") for m in from_llava(rec["conversations"])]
        tokenizer = train_tokenizer(texts, budget.vocab_size)
        config = apply_overrides(preset("billiards-small"), [f"llm.vocab_size={len(tokenizer)}", *overrides])
        torch.manual_seed(seed)
        save_checkpoint(HiLight(config), out / "base", tokenizer)

    progress.step(STEPS[1], out / "base" / "config.json", make_model)

    for name, tower, model, steps in ((STEPS[2], "video", out / "base", budget.align_steps),
                                      (STEPS[3], "image", out / "align-video" / "final", budget.image_align_steps)):
        cfg = align_config(model, tower, data, out / f"align-{tower}", out / "frames", steps, budget, seed)
        progress.step(name, out / f"align-{tower}" / "final" / "config.json", lambda cfg=cfg: align(cfg))


def align_config(model: Path, tower: str, data: Path, output: Path, frames: Path, steps: int, budget: RecipeBudget,
                 seed: int) -> AlignConfig:
    """The recipe's alignment of ``model``'s ``tower`` ("video" or "image") on the captions and
    tracks of a billiards data set (steps 3 and 4)."""
    text_tower = TextTowerConfig(vocab_size=budget.vocab_size, hidden_size=96, intermediate_size=384, num_layers=2,
                                 num_heads=4, max_positions=96, projection_dim=64)
    align_data = AlignDataConfig(train=str(data / "train-captions.json"), val=str(data / "val-captions.json"),
                                 videos=str(data / "videos"), frames_cache=str(frames))
    loss = AlignLossConfig(frame_facts_weight=budget.frame_facts_weight, facts_position_weight=budget.tower_position_weight)
    return AlignConfig(model=str(model), tower=tower, output_dir=str(output), text_tower=text_tower, data=align_data,
                       loss=loss, max_steps=steps, batch_size=budget.batch_size, lr=1e-3, warmup_ratio=0.05,
                       eval_every=steps, save_every=steps, seed=seed, precision=budget.align_precision)


def _from_source(aligned: Path, target: Path, towers: str, seed: int, overrides: list[str]) -> None:
    """A fresh ``billiards-small`` model (TokenMining and LLM from the current preset, seeded)
    with the source run's aligned towers and tokenizer; ``towers`` as HiLightConfig.towers."""
    import torch

    from hilight.checkpoint import load_checkpoint, load_state_strict, save_checkpoint
    from hilight.model import HiLight

    model, tokenizer = load_checkpoint(aligned)
    config = apply_overrides(preset("billiards-small"), [f"llm.vocab_size={model.config.llm.vocab_size}",
                                                         f"towers={towers}", *overrides])
    for part in ("video_tower", "image_tower", "video"):
        if getattr(config, part) != getattr(model.config, part):
            raise RecipeError(f"{aligned}: its {part} settings differ from the billiards-small preset's; "
                              "run the whole recipe instead")
    torch.manual_seed(seed)
    fresh = HiLight(config)
    state = fresh.state_dict()
    state.update({k: v for k, v in model.state_dict().items() if k.startswith(("video_tower.", "image_tower."))})
    load_state_strict(fresh, state, where=str(aligned))
    save_checkpoint(fresh, target, tokenizer)


# a ball moved if it left the table or its centre moved this far (fraction of the frame width,
# about one pixel at 112 px) from where it was in the first frame
MOVED = 0.01


def inventory_records(data: Path, video_cfg, split: str = "train", positions: bool = False,
                      motion: bool = False, cue_path: bool = False) -> list[dict]:
    """The training-only inventory questions (hilight.synth.qa.inventory_qas) of every clip of
    ``split``, read from its tracks at the first and last frame the model is shown; with
    ``positions``, the position questions (hilight.synth.qa.position_qas) too, with ``motion``
    the question which coloured balls moved (hilight.synth.qa.motion_qa), with ``cue_path``
    the cue ball's step between each two frames (hilight.synth.qa.cue_path_qa)."""
    from hilight.align import frame_facts
    from hilight.synth.billiards import direction_name
    from hilight.synth.qa import cue_path_qa, inventory_qas, motion_qa, position_qas

    clips = json.loads((data / f"{split}-captions.json").read_text())
    records = []
    for clip in clips:
        names = clip["tracks"]["names"]
        facts = frame_facts(clip["tracks"], names, video_cfg, grid=1)
        present, xy = facts["present"], facts["xy"]  # [T, N], [T, N, 2]
        start = [n for k, n in enumerate(names) if present[0, k] > 0]
        end = [n for k, n in enumerate(names) if present[-1, k] > 0]
        qas = inventory_qas(start, end)
        if positions:
            seen = {k: int(present[:, k].nonzero().max()) for k in range(len(names)) if present[0, k] > 0}
            qas += position_qas({names[k]: tuple(xy[0, k].tolist()) for k in seen},
                                {names[k]: tuple(xy[t, k].tolist()) for k, t in seen.items()})
        if motion:
            shift = ((xy - xy[0]).norm(dim=-1) * present).amax(dim=0)  # [N], over the frames a ball is seen
            qas.append(motion_qa([n for k, n in enumerate(names) if n != "cue" and present[0, k] > 0
                                  and (present[-1, k] == 0 or shift[k] > MOVED)]))
        if cue_path:
            cue = names.index("cue")
            steps = (xy[1:, cue] - xy[:-1, cue]).tolist()  # [T - 1] of (dx, dy)
            qas.append(cue_path_qa(["gone" if not on else "still" if math.hypot(dx, dy) <= MOVED
                                    else direction_name(dx, dy)
                                    for on, (dx, dy) in zip(present[1:, cue].tolist(), steps, strict=True)]))
        for qa in qas:
            records.append({"id": f"{Path(clip['video']).stem}-{qa.qtype}", "video": clip["video"],
                            "conversations": [{"from": "human", "value": f"<video>\n{qa.question}"},
                                              {"from": "gpt", "value": qa.answer}],
                            "meta": {"types": [qa.qtype], "truth": [qa.truth]}})
    return records


def _packed_records(records: list[dict], seed: int) -> list[dict]:
    """Every clip's single-turn, single-video questions as one conversation in a shuffled order
    (the video once, in the first question): the LLM reads the clip's visual tokens once for all
    of them, so a step carries several times the answers for the same compute. Records with
    several videos or turns are kept as they are."""
    import random

    rng = random.Random(seed)
    by_clip: dict[str, list[dict]] = {}
    kept = []
    for rec in records:
        if isinstance(rec["video"], str) and len(rec["conversations"]) == 2:
            by_clip.setdefault(rec["video"], []).append(rec)
        else:
            kept.append(rec)
    for video, group in by_clip.items():
        rng.shuffle(group)
        turns, types, truth = [], [], []
        for n, rec in enumerate(group):
            question, answer = (m["value"] for m in rec["conversations"])
            if n:  # the video is shown once, in the first turn
                question = question.replace("<video>", "").strip()
            turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
            types += rec["meta"]["types"]
            truth += rec["meta"]["truth"]
        kept.append({"id": f"{Path(video).stem}-packed", "video": video, "conversations": turns,
                     "meta": {"types": types, "truth": truth}})
    return kept


def _vlm(out: Path, data: Path, aligned: Path, features: Path, seed: int, budget: RecipeBudget,
         progress: Progress) -> Path:
    """Steps 5-7: tower features, stage 1, stage 2; returns the final model's directory."""
    import torch

    from hilight.checkpoint import load_checkpoint, read_config
    from hilight.data import FeatureCache, extract_features, read_records, record_videos, tower_identity
    from hilight.train import train

    def extract() -> None:
        model, _ = load_checkpoint(aligned, with_tokenizer=False)
        cache = FeatureCache(features, tower_identity(model))
        videos = [v for split in ("train", "val", "test") for r in read_records(data / f"{split}.json")
                  for v in record_videos(r, data / "videos")]
        extract_features(model, videos, cache, torch.float16)
        (out / "features-complete").write_text("")

    progress.step(STEPS[4], out / "features-complete", extract)
    # stage 2 trains on the questions plus the inventory questions of every training clip
    train_records = out / "stage2-train.json"
    records = read_records(data / "train.json") + inventory_records(data, read_config(aligned).video,
                                                                    positions=budget.position_questions,
                                                                    motion=budget.motion_question,
                                                                    cue_path=budget.cue_path_question)
    if budget.pack_questions:
        records = _packed_records(records, seed)
    train_records.write_text(json.dumps(records) + "\n")
    vlm_data = DataConfig(train=str(data / "train.json"), val=str(data / "val.json"), videos=str(data / "videos"),
                          cache=str(features),
                          facts=[str(data / "train-captions.json"), str(data / "val-captions.json")])
    # stage 1: frame facts only (lm_weight 0); stage 2: answers and frame facts together
    stage1_lm = 0.0 if budget.frame_facts_weight else 1.0
    stages = ((STEPS[5], aligned, "stage1", TrainableConfig(token_mining=True), budget.stage1_steps, 2e-3, stage1_lm),
              (STEPS[6], out / "stage1" / "final", "stage2", TrainableConfig(token_mining=True, llm=True),
               budget.stage2_steps, 1e-3, 1.0))
    for name, start_from, folder, trainable, steps, lr, lm_weight in stages:
        stage_data = vlm_data if folder == "stage1" else replace(vlm_data, train=str(train_records))
        cfg = TrainConfig(model=str(start_from), output_dir=str(out / folder), data=stage_data, trainable=trainable,
                          max_steps=steps, batch_size=budget.batch_size, lr=lr, warmup_ratio=0.03,
                          eval_every=max(1, steps // 4), save_every=steps, max_length=512, seed=seed,
                          frame_facts_weight=budget.frame_facts_weight, lm_weight=lm_weight,
                          frame_facts_per_slot=budget.facts_per_slot, frame_facts_attention=budget.facts_attention,
                          precision=budget.vlm_precision)
        progress.step(name, out / folder / "final" / "config.json", lambda cfg=cfg: train(cfg))
    return out / "stage2" / "final"


def _evaluate(model: Path, data: Path, out: Path) -> dict:
    from hilight.engine import Engine, GenerationSettings
    from hilight.eval import evaluate

    engine = Engine.from_checkpoint(model)
    return evaluate(engine, data / "test.json", data / "videos", out / "report", GenerationSettings(max_new_tokens=24),
                    batch_size=16, title=f"billiards-small on the held-out test split ({out.name})")


def bundle(run: Path, target: Path, examples: Path, count: int = 4) -> None:
    """Copy the trained model into the package and a few test clips (with truth) to ``examples``."""
    from hilight.checkpoint import load_checkpoint, save_checkpoint

    model, tokenizer = load_checkpoint(run / "stage2" / "final")
    save_checkpoint(model, target, tokenizer)
    shutil.copy(run / "report" / "report.md", target / "eval-report.md")
    examples.mkdir(parents=True, exist_ok=True)
    source = json.loads((run / "recipe.json").read_text())["settings"].get("source")
    data = Path(source) / "data" if source else run / "data"  # a run from a source run uses its data
    truth = json.loads((data / "test-truth.json").read_text())
    records = json.loads((data / "test.json").read_text())
    chosen = sorted(truth)[:count]
    questions = [r for r in records if isinstance(r["video"], str) and r["video"] in chosen
                 and len(r["conversations"]) == 2 and r["meta"]["types"][0] in ("first_pocketed", "scratch",
                                                                                  "cue_direction", "balls_left")]
    for name in chosen:
        shutil.copy(data / "videos" / name, examples / name)
    (examples / "questions.json").write_text(json.dumps(questions, indent=1) + "\n")
    (examples / "truth.json").write_text(json.dumps({n: truth[n] for n in chosen}, indent=1) + "\n")
