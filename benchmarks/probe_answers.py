"""Can a question's answer be read from a trained model's visual tokens, and by what kind of reader?

For each single-video question type without a named ball, a small classifier is trained on the
frozen TokenMining tokens (the 64 tokens per clip the LLM is given) of the training clips to
predict the true answer, and scored on the test clips. Two readers: a 2-layer transformer over
the tokens (an LLM reads them this way: attention, then per-token MLPs) and an MLP over all
tokens side by side (the frame-facts head's way). Where both read an answer the LLM gets wrong,
the tokens hold it and the LLM has not learned to read it; where only the MLP does, the tokens
hold it in a layout attention reads badly.

    .venv/bin/python benchmarks/probe_answers.py --run runs/r1 --model hilight/assets/billiards-small
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from hilight.checkpoint import load_checkpoint
from hilight.data import FeatureCache, tower_identity
from hilight.model.hilight import TowerOutputs

TYPES = ("any_pocketed", "scratch", "first_pocketed", "balls_left", "first_contact", "cushions", "cue_direction")


class Reader(nn.Module):
    """A learned query token after the clip's tokens, through a small transformer, into classes."""

    def __init__(self, tokens: int, dim: int, classes: int, layers: int = 2, width: int = 128):
        super().__init__()
        self.inp = nn.Linear(dim, width)
        self.position = nn.Parameter(torch.randn(tokens + 1, width) * 0.02)
        self.query = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.1, batch_first=True, norm_first=True)
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([self.inp(F.rms_norm(x, (x.shape[-1],))), self.query.expand(len(x), -1, -1)], 1)
        return self.out(self.body(h + self.position)[:, -1])


class Flat(nn.Module):
    def __init__(self, tokens: int, dim: int, classes: int, width: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(tokens * dim, width), nn.GELU(),
                                 nn.Linear(width, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(F.rms_norm(x, (x.shape[-1],)))


def tokens_of(model, cache: FeatureCache, videos: list[Path]) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for i in range(0, len(videos), 64):
            loaded = [cache.load(v) for v in videos[i:i + 64]]
            towers = TowerOutputs(torch.stack([t.video for t in loaded]).float(),
                                  torch.stack([t.image for t in loaded]).float())
            out.append(model.video_embeddings(towers))
    return torch.cat(out)


def answers(records: list[dict], kind: str) -> dict[str, str]:
    return {r["video"]: truth for r in records if isinstance(r["video"], str)
            for t, truth in zip(r["meta"]["types"], r["meta"]["truth"], strict=True) if t == kind}


def fit(reader: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> nn.Module:
    optimizer = torch.optim.AdamW(reader.parameters(), lr=1e-3, weight_decay=0.05)
    reader.train()
    for _ in range(steps):
        batch = torch.randint(len(x), (64,))
        loss = F.cross_entropy(reader(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return reader.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="the recipe run that holds data/ and features/")
    parser.add_argument("--model", type=Path, required=True, help="a VLM checkpoint (its TokenMining makes the tokens)")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--types", nargs="+", default=list(TYPES))
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, _ = load_checkpoint(args.model, with_tokenizer=False)
    model.eval()
    aligned, _ = load_checkpoint(args.run / "align-image" / "final", with_tokenizer=False)
    cache = FeatureCache(args.run / "features", tower_identity(aligned))
    data = args.run / "data"
    records = {split: json.loads((data / f"{split}.json").read_text()) for split in ("train", "test")}
    clips = sorted({r["video"] for split in records.values() for r in split if isinstance(r["video"], str)})
    every = tokens_of(model, cache, [data / "videos" / v for v in clips])
    row_of = {v: i for i, v in enumerate(clips)}
    results = {}
    for kind in args.types:
        truth = {split: answers(records[split], kind) for split in records}
        classes = sorted(set(truth["train"].values()))
        x, y = {}, {}
        for split, table in truth.items():
            kept = [v for v, a in table.items() if a in classes]
            x[split] = every[[row_of[v] for v in kept]]
            y[split] = torch.tensor([classes.index(table[v]) for v in kept])
        majority = Counter(y["test"].tolist()).most_common(1)[0][1] / len(y["test"])
        row = {"n_test": len(y["test"]), "classes": len(classes), "majority": majority}
        tokens, dim = x["train"].shape[1:]
        readers = {"transformer": Reader(tokens, dim, len(classes)), "mlp": Flat(tokens, dim, len(classes))}
        for name, reader in readers.items():
            fit(reader, x["train"], y["train"], args.steps)
            with torch.no_grad():
                row[name] = (reader(x["test"]).argmax(-1) == y["test"]).float().mean().item()
        results[kind] = row
        print(f"{kind:15s} n={row['n_test']:4d} classes={row['classes']:2d} majority {majority:.1%}  "
              f"transformer {row['transformer']:.1%}  mlp {row['mlp']:.1%}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
