"""Backbone speed: forward and training-step images/s, batch 64, 112x112.

    python benchmarks/backbone_bench.py [--models mobilefacenet resnet50 ...]
        [--batch 64] [--rounds 3] [--no-torch] [--no-native]

For each backbone, in one run:
  forward   the jitted eval-mode forward (inference, running statistics)
  train     one jitted training step: train-mode forward, backward, SGD
            with momentum 0.9 and weight decay 5e-4 (the paper's), on a
            squared-error loss against fixed random targets, parameters and
            optimizer state donated
and for MobileFaceNet also
  mobilefacenet/native   the same with XLA's native convolutions
                         (impl='native', what a plain Flax port runs)
  torch/mobilefacenet    a PyTorch MobileFaceNet of the same structure
                         (same parameter count, checked), same loss and
                         optimizer; needs `pip install torch==2.13.0`,
                         an optional benchmark dependency only
All cases run interleaved, round after round, so drift in the machine's
speed hits all alike; each timed call follows an untimed one of the same
case, so that the previous case's spinning threads have settled; ratios are
medians of per-round ratios. GMACs per
image come from XLA's cost analysis of the batch-1 forward in the native
formulation (flops / 2), next to published figures.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from torch_models import torch_network  # beside this file
from npcface_jax import models

LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 5e-4
MOBILEFACENET_PARAMS = 1_200_512  # ours, tested in tests/test_models.py

# Published multiply-accumulates per 112x112 image (G), where there is one.
PUBLISHED = {
    'mobilefacenet': ('0.22', 'Chen et al. 2018 (221M MAdds)'),
    'resnet50': ('6.32', 'insightface LResNet50E-IR, 12.64 GFLOPs'),
    'resnet101': ('12.10', 'insightface LResNet100E-IR, 24.21 GFLOPs'),
    'se_resnet50': ('6.32+', 'IR-50 plus the SE layers'),
    'attention56': ('6.2*', 'Wang et al. 2017, ImageNet 224x224'),
    'attention92': ('10.4*', 'Wang et al. 2017, ImageNet 224x224'),
    'vgg19': ('19.6/4*', 'ImageNet VGG-19 at 224x224; stages here at 1/4 area'),
}


def gmacs_per_image(name: str) -> float:
  model = models.create(name, impl='native')
  x = jnp.zeros((1, 112, 112, 3), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x,
                                                train=False))
  cost = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(
      variables, x).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return cost['flops'] / 2 / 1e9


def jax_cases(name: str, batch: int, impl: str = 'auto') -> dict:
  """name -> (run once and block, nothing else) for forward and train."""
  model = models.create(name, impl=impl)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(batch, 112, 112, 3)), jnp.float32)
  target = jnp.asarray(rng.normal(size=(batch, 512)), jnp.float32)
  variables = jax.jit(lambda x: model.init(jax.random.key(0), x,
                                           train=False))(images)
  tx = optax.chain(optax.add_decayed_weights(WEIGHT_DECAY),
                   optax.sgd(LR, momentum=MOMENTUM))

  forward = jax.jit(lambda v, x: model.apply(v, x, train=False))

  def step(params, stats, opt, x):
    def loss_fn(p):
      out, upd = model.apply({'params': p, 'batch_stats': stats}, x,
                             train=True, mutable=['batch_stats'])
      return jnp.mean(jnp.square(out - target)), upd['batch_stats']
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), stats, opt, loss

  step = jax.jit(step, donate_argnums=(0, 1, 2))
  state = [variables['params'], variables['batch_stats'],
           tx.init(variables['params'])]

  def run_forward():
    forward({'params': state[0], 'batch_stats': state[1]},
            images).block_until_ready()

  def run_step():
    *state[:3], loss = step(*state, images)
    loss.block_until_ready()

  return {'forward': run_forward, 'train': run_step}


def torch_cases(batch: int) -> dict:
  import torch  # noqa: PLC0415 (optional dependency)

  torch.manual_seed(0)
  model = torch_network('mobilefacenet', {})
  count = sum(p.numel() for p in model.parameters())
  assert count == MOBILEFACENET_PARAMS, (
      f'torch MobileFaceNet has {count} parameters, not the same structure')
  rng = np.random.default_rng(0)
  images = torch.from_numpy(
      rng.normal(size=(batch, 3, 112, 112)).astype(np.float32))
  target = torch.from_numpy(rng.normal(size=(batch, 512)).astype(np.float32))
  opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM,
                        weight_decay=WEIGHT_DECAY)

  def run_forward():
    model.eval()
    with torch.no_grad():
      model(images)

  def run_step():
    model.train()
    opt.zero_grad(set_to_none=True)
    loss = torch.mean(torch.square(model(images) - target))
    loss.backward()
    opt.step()

  return {'forward': run_forward, 'train': run_step,
          'threads': torch.get_num_threads(), 'version': torch.__version__}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--models', nargs='+', default=models.names())
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--no-torch', action='store_true')
  parser.add_argument('--no-native', action='store_true')
  parser.add_argument('--json', help='also write the rows here')
  args = parser.parse_args()

  cases, info = {}, {}
  for name in args.models:
    cases[name] = jax_cases(name, args.batch)
  if 'mobilefacenet' in args.models and not args.no_native:
    cases['mobilefacenet/native'] = jax_cases('mobilefacenet', args.batch,
                                              impl='native')
  if 'mobilefacenet' in args.models and not args.no_torch:
    try:
      cases['torch/mobilefacenet'] = torch_cases(args.batch)
      info['torch'] = (cases['torch/mobilefacenet']['version'],
                       cases['torch/mobilefacenet']['threads'])
    except ImportError:
      print('torch not installed (pip install torch==2.13.0): '
            'no PyTorch comparison')

  # Warm-up: compilation for JAX, allocator and thread pools for both.
  for case in cases.values():
    case['forward']()
    case['train']()

  times = {(name, kind): [] for name in cases for kind in ('forward', 'train')}
  for r in range(args.rounds):
    for name, case in cases.items():
      for kind in ('forward', 'train'):
        # One untimed call first: right after the other framework ran, its
        # idle threads still spin (OpenMP's wait policy, XLA's pool) and
        # would take the cores from the timed call.
        case[kind]()
        start = time.perf_counter()
        case[kind]()
        times[name, kind].append(time.perf_counter() - start)
    print(f'round {r + 1}/{args.rounds} done', flush=True)

  def ratio(a, b, kind):
    """Median over rounds of a's images/s over b's."""
    return statistics.median(tb / ta for ta, tb in zip(times[a, kind],
                                                       times[b, kind]))

  print(f'\n{platform.processor() or platform.machine()}, '
        f'jax {jax.__version__} on {jax.default_backend()}, batch '
        f'{args.batch}, {args.rounds} rounds'
        + (f', torch {info["torch"][0]} ({info["torch"][1]} threads)'
           if 'torch' in info else ''))
  print('| backbone | params (M) | GMACs/img (XLA) | published GMACs | '
        'forward img/s | train img/s | train x torch | train x native |')
  print('|---|---:|---:|---|---:|---:|---:|---:|')
  rows = []
  for name in cases:
    base = name.removeprefix('torch/').split('/')[0]
    if name.startswith('torch/'):
      params, gmacs = MOBILEFACENET_PARAMS / 1e6, float('nan')
    else:
      model = models.create(base)
      shapes = jax.eval_shape(lambda: model.init(
          jax.random.key(0), jnp.zeros((1, 112, 112, 3)), train=False))
      params = sum(x.size for x in jax.tree.leaves(shapes['params'])) / 1e6
      gmacs = gmacs_per_image(base)
    ips = {k: args.batch / statistics.median(times[name, k])
           for k in ('forward', 'train')}
    vs_torch = (ratio(name, 'torch/mobilefacenet', 'train')
                if base == 'mobilefacenet' and 'torch/mobilefacenet' in cases
                else None)
    vs_native = (ratio(name, 'mobilefacenet/native', 'train')
                 if name == 'mobilefacenet' and 'mobilefacenet/native' in cases
                 else None)
    published = PUBLISHED.get(base, ('', ''))[0]
    fmt = lambda v: '' if v is None else f'{v:.2f}'  # noqa: E731
    print(f'| {name} | {params:.2f} | '
          f'{"" if np.isnan(gmacs) else f"{gmacs:.2f}"} | {published} | '
          f'{ips["forward"]:.1f} | {ips["train"]:.1f} | {fmt(vs_torch)} | '
          f'{fmt(vs_native)} |')
    rows.append({'backbone': name, 'params_m': params, 'gmacs': gmacs,
                 'forward_ips': ips['forward'], 'train_ips': ips['train'],
                 'train_x_torch': vs_torch, 'train_x_native': vs_native,
                 'times': {k: times[name, k] for k in ('forward', 'train')}})
  print('* published for ImageNet 224x224 networks; see RESULTS.md')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(rows, f, indent=1)


if __name__ == '__main__':
  main()
