#!/usr/bin/env bash
# benchmarks/e2e.py at full size on a GPU machine lent by the `device` tool (bf16 ours, fp32 plain,
# tokens/s against the GPU's measured HBM read rate). That machine has torch, transformers,
# accelerate, safetensors and tokenizers, but not PyAV, which travels as a wheel. Here, once:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl av==18.1.0
# then one device call: command "bash benchmarks/device-e2e.sh", carry [".whl"], timeout_s 540.
# The results (JSON and the printed table) come back under $OUT.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="$PWD:/tmp/site" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
python3 benchmarks/e2e.py --device cuda --repeats 5 --out "${OUT:-/tmp}/e2e-cuda.json" 2>&1 | tee "${OUT:-/tmp}/e2e-cuda.log"
