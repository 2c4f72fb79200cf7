"""``python -m data_prep pairs``: a pairs file and its images into an
insightface verification ``.bin``, each image preprocessed exactly as the
training images are (``preprocess.prepare``).

Pairs files, line by line (a first line of one or two integers, LFW's
``folds n`` or ``n`` header, is skipped):

  name i j            same person, LFW layout: IMAGES/name/name_%04d.jpg
  name1 i name2 j     different people, same layout
  path1 path2 same    any layout: paths relative to IMAGES, same 1 or 0
"""

from __future__ import annotations

import os
import re
import sys

from tqdm import tqdm

from data_prep import DataPrepError, preprocess
from npcface_jax import alignment, textfile, verification_bin


# LFW image numbers: ASCII digits only (str.isdigit also takes '²', which
# int() refuses), and few enough to be a real file's number.
_NUMBER = re.compile('[0-9]{1,9}')


def _lfw(name: str, number: str) -> str:
  return f'{name}/{name}_{int(number):04d}.jpg'


def _is_number(field: str) -> bool:
  return field.isascii() and field.isdigit()


def parse_pairs(lines, name: str = 'the pairs file'
                ) -> list[tuple[int, str, str, bool]]:
  """(line number, key 1, key 2, same) per pair; keys relative to IMAGES.
  Raises DataPrepError naming ``name`` and the line of anything else."""
  pairs = []
  first = True
  for n, line in enumerate(lines, 1):
    fields = line.split()
    if not fields or fields[0].startswith('#'):
      continue
    if first and len(fields) <= 2 and all(map(_is_number, fields)):
      first = False
      continue  # the header
    first = False
    numbers = [fields[1], fields[-1]] if len(fields) in (3, 4) else []
    if numbers and all(map(_is_number, numbers)):
      bad = next((x for x in numbers if not _NUMBER.fullmatch(x)), None)
      if bad is not None:
        raise DataPrepError(
            f'{name}, line {n}: image number {textfile.shown(bad)} is no '
            'number of an image file (at most 9 digits); fix the line')
      a, b = (fields[0], fields[0]) if len(fields) == 3 else fields[::2]
      pairs.append((n, _lfw(a, numbers[0]), _lfw(b, numbers[1]),
                    len(fields) == 3))
    elif len(fields) == 3 and fields[2] in ('0', '1'):
      pairs.append((n, fields[0], fields[1], fields[2] == '1'))
    else:
      raise DataPrepError(
          f'{name}, line {n}: {textfile.shown(line.strip())} is not a pair; '
          'expected "name i j", "name1 i name2 j" (LFW pairs.txt) or "path1 '
          'path2 same" (same 0 or 1)')
  return pairs


def read_pairs(path: str) -> list[tuple[int, str, str, bool]]:
  """parse_pairs of a file; DataPrepError naming the file and line of
  anything that is not a pair, nor UTF-8 text."""
  try:
    return parse_pairs((line for _, line in textfile.text_lines(path)),
                       path)
  except ValueError as e:  # text_lines: not UTF-8, NUL, endless line
    raise DataPrepError(str(e)) from None


def convert(pairs_file: str, images: str, out: str, *, image_size: int = 112,
            fit: str = 'resize', landmarks: str | None = None,
            workers: int | None = None, overwrite: bool = False,
            progress: bool = True) -> dict:
  """Writes out (a .bin) and returns counts of kept and skipped pairs."""
  if os.path.exists(out) and not overwrite:
    raise DataPrepError(f'{out!r} exists; pass --overwrite to replace it')
  for flag, path in (('PAIRS', pairs_file), ('--landmarks', landmarks)):
    if path is not None and not os.path.isfile(path):
      raise DataPrepError(f'{flag} file {path!r} does not exist')
  if not os.path.isdir(images):
    raise DataPrepError(f'IMAGES {images!r} is not a folder; pass the folder '
                        'that holds <name>/<name>_0001.jpg (or the paths of '
                        'a "path1 path2 same" list)')
  pairs = read_pairs(pairs_file)
  if not pairs:
    raise DataPrepError(f'{pairs_file!r} holds no pairs')

  points = {}
  if landmarks:
    try:
      raw = alignment.read_landmarks(landmarks)
    except ValueError as e:
      raise DataPrepError(str(e)) from None
    points = {os.path.normpath(os.path.join(images, k)): v
              for k, v in raw.items()}
  keys = sorted({k for _, a, b, _ in pairs for k in (a, b)})
  paths = [os.path.normpath(os.path.join(images, k)) for k in keys]
  jobs = [preprocess.Job(p, None, points.get(p)) for p in paths]
  options = preprocess.Options(image_size, fit, bool(landmarks), 95)
  results = preprocess.prepare_all(jobs, options, workers or os.cpu_count())
  bar = tqdm(results, total=len(jobs), desc='data_prep pairs', unit='img',
             file=sys.stderr, disable=not progress, mininterval=0.5)
  images_by_key = dict(zip(keys, bar))

  bins, issame, skipped = [], [], []
  for n, a, b, same in pairs:
    bad = [(k, images_by_key[k]) for k in (a, b)
           if isinstance(images_by_key[k], preprocess.Skip)]
    if bad:
      skipped.append((n, bad))
      continue
    bins += [images_by_key[a], images_by_key[b]]
    issame.append(same)
  for n, bad in skipped[:10]:
    why = '; '.join(f'{k}: {s.reason} ({s.detail})' for k, s in bad)
    print(f'data_prep pairs: skipped the pair on line {n}: {why}',
          file=sys.stderr)
  if len(skipped) > 10:
    print(f'data_prep pairs: ... and {len(skipped) - 10} more',
          file=sys.stderr)
  if not issame:
    n, bad = skipped[0]
    key, skip = bad[0]
    raise DataPrepError(
        f'no pair of {pairs_file!r} has both images readable under '
        f'{images!r} (line {n}: {key}: {skip.reason}, {skip.detail}); check '
        'IMAGES and the pairs file'
        + (f' and the --landmarks file {landmarks!r}' if landmarks else ''))
  verification_bin.save_bin(out, bins, issame)
  counts = {'pairs': len(issame), 'same': sum(issame),
            'different': len(issame) - sum(issame), 'skipped': len(skipped)}
  print(f'data_prep pairs: wrote {counts["pairs"]} pairs ({counts["same"]} '
        f'same, {counts["different"]} different) to {out}; skipped '
        f'{counts["skipped"]} of {len(pairs)}', file=sys.stderr)
  return counts
