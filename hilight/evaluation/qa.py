"""Judge-free evaluation of a HiLight model on video-QA JSON.

Every model turn of every record is one item: the conversation up to that question (earlier
answers are the reference ones) with its videos, answered with greedy decoding. Records with
``meta`` (``types``, ``kinds`` and ``truth`` per model turn; the billiards generator writes it)
are scored by :mod:`hilight.evaluation.scoring`'s extractor for the turn's answer kind, per
question type; others by exact match and token F1 against the reference answer.
Baselines on the same items: the majority answer per question type, and the same model with
the videos removed from the prompt ("blind"). Records with ``sampling`` read their videos so
(in segments: :mod:`hilight.sampling`), and get a third baseline: the same model shown only
each video's first segment ("first segment").
"""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from hilight.data import read_records, record_videos
from hilight.errors import HiLightError
from hilight.evaluation.scoring import KINDS, exact_match, extract, token_f1
from hilight.sampling import Clip, Sampling, record_sampling
from hilight.text import VIDEO_TOKEN, ConversationError, Message, from_llava

if TYPE_CHECKING:  # evaluation is handed an engine; it never builds one
    from hilight.inference.engine import Engine, GenerationSettings

log = logging.getLogger(__name__)


@dataclass
class Item:
    id: str
    messages: list[Message]
    videos: list[Path | Clip]
    reference: str
    qtype: str | None = None
    kind: str | None = None  # how the answer is scored (hilight.evaluation.scoring.KINDS)
    truth: str | None = None
    answer: str = ""
    blind_answer: str | None = None  # set when the blind baseline ran
    first_segment_answer: str | None = None  # set for items with a video in several segments

    @property
    def sampled(self) -> bool:
        return any(isinstance(v, Clip) and not v.sampling.is_default for v in self.videos)


def load_items(data: Path, videos: Path) -> tuple[list[Item], list[str]]:
    """Items from a LLaVA-style JSON; malformed records are reported and skipped."""
    records = read_records(data)
    items, problems = [], []
    for n, rec in enumerate(records):
        rid = str(rec.get("id", n)) if isinstance(rec, dict) else str(n)
        try:
            messages = from_llava(rec["conversations"])
            paths = record_videos(rec, videos)
            samplings = record_sampling(rec, len(paths))
            if any(not s.is_default for s in samplings):
                paths = [Clip(p, s) for p, s in zip(paths, samplings, strict=True)]
            if sum(m.content.count(VIDEO_TOKEN) for m in messages) != len(paths):
                raise ConversationError(f"{len(paths)} video(s) but a different number of {VIDEO_TOKEN} markers")
            meta = rec.get("meta") or {}
            if meta and any(kind not in KINDS for kind in meta["kinds"]):
                raise ConversationError(f"meta.kinds {meta['kinds']} holds an answer kind other than {', '.join(KINDS)}")
            for k in range(1, len(messages), 2):
                turn = k // 2
                items.append(Item(
                    id=f"{rid}#{turn}" if len(messages) > 2 else rid, messages=messages[:k],
                    videos=paths, reference=messages[k].content, qtype=meta["types"][turn] if meta else None,
                    kind=meta["kinds"][turn] if meta else None, truth=meta["truth"][turn] if meta else None))
        except KeyError as exc:
            problems.append(f"record {rid}: no {exc} {'in meta' if exc.args[0] in ('types', 'kinds', 'truth') else ''}"
                            .rstrip())
        except (TypeError, IndexError, HiLightError) as exc:
            problems.append(f"record {rid}: {exc}")
    return items, problems


def _blind(messages: list[Message]) -> list[Message]:
    return [Message(m.role, m.content.replace(VIDEO_TOKEN, "").strip()) for m in messages]


def first_segment(engine: Engine, video: Path | Clip) -> Path | Clip:
    """``video`` cut to its first segment's span, read as one segment (a baseline for videos
    read in several)."""
    planned = engine.plan(video)
    if len(planned.segments) == 1:
        return video
    first = planned.segments[0]
    last_frame = planned.index.times[max(first.indices)]
    return Clip(planned.clip.path, Sampling(start=first.start, end=last_frame))


def run(engine: Engine, items: list[Item], settings: GenerationSettings, batch_size: int = 8,
        blind: bool = True) -> dict[str, str]:
    """Fill in ``answer`` (and ``blind_answer``, and ``first_segment_answer`` for items read in
    segments); returns {item id: reason} for items whose videos could not be read."""
    failed: dict[str, str] = {}
    # one video's questions together, so each video is decoded and encoded once (the engine keeps
    # the last few), and by length within it, so a batch pads little
    todo = sorted(items, key=lambda it: (len(it.videos), [str(v) for v in it.videos],
                                         sum(len(m.content) for m in it.messages)))
    for start in tqdm(range(0, len(todo), batch_size), desc="evaluating", unit="batch"):
        chunk = todo[start:start + batch_size]
        ok = []
        for it in chunk:  # decode the videos first so one bad file only drops its own items
            try:
                engine.segment_embeddings([engine.plan(v) for v in it.videos])
                ok.append(it)
            except HiLightError as exc:
                failed[it.id] = str(exc)
        if not ok:
            continue
        for it, ans in zip(ok, engine.answer_batch([(it.messages, it.videos) for it in ok], settings), strict=True):
            it.answer = ans
        if blind:
            answers = engine.answer_batch([(_blind(it.messages), []) for it in ok], settings)
            for it, ans in zip(ok, answers, strict=True):
                it.blind_answer = ans
        sampled = [it for it in ok if it.sampled]
        if sampled:
            prompts = [(it.messages, [first_segment(engine, v) for v in it.videos]) for it in sampled]
            for it, ans in zip(sampled, engine.answer_batch(prompts, settings), strict=True):
                it.first_segment_answer = ans
    return failed


def _accuracy(hits: list[bool]) -> float:
    return sum(hits) / len(hits) if hits else 0.0


def report(items: list[Item], failed: dict[str, str], problems: list[str]) -> dict:
    """Per-type accuracy with majority and blind baselines, colour confusion, and the
    unparseable answers; or exact match / token F1 for items without a question type."""
    typed = [it for it in items if it.qtype and it.answer is not None]
    untyped = [it for it in items if not it.qtype]
    out: dict = {"items": len(items), "failed": failed, "skipped_records": problems}
    if typed:
        majority = {t: Counter(it.truth for it in typed if it.qtype == t).most_common(1)[0][0]
                    for t in {it.qtype for it in typed}}
        per_type: dict[str, dict] = {}
        groups: dict[str, list[Item]] = defaultdict(list)
        for it in typed:
            groups[it.qtype].append(it)
        confusion: dict[str, Counter] = defaultdict(Counter)
        unparseable = []
        for qtype, group in sorted(groups.items()):
            preds = [extract(it.kind, it.answer) for it in group]
            blind = ([extract(it.kind, it.blind_answer) for it in group]
                     if group[0].blind_answer is not None else None)
            per_type[qtype] = {
                "n": len(group), "kind": group[0].kind,
                "accuracy": _accuracy([p == it.truth for p, it in zip(preds, group, strict=True)]),
                "majority_answer": majority[qtype],
                "truth_distribution": dict(Counter(it.truth for it in group).most_common()),
                "majority": _accuracy([majority[qtype] == it.truth for it in group]),
            }
            if blind is not None:
                per_type[qtype]["blind"] = _accuracy([p == it.truth for p, it in zip(blind, group, strict=True)])
            if all(it.first_segment_answer is not None for it in group):
                per_type[qtype]["first_segment"] = _accuracy([extract(it.kind, it.first_segment_answer) == it.truth
                                                              for it in group])
            for p, it in zip(preds, group, strict=True):
                if p is None:
                    unparseable.append({"id": it.id, "type": qtype, "answer": it.answer})
                if group[0].kind == "colour":
                    confusion[it.truth][p or "unparseable"] += 1
        out["per_type"] = per_type
        out["confusion_colour"] = {t: dict(c) for t, c in sorted(confusion.items())}
        out["unparseable"] = unparseable
        for name, select in (("single_video", lambda it: len(it.videos) == 1), ("two_video", lambda it: len(it.videos) == 2),
                             ("overall", lambda it: True)):
            chosen = [it for it in typed if select(it)]
            if not chosen:
                continue
            row = {"n": len(chosen),
                   "accuracy": _accuracy([extract(it.kind, it.answer) == it.truth for it in chosen]),
                   "majority": _accuracy([majority[it.qtype] == it.truth for it in chosen])}
            if chosen[0].blind_answer is not None:
                row["blind"] = _accuracy([extract(it.kind, it.blind_answer) == it.truth for it in chosen])
            if all(it.first_segment_answer is not None for it in chosen):
                row["first_segment"] = _accuracy([extract(it.kind, it.first_segment_answer) == it.truth
                                                  for it in chosen])
            out[name] = row
    if untyped:
        out["reference"] = {
            "n": len(untyped),
            "exact_match": _accuracy([exact_match(it.answer, it.reference) for it in untyped]),
            "token_f1": sum(token_f1(it.answer, it.reference) for it in untyped) / len(untyped),
        }
    out["answers"] = [{"id": it.id, "type": it.qtype, "truth": it.truth, "reference": it.reference,
                       "answer": it.answer, "blind_answer": it.blind_answer,
                       **({"first_segment_answer": it.first_segment_answer} if it.first_segment_answer is not None
                          else {})} for it in items]
    return out


def markdown(result: dict, title: str) -> str:
    lines = [f"# {title}", ""]
    for name in ("single_video", "two_video", "overall"):
        if name in result:
            r = result[name]
            blind = f", blind {r['blind']:.1%}" if "blind" in r else ""
            first = f", first segment only {r['first_segment']:.1%}" if "first_segment" in r else ""
            lines.append(f"- **{name.replace('_', ' ')}**: {r['accuracy']:.1%} of {r['n']} "
                         f"(majority {r['majority']:.1%}{blind}{first})")
    if "per_type" in result:
        segmented = any("first_segment" in r for r in result["per_type"].values())
        extra = (" first segment only |", "---|") if segmented else ("", "")
        lines += ["", f"| question type | kind | n | accuracy | blind |{extra[0]} majority (answer) |",
                  f"|---|---|---|---|---|{extra[1]}---|"]
        for qtype, r in result["per_type"].items():
            blind = f"{r['blind']:.1%}" if "blind" in r else "-"
            first = f" {r['first_segment']:.1%} |" if "first_segment" in r else (" - |" if segmented else "")
            lines.append(f"| {qtype} | {r['kind']} | {r['n']} | {r['accuracy']:.1%} | {blind} |{first} "
                         f"{r['majority']:.1%} ({r['majority_answer']}) |")
        lines += ["", f"Unparseable answers: {len(result['unparseable'])} (listed in report.json).", "",
                  "Answer distribution (ground truth):", ""]
        for qtype, r in result["per_type"].items():
            dist = ", ".join(f"{k} {v}" for k, v in r["truth_distribution"].items())
            lines.append(f"- {qtype}: {dist}")
    if "reference" in result:
        r = result["reference"]
        lines += ["", f"Reference answers: exact match {r['exact_match']:.1%}, token F1 {r['token_f1']:.3f} "
                      f"over {r['n']} items."]
    if result["failed"] or result["skipped_records"]:
        lines += ["", f"Failed items: {len(result['failed'])}; skipped records: {len(result['skipped_records'])}."]
    return "\n".join(lines) + "\n"


def bar_chart(result: dict, path: Path, title: str) -> None:
    series = [("model", "accuracy", "#2b6cb0"), ("blind", "blind", "#a0aec0"), ("majority", "majority", "#ed8936")]
    if any("first_segment" in r for r in result["per_type"].values()):
        series.insert(2, ("first segment only", "first_segment", "#68d391"))
    grouped_bars(result["per_type"], series, path, title)


def grouped_bars(rows: dict[str, dict], series: list[tuple[str, str, str]], path: Path, title: str) -> None:
    """An accuracy chart: a group of bars per row, one bar per (label, key, colour) of ``series``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    fig, ax = plt.subplots(figsize=(max(6, len(names) * 1.1), 4))
    width = 0.8 / len(series)
    for k, (label, key, colour) in enumerate(series):
        ax.bar([i + (k - (len(series) - 1) / 2) * width for i in range(len(names))],
               [rows[n].get(key, 0) for n in names], width, label=label, color=colour)
    ax.set_xticks(range(len(names)), [n.replace("_", "\n") for n in names], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def evaluate(engine: Engine, data: Path, videos: Path, out: Path | None, settings: GenerationSettings,
             batch_size: int = 8, blind: bool = True, limit: int | None = None, title: str = "HiLight evaluation") -> dict:
    items, problems = load_items(data, videos)
    for p in problems:
        log.warning("%s: %s", data, p)
    if limit:
        items = items[:limit]
    failed = run(engine, items, settings, batch_size, blind)
    for item_id, reason in failed.items():
        log.warning("skipped %s: %s", item_id, reason)
    result = report([it for it in items if it.id not in failed], failed, problems)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(result, indent=1) + "\n")
        (out / "report.md").write_text(markdown(result, title))
        if "per_type" in result:
            bar_chart(result, out / "accuracy.png", title)
    return result
