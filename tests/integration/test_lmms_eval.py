"""lmms-eval with HiLight's plugin (``--model hilight``, found through the entry point) on the
billiards test questions exported as an lmms-eval task gives the accuracy ``hilight eval`` gives
on the same items, by letter matching and by option log-likelihood. No network: the task, its
data and the clips are written here. Run by scripts/test-integrations.sh; skipped where
lmms-eval is not installed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval")

from hilight.checkpoint import BUNDLED_MODEL  # noqa: E402
from hilight.cli import main  # noqa: E402

ITEMS = 12


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    from hilight.synth.dataset import generate_split

    root = tmp_path_factory.mktemp("lmms")
    files = generate_split(root / "data", "test", 2, seed=7)
    assert main(["export-lmms", "--data", str(files.conversations), "--videos", str(root / "data" / "videos"),
                 "--out", str(root / "task"), "--name", "billiards_mc", "--limit", str(ITEMS)]) == 0
    return root


def _lmms_eval(root: Path, task: str, model: str = "hilight", args: str = "") -> float:
    env = {**os.environ, "HF_HOME": str(root / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out_dir = root / "out" / f"{model}-{task}-{len(list((root / 'out').glob('*'))) if (root / 'out').is_dir() else 0}"
    out = subprocess.run([sys.executable, "-m", "lmms_eval", "--model", model, "--model_args",
                          args or f"pretrained={BUNDLED_MODEL},dtype=fp32,quantize=none", "--tasks", task,
                          "--include_path", str(root / "task"), "--batch_size", "4", "--device", "cpu",
                          "--output_path", str(out_dir)],
                         capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (results,) = out_dir.rglob("*_results.json")
    return json.loads(results.read_text())["results"][task]["acc,none"]


def test_both_harnesses_give_one_number(task, capsys):
    assert main(["eval", "--model", str(BUNDLED_MODEL), "--dtype", "fp32", "--quantize", "none", "--data",
                 str(task / "task" / "billiards_mc.json"), "--videos", "/", "--out", str(task / "ours"),
                 "--max-new-tokens", "24", "--no-blind"]) == 0
    ours = json.loads((task / "ours" / "report.json").read_text())["overall"]
    assert ours["n"] == ITEMS
    assert _lmms_eval(task, "billiards_mc") == pytest.approx(ours["accuracy"])
    assert _lmms_eval(task, "billiards_mc_ll") == pytest.approx(ours["loglikelihood_accuracy"])


def test_the_no_code_route_through_hilight_serve(task):
    """lmms-eval's OpenAI-compatible model sending video_url file:// parts (pass_video_url) and
    media_io_kwargs to `hilight serve` scores what the plugin scores."""
    from hilight.inference.engine import Engine
    from hilight.server import create_app
    from tests.conftest import LocalServer

    ours = json.loads((task / "ours" / "report.json").read_text())["overall"] if (task / "ours").is_dir() else None
    engine = Engine.from_checkpoint(BUNDLED_MODEL, dtype=None, quantize="none")
    server = LocalServer(create_app(engine, "billiards-small", allowed_dir=task / "data"))
    try:
        args = (f"model_version=billiards-small,base_url={server.url}/v1,api_key=none,pass_video_url=True,"
                f"max_frames_num={engine.model.config.video.num_frames},num_concurrent=4")
        served = _lmms_eval(task, "billiards_mc", model="openai", args=args)
    finally:
        server.stop()
    plugin = _lmms_eval(task, "billiards_mc")
    assert served == pytest.approx(plugin)
    if ours is not None:
        assert served == pytest.approx(ours["accuracy"])
