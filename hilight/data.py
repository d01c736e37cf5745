"""Training data: LLaVA-style records, their validation, the tower-feature cache, batching.

Records are ``{"id", "video": name or [names], "conversations": [{"from", "value"}...]}``
with one ``<video>`` per video. Because the towers are frozen, their outputs are computed
once per video (``hilight extract-features``) and stored as safetensors under a key made of
the video's content hash, the preprocessing settings and the towers' weights, so a changed
tower or setting never reuses stale features.
"""

from __future__ import annotations

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

from hilight.errors import DataError
from hilight.files import file_digest
from hilight.model import HiLight, TowerOutputs
from hilight.text import VIDEO_TOKEN, ChatTokenizer, ConversationError, Encoded, collate, from_llava
from hilight.video import VideoError, load_video

log = logging.getLogger(__name__)


@dataclass
class Sample:
    id: str
    encoded: Encoded
    videos: list[Path]  # only those whose <video> block survived truncation


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
    names = record.get("video") or []
    names = [names] if isinstance(names, str) else names
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ConversationError("'video' must be a file name or a list of names")
    return [video_dir / n for n in names]


def encode_records(records: list[dict], video_dir: Path, chat: ChatTokenizer, max_length: int,
                   truncation: str) -> tuple[list[Sample], list[BadSample]]:
    """Tokenize every record; malformed or over-long ones become :class:`BadSample`."""
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
            encoded = chat.encode(messages, max_length=max_length, truncation=truncation)
            samples.append(Sample(rid, encoded, videos[: encoded.num_videos]))
        except ConversationError as exc:
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

    def key(self, video: Path) -> str:
        if video not in self._digests:
            self._digests[video] = file_digest(video)
        return hashlib.sha256(f"{self._digests[video]}:{self.identity}".encode()).hexdigest()[:40]

    def path(self, video: Path) -> Path:
        return self.root / f"{self.key(video)}.safetensors"

    def has(self, video: Path) -> bool:
        return video.is_file() and self.path(video).is_file()

    def load(self, video: Path) -> TowerOutputs:
        tensors = self.load_tensors(video)
        return TowerOutputs(video=tensors["video"], image=tensors["image"])

    def store(self, video: Path, towers: TowerOutputs, dtype: torch.dtype) -> None:
        self.store_tensors(video, {"video": towers.video.to(dtype), "image": towers.image.to(dtype)})

    def load_tensors(self, video: Path) -> dict[str, torch.Tensor]:
        return load_file(self.path(video))

    def store_tensors(self, video: Path, tensors: dict[str, torch.Tensor]) -> None:
        """Write atomically (temp file + rename), so a killed run never leaves half a file."""
        self.root.mkdir(parents=True, exist_ok=True)
        target = self.path(video)
        tmp = target.with_suffix(f".tmp{os.getpid()}")
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp,
                  metadata={"source": video.name, "identity": self.identity})
        os.replace(tmp, target)


def shard(items: list, rank: int, world: int) -> list:
    """This process's share: every ``world``-th item starting at ``rank`` (no overlap)."""
    return items[rank::world]


def extract_features(model: HiLight, videos: list[Path], cache: FeatureCache, dtype: torch.dtype,
                     rank: int = 0, world: int = 1) -> dict[str, list]:
    """Run both towers once per video of this rank's share; skip cached ones; report bad ones."""
    unique = sorted(set(videos))
    mine = shard(unique, rank, world)
    done, skipped, bad = [], [], []
    device = next(model.parameters()).device
    for video in tqdm(mine, desc=f"features (rank {rank}/{world})", unit="video", disable=rank != 0 and world > 1):
        try:
            if cache.has(video):
                skipped.append(video)
                continue
            pixels = load_video(video, model.config.video).unsqueeze(0).to(device)
            with torch.inference_mode():
                towers = model.encode_videos(pixels)
            cache.store(video, TowerOutputs(towers.video[0].cpu(), towers.image[0].cpu()), dtype)
            done.append(video)
        except (VideoError, OSError) as exc:
            bad.append((str(video), str(exc)))
            log.warning("skipped %s", exc)
    return {"extracted": done, "cached": skipped, "bad": bad, "assigned": mine}


# ---------------------------------------------------------------------------------------------
# dataset


class VideoQADataset(Dataset):
    """Samples with their videos as cached tower outputs or, without a cache, as pixels.

    Samples whose videos are missing, undecodable or not in the cache are excluded up front
    and listed in ``self.bad``; nothing is ever trained on a blanked sample.
    """

    def __init__(self, samples: list[Sample], video_cfg, cache: FeatureCache | None, bad: list[BadSample]):
        self.video_cfg = video_cfg
        self.cache = cache
        self.bad = list(bad)
        self.samples = []
        for s in samples:
            missing = [v for v in s.videos if not v.is_file()]
            if missing:
                self.bad.append(BadSample(s.id, f"missing video {missing[0]}"))
            elif cache is not None and not all(cache.has(v) for v in s.videos):
                self.bad.append(BadSample(s.id, "video not in the feature cache (undecodable or not extracted)"))
            else:
                self.samples.append(s)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Encoded, list]:
        s = self.samples[i]
        if self.cache is not None:
            return s.encoded, [self.cache.load(v) for v in s.videos]
        return s.encoded, [load_video(v, self.video_cfg) for v in s.videos]


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
