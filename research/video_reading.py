"""Reading questions asked of the video: do TokenMining's tokens come to carry each ball's cell
when stage 2 also asks where a ball was?

It takes a finished recipe run (``--run``: its data, towers, features and stage 1 are kept, the
stage-1 checkpoint linked), and runs stage 2 again under ``--out`` with ``--per-clip`` reading
questions per training clip besides the recipe's records (``text_facts.reading_records`` asked of
the video: "Where was the red ball in frame 3?" -> ``In frame 3 the red ball was at e3.``, and
"Where was the red ball in each frame?" -> ``d5 d4 off off.``), then the recipe's evaluation, and
the same reading questions asked of the test clips, scored cell by cell (``report-reading.json``):
how much of *where* the model reads from its own tokens.

    .venv/bin/python research/video_reading.py --run RUN --out DIR [--per-clip 4] [KEY=VALUE ...]

``KEY=VALUE``: the recipe's dotted overrides, exactly as the run was made with (its seed too).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from collections import Counter
from pathlib import Path

from hilight.checkpoint import read_config
from hilight.config import to_dict
from hilight.data import read_records
from hilight.evaluation.qa import load_items, run
from hilight.inference.engine import Engine, GenerationSettings
from hilight.recipes.billiards_small.recipe import STEPS, Progress, _evaluate, _vlm, load_recipe
from hilight.recipes.billiards_small.text_facts import reading_records

TEST_SEED = 12345  # the test clips' reading questions: another draw than training's


def _cells(text: str) -> list[str]:
    """The cells (``e3``) and ``off`` marks of an answer, in order."""
    words = text.replace(".", " ").replace(",", " ").split()
    return [w for w in words if w == "off" or (len(w) == 2 and w[0] in "abcdefgh" and w[1] in "12345678")]


def score_reading(items: list) -> dict:
    """Per question kind: answers right word for word, and cells right (column, row) position by
    position against the reference."""
    out: dict[str, dict] = {}
    for kind in ("frame", "line"):
        chosen = [it for it in items if (" in frame " in it.messages[-1].content) == (kind == "frame")]
        if not chosen:
            continue
        counts: Counter = Counter()
        for it in chosen:
            counts["exact"] += it.answer.strip() == it.reference.strip()
            truth, said = _cells(it.reference), _cells(it.answer)
            truth = truth[-1:] if kind == "frame" else truth  # the frame question's one cell
            said = said[-1:] if kind == "frame" else said
            for k, t in enumerate(truth):
                s = said[k] if k < len(said) else ""
                counts["cells"] += 1
                counts["cell"] += s == t
                if t != "off":
                    counts["on"] += 1
                    counts["column"] += s[:1] == t[:1] and s != "off"
                    counts["row"] += s[1:] == t[1:] and s != "off"
                counts["off_right"] += t == "off" and s == "off"
                counts["off"] += t == "off"
        n = len(chosen)
        out[kind] = {"n": n, "exact": counts["exact"] / n, "cell": counts["cell"] / max(1, counts["cells"]),
                     "column": counts["column"] / max(1, counts["on"]), "row": counts["row"] / max(1, counts["on"]),
                     "off": counts["off_right"] / max(1, counts["off"])}
    return out


def evaluate_reading(model: Path, data: Path, out: Path, video_cfg) -> dict:
    """The reading questions of every test clip (two each), answered from the video."""
    records = reading_records(read_records(data / "test-captions.json"), video_cfg, 2, TEST_SEED, asked_of="video")
    file = out / "reading-test.json"
    file.write_text(json.dumps([{k: v for k, v in r.items() if k != "meta"} for r in records]) + "\n")
    items, problems = load_items(file, data / "videos")
    failed = run(Engine.from_checkpoint(model), items, GenerationSettings(max_new_tokens=32), batch_size=16,
                 blind=False)
    result = {"scores": score_reading([it for it in items if it.id not in failed]), "failed": failed,
              "problems": problems,
              "examples": [{"question": it.messages[-1].content, "reference": it.reference, "answer": it.answer}
                           for it in items[:12]]}
    (out / "report-reading.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def link_done_steps(run_dir: Path, out: Path, settings: dict) -> None:
    """Start ``out`` with the run's features and stage 1 counted as done (stage 1 hard-linked)."""
    out.mkdir(parents=True, exist_ok=True)
    if (out / "recipe.json").is_file():
        return
    seconds = json.loads((run_dir / "recipe.json").read_text())["seconds"]
    shutil.copytree(run_dir / "stage1", out / "stage1", copy_function=os.link)
    (out / "features-complete").write_text("")
    kept = {k: seconds[k] for k in (STEPS[4], STEPS[5])}
    (out / "recipe.json").write_text(json.dumps({"settings": settings, "seconds": kept}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a finished billiards-small recipe run")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--per-clip", type=int, default=4, help="reading questions per training clip")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="the recipe's dotted overrides")
    args = parser.parse_args()

    cfg = load_recipe(None, args.overrides)
    if json.loads((args.run / "recipe.json").read_text())["settings"]["config"] != json.loads(json.dumps(to_dict(cfg))):
        raise SystemExit(f"{args.run}: was made with other settings than these overrides")
    data, video_cfg = args.run / "data", read_config(args.run / "base").video
    settings = {"recipe": "billiards-small", "config": to_dict(cfg), "video_reading_per_clip": args.per_clip}
    link_done_steps(args.run, args.out, settings)
    progress = Progress(args.out, settings)
    extra = reading_records(read_records(data / "train-captions.json"), video_cfg, args.per_clip, cfg.seed,
                            asked_of="video")
    model = _vlm(args.out, data, args.run / "align-image" / "final", args.run / "features", cfg, progress,
                 stage2_extra=extra)
    progress.step(STEPS[7], args.out / "report-long" / "report.json", lambda: _evaluate(model, data, args.out))
    progress.step("reading questions of the test clips", args.out / "report-reading.json",
                  lambda: evaluate_reading(model, data, args.out, video_cfg))
    result = json.loads((args.out / "report" / "report.json").read_text())
    long = json.loads((args.out / "report-long" / "report.json").read_text()).get("overall")
    reading = json.loads((args.out / "report-reading.json").read_text())["scores"]
    print(json.dumps(progress.save(accuracy={**{k: result[k] for k in ("single_video", "two_video", "overall")},
                                             "long_clips": long}, reading=reading), indent=1))


if __name__ == "__main__":
    main()
