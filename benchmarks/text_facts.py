"""The LLM's own ceiling on the billiards questions: the same questions with each sampled frame's
true facts given as text (``hilight.recipes.billiards_small.text_facts``), the bundled recipe's
LLM size and stage-2 step budget, text only (no towers).

It reads a finished (or at least prepared) recipe run: its data set and its ``base`` checkpoint
(random weights, the trained tokenizer), trains the LLM from those random weights on the
text-facts versions of the training questions (with the inventory questions, as stage 2 has),
and answers the test split's, scored as ``hilight eval`` scores the model's own answers.

    .venv/bin/python benchmarks/text_facts.py --run runs/billiards-small [--steps 4000] \
        [--track-clips 12000] [--out benchmarks/results/text-facts.json]

``--track-clips N`` adds the questions of N more training clips that are simulated but never
rendered (``hilight.synth.dataset.generate_tracks``, kept in RUN/text-facts/tracks): what more
data does for the LLM, at the cost of the physics alone. ``--reasoned`` trains on answers that
say the step their question needs before the answer (the cue ball's first move, its turns, the
asked ball's last cell, the first ball to move, the balls left in each clip:
``text_facts.reasoning``), and lets the LLM say it before answering.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from hilight.checkpoint import read_config
from hilight.config import DataConfig, TrainableConfig, TrainConfig
from hilight.data import read_records
from hilight.evaluation.qa import load_items, markdown, report, run
from hilight.inference.engine import Engine, GenerationSettings
from hilight.recipes.billiards_small.questions import inventory_records
from hilight.recipes.billiards_small.recipe import checkpoint_every, load_recipe
from hilight.recipes.billiards_small.text_facts import (
    reading_records,
    reasoning_steps,
    text_facts_records,
    write_text_facts,
)
from hilight.synth.dataset import TRACKS, generate_tracks
from hilight.training.loop import latest_checkpoint
from hilight.training.vlm import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a billiards-small recipe run (its data/ and base/)")
    parser.add_argument("--work", type=Path, help="where the text-facts data and model go (default: RUN/text-facts)")
    parser.add_argument("--steps", type=int, help="training steps (default: the recipe's stage 2 steps)")
    parser.add_argument("--track-clips", type=int, default=0, help="more training clips, simulated only")
    parser.add_argument("--reasoned", action="store_true", help="answers say the step they need first")
    parser.add_argument("--reading", type=int, default=0, metavar="N",
                        help="N reading questions per training clip besides (a ball's cell in frame k, its line)")
    parser.add_argument("--seed", type=int, help="the training's seed (default: the recipe's; the data stay the same)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/text-facts.json"))
    args = parser.parse_args()

    cfg = load_recipe()
    steps = args.steps or cfg.stage2_steps
    seed = cfg.seed if args.seed is None else args.seed
    work = args.work or args.run / "text-facts"
    data, base = args.run / "data", args.run / "base"
    video_cfg = read_config(base).video
    files = write_text_facts(data, work / "data", video_cfg, reasoned=args.reasoned)
    inventory = text_facts_records(inventory_records(data, video_cfg), read_records(data / "train-captions.json"),
                                   video_cfg)
    records = read_records(files["train"]) + inventory
    if args.track_clips:
        tracks = args.run / "text-facts" / "tracks"  # shared by every --work
        if not (tracks / f"{TRACKS}-captions.json").is_file():
            generate_tracks(tracks, args.track_clips, cfg.seed, workers=2)
        captions = read_records(tracks / f"{TRACKS}-captions.json")
        if len(captions) != args.track_clips:
            raise SystemExit(f"{tracks}: holds {len(captions)} track-only clips, not {args.track_clips}")
        records += text_facts_records(read_records(tracks / f"{TRACKS}.json")
                                    + inventory_records(tracks, video_cfg, split=TRACKS), captions, video_cfg,
                                    reasoned=args.reasoned)
    if args.reading:
        clips = read_records(data / "train-captions.json")
        if args.track_clips:
            clips += read_records(args.run / "text-facts" / "tracks" / f"{TRACKS}-captions.json")
        records += reading_records(clips, video_cfg, args.reading, seed)
    train_file = work / "data" / "train-with-inventory.json"
    train_file.write_text(json.dumps(records) + "\n")

    folder = work / "llm"
    train_cfg = TrainConfig(model=str(base), output_dir=str(folder),
                            data=DataConfig(train=str(train_file), val=str(files["val"]), videos=str(data / "videos")),
                            trainable=TrainableConfig(token_mining=False, llm=True), max_steps=steps,
                            batch_size=cfg.batch_size, lr=1e-3, warmup_ratio=0.03, eval_every=max(1, steps // 4),
                            save_every=checkpoint_every(steps), max_length=1024, seed=seed,
                            precision=cfg.vlm_precision, group_by_length=True)
    timing = work / "train-seconds.json"  # kept, so a second run that only evaluates reports it
    if not (folder / "final" / "config.json").is_file():
        start = time.perf_counter()
        train(train_cfg, resume=folder.exists() and latest_checkpoint(folder) is not None)
        timing.write_text(json.dumps({"seconds": time.perf_counter() - start}) + "\n")
    train_s = json.loads(timing.read_text())["seconds"] if timing.is_file() else float("nan")

    engine = Engine.from_checkpoint(folder / "final")
    items, problems = load_items(files["test"], data / "videos")
    # the prompts hold the facts, not videos: the blind baseline would ask the same prompt (the
    # model's own report has the real one); each item counts as many videos as its record had,
    # so the report groups single- and two-video questions as it does for the model
    failed = run(engine, items, GenerationSettings(max_new_tokens=48), batch_size=16, blind=False)
    videos = {str(r["id"]): len(r["video"]) if isinstance(r["video"], list) else 1
              for r in read_records(data / "test.json")}
    for item in items:
        item.videos = [None] * videos[item.id.split("#")[0]]  # "ID#TURN" for a later turn
    result = report(items, failed, problems)
    (work / "answers.json").write_text(json.dumps([{"id": it.id, "type": it.qtype, "truth": it.truth,
                                                    "reference": it.reference, "answer": it.answer}
                                                   for it in items], indent=0) + "\n")
    (work / "report.md").write_text(markdown(result, "the text-facts ceiling: true frame facts as text"))
    model_report = args.run / "report" / "report.json"
    model = json.loads(model_report.read_text()) if model_report.is_file() else {}
    summary = {
        "machine": platform.processor() or platform.machine(), "steps": steps,
        "train_records": len(records), "track_clips": args.track_clips,
        "seed": seed, "reasoned": args.reasoned, "reading_per_clip": args.reading, "train_seconds": round(train_s, 1),
        "prompt_tokens_max": max(len(engine.chat.encode(it.messages, generation=True).input_ids) for it in items),
        **{group: result[group] for group in ("single_video", "two_video", "overall") if group in result},
        "per_type": {t: {k: v[k] for k in ("n", "accuracy", "majority")} for t, v in result["per_type"].items()},
        "model_own_answers": {group: model[group] for group in ("single_video", "two_video") if group in model},
        "model_own_per_type": {t: v["accuracy"] for t, v in model.get("per_type", {}).items()},
        "failed": len(failed), "skipped_records": problems,
    }
    if args.reasoned:
        summary["reasoning_steps"] = reasoning_steps(items)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: summary[k] for k in ("single_video", "two_video", "model_own_answers", "train_seconds")
                      if k in summary}, indent=1))


if __name__ == "__main__":
    main()
