"""How well could any model answer from perfect perception of the frames it is shown?

Takes every ball's true image position in the T frames the model samples (the generator's
``tracks``, through the model's own frame sampling), trains a small MLP per question type on the
train split and reports test accuracy next to the majority answer. This bounds what the
billiards-small recipe can reach with T frames and this much data: questions whose answer lies
between the sampled frames (first contact, cushions, the cue ball's first direction) stay far
from 100 % even with perfect per-frame perception.

    .venv/bin/python research/oracle_facts.py --data runs/recipe/data --frames 8
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import torch

from hilight.config import preset
from hilight.recipes.billiards_small.facts import frame_facts


def clip_features(data: Path, split: str, names: list[str] | None, video_cfg) -> tuple[dict[str, torch.Tensor], list]:
    """Per clip: presence and position of every ball in every sampled frame, flattened."""
    clips = json.loads((data / f"{split}-captions.json").read_text())
    names = names or sorted({n for c in clips for n in c["tracks"]["names"]})
    out = {}
    for clip in clips:
        facts = frame_facts(clip["tracks"], names, video_cfg, grid=1)
        out[clip["video"]] = torch.cat([facts["present"].unsqueeze(-1), facts["xy"]], -1).flatten()
    return out, names


def questions(data: Path, split: str, features: dict[str, torch.Tensor]) -> dict[str, list]:
    by_type = collections.defaultdict(list)
    for record in json.loads((data / f"{split}.json").read_text()):
        if isinstance(record["video"], str) and len(record["meta"]["types"]) == 1:
            by_type[record["meta"]["types"][0]].append((features[record["video"]], record["meta"]["truth"][0]))
    return by_type


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="a billiards data set (hilight recipe's data/)")
    parser.add_argument("--frames", type=int, default=8, help="frames sampled per clip")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    torch.manual_seed(0)
    video_cfg = preset("billiards-small").video
    video_cfg.num_frames = args.frames
    train_x, names = clip_features(args.data, "train", None, video_cfg)
    test_x, _ = clip_features(args.data, "test", names, video_cfg)
    train, test = questions(args.data, "train", train_x), questions(args.data, "test", test_x)
    results, right, total = {}, 0.0, 0
    for qtype in sorted(test):
        labels = sorted({v for _, v in train[qtype]} | {v for _, v in test[qtype]})
        x = torch.stack([f for f, _ in train[qtype]])
        y = torch.tensor([labels.index(v) for _, v in train[qtype]])
        xt = torch.stack([f for f, _ in test[qtype]])
        yt = torch.tensor([labels.index(v) for _, v in test[qtype]])
        mlp = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                                  torch.nn.ReLU(), torch.nn.Linear(256, len(labels)))
        opt = torch.optim.AdamW(mlp.parameters(), 1e-3, weight_decay=1e-2)
        for _ in range(args.steps):
            i = torch.randint(len(x), (128,))
            loss = torch.nn.functional.cross_entropy(mlp(x[i]), y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            accuracy = (mlp(xt).argmax(-1) == yt).float().mean().item()
        majority = collections.Counter(yt.tolist()).most_common(1)[0][1] / len(yt)
        results[qtype] = {"n": len(yt), "accuracy": accuracy, "majority": majority}
        right, total = right + accuracy * len(yt), total + len(yt)
        print(f"{qtype:16s} n={len(yt):4d}  oracle MLP {accuracy:6.1%}  majority {majority:6.1%}")
    results["single_video"] = {"n": total, "accuracy": right / total}
    print(f"single-video questions: {right / total:.1%} with perfect per-frame positions at {args.frames} frames")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
