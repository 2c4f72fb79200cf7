"""``python -m data_prep pairs``: a pairs file and its images into an
insightface verification ``.bin``, each image preprocessed exactly as the
training images are (``preprocess.prepare_faces``): fitted, aligned on
--landmarks, or aligned on the landmarks --detect finds.

Pairs files, line by line (a first line of one or two integers, LFW's
``sets n`` or ``n`` header, is skipped; a .bin keeps no header, so the
summary says which folds evaluate will take on the .bin, and whether they
are the sets the header declares):

  name i j            same person, LFW layout: IMAGES/name/name_%04d.jpg
  name1 i name2 j     different people, same layout
  path1 path2 same    any layout: paths relative to IMAGES, same 1 or 0
"""

from __future__ import annotations

import collections
import os
import re
import sys

from tqdm import tqdm

from data_prep import DataPrepError, preprocess
from npcface_jax.common import textfile
from npcface_jax.evaluation import bin_format, protocols
from npcface_jax.faces import alignment, detection


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


def declared_sets(lines) -> tuple[int, int] | None:
  """(S, N) of a pairs file's header "S N" (LFW's pairs.txt: S sets of N
  same then N different pairs, the folds of its protocol); None without
  one, or for "N" alone (pairsDevTest.txt: one set, nothing to fold by)."""
  for line in lines:
    fields = line.split()
    if not fields or fields[0].startswith('#'):
      continue
    if len(fields) == 2 and all(_NUMBER.fullmatch(f) for f in fields):
      sets, per_set = map(int, fields)
      return (sets, per_set) if sets >= 2 and per_set >= 1 else None
    return None
  return None


def folds_note(declared: tuple[int, int] | None, issame,
               skipped: int = 0) -> str:
  """The folds evaluate will take on the written .bin (fold_assignment of
  its labels: a .bin has no header), said against the header's sets."""
  if len(issame) < 10:
    return (f'{len(issame)} pairs are too few for the 10 folds of '
            'evaluate (it needs 10)')
  folds = protocols.fold_assignment(issame)
  note = 'evaluate will take ' + protocols.fold_note(
      {'fold_rule': folds.rule, 'num_folds': folds.count})
  if declared is None:
    return note
  sets, per_set = declared
  header = f'{sets} sets of {per_set} + {per_set} pairs the header declares'
  try:
    protocols.declared_folds(issame, sets, per_set)
  except ValueError:
    why = (f'the {skipped} skipped pair(s) break them' if skipped
           else 'the pairs do not follow it')
    return f'{note}, not the {header}: {why}'
  if sets == folds.count and folds.rule == 'file order':
    return f'{note}: the {header}'  # the very same folds
  return f'{note}, not the {header}: a .bin keeps no header'


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
            detect: bool = False, min_face_score: float = detection.MIN_SCORE,
            save_landmarks: str | None = None, workers: int | None = None,
            overwrite: bool = False, progress: bool = True) -> dict:
  """Writes out (a .bin) and returns counts of kept and skipped pairs (and
  of the skipped images by reason)."""
  workers = workers or os.cpu_count() or 1
  finder = _check(pairs_file, images, out, landmarks, detect, min_face_score,
                  save_landmarks, workers, overwrite)
  pairs = read_pairs(pairs_file)
  if not pairs:
    raise DataPrepError(f'{pairs_file!r} holds no pairs')
  points = _landmarks(landmarks, images) if landmarks else {}
  keys = sorted({k for _, a, b, _ in pairs for k in (a, b)})
  paths = [os.path.normpath(os.path.join(images, k)) for k in keys]
  jobs = [preprocess.Job(p, None, points.get(p)) for p in paths]
  options = preprocess.Options(image_size, fit, bool(landmarks), 95, finder)
  results = preprocess.prepare_faces(jobs, options, workers)
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
    bins += [images_by_key[a].jpeg, images_by_key[b].jpeg]
    issame.append(same)
  _print_skipped(skipped)
  if not issame:
    raise DataPrepError(_nothing_readable(pairs_file, images, landmarks,
                                          detect, skipped))
  bin_format.save_bin(out, bins, issame)
  counts = _counts(issame, skipped, images_by_key)
  counts['folds'] = folds_note(declared_sets(
      line for _, line in textfile.text_lines(pairs_file)), issame,
      len(skipped))
  if save_landmarks:
    counts['landmarks_saved'] = preprocess.write_landmarks(save_landmarks, {
        k: r.landmarks for k, r in images_by_key.items()
        if isinstance(r, preprocess.Prepared) and r.landmarks is not None})
  print(_summary(counts, len(pairs), out, save_landmarks), file=sys.stderr)
  return counts


def _check(pairs_file, images, out, landmarks, detect, min_face_score,
           save_landmarks, workers, overwrite) -> detection.FaceFinder | None:
  """Every argument checked before any work; returns --detect's
  detector."""
  if os.path.exists(out) and not overwrite:
    raise DataPrepError(f'{out!r} exists; pass --overwrite to replace it')
  for flag, path in (('PAIRS', pairs_file), ('--landmarks', landmarks)):
    if path is not None and not os.path.isfile(path):
      raise DataPrepError(f'{flag} file {path!r} does not exist')
  if not os.path.isdir(images):
    raise DataPrepError(f'IMAGES {images!r} is not a folder; pass the folder '
                        'that holds <name>/<name>_0001.jpg (or the paths of '
                        'a "path1 path2 same" list)')
  if save_landmarks:
    preprocess.check_landmarks_out(save_landmarks, overwrite=overwrite,
                                   aligning=bool(detect or landmarks))
  return preprocess.face_finder(min_face_score, workers) if detect else None


def _landmarks(path: str, images: str) -> dict:
  """The --landmarks file by the path of each image (names in it are
  relative to IMAGES, or absolute)."""
  try:
    raw = alignment.read_landmarks(path)
  except ValueError as e:
    raise DataPrepError(str(e)) from None
  return {os.path.normpath(os.path.join(images, k)): v
          for k, v in raw.items()}


def _print_skipped(skipped: list) -> None:
  for n, bad in skipped[:10]:
    why = '; '.join(f'{k}: {s.reason} ({s.detail})' for k, s in bad)
    print(f'data_prep pairs: skipped the pair on line {n}: {why}',
          file=sys.stderr)
  if len(skipped) > 10:
    print(f'data_prep pairs: ... and {len(skipped) - 10} more',
          file=sys.stderr)


def _nothing_readable(pairs_file, images, landmarks, detect, skipped) -> str:
  n, bad = skipped[0]
  key, skip = bad[0]
  return (f'no pair of {pairs_file!r} has both images readable under '
          f'{images!r} (line {n}: {key}: {skip.reason}, {skip.detail}); check '
          'IMAGES and the pairs file'
          + (f' and the --landmarks file {landmarks!r}' if landmarks else '')
          + (' (--detect found no face: --min-face-score lower?)'
             if detect and skip.reason == 'no face' else ''))


def _counts(issame, skipped, images_by_key) -> dict:
  """Pairs written and skipped, and the images skipped by reason ('no
  face', 'corrupt image', ...; each image once, however many pairs it is
  in)."""
  reasons = collections.Counter(r.reason for r in images_by_key.values()
                                if isinstance(r, preprocess.Skip))
  return {'pairs': len(issame), 'same': sum(issame),
          'different': len(issame) - sum(issame), 'skipped': len(skipped),
          'skipped_images_by_reason': dict(sorted(reasons.items()))}


def _summary(counts: dict, listed: int, out: str, save_landmarks) -> str:
  line = (f'data_prep pairs: wrote {counts["pairs"]} pairs ({counts["same"]} '
          f'same, {counts["different"]} different) to {out}; skipped '
          f'{counts["skipped"]} of {listed}')
  if counts['skipped_images_by_reason']:
    line += ' (images left out: ' + ', '.join(
        f'{n} {r}' for r, n in counts['skipped_images_by_reason'].items()
    ) + ')'
  line += f'\ndata_prep pairs: {counts["folds"]}'
  if save_landmarks:
    line += (f'\ndata_prep pairs: wrote the landmarks of '
             f'{counts["landmarks_saved"]} images to {save_landmarks}')
  return line
