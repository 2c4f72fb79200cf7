"""A trained run put to use: its backbone restored over every device, photos
(or aligned crops) read through the one image path to embeddings, and the
decision threshold taken from the run's own evaluation results. Shared by
the verify, embed and identify commands and by evaluate.

Photos go through images.read_face with a detection.FaceFinder: decoded
(EXIF rotation, grey/CMYK to RGB), the face found (the largest one scoring
at least the floor), aligned on its 5 landmarks to the ArcFace template;
aligned crops (``aligned=True``) are only resized to the run's image size.
Pixels are normalised on the device (embedding_step.Embedder), as for every
evaluation. A photo that cannot be read, or shows no face, is left out and
reported with its reason.
"""

from __future__ import annotations

import os
import sys
from typing import Any, NamedTuple

import numpy as np

from npcface_jax import models
from npcface_jax.common import arrays, jsonfile, textfile
from npcface_jax.evaluation import embedding_step, protocols, ranking
from npcface_jax.faces import detection, images
from npcface_jax.serving import run_dir


class Model(NamedTuple):
  """A run's backbone at one checkpoint, ready to embed."""
  embedder: embedding_step.Embedder
  variables: Any
  config: Any
  image_size: int
  step: int
  workdir: str
  module: Any  # the flax backbone, in float32

  @property
  def flip(self) -> bool:
    return self.embedder.flip

  @property
  def contract(self) -> images.InputContract:
    """How the network wants its pixels (run.json's config.input)."""
    return images.input_contract(self.config)

  def with_flip(self, flip: bool) -> Model:
    """The same model embedding with (or without) flip TTA."""
    if flip == self.flip:
      return self
    e = self.embedder
    return self._replace(embedder=embedding_step.Embedder(
        self.module, e.mesh, e.batch_size, flip, self.contract))

  def embed(self, pixels: np.ndarray, with_norms: bool = False):
    """Unit embeddings; with_norms: (those, raw norms), as Embedder."""
    return self.embedder(self.variables, pixels, with_norms)


def open_model(workdir: str, step: int | None = None, flip: bool = False,
               batch_size: int | None = None) -> Model:
  """The run in workdir (its newest checkpoint, or ``step``), its embedder
  sharded over every device; batch_size defaults to the config's
  eval_batch_size, rounded up to a multiple of the device count."""
  config, image_size = run_dir.load_run(workdir)
  mesh = arrays.make_mesh(1)
  batch = batch_size or config.eval_batch_size
  batch = -(-batch // mesh.size) * mesh.size
  variables, step = run_dir.restore_variables(workdir, mesh, step)
  module = models.from_config(config, train_dtype=False)
  embedder = embedding_step.Embedder(module, mesh, batch, flip,
                                     images.input_contract(config))
  return Model(embedder, variables, config, image_size, step, workdir, module)


# --- Photos to embeddings -----------------------------------------------------

class Embedded(NamedTuple):
  """Embeddings of the readable images among some sources, in order."""
  embeddings: np.ndarray  # (len(kept), D) float32, L2-normalised
  kept: list[int]  # the source index of each row
  skipped: list[images.Skipped]  # left out, with the reason
  landmarks: dict[int, np.ndarray]  # source index -> the (5, 2) aligned on
  norms: np.ndarray | None = None  # (len(kept),) float32 raw embedding
  # norms (embedding_step.Embedder), when asked for


def embed_images(model: Model, sources, *, aligned: bool = False,
                 min_score: float = detection.MIN_SCORE,
                 root: str | None = None, progress: bool = True,
                 what: str = 'embedding', with_norms: bool = False
                 ) -> Embedded:
  """The embeddings of ``sources`` (paths, names under root, or encoded
  bytes): photos detected and aligned, or aligned crops resized
  (``aligned``); a progress bar on stderr when there is more than one
  batch. ``with_norms``: each row's raw norm too (``.norms``)."""
  from tqdm import tqdm  # noqa: PLC0415 (a command's progress bar only)
  finder = None if aligned else detection.FaceFinder(min_score)
  if finder is not None:
    _ = finder.detector  # made now: a missing extra fails before any work
  batches = images.ImageBatches(sources, model.image_size,
                                model.embedder.batch_size * 4, root=root,
                                detector=finder)
  bar = tqdm(batches, total=len(batches), desc=what, unit='batch',
             file=sys.stderr, disable=not progress or len(batches) < 2,
             mininterval=0.5)
  rows = [model.embed(b, with_norms) for b in bar if len(b)]
  dim = model.config.embedding_dim
  norms = None
  if with_norms:
    norms = (np.concatenate([n for _, n in rows]) if rows
             else np.zeros(0, np.float32))
    rows = [e for e, _ in rows]
  out = np.concatenate(rows) if rows else np.zeros((0, dim), np.float32)
  return Embedded(out, list(batches.kept), list(batches.skipped),
                  dict(batches.found), norms)


# --- The decision threshold ---------------------------------------------------

class Threshold(NamedTuple):
  value: float  # same person iff cosine similarity > value
  source: str  # where it comes from, in words
  flip: bool  # whether the results it comes from embedded with flip
  warning: str | None = None  # what the user should know about it
  calibration: dict | None = None  # gallery_threshold's numbers


def _results(workdir: str, step: int, flip: bool | None):
  """(record, path) of evaluate's results for this step: with flip TTA or
  without as asked, else whichever exists (flip first)."""
  choices = [flip] if flip is not None else [True, False]
  for f in choices:
    path = os.path.join(workdir, 'eval', f'step_{step}' + '_flip' * f,
                        'results.json')
    if os.path.exists(path):
      return jsonfile.read_object(path), path
  tried = ' or '.join(f'step_{step}' + '_flip' * f for f in choices)
  raise ValueError(
      f'{workdir} has no evaluation results for step {step} '
      f'(eval/{tried}/results.json) to take a threshold from; run python -m '
      f'npcface_jax.evaluate --workdir={workdir} --step={step} '
      '--targets=<pairs .bin> first, or pass --threshold')


def _pick_set(path: str, usable: dict, target: str | None,
              what: str = 'a threshold') -> str:
  """The set named ``target`` among ``usable``, or the only one."""
  have = ', '.join(sorted(usable)) or 'none'
  if target is None:
    if len(usable) != 1:
      raise ValueError(f'{path} holds {len(usable)} sets with {what} '
                       f'({have}); name one with --target')
    return next(iter(usable))
  if target not in usable:
    raise ValueError(f'{path} has no set {target!r} with {what}; it has '
                     f'{have}')
  return target


def find_threshold(workdir: str, step: int, *, far: float | None = None,
                   target: str | None = None,
                   flip: bool | None = None) -> Threshold:
  """The threshold of the run's own evaluation at ``step``: at false accept
  rate ``far`` (its tar_at_far), else the k-fold threshold of ``target``;
  the set may go unnamed when the results hold only one."""
  record, path = _results(workdir, step, flip)
  targets = record.get('targets') or {}
  usable = {n: r for n, r in targets.items() if isinstance(r, dict) and (
      'tar_at_far' in r if far is not None else 'threshold' in r)}
  target = _pick_set(path, usable, target)
  result, where = usable[target], os.path.relpath(path, workdir)
  flipped = bool(record.get('flip'))
  if far is None:
    folds = protocols.fold_note(result)  # None: 10 in file order, of old
    count = result['num_folds'] if folds else 10
    return Threshold(float(result['threshold']), f'the {count}-fold threshold '
                     f'of {target} ({folds + "; " if folds else ""}{where})',
                     flipped)
  for row in result['tar_at_far']:
    if np.isclose(row['far'], far, rtol=1e-6):
      return Threshold(float(row['threshold']), f'FAR {far:g} on {target}: '
                       f'TAR {100 * row["tar"]:.2f}% ({where})', flipped)
  have = ', '.join(f'{row["far"]:g}' for row in result['tar_at_far'])
  raise ValueError(f'{target} in {path} has no threshold at FAR {far:g} '
                   f'(its pairs measure {have or "none"}); pick one of those')


# --- The open-set threshold of a gallery -------------------------------------

class StoredRoc(NamedTuple):
  """A set's ROC points with their thresholds, from the run's results."""
  far: np.ndarray
  tar: np.ndarray
  threshold: np.ndarray
  target: str  # the set
  where: str  # its results.json, relative to the run
  flip: bool  # whether those results embedded with flip
  rows: bool  # only tar_at_far's rows (results from before the ROC kept
  # its thresholds): a few FARs, so a coarser, stricter calibration


def _number(x) -> bool:
  return (isinstance(x, (int, float)) and not isinstance(x, bool)
          and np.isfinite(x))


def _roc_of(result: dict) -> tuple[list, bool] | None:
  """([(far, tar, threshold)], rows) of a set: its ROC's points with a
  finite threshold, else its tar_at_far rows; None without either."""
  curve, rows = result.get('roc_curve'), False
  parts = [curve.get(k) for k in ('far', 'tar', 'threshold')
           ] if isinstance(curve, dict) else []
  if parts and all(isinstance(p, list) for p in parts) and (
      len(parts[0]) == len(parts[1]) == len(parts[2])):
    points = list(zip(*parts))
  else:
    table = result.get('tar_at_far')
    points, rows = [(r.get('far'), r.get('tar'), r.get('threshold'))
                    for r in table if isinstance(r, dict)
                    ] if isinstance(table, list) else [], True
  points = [p for p in points if all(map(_number, p)) and 0 <= p[0] <= 1]
  return (points, rows) if points else None


def stored_roc(workdir: str, step: int, *, target: str | None = None,
               flip: bool | None = None) -> StoredRoc:
  """The ROC of ``target`` (or of the one set evaluated) in the run's
  results at ``step``, with the threshold at each point."""
  record, path = _results(workdir, step, flip)
  targets = record.get('targets') or {}
  usable = {n: r for n, r in targets.items() if isinstance(r, dict) and
            _roc_of(r) is not None}
  if not usable:
    raise ValueError(
        f'{path} holds no ROC with thresholds (nor TAR at FAR rows) to '
        'calibrate the open-set threshold on; run python -m '
        f'npcface_jax.evaluate --workdir={workdir} --step={step} again '
        '(results.json keeps the ROC\'s thresholds now), or pass '
        '--threshold or --far')
  target = _pick_set(path, usable, target, 'an ROC')
  points, rows = _roc_of(usable[target])
  far, tar, threshold = (np.array(c, np.float64) for c in zip(*points))
  return StoredRoc(far, tar, threshold, target,
                   os.path.relpath(path, workdir), bool(record.get('flip')),
                   rows)


def gallery_threshold(roc: StoredRoc, fpir: float,
                      gallery_size: int) -> Threshold:
  """The threshold at which about ``fpir`` of the probes of people not
  enrolled get a name, among ``gallery_size`` templates: the ROC's at pair
  FAR fpir / N (ranking.open_set_far), so stricter as the gallery
  grows. Where the ROC does not reach that FAR (too few impostor pairs),
  its strictest point, with a warning that says what to expect and do."""
  far = ranking.open_set_far(fpir, gallery_size)
  got = protocols.threshold_at_far(roc.far, roc.tar, roc.threshold, far)
  what = 'tar_at_far row' if roc.rows else 'ROC point'
  source = (f'FPIR {fpir:g} with {gallery_size} enrolled -> pair FAR '
            f'{far:.3g} (FPIR / {gallery_size}) on {roc.target}: its {what} '
            f'at FAR {got.far:.3g}, TAR {100 * got.tar:.2f}% ({roc.where})')
  if roc.rows:
    source += (' (these results keep no ROC thresholds, only tar_at_far: '
               'evaluate again for a finer calibration)')
  warning = None
  if not got.resolved:
    expect = min(1.0, gallery_size * got.lowest_far)
    warning = (
        f'{roc.target} measures pair FAR down to {got.lowest_far:.3g} only, '
        f'above the {far:.3g} that FPIR {fpir:g} needs with {gallery_size} '
        f'enrolled: its strictest {what} is used, which may name up to '
        f'about {100 * expect:.2g}% of the people not enrolled '
        f'({gallery_size} x {got.lowest_far:.3g}). Evaluate '
        f'{"again, " if roc.rows else ""}on a set with more impostor pairs, '
        'raise --fpir, or pass --threshold')
  calibration = {'set': roc.target, 'fpir': fpir,
                 'gallery_size': gallery_size, 'pair_far': far,
                 'roc_far': got.far, 'roc_tar': got.tar,
                 'lowest_far': got.lowest_far, 'resolved': got.resolved}
  return Threshold(got.threshold, source, roc.flip, warning, calibration)


# --- Naming what was given ----------------------------------------------------

def list_sources(paths: list[str]) -> tuple[str | None, list[str]]:
  """(root, names) of what a command was given: one folder (every image in
  it, any depth, named relative to it), one list file (a path a line,
  relative to the list's folder), or image paths (named as given)."""
  if len(paths) == 1 and os.path.isdir(paths[0]):
    root = os.path.abspath(paths[0])
    found = images.image_files(root)
    if not found:
      raise ValueError(f'{paths[0]} holds no image files '
                       f'({", ".join(images.IMAGE_EXTENSIONS)})')
    return root, [os.path.relpath(p, root) for p in found]
  if len(paths) == 1 and os.path.isfile(paths[0]) and not paths[0].lower(
      ).endswith(images.IMAGE_EXTENSIONS):
    names = [line.strip() for _, line in textfile.text_lines(paths[0])
             if line.strip() and not line.lstrip().startswith('#')]
    if not names:
      raise ValueError(f'the list file {paths[0]} names no image')
    return os.path.dirname(os.path.abspath(paths[0])), names
  if not paths:
    raise ValueError('no images given')
  return None, list(paths)


# --- What the commands share --------------------------------------------------

def define_flags(threshold: bool) -> None:
  """The flags of verify, embed and identify: the run, the step, how images
  are read, and (``threshold``) where the decision threshold comes from."""
  from absl import flags  # noqa: PLC0415 (the commands' flags only)
  flags.DEFINE_string('workdir', None, 'A directory python -m '
                      'npcface_jax.main trained in.')
  flags.DEFINE_integer('step', None, 'The checkpoint to use (default: the '
                       'newest).')
  flags.DEFINE_bool('aligned', False, 'The images are aligned face crops '
                    '(as data_prep writes them): resized to the run\'s image '
                    'size, no detection. Default: photos, each face detected '
                    'and aligned.')
  flags.DEFINE_float('min_face_score', detection.MIN_SCORE, 'Photos: the '
                     'lowest detector score a face may have.')
  flags.DEFINE_integer('batch_size', None, 'Images per device step (default: '
                       "the config's eval_batch_size).")
  flags.DEFINE_bool('verbose', False, 'Also log the INFO lines of '
                    'TensorFlow, orbax, absl and JAX.')
  if threshold:
    flags.DEFINE_float('threshold', None, 'Same person iff cosine > this. '
                       "Default: from the run's evaluation results "
                       '(python -m npcface_jax.evaluate) at this step.')
    flags.DEFINE_float('far', None, 'Take the threshold at this false accept '
                       'rate (e.g. 1e-3) from the results\' tar_at_far.')
    flags.DEFINE_string('target', None, 'The evaluated set to take the '
                        'threshold from (needed when the results hold '
                        'several); without --far, its 10-fold threshold '
                        '(identify: its ROC at the gallery\'s FAR).')
    flags.DEFINE_bool('flip', None, 'Add the mirrored image\'s embedding '
                      '(default: as the results the threshold comes from).')
  else:
    flags.DEFINE_bool('flip', False, 'Add the mirrored image\'s embedding '
                      '(flip test-time augmentation).')
  flags.mark_flags_as_required(['workdir'])


def model_and_threshold(f) -> tuple[Model, Threshold]:
  """The run's model (f: the parsed flags of define_flags(True)) and its
  threshold; the model embeds with flip as the threshold's results did,
  unless --flip says otherwise."""
  model = open_model(f.workdir, f.step, bool(f.flip), f.batch_size)
  if f.threshold is not None:
    return model, Threshold(f.threshold, 'given (--threshold)', model.flip)
  found = find_threshold(f.workdir, model.step, far=f.far, target=f.target,
                         flip=f.flip)
  return model.with_flip(found.flip), found
