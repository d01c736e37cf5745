"""Video files to model-ready frames (PyAV), and frames back to video files.

``load_video(path, cfg)`` returns float32 ``[T, 3, S, S]``: T frames at the original's
indices ``linspace(0, n - 1, T)`` (truncated), resized straight to S x S with antialiased
bicubic interpolation and normalised with the CLIP mean/std. Every failure is a
:class:`VideoError` whose one-line message names the file and the reason.
"""

from __future__ import annotations

import logging
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F

from hilight.config import VideoInputConfig

log = logging.getLogger(__name__)


class VideoError(Exception):
    """A video cannot be read; ``str(err)`` is ``"<path>: <reason>"``."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def sample_indices(num_available: int, num_frames: int) -> list[int]:
    """The original's rule: ``linspace(0, n - 1, T)`` truncated to int (first and last frame
    included; short clips repeat frames)."""
    return np.linspace(0, num_available - 1, num_frames).astype(int).tolist()


def _open(path: Path) -> av.container.InputContainer:
    if not path.exists():
        raise VideoError(path, "no such file")
    if not path.is_file():
        raise VideoError(path, "not a regular file")
    if path.stat().st_size == 0:
        raise VideoError(path, "empty file (0 bytes)")
    try:
        return av.open(str(path))
    except av.FFmpegError as exc:
        raise VideoError(path, f"not a readable media file ({exc.strerror or exc.__class__.__name__})") from None


def read_frames(path: str | Path, num_frames: int) -> tuple[np.ndarray, list[float]]:
    """Decode the sampled frames: uint8 ``[T, H, W, 3]`` RGB and their timestamps in seconds."""
    path = Path(path)
    with _open(path) as container:
        if not container.streams.video:
            raise VideoError(path, "no video stream")
        stream = container.streams.video[0]
        got: dict[int, tuple[np.ndarray, float]] = {}
        try:
            # counted from the packets actually present, not from container metadata
            total = sum(1 for p in container.demux(stream) if p.size)
            if total == 0:
                raise VideoError(path, "no video frames")
            wanted = sample_indices(total, num_frames)
            keep = set(wanted)
            container.seek(0, stream=stream)
            stream.thread_type = "AUTO"
            for i, frame in enumerate(container.decode(stream)):
                if i in keep:
                    seconds = float(frame.time) if frame.time is not None else i / float(stream.average_rate or 1)
                    got[i] = (frame.to_ndarray(format="rgb24"), seconds)
                if i >= wanted[-1]:
                    break
        except av.FFmpegError as exc:
            if not got:
                reason = exc.strerror or exc.__class__.__name__
                raise VideoError(path, f"corrupt or undecodable video ({reason})") from None
            log.warning("%s: decoding stopped early (%s); using the frames decoded so far", path, exc)
    if not got:
        raise VideoError(path, "no decodable frames")
    if len(got) < len(keep):
        log.warning("%s: %d of %d sampled frames could not be decoded; repeating neighbours", path,
                    len(keep) - len(got), len(keep))
    decoded = sorted(got)
    frames, times = [], []
    for idx in wanted:
        nearest = min(decoded, key=lambda d: (abs(d - idx), d))
        frames.append(got[nearest][0])
        times.append(got[nearest][1])
    return np.stack(frames), times


def preprocess(frames: np.ndarray, cfg: VideoInputConfig) -> torch.Tensor:
    """uint8 ``[T, H, W, 3]`` -> normalised float32 ``[T, 3, S, S]`` (aspect not preserved,
    as in the original)."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0  # [T, 3, H, W]
    x = F.interpolate(x, size=(cfg.image_size, cfg.image_size), mode="bicubic", antialias=True, align_corners=False)
    mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std).view(1, 3, 1, 1)
    return (x - mean) / std


def load_video(path: str | Path, cfg: VideoInputConfig) -> torch.Tensor:
    """A video file as the towers' input ``[T, 3, S, S]``."""
    frames, _ = read_frames(path, cfg.num_frames)
    return preprocess(frames, cfg)


def write_video(path: str | Path, frames: np.ndarray, fps: int = 10, codec: str = "libx264") -> Path:
    """Encode uint8 ``[N, H, W, 3]`` RGB frames (even H and W for H.264) to ``path``."""
    path = Path(path)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"preset": "veryfast", "crf": "18"}
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
