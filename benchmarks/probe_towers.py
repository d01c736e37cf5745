"""Do the frozen towers' features carry what the questions ask? A linear probe in seconds.

Reads the cached tower outputs of a billiards data set (``hilight extract-features``), fits a
linear classifier per clip fact on the train split (from the CLIP-ViP proxy tokens, the mean
patch token and the Long-CLIP frame embeddings) and reports test accuracy next to the majority
answer. Run it after every tower change, before the (much longer) VLM stages.

    .venv/bin/python benchmarks/probe_towers.py --model runs/recipe/align/final \\
        --cache runs/recipe/cache --data data/b1k
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from hilight.checkpoint import load_checkpoint
from hilight.data import FeatureCache, tower_identity
from hilight.synth.billiards import DIRECTIONS

FACTS = {
    "any pocketed": lambda t: int(any(p["ball"] != "cue" for p in t["pocketed"])),
    "balls left": lambda t: len(t["balls_left"]),
    "cue direction": lambda t: DIRECTIONS.index(t["cue_direction"]),
    "cushions (0-3+)": lambda t: min(t["cue_cushions"], 3),
}


def features(cache: FeatureCache, data: Path, split: str, proxies: int) -> tuple[torch.Tensor, torch.Tensor]:
    truth = json.loads((data / f"{split}-truth.json").read_text())
    rows, labels = [], []
    for name, t in truth.items():
        f = cache.load(data / "videos" / name)
        video = f.video.float()  # [M + T*L, Dv]
        rows.append(torch.cat([video[:proxies].flatten(), video[proxies:].mean(0), f.image.float().flatten()]))
        labels.append([fact(t) for fact in FACTS.values()])
    return torch.stack(rows), torch.tensor(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="the checkpoint whose towers filled the cache")
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="billiards data directory (train/test truth)")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, _ = load_checkpoint(args.model, with_tokenizer=False)
    cache = FeatureCache(args.cache, tower_identity(model))
    proxies = model.config.video_tower.num_proxy_tokens
    x_train, y_train = features(cache, args.data, "train", proxies)
    x_test, y_test = features(cache, args.data, "test", proxies)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    for i, name in enumerate(FACTS):
        classes = int(max(y_train[:, i].max(), y_test[:, i].max())) + 1
        probe = torch.nn.Linear(x_train.shape[1], classes)
        opt = torch.optim.AdamW(probe.parameters(), lr=1e-3, weight_decay=1e-2)
        for _ in range(args.steps):
            loss = torch.nn.functional.cross_entropy(probe(x_train), y_train[:, i])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            test = (probe(x_test).argmax(-1) == y_test[:, i]).float().mean().item()
            train = (probe(x_train).argmax(-1) == y_train[:, i]).float().mean().item()
        majority = (y_test[:, i] == y_train[:, i].mode().values).float().mean().item()
        print(f"{name:16s} probe {test:6.1%} (train {train:6.1%})   majority {majority:6.1%}")


if __name__ == "__main__":
    main()
