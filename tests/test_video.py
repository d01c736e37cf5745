import numpy as np
import pytest
import torch

from hilight.config import VideoInputConfig
from hilight.demo import moving_balls_clip
from hilight.video import VideoError, load_video, read_frames, sample_indices, write_video


def test_sample_indices_follow_the_original_rule():
    assert sample_indices(100, 12) == np.linspace(0, 99, 12).astype(int).tolist()
    assert sample_indices(5, 12)[0] == 0 and sample_indices(5, 12)[-1] == 4  # short clips repeat frames
    assert sample_indices(1, 4) == [0, 0, 0, 0]


def test_load_video_shape_and_normalisation(tmp_path):
    frames = moving_balls_clip(num_frames=30, size=64)
    path = write_video(tmp_path / "c.mp4", frames)
    got, times = read_frames(path, 12)
    assert got.shape == (12, 64, 64, 3)
    assert np.abs(got.astype(int) - frames[sample_indices(30, 12)].astype(int)).mean() < 6  # lossy codec
    assert times == sorted(times) and times[0] == 0.0
    x = load_video(path, VideoInputConfig())
    assert x.shape == (12, 3, 224, 224) and x.dtype == torch.float32
    assert -2.0 < x.mean() < 2.0


@pytest.mark.parametrize("content, reason", [
    (None, "no such file"),
    (b"", "empty file"),
    (b"\x00\x01garbage" * 100, "not a readable media file"),
    (b"just some text, not a video\n", "not a readable media file"),
])
def test_bad_files_raise_one_line_video_errors(tmp_path, content, reason):
    path = tmp_path / "bad.mp4"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(VideoError) as err:
        load_video(path, VideoInputConfig())
    assert str(err.value).startswith(str(path)) and reason in str(err.value)
    assert "\n" not in str(err.value)
