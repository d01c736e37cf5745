"""Multiple-choice video QA scored without a judge, as MVBench / Video-MME are scored.

Data: a JSON list of ``{"id"?, "video": name or path, "question", "options": [...]
(or "candidates"), "answer": letter, index or option text, "task"? (or "task_type")}``;
``sampling`` as in training records. Every item is asked in one prompt::

    {question}
    A. {option}
    B. {option}
    ...
    Answer with the option's letter from the given choices directly.

and scored two ways: **letter matching** (greedy answer; :func:`extract_letter`) and **option
log-likelihood** (the letter the model finds likeliest as the start of its reply). Baselines
on the same items: the majority letter per task, and the same model with the video removed
("blind"). The same prompt and scoring run inside lmms-eval through HiLight's plugin
(:mod:`hilight.evaluation.lmms`), so both harnesses give one number.
"""

from __future__ import annotations

import json
import logging
import re
import string
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from hilight.data import read_records, record_videos
from hilight.errors import DataError, HiLightError
from hilight.sampling import Clip, record_sampling
from hilight.text import Message

if TYPE_CHECKING:
    from hilight.inference.engine import Engine, GenerationSettings

log = logging.getLogger(__name__)

LETTERS = string.ascii_uppercase
INSTRUCTION = "Answer with the option's letter from the given choices directly."
MODES = ("generate", "loglikelihood", "both")


def is_choice_data(records: list) -> bool:
    """Whether records are multiple-choice items (they have options) rather than conversations."""
    return bool(records) and isinstance(records[0], dict) and ("options" in records[0] or "candidates" in records[0])


def choice_prompt(question: str, options: list[str]) -> str:
    """The question as every harness asks it (without the video marker)."""
    lines = [question.strip(), *(f"{LETTERS[i]}. {o}" for i, o in enumerate(options)), INSTRUCTION]
    return "\n".join(lines)


def extract_letter(answer: str, options: list[str]) -> str | None:
    """The option an answer chooses, or None if it names none (unparseable, counted wrong):

    1. an answer that starts with a letter of the options, alone or as ``B.``, ``B)``, ``(B)``,
       ``B:``, ``B,``;
    2. ``answer is B`` / ``answer: (B)`` / ``option B`` anywhere;
    3. the text of exactly one option (case-insensitive; the longest when one contains another).
    """
    letters = LETTERS[:len(options)]
    text = answer.strip()
    first = re.match(r"^\(?([A-Z])(?:[).:,]|\s|$)", text)
    if first and first.group(1) in letters:
        return first.group(1)
    stated = re.search(r"\b(?:answer(?: is)?|option)\s*:?\s*\(?([A-Z])\b", text, re.IGNORECASE)
    if stated and stated.group(1).upper() in letters:
        return stated.group(1).upper()
    lowered = text.lower()
    named = [i for i, o in enumerate(options) if o.strip() and o.strip().lower() in lowered]
    if named:
        longest = max(named, key=lambda i: len(options[i]))
        if all(options[i].strip().lower() in options[longest].strip().lower() for i in named):
            return letters[longest]
    return None


@dataclass
class ChoiceItem:
    id: str
    videos: list
    question: str
    options: list[str]
    answer: str  # the correct letter
    task: str
    generated: str | None = None
    chosen: str | None = None  # by letter matching
    likeliest: str | None = None  # by option log-likelihood
    blind_generated: str | None = None
    blind_chosen: str | None = None
    scores: list[float] = field(default_factory=list)

    def messages(self, blind: bool = False) -> list[Message]:
        """The prompt, the videos before it as HiLight places them (so lmms-eval's plugin,
        given the same text, builds the same prompt)."""
        from hilight.inference.engine import place_videos

        prompt = choice_prompt(self.question, self.options)
        return [Message("user", prompt if blind else place_videos(prompt, len(self.videos)))]


def _answer_letter(where: str, answer, options: list[str]) -> str:
    if isinstance(answer, bool):
        raise DataError(f"{where}: 'answer' must be a letter, an option index or an option's text")
    if isinstance(answer, int):
        if not 0 <= answer < len(options):
            raise DataError(f"{where}: answer index {answer} is not one of the {len(options)} options")
        return LETTERS[answer]
    if isinstance(answer, str):
        text = answer.strip()
        if len(text) == 1 and text.upper() in LETTERS[:len(options)]:
            return text.upper()
        match = re.match(r"^\(?([A-Z])[).]", text)
        if match and match.group(1) in LETTERS[:len(options)]:
            return match.group(1)
        for i, option in enumerate(options):
            if option.strip().lower() == text.lower():
                return LETTERS[i]
    raise DataError(f"{where}: answer {answer!r} is none of the options")


def load_choice_items(data: Path, videos: Path) -> tuple[list[ChoiceItem], list[str]]:
    """Items from a multiple-choice JSON; malformed records are reported and skipped."""
    items, problems = [], []
    for n, rec in enumerate(read_records(data)):
        rid = str(rec.get("id", n)) if isinstance(rec, dict) else str(n)
        where = f"record {rid}"
        try:
            if not isinstance(rec, dict):
                raise DataError(f"{where}: not an object")
            options = rec.get("options", rec.get("candidates"))
            if not isinstance(options, list) or len(options) < 2 or len(options) > len(LETTERS) or \
                    not all(isinstance(o, str) for o in options):
                raise DataError(f"{where}: 'options' must be a list of 2 to 26 strings")
            if not isinstance(rec.get("question"), str) or not rec["question"].strip():
                raise DataError(f"{where}: no 'question'")
            paths = record_videos(rec, videos)
            samplings = record_sampling(rec, len(paths))
            clips = [p if s.is_default else Clip(p, s) for p, s in zip(paths, samplings, strict=True)]
            task = str(rec.get("task", rec.get("task_type", "all")))
            items.append(ChoiceItem(rid, clips, rec["question"], options, _answer_letter(where, rec.get("answer"),
                                                                                        options), task))
        except HiLightError as exc:
            problems.append(str(exc) if str(exc).startswith("record ") else f"{where}: {exc}")
    return items, problems


def run_choice(engine: Engine, items: list[ChoiceItem], settings: GenerationSettings, mode: str = "both",
               batch_size: int = 8, blind: bool = True) -> dict[str, str]:
    """Answer every item (letter matching and/or log-likelihood, and blind); returns
    {item id: reason} for items whose videos could not be read."""
    if mode not in MODES:
        raise DataError(f"unknown mode {mode!r} ({', '.join(MODES)})")
    failed: dict[str, str] = {}
    for start in tqdm(range(0, len(items), batch_size), desc="multiple choice", unit="batch"):
        ok = []
        for it in items[start:start + batch_size]:
            try:
                engine.segment_embeddings([engine.plan(v) for v in it.videos])
                ok.append(it)
            except HiLightError as exc:
                failed[it.id] = str(exc)
        if not ok:
            continue
        if mode in ("generate", "both"):
            answers = engine.answer_batch([(it.messages(), it.videos) for it in ok], settings)
            for it, text in zip(ok, answers, strict=True):
                it.generated, it.chosen = text, extract_letter(text, it.options)
        if mode in ("loglikelihood", "both"):
            for it in ok:
                scored = engine.loglikelihood(it.messages(), it.videos, list(LETTERS[:len(it.options)]))
                it.scores = [lp for lp, _ in scored]
                it.likeliest = LETTERS[max(range(len(scored)), key=lambda i: scored[i][0])]
        if blind:
            answers = engine.answer_batch([(it.messages(blind=True), []) for it in ok], settings)
            for it, text in zip(ok, answers, strict=True):
                it.blind_generated, it.blind_chosen = text, extract_letter(text, it.options)
    return failed


def _share(hits: list[bool]) -> float:
    return sum(hits) / len(hits) if hits else 0.0


def choice_report(items: list[ChoiceItem], failed: dict[str, str], problems: list[str]) -> dict:
    """Per-task and overall accuracy by letter matching and by log-likelihood, with the
    majority-letter and blind baselines."""
    groups: dict[str, list[ChoiceItem]] = defaultdict(list)
    for it in items:
        groups[it.task].append(it)

    def row(group: list[ChoiceItem]) -> dict:
        majority = Counter(it.answer for it in group).most_common(1)[0][0]
        out = {"n": len(group), "majority_letter": majority,
               "majority": _share([it.answer == majority for it in group])}
        if group[0].generated is not None:
            out["accuracy"] = _share([it.chosen == it.answer for it in group])
            out["unparseable"] = sum(it.chosen is None for it in group)
        if group[0].likeliest is not None:
            out["loglikelihood_accuracy"] = _share([it.likeliest == it.answer for it in group])
        if group[0].blind_generated is not None:
            out["blind"] = _share([it.blind_chosen == it.answer for it in group])
        return out

    result: dict = {"items": len(items), "failed": failed, "skipped_records": problems,
                    "per_task": {task: row(group) for task, group in sorted(groups.items())}}
    if items:
        result["overall"] = row(items)
        # the overall majority baseline: each task's own majority letter
        result["overall"]["majority"] = _share([it.answer == result["per_task"][it.task]["majority_letter"]
                                                for it in items])
        del result["overall"]["majority_letter"]
    result["answers"] = [{"id": it.id, "task": it.task, "answer": it.answer, "generated": it.generated,
                          "chosen": it.chosen, "likeliest": it.likeliest, "scores": it.scores,
                          "blind_generated": it.blind_generated, "blind_chosen": it.blind_chosen} for it in items]
    return result


COLUMNS = (("accuracy", "letter matching"), ("loglikelihood_accuracy", "log-likelihood"), ("blind", "blind"),
           ("majority", "majority letter"))


def choice_markdown(result: dict, title: str) -> str:
    present = [(k, name) for k, name in COLUMNS if k in result.get("overall", {})]
    lines = [f"# {title}", "", f"| task | n | {' | '.join(name for _, name in present)} |",
             f"|---|---|{'---|' * len(present)}"]
    for task, r in [*result["per_task"].items(), *([("**overall**", result["overall"])] if "overall" in result
                                                    else [])]:
        lines.append(f"| {task} | {r['n']} | {' | '.join(f'{r[k]:.1%}' for k, _ in present)} |")
    if "overall" in result and "unparseable" in result["overall"]:
        lines += ["", f"Unparseable answers (no option named, counted wrong): {result['overall']['unparseable']}."]
    if result["failed"] or result["skipped_records"]:
        lines += ["", f"Failed items: {len(result['failed'])}; skipped records: {len(result['skipped_records'])}."]
    return "\n".join(lines) + "\n"


def choice_chart(result: dict, path: Path, title: str) -> None:
    from hilight.evaluation.qa import grouped_bars

    colours = {"accuracy": "#2b6cb0", "loglikelihood_accuracy": "#68d391", "blind": "#a0aec0", "majority": "#ed8936"}
    series = [(name, key, colours[key]) for key, name in COLUMNS if key in result["overall"]]
    grouped_bars({**result["per_task"], "overall": result["overall"]}, series, path, title)


def evaluate_choice(engine: Engine, data: Path, videos: Path, out: Path | None, settings: GenerationSettings,
                    mode: str = "both", batch_size: int = 8, blind: bool = True, limit: int | None = None,
                    title: str = "HiLight multiple-choice evaluation") -> dict:
    items, problems = load_choice_items(data, videos)
    for p in problems:
        log.warning("%s: %s", data, p)
    if limit:
        items = items[:limit]
    failed = run_choice(engine, items, settings, mode, batch_size, blind)
    for item_id, reason in failed.items():
        log.warning("skipped %s: %s", item_id, reason)
    result = choice_report([it for it in items if it.id not in failed], failed, problems)
    result["mode"] = mode
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(result, indent=1) + "\n")
        (out / "report.md").write_text(choice_markdown(result, title))
        if "overall" in result:
            choice_chart(result, out / "accuracy.png", title)
    return result
