"""Deterministic, judge-free answer scoring.

Normalisation (applied to every answer before extraction): lower-case; ``-``, ``_`` and ``/``
become spaces; every character other than a-z, 0-9 and space is dropped; runs of spaces
collapse. Then, per kind:

- ``colour``: the phrases "cue ball" and "white ball" are removed; the first ball colour word
  (yellow, blue, red, purple, orange, green, maroon, black, pink) is the value; with none, an
  answer containing a negation ("no", "none", "not", "nothing", "neither") means ``none``.
- ``pocket``: the first vertical word (top/upper, bottom/lower) followed by a horizontal word
  (left, right, middle/center/centre/side), as ``top-left`` ... ``bottom-middle``.
- ``yesno``: the first word: yes/yeah/yep -> ``yes``, no/nope -> ``no``.
- ``number``: the first integer or number word (zero..twenty, once = 1, twice = 2); with
  none, a negation means ``0``.
- ``direction``: the first vertical word (top/up/upper/upward(s)/north, bottom/down/lower/
  downward(s)/south) and the first horizontal word (left/west, right/east), as ``top-right``,
  ``left``, ...
- ``clip``: "same"/"equal", then "both", then "neither"/"none" take precedence; otherwise the
  first of first/1st/one and second/2nd/two.
- ``shot``: the first ordinal (first/1st ... fifth/5th) as ``first`` ... ``fifth``; with none,
  a negation means ``none``.

An answer from which no value can be extracted is *unparseable* and counts as wrong.
"""

from __future__ import annotations

import re
from collections import Counter

# the colour words of a ``colour`` answer (the billiards balls' colours)
COLOURS = ("yellow", "blue", "red", "purple", "orange", "green", "maroon", "black", "pink")
KINDS = ("colour", "pocket", "yesno", "number", "direction", "clip", "shot")
_ORDINALS = {"first": "first", "1st": "first", "second": "second", "2nd": "second", "third": "third",
             "3rd": "third", "fourth": "fourth", "4th": "fourth", "fifth": "fifth", "5th": "fifth"}

_NUMBERS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
_NUMBERS.update(once=1, twice=2)
_NEGATION = {"no", "none", "not", "nothing", "neither", "didnt", "never"}
_VERTICAL = {"top": "top", "upper": "top", "up": "top", "upward": "top", "upwards": "top", "north": "top",
             "bottom": "bottom", "lower": "bottom", "down": "bottom", "downward": "bottom", "downwards": "bottom",
             "south": "bottom"}
_HORIZONTAL = {"left": "left", "west": "left", "right": "right", "east": "right"}
_POCKET_H = {"left": "left", "right": "right", "middle": "middle", "center": "middle", "centre": "middle",
             "side": "middle"}


def normalize(text: str) -> list[str]:
    text = re.sub(r"[-_/]", " ", text.lower())
    text = re.sub(r"[^a-z0-9 ]", "", text)
    return text.split()


def extract(kind: str, answer: str) -> str | None:
    """The value an answer states for a question of ``kind``, or None if unparseable."""
    words = normalize(answer)
    if kind == "colour":
        text = " ".join(words).replace("cue ball", " ").replace("white ball", " ").split()
        colour = next((w for w in text if w in COLOURS), None)
        return colour or ("none" if _NEGATION & set(text) else None)
    if kind == "pocket":
        for i, w in enumerate(words[:-1]):
            if w in ("top", "upper", "bottom", "lower") and words[i + 1] in _POCKET_H:
                return f"{_VERTICAL[w]}-{_POCKET_H[words[i + 1]]}"
        return None
    if kind == "yesno":
        first = words[0] if words else ""
        return "yes" if first in ("yes", "yeah", "yep") else "no" if first in ("no", "nope") else None
    if kind == "number":
        for w in words:
            if w.isdigit():
                return str(int(w))
            if w in _NUMBERS:
                return str(_NUMBERS[w])
        return "0" if _NEGATION & set(words) else None
    if kind == "direction":
        vertical = next((_VERTICAL[w] for w in words if w in _VERTICAL), None)
        horizontal = next((_HORIZONTAL[w] for w in words if w in _HORIZONTAL), None)
        if vertical and horizontal:
            return f"{vertical}-{horizontal}"
        return vertical or horizontal
    if kind == "clip":
        if {"same", "equal"} & set(words):
            return "same"
        if "both" in words:
            return "both"
        if {"neither", "none"} & set(words):
            return "neither"
        for w in words:
            if w in ("first", "1st", "one"):
                return "first"
            if w in ("second", "2nd", "two"):
                return "second"
        return None
    if kind == "shot":
        ordinal = next((_ORDINALS[w] for w in words if w in _ORDINALS), None)
        return ordinal or ("none" if _NEGATION & set(words) else None)
    raise ValueError(f"unknown answer kind {kind!r}")


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style token F1 between two normalised answers."""
    pred, ref = normalize(prediction), normalize(reference)
    common = sum((Counter(pred) & Counter(ref)).values())
    if not pred or not ref or common == 0:
        return float(pred == ref)
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, reference: str) -> bool:
    return normalize(prediction) == normalize(reference)
