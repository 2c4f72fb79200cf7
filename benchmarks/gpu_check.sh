#!/usr/bin/env bash
# GPU checks in one call (well under 8 minutes on an H100/H200): the loss
# benchmark at the issue's sizes and at a million classes. Runs from the
# repository root on a machine with jax but without this package installed
# (and without TensorFlow): the loss core imports neither.
# Prints the device and a short table last; record it, card named, in
# benchmarks/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c 'import jax; print("jax", jax.__version__, jax.devices())'
python benchmarks/loss_bench.py --classes 10000 100000 1000000 --reps 20
