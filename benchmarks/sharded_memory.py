"""Per-device memory of a million-class step on fake CPU devices.

    python benchmarks/sharded_memory.py [--classes 1000000] [--devices 8]

Part 1 compiles (does not run) value_and_grad of the mean NPCFace
cross-entropy of a class-sharded normalised classifier and prints XLA's
per-device memory analysis, full logits vs the chunked loss.

Part 2 is the trainer's own step (train_step.make_train_step: backbone,
classifier, SGD with momentum, state donated) at C classes, D = 512: the
classifier and its momentum held per device, measured from the live arrays,
beside the same step with the classifier replicated (model_parallel 1,
compiled only: it would not fit eight times), with and without Partial FC
sampling; the sharded ones also run, timed, and the process's peak RSS is
printed last. The backbone is a small MobileFaceNet on 32x32 images: the
classifier is what scales.
"""

import argparse
import os
import resource
import time


def _mb(n):
  return n / 2**20


def loss_memory(args, jax, jnp):
  import npcface_jax as nf  # noqa: PLC0415 (after main's JAX flags)
  from npcface_jax.loss import class_shards, classifier  # noqa: PLC0415 (same)

  mesh = jax.make_mesh((args.devices,), ('model',))
  rows = class_shards.padded_num_classes(args.classes, args.devices)
  x = jax.ShapeDtypeStruct((args.batch, args.dim), jnp.float32)
  w = jax.ShapeDtypeStruct((rows, args.dim), jnp.float32,
                           sharding=jax.NamedSharding(mesh, jax.P('model')))
  y = jax.ShapeDtypeStruct((args.batch,), jnp.int32)
  print(f'# loss step: C={args.classes} over {args.devices} devices, '
        f'B={args.batch} D={args.dim} float32, per device (MB)')
  print(f'{"path":<10}{"args":>8}{"outputs":>9}{"temps":>8}')
  for name, chunk in [('full', None), ('chunked', args.chunk_size)]:
    loss = classifier.sharded_classifier_loss(mesh, nf.get_head('npcface'),
                                              args.classes, chunk_size=chunk)
    step = jax.jit(jax.value_and_grad(
        lambda x, w, y: jnp.mean(loss(x, w, y, {}, {})[0]), argnums=(0, 1)))
    m = step.lower(x, w, y).compile().memory_analysis()
    print(f'{name:<10}{_mb(m.argument_size_in_bytes):>8.0f}'
          f'{_mb(m.output_size_in_bytes):>9.0f}'
          f'{_mb(m.temp_size_in_bytes):>8.0f}')


def _classifier_bytes(state, device):
  """Bytes of the classifier and its optimizer state on one device."""
  import jax  # noqa: PLC0415 (after main's JAX flags)
  leaves = [state.params['classifier']] + [
      leaf for path, leaf in jax.tree_util.tree_leaves_with_path(
          state.opt_state) if 'classifier' in jax.tree_util.keystr(path)]
  total = sum(leaf.size * leaf.dtype.itemsize for leaf in leaves)
  if isinstance(leaves[0], jax.ShapeDtypeStruct):  # replicated, not built
    return total, total
  held = sum(s.data.nbytes for leaf in leaves for s in leaf.addressable_shards
             if s.device == device)
  return held, total


def train_memory(args, jax):
  from configs import default  # noqa: PLC0415 (after main's JAX flags)
  from npcface_jax.common import arrays  # noqa: PLC0415
  from npcface_jax.training import (  # noqa: PLC0415 (same)
      data_source, setup, train_step)

  print(f'\n# trainer step: C={args.classes}, D={args.dim}, batch '
        f'{args.train_batch}, {args.devices} devices, per device (MB)')
  print(f'{"classifier":<12}{"sample":>7}{"cls+opt":>9}{"of all":>8}'
        f'{"args":>7}{"temps":>7}{"step s":>8}')
  for model_parallel, rate in [(1, 1.0), (args.devices, 1.0),
                               (args.devices, 0.1)]:
    c = default.get_config()
    c.update_from_flattened_dict({
        'dataset': 'synthetic', 'synthetic.num_classes': args.classes,
        'synthetic.image_size': 32, 'model_options.width': 0.125,
        'embedding_dim': args.dim, 'batch_size': args.train_batch,
        'model_parallel': model_parallel, 'sample_rate': rate,
        'chunk_size': args.chunk_size, 'synthetic.epoch_examples': 10_000})
    mesh = arrays.make_mesh(model_parallel)
    data = data_source.open_data(c, mesh)
    task = setup.make_task(c, mesh, data)
    target = setup.abstract_state(task)
    shardings = jax.tree.map(lambda s: s.sharding, target)
    step = train_step.make_train_step(task, shardings)
    batch = next(data.open(None))
    m = step.lower(target, batch).compile().memory_analysis()
    seconds = float('nan')
    if model_parallel > 1:
      state = setup.init_state(task)
      held, total = _classifier_bytes(state, jax.devices()[0])
      state, metrics = step(state, batch)  # compile and warm up
      jax.block_until_ready(metrics)
      start = time.perf_counter()
      for _ in range(args.steps):
        state, metrics = step(state, batch)
      jax.block_until_ready(metrics)
      seconds = (time.perf_counter() - start) / args.steps
      del state
    else:
      held, total = _classifier_bytes(target, None)
    name = 'replicated' if model_parallel == 1 else f'{model_parallel} shards'
    print(f'{name:<12}{rate:>7.2g}{_mb(held):>9.0f}{held / total:>8.3f}'
          f'{_mb(m.argument_size_in_bytes):>7.0f}'
          f'{_mb(m.temp_size_in_bytes):>7.0f}{seconds:>8.2f}')
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux
  print(f'peak RSS {peak / 2**20:.1f} GB')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--classes', type=int, default=1_000_000)
  parser.add_argument('--devices', type=int, default=8)
  parser.add_argument('--batch', type=int, default=512)
  parser.add_argument('--train-batch', type=int, default=64)
  parser.add_argument('--dim', type=int, default=512)
  parser.add_argument('--chunk-size', type=int, default=4096)
  parser.add_argument('--steps', type=int, default=3)
  args = parser.parse_args()
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  # Its XLA:CPU flags, before jax; jax after the flags: the device count is
  # fixed at backend start.
  import npcface_jax.main  # noqa: F401, PLC0415
  import jax  # noqa: PLC0415
  jax.config.update('jax_num_cpu_devices', args.devices)
  import jax.numpy as jnp  # noqa: PLC0415
  loss_memory(args, jax, jnp)
  train_memory(args, jax)


if __name__ == '__main__':
  main()
