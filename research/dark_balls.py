"""What the towers are given to see of each ball: its contrast with the cloth around it, in the
frames exactly as the model receives them, per ball colour and cloth.

The aligned towers miss the dark balls (maroon and black make half of the ball-frames whose
presence the video tower's read-out gets wrong, the research log of 2026-12-01). This script
asks whether the pixels hold them at all: for every ball in every shown frame of a split's
clips, the mean colour of the ball's disc against the ring of cloth around it (in 8-bit
levels, after the resize the model's input makes), and at patch level, what the tower's patch
embedding starts from: the patch holding the ball's centre against the median of its eight
neighbours, set beside the same statistic on patches of bare cloth (the floor that lighting and
sensor noise give). Run for the recipe's input (112 px, 8-px patches) and run 7's (224 px,
16-px patches) with ``--sizes``.

    .venv/bin/python research/dark_balls.py --data RUN/data [--split val] [--sizes 112:8 224:16] \
        [--out benchmarks/results/dark-balls.json]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from hilight.checkpoint import read_config
from hilight.config import VideoInputConfig
from hilight.recipes.billiards_small.facts import shown_positions
from hilight.video import load_video


def frames_rgb(path: Path, cfg: VideoInputConfig) -> np.ndarray:
    """[T, S, S, 3] in 8-bit levels, as the towers see the clip (resized, before normalising)."""
    x = load_video(path, cfg)
    mean, std = torch.tensor(cfg.mean).view(1, 3, 1, 1), torch.tensor(cfg.std).view(1, 3, 1, 1)
    return ((x * std + mean) * 255).permute(0, 2, 3, 1).numpy()


def patch_means(frame: np.ndarray, patch: int) -> np.ndarray:
    s = frame.shape[0] // patch
    return frame[: s * patch, : s * patch].reshape(s, patch, s, patch, 3).mean(axis=(1, 3))


def neighbour_contrast(means: np.ndarray, i: int, j: int) -> float | None:
    """The patch (i, j) against the median of its neighbours inside the grid."""
    s = means.shape[0]
    around = [means[a, b] for a in range(i - 1, i + 2) for b in range(j - 1, j + 2)
              if (a, b) != (i, j) and 0 <= a < s and 0 <= b < s]
    return float(np.linalg.norm(means[i, j] - np.median(around, axis=0))) if len(around) >= 5 else None


def measure(data: Path, split: str, cfg: VideoInputConfig, patch: int, limit: int) -> dict:
    truth = json.loads((data / f"{split}-truth.json").read_text())
    captions = json.loads((data / f"{split}-captions.json").read_text())[:limit]
    disc, cell, floor = defaultdict(list), defaultdict(list), defaultdict(list)
    size = cfg.image_size
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    # the playing area: where the balls' centres go in the split's clips; a bare-cloth patch has
    # its whole 3 x 3 neighbourhood inside it (no rail, cushion or pocket in its statistic)
    xy = np.concatenate([np.asarray(c["tracks"]["xy"]).reshape(-1, 2) for c in captions])
    xy = xy[xy[:, 0] >= 0] * size
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    s = size // patch
    inner = [(i, j) for i in range(1, s - 1) for j in range(1, s - 1)
             if lo[1] <= (i - 1) * patch and (i + 2) * patch <= hi[1]
             and lo[0] <= (j - 1) * patch and (j + 2) * patch <= hi[0]]
    for clip in tqdm(captions, desc=f"{size} px"):
        tracks, cloth = clip["tracks"], truth[clip["video"]]["cloth"]
        frames = frames_rgb(data / "videos" / clip["video"], cfg)
        xy = shown_positions(tracks, cfg).numpy()  # [T, N, 2] fractions of the frame
        r = tracks["radius"] * size
        for t, frame in enumerate(frames):
            means = patch_means(frame, patch)
            held = set()
            for n, name in enumerate(tracks["names"]):
                x, y = xy[t, n] * size
                if xy[t, n, 0] < 0:
                    continue
                d = np.hypot(xx - x, yy - y)
                inside, ring = d < r * 0.8, (d > r * 1.6) & (d < r * 3.0)
                if inside.sum() and ring.sum():
                    disc[(name, cloth)].append(float(np.linalg.norm(frame[inside].mean(0) - frame[ring].mean(0))))
                i, j = min(int(y // patch), means.shape[0] - 1), min(int(x // patch), means.shape[0] - 1)
                held.update((i + a, j + b) for a in (-1, 0, 1) for b in (-1, 0, 1))
                c = neighbour_contrast(means, i, j)
                if c is not None:
                    cell[(name, cloth)].append(c)
            for i, j in inner:  # bare cloth: inside the playing area, away from every ball
                if not {(i + a, j + b) for a in (-1, 0, 1) for b in (-1, 0, 1)} & held:
                    c = neighbour_contrast(means, i, j)
                    if c is not None:
                        floor[cloth].append(c)

    def summary(values: list[float]) -> dict:
        return {"n": len(values), "median": round(float(np.median(values)), 2),
                "p10": round(float(np.percentile(values, 10)), 2)}

    return {"image_size": size, "patch": patch, "ball_radius_px": round(float(np.median(
                [c["tracks"]["radius"] for c in captions])) * size, 2),
            "disc_vs_ring": {f"{b} on {c}": summary(v) for (b, c), v in sorted(disc.items())},
            "patch_vs_neighbours": {f"{b} on {c}": summary(v) for (b, c), v in sorted(cell.items())},
            "bare_cloth_floor": {c: {**summary(v), "p90": round(float(np.percentile(v, 90)), 2)}
                                 for c, v in sorted(floor.items())}}


def plot(results: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 5), squeeze=False)
    for ax, res in zip(axes[0], results, strict=True):
        keys = res["patch_vs_neighbours"]
        balls = sorted({k.split(" on ")[0] for k in keys})
        cloths = sorted({k.split(" on ")[1] for k in keys})
        grid = np.full((len(balls), len(cloths)), np.nan)
        for k, v in keys.items():
            b, c = k.split(" on ")
            floor = res["bare_cloth_floor"][c]["p90"]
            grid[balls.index(b), cloths.index(c)] = v["median"] / max(floor, 1e-6)
        im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=min(20, np.nanmax(grid)))
        ax.set_xticks(range(len(cloths)), cloths, rotation=30)
        ax.set_yticks(range(len(balls)), balls)
        for (a, b), v in np.ndenumerate(grid):
            if not np.isnan(v):
                ax.text(b, a, f"{v:.1f}", ha="center", va="center", color="w" if v < 6 else "k", fontsize=8)
        ax.set_title(f"{res['image_size']} px, {res['patch']}-px patches:\nball patch contrast / bare-cloth p90")
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="a billiards data set (RUN/data)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--clips", type=int, default=150, help="clips of the split to read")
    parser.add_argument("--sizes", nargs="+", default=["112:8", "224:16"], metavar="PIXELS:PATCH")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/dark-balls.json"))
    args = parser.parse_args()

    base = read_config(args.data.parent / "base").video  # the recipe's input: frames, resize, mean, std
    results = []
    for spec in args.sizes:
        size, patch = (int(v) for v in spec.split(":"))
        results.append(measure(args.data, args.split, replace(base, image_size=size), patch, args.clips))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    plot(results, args.out.with_suffix(".png"))
    for res in results:
        print(f"{res['image_size']} px, {res['patch']}-px patches (ball radius {res['ball_radius_px']} px):")
        for key, v in res["patch_vs_neighbours"].items():
            cloth = key.split(" on ")[1]
            print(f"  {key:22s} disc {res['disc_vs_ring'][key]['median']:6.1f}  patch {v['median']:5.1f} "
                  f"(p10 {v['p10']:5.1f}; bare cloth p90 {res['bare_cloth_floor'][cloth]['p90']:4.1f})")


if __name__ == "__main__":
    main()
