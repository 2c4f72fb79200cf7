"""Input pipeline throughput: JPEG decode, flip, normalise, batch, per
tf.data thread count.

    python benchmarks/input_bench.py [--images 2000] [--threads 1 2]
                                     [--batches 60] [--orl] [--damage]

Writes a temporary data_prep-shaped dataset of 112x112 JPEGs (synthetic
faces, or with --orl the ORL faces from ../shared/data, repeated), then
reads it with npcface_jax.data.input_pipeline.train_stream, batch 64, float32,
with tf.data's private thread pool set to each thread count. It times
numpy batches (next_local), so the figure is the host pipeline alone, not
the transfer to devices. 'cpu' is process CPU time, steadier than wall
time on a shared machine. --damage overwrites 64 bytes in the middle of
one of the 8 shards first: the stream then traces, skips and names the
damaged record, and reads that shard by its intact records' offsets (the
first batches, where the damage is met, are in the warm-up).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import tempfile
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax
import numpy as np

from data_prep.shards import serialize
from npcface_jax.data import input_pipeline as ip, synthetic

SIZE = 112
ORL = pathlib.Path(__file__).resolve().parents[1].parent / 'shared' / 'data'


def face_images(n: int, orl: bool, num_classes: int) -> tuple[np.ndarray,
                                                                np.ndarray]:
  """(uint8 (n, 112, 112, 3), labels) of synthetic or ORL faces."""
  if orl:
    from PIL import Image  # noqa: PLC0415
    root = ORL / 'orl_faces'
    if not root.is_dir():
      raise SystemExit(f'--orl: no ORL faces at {root}')
    base = np.stack([np.asarray(Image.open(root / f's{p}' / f'{k}.pgm')
                                .convert('RGB').resize((SIZE, SIZE)))
                     for p in range(1, 41) for k in range(1, 11)])
    idx = np.arange(n) % len(base)
    return base[idx], idx // 10
  labels = np.arange(n) % num_classes
  rng = np.random.default_rng(0)
  out = np.empty((n, SIZE, SIZE, 3), np.uint8)
  for s in range(0, n, 200):
    faces = synthetic.prototypes(labels[s:s + 200], SIZE)
    faces += rng.normal(0, 12, faces.shape).astype(np.float32)
    out[s:s + 200] = np.clip(faces, 0, 255)
  return out, labels


def write_dataset(out: str, images, labels, num_classes: int, shards: int):
  """TFRecord shards plus tfds metadata, as data_prep writes them."""
  import tensorflow as tf  # noqa: PLC0415
  import tensorflow_datasets as tfds  # noqa: PLC0415
  bounds = np.linspace(0, len(images), shards + 1).astype(int)
  for s in range(shards):
    path = os.path.join(out, f'npcface-train.tfrecord-{s:05d}-of-{shards:05d}')
    with tf.io.TFRecordWriter(path) as writer:
      for k in range(bounds[s], bounds[s + 1]):
        jpeg = tf.io.encode_jpeg(images[k], quality=90).numpy()
        writer.write(serialize(jpeg, int(labels[k])))
  tfds.folder_dataset.write_metadata(
      data_dir=out,
      features=tfds.features.FeaturesDict({
          'image': tfds.features.Image(shape=(SIZE, SIZE, 3),
                                       encoding_format='jpeg'),
          'label': tfds.features.ClassLabel(num_classes=num_classes)}),
      split_infos=[tfds.core.SplitInfo(
          name='train', shard_lengths=np.diff(bounds).tolist(), num_bytes=0)])


def damage(data_dir: str) -> None:
  """64 zero bytes in the middle of the first shard."""
  path = os.path.join(data_dir, sorted(
      f for f in os.listdir(data_dir) if '.tfrecord-' in f)[0])
  with open(path, 'r+b') as f:
    f.seek(os.path.getsize(path) // 2)
    f.write(bytes(64))


def measure(data_dir: str, threads: int, batches: int, batch: int):
  """(images/s wall, CPU ms per 1000 images) after a 5-batch warm-up."""
  mesh = jax.make_mesh((1, 1), ('data', 'model'),
                       devices=jax.devices()[:1])
  it = ip.train_stream(data_dir, batch, mesh, num_threads=threads,
                       process_index=0, process_count=1)
  for _ in range(5):
    it.next_local()
  t0, c0 = time.perf_counter(), time.process_time()
  for _ in range(batches):
    it.next_local()
  wall, cpu = time.perf_counter() - t0, time.process_time() - c0
  n = batches * batch
  return n / wall, 1e6 * cpu / n


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--images', type=int, default=2000)
  parser.add_argument('--threads', type=int, nargs='+', default=[1, 2])
  parser.add_argument('--batches', type=int, default=60)
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--orl', action='store_true')
  parser.add_argument('--damage', action='store_true')
  args = parser.parse_args()
  num_classes = 40
  images, labels = face_images(args.images, args.orl, num_classes)
  with tempfile.TemporaryDirectory() as out:
    t0 = time.perf_counter()
    write_dataset(out, images, labels, num_classes, shards=8)
    if args.damage:
      damage(out)
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    print(f'{args.images} {"ORL" if args.orl else "synthetic"} JPEGs, '
          f'{size / args.images / 1024:.1f} KiB each, written in '
          f'{time.perf_counter() - t0:.1f} s; {platform.processor() or "cpu"}, '
          f'{os.cpu_count()} cores\n')
    print('| tf.data threads | images/s | CPU ms / 1000 images |')
    print('|---:|---:|---:|')
    for threads in args.threads:
      rate, cpu = measure(out, threads, args.batches, args.batch)
      print(f'| {threads} | {rate:,.0f} | {cpu:,.0f} |')


if __name__ == '__main__':
  main()
