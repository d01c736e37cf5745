"""Can TokenMining's outputs say which balls each frame shows? A probe on cached tower features.

Trains a fresh TokenMining (the original layout, or with ``frame_local`` and ``slot_queries``)
plus a head over each frame's Q output tokens (linear over the tokens side by side, or with
``--attention`` one attention readout per ball) to predict every ball's presence and position in
that frame, from the cached outputs of aligned towers; prints validation presence
accuracy (per ball and frame) and the mean position error every 100 steps. Minutes on 2 cores:
run it before the (much longer) VLM stages when the towers or TokenMining change.

    .venv/bin/python benchmarks/probe_token_mining.py --run runs/recipe --queries 8 --frame-local --steps 800
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from hilight.align import frame_facts
from hilight.checkpoint import load_checkpoint
from hilight.data import FeatureCache, tower_identity
from hilight.model.token_mining import TokenMining
from hilight.train import MinedFacts


def load_split(run: Path, split: str, cache: FeatureCache, names: list[str] | None, video_cfg):
    clips = json.loads((run / "data" / f"{split}-captions.json").read_text())
    names = names or sorted({n for c in clips for n in c["tracks"]["names"]})
    video, image, present, xy = [], [], [], []
    for clip in clips:
        tensors = cache.load_tensors(run / "data" / "videos" / clip["video"])
        facts = frame_facts(clip["tracks"], names, video_cfg, grid=1)
        video.append(tensors["video"].float())
        image.append(tensors["image"].float())
        present.append(facts["present"])
        xy.append(facts["xy"])
    return [torch.stack(x) for x in (video, image, present, xy)], names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a recipe run with aligned towers and features")
    parser.add_argument("--queries", type=int, default=8, help="queries per frame")
    parser.add_argument("--frame-local", action="store_true", help="frame_local + slot_queries (else the original)")
    parser.add_argument("--per-slot", action="store_true",
                        help="one query slot per ball (Q = number of balls), each read by its own head")
    parser.add_argument("--attention", action="store_true",
                        help="read each ball by attention over a frame's tokens (as the LLM can), not side by side")
    parser.add_argument("--steps", type=int, default=800)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, _ = load_checkpoint(args.run / "align-image" / "final", with_tokenizer=False)
    cache = FeatureCache(args.run / "features", tower_identity(model))
    (train, names), started = load_split(args.run, "train", cache, None, model.config.video), time.perf_counter()
    val, _ = load_split(args.run, "val", cache, names, model.config.video)
    cfg = dataclasses.replace(model.config.token_mining, queries_per_frame=args.queries,
                              frame_local=args.frame_local, slot_queries=args.frame_local)
    mining = TokenMining(cfg)
    head = MinedFacts(names, args.queries, cfg.llm_dim, per_slot=args.per_slot, attention=args.attention)
    global_tokens = 1 + model.config.video_tower.add_cls_num
    optimizer = torch.optim.AdamW([*mining.parameters(), *head.parameters()], lr=2e-3)
    for step in range(1, args.steps + 1):
        batch = torch.randint(len(train[0]), (16,))
        loss = head.loss(mining(train[0][batch], train[1][batch], global_tokens), train[2][batch], train[3][batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0:
            with torch.no_grad():
                outs = [mining(val[0][i:i + 64], val[1][i:i + 64], global_tokens) for i in range(0, len(val[0]), 64)]
                embeds = torch.cat(outs)
                logits = head.predict(embeds)
                right = (logits[:, :, 0] > 0).float() == val[2]  # [V, T, C]
                presence = right.float().mean().item()
                last = right[:, -1].all(dim=-1).float().mean().item()
                shown = val[2] > 0
                error = (logits[:, :, 1:].permute(0, 1, 3, 2)[shown] - val[3][shown]).abs().mean().item()
            print(f"step {step}: train loss {loss.item():.3f}, validation presence {presence:.1%}, "
                  f"last frame all right {last:.1%}, position error {error:.3f} ({time.perf_counter() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
