"""How sharp does alignment make the video tower? Align it alone, cache its features, read it out.

Aligns a checkpoint's video tower exactly as ``hilight recipe billiards-small`` does (``hilight.recipe.align_config``:
CLIP-ViP+ losses plus frame facts, bf16 autocast) on a finished recipe run's data, for any number of
steps, caches its outputs for the training and test clips, and runs ``tower_rules.py`` on them:
the geometry rules on a linear read-out of its patch tokens. No TokenMining or LLM, so a tower
setting (steps, resolution, patch size) is judged in the alignment time plus about three minutes.

    .venv/bin/hilight init --preset billiards-small --tokenizer runs/recipe/base --out runs/p2/base \\
        --set video_tower.image_size=224 video_tower.patch_size=16 image_tower.image_size=224 \\
        image_tower.patch_size=16 video.image_size=224
    .venv/bin/python benchmarks/align_readout.py --run runs/recipe --base runs/p2/base --steps 1200 --out runs/p2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from hilight.align import align
from hilight.checkpoint import load_checkpoint
from hilight.data import FeatureCache, extract_features, read_records, record_videos, tower_identity
from hilight.recipe import RecipeBudget, align_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a recipe run: its data/ (with tracks) is used")
    parser.add_argument("--base", type=Path, help="the checkpoint whose video tower is aligned (default: the run's base/)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--position-weight", type=float, default=0.0, help="alignment's facts_position_weight")
    parser.add_argument("--frames", type=Path, help="decoded-frames cache (default: OUT/frames; share it between runs "
                                                    "at the same resolution)")
    args = parser.parse_args()
    data, base = args.run / "data", args.base or args.run / "base"
    cfg = align_config(base, "video", data, args.out / "align-video", args.frames or args.out / "frames", args.steps,
                       RecipeBudget(tower_position_weight=args.position_weight), seed=0)
    seconds = {}
    start = time.perf_counter()
    if not (args.out / "align-video" / "final" / "config.json").is_file():
        align(cfg)
    seconds["align"] = round(time.perf_counter() - start, 1)
    start = time.perf_counter()
    model, _ = load_checkpoint(args.out / "align-video" / "final", with_tokenizer=False)
    videos = [v for split in ("train", "test") for r in read_records(data / f"{split}.json")
              for v in record_videos(r, data / "videos")]
    extract_features(model, videos, FeatureCache(args.out / "features", tower_identity(model)), torch.float16)
    seconds["features"] = round(time.perf_counter() - start, 1)
    (args.out / "times.json").write_text(json.dumps(seconds) + "\n")
    subprocess.run([sys.executable, str(Path(__file__).with_name("tower_rules.py")), "--run", str(args.run),
                    "--model", str(args.out / "align-video" / "final"), "--features", str(args.out / "features"),
                    "--out", str(args.out / "tower_rules.json")], check=True)


if __name__ == "__main__":
    main()
