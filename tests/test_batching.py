"""The batcher: requests taken together, each streamed and cancellable on its own."""

import threading
import time

from hilight.demo import moving_balls_clip
from hilight.inference.batching import Batcher, Job
from hilight.inference.engine import Conversation, Engine, GenerationSettings, place_videos, stream_reply
from hilight.text import Message
from hilight.video import write_video
from tests.conftest import talkative_checkpoint


class Collect:
    def __init__(self):
        self.text, self.done, self.error = "", threading.Event(), None
        self.usage = None

    def __call__(self, kind, value):
        if kind == "text":
            self.text += value
        elif kind == "done":
            self.usage = value
            self.done.set()
        else:
            self.error = value
            self.done.set()


def test_a_cancelled_row_stops_alone_and_a_bad_video_fails_alone(tmp_path, tokenizer):
    talkative_checkpoint(tmp_path / "model", tokenizer, seed=6)
    clip = write_video(tmp_path / "clip.mp4", moving_balls_clip(12, 64, seed=1))
    (tmp_path / "bad.mp4").write_text("not a video")
    engine = Engine.from_checkpoint(tmp_path / "model")
    batcher = Batcher(engine, max_batch=4)
    settings = GenerationSettings(max_new_tokens=40)
    blocker = threading.Event()
    first = Collect()
    # hold the worker busy so the next three wait together
    batcher.submit(Job([Message("user", place_videos("Warm up.", 1))], [clip], GenerationSettings(2),
                       lambda kind, value: (blocker.wait(10), first(kind, value))))
    jobs = {name: Collect() for name in ("kept", "cancelled", "bad")}
    cancel = threading.Event()
    batcher.submit(Job([Message("user", place_videos("Tell me everything.", 1))], [clip], settings, jobs["kept"]))
    batcher.submit(Job([Message("user", place_videos("Tell me more.", 1))], [clip], settings,
                       lambda kind, value: (cancel.set() if kind == "text" else None, jobs["cancelled"](kind, value)),
                       cancel))
    batcher.submit(Job([Message("user", place_videos("And this?", 1))], [tmp_path / "bad.mp4"], settings, jobs["bad"]))
    blocker.set()
    for job in jobs.values():
        assert job.done.wait(60)
    expected = "".join(stream_reply(engine, Conversation(), "Tell me everything.", [clip], settings)).strip()
    assert jobs["kept"].text.strip() == expected and jobs["kept"].usage["completion_tokens"] > 1
    # cancelled at its first text: its row stopped within a step or two, the other went on
    assert jobs["cancelled"].error is None and 0 < jobs["cancelled"].usage["completion_tokens"] <= 3
    assert jobs["kept"].usage["completion_tokens"] > 3
    assert "bad.mp4" in str(jobs["bad"].error)
    assert batcher.batches[-1] == 2  # the kept and the cancelled rows ran together; the bad one never ran
    time.sleep(0.05)
