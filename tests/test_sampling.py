"""Per-request sampling: time ranges, frame counts and rates, long videos in segments with
their time spans marked, segment caching, the context check, still images, bad requests."""

import json
import shutil

import pytest
import torch
from PIL import Image

from hilight.chat import parse_video_command, run_chat
from hilight.cli import main
from hilight.demo import moving_balls_clip
from hilight.errors import ConfigError, ConversationError, VideoError
from hilight.inference.engine import Clip, Conversation, Engine, GenerationSettings, stream_reply
from hilight.sampling import MAX_FRAMES, Sampling, format_time, parse_time, plan_segments
from hilight.text import VIDEO_PLACEHOLDER_ID, ChatTokenizer
from hilight.video import decode_frames, preprocess, write_video
from tests.conftest import talkative_checkpoint

TIMES = [i / 10 for i in range(24)]  # 24 frames at 10 fps: 0.0 ... 2.3 s
DEFAULT = [0, 7, 15, 23]  # the model's own choice of 4 (linspace(0, 23, 4))


def _plan(sampling: Sampling, times=TIMES, t: int = 4):
    return plan_segments(times, t, sampling, DEFAULT, "clip.mp4")


def test_times_parse_and_format():
    assert [parse_time(v) for v in (90, 90.5, "90", "1:30", "1:30.5", "1:02:03", " 0:05 ")] == \
        [90.0, 90.5, 90.0, 90.0, 90.5, 3723.0, 5.0]
    for bad in ("1:75", "1:60:00", "abc", "-3", "1:-2", "", True):
        with pytest.raises(ConfigError):
            parse_time(bad, "start")
    assert [format_time(v) for v in (0, 75, 3725)] == ["0:00", "1:15", "1:02:05"]
    assert format_time(3.25, tenths=True) == "0:03.2" and format_time(65.0, tenths=True) == "1:05.0"


def test_no_options_is_the_models_own_sampling():
    assert _plan(Sampling()) == [_plan(Sampling())[0]] and _plan(Sampling())[0].indices == tuple(DEFAULT)


def test_a_range_alone_spreads_the_models_frames_over_it():
    (segment,) = _plan(Sampling(start=1.0, end=2.0))
    assert segment.indices == (10, 13, 16, 20) and (segment.start, segment.end) == (1.0, 2.0)


def test_fewer_frames_than_the_model_takes_are_repeated():
    (segment,) = _plan(Sampling(num_frames=2))
    assert segment.indices == (0, 0, 0, 23)  # 2 distinct frames, shown as linspace(0, 1, 4) picks them


def test_more_frames_become_segments_in_time_order():
    segments = _plan(Sampling(num_frames=8))
    assert [s.indices for s in segments] == [(0, 3, 6, 9), (13, 16, 19, 23)]
    assert [(s.start, s.end) for s in segments] == [(0.0, 1.3), (1.3, 2.3)]
    # not a whole number of segments: rounded up (10 -> 12 frames, 3 segments)
    assert [len(s.indices) for s in _plan(Sampling(num_frames=10))] == [4, 4, 4]
    # the spans tile the range, each starting at its first frame
    segments = _plan(Sampling(num_frames=12, start=0.5, end=2.0))
    assert segments[0].start == 0.5 and segments[-1].end == 2.0
    assert all(a.end == b.start == TIMES[b.indices[0]] for a, b in zip(segments, segments[1:], strict=False))


def test_fps_reads_that_rate_up_to_max_frames():
    assert sum(len(s.indices) for s in _plan(Sampling(fps=4))) == 12  # 2.3 s x 4 = 9 -> 3 segments
    assert len(_plan(Sampling(fps=4, max_frames=5))) == 2
    assert len(_plan(Sampling(fps=0.5))) == 1


def test_fps_segments_sit_on_a_grid_so_another_range_reuses_them():
    times = [i / 10 for i in range(48)]  # 4.7 s
    early = _plan(Sampling(fps=2, end=2.0), times=times)
    assert [s.indices for s in early] == [(0, 5, 10, 15), (20, 20, 20, 20)]  # 0.0, 0.5 ... 2.0 s
    longer = _plan(Sampling(fps=2, end=4.0), times=times)
    assert longer[0] == early[0] and [s.indices for s in longer[1:]] == [(20, 25, 30, 35), (40, 40, 40, 40)]
    later = _plan(Sampling(fps=2, start=2.2, end=4.0), times=times)  # cut by the range: its frames repeated
    assert [s.indices for s in later] == [(25, 25, 30, 35), (40, 40, 40, 40)]
    assert (later[0].start, later[0].end, later[1].start) == (2.2, 4.0, 4.0)


def test_a_still_image_is_one_segment_whatever_is_asked():
    assert _plan(Sampling(num_frames=40, start=3), times=[0.0]) == _plan(Sampling(), times=[0.0])


@pytest.mark.parametrize("options, message", [
    ({"start": 5}, "the range starts at 0:05.0, after the end of the video (0:02.3)"),
    ({"end": 9}, "the range ends at 0:09.0, after the end of the video"),
    ({"start": 1.01, "end": 1.09}, "no frame between 0:01.0 and 0:01.1"),
])
def test_a_range_outside_the_video_names_the_file(options, message):
    with pytest.raises(VideoError, match="clip.mp4: " + message.replace("(", r"\(").replace(")", r"\)")):
        _plan(Sampling(**options))


@pytest.mark.parametrize("options, message", [
    ({"start": 3, "end": 2}, "the range ends"),
    ({"num_frames": 0}, "num_frames must be between 1 and"),
    ({"num_frames": MAX_FRAMES + 1}, "num_frames must be between 1 and"),
    ({"num_frames": 2.5}, "num_frames must be a whole number"),
    ({"fps": 0}, "fps must be a number > 0"),
    ({"fps": -1}, "fps must be a number > 0"),
    ({"fps": "2"}, "fps must be a number"),
    ({"num_frames": 8, "fps": 2}, "give num_frames or fps, not both"),
    ({"max_frames": 8}, "max_frames caps fps sampling"),
    ({"start": "1:75"}, "not a time"),
    ({"frames": 8}, "unknown option 'frames'"),
    ({"nframes": 8, "num_frames": 8}, "num_frames is given twice"),
])
def test_bad_options_are_refused_in_one_line(options, message):
    with pytest.raises(ConfigError, match=message) as err:
        Sampling.from_options(options)
    assert "\n" not in str(err.value)


def test_other_servers_option_names_are_understood():
    assert Sampling.from_options({"nframes": 8, "video_start": "0:01", "video_end": 2}) == \
        Sampling(num_frames=8, start=1.0, end=2.0)


# ----------------------------------------------------------------------------------------------
# through the engine


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("sampling")
    model = talkative_checkpoint(root / "model", tokenizer, seed=3)
    clip = write_video(root / "long.mp4", moving_balls_clip(48, 64, seed=1))  # 4.7 s at 10 fps
    image = root / "table.png"
    Image.new("RGB", (80, 60), (30, 110, 50)).save(image)
    return root, model, clip, image


class TowerCalls:
    def __init__(self, engine: Engine):
        self.clips: list[int] = []  # segments per tower run
        engine.model.video_tower.register_forward_hook(lambda m, args, out: self.clips.append(args[0].shape[0]))


def test_segments_are_spliced_in_order_after_their_markers(setup):
    root, model, clip, _ = setup
    engine = Engine.from_checkpoint(model)
    planned = engine.plan(Clip(clip, Sampling(num_frames=12)))
    assert planned.labels == ["[0:00.0-0:01.7]", "[0:01.7-0:03.4]", "[0:03.4-0:04.7]"]
    encoded = engine.encode_prompt([_user("<video>\nWhat happens?")], [planned])
    ids, per = encoded.input_ids, engine.chat.tokens_per_video
    expected = engine.chat.video_ids(planned.labels)
    start = ids.index(VIDEO_PLACEHOLDER_ID) - len(engine.chat._text(planned.labels[0]))
    assert ids[start:start + len(expected)] == expected and ids.count(VIDEO_PLACEHOLDER_ID) == 3 * per
    assert engine.tokenizer.decode(ids[start:start + len(engine.chat._text(planned.labels[0]))]) == "[0:00.0-0:01.7]"
    # each segment's rows are that segment's frames through the towers and TokenMining
    rows = engine.segment_embeddings([planned])
    cfg = engine.model.config.video
    for k, segment in enumerate(planned.segments):
        pixels = preprocess(decode_frames(clip, planned.index, list(segment.indices), cfg).frames, cfg)
        alone = engine.model.video_embeddings(engine.model.encode_videos(pixels.unsqueeze(0)))[0]
        torch.testing.assert_close(rows[k], alone, rtol=1e-4, atol=1e-5)


def test_the_default_is_one_unmarked_block_as_the_model_was_trained(setup):
    root, model, clip, _ = setup
    engine = Engine.from_checkpoint(model)
    planned = engine.plan(clip)
    assert planned.labels is None and len(planned.segments) == 1
    plain = engine.chat.encode([_user("<video>\nWhat happens?")], generation=True)
    assert engine.encode_prompt([_user("<video>\nWhat happens?")], [planned]).input_ids == plain.input_ids


def test_a_follow_up_about_another_range_encodes_only_the_new_segments(setup):
    root, model, clip, _ = setup
    engine = Engine.from_checkpoint(model)
    calls = TowerCalls(engine)
    conversation, settings = Conversation(), GenerationSettings(4)
    list(stream_reply(engine, conversation, "What happens?", [Clip(clip, Sampling(num_frames=8))], settings))
    assert calls.clips == [2]
    first = engine.plan(Clip(clip, Sampling(num_frames=8))).segments[0]
    # a range whose frames are the first segment's: nothing to encode
    same = Sampling(end=engine.plan(clip).index.times[first.indices[-1]])
    assert engine.plan(Clip(clip, same)).segments[0].indices == first.indices
    list(stream_reply(engine, conversation, "And there?", [Clip(clip, same)], settings))
    assert calls.clips == [2]
    # the second half in two segments: both new
    list(stream_reply(engine, conversation, "And later?", [Clip(clip, Sampling(num_frames=8, start=2.5))], settings))
    assert calls.clips == [2, 2]
    # a new conversation asking the first again: all cached
    list(stream_reply(engine, Conversation(), "What happens?", [Clip(clip, Sampling(num_frames=8))], settings))
    assert calls.clips == [2, 2]
    # at a rate, segments sit on a grid: a longer range encodes only the segments that are new
    list(stream_reply(engine, conversation, "At 2 fps?", [Clip(clip, Sampling(fps=2, end=2.0))], settings))
    list(stream_reply(engine, conversation, "And to 4 s?", [Clip(clip, Sampling(fps=2, end=4.0))], settings))
    assert calls.clips == [2, 2, 2, 2]


def test_segment_answers_match_a_fresh_prefill(setup):
    """A follow-up over a multi-segment conversation (KV cache reused) answers as a fresh
    conversation holding the same turns."""
    root, model, clip, _ = setup
    engine = Engine.from_checkpoint(model)
    settings = GenerationSettings(6)
    clips = [Clip(clip, Sampling(num_frames=8)), Clip(clip, Sampling(start=1, end=3))]
    conversation = Conversation()
    list(stream_reply(engine, conversation, "What happens?", clips[:1], settings))
    follow = "".join(stream_reply(engine, conversation, "Compare with <video>.", clips[1:], settings))
    fresh = Conversation(conversation.messages[:-2], [clips[0]])
    fresh.messages = conversation.messages[:1] + [conversation.messages[1]]
    again = Engine.from_checkpoint(model)
    assert "".join(stream_reply(again, fresh, "Compare with <video>.", clips[1:], settings)) == follow


def test_too_many_segments_for_the_context_are_refused_before_any_work(setup):
    root, model, clip, _ = setup
    engine = Engine.from_checkpoint(model)
    calls = TowerCalls(engine)
    conversation = Conversation()
    with pytest.raises(ConversationError, match=r"256 video segments .* exceed the model's context of 1024 .*: "
                                                r"\d+ segment\(s\) of 4 frames would fit") as err:
        list(stream_reply(engine, conversation, "What happens?", [Clip(clip, Sampling(num_frames=1024))]))
    fits = int(str(err.value).split(": ")[-1].split(" ")[0])
    assert calls.clips == [] and conversation.messages == []
    # as many as it says fit are answered
    answer = "".join(stream_reply(engine, conversation, "What happens?",
                                  [Clip(clip, Sampling(num_frames=4 * fits))], GenerationSettings(4)))
    assert conversation.messages[-1].content == answer.strip() and sum(calls.clips) == fits


def test_images_mix_with_videos_in_one_conversation(setup):
    root, model, clip, image = setup
    engine = Engine.from_checkpoint(model)
    usage: dict = {}
    conversation = Conversation()
    list(stream_reply(engine, conversation, "<video> and <video>: the same table?",
                      [Clip(image, Sampling(num_frames=12)), clip], GenerationSettings(4), usage=usage))
    picture, video = usage["videos"]
    assert picture["segments"] == [{"start": 0.0, "end": 0.0, "timestamps": [0.0] * 4}] and picture["frames"] == 4
    assert len(video["segments"]) == 1 and video["duration"] == 4.7
    assert [str(v.path) for v in conversation.videos] == [str(image), str(clip)]


# ----------------------------------------------------------------------------------------------
# CLI and chat


def test_ask_reads_a_range_in_segments_and_prints_the_times(setup, capsys):
    root, model, clip, _ = setup
    assert main(["ask", str(clip), "What happens?", "--model", str(model), "--max-new-tokens", "4", "--json",
                 "--num-frames", "8", "--start", "0:01", "--end", "4"]) == 0
    result = json.loads(capsys.readouterr().out)
    (video,) = result["videos"]
    assert video["sampling"] == {"num_frames": 8, "start": 1.0, "end": 4.0} and video["frames"] == 8
    assert [(s["start"], s["end"]) for s in video["segments"]] == [(1.0, 2.7), (2.7, 4.0)]
    times = [t for s in video["segments"] for t in s["timestamps"]]
    assert times == sorted(times) and times[0] == 1.0 and times[-1] == 4.0
    engine = Engine.from_checkpoint(model)
    expected = "".join(stream_reply(engine, Conversation(), "What happens?",
                                    [Clip(clip, Sampling(num_frames=8, start=1, end=4))], GenerationSettings(4)))
    assert result["answer"] == expected.strip()


@pytest.mark.parametrize("flags, message", [
    (["--start", "9"], "long.mp4: the range starts at 0:09.0, after the end of the video (0:04.7)"),
    (["--start", "3", "--end", "2"], "the range ends (0:02) before it starts (0:03)"),
    (["--num-frames", "0"], "num_frames must be between 1 and 1024"),
    (["--fps", "0"], "fps must be a number > 0"),
    (["--fps", "1000"], "exceed the model's context"),
])
def test_ask_bad_sampling_is_one_line_exit_2(setup, capsys, flags, message):
    root, model, clip, _ = setup
    assert main(["ask", str(clip), "What happens?", "--model", str(model), *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_chat_video_command_takes_a_range(setup, monkeypatch, capsys):
    root, model, clip, _ = setup
    assert parse_video_command(f"{clip} --start 0:01 --end=3 --num-frames 8") == \
        Clip(clip, Sampling(num_frames=8, start=1.0, end=3.0))
    assert parse_video_command(str(clip)) == Clip(clip)
    for bad, message in ((f"{clip} --start", "needs a value"), (f"{clip} --frames 3", "unknown option"),
                         (f"{clip} --num-frames x", "is not a number"), ("--start 1", "needs a path")):
        with pytest.raises(ConfigError, match=message):
            parse_video_command(bad)
    lines = iter([f"/video {clip} --start 9", f"/video {clip} --num-frames 8 --start 1", "What happens?", "/history"])

    def typed(prompt=""):
        line = next(lines, None)
        if line is None:
            raise EOFError
        return line

    monkeypatch.setattr("builtins.input", typed)
    engine = Engine.from_checkpoint(model)
    assert run_chat(engine, [], GenerationSettings(4), "tiny") == 0
    out = capsys.readouterr().out
    assert "error: " + str(clip) + ": the range starts at 0:09.0, after the end of the video" in out
    assert "8 frames in 2 segments [0:01.0-0:03.1] [0:03.1-0:04.7]" in out
    assert "(num_frames=8, start=1.0)" in out and "hilight> " in out


def _user(text: str):
    from hilight.text import Message

    return Message("user", text)


# ----------------------------------------------------------------------------------------------
# long clips in the generator, in training and in evaluation


@pytest.mark.parametrize("frames", [8, 12])
def test_a_long_clips_segments_fall_on_its_shots(frames):
    """3 shots of 30 frames read as 3 segments: each segment's frames lie in one shot, in order."""
    from hilight.synth.dataset import LONG_SHOT_FPS, LONG_SHOT_SECONDS

    per_shot = int(LONG_SHOT_FPS * LONG_SHOT_SECONDS)
    times = [i / LONG_SHOT_FPS for i in range(3 * per_shot)]
    segments = plan_segments(times, frames, Sampling(num_frames=3 * frames), list(range(frames)), "long.mp4")
    assert [{i // per_shot for i in s.indices} for s in segments] == [{0}, {1}, {2}]


def test_long_clip_questions_need_the_right_shot(tmp_path):
    from hilight.evaluation.scoring import extract
    from hilight.synth.billiards import TableConfig
    from hilight.synth.dataset import generate_long_split

    path = generate_long_split(tmp_path, "val", 3, seed=5, frames_per_segment=4, cfg=TableConfig(image_size=64))
    records = json.loads(path.read_text())
    truth = json.loads((tmp_path / "val-long-truth.json").read_text())
    assert sorted(truth) == [f"long-val-{i:05d}.mp4" for i in range(3)] and all(len(t) == 3 for t in truth.values())
    ordinals = {"first": 0, "second": 1, "third": 2}
    for r in records:
        assert r["sampling"] == {"num_frames": 12} and (tmp_path / "videos" / r["video"]).is_file()
        (qtype,), (value,) = r["meta"]["types"], r["meta"]["truth"]
        answer = r["conversations"][1]["value"]
        assert extract(r["meta"]["kinds"][0], answer) == value  # the canonical answer states the truth
        shots = truth[r["video"]]
        if qtype == "which_shot_pocketed":
            colour = next(c for c in ("yellow", "blue", "red", "purple", "orange", "green", "maroon", "black", "pink")
                          if c in r["conversations"][0]["value"])
            where = [n for n, s in enumerate(shots) for p in s["pocketed"] if p["ball"] == colour]
            assert where == [ordinals[value]]
        elif qtype == "shot_balls_left":
            nth = next(k for k in ordinals if k in r["conversations"][0]["value"])
            assert value == str(len(shots[ordinals[nth]]["balls_left"]))
    assert {r["meta"]["types"][0] for r in records} >= {"shot_first_pocketed", "shot_balls_left", "shot_cue_direction"}


@pytest.mark.parametrize("answer, value", [("In the second shot.", "second"), ("the 3rd one", "third"),
                                           ("First.", "first"), ("In none of them.", "none"), ("Red.", None)])
def test_shot_answers_are_scored_by_their_ordinal(answer, value):
    from hilight.evaluation.scoring import extract

    assert extract("shot", answer) == value


def test_training_records_with_sampling_are_read_in_segments(setup, tmp_path):
    from hilight.checkpoint import load_checkpoint
    from hilight.data import (
        FeatureCache,
        VideoQADataset,
        collate_samples,
        encode_records,
        extract_features,
        record_blocks,
        tower_identity,
    )

    root, model_dir, clip, _ = setup
    model, tokenizer = load_checkpoint(model_dir)
    chat = ChatTokenizer(tokenizer, model.config.tokens_per_video)
    record = {"id": "r", "video": clip.name, "sampling": {"num_frames": 8},
              "conversations": [{"from": "human", "value": "<video>\nWhat happens?"}, {"from": "gpt", "value": "A shot."}]}
    plain = {**record, "id": "p", "sampling": None}
    bad = {**record, "id": "b", "sampling": {"start": 99}}
    samples, rejected = encode_records([record, plain, bad], clip.parent, chat, 512, "right", model.config.video)
    assert [b.id for b in rejected] == ["b"] and "the range starts at 1:39.0, after the end" in rejected[0].reason
    sampled, default = samples
    engine = Engine(model, tokenizer)
    planned = engine.plan(Clip(clip, Sampling(num_frames=8)))
    # the same ids as the engine gives the same question at inference
    prompt = engine.encode_prompt([_user("<video>\nWhat happens?")], [planned]).input_ids
    assert sampled.encoded.input_ids[:len(prompt) - 3] == prompt[:-3]
    assert sampled.blocks() == [(clip, s.indices) for s in planned.segments] and default.blocks() == [(clip, None)]
    cache = FeatureCache(tmp_path / "cache", tower_identity(model))
    blocks = record_blocks(record, clip.parent, model.config.video) + record_blocks(plain, clip.parent, model.config.video)
    extract_features(model, blocks, cache, torch.float32)
    dataset = VideoQADataset(samples, model.config.video, cache, rejected)
    batch = collate_samples([dataset[0], dataset[1]], chat.pad_id)
    assert batch["towers"].video.shape[0] == 3  # two segments, then the whole clip
    # a segment's cached tower outputs are those of its frames; TokenMining gives the engine's rows
    embeds = model.video_embeddings(batch["towers"])
    torch.testing.assert_close(embeds[:2], engine.segment_embeddings([planned]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(embeds[2], engine.video_embeddings(clip), rtol=1e-4, atol=1e-5)


def test_evaluation_reads_sampled_records_with_a_first_segment_baseline(setup, tmp_path):
    from hilight.evaluation.qa import evaluate

    root, model_dir, clip, _ = setup
    records = [{"id": f"q{i}", "video": clip.name, "sampling": {"num_frames": 8},
                "conversations": [{"from": "human", "value": f"<video>\nIn the second shot, question {i}?"},
                                  {"from": "gpt", "value": "Two coloured balls are left on the table."}],
                "meta": {"types": ["shot_balls_left"], "kinds": ["number"], "truth": ["2"]}} for i in range(3)]
    data = tmp_path / "long.json"
    data.write_text(json.dumps(records))
    engine = Engine.from_checkpoint(model_dir)
    result = evaluate(engine, data, clip.parent, tmp_path / "report", GenerationSettings(6))
    assert result["overall"]["n"] == 3 and {"blind", "first_segment", "majority"} <= set(result["overall"])
    answer = result["answers"][0]
    expected = engine.answer([_user(records[0]["conversations"][0]["value"])],
                             [Clip(clip, Sampling(num_frames=8))], GenerationSettings(6))
    assert answer["answer"] == expected
    first = engine.plan(Clip(clip, Sampling(num_frames=8))).segments[0]
    alone = engine.plan(Clip(clip, Sampling(end=engine.plan(clip).index.times[max(first.indices)])))
    assert alone.segments[0].indices == first.indices  # the baseline sees exactly the first segment's frames
    assert "first segment only" in (tmp_path / "report" / "report.md").read_text()


def test_evaluation_encodes_each_video_once_however_its_questions_sort(setup, tmp_path):
    """Questions of three clips, each clip's of every length: the evaluation takes one clip's
    questions together, so with room for two clips in the engine's cache each clip is decoded
    and run through the towers once (in order of length alone: once a question)."""
    from hilight.evaluation.qa import load_items, run

    root, model_dir, clip, _ = setup
    for k in (1, 2):
        write_video(tmp_path / f"clip{k}.mp4", moving_balls_clip(12, 64, seed=k))
    shutil.copy(clip, tmp_path / "clip0.mp4")
    records = [{"id": f"c{k}-q{n}", "video": f"clip{k}.mp4",
                "conversations": [{"from": "human", "value": "<video>\n" + "Which ball moved" + "?" * n},
                                  {"from": "gpt", "value": "The red ball."}]} for n in range(4) for k in range(3)]
    data = tmp_path / "q.json"
    data.write_text(json.dumps(records))
    items, problems = load_items(data, tmp_path)
    engine = Engine.from_checkpoint(model_dir)
    engine.cache_size = 2
    calls = TowerCalls(engine)
    assert run(engine, items, GenerationSettings(4), batch_size=3, blind=False) == {} and not problems
    assert len(calls.clips) == 3 and all(it.answer for it in items)
    alone = engine.answer([_user(records[0]["conversations"][0]["value"])], [tmp_path / "clip0.mp4"],
                          GenerationSettings(4))
    assert items[0].answer == alone  # batched with other clips' questions, answered as alone


def test_a_ten_hour_video_at_one_fps_is_refused_by_the_context_check(setup):
    """Planning needs only the demux pass's timestamps; 36,000 frames at 1 fps are 9,000 segments
    of the tiny model's 4, refused before anything is decoded."""
    from fractions import Fraction

    from hilight.inference.engine import Planned
    from hilight.video import FrameIndex

    root, model, clip, _ = setup
    engine = Engine.from_checkpoint(model)
    index = FrameIndex(pts=list(range(36_000)), keyframes=[0], time_base=Fraction(1))  # 10 h at 1 frame/s
    segments = plan_segments(index.times, 4, Sampling(fps=1), [0, 1, 2, 3], "ten-hours.mp4")
    assert len(segments) == 9_000
    planned = Planned(Clip(clip, Sampling(fps=1)), index, segments, [f"k{i}" for i in range(len(segments))])
    with pytest.raises(ConversationError, match=r"9000 video segments .* segment\(s\) of 4 frames would fit"):
        engine.encode_prompt([_user("<video>\nWhat happens?")], [planned])
