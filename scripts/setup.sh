#!/usr/bin/env bash
# Create .venv and install HiLight into it (CPU PyTorch 2.13.0). `--test` adds the test tools.
# Safe to run again: it only installs what is missing. Prints a line per step.
set -euo pipefail
# this machine's pip config names index folders that may not exist; hide those warnings
exec 2> >(grep -v "^WARNING: Location" >&2)
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
step() { echo "setup: $*"; }
if [ ! -x .venv/bin/python ]; then
  step "creating .venv with $("$PYTHON" --version 2>&1)"
  "$PYTHON" -m venv .venv
fi
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
step "PyTorch 2.13.0 (CPU build)"
.venv/bin/pip install --quiet --disable-pip-version-check torch==2.13.0
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
step "HiLight${extras:+ with its test tools} and its dependencies (a few minutes the first time)"
.venv/bin/pip install --quiet --disable-pip-version-check -e ".${extras}"
step "done: $(.venv/bin/hilight --version)"
