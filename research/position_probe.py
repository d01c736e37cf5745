"""Do the video tower's patch tokens, and TokenMining's values made from them, say where they are?

TokenMining's attention returns a weighted sum of values, blind to where each key sits: a
ball's position can reach the LLM only if a patch token's content says where the patch is. A
least-squares linear read-out of each patch's own column and row from its token (two thirds of
the test clips to fit, a third to score, R² per axis), on the cached tower features of a recipe
run, and on TokenMining's values (``val_projector`` after ``CLIP_VIP_projector``) of a VLM
checkpoint (``--model``).

    .venv/bin/python research/position_probe.py --run RUN [--model RUN/stage1/final] [--clips 120]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from hilight.checkpoint import load_checkpoint
from hilight.data import FeatureCache, tower_identity


def r2_of_place(tokens: torch.Tensor, side: int) -> list[float]:
    """``tokens`` [N, T, L, D] (L = side * side patches, row by row): R² of a linear read-out of
    each patch's column and row, fitted on the first two thirds of the N clips."""
    n, _, patches, dim = tokens.shape
    index = torch.arange(patches)
    place = (torch.stack([index % side, index // side], -1).float() / (side - 1)).expand(*tokens.shape[:3], 2)
    fit = n * 2 // 3

    def rows(x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, dim)
        return torch.cat([flat, torch.ones(len(flat), 1)], 1)

    weights = torch.linalg.lstsq(rows(tokens[:fit]), place[:fit].reshape(-1, 2)).solution
    truth = place[fit:].reshape(-1, 2)
    residual = ((rows(tokens[fit:]) @ weights - truth) ** 2).sum(0)
    return (1 - residual / ((truth - truth.mean(0)) ** 2).sum(0)).tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a recipe run with features/ and data/")
    parser.add_argument("--model", type=Path, help="a VLM checkpoint: its TokenMining values are probed too")
    parser.add_argument("--clips", type=int, default=120, help="test clips to read")
    args = parser.parse_args()

    aligned, _ = load_checkpoint(args.run / "align-image" / "final", with_tokenizer=False)
    cfg = aligned.config
    side, frames = cfg.video_tower.image_size // cfg.video_tower.patch_size, cfg.video.num_frames
    cache = FeatureCache(args.run / "features", tower_identity(aligned))
    data = args.run / "data"
    clips = json.loads((data / "test-captions.json").read_text())[:args.clips]
    tokens = []
    for clip in clips:
        video = cache.load_tensors(data / "videos" / clip["video"])["video"].float()  # [S, Dv]
        tokens.append(video[video.shape[0] - frames * side * side:].view(frames, side * side, -1))
    tokens = torch.stack(tokens)
    result = {"tower patch tokens": r2_of_place(tokens, side)}
    if args.model:
        model, _ = load_checkpoint(args.model, with_tokenizer=False)
        mining = model.token_mining.eval()
        with torch.no_grad():
            result["TokenMining values"] = r2_of_place(mining.val_projector(mining.CLIP_VIP_projector(tokens)), side)
    for name, (column, row) in result.items():
        print(f"{name}: R² of the patch's own column {column:.3f}, row {row:.3f}")


if __name__ == "__main__":
    main()
