"""Forward+backward of every head's loss over a normalised classifier, full
logits and chunked, side by side with the bare three-matrix-product floor.

    python benchmarks/loss_bench.py [--classes 10000 100000] [--reps 7]
                                    [--heads npcface arcface ...]

For each class count C, in one run and on the same inputs (B x D embeddings,
C x D classifier, float32), each as value_and_grad with respect to the
embeddings, the classifier and the head's parameters, W normalised inside:
  floor            the three products any such loss needs: x.W^T, g.W, g^T.x
  <head>           the trainer's loss on one device with the full logits
                   (classifier.classifier_loss: the head's logits, its
                   criterion's per-sample loss, its aux loss)
  <head>/chunked   the same through the chunked fused loss (the trainer's
                   default wherever a head has a chunked form)
The cases run interleaved, round after round, so that drift in the
machine's speed hits all alike; each ratio is the median over rounds of the
per-round ratio ('x arcface' compares like with like: full with ArcFace's
full, chunked with ArcFace's chunked; 'x full' is a chunked row against its
own head's full row). 'cpu' is process CPU time (both cores), steadier than
wall time on a shared machine. Peak memory is XLA's memory analysis of the
compiled step: arguments + outputs + temporaries.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

from npcface_jax.loss import classifier, registry


def loss_step(head, num_classes: int, chunk_size: int | None):
  """value_and_grad of the trainer's loss for ``head`` (its state, params
  and key made as the trainer makes them)."""
  state = head.init_state(num_classes)
  key = jax.random.key(1)

  def loss(x, w, params, labels):
    ce, out = classifier.classifier_loss(x, w, labels, head, state, params,
                                         chunk_size=chunk_size, head_key=key)
    return jnp.mean(ce) + out.aux_loss
  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
  return step, head.init_params(jax.random.key(2), num_classes)


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


def _cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def run(num_classes: int, batch: int, dim: int, reps: int,
        chunk_size: int, names: list[str]) -> list[dict]:
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(batch, dim)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(num_classes, dim)), jnp.float32)
  g = jnp.asarray(rng.normal(size=(batch, num_classes)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, num_classes, batch), jnp.int32)
  cases = {'floor': (floor_step(), (x, w, g))}
  for name in names:
    head = registry.get_head(name)
    step, params = loss_step(head, num_classes, None)
    cases[name] = (step, (x, w, params, labels))
    if head.has_parts:
      step, params = loss_step(head, num_classes, chunk_size)
      cases[f'{name}/chunked'] = (step, (x, w, params, labels))
  wall = {k: [] for k in cases}
  cpu = {k: [] for k in cases}
  for fn, args in cases.values():
    jax.block_until_ready(fn(*args))  # compile and warm up
  for _ in range(reps):
    for name, (fn, args) in cases.items():
      c0, t0 = _cpu_seconds(), time.perf_counter()
      jax.block_until_ready(fn(*args))
      wall[name].append(time.perf_counter() - t0)
      cpu[name].append(_cpu_seconds() - c0)
  wall = {k: np.array(v) for k, v in wall.items()}
  cpu = {k: np.array(v) for k, v in cpu.items()}
  rows = []
  for name, (fn, args) in cases.items():
    chunked = name.endswith('/chunked')
    arc = 'arcface/chunked' if chunked else 'arcface'
    full = name.split('/')[0]
    rows.append({
        'head': name, 'classes': num_classes,
        'ms': 1e3 * float(np.median(wall[name])),
        'x_floor': float(np.median(wall[name] / wall['floor'])),
        'x_arcface': (float(np.median(wall[name] / wall[arc]))
                      if arc in wall and name != 'floor' else None),
        'x_full': (float(np.median(wall[name] / wall[full]))
                   if chunked else None),
        'cpu_x_floor': float(np.median(cpu[name]) / np.median(cpu['floor'])),
        'peak_mb': peak_mb(fn, *args)})
  return rows


def _ratio(value) -> str:
  return '' if value is None else f'{value:.3f}'


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--classes', type=int, nargs='+',
                      default=[10_000, 100_000])
  parser.add_argument('--batch', type=int, default=512)
  parser.add_argument('--dim', type=int, default=512)
  parser.add_argument('--reps', type=int, default=7)
  parser.add_argument('--chunk-size', type=int, default=4096)
  parser.add_argument('--heads', nargs='+', default=registry.head_names(),
                      help='registry names (default: every head)')
  parser.add_argument('--json', help='also write the rows to this file')
  args = parser.parse_args()
  device = jax.devices()[0]
  print(f'# {device.platform}: {device.device_kind}, {jax.device_count()} '
        f'device(s), {platform.processor() or platform.machine()}, '
        f'jax {jax.__version__}, B={args.batch} D={args.dim} float32')
  rows = []
  for c in args.classes:
    rows += run(c, args.batch, args.dim, args.reps, args.chunk_size,
                args.heads)
  print(f'{"head":<30}{"C":>8}{"ms":>9}{"x floor":>9}{"x arcface":>11}'
        f'{"x full":>8}{"cpu x floor":>13}{"peak MB":>9}')
  for r in rows:
    print(f'{r["head"]:<30}{r["classes"]:>8}{r["ms"]:>9.1f}'
          f'{r["x_floor"]:>9.3f}{_ratio(r["x_arcface"]):>11}'
          f'{_ratio(r["x_full"]):>8}{r["cpu_x_floor"]:>13.3f}'
          f'{r["peak_mb"]:>9.0f}')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(rows, f, indent=1)


if __name__ == '__main__':
  main()
