"""Training batches as global jax.Arrays sharded on the mesh's 'data' axis,
from data_prep's TFRecord shards (synthetic.py makes them without files).

The real stream is a pure function of (seed, epoch, position): file order,
shuffle and flips all derive from stateless seeds, so a run resumed from
``iterator.state()`` yields bit for bit the batches an uninterrupted run
would have yielded. Each process reads an equal-length share of the data and
feeds its slice of the global batch (docs/architecture.md, "Sharding").

A damaged record (TensorFlow's DataLossError: a flaky disk, an interrupted
copy) is found lazily, at no cost while the shards are intact: the error
is traced to its shard and byte offset (tfrecords.py), that shard is
scanned, named in a warning and read from then on by its intact records'
offsets, and the stream is rebuilt at its position. The stream is thus a
function of the shards' bytes: a resumed run meets the same damage and
skips it identically. An epoch that lost examples is filled up by its own
first ones, so that every process keeps the same number of batches.
``strict=True`` stops with DamagedShard instead.

TensorFlow is imported only inside the functions that read files, and is
kept off the GPUs, so that it never takes accelerator memory from JAX and
the synthetic stream runs without it.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from npcface_jax.common import jsonfile
from npcface_jax.data import tfrecords
from npcface_jax.faces import images

_PREP_HINT = ('run `python -m data_prep train ...` first and pass its output '
              'directory')
# Stream tags keep the seeds of different uses of one user seed apart.
# (synthetic.py uses 4 to 6.)
_FILES, _SHUFFLE, _FLIP = range(1, 4)


# --- TensorFlow, lazily ------------------------------------------------------

_tf_ready = False


def _tf():
  """TensorFlow with its GPUs hidden, so that JAX keeps all device memory."""
  global _tf_ready
  import tensorflow as tf  # noqa: PLC0415 (keep TF off the import path)
  if not _tf_ready:
    try:
      tf.config.set_visible_devices([], 'GPU')
    except RuntimeError:  # TF already initialised its devices elsewhere.
      if tf.config.get_visible_devices('GPU'):
        raise RuntimeError(
            'TensorFlow initialised its GPUs before the input pipeline could '
            "hide them; call tf.config.set_visible_devices([], 'GPU') before "
            'any TensorFlow op') from None
    _tf_ready = True
  return tf


# --- Dataset metadata --------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the pipeline needs to know about a data_prep output directory."""
  data_dir: str
  num_classes: int
  num_examples: int
  image_size: int
  files: tuple[str, ...]
  shard_lengths: tuple[int, ...]
  # The shards' sizes as written: in all (tfds's num_bytes; 0: unknown),
  # and each (data_prep's report.json; None: unknown).
  num_bytes: int = 0
  shard_bytes: tuple[int, ...] | None = None


_METADATA = ('dataset_info.json', 'features.json')
# A TFRecord record frames its payload with 16 bytes (length and two CRCs).
_RECORD_BYTES = 16
_MAX_IMAGE_SIZE = 65535  # JPEG's largest side


def _fix(data_dir: str) -> str:
  return (f'. The metadata of the data_prep output {data_dir!r} is damaged: '
          're-run `python -m data_prep train` to write it again')


def _damaged(data_dir: str, file: str, what: str) -> ValueError:
  return ValueError(f'{os.path.join(data_dir, file)}: {what}{_fix(data_dir)}')


def _check_json(data_dir: str, file: str) -> None:
  """Refuses a metadata file that is not a JSON object, naming it (tfds
  would say 'Failed to load JSON' without the file)."""
  try:
    jsonfile.read_object(os.path.join(data_dir, file))
  except ValueError as e:  # 'DIR/FILE is not valid JSON: ...'
    raise ValueError(f'{e}{_fix(data_dir)}') from None


def dataset_info(data_dir: str | os.PathLike,
                 check_files: bool = True) -> DatasetInfo:
  """Reads the tfds metadata that data_prep writes next to its shards;
  ValueError naming the directory and the file of anything that is not
  the metadata of a data_prep output (corrupt JSON, a missing image or
  label feature, class counts or shard lengths the files cannot hold).
  ``check_files=False`` leaves the shards unchecked (data_prep check looks
  at each one)."""
  data_dir = os.fspath(data_dir)
  _check_metadata_files(data_dir)
  info = _tfds_info(data_dir)
  image, label = _image_and_label(data_dir, info.features)
  image_size = _image_size(data_dir, image)
  files, lengths, num_examples = _train_shards(data_dir, info, check_files)
  return DatasetInfo(data_dir=data_dir,
                     num_classes=_num_classes(data_dir, label, num_examples),
                     num_examples=num_examples, image_size=image_size,
                     files=files, shard_lengths=lengths,
                     num_bytes=_num_bytes(info),
                     shard_bytes=_shard_bytes(data_dir, files))


def _num_bytes(info) -> int:
  try:
    return max(0, int(info.splits['train'].num_bytes))
  except Exception:  # noqa: BLE001 (tfds's proto, any version)
    return 0


def _shard_bytes(data_dir: str, files) -> tuple[int, ...] | None:
  """Each shard's size as data_prep wrote it (report.json), where the
  report is there, readable and about these shards."""
  try:
    report = jsonfile.read_object(os.path.join(data_dir, 'report.json'))
  except (OSError, ValueError):
    return None
  sizes, names = report.get('shard_bytes'), report.get('shards')
  if (isinstance(sizes, list) and all(type(n) is int for n in sizes)
      and names == [os.path.basename(f) for f in files]
      and len(sizes) == len(files)):
    return tuple(sizes)
  return None


def _tfds():
  """tensorflow_datasets, TensorFlow's GPUs hidden first (_tf)."""
  _tf()
  import tensorflow_datasets as tfds  # noqa: PLC0415
  return tfds


def _check_metadata_files(data_dir: str) -> None:
  """The directory and its metadata files exist and hold JSON objects."""
  if not os.path.isdir(data_dir):
    raise FileNotFoundError(f'dataset directory {data_dir!r} does not exist: '
                            f'{_PREP_HINT}')
  missing = [f for f in _METADATA
             if not os.path.exists(os.path.join(data_dir, f))]
  if missing:
    raise FileNotFoundError(
        f'{data_dir!r} is not a data_prep output (no {", ".join(missing)}): '
        f'{_PREP_HINT}')
  for file in _METADATA:
    _check_json(data_dir, file)


def _tfds_info(data_dir: str):
  """tfds's DatasetInfo of the directory. tfds raises a variety of types on
  bad metadata; features.json is read first, so that an error of the
  builder is dataset_info.json's."""
  tfds = _tfds()
  try:
    tfds.features.FeatureConnector.from_config(data_dir)
  except Exception as e:  # noqa: BLE001
    raise _damaged(data_dir, 'features.json',
                   f'tfds cannot read it ({str(e)[:300]})') from None
  try:
    return tfds.builder_from_directory(data_dir).info
  except Exception as e:  # noqa: BLE001
    raise _damaged(data_dir, 'dataset_info.json',
                   f'tfds cannot read it ({str(e)[:300]})') from None


def _image_and_label(data_dir: str, features):
  names = sorted(features.keys()) if hasattr(features, 'keys') else []
  if 'image' not in names or 'label' not in names:
    raise _damaged(data_dir, 'features.json',
                   f'features {names}; the pipeline needs image and label')
  return features['image'], features['label']


def _image_size(data_dir: str, image) -> int:
  """The side of the square RGB images the image feature declares."""
  shape = tuple(getattr(image, 'shape', ()))
  if (not isinstance(image, _tfds().features.Image) or len(shape) != 3
      or not all(isinstance(d, int) for d in shape) or shape[0] != shape[1]
      or not 0 < shape[0] <= _MAX_IMAGE_SIZE or shape[2] != 3):
    raise _damaged(data_dir, 'features.json',
                   f'image {type(image).__name__} of shape {shape}; the '
                   'pipeline needs square RGB images (S, S, 3)')
  return shape[0]


def _train_shards(data_dir: str, info, check_files: bool = True):
  """(files, lengths, examples) of the 'train' split, checked against the
  directory: every file in it, present, and large enough for its length."""
  if 'train' not in info.splits:
    raise _damaged(data_dir, 'dataset_info.json',
                   f"splits {sorted(info.splits.keys())}, no 'train' split")
  split = info.splits['train']
  try:
    files = tuple(os.fspath(f) for f in split.filepaths)
    lengths = tuple(int(n) for n in split.shard_lengths)
    num_examples = int(split.num_examples)
  except Exception as e:  # noqa: BLE001 (a bad filepathTemplate, ...)
    raise _damaged(data_dir, 'dataset_info.json',
                   f"its 'train' split cannot be read ({str(e)[:300]})"
                   ) from None
  outside = [f for f in files if os.path.dirname(os.path.normpath(f))
             != os.path.normpath(data_dir)]
  if (outside or len(lengths) != len(files) or sum(lengths) != num_examples
      or min(lengths, default=0) < 0 or num_examples < 1):
    raise _damaged(data_dir, 'dataset_info.json',
                   f'shard lengths {lengths[:10]} do not fit {len(files)} '
                   f'shard files in the directory holding {num_examples} '
                   'examples')
  if check_files:
    _check_shard_files(data_dir, files, lengths)
  return files, lengths, num_examples


def _check_shard_files(data_dir: str, files, lengths) -> None:
  """Every shard present and large enough for its length."""
  absent = [f for f in files if not os.path.exists(f)]
  if absent:
    raise FileNotFoundError(
        f'{len(absent)} shard(s) listed in '
        f'{os.path.join(data_dir, "dataset_info.json")} are missing, e.g. '
        f'{absent[0]!r}: {_PREP_HINT}')
  for f, n in zip(files, lengths):
    if n * _RECORD_BYTES > os.path.getsize(f):
      raise ValueError(
          f'{os.path.join(data_dir, "dataset_info.json")}: '
          f'{os.path.basename(f)} cannot hold {n} examples '
          f'({os.path.getsize(f)} bytes): the shard is cut short (re-copy '
          f'it; `python -m data_prep check {data_dir}` checks every shard), '
          f'or the metadata of the data_prep output {data_dir!r} is damaged '
          '(re-run `python -m data_prep train` to write it again)')


def _num_classes(data_dir: str, label, num_examples: int) -> int:
  num_classes = label.num_classes if isinstance(
      label, _tfds().features.ClassLabel) else None
  if not isinstance(num_classes, int) or not 0 < num_classes <= num_examples:
    raise _damaged(data_dir, 'features.json',
                   f'label {type(label).__name__} with {num_classes} classes '
                   f'for {num_examples} examples; the pipeline needs a '
                   'ClassLabel with one class or more, each with an image')
  return num_classes


# --- Splitting the data over processes (pure) --------------------------------

def split_files(shard_lengths: Sequence[int],
                process_count: int) -> list[tuple[int, ...]] | None:
  """Shard indices per process, balanced by length (longest first onto the
  lightest process); None when there are fewer files than processes, and the
  records must be split by index instead."""
  if len(shard_lengths) < process_count:
    return None
  loads = [0] * process_count
  shares: list[list[int]] = [[] for _ in range(process_count)]
  for i in sorted(range(len(shard_lengths)), key=lambda i: -shard_lengths[i]):
    p = min(range(process_count), key=lambda p: (loads[p], p))
    loads[p] += shard_lengths[i]
    shares[p].append(i)
  return [tuple(sorted(s)) for s in shares]


def share_lengths(shard_lengths: Sequence[int],
                  process_count: int) -> list[int]:
  """Examples in each process's share, before dropping to an equal length."""
  shares = split_files(shard_lengths, process_count)
  if shares is None:
    n = sum(shard_lengths)
    return [len(range(p, n, process_count)) for p in range(process_count)]
  return [sum(shard_lengths[i] for i in s) for s in shares]


def local_batch_size(global_batch_size: int, mesh: Mesh,
                     process_count: int) -> int:
  """The per-process batch; errors when the global batch does not divide."""
  if 'data' not in mesh.axis_names:
    raise ValueError(f"the mesh needs a 'data' axis, it has {mesh.axis_names}")
  data = mesh.shape['data']
  if global_batch_size <= 0 or global_batch_size % data:
    raise ValueError(
        f"global batch {global_batch_size} does not divide over the mesh's "
        f"{data} 'data' devices: use a positive multiple of {data}")
  if global_batch_size % process_count:
    raise ValueError(
        f'global batch {global_batch_size} does not divide over '
        f'{process_count} processes: use a multiple of {process_count}')
  return global_batch_size // process_count


def steps_per_epoch(info: DatasetInfo, global_batch_size: int, mesh: Mesh,
                    process_count: int) -> int:
  """Batches in an epoch: each process's share, cut to an equal length."""
  batch = local_batch_size(global_batch_size, mesh, process_count)
  share = min(share_lengths(info.shard_lengths, process_count))
  if share < batch:
    raise ValueError(
        f'each of {process_count} process(es) gets {share} examples, fewer '
        f'than its batch of {batch}: use a smaller batch or more data')
  return share // batch


def to_global(local_batch: Mapping[str, np.ndarray],
              mesh: Mesh) -> dict[str, jax.Array]:
  """Stitches each process's slice into global arrays sharded on 'data'."""
  sharding = NamedSharding(mesh, P('data'))
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in local_batch.items()}


def processes(process_index, process_count):
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if not 0 <= index < count:
    raise ValueError(f'process_index {index} is not in [0, {count})')
  return index, count


def dtype_name(dtype) -> str:
  """'float32' or 'bfloat16', from a name or a numpy/jnp dtype."""
  name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
  if name not in ('float32', 'bfloat16'):
    raise ValueError(f'image dtype must be float32 or bfloat16, got {dtype!r}')
  return name


def _key(*words: int) -> list[int]:
  """Two 32-bit words of a stateless seed, hashed from the given ints."""
  return [int(w) for w in np.random.SeedSequence(words).generate_state(2)]


# --- Damaged records ---------------------------------------------------------

class DamagedShard(RuntimeError):
  """A damaged record where the run asked for strictness
  (config.strict_records), or damage that leaves a process no record;
  the message names the shard, the byte offset and the fix."""


def _recovery(data_dir: str) -> str:
  return (f'`python -m data_prep check {data_dir}` lists every damaged '
          'record; re-copy the shard from its source, or re-run `python -m '
          'data_prep train` to write it again')


def share_files(info: DatasetInfo, process_index: int,
                process_count: int) -> tuple[list[str], bool]:
  """(the shards this process reads, whether it keeps only every P-th of
  their records: fewer files than processes)."""
  shares = split_files(info.shard_lengths, process_count)
  if shares is None:
    return list(info.files), True
  return [info.files[i] for i in shares[process_index]], False


class _Damage:
  """The damaged records a stream has met: the shards it reads by their
  intact records' offsets (``intact``), and each damaged span, named
  (``records``, what the log and run.json report)."""

  def __init__(self, info: DatasetInfo, process_index: int,
               process_count: int, strict: bool):
    self.info, self.strict = info, strict
    self.process_index, self.process_count = process_index, process_count
    self.files, self.record_split = share_files(info, process_index,
                                                process_count)
    self.intact: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    self.records: list[dict[str, Any]] = []

  def met(self, message: str) -> None:
    """TensorFlow's DataLossError ``message`` traced to its shards, which
    are scanned; each damaged span is named in a warning and their intact
    records read from then on. DamagedShard when strict, when no shard
    shows damage, or when this process has no record left."""
    unread = [f for f in self.files if f not in self.intact]
    hits = tfrecords.shards_at(message, unread)
    if not hits:
      logging.warning('input: TensorFlow reports a damaged record (%s) '
                      'without naming its shard: checking the %d shards '
                      'this process reads', message.strip()[:200],
                      len(unread))
      hits = unread
    found = [scan for scan in map(self._scan, hits) if scan.damage]
    if not found:
      raise DamagedShard(
          f'TensorFlow reports a damaged record in {self.info.data_dir!r} '
          f'({message.strip()[:200]}), but no shard shows one when read '
          f'again (did a shard change while training?); '
          f'{_recovery(self.info.data_dir)}')
    self._take(found)

  def check_sizes(self) -> None:
    """At the start: a shard whose size is not the one data_prep wrote is
    scanned now, for TensorFlow reads a shard cut at a record's end (or in
    a header) without a word. Without each shard's size, only the total
    is compared (a warning: which shard is unknown)."""
    info, sizes = self.info, {f: os.path.getsize(f) for f in self.files}
    if info.shard_bytes is not None:
      recorded = dict(zip(info.files, info.shard_bytes))
      changed = [f for f in self.files if sizes[f] != recorded[f]]
      found = [s for s in map(self._scan, changed) if self._lost(s)]
      if found:
        self._take(found)
      return
    total = sum(map(os.path.getsize, info.files))
    if info.num_bytes and total != info.num_bytes:
      message = (f'{info.data_dir}: the shards hold {total} bytes where its '
                 f'dataset_info.json says {info.num_bytes}: a shard was cut '
                 'short or changed (TensorFlow skips the records missing at '
                 f"a shard's end without a word); "
                 f'{_recovery(info.data_dir)}')
      if self.strict:
        raise DamagedShard(message)
      logging.warning('input: %s', message)

  def _scan(self, path: str) -> tfrecords.Scan:
    try:
      return tfrecords.scan(path)
    except OSError as e:
      raise DamagedShard(f'{path}: cannot be read ({e}); '
                         f'{_recovery(self.info.data_dir)}') from None

  def _lost(self, scan: tfrecords.Scan) -> list[dict[str, Any]]:
    """Each damaged span of a scanned shard (and records missing from its
    end), as records for the log and run.json."""
    expected = self.info.shard_lengths[self.info.files.index(scan.path)]
    lost = tfrecords.examples_lost(scan.damage, len(scan.offsets), expected)
    out = [{'shard': os.path.basename(scan.path), 'offset': d.offset,
            'bytes': d.end - d.offset, 'examples': k,
            'what': d.describe(scan.size)} for d, k in zip(scan.damage, lost)]
    short = expected - len(scan.offsets) - sum(lost)
    if short > 0:
      out.append({'shard': os.path.basename(scan.path), 'offset': scan.size,
                  'bytes': 0, 'examples': short,
                  'what': f'the shard ends {short} record(s) short of the '
                          f'{expected} its metadata lists (cut at the end '
                          'of a record, or records deleted whole)'})
    return out

  def _take(self, found: list[tfrecords.Scan]) -> None:
    """Names the damage found (a warning each), then stops (strict) or
    reads those shards by their intact records from now on."""
    new = [record for scan in found for record in self._lost(scan)]
    self.records += new
    if self.strict:
      path = os.path.join(self.info.data_dir, new[0]['shard'])
      more = f' (and {len(new) - 1} more)' if len(new) > 1 else ''
      raise DamagedShard(
          f'{path}: damaged record at byte {new[0]["offset"]}: '
          f'{new[0]["what"]}{more}. config.strict_records=True stops the '
          f'run here: {_recovery(self.info.data_dir)}; or set '
          'config.strict_records=False to skip damaged records (each is '
          'named in the log and counted in run.json)')
    for record in new:
      logging.warning(
          'input: %s: damaged record at byte %d: %s. Skipped: %d '
          'example(s) fewer in every epoch. %s (config.strict_records=True '
          'stops the run instead)',
          os.path.join(self.info.data_dir, record['shard']),
          record['offset'], record['what'], record['examples'],
          _recovery(self.info.data_dir))
    for scan in found:
      if scan.damage:
        self.intact[scan.path] = (scan.offsets, scan.lengths)
    self._check_left()

  def _check_left(self) -> None:
    """Refuses damage that leaves this process no record to read."""
    left = sum(len(self.intact[f][0]) if f in self.intact else
               self.info.shard_lengths[self.info.files.index(f)]
               for f in self.files)
    if self.record_split:
      left = len(range(self.process_index, left, self.process_count))
    if left < 1:
      raise DamagedShard(
          f'every record that process {self.process_index} reads in '
          f'{self.info.data_dir!r} is damaged ({len(self.records)} damaged '
          f'span(s), e.g. {self.records[0]["shard"]} at byte '
          f'{self.records[0]["offset"]}); {_recovery(self.info.data_dir)}')


def _undecodable(info: DatasetInfo, message: str) -> str:
  """A record whose checksums hold but whose contents do not decode: it was
  written so (not damaged on the way), so it is not skipped silently."""
  return (f'a record in {info.data_dir!r} is no Example of a '
          f'{info.image_size}x{info.image_size} JPEG and a label in [0, '
          f'{info.num_classes}) although its checksums hold '
          f'(TensorFlow: {" ".join(message.split())[:300]}): '
          f'`python -m data_prep check {info.data_dir}` names it (shard, byte '
          'offset); re-run `python -m data_prep train` to write the shard '
          'again')


def _shard_reader(tf, intact: Mapping[str, tuple[np.ndarray, np.ndarray]]):
  """The interleave's reader of one shard: TensorFlow's, or for a shard
  with known damage, its intact records read by offset (their checksums
  were checked when the shard was scanned)."""
  if not intact:
    return tf.data.TFRecordDataset
  table = dict(intact)  # this pipeline's; damage met later builds another
  names = tf.constant(sorted(table))

  def intact_records(path):
    path = os.fsdecode(path)
    offsets, lengths = table.get(path, ((), ()))
    with open(path, 'rb') as f:
      for offset, n in zip(np.asarray(offsets).tolist(),
                           np.asarray(lengths).tolist()):
        f.seek(offset + tfrecords.HEADER)
        data = f.read(n)
        if len(data) < n:
          logging.warning('input: %s is shorter than when it was scanned; '
                          'its records from byte %d are skipped', path,
                          offset)
          return
        yield data

  def records(path):
    known = tf.reduce_any(tf.equal(names, path))
    plain = tf.data.TFRecordDataset(path).take(
        tf.where(known, tf.constant(0, tf.int64), -1))
    scanned = tf.data.Dataset.from_generator(
        intact_records, args=(path,),
        output_signature=tf.TensorSpec([], tf.string))
    return plain.concatenate(scanned.take(
        tf.where(known, tf.constant(-1, tf.int64), 0)))
  return records


# --- The training stream from TFRecords --------------------------------------

class Stream:
  """Shared iterator surface: next_local() gives this process's numpy
  batch, next() the global jax.Array batch, state() the position."""

  def __init__(self, mesh, process_count):
    self.mesh = mesh
    self.process_count = process_count

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, jax.Array]:
    if self.process_count != jax.process_count():
      raise RuntimeError(
          f'this stream was built for {self.process_count} process(es) but '
          f'JAX runs {jax.process_count()}: use next_local() for the '
          'per-process numpy batches of a simulated process')
    return to_global(self.next_local(), self.mesh)


class TrainIterator(Stream):
  """Endless shuffled, augmented batches of one process's share, in epochs
  of ``steps_per_epoch`` batches; ``state()`` is {'epoch', 'index'}, where
  index counts this process's examples consumed in that epoch. ``damaged``
  lists the damaged records met so far (module docstring)."""

  def __init__(self, info: DatasetInfo, mesh: Mesh, global_batch_size: int, *,
               seed: int, start, flip: bool, dtype, shuffle_buffer: int,
               process_index: int, process_count: int, num_threads: int | None,
               prefetch: int, strict: bool = False,
               contract: images.InputContract | None = None):
    super().__init__(mesh, process_count)
    self.info = info
    self.batch_size = local_batch_size(global_batch_size, mesh, process_count)
    self.steps_per_epoch = steps_per_epoch(info, global_batch_size, mesh,
                                           process_count)
    self.epoch_length = self.steps_per_epoch * self.batch_size
    self._epoch, self._index = self._parse_start(start)
    self._damage = _Damage(info, process_index, process_count, strict)
    self._damage.check_sizes()
    self._dataset = functools.partial(
        _train_dataset, info, seed=seed, batch_size=self.batch_size,
        epoch_length=self.epoch_length, flip=flip, dtype=dtype,
        shuffle_buffer=shuffle_buffer, process_index=process_index,
        process_count=process_count, num_threads=num_threads,
        prefetch=prefetch, contract=contract)
    self._it = self._open()

  def _open(self):
    """The pipeline from the current position, past the damage known."""
    return self._dataset(start=(self._epoch, self._index),
                         intact=self._damage.intact,
                         fill=bool(self._damage.records)).as_numpy_iterator()

  @property
  def damaged(self) -> list[dict[str, Any]]:
    """Each damaged span met so far: {'shard', 'offset', 'bytes',
    'examples' (lost from every epoch), 'what'}."""
    return list(self._damage.records)

  def _parse_start(self, start) -> tuple[int, int]:
    if start is None:
      return 0, 0
    if isinstance(start, Mapping):
      if set(start) != {'epoch', 'index'}:
        raise ValueError(f'start {start!r} is not a state() of a file stream: '
                         "it needs exactly the keys 'epoch' and 'index'")
      epoch, index = int(start['epoch']), int(start['index'])
    else:  # A global step count.
      epoch, step = divmod(int(start), self.steps_per_epoch)
      index = step * self.batch_size
    if epoch < 0 or not 0 <= index <= self.epoch_length or (
        index % self.batch_size):
      raise ValueError(
          f'start {start!r} does not fit this stream: the index must be a '
          f'multiple of the per-process batch {self.batch_size} in '
          f'[0, {self.epoch_length}] (was it saved with another batch size or '
          'process count?)')
    if index == self.epoch_length:
      return epoch + 1, 0
    return epoch, index

  def state(self) -> dict[str, int]:
    """The position of the next batch, as plain ints (JSON and orbax)."""
    return {'epoch': self._epoch, 'index': self._index}

  def next_local(self) -> dict[str, np.ndarray]:
    while True:
      try:
        batch = next(self._it)
        break
      except _tf().errors.DataLossError as e:
        self._it = None  # the old pipeline's threads and files go first
        self._damage.met(e.message)
        self._it = self._open()
      except _tf().errors.InvalidArgumentError as e:
        raise DamagedShard(_undecodable(self.info, e.message)) from None
      except UnicodeDecodeError:  # TensorFlow's message quotes the record
        raise DamagedShard(_undecodable(
            self.info, 'an error whose message is not UTF-8')) from None
    self._index += self.batch_size
    if self._index == self.epoch_length:
      self._epoch, self._index = self._epoch + 1, 0
    return batch


def train_stream(data_dir: str | os.PathLike, global_batch_size: int,
                 mesh: Mesh, *, seed: int = 0,
                 start: Mapping[str, int] | int | None = None,
                 flip: bool = True, dtype: Any = np.float32,
                 shuffle_buffer: int = 16_384,
                 process_index: int | None = None,
                 process_count: int | None = None,
                 num_threads: int | None = None,
                 prefetch: int = 2, strict: bool = False,
                 contract: images.InputContract | None = None
                 ) -> TrainIterator:
  """Training batches {'image': (B, S, S, 3) dtype, 'label': (B,) int32} from
  data_prep's shards, sharded on the mesh's 'data' axis.

  ``start`` is a previous ``state()`` (or a global step count); the stream
  then continues exactly where that run stood. ``num_threads`` bounds
  tf.data's private thread pool (None: TensorFlow's shared pool). A
  damaged record is skipped and named (``damaged``), or with ``strict``
  raises DamagedShard. ``contract``: the run's input contract
  (images.InputContract; None: this project's RGB, 127.5, 128).
  """
  index, count = processes(process_index, process_count)
  return TrainIterator(dataset_info(data_dir), mesh, global_batch_size,
                       seed=seed, start=start, flip=flip,
                       dtype=dtype_name(dtype),
                       shuffle_buffer=shuffle_buffer, process_index=index,
                       process_count=count, num_threads=num_threads,
                       prefetch=prefetch, strict=strict, contract=contract)


def _options(tf, num_threads):
  options = tf.data.Options()
  options.deterministic = True
  if num_threads:
    options.threading.private_threadpool_size = num_threads
    options.threading.max_intra_op_parallelism = 1
  return options


def decode_jpeg(tf, data):
  """JPEG bytes to uint8 (H, W, 3) exactly as Pillow decodes them
  (images.decode, which evaluation reads .bin sets and photos with):
  libjpeg's accurate integer IDCT. TensorFlow's default, the fast IDCT,
  differs from it by up to 12 levels (a level on average), so training
  would see other pixels than evaluation of the very same bytes."""
  return tf.io.decode_jpeg(data, channels=3, dct_method='INTEGER_ACCURATE')


def _decode(tf, record, image_size):
  """A serialized Example to (uint8 image (S, S, 3), int32 label)."""
  ex = tf.io.parse_single_example(record, {
      'image': tf.io.FixedLenFeature([], tf.string),
      'label': tf.io.FixedLenFeature([], tf.int64)})
  image = decode_jpeg(tf, ex['image'])
  image = tf.ensure_shape(image, (image_size, image_size, 3))
  return image, tf.cast(ex['label'], tf.int32)


def _normalize(tf, image, dtype, contract=None):
  """The model's input (images.normalize), computed in float32."""
  x = images.normalize(tf.cast(image, tf.float32), contract)
  return tf.cast(x, {'float32': tf.float32, 'bfloat16': tf.bfloat16}[dtype])


def _train_dataset(info, *, seed, start, batch_size, epoch_length, flip, dtype,
                   shuffle_buffer, process_index, process_count, num_threads,
                   prefetch, intact, fill, contract=None):
  """Epoch e of this process: its files in an order drawn from (seed, e),
  records (or every P-th record) shuffled with a seed from (seed, e,
  process), cut to the equal epoch length (filled up from its start where
  damaged records left it short), numbered; the first epoch skips the
  already consumed serialized records before any decoding. ``intact``:
  the shards read past their damage (_Damage); ``fill`` once records are
  known lost (repeating costs a few % while nothing is)."""
  tf = _tf()
  files, record_split = share_files(info, process_index, process_count)
  files = tf.constant(files)
  read = _shard_reader(tf, intact)
  cycle = min(int(files.shape[0]), 16)
  key_files = tf.constant(_key(seed, _FILES), tf.int64)
  key_shuffle = tf.constant(_key(seed, _SHUFFLE, process_index), tf.int64)
  key_flip = tf.constant(_key(seed, _FLIP, process_index), tf.int64)
  start_epoch, start_index = start
  fold = tf.random.experimental.stateless_fold_in

  def epoch_records(epoch):
    # The same file order on every process: record sharding relies on it.
    order = tf.random.experimental.stateless_shuffle(
        files, seed=fold(key_files, epoch))
    ds = tf.data.Dataset.from_tensor_slices(order).interleave(
        read, cycle_length=cycle, block_length=1,
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if record_split:
      ds = ds.shard(process_count, process_index)
    shuffle_seed = tf.random.stateless_uniform(
        [], seed=fold(key_shuffle, epoch), minval=1, maxval=2**62,
        dtype=tf.int64)
    ds = ds.shuffle(shuffle_buffer, seed=shuffle_seed,
                    reshuffle_each_iteration=False)
    ds = (ds.repeat() if fill else ds).take(epoch_length).enumerate()
    ds = ds.skip(tf.where(epoch == start_epoch,
                          tf.constant(start_index, tf.int64), 0))
    return ds.map(lambda i, r: (epoch, i, r))

  def example(epoch, index, record):
    image, label = _decode(tf, record, info.image_size)
    # A label out of range stops here (a gather's index error; stateless,
    # unlike an assert, so that tf.data keeps optimising the map).
    label = tf.gather(tf.range(info.num_classes, dtype=label.dtype), label)
    if flip:
      image = tf.image.stateless_random_flip_left_right(
          image, seed=fold(fold(key_flip, epoch), index))
    return {'image': _normalize(tf, image, dtype, contract), 'label': label}

  ds = tf.data.Dataset.counter(start_epoch).flat_map(epoch_records)
  ds = ds.map(example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(batch_size, drop_remainder=True).prefetch(prefetch)
  return ds.with_options(_options(tf, num_threads))


def ordered_dataset(data_dir: str | os.PathLike, batch_size: int | None = None,
                    dtype: Any = np.float32,
                    contract: images.InputContract | None = None):
  """All examples in file order, unshuffled and unaugmented, as a
  tf.data.Dataset of {'image', 'label'} (for embedding extraction); the last
  batch may be short."""
  info = dataset_info(data_dir)
  dtype = dtype_name(dtype)
  tf = _tf()

  def example(record):
    image, label = _decode(tf, record, info.image_size)
    return {'image': _normalize(tf, image, dtype, contract), 'label': label}

  ds = tf.data.TFRecordDataset(list(info.files)).map(
      example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  if batch_size:
    ds = ds.batch(batch_size)
  return ds.prefetch(2).with_options(_options(tf, None))
