"""The billiards questions in multiple-choice form (MVBench style), for ``hilight eval`` and for
lmms-eval through HiLight's plugin: every single-video, single-question record of a split with
its true value among distractors of the same kind, in a seeded order."""

from __future__ import annotations

import numpy as np

from hilight.synth.billiards import BALL_COLOURS, DIRECTIONS, POCKET_NAMES

OPTIONS = 4  # a yes/no question has its two
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven")
VALUES = {
    "colour": [*BALL_COLOURS, "none"],
    "pocket": list(POCKET_NAMES),
    "direction": list(DIRECTIONS),
    "number": [str(n) for n in range(8)],
    "yesno": ["yes", "no"],
}


def _shown(kind: str, value: str) -> str:
    """An option as text: numbers as words ("two"), a missing ball as "no ball"."""
    if kind == "number":
        return NUMBER_WORDS[int(value)] if int(value) < len(NUMBER_WORDS) else value
    if kind == "colour" and value == "none":
        return "no ball"
    return value


def choice_records(records: list[dict], seed: int = 0) -> list[dict]:
    """Multiple-choice items ({id, video, question, options, answer, task}) from the split's
    single-question records of one video; the task is the question type."""
    rng = np.random.default_rng(seed)
    items = []
    for rec in records:
        meta = rec.get("meta") or {}
        if not isinstance(rec.get("video"), str) or len(rec["conversations"]) != 2 or len(meta.get("kinds", [])) != 1:
            continue
        kind, truth, qtype = meta["kinds"][0], meta["truth"][0], meta["types"][0]
        if kind not in VALUES or truth not in VALUES[kind]:
            continue
        others = [v for v in VALUES[kind] if v != truth]
        chosen = [truth, *rng.choice(others, size=min(OPTIONS - 1, len(others)), replace=False).tolist()]
        order = rng.permutation(len(chosen))
        options = [_shown(kind, chosen[i]) for i in order]
        question = rec["conversations"][0]["value"].replace("<video>", "").strip()
        items.append({"id": rec["id"], "video": rec["video"], "question": question, "options": options,
                      "answer": int(np.where(order == 0)[0][0]), "task": qtype})
    return items
