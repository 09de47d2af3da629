#!/usr/bin/env bash
# Every CUDA path and GPU benchmark of prunekit in one command, under 8 minutes on one H100/H200:
#   1. the CLI's CUDA paths on a tiny model, each compared with the CPU (bench/gpu_cli.py;
#      NCCL with 2 processes when 2+ GPUs are visible)
#   2. Llama-2-7B shapes, Wanda and SparseGPT 50%, activations on the GPU and on the CPU (bench/gpu_7b.py)
#   3. dense vs 25% width vs 25% depth decode/prefill speed at 7B shapes (bench/gpu_structured.py)
#   4. out of core: 70B-shaped blocks larger than the GPU memory the run may use (bench/gpu_offload.py)
# Each step has its own time limit, so one slow step cannot starve the rest; a step's failure is
# reported and the next one runs. Results: $OUT (default bench/results/gpu), one log and one JSON per step.
#
#     bench/gpu_check.sh            # needs CUDA; uses python3 (or $PYTHON) with torch + transformers
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
LOG="$OUT/gpu_check.log"
: > "$LOG"
status=0

step() {   # step NAME LIMIT_S COMMAND...
  local name=$1 limit=$2; shift 2
  local started=$SECONDS
  echo "== $name: $* (limit ${limit}s)" | tee -a "$LOG"
  timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  echo "== $name: rc=$rc in $((SECONDS - started))s" | tee -a "$LOG"
  [ "$rc" -eq 0 ] || status=1
}

{ date -u +%FT%TZ; nvidia-smi -L; "$PY" -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__, "gpus", torch.cuda.device_count())'; git rev-parse --short HEAD 2>/dev/null; nproc; } >>"$LOG" 2>&1
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' || { echo "no CUDA device" | tee -a "$LOG"; exit 2; }

step cli 90 "$PY" bench/gpu_cli.py --out "$OUT/gpu_cli.json"
step 7b 170 "$PY" bench/gpu_7b.py --samples 64 --out "$OUT/gpu_7b.json"
step structured 80 "$PY" bench/gpu_structured.py --repeats 3 --new-tokens 64 --out "$OUT/gpu_structured.json"
step offload 120 "$PY" bench/gpu_offload.py --layers 9 --gpu-cap-gib 14 --samples 32 --work /tmp/prunekit-gpu-offload --out "$OUT/gpu_offload.json"
tail -n 3 "$LOG"
exit $status
