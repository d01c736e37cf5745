"""How much of the answer is in the frames the model is shown? Hand-written rules on perfect
perception.

Every ball's true image position in the T frames the model samples (the generator's ``tracks``,
through the model's own frame sampling) goes through a few lines of geometry per question type:
presence at the first and last frame (pocketed, scratch, balls left), the frame a ball disappears
and where it was last seen (first pocketed, which pocket), the first object ball to move (first
contact), the cue ball's first displacement (direction) and reversals of its motion (cushions).
No learning, so no data limit: this is a lower bound on what T frames allow, the figure the
billiards-small recipe should be held against (``oracle_facts.py`` learns the same from 2,400
clips and is limited by that data).

``--cells G`` gives the rules only each ball's cell on a G x G grid (its centre), as the
text-facts task gives the LLM (``hilight.recipes.billiards_small.text_facts``, G = 8): what the
rules can still read from that text.

    .venv/bin/python research/oracle_rules.py --data runs/recipe/data --frames 8 12 16 [--cells 8]
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import torch

from hilight.config import preset
from hilight.recipes.billiards_small.facts import frame_facts
from hilight.synth.billiards import direction_name

MOVED = 0.004  # fraction of the frame width: below this a ball has not moved


def rule_answers(names: list[str], present: torch.Tensor, xy: torch.Tensor) -> dict[str, str]:
    """Answers of every single-video question type from presence [T, N] and positions [T, N, 2]."""
    cue = names.index("cue")
    objects = [k for k in range(len(names)) if k != cue]
    gone = [k for k in objects if present[0, k] > 0 and present[-1, k] == 0]
    # the first ball to disappear; in a tie, the one nearest the frame's edge when last seen
    vanish = {k: int((present[:, k] == 0).nonzero()[0]) for k in gone}
    first = min(gone, key=lambda k: (vanish[k], -float((xy[vanish[k] - 1, k] - 0.5).abs().max()))) if gone else None
    answers = {"any_pocketed": "yes" if gone else "no",
               "first_pocketed": names[first] if first is not None else "none",
               "scratch": "yes" if present[-1, cue] == 0 else "no",
               "balls_left": str(int(present[-1, objects].sum()))}
    if first is not None:
        x, y = xy[vanish[first] - 1, first].tolist()
        answers["pocket"] = f"{'top' if y < 0.5 else 'bottom'}-{'left' if x < 1 / 3 else 'right' if x > 2 / 3 else 'middle'}"
    # first contact: the object ball that moved (or vanished) most in the first frame where any did
    shift = (xy - xy[0]).norm(dim=-1) * present[0]  # [T, N]
    shift = torch.where((present[0] > 0) & (present == 0), torch.ones_like(shift), shift)
    shift[:, cue] = 0
    movers = [t for t in range(1, len(xy)) if (shift[t] > MOVED).any()]
    answers["first_contact"] = names[int(shift[movers[0]].argmax())] if movers else "none"
    # the cue ball: its first displacement, and how often its motion reverses along x or y
    track = xy[present[:, cue] > 0, cue]
    steps = track[1:] - track[:-1]  # [T' - 1, 2]
    moving = steps.norm(dim=-1) > MOVED
    first_step = steps[moving][0] if moving.any() else torch.zeros(2)
    answers["cue_direction"] = direction_name(float(first_step[0]), float(first_step[1]))
    flips = sum(int(bool(moving[t] and moving[t + 1] and (steps[t] * steps[t + 1] < 0).any()))
                for t in range(len(steps) - 1))
    answers["cushions"] = str(flips)
    return answers


def score(answers: dict[str, dict[str, str]], records: list[dict]) -> tuple[dict[str, dict], float]:
    """Per question type (``n``, ``accuracy``) and overall accuracy of per-clip ``answers``
    (video name -> type -> answer) on the single-video, single-question ``records`` of a split."""
    hits = collections.defaultdict(list)
    for r in records:
        if isinstance(r["video"], str) and len(r["meta"]["types"]) == 1:
            qtype = r["meta"]["types"][0]
            hits[qtype].append(answers[r["video"]].get(qtype) == r["meta"]["truth"][0])
    per_type = {t: {"n": len(h), "accuracy": sum(h) / len(h)} for t, h in sorted(hits.items())}
    return per_type, sum(sum(h) for h in hits.values()) / sum(len(h) for h in hits.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="a billiards data set (hilight recipe's data/)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--frames", type=int, nargs="+", default=[8])
    parser.add_argument("--cells", type=int, help="positions only as the centre of their cell on this grid")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    clips = {c["video"]: c["tracks"] for c in json.loads((args.data / f"{args.split}-captions.json").read_text())}
    records = json.loads((args.data / f"{args.split}.json").read_text())
    results = {}
    for frames in args.frames:
        video_cfg = preset("billiards-small").video
        video_cfg.num_frames = frames
        answers = {}
        for name, tracks in clips.items():
            facts = frame_facts(tracks, tracks["names"], video_cfg, grid=1)
            xy = facts["xy"]
            if args.cells:  # a ball off the table keeps its zeros; presence says so
                xy = ((xy * args.cells).floor().clamp(0, args.cells - 1) + 0.5) / args.cells * facts["present"][..., None]
            answers[name] = rule_answers(tracks["names"], facts["present"], xy)
        per_type, overall = score(answers, records)
        results[frames] = {"per_type": per_type, "single_video": overall}
        print(f"{frames} frames: single-video questions {overall:.1%}  "
              + "  ".join(f"{t} {v['accuracy']:.1%}" for t, v in per_type.items()))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
