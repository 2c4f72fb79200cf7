"""TFRecord shards of ``tf.train.Example{image: JPEG bytes, label: int64}``
named as tfds names them (``npcface-train.tfrecord-00000-of-00004``), and
the tfds metadata that lets ``tfds.builder_from_directory`` open them.

Examples go first into partial shards under provisional labels: only once
every image is decoded is it known which identities kept enough images. When
none dropped out, the partial shards are just renamed; otherwise they are
rewritten with the final, contiguous labels.

TensorFlow is imported inside the functions: listing and checking a source
does not need it.
"""

from __future__ import annotations

import collections
import os

DATASET = 'npcface'
SPLIT = 'train'
PARTIAL_PREFIX = '.partial-'
# Files a conversion writes, so that --overwrite removes only these.
METADATA_FILES = ('dataset_info.json', 'features.json', 'label.labels.txt',
                  'label_map.json', 'report.json')


def shard_name(index: int, count: int) -> str:
  return f'{DATASET}-{SPLIT}.tfrecord-{index:05d}-of-{count:05d}'


def is_ours(name: str) -> bool:
  """A file a conversion writes (a shard, partial shard or metadata)."""
  return (name in METADATA_FILES or name.startswith(PARTIAL_PREFIX)
          or name.startswith(f'{DATASET}-{SPLIT}.tfrecord-'))


def serialize(jpeg: bytes, label: int) -> bytes:
  import tensorflow as tf  # noqa: PLC0415
  feature = tf.train.Feature
  return tf.train.Example(features=tf.train.Features(feature={
      'image': feature(bytes_list=tf.train.BytesList(value=[jpeg])),
      'label': feature(int64_list=tf.train.Int64List(value=[label])),
  })).SerializeToString(deterministic=True)  # map order fixed: same bytes


class PartialShards:
  """Writes examples to shard 0, 1, ... in turn, counting labels per shard."""

  def __init__(self, out_dir: str, count: int):
    import tensorflow as tf  # noqa: PLC0415
    self._tf = tf
    self.paths = [os.path.join(out_dir, f'{PARTIAL_PREFIX}{i:05d}')
                  for i in range(count)]
    self.label_counts = [collections.Counter() for _ in range(count)]
    self._index, self._writer = -1, None

  def write(self, shard: int, jpeg: bytes, label: int) -> None:
    if shard != self._index:
      if shard < self._index:
        raise ValueError('shards are written in order')
      self.close()
      self._index = shard
      self._writer = self._tf.io.TFRecordWriter(self.paths[shard])
    self._writer.write(serialize(jpeg, label))
    self.label_counts[shard][label] += 1

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None

  def remove(self) -> None:
    self.close()
    for path in self.paths:
      if os.path.exists(path):
        os.remove(path)


def finalize(partials: PartialShards, out_dir: str,
             relabel: dict[int, int]) -> tuple[list[str], list[int]]:
  """Final shards from the partial ones, provisional label p becoming
  relabel[p] and labels missing from relabel dropped; empty shards are left
  out. Returns the shard file names and their lengths."""
  partials.close()
  lengths = [sum(n for label, n in counts.items() if label in relabel)
             for counts in partials.label_counts]
  kept = [i for i, n in enumerate(lengths) if n]
  names = [shard_name(j, len(kept)) for j in range(len(kept))]
  unchanged = all(relabel.get(label) == label
                  for counts in partials.label_counts for label in counts)
  for i, name in zip(kept, names):
    src, dst = partials.paths[i], os.path.join(out_dir, name)
    if unchanged:
      os.replace(src, dst)
    else:
      _rewrite(src, dst, relabel)
  partials.remove()
  return names, [lengths[i] for i in kept]


def _rewrite(src: str, dst: str, relabel: dict[int, int]) -> None:
  import tensorflow as tf  # noqa: PLC0415
  with tf.io.TFRecordWriter(dst) as writer:
    for record in tf.data.TFRecordDataset(src).as_numpy_iterator():
      example = tf.train.Example.FromString(record)
      label = example.features.feature['label'].int64_list.value[0]
      if label in relabel:
        example.features.feature['label'].int64_list.value[0] = relabel[label]
        writer.write(example.SerializeToString(deterministic=True))


def write_metadata(out_dir: str, image_size: int, class_names: list[str],
                   shards: list[str], lengths: list[int]) -> None:
  """dataset_info.json, features.json and label.labels.txt for tfds."""
  import tensorflow_datasets as tfds  # noqa: PLC0415
  features = tfds.features.FeaturesDict({
      'image': tfds.features.Image(shape=(image_size, image_size, 3),
                                   encoding_format='jpeg'),
      'label': tfds.features.ClassLabel(names=class_names),
  })
  num_bytes = sum(os.path.getsize(os.path.join(out_dir, s)) for s in shards)
  split = tfds.core.SplitInfo(name=SPLIT, shard_lengths=list(lengths),
                              num_bytes=num_bytes)
  tfds.folder_dataset.write_metadata(
      data_dir=out_dir, features=features, split_infos=[split],
      check_data=False,
      description='Face images and identity labels written by '
                  '`python -m data_prep train` (see report.json).')
