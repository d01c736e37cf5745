#!/usr/bin/env bash
# The llama.cpp side of benchmarks/llamacpp.py, kept out of HiLight's own venv: builds
# llama-cpp-python from source for this CPU (GGML_NATIVE) into .venv-llamacpp, and unpacks the
# same release's llama.cpp converter (convert_hf_to_gguf.py with its conversion/ and gguf-py/) under
# benchmarks/.cache/llama.cpp. Takes ~15 min on 2 cores, once.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=0.3.36
VENV=${HILIGHT_LLAMACPP_VENV:-.venv-llamacpp}
CACHE=benchmarks/.cache
mkdir -p "$CACHE"
SDIST="$CACHE/llama_cpp_python-$VERSION.tar.gz"
[ -f "$SDIST" ] || pip download --quiet --no-deps --no-binary :all: -d "$CACHE" "llama-cpp-python==$VERSION"
if [ ! -d "$CACHE/llama.cpp/conversion" ]; then
    rm -rf "$CACHE/llama.cpp" && mkdir -p "$CACHE/llama.cpp"
    tar xzf "$SDIST" -C "$CACHE/llama.cpp" --strip-components=3 \
        "llama_cpp_python-$VERSION/vendor/llama.cpp/convert_hf_to_gguf.py" \
        "llama_cpp_python-$VERSION/vendor/llama.cpp/conversion" \
        "llama_cpp_python-$VERSION/vendor/llama.cpp/gguf-py"
fi
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
    python3 -m venv "$VENV"
    CMAKE_ARGS="-DGGML_NATIVE=ON" CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} \
        "$VENV/bin/pip" install --quiet "$SDIST"
fi
# The converter reads the HF checkpoint with torch and transformers and writes the tokenizer with
# sentencepiece; torch==2.13.0 resolves to the CPU build.
"$VENV/bin/pip" install --quiet torch==2.13.0 "transformers>=4.45" sentencepiece pyyaml safetensors numpy
"$VENV/bin/python" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__, 'in $VENV')"
