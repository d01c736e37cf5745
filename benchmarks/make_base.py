"""A fresh, seeded ``billiards-small`` checkpoint with preset overrides and a recipe run's
tokenizer: the starting point of ``align_readout.py`` for tower settings the recipe does not use.

    .venv/bin/python benchmarks/make_base.py OUT [KEY=VALUE ...] [--tokenizer-from runs/recipe/base]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from hilight.checkpoint import load_checkpoint, save_checkpoint
from hilight.config import apply_overrides, preset
from hilight.model import HiLight


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    parser.add_argument("--tokenizer-from", type=Path, default=Path("runs/r1/base"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    _, tokenizer = load_checkpoint(args.tokenizer_from)
    config = apply_overrides(preset("billiards-small"), [f"llm.vocab_size={len(tokenizer)}", *args.overrides])
    torch.manual_seed(args.seed)
    save_checkpoint(HiLight(config), args.out, tokenizer)


if __name__ == "__main__":
    main()
