"""Exports a trained run for serving, and proves the export right.

    python -m npcface_jax.export --workdir=DIR [--step=N] [--out=DIR/export]
        [--formats=savedmodel,onnx,tflite] [--flip] [--with_norm]
        [--images=FACES]
    python -m npcface_jax.export --check=DIR/export

Writes the run's backbone (export_formats.py: uint8 RGB aligned faces in, L2-
normalised float32 embeddings out, any batch) in each format, then loads
every file back in its own runtime and runs it on real faces: the run's
verification sets (or ``--images``, aligned crops), in batches of 1, 7 and
64 (then 64s). Each format must reproduce the JAX embedder, the one
evaluation uses, to a minimum cosine of 0.9999 over every face, and give
the verification sets the same 10-fold accuracy to 0.1 point. The folder
gets a model card (model_card.md / .json: input contract, training,
evaluation, parity, sha256 of every file, library versions) and
parity_sample.npz (8 of the faces and their JAX embeddings), which
``--check`` uses to re-verify the folder on its own: every hash, no file
missing or added, and every format still reproducing the sample.

``--with_norm`` adds a second output, ``norm`` (batch,): each face's raw
embedding norm, the quality score of MagFace- and AdaFace-trained
networks (the head itself is never exported). Every format carries it;
parity then also requires each format's norms within
model_card.NORM_RTOL of the JAX embedder's, and the sample keeps them.

The export is written next to ``--out`` and moved there only when it
passes, replacing an earlier export; one that fails is left at
``<out>.failed`` for inspection, and the command exits with status 1.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from typing import NamedTuple

import numpy as np

from npcface_jax.common import jsonfile, run_log
from npcface_jax.evaluation import protocols, run_sets
from npcface_jax.faces import images
from npcface_jax.serving import export_formats, model_card, trained_run

PARITY_BATCHES = (1, 7, 64)  # then batches of the last size
SAMPLE = 'parity_sample.npz'
SAMPLE_SIZE = 8


class Faces(NamedTuple):
  """The faces parity runs on: all images, and each verification set's
  rows among them with its labels."""
  images: np.ndarray  # uint8 (N, S, S, 3)
  sets: dict[str, tuple[slice, np.ndarray]]  # name -> (rows, issame)
  what: str  # in words, for the card


def _pairs_kept(issame: np.ndarray, max_pairs: int) -> np.ndarray:
  """max_pairs pair indices spread evenly over the set (all when 0): .bin
  sets hold their positive and negative pairs in blocks."""
  n = len(issame)
  if not max_pairs or max_pairs >= n:
    return np.arange(n)
  return np.unique(np.linspace(0, n - 1, max_pairs).round().astype(int))


def _pixels(faces: np.ndarray, contract: images.InputContract) -> np.ndarray:
  """uint8 pixels of a set, the exported input: .bin sets hold them;
  synthetic sets hold normalised floats (images.normalize), rounded here to
  the nearest pixel values (the JAX embedder gets the same pixels)."""
  if faces.dtype == np.uint8:
    return faces
  pixels = images.denormalize(faces, contract)
  return np.clip(np.round(pixels), 0, 255).astype(np.uint8)


def parity_faces(model: trained_run.Model, image_paths: list[str],
                 max_pairs: int = 0) -> Faces:
  """The run's verification sets (at most max_pairs pairs each), or the
  aligned crops named by image_paths (a folder, a list file or files)."""
  size = model.image_size
  if image_paths:
    root, names = trained_run.list_sources(image_paths)
    batches = images.ImageBatches(names, size, 256, root=root)
    found = [b for b in batches if len(b)]
    if not found:
      raise ValueError(f'none of the {len(names)} images could be read: '
                       f'{batches.skipped[0].reason}')
    return Faces(np.concatenate(found), {},
                 f'{sum(map(len, found))} aligned crops from '
                 f'{", ".join(image_paths)}')
  sets = run_sets.verification_sets(model.config, size)
  if not sets:
    raise ValueError(
        f'the run in {model.workdir} has no verification sets '
        '(config.verification_targets) to check the export on: pass '
        '--images=<a folder of aligned face crops>')
  parts, rows, start = [], {}, 0
  for name, (pixels, issame) in sets.items():
    keep = _pairs_kept(np.asarray(issame), max_pairs)
    pixels = _pixels(np.asarray(pixels), model.contract)
    pairs = pixels.reshape((-1, 2) + pixels.shape[1:])[keep]
    parts.append(pairs.reshape((-1,) + pixels.shape[1:]))
    rows[name] = (slice(start, start + 2 * len(keep)),
                  np.asarray(issame)[keep])
    start += 2 * len(keep)
  what = 'verification sets ' + ', '.join(
      f'{name} ({len(issame)} pairs)' for name, (_, issame) in rows.items())
  return Faces(np.concatenate(parts), rows, what)


def run_batched(run, faces: np.ndarray):
  """run(batch) over faces in batches of PARITY_BATCHES, then of the last
  size: one file shown to take several batch sizes. A run returning
  (embeddings, norms) gives both, each concatenated."""
  out, start, sizes = [], 0, list(PARITY_BATCHES)
  while start < len(faces):
    size = sizes.pop(0) if len(sizes) > 1 else sizes[0]
    got = run(faces[start:start + size])
    out.append(tuple(np.asarray(g, np.float32) for g in got)
               if isinstance(got, tuple) else np.asarray(got, np.float32))
    start += size
  if isinstance(out[0], tuple):
    return tuple(np.concatenate(parts) for parts in zip(*out))
  return np.concatenate(out)


def compare(exported, reference, faces: Faces) -> dict:
  """Cosines of exported to reference embeddings (both unit rows), and the
  verification accuracy of each set with each; given as (embeddings,
  norms), also the largest relative difference of the norms."""
  norms = None
  if isinstance(exported, tuple):
    (exported, got), (reference, want) = exported, reference
    norms = float(np.max(np.abs(got.astype(np.float64) - want)
                         / np.maximum(np.abs(want), 1e-30))) if len(want) \
        else 0.0
  cosines = np.sum(exported.astype(np.float64) * reference, axis=1)
  accuracy = {}
  for name, (rows, issame) in faces.sets.items():
    accuracy[name] = {
        key: protocols.verification_accuracy(
            protocols.pair_similarities(e[rows]), issame)['accuracy']
        for key, e in (('jax', reference), ('export', exported))}
  passed = bool(cosines.min() >= model_card.MIN_COSINE) and all(
      abs(a['jax'] - a['export']) * 100 <= model_card.ACCURACY_POINTS
      for a in accuracy.values())
  result = {'passed': passed, 'min_cosine': float(cosines.min()),
            'mean_cosine': float(cosines.mean()), 'accuracy': accuracy}
  if norms is not None:
    result['max_norm_error'] = norms
    result['passed'] = passed and norms <= model_card.NORM_RTOL
  return result


def _export_format(fmt: str, fn, model, folder: str, faces: Faces,
                   reference, log, with_norm: bool = False) -> dict:
  """Writes one format, runs it back, compares; errors become results."""
  path = os.path.join(folder, export_formats.FILES[fmt])
  started = time.perf_counter()
  try:
    export_formats.write(fmt, fn, model.image_size, path,
                         doc=f'npcface_jax export of {model.workdir}',
                         with_norm=with_norm)
    written = time.perf_counter()
    run = export_formats.load(fmt, path, with_norm)
    embedded = run_batched(run, faces.images)
  except export_formats.MissingExtra:
    raise
  except Exception as e:  # noqa: BLE001 (reported in the card, run fails)
    log(f'{fmt}: FAILED: {type(e).__name__}: {e}')
    return {'passed': False, 'error': f'{type(e).__name__}: {e}'[:500]}
  seconds = time.perf_counter() - written
  result = compare(embedded, reference, faces)
  result.update(write_seconds=round(written - started, 2),
                images_per_second=len(faces.images) / seconds)
  log(f'{fmt}: {"passed" if result["passed"] else "FAILED"}: min cosine '
      f'{result["min_cosine"]:.6f}; ' + (
          f'norm within {result["max_norm_error"]:.2g}; '
          if 'max_norm_error' in result else '') + '; '.join(
          f'{n} {100 * a["export"]:.2f}% (JAX {100 * a["jax"]:.2f}%)'
          for n, a in result['accuracy'].items()))
  return result


def _install(folder: str, out: str, passed: bool) -> str:
  """Moves the finished folder to out (replacing an earlier export) when it
  passed, else to out.failed; returns where it is."""
  target = out if passed else out.rstrip(os.sep) + '.failed'
  old = target.rstrip(os.sep) + '.old'
  if os.path.exists(old):
    shutil.rmtree(old)
  if os.path.exists(target):
    os.rename(target, old)
  os.rename(folder, target)
  shutil.rmtree(old, ignore_errors=True)
  return target


def export_run(workdir: str, *, step: int | None = None,
               out: str | None = None, formats=export_formats.FORMATS,
               flip: bool = False, image_paths=(), max_pairs: int = 0,
               batch_size: int | None = None, with_norm: bool = False,
               log=print) -> dict:
  """Exports, checks parity, writes the card; returns the card. Where the
  export ended up is card['path']; card['parity']['passed'] says whether
  it passed (a failed one is at <out>.failed). ``with_norm``: the files
  also return each face's raw embedding norm (output 'norm')."""
  unknown = sorted(set(formats) - set(export_formats.FORMATS))
  if unknown or not formats:
    raise ValueError(f'--formats: {", ".join(unknown) or "none given"}; '
                     f'choose from {", ".join(export_formats.FORMATS)}')
  if 'onnx' in formats:
    export_formats.require_onnx()  # before any work, not after the others
  model = trained_run.open_model(workdir, step, flip, batch_size)
  out = out or os.path.join(workdir, 'export')
  faces = parity_faces(model, list(image_paths), max_pairs)
  log(f'parity faces: {faces.what}')
  reference = model.embed(faces.images, with_norms=with_norm)
  fn = export_formats.serving_function(model.module, model.variables, flip,
                                       model.contract, with_norm)
  folder = out.rstrip(os.sep) + f'.partial-{os.getpid()}'
  shutil.rmtree(folder, ignore_errors=True)
  os.makedirs(folder)
  try:
    results = {fmt: _export_format(fmt, fn, model, folder, faces, reference,
                                   log, with_norm) for fmt in formats}
    embeddings, norms = reference if with_norm else (reference, None)
    np.savez(os.path.join(folder, SAMPLE),
             images=faces.images[:SAMPLE_SIZE],
             embeddings=embeddings[:SAMPLE_SIZE],
             **({} if norms is None else {'norms': norms[:SAMPLE_SIZE]}))
  except BaseException:  # interrupted: no half-written folder left behind
    shutil.rmtree(folder, ignore_errors=True)
    raise
  card = model_card.describe(model, flip, with_norm)
  card['parity'] = {
      'passed': all(r['passed'] for r in results.values()),
      'faces': faces.what, 'images': len(faces.images),
      'batches': list(PARITY_BATCHES),
      'min_cosine_required': model_card.MIN_COSINE,
      'accuracy_points': model_card.ACCURACY_POINTS, 'formats': results}
  card['formats'] = {fmt: export_formats.FILES[fmt] for fmt in formats
                     if 'error' not in results[fmt]}
  card['files'] = model_card.file_records(folder)
  card['versions'] = export_formats.versions()
  model_card.write(folder, card)
  card['path'] = _install(folder, out, card['parity']['passed'])
  return card


def check_export(root: str, log=print) -> list[str]:
  """Problems found re-verifying an export folder (none: it is intact):
  the card, every file's sha256, no file missing or added, and every
  format reproducing parity_sample.npz."""
  path = os.path.join(root, model_card.CARD_JSON)
  if not os.path.isfile(path):
    return [f'{path} not found: --check takes a folder that python -m '
            'npcface_jax.export wrote']
  try:
    card = jsonfile.read_object(path)
  except ValueError as e:
    return [f'{e} (the card is damaged)']
  recorded, problems = card.get('files') or {}, []
  present = set(model_card.export_files(root))
  for name in sorted(set(recorded) - present):
    problems.append(f'{name}: missing')
  for name in sorted(present - set(recorded)):
    problems.append(f'{name}: not in the card (added after the export)')
  for name in sorted(set(recorded) & present):
    if model_card.sha256(os.path.join(root, name)) != recorded[name].get(
        'sha256'):
      problems.append(f'{name}: sha256 differs from the card (the file was '
                      'changed or damaged)')
  if not (card.get('parity') or {}).get('passed'):
    problems.append('the card records a failed parity check')
  if problems:
    return problems
  sample = np.load(os.path.join(root, SAMPLE))
  faces = Faces(sample['images'], {}, SAMPLE)
  with_norm = bool(card.get('norm_output'))
  if with_norm and 'norms' not in sample.files:
    return [f'{SAMPLE}: no norms, though the card says the files return '
            'them (the sample was replaced)']
  recorded = (sample['embeddings'], sample['norms']) if with_norm else (
      sample['embeddings'])
  for fmt, file in (card.get('formats') or {}).items():
    try:
      embedded = run_batched(export_formats.load(
          fmt, os.path.join(root, file), with_norm), faces.images)
      result = compare(embedded, recorded, faces)
    except export_formats.MissingExtra:
      raise
    except Exception as e:  # noqa: BLE001 (a damaged file is a finding)
      problems.append(f'{fmt}: does not run: {type(e).__name__}: {e}')
      continue
    log(f'{fmt}: min cosine {result["min_cosine"]:.6f} on {SAMPLE}')
    if result['min_cosine'] < model_card.MIN_COSINE:
      problems.append(f'{fmt}: min cosine {result["min_cosine"]:.6f} to '
                      f'the recorded embeddings, below '
                      f'{model_card.MIN_COSINE}')
    if result.get('max_norm_error', 0) > model_card.NORM_RTOL:
      problems.append(f'{fmt}: norms differ from the recorded ones by up to '
                      f'{result["max_norm_error"]:.2g} (relative), above '
                      f'{model_card.NORM_RTOL:g}')
  return problems


def main(argv) -> None:
  from absl import flags  # noqa: PLC0415 (the command's flags only)
  f = flags.FLAGS
  if len(argv) > 1:
    raise SystemExit(f'unexpected arguments: {" ".join(argv[1:])}')
  run_log.quiet_third_party(f.verbose)
  if f.check:
    problems = check_export(f.check)
    for p in problems:
      print(f'{f.check}: {p}', file=sys.stderr)
    print(f'{f.check}: {"FAILED" if problems else "intact"}')
    raise SystemExit(1 if problems else 0)
  if not f.workdir:
    raise SystemExit('--workdir is required (or --check=EXPORT_DIR)')
  formats = [s.strip() for s in f.formats.split(',') if s.strip()]
  try:
    card = export_run(f.workdir, step=f.step, out=f.out, formats=formats,
                      flip=f.flip, image_paths=f.images or (),
                      max_pairs=f.max_pairs, batch_size=f.batch_size,
                      with_norm=f.with_norm)
  except (ValueError, FileNotFoundError, export_formats.MissingExtra) as e:
    raise SystemExit(f'error: {e}') from None
  passed = card['parity']['passed']
  print(f'{"exported" if passed else "parity FAILED, left"} at '
        f'{card["path"]} (model card: {model_card.CARD_MD})')
  raise SystemExit(0 if passed else 1)


def _define_flags() -> None:
  from absl import flags  # noqa: PLC0415 (the command's flags only)
  flags.DEFINE_string('workdir', None, 'A directory python -m '
                      'npcface_jax.main trained in.')
  flags.DEFINE_integer('step', None, 'The checkpoint to export (default: '
                       'the newest).')
  flags.DEFINE_string('out', None, 'The export folder (default: '
                      'WORKDIR/export); an earlier export there is replaced '
                      'once the new one passes.')
  flags.DEFINE_string('formats', ','.join(export_formats.FORMATS),
                      'Comma-separated formats, from '
                      f'{", ".join(export_formats.FORMATS)}.')
  flags.DEFINE_bool('flip', False, 'Bake flip test-time augmentation into '
                    'the graph (each face plus its mirror image).')
  flags.DEFINE_bool('with_norm', False, 'A second output, norm (batch,): '
                    'each face\'s raw embedding norm (before L2 '
                    'normalising; with --flip the mean of the face\'s and '
                    'its mirror\'s), a quality score for MagFace- and '
                    'AdaFace-trained networks.')
  flags.DEFINE_list('images', None, 'Check parity on these aligned face '
                    'crops (a folder, a list file or files) instead of the '
                    "run's verification sets.")
  flags.DEFINE_integer('max_pairs', 0, 'Check parity on at most this many '
                       'pairs of each verification set, spread over it '
                       '(0: all).')
  flags.DEFINE_integer('batch_size', None, 'Images per step of the JAX '
                       "embedder (default: the config's eval_batch_size).")
  flags.DEFINE_string('check', None, 'Re-verify this export folder instead: '
                      'sha256 of every file, and every format against the '
                      'embeddings it recorded.')
  flags.DEFINE_bool('verbose', False, 'Also log the INFO lines of '
                    'TensorFlow, orbax, absl and JAX.')


if __name__ == '__main__':
  from absl import app
  _define_flags()
  app.run(main)
