"""The alignment-loss ablation: retrieval on the held-out split for the global loss, + the SPARC
local loss, + the language mask, over several seeds at the same budget.

    .venv/bin/python research/align_ablation.py --config configs/align-billiards.yaml --out DIR [KEY=VALUE ...]

Its result for the billiards towers is reports/align-ablation/ (see docs/training.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace
from pathlib import Path

from hilight.config import AlignConfig, load_yaml
from hilight.evaluation.retrieval import eval_retrieval
from hilight.training.align import align

ABLATIONS = {
    "global": {"local_weight": 0.0},
    "global+local": {"language_mask": False},
    "global+local+mask": {"language_mask": True},
}


def ablation(cfg: AlignConfig, seeds: list[int], out: Path) -> dict:
    """Retrieval on ``cfg.data.val`` for the three loss settings x seeds, at the same budget."""
    if not cfg.data.val:
        raise SystemExit("the ablation evaluates on data.val: set it to a held-out split")
    rows: dict[str, list[dict]] = {}
    for name, change in ABLATIONS.items():
        for seed in seeds:
            run = replace(cfg, seed=seed, output_dir=str(out / f"{name}-seed{seed}"),
                          loss=replace(cfg.loss, **change))
            align(run)
            rows.setdefault(name, []).append(eval_retrieval(Path(run.output_dir) / "final", cfg.data.val,
                                                            cfg.data.videos))
    table = {}
    for name, results in rows.items():
        table[name] = {}
        for direction in ("text_to_video", "video_to_text"):
            for metric in ("R@1", "R@5", "R@10", "median_rank"):
                values = [r[direction][metric] for r in results]
                table[name][f"{direction}/{metric}"] = {
                    "mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "values": values}
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.json").write_text(json.dumps({"seeds": seeds, "steps": cfg.max_steps, "table": table}, indent=1))
    (out / "ablation.md").write_text(ablation_markdown(table, seeds, cfg.max_steps))
    return table


def ablation_markdown(table: dict, seeds: list[int], steps: int) -> str:
    lines = [f"Retrieval on the held-out split, {steps} steps each, mean ± std over seeds {seeds}.", "",
             "| loss | text→video R@1 | R@5 | R@10 | video→text R@1 | R@5 | R@10 |", "|---|---|---|---|---|---|---|"]
    for name, row in table.items():
        cells = [f"{row[f'{d}/{m}']['mean']:.1%} ± {row[f'{d}/{m}']['std']:.1%}"
                 for d in ("text_to_video", "video_to_text") for m in ("R@1", "R@5", "R@10")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="a serialized AlignConfig (YAML)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    cfg = load_yaml(AlignConfig, args.config, args.overrides)
    print(ablation_markdown(ablation(cfg, args.seeds, args.out), args.seeds, cfg.max_steps))


if __name__ == "__main__":
    main()
