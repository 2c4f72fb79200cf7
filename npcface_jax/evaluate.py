"""Evaluation: a jitted embedding step of its own, apart from training, and
``python -m npcface_jax.evaluate --workdir=DIR --targets=a.bin,...``.

``Embedder`` runs a backbone in inference mode over any number of images in
fixed-size batches (the last one padded, so one compiled shape serves all),
sharded over every device of the mesh, optionally adding the embedding of
each image's mirror (flip test-time augmentation), and returns L2-normalised
float32 numpy embeddings. Images are uint8 pixels (normalised on the device,
so a verification set stays 4x smaller in host memory) or floats already
normalised as the input pipeline does, (x - 127.5) / 128.

The command restores a trained run's backbone (its classifier and optimizer
state are never read), embeds each benchmark (insightface .bin pair sets,
IJB-B/C release folders, MegaFace-style probe and distractor folders), runs
the protocols of protocols.py, ijb.py and identification.py, prints a table
and writes DIR/eval/step_N[_flip]/results.json with ROC curves as PNG.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from npcface_jax import jsonfile, protocols
from npcface_jax.classifier import l2_normalize
from npcface_jax.images import ImageBatches, identity_files, image_files

ALL_DEVICES = P(('data', 'model'))


class Embedder:
  """``embedder(variables, images) -> (N, D) float32``, L2-normalised."""

  def __init__(self, model, mesh: Mesh, batch_size: int, flip: bool = False):
    devices = mesh.size
    if batch_size <= 0 or batch_size % devices:
      raise ValueError(f'evaluation batch {batch_size} does not divide over '
                       f'{devices} devices: use a positive multiple of '
                       f'{devices}')
    self.mesh, self.batch_size, self.flip = mesh, batch_size, flip
    self._in = NamedSharding(mesh, ALL_DEVICES)
    out = NamedSharding(mesh, P())  # every process reads all embeddings

    def embed(variables, images):
      x = images
      if x.dtype == jnp.uint8:
        x = (x.astype(jnp.float32) - 127.5) / 128.0
      e = model.apply(variables, x, train=False)
      if flip:
        e = e + model.apply(variables, x[:, :, ::-1], train=False)
      return l2_normalize(e.astype(jnp.float32))

    self._embed = jax.jit(embed, out_shardings=out)

  def __call__(self, variables: Any, images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    n, b = images.shape[0], self.batch_size
    out = []
    for start in range(0, n, b):
      chunk = images[start:start + b]
      if chunk.shape[0] < b:  # pad the last batch to the compiled shape
        pad = np.zeros((b - chunk.shape[0],) + chunk.shape[1:], chunk.dtype)
        chunk = np.concatenate([chunk, pad])
      batch = jax.make_array_from_callback(chunk.shape, self._in,
                                           lambda index, c=chunk: c[index])
      out.append(np.asarray(self._embed(variables, batch)))
    if not out:
      return np.zeros((0, 0), np.float32)
    return np.concatenate(out)[:n]


def verify(embedder: Embedder, variables: Any, images: np.ndarray,
           issame: np.ndarray, num_folds: int = 10) -> dict:
  """10-fold verification of pairs (images 2k, 2k + 1), as for LFW."""
  embeddings = embedder(variables, images)
  return protocols.verification_accuracy(
      protocols.pair_similarities(embeddings), issame, num_folds)


def embed_batches(embedder: Embedder, variables: Any, batches) -> np.ndarray:
  """Embeddings of a stream of uint8 image batches (any sizes), in order;
  for sets too large to hold as images at once (IJB-C, MegaFace)."""
  out = [embedder(variables, b) for b in batches if len(b)]
  return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


# --- Evaluating a trained run: python -m npcface_jax.evaluate ----------------

def load_run(workdir: str):
  """(config, image size) the run in workdir was trained with (run.json);
  ValueError naming the file, what is wrong with it and the fix."""
  import ml_collections  # noqa: PLC0415
  path = os.path.join(workdir, 'run.json')
  if not os.path.exists(path):
    raise FileNotFoundError(
        f'{path} not found: --workdir must be a directory that '
        'python -m npcface_jax.main trained in (it writes run.json)')
  fix = ('python -m npcface_jax.main writes it when training starts: '
         'restore the file, or re-run training with this --workdir')
  try:
    info = jsonfile.read_object(path)
  except ValueError as e:
    raise ValueError(f'{e}; {fix}') from None
  if not isinstance(info.get('config'), dict):
    what = 'not an object' if 'config' in info else 'missing'
    raise ValueError(f'{path}: "config" is {what}; {fix}')
  size = info.get('image_size')
  if isinstance(size, bool) or not isinstance(size, int) or not (
      0 < size <= 65535):
    raise ValueError(f'{path}: "image_size" is {size!r:.40}, not an image '
                     f'side in pixels (1 to 65535); {fix}')
  try:
    config = ml_collections.ConfigDict(info['config'])
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    raise ValueError(f'{path}: "config" is not a config ({e}); {fix}') from None
  return config, size


def restore_variables(workdir: str, mesh: Mesh, step: int | None = None):
  """(backbone variables replicated over the mesh, step) from the newest
  checkpoint in workdir, or the given step; the classifier and the
  optimizer state are not read."""
  from npcface_jax import checkpoint  # noqa: PLC0415
  checkpoints = checkpoint.Checkpointer(
      os.path.join(workdir, 'checkpoints'), keep=1, every_steps=1,
      asynchronous=False, read_only=True)
  try:
    state, step = checkpoints.restore_parts(
        {'params': ['backbone'], 'batch_stats': None},
        NamedSharding(mesh, P()), step)
  finally:
    checkpoints.close()
  return {'params': state['params']['backbone'],
          'batch_stats': state['batch_stats']}, step


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
  """One line per target: pairs, 10-fold accuracy (%), AUC, TAR (%) at FAR
  1e-3..1e-6 ('-' where the set cannot measure it), rank-1 (%)."""
  rows = [['target', 'pairs', 'accuracy %', 'AUC', 'TAR@1e-3', 'TAR@1e-4',
           'TAR@1e-5', 'TAR@1e-6', 'rank-1']]
  rows += [_summary_row(n, r) for n, r in results.items()]
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  return '\n'.join('  '.join(c.ljust(w) if i == 0 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(r, widths)))
                   for r in rows)


def _target_name(path: str, taken) -> str:
  name = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
  base, n = name, 2
  while name in taken:
    name, n = f'{base}_{n}', n + 1
  return name


def _roc(out_dir: str, name: str, scores, labels, title: str) -> str:
  from npcface_jax import roc_plot  # noqa: PLC0415 (Pillow)
  far, tar, _ = protocols.roc_curve(scores, labels)
  roc_plot.save_roc_png(os.path.join(out_dir, f'roc_{name}.png'),
                        {name: (far, tar)}, title)
  return f'roc_{name}.png'


def _finite(value):
  """JSON has no infinity: a threshold of -inf (accept every pair) is
  written as null."""
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, dict):
    return {k: _finite(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_finite(v) for v in value]
  return value


def _write_json(path: str, value) -> None:
  with open(path + '.tmp', 'w') as f:
    json.dump(_finite(value), f, indent=1, allow_nan=False)
  os.replace(path + '.tmp', path)


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


def evaluate_run(workdir: str, *, targets=(), ijb=(), probes=None,
                 distractors=None, step=None, flip=False, batch_size=None,
                 face_scores=False, export_features=False,
                 log=logging.info) -> dict:
  """Restores the run in workdir, evaluates every set and writes
  DIR/eval/step_N[_flip]/{results.json, roc_*.png, features/*.npy} and a
  copy of results.json as DIR/eval/results.json. Returns the results."""
  from npcface_jax import train, verification_bin  # noqa: PLC0415
  if not (targets or ijb or probes):
    raise ValueError('nothing to evaluate: pass --targets (.bin files), '
                     '--ijb (IJB-B/C folders) or --probes with --distractors')
  if bool(probes) != bool(distractors):
    raise ValueError('--probes and --distractors go together (a MegaFace-'
                     'style set: probe identities and distractor images)')
  for path in [*targets, *ijb, *filter(None, [probes, distractors])]:
    if not os.path.exists(path):
      raise FileNotFoundError(f'{path} does not exist')
  config, image_size = load_run(workdir)
  mesh = train.make_mesh(1)
  batch = batch_size or config.eval_batch_size
  batch = -(-batch // mesh.size) * mesh.size
  variables, step = restore_variables(workdir, mesh, step)
  embedder = Embedder(train.create_model(config, train_dtype=False), mesh,
                      batch, flip)
  out_dir = os.path.join(workdir, 'eval', f'step_{step}' + '_flip' * flip)
  os.makedirs(out_dir, exist_ok=True)
  results_path = os.path.join(out_dir, 'results.json')
  record = {'step': step, 'flip': flip,
            'targets': _earlier_targets(results_path)}
  done: dict[str, dict] = {}

  def features_out(name, **arrays):
    if export_features:
      os.makedirs(os.path.join(out_dir, 'features'), exist_ok=True)
      for key, value in arrays.items():
        np.save(os.path.join(out_dir, 'features', f'{name}{key}.npy'), value)

  for path in targets:
    name = _target_name(path, done)
    pairs = verification_bin.load_pairs(path, image_size)
    issame = pairs.issame
    features = embedder(variables, pairs.images)
    scores = protocols.pair_similarities(features)
    result = protocols.verification_report(scores, issame)
    result.update(kind='pairs', path=os.path.abspath(path),
                  num_pairs=len(issame), skipped_pairs=pairs.skipped)
    result['roc'] = _roc(out_dir, name, scores, issame,
                         f'{name}: ROC, step {step}')
    features_out(name, **{'': features})
    done[name] = result
    log('%s: %.2f%% +- %.2f over %d pairs%s', name, 100 * result['accuracy'],
        100 * result['accuracy_std'], len(issame),
        f' ({len(pairs.skipped)} left out: an image does not decode)'
        * bool(pairs.skipped))

  for root in ijb:
    from npcface_jax import ijb as ijb_protocol  # noqa: PLC0415
    meta = ijb_protocol.load_meta(root)
    name = _target_name(meta.name, done)
    images = ijb_protocol.aligned_batches(root, meta, image_size, batch * 8)
    features = embed_batches(embedder, variables, images)
    result = ijb_protocol.evaluate(features, meta, use_face_scores=face_scores,
                                   skipped=images.skipped)
    scores, labels = result.pop('scores'), result.pop('labels')
    result.update(kind='ijb', path=os.path.abspath(root),
                  face_scores=face_scores, skipped_images=[
                      f'{s.name}: {s.reason}' for s in images.skipped])
    result['roc'] = _roc(out_dir, name, scores, labels,
                         f'{name} 1:1: ROC, step {step}')
    features_out(name, **{'': features})
    done[name] = result
    log('%s: %d template pairs, %d images unreadable', name,
        len(labels), len(images.skipped))

  if probes:
    from npcface_jax import identification  # noqa: PLC0415
    found, listing_skipped = identity_files(probes)
    names = sorted({identity for _, identity in found})
    probe_images = ImageBatches([p for p, _ in found], image_size, batch * 8)
    probe_features = embed_batches(embedder, variables, probe_images)
    labels = np.array([names.index(found[i][1]) for i in probe_images.kept])
    distractor_images = ImageBatches(image_files(distractors), image_size,
                                     batch * 8)
    distractor_features = embed_batches(embedder, variables,
                                        distractor_images)
    name = _target_name(probes, done)
    # FARs whose threshold needs more impostor scores kept than MAX_KEPT
    # (1e-1 of 3.5e9 pairs would be 350M) are left out, and said so.
    impostors = len(probe_features) * len(distractor_features)
    fars = [f for f in protocols.FARS if protocols.impostors_accepted(
        f, impostors) < identification.MAX_KEPT]
    result = identification.megaface(probe_features, labels,
                                     distractor_features, fars=fars)
    result['fars_too_many_to_keep'] = [f for f in protocols.FARS
                                       if f not in fars]
    result.update(kind='identification', path=os.path.abspath(probes),
                  distractors=os.path.abspath(distractors),
                  skipped_images=[
                      *(f'{k}: {r}' for k, r in listing_skipped),
                      *(f'{s.name}: {s.reason}' for s in
                        probe_images.skipped + distractor_images.skipped)])
    features_out(name, _probes=probe_features, _labels=labels,
                 _distractors=distractor_features)
    done[name] = result
    log('%s: rank-1 %.2f%% among %d distractors', name,
        100 * result['rank1'], len(distractor_features))

  record['targets'].update(done)
  _write_json(results_path, record)
  _write_json(os.path.join(workdir, 'eval', 'results.json'), record)
  return record


def main(argv):
  from absl import app, flags  # noqa: PLC0415
  from npcface_jax import checkpoint  # noqa: PLC0415
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  checkpoint.quiet_orbax_info()
  f = flags.FLAGS
  split = lambda v: [x for x in (v or '').split(',') if x]  # noqa: E731
  try:
    record = evaluate_run(
        f.workdir, targets=split(f.targets), ijb=split(f.ijb),
        probes=f.probes, distractors=f.distractors, step=f.step, flip=f.flip,
        batch_size=f.batch_size, face_scores=f.face_scores,
        export_features=f.export_features)
  except (ValueError, FileNotFoundError) as e:
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
  flags.DEFINE_bool('face_scores', False, 'IJB: weight each image by its '
                    'detector face score before pooling.')
  flags.DEFINE_string('probes', None, 'Identification: a folder of aligned '
                      'probe images, one subfolder per identity (FaceScrub).')
  flags.DEFINE_string('distractors', None, 'Identification: a folder (any '
                      'depth) of aligned distractor images (MegaFace).')
  flags.DEFINE_bool('flip', False, 'Add the embedding of each mirrored '
                    'image (flip test-time augmentation).')
  flags.DEFINE_integer('batch_size', None, 'Images per device step (default: '
                       "the config's eval_batch_size).")
  flags.DEFINE_bool('export_features', False, 'Also save the embeddings as '
                    '.npy under DIR/eval/step_N/features/.')
  flags.mark_flags_as_required(['workdir'])


if __name__ == '__main__':
  from absl import app  # noqa: PLC0415
  _define_flags()
  app.run(main)
