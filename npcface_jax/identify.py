"""``python -m npcface_jax.identify --workdir=DIR --gallery=FOLDER p.jpg
[...]``: who is this? Each probe photo's top-k enrolled people with scores,
and the answer: the best match, or 'unknown' when its score is not above
the threshold.

The gallery is FOLDER/<person>/<photos, any depth>. A person's template is
the L2-normalised mean of their photos' embeddings (as IJB templates are
pooled); a probe scores the cosine to each template. --quality=norm
weights each photo by its raw embedding norm instead (the template is the
normalised sum of the photos' raw embeddings, as MagFace pools a
template): a blurred or half-hidden face counts less, for heads that train
the norm to say so (MagFace, AdaFace); for other heads it is a weighting
by a number that means little.

The threshold is the open-set one for the gallery's size (--fpir): a probe
of someone not enrolled is named when any of the N templates clears it, so
the 1:1 pairs threshold names strangers about N times as often as it
accepts an impostor pair. It is read off the ROC of the run's evaluation
(eval/step_N/results.json) at pair FAR = FPIR / N
(trained_run.gallery_threshold). --threshold, or --far (a pair FAR, as
verify takes it, not scaled), set it instead. The ROC was measured on image
pairs; a template, the mean of several photos, is less noisy than one
photo, so it is a conservative bar for the gallery's people.

Gallery embeddings are cached in DIR/galleries/ per gallery folder, step
and reading settings, each photo keyed by its path, size and modification
time: a rerun embeds only photos added or changed since, and forgets
removed ones. The cache keeps each photo's raw norm beside its embedding
(format CACHE_FORMAT); a cache of another format, e.g. one written before
the norms were kept, is not read: the gallery is embedded afresh once,
saying so, and cached anew.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import sys

import numpy as np

from npcface_jax.common import jsonfile, run_log
from npcface_jax.faces import detection, images
from npcface_jax.serving import trained_run

QUALITY = ('none', 'norm')  # how a person's photos are weighted
CACHE_FORMAT = 2  # 1: no format field and no norms (before quality)


def _stamp(path: str) -> tuple[int, int]:
  try:
    info = os.stat(path)
  except OSError:
    return (-1, -1)  # read (and reported) as a bad image
  return (info.st_size, info.st_mtime_ns)


def cache_path(model: trained_run.Model, gallery: str, aligned: bool,
               min_score: float) -> str:
  """Where this gallery's embeddings are cached for this model and
  reading: one file per (folder, step, flip, image reading)."""
  key = json.dumps([os.path.abspath(gallery), model.step, model.flip,
                    aligned, None if aligned else min_score,
                    model.image_size])
  digest = hashlib.sha256(key.encode()).hexdigest()[:16]
  name = os.path.basename(os.path.abspath(gallery)) or 'gallery'
  return os.path.join(model.workdir, 'galleries', f'{name}-{digest}.npz')


def _load_cache(path: str) -> dict:
  """{relative path: (stamp, embedding or reason, raw norm or None)}; {}
  when there is no cache, it cannot be read, or it is of another format
  than CACHE_FORMAT (it is then rebuilt, with a warning)."""
  if not os.path.exists(path):
    return {}
  try:
    with np.load(path, allow_pickle=False) as z:
      found = int(z['format']) if 'format' in z.files else 1
      if found != CACHE_FORMAT:
        logging.warning(
            '%s is a gallery cache of format %d%s, not %d: the gallery is '
            'embedded afresh and cached anew', path, found,
            ' (written before it kept the embeddings\' norms)'
            * (found == 1), CACHE_FORMAT)
        return {}
      files, stamps = z['files'].tolist(), z['stamps'].tolist()
      rows, reasons, embeddings = z['rows'], z['reasons'], z['embeddings']
      norms = z['norms']
      if norms.shape != embeddings.shape[:1]:
        raise ValueError(f'{len(norms)} norms for {len(embeddings)} '
                         'embeddings')
      entries = {}
      for i, (f, s, r) in enumerate(zip(files, stamps, rows)):
        entries[f] = ((tuple(s), embeddings[r], float(norms[r])) if r >= 0
                      else (tuple(s), str(reasons[i]), None))
      return entries
  except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
    logging.warning('%s cannot be read (%s); the gallery is embedded afresh',
                    path, e)
    return {}


def _save_cache(path: str, entries: dict, dim: int) -> None:
  files = sorted(entries)
  good = [f for f in files if not isinstance(entries[f][1], str)]
  row = {f: i for i, f in enumerate(good)}
  buffer = io.BytesIO()
  np.savez(buffer, format=np.int64(CACHE_FORMAT),
           files=np.array(files, dtype=str),
           stamps=np.array([entries[f][0] for f in files],
                           np.int64).reshape(-1, 2),
           rows=np.array([row.get(f, -1) for f in files], np.int64),
           reasons=np.array([entries[f][1] if f not in row else ''
                             for f in files], dtype=str),
           embeddings=np.array([entries[f][1] for f in good],
                               np.float32).reshape(-1, dim),
           norms=np.array([entries[f][2] for f in good], np.float32))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  jsonfile.atomic_write(path, buffer.getvalue())


def enroll(model: trained_run.Model, gallery: str, *, aligned: bool = False,
           min_score: float = detection.MIN_SCORE, progress: bool = True,
           quality: str = 'none') -> dict:
  """{'names', 'templates' (P, D), 'images' per person, 'skipped',
  'embedded' (photos embedded now; the rest came from the cache),
  'quality'}; quality (QUALITY) as templates pools them."""
  if quality not in QUALITY:
    raise ValueError(f'--quality={quality!r}: choose from '
                     f'{", ".join(QUALITY)}')
  found, listing_skipped = images.identity_files(gallery)
  root = os.path.abspath(gallery)
  rel = [os.path.relpath(p, root) for p, _ in found]
  stamps = [_stamp(p) for p, _ in found]
  path = cache_path(model, gallery, aligned, min_score)
  cached = _load_cache(path)
  todo = [i for i, f in enumerate(rel) if cached.get(f, (None,))[0]
          != stamps[i]]
  got = trained_run.embed_images(model, [rel[i] for i in todo], root=root,
                               aligned=aligned, min_score=min_score,
                               progress=progress, what='gallery',
                               with_norms=True)
  entries = {f: cached[f] for f in rel if f in cached}
  for r, j in enumerate(got.kept):
    entries[rel[todo[j]]] = (stamps[todo[j]], got.embeddings[r],
                             float(got.norms[r]))
  for s in got.skipped:
    entries[rel[todo[s.index]]] = (stamps[todo[s.index]], s.reason, None)
  if todo or set(cached) != set(entries):
    try:
      _save_cache(path, entries, model.config.embedding_dim)
    except OSError as e:  # a read-only run directory: no cache, no failure
      logging.warning('cannot cache the gallery at %s (%s); it is embedded '
                      'again next time', path, e)
  return _templates(found, rel, entries, listing_skipped, len(todo),
                    quality)


def person_templates(people: list, norms: list | None = None) -> np.ndarray:
  """float32 (P, D) unit templates, one per person, from each person's
  photos' unit embeddings (a (K, D) array or list of rows): their mean,
  L2-normalised; with ``norms`` (each person's (K,) raw norms), each
  photo weighted by its raw norm, the normalised sum of the raw
  embeddings (quality 'norm'); a weighted sum of zero stays zero (it
  scores 0 against every probe)."""
  if norms is None:
    means = np.stack([np.mean(p, axis=0) for p in people])
    return (means / np.linalg.norm(means, axis=1, keepdims=True)).astype(
        np.float32)
  sums = np.stack([np.sum(np.asarray(w, np.float32)[:, None]
                          * np.asarray(p, np.float32), axis=0)
                   for p, w in zip(people, norms)])
  length = np.linalg.norm(sums, axis=1, keepdims=True)
  return (sums / np.where(length > 0, length, 1)).astype(np.float32)


def _templates(found, rel, entries, listing_skipped, embedded,
               quality='none') -> dict:
  people: dict[str, list[tuple]] = {}
  skipped = [{'name': k, 'reason': r} for k, r in listing_skipped]
  for (_, person), f in zip(found, rel):
    _, value, norm = entries[f]
    if isinstance(value, str):
      skipped.append({'name': f, 'reason': value})
    else:
      people.setdefault(person, []).append((value, norm))
  names = sorted(people)
  if not names:
    raise ValueError('no photo of the gallery could be enrolled: '
                     + '; '.join(f"{s['name']}: {s['reason']}"
                                 for s in skipped[:3]))
  vectors = [[v for v, _ in people[n]] for n in names]
  norms = [[w for _, w in people[n]] for n in names]
  pooled = person_templates(vectors, norms if quality == 'norm' else None)
  return {'names': names, 'templates': pooled,
          'images': {n: len(people[n]) for n in names},
          'skipped': skipped, 'embedded': embedded, 'quality': quality}


def identify(model: trained_run.Model, threshold: trained_run.Threshold,
             gallery: dict, probes: list[str], *, top_k: int = 5,
             aligned: bool = False, min_score: float = detection.MIN_SCORE,
             progress: bool = True) -> dict:
  """Each probe's top_k people and the answer ('unknown' at or below the
  threshold)."""
  got = trained_run.embed_images(model, probes, aligned=aligned,
                               min_score=min_score, progress=progress,
                               what='probes')
  found = answers(got.embeddings @ gallery['templates'].T, gallery['names'],
                  threshold.value, top_k)
  return {'workdir': os.path.abspath(model.workdir), 'step': model.step,
          'flip': model.flip, 'threshold': threshold.value,
          'threshold_source': threshold.source,
          'threshold_warning': threshold.warning,
          'calibration': threshold.calibration,
          'probes': [{'probe': probes[i], **a}
                     for i, a in zip(got.kept, found)],
          'skipped': [{'name': s.name, 'reason': s.reason}
                      for s in got.skipped],
          'gallery': {k: gallery.get(k) for k in (
              'names', 'images', 'skipped', 'embedded', 'quality')}}


def answers(scores: np.ndarray, names: list[str], threshold: float,
            top_k: int = 5) -> list[dict]:
  """Per row of scores (probes x templates): its top_k people and the
  answer, the best one if its score is above the threshold, else
  'unknown'."""
  k = min(top_k, len(names))
  out = []
  for row in scores:
    order = np.argsort(-row, kind='stable')[:k]
    top = [{'name': names[j], 'score': float(row[j])} for j in order]
    out.append({'top': top, 'answer': top[0]['name'] if top[0]['score']
                > threshold else 'unknown'})
  return out


def format_result(result: dict) -> str:
  g = result['gallery']
  lines = [f"gallery: {len(g['names'])} people, "
           f"{sum(g['images'].values())} photos ({g['embedded']} read "
           f"now, the rest cached), {len(g['skipped'])} skipped"
           + (', photos weighted by raw norm (--quality=norm)'
              if g.get('quality') == 'norm' else ''),
           f"threshold {result['threshold']:.4f}: "
           f"{result['threshold_source']}"]
  if result.get('threshold_warning'):
    lines.append(f"warning: {result['threshold_warning']}")
  for p in result['probes']:
    top = ', '.join(f"{t['name']} {t['score']:.3f}" for t in p['top'])
    lines.append(f"{p['probe']}: {p['answer']}  ({top})")
  lines += [f"skipped {s['name']}: {s['reason']}" for s in result['skipped']]
  return '\n'.join(lines)


def main(argv):
  from absl import app, flags  # noqa: PLC0415 (the command only)
  f = flags.FLAGS
  run_log.quiet_third_party(f.verbose)
  try:
    if len(argv) < 2:
      raise ValueError('give one probe photo or more')
    if f.top_k < 1:
      raise ValueError(f'--top_k must be at least 1, got {f.top_k}')
    model, threshold, roc = _model_and_threshold(f)
    gallery = enroll(model, f.gallery, aligned=f.aligned,
                     min_score=f.min_face_score, progress=not f.json,
                     quality=f.quality)
    if roc is not None:
      threshold = trained_run.gallery_threshold(roc, f.fpir,
                                              len(gallery['names']))
    if threshold.warning and f.json:  # else among the printed lines
      logging.warning('%s', threshold.warning)
    result = identify(model, threshold, gallery, argv[1:], top_k=f.top_k,
                      aligned=f.aligned, min_score=f.min_face_score,
                      progress=not f.json)
  except (ValueError, FileNotFoundError, detection.MissingExtra) as e:
    raise app.UsageError(str(e)) from None
  print(json.dumps(result, indent=1) if f.json else format_result(result))
  if not result['probes']:
    sys.exit(1)


def _model_and_threshold(f):
  """(model, threshold, None) when --threshold or --far sets it, as for
  verify; else (model, None, the ROC the threshold is read from once the
  gallery's size is known), the model embedding as that ROC's results
  did unless --flip says otherwise."""
  if not 0 < f.fpir < 1:
    raise ValueError(f'--fpir must lie in (0, 1), got {f.fpir}')
  if f.threshold is not None or f.far is not None:
    if f['fpir'].present:
      raise ValueError('--fpir sets the threshold for the gallery; give it '
                       'or --threshold or --far, not both')
    return (*trained_run.model_and_threshold(f), None)
  model = trained_run.open_model(f.workdir, f.step, bool(f.flip), f.batch_size)
  roc = trained_run.stored_roc(f.workdir, model.step, target=f.target,
                             flip=f.flip)
  return model.with_flip(roc.flip), None, roc


def _define_flags():
  from absl import flags  # noqa: PLC0415
  trained_run.define_flags(threshold=True)
  flags.DEFINE_float('fpir', 0.01, 'The false-positive identification rate '
                     'to allow: the share of probes of people not enrolled '
                     'that may be given a name. The threshold is the ROC\'s '
                     'at pair FAR = FPIR / (people enrolled), from the run\'s '
                     'evaluation (--target names the set).')
  flags.DEFINE_string('gallery', None, 'A folder of enrolled people: '
                      'FOLDER/<person>/<photos>.')
  flags.DEFINE_integer('top_k', 5, 'How many people to list per probe.')
  flags.DEFINE_enum('quality', 'none', QUALITY, 'How a person\'s photos make '
                    'their template: none, their unit embeddings\' mean; '
                    'norm, each weighted by its raw embedding norm (as '
                    'MagFace pools; a quality only for heads that train it: '
                    'MagFace, AdaFace).')
  flags.DEFINE_bool('json', False, 'Print one JSON object.')
  flags.mark_flags_as_required(['gallery'])


if __name__ == '__main__':
  from absl import app
  _define_flags()
  app.run(main)
