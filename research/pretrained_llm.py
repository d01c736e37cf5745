"""The VLM stages on an LLM pre-trained on the text-facts task: does what the LLM learnt from
the true facts as text carry over to TokenMining's tokens?

It takes a recipe run (``--run``; its steps 1-4 are run or kept as the recipe does) and an LLM
trained by ``benchmarks/text_facts.py`` on the same run's base (``--llm``: its ``final``), puts
that LLM into the aligned model in place of the random one, and runs the recipe's steps 5-8 on it
under ``--out``: stage 1 trains TokenMining with the LLM frozen, on the answers (``--stage1-lm``,
default 1) beside the frame facts, so that its tokens are what the pre-trained LLM reads; stage 2
is the recipe's full fine-tune.

``--reasoned``: both stages train on answers that say their reasoning step first, read from the
true cells (``text_facts.reasoned_records``, as the LLM of ``benchmarks/text_facts.py
--reasoned`` was trained), and the model is evaluated with room for the step (48 new tokens),
with the steps scored word for word (``text_facts.reasoning_steps``).

    .venv/bin/python research/pretrained_llm.py --run RUN --llm RUN/text-facts/llm/final --out DIR \
        [--reasoned] [KEY=VALUE ...]

``KEY=VALUE``: the recipe's dotted overrides, as the run was made with.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hilight.checkpoint import load_checkpoint, read_config, save_checkpoint
from hilight.config import to_dict
from hilight.data import read_records
from hilight.evaluation.qa import load_items, markdown, report, run
from hilight.inference.engine import Engine, GenerationSettings
from hilight.recipes.billiards_small.recipe import STEPS, Progress, _evaluate, _prepare, _vlm, load_recipe
from hilight.recipes.billiards_small.text_facts import reasoned_records, reasoning_steps


def reasoned_data(data: Path, out: Path, video_cfg) -> Path:
    """``data`` under ``out`` with train, val and test answers reasoned; everything else linked."""
    out.mkdir(parents=True, exist_ok=True)
    for entry in data.iterdir():
        target = out / entry.name
        if entry.name in ("train.json", "val.json", "test.json"):
            split = entry.name.removesuffix(".json")
            records = reasoned_records(read_records(entry), read_records(data / f"{split}-captions.json"), video_cfg)
            target.write_text(json.dumps(records) + "\n")
        elif not target.exists():
            target.symlink_to(entry.resolve())
    return out


def evaluate_reasoned(model: Path, data: Path, out: Path) -> None:
    """The test split's questions with 48 new tokens (a step, then the answer), and the steps' scores."""
    engine = Engine.from_checkpoint(model)
    items, problems = load_items(data / "test.json", data / "videos")
    failed = run(engine, items, GenerationSettings(max_new_tokens=48), batch_size=16, blind=False)
    result = report([it for it in items if it.id not in failed], failed, problems)
    result["reasoning_steps"] = reasoning_steps(items)
    out.mkdir(parents=True, exist_ok=True)
    (out / "answers.json").write_text(json.dumps([{"id": it.id, "type": it.qtype, "truth": it.truth,
                                                   "reference": it.reference, "answer": it.answer}
                                                  for it in items], indent=0) + "\n")
    (out / "report.md").write_text(markdown(result, f"billiards-small, pre-trained LLM, reasoned ({out.parent.name})"))
    (out / "report.json").write_text(json.dumps(result, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a billiards-small recipe run (steps 1-4 are run or kept)")
    parser.add_argument("--llm", type=Path, required=True, help="a checkpoint whose LLM was trained on text facts")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--stage1-lm", type=float, default=1.0, help="the answers' weight in stage 1")
    parser.add_argument("--reasoned", action="store_true", help="answers say their reasoning step first")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="the recipe's dotted overrides")
    args = parser.parse_args()

    cfg = load_recipe(None, args.overrides)
    data = args.run / "data"
    _prepare(args.run, data, cfg, 2, Progress(args.run, {"recipe": "billiards-small", "config": to_dict(cfg)}))
    args.out.mkdir(parents=True, exist_ok=True)
    progress = Progress(args.out, {"recipe": "billiards-small", "config": to_dict(cfg), "llm": str(args.llm),
                                   "stage1_lm": args.stage1_lm, "reasoned": args.reasoned})
    start = args.out / "aligned-pretrained"

    def merge() -> None:
        model, tokenizer = load_checkpoint(args.run / "align-image" / "final")
        llm, llm_tokenizer = load_checkpoint(args.llm)
        if llm_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise SystemExit(f"{args.llm}: its tokenizer is not the run's")
        model.llm.load_state_dict(llm.llm.state_dict())
        save_checkpoint(model, start, tokenizer)

    progress.step("pre-trained LLM into the aligned model", start / "config.json", merge)
    if args.reasoned:
        data = reasoned_data(data, args.out / "data", read_config(args.run / "base").video)
    model = _vlm(args.out, data, start, args.run / "features", cfg, progress, stage1_lm=args.stage1_lm)
    if args.reasoned:
        progress.step(STEPS[7], args.out / "report" / "report.json",
                      lambda: evaluate_reasoned(model, data, args.out / "report"))
    else:
        progress.step(STEPS[7], args.out / "report-long" / "report.json", lambda: _evaluate(model, data, args.out))
    result = json.loads((args.out / "report" / "report.json").read_text())
    print(json.dumps(progress.save(accuracy={k: result[k] for k in ("single_video", "two_video", "overall",
                                                                     "reasoning_steps") if k in result}), indent=1))


if __name__ == "__main__":
    main()
