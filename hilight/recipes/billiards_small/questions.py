"""The training-only inventory questions of the billiards recipe: which balls the first and the
last frame shown to the model hold, and which left the table in between. They read single
frames, and teach a small LLM where in its visual tokens the balls are; the evaluation never
asks them."""

from __future__ import annotations

import json
from pathlib import Path

from hilight.config import VideoInputConfig
from hilight.recipes.billiards_small.facts import frame_facts
from hilight.synth.billiards import BALL_COLOURS
from hilight.synth.qa import QA

LISTING_ORDER = ["cue", *BALL_COLOURS]
INVENTORY_QUESTIONS = {
    "balls_start": "Which balls are on the table at the start?",
    "balls_end": "Which balls are on the table at the end?",
    "balls_gone": "Which balls left the table?",
}


def _listing(balls: list[str]) -> str:
    """"The cue, blue and red balls." in one fixed order (cue, then the colours as BALL_COLOURS
    lists them): a list is then a check of each colour in turn (in the tracks' own, random
    order, the model listed the first frame's balls exactly in 23 % of test clips)."""
    if not balls:
        return "No ball."
    balls = sorted(balls, key=LISTING_ORDER.index)
    named = ", ".join(balls[:-1]) + " and " + balls[-1] if len(balls) > 1 else balls[0]
    return f"The {named} ball{'s' if len(balls) > 1 else ''}."


def inventory_qas(start: list[str], end: list[str]) -> list[QA]:
    """Training-only questions that read single frames: which balls the first and the last
    frame shown to the model hold, and which left the table in between. They teach a small LLM
    where in the visual tokens the balls are; the evaluation never asks them."""
    gone = [b for b in start if b not in end]
    values = {"balls_start": start, "balls_end": end, "balls_gone": gone}
    return [QA(t, INVENTORY_QUESTIONS[t], _listing(v), ",".join(v) or "none") for t, v in values.items()]


def inventory_records(data: Path, video_cfg: VideoInputConfig, split: str = "train") -> list[dict]:
    """The inventory questions of every clip of ``split`` as LLaVA records, read from its tracks
    at the first and last frame the model is shown."""
    records = []
    for clip in json.loads((Path(data) / f"{split}-captions.json").read_text()):
        names = clip["tracks"]["names"]
        present = frame_facts(clip["tracks"], names, video_cfg, grid=1)["present"]  # [T, N]
        start = [n for k, n in enumerate(names) if present[0, k] > 0]
        end = [n for k, n in enumerate(names) if present[-1, k] > 0]
        for qa in inventory_qas(start, end):
            records.append({"id": f"{Path(clip['video']).stem}-{qa.qtype}", "video": clip["video"],
                            "conversations": [{"from": "human", "value": f"<video>\n{qa.question}"},
                                              {"from": "gpt", "value": qa.answer}],
                            "meta": {"types": [qa.qtype], "truth": [qa.truth]}})
    return records
