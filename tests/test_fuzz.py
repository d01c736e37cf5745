"""A fuzz corpus, written by the test itself, through `hilight frames` and `hilight ask`: every
case ends in exit 0 or exit 2 with one line that names the file, never a traceback, within a
time bound, in bounded memory."""

import resource
import signal
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from hilight.cli import main
from hilight.demo import moving_balls_clip
from hilight.video import write_video

CASE_SECONDS = 60


def _png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` and whose data is a few bytes: what a
    decompression bomb looks like to whoever trusts the header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def corpus(root) -> dict[str, object]:
    """{case name: path}: truncations at 10 points, byte flips, empty and text files, odd
    images and sizes, odd names."""
    good = write_video(root / "good.mp4", moving_balls_clip(16, 64, seed=3))
    data = good.read_bytes()
    cases = {"good": good}
    for k in range(10):
        cut = max(1, len(data) * (k + 1) // 11)
        cases[f"cut-{k}"] = _write(root / f"cut-{k}.mp4", data[:cut])
    rng = np.random.default_rng(0)
    for k in range(6):
        flipped = bytearray(data)
        for offset in rng.integers(0, len(data), size=8 * (k + 1)):
            flipped[offset] ^= 0xFF
        cases[f"flip-{k}"] = _write(root / f"flip-{k}.mp4", bytes(flipped))
    cases["empty"] = _write(root / "empty.mp4", b"")
    cases["text"] = _write(root / "notes.mp4", b"not a video at all\n" * 100)
    cases["png-bomb-header"] = _write(root / "bomb.png", _png_declaring(40000, 40000))
    cases["png-bad-data"] = _write(root / "broken.png", _png_declaring(64, 64))
    frames = [Image.new("P", (8, 8), k % 256) for k in range(3000)]
    frames[0].save(root / "many.gif", save_all=True, append_images=frames[1:], duration=10)
    cases["gif-3000-frames"] = root / "many.gif"
    Image.new("RGB", (1, 1), (200, 10, 10)).save(root / "dot.png")
    cases["1x1-image"] = root / "dot.png"
    cases["2x2-video"] = write_video(root / "tiny.mp4", moving_balls_clip(4, 2, seed=1))
    for name in ("a clip with spaces.mp4", "ünïcödé-clip.mp4", "semi;colon$(x).mp4"):
        cases[f"name {name}"] = _write(root / name, data)
    return cases


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def _timeout(signum, frame):
    raise TimeoutError(f"a case ran past {CASE_SECONDS} s")


def test_every_case_of_the_fuzz_corpus_ends_cleanly(tmp_path, capsys):
    previous = signal.signal(signal.SIGALRM, _timeout)
    outcomes = {}
    try:
        for name, path in corpus(tmp_path).items():
            for argv in (["frames", str(path), "--out", str(tmp_path / "sheet.png")],
                         ["ask", str(path), "What happens?", "--max-new-tokens", "4"]):
                signal.alarm(CASE_SECONDS)
                try:
                    code = main(argv)
                finally:
                    signal.alarm(0)
                err = capsys.readouterr().err
                assert "Traceback" not in err, (name, err)
                assert code in (0, 2), (name, argv[0], code, err)
                if code == 2:
                    lines = [line for line in err.splitlines() if not line.startswith("note:")]
                    assert len(lines) == 1 and lines[0].startswith(f"hilight {argv[0]}: {path}: "), (name, err)
                outcomes[(name, argv[0])] = code
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert outcomes[("good", "ask")] == 0 and outcomes[("good", "frames")] == 0
    assert outcomes[("png-bomb-header", "ask")] == 2 and outcomes[("empty", "frames")] == 2
    assert len(outcomes) == 2 * 27
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    assert peak_gib < 6, f"peak RSS {peak_gib:.1f} GiB"


@pytest.mark.parametrize("size", [(40000, 40000), (0, 10)])
def test_absurd_declared_image_sizes_are_refused_before_decoding(tmp_path, size, capsys):
    path = _write(tmp_path / "declared.png", _png_declaring(*size))
    assert main(["frames", str(path), "--out", str(tmp_path / "s.png")]) == 2
    assert f"{path}: " in capsys.readouterr().err
