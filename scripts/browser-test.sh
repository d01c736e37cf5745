#!/usr/bin/env bash
# The web UI in a real headless browser: installs Debian's chromium + chromium-driver and
# selenium, runs the browser test, and refreshes docs/webui.png. Needs root for apt-get.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver
fi
bash scripts/setup.sh --test
.venv/bin/pip install --quiet "selenium>=4.20"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False HILIGHT_SCREENSHOT=1
.venv/bin/python -m pytest -q tests/test_webui.py
