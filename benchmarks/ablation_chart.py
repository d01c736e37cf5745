"""The dual-tower check: the full model next to its two single-tower ablations, as a table and a chart.

Reads the ``report/report.json`` of finished recipe runs (``hilight recipe billiards-small``,
the ablations with ``--towers video`` / ``--towers image --source RUN``) and writes a markdown
table and a grouped bar chart of accuracy per question type, with the blind baseline.

    .venv/bin/python benchmarks/ablation_chart.py --run "full model" runs/r4 \\
        --run "no image tower" runs/r4-no-image --run "no video tower" runs/r4-no-video \\
        --out reports/billiards-small-ablations
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", nargs=2, action="append", metavar=("LABEL", "RUN"), required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    reports = {label: json.loads((Path(run) / "report" / "report.json").read_text()) for label, run in args.run}
    first = next(iter(reports.values()))
    types = sorted(first["per_type"])
    rows = ["single_video", "two_video", *types]

    def cell(report: dict, row: str) -> tuple[float, float]:
        entry = report[row] if row in ("single_video", "two_video") else report["per_type"][row]
        return entry["accuracy"], entry["blind"]

    lines = ["| | " + " | ".join(reports) + " | blind (full model) |", "|---|" + "---|" * (len(reports) + 1)]
    for row in rows:
        values = [f"{cell(r, row)[0]:.1%}" for r in reports.values()]
        lines.append(f"| {row.replace('_', ' ')} | " + " | ".join(values) + f" | {cell(first, row)[1]:.1%} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ablations.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 0.8 / (len(reports) + 1)
    fig, ax = plt.subplots(figsize=(11, 4))
    for k, (label, report) in enumerate(reports.items()):
        ax.bar([i + k * width for i in range(len(rows))], [cell(report, r)[0] for r in rows], width, label=label)
    ax.bar([i + len(reports) * width for i in range(len(rows))], [cell(first, r)[1] for r in rows], width,
           label="blind (full model, videos removed)", color="lightgrey")
    ax.set_xticks([i + width * len(reports) / 2 for i in range(len(rows))])
    ax.set_xticklabels([r.replace("_", " ") for r in rows], rotation=30, ha="right")
    ax.set_ylabel("accuracy (held-out test split)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "ablations.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
