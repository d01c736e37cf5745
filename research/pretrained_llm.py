"""The VLM stages on an LLM pre-trained on the text-facts task: does what the LLM learnt from
the true facts as text carry over to TokenMining's tokens?

It takes a recipe run (``--run``; its steps 1-4 are run or kept as the recipe does) and an LLM
trained by ``benchmarks/text_facts.py`` on the same run's base (``--llm``: its ``final``), puts
that LLM into the aligned model in place of the random one, and runs the recipe's steps 5-8 on it
under ``--out``: stage 1 trains TokenMining with the LLM frozen, on the answers (``--stage1-lm``,
default 1) beside the frame facts, so that its tokens are what the pre-trained LLM reads; stage 2
is the recipe's full fine-tune.

    .venv/bin/python research/pretrained_llm.py --run RUN --llm RUN/text-facts/llm/final --out DIR [KEY=VALUE ...]

``KEY=VALUE``: the recipe's dotted overrides, as the run was made with.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hilight.checkpoint import load_checkpoint, save_checkpoint
from hilight.config import to_dict
from hilight.recipes.billiards_small.recipe import STEPS, Progress, _evaluate, _prepare, _vlm, load_recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a billiards-small recipe run (steps 1-4 are run or kept)")
    parser.add_argument("--llm", type=Path, required=True, help="a checkpoint whose LLM was trained on text facts")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--stage1-lm", type=float, default=1.0, help="the answers' weight in stage 1")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="the recipe's dotted overrides")
    args = parser.parse_args()

    cfg = load_recipe(None, args.overrides)
    data = args.run / "data"
    _prepare(args.run, data, cfg, 2, Progress(args.run, {"recipe": "billiards-small", "config": to_dict(cfg)}))
    args.out.mkdir(parents=True, exist_ok=True)
    progress = Progress(args.out, {"recipe": "billiards-small", "config": to_dict(cfg), "llm": str(args.llm),
                                   "stage1_lm": args.stage1_lm})
    start = args.out / "aligned-pretrained"

    def merge() -> None:
        model, tokenizer = load_checkpoint(args.run / "align-image" / "final")
        llm, llm_tokenizer = load_checkpoint(args.llm)
        if llm_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise SystemExit(f"{args.llm}: its tokenizer is not the run's")
        model.llm.load_state_dict(llm.llm.state_dict())
        save_checkpoint(model, start, tokenizer)

    progress.step("pre-trained LLM into the aligned model", start / "config.json", merge)
    model = _vlm(args.out, data, start, args.run / "features", cfg, progress, stage1_lm=args.stage1_lm)
    progress.step(STEPS[7], args.out / "report-long" / "report.json", lambda: _evaluate(model, data, args.out))
    result = json.loads((args.out / "report" / "report.json").read_text())
    print(json.dumps(progress.save(accuracy={k: result[k] for k in ("single_video", "two_video", "overall")
                                             if k in result}), indent=1))


if __name__ == "__main__":
    main()
