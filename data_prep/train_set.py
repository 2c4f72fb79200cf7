"""``python -m data_prep train``: a training source into TFRecord shards,
tfds metadata, ``label_map.json`` and ``report.json``.

Identities are filtered (--exclude-identities, then
--min-images-per-identity) before any pixel is decoded, and once more after:
an identity whose images turned out unreadable can fall below the minimum.
Labels are 0..C-1 over the surviving identity names in sorted order. The
examples are written in a seeded random order, so that every shard mixes
identities and a reader's shuffle buffer need not be the whole dataset.
"""

from __future__ import annotations

import collections
import json
import os
import random
import sys
import time
from typing import NamedTuple

from tqdm import tqdm

from data_prep import DataPrepError, preprocess, shards, sources
from npcface_jax.common import jsonfile, textfile
from npcface_jax.faces import alignment, detection, images

IMAGES_PER_SHARD = 10_000
JPEG_QUALITY = 95


class Selection(NamedTuple):
  entries: list[sources.Entry]
  names: list[str]  # provisional label i is names[i]
  excluded: int  # identities of the source on the exclude list
  not_in_source: int  # names on the exclude list the source lacks
  below_min: int  # identities with too few listed images


def select(entries: list[sources.Entry], exclude: set[str],
           min_images: int) -> Selection:
  """The entries left after --exclude-identities, then the minimum count."""
  present = {e.identity for e in entries}
  entries = [e for e in entries if e.identity not in exclude]
  counts = collections.Counter(e.identity for e in entries)
  few = {name for name, n in counts.items() if n < min_images}
  entries = [e for e in entries if e.identity not in few]
  return Selection(entries, sources.sort_names(counts.keys() - few),
                   len(present & exclude), len(exclude - present), len(few))


def survivors(num_labels: int, valid: collections.Counter,
              min_images: int) -> list[int]:
  """The provisional labels whose valid (decoded) images still reach the
  minimum, in order."""
  return [label for label in range(num_labels)
          if valid[label] >= max(1, min_images)]


def convert(src: str, out: str, *, image_size: int = 112, fit: str = 'resize',
            landmarks: str | None = None, detect: bool = False,
            min_face_score: float = detection.MIN_SCORE,
            save_landmarks: str | None = None,
            exclude_identities: str | None = None,
            min_images_per_identity: int = 1, num_shards: int | None = None,
            workers: int | None = None, seed: int = 0, overwrite: bool = False,
            progress: bool = True) -> dict:
  """Runs the conversion and returns what it writes to report.json."""
  start = time.perf_counter()
  options = dict(image_size=image_size, fit=fit, landmarks=landmarks,
                 detect=detect, min_face_score=min_face_score,
                 save_landmarks=save_landmarks,
                 exclude_identities=exclude_identities,
                 min_images_per_identity=min_images_per_identity,
                 shards=num_shards, workers=workers or os.cpu_count() or 1,
                 seed=seed, jpeg_quality=JPEG_QUALITY)
  finder = _check_options(options, out, overwrite)
  listing = sources.list_source(src)
  exclude = _read_names(exclude_identities) if exclude_identities else set()
  chosen = select(listing.entries, exclude, min_images_per_identity)
  if not chosen.entries:
    raise DataPrepError(
        f'no images left in {src!r} after --exclude-identities '
        f'({chosen.excluded} identities) and --min-images-per-identity '
        f'{min_images_per_identity} ({chosen.below_min} identities); relax '
        'them')
  entries = list(chosen.entries)
  random.Random(seed).shuffle(entries)
  points = _landmarks(landmarks, listing) if landmarks else {}
  jobs = [preprocess.Job(e.path, e.offset,
                         points.get(_landmark_key(e, listing)))
          for e in entries]
  count = min(num_shards or max(1, round(len(jobs) / IMAGES_PER_SHARD)),
              len(jobs))
  prep = preprocess.Options(image_size, fit, bool(landmarks), JPEG_QUALITY,
                            finder)

  created = not os.path.exists(out)
  os.makedirs(out, exist_ok=True)
  partials = shards.PartialShards(out, count)
  try:
    loop_start = time.perf_counter()
    skipped, found = _write_partials(partials, entries, jobs, prep,
                                     chosen.names, options['workers'],
                                     listing, progress)
    loop_s = time.perf_counter() - loop_start
    valid = sum(partials.label_counts, collections.Counter())
    kept = survivors(len(chosen.names), valid, min_images_per_identity)
    if not kept:
      raise DataPrepError(_nothing_valid(src, skipped))
    final = [chosen.names[label] for label in kept]
    relabel = {label: i for i, label in enumerate(kept)}
    _remove_previous(out, keep=partials.paths)
    shard_names, lengths = shards.finalize(partials, out, relabel)
  except BaseException:
    partials.remove()
    if created and not os.listdir(out):
      os.rmdir(out)
    raise
  shards.write_metadata(out, image_size, final, shard_names, lengths)

  report = {
      'source': os.path.abspath(src),
      'source_format': listing.format,
      'rec_layout': listing.layout,
      'num_examples': sum(lengths),
      'num_classes': len(final),
      'image_size': image_size,
      'shards': shard_names,
      'shard_lengths': lengths,
      # The trainer compares these with the shards at start: TensorFlow
      # reads a shard cut at a record's end without a word.
      'shard_bytes': [os.path.getsize(os.path.join(out, name))
                      for name in shard_names],
      'num_listed': len(listing.entries) + len(listing.skipped),
      'num_skipped': len(skipped),
      'skipped_by_reason': dict(collections.Counter(
          s['reason'] for s in skipped)),
      'skipped': skipped,
      'num_excluded_identities': chosen.excluded,
      'exclude_names_not_in_source': chosen.not_in_source,
      'num_identities_below_min': (chosen.below_min + len(chosen.names)
                                   - len(final)),
      'options': options,
      'elapsed_s': round(time.perf_counter() - start, 3),  # imports included
      # Decoded, preprocessed, encoded and written per second:
      'images_per_s': round(len(jobs) / loop_s, 1),
  }
  if save_landmarks:
    report['num_landmarks_saved'] = preprocess.write_landmarks(
        save_landmarks, found)
  jsonfile.write_object(os.path.join(out, 'label_map.json'), final)
  jsonfile.write_object(os.path.join(out, 'report.json'), report)
  print(_summary(report, out), file=sys.stderr)
  return report


def _write_partials(partials, entries, jobs, prep, names, workers, listing,
                    progress) -> tuple[list[dict], dict]:
  """Every job's image into its shard (contiguous runs of the shuffled
  order) under its provisional label; returns the skipped ones, and the
  landmarks each aligned image was aligned on by its key (the names
  --landmarks reads)."""
  label_of = {name: i for i, name in enumerate(names)}
  key_field = 'key' if listing.format == 'rec' else 'path'
  skipped, found = list(listing.skipped), {}
  results = preprocess.prepare_faces(jobs, prep, workers)
  bar = tqdm(results, total=len(jobs), desc='data_prep train', unit='img',
             file=sys.stderr, disable=not progress, mininterval=0.5)
  count = len(partials.paths)
  for i, (result, entry) in enumerate(zip(bar, entries)):
    if isinstance(result, preprocess.Skip):
      skipped.append({key_field: entry.key, 'reason': result.reason,
                      'detail': result.detail})
    else:
      partials.write(i * count // len(jobs), result.jpeg,
                     label_of[entry.identity])
      if result.landmarks is not None:
        found[entry.key] = result.landmarks
  partials.close()
  return skipped, found


def _check_options(options: dict, out: str, overwrite: bool
                   ) -> detection.FaceFinder | None:
  """Every option checked before any work; returns --detect's detector."""
  _check_values(options)
  _check_out(out, overwrite)
  if options['save_landmarks']:
    preprocess.check_landmarks_out(
        options['save_landmarks'], overwrite=overwrite, out=out,
        aligning=bool(options['detect'] or options['landmarks']))
  if not options['detect']:
    return None
  return preprocess.face_finder(options['min_face_score'], options['workers'])


def _check_values(options: dict) -> None:
  if options['image_size'] < 8:
    raise DataPrepError(f'--image-size {options["image_size"]} is too small; '
                        'faces are usually 112')
  if options['fit'] not in images.FITS:
    raise DataPrepError(f'fit {options["fit"]!r} is not one of '
                        f'{images.FITS}')
  for flag, key in (('--min-images-per-identity', 'min_images_per_identity'),
                    ('--shards', 'shards'), ('--workers', 'workers')):
    if options[key] is not None and options[key] < 1:
      raise DataPrepError(f'{flag} must be at least 1, got {options[key]}')
  for flag, key in (('--landmarks', 'landmarks'),
                    ('--exclude-identities', 'exclude_identities')):
    if options[key] is not None and not os.path.isfile(options[key]):
      raise DataPrepError(f'{flag} file {options[key]!r} does not exist')


def _check_out(out: str, overwrite: bool) -> None:
  if os.path.exists(out) and not os.path.isdir(out):
    raise DataPrepError(f'OUT {out!r} is a file; pass a directory to write '
                        'the shards into')
  if os.path.isdir(out) and os.listdir(out) and not overwrite:
    raise DataPrepError(f'OUT {out!r} exists and is not empty; pass '
                        '--overwrite to replace it (only files a conversion '
                        'writes are removed) or choose another OUT')


def _remove_previous(out: str, keep: list[str]) -> None:
  """An earlier conversion's files (with --overwrite), so that tfds does not
  pick up its shards."""
  keep = {os.path.basename(p) for p in keep}
  for name in os.listdir(out):
    if shards.is_ours(name) and name not in keep:
      os.remove(os.path.join(out, name))


def _read_names(path: str) -> set[str]:
  """The --exclude-identities file: one name a line, UTF-8."""
  try:
    return {line.strip() for _, line in textfile.text_lines(path)
            if line.strip() and not line.strip().startswith('#')}
  except ValueError as e:  # not UTF-8, a NUL, an endless line
    raise DataPrepError(str(e)) from None


def _landmark_key(entry: sources.Entry, listing: sources.Listing) -> str:
  return entry.key if listing.format == 'rec' else os.path.normpath(entry.path)


def _landmarks(path: str, listing: sources.Listing) -> dict:
  """{_landmark_key: points}: file names in the landmarks file are relative
  to the source's folder (or absolute), records are named by key."""
  try:
    raw = alignment.read_landmarks(path)
  except ValueError as e:
    raise DataPrepError(str(e)) from None
  if listing.format == 'rec':
    return raw
  return {os.path.normpath(os.path.join(listing.base, k)): v
          for k, v in raw.items()}


def _nothing_valid(src: str, skipped: list[dict]) -> str:
  reasons = collections.Counter(s['reason'] for s in skipped)
  summary = ', '.join(f'{n} {r}' for r, n in reasons.most_common())
  example = skipped[0] if skipped else None
  return (f'no valid image in {src!r} ({summary or "nothing listed"}'
          f'{"; e.g. " + json.dumps(example) if example else ""}); check '
          'that SRC is root/<identity>/<image>, a "path label" list or a '
          '.rec, and that its images decode')


def _summary(report: dict, out: str) -> str:
  lines = [f'data_prep: wrote {report["num_examples"]} images of '
           f'{report["num_classes"]} identities to {out} in '
           f'{len(report["shards"])} shard(s), {report["elapsed_s"]} s '
           f'({report["images_per_s"]} images/s)']
  if report['skipped']:
    reasons = ', '.join(f'{n} {r}' for r, n in
                        sorted(report['skipped_by_reason'].items()))
    lines.append(f'data_prep: skipped {report["num_skipped"]} ({reasons}); '
                 'each is listed in report.json, e.g.:')
    for s in report['skipped'][:5]:
      name = s.get('path', s.get('key'))
      lines.append(f'  {name}: {s["reason"]} ({s.get("detail", "")})')
  if 'num_landmarks_saved' in report:
    lines.append(f'data_prep: wrote the landmarks of '
                 f'{report["num_landmarks_saved"]} aligned images to '
                 f'{report["options"]["save_landmarks"]}')
  return '\n'.join(lines)
