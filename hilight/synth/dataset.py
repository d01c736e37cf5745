"""Write a synthetic billiards video-QA dataset: clips, ground truth, conversations, captions.

Layout of ``OUT``::

    videos/{split}-{i:05d}.mp4
    {split}.json            LLaVA / VideoInstruct-100K records (single, multi-turn, two-video)
    {split}-truth.json      exact ground truth per clip
    {split}-captions.json   one caption per clip, [{"video", "caption", "tracks"}], where
                            tracks holds every ball's image position in every frame

and, for long clips of several shots in a row (:func:`generate_long_split`)::

    videos/long-{split}-{i:05d}.mp4
    {split}-long.json       records asking about one shot or which shot (read in segments)
    {split}-long-truth.json the ground truth of every shot of every clip

Every clip is generated from its own seed ``(seed, split, index)``, so the same seed gives the
same JSON and the same frames whatever the number of workers.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from hilight.errors import ConfigError
from hilight.synth.billiards import ShotTruth, TableConfig, image_tracks, random_camera, render, simulate
from hilight.synth.qa import KINDS, QA, caption, long_qas, pair_qas, single_qas
from hilight.video import write_video

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}
SINGLE_LAYOUTS = ("<video>\n{q}", "<video>\n{q}", "<video>\n{q}", "{q}\n<video>", "Here is a clip: <video>\n{q}")
PAIR_LAYOUTS = ("<video>\n<video>\n{q}", "First clip: <video>\nSecond clip: <video>\n{q}",
                "{q}\nClip 1: <video>\nClip 2: <video>", "Compare <video> with <video>. {q}")


@dataclass
class SplitFiles:
    conversations: Path
    truth: Path
    captions: Path
    clips: int
    records: int


def clip_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.mp4"


def _seed(seed: int, split: str, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, SPLITS.index(split), index, stream]))


def render_clip(cfg: TableConfig, seed: int, split: str, index: int) -> tuple[ShotTruth, np.ndarray, dict]:
    """Ground truth, uint8 frames [F, S, S, 3] and ball tracks of one clip, a pure function of its seed."""
    rng = _seed(seed, split, index, 0)
    truth, positions, present = simulate(cfg, rng)
    camera = random_camera(cfg, rng)
    return truth, render(cfg, truth, positions, present, camera, rng), image_tracks(cfg, truth, positions, present, camera)


def make_clip(args: tuple[TableConfig, int, str, int, Path]) -> tuple[dict, dict]:
    """Simulate, render and encode one clip; returns its ground truth and tracks as JSON."""
    cfg, seed, split, index, video_dir = args
    truth, frames, tracks = render_clip(cfg, seed, split, index)
    write_video(video_dir / clip_name(split, index), frames, fps=truth.fps)  # one x264 thread: same bytes
    return truth.to_json(), tracks


def _truth_from_json(data: dict) -> ShotTruth:
    from hilight.synth.billiards import Ball, Pocketing

    fields = dict(data, balls=[Ball(**b) for b in data["balls"]], pocketed=[Pocketing(**p) for p in data["pocketed"]])
    return ShotTruth(**fields)


def _record(rid: str, videos: list[str], qas: list[QA], layout: str) -> dict:
    turns = []
    for k, qa in enumerate(qas):
        turns.append({"from": "human", "value": layout.format(q=qa.question) if k == 0 else qa.question})
        turns.append({"from": "gpt", "value": qa.answer})
    return {"id": rid, "video": videos[0] if len(videos) == 1 else videos, "conversations": turns,
            "meta": {"types": [qa.qtype for qa in qas], "kinds": [KINDS[qa.qtype] for qa in qas],
                     "truth": [qa.truth for qa in qas]}}


def conversations(split: str, truths: list[ShotTruth], seed: int, prefix: str | None = None,
                  stream: int = 1) -> list[dict]:
    """Single-question records for every applicable type, one multi-turn record per clip, and
    two-video records over a random pairing of the clips; clip ``i`` is ``{prefix}-{i:05d}.mp4``
    (``prefix``: the split's name unless given)."""
    prefix = prefix or split
    rng = _seed(seed, split, len(truths), stream)
    records = []
    for i, truth in enumerate(truths):
        name = clip_name(prefix, i)
        qas = single_qas(truth, rng)
        for qa in qas:
            layout = SINGLE_LAYOUTS[int(rng.integers(len(SINGLE_LAYOUTS)))]
            records.append(_record(f"{prefix}-{i:05d}-{qa.qtype}", [name], [qa], layout))
        picks = rng.choice(len(qas), size=min(3, len(qas)), replace=False)
        records.append(_record(f"{prefix}-{i:05d}-multi", [name], [qas[k] for k in picks], SINGLE_LAYOUTS[0]))
    order = rng.permutation(len(truths))
    pairs = len(order) // 2 * 2  # an odd clip out is left without a partner
    for a, b in zip(order[0:pairs:2], order[1:pairs:2], strict=True):
        names = [clip_name(prefix, int(a)), clip_name(prefix, int(b))]
        for qa in pair_qas(truths[a], truths[b], rng):
            layout = PAIR_LAYOUTS[int(rng.integers(len(PAIR_LAYOUTS)))]
            records.append(_record(f"{prefix}-{int(a):05d}-{int(b):05d}-{qa.qtype}", names, [qa], layout))
    return records


def _make_all(make, jobs: list, desc: str, workers: int, chunksize: int) -> list:
    """``make`` on every job, in order, in ``workers`` processes (one: in this one), with a bar."""
    bar = dict(total=len(jobs), desc=desc, unit="clip")
    if workers > 1:
        # workers start from a fresh server process, not a fork of this one: a fork copies the
        # locks of this process's threads (PyAV's, torch's) as they are, and a child that then
        # frees a video reformatter waited forever on one (seen in the test suite)
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver")) as pool:
            return list(tqdm(pool.map(make, jobs, chunksize=chunksize), **bar))
    return [make(job) for job in tqdm(jobs, **bar)]


def generate_split(out: Path, split: str, clips: int, seed: int, cfg: TableConfig | None = None,
                   workers: int = 1) -> SplitFiles:
    """Generate ``clips`` clips of ``split`` under ``out`` (see the module docstring)."""
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    cfg = cfg or TableConfig()
    video_dir = out / "videos"
    video_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(cfg, seed, split, i, video_dir) for i in range(clips)]
    made = _make_all(make_clip, jobs, f"billiards {split}", workers, chunksize=4)
    truth_json, tracks = [m[0] for m in made], [m[1] for m in made]
    truths = [_truth_from_json(t) for t in truth_json]
    return _write_split(out, split, truth_json, truths, tracks, conversations(split, truths, seed))


def _write_split(out: Path, prefix: str, truth_json: list[dict], truths: list[ShotTruth], tracks: list[dict],
                 records: list[dict], indent: int | None = 1) -> SplitFiles:
    """A split's three files under ``out``, for clips ``{prefix}-{i:05d}.mp4``."""
    files = SplitFiles(out / f"{prefix}.json", out / f"{prefix}-truth.json", out / f"{prefix}-captions.json",
                       len(truth_json), len(records))
    files.conversations.write_text(json.dumps(records, indent=indent) + "\n")
    files.truth.write_text(json.dumps({clip_name(prefix, i): t for i, t in enumerate(truth_json)},
                                      indent=indent) + "\n")
    files.captions.write_text(json.dumps(
        [{"video": clip_name(prefix, i), "caption": caption(t), "tracks": tracks[i]} for i, t in enumerate(truths)],
        separators=(",", ":")) + "\n")
    return files


TRACKS = "tracks"  # the name of the track-only clips' files and clips
TRACK_STREAM = 200  # their physics and questions: streams no rendered clip draws from


def make_tracks(args: tuple[TableConfig, int, int]) -> tuple[dict, dict]:
    """Simulate one track-only clip and film it with a random camera, without rendering it:
    its ground truth and tracks as JSON."""
    cfg, seed, index = args
    rng = _seed(seed, "train", index, TRACK_STREAM)
    truth, positions, present = simulate(cfg, rng)
    camera = random_camera(cfg, rng)
    return truth.to_json(), image_tracks(cfg, truth, positions, present, camera)


def generate_tracks(out: Path, clips: int, seed: int, cfg: TableConfig | None = None, workers: int = 1) -> SplitFiles:
    """``clips`` training clips that are simulated but never rendered, for what needs a clip's
    facts and questions but not its frames (the LLM's pre-training on text facts): under
    ``out``, ``tracks.json`` (the questions, about clips ``tracks-{i:05d}.mp4`` that no file
    holds), ``tracks-truth.json`` and ``tracks-captions.json`` (with the tracks), laid out as a
    split's. Each clip has its own seed, apart from every rendered clip's, so none of them
    repeats a clip of any split."""
    cfg = cfg or TableConfig()
    out.mkdir(parents=True, exist_ok=True)
    made = _make_all(make_tracks, [(cfg, seed, i) for i in range(clips)], "billiards tracks", workers, chunksize=16)
    truth_json, tracks = [m[0] for m in made], [m[1] for m in made]
    truths = [_truth_from_json(t) for t in truth_json]
    records = conversations("train", truths, seed, prefix=TRACKS, stream=TRACK_STREAM + 1)
    return _write_split(out, TRACKS, truth_json, truths, tracks, records, indent=None)


LONG_SHOT_FPS, LONG_SHOT_SECONDS = 10, 3.0  # every shot of a long clip: 30 frames


def long_clip_name(split: str, index: int) -> str:
    return f"long-{split}-{index:05d}.mp4"


def render_long(cfg: TableConfig, seed: int, split: str, index: int, shots: int) -> tuple[list[ShotTruth], np.ndarray]:
    """``shots`` shots filmed one after another by one camera, each 3 s at 10 fps (so that
    segments of the clip fall on its shots): their truths and frames [shots x 30, S, S, 3]."""
    camera = random_camera(cfg, _seed(seed, split, index, 100))
    truths, frames = [], []
    for k in range(shots):
        rng = _seed(seed, split, index, 101 + k)
        truth, positions, present = simulate(cfg, rng, fps=LONG_SHOT_FPS, duration=LONG_SHOT_SECONDS)
        truths.append(truth)
        frames.append(render(cfg, truth, positions, present, camera, rng))
    return truths, np.concatenate(frames)


def make_long(args: tuple[TableConfig, int, str, int, int, Path]) -> list[dict]:
    cfg, seed, split, index, shots, video_dir = args
    truths, frames = render_long(cfg, seed, split, index, shots)
    write_video(video_dir / long_clip_name(split, index), frames, fps=LONG_SHOT_FPS)
    return [t.to_json() for t in truths]


def generate_long_split(out: Path, split: str, clips: int, seed: int, frames_per_segment: int, shots: int = 3,
                        cfg: TableConfig | None = None, workers: int = 1) -> Path:
    """``clips`` long clips of ``split`` under ``out`` and their questions; each record reads its
    clip as one segment of ``frames_per_segment`` frames per shot (``sampling.num_frames``), the
    way a user asks for it. Returns the records' file."""
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    cfg = cfg or TableConfig()
    video_dir = out / "videos"
    video_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(cfg, seed, split, i, shots, video_dir) for i in range(clips)]
    made = _make_all(make_long, jobs, f"billiards long {split}", workers, chunksize=2)
    rng = _seed(seed, split, clips, 102)
    records = []
    for i, truths in enumerate(made):
        name = long_clip_name(split, i)
        for qa in long_qas([_truth_from_json(t) for t in truths], rng):
            record = _record(f"long-{split}-{i:05d}-{qa.qtype}-{len(records)}", [name], [qa], SINGLE_LAYOUTS[0])
            record["sampling"] = {"num_frames": shots * frames_per_segment}
            records.append(record)
    path = out / f"{split}-long.json"
    path.write_text(json.dumps(records, indent=1) + "\n")
    (out / f"{split}-long-truth.json").write_text(
        json.dumps({long_clip_name(split, i): t for i, t in enumerate(made)}, indent=1) + "\n")
    return path


def split_sizes(total: int) -> dict[str, int]:
    """80 / 10 / 10, every split at least one clip."""
    val = max(1, round(total * SPLIT_FRACTIONS["val"]))
    test = max(1, round(total * SPLIT_FRACTIONS["test"]))
    return {"train": max(1, total - val - test), "val": val, "test": test}
