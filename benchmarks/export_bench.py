"""Exported models against the JAX embedder, side by side in one run: the
images per second of each runtime on this machine at batch 1 (one face, a
service's latency) and batch 64 (throughput), on the same uint8 faces.

    python benchmarks/export_bench.py [--model mobilefacenet] [--width 1]
        [--reps 5] [--flip]

  jax          embedding_step.Embedder, the evaluation path (jit, the CPU
               formulations of layers.py), on this machine's devices
  onnxruntime  model.onnx (onnx_graph.py), CPUExecutionProvider
  savedmodel   saved_model/ (jax2tf, XlaCallModule) in TensorFlow
  tflite       model.tflite in the TFLite interpreter (XNNPACK), all cores

The backbone is the named one at 112 x 112, 512-d, with variables drawn at
random (the arithmetic does not depend on the weights). Each figure is
the median of --reps timed calls after one warm-up call (which compiles).
Also printed: each format's minimum cosine to the JAX embeddings, and the
export's write time and size.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import sys
import tempfile
import time

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.inference_bench import timed  # noqa: E402
from npcface_jax import models  # noqa: E402
from npcface_jax.common import arrays  # noqa: E402
from npcface_jax.evaluation import embedding_step  # noqa: E402
from npcface_jax.serving import export_formats  # noqa: E402
from tests.helpers import random_variables  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', default='mobilefacenet',
                      choices=models.names())
  parser.add_argument('--width', type=float, default=1.0)
  parser.add_argument('--reps', type=int, default=5)
  parser.add_argument('--flip', action='store_true')
  args = parser.parse_args()
  size, batches = 112, (1, 64)
  model = models.create(args.model, embedding_dim=512, width=args.width)
  variables = random_variables(model, (1, size, size, 3))
  rng = np.random.default_rng(0)
  faces = rng.integers(0, 256, (max(batches), size, size, 3), np.uint8)
  devices = len(jax.devices())
  runners = {}
  for b in batches:  # the embedder's batch is fixed: one per batch size
    embedder = embedding_step.Embedder(model, arrays.make_mesh(1),
                                       -(-b // devices) * devices, args.flip)
    runners.setdefault('jax', {})[b] = (
        lambda x, e=embedder: e(variables, x))
  reference = runners['jax'][max(batches)](faces)
  fn = export_formats.serving_function(model, variables, args.flip)
  notes = {}
  with tempfile.TemporaryDirectory() as tmp:
    for fmt in export_formats.FORMATS:
      path = os.path.join(tmp, export_formats.FILES[fmt])
      start = time.perf_counter()
      export_formats.write(fmt, fn, size, path)
      seconds = time.perf_counter() - start
      mib = sum(f.stat().st_size for f in pathlib.Path(path).rglob('*')
                ) if os.path.isdir(path) else os.path.getsize(path)
      run = export_formats.load(fmt, path)
      runners[fmt] = {b: run for b in batches}
      cosine = np.sum(np.asarray(run(faces)) * reference, axis=1).min()
      notes[fmt] = (f'written in {seconds:.1f} s, {mib / 2**20:.1f} MiB, '
                    f'min cosine to JAX {cosine:.6f}')
    print(f'{args.model} width {args.width}, 112x112, 512-d, flip '
          f'{args.flip}; {platform.processor() or platform.machine()}, '
          f'{os.cpu_count()} cores, JAX {jax.__version__} on '
          f'{jax.default_backend()} ({devices} devices)')
    print(f'{"runtime":<12}' + ''.join(f'{f"batch {b} img/s":>16}'
                                       f'{"vs jax":>8}' for b in batches))
    speed = {}
    for name, by_batch in runners.items():
      row = f'{name:<12}'
      for b in batches:
        x = faces[:b]
        speed[name, b] = b / timed(lambda r=by_batch[b], x=x: r(x),
                                   args.reps)
        row += (f'{speed[name, b]:>16.1f}'
                f'{speed[name, b] / speed["jax", b]:>7.2f}x')
      print(row)
    for fmt, note in notes.items():
      print(f'  {fmt}: {note}')


if __name__ == '__main__':
  main()
