"""``python -m data_prep check OUT``: a prepared training set verified
before a long run, every record of every shard: the TFRecord framing (the
masked CRC32C of each length and each record's data), each record a
tf.train.Example whose image is a JPEG that decodes (npcface_jax.faces.images,
the one image layer) to the metadata's S x S and whose label is in [0,
num_classes), and each shard's count of records against the metadata.

Every problem is named with its shard, byte offset and record index. The
shards are checked in worker processes (framing with tfrecords.py, NumPy
only; decoding with Pillow); nothing is written.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import sys
from typing import Any, TextIO

from data_prep import DataPrepError
from npcface_jax.data import tfrecords
from npcface_jax.faces import images

_JPEG = b'\xff\xd8\xff'
_SOS, _EOI = b'\xff\xda', b'\xff\xd9'  # start of scan, end of image
_SHOWN = 20  # problems printed per shard


def check_shard(path: str, expected: int, num_classes: int,
                image_size: int) -> dict[str, Any]:
  """One shard checked: {'shard', 'path', 'intact' (records whose framing
  holds), 'expected', 'unusable' (examples training cannot use),
  'problems': [{'offset', 'record', 'what'}]}."""
  problems = []

  def visit(index: int, offset: int, data: memoryview) -> None:
    what = example_problem(bytes(data), num_classes, image_size)
    if what:
      problems.append({'offset': offset, 'record': index, 'what': what})

  result = {'shard': os.path.basename(path), 'path': path, 'intact': 0,
            'expected': expected, 'unusable': expected, 'problems': problems}
  try:
    scan = tfrecords.scan(path, visit)
  except FileNotFoundError:
    problems.append({'offset': None, 'record': None,
                     'what': 'the shard is missing'})
    return result
  except OSError as e:
    problems.append({'offset': None, 'record': None,
                     'what': f'the shard cannot be read ({e})'})
    return result
  bad_content = len(problems)
  lost = tfrecords.examples_lost(scan.damage, len(scan.offsets), expected)
  for damage, examples in zip(scan.damage, lost):
    problems.append({'offset': damage.offset, 'record': damage.record,
                     'what': f'damaged ({examples} example(s) lost): '
                             f'{damage.describe(scan.size)}'})
  if len(scan.offsets) + sum(lost) != expected:  # not the damage's doing
    problems.append({'offset': None, 'record': None,
                     'what': f'{len(scan.offsets)} intact records where the '
                             f'metadata lists {expected} (records missing '
                             'or added whole: re-copy or re-prepare it)'})
  problems.sort(key=lambda p: (p['offset'] is None, p['offset'] or 0))
  result.update(intact=len(scan.offsets),
                unusable=max(0, expected - len(scan.offsets) + bad_content))
  return result


def example_problem(record: bytes, num_classes: int,
                    image_size: int) -> str | None:
  """What keeps a record from training, or None: not an Example, no JPEG
  image that decodes to S x S, a label out of range."""
  try:
    features = tfrecords.parse_example(record)
  except ValueError as e:
    return f'not a tf.train.Example ({e})'
  kind, values = features.get('image', ('none', []))
  if kind != 'bytes' or len(values) != 1:
    return 'no image feature (one bytes value)'
  kind, labels = features.get('label', ('none', []))
  if kind != 'int64' or len(labels) != 1:
    return 'no label feature (one int64 value)'
  if not 0 <= labels[0] < num_classes:
    return f'label {labels[0]} is not in [0, {num_classes})'
  image = values[0]
  if not image.startswith(_JPEG):
    return 'the image is not a JPEG (the input pipeline decodes JPEG only)'
  if _EOI not in image[image.rfind(_SOS) + 2:]:
    # Pillow makes do without it; TensorFlow's decoder, training's, stops.
    return 'the JPEG is cut short (no end-of-image marker after its scan)'
  try:
    size = images.decode(image).size
  except images.BadImage as e:
    return f'the image does not decode ({e})'
  if size != (image_size, image_size):
    return (f'the image is {size[0]}x{size[1]}; the metadata says '
            f'{image_size}x{image_size}')
  return None


def _results(jobs: list[tuple], workers: int):
  """check_shard of each job, in order; in worker processes if several."""
  if workers <= 1 or len(jobs) <= 1:
    yield from (check_shard(*job) for job in jobs)
    return
  with concurrent.futures.ProcessPoolExecutor(
      min(workers, len(jobs)),
      mp_context=multiprocessing.get_context('spawn')) as pool:
    yield from pool.map(check_shard, *zip(*jobs))


def check(out: str, workers: int | None = None, quiet: bool = False,
          stream: TextIO | None = None) -> dict[str, Any]:
  """Checks the data_prep output ``out``, printing a line per shard (with
  ``quiet``, only those with problems) and the verdict; returns {'shards':
  [check_shard(...)], 'problems', 'unusable', 'examples'}. DataPrepError
  when its metadata cannot be read."""
  from npcface_jax.data import input_pipeline  # noqa: PLC0415 (TF: not in workers)
  stream = stream or sys.stdout
  try:
    info = input_pipeline.dataset_info(out, check_files=False)
  except (OSError, ValueError) as e:
    raise DataPrepError(str(e)) from None
  jobs = [(f, n, info.num_classes, info.image_size)
          for f, n in zip(info.files, info.shard_lengths)]
  print(f'data_prep check {out}: {len(jobs)} shard(s), {info.num_examples} '
        f'examples of {info.num_classes} classes, {info.image_size}x'
        f'{info.image_size} JPEGs', file=stream)
  shards = []
  for result in _results(jobs, workers or os.cpu_count() or 1):
    shards.append(result)
    if result['problems'] or not quiet:
      print(_shard_lines(result), file=stream, flush=True)
  report = {'shards': shards,
            'problems': sum(len(s['problems']) for s in shards),
            'unusable': sum(s['unusable'] for s in shards),
            'examples': info.num_examples}
  print(_verdict(out, report), file=stream)
  return report


def _shard_lines(result: dict[str, Any]) -> str:
  problems = result['problems']
  head = (f'  {result["shard"]}: {result["intact"]} of {result["expected"]} '
          f'records intact')
  if not problems:
    return f'{head}, OK'
  lines = [f'{head}; {len(problems)} problem(s):']
  for p in problems[:_SHOWN]:
    where = ('' if p['offset'] is None else
             f'byte {p["offset"]} (record {p["record"]}): ')
    lines.append(f'    {where}{p["what"]}')
  if len(problems) > _SHOWN:
    lines.append(f'    ... and {len(problems) - _SHOWN} more')
  return '\n'.join(lines)


def _verdict(out: str, report: dict[str, Any]) -> str:
  shards = report['shards']
  if not report['problems']:
    return (f'data_prep check: OK: all {len(shards)} shard(s) intact: every '
            'checksum holds, every image decodes at its size, every label '
            'is in range, the counts match the metadata')
  bad = sum(1 for s in shards if s['problems'])
  return (
      f'data_prep check: {report["problems"]} problem(s) in {bad} of '
      f'{len(shards)} shard(s); {report["unusable"]} of '
      f'{report["examples"]} example(s) unusable. Training skips damaged '
      'records (naming them in its log and run.json; '
      'config.strict_records=True stops at them) but stops at a record '
      'whose image or label is bad. To recover them, re-copy the shard(s) '
      f'from their source, or re-run `python -m data_prep train SRC {out} '
      '--overwrite`.')
