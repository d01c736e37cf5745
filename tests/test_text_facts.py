import pytest

from hilight.config import VideoInputConfig
from hilight.errors import DataError
from hilight.evaluation.qa import Item
from hilight.evaluation.scoring import extract
from hilight.recipes.billiards_small.text_facts import (
    ball_cells,
    cell,
    fact_lines,
    reading_records,
    reasoned_records,
    reasoning,
    reasoning_steps,
    text_facts_records,
)


def _tracks() -> dict:
    """10 frames: the cue ball rolls along the bottom edge left to right; the red ball sits near
    the top until it is pocketed after frame 5."""
    xy = []
    for f in range(10):
        red = (0.5, 0.12) if f <= 5 else (-1.0, -1.0)
        xy.append([0.05 + 0.1 * f, 0.9, *red])
    return {"names": ["cue", "red"], "fps": 10, "radius": 0.02, "xy": xy}


def test_fact_lines_give_each_ball_its_cell_in_each_shown_frame():
    # four frames of ten, spread as the model samples them: frames 0, 3, 6 and 9
    lines = fact_lines(_tracks(), VideoInputConfig(num_frames=4))
    assert lines == ["the cue ball: a8 c8 f8 h8", "the red ball: e1 e1 off off"]
    # the lines follow the frames the model is shown: two frames are frames 0 and 9
    assert fact_lines(_tracks(), VideoInputConfig(num_frames=2)) == ["the cue ball: a8 h8", "the red ball: e1 off"]
    assert cell(0.0, 0.0) == "a1" and cell(0.999, 0.999) == "h8" and cell(1.0, 1.0) == "h8"


def test_text_facts_records_replace_each_video_by_its_lines():
    captions = [{"video": "a.mp4", "tracks": _tracks()}, {"video": "b.mp4", "tracks": _tracks()}]
    records = [
        {"id": "one", "video": "a.mp4", "meta": {"types": ["x"]},
         "conversations": [{"from": "human", "value": "<video>\nWhich ball?"}, {"from": "gpt", "value": "Red."}]},
        {"id": "two", "video": ["a.mp4", "b.mp4"],
         "conversations": [{"from": "human", "value": "First <video> then <video>: same?"},
                           {"from": "gpt", "value": "Yes."}]},
        {"id": "long", "video": "a.mp4", "sampling": {"num_frames": 8},
         "conversations": [{"from": "human", "value": "<video>\n?"}, {"from": "gpt", "value": "."}]},
    ]
    out = text_facts_records(records, captions, VideoInputConfig(num_frames=2))
    assert [r["id"] for r in out] == ["one", "two"]  # segment-read records are not the task's
    assert "video" not in out[0] and out[0]["meta"] == {"types": ["x"]}
    assert out[0]["conversations"][0]["value"] == "the cue ball: a8 h8\nthe red ball: e1 off\nWhich ball?"
    question = out[1]["conversations"][0]["value"]
    assert question.count("the cue ball:") == 2 and "<video>" not in question and question.endswith(": same?")
    with pytest.raises(DataError, match="no tracks for c.mp4"):
        text_facts_records([{**records[0], "video": "c.mp4"}], captions, VideoInputConfig(num_frames=2))


def test_reading_records_ask_a_cell_or_a_line_of_the_facts_or_of_the_video():
    clips = [{"video": "a.mp4", "tracks": _tracks()}]
    cfg = VideoInputConfig(num_frames=4)  # cue a8 c8 f8 h8, red e1 e1 off off
    text = reading_records(clips, cfg, 6, seed=0)
    video = reading_records(clips, cfg, 6, seed=0, asked_of="video")
    truths = {"cue": ["a8", "c8", "f8", "h8"], "red": ["e1", "e1", None, None]}
    for j, (t, v) in enumerate(zip(text, video, strict=True)):
        question, answer = (turn["value"] for turn in t["conversations"])
        ball = question.split("the ")[-1].split(" ball")[0]
        if j % 2 == 0:  # a cell: the one the track holds in the frame asked about
            k = int(question.rsplit("frame ", 1)[1].rstrip("?")) - 1
            where = f"at {truths[ball][k]}" if truths[ball][k] else "off the table"
            assert answer == f"In frame {k + 1} the {ball} ball was {where}."
        else:  # a line: every shown frame's cell
            assert answer == " ".join(c or "off" for c in truths[ball]) + "."
        assert question.startswith("the cue ball: a8 c8 f8 h8\nthe red ball: e1 e1 off off\n") and "video" not in t
        # asked of the video: the same draw, the clip in place of its lines
        assert v["video"] == "a.mp4" and v["conversations"][1]["value"] == answer
        assert v["conversations"][0]["value"].startswith("<video>\nWhere was the")
    with pytest.raises(ValueError, match="asked_of"):
        reading_records(clips, cfg, 1, seed=0, asked_of="audio")


def _bounce() -> dict:
    """4 frames: the cue ball rolls right, bounces off the right cushion back to the left and
    stops; the red ball is hit in frame 2 and pocketed before frame 3; the blue ball never moves."""
    cue = [(0.3, 0.5), (0.6, 0.5), (0.95, 0.55), (0.7, 0.6)]
    red = [(0.8, 0.3), (0.8, 0.3), (0.9, 0.1), (-1.0, -1.0)]
    blue = [(0.1, 0.9)] * 4
    return {"names": ["cue", "red", "blue"], "fps": 4, "radius": 0.02,
            "xy": [[*c, *r, *b] for c, r, b in zip(cue, red, blue, strict=True)]}


@pytest.mark.parametrize(("qtype", "question", "step"), [
    ("cue_direction", "Where did the cue ball go?", "The cue ball went from c5 to e5."),
    ("cushions", "How many cushions?", "The cue ball turned at h5."),
    ("pocket", "Which pocket did the red ball go into?", "The red ball was last at h1."),
    ("first_contact", "Which ball was hit first?", "The first ball to move went from g3 to h1."),
    ("balls_left", "How many are left?", None),
])
def test_reasoning_reads_the_step_from_the_fact_lines(qtype, question, step):
    video = VideoInputConfig(num_frames=4)
    assert fact_lines(_bounce(), video) == ["the cue ball: c5 e5 h5 f5", "the red ball: g3 g3 h1 off",
                                            "the blue ball: a8 a8 a8 a8"]
    assert reasoning(qtype, question, [ball_cells(_bounce(), video)], [_bounce()["names"]]) == step


def test_reasoning_of_still_and_straight_clips_and_pairs():
    video = VideoInputConfig(num_frames=2)
    names = [_tracks()["names"]]
    assert reasoning("cushions", "?", [ball_cells(_tracks(), video)], names) == "The cue ball went straight."
    still = {**_tracks(), "xy": [[0.05, 0.9, 0.5, 0.12]] * 10}
    assert reasoning("cue_direction", "?", [ball_cells(still, video)], names) == "The cue ball stayed at a8."
    assert reasoning("first_contact", "?", [ball_cells(still, video)], names) == "No ball moved."
    both = [ball_cells(_tracks(), video), ball_cells(still, video)]
    assert reasoning("which_more_left", "?", both, names * 2) == "Balls left: 0 and 1."


def test_reasoned_records_say_the_step_before_the_answer_and_score_as_the_answer():
    captions = [{"video": "a.mp4", "tracks": _bounce()}]
    records = [{"id": "multi", "video": "a.mp4", "meta": {"types": ["cushions", "scratch", "cue_direction"]},
                "conversations": [{"from": "human", "value": "<video>\nHow many cushions?"},
                                  {"from": "gpt", "value": "The cue ball hit one cushion."},
                                  {"from": "human", "value": "Did the cue ball fall in?"},
                                  {"from": "gpt", "value": "No, the cue ball stayed on the table."},
                                  {"from": "human", "value": "Where did it go first?"},
                                  {"from": "gpt", "value": "The cue ball moved towards the right."}]}]
    plain = text_facts_records(records, captions, VideoInputConfig(num_frames=4))[0]["conversations"]
    turns = text_facts_records(records, captions, VideoInputConfig(num_frames=4), reasoned=True)[0]["conversations"]
    answers = [t["value"] for t in turns if t["from"] == "gpt"]
    assert answers == ["The cue ball turned at h5. The cue ball hit one cushion.",
                       "No, the cue ball stayed on the table.",
                       "The cue ball went from c5 to e5. The cue ball moved towards the right."]
    assert [t["value"] for t in turns if t["from"] == "human"] == [t["value"] for t in plain if t["from"] == "human"]
    # the step names no value the scorer could take for the answer's
    assert extract("number", answers[0]) == "1" and extract("direction", answers[2]) == "right"


def test_reasoned_pocket_names_the_asked_ball_not_the_first_line():
    captions = [{"video": "a.mp4", "tracks": _bounce()}]
    records = [{"id": "p", "video": "a.mp4", "meta": {"types": ["pocket"]},
                "conversations": [{"from": "human", "value": "<video>\nWhich pocket did the red ball go into?"},
                                  {"from": "gpt", "value": "The red ball went into the top-right pocket."}]}]
    out = text_facts_records(records, captions, VideoInputConfig(num_frames=4), reasoned=True)
    assert out[0]["conversations"][1]["value"] == ("The red ball was last at h1. "
                                                   "The red ball went into the top-right pocket.")


def test_reasoned_records_keep_their_videos_and_leave_segment_reads_alone():
    captions = [{"video": "a.mp4", "tracks": _bounce()}]
    asked = {"id": "d", "video": "a.mp4", "meta": {"types": ["cue_direction"]},
             "conversations": [{"from": "human", "value": "<video>\nWhere did the cue ball go?"},
                               {"from": "gpt", "value": "The cue ball moved towards the right."}]}
    segments = {**asked, "id": "s", "sampling": {"num_frames": 8}}
    out = reasoned_records([asked, segments], captions, VideoInputConfig(num_frames=4))
    assert out[0]["video"] == "a.mp4" and out[0]["conversations"][0] == asked["conversations"][0]
    assert out[0]["conversations"][1]["value"] == "The cue ball went from c5 to e5. The cue ball moved towards the right."
    assert out[1] is segments


def test_reasoning_steps_score_the_step_word_for_word_and_the_answer_after_it():
    reference = "The cue ball went from c5 to e5. The cue ball moved towards the right."
    answers = ["The cue ball went from c5 to e5. The cue ball moved towards the right.",  # step and answer right
               "The cue ball went from c5 to e5. The cue ball moved towards the left.",  # step right, answer wrong
               "The cue ball went from c5 to d4. The cue ball moved towards the right.",  # step wrong, answer right
               "The cue ball went from c5 to e. The cue ball moved up."]  # a prefix of the step is not the step
    items = [Item(id=str(n), messages=[], videos=[], reference=reference, qtype="cue_direction", kind="direction",
                  truth="right", answer=a) for n, a in enumerate(answers)]
    items.append(Item(id="other", messages=[], videos=[], reference="Yes.", qtype="scratch", kind="yesno",
                      truth="yes", answer="Yes."))
    steps = reasoning_steps(items)
    assert list(steps) == ["cue_direction"]
    assert steps["cue_direction"] == {"n": 4, "step_right": 0.5, "accuracy_step_right": 0.5,
                                      "accuracy_step_wrong": 0.5}
