"""``hilight batch`` on Ray Data (local, 127.0.0.1): every item answered as ``hilight ask``
answers it, bad videos reported and skipped, and a killed run continued by the same command.
Run by scripts/test-integrations.sh; skipped where Ray is not installed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")

from hilight.demo import moving_balls_clip  # noqa: E402
from hilight.inference.engine import Engine, GenerationSettings, place_videos  # noqa: E402
from hilight.integrations.batch import read_jsonl_rows  # noqa: E402
from hilight.text import Message  # noqa: E402
from hilight.tokenizer import DEMO_CORPUS, train_tokenizer  # noqa: E402
from hilight.video import write_video  # noqa: E402
from tests.conftest import talkative_checkpoint  # noqa: E402

QUESTIONS = ["What happens?", "Did a ball stop?"]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tiny talkative model and a manifest of 20 items: 9 clips x 2 questions, an unreadable
    file and a missing one."""
    root = tmp_path_factory.mktemp("batch-ray")
    model = talkative_checkpoint(root / "model", train_tokenizer(DEMO_CORPUS * 20, vocab_size=400), seed=4)
    (root / "videos").mkdir()
    rows = []
    for i in range(9):
        write_video(root / "videos" / f"c{i}.mp4", moving_balls_clip(12, 64, seed=i))
        rows += [{"id": f"c{i}-{n}", "video": f"videos/c{i}.mp4", "question": q} for n, q in enumerate(QUESTIONS)]
    (root / "videos" / "broken.mp4").write_bytes(b"\x00" * 100)
    rows += [{"id": "broken", "video": "videos/broken.mp4", "question": "What?"},
             {"id": "missing", "video": "videos/missing.mp4", "question": "What?"}]
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, model, rows


def _batch(root: Path, model: Path, out: Path, *extra: str, wait: bool = True):
    args = [sys.executable, "-m", "hilight", "batch", str(root / "manifest.jsonl"), "--out", str(out),
            "--model", str(model), "--dtype", "fp32", "--max-new-tokens", str(NEW_TOKENS), *extra]
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    if not wait:  # its own process group, so that the test can kill it with all of Ray's processes
        return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)


def _expected(root: Path, model: Path, rows: list[dict]) -> dict[str, str]:
    engine = Engine.from_checkpoint(model)
    return {r["id"]: engine.answer([Message("user", place_videos(r["question"], 1))], [root / r["video"]],
                                   GenerationSettings(NEW_TOKENS)).strip()
            for r in rows if r["id"] not in ("broken", "missing")}


def test_every_item_answered_as_ask_answers_it(data, tmp_path):
    root, model, rows = data
    out = tmp_path / "answers.parquet"
    run = _batch(root, model, out, "--encode-actors", "1", "--generate-actors", "2", "--batch-size", "4")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "20 items: 18 answered, 2 failed, 0 skipped" in run.stdout
    assert "failed: broken:" in run.stderr and "failed: missing:" in run.stderr
    import pyarrow.parquet as pq

    got = {r["id"]: r for r in pq.read_table(out).to_pylist()}
    assert set(got) == {r["id"] for r in rows} and not out.with_name(out.name + ".parts").exists()
    for item_id, answer in _expected(root, model, rows).items():
        assert got[item_id]["answer"] == answer and got[item_id]["error"] is None, item_id
    assert "broken.mp4" in got["broken"]["error"] and "missing.mp4" in got["missing"]["error"]
    again = _batch(root, model, out)
    assert again.returncode == 0 and "0 answered, 0 failed, 20 skipped" in again.stdout


def test_a_killed_run_continues_where_it_stopped(data, tmp_path):
    root, model, rows = data
    out = tmp_path / "answers.jsonl"
    proc = _batch(root, model, out, "--batch-size", "1", wait=False)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and len(read_jsonl_rows(out)) < 3:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray processes it started
    proc.wait(timeout=60)
    before = {r["id"]: r for r in read_jsonl_rows(out)}
    assert 3 <= len(before) < len(rows), "the run should have been killed part way"
    run = _batch(root, model, out, "--batch-size", "1")
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"{len(before)} skipped" in run.stdout
    after = read_jsonl_rows(out)
    assert sorted(r["id"] for r in after) == sorted(r["id"] for r in rows)  # each item once
    assert all(r == next(a for a in after if a["id"] == i) for i, r in before.items())  # kept as written
    expected = _expected(root, model, rows)
    assert all(r["answer"] == expected[r["id"]] for r in after if r["id"] in expected)
    retry = _batch(root, model, out, "--retry-errors")
    # only the two bad videos were tried again, and failed again: status 1, as when all of a run fails
    assert retry.returncode == 1 and "0 answered, 2 failed, 18 skipped" in retry.stdout
