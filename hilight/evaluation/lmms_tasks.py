"""A multiple-choice JSON as an lmms-eval task (``--include_path DIR``), asked and scored exactly
as ``hilight eval`` asks and scores it (:mod:`hilight.evaluation.choice`).

``export_lmms_task`` writes ``DIR/{name}.json`` (the items, videos as absolute paths),
``DIR/{name}.yaml`` (``generate_until``, scored by letter matching: metric ``acc``),
``DIR/{name}_ll.yaml`` (``multiple_choice``: the likeliest letter, metric ``acc``) and
``DIR/utils.py``, whose functions are the ones below. The functions are lmms-eval's task hooks;
they import nothing from lmms-eval.
"""

from __future__ import annotations

import json
from pathlib import Path

from hilight.data import record_videos
from hilight.errors import DataError
from hilight.evaluation.choice import LETTERS, _answer_letter, choice_prompt, extract_letter, is_choice_data


def doc_to_visual(doc: dict) -> list[str]:
    return [doc["video"]] if isinstance(doc["video"], str) else list(doc["video"])


def doc_to_text(doc: dict, kwargs: dict | None = None) -> str:
    return choice_prompt(doc["question"], doc["options"])


def doc_to_choice(doc: dict) -> list[str]:
    return list(LETTERS[:len(doc["options"])])


def doc_to_target(doc: dict) -> int:
    return LETTERS.index(doc["answer"])


def process_results(doc: dict, results: list) -> dict:
    """Letter matching of a generated answer: 1.0 if it names the right option."""
    return {"acc": float(extract_letter(str(results[0]), doc["options"]) == doc["answer"])}


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


UTILS = '''"""lmms-eval hooks of a HiLight multiple-choice task (written by `hilight export-lmms`)."""

from hilight.evaluation.lmms_tasks import (  # noqa: F401
    doc_to_choice, doc_to_target, doc_to_text, doc_to_visual, mean, process_results)
'''


def _yaml(name: str, data: Path, output_type: str) -> str:
    lines = [f"task: {name if output_type == 'generate_until' else name + '_ll'}",
             "dataset_path: json",
             f"dataset_kwargs: {{data_files: {{test: {json.dumps(str(data))}}}}}",
             "test_split: test",
             f"output_type: {output_type}",
             "doc_to_visual: !function utils.doc_to_visual",
             "doc_to_text: !function utils.doc_to_text"]
    if output_type == "generate_until":
        lines += ["doc_to_target: answer",
                  "generation_kwargs: {max_new_tokens: 24, temperature: 0, do_sample: false, until: []}",
                  "process_results: !function utils.process_results",
                  "metric_list: [{metric: acc, aggregation: !function utils.mean, higher_is_better: true}]"]
    else:  # the letters, scored as the reply's first tokens (no delimiter before them)
        lines += ["doc_to_choice: !function utils.doc_to_choice",
                  "doc_to_target: !function utils.doc_to_target",
                  'target_delimiter: ""',
                  "metric_list: [{metric: acc, aggregation: mean, higher_is_better: true}]"]
    lines.append("metadata: {version: 1.0}")
    return "\n".join(lines) + "\n"


def export_lmms_task(records: list[dict], videos: Path, out: Path, name: str, where: str = "items") -> Path:
    """Write the task directory for multiple-choice ``records`` (videos under ``videos``);
    returns ``out``. The items file is itself a multiple-choice JSON for ``hilight eval``."""
    if not is_choice_data(records):
        raise DataError(f"{where}: not multiple-choice items (records with 'question', 'options', 'answer')")
    items = []
    for n, rec in enumerate(records):
        at = f"{where} record {rec.get('id', n)}"
        options = rec.get("options", rec.get("candidates"))
        paths = [str(p.resolve()) for p in record_videos(rec, videos)]
        for p in paths:
            if not Path(p).is_file():
                raise DataError(f"{at}: no video {p}")
        if rec.get("sampling"):
            raise DataError(f"{at}: an lmms-eval task reads videos the model's own way; 'sampling' is not exported")
        items.append({"id": str(rec.get("id", n)), "video": paths[0] if len(paths) == 1 else paths,
                      "question": rec["question"], "options": options,
                      "answer": _answer_letter(at, rec.get("answer"), options),
                      "task": str(rec.get("task", rec.get("task_type", "all")))})
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"{name}.json"
    target.write_text(json.dumps(items, indent=1) + "\n")
    (out / f"{name}.yaml").write_text(_yaml(name, target.resolve(), "generate_until"))
    (out / f"{name}_ll.yaml").write_text(_yaml(name, target.resolve(), "multiple_choice"))
    (out / "utils.py").write_text(UTILS)
    return out
