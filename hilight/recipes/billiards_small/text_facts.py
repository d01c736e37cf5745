"""The text-facts task: the billiards questions with each sampled frame's true facts as text.

In place of each ``<video>`` a record gets one short line per ball, its cell on a grid over the
table (columns ``a``-``h`` from the left, rows ``1``-``8`` from the top) in each frame the model
would be shown, and ``off`` once it has gone into a pocket::

    the cue ball: d5 d4 d3 e3
    the red ball: b2 b2 a1 off

One line per frame instead, naming each ball and its cell, was measured and lost: the LLM must
then gather a ball's motion from every line (the research log of 2026-12-03). With the
perception taken away, an LLM trained on these records shows what the LLM itself can learn of
the questions: the ceiling of the chain that ends at the model's own answers.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from hilight.config import VideoInputConfig
from hilight.data import read_records
from hilight.errors import DataError
from hilight.recipes.billiards_small.facts import shown_positions
from hilight.text import VIDEO_TOKEN

GRID = 8


def cell(x: float, y: float, grid: int = GRID) -> str:
    """The grid cell of a position given as fractions of the frame: ``"d5"``."""
    column = min(grid - 1, max(0, int(x * grid)))
    row = min(grid - 1, max(0, int(y * grid)))
    return f"{string.ascii_lowercase[column]}{row + 1}"


def fact_lines(tracks: dict, video_cfg: VideoInputConfig, grid: int = GRID) -> list[str]:
    """One line per ball, in the order ``tracks`` names them: its grid cell in each frame the
    model is shown (``video_cfg``'s sampling of the clip's frames), ``off`` once it has left the
    table. A ball's whole motion is one line of text."""
    shown = shown_positions(tracks, video_cfg)  # [T, N, 2]
    return [f"the {name} ball: " + " ".join(cell(x, y, grid) if x >= 0 else "off" for x, y in shown[:, n].tolist())
            for n, name in enumerate(tracks["names"])]


def text_facts_records(records: list[dict], captions: list[dict], video_cfg: VideoInputConfig,
                       grid: int = GRID) -> list[dict]:
    """``records`` with every ``<video>`` replaced by its clip's fact lines (and no videos).
    Records read in segments (``sampling``) are left out: the task is the one-block questions."""
    tracks = {c["video"]: c["tracks"] for c in captions}
    out = []
    for rec in records:
        if rec.get("sampling"):
            continue
        names = rec["video"] if isinstance(rec["video"], list) else [rec["video"]]
        missing = [n for n in names if n not in tracks]
        if missing:
            raise DataError(f"record {rec.get('id')}: no tracks for {missing[0]}")
        blocks = iter("\n".join(fact_lines(tracks[n], video_cfg, grid)) for n in names)
        turns = []
        for turn in rec["conversations"]:
            value = turn["value"]
            while VIDEO_TOKEN in value:
                value = value.replace(VIDEO_TOKEN, next(blocks), 1)
            turns.append({**turn, "value": value})
        text = {k: v for k, v in rec.items() if k not in ("video", "conversations")}
        out.append({**text, "conversations": turns})
    return out


def write_text_facts(data: Path, out: Path, video_cfg: VideoInputConfig,
                     splits: tuple[str, ...] = ("train", "val", "test")) -> dict[str, Path]:
    """The text-facts version of a billiards data set's ``splits`` under ``out``; returns
    {split: file}. Every split's captions (``{split}-captions.json``) hold its tracks."""
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for split in splits:
        records = text_facts_records(read_records(data / f"{split}.json"),
                                     read_records(data / f"{split}-captions.json"), video_cfg)
        files[split] = out / f"{split}.json"
        files[split].write_text(json.dumps(records) + "\n")
    return files
