"""Per-device memory of one class-sharded loss step, full logits vs chunked.

    python benchmarks/sharded_memory.py [--classes 1000000] [--devices 8]

Compiles (does not run) value_and_grad of the mean NPCFace cross-entropy of
a class-sharded normalised classifier on fake CPU devices and prints XLA's
per-device memory analysis: arguments (the classifier shard), outputs (its
gradient) and temporaries, for the full-logits path and the chunked one.
"""

import argparse
import os


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--classes', type=int, default=1_000_000)
  parser.add_argument('--devices', type=int, default=8)
  parser.add_argument('--batch', type=int, default=512)
  parser.add_argument('--dim', type=int, default=512)
  parser.add_argument('--chunk-size', type=int, default=4096)
  args = parser.parse_args()
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  import jax  # after the flags: the device count is fixed at backend start
  jax.config.update('jax_num_cpu_devices', args.devices)
  import jax.numpy as jnp
  import npcface_jax as nf
  from npcface_jax import classifier

  mesh = jax.make_mesh((args.devices,), ('model',))
  rows = classifier.padded_num_classes(args.classes, args.devices)
  x = jax.ShapeDtypeStruct((args.batch, args.dim), jnp.float32)
  w = jax.ShapeDtypeStruct((rows, args.dim), jnp.float32,
                           sharding=jax.NamedSharding(mesh, jax.P('model')))
  y = jax.ShapeDtypeStruct((args.batch,), jnp.int32)
  print(f'# C={args.classes} over {args.devices} devices, B={args.batch} '
        f'D={args.dim} float32, per device (MB)')
  print(f'{"path":<10}{"args":>8}{"outputs":>9}{"temps":>8}')
  for name, chunk in [('full', None), ('chunked', args.chunk_size)]:
    loss = classifier.sharded_classifier_loss(mesh, nf.get_head('npcface'),
                                              args.classes, chunk_size=chunk)
    step = jax.jit(jax.value_and_grad(
        lambda x, w, y: jnp.mean(loss(x, w, y, {}, {})[0]), argnums=(0, 1)))
    m = step.lower(x, w, y).compile().memory_analysis()
    mb = lambda n: n / 2**20  # noqa: E731
    print(f'{name:<10}{mb(m.argument_size_in_bytes):>8.0f}'
          f'{mb(m.output_size_in_bytes):>9.0f}{mb(m.temp_size_in_bytes):>8.0f}')


if __name__ == '__main__':
  main()
