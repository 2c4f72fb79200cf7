"""The IJB-B / IJB-C 1:1 verification protocol (template against template),
as insightface's ``recognition/_evaluation_/ijb/ijb_11.py`` runs it.

An IJB release folder ROOT (``.../IJB_release/IJBC``) holds ``meta/`` with
three text files, named after the set (``ijbb`` or ``ijbc``):

  <name>_face_tid_mid.txt        ``image_name template_id media_id``
  <name>_name_5pts_score.txt     ``image_name x1 y1 ... x5 y5 face_score``
  <name>_template_pair_label.txt ``template1 template2 label`` (1: same)

and ``loose_crop/<image_name>``. The steps: ``load_meta`` reads and checks
the files; ``aligned_batches`` yields the aligned faces in meta order for an
embedder (an unreadable one left out and listed, as npcface_jax.faces.images
does); ``template_features`` pools image embeddings into templates (images
of one media averaged, media summed; images weighted by detector score,
raw embedding norm or both when asked); ``score_pairs`` takes the cosine of
each template pair in chunks; ``evaluate`` does all of it and reports TAR
at FAR (``protocols``). Everything but the image decoding is
NumPy on arrays, so each step can be tested on its own.
"""

from __future__ import annotations

import os
import pathlib
import re
import warnings
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

from npcface_jax.common import textfile
from npcface_jax.evaluation import protocols
from npcface_jax.faces import alignment, images

_TID_MID = '{}_face_tid_mid.txt'
_5PTS = '{}_name_5pts_score.txt'
_PAIRS = '{}_template_pair_label.txt'
# Ids as np.loadtxt reads them into int64: ASCII digits (int() also takes
# other scripts' digits and '1_000'), at most 19 of them.
_INT = re.compile('[+-]?[0-9]{1,19}')
_INT64 = np.iinfo(np.int64)
# A pairs line as np.loadtxt reads it (a '#' starts a comment anywhere).
_PAIR_LINE = re.compile(r'({0})\s+({0})\s+({0})\s*(?:#.*)?'.format(
    _INT.pattern), re.DOTALL)


class Meta(NamedTuple):
  """One IJB set's meta files; rows of the image arrays are images."""
  name: str                   # 'ijbb' or 'ijbc': the meta files' prefix
  image_names: np.ndarray     # (N,) str, files in ROOT/loose_crop
  template_ids: np.ndarray    # (N,) int64
  media_ids: np.ndarray       # (N,) int64
  landmarks: np.ndarray       # (N, 5, 2) float32, pixels of the loose crop
  face_scores: np.ndarray     # (N,) float32, the detector's confidence
  pair_templates: np.ndarray  # (P, 2) int64
  pair_labels: np.ndarray     # (P,) bool, True: the same person


# --- Meta files ---------------------------------------------------------------

def load_meta(root: str | os.PathLike, name: str | None = None) -> Meta:
  """Reads and cross-checks ROOT/meta/<name>_*.txt; name ('ijbb', 'ijbc')
  is inferred from the file names when None.

  Raises ValueError naming the file and line of any malformed line (not
  UTF-8, ids beyond int64, values that are not finite or beyond
  alignment.MAX_COORDINATE), the first image of face_tid_mid without
  landmarks, and the first pair whose template has no image, so a broken
  download fails here and not after hours of embedding.
  """
  meta_dir = pathlib.Path(root) / 'meta'
  name = _set_name(pathlib.Path(root), meta_dir, name)
  tid_path = meta_dir / _TID_MID.format(name)
  names, ids, _ = _read_table(tid_path, 2, _int,
                              '"image_name template_id media_id"')
  path5 = meta_dir / _5PTS.format(name)
  names5, values, lines5 = _read_table(
      path5, 11, _coordinate,
      '"image_name x1 y1 x2 y2 x3 y3 x4 y4 x5 y5 face_score" (finite, at '
      f'most {alignment.MAX_COORDINATE:g} in magnitude)')
  values = _match_5pts(names, names5, values, lines5, path5, tid_path)
  pairs_path = meta_dir / _PAIRS.format(name)
  pairs = _read_pairs(pairs_path)
  template_ids = ids[:, 0]
  templates = np.unique(template_ids)
  known = np.isin(pairs[:, :2], templates)
  if not known.all():
    row, col = np.argwhere(~known)[0]
    raise ValueError(
        f'{pairs_path}, line {_line_of_row(pairs_path, row)}: template '
        f'{pairs[row, col]} has no image in {tid_path}: the two files come '
        'from different releases; download them together')
  return Meta(
      name=name,
      image_names=np.array(names, dtype=str),
      template_ids=template_ids,
      media_ids=ids[:, 1],
      landmarks=values[:, :10].reshape(-1, 5, 2).astype(np.float32),
      face_scores=values[:, 10].astype(np.float32),
      pair_templates=pairs[:, :2],
      pair_labels=pairs[:, 2] == 1)


def _set_name(root: pathlib.Path, meta_dir: pathlib.Path,
              name: str | None) -> str:
  """name lower-cased, or the one prefix of meta/*_face_tid_mid.txt."""
  if not meta_dir.is_dir():
    nested = sorted(p.parent.name for p in root.glob('*/meta'))
    hint = (f' (found {", ".join(nested)} inside it: pass one of those)'
            if nested else '')
    raise ValueError(
        f'no meta folder at {meta_dir}: ROOT must be an IJB release folder '
        f'such as .../IJB_release/IJBC, holding meta/ and loose_crop/{hint}')
  if name is not None:
    return name.lower()
  suffix = _TID_MID.format('')
  found = sorted(p.name[:-len(suffix)] for p in meta_dir.glob('*' + suffix))
  if len(found) != 1:
    raise ValueError(
        f'cannot infer the set name from {meta_dir}: expected one '
        f'<name>{suffix} (ijbb or ijbc), found '
        f'{found or "none"}; pass name= explicitly')
  return found[0]


def _data_lines(path: pathlib.Path) -> Iterator[tuple[int, str]]:
  """(line number, stripped line) of the lines that are not blank or
  '#' comments; ValueError naming the line of text that is not UTF-8."""
  for n, line in textfile.text_lines(path):
    line = line.strip()
    if line and not line.startswith('#'):
      yield n, line


def _check_exists(path: pathlib.Path) -> None:
  if not path.is_file():
    raise ValueError(f'missing IJB meta file {path}: it comes with the IJB '
                     'release (insightface IJB_release layout)')


def _is_int64(text: str) -> bool:
  """ASCII digits that fit int64, as np.loadtxt reads the pairs file."""
  return bool(_INT.fullmatch(text)) and (
      len(text) < 19 or _INT64.min <= int(text) <= _INT64.max)


def _int(text: str) -> int:
  if not _is_int64(text):
    raise ValueError(text)
  return int(text)


def _coordinate(text: str) -> float:
  """A landmark or score: finite, within alignment.MAX_COORDINATE (so that
  it stays finite as float32)."""
  value = float(text)
  if not abs(value) <= alignment.MAX_COORDINATE:  # NaN too
    raise ValueError(text)
  return value


def _read_table(path: pathlib.Path, num_values: int, kind,
                fmt: str) -> tuple[list[str], np.ndarray, list[int]]:
  """(names, (N, num_values) values, line numbers) of ``name v1 ... vk``
  lines; the name may hold spaces (the last num_values fields are the
  values, each read by ``kind``: _int or _coordinate)."""
  _check_exists(path)
  names, rows, lines = [], [], []
  for n, line in _data_lines(path):
    fields = line.rsplit(maxsplit=num_values)
    try:
      if len(fields) != num_values + 1:
        raise ValueError
      row = [kind(x) for x in fields[1:]]
    except ValueError:
      raise ValueError(f'{path}, line {n}: expected {fmt}, got '
                       f'{textfile.shown(line)}') from None
    names.append(fields[0])
    rows.append(row)
    lines.append(n)
  if not rows:
    raise ValueError(f'{path} lists no images')
  return names, np.array(rows, np.int64 if kind is _int else np.float64), lines


def _match_5pts(names: list[str], names5: list[str], values: np.ndarray,
                lines5: list[int], path5: pathlib.Path,
                path_tid: pathlib.Path) -> np.ndarray:
  """The 5pts rows in face_tid_mid's order: the release lists both in one
  order; otherwise rows are matched by image name, each named once."""
  if names == names5:
    return values
  if len(set(names)) != len(names):
    raise ValueError(
        f'{path5} lists other images or another order than {path_tid}, '
        'which names some images twice, so they cannot be matched by name: '
        'use the two files of one release')
  row_of = {}
  for i, n in enumerate(names5):
    if row_of.setdefault(n, i) != i:
      raise ValueError(
          f'{path5}, line {lines5[i]}: image {n!r} already has landmarks on '
          f'line {lines5[row_of[n]]}, and the file is not in the order of '
          f'{path_tid}, so they cannot be matched: use the two files of one '
          'release')
  missing = next((n for n in names if n not in row_of), None)
  if missing is not None:
    raise ValueError(f'{path5} has no landmarks for image {missing!r} of '
                     f'{path_tid}: use the two files of one release')
  return values[[row_of[n] for n in names]]


def _read_pairs(path: pathlib.Path) -> np.ndarray:
  """(P, 3) int64 ``template1 template2 label`` rows; NumPy's C parser
  first (IJB-C has 15.7M lines), a line-by-line scan to name a bad line."""
  _check_exists(path)
  fmt = 'expected "template1 template2 label" (label 0 or 1)'
  # A byte order mark is skipped, as text_lines skips it (utf-8-sig for
  # every file would cost loadtxt half as much time again).
  with open(path, 'rb') as f:
    bom = f.read(3) == b'\xef\xbb\xbf'
  try:
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')  # an empty file warns; checked below
      table = np.loadtxt(path, dtype=np.int64, ndmin=2,
                         encoding='utf-8-sig' if bom else None)
  except ValueError as e:  # UnicodeDecodeError too: name the line
    for n, line in _data_lines(path):
      match = _PAIR_LINE.fullmatch(line)  # lines under 19 characters fit
      if not match or (len(line) >= 19 and not all(map(_is_int64,
                                                        match.groups()))):
        raise ValueError(f'{path}, line {n}: {fmt}, got '
                         f'{textfile.shown(line)}') from None
    raise ValueError(f'{path}: {fmt} on every line ({e})') from None
  if table.shape[0] == 0:
    raise ValueError(f'{path} lists no pairs')
  if table.shape[1] != 3:
    n, line = next(_data_lines(path))
    raise ValueError(f'{path}, line {n}: {fmt}, got {textfile.shown(line)}')
  bad = (table[:, 2] != 0) & (table[:, 2] != 1)
  if bad.any():
    row = int(np.argmax(bad))
    raise ValueError(f'{path}, line {_line_of_row(path, row)}: {fmt}, got '
                     f'label {table[row, 2]}')
  return table


def _line_of_row(path: pathlib.Path, row: int) -> int:
  """The line number of data row ``row`` (blank lines and comments skipped,
  as np.loadtxt skips them)."""
  for i, (n, _) in enumerate(_data_lines(path)):
    if i == row:
      return n
  raise IndexError(row)


# --- Aligned faces ------------------------------------------------------------

def aligned_batches(root: str | os.PathLike, meta: Meta,
                    image_size: int = 112, batch_size: int = 256,
                    workers: int | None = None) -> images.ImageBatches:
  """uint8 (b, S, S, 3) batches of the faces of ROOT/loose_crop aligned on
  their landmarks, in meta order. An image that cannot be read is left out
  of its batch and listed in ``.skipped`` after an iteration (see
  npcface_jax.faces.images); pass that list to ``evaluate``."""
  if len(meta.landmarks) != len(meta.image_names):
    raise ValueError(f'meta has {len(meta.image_names)} images but '
                     f'{len(meta.landmarks)} landmarks')
  folder = pathlib.Path(root) / 'loose_crop'
  if not folder.is_dir():
    raise ValueError(f'no image folder at {folder}: ROOT must be the IJB '
                     'release folder holding meta/ and loose_crop/')
  return images.ImageBatches(meta.image_names.tolist(), image_size,
                             batch_size, root=folder,
                             landmarks=meta.landmarks, workers=workers)


# --- Templates and pairs ------------------------------------------------------

def _as_features(features, what: str) -> np.ndarray:
  x = np.asarray(features)
  if x.ndim != 2:
    raise ValueError(f'{what} must be 2-D (N, D), got shape {x.shape}')
  if not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
    raise ValueError(f'{what} must be real numbers, got dtype {x.dtype}')
  if not np.all(np.isfinite(x)):
    raise ValueError(f'{what} contain NaN or infinity')
  return x


def _normalize_rows(x: np.ndarray) -> np.ndarray:
  """x with unit rows, in place; a zero row stays zero (no NaN)."""
  norms = np.linalg.norm(x, axis=1, keepdims=True)
  x /= np.where(norms > 0, norms, 1)
  return x


def template_features(features, template_ids, media_ids, face_scores=None,
                      valid=None, norms=None) -> tuple[np.ndarray, np.ndarray]:
  """(template ids sorted (T,), float32 (T, D) unit template features).

  As ijb_11.py pools: each image feature L2-normalised, times its face
  score when given; the images of one media within a template averaged
  (a video's frames count once); the template is the sum of its media,
  L2-normalised (a zero sum stays zero). Media ids are per template: one
  media in two templates is pooled separately in each. Rows where ``valid``
  is False (images that could not be read) count as absent: a template
  pools only the rest, and one with none left is a zero vector (score 0).

  ``norms`` (N,), each image's raw embedding norm (quality 'norm'): the
  weight is applied to the images only, each unit feature times its norm
  (times its face score too when both are given), which is the raw
  embedding itself, as ijb_11.py's use_norm_score and MagFace's evaluation
  pool; the media mean and the template sum stay as above, so a media
  counts in its template by its images' mean norm. One or zero image per
  media: the template is the normalised sum of raw embeddings.
  """
  feats = _as_features(features, 'features')
  n = feats.shape[0]
  if n == 0:
    raise ValueError('template_features needs at least one image')
  template_ids, media_ids = np.asarray(template_ids), np.asarray(media_ids)
  for what, a in (('template_ids', template_ids), ('media_ids', media_ids)):
    if a.shape != (n,):
      raise ValueError(f'{what} must have shape ({n},), one per feature row, '
                       f'got {a.shape}')
  face_scores = _image_weights(face_scores, n, 'face_scores', 'finite '
                               'numbers, one detector score per image')
  norms = _image_weights(norms, n, 'norms', 'finite numbers >= 0, one raw '
                         'embedding norm per feature row', nonnegative=True)
  valid = np.ones(n, bool) if valid is None else np.asarray(valid, bool)
  if valid.shape != (n,):
    raise ValueError(f'valid must have shape ({n},), got {valid.shape}')
  templates, t_index = np.unique(template_ids, return_inverse=True)
  _, m_index = np.unique(media_ids, return_inverse=True)
  num_media = int(m_index.max()) + 1
  # One group per (template, media), numbered in template order.
  groups, g_index = np.unique(
      t_index.astype(np.int64) * num_media + m_index,
      return_inverse=True)
  order, bounds = _rank_order(g_index)
  x = _normalize_rows(feats[order].astype(np.float32, copy=False))
  if face_scores is not None:
    x *= face_scores[order][:, None]
  if norms is not None:
    x *= norms[order][:, None]
  x *= valid[order][:, None]
  media = _group_sums(x, g_index[order], bounds)
  g_count = np.bincount(g_index, weights=valid, minlength=len(groups))
  media /= np.maximum(g_count, 1)[:, None].astype(np.float32)
  media_template = groups // num_media
  order, bounds = _rank_order(media_template)
  pooled = _group_sums(media[order], media_template[order], bounds)
  return templates, _normalize_rows(pooled)


def _image_weights(values, n: int, what: str, expected: str, *,
                   nonnegative: bool = False) -> np.ndarray | None:
  """A per-image weight (N,) float32, checked; None stays None."""
  if values is None:
    return None
  values = np.asarray(values, np.float32)
  if (values.shape != (n,) or not np.all(np.isfinite(values))
      or (nonnegative and np.any(values < 0))):
    raise ValueError(f'{what} must be ({n},) {expected}, got shape '
                     f'{values.shape}')
  return values


def _rank_order(group: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(order, bounds) of rows in groups 0..G-1 (each present): ``order``
  sorts the rows by their rank within their group, then by group, so that
  order[bounds[k]:bounds[k + 1]] holds the k-th row of each group that has
  one, in group order (rank 0: every group once, 0..G-1)."""
  by_group = np.argsort(group, kind='stable')
  counts = np.bincount(group)
  rank = np.empty(len(group), np.int64)
  rank[by_group] = np.arange(len(group)) - np.repeat(
      np.cumsum(counts) - counts, counts)
  order = np.lexsort((group, rank))
  bounds = np.concatenate([[0], np.cumsum(np.bincount(rank))])
  return order, bounds


def _group_sums(x: np.ndarray, group: np.ndarray,
                bounds: np.ndarray) -> np.ndarray:
  """(G, D) row sums per group of x in _rank_order's order: one vectorised
  add per rank (no group appears twice in one), as many as the largest
  group has rows; several times faster than np.add.reduceat or np.add.at
  along rows, which NumPy runs a row at a time."""
  out = x[bounds[0]:bounds[1]].copy()
  for lo, hi in zip(bounds[1:-1], bounds[2:]):
    out[group[lo:hi]] += x[lo:hi]
  return out


def pair_indices(template_ids_sorted,
                 pair_templates) -> tuple[np.ndarray, np.ndarray]:
  """(index1, index2): the rows of each pair's two templates among
  template_ids_sorted (as template_features returns them)."""
  ids = np.asarray(template_ids_sorted)
  pairs = np.asarray(pair_templates)
  if ids.ndim != 1 or not np.all(ids[1:] > ids[:-1]):
    raise ValueError('template_ids_sorted must be 1-D, sorted and unique, '
                     'as template_features returns them')
  if pairs.ndim != 2 or pairs.shape[1] != 2:
    raise ValueError(f'pair_templates must be (P, 2), got {pairs.shape}')
  rows = np.searchsorted(ids, pairs)
  found = ids[np.minimum(rows, len(ids) - 1)] == pairs if len(ids) else (
      np.zeros(pairs.shape, bool))
  if not found.all():
    row, col = np.argwhere(~found)[0]
    raise ValueError(f'pair {row} names template {pairs[row, col]}, which '
                     'has no features: pool every template of the pair list')
  return rows[:, 0], rows[:, 1]


def score_pairs(template_features, index1, index2,
                chunk_size: int = 1 << 10) -> np.ndarray:
  """(N,) float32 cosine of rows index1[k] and index2[k], a zero row
  scoring 0; chunk_size pairs at a time, so IJB-C's 15.7M pairs never
  gather two (N, D) matrices. Small chunks are also the fast ones: at
  D = 512, chunks of 1 << 10 pairs (2 x 2 MiB, in cache) ran 3x faster
  than 1 << 16 and 12x faster than 1 << 20 on one CPU core."""
  feats = _as_features(template_features, 'template_features')
  i1, i2 = np.asarray(index1), np.asarray(index2)
  if i1.ndim != 1 or i1.shape != i2.shape:
    raise ValueError(f'index1 and index2 must be 1-D of one length, got '
                     f'shapes {i1.shape} and {i2.shape}')
  if i1.size and not (np.issubdtype(i1.dtype, np.integer)
                      and np.issubdtype(i2.dtype, np.integer)):
    raise ValueError(f'pair indices must be integers, got {i1.dtype} and '
                     f'{i2.dtype}')
  num = feats.shape[0]
  for a in (i1, i2):
    if a.size and (a.min() < 0 or a.max() >= num):
      raise ValueError(f'pair indices must lie in [0, {num}), the rows of '
                       f'template_features; got {a.min()} to {a.max()}')
  if chunk_size <= 0:
    raise ValueError(f'chunk_size must be positive, got {chunk_size}')
  unit = _normalize_rows(feats.astype(np.float32, copy=True))
  out = np.empty(i1.shape[0], np.float32)
  for start in range(0, i1.shape[0], chunk_size):
    stop = start + chunk_size
    out[start:stop] = np.einsum('ij,ij->i', unit[i1[start:stop]],
                                unit[i2[start:stop]])
  return np.clip(out, -1.0, 1.0, out=out)


# --- The protocol -------------------------------------------------------------

def evaluate(features, meta: Meta, use_face_scores: bool = False,
             fars=protocols.FARS, skipped=(), norms=None) -> dict:
  """IJB 1:1 verification of image features in meta order.

  ``features`` (K, D): one row per image of the meta that was read, in meta
  order; ``skipped``: the meta rows of the images that could not be (ints,
  or the Skipped records of aligned_batches), which are left out of their
  templates (template_features' ``valid``). A template none of whose images
  could be read pools to a zero vector: every pair it is in scores 0 and
  still counts (a genuine pair missed at any positive threshold), as
  'num_empty_templates' reports.

  Returns 'tar_at_far' (protocols.tar_at_far), 'auc', 'num_pairs',
  'num_genuine', 'num_impostors', 'num_templates', 'num_empty_templates',
  and the float32 'scores' and bool 'labels' of every pair for a ROC
  (arrays: strip them before writing JSON). use_face_scores weighs images by
  detector score (insightface's use_detector_score); ``norms`` (K,), the
  raw embedding norm of each feature row, weighs them by that norm
  (template_features; both given: the product of the two weights).
  """
  feats = _as_features(features, 'features')
  n = len(meta.image_names)
  valid = np.ones(n, bool)
  valid[[int(getattr(k, 'index', k)) for k in skipped]] = False
  if feats.shape[0] != valid.sum():
    unread = f' ({n} less {n - valid.sum()} unreadable)' * (not valid.all())
    raise ValueError(f'{feats.shape[0]} feature rows for {valid.sum()} '
                     f'images{unread} of {meta.name}: embed every readable '
                     'image of the meta, in its order')
  if not valid.any():
    raise ValueError(f'none of the {n} images of {meta.name} could be read')
  full = np.zeros((n, feats.shape[1]), feats.dtype)
  full[valid] = feats
  full_norms = None
  if norms is not None:
    norms = np.asarray(norms)
    if norms.shape != (feats.shape[0],):
      raise ValueError(f'norms must have one entry per feature row, shape '
                       f'({feats.shape[0]},), got {norms.shape}')
    full_norms = np.zeros(n, np.float32)
    full_norms[valid] = norms
  templates, pooled = template_features(
      full, meta.template_ids, meta.media_ids,
      meta.face_scores if use_face_scores else None, valid, full_norms)
  index1, index2 = pair_indices(templates, meta.pair_templates)
  scores = score_pairs(pooled, index1, index2)
  labels = np.asarray(meta.pair_labels, bool)
  num_genuine = int(labels.sum())
  return {
      'tar_at_far': protocols.tar_at_far(scores, labels, fars),
      'auc': protocols.auc(scores, labels),
      'num_pairs': int(labels.size),
      'num_genuine': num_genuine,
      'num_impostors': int(labels.size) - num_genuine,
      'num_templates': int(len(templates)),
      'num_empty_templates': int(len(templates) - len(
          np.unique(meta.template_ids[valid]))),
      'scores': scores,
      'labels': labels,
  }
