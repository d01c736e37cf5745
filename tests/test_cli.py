import subprocess
import sys

import pytest

from hilight.cli import build_parser, main

COMMANDS = ["info", "convert", "frames", "synth", "init", "eval", "data", "extract-features", "train", "align",
            "eval-retrieval", "align-ablation", "merge-lora", "ask", "chat", "serve", "webui", "recipe", "examples", "demo"]


def test_help_lists_the_subcommands():
    out = subprocess.run([sys.executable, "-m", "hilight", "--help"], capture_output=True, text=True, check=True)
    for name in COMMANDS:
        assert name in out.stdout


@pytest.mark.parametrize("name", COMMANDS)
def test_each_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([name, "--help"])
    assert exc.value.code == 0
    assert "usage: hilight " + name in capsys.readouterr().out


def test_demo_runs_end_to_end(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "UNTRAINED" in out and "identical" in out
    assert (tmp_path / "clip.mp4").is_file() and (tmp_path / "tiny-untrained" / "model.safetensors").is_file()


def test_info_on_a_missing_checkpoint_is_one_line(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.strip().endswith("not a checkpoint directory") and err.count("\n") == 1
