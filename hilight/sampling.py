"""Which frames of a video the model sees, chosen per request, and long videos in segments.

With no options a video is read as the model's own ``T`` frames over the whole clip, exactly
as the model was trained. A request may ask for a time range (``start``/``end``), a frame
count (``num_frames``) or a rate (``fps``, with ``max_frames`` as a cap). The towers and
TokenMining always take ``T`` frames at a time (CLIP-ViP's temporal embedding has ``T``
slots), so more than ``T`` frames become several ``T``-frame **segments**, consecutive in
time; each goes through the towers and TokenMining exactly as a whole clip would, and the
LLM reads them in order, each after a text marker with its time span (``[0:30-1:00]``).

The rules, over the frames inside the asked range (every frame, when none is asked):

- no count and no rate: ``T`` frames by the model's own rule (one segment);
- ``num_frames`` N <= T: N frames spread uniformly, each shown ``T / N`` times (one segment);
- N > T: ``ceil(N / T) * T`` frames spread uniformly (N rounded up to whole segments), cut
  into segments of ``T`` in time order;
- ``fps`` F: the frames nearest to ``0, 1/F, 2/F ...`` seconds inside the range, in segments
  aligned to that grid from the video's start (segment j: grid frames ``jT ... jT+T-1``), so a
  follow-up at the same rate over another range reuses every segment both cover; more than
  ``max_frames`` of them: ``max_frames`` spread over the range as for ``num_frames``.

A still image (or any one-frame file) is one segment of its one frame, whatever is asked.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from hilight.errors import ConfigError, VideoError

MAX_FRAMES = 1024  # frames one video may be read as (the context usually allows far fewer)
FIELDS = ("num_frames", "fps", "max_frames", "start", "end")
ALIASES = {"nframes": "num_frames", "video_start": "start", "video_end": "end", "start_time": "start",
           "end_time": "end"}  # the names other video-LLM servers use
_TIME = re.compile(r"^(?:(\d+):)?(?:(\d+):)?(\d+(?:\.\d*)?)$")


def parse_time(value: str | float | int, name: str = "time") -> float:
    """Seconds from ``90``, ``90.5``, ``"1:30"``, ``"1:02:03.5"``."""
    if isinstance(value, bool):
        raise ConfigError(f"{name}: {value!r} is not a time")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _TIME.match(str(value).strip())
        if not match:
            raise ConfigError(f"{name}: {value!r} is not a time (seconds, M:SS or H:MM:SS)")
        first, second, rest = match.groups()
        hours, minutes = (first, second) if second is not None else (None, first)
        if (minutes is not None and float(rest) >= 60) or (hours is not None and int(minutes) >= 60):
            raise ConfigError(f"{name}: {value!r} is not a time (at most 59 minutes or seconds after a colon)")
        seconds = int(hours or 0) * 3600 + int(minutes or 0) * 60 + float(rest)
    if not math.isfinite(seconds) or seconds < 0:
        raise ConfigError(f"{name}: {value!r} is not a time >= 0")
    return seconds


def format_time(seconds: float, tenths: bool = False) -> str:
    """``75.0`` -> ``1:15``; ``3725`` -> ``1:02:05``; with ``tenths``, ``3.25`` -> ``0:03.2``."""
    if tenths:
        minutes, rest = divmod(round(seconds * 10) / 10, 60)
        return f"{int(minutes)}:{rest:04.1f}"
    total = int(round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


@dataclass(frozen=True)
class Sampling:
    """Per-request frame choice; every field ``None`` is the model's own (see the module doc)."""

    num_frames: int | None = None
    fps: float | None = None
    max_frames: int | None = None
    start: float | None = None
    end: float | None = None

    def __post_init__(self) -> None:
        for name in ("num_frames", "max_frames"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(f"{name} must be a whole number, got {value!r}")
            if value is not None and not 1 <= value <= MAX_FRAMES:
                raise ConfigError(f"{name} must be between 1 and {MAX_FRAMES}, got {value}")
        if self.fps is not None and (isinstance(self.fps, bool) or not isinstance(self.fps, int | float)
                                     or not math.isfinite(self.fps) or self.fps <= 0):
            raise ConfigError(f"fps must be a number > 0, got {self.fps!r}")
        if self.num_frames is not None and self.fps is not None:
            raise ConfigError("give num_frames or fps, not both")
        if self.max_frames is not None and self.fps is None:
            raise ConfigError("max_frames caps fps sampling: give it with fps")
        for name in ("start", "end"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int | float) or not math.isfinite(value) or value < 0):
                raise ConfigError(f"{name} must be a time >= 0, got {value!r}")
        if self.start is not None and self.end is not None and self.end <= self.start:
            raise ConfigError(f"the range ends ({format_time(self.end)}) before it starts ({format_time(self.start)})")

    @property
    def is_default(self) -> bool:
        return self == Sampling()

    @classmethod
    def from_options(cls, options: Mapping | None, where: str = "video options") -> Sampling:
        """From a request's options (``num_frames``, ``fps``, ``max_frames``, ``start``,
        ``end``; times as seconds or ``"M:SS"``; other servers' names such as ``nframes`` and
        ``video_start`` too). An unknown option is refused, never ignored."""
        if options is None:
            return cls()
        if not isinstance(options, Mapping):
            raise ConfigError(f"{where} must be an object, got {type(options).__name__}")
        values: dict = {}
        for key, value in options.items():
            name = ALIASES.get(key, key)
            if name not in FIELDS:
                raise ConfigError(f"{where}: unknown option {key!r} (known: {', '.join(FIELDS)})")
            if value is None:
                continue
            if name in values:
                raise ConfigError(f"{where}: {name} is given twice")
            if name in ("start", "end"):
                value = parse_time(value, name)
            elif name == "fps" and isinstance(value, str):
                raise ConfigError(f"{where}: fps must be a number, got {value!r}")
            values[name] = value
        return cls(**values)

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class Clip:
    """A video (or still image) file and how to sample it: the model's own way by default."""

    path: Path
    sampling: Sampling = Sampling()

    def __str__(self) -> str:
        return str(self.path)


def as_clip(video: str | Path | Clip) -> Clip:
    return video if isinstance(video, Clip) else Clip(Path(video))


def record_sampling(record: dict, count: int) -> list[Sampling]:
    """The sampling of each of a training or evaluation record's ``count`` videos: its
    ``sampling`` field, one object for all of them or a list with one per video (absent: the
    model's own)."""
    value = record.get("sampling")
    if value is None:
        return [Sampling()] * count
    if isinstance(value, list):
        if len(value) != count:
            raise ConfigError(f"'sampling' has {len(value)} entries for {count} video(s)")
        return [Sampling.from_options(v, where="sampling") for v in value]
    return [Sampling.from_options(value, where="sampling")] * count


@dataclass(frozen=True)
class Segment:
    """``T`` frames shown to the towers together: indices into the stream's frames
    (presentation order, repeats allowed), and the span of time the segment stands for."""

    indices: tuple[int, ...]
    start: float
    end: float


def plan_segments(times: list[float], frames_per_segment: int, sampling: Sampling, default: list[int],
                  path) -> list[Segment]:
    """The segments of a video whose frames are at ``times`` (seconds, sorted), for
    ``sampling``; ``default`` is the model's own choice of T frames (used when nothing is asked).
    A range outside the video or without frames raises :class:`VideoError` naming ``path``."""
    n, t = len(times), frames_per_segment
    times = np.asarray(times, dtype=np.float64)  # searched many times below
    duration = float(times[-1])
    if n == 1 or sampling.is_default:
        return [Segment(tuple(default), 0.0, duration)]
    start = 0.0 if sampling.start is None else sampling.start
    step = duration / (n - 1)  # the mean frame interval: how far past the last frame a range may end
    if start > duration:
        raise VideoError(path, f"the range starts at {format_time(start, True)}, after the end of the video "
                               f"({format_time(duration, True)})")
    end = duration if sampling.end is None else sampling.end
    if end > duration + max(0.5, 2 * step):
        raise VideoError(path, f"the range ends at {format_time(end, True)}, after the end of the video "
                               f"({format_time(duration, True)})")
    end = min(end, duration)
    lo = int(np.searchsorted(times, start - 1e-6, side="left"))
    hi = int(np.searchsorted(times, end + 1e-6, side="right"))
    if hi <= lo:
        raise VideoError(path, f"no frame between {format_time(start, True)} and {format_time(end, True)}")
    inside = hi - lo
    if sampling.fps is not None:
        grid = _on_grid(times, start, end, sampling.fps, t, sampling.max_frames)
        if grid is not None:
            return grid
        wanted = sampling.max_frames or 1  # over the cap (or under one frame): spread over the range
    else:
        wanted = sampling.num_frames or t  # a range alone: the model's frame count over it
    if wanted <= t:
        distinct = [lo + i for i in _spread(inside, wanted)]
        return [Segment(tuple(distinct[k] for k in _spread(wanted, t)), start, end)]
    count = -(-wanted // t)
    picks = [lo + i for i in _spread(inside, count * t)]
    chunks = [picks[k * t:(k + 1) * t] for k in range(count)]
    bounds = [start] + [float(times[c[0]]) for c in chunks[1:]] + [end]
    return [Segment(tuple(c), bounds[k], bounds[k + 1]) for k, c in enumerate(chunks)]


def _on_grid(times: np.ndarray, start: float, end: float, fps: float, t: int,
             max_frames: int | None) -> list[Segment] | None:
    """Frames at ``k / fps`` seconds (from the video's start) inside the range, each the nearest
    frame; segment ``j`` holds grid frames ``j*T ... j*T + T - 1``, so two requests at the same
    rate share every segment both cover whole (cached once); a segment cut by the range's ends
    shows its frames repeated to T. None if the grid has no frame in the range, or more than
    ``max_frames``."""
    first, last = math.ceil(start * fps - 1e-6), math.floor(end * fps + 1e-6)
    if last < first or (max_frames is not None and last - first + 1 > max_frames):
        return None
    nearest = _nearest(times, np.arange(first, last + 1) / fps)  # grid frame first + i -> frame index
    segments = []
    for j in range(first // t, last // t + 1):
        lo, hi = max(first, j * t), min(last, j * t + t - 1)
        frames = nearest[lo - first:hi - first + 1]
        span = (max(start, j * t / fps), min(end, (j + 1) * t / fps))
        segments.append(Segment(tuple(int(frames[i]) for i in _spread(len(frames), t)), *span))
    return segments


def _nearest(times: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """The index of the frame nearest to each target time (the earlier one on a tie)."""
    right = np.clip(np.searchsorted(times, targets), 0, len(times) - 1)
    left = np.clip(right - 1, 0, len(times) - 1)
    return np.where(np.abs(times[left] - targets) <= np.abs(times[right] - targets), left, right)


def _spread(available: int, wanted: int) -> list[int]:
    """The original's rule, ``linspace(0, n - 1, k)`` truncated to int."""
    return np.linspace(0, available - 1, wanted).astype(int).tolist()


def segment_label(segment: Segment, duration: float) -> str:
    """The text marker before a segment's tokens: ``[0:30-1:00]`` (tenths of a second for a
    video under a minute: ``[0:03.0-0:06.5]``)."""
    tenths = duration < 60
    return f"[{format_time(segment.start, tenths)}-{format_time(segment.end, tenths)}]"
