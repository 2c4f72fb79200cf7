"""The commands on a trained run, timed: verify's latency for one pair of
photos (warm: the model restored and compiled, MTCNN loaded), and embed's
images per second, side by side in one run:

    python benchmarks/inference_bench.py [--workdir DIR] [--photos 80]
        [--reps 5]

  embedder floor     Embedder on uint8 crops already in memory (no reading)
  aligned crops      embed --aligned: read, decode, resize, embed
  photos             embed: read, decode, detect (MTCNN), align, embed
  verify one pair    verify.verify on two photos, each detected and aligned

Without --workdir a run is made first: the default backbone (MobileFaceNet,
112 x 112, 512-d) trained for one step on synthetic identities, which is
enough for timing (the arithmetic does not depend on the weights). Photos
are ORL's (../shared/data/orl_faces); the crops are the same photos
aligned once beforehand, written as JPEG as data_prep writes them.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from npcface_jax import verify  # noqa: E402
from npcface_jax.faces import detection, images  # noqa: E402
from npcface_jax.serving import trained_run  # noqa: E402

ORL = ROOT.parent / 'shared' / 'data' / 'orl_faces'


def make_run(workdir: str) -> None:
  """One training step of the default backbone on synthetic identities."""
  subprocess.run(
      [sys.executable, '-m', 'npcface_jax.main',
       '--config=configs/default.py', f'--workdir={workdir}',
       '--config.dataset=synthetic', '--config.synthetic.num_classes=100',
       '--config.num_train_steps=1', '--config.batch_size=16',
       '--config.eval_at_start=False', '--config.eval_batch_size=64'],
      cwd=ROOT, check=True, capture_output=True)


def timed(fn, reps: int) -> float:
  """The median wall time of fn() over reps calls, after one warm-up."""
  fn()
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--workdir')
  p.add_argument('--photos', type=int, default=80)
  p.add_argument('--reps', type=int, default=5)
  args = p.parse_args()
  if not ORL.is_dir():
    sys.exit(f'ORL photos not found at {ORL}')
  photos = sorted(str(p) for p in ORL.glob('s*/*.pgm'))[:args.photos]
  with tempfile.TemporaryDirectory() as tmp:
    workdir = args.workdir or os.path.join(tmp, 'run')
    if not args.workdir:
      make_run(workdir)
    model = trained_run.open_model(workdir)
    finder = detection.FaceFinder()
    crops_dir = pathlib.Path(tmp, 'crops')
    crops_dir.mkdir()
    crops = []
    for i, photo in enumerate(photos):
      face, _ = images.read_face(photo, model.image_size, detector=finder)
      crops.append(str(crops_dir / f'{i}.jpg'))
      face.save(crops[-1], quality=95)
    pixels = np.stack([images.read_image(c, model.image_size)
                       for c in crops])
    quiet = dict(progress=False)
    rows = [
        ('embedder floor', len(photos), lambda: model.embed(pixels)),
        ('aligned crops', len(photos), lambda: trained_run.embed_images(
            model, crops, aligned=True, **quiet)),
        ('photos', len(photos), lambda: trained_run.embed_images(
            model, photos, **quiet)),
        ('verify one pair', 2, lambda: verify.verify(
            model, trained_run.Threshold(0.3, 'given', False),
            [(photos[0], photos[1], None)], **quiet)),
    ]
    print(f'{platform.processor() or platform.machine()}, '
          f'{os.cpu_count()} cores; {model.config.model} '
          f'{model.image_size}x{model.image_size}, batch '
          f'{model.embedder.batch_size}; {len(photos)} ORL photos; median '
          f'of {args.reps}')
    print(f'{"":18}{"s":>9}{"images/s":>10}{"x floor":>9}')
    floor = None
    for name, n, fn in rows:
      seconds = timed(fn, args.reps)
      rate = n / seconds
      floor = floor or rate
      print(f'{name:18}{seconds:9.3f}{rate:10.1f}{floor / rate:9.1f}')


if __name__ == '__main__':
  main()
