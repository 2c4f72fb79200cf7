#!/usr/bin/env bash
# GPU checks in one call (well under 8 minutes on an H100/H200): the loss
# benchmark at the issue's sizes and at a million classes, then the
# backbones' forward and training-step images/s. Runs from the repository
# root on a machine with jax but without this package installed (and
# without TensorFlow): neither imports it.
# Prints the device and a short table last; record it, card named, in
# benchmarks/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c 'import jax; print("jax", jax.__version__, jax.devices())'
python benchmarks/loss_bench.py --classes 10000 100000 1000000 --reps 20
# Backbones (needs flax and optax; skipped with a message where absent).
# PyTorch's side-by-side case is a CPU comparison, so it is left out here.
if python -c 'import flax, optax' 2>/dev/null; then
  python benchmarks/backbone_bench.py --rounds 5 --no-torch --no-native
else
  echo 'flax/optax not installed: backbone benchmark skipped'
fi
