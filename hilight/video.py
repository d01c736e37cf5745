"""Video files to model-ready frames (PyAV / FFmpeg), and frames back to video files.

``load_video(path, cfg)`` returns float32 ``[T, 3, S, S]`` for any container FFmpeg reads
(mp4, mov, mkv, webm, avi, animated GIF) and for still images (one frame, repeated):

1. One cheap demux pass (no decoding) lists every frame's presentation timestamp and the
   keyframes, so the frame count comes from the stream itself, not container metadata.
2. T frames are chosen (the original's ``linspace(0, n - 1, T)`` by default).
3. They are decoded either by seeking to the keyframe before each target and decoding forward,
   or by one sequential pass, whichever a cost model says decodes fewer frames.
4. Large frames are scaled by FFmpeg while decoding; display rotation (phone videos) is applied.
5. Antialiased bicubic resize to S x S and CLIP normalisation, as the original.

Every failure is a :class:`VideoError` whose one-line message names the file and the reason.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import os
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F

from hilight.config import VideoInputConfig
from hilight.errors import VideoError
from hilight.sampling import Sampling, Segment, plan_segments, segment_label

# file names that are videos (or stills, read as one-frame clips), for telling a path from a question
VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".gif", ".mpg", ".mpeg", ".ts", ".flv",
                            ".wmv", ".3gp", ".jpg", ".jpeg", ".png", ".webp", ".bmp"})

log = logging.getLogger(__name__)

MAX_PIXELS = 8192 * 8192  # larger frames are refused as absurd
SEEK_COST = 8  # a seek costs about as much as decoding this many frames
PRESCALE_FACTOR = 2  # FFmpeg shrinks frames larger than 2x this factor of S down to this factor x S


@dataclass
class DecodedVideo:
    frames: np.ndarray  # uint8 [T, H, W, 3] RGB, rotation applied
    timestamps: list[float]  # seconds, one per sampled frame
    indices: list[int]  # frame numbers in presentation order
    total_frames: int
    duration: float  # seconds
    strategy: str  # "seek" or "sequential"


@dataclass
class FrameIndex:
    """Presentation timestamps of every frame (sorted) and of the keyframes, from demuxing."""

    pts: list[int]
    keyframes: list[int]
    time_base: Fraction

    def seconds(self, pts: int) -> float:
        return float((pts - self.pts[0]) * self.time_base)

    @property
    def times(self) -> list[float]:
        """Every frame's time in seconds from the first."""
        return [self.seconds(p) for p in self.pts]

    @property
    def duration(self) -> float:
        return self.seconds(self.pts[-1])


def sample_indices(num_available: int, num_frames: int) -> list[int]:
    """The original's rule: ``linspace(0, n - 1, T)`` truncated to int (first and last frame
    included; short clips repeat frames)."""
    return np.linspace(0, num_available - 1, num_frames).astype(int).tolist()


def choose_frames(index: FrameIndex, cfg: VideoInputConfig) -> list[int]:
    """Indices (into ``index.pts``) of the T frames to show the model."""
    n, t = len(index.pts), cfg.num_frames
    if cfg.sampling == "uniform":
        return sample_indices(n, t)
    if cfg.sampling == "midpoint":
        return [min(n - 1, int((k + 0.5) * n / t)) for k in range(t)]
    # fps: T frames 1/fps apart, centred on the middle of the clip, nearest frame by time
    times = index.times
    span = (t - 1) / cfg.sample_fps
    if span >= times[-1]:
        return sample_indices(n, t)  # the clip is shorter than the window: spread over it all
    start = (times[-1] - span) / 2
    chosen = []
    for k in range(t):
        target = start + k / cfg.sample_fps
        i = bisect.bisect_left(times, target)
        chosen.append(min((j for j in (i - 1, i) if 0 <= j < n), key=lambda j: abs(times[j] - target)))
    return chosen


def _open(path: Path) -> av.container.InputContainer:
    if not path.exists():
        raise VideoError(path, "no such file")
    if not path.is_file():
        raise VideoError(path, "not a regular file")
    if path.stat().st_size == 0:
        raise VideoError(path, "empty file (0 bytes)")
    try:
        # a damaged file's metadata may not be text: read it with replacement characters
        return av.open(str(path), timeout=10.0, metadata_errors="replace")
    except av.FFmpegError as exc:
        raise VideoError(path, f"not a readable media file ({_why(exc)})") from None


def _why(exc: Exception) -> str:
    return getattr(exc, "strerror", None) or exc.__class__.__name__


class _Deadline:
    def __init__(self, path: Path, seconds: float):
        self.path, self.seconds, self.end = path, seconds, time.monotonic() + seconds

    def check(self) -> None:
        if time.monotonic() > self.end:
            raise VideoError(self.path, f"decoding took longer than {self.seconds:g} s; refused")


def _index_frames(container, stream, path: Path, deadline: _Deadline) -> FrameIndex:
    pts, keys = [], []
    try:
        for packet in container.demux(stream):
            deadline.check()
            if not packet.size:
                continue  # end-of-stream flush packet
            if packet.pts is None:
                raise VideoError(path, "frames without timestamps are not supported")
            pts.append(packet.pts)
            if packet.is_keyframe:
                keys.append(packet.pts)
    except av.FFmpegError as exc:
        if not pts:
            raise VideoError(path, f"corrupt or truncated data ({_why(exc)})") from None
        log.warning("%s: the stream is cut short after %d frames (%s)", path, len(pts), _why(exc))
    if not pts:
        raise VideoError(path, "the video stream holds no frames")
    pts.sort()
    keys.sort()
    if not keys or keys[0] > pts[0]:
        keys.insert(0, pts[0])  # decoding can always start from the first frame
    return FrameIndex(pts, keys, stream.time_base or Fraction(1, 1))


def _plan_cost(index: FrameIndex, targets: list[int]) -> tuple[int, int]:
    """Frames decoded by (seeking, sequential) for the sorted unique ``targets``."""
    seek_cost, pos = 0, None
    for i in targets:
        k = bisect.bisect_right(index.keyframes, index.pts[i]) - 1
        start = bisect.bisect_left(index.pts, index.keyframes[k])
        if pos is not None and pos <= i and i - pos <= i - start + SEEK_COST:
            seek_cost += i - pos  # keep decoding forward
        else:
            seek_cost += SEEK_COST + i - start + 1
        pos = i + 1
    return seek_cost, targets[-1] + 1


def _target_size(width: int, height: int, cfg: VideoInputConfig) -> tuple[int, int] | None:
    """Size FFmpeg should scale a frame to while decoding, or None to keep it."""
    s = cfg.image_size * PRESCALE_FACTOR
    if cfg.resize == "squash":
        if max(width, height) <= 2 * s:
            return None
        return min(width, s), min(height, s)
    short = min(width, height)
    if short <= 2 * s:
        return None
    return round(width * s / short), round(height * s / short)


def _to_rgb(frame: av.VideoFrame, cfg: VideoInputConfig) -> np.ndarray:
    size = _target_size(frame.width, frame.height, cfg)
    if size is None:
        image = frame.to_ndarray(format="rgb24")
    else:
        image = frame.reformat(width=size[0], height=size[1], format="rgb24", interpolation="AREA").to_ndarray()
    rotation = int(round((frame.rotation or 0) / 90)) % 4
    return np.ascontiguousarray(np.rot90(image, k=rotation)) if rotation else image


def _video_stream(container, path: Path):
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams})
        raise VideoError(path, f"no video stream (only {', '.join(kinds)})" if kinds else "no video stream")
    stream = container.streams.video[0]
    if stream.codec_context is None:
        raise VideoError(path, "no decoder for its video stream (damaged or an unsupported codec)")
    width, height = stream.codec_context.width, stream.codec_context.height
    if width <= 0 or height <= 0 or width * height > MAX_PIXELS:
        raise VideoError(path, f"frame size {width}x{height} is invalid or absurdly large")
    stream.thread_type = "AUTO"
    return stream


def _decode_sequential(container, stream, wanted: set[int], last: int, cfg, deadline) -> dict[int, tuple]:
    """Decode from the start; frame i of the output is the i-th in presentation order.
    On a decode error the frames decoded so far are kept (partially corrupt files)."""
    got = {}
    try:
        for i, frame in enumerate(container.decode(stream)):
            deadline.check()
            if i in wanted:
                got[i] = (_to_rgb(frame, cfg), frame.pts)
            if i >= last:
                break
    except av.FFmpegError as exc:
        log.warning("%s: decoding stopped early (%s); keeping %d frame(s)", deadline.path, _why(exc), len(got))
    return got


def _decode_seeking(container, stream, index: FrameIndex, targets: list[int], cfg, deadline) -> dict[int, tuple]:
    got: dict[int, tuple] = {}
    frames = None
    pos = None  # index of the next frame the open decoder will produce
    for i in targets:
        k = bisect.bisect_right(index.keyframes, index.pts[i]) - 1
        start = bisect.bisect_left(index.pts, index.keyframes[k])
        if frames is None or pos is None or pos > i or i - pos > i - start + SEEK_COST:
            container.seek(index.keyframes[k], stream=stream, backward=True)
            frames = container.decode(stream)
        for frame in frames:
            deadline.check()
            if frame.pts is None or frame.pts < index.pts[i]:
                continue
            got[i] = (_to_rgb(frame, cfg), frame.pts)
            pos = bisect.bisect_right(index.pts, frame.pts)
            break
        else:
            frames, pos = None, None
    return got


def probe_video(path: str | Path, cfg: VideoInputConfig) -> FrameIndex:
    """Every frame's timestamp and the keyframes of ``path``, from one demux pass (no decoding)."""
    path = Path(path)
    deadline = _Deadline(path, cfg.max_decode_seconds)
    with _damage_is_a_video_error(path), _open(path) as container:
        return _index_frames(container, _video_stream(container, path), path, deadline)


@contextlib.contextmanager
def _damage_is_a_video_error(path: Path):
    """What the demuxer or decoder raises on damaged data (in the file's metadata, its stream
    headers, its packets) is the file's fault: a VideoError naming it, the details logged."""
    try:
        yield
    except VideoError:
        raise
    except (av.FFmpegError, UnicodeError, AttributeError, TypeError, ValueError, IndexError, OverflowError) as exc:
        log.debug("reading %s", path, exc_info=True)
        raise VideoError(path, f"damaged or not a readable media file ({type(exc).__name__})") from None


def decode_video(path: str | Path, cfg: VideoInputConfig, strategy: str = "auto") -> DecodedVideo:
    """Decode the T sampled frames of ``path`` (uint8 RGB, maybe pre-scaled by FFmpeg).

    ``strategy`` is ``auto`` (cheapest by the cost model), ``seek`` or ``sequential``.
    """
    index = probe_video(path, cfg)
    return decode_frames(path, index, choose_frames(index, cfg), cfg, strategy)


def decode_frames(path: str | Path, index: FrameIndex, chosen: list[int], cfg: VideoInputConfig,
                  strategy: str = "auto") -> DecodedVideo:
    """Decode the frames ``chosen`` (indices into ``index.pts``, repeats allowed) of ``path``,
    seeking or in one pass, whichever decodes fewer frames."""
    path = Path(path)
    with _damage_is_a_video_error(path):
        return _decode_frames(path, index, chosen, cfg, strategy)


def _decode_frames(path: Path, index: FrameIndex, chosen: list[int], cfg: VideoInputConfig,
                   strategy: str) -> DecodedVideo:
    deadline = _Deadline(path, cfg.max_decode_seconds)
    targets = sorted(set(chosen))
    seek_cost, seq_cost = _plan_cost(index, targets)
    if strategy == "auto":
        strategy = "seek" if seek_cost < seq_cost else "sequential"
    got: dict[int, tuple] = {}
    if strategy == "seek":
        try:
            with _open(path) as container:
                got = _decode_seeking(container, _video_stream(container, path), index, targets, cfg, deadline)
        except av.FFmpegError as exc:
            log.warning("%s: seeking failed (%s); decoding sequentially", path, _why(exc))
            strategy = "sequential"
    if strategy == "sequential":
        with _open(path) as container:
            got = _decode_sequential(container, _video_stream(container, path), set(targets), targets[-1],
                                     cfg, deadline)
    if not got:
        raise VideoError(path, "no frame could be decoded (corrupt data or unsupported codec)")
    missing = [i for i in targets if i not in got]
    if missing:
        log.warning("%s: %d of %d sampled frames could not be decoded; using their nearest neighbours",
                    path, len(missing), len(targets))
    decoded = sorted(got)
    picks = [min(decoded, key=lambda d: (abs(d - i), d)) for i in chosen]
    return DecodedVideo(
        frames=np.stack([got[d][0] for d in picks]),
        timestamps=[index.seconds(index.pts[d] if got[d][1] is None else got[d][1]) for d in picks],
        indices=picks,
        total_frames=len(index.pts),
        duration=index.seconds(index.pts[-1]),
        strategy=strategy,
    )


def preprocess(frames: np.ndarray, cfg: VideoInputConfig) -> torch.Tensor:
    """uint8 ``[T, H, W, 3]`` -> normalised float32 ``[T, 3, S, S]``."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0  # [T, 3, H, W]
    s = cfg.image_size
    if cfg.resize == "squash":
        size = (s, s)  # the original: aspect ratio not preserved
    else:
        h, w = x.shape[-2:]
        size = (max(s, round(h * s / min(h, w))), max(s, round(w * s / min(h, w))))
    x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
    if cfg.resize == "center_crop":
        top, left = (x.shape[-2] - s) // 2, (x.shape[-1] - s) // 2
        x = x[..., top:top + s, left:left + s]
    mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std).view(1, 3, 1, 1)
    return (x - mean) / std


def to_uint8(pixels: torch.Tensor, cfg: VideoInputConfig) -> np.ndarray:
    """Undo :func:`preprocess` normalisation: ``[T, 3, S, S]`` -> uint8 ``[T, S, S, 3]``."""
    mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std).view(1, 3, 1, 1)
    x = (pixels * std + mean).clamp(0, 1) * 255
    return x.round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def load_video(path: str | Path, cfg: VideoInputConfig) -> torch.Tensor:
    """A video (or image) file as the towers' input ``[T, 3, S, S]``."""
    return preprocess(decode_video(path, cfg).frames, cfg)


def plan_video(path: str | Path, cfg: VideoInputConfig, sampling: Sampling | None = None,
               index: FrameIndex | None = None) -> tuple[FrameIndex, list[Segment]]:
    """The segments of ``path`` the model sees for ``sampling`` (a demux pass unless ``index``
    is given; nothing is decoded)."""
    index, sampling = index or probe_video(path, cfg), sampling or Sampling()
    return index, plan_segments(index.times, cfg.num_frames, sampling, choose_frames(index, cfg), path)


def contact_sheet(path: str | Path, cfg: VideoInputConfig, sampling: Sampling | None = None, columns: int = 4):
    """A PIL image of the sampled frames exactly as the model sees them (after resizing),
    each labelled with its frame number and timestamp; a video read in several segments gets
    one row per segment, headed by the segment's time-span marker."""
    from PIL import Image, ImageDraw, ImageFont

    sampling = sampling or Sampling()
    index, segments = plan_video(path, cfg, sampling)
    decoded = decode_frames(path, index, [i for s in segments for i in s.indices], cfg)
    frames = to_uint8(preprocess(decoded.frames, cfg), cfg)  # [N, S, S, 3]
    per_row = columns if len(segments) == 1 else cfg.num_frames
    heads = [""] if len(segments) == 1 else [segment_label(s, index.duration) + "  " for s in segments]
    tile, label, gap = max(cfg.image_size, 160), 22, 6
    rows_per_segment = -(-len(segments[0].indices) // per_row)
    rows = rows_per_segment * len(segments)
    head = 0 if len(segments) == 1 else 16
    sheet = Image.new("RGB", (per_row * (tile + gap) + gap, rows * (tile + label) + label + head * len(segments)),
                      "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=14)
    what = "the model's own sampling" if sampling.is_default else ", ".join(f"{k}={v}" for k, v in
                                                                              sampling.to_json().items())
    draw.text((4, 3), f"{Path(path).name}: {decoded.total_frames} frames, {decoded.duration:.2f} s, {what}, "
                      f"{len(segments)} segment(s), {decoded.strategy} decode", fill="black", font=font)
    k = 0
    for n, segment in enumerate(segments):
        top = label + n * (rows_per_segment * (tile + label) + head)
        if head:
            draw.text((4, top), heads[n], fill="black", font=font)
        for j in range(len(segment.indices)):
            image, idx, ts = frames[k], decoded.indices[k], decoded.timestamps[k]
            x, y = gap + (j % per_row) * (tile + gap), top + head + (j // per_row) * (tile + label)
            sheet.paste(Image.fromarray(image).resize((tile, tile), Image.NEAREST), (x, y))
            draw.text((x + 4, y + tile + 3), f"#{idx}  t={ts:.2f}s", fill="black", font=font)
            k += 1
    return sheet


def rgb_to_yuv420p(image: np.ndarray) -> np.ndarray:
    """uint8 RGB [H, W, 3] -> planar YUV 4:2:0 [H*3/2, W] (BT.601, limited range).

    Done in numpy because FFmpeg's RGB -> YUV conversion gave slightly different output from
    run to run here, and the same seed must give the same video bytes."""
    x = image.astype(np.float32)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    y = 16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255
    cb = 128 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255
    cr = 128 + (112.0 * r - 93.786 * g - 18.214 * b) / 255
    h, w = y.shape

    def half(c: np.ndarray) -> np.ndarray:
        return c.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))  # [H/2, W/2]

    planes = np.concatenate([y.reshape(-1), half(cb).reshape(-1), half(cr).reshape(-1)])
    return np.clip(np.round(planes), 0, 255).astype(np.uint8).reshape(h * 3 // 2, w)


def write_video(path: str | Path, frames: np.ndarray, fps: float = 10, codec: str = "libx264",
                pix_fmt: str = "yuv420p", options: dict[str, str] | None = None,
                container_options: dict[str, str] | None = None) -> Path:
    """Encode uint8 ``[N, H, W, 3]`` RGB frames to ``path`` (the container follows the suffix).
    ``options`` go to the encoder, ``container_options`` to the muxer (e.g. ``movflags``). The
    file appears whole or not at all: it is written beside ``path`` and renamed when complete,
    so an interrupted writer never leaves (or half-overwrites) a clip."""
    path = Path(path)
    partial = path.with_name(f".{path.stem}.partial{os.getpid()}{path.suffix}")
    try:
        _encode(partial, frames, fps, codec, pix_fmt, options, container_options)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def _encode(path: Path, frames: np.ndarray, fps: float, codec: str, pix_fmt: str, options: dict[str, str] | None,
            container_options: dict[str, str] | None) -> None:
    with av.open(str(path), mode="w", options=container_options or {}) as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = pix_fmt
        if codec == "libx264":
            # one thread: x264's output depends on its thread count (and varied between runs with
            # several), and the same frames must give the same bytes on every machine
            stream.options = {"preset": "veryfast", "crf": "18", "threads": "1", **(options or {})}
        elif options:
            stream.options = options
        exact = pix_fmt == "yuv420p" and frames.shape[1] % 2 == 0 and frames.shape[2] % 2 == 0
        for image in frames:
            frame = (av.VideoFrame.from_ndarray(rgb_to_yuv420p(image), format="yuv420p") if exact
                     else av.VideoFrame.from_ndarray(image, format="rgb24"))
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
