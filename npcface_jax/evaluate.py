"""``python -m npcface_jax.evaluate --workdir=DIR --targets=a.bin,...``:
evaluates a trained run.

Opens the run as the serving side does (serving/trained_run.py: the
backbone restored, its classifier and optimizer state never read), embeds
each benchmark (insightface .bin pair sets, IJB-B/C release folders,
MegaFace-style probe and distractor folders, the run's own pair sets),
runs the protocols of evaluation/ (protocols.py, ijb.py, ranking.py),
prints a table and writes DIR/eval/step_N[_flip]/results.json with ROC
curves as PNG.

Face quality from the feature norm (heads that train the backbone's raw
embedding norm to be one: MagFace, AdaFace): every pair set also reports
its accuracy on the tenth of pairs of lowest quality ('low_quality'; a
pair's quality is the smaller raw norm of its two faces), and
--quality=norm weights each IJB image by its raw norm when pooling
templates. The measurement is made for any run; for other heads the norm
is not trained to mean anything, and neither is that tenth.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, NamedTuple

import numpy as np

from npcface_jax.common import jsonfile, run_log
from npcface_jax.evaluation import (bin_format, embedding_step,
                                    ijb as ijb_lib, protocols, ranking,
                                    run_sets)
from npcface_jax.faces import detection
from npcface_jax.serving import trained_run
from npcface_jax.faces.images import ImageBatches, identity_files, image_files

# --- Evaluating a trained run: python -m npcface_jax.evaluate ----------------

QUALITY = ('none', 'norm')  # --quality: how IJB templates weight images
LOW_QUALITY_FRACTION = 0.1  # the share of pairs low_quality reports on


def _summary_row(name: str, result: dict) -> list[str]:
  tars = {f"{t['far']:.0e}": t['tar'] for t in result.get('tar_at_far', [])}
  pct = lambda x: '-' if x is None else f'{100 * x:.2f}'  # noqa: E731
  acc = '-'
  if 'accuracy' in result:
    acc = (f"{100 * result['accuracy']:.2f} +- "
           f"{100 * result['accuracy_std']:.2f}")
  return [name, str(result.get('num_pairs', '-')), acc,
          '-' if 'auc' not in result else f"{result['auc']:.4f}",
          *(pct(tars.get(f)) for f in ('1e-03', '1e-04', '1e-05', '1e-06')),
          pct(result.get('rank1'))]


def format_table(results: dict) -> str:
  """One line per target: pairs, k-fold accuracy (%), AUC, TAR (%) at FAR
  1e-3..1e-6 ('-' where the set cannot measure it), rank-1 (%); then a
  line of each pair set's folds (protocols.fold_note): the file's layout
  chooses them, and they change what its accuracy means."""
  rows = [['target', 'pairs', 'accuracy %', 'AUC', 'TAR@1e-3', 'TAR@1e-4',
           'TAR@1e-5', 'TAR@1e-6', 'rank-1']]
  rows += [_summary_row(n, r) for n, r in results.items()]
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  lines = ['  '.join(c.ljust(w) if i == 0 else c.rjust(w)
                     for i, (c, w) in enumerate(zip(r, widths)))
           for r in rows]
  notes = [f'{n} {protocols.fold_note(r)}' for n, r in results.items()
           if protocols.fold_note(r)]
  if notes:
    lines.append('accuracy folds: ' + '; '.join(notes))
  low = [f'{n} {_low_quality_note(r["low_quality"])}'
         for n, r in results.items() if _low_quality_note(
             r.get('low_quality'))]
  if low:
    lines.append('lowest-quality tenth (pair quality: the smaller raw '
                 'embedding norm; a quality only for heads that train it, '
                 'MagFace, AdaFace), at the whole set\'s fold thresholds: '
                 + '; '.join(low))
  return '\n'.join(lines)


def _low_quality_note(low) -> str | None:
  """'97.10% of 600 pairs, norm 3.1-21.3', or None for results without
  it (older ones, other kinds of set)."""
  if not isinstance(low, dict):
    return None
  try:
    return (f"{100 * low['accuracy']:.2f}% of {int(low['pairs'])} pairs, "
            f"norm {low['norm_min']:.4g}-{low['norm_max']:.4g}")
  except (KeyError, TypeError, ValueError):
    return None


def _target_name(path: str, taken) -> str:
  name = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
  base, n = name, 2
  while name in taken:
    name, n = f'{base}_{n}', n + 1
  return name


def _roc(result: dict, out_dir: str, name: str, scores, labels,
         title: str) -> None:
  """The ROC, computed once: drawn as roc_<name>.png and kept as points
  (result's 'roc' and 'roc_curve')."""
  from npcface_jax.evaluation import roc_plot  # noqa: PLC0415 (Pillow)
  curve = protocols.roc_curve(scores, labels)
  roc_plot.save_roc_png(os.path.join(out_dir, f'roc_{name}.png'),
                        {name: curve[:2]}, title)
  result['roc'] = f'roc_{name}.png'
  result['roc_curve'] = protocols.thin_roc(*curve)


def _earlier_targets(results_path: str) -> dict:
  """The targets of this checkpoint evaluated before (results.json), which
  stay in the record. A file that is not such a record is moved aside to
  results.json.corrupt-<time>, with a warning naming both paths, rather
  than lost or fatal; the record starts afresh."""
  if not os.path.exists(results_path):
    return {}
  try:
    targets = jsonfile.read_object(results_path).get('targets')
    if not isinstance(targets, dict):
      raise ValueError(f'{results_path} has no "targets" object')
    for name, result in targets.items():
      try:
        _summary_row(name, result)
      except (AttributeError, KeyError, TypeError, ValueError):
        raise ValueError(f'{results_path}: target {name!r:.80} is not a '
                         'result') from None
    return targets
  except ValueError as e:
    stamp = time.strftime('%Y%m%d-%H%M%S')
    aside, n = f'{results_path}.corrupt-{stamp}', 1
    while os.path.exists(aside):
      n += 1
      aside = f'{results_path}.corrupt-{stamp}-{n}'
    os.replace(results_path, aside)
    logging.warning('%s: moved it to %s (nothing is lost) and started a '
                    'fresh record at %s', e, aside, results_path)
    return {}


class _Run(NamedTuple):
  """What every target of one evaluation shares: the serving side's model
  as it is, and where this evaluation writes."""
  model: trained_run.Model
  out_dir: str
  export_features: bool
  detector: Any  # detection.FaceFinder for folders of photos, or None
  quality: str = 'none'  # QUALITY: how IJB templates weight their images

  @property
  def batch(self) -> int:
    """Images read per host batch."""
    return self.model.embedder.batch_size * 8

  def embed_batches(self, batches, with_norms: bool = False):
    return embedding_step.embed_batches(self.model.embedder,
                                        self.model.variables, batches,
                                        with_norms)

  def save_features(self, name: str, **arrays) -> None:
    if self.export_features:
      os.makedirs(os.path.join(self.out_dir, 'features'), exist_ok=True)
      for key, value in arrays.items():
        np.save(os.path.join(self.out_dir, 'features', f'{name}{key}.npy'),
                value)


def _pairs(run: _Run, path: str, name: str, log) -> dict:
  """An insightface .bin pair set: 10-fold accuracy, ROC, TAR at FAR."""
  pairs = bin_format.load_pairs(path, run.model.image_size)
  return _pair_set(run, name, pairs.images, pairs.issame, log, {
      'path': os.path.abspath(path), 'skipped_pairs': pairs.skipped})


def low_quality(scores, issame, norms, folds: protocols.Folds,
                fold_thresholds) -> dict:
  """results.json's 'low_quality' of a pair set: the accuracy of the tenth
  of pairs whose quality, the smaller raw embedding norm of the two faces
  (norms: one per image, rows 2k and 2k + 1 a pair), is lowest, each pair
  at the threshold of its fold in the whole set's protocol
  (protocols.lowest_quality_accuracy); with their count, genuine pairs
  among them and norm range."""
  got = protocols.lowest_quality_accuracy(
      scores, issame, protocols.pair_quality(norms), folds, fold_thresholds,
      LOW_QUALITY_FRACTION)
  return {'accuracy': got['accuracy'], 'pairs': got['pairs'],
          'genuine': got['genuine'], 'norm_min': got['quality_min'],
          'norm_max': got['quality_max'], 'fraction': LOW_QUALITY_FRACTION,
          'pair_quality': 'the smaller raw embedding norm of the two faces',
          'threshold_rule': "each pair at its fold's threshold in the whole "
                            "set's k-fold protocol"}


def _pair_set(run: _Run, name: str, images, issame, log, about) -> dict:
  """Pairs of images (rows 2k, 2k + 1): k-fold accuracy on the folds the
  labels' layout gives (protocols.fold_assignment; the rule kept as
  'fold_rule' and 'num_folds'), ROC (drawn and kept as points for later
  comparison), TAR at FAR, and the accuracy of the lowest-quality tenth
  of pairs (low_quality)."""
  features, norms = run.model.embed(images, with_norms=True)
  scores = protocols.pair_similarities(features)
  folds = protocols.fold_assignment(issame)
  result = protocols.verification_report(scores, issame, folds=folds)
  result['low_quality'] = low_quality(scores, issame, norms, folds,
                                      result['fold_thresholds'])
  result.update(kind='pairs', num_pairs=len(issame), **about)
  _roc(result, run.out_dir, name, scores, issame,
       f'{name}: ROC, step {run.model.step}')
  run.save_features(name, **{'': features, '_norms': norms})
  skipped = about.get('skipped_pairs', ())
  log('%s: %.2f%% +- %.2f over %d pairs, %s; lowest-quality tenth %.2f%%%s',
      name, 100 * result['accuracy'], 100 * result['accuracy_std'],
      len(issame), protocols.fold_note(result),
      100 * result['low_quality']['accuracy'],
      f' ({len(skipped)} left out: an image does not decode)' * bool(skipped))
  return result


def _run_sets(run: _Run, done: dict, log) -> None:
  """The pair sets the run verified on while training (evaluation/run_sets.py):
  its config's .bin targets and, on synthetic data, held-out identities."""
  for name, (images, issame) in run_sets.verification_sets(
      run.model.config, run.model.image_size).items():
    name = _target_name(name, done)
    done[name] = _pair_set(run, name, images, np.asarray(issame), log,
                           {'source': "the run's config"})


def _ijb(run: _Run, root: str, meta, name: str, face_scores: bool,
         log) -> dict:
  """An IJB-B/C release: template-to-template 1:1 verification; images
  weighted by detector score (face_scores) and by raw norm (quality
  'norm'), by both: their product (ijb.template_features)."""
  images = ijb_lib.aligned_batches(root, meta, run.model.image_size, run.batch)
  norms, arrays = None, {}
  if run.quality == 'norm':
    features, norms = run.embed_batches(images, with_norms=True)
    arrays['_norms'] = norms
  else:
    features = run.embed_batches(images)
  result = ijb_lib.evaluate(features, meta, use_face_scores=face_scores,
                            skipped=images.skipped, norms=norms)
  scores, labels = result.pop('scores'), result.pop('labels')
  result.update(kind='ijb', path=os.path.abspath(root),
                face_scores=face_scores, quality=run.quality,
                skipped_images=[
                    f'{s.name}: {s.reason}' for s in images.skipped])
  _roc(result, run.out_dir, name, scores, labels,
       f'{name} 1:1: ROC, step {run.model.step}')
  # One row per readable image; _rows says which image (meta row) each is.
  run.save_features(name, **{'': features, '_rows': np.asarray(images.kept),
                             **arrays})
  log('%s: %d template pairs, %d images unreadable', name,
      len(labels), len(images.skipped))
  return result


def _identification(run: _Run, probes: str, distractors: str, name: str,
                    log) -> dict:
  """MegaFace-style identification: probe identities among distractors."""
  found, listing_skipped = identity_files(probes)
  names = sorted({identity for _, identity in found})
  probe_images = ImageBatches([p for p, _ in found], run.model.image_size,
                              run.batch, detector=run.detector)
  probe_features = run.embed_batches(probe_images)
  labels = np.array([names.index(found[i][1]) for i in probe_images.kept])
  distractor_images = ImageBatches(image_files(distractors),
                                   run.model.image_size, run.batch,
                                   detector=run.detector)
  distractor_features = run.embed_batches(distractor_images)
  # FARs whose threshold needs more impostor scores kept than MAX_KEPT
  # (1e-1 of 3.5e9 pairs would be 350M) are left out, and said so.
  impostors = len(probe_features) * len(distractor_features)
  fars = [f for f in protocols.FARS if protocols.impostors_accepted(
      f, impostors) < ranking.MAX_KEPT]
  result = ranking.megaface(probe_features, labels,
                            distractor_features, fars=fars)
  result['fars_too_many_to_keep'] = [f for f in protocols.FARS
                                     if f not in fars]
  result.update(kind='identification', path=os.path.abspath(probes),
                distractors=os.path.abspath(distractors),
                skipped_images=[
                    *(f'{k}: {r}' for k, r in listing_skipped),
                    *(f'{s.name}: {s.reason}' for s in
                      probe_images.skipped + distractor_images.skipped)])
  run.save_features(name, _probes=probe_features, _labels=labels,
                    _distractors=distractor_features)
  log('%s: rank-1 %.2f%% among %d distractors', name,
      100 * result['rank1'], len(distractor_features))
  return result


def _check_inputs(targets, ijb_roots, probes, distractors, run_sets,
                  quality='none') -> None:
  if quality not in QUALITY:
    raise ValueError(f'--quality={quality!r}: choose from '
                     f'{", ".join(QUALITY)}')
  if quality != 'none' and not ijb_roots:
    raise ValueError(f'--quality={quality} weights the images of IJB '
                     'templates and changes nothing else (pair sets always '
                     'report their lowest-quality tenth): give --ijb, or '
                     'leave --quality out')
  if not (targets or ijb_roots or probes or run_sets):
    raise ValueError('nothing to evaluate: pass --targets (.bin files), '
                     '--ijb (IJB-B/C folders), --probes with --distractors, '
                     'or --run_sets (the sets the run verified on)')
  if bool(probes) != bool(distractors):
    raise ValueError('--probes and --distractors go together (a MegaFace-'
                     'style set: probe identities and distractor images)')
  for path in [*targets, *ijb_roots, *filter(None, [probes, distractors])]:
    if not os.path.exists(path):
      raise FileNotFoundError(f'{path} does not exist')


def _open_run(workdir: str, step, flip: bool, batch_size,
              export_features: bool, detect: bool,
              quality: str = 'none') -> _Run:
  """The run's backbone restored and its embedder built, over all devices."""
  model = trained_run.open_model(workdir, step, flip, batch_size)
  out_dir = os.path.join(workdir, 'eval',
                         f'step_{model.step}' + '_flip' * flip)
  os.makedirs(out_dir, exist_ok=True)
  finder = detection.FaceFinder() if detect else None
  if finder is not None:
    _ = finder.detector  # a missing extra fails before any work
  return _Run(model, out_dir, export_features, finder, quality)


def evaluate_run(workdir: str, *, targets=(), ijb=(), probes=None,
                 distractors=None, step=None, flip=False, batch_size=None,
                 face_scores=False, export_features=False, detect=False,
                 run_sets=False, quality='none', log=logging.info) -> dict:
  """Restores the run in workdir, evaluates every set (with
  ``run_sets``, also those its config verified on while training) and
  writes DIR/eval/step_N[_flip]/{results.json, roc_*.png, features/*.npy}
  and a copy of results.json as DIR/eval/results.json. Returns the
  results. ``quality`` (QUALITY): 'norm' weights IJB images by their raw
  embedding norm (times the face score with ``face_scores``)."""
  _check_inputs(targets, ijb, probes, distractors, run_sets, quality)
  run = _open_run(workdir, step, flip, batch_size, export_features, detect,
                  quality)
  results_path = os.path.join(run.out_dir, 'results.json')
  record = {'step': run.model.step, 'flip': flip,
            'targets': _earlier_targets(results_path)}
  done: dict[str, dict] = {}
  if run_sets:
    _run_sets(run, done, log)
  for path in targets:
    name = _target_name(path, done)
    done[name] = _pairs(run, path, name, log)
  for root in ijb:
    meta = ijb_lib.load_meta(root)
    name = _target_name(meta.name, done)
    done[name] = _ijb(run, root, meta, name, face_scores, log)
  if probes:
    name = _target_name(probes, done)
    done[name] = _identification(run, probes, distractors, name, log)
  record['targets'].update(done)
  jsonfile.write_object(results_path, record)
  jsonfile.write_object(os.path.join(workdir, 'eval', 'results.json'), record)
  return record


def main(argv):
  from absl import app, flags  # noqa: PLC0415
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  run_log.quiet_third_party(flags.FLAGS.verbose)
  f = flags.FLAGS
  split = lambda v: [x for x in (v or '').split(',') if x]  # noqa: E731
  try:
    record = evaluate_run(
        f.workdir, targets=split(f.targets), ijb=split(f.ijb),
        probes=f.probes, distractors=f.distractors, step=f.step, flip=f.flip,
        batch_size=f.batch_size, face_scores=f.face_scores,
        export_features=f.export_features, detect=f.detect,
        run_sets=f.run_sets, quality=f.quality)
  except (ValueError, FileNotFoundError, detection.MissingExtra) as e:
    raise app.UsageError(str(e)) from None
  print(f"step {record['step']}{' (flip)' * record['flip']}:")
  print(format_table(record['targets']))
  print('results:', os.path.join(f.workdir, 'eval', 'results.json'))


def _define_flags():
  from absl import flags  # noqa: PLC0415
  flags.DEFINE_string('workdir', None, 'A directory python -m '
                      'npcface_jax.main trained in.')
  flags.DEFINE_integer('step', None, 'The checkpoint to evaluate (default: '
                       'the newest).')
  flags.DEFINE_string('targets', '', 'Comma-separated insightface '
                      'verification .bin files (LFW, AgeDB-30, CFP-FP, ...).')
  flags.DEFINE_string('ijb', '', 'Comma-separated IJB-B / IJB-C release '
                      'folders (meta/ and loose_crop/ inside).')
  flags.DEFINE_bool('run_sets', False, 'Also the pair sets the run '
                    'verified on while training: its config\'s '
                    'verification_targets and, on synthetic data, its '
                    'held-out identities.')
  flags.DEFINE_bool('face_scores', False, 'IJB: weight each image by its '
                    'detector face score before pooling.')
  flags.DEFINE_enum('quality', 'none', QUALITY, 'IJB: none, or norm: weight '
                    'each image by its raw embedding norm before pooling, '
                    'as MagFace evaluates (a quality only for heads that '
                    'train it: MagFace, AdaFace); with --face_scores, by '
                    'the product of the two.')
  flags.DEFINE_string('probes', None, 'Identification: a folder of aligned '
                      'probe images, one subfolder per identity (FaceScrub).')
  flags.DEFINE_string('distractors', None, 'Identification: a folder (any '
                      'depth) of aligned distractor images (MegaFace).')
  flags.DEFINE_bool('detect', False, 'Identification: the probe and '
                    'distractor folders hold photos; detect and align each '
                    'face (the [detect] extra) instead of reading aligned '
                    'crops.')
  flags.DEFINE_bool('flip', False, 'Add the embedding of each mirrored '
                    'image (flip test-time augmentation).')
  flags.DEFINE_integer('batch_size', None, 'Images per device step (default: '
                       "the config's eval_batch_size).")
  flags.DEFINE_bool('export_features', False, 'Also save the embeddings as '
                    '.npy under DIR/eval/step_N/features/.')
  flags.DEFINE_bool('verbose', False, 'Also log the INFO lines of '
                    'TensorFlow, orbax, absl and JAX.')
  flags.mark_flags_as_required(['workdir'])


if __name__ == '__main__':
  from absl import app
  _define_flags()
  app.run(main)
