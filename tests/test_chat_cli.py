import json
import subprocess
import sys
from pathlib import Path

import pytest

from hilight.demo import moving_balls_clip
from hilight.inference.engine import Conversation, Engine, GenerationSettings, place_videos, stream_reply
from hilight.text import ConversationError
from hilight.video import write_video
from tests.conftest import talkative_checkpoint


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("chat")
    model = talkative_checkpoint(root / "model", tokenizer, seed=2)
    clips = [write_video(root / f"c{i}.mp4", moving_balls_clip(12, 64, seed=i)) for i in range(2)]
    (root / "bad.mp4").write_text("nope")
    return root, model, clips


def _run(args, stdin=""):
    return subprocess.run([sys.executable, "-m", "hilight", *args], input=stdin, capture_output=True, text=True,
                          timeout=300)


def test_place_videos():
    assert place_videos("Which?", 2) == "<video>\n<video>\nWhich?"
    assert place_videos("Compare <video> and <video>", 2) == "Compare <video> and <video>"
    with pytest.raises(ConversationError, match="1 <video> marker"):
        place_videos("<video> and?", 2)


def _main(args, capsys):
    """``hilight ARGS`` in this process (the entry point itself is run by the chat tests below)."""
    from types import SimpleNamespace

    from hilight.cli import main

    code = main(args)
    captured = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=captured.out, stderr=captured.err)


def test_ask_json(setup, capsys):
    root, model, clips = setup
    out = _main(["ask", str(clips[0]), str(clips[1]), "Compare <video> with <video>.", "--model", str(model), "--json",
                 "--max-new-tokens", "10"], capsys)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    engine = Engine.from_checkpoint(model)
    expected = "".join(stream_reply(engine, Conversation(), "Compare <video> with <video>.", clips,
                                    GenerationSettings(10))).strip()
    assert result["answer"] == expected and [v["path"] for v in result["videos"]] == [str(c) for c in clips]
    for video in result["videos"]:  # each video's frame times, from the demux pass
        (segment,) = video["segments"]
        times = segment["timestamps"]
        assert len(times) == video["frames"] == engine.model.config.video.num_frames
        assert times == sorted(times) and times[0] == 0.0 and times[-1] == video["duration"] > 0


def test_ask_bad_video_is_one_line(setup):
    root, model, _ = setup
    out = _run(["ask", str(root / "bad.mp4"), "What?", "--model", str(model)])  # the real entry point, warnings too
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "bad.mp4: not a readable media file" in out.stderr


def test_ask_needs_a_video_and_a_question(setup, capsys):
    root, model, clips = setup
    out = _main(["ask", str(clips[0]), "--model", str(model)], capsys)
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert f"{clips[0]}: a video file, and no question after it" in out.stderr
    out = _main(["ask", "What happens?", "--model", str(model)], capsys)
    assert out.returncode == 2 and "no video given" in out.stderr and "--no-video" in out.stderr
    out = _main(["ask", "What happens?", "--model", str(model), "--no-video", "--max-new-tokens", "4"], capsys)
    assert out.returncode == 0, out.stderr


def test_the_bundled_model_is_known_by_name_and_says_what_it_knows(capsys):
    from hilight.cli import main

    assert main(["info", "billiards-small"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("billiards-small (") and "knows: top-down clips of HiLight's synthetic billiards" in out
    assert "sees 8 frames per video at 112 px" in out and "single-video questions 53.5%" in out
    assert main(["models"]) == 0 and capsys.readouterr().out.startswith("billiards-small ")
    example = Path(__file__).resolve().parents[1] / "examples" / "test-00001.mp4"
    assert main(["ask", str(example), "Did the cue ball go into a pocket?", "--model", "billiards-small",
                 "--max-new-tokens", "8"]) == 0
    captured = capsys.readouterr()
    assert captured.err.startswith("note: billiards-small knows top-down clips") and captured.out.strip()


def test_chat_refuses_a_question_before_any_video(setup, capsys, monkeypatch):
    root, model, clips = setup
    lines = iter(["What happens?", f"/video {clips[0]}", "And now?", "/history", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    out = _main(["chat", "--model", str(model), "--max-new-tokens", "4"], capsys)
    assert out.returncode == 0, out.stderr
    assert "error: no video in this chat yet: add one with /video PATH" in out.stdout
    assert "user> <video>\nAnd now?" in out.stdout  # the refused question left no trace; the next one went on


def test_chat_session(setup, tmp_path):
    root, model, clips = setup
    transcript = tmp_path / "t.json"
    script = (f"/video {root / 'bad.mp4'}\n/video {clips[1]}\nWhat happens?\nAnd then?\n/history\n"
              f"/save {transcript}\n/reset\n/history\n/quit\n")
    out = _run(["chat", str(clips[0]), "--model", str(model), "--max-new-tokens", "6"], script)
    assert out.returncode == 0, out.stderr
    assert "error: " in out.stdout and "bad.mp4" in out.stdout  # the bad video is reported, the chat goes on
    saved = json.loads(transcript.read_text())
    assert [m["role"] for m in saved["messages"]] == ["user", "model", "user", "model"]
    assert saved["messages"][0]["content"] == "<video>\n<video>\nWhat happens?"
    assert saved["videos"] == [str(clips[0]), str(clips[1])]
    assert "conversation cleared" in out.stdout


def test_cancel_stops_generation_and_keeps_the_partial_reply(setup):
    import threading

    _, model, clips = setup
    engine = Engine.from_checkpoint(model)
    usage_full, usage_cut = {}, {}
    list(stream_reply(engine, Conversation(), "Tell me everything.", clips[:1], GenerationSettings(40), usage=usage_full))
    conversation, cancel = Conversation(), threading.Event()
    cancel.set()  # what a disconnecting client or a Ctrl-C does: the generation stops at the next token
    reply = "".join(stream_reply(engine, conversation, "Tell me everything.", clips[:1], GenerationSettings(40), cancel,
                                 usage=usage_cut))
    assert usage_cut["completion_tokens"] == 1 < usage_full["completion_tokens"]
    assert conversation.messages[-1].role == "model" and conversation.messages[-1].content == reply.strip()


def test_closing_the_stream_early_stops_the_worker(setup):
    _, model, clips = setup
    engine = Engine.from_checkpoint(model)
    conversation = Conversation()
    stream = stream_reply(engine, conversation, "Tell me everything.", clips[:1], GenerationSettings(40))
    next(stream)
    stream.close()  # the consumer went away: the generation thread is stopped and joined
    assert len(conversation.messages) == 2 and conversation.messages[1].role == "model"
