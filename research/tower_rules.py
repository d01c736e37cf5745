"""How much do the aligned video tower's own patch tokens see? The geometry rules on a linear
read-out of the tower, before TokenMining.

``perceived_rules.py`` reads what TokenMining's tokens hold; this script goes one step back: a
linear classifier per patch token (trained here on the training clips' cached tower outputs,
the frame-facts task of alignment: which object's centre the patch holds, or none) gives each
frame's balls (present where the best patch says so) and their positions (that patch's centre),
and the rules of ``oracle_rules.py`` answer the test questions from them. With the wrong
ball-frames counted per colour, as misses and as false sightings, per cloth, and per distance
to the nearest pocket (the pockets are drawn near-black, the black ball just lighter). Near ``perceived_rules``: TokenMining
keeps what the tower sees; both far below ``oracle_rules``: the tower is the limit.

    .venv/bin/python research/tower_rules.py --run runs/recipe
"""

from __future__ import annotations

import argparse
import collections
import json
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from oracle_rules import rule_answers, score
from tqdm import tqdm

from hilight.checkpoint import load_checkpoint
from hilight.data import FeatureCache, tower_identity
from hilight.recipes.billiards_small.facts import frame_facts
from hilight.synth.billiards import TableConfig, pocket_centres
from hilight.video import load_video


def patch_rows(cache: FeatureCache, data: Path, split: str, names: list[str], model, limit: int = 0):
    """Per clip: normalised patch states [T, L, D] and the frame-facts targets."""
    cfg = model.config
    grid = cfg.video_tower.image_size // cfg.video_tower.patch_size
    m = cfg.video_tower.num_proxy_tokens
    clips = json.loads((data / f"{split}-captions.json").read_text())[: limit or None]
    rows = []
    for clip in tqdm(clips, desc=f"{split} features", leave=False):
        video = cache.load_tensors(data / "videos" / clip["video"])["video"][m:].float()
        states = F.layer_norm(video, video.shape[-1:]).view(cfg.video.num_frames, grid * grid, -1)
        rows.append((clip, states, frame_facts(clip["tracks"], names, cfg.video, grid)))
    return rows


def pixel_rows(frames: Path, data: Path, split: str, names: list[str], model, limit: int = 0):
    """As :func:`patch_rows`, with each patch's own normalised pixels [T, L, 3 * P * P] in place of
    the tower's states: what a read-out gets from the frames before any tower (frames from the
    alignment's frames cache where it holds them, else decoded)."""
    cfg = model.config
    p = cfg.video_tower.patch_size
    grid = cfg.video_tower.image_size // p
    cache = FeatureCache(frames, json.dumps(asdict(cfg.video), sort_keys=True))
    clips = json.loads((data / f"{split}-captions.json").read_text())[: limit or None]
    rows = []
    for clip in tqdm(clips, desc=f"{split} pixels", leave=False):
        video = data / "videos" / clip["video"]
        x = cache.load_tensors(video)["frames"].float() if cache.has(video) else load_video(video, cfg.video)
        x = x.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5)  # [T, grid, grid, 3, P, P]
        rows.append((clip, x.reshape(len(x), grid * grid, -1), frame_facts(clip["tracks"], names, cfg.video, grid)))
    return rows


def best_patches(logits: torch.Tensor, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each object's most convinced patch: its margin over "none" [T, C] and the patch's centre
    [T, C, 2] (fractions of the frame), from patch logits [T, L, C + 1]."""
    best, where = (logits[..., 1:] - logits[..., :1]).max(1)  # [T, C]
    return best, torch.stack([(where % grid).float(), (where // grid).float()], -1).add(0.5).div(grid)


NEAR = (0.04, 0.08, 0.16)  # edges of the distance bands to the nearest pocket, fractions of the frame


def pocket_xy() -> torch.Tensor:
    """[6, 2] pocket centres as fractions of the frame, for a camera without its per-clip jitter
    (up to 2.5 % of the frame; ``hilight.synth.billiards.random_camera``)."""
    table = TableConfig()
    scale = 0.84 / table.length  # the table's length spans 84 % of the frame
    offset = torch.tensor([(1 - 0.84) / 2, (1 - table.width * scale) / 2])
    return offset + torch.tensor(pocket_centres(table), dtype=torch.float32) * scale


def band(distance: torch.Tensor) -> torch.Tensor:
    """The band index (0 = nearest) of each distance."""
    return torch.bucketize(distance, torch.tensor(NEAR))


def band_names() -> list[str]:
    edges = [0.0, *NEAR]
    return [f"{a:.2f}-{b:.2f}" for a, b in zip(edges[:-1], NEAR, strict=True)] + [f">{NEAR[-1]:.2f}"]


def auc(scores: torch.Tensor, positive: torch.Tensor) -> float | None:
    """Area under the ROC curve of ``scores`` for ``positive`` (the chance a present ball-frame
    scores above an absent one; ties count half); None without both kinds."""
    pos, neg = scores[positive], scores[~positive]
    if not len(pos) or not len(neg):
        return None
    order = torch.cat([pos, neg]).argsort().argsort().float() + 1  # ranks, ties broken arbitrarily
    return float((order[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def thresholds(margins: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Per object, the margin above which it counts as present that is right most often on the
    training frames (margins, present: [N, C])."""
    grid = torch.linspace(-6, 6, 121)
    hits = ((margins[None] > grid[:, None, None]) == (present[None] > 0)).float().sum(1)  # [G, C]
    return grid[hits.argmax(0)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a recipe run with data/, features/ and aligned towers")
    parser.add_argument("--model", type=Path, help="the checkpoint whose towers filled the cache (default: the run's)")
    parser.add_argument("--features", type=Path, help="its feature cache (default: the run's features/)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-clips", type=int, default=0, help="use only the first N training clips (0: all)")
    parser.add_argument("--pixels", action="store_true",
                        help="read out each patch's raw pixels with a 2-layer per-patch MLP instead of the tower's states "
                             "with a linear map (what the frames hold, before any tower)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    torch.manual_seed(0)
    aligned, _ = load_checkpoint(args.model or args.run / "align-image" / "final", with_tokenizer=False)
    cache = FeatureCache(args.features or args.run / "features", tower_identity(aligned))
    data = args.run / "data"
    names = sorted({n for c in json.loads((data / "train-captions.json").read_text()) for n in c["tracks"]["names"]})
    grid = aligned.config.video_tower.image_size // aligned.config.video_tower.patch_size
    if args.pixels:
        def rows(split: str, limit: int = 0):
            return pixel_rows(args.run / "frames", data, split, names, aligned, limit)
    else:
        def rows(split: str, limit: int = 0):
            return patch_rows(cache, data, split, names, aligned, limit)
    train = rows("train", args.train_clips)
    x = torch.cat([s.flatten(0, 1) for _, s, _ in train])  # [N, D]
    y = torch.cat([f["patch"].flatten() for _, _, f in train])  # [N]
    head = torch.nn.Linear(x.shape[1], len(names) + 1)
    if args.pixels:  # where a ball sits within its patch varies: a linear map of pixels cannot find it
        head = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 256), torch.nn.GELU(), head.__class__(256, len(names) + 1))
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3, weight_decay=1e-4)
    weight = torch.ones(len(names) + 1)
    weight[0] = 0.1  # as in alignment: most patches show only cloth
    for _ in tqdm(range(args.epochs), desc="linear read-out"):
        for batch in torch.randperm(len(x)).split(8192):
            loss = F.cross_entropy(head(x[batch]), y[batch], weight=weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
    del x, y
    with torch.no_grad():
        margins = torch.cat([best_patches(head(s), grid)[0] for _, s, _ in train])
    cut = thresholds(margins, torch.cat([f["present"] for _, _, f in train]))
    answers, presence, last_frame, errors = {}, [], [], collections.Counter()
    cloths = {name: t["cloth"] for name, t in json.loads((data / "test-truth.json").read_text()).items()}
    on_cloth = collections.defaultdict(lambda: [0, 0])  # "maroon on burgundy": [missed, present] ball-frames
    near_pocket = collections.defaultdict(lambda: [0, 0])  # ("black", band): [missed, present] ball-frames
    pockets = pocket_xy()
    ranked = collections.defaultdict(lambda: ([], []))  # "black on green": (margins, present) per ball-frame
    with torch.no_grad():
        for clip, states, facts in rows("test"):
            best, xy = best_patches(head(states), grid)
            seen = (best > cut).float()
            truth = facts["present"]
            presence.append((seen == truth).float().mean().item())
            last_frame.append(bool((seen[-1] == truth[-1]).all()))
            for k, name in enumerate(names):
                errors[f"{name} missed"] += int(((truth[:, k] == 1) & (seen[:, k] == 0)).sum())
                errors[f"{name} seen but absent"] += int(((truth[:, k] == 0) & (seen[:, k] == 1)).sum())
                tally = on_cloth[f"{name} on {cloths[clip['video']]}"]
                tally[0] += int(((truth[:, k] == 1) & (seen[:, k] == 0)).sum())
                tally[1] += int((truth[:, k] == 1).sum())
            for k, name in enumerate(names):
                for key in (name, f"{name} on {cloths[clip['video']]}"):
                    ranked[key][0].append(best[:, k])
                    ranked[key][1].append(truth[:, k] > 0)
            distance = (facts["xy"][:, :, None] - pockets).norm(dim=-1).min(-1).values  # [T, C]
            for k, name in enumerate(names):
                on = truth[:, k] == 1
                for b, miss in zip(band(distance[on, k]).tolist(), (seen[on, k] == 0).tolist(), strict=True):
                    for who in (name, "all"):
                        near_pocket[who, b][0] += miss
                        near_pocket[who, b][1] += 1
            answers[clip["video"]] = rule_answers(names, seen, xy)
    scored, overall = score(answers, json.loads((data / "test.json").read_text()))
    result = {"single_video": overall, "per_type": {t: v["accuracy"] for t, v in scored.items()},
              "presence_per_ball_and_frame": sum(presence) / len(presence),
              "last_frame_all_right": sum(last_frame) / len(last_frame), "errors": dict(errors.most_common()),
              "missed_by_cloth": {k: {"missed": m, "present": n, "rate": round(m / n, 3)}
                                  for k, (m, n) in sorted(on_cloth.items()) if n},
              "detection_auc": {key: auc(torch.cat(m), torch.cat(p)) for key, (m, p) in sorted(ranked.items())},
              "missed_by_pocket_distance": {f"{who} at {band_names()[b]}": {"missed": m, "present": n,
                                                                          "rate": round(m / n, 3)}
                                            for (who, b), (m, n) in sorted(near_pocket.items()) if n}}
    source = "an MLP read-out of the pixels" if args.pixels else "the video tower's linear read-out"
    print(f"rules on {source}: single-video questions {overall:.1%}; presence per ball and "
          f"frame {result['presence_per_ball_and_frame']:.1%}, last frame all right {result['last_frame_all_right']:.1%}")
    print("  ".join(f"{t} {a:.1%}" for t, a in result["per_type"].items()))
    print("errors (ball-frames): " + ", ".join(f"{k} {v}" for k, v in errors.most_common(12)))
    worst = sorted(result["missed_by_cloth"].items(), key=lambda kv: -kv[1]["rate"])[:8]
    print("missed most, per colour and cloth: " + ", ".join(f"{k} {v['rate']:.0%} of {v['present']}" for k, v in worst))
    print("missed, by distance to the nearest pocket (fractions of the frame): " + "; ".join(
        f"{who} " + ", ".join(f"{band_names()[b]} {near_pocket[who, b][0] / near_pocket[who, b][1]:.0%} of "
                              f"{near_pocket[who, b][1]}" for b in range(len(NEAR) + 1) if near_pocket[who, b][1])
        for who in ("black", "all")))
    print("detection AUC per colour: " + ", ".join(f"{n} {result['detection_auc'][n]:.3f}" for n in names
                                                    if result["detection_auc"].get(n) is not None))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
