"""``hilight batch`` without Ray: manifests, the resumable output, and the work each actor does
(the Ray pipeline itself runs in tests/integration/test_batch_ray.py)."""

import importlib.util
import json

import pytest

from hilight.demo import moving_balls_clip
from hilight.errors import ConfigError, DataError
from hilight.inference.engine import Engine, GenerationSettings, place_videos
from hilight.integrations.batch import (
    RAY_MISSING,
    Item,
    Output,
    answer_rows,
    encode_videos,
    group_by_video,
    plan,
    read_jsonl_rows,
    read_manifest,
)
from hilight.text import Message
from hilight.video import write_video
from tests.conftest import talkative_checkpoint


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("batch")
    model = talkative_checkpoint(root / "model", tokenizer, seed=3)
    videos = root / "videos"
    videos.mkdir()
    clips = [write_video(videos / f"c{i}.mp4", moving_balls_clip(12, 64, seed=i)) for i in range(3)]
    (videos / "bad.mp4").write_text("not a video")
    return root, model, clips


# --- manifests ---------------------------------------------------------------------------------


def test_manifest_kinds_give_the_same_items(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"video": "a.mp4", "question": "What?", "id": "x"}\n\n'
                                      '{"video": "sub/b.mp4", "question": "Why?"}\n')
    (tmp_path / "m.csv").write_text("\ufeffid,video,question\nx,a.mp4,What?\n,sub/b.mp4,Why?\n")
    (tmp_path / "m.json").write_text(json.dumps([
        {"id": "x", "video": "a.mp4", "conversations": [{"from": "human", "value": "What?"},
                                                        {"from": "gpt", "value": "ignored"}]},
        {"video": ["sub/b.mp4"], "conversations": [{"from": "human", "value": "Why?"}]}]))
    jsonl, csv, llava = (read_manifest(tmp_path / f"m.{k}") for k in ("jsonl", "csv", "json"))
    assert [i.id for i in jsonl] == ["x", "3"] and [i.id for i in csv] == ["x", "3"] and [i.id for i in llava] == ["x", "1"]
    for items in (jsonl, csv, llava):
        assert [(i.video, i.question) for i in items] == [("a.mp4", "What?"), ("sub/b.mp4", "Why?")]
        assert items[1].path == str(tmp_path / "sub" / "b.mp4")
    rooted = read_manifest(tmp_path / "m.jsonl", video_root=tmp_path / "elsewhere")
    assert rooted[0].path == str(tmp_path / "elsewhere" / "a.mp4")


def test_folder_manifest(tmp_path):
    (tmp_path / "d").mkdir()
    for name in ("b.mp4", "a.MOV", "notes.txt"):
        (tmp_path / "d" / name).write_bytes(b"x")
    items = read_manifest(tmp_path / "d", question="What happens?")
    assert [i.id for i in items] == ["a.MOV", "b.mp4"] and {i.question for i in items} == {"What happens?"}
    with pytest.raises(ConfigError, match="needs --question"):
        read_manifest(tmp_path / "d")


@pytest.mark.parametrize("name, text, message", [
    ("m.jsonl", '{"video": "a.mp4", "question": "Q"}\n{"video": "a.mp4"\n', "m.jsonl line 2: not JSON"),
    ("m.jsonl", '{"video": "a.mp4"}\n', "m.jsonl line 1: no 'question'"),
    ("m.jsonl", '{"id": 1, "video": "a.mp4", "question": "Q"}\n{"id": "1", "video": "b.mp4", "question": "Q"}\n',
     "m.jsonl line 2: id '1' again (first at line 1)"),
    ("m.jsonl", '{"video": "a.mp4", "question": "<video> <video> same?"}\n', "line 1: the question has 2 <video>"),
    ("m.csv", "video,prompt\na.mp4,Q\n", "m.csv line 1: the header needs columns video, question"),
    ("m.csv", "video,question\na.mp4,Q,extra\n", "m.csv line 2: more fields than the header"),
    ("m.json", '[{"video": ["a.mp4", "b.mp4"], "question": "Same?"}]', "m.json record 0: 2 videos"),
    ("m.json", '{"video": "a.mp4"}', "m.json: expected a JSON list"),
    ("m.txt", "a.mp4 Q", "m.txt: unknown manifest type '.txt'"),
    ("m.jsonl", "\n", "m.jsonl: no items"),
])
def test_bad_manifests_name_the_file_and_line(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(DataError) as err:
        read_manifest(tmp_path / name)
    assert message in str(err.value) and str(tmp_path / name) in str(err.value)


# --- the output and resuming -----------------------------------------------------------------


def _item(n: int) -> Item:
    return Item(str(n), f"v{n}.mp4", f"/data/v{n}.mp4", "Q?")


def test_output_resumes_and_repairs_a_cut_last_line(tmp_path):
    out = tmp_path / "answers.jsonl"
    output = Output(out, "m")
    output.write({"id": "0", "video": "v0.mp4", "question": "Q?", "answer": "yes", "error": None})
    output.write({"id": "1", "video": "v1.mp4", "question": "Q?", "answer": None, "error": "v1.mp4: empty"})
    output.close()
    with open(out, "a") as f:
        f.write('{"id": "2", "video": "v2.mp4", "ans')  # a run killed while writing its third row
    output = Output(out, "m")
    assert set(output.done) == {"0", "1"} and out.read_text().count("\n") == 2  # the cut line is gone
    todo, skipped, changed = plan([_item(n) for n in range(4)], output.done)
    assert [i.id for i in todo] == ["2", "3"] and [i.id for i in skipped] == ["0", "1"] and not changed
    todo, _, _ = plan([_item(n) for n in range(4)], output.done, retry_errors=True)
    assert [i.id for i in todo] == ["1", "2", "3"]
    output.forget(["1"])
    assert [r["id"] for r in read_jsonl_rows(out)] == ["0"]
    renamed = [Item("0", "other.mp4", "/data/other.mp4", "Q?")]
    assert plan(renamed, output.done)[2] == ["0"]  # done, but its row names another video


def test_output_refuses_another_models_answers_and_bad_files(tmp_path):
    out = tmp_path / "answers.jsonl"
    Output(out, "model-a").write({"id": "0", "answer": "yes"})
    with pytest.raises(ConfigError, match="holds answers of model 'model-a', this run uses 'model-b'"):
        Output(out, "model-b")
    out.write_text("not json\n{}\n")
    with pytest.raises(DataError, match="answers.jsonl line 1: not JSON"):
        Output(out, "m")
    with pytest.raises(ConfigError, match="must end in .jsonl or .parquet"):
        Output(tmp_path / "answers.txt", "m")


# --- the actors' work --------------------------------------------------------------------------


def test_rows_match_hilight_ask_and_a_bad_video_fails_alone(setup):
    root, model, clips = setup
    engine = Engine.from_checkpoint(model)
    questions = ["What happens?", "Did a ball stop?"]
    items = [Item(f"{c.stem}-{n}", c.name, str(c), q) for c in clips for n, q in enumerate(questions)]
    items.append(Item("bad", "bad.mp4", str(root / "videos" / "bad.mp4"), "What?"))
    items.append(Item("gone", "gone.mp4", str(root / "videos" / "gone.mp4"), "What?"))
    groups = group_by_video(items)
    assert len(groups) == 5  # one row per video, its questions together
    encoded = encode_videos(engine, [g["path"] for g in groups])
    rows = {r["id"]: r for r in answer_rows(engine, groups, encoded, max_new_tokens=8, batch_size=3)}
    assert set(rows) == {i.id for i in items}
    for item in items[:-2]:
        expected = engine.answer([Message("user", place_videos(item.question, 1))], [item.path],
                                 GenerationSettings(8)).strip()
        assert rows[item.id]["answer"] == expected and rows[item.id]["error"] is None
        assert rows[item.id]["decode_s"] > 0 and rows[item.id]["encode_s"] > 0 and rows[item.id]["generate_s"] > 0
    assert rows["bad"]["answer"] is None and "bad.mp4: not a readable media file" in rows["bad"]["error"]
    assert rows["gone"]["answer"] is None and "gone.mp4" in rows["gone"]["error"]


def test_cli_without_ray_says_how_to_install_it(setup, tmp_path, capsys):
    from hilight.cli import main

    if importlib.util.find_spec("ray") is not None:
        pytest.skip("Ray is installed here; tests/integration runs the pipeline")
    root, model, clips = setup
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"video": str(clips[0]), "question": "What?"}) + "\n")
    assert main(["batch", str(manifest), "--out", str(tmp_path / "a.jsonl"), "--model", str(model)]) == 2
    err = capsys.readouterr().err
    assert err.strip().endswith(RAY_MISSING) and err.count("\n") == 1
    assert main(["batch", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "a.jsonl"), "--model", str(model)]) == 2
    assert "none.jsonl: no such manifest file or folder" in capsys.readouterr().err
