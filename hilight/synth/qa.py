"""Questions, canonical answers and captions for billiards clips.

Every question type has a *kind* that decides how an answer is scored (see
:mod:`hilight.evaluation.scoring`), a truth value computed from the simulation, at least five
paraphrased questions, and a short natural canonical answer from which the scorer recovers
exactly the truth value.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hilight.synth.billiards import ShotTruth

NUMBER_WORDS = ["no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


@dataclass(frozen=True)
class QA:
    qtype: str
    question: str
    answer: str
    truth: str  # the normalised value the scorer must recover


def _words(n: int) -> str:
    return NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else str(n)


QUESTIONS: dict[str, list[str]] = {
    "first_pocketed": [
        "Which ball was pocketed first?",
        "Which ball went into a pocket first?",
        "What is the first ball that dropped into a pocket?",
        "Tell me which ball was potted first.",
        "Which coloured ball was the first to be pocketed?",
        "Did any ball go in? Which one went in first?",
    ],
    "pocket": [
        "Which pocket did the {colour} ball go into?",
        "Into which pocket did the {colour} ball drop?",
        "Where was the {colour} ball pocketed?",
        "The {colour} ball went in. Which pocket was it?",
        "In which pocket did the {colour} ball end up?",
    ],
    "any_pocketed": [
        "Was any ball pocketed?",
        "Did a coloured ball go into a pocket?",
        "Was a ball potted in this shot?",
        "Did any object ball drop into a pocket?",
        "Did the shot pocket a ball?",
    ],
    "scratch": [
        "Did the cue ball go into a pocket?",
        "Was the cue ball pocketed?",
        "Did the white ball fall into a pocket?",
        "Was this shot a scratch?",
        "Did the cue ball end up in a pocket?",
    ],
    "first_contact": [
        "Which ball did the cue ball hit first?",
        "What was the first ball the cue ball touched?",
        "Which ball did the white ball strike first?",
        "Tell me the first ball the cue ball made contact with.",
        "Which object ball was hit first by the cue ball?",
    ],
    "cushions": [
        "How many cushions did the cue ball hit?",
        "How many times did the cue ball bounce off a cushion?",
        "Count the cushion contacts of the cue ball.",
        "How many rails did the white ball touch?",
        "How often did the cue ball hit the cushions?",
    ],
    "balls_left": [
        "How many coloured balls are left on the table at the end?",
        "How many object balls remain on the table?",
        "Count the coloured balls still on the table at the end of the clip.",
        "How many balls besides the cue ball are left?",
        "At the end, how many object balls are still on the table?",
    ],
    "cue_direction": [
        "In which direction did the cue ball move first?",
        "Which way was the cue ball struck?",
        "Where did the cue ball head after the strike?",
        "In what direction did the white ball start rolling?",
        "Which direction did the cue ball go at the start?",
    ],
    "which_pocketed": [
        "In which of the two clips was a ball pocketed?",
        "Which clip shows a ball going into a pocket?",
        "Comparing the two clips, where did a coloured ball get pocketed?",
        "Which of these two shots pocketed a ball?",
        "In which video did an object ball drop into a pocket?",
    ],
    "which_more_left": [
        "Which clip ends with more coloured balls on the table?",
        "In which of the two clips are more object balls left at the end?",
        "Which shot leaves more balls on the table?",
        "Comparing the two clips, which one has more balls remaining at the end?",
        "Which video finishes with more coloured balls still on the table?",
    ],
}

# questions about one shot of a long clip made of several shots in a row ({nth}: first, second...)
LONG_QUESTIONS: dict[str, list[str]] = {
    "shot_first_pocketed": [
        "In the {nth} shot, which ball was pocketed first?",
        "Which ball went in first in the {nth} shot?",
        "During the {nth} shot, which ball dropped into a pocket first?",
        "What happened in the {nth} shot: which ball was potted first?",
        "Look at the {nth} shot. Which ball went into a pocket first?",
    ],
    "shot_balls_left": [
        "How many coloured balls are left at the end of the {nth} shot?",
        "After the {nth} shot, how many object balls remain on the table?",
        "Count the coloured balls left on the table when the {nth} shot ends.",
        "At the end of the {nth} shot, how many object balls are still on the table?",
        "How many balls besides the cue ball are left after the {nth} shot?",
    ],
    "shot_cue_direction": [
        "In the {nth} shot, which way did the cue ball go first?",
        "Which direction did the cue ball move in the {nth} shot?",
        "Where did the cue ball head at the start of the {nth} shot?",
        "In the {nth} shot, in what direction was the cue ball struck?",
        "Which way did the white ball start rolling in the {nth} shot?",
    ],
    "which_shot_pocketed": [
        "In which shot was the {colour} ball pocketed?",
        "In which part of the video did the {colour} ball go into a pocket?",
        "When was the {colour} ball potted: in which of the shots?",
        "The {colour} ball went in during one of the shots. Which one?",
        "Which shot pocketed the {colour} ball?",
    ],
}
ORDINALS = ("first", "second", "third", "fourth", "fifth")

KINDS = {
    "first_pocketed": "colour", "pocket": "pocket", "any_pocketed": "yesno", "scratch": "yesno",
    "first_contact": "colour", "cushions": "number", "balls_left": "number", "cue_direction": "direction",
    "which_pocketed": "clip", "which_more_left": "clip",
}
LONG_KINDS = {"shot_first_pocketed": "colour", "shot_balls_left": "number", "shot_cue_direction": "direction",
              "which_shot_pocketed": "shot"}
SINGLE_TYPES = [t for t, k in KINDS.items() if k != "clip"]
PAIR_TYPES = [t for t, k in KINDS.items() if k == "clip"]
KINDS.update(LONG_KINDS)


def single_qas(truth: ShotTruth, rng: np.random.Generator) -> list[QA]:
    """One question of every type that applies to this clip."""
    pocketed = truth.object_pocketed
    first = pocketed[0] if pocketed else None

    def ask(qtype: str, answer: str, value: str, **fmt) -> QA:
        question = QUESTIONS[qtype][int(rng.integers(len(QUESTIONS[qtype])))].format(**fmt)
        return QA(qtype, question, answer, value)

    qas = []
    if first:
        qas.append(ask("first_pocketed", f"The {first.ball} ball went into the {first.pocket} pocket first.", first.ball))
        qas.append(ask("pocket", f"The {first.ball} ball went into the {first.pocket} pocket.", first.pocket,
                       colour=first.ball))
        qas.append(ask("any_pocketed", f"Yes, the {first.ball} ball went into the {first.pocket} pocket.", "yes"))
    else:
        qas.append(ask("first_pocketed", "No ball was pocketed.", "none"))
        qas.append(ask("any_pocketed", "No, no ball went into a pocket.", "no"))
    if truth.scratch:
        pocket = next(p.pocket for p in truth.pocketed if p.ball == "cue")
        qas.append(ask("scratch", f"Yes, the cue ball fell into the {pocket} pocket.", "yes"))
    else:
        qas.append(ask("scratch", "No, the cue ball stayed on the table.", "no"))
    if truth.first_contact:
        qas.append(ask("first_contact", f"The cue ball hit the {truth.first_contact} ball first.", truth.first_contact))
    else:
        qas.append(ask("first_contact", "The cue ball did not hit any ball.", "none"))
    n = truth.cue_cushions
    qas.append(ask("cushions", "The cue ball did not touch any cushion." if n == 0 else
                   f"The cue ball hit {_words(n)} cushion{'s' if n > 1 else ''}.", str(n)))
    left = len(truth.balls_left)
    qas.append(ask("balls_left", "No coloured ball is left on the table." if left == 0 else
                   f"{_words(left).capitalize()} coloured ball{'s are' if left > 1 else ' is'} left on the table.",
                   str(left)))
    qas.append(ask("cue_direction", f"The cue ball moved towards the {truth.cue_direction}.", truth.cue_direction))
    return qas


def pair_qas(a: ShotTruth, b: ShotTruth, rng: np.random.Generator) -> list[QA]:
    """Questions about two clips shown together (first, then second)."""
    pa, pb = bool(a.object_pocketed), bool(b.object_pocketed)
    which = {(True, True): ("both", "In both clips."), (True, False): ("first", "In the first clip."),
             (False, True): ("second", "In the second clip."), (False, False): ("neither", "In neither clip.")}
    value, answer = which[(pa, pb)]
    la, lb = len(a.balls_left), len(b.balls_left)
    if la == lb:
        more = ("same", f"Both clips end with the same number of coloured balls ({_words(la)}).")
    else:
        more = ("first", "The first clip.") if la > lb else ("second", "The second clip.")
    out = []
    for qtype, (v, ans) in (("which_pocketed", (value, answer)), ("which_more_left", more)):
        out.append(QA(qtype, QUESTIONS[qtype][int(rng.integers(len(QUESTIONS[qtype])))], ans, v))
    return out


def caption(truth: ShotTruth) -> str:
    """One free-text description of the clip (for video-text alignment)."""
    colours = [b.colour for b in truth.balls if b.colour != "cue"]
    parts = [f"A top-down view of a pool table with {truth.cloth} cloth, the white cue ball and "
             f"{_words(len(colours))} coloured balls: {', '.join(colours)}."]
    move = f"The cue ball moves towards the {truth.cue_direction}"
    parts.append(f"{move} and hits the {truth.first_contact} ball first." if truth.first_contact
                 else f"{move} without hitting another ball.")
    for p in truth.object_pocketed:
        parts.append(f"The {p.ball} ball goes into the {p.pocket} pocket.")
    if truth.scratch:
        parts.append("The cue ball falls into a pocket.")
    n = truth.cue_cushions
    parts.append("The cue ball touches no cushion." if n == 0 else
                 f"The cue ball touches {_words(n)} cushion{'s' if n > 1 else ''}.")
    return " ".join(parts)


def long_qas(shots: list[ShotTruth], rng: np.random.Generator) -> list[QA]:
    """Questions about a clip of several shots in a row, each needing the right shot: what
    happened in the n-th shot (the answers are those of a one-shot clip), and in which shot a
    ball was pocketed (for a colour pocketed in exactly one of them)."""
    def ask(qtype: str, answer: str, value: str, **fmt) -> QA:
        question = LONG_QUESTIONS[qtype][int(rng.integers(len(LONG_QUESTIONS[qtype])))].format(**fmt)
        return QA(qtype, question, answer, value)

    qas = []
    for n, truth in enumerate(shots):
        single = {qa.qtype: qa for qa in single_qas(truth, rng)}
        for qtype in ("first_pocketed", "balls_left", "cue_direction"):
            qa = single[qtype]
            qas.append(ask(f"shot_{qtype}", qa.answer, qa.truth, nth=ORDINALS[n]))
    pocketed_in: dict[str, list[int]] = {}
    for n, truth in enumerate(shots):
        for p in truth.object_pocketed:
            pocketed_in.setdefault(p.ball, []).append(n)
    for colour, where in sorted(pocketed_in.items()):
        if len(where) == 1:
            qas.append(ask("which_shot_pocketed", f"In the {ORDINALS[where[0]]} shot.", ORDINALS[where[0]],
                           colour=colour))
    return qas
