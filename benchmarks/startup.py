"""Wall-clock time of the CLI as a user starts it: ``hilight --help``, ``--version``, a
subcommand's ``--help`` and ``hilight ask`` on the bundled model (one example clip), each a
fresh process, several times. Also which heavy modules ``--help`` imports (none expected).

    .venv/bin/python benchmarks/startup.py [--repeats 5]   # writes benchmarks/results/startup.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HILIGHT = [str(Path(sys.executable).parent / "hilight")]  # the console script a user runs
COMMANDS = {
    "hilight --help": ["--help"],
    "hilight --version": ["--version"],
    "hilight ask --help": ["ask", "--help"],
    "hilight ask (bundled model, one clip)": ["ask", str(ROOT / "examples" / "test-00001.mp4"),
                                              "Did the cue ball go into a pocket?"],
}


def wall(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([*HILIGHT, *argv], check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs of each command")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "startup.json")
    args = parser.parse_args()
    rows = {}
    for name, argv in COMMANDS.items():
        times = [wall(argv) for _ in range(args.repeats)]
        rows[name] = {"median_s": round(statistics.median(times), 3), "min_s": round(min(times), 3),
                      "max_s": round(max(times), 3)}
        print(f"{name:<40} median {rows[name]['median_s']:.2f} s (min {rows[name]['min_s']:.2f}, "
              f"max {rows[name]['max_s']:.2f})")
    probe = ("import sys\nfrom hilight.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
             "print(sorted(m for m in ('torch', 'transformers', 'gradio', 'peft') if m in sys.modules))")
    heavy = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    result = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()}, "repeats": args.repeats,
              "commands": rows, "heavy_modules_imported_by_help": json.loads(heavy.stdout.strip().splitlines()[-1]
                                                                             .replace("'", '"'))}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
