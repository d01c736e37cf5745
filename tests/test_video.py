import logging
import struct
import zlib
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from PIL import Image

from hilight.cli import main
from hilight.config import VideoInputConfig
from hilight.video import (
    FrameIndex,
    VideoError,
    choose_frames,
    decode_video,
    load_video,
    preprocess,
    sample_indices,
    write_video,
)

CFG = VideoInputConfig()


def frame_pattern(n: int, h: int = 48, w: int = 64) -> np.ndarray:
    """Frames whose content encodes their number: a bright bar at x = 2*i plus a colour ramp,
    so a decoded frame can be told apart from its neighbours."""
    frames = np.zeros((n, h, w, 3), dtype=np.uint8)
    frames[..., 1] = 90
    for i in range(n):
        frames[i, :, (2 * i) % w: (2 * i) % w + 2] = 255
        frames[i, : h // 4, :, 0] = (i * 7) % 256
    return frames


def frame_number(image: np.ndarray, n: int) -> int:
    """Recover which frame of :func:`frame_pattern` an (RGB, original-size) image is."""
    h, w = image.shape[:2]
    bar = int(np.argmax(image[h // 2:, :, 2].astype(int).sum(0)))
    red = int(image[: h // 4, :, 0].astype(int).mean())
    candidates = [i for i in range(n) if abs((2 * i) % w - bar) <= 1]
    return min(candidates, key=lambda i: abs((i * 7) % 256 - red))


# ---------------------------------------------------------------------------------------------
# a corpus of real files, written once per test session

CODECS = {
    "h264.mp4": ("libx264", "yuv420p", {"g": "12"}),
    "hevc.mp4": ("libx265", "yuv420p", {"x265-params": "keyint=12:log-level=none"}),
    "mpeg4.mp4": ("mpeg4", "yuv420p", {"g": "12"}),
    "h264.mov": ("libx264", "yuv420p", {"g": "12"}),
    "h264.mkv": ("libx264", "yuv420p", {"g": "12"}),
    "vp8.webm": ("libvpx", "yuv420p", {"g": "12"}),
    "vp9.webm": ("libvpx-vp9", "yuv420p", {"g": "12"}),
    "av1.mkv": ("libsvtav1", "yuv420p", {"g": "12", "preset": "12"}),
    "mpeg4.avi": ("mpeg4", "yuv420p", {"g": "12"}),
    "anim.gif": ("gif", "rgb8", {}),
    "gray.mkv": ("ffv1", "gray", {}),
    "tenbit.mkv": ("libx264", "yuv420p10le", {"g": "12"}),
}
N_FRAMES = 40


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    frames = frame_pattern(N_FRAMES)
    files = {}
    for name, (codec, pix_fmt, options) in CODECS.items():
        files[name] = write_video(root / name, frames, fps=10, codec=codec, pix_fmt=pix_fmt, options=options)
    return root, files


@pytest.mark.parametrize("name", sorted(CODECS))
def test_every_container_and_codec_decodes_the_right_frames(corpus, name):
    _, files = corpus
    video = decode_video(files[name], CFG)
    assert video.total_frames == N_FRAMES
    assert video.indices == sample_indices(N_FRAMES, 12)
    assert video.frames.shape == (12, 48, 64, 3)
    if name != "gray.mkv":  # grey loses the colour ramp used to identify frames
        assert [frame_number(f, N_FRAMES) for f in video.frames] == video.indices
    assert video.timestamps == pytest.approx([i / 10 for i in video.indices], abs=0.011)
    x = load_video(files[name], CFG)
    assert x.shape == (12, 3, 224, 224) and x.dtype == torch.float32 and torch.isfinite(x).all()


@pytest.mark.parametrize("name", ["h264.mp4", "h264.mkv", "vp9.webm", "hevc.mp4"])
def test_seeking_returns_exactly_the_sequential_frames(tmp_path, name):
    codec, pix_fmt, options = CODECS[name]
    frames = frame_pattern(300, 48, 64)
    path = write_video(tmp_path / name, frames, fps=25, codec=codec, pix_fmt=pix_fmt, options=options)
    for sampling in ("uniform", "midpoint", "fps"):
        cfg = VideoInputConfig(sampling=sampling, sample_fps=4.0)
        seek = decode_video(path, cfg, strategy="seek")
        seq = decode_video(path, cfg, strategy="sequential")
        assert seek.indices == seq.indices
        assert seek.timestamps == seq.timestamps
        np.testing.assert_array_equal(seek.frames, seq.frames)
    assert decode_video(path, CFG).strategy == "seek"  # 25 keyframes over 300 frames: seeking wins


def test_short_clips_decode_sequentially_and_repeat_frames(tmp_path):
    path = write_video(tmp_path / "five.mp4", frame_pattern(5), fps=10)
    video = decode_video(path, CFG)
    assert video.strategy == "sequential"
    assert video.indices == np.linspace(0, 4, 12).astype(int).tolist()
    assert [frame_number(f, 5) for f in video.frames] == video.indices


def test_sampling_rules():
    index = FrameIndex(pts=list(range(0, 1000, 10)), keyframes=[0], time_base=Fraction(1, 100))  # 100 frames, 10 s
    assert choose_frames(index, VideoInputConfig(num_frames=4)) == [0, 33, 66, 99]
    assert choose_frames(index, VideoInputConfig(num_frames=4, sampling="midpoint")) == [12, 37, 62, 87]
    # 4 frames 0.5 s apart around the middle of 0 .. 9.9 s: 4.2, 4.7, 5.2, 5.7 s
    assert choose_frames(index, VideoInputConfig(num_frames=4, sampling="fps", sample_fps=2.0)) == [42, 47, 52, 57]
    # a window longer than the clip falls back to spreading over the whole clip
    assert choose_frames(index, VideoInputConfig(num_frames=4, sampling="fps", sample_fps=0.1)) == [0, 33, 66, 99]


def test_variable_frame_rate_uses_real_timestamps(tmp_path):
    path = tmp_path / "vfr.mkv"
    frames = frame_pattern(30)
    gaps = [1 if i < 20 else 10 for i in range(30)]  # 20 frames 0.1 s apart, then 10 frames 1 s apart
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=Fraction(10))
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        s.codec_context.time_base = Fraction(1, 10)
        pts = 0
        for image, gap in zip(frames, gaps, strict=True):
            f = av.VideoFrame.from_ndarray(image, format="rgb24")
            f.pts, f.time_base = pts, Fraction(1, 10)
            pts += gap
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    uniform = decode_video(path, VideoInputConfig(num_frames=6))
    assert uniform.total_frames == 30 and uniform.indices == [0, 5, 11, 17, 23, 29]
    assert uniform.timestamps == pytest.approx([0.0, 0.5, 1.1, 1.7, 5.0, 11.0], abs=0.01)
    assert [frame_number(f, 30) for f in uniform.frames] == uniform.indices
    # 1.8 s apart around the middle (5.5 s): 2.8, 4.6, 6.4, 8.2 -> the slow frames at 3, 5, 6, 8 s
    timed = decode_video(path, VideoInputConfig(num_frames=4, sampling="fps", sample_fps=1 / 1.8))
    assert timed.indices == [21, 23, 24, 26]
    assert timed.timestamps == pytest.approx([3.0, 5.0, 6.0, 8.0], abs=0.01)


def test_rotation_metadata_is_applied(tmp_path):
    path = tmp_path / "phone.mp4"
    image = np.zeros((32, 64, 3), np.uint8)
    image[:4, :, 0] = 255  # red stripe along the top edge
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=Fraction(10))
        s.width, s.height, s.pix_fmt = 64, 32, "yuv420p"
        s.set_display_rotation(90)
        for _ in range(5):
            for p in s.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    frame = decode_video(path, VideoInputConfig(num_frames=2)).frames[0]
    assert frame.shape == (64, 32, 3)  # portrait
    assert frame[:, :4, 0].mean() > 200  # rotated 90 degrees counter-clockwise: the top edge is now on the left


@pytest.mark.parametrize("suffix", ["png", "jpg", "webp"])
def test_still_images_become_repeated_frames(tmp_path, suffix):
    path = tmp_path / f"still.{suffix}"
    Image.fromarray(frame_pattern(1, 60, 80)[0]).save(path)
    video = decode_video(path, CFG)
    assert video.total_frames == 1 and video.indices == [0] * 12
    assert np.array_equal(video.frames[0], video.frames[-1])


def test_4k_still_is_scaled_while_decoding(tmp_path):
    path = tmp_path / "4k.png"
    big = np.zeros((2160, 3840, 3), np.uint8)
    big[:, :1920] = (200, 30, 30)
    Image.fromarray(big).save(path)
    video = decode_video(path, VideoInputConfig(num_frames=2))
    assert video.frames.shape == (2, 448, 448, 3)  # FFmpeg did the big step, not a float tensor
    x = load_video(path, VideoInputConfig(num_frames=2))
    assert x.shape == (2, 3, 224, 224)
    crop = load_video(path, VideoInputConfig(num_frames=2, resize="center_crop"))
    assert crop.shape == (2, 3, 224, 224)


def test_odd_and_tiny_sizes(tmp_path):
    odd = write_video(tmp_path / "odd.mkv", frame_pattern(8, 17, 33), codec="ffv1", pix_fmt="yuv444p")
    assert decode_video(odd, CFG).frames.shape == (12, 17, 33, 3)
    tiny = write_video(tmp_path / "tiny.mp4", frame_pattern(8, 16, 16), codec="libx264")
    assert load_video(tiny, CFG).shape == (12, 3, 224, 224)


def test_center_crop_keeps_the_aspect_ratio():
    frames = np.zeros((1, 100, 300, 3), np.uint8)
    frames[:, :, 100:200] = 255  # a white middle third
    crop = preprocess(frames, VideoInputConfig(num_frames=1, resize="center_crop"))
    squash = preprocess(frames, VideoInputConfig(num_frames=1))
    assert crop[0, 0, :, 2:-2].min() > 1.5  # only the white middle survives the crop
    assert squash[0, 0, :, 0].max() < -1.0  # squashing keeps the dark left edge


# ---------------------------------------------------------------------------------------------
# bad input


def _truncated(tmp_path, faststart: bool):
    path = write_video(tmp_path / f"full-{faststart}.mp4", frame_pattern(60, 96, 128), fps=10,
                       container_options={"movflags": "+faststart"} if faststart else {})
    data = path.read_bytes()
    cut = tmp_path / f"cut-{faststart}.mp4"
    cut.write_bytes(data[: len(data) // 2])
    return cut


def _audio_only(tmp_path):
    path = tmp_path / "audio.m4a"
    with av.open(str(path), "w") as c:
        s = c.add_stream("aac", rate=16000)
        for i in range(20):
            f = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            f.sample_rate, f.pts = 16000, i * 1024
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def _huge_png(directory):
    """A PNG header claiming 60000 x 60000 pixels (3.6 gigapixels) over a few bytes of data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 100))
    return _write(directory / "huge.png", data + chunk(b"IEND", b""))


BAD = {
    "missing": (lambda d: d / "missing.mp4", "no such file"),
    "zero bytes": (lambda d: (d / "zero.mp4").write_bytes(b"") and None or d / "zero.mp4", "empty file"),
    "random bytes": (lambda d: _write(d / "random.mp4", np.random.default_rng(0).bytes(5000)), "not a readable"),
    "text": (lambda d: _write(d / "notes.mp4", b"this is not a video\n" * 20), "not a readable"),
    "truncated, index at the end": (lambda d: _truncated(d, faststart=False), "not a readable"),
    "audio only": (_audio_only, "no video stream (only audio)"),
    "directory": (lambda d: d, "not a regular file"),
    "absurd size": (_huge_png, "invalid or absurdly large"),
}


def _write(path, data):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_files_raise_one_line_errors(tmp_path, case):
    make, reason = BAD[case]
    path = make(tmp_path)
    with pytest.raises(VideoError) as err:
        load_video(path, CFG)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and reason in message and "\n" not in message


def test_truncated_faststart_file_decodes_what_it_can(tmp_path, caplog):
    path = _truncated(tmp_path, faststart=True)
    with caplog.at_level(logging.WARNING):
        video = decode_video(path, CFG)
    assert video.frames.shape[0] == 12
    assert caplog.records, "a partially decodable file must say so"


def test_decoding_is_bounded_in_time(corpus):
    _, files = corpus
    with pytest.raises(VideoError, match="took longer than"):
        decode_video(files["h264.mp4"], VideoInputConfig(max_decode_seconds=0.0))


def test_frames_command_writes_a_contact_sheet(corpus, tmp_path, capsys):
    _, files = corpus
    out = tmp_path / "sheet.png"
    # 16 frames for the bundled model's 8: two segments, one row of 8 each
    assert main(["frames", str(files["vp9.webm"]), "--out", str(out), "--num-frames", "16"]) == 0
    sheet = Image.open(out)
    assert 8 * 160 < sheet.width < 9 * 160 and 2 * 160 < sheet.height < 3 * 160
    # without options: exactly what the (bundled) model sees
    from hilight.checkpoint import BUNDLED_MODEL, read_config
    from hilight.video import contact_sheet

    assert main(["frames", str(files["vp9.webm"]), "--out", str(out)]) == 0
    expected = contact_sheet(files["vp9.webm"], read_config(BUNDLED_MODEL).video)
    assert Image.open(out).size == expected.size and list(Image.open(out).getdata()) == list(expected.getdata())


def test_frames_command_reports_bad_files_in_one_line(tmp_path, capsys):
    bad = _write(tmp_path / "bad.mp4", b"nope")
    assert main(["frames", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.mp4: not a readable media file" in err


def test_a_failed_write_leaves_the_old_clip_and_no_partial_file(tmp_path):
    clip = write_video(tmp_path / "c.mp4", frame_pattern(6))
    before = clip.read_bytes()
    with pytest.raises(Exception):  # noqa: B017 - whichever error the encoder raises
        write_video(clip, frame_pattern(6), codec="no-such-codec")
    assert clip.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.mp4"]


def test_special_files_are_refused_in_one_line_without_reading_them(tmp_path, capsys):
    """A FIFO (reading it would block for ever), a directory, a symlink loop and a device named
    like videos: `ask` and `frames` exit 2 with one line naming the path, at once."""
    import os

    os.mkfifo(tmp_path / "fifo.mp4")
    (tmp_path / "dir.mp4").mkdir()
    (tmp_path / "loop.mp4").symlink_to(tmp_path / "loop.mp4")
    cases = {"fifo.mp4": "not a regular file", "dir.mp4": "not a regular file", "loop.mp4": "no such file"}
    paths = {name: str(tmp_path / name) for name in cases}
    if os.path.exists("/dev/zero"):
        cases["/dev/zero"], paths["/dev/zero"] = "not a regular file", "/dev/zero"
    for name, reason in cases.items():
        for argv in (["ask", paths[name], "What happens?"], ["frames", paths[name], "--out", str(tmp_path / "s.png")]):
            assert main(argv) == 2
            err = capsys.readouterr().err  # (ask first notes what the bundled model knows)
            assert err.splitlines()[-1] == f"hilight {argv[0]}: {paths[name]}: {reason}" and "Traceback" not in err
