import pytest

from hilight.config import VideoInputConfig
from hilight.errors import DataError
from hilight.recipes.billiards_small.text_facts import cell, fact_lines, text_facts_records


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
