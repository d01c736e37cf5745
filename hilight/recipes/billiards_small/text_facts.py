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

import numpy as np

from hilight.config import VideoInputConfig
from hilight.data import read_records
from hilight.errors import DataError
from hilight.evaluation.scoring import extract
from hilight.recipes.billiards_small.facts import shown_positions
from hilight.text import VIDEO_TOKEN

GRID = 8
# the question types whose answers say a reasoning step first (:func:`reasoning`)
REASONED_TYPES = ("cue_direction", "cushions", "pocket", "first_contact", "which_more_left")


def cell(x: float, y: float, grid: int = GRID) -> str:
    """The grid cell of a position given as fractions of the frame: ``"d5"``."""
    column = min(grid - 1, max(0, int(x * grid)))
    row = min(grid - 1, max(0, int(y * grid)))
    return f"{string.ascii_lowercase[column]}{row + 1}"


def ball_cells(tracks: dict, video_cfg: VideoInputConfig, grid: int = GRID) -> list[list[str | None]]:
    """[N][T]: each ball's cell in each frame the model is shown (``video_cfg``'s sampling of the
    clip's frames), None once it has left the table; balls in the order ``tracks`` names them."""
    shown = shown_positions(tracks, video_cfg)  # [T, N, 2]
    return [[cell(x, y, grid) if x >= 0 else None for x, y in shown[:, n].tolist()] for n in range(shown.shape[1])]


def fact_lines(tracks: dict, video_cfg: VideoInputConfig, grid: int = GRID) -> list[str]:
    """One line per ball, in the order ``tracks`` names them: its grid cell in each frame the
    model is shown, ``off`` once it has left the table. A ball's whole motion is one line of text."""
    return [f"the {name} ball: " + " ".join(c or "off" for c in cells)
            for name, cells in zip(tracks["names"], ball_cells(tracks, video_cfg, grid), strict=True)]


def _xy(c: str) -> tuple[int, int]:
    return string.ascii_lowercase.index(c[0]), int(c[1:])


def _listed(cells: list[str]) -> str:
    return ", ".join(cells[:-1]) + " and " + cells[-1] if len(cells) > 1 else cells[0]


def reasoning(qtype: str, question: str, clips: list[list[list[str | None]]], names: list[list[str]]) -> str | None:
    """The step a question of ``qtype`` needs, read from the fact lines of its clips (``clips``:
    each clip's :func:`ball_cells`; ``names``: each clip's balls, as its tracks name them), as
    one sentence said before the answer; None for the types that read one fact directly.

    The sentence names cells and counts in digits, never a colour, direction, pocket or clip
    word, so that scoring reads the answer's value from the sentence that follows it."""
    if qtype == "which_more_left":
        left = [sum(c[-1] is not None for n, c in zip(balls, clip, strict=True) if n != "cue")
                for balls, clip in zip(names, clips, strict=True)]
        return f"Balls left: {left[0]} and {left[1]}."
    if qtype not in REASONED_TYPES:
        return None
    (clip,), (balls,) = clips, names
    if qtype == "pocket":  # the asked ball's last cell before it left the table
        ball = next((n for n in balls if f" {n} ball" in f" {question.lower()}"), None)
        if ball is None:
            return None
        seen = [c for c in clip[balls.index(ball)] if c is not None]
        return f"The {ball} ball was last at {seen[-1]}." if seen else None
    if qtype == "first_contact":  # the first object ball to leave its first cell
        for t in range(1, len(clip[0])):
            movers = [c for n, c in zip(balls, clip, strict=True) if n != "cue" and c[0] is not None and c[t] != c[0]]
            if movers:
                return f"The first ball to move went from {movers[0][0]} to {movers[0][t] or 'off'}."
        return "No ball moved."
    path = [c for c in clip[balls.index("cue")] if c is not None]
    path = [c for k, c in enumerate(path) if k == 0 or c != path[k - 1]]  # its distinct cells in order
    if qtype == "cue_direction":
        return f"The cue ball went from {path[0]} to {path[1]}." if len(path) > 1 else f"The cue ball stayed at {path[0]}."
    turns = []  # cushions: the cells where the cue ball's motion reverses along a column or a row
    for k in range(1, len(path) - 1):
        (xa, ya), (xb, yb), (xc, yc) = _xy(path[k - 1]), _xy(path[k]), _xy(path[k + 1])
        if (xb - xa) * (xc - xb) < 0 or (yb - ya) * (yc - yb) < 0:
            turns.append(path[k])
    return f"The cue ball turned at {_listed(turns)}." if turns else "The cue ball went straight."


def _tracks_of(rec: dict, tracks: dict[str, dict]) -> list[str]:
    """The names of ``rec``'s videos, each checked to have its tracks."""
    names = rec["video"] if isinstance(rec["video"], list) else [rec["video"]]
    missing = [n for n in names if n not in tracks]
    if missing:
        raise DataError(f"record {rec.get('id')}: no tracks for {missing[0]}")
    return names


def reading_records(clips: list[dict], video_cfg: VideoInputConfig, per_clip: int, seed: int,
                    asked_of: str = "text", grid: int = GRID) -> list[dict]:
    """Training-only questions that read one place of a clip, ``per_clip`` for each of ``clips``
    (caption records with tracks), alternating: where a ball was in frame k (``In frame 3 the red
    ball was at e3.``), and a ball's cell in every frame (``d5 d4 off off.``). ``asked_of="text"``
    asks them of the clip's fact lines (what a pre-trained LLM brings and this one lacks: fetching a
    token from a given place of a given line), ``"video"`` of the clip itself (they then ask
    TokenMining's tokens to carry each ball's cell)."""
    if asked_of not in ("text", "video"):
        raise ValueError(f"asked_of is 'text' or 'video', not {asked_of!r}")
    rng = np.random.default_rng(seed)
    out = []
    for clip in clips:
        tracks = clip["tracks"]
        cells = ball_cells(tracks, video_cfg, grid)
        shown = "\n".join(fact_lines(tracks, video_cfg, grid)) if asked_of == "text" else VIDEO_TOKEN
        for j in range(per_clip):
            n = int(rng.integers(len(cells)))
            ball = tracks["names"][n]
            if j % 2 == 0:
                k = int(rng.integers(len(cells[n])))
                where = f"was at {cells[n][k]}" if cells[n][k] else "was off the table"
                question, answer = f"Where was the {ball} ball in frame {k + 1}?", f"In frame {k + 1} the {ball} ball {where}."
            else:
                question = (f"Repeat the {ball} ball's line." if asked_of == "text"
                            else f"Where was the {ball} ball in each frame?")
                answer = " ".join(c or "off" for c in cells[n]) + "."
            record = {"id": f"{clip['video']}-reading-{j}", "meta": {"types": ["reading"], "truth": [answer]},
                      "conversations": [{"from": "human", "value": f"{shown}\n{question}"},
                                        {"from": "gpt", "value": answer}]}
            out.append(record if asked_of == "text" else {**record, "video": clip["video"]})
    return out


def reasoned_records(records: list[dict], captions: list[dict], video_cfg: VideoInputConfig,
                     grid: int = GRID) -> list[dict]:
    """``records`` (videos kept) with the :func:`reasoning` step said before every answer whose
    type has one, read from the cells of the frames ``video_cfg`` shows; records read in
    segments (``sampling``) are kept as they are."""
    tracks = {c["video"]: c["tracks"] for c in captions}
    cells: dict[str, list] = {}  # a clip's cells, computed once for all its records
    out = []
    for rec in records:
        if rec.get("sampling"):
            out.append(rec)
            continue
        names = _tracks_of(rec, tracks)
        for n in names:
            if n not in cells:
                cells[n] = ball_cells(tracks[n], video_cfg, grid)
        clips = [cells[n] for n in names]
        balls = [tracks[n]["names"] for n in names]
        types = iter(rec.get("meta", {}).get("types", []))
        turns, question = [], ""
        for turn in rec["conversations"]:
            value = turn["value"]
            if turn["from"] == "human":
                question = value
            elif qtype := next(types, None):
                step = reasoning(qtype, question.replace(VIDEO_TOKEN, " "), clips, balls)
                value = f"{step} {value}" if step else value
            turns.append({**turn, "value": value})
        out.append({**rec, "conversations": turns})
    return out


def text_facts_records(records: list[dict], captions: list[dict], video_cfg: VideoInputConfig,
                       grid: int = GRID, reasoned: bool = False) -> list[dict]:
    """``records`` with every ``<video>`` replaced by its clip's fact lines (and no videos).
    Records read in segments (``sampling``) are left out: the task is the one-block questions.
    ``reasoned``: every answer whose type has a :func:`reasoning` step says it first
    (:func:`reasoned_records`)."""
    tracks = {c["video"]: c["tracks"] for c in captions}
    records = [rec for rec in records if not rec.get("sampling")]
    if reasoned:
        records = reasoned_records(records, captions, video_cfg, grid)
    lines: dict[str, str] = {}  # a clip's fact lines, computed once for all its records
    out = []
    for rec in records:
        names = _tracks_of(rec, tracks)
        for n in names:
            if n not in lines:
                lines[n] = "\n".join(fact_lines(tracks[n], video_cfg, grid))
        blocks = iter(lines[n] for n in names)
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
                     splits: tuple[str, ...] = ("train", "val", "test"), reasoned: bool = False) -> dict[str, Path]:
    """The text-facts version of a billiards data set's ``splits`` under ``out``; returns
    {split: file}. Every split's captions (``{split}-captions.json``) hold its tracks."""
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for split in splits:
        records = text_facts_records(read_records(data / f"{split}.json"),
                                     read_records(data / f"{split}-captions.json"), video_cfg,
                                     reasoned=reasoned)
        files[split] = out / f"{split}.json"
        files[split].write_text(json.dumps(records) + "\n")
    return files


def reasoning_steps(items: list) -> dict[str, dict]:
    """Per reasoned question type: how often the answer's reasoning step is the reference's word
    for word, and the accuracy when it is and when it is not."""
    out = {}
    for qtype in REASONED_TYPES:
        group = [it for it in items if it.qtype == qtype and it.answer is not None]
        if not group:
            continue
        right = [it.answer.startswith(it.reference.split(". ")[0] + ".") for it in group]
        hit = [extract(it.kind, it.answer) == it.truth for it in group]
        given = {flag: [h for h, r in zip(hit, right, strict=True) if r == flag] for flag in (True, False)}
        out[qtype] = {"n": len(group), "step_right": sum(right) / len(group),
                      **{f"accuracy_step_{'right' if flag else 'wrong'}": sum(h) / len(h) if h else None
                         for flag, h in given.items()}}
    return out
