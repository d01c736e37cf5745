import subprocess
import sys

import pytest

from hilight.cli import build_parser, main

COMMANDS = ["info", "convert", "frames", "synth", "init", "eval", "data", "extract-features", "train", "align",
            "eval-retrieval", "merge-lora", "ask", "chat", "serve", "webui", "recipe", "examples", "demo", "batch",
            "export-lmms"]


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


HEAVY = ("torch", "transformers", "gradio", "peft", "accelerate")


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["ask", "--help"], ["recipe", "--help"],
                                  ["data", "check", "--help"]])
def test_help_and_version_import_nothing_heavy(argv):
    code = ("import sys\nfrom hilight.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


def _options(parser):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _options(sub)
        elif action.option_strings and action.dest != "help":
            yield parser.prog, action


def test_every_option_has_help_and_shows_its_default():
    import argparse

    from hilight.cli import _HelpFormatter

    formatter = _HelpFormatter("hilight")
    for prog, action in _options(build_parser()):
        assert action.help, (prog, action.option_strings)
        if action.default not in (None, False, argparse.SUPPRESS) and not isinstance(action, argparse._VersionAction):
            assert "%(default)s" in formatter._get_help_string(action), (prog, action.option_strings)


def test_dtype_has_one_spelling_everywhere():
    spellings = {tuple(a.choices) for _, a in _options(build_parser()) if a.dest == "dtype"}
    assert {s for choices in spellings for s in choices} == {"auto", "fp32", "bf16", "fp16"}


def test_verbose_works_before_and_after_the_command():
    parser = build_parser()
    assert parser.parse_args(["-v", "info", "x"]).verbose
    assert parser.parse_args(["info", "x", "-v"]).verbose
    assert not parser.parse_args(["info", "x"]).verbose


def test_a_bug_is_not_reported_as_a_user_error(monkeypatch):
    import hilight.cli

    def broken(args):
        raise ValueError("an internal bug")

    monkeypatch.setattr(hilight.cli, "cmd_info", broken)
    with pytest.raises(ValueError, match="internal bug"):
        main(["info", "--preset", "tiny"])


def test_demo_runs_end_to_end(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "UNTRAINED" in out and "identical" in out
    assert (tmp_path / "clip.mp4").is_file() and (tmp_path / "tiny-untrained" / "model.safetensors").is_file()


def test_info_on_a_missing_checkpoint_is_one_line(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.strip().endswith("not a checkpoint directory nor a model name (billiards-small)")
    assert err.count("\n") == 1
