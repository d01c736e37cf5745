"""How much of the answer do TokenMining's tokens hold? The geometry rules on the model's own
perception.

``oracle_rules.py`` answers the single-video questions from the *true* ball positions in the
sampled frames. This script gives the same rules what a trained model perceives instead: every
frame's presence and position of each ball as its training-only frame-facts head reads them
from the TokenMining tokens the LLM is given (``frame_facts_head.safetensors`` beside a stage's
checkpoint). Far above the model's own answers: the tokens hold more than the LLM uses; near
them: perception is the limit.

    .venv/bin/python research/perceived_rules.py --run runs/recipe --model runs/recipe/stage2/final
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from oracle_rules import rule_answers, score

from hilight.checkpoint import load_checkpoint
from hilight.data import FeatureCache, tower_identity
from hilight.model.hilight import TowerOutputs
from hilight.recipes.billiards_small.facts import HEAD_FILE, MinedFacts, frame_facts
from hilight.recipes.billiards_small.text_facts import GRID


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="the recipe run that holds data/ and features/")
    parser.add_argument("--model", type=Path, required=True, help="a VLM stage's checkpoint with its facts head")
    parser.add_argument("--split", default="test")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    model, _ = load_checkpoint(args.model, with_tokenizer=False)
    model.eval()
    aligned, _ = load_checkpoint(args.run / "align-image" / "final", with_tokenizer=False)
    cache = FeatureCache(args.run / "features", tower_identity(aligned))
    data = args.run / "data"
    names = sorted({n for c in json.loads((data / "train-captions.json").read_text()) for n in c["tracks"]["names"]})
    head = MinedFacts([str(data / "train-captions.json")], data / "videos", model.config)
    if list(head.names) != names or not head.load(args.model):
        raise SystemExit(f"{args.model}: no {HEAD_FILE} for these balls and sizes")
    answers, presence, last_frame = {}, [], []
    cells = {"cell": 0, "column": 0, "row": 0, "n": 0}  # the 8 x 8 grid cell of each ball present, as read
    with torch.no_grad():
        for clip in json.loads((data / f"{args.split}-captions.json").read_text()):
            t = cache.load_tensors(data / "videos" / clip["video"])
            towers = TowerOutputs(t["video"][None].float(), t["image"][None].float())
            out = head.predict(model.video_embeddings(towers))[0]  # [T, 3, C]
            seen, xy = (out[:, 0] > 0).float(), out[:, 1:].permute(0, 2, 1)
            facts = frame_facts(clip["tracks"], names, model.config.video, grid=1)
            truth = facts["present"]
            on = truth > 0
            said, true = (xy[on] * GRID).long().clamp(0, GRID - 1), (facts["xy"][on] * GRID).long().clamp(0, GRID - 1)
            cells["n"] += int(on.sum())
            cells["cell"] += int((said == true).all(-1).sum())
            cells["column"] += int((said[:, 0] == true[:, 0]).sum())
            cells["row"] += int((said[:, 1] == true[:, 1]).sum())
            presence.append((seen == truth).float().mean().item())
            last_frame.append(bool((seen[-1] == truth[-1]).all()))
            answers[clip["video"]] = rule_answers(names, seen, xy)
    scored, overall = score(answers, json.loads((data / f"{args.split}.json").read_text()))
    per_type = {t: v["accuracy"] for t, v in scored.items()}
    result = {"single_video": overall, "per_type": per_type, "presence_per_ball_and_frame": sum(presence) / len(presence),
              "last_frame_all_right": sum(last_frame) / len(last_frame),
              "cells_of_present_balls": {k: cells[k] / max(1, cells["n"]) for k in ("cell", "column", "row")}}
    print(f"rules on perceived facts: single-video questions {overall:.1%}; presence per ball and frame "
          f"{result['presence_per_ball_and_frame']:.1%}, last frame all right {result['last_frame_all_right']:.1%}")
    print("  ".join(f"{t} {a:.1%}" for t, a in per_type.items()))
    print("cells of the balls present (8 x 8 grid): " + ", ".join(
        f"{k} {v:.1%}" for k, v in result["cells_of_present_balls"].items()))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
