"""LFW-style pair verification: cosine similarity per pair, the best
threshold on a set of pairs, and the k-fold accuracy that LFW, AgeDB-30,
CFP-FP and the other insightface ``.bin`` sets report.

Pure NumPy on embeddings already computed, so that the protocol is exact,
testable on its own and free of JAX or TensorFlow. Each fold's threshold is
chosen exactly among the training similarities (sort and cumulative counts)
rather than on a grid, so the result does not depend on a grid's spacing.
The folds are chosen in one place, fold_assignment: a file's declared sets,
file order where the file is laid out as LFW's, label-balanced otherwise.
"""

from __future__ import annotations

import operator
from typing import NamedTuple

import numpy as np


def pair_similarities(embeddings) -> np.ndarray:
  """Cosine similarity (N,) float64 of pairs (rows 2k, 2k + 1) of embeddings
  (2N, D): the order of insightface ``.bin`` files (bin_format.py).

  Rows are normalised first; a zero row has similarity 0 with anything
  rather than NaN, so a dead embedding counts as a miss, not a crash.
  """
  x = np.asarray(embeddings)
  if x.ndim != 2:
    raise ValueError(f'embeddings must be 2-D (2N, D), got shape {x.shape}')
  if x.shape[0] % 2:
    raise ValueError(f'embeddings must have an even number of rows (pairs '
                     f'are rows 2k and 2k + 1), got {x.shape[0]}')
  if not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
    raise ValueError(f'embeddings must be real numbers, got dtype {x.dtype}')
  x = x.astype(np.float64)
  if not np.all(np.isfinite(x)):
    raise ValueError('embeddings contain NaN or infinity')
  # Divide by the largest entry first so that the norm cannot overflow.
  scale = np.max(np.abs(x), axis=1, keepdims=True) if x.shape[1] else (
      np.zeros((x.shape[0], 1)))
  x = x / np.where(scale > 0, scale, 1.0)
  norm = np.linalg.norm(x, axis=1, keepdims=True)
  x = x / np.where(norm > 0, norm, 1.0)
  sim = np.sum(x[0::2] * x[1::2], axis=1)
  return np.clip(sim, -1.0, 1.0)


def _as_issame(issame, n: int) -> np.ndarray:
  """issame as a bool array (n,); accepts bools or numbers that are 0 / 1."""
  same = np.asarray(issame)
  if same.ndim != 1:
    raise ValueError(f'issame must be 1-D, got shape {same.shape}')
  if same.shape[0] != n:
    raise ValueError(f'similarity and issame differ in length: {n} pairs '
                     f'but {same.shape[0]} labels')
  if same.dtype == bool:
    return same
  if (np.issubdtype(same.dtype, np.number) and not np.iscomplexobj(same)
      and np.all((same == 0) | (same == 1))):
    return same.astype(bool)
  raise ValueError('issame must be boolean (or numbers that are all 0 or 1), '
                   f'got dtype {same.dtype}')


def _as_similarity(similarity) -> np.ndarray:
  """similarity as a finite float64 array (N,), so that sorting is total."""
  sim = np.asarray(similarity)
  if sim.ndim != 1:
    raise ValueError(f'similarity must be 1-D, got shape {sim.shape}')
  if not np.issubdtype(sim.dtype, np.number) or np.iscomplexobj(sim):
    raise ValueError(f'similarity must be real numbers, got dtype {sim.dtype}')
  sim = sim.astype(np.float64)
  if not np.all(np.isfinite(sim)):
    raise ValueError('similarity contains NaN or infinity')
  return sim


def _best_threshold(sim: np.ndarray, same: np.ndarray) -> tuple[float, int]:
  """(threshold, number correct) on validated arrays; see best_threshold."""
  n = sim.shape[0]
  order = np.argsort(sim, kind='stable')
  sorted_sim = sim[order]
  cum_same = np.cumsum(same[order])              # same pairs among the i + 1
  cum_diff = np.arange(1, n + 1) - cum_same      # smallest similarities
  num_same = int(cum_same[-1])
  # The last index of each run of equal values: threshold = that value
  # predicts "different" for it and everything below it.
  last = np.flatnonzero(np.append(sorted_sim[1:] != sorted_sim[:-1], True))
  correct = np.concatenate(
      [[num_same], cum_diff[last] + (num_same - cum_same[last])])
  best = int(np.argmax(correct))  # the first maximum: the smallest candidate
  threshold = -np.inf if best == 0 else float(sorted_sim[last[best - 1]])
  return threshold, int(correct[best])


def best_threshold(similarity, issame) -> tuple[float, float]:
  """(threshold, accuracy) maximising the accuracy of "same iff similarity >
  threshold" on these pairs.

  The candidates are -inf (everything "same") and each distinct similarity:
  any other threshold classifies like the largest candidate below it. Ties
  go to the smallest candidate. Exact, O(N log N).
  """
  sim = _as_similarity(similarity)
  same = _as_issame(issame, sim.shape[0])
  if sim.shape[0] == 0:
    raise ValueError('best_threshold needs at least one pair')
  threshold, correct = _best_threshold(sim, same)
  return threshold, correct / sim.shape[0]


def kfold_bounds(num_pairs: int, num_folds: int) -> list[tuple[int, int]]:
  """[start, stop) of each contiguous, unshuffled fold, sized as sklearn's
  ``KFold(num_folds, shuffle=False)`` sizes them (the first num_pairs %
  num_folds folds one larger), as the LFW protocol and insightface use."""
  num_folds = _check_num_folds(num_folds)
  if num_pairs < num_folds:
    raise ValueError(f'{num_folds} folds need at least {num_folds} pairs, '
                     f'got {num_pairs}')
  size, extra = divmod(num_pairs, num_folds)
  bounds, start = [], 0
  for f in range(num_folds):
    stop = start + size + (f < extra)
    bounds.append((start, stop))
    start = stop
  return bounds


def check_integer(value, name: str, minimum: int) -> int:
  """value as an int (NumPy integers too; not bools nor floats), at least
  ``minimum``; else a ValueError naming ``name``."""
  if isinstance(value, (bool, np.bool_)):
    raise ValueError(f'{name} must be an integer, got {value!r}')
  try:
    value = operator.index(value)
  except TypeError:
    raise ValueError(f'{name} must be an integer, got {value!r}') from None
  if value < minimum:
    raise ValueError(f'{name} must be at least {minimum}, got {value}')
  return value


def _check_num_folds(num_folds) -> int:
  return check_integer(num_folds, 'num_folds', 2)


# --- Folds ------------------------------------------------------------------

FOLD_RULES = ('declared', 'file order', 'label-balanced')


class Folds(NamedTuple):
  """The fold of each pair, and the rule that chose it (FOLD_RULES)."""
  index: np.ndarray  # (N,) int, each fold 0 .. count - 1 holding a pair
  rule: str

  @property
  def count(self) -> int:
    return int(self.index.max()) + 1


def file_order_folds(num_pairs: int, num_folds: int = 10) -> Folds:
  """Contiguous folds in file order (kfold_bounds): the LFW protocol on
  files laid out for it."""
  index = np.empty(num_pairs, np.int64)
  for f, (start, stop) in enumerate(kfold_bounds(num_pairs, num_folds)):
    index[start:stop] = f
  return Folds(index, 'file order')


def label_balanced_folds(issame, num_folds: int = 10) -> Folds:
  """Fold k = the k-th of num_folds contiguous groups (in file order) of
  the same pairs, plus the k-th of the different pairs, so that every fold
  holds both labels in the file's proportions, whatever the file's order.

  Deterministic rather than shuffled: a seed would make the accuracy of
  one set of scores a random number, two evaluations of one checkpoint
  could disagree, and a file laid out in LFW's blocks would not get LFW's
  folds back. Groups of a label are sized as kfold_bounds sizes them, the
  different pairs' larger groups on the folds after the same pairs' ones
  (wrapping round), so
  that fold sizes differ by at most one and none is empty.
  """
  same = _labels(issame)
  num_folds = _check_num_folds(num_folds)
  kfold_bounds(same.shape[0], num_folds)  # enough pairs, or say so
  index = np.empty(same.shape[0], np.int64)
  offset = 0
  for members in (np.flatnonzero(same), np.flatnonzero(~same)):
    size, extra = divmod(members.shape[0], num_folds)
    sizes = np.full(num_folds, size)
    sizes[(offset + np.arange(extra)) % num_folds] += 1
    index[members] = np.repeat(np.arange(num_folds), sizes)
    offset = (offset + extra) % num_folds
  return Folds(index, 'label-balanced')


def declared_folds(issame, sets: int, per_set: int) -> Folds:
  """The folds an LFW pairs.txt header "sets per_set" declares: ``sets``
  sets, each ``per_set`` same pairs then ``per_set`` different ones, one
  fold per set. ValueError where the labels do not follow the header."""
  same = _labels(issame)
  sets = check_integer(sets, 'the number of declared sets', 2)
  per_set = check_integer(per_set, 'the declared pairs per set', 1)
  block = np.repeat([True, False], per_set)
  declared = f'{sets} sets of {per_set} same then {per_set} different pairs'
  if same.shape[0] != sets * 2 * per_set:
    raise ValueError(f'the header declares {declared} ({sets * 2 * per_set}'
                     f' pairs) but there are {same.shape[0]}; fix the '
                     'header or the pairs')
  wrong = np.flatnonzero(same != np.tile(block, sets))
  if wrong.size:
    label = 'same' if same[wrong[0]] else 'different'
    raise ValueError(f'the header declares {declared}, but pair '
                     f'{wrong[0] + 1} is {label}; fix the header or the '
                     'order of the pairs')
  return Folds(np.arange(same.shape[0]) // (2 * per_set), 'declared')


def fold_assignment(issame, num_folds: int = 10,
                    declared: tuple[int, int] | None = None) -> Folds:
  """The folds of the k-fold protocol, the one place that chooses them.

  A pairs.txt header "S N" (``declared``) is the file's own word: its S
  sets are the folds, however many. Without one (a .bin has no header),
  file order where every contiguous fold holds as many same pairs as every
  other, and as many different ones (LFW and the insightface .bin files
  made from it: 300 + 300 per tenth); there label-balanced folds are the
  very same folds. Anything else, e.g. LFW's pairsDevTest.txt (500 same
  then 500 different), would put one label in each file-order fold and
  each threshold would be chosen on the wrong pairs: label-balanced.
  """
  if declared is not None:
    return declared_folds(issame, *declared)
  same = _labels(issame)
  bounds = kfold_bounds(same.shape[0], num_folds)
  if len({(stop - start, int(same[start:stop].sum()))
          for start, stop in bounds}) == 1:
    return file_order_folds(same.shape[0], num_folds)
  return label_balanced_folds(same, num_folds)


def fold_note(result: dict) -> str | None:
  """How a result's accuracy was folded, e.g. '10 label-balanced folds';
  None for results without folds (other kinds of set, and results.json
  files from before the rule was recorded, which took 10 in file order)."""
  rule, count = result.get('fold_rule'), result.get('num_folds')
  if rule not in FOLD_RULES or type(count) is not int:
    return None
  return (f'{count} folds in file order' if rule == 'file order'
          else f'{count} {rule} folds')


def _labels(issame) -> np.ndarray:
  same = np.asarray(issame)
  return _as_issame(same, same.shape[0] if same.ndim else 0)


def _check_folds(folds, n: int) -> Folds:
  """folds as verification_accuracy needs them: a fold per pair, at least
  two, none empty (an empty fold has no accuracy)."""
  if not isinstance(folds, Folds):
    raise ValueError(f'folds must be a protocols.Folds (fold_assignment), '
                     f'got {type(folds).__name__}')
  index = np.asarray(folds.index)
  if index.shape != (n,) or not np.issubdtype(index.dtype, np.integer):
    raise ValueError(f'folds must give an integer fold to each of the {n} '
                     f'pairs, got shape {index.shape}, dtype {index.dtype}')
  counts = np.bincount(index) if n and index.min() >= 0 else np.zeros(0)
  if counts.shape[0] < 2 or not counts.all():
    raise ValueError('folds must number their folds 0, 1, ... with at least '
                     'two, each holding a pair; use fold_assignment')
  return Folds(index, folds.rule)


def verification_accuracy(similarity, issame, num_folds: int = 10,
                          folds: Folds | None = None) -> dict:
  """k-fold verification accuracy: each fold is tested at the best threshold
  of the other folds (best_threshold), so no pair picks its own threshold.
  The folds are ``folds``, else fold_assignment's of ``num_folds``.

  Returns a dict with 'accuracy' (mean of the folds' test accuracies),
  'accuracy_std' (their np.std, ddof=0, as insightface reports it),
  'fold_accuracies' and 'fold_thresholds' (lists of floats, one per fold),
  'threshold': the mean of the folds' finite thresholds, or -inf when
  every fold chose -inf (its training pairs were all best called "same"),
  and 'fold_rule' and 'num_folds': which folds (FOLD_RULES), how many.
  """
  sim = _as_similarity(similarity)
  same = _as_issame(issame, sim.shape[0])
  folds = (fold_assignment(same, num_folds) if folds is None
           else _check_folds(folds, sim.shape[0]))
  accuracies, thresholds = [], []
  for f in range(folds.count):
    test = folds.index == f
    threshold, _ = _best_threshold(sim[~test], same[~test])
    predicted = sim[test] > threshold
    accuracies.append(float(np.mean(predicted == same[test])))
    thresholds.append(threshold)
  finite = [t for t in thresholds if np.isfinite(t)]
  return {
      'accuracy': float(np.mean(accuracies)),
      'accuracy_std': float(np.std(accuracies)),
      'threshold': float(np.mean(finite)) if finite else -np.inf,
      'fold_accuracies': accuracies,
      'fold_thresholds': thresholds,
      'fold_rule': folds.rule,
      'num_folds': folds.count,
  }


# --- Accuracy on the lowest-quality pairs ------------------------------------

def pair_quality(image_quality) -> np.ndarray:
  """(N,) float64 quality of pairs (rows 2k, 2k + 1) from a quality per
  image (2N,): the smaller of the two, as a pair is as hard as its worse
  face."""
  q = np.asarray(image_quality)
  if q.ndim != 1 or q.shape[0] % 2:
    raise ValueError(f'image quality must be 1-D with an even length (pairs '
                     f'are rows 2k and 2k + 1), got shape {q.shape}')
  q = _as_similarity(q) if q.size else q.astype(np.float64)
  return np.minimum(q[0::2], q[1::2])


def lowest_quality_accuracy(similarity, issame, quality, folds: Folds,
                            fold_thresholds, fraction: float = 0.1) -> dict:
  """The accuracy of the ceil(fraction * N) pairs of lowest ``quality``
  (ties in file order), each tested at the threshold its fold was tested
  at in the whole set's k-fold protocol (``fold_thresholds``, one per
  fold, as verification_accuracy returns them): the thresholds are the
  whole set's, chosen on every quality, so this says how the decisions
  the set would make fare on its worst faces, not how well those faces
  could be separated on their own.

  Returns 'accuracy', 'pairs', 'genuine' (same pairs among them),
  'quality_min' and 'quality_max' (the range of their quality).
  """
  sim = _as_similarity(similarity)
  same = _as_issame(issame, sim.shape[0])
  q = _as_similarity(quality)
  if q.shape != sim.shape:
    raise ValueError(f'quality must have one value per pair, {sim.shape[0]}'
                     f', got {q.shape[0]}')
  folds = _check_folds(folds, sim.shape[0])
  thresholds = np.asarray(fold_thresholds, np.float64)
  if thresholds.shape != (folds.count,) or np.any(np.isnan(thresholds)):
    raise ValueError(f'fold_thresholds must give a number to each of the '
                     f'{folds.count} folds, got shape {thresholds.shape}')
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f'fraction must lie in (0, 1], got {fraction}')
  k = int(np.ceil(fraction * sim.shape[0] * (1 - 1e-12)))
  low = np.argsort(q, kind='stable')[:max(k, 1)]
  predicted = sim[low] > thresholds[folds.index[low]]
  return {'accuracy': float(np.mean(predicted == same[low])),
          'pairs': int(low.size), 'genuine': int(same[low].sum()),
          'quality_min': float(q[low].min()),
          'quality_max': float(q[low].max())}


# --- ROC, TAR at FAR, AUC ---------------------------------------------------

# The false accept rates the benchmarks report (BLUFR, IJB-B/C, MegaFace).
FARS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)


def impostors_accepted(far: float, num_impostors: int) -> int:
  """k = floor(far * num_impostors): how many impostor pairs FAR ``far``
  lets through (the product nudged up so that 0.1 * 30 counts as 3)."""
  if not 0.0 < far <= 1.0:
    raise ValueError(f'a false accept rate must lie in (0, 1], got {far}')
  return int(np.floor(far * num_impostors * (1 + 1e-12)))


def far_threshold(top_impostors, num_impostors: int, far: float):
  """The threshold of "accept iff similarity > t" that accepts at most
  ``far`` of ``num_impostors`` impostor pairs and as many genuine pairs as
  possible: the (k + 1)-th largest impostor similarity, k =
  impostors_accepted(far, num_impostors); -inf when k is every impostor.

  ``top_impostors`` needs only the k + 1 largest impostor similarities (in
  any order), so a caller scoring a billion impostors in chunks keeps just
  those. None when the pair count cannot measure ``far`` (k < 1: not even
  one impostor may pass, so the rate is not resolved).
  """
  k = impostors_accepted(far, num_impostors)
  if k < 1:
    return None
  if k >= num_impostors:
    return -np.inf
  top = np.asarray(top_impostors, np.float64).ravel()
  if top.shape[0] < k + 1:
    raise ValueError(f'FAR {far:g} of {num_impostors} impostors needs the '
                     f'{k + 1} largest impostor similarities, got '
                     f'{top.shape[0]}')
  return float(-np.partition(-top, k)[k])


def tar_at_far(similarity, issame, fars=FARS) -> list[dict]:
  """TAR at each FAR the pair count supports (at least one impostor may
  pass): the largest true accept rate of any threshold whose false accept
  rate is at most ``far``, exactly (no interpolation along a sampled ROC).

  Returns [{'far', 'tar', 'threshold', 'false_accepts'}] in the order of
  ``fars``, leaving out the unsupported ones.
  """
  sim = _as_similarity(similarity)
  same = _as_issame(issame, sim.shape[0])
  genuine, impostor = sim[same], sim[~same]
  if not genuine.size or not impostor.size:
    raise ValueError(f'TAR at FAR needs genuine and impostor pairs, got '
                     f'{genuine.size} and {impostor.size}')
  impostor = np.sort(impostor)[::-1]
  out = []
  for far in fars:
    t = far_threshold(impostor, impostor.size, far)
    if t is None:
      continue
    out.append({'far': float(far), 'tar': float(np.mean(genuine > t)),
                'threshold': t,
                'false_accepts': int(np.sum(impostor > t))})
  return out


def roc_curve(similarity, issame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(far, tar, thresholds) at every distinct similarity, from accepting
  nothing to accepting everything: pair i is accepted at threshold t iff
  similarity > t. Exact, O(N log N)."""
  sim = _as_similarity(similarity)
  same = _as_issame(issame, sim.shape[0])
  num_same, num_diff = int(same.sum()), int((~same).sum())
  if not num_same or not num_diff:
    raise ValueError(f'a ROC needs genuine and impostor pairs, got '
                     f'{num_same} and {num_diff}')
  order = np.argsort(-sim, kind='stable')
  sorted_sim = sim[order]
  true_acc = np.cumsum(same[order])
  false_acc = np.arange(1, sim.shape[0] + 1) - true_acc
  # thresholds[j] accepts exactly the first j runs of equal values.
  last = np.flatnonzero(np.append(sorted_sim[1:] != sorted_sim[:-1], True))
  tar = np.append(0, true_acc[last]) / num_same
  far = np.append(0, false_acc[last]) / num_diff
  thresholds = np.append(sorted_sim[last], -np.inf)
  return far, tar, thresholds


def roc_points(similarity, issame, max_points: int = 256) -> dict:
  """The ROC as {'far': [...], 'tar': [...], 'threshold': [...]} of at most
  ``max_points`` exact vertices of roc_curve, spread evenly over log FAR
  (the axis ROC figures use), so that results.json can hold it, runs can be
  drawn together later and identify can take the threshold at any FAR
  (threshold_at_far). The last vertex of FAR 0 (the highest impostor
  similarity: the strictest bar the pairs can measure) is always kept."""
  return thin_roc(*roc_curve(similarity, issame), max_points)


def thin_roc(far, tar, thresholds, max_points: int = 256) -> dict:
  """roc_points of a curve roc_curve already gave, to use one curve twice
  (evaluate draws it and keeps its points)."""
  if len(far) > max_points:
    levels = np.geomspace(far[far > 0].min(), 1.0, max_points - 3)
    keep = np.searchsorted(far, np.append(0.0, levels), side='right') - 1
    keep = np.unique(np.concatenate([[0], keep, [len(far) - 1]]))
    far, tar, thresholds = far[keep], tar[keep], thresholds[keep]
  return {'far': far.tolist(), 'tar': tar.tolist(),
          'threshold': thresholds.tolist()}


class FarThreshold(NamedTuple):
  """A threshold read off an ROC at a target false accept rate."""
  threshold: float  # accept iff similarity > threshold
  far: float  # the FAR the ROC measured at it
  tar: float  # and the TAR
  lowest_far: float  # the smallest positive FAR among the points
  resolved: bool  # the points measure FARs as low as the target


def threshold_at_far(far, tar, thresholds, target: float) -> FarThreshold:
  """The most accepting ROC point whose FAR is at most ``target``, the
  points (far, tar, threshold) being vertices of roc_curve (all of them, or
  those roc_points keeps) or tar_at_far's rows.

  On roc_curve's vertices this is exactly tar_at_far's threshold, the
  (k + 1)-th largest impostor similarity; on fewer points, the nearest one
  at or below the target, never more accepting. Where the target lies below
  every positive FAR the points measure (too few impostor pairs to resolve
  it), it is the strictest point, and ``resolved`` is False.
  """
  if not 0.0 < target <= 1.0:
    raise ValueError(f'a false accept rate must lie in (0, 1], got {target}')
  far, tar, th = (np.asarray(a, np.float64).ravel()
                  for a in (far, tar, thresholds))
  if not far.size or not far.shape == tar.shape == th.shape:
    raise ValueError(f'an ROC needs as many FARs, TARs and thresholds, and '
                     f'at least one, got {far.size}, {tar.size}, {th.size}')
  if not (np.all(np.isfinite(far)) and np.all((far >= 0) & (far <= 1))
          and not np.any(np.isnan(th))):
    raise ValueError('ROC FARs must lie in [0, 1] and thresholds be numbers')
  positive = far[far > 0]
  lowest = float(positive.min()) if positive.size else 1.0
  below = far <= target
  if not below.any():
    below = far == far.min()
  # Among the candidates, the lowest threshold accepts the most.
  i = int(np.flatnonzero(below)[np.argmin(th[below])])
  return FarThreshold(float(th[i]), float(far[i]), float(tar[i]), lowest,
                      bool(target >= lowest))


def auc(similarity, issame) -> float:
  """Area under the ROC: the chance that a random genuine pair scores above
  a random impostor pair, ties counting one half (Mann-Whitney U)."""
  sim = _as_similarity(similarity)
  same = _as_issame(issame, sim.shape[0])
  genuine, impostor = sim[same], np.sort(sim[~same])
  if not genuine.size or not impostor.size:
    raise ValueError(f'an AUC needs genuine and impostor pairs, got '
                     f'{genuine.size} and {impostor.size}')
  below = np.searchsorted(impostor, genuine, side='left')
  ties = np.searchsorted(impostor, genuine, side='right') - below
  return float((below.sum() + 0.5 * ties.sum())
               / (genuine.size * impostor.size))


def verification_report(similarity, issame, num_folds: int = 10,
                        fars=FARS, folds: Folds | None = None) -> dict:
  """Everything results.json records for a labelled pair set: k-fold
  accuracy (verification_accuracy, its fold rule included), TAR at the
  supported FARs and AUC."""
  report = verification_accuracy(similarity, issame, num_folds, folds)
  report['tar_at_far'] = tar_at_far(similarity, issame, fars)
  report['auc'] = auc(similarity, issame)
  return report
