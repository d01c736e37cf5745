"""Training data: LLaVA-style records, their validation, the tower-feature cache, batching.

Records are ``{"id", "video": name or [names], "conversations": [{"from", "value"}...]}``
with one ``<video>`` per video, and optionally ``"sampling"`` (``{"num_frames": 24}``, ``{"fps":
2, "start": 3}``..., one for all videos or a list with one per video): a video sampled so is read
in segments with their time-span markers, exactly as :mod:`hilight.sampling` reads it at
inference. Because the towers are frozen, their outputs are computed once per video (or
segment; ``hilight extract-features``) and stored as safetensors under a key made of the
video's content hash, the preprocessing settings and the towers' weights (and a segment's frame
numbers), so a changed tower or setting never reuses stale features.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset
from tqdm import tqdm

from hilight.errors import DataError, HiLightError
from hilight.files import file_digest
from hilight.model import HiLight, TowerOutputs
from hilight.sampling import record_sampling, segment_label
from hilight.text import VIDEO_TOKEN, ChatTokenizer, ConversationError, Encoded, collate, from_llava
from hilight.video import VIDEO_SUFFIXES, VideoError, decode_frames, load_video, plan_video, preprocess, probe_video

Frames = tuple[int, ...] | None  # a segment's frame numbers, or None: the video read the model's own way

log = logging.getLogger(__name__)


@dataclass
class Sample:
    id: str
    encoded: Encoded
    videos: list[Path]  # only those whose <video> block survived truncation
    segments: list[list[tuple[int, ...]] | None] | None = None  # per video: its segments' frames, or None

    def blocks(self) -> list[tuple[Path, Frames]]:
        """The visual blocks in reading order: (video, None) for a video read the model's own
        way, (video, frames) for each segment of a sampled one."""
        segments = self.segments or [None] * len(self.videos)
        return [(v, f) for v, segs in zip(self.videos, segments, strict=True)
                for f in ([None] if segs is None else segs)]


@dataclass
class BadSample:
    id: str
    reason: str


def read_records(path: str | Path) -> list[dict]:
    try:
        records = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot read JSON ({exc})") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records")
    return records


def record_videos(record: dict, video_dir: Path) -> list[Path]:
    """The record's video files (``video``: a name or a list of names under ``video_dir``)."""
    names = record.get("video") or []
    names = [names] if isinstance(names, str) else names
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ConversationError("'video' must be a file name or a list of names")
    return [resolve_video(Path(video_dir), n) for n in names]


def resolve_video(video_dir: Path, name: str) -> Path:
    """``video_dir / name``, except for a ``.pkl`` name: VideoInstruct-100K-style records name
    ``v_xxx.pkl`` (frames the original pickled), while the videos people have are ``v_xxx.mp4``;
    such a name means the video with the same stem in ``video_dir``. Pickles are never read:
    with no such video, the ``.pkl`` path is returned and is refused where it is read."""
    if Path(name).suffix.lower() != PICKLED_FRAMES:
        return video_dir / name
    found = _videos_by_stem(str(video_dir)).get(Path(name).stem)
    return video_dir / found if found else video_dir / name


PICKLED_FRAMES = ".pkl"


@functools.lru_cache(maxsize=8)
def _videos_by_stem(video_dir: str) -> dict[str, str]:
    """Stem -> file name of the videos in a folder, listed once per process."""
    try:
        names = sorted(entry.name for entry in os.scandir(video_dir) if entry.is_file())
    except OSError:
        return {}
    found: dict[str, str] = {}
    for name in names:
        if Path(name).suffix.lower() in VIDEO_SUFFIXES:
            found.setdefault(Path(name).stem, name)
    return found


def pickled_frames_reason(path: Path) -> str:
    """Why a ``.pkl`` video name could not be used."""
    return f"no such file (nor a video named {path.stem}.*; pickled frames are never read)"


def record_layout(record: dict, videos: list[Path], video_cfg) -> tuple[list, list]:
    """Per video of a record: its segment labels (None for one block) and its segments' frame
    numbers (None when read the model's own way)."""
    layouts, segments = [], []
    for video, sampling in zip(videos, record_sampling(record, len(videos)), strict=True):
        if sampling.is_default:
            layouts.append(None)
            segments.append(None)
            continue
        if video_cfg is None:
            raise ConversationError("'sampling' needs the model's video settings")
        index, planned = plan_video(video, video_cfg, sampling)
        layouts.append([segment_label(p, index.duration) for p in planned] if len(planned) > 1 else None)
        segments.append([p.indices for p in planned])
    return layouts, segments


def encode_records(records: list[dict], video_dir: Path, chat: ChatTokenizer, max_length: int,
                   truncation: str, video_cfg=None) -> tuple[list[Sample], list[BadSample]]:
    """Tokenize every record; malformed or over-long ones become :class:`BadSample`. Records
    with ``sampling`` need ``video_cfg`` (the model's video settings) and are never truncated."""
    samples, bad = [], []
    for n, rec in enumerate(records):
        rid = str(rec.get("id", n)) if isinstance(rec, dict) else str(n)
        try:
            if not isinstance(rec, dict):
                raise ConversationError("not a JSON object")
            videos = record_videos(rec, video_dir)
            messages = from_llava(rec.get("conversations") or [])
            markers = sum(m.content.count(VIDEO_TOKEN) for m in messages)
            if markers != len(videos):
                raise ConversationError(f"{len(videos)} video(s) but {markers} {VIDEO_TOKEN} marker(s)")
            layouts, segments = record_layout(rec, videos, video_cfg)
            sampled = any(s is not None for s in segments)
            encoded = chat.encode(messages, max_length=max_length, truncation="error" if sampled else truncation,
                                  layouts=layouts)
            samples.append(Sample(rid, encoded, videos[: encoded.num_videos], segments if sampled else None))
        except HiLightError as exc:
            bad.append(BadSample(rid, str(exc)))
    return samples, bad


# ---------------------------------------------------------------------------------------------
# feature cache


def tower_identity(model: HiLight) -> str:
    """Digest of both towers' configs and weights plus the preprocessing settings."""
    h = hashlib.sha256()
    cfg = model.config
    h.update(json.dumps([asdict(cfg.video_tower), asdict(cfg.image_tower), asdict(cfg.video)],
                        sort_keys=True).encode())
    for tower in (model.video_tower, model.image_tower):
        for name, tensor in sorted(tower.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class FeatureCache:
    """``root/<key>.safetensors`` holding ``video`` [S, Dv] and ``image`` [T, Di] of one clip."""

    def __init__(self, root: str | Path, identity: str):
        self.root = Path(root)
        self.identity = identity
        self._digests: dict[Path, str] = {}

    def key(self, video: Path, frames: Frames = None) -> str:
        if video not in self._digests:
            self._digests[video] = file_digest(video)
        segment = "" if frames is None else ":" + ",".join(map(str, frames))
        return hashlib.sha256(f"{self._digests[video]}:{self.identity}{segment}".encode()).hexdigest()[:40]

    def path(self, video: Path, frames: Frames = None) -> Path:
        return self.root / f"{self.key(video, frames)}.safetensors"

    def has(self, video: Path, frames: Frames = None) -> bool:
        return video.is_file() and self.path(video, frames).is_file()

    def load(self, video: Path, frames: Frames = None) -> TowerOutputs:
        tensors = self.load_tensors(video, frames)
        return TowerOutputs(video=tensors["video"], image=tensors["image"])

    def store(self, video: Path, towers: TowerOutputs, dtype: torch.dtype, frames: Frames = None) -> None:
        self.store_tensors(video, {"video": towers.video.to(dtype), "image": towers.image.to(dtype)}, frames)

    def load_tensors(self, video: Path, frames: Frames = None) -> dict[str, torch.Tensor]:
        return load_file(self.path(video, frames))

    def store_tensors(self, video: Path, tensors: dict[str, torch.Tensor], frames: Frames = None) -> None:
        """Write atomically (temp file + rename), so a killed run never leaves half a file."""
        self.root.mkdir(parents=True, exist_ok=True)
        target = self.path(video, frames)
        tmp = target.with_suffix(f".tmp{os.getpid()}")
        metadata = {"source": video.name, "identity": self.identity}
        if frames is not None:
            metadata["frames"] = ",".join(map(str, frames))
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, target)


def block_pixels(video: Path, frames: Frames, video_cfg, indexes: dict | None = None) -> torch.Tensor:
    """The towers' input [T, 3, S, S] of one block: the video read the model's own way, or the
    given frames of it (``indexes`` keeps each file's demux pass)."""
    if frames is None:
        return load_video(video, video_cfg)
    indexes = {} if indexes is None else indexes
    if video not in indexes:
        indexes[video] = probe_video(video, video_cfg)
    return preprocess(decode_frames(video, indexes[video], list(frames), video_cfg).frames, video_cfg)


def shard(items: list, rank: int, world: int) -> list:
    """This process's share: every ``world``-th item starting at ``rank`` (no overlap)."""
    return items[rank::world]


def extract_features(model: HiLight, videos: list, cache: FeatureCache, dtype: torch.dtype,
                     rank: int = 0, world: int = 1) -> dict[str, list]:
    """Run both towers once per block of this rank's share (a video, or ``(video, frames)`` for
    one segment of it); skip cached ones; report bad ones."""
    blocks = {(v, None) if isinstance(v, Path) else (Path(v[0]), v[1]) for v in videos}
    unique = sorted(blocks, key=lambda b: (str(b[0]), b[1] or ()))
    mine = shard(unique, rank, world)
    done, skipped, bad = [], [], []
    device = next(model.parameters()).device
    indexes: dict = {}
    for video, frames in tqdm(mine, desc=f"features (rank {rank}/{world})", unit="block",
                              disable=rank != 0 and world > 1):
        item = video if frames is None else (video, frames)
        try:
            if cache.has(video, frames):
                skipped.append(item)
                continue
            pixels = block_pixels(video, frames, model.config.video, indexes).unsqueeze(0).to(device)
            with torch.inference_mode():
                towers = model.encode_videos(pixels)
            cache.store(video, TowerOutputs(towers.video[0].cpu(), towers.image[0].cpu()), dtype, frames)
            done.append(item)
        except (VideoError, OSError) as exc:
            bad.append((str(video), str(exc)))
            log.warning("skipped %s", exc)
    return {"extracted": done, "cached": skipped, "bad": bad,
            "assigned": [v if f is None else (v, f) for v, f in mine]}


def record_blocks(record: dict, video_dir: Path, video_cfg) -> list[tuple[Path, Frames]]:
    """Every visual block a record's sample needs (what :func:`extract_features` caches)."""
    videos = record_videos(record, video_dir)
    _, segments = record_layout(record, videos, video_cfg)
    return Sample("", Encoded([], [], 0), videos, segments if any(s is not None for s in segments) else None).blocks()


# ---------------------------------------------------------------------------------------------
# dataset


class VideoQADataset(Dataset):
    """Samples with their videos as cached tower outputs or, without a cache, as pixels.

    Samples whose videos are missing or not in the cache are excluded up front and listed in
    ``self.bad``; without a cache, a video that does not decode is found when its sample is
    first loaded, and training excludes it then. Nothing is ever trained on a blanked sample.
    """

    def __init__(self, samples: list[Sample], video_cfg, cache: FeatureCache | None, bad: list[BadSample]):
        self.video_cfg = video_cfg
        self.cache = cache
        self.bad = list(bad)
        self.samples = []
        for s in samples:
            missing = [v for v in s.videos if not v.is_file() or v.suffix.lower() == PICKLED_FRAMES]
            if missing:
                reason = (pickled_frames_reason(missing[0]) if missing[0].suffix.lower() == PICKLED_FRAMES
                          else f"missing video {missing[0]}")
                self.bad.append(BadSample(s.id, reason))
            elif cache is not None and not all(cache.has(v, f) for v, f in s.blocks()):
                self.bad.append(BadSample(s.id, "video not in the feature cache (undecodable or not extracted)"))
            else:
                self.samples.append(s)
        self._indexes: dict = {}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Encoded, list]:
        """The sample's tokens and one entry per visual block (a video, or a segment of one)."""
        s = self.samples[i]
        if self.cache is not None:
            return s.encoded, [self.cache.load(v, f) for v, f in s.blocks()]
        return s.encoded, [block_pixels(v, f, self.video_cfg, self._indexes) for v, f in s.blocks()]


def collate_samples(batch: list[tuple[Encoded, list]], pad_id: int) -> dict:
    """Right-padded ids/labels/mask plus the batch's videos in reading order."""
    text = collate([enc for enc, _ in batch], pad_id)
    videos = [v for _, vs in batch for v in vs]
    out = {"input_ids": text.input_ids, "attention_mask": text.attention_mask, "labels": text.labels}
    if videos and isinstance(videos[0], TowerOutputs):
        # cached outputs are fp16; fp32 here, as the towers would give them (and CPU autocast
        # refuses to stack fp16 under bf16)
        out["towers"] = TowerOutputs(video=torch.stack([v.video.float() for v in videos]),
                                     image=torch.stack([v.image.float() for v in videos]))
    elif videos:
        out["pixel_values"] = torch.stack(videos)
    return out


# ---------------------------------------------------------------------------------------------
# checking a dataset up front (`hilight data check`)

# reasons a record is not usable, grouped under a name that counts ("7 missing files")
# (words in the reason, the group's name, its plural)
_GROUPS = (("no such file", "missing file", "missing files"), ("empty file", "empty file", "empty files"),
           ("not a readable media file", "unreadable file", "unreadable files"),
           ("exceed max_length", "over-long sample", "over-long samples"),
           ("marker", "record whose <video> markers do not match its videos",
            "records whose <video> markers do not match their videos"))
GROUP_PLURALS = {group: plural for _, group, plural in _GROUPS}


def reason_group(reason: str) -> str:
    """The group a bad record's reason belongs to (its own reason when no group fits)."""
    return next((group for key, group, _ in _GROUPS if key in reason), reason)


def check_dataset(records: list[dict], video_dir: Path, chat: ChatTokenizer, max_length: int,
                  video_cfg) -> dict:
    """Every record checked as training would use it: its conversation and length, and every
    video decoded once. Returns ``usable`` (count), ``bad`` (each with ``id``, ``videos``,
    ``reason``, ``group``), ``groups`` (group -> count), ``videos`` and ``unreadable`` counts and
    the token ``lengths`` of the usable samples."""
    from hilight.video import decode_video

    samples, bad_samples = encode_records(records, video_dir, chat, max_length, "error", video_cfg)
    names = {str(r.get("id", n)) if isinstance(r, dict) else str(n): r.get("video") if isinstance(r, dict) else None
             for n, r in enumerate(records)}
    bad = [{"id": b.id, "videos": names.get(b.id), "reason": b.reason} for b in bad_samples]
    videos = sorted({v for s in samples for v in s.videos})
    broken: dict[Path, str] = {}
    for video in videos:
        if video.suffix.lower() == PICKLED_FRAMES:
            broken[video] = pickled_frames_reason(video)
            continue
        try:
            decode_video(video, video_cfg)
        except VideoError as exc:
            broken[video] = exc.reason
    usable = []
    for s in samples:
        failing = [v for v in s.videos if v in broken]
        if failing:
            bad.append({"id": s.id, "videos": [v.name for v in s.videos], "file": failing[0].name,
                        "reason": f"{failing[0].name}: {broken[failing[0]]}"})
        else:
            usable.append(s)
    groups: dict[str, int] = {}
    for b in bad:
        b["group"] = reason_group(b["reason"])
        groups[b["group"]] = groups.get(b["group"], 0) + 1
    return {"records": len(records), "usable": len(usable), "bad": bad, "groups": groups, "videos": len(videos),
            "unreadable": len(broken), "lengths": [len(s.encoded) for s in usable]}
