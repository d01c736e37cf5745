"""Frame facts: the billiards recipe's auxiliary objectives.

The generator knows where every ball is in every frame (``tracks`` in ``{split}-captions.json``).
Captions describe a clip as a whole, too weak a signal for towers and a TokenMining that start
from scratch; these dense, per-frame targets are what make them see 4-pixel balls:

- :class:`TowerFacts` (alignment, both towers): each patch token names the ball whose centre it
  holds, and which balls a frame shows is read from its patches and from the frame's embedding;
- :class:`MinedFacts` (VLM stages): which balls each frame shows, and where, from that frame's
  TokenMining outputs, so TokenMining learns from the video even while the LLM is still random.

Both are plugged in by name (``auxiliary.objective``, see :mod:`hilight.training.objectives`);
generic training knows nothing of balls.
"""

from __future__ import annotations

import json
import logging
from fractions import Fraction
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from hilight.config import HiLightConfig, VideoInputConfig
from hilight.data import read_records
from hilight.errors import DataError
from hilight.model.long_clip import LongCLIPImageTower
from hilight.video import FrameIndex, choose_frames

log = logging.getLogger(__name__)

TOWER_FACTS = f"{__name__}:TowerFacts"
MINED_FACTS = f"{__name__}:MinedFacts"
HEAD_FILE = "frame_facts_head.safetensors"  # MinedFacts' head, handed from stage 1 to stage 2


def shown_positions(tracks: dict, video_cfg: VideoInputConfig) -> torch.Tensor:
    """[T, N, 2]: every tracked ball's position in each frame the model is shown (``video_cfg``'s
    sampling of the clip's frames); fractions of a square frame, x < 0 off the table."""
    xy = torch.tensor(tracks["xy"], dtype=torch.float32).view(len(tracks["xy"]), -1, 2)  # [F, N, 2]
    index = FrameIndex(pts=list(range(len(xy))), keyframes=[0], time_base=Fraction(1, int(tracks["fps"])))
    return xy[choose_frames(index, video_cfg)]


def frame_facts(tracks: dict, names: list[str], video_cfg: VideoInputConfig, grid: int) -> dict[str, torch.Tensor]:
    """Targets for the frames the model is shown: ``present`` [T, C], ``xy`` [T, C, 2] and
    ``patch`` [T, grid*grid] (0: no ball's centre in the patch, else 1 + the ball's class).
    Positions are fractions of a square frame; a ball off the table has x < 0."""
    xy_all = shown_positions(tracks, video_cfg)  # [T, N, 2]
    t, c = len(xy_all), len(names)
    present, xy = torch.zeros(t, c), torch.zeros(t, c, 2)
    patch = torch.zeros(t, grid * grid, dtype=torch.long)
    for n, name in enumerate(tracks["names"]):
        k = names.index(name)
        on = xy_all[:, n, 0] >= 0
        present[on, k] = 1.0
        xy[on, k] = xy_all[on, n]
        cell = (xy_all[:, n] * grid).long().clamp(0, grid - 1)  # [T, 2] column, row
        frames = on.nonzero().flatten()
        patch[frames, cell[frames, 1] * grid + cell[frames, 0]] = k + 1
    return {"present": present, "xy": xy, "patch": patch}


def _track_names(records: list[dict], where: str) -> list[str]:
    missing = sum(not isinstance(r.get("tracks"), dict) for r in records)
    if missing:
        raise DataError(f"{where}: frame facts need 'tracks' in every record ({missing} without)")
    return sorted({name for r in records for name in r["tracks"]["names"]})


class TowerFacts(nn.Module):
    """Alignment objective. A patch classifier names the ball whose centre lies in each patch
    (or none); which balls a frame shows is read from it, multiple-instance style (a ball is
    present if its best patch says so), and also from the frame's own embedding. The patch
    task dominates on purpose: with a regression of positions from the pooled frame beside it,
    a small tower from scratch learned neither."""

    def __init__(self, train_records: list[dict], val_records: list[dict] | None, tower: nn.Module,
                 video_cfg: VideoInputConfig):
        super().__init__()
        self.names = _track_names(train_records, "the training captions")
        if val_records is not None and set(_track_names(val_records, "the validation captions")) - set(self.names):
            raise DataError("the validation captions' tracks name balls absent from the training set")
        image = isinstance(tower, LongCLIPImageTower)
        width = tower.cfg.width if image else tower.cfg.hidden_size
        self.grid = tower.cfg.image_size // tower.cfg.patch_size
        self.video_cfg = video_cfg
        self.patch = nn.Linear(width, len(self.names) + 1)
        self.frame = nn.Linear(tower.cfg.output_dim if image else width, len(self.names))

    def targets(self, records: list[dict]) -> dict[str, torch.Tensor]:
        rows = [frame_facts(r["tracks"], self.names, self.video_cfg, self.grid) for r in records]
        return {k: torch.stack([r[k] for r in rows]) for k in ("present", "patch")}

    def loss(self, out, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        """``out``: the aligner's VisualOutputs (patch states [B, T, L, D], frames [B, T, F])."""
        logits = self.patch(out.patch_states)  # [B, T, L, C + 1]
        weight = torch.ones(logits.shape[-1], device=logits.device)
        weight[0] = 0.1  # most patches show only cloth
        patch = F.cross_entropy(logits.flatten(0, 2).float(), targets["patch"].flatten(), weight=weight)
        present = targets["present"]  # [B, T, C]
        best = (logits[..., 1:] - logits[..., :1]).amax(2)  # [B, T, C]: each ball's most convinced patch
        from_patches = F.binary_cross_entropy_with_logits(best.float(), present)
        from_frame = F.binary_cross_entropy_with_logits(self.frame(out.frames).float(), present)
        return patch + from_patches + from_frame


class MinedFacts(nn.Module):
    """VLM-stage objective: from the Q TokenMining outputs of each frame, side by side, which
    balls the frame shows (logits) and where (fractions of the frame). Training-only: it is
    never part of the model."""

    def __init__(self, files: list[str], video_dir: Path, config: HiLightConfig):
        super().__init__()
        tracks: dict[Path, dict] = {}
        for file in files:
            for n, rec in enumerate(read_records(file)):
                if not isinstance(rec, dict) or not isinstance(rec.get("video"), str) or not isinstance(rec.get("tracks"), dict):
                    raise DataError(f"{file}: record {n} has no 'video' name and 'tracks'")
                tracks[Path(video_dir) / rec["video"]] = rec["tracks"]
        if not tracks:
            raise DataError("frame facts: auxiliary.data lists no records with tracks")
        self.names = sorted({name for t in tracks.values() for name in t["names"]})
        self.table: dict[Path, tuple[torch.Tensor, torch.Tensor]] = {}
        for video, t in tracks.items():
            try:
                f = frame_facts(t, self.names, config.video, grid=1)
            except (KeyError, TypeError, ValueError, RuntimeError) as exc:
                raise DataError(f"{video.name}: malformed tracks ({exc})") from None
            self.table[video] = (f["present"], f["xy"])
        self.queries_per_frame = config.token_mining.queries_per_frame
        self.head = nn.Linear(self.queries_per_frame * config.llm.hidden_size, 3 * len(self.names))

    def missing(self, videos: list[Path]) -> list[Path]:
        return [v for v in videos if v not in self.table]

    def targets(self, videos: list[Path]) -> dict[str, torch.Tensor] | None:
        if not videos or self.missing(videos):
            return None
        return {"present": torch.stack([self.table[v][0] for v in videos]),
                "xy": torch.stack([self.table[v][1] for v in videos])}

    def predict(self, video_embeds: torch.Tensor) -> torch.Tensor:
        """``video_embeds`` [V, T*Q, D] -> [V, T, 3, C]: presence logit, x, y of every ball."""
        v, tq, d = video_embeds.shape
        frames = video_embeds.reshape(v, tq // self.queries_per_frame, self.queries_per_frame * d)
        return self.head(frames.float()).view(v, -1, 3, len(self.names))

    def loss(self, video_embeds: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        """``present`` [V, T, C] in {0, 1}; ``xy`` [V, T, C, 2]."""
        present, xy = targets["present"], targets["xy"]
        out = self.predict(video_embeds)  # [V, T, 3, C]
        loss = F.binary_cross_entropy_with_logits(out[:, :, 0], present)
        shown = present > 0
        if shown.any():  # positions only of the balls a frame shows
            loss = loss + (out[:, :, 1:].permute(0, 1, 3, 2)[shown] - xy[shown]).abs().mean()
        return loss

    def save(self, directory: Path) -> None:
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, Path(directory) / HEAD_FILE,
                  metadata={"names": json.dumps(self.names)})

    def load(self, directory: Path) -> bool:
        """Continue a previous stage's head (same balls and shapes); False if there is none."""
        path = Path(directory) / HEAD_FILE
        if not path.is_file():
            return False
        with safe_open(str(path), "pt") as f:
            names = json.loads((f.metadata() or {}).get("names", "[]"))
        state = load_file(path)
        mine = self.state_dict()
        if names != self.names or set(state) != set(mine) or any(state[k].shape != v.shape for k, v in mine.items()):
            log.warning("%s: a frame-facts head for other balls or sizes; starting a fresh one", path)
            return False
        self.load_state_dict(state)
        return True
