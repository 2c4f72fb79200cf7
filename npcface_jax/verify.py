"""``python -m npcface_jax.verify --workdir=DIR a.jpg b.jpg [c.jpg ...]``:
are these the same person? The first photo is compared with each of the
others (or every pair of a ``--pairs`` file): cosine similarity of their
embeddings and the decision at a threshold from the run's own evaluation
(trained_run.find_threshold), saying which. ``--json`` prints one object.
"""

from __future__ import annotations

import json
import os
import sys

from npcface_jax.common import run_log, textfile
from npcface_jax.faces import detection
from npcface_jax.serving import trained_run


def read_pairs(path: str, images: str | None = None
               ) -> tuple[list[tuple[str, str, bool | None]], str]:
  """([(path 1, path 2, same or None)], root) of a pairs file: "path1
  path2" or "path1 path2 same" (same 1 or 0) lines, paths relative to
  ``images`` (default: the file's folder), as data_prep pairs reads them;
  ValueError naming the line of anything else."""
  pairs = []
  for n, line in textfile.text_lines(path):
    fields = line.split()
    if not fields or fields[0].startswith('#'):
      continue
    if len(fields) == 2 or (len(fields) == 3 and fields[2] in ('0', '1')):
      pairs.append((fields[0], fields[1],
                    None if len(fields) == 2 else fields[2] == '1'))
    else:
      raise ValueError(f'{path}, line {n}: {textfile.shown(line.strip())} is '
                       'not a pair; expected "path1 path2" or "path1 path2 '
                       'same" (same 1 or 0), paths without spaces')
  if not pairs:
    raise ValueError(f'{path} holds no pairs')
  if images is not None and not os.path.isdir(images):
    raise ValueError(f'--images {images} is not a folder')
  return pairs, os.path.abspath(images or os.path.dirname(
      os.path.abspath(path)))


def verify(model: trained_run.Model, threshold: trained_run.Threshold,
           pairs: list[tuple[str, str, bool | None]], root: str | None = None,
           *, aligned: bool = False, min_score: float = 0.9,
           progress: bool = True) -> dict:
  """Scores each pair: {'pairs': [{a, b, cosine, same[, label]}], 'skipped':
  [{name, reason}], 'threshold', 'accuracy' (pairs with a label), ...}. A
  pair with an unreadable photo, or one without a face, is skipped."""
  names = sorted({p for a, b, _ in pairs for p in (a, b)})
  got = trained_run.embed_images(model, names, aligned=aligned, root=root,
                                 min_score=min_score, progress=progress,
                                 what='verify')
  row = {names[i]: r for r, i in enumerate(got.kept)}
  scored, labelled = [], []
  for a, b, label in pairs:
    if a in row and b in row:
      cosine = float(got.embeddings[row[a]] @ got.embeddings[row[b]])
      entry = {'a': a, 'b': b, 'cosine': cosine,
               'same': cosine > threshold.value}
      if label is not None:
        entry['label'] = label
        labelled.append(entry['same'] == label)
      scored.append(entry)
  out = {'workdir': os.path.abspath(model.workdir), 'step': model.step,
         'flip': model.flip, 'aligned': aligned,
         'threshold': threshold.value, 'threshold_source': threshold.source,
         'pairs': scored, 'skipped': [
             {'name': s.name, 'reason': s.reason} for s in got.skipped]}
  if labelled:
    out['accuracy'] = sum(labelled) / len(labelled)
  return out


def format_result(result: dict) -> str:
  lines = [f"threshold {result['threshold']:.4f}: "
           f"{result['threshold_source']}"]
  width = max([len(p['a']) for p in result['pairs']] + [1])
  for p in result['pairs']:
    verdict = 'same' if p['same'] else 'different'
    mark = ('' if 'label' not in p else
            '  (right)' if p['same'] == p['label'] else '  (WRONG)')
    lines.append(f"{p['a']:<{width}}  {p['b']}  cosine {p['cosine']:.4f}  "
                 f'{verdict}{mark}')
  for s in result['skipped']:
    lines.append(f"skipped {s['name']}: {s['reason']}")
  if 'accuracy' in result:
    lines.append(f"accuracy {100 * result['accuracy']:.2f}% over the "
                 f"{sum('label' in p for p in result['pairs'])} labelled "
                 'pairs')
  return '\n'.join(lines)


def main(argv):
  from absl import app, flags  # noqa: PLC0415 (the command only)
  f = flags.FLAGS
  run_log.quiet_third_party(f.verbose)
  photos = argv[1:]
  try:
    if f.pairs:
      if photos:
        raise ValueError('give photos or --pairs, not both')
      pairs, root = read_pairs(f.pairs, f.images)
    elif len(photos) >= 2:
      pairs, root = [(photos[0], p, None) for p in photos[1:]], None
    else:
      raise ValueError('give two photos or more (the first is compared with '
                       'each of the others), or --pairs=FILE')
    model, threshold = trained_run.model_and_threshold(f)
    result = verify(model, threshold, pairs, root, aligned=f.aligned,
                    min_score=f.min_face_score, progress=not f.json)
  except (ValueError, FileNotFoundError, detection.MissingExtra) as e:
    raise app.UsageError(str(e)) from None
  print(json.dumps(result, indent=1) if f.json else format_result(result))
  if not result['pairs']:
    sys.exit(1)


def _define_flags():
  from absl import flags  # noqa: PLC0415
  trained_run.define_flags(threshold=True)
  flags.DEFINE_string('pairs', None, 'A file of "path1 path2 [same]" lines '
                      'to score instead of photos (the format data_prep '
                      'pairs reads).')
  flags.DEFINE_string('images', None, 'The folder the --pairs paths are '
                      "relative to (default: the pairs file's folder).")
  flags.DEFINE_bool('json', False, 'Print one JSON object.')


if __name__ == '__main__':
  from absl import app
  _define_flags()
  app.run(main)
