#!/usr/bin/env bash
# GPU checks in one call, under 8 minutes on an H100/H200 (about 5 expected):
#   1. loss_bench.py: NPCFace loss against the matmul floor, C = 10k/100k/1M
#   2. gpu_train_bench.py, MobileFaceNet (batch 512): the trainer's JAX step
#      beside PyTorch's, bf16 and fp32, MFU; depthwise convolutions native
#      against shifted multiply-adds (bf16)
#   3. the same for ResNet-50 IR (batch 256)
#   4. if at least 2 minutes of the budget are left: MobileFaceNet bf16
#      against torch.compile'd PyTorch (slow to compile, so optional)
#   5. one short table of 2-4, card named, with the loss rows
# Both use synthetic data and neither imports TensorFlow, clu or
# ml_collections (the GPU machine has none; jax, flax, optax, orbax and, for
# the comparison, torch are what it needs). Each part runs under `timeout`,
# its share of a total budget, so one slow part cannot eat the rest; JSON
# results are rewritten every round, so a part cut short keeps its rounds.
#
#   bash benchmarks/gpu_check.sh [--quick]    # --quick: CPU smoke run
# Environment: PYTHON (python3), GPU_CHECK_DIR (where the JSON goes; a
# temporary folder by default), GPU_CHECK_BUDGET (seconds, 450).
# Record the table, card named, in benchmarks/RESULTS.md.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-450}
DIR=${GPU_CHECK_DIR:-$(mktemp -d)}
mkdir -p "$DIR"
QUICK=()
LOSS_ARGS=(--classes 10000 100000 1000000 --reps 10)
if [[ ${1:-} == --quick ]]; then
  QUICK=(--quick)
  LOSS_ARGS=(--classes 1000 --batch 64 --reps 2)
fi

# part NAME CAP_S RESERVE_S MIN_S COMMAND...: runs COMMAND for at most
# CAP_S seconds, never into the RESERVE_S kept for the parts after it, and
# not at all where less than MIN_S would be left to it.
part() {
  local name=$1 cap=$2 reserve=$3 min=$4
  shift 4
  local left=$((BUDGET - SECONDS - reserve))
  local limit=$((cap < left ? cap : left))
  if ((limit < min)); then
    echo "== $name: skipped, ${SECONDS}s of the ${BUDGET}s budget spent"
    return 0
  fi
  echo "== $name (at ${SECONDS}s, limit ${limit}s)"
  timeout -k 10 "$limit" "$@"
  local rc=$?
  ((rc == 124 || rc == 137)) && echo "== $name: timed out after ${limit}s"
  ((rc != 0 && rc != 124 && rc != 137)) && echo "== $name: failed (exit $rc)"
  echo "== $name done at ${SECONDS}s"
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm \
  --format=csv,noheader || true
timeout 60 "$PY" -c 'import jax; print("jax", jax.__version__, jax.devices())'

part loss 90 300 20 "$PY" benchmarks/loss_bench.py "${LOSS_ARGS[@]}" \
  --json "$DIR/loss.json"
part mobilefacenet 150 195 20 "$PY" benchmarks/gpu_train_bench.py \
  --models mobilefacenet --json "$DIR/mobilefacenet.json" \
  ${QUICK[@]+"${QUICK[@]}"}
part resnet50 240 15 20 "$PY" benchmarks/gpu_train_bench.py \
  --models resnet50 --json "$DIR/resnet50.json" ${QUICK[@]+"${QUICK[@]}"}
RUNS=("$DIR/mobilefacenet.json" "$DIR/resnet50.json")
if [[ -z ${QUICK[*]+x} ]]; then  # inductor's CPU compile is no smoke test
  part torch-compile 180 15 120 "$PY" benchmarks/gpu_train_bench.py \
    --models mobilefacenet --dtypes bfloat16 --shifted --torch-compile \
    --json "$DIR/mobilefacenet_compiled.json"
  [[ -f $DIR/mobilefacenet_compiled.json ]] &&
    RUNS+=("$DIR/mobilefacenet_compiled.json")
fi

echo "== summary (${SECONDS}s in all; JSON in $DIR)"
"$PY" benchmarks/gpu_train_bench.py --summary "${RUNS[@]}" \
  --loss-json "$DIR/loss.json"
