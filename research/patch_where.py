"""Do the towers' patch tokens say where they are? The recipe with a patch-position target in
alignment.

TokenMining's attention is blind to where a key sits: what a frame's tokens can tell the LLM of a
ball's position is only what the patch tokens' *content* says of their own place. This script
runs the whole recipe with one change: the alignment's frame-facts objective also regresses, from
every patch token, that patch's own column and row (fractions of the grid, L1, ``--weight``), so
the towers keep their position embeddings' information in what they output. The data and the
base model are linked from an earlier run with the same settings (``--source``); steps 3-8 run
under ``--out``. Read the positions that reach TokenMining's tokens afterwards with
``perceived_rules.py --run OUT --model OUT/stage1/final`` (its ``cells`` line).

    .venv/bin/python research/patch_where.py --source RUN --out DIR [--weight 1.0] [KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from hilight.config import to_dict
from hilight.model.long_clip import LongCLIPImageTower
from hilight.recipes.billiards_small import facts
from hilight.recipes.billiards_small.recipe import STEPS, billiards_small, load_recipe

WEIGHT = {"where": 1.0, "image_tower": 1.0}  # the image tower's term: --video-only sets 0


class TowerFactsWhere(facts.TowerFacts):
    """The recipe's alignment objective plus each patch token's own place, regressed."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.where = nn.Linear(self.patch.in_features, 2)
        self.weight = WEIGHT["where"] * (WEIGHT["image_tower"] if isinstance(args[2], LongCLIPImageTower) else 1.0)

    def loss(self, out, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        states = out.patch_states  # [B, T, L, D], row by row
        side = self.grid
        index = torch.arange(states.shape[2], device=states.device)
        place = torch.stack([index % side, index // side], -1).float() / (side - 1)  # [L, 2] column, row
        where = (self.where(states).float() - place).abs().mean()
        return super().loss(out, targets) + self.weight * where


def link_first_steps(source: Path, out: Path, settings: dict) -> None:
    """``out`` starts with ``source``'s data, base model and decoded frames (hard links)."""
    if (out / "recipe.json").is_file():
        return
    previous = json.loads((source / "recipe.json").read_text())
    if previous["settings"] != settings:
        raise SystemExit(f"{source}: was made with other settings")
    out.mkdir(parents=True, exist_ok=True)
    for name in ("data", "base", "frames"):
        if (source / name).is_dir():
            shutil.copytree(source / name, out / name, copy_function=os.link)
    kept = {k: previous["seconds"][k] for k in STEPS[:2]}
    (out / "recipe.json").write_text(json.dumps({"settings": settings, "seconds": kept}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, required=True, help="a recipe run whose steps 1-2 are done")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--weight", type=float, default=1.0, help="the patch-position loss's weight")
    parser.add_argument("--video-only", action="store_true", help="the place term in the video tower only")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="the recipe's dotted overrides")
    args = parser.parse_args()

    cfg = load_recipe(None, args.overrides)
    link_first_steps(args.source, args.out, json.loads(json.dumps({"recipe": "billiards-small", "config": to_dict(cfg)})))
    WEIGHT["where"], WEIGHT["image_tower"] = args.weight, 0.0 if args.video_only else 1.0
    facts.TowerFacts = TowerFactsWhere  # the objective is looked up by name when alignment builds it
    summary = billiards_small(args.out, cfg)
    (args.out / "patch-where.json").write_text(json.dumps({"where_weight": args.weight, "video_only": args.video_only, **summary}, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
