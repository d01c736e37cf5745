"""Multiple-choice evaluation: the letter extractor, the option log-likelihood scorer, the
billiards questions in multiple-choice form and their export as an lmms-eval task."""

import json

import pytest
import torch
import yaml

from hilight.cli import main
from hilight.demo import moving_balls_clip
from hilight.errors import DataError
from hilight.evaluation.choice import (
    ChoiceItem,
    choice_prompt,
    choice_report,
    evaluate_choice,
    extract_letter,
    load_choice_items,
)
from hilight.inference.engine import Engine, GenerationSettings
from hilight.text import Message
from hilight.video import write_video
from tests.conftest import talkative_checkpoint

OPTIONS = ["red", "two", "top-left", "left"]


@pytest.mark.parametrize("answer, letter", [
    ("B", "B"), ("B.", "B"), ("(C) top-left", "C"), ("D) left", "D"), ("A: red", "A"), (" b", None),
    ("The answer is C.", "C"), ("answer: (d)", "D"), ("I pick option B", "B"),
    ("The red ball went in.", "A"), ("It moved to the top-left.", "C"), ("Two balls are left.", None),
    ("E", None), ("Nothing fits.", None), ("A red ball and a blue one", "A"),
])
def test_the_letter_extractor(answer, letter):
    # "Two balls are left." names two options (two, left) with neither inside the other: unparseable;
    # "A red ball..." starts with the letter A followed by a space: the letter wins
    assert extract_letter(answer, OPTIONS) == letter


def test_an_option_inside_another_resolves_to_the_longer():
    assert extract_letter("Towards the top-left.", ["top", "top-left", "bottom"]) == "B"


def test_the_prompt_every_harness_asks():
    assert choice_prompt(" Which ball? ", ["red", "blue"]) == \
        "Which ball?\nA. red\nB. blue\nAnswer with the option's letter from the given choices directly."


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("choice")
    model = talkative_checkpoint(root / "model", tokenizer, seed=4)
    clips = [write_video(root / f"c{i}.mp4", moving_balls_clip(12, 64, seed=i)) for i in range(3)]
    return root, model, clips


def test_loglikelihood_is_what_decoding_scores(setup):
    """The scorer's sum for the greedy continuation equals the log-probabilities generate()
    gives each token on the way (another path: KV-cached decoding), and it is greedy; a
    different continuation is not."""
    root, model, clips = setup
    engine = Engine.from_checkpoint(model)
    messages = [Message("user", "<video>\nWhat happens?")]
    planned = [engine.plan(clips[0])]
    prompt = engine.encode_prompt(messages, planned)
    ids = torch.tensor([prompt.input_ids])
    embeds = engine.model.embed(ids, engine.segment_embeddings(planned))
    out = engine.model.llm.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(ids), max_new_tokens=3,
                                    do_sample=False, output_scores=True, return_dict_in_generate=True,
                                    pad_token_id=engine.chat.pad_id, eos_token_id=None)
    tokens = out.sequences[0, -3:].tolist()
    expected = sum(float(torch.log_softmax(s[0].float(), -1)[t]) for s, t in zip(out.scores, tokens, strict=True))
    text = engine.tokenizer.decode(tokens)
    assert engine.chat._text(text) == tokens  # the continuation round-trips
    (logprob, greedy), (other, other_greedy) = engine.loglikelihood(messages, clips[:1], [text, "zebra"])
    assert logprob == pytest.approx(expected, abs=1e-4) and greedy
    assert other < logprob and not other_greedy


def test_the_report_counts_exactly(setup):
    items = [ChoiceItem(str(i), [], "q", ["x", "y", "z"], answer, task, chosen=chosen, generated="g",
                        likeliest=likeliest, blind_generated="b", blind_chosen=blind)
             for i, (answer, task, chosen, likeliest, blind) in enumerate([
                 ("A", "t1", "A", "B", "A"), ("A", "t1", None, "A", "C"), ("B", "t1", "B", "B", "A"),
                 ("C", "t2", "C", "C", "C"), ("C", "t2", "A", "C", "A")])]
    result = choice_report(items, {}, [])
    t1, t2, overall = result["per_task"]["t1"], result["per_task"]["t2"], result["overall"]
    assert (t1["accuracy"], t1["loglikelihood_accuracy"], t1["blind"], t1["majority"]) == (2 / 3, 2 / 3, 1 / 3, 2 / 3)
    assert (t2["accuracy"], t2["loglikelihood_accuracy"], t2["majority"], t1["unparseable"]) == (0.5, 1.0, 1.0, 1)
    assert (overall["accuracy"], overall["loglikelihood_accuracy"], overall["majority"]) == (0.6, 0.8, 0.8)


def test_evaluate_and_cli_on_multiple_choice_data(setup, tmp_path, capsys):
    root, model, clips = setup
    data = tmp_path / "mc.json"
    data.write_text(json.dumps([
        {"id": "a", "video": clips[0].name, "question": "Which ball?", "options": ["red", "blue", "green"],
         "answer": "B", "task": "colour"},
        {"id": "b", "video": clips[1].name, "question": "How many?", "candidates": ["one", "two"], "answer": 0},
        {"id": "c", "video": clips[2].name, "question": "Which way?", "options": ["left", "right"], "answer": "right"},
        {"id": "bad", "video": clips[0].name, "question": "?", "options": ["a", "b"], "answer": "Q"},
    ]))
    items, problems = load_choice_items(data, root)
    assert [it.answer for it in items] == ["B", "A", "B"] and problems == ["record bad: answer 'Q' is none of the options"]
    engine = Engine.from_checkpoint(model)
    result = evaluate_choice(engine, data, root, tmp_path / "report", GenerationSettings(8))
    answers = {a["id"]: a for a in result["answers"]}
    expected = engine.answer(items[0].messages(), items[0].videos, GenerationSettings(8))
    assert answers["a"]["generated"] == expected and answers["a"]["chosen"] == extract_letter(expected, items[0].options)
    scores = [lp for lp, _ in engine.loglikelihood(items[0].messages(), items[0].videos, ["A", "B", "C"])]
    assert answers["a"]["scores"] == pytest.approx(scores) and answers["a"]["likeliest"] == "ABC"[scores.index(max(scores))]
    assert set(result["per_task"]) == {"colour", "all"} and result["overall"]["n"] == 3
    assert (tmp_path / "report" / "accuracy.png").stat().st_size > 1000
    assert main(["eval", "--model", str(model), "--data", str(data), "--videos", str(root), "--choice-mode",
                 "loglikelihood", "--no-blind", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "| task | n | log-likelihood | majority letter |" in out


def test_billiards_questions_in_multiple_choice_form_and_the_lmms_task(tmp_path, capsys):
    from hilight.evaluation.lmms_tasks import doc_to_choice, doc_to_target, doc_to_text, doc_to_visual, process_results
    from hilight.recipes.billiards_small.choice import choice_records
    from hilight.synth.billiards import TableConfig
    from hilight.synth.dataset import generate_split

    files = generate_split(tmp_path / "bil", "test", 3, seed=2, cfg=TableConfig(image_size=64))
    records = json.loads(files.conversations.read_text())
    items = choice_records(records, seed=0)
    assert items == choice_records(records, seed=0) and len(items) > 10
    for item in items:
        rec = next(r for r in records if r["id"] == item["id"])
        assert len(item["options"]) == (2 if rec["meta"]["kinds"][0] == "yesno" else 4)
        assert len(set(item["options"])) == len(item["options"])
    assert main(["export-lmms", "--data", str(files.conversations), "--videos", str(tmp_path / "bil" / "videos"),
                 "--out", str(tmp_path / "task"), "--name", "billiards_mc", "--limit", "5"]) == 0
    exported = json.loads((tmp_path / "task" / "billiards_mc.json").read_text())
    assert len(exported) == 5 and all(doc_to_visual(d)[0].startswith("/") for d in exported)
    loader = type("Loader", (yaml.SafeLoader,), {})
    loader.add_multi_constructor("!", lambda ld, suffix, node: f"!{suffix} {ld.construct_scalar(node)}")
    gen = yaml.load((tmp_path / "task" / "billiards_mc.yaml").read_text(), Loader=loader)
    ll = yaml.load((tmp_path / "task" / "billiards_mc_ll.yaml").read_text(), Loader=loader)
    assert gen["output_type"] == "generate_until" and ll["output_type"] == "multiple_choice"
    assert gen["dataset_kwargs"]["data_files"]["test"] == str((tmp_path / "task" / "billiards_mc.json").resolve())
    assert ll["target_delimiter"] == "" and gen["doc_to_text"] == "!function utils.doc_to_text"
    doc = exported[0]
    first = items[0]
    assert doc_to_text(doc) == choice_prompt(first["question"], first["options"])
    assert doc_to_choice(doc)[doc_to_target(doc)] == doc["answer"] == "ABCD"[first["answer"]]
    assert process_results(doc, [doc["answer"]]) == {"acc": 1.0} and process_results(doc, ["?"]) == {"acc": 0.0}
    with pytest.raises(DataError, match="not multiple-choice items"):
        from hilight.evaluation.lmms_tasks import export_lmms_task

        export_lmms_task(records, tmp_path, tmp_path / "x", "x")
