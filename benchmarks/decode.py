"""Time to get the model's 12 frames from a long video, against decoding every frame; and a
one-hour 1080p file read in 10 segments.

Generates (once, cached) a 60 s 1080p H.264 clip at 30 fps -- with a 1 s keyframe interval as
cameras and phones write, and with x264's default interval (up to 250 frames) -- then times
``decode_video`` (the strategy it picks) and a full decode of all frames. The hour is 60 copies
of a 60 s clip (without the sensor noise) joined without re-encoding (108,000 frames); it is read as a request for 120
frames would be (10 segments of 12): the demux pass, then the frames, seeking to each, with the
peak memory of a fresh process doing only that.

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


def make_clip(path: Path, gop: int | None, noise: bool = True) -> Path:
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
        stream.options = {"preset": "ultrafast", "crf": "23" if noise else "26", **({"g": str(gop)} if gop else {})}
        for t in tqdm(range(FPS * SECONDS), desc=f"encoding {path.name}", unit="frame"):
            frame = background.copy()
            for k in range(6):  # balls crossing the frame
                x = int((k * 300 + t * (4 + k)) % W)
                y = int(H / 2 + np.sin(t / 20 + k) * H / 3)
                frame[max(0, y - 30):y + 30, max(0, x - 30):x + 30] = (255, 255 - 40 * k, 40 * k)
            if noise:
                frame[rng.integers(0, H, 2000), rng.integers(0, W, 2000)] = 255  # sensor noise
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    tmp.rename(path)
    return path


def make_hour(path: Path, source: Path, copies: int = 60) -> Path:
    """``copies`` of ``source`` one after another, packets copied (no re-encoding)."""
    if path.exists():
        return path
    tmp = path.with_suffix(".part.mp4")
    with av.open(str(source)) as first:
        stream = first.streams.video[0]
        span = max(p.pts for p in first.demux(stream) if p.pts is not None) + (stream.duration or 0) // max(
            1, stream.frames or 1)
    with av.open(str(tmp), "w") as out:
        with av.open(str(source)) as template:
            target = out.add_stream_from_template(template.streams.video[0])
        for k in tqdm(range(copies), desc=f"joining {path.name}", unit="minute"):
            with av.open(str(source)) as container:
                stream = container.streams.video[0]
                for packet in container.demux(stream):
                    if packet.dts is None:
                        continue
                    packet.pts += k * span
                    packet.dts += k * span
                    packet.stream = target
                    out.mux(packet)
    tmp.rename(path)
    return path


def read_hour(path: str, segments: int, queue) -> None:
    """In a fresh process: demux pass, plan, decode; report times and peak RSS."""
    import time

    from hilight.sampling import Sampling
    from hilight.video import decode_frames, plan_video, probe_video

    cfg = VideoInputConfig()
    start = time.perf_counter()
    index = probe_video(path, cfg)
    probe_s = time.perf_counter() - start
    _, planned = plan_video(path, cfg, Sampling(num_frames=segments * cfg.num_frames), index)
    start = time.perf_counter()
    decoded = decode_frames(path, index, [i for s in planned for i in s.indices], cfg)
    decode_s = time.perf_counter() - start
    rss = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
               if line.startswith("VmHWM:"))
    queue.put({"frames_in_file": len(index.pts), "duration_s": round(index.duration, 1), "segments": len(planned),
               "frames_read": len(decoded.indices), "strategy": decoded.strategy, "demux_pass_s": probe_s,
               "decode_s": decode_s, "total_s": probe_s + decode_s, "peak_rss_mib": rss / 1024})


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
    # the hour at a camera's bitrate (no per-frame sensor noise: about 1 GB an hour, not 11)
    minute = make_clip(args.cache / "1080p-60s-gop_1s-clean.mp4", FPS, noise=False)
    hour = make_hour(args.cache / "1080p-60min-gop_1s.mp4", minute)
    import multiprocessing

    runs = []
    for _ in range(args.repeats):
        context = multiprocessing.get_context("spawn")
        queue = context.Queue()
        child = context.Process(target=read_hour, args=(str(hour), 10, queue))
        child.start()
        runs.append(queue.get(timeout=600))
        child.join()
    row = sorted(runs, key=lambda r: r["total_s"])[len(runs) // 2]  # the median run
    row["file_gb"] = round(hour.stat().st_size / 2**30, 2)
    row["total_s_runs"] = [round(r["total_s"], 2) for r in runs]
    results["hour_1080p_10_segments"] = row
    print(f"1 h 1080p ({row['frames_in_file']} frames, {row['file_gb']} GB): {row['segments']} segments, "
          f"{row['frames_read']} frames: demux pass {row['demux_pass_s']:.2f} s + decode {row['decode_s']:.2f} s "
          f"({row['strategy']}) = {row['total_s']:.2f} s; peak RSS {row['peak_rss_mib']:.0f} MiB")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
