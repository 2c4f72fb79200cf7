"""The whole train step against its parts: MobileFaceNet + NPCFace,
C = 10,575 classes (CASIA-WebFace), batch 64, 112x112, one device.

    python benchmarks/train_bench.py [--batch 64] [--classes 10575]
        [--rounds 5] [--chunk-size 0]

In one run, interleaved round after round:
  full       train_step.make_train_step: backbone forward/backward, the NPCFace
             classifier loss, SGD momentum + weight decay on everything,
             BatchNorm statistics, metrics; the state donated
  backbone   the same backbone step alone (squared error against fixed
             targets instead of the classifier), same optimizer
  loss       the classifier alone: NPCFace cross-entropy of fixed
             embeddings, its gradient and the SGD update of W
  analysis   the full step with the hard-sample statistics on
             (config.analysis_every_steps != 0): the per-sample cosines
             gathered, fetched and summarised on the host (hard_samples.Window)
             every step, which the loop does lazily
The target is full <= 1.15 x (backbone + loss): joining the parts costs
little beyond them; analysis / full is the statistics' cost. Ratios are
medians of per-round ratios; each timed call follows an untimed one of the
same case.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
import optax

from configs import casia_mobileface
from npcface_jax.common import arrays
from npcface_jax.loss import classifier
from npcface_jax.training import data_source, hard_samples, setup, train_step


def cases(batch: int, num_classes: int, chunk_size: int) -> dict:
  config = casia_mobileface.get_config()
  config.chunk_size = chunk_size
  mesh = arrays.make_mesh(1, jax.devices()[:1])
  data = data_source.Data(num_classes, 112, 1000, None)
  task = setup.make_task(config, mesh, data)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(batch, 112, 112, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, num_classes, batch), jnp.int32)
  batch_ = {'image': images, 'label': labels}

  state = [setup.init_state(task)]
  full_step = train_step.make_train_step(task, setup.state_shardings(task,
                                                                     state[0]))

  def run_full():
    state[0], metrics = full_step(state[0], batch_)
    metrics['loss'].block_until_ready()

  # The backbone alone, same optimizer.
  target = jnp.asarray(rng.normal(size=(batch, config.embedding_dim)),
                       jnp.float32)
  # Copies: the full step donates (deletes) its state's buffers.
  params, stats = jax.tree.map(jnp.array, (state[0].params['backbone'],
                                           state[0].batch_stats))
  backbone = [params, stats, task.tx.init(params)]

  def backbone_step(params, stats, opt):
    def loss_fn(p):
      out, upd = task.model.apply({'params': p, 'batch_stats': stats},
                                  images, train=True, mutable=['batch_stats'])
      return jnp.mean(jnp.square(out - target)), upd['batch_stats']
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt = task.tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), stats, opt, loss

  backbone_step = jax.jit(backbone_step, donate_argnums=(0, 1, 2))

  def run_backbone():
    *backbone[:3], loss = backbone_step(*backbone)
    loss.block_until_ready()

  # The classifier loss alone, on fixed embeddings.
  embeddings = jnp.asarray(rng.normal(size=(batch, config.embedding_dim)),
                           jnp.float32)
  w = jnp.array(state[0].params['classifier'])
  head_only = [w, task.tx.init(w)]

  def loss_step(w, opt):
    def loss_fn(w):
      ce, _ = classifier.classifier_loss(
          embeddings, w, labels, task.head, {}, {},
          num_classes=num_classes, chunk_size=task.chunk_size)
      return jnp.mean(ce)
    loss, grads = jax.value_and_grad(loss_fn)(w)
    updates, opt = task.tx.update(grads, opt, w)
    return optax.apply_updates(w, updates), opt, loss

  loss_step = jax.jit(loss_step, donate_argnums=(0, 1))

  def run_loss():
    *head_only[:2], loss = loss_step(*head_only)
    loss.block_until_ready()

  # The full step with the hard-sample statistics, summarised every step.
  shardings = setup.state_shardings(task, state[0])
  analysed = [setup.init_state(task), hard_samples.Window(1)]
  analysis_step = train_step.make_train_step(task, shardings,
                                             analysis_margin=0.4)

  def run_analysis():
    analysed[0], metrics = analysis_step(analysed[0], batch_)
    analysed[1].add(**jax.device_get(metrics['hard_samples']))

  return {'full': run_full, 'analysis': run_analysis,
          'backbone': run_backbone, 'loss': run_loss}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--classes', type=int, default=10_575)
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--chunk-size', type=int, default=0,
                      help='classes per block of the chunked loss; 0: off')
  args = parser.parse_args()
  run = cases(args.batch, args.classes, args.chunk_size)
  for fn in run.values():  # compile and warm up
    fn()
    fn()
  times = {k: [] for k in run}
  for r in range(args.rounds):
    for name, fn in run.items():
      fn()  # untimed: let the previous case's threads settle
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
    print(f'round {r + 1}/{args.rounds} done', flush=True)
  ratio = statistics.median(
      f / (b + loss) for f, b, loss in zip(times['full'], times['backbone'],
                                           times['loss']))
  vs_backbone = statistics.median(
      f / b for f, b in zip(times['full'], times['backbone']))
  with_analysis = statistics.median(
      a / f for a, f in zip(times['analysis'], times['full']))
  print(f'\n{platform.processor() or platform.machine()}, {os.cpu_count()} '
        f'cores, jax {jax.__version__} on {jax.default_backend()}, batch '
        f'{args.batch}, C={args.classes}, chunk_size={args.chunk_size}, '
        f'{args.rounds} rounds')
  print('| step | ms (median) | images/s |')
  print('|---|---:|---:|')
  for name in run:
    ms = 1e3 * statistics.median(times[name])
    print(f'| {name} | {ms:.1f} | {args.batch / ms * 1e3:.1f} |')
  print(f'\nfull / (backbone + loss) = {ratio:.3f} (target <= 1.15); '
        f'full / backbone = {vs_backbone:.3f}; analysis / full = '
        f'{with_analysis:.3f}')


if __name__ == '__main__':
  main()
