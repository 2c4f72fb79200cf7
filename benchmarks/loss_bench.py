"""Forward+backward of cross-entropy over head logits of a normalised
classifier, side by side with the bare three-matrix-product floor.

    python benchmarks/loss_bench.py [--classes 10000 100000] [--reps 5]

For each class count C it times, in one run and on the same inputs
(B x D embeddings, C x D classifier, float32):
  floor    the three products any such loss needs: x.W^T, g.W, g^T.x
  softmax  cross-entropy over s*cos (the normalised-softmax head)
  arcface  the same with ArcFace's logits
  npcface  the same with NPCFace's logits
each as value_and_grad with respect to the embeddings and the classifier,
with W normalised inside. Prints milliseconds (median of --reps), the ratio
to the floor and to ArcFace, and the compiled step's peak memory (XLA's
memory analysis: arguments + outputs + temporaries).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from npcface_jax import heads, losses
from npcface_jax.classifier import cosine


def loss_step(head_fn):
  def loss(x, w, labels):
    return losses.softmax_cross_entropy(head_fn(cosine(x, w), labels), labels)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def floor_step():
  @jax.jit
  def step(x, w, g):
    return x @ w.T, g @ w, g.T @ x
  return step


def peak_mb(jitted, *args) -> float:
  m = jitted.lower(*args).compile().memory_analysis()
  if m is None:
    return float('nan')
  total = (m.argument_size_in_bytes + m.output_size_in_bytes
           + m.temp_size_in_bytes - m.alias_size_in_bytes)
  return total / 2**20


def time_ms(fn, args, reps: int) -> float:
  jax.block_until_ready(fn(*args))  # compile and warm up
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def run(num_classes: int, batch: int, dim: int, reps: int) -> list[dict]:
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(batch, dim)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(num_classes, dim)), jnp.float32)
  g = jnp.asarray(rng.normal(size=(batch, num_classes)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, num_classes, batch), jnp.int32)
  cases = {
      'floor': (floor_step(), (x, w, g)),
      'softmax': (loss_step(heads.softmax_logits), (x, w, labels)),
      'arcface': (loss_step(heads.arcface_logits), (x, w, labels)),
      'npcface': (loss_step(heads.npcface_logits), (x, w, labels)),
  }
  rows = []
  for name, (fn, args) in cases.items():
    rows.append({'head': name, 'classes': num_classes,
                 'ms': time_ms(fn, args, reps), 'peak_mb': peak_mb(fn, *args)})
  floor = rows[0]['ms']
  arc = next(r['ms'] for r in rows if r['head'] == 'arcface')
  for r in rows:
    r['x_floor'] = r['ms'] / floor
    r['x_arcface'] = r['ms'] / arc
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--classes', type=int, nargs='+', default=[10_000, 100_000])
  parser.add_argument('--batch', type=int, default=512)
  parser.add_argument('--dim', type=int, default=512)
  parser.add_argument('--reps', type=int, default=5)
  parser.add_argument('--json', help='also write the rows to this file')
  args = parser.parse_args()
  device = jax.devices()[0]
  print(f'# {device.platform}: {device.device_kind}, {jax.device_count()} '
        f'device(s), {platform.processor() or platform.machine()}, '
        f'jax {jax.__version__}, B={args.batch} D={args.dim} float32')
  rows = []
  for c in args.classes:
    rows += run(c, args.batch, args.dim, args.reps)
  print(f'{"head":<9}{"C":>9}{"ms":>10}{"x floor":>9}{"x arcface":>11}'
        f'{"peak MB":>10}')
  for r in rows:
    print(f'{r["head"]:<9}{r["classes"]:>9}{r["ms"]:>10.1f}{r["x_floor"]:>9.3f}'
          f'{r["x_arcface"]:>11.3f}{r["peak_mb"]:>10.0f}')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(rows, f, indent=1)


if __name__ == '__main__':
  main()
