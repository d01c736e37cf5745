import json
import math

import numpy as np
import pytest

from hilight.cli import main
from hilight.config import VideoInputConfig
from hilight.evaluation.scoring import exact_match, extract, token_f1
from hilight.synth.billiards import (
    BALL_COLOURS,
    CUE_COLOUR,
    Ball,
    Simulation,
    TableConfig,
    direction_name,
    pocket_centres,
    random_layout,
    simulate,
)
from hilight.synth.dataset import generate_split, generate_tracks, render_clip, split_sizes
from hilight.synth.qa import KINDS, QUESTIONS, caption, pair_qas, single_qas
from hilight.video import decode_video

CFG = TableConfig()


def _run(sim: Simulation, steps: int):
    energies, gaps = [sim.kinetic_energy()], []
    for _ in range(steps):
        sim.step()
        energies.append(sim.kinetic_energy())
        live = np.flatnonzero(sim.on_table)
        if len(live) > 1:
            d = np.linalg.norm(sim.pos[live, None] - sim.pos[None, live], axis=2)
            gaps.append(d[np.triu_indices(len(live), 1)].min())
    return energies, gaps


@pytest.mark.parametrize("seed", range(8))
def test_physics_invariants(seed):
    rng = np.random.default_rng(seed)
    balls = random_layout(CFG, rng)
    angle = rng.uniform(0, 2 * math.pi)
    sim = Simulation(CFG, balls, (3.0 * math.cos(angle), 3.0 * math.sin(angle)))
    pocketed_seen = set()
    energies, gaps = [], []
    for _ in range(6):
        e, g = _run(sim, 300)
        energies += e
        gaps += g
        for p in sim.pocketed:
            i = sim.names.index(p.ball)
            assert not sim.on_table[i]  # a pocketed ball stays gone
            assert np.all(sim.vel[i] == 0)
            pocketed_seen.add(p.ball)
        assert len(pocketed_seen) == len(sim.pocketed)  # never pocketed twice
    assert all(b <= a + 1e-12 for a, b in zip(energies, energies[1:], strict=False))  # energy never increases
    assert min(gaps) > 2 * CFG.ball_radius * 0.97  # no overlap survives a step's resolution
    r = CFG.ball_radius
    live = sim.pos[sim.on_table]
    assert (live[:, 0] >= r - 1e-9).all() and (live[:, 0] <= CFG.length - r + 1e-9).all()


def test_head_on_collision_transfers_momentum():
    sim = Simulation(CFG, [Ball("cue", 0.5, 0.5), Ball("red", 1.0, 0.5)], (2.0, 0.0))
    while sim.first_contact is None:
        sim.step()
    for _ in range(5):
        sim.step()
    assert sim.first_contact == "red"
    assert sim.vel[1, 0] > 1.5 and abs(sim.vel[0, 0]) < 0.2  # near-elastic, equal masses


def test_straight_shot_into_a_corner_pocket():
    # the red ball sits on the diagonal to the top-left pocket; the cue ball drives it in
    sim = Simulation(CFG, [Ball("cue", 0.6, 0.6), Ball("red", 0.4, 0.4)], (-2.0, -2.0))
    for _ in range(3000):
        sim.step()
    assert [p.ball for p in sim.pocketed][:1] == ["red"]
    assert sim.pocketed[0].pocket == "top-left"


def test_cushion_rebound_counts_and_loses_energy():
    sim = Simulation(CFG, [Ball("cue", 0.6, 0.5), Ball("red", 1.5, 0.8)], (0.0, -2.0))
    for _ in range(400):
        sim.step()
    assert sim.cue_cushions == 1 and sim.vel[0, 1] > 0
    assert abs(sim.vel[0, 1]) < 2.0 * CFG.cushion_restitution


def test_directions_in_image_coordinates():
    assert direction_name(1, 0) == "right" and direction_name(0, 1) == "bottom"
    assert direction_name(-1, -1) == "top-left" and direction_name(1, -1) == "top-right"
    assert pocket_centres(CFG).shape == (6, 2)


def test_simulation_is_deterministic():
    a = simulate(CFG, np.random.default_rng(5))
    b = simulate(CFG, np.random.default_rng(5))
    assert a[0] == b[0] and np.array_equal(a[1], b[1])


@pytest.mark.parametrize("seed", range(30))
def test_every_canonical_answer_scores_as_its_truth(seed):
    rng = np.random.default_rng(seed)
    truth = simulate(CFG, rng)[0]
    qas = single_qas(truth, rng) + pair_qas(truth, simulate(CFG, rng)[0], rng)
    for qa in qas:
        assert extract(KINDS[qa.qtype], qa.answer) == qa.truth, (qa, truth)
    types = {qa.qtype for qa in qas}
    assert ("pocket" in types) == bool(truth.object_pocketed)
    assert len(types) >= 8
    assert truth.cue_direction in caption(truth)


def test_at_least_five_paraphrases_per_type():
    assert len(QUESTIONS) >= 8 and all(len(qs) >= 5 and len(set(qs)) == len(qs) for qs in QUESTIONS.values())


@pytest.mark.parametrize("kind, answer, value", [
    ("colour", "The cue ball hit the Blue ball first!", "blue"),
    ("colour", "No ball was pocketed.", "none"),
    ("colour", "I think it was the white ball.", None),
    ("pocket", "It dropped into the upper-right corner pocket.", "top-right"),
    ("pocket", "the bottom side pocket", "bottom-middle"),
    ("pocket", "the red one", None),
    ("yesno", "Yes, it did.", "yes"),
    ("yesno", "Nope.", "no"),
    ("yesno", "Maybe.", None),
    ("number", "It hit 3 cushions", "3"),
    ("number", "twice", "2"),
    ("number", "It did not touch any cushion.", "0"),
    ("number", "Many.", None),
    ("direction", "Towards the bottom-left.", "bottom-left"),
    ("direction", "It went up and to the right", "top-right"),
    ("direction", "left", "left"),
    ("clip", "In both clips.", "both"),
    ("clip", "The 2nd clip", "second"),
    ("clip", "Both clips end with the same number of balls (two).", "same"),
    ("clip", "Neither.", "neither"),
])
def test_extractors(kind, answer, value):
    assert extract(kind, answer) == value


def test_reference_metrics():
    assert exact_match("The red ball.", "the red ball")
    assert token_f1("the red ball", "the red ball went in") == pytest.approx(2 * 1 * 0.6 / 1.6)
    assert token_f1("", "x") == 0.0


@pytest.mark.slow
def test_dataset_is_deterministic_and_consistent(tmp_path):
    a = generate_split(tmp_path / "a", "test", 6, seed=3)
    b = generate_split(tmp_path / "b", "test", 6, seed=3, workers=2)
    assert a.conversations.read_text() == b.conversations.read_text()
    assert a.truth.read_text() == b.truth.read_text()
    # the frames are a pure function of the seed; the lossy encoding of them matches closely
    truth, frames, tracks = render_clip(TableConfig(), 3, "test", 5)
    again = render_clip(TableConfig(), 3, "test", 5)
    assert truth == again[0] and np.array_equal(frames, again[1]) and tracks == again[2]
    cfg = VideoInputConfig(num_frames=4)
    for name in ("test-00000.mp4", "test-00005.mp4"):
        fa = decode_video(tmp_path / "a" / "videos" / name, cfg).frames.astype(int)
        fb = decode_video(tmp_path / "b" / "videos" / name, cfg).frames.astype(int)
        assert np.abs(fa - fb).mean() < 1.0
    records = json.loads(a.conversations.read_text())
    truth = json.loads(a.truth.read_text())
    assert len(truth) == 6 and len(json.loads(a.captions.read_text())) == 6
    kinds = {"single": 0, "multi": 0, "pair": 0}
    for rec in records:
        videos = [rec["video"]] if isinstance(rec["video"], str) else rec["video"]
        text = " ".join(t["value"] for t in rec["conversations"])
        assert text.count("<video>") == len(videos)
        assert [t["from"] for t in rec["conversations"]] == ["human", "gpt"] * (len(rec["conversations"]) // 2)
        for k, (qtype, value) in enumerate(zip(rec["meta"]["types"], rec["meta"]["truth"], strict=True)):
            assert extract(KINDS[qtype], rec["conversations"][2 * k + 1]["value"]) == value
        kinds["pair" if len(videos) == 2 else "multi" if len(rec["conversations"]) > 2 else "single"] += 1
        if len(videos) == 1:  # the single-clip answers agree with the clip's ground truth
            t = truth[videos[0]]
            qtype, value = rec["meta"]["types"][0], rec["meta"]["truth"][0]
            if qtype == "balls_left":
                assert value == str(len(t["balls_left"]))
            if qtype == "scratch":
                assert value == ("yes" if t["scratch"] else "no")
    assert kinds["pair"] == 6 and kinds["multi"] == 6 and kinds["single"] >= 6 * 7


def test_track_only_clips_are_a_split_without_videos(tmp_path):
    a = generate_tracks(tmp_path / "a", 4, seed=0)
    b = generate_tracks(tmp_path / "b", 4, seed=0, workers=2)
    assert a.conversations.read_text() == b.conversations.read_text() and a.clips == 4
    assert not (tmp_path / "a" / "videos").exists()
    truth, captions = json.loads(a.truth.read_text()), json.loads(a.captions.read_text())
    assert list(truth) == [f"tracks-{i:05d}.mp4" for i in range(4)] == [c["video"] for c in captions]
    for rec in json.loads(a.conversations.read_text()):
        videos = [rec["video"]] if isinstance(rec["video"], str) else rec["video"]
        assert all(v in truth for v in videos) and rec["id"].startswith("tracks-")
        for k, (qtype, value) in enumerate(zip(rec["meta"]["types"], rec["meta"]["truth"], strict=True)):
            assert extract(KINDS[qtype], rec["conversations"][2 * k + 1]["value"]) == value
    # the tracks are the ones a rendered clip would have, and no rendered clip of the seed repeats them
    assert captions[0]["tracks"]["names"][0] == "cue" and len(captions[0]["tracks"]["xy"]) > 1
    rendered = [render_clip(TableConfig(), 0, split, 0)[2]["xy"] for split in ("train", "val", "test")]
    assert all(c["tracks"]["xy"] != xy for c in captions for xy in rendered)


def test_split_sizes():
    assert split_sizes(1000) == {"train": 800, "val": 100, "test": 100}
    assert split_sizes(3) == {"train": 1, "val": 1, "test": 1}


def test_synth_and_eval_commands(tmp_path, capsys):
    data = tmp_path / "bil"
    assert main(["synth", "billiards", "--out", str(data), "--clips", "4", "--split", "test", "--seed", "1"]) == 0
    model = tmp_path / "model"
    assert main(["init", "--preset", "tiny", "--train-tokenizer", str(data / "test.json"), "--vocab-size", "500",
                 "--out", str(model)]) == 0
    report = tmp_path / "report"
    assert main(["eval", "--model", str(model), "--data", str(data / "test.json"), "--videos", str(data / "videos"),
                 "--out", str(report), "--max-new-tokens", "6"]) == 0
    result = json.loads((report / "report.json").read_text())
    assert {"single_video", "two_video", "overall", "per_type", "confusion_colour"} <= set(result)
    assert all("blind" in r and 0 <= r["accuracy"] <= 1 for r in result["per_type"].values())
    assert (report / "accuracy.png").stat().st_size > 1000 and "| question type |" in (report / "report.md").read_text()


def test_tracks_say_where_each_ball_is_drawn():
    cfg = TableConfig(noise_std=0.0)
    truth, frames, tracks = render_clip(cfg, 1, "train", 2)
    xy = np.array(tracks["xy"]).reshape(len(frames), -1, 2)
    assert tracks["names"] == [b.colour for b in truth.balls] and len(xy) == len(frames)
    size = cfg.image_size
    for f in (0, len(frames) - 1):
        for i, name in enumerate(tracks["names"]):
            if xy[f, i, 0] < 0:
                assert name in {p.ball for p in truth.pocketed}  # only pocketed balls leave the table
                continue
            col, row = (xy[f, i] * size).astype(int)
            # the pixel at the track's centre is nearest to the ball's own colour (lighting varies;
            # some cloths are as dark as some balls, so the cloth is not among the candidates)
            palette = {**BALL_COLOURS, "cue": CUE_COLOUR}
            pixel = frames[f, row, col].astype(float)
            assert min(palette, key=lambda k: np.abs(pixel - palette[k]).sum()) == name, (f, name)
    # balls that stay on the table keep their last position; pocketed ones are gone at the end
    gone = {p.ball for p in truth.pocketed}
    assert all((xy[-1, i, 0] < 0) == (n in gone) for i, n in enumerate(tracks["names"]))
    assert 0 < tracks["radius"] < 0.05


def test_inventory_questions_list_the_first_and_last_frames_balls():
    from hilight.recipes.billiards_small.questions import inventory_qas

    qas = {qa.qtype: qa for qa in inventory_qas(["cue", "red", "blue"], ["cue", "blue"])}
    assert qas["balls_start"].answer == "The cue, blue and red balls."  # one fixed colour order
    assert qas["balls_end"].answer == "The cue and blue balls."
    assert qas["balls_gone"].answer == "The red ball." and qas["balls_gone"].truth == "red"
    assert {qa.answer for qa in inventory_qas(["cue"], ["cue"])} == {"The cue ball.", "No ball."}


def test_inventory_records_read_the_tracks_at_the_models_frames(tmp_path):
    from hilight.config import preset
    from hilight.recipes.billiards_small.questions import inventory_records
    from hilight.synth.dataset import generate_split

    generate_split(tmp_path, "train", 6, seed=3, workers=1)
    records = inventory_records(tmp_path, preset("billiards-small").video, "train")
    assert len(records) == 6 * 3
    truth = json.loads((tmp_path / "train-truth.json").read_text())
    clips = {c["video"]: c for c in json.loads((tmp_path / "train-captions.json").read_text())}
    for rec in records:
        listed = set(rec["meta"]["truth"][0].split(",")) - {"none"}
        tracks = clips[rec["video"]]["tracks"]  # xy: per frame, x and y of every ball in turn
        if rec["meta"]["types"] == ["balls_start"]:  # the first frame shown is the clip's first
            assert listed == {n for i, n in enumerate(tracks["names"]) if tracks["xy"][0][2 * i] >= 0}
        if rec["meta"]["types"] == ["balls_gone"]:  # what left the table was pocketed
            assert listed <= {p["ball"] for p in truth[rec["video"]]["pocketed"]}
