"""Can the LLM read a frame's balls out of its visual tokens? The training-only inventory
questions, asked about held-out clips.

Stage 2 trains on three extra questions per clip (which balls are on the table at the start,
at the end, which left the table; ``hilight.synth.qa.inventory_qas``) that the evaluation never
asks. Asked about test clips, they show whether the LLM reads each frame's set of balls, the
step that "was a ball pocketed" and "which first" build on. An answer counts when it names
exactly the true set of colours. ``--positions`` also asks where each ball is at the start and
was last seen (right when every ball's region is; and per ball), ``--motion`` which coloured
balls moved (the recipe's ``--position-questions`` and ``--motion-question``).

    .venv/bin/python benchmarks/inventory_readout.py --data runs/recipe/data [--model DIR] [--clips 150]
        [--positions] [--motion]
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

from hilight.checkpoint import read_config
from hilight.engine import Engine, GenerationSettings, default_model
from hilight.eval import load_items, run
from hilight.recipe import inventory_records
from hilight.synth.billiards import BALL_COLOURS


def colours(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z]+", text.lower()) if w in BALL_COLOURS}


def regions(text: str) -> dict[str, str]:
    """"Cue ball: top left; red ball: bottom middle." -> {"cue": "top-left", "red": "bottom-middle"}"""
    return {b: f"{v}-{h}" for b, v, h in re.findall(r"([a-z]+) ball: (top|bottom) (left|middle|right)", text.lower())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="a billiards data folder (test-captions.json, videos/)")
    parser.add_argument("--model", type=Path, help="checkpoint (default: the bundled model)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--clips", type=int, default=150, help="the first N clips of the split")
    parser.add_argument("--positions", action="store_true", help="ask the position questions too")
    parser.add_argument("--motion", action="store_true", help="ask which coloured balls moved too")
    args = parser.parse_args()
    model = args.model or default_model()
    records = inventory_records(args.data, read_config(model).video, args.split, args.positions, args.motion)
    clips = list(dict.fromkeys(r["video"] for r in records))[:args.clips]
    records = [r for r in records if r["video"] in set(clips)]
    with tempfile.TemporaryDirectory() as tmp:
        questions = Path(tmp) / "inventory.json"
        questions.write_text(json.dumps(records))
        items, problems = load_items(questions, args.data / "videos")
    assert not problems, problems
    engine = Engine.from_checkpoint(model, dtype=torch.float32)
    run(engine, items, GenerationSettings(max_new_tokens=80 if args.positions else 24), batch_size=16, blind=False)
    right: dict[str, list[bool]] = defaultdict(list)
    per_ball: dict[str, list[bool]] = defaultdict(list)
    for it in items:
        if it.qtype.startswith("where_"):
            said, true = regions(it.answer), regions(it.reference)
            right[it.qtype].append(said == true)
            per_ball[it.qtype] += [said.get(ball) == where for ball, where in true.items()]
        else:
            right[it.qtype].append(colours(it.answer) == colours(it.reference))
    print(f"{model}: {len(clips)} {args.split} clips, answers naming exactly the true colours (regions)")
    for qtype, hits in right.items():
        ball = f"  per ball {sum(per_ball[qtype]) / len(per_ball[qtype]):6.1%}" if per_ball[qtype] else ""
        print(f"  {qtype:12} {sum(hits) / len(hits):6.1%}{ball}")
    for it in items[:6]:
        print(f"  {it.qtype}: model {it.answer!r}, truth {it.reference!r}")


if __name__ == "__main__":
    main()
