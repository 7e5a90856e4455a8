#!/usr/bin/env bash
# Everything to check on a GPU machine, as one command: the CUDA tests, our training-step throughput (bf16, eager and
# compiled, with MFU), the official code's step on the same GPU, and the data loader on the machine's cores.
#
#   bash benchmarks/gpu_prepare.sh MAE_REPO MIXMIM_REPO    # here, once: fills the git-ignored .gpu/
#   bash benchmarks/gpu_check.sh OUT_DIR                    # there, with .gpu carried along
#
# The machine needs torch (with CUDA), torchvision, numpy, Pillow, pytest and tensorboard; timm comes from .gpu/timm
# (the version requirements.txt pins), the official code from .gpu/official with timm 0.3.2 (MAE) and 0.5.4 (MixMIM).
# Without .gpu/official the official rows are skipped. Everything ends within GPU_CHECK_BUDGET seconds (default
# 540, within a 10-minute command): each step gets what is left, the later ones are skipped when nothing
# is. OUT_DIR gets five files: log.txt (everything printed), cuda_tests.xml (junit, with the tests' measured
# errors as properties), raw.tar (every step's own JSON), summary.json (environment, every step's status and
# seconds, every row) and summary.md (the tables). PEAK_TFLOPS (default 989, H100/H200 SXM dense bf16) sets the MFU denominator. GPU_CHECK_STEPS
# (e.g. "environment bench_compiled") runs only the steps named, for a second call that finishes what the budget cut.
set -uo pipefail
OUT=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
RAW=$(mktemp -d)
BUDGET=${GPU_CHECK_BUDGET:-540}
PEAK=${PEAK_TFLOPS:-989}
PY=${PYTHON:-python3}
START=$(date +%s)
export PYTHONUNBUFFERED=1 TIMM_FUSED_ATTN=1
[ -d .gpu/timm/timm ] && export PYTHONPATH="$PWD/.gpu/timm${PYTHONPATH:+:$PYTHONPATH}"
: >"$RAW/steps.jsonl"

left() { echo $((BUDGET - ($(date +%s) - START))); }

# step NAME MAX_SECONDS CMD...: run CMD with at most MAX_SECONDS (and never past the budget); record status
step() {
  local name=$1 max=$2 t0 rc budget
  shift 2
  if [ -n "${GPU_CHECK_STEPS:-}" ] && [[ " $GPU_CHECK_STEPS " != *" $name "* ]]; then
    echo "=== $name: not selected (GPU_CHECK_STEPS=$GPU_CHECK_STEPS)"
    return
  fi
  budget=$(left)
  [ "$budget" -lt "$max" ] && max=$budget
  if [ "$max" -lt 20 ]; then
    echo "=== $name: skipped (${budget}s of the budget left)"
    echo "{\"step\": \"$name\", \"status\": \"skipped\", \"seconds\": 0}" >>"$RAW/steps.jsonl"
    return
  fi
  echo "=== $name (at most ${max}s; $(left)s of the budget left): $*"
  t0=$(date +%s)
  timeout --kill-after=10 "$max" "$@"
  rc=$?
  local status=ok
  [ $rc -ne 0 ] && status="failed (exit $rc)"
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && status="timed out after ${max}s"
  echo "=== $name: $status in $(($(date +%s) - t0))s"
  echo "{\"step\": \"$name\", \"status\": \"$status\", \"seconds\": $(($(date +%s) - t0))}" >>"$RAW/steps.jsonl"
}

main() {
step environment 60 "$PY" -c "
import json, platform, torch, torchvision, timm
info = dict(torch=torch.__version__, cuda=torch.version.cuda, torchvision=torchvision.__version__,
            timm=timm.__version__, timm_file=timm.__file__, python=platform.python_version(),
            gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(), cpus=len(__import__('os').sched_getaffinity(0)))
print(json.dumps(info))
json.dump(info, open('$RAW/env.json', 'w'))
"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | head -3

MODELS="mae_vit_base_patch16 mae_vit_large_patch16 mixmim_base vit_base_patch16"
BENCH="benchmarks/bench_train.py --models $MODELS --batch-size 128 --amp bf16 --peak-tflops $PEAK --warmup 5 \
  --steps 10 --repeats 3"
OFFICIAL="--batch-size 128 --warmup 3 --steps 10 --repeats 3 --device cuda"
OFFICIAL_MAE="mae_vit_base_patch16 mae_vit_large_patch16 vit_base_patch16"
LOADER="--num-images 512 --workers 8 16 --batch-size 128 --batches 4"
E2E="--model mae_vit_base_patch16 --batch-size 128 --workers 16 --steps 60 --images 512"
if [ "${GPU_CHECK_DRY:-0}" = 1 ]; then  # the wiring on a CPU: tiny models, one step each, base official models
  BENCH="benchmarks/bench_train.py --models mae_vit_tiny_patch4 mixmim_tiny vit_tiny_patch4 --batch-size 4 \
    --amp bf16 --peak-tflops $PEAK --warmup 1 --steps 1 --repeats 1 --device cpu"
  OFFICIAL="--batch-size 2 --warmup 1 --steps 1 --repeats 1 --device cpu"
  OFFICIAL_MAE="mae_vit_base_patch16"
  LOADER="--num-images 16 --workers 2 --batch-size 4 --batches 2"
  E2E="--model mae_vit_tiny_patch4 --input-size 32 --batch-size 8 --workers 2 --steps 24 --images 16 --device cpu"
fi

PYTEST_TIMEOUT=""  # a test that hangs fails alone (pytest-timeout), and the junit file is still written
"$PY" -c "import pytest_timeout" 2>/dev/null && PYTEST_TIMEOUT="--timeout 120"
step cuda_tests 240 "$PY" -m pytest -q -m cuda -p no:cacheprovider $PYTEST_TIMEOUT --junitxml="$OUT/cuda_tests.xml" \
  tests/test_cuda.py tests/test_models_mixmim.py::test_sdpa_and_plain_attention_agree_on_cuda
step bench_eager 110 "$PY" $BENCH --loop step engine --compile off --json "$RAW/bench_eager.json"
# compiled: the engine loop only (the verdicts' figure), before the official rows in case the budget runs short
step bench_compiled 170 "$PY" $BENCH --loop engine --compile on --json "$RAW/bench_compiled.json"
if [ -f .gpu/official/mae/models_mae.py ]; then
  step official_mae 90 "$PY" benchmarks/bench_official.py --official-path .gpu/official/mae --timm-path .gpu/timm032 \
    --models $OFFICIAL_MAE $OFFICIAL --json "$RAW/official_mae.json"
  step official_mixmim 50 "$PY" benchmarks/bench_official.py --official-path .gpu/official/mixmim \
    --timm-path .gpu/timm054 --models mixmim_base $OFFICIAL --json "$RAW/official_mixmim.json"
else
  echo "=== official rows skipped: no .gpu/official (bash benchmarks/gpu_prepare.sh MAE_REPO MIXMIM_REPO)"
fi
step e2e 100 "$PY" benchmarks/bench_e2e.py $E2E --json "$RAW/e2e.json"
step loader 60 "$PY" benchmarks/bench_data.py $LOADER --transforms pretrain pretrain_device finetune --warmup-batches 1 \
  --json "$RAW/loader.json"

tar -C "$RAW" -cf "$OUT/raw.tar" .  # every row as measured, also if the summary below fails
"$PY" benchmarks/gpu_summary.py "$RAW" "$OUT" --peak-tflops "$PEAK"
rm -rf "$RAW"
echo "=== done in $(($(date +%s) - START))s: $OUT"
}

main 2>&1 | tee -a "$OUT/log.txt"
