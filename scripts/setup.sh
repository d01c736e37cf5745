#!/usr/bin/env bash
# Create .venv and install HiLight into it (CPU PyTorch 2.13.0). `--test` adds the test tools.
# Safe to run again: it only installs what is missing.
set -euo pipefail
# this machine's pip config names index folders that may not exist; hide those warnings
exec 2> >(grep -v "^WARNING: Location" >&2)
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
.venv/bin/pip install --quiet --disable-pip-version-check torch==2.13.0
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
.venv/bin/pip install --quiet --disable-pip-version-check -e ".${extras}"
