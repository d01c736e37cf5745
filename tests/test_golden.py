"""Pinned losses of a tiny run of the bundled recipe's stages (torchtune-style golden test).

The clips are written from seeded random frames (not the billiards renderer), so the data are
byte-identical on every run; the stages are the recipe's own: video-tower alignment with the
frame-facts objective, stage 1 on frame facts alone (lm_weight 0), stage 2 as a full fine-tune
with frame facts beside the answers. A change to any of their arithmetic moves these numbers.
"""

import json
import pathlib

import numpy as np
import pytest
import torch

from hilight.checkpoint import save_checkpoint
from hilight.config import (
    AlignConfig,
    AlignDataConfig,
    AuxiliaryConfig,
    DataConfig,
    TextTowerConfig,
    TrainableConfig,
    TrainConfig,
    tiny_config,
)
from hilight.model import HiLight
from hilight.recipes.billiards_small.facts import MINED_FACTS, TOWER_FACTS
from hilight.tokenizer import DEMO_CORPUS, train_tokenizer
from hilight.training.align import align
from hilight.training.vlm import train
from hilight.video import write_video

# Step losses. Recorded with the code before the recipe's frame facts moved out of the generic
# training modules (tag research-2026-12, same data and seeds): the numbers were bit-identical
# after the move. The tolerance covers CPU kernel differences only.
GOLDEN = {
    "align": [5.762269973754883, 5.207271099090576, 4.517273902893066],
    "stage1": [1.176418423652649, 0.9313576221466064, 0.7581968903541565],
    "stage2": [6.788267135620117, 6.573497295379639, 6.4066996574401855],
}


def _data(root, tokenizer):
    rng = np.random.default_rng(0)
    videos, records, captions = root / "videos", [], []
    videos.mkdir()
    for n in range(6):
        name = f"clip-{n}.mp4"
        write_video(videos / name, rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8))
        gone = n % 2 == 0  # the red ball leaves the table after frame 4 in every other clip
        xy = [[0.1 + 0.05 * f, 0.2 + 0.02 * n, *([-1, -1] if gone and f >= 5 else [0.8, 0.5])] for f in range(8)]
        tracks = {"names": ["cue", "red"], "fps": 10, "radius": 0.02, "xy": xy}
        pocketed = n % 2 == 0
        captions.append({"video": name, "caption": f"The cue ball hits the red ball{' into a pocket' if pocketed else ''}.",
                         "tracks": tracks})
        records.append({"id": str(n), "video": name, "conversations": [
            {"from": "human", "value": "<video>\nWas the red ball pocketed?"},
            {"from": "gpt", "value": "Yes." if pocketed else "No."}]})
    (root / "captions.json").write_text(json.dumps(captions))
    (root / "train.json").write_text(json.dumps(records))
    torch.manual_seed(0)
    save_checkpoint(HiLight(tiny_config(len(tokenizer))), root / "base", tokenizer)


def _losses(output_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_tiny_recipe_losses_are_pinned(tmp_path):
    """Run in a fresh process: inside the full suite (and only there) the losses came out up to
    0.2 % off on some runs, here and on CI, while the same run alone matched every time; some
    state an earlier test leaves in the process (not found yet) changes the CPU kernels' path."""
    import subprocess
    import sys

    code = f"import json, pathlib, tests.test_golden as g; print(json.dumps(g.run(pathlib.Path({str(tmp_path)!r}))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         cwd=str(pathlib.Path(__file__).resolve().parents[1]))
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    for stage, expected in GOLDEN.items():
        assert got[stage] == pytest.approx(expected, rel=1e-4), (stage, got[stage], got["environment"])


def run(tmp_path) -> dict:
    """The three stages' step losses (and the environment, for a failure message)."""
    # a tokenizer of its own: the session's shared one may have grown by the time this runs
    tokenizer = train_tokenizer(DEMO_CORPUS * 20, vocab_size=400)
    _data(tmp_path, tokenizer)
    common = {"max_steps": 3, "batch_size": 4, "log_every": 1, "save_every": 3, "eval_every": 3, "seed": 0}
    align(AlignConfig(
        model=str(tmp_path / "base"), output_dir=str(tmp_path / "align"), lr=1e-3,
        text_tower=TextTowerConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_layers=1,
                                   num_heads=2, max_positions=64, projection_dim=16),
        data=AlignDataConfig(train=str(tmp_path / "captions.json"), videos=str(tmp_path / "videos")),
        auxiliary=AuxiliaryConfig(objective=TOWER_FACTS), **common))
    facts = AuxiliaryConfig(objective=MINED_FACTS, data=[str(tmp_path / "captions.json")])
    data = DataConfig(train=str(tmp_path / "train.json"), videos=str(tmp_path / "videos"))
    train(TrainConfig(model=str(tmp_path / "align" / "final"), output_dir=str(tmp_path / "stage1"), data=data,
                      trainable=TrainableConfig(token_mining=True), auxiliary=facts, lm_weight=0.0, lr=2e-3,
                      max_length=512, **common))
    train(TrainConfig(model=str(tmp_path / "stage1" / "final"), output_dir=str(tmp_path / "stage2"), data=data,
                      trainable=TrainableConfig(token_mining=True, llm=True), auxiliary=facts, lr=1e-3,
                      max_length=512, **common))
    return {**{stage: _losses(tmp_path / stage) for stage in GOLDEN}, "environment": _environment()}


def _environment() -> dict:
    """What a machine that computes other numbers differs in (for the failure message)."""
    import platform
    from importlib.metadata import version

    packages = {p: version(p) for p in ("torch", "transformers", "tokenizers", "accelerate", "av", "numpy")}
    return {**packages, "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "capability": torch.backends.cpu.get_cpu_capability()}
