"""Time to get the model's 12 frames from a long video, against decoding every frame.

Generates (once, cached) a 60 s 1080p H.264 clip at 30 fps -- with a 1 s keyframe interval as
cameras and phones write, and with x264's default interval (up to 250 frames) -- then times
``decode_video`` (the strategy it picks) and a full decode of all frames.

    .venv/bin/python benchmarks/decode.py [--repeats 3] [--out benchmarks/results/decode.json]
"""

from __future__ import annotations

import argparse
import json
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from common import median_time
from tqdm import tqdm

from hilight.config import VideoInputConfig
from hilight.video import decode_video

W, H, FPS, SECONDS = 1920, 1080, 30, 60


def make_clip(path: Path, gop: int | None) -> Path:
    if path.exists():
        return path
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:H, 0:W]
    background = np.stack([(xx * 80 // W + 20), (yy * 120 // H + 60), np.full_like(xx, 40)], -1).astype(np.uint8)
    background[::8, ::8] = rng.integers(0, 255, (H // 8, W // 8, 3), dtype=np.uint8)  # cloth texture
    tmp = path.with_suffix(".part.mp4")
    with av.open(str(tmp), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(FPS))
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "23", **({"g": str(gop)} if gop else {})}
        for t in tqdm(range(FPS * SECONDS), desc=f"encoding {path.name}", unit="frame"):
            frame = background.copy()
            for k in range(6):  # balls crossing the frame
                x = int((k * 300 + t * (4 + k)) % W)
                y = int(H / 2 + np.sin(t / 20 + k) * H / 3)
                frame[max(0, y - 30):y + 30, max(0, x - 30):x + 30] = (255, 255 - 40 * k, 40 * k)
            frame[rng.integers(0, H, 2000), rng.integers(0, W, 2000)] = 255  # sensor noise
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    tmp.rename(path)
    return path


def decode_everything(path: Path) -> int:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        return sum(1 for _ in container.decode(stream))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=Path("benchmarks/.cache"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/decode.json"))
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    cfg = VideoInputConfig()
    results = {}
    for label, gop in (("gop_1s", FPS), ("gop_x264_default", None)):
        path = make_clip(args.cache / f"1080p-60s-{label}.mp4", gop)
        video = decode_video(path, cfg)
        row = {
            "file_mb": round(path.stat().st_size / 2**20, 1),
            "frames": video.total_frames,
            "strategy": video.strategy,
            "twelve_frames_s": median_time(lambda p=path: decode_video(p, cfg), args.repeats, warmup=False),
            "seek_s": median_time(lambda p=path: decode_video(p, cfg, "seek"), args.repeats, warmup=False),
            "decode_all_s": median_time(lambda p=path: decode_everything(p), 1, warmup=False),
        }
        row["speedup"] = row["decode_all_s"] / row["twelve_frames_s"]
        results[label] = row
        print(f"{label}: {row['frames']} frames, {row['file_mb']} MB; 12 frames by {row['strategy']}: "
              f"{row['twelve_frames_s']:.2f} s (seek {row['seek_s']:.2f} s); decode all: "
              f"{row['decode_all_s']:.2f} s -> {row['speedup']:.1f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
