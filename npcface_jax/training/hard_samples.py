"""Hard-sample statistics of training, the measurements behind the paper's
Figs. 3, 5, 6 and 7, summarised on the host from what each train step
already computed (train_step.py's 'hard_samples': (B,) per sample, never
(B, C)).

Definitions (every record states its margin):
- a sample is *mis-classified* when some negative class's cosine is above
  cos(theta_y + m), m = config.analysis_margin: MV-softmax's hard-sample
  test and NPCFace's mask (classifier.misclassified); the rest are
  *well-classified*;
- *distance* to a centre is the angle between the embedding and the class
  weight, in degrees (theta = arccos cos), the geodesic distance on the
  sphere that angular margins are added to;
- Fig. 3: Pearson's r, over the mis-classified samples, between the angle
  to the ground-truth centre and the angle to the nearest other centre;
- Fig. 5/6: histograms of the cosine to the ground-truth centre of the
  mis- and well-classified samples, and their overlap rate: the
  overlapping coefficient sum_b min(p_b, q_b) of the two histograms, each
  normalised to sum 1 (1: the same distribution, 0: disjoint);
- Fig. 7: histogram of the mis-classified samples' cosine to the nearest
  other centre;
- the embeddings' norms (MagFace's Fig. 2; MagFace's and AdaFace's
  quality score, recorded for every head): a histogram over NORM_EDGES,
  log-spaced (norms span decades between backbones and heads), their mean
  and std, and the mean norm of the mis- and of the well-classified
  samples. Records written before norms were recorded lack these keys.
One record summarises every sample of the training batches since the
previous record (an epoch by default), with the weights as they were at
each batch, like the training accuracy. Records go to
workdir/analysis/stats.jsonl; the training curves (loop.py's log) to
workdir/analysis/metrics.jsonl.
"""

from __future__ import annotations

import os

import numpy as np

from npcface_jax.common import jsonfile

STATS, METRICS = 'stats.jsonl', 'metrics.jsonl'
NUM_BINS = 200  # over cosines [-1, 1]: 0.01 wide
EDGES = np.linspace(-1.0, 1.0, NUM_BINS + 1)
SCATTER = 256  # the window's last mis-classified samples kept for a scatter
HISTOGRAMS = ('target_well', 'target_misclassified', 'nearest_misclassified')
NORM_BINS = 240  # 40 a decade, log-spaced over [NORM_LOW, NORM_HIGH]
NORM_LOW, NORM_HIGH = 1e-2, 1e4
NORM_EDGES = np.geomspace(NORM_LOW, NORM_HIGH, NORM_BINS + 1)
NORM_MEANS = ('mean_norm', 'std_norm', 'mean_norm_misclassified',
              'mean_norm_well')


def path(workdir: str, name: str = STATS) -> str:
  return os.path.join(workdir, 'analysis', name)


def histogram(values: np.ndarray) -> np.ndarray:
  """Counts (NUM_BINS,) int64 of cosines over EDGES (1.0 in the last)."""
  return np.histogram(np.clip(values, -1.0, 1.0), EDGES)[0].astype(np.int64)


def norm_edges(bins) -> np.ndarray | None:
  """The log-spaced edges a record's 'norm_bins' [low, high, count] states;
  None when they are no such thing."""
  try:
    low, high, count = (float(b) for b in bins)
  except (TypeError, ValueError):
    return None
  if not (0 < low < high < np.inf and 1 <= count <= 10_000
          and count == int(count)):
    return None
  return np.geomspace(low, high, int(count) + 1)


def norm_histogram(values: np.ndarray) -> np.ndarray:
  """Counts (NORM_BINS,) int64 of norms over NORM_EDGES, those outside in
  the first or last bin."""
  return np.histogram(np.clip(values, NORM_LOW, NORM_HIGH), NORM_EDGES
                      )[0].astype(np.int64)


def overlap_rate(a, b) -> float | None:
  """The overlapping coefficient of two histograms' distributions; None
  when either is empty."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.sum() <= 0 or b.sum() <= 0:
    return None
  return float(np.minimum(a / a.sum(), b / b.sum()).sum())


def pearson(sums) -> float | None:
  """Pearson's r from (n, sum x, sum y, sum xx, sum yy, sum xy); None
  under two samples or with a constant variable."""
  n, sx, sy, sxx, syy, sxy = (float(v) for v in sums)
  vx, vy = n * sxx - sx * sx, n * syy - sy * sy
  if n < 2 or vx <= 0 or vy <= 0:
    return None
  return float(np.clip((n * sxy - sx * sy) / np.sqrt(vx * vy), -1.0, 1.0))


def degrees(cos: np.ndarray) -> np.ndarray:
  return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


class Window:
  """The statistics of the samples since the last record, in float64."""

  def __init__(self, first_step: int):
    self.first_step = first_step
    self.samples = self.dropped = 0
    self.hist = {k: np.zeros(NUM_BINS, np.int64) for k in HISTOGRAMS}
    self.cos_sums = dict.fromkeys(HISTOGRAMS, 0.0)
    self.angle_sums = np.zeros(6)  # n, x, y, xx, yy, xy over mis-classified
    self.scatter = np.zeros((0, 2))
    self.norms = None  # (histogram, [n, sum, sum of squares], mis, well)

  def add(self, cos_target, cos_nearest, misclassified, norm=None) -> None:
    """One batch's per-sample values, the embeddings' norms optional; a
    sample with a non-finite one (a step whose loss was not finite, a
    classifier without negatives) is dropped and counted."""
    c_y = np.asarray(cos_target, np.float64).ravel()
    near = np.asarray(cos_nearest, np.float64).ravel()
    mis = np.asarray(misclassified, bool).ravel()
    ok = np.isfinite(c_y) & np.isfinite(near)
    if norm is not None:
      norm = np.asarray(norm, np.float64).ravel()
      ok &= np.isfinite(norm)
    self.dropped += int(np.sum(~ok))
    c_y, near, mis = c_y[ok], near[ok], mis[ok]
    self.samples += len(c_y)
    if norm is not None:
      self._add_norms(norm[ok], mis)
    for key, values in zip(HISTOGRAMS, (c_y[~mis], c_y[mis], near[mis])):
      self.hist[key] += histogram(values)
      self.cos_sums[key] += float(values.sum())
    x, y = degrees(c_y[mis]), degrees(near[mis])
    self.angle_sums += [len(x), x.sum(), y.sum(), x @ x, y @ y, x @ y]
    self.scatter = np.concatenate([self.scatter, np.stack([x, y], 1)]
                                  )[-SCATTER:]

  def _add_norms(self, norm: np.ndarray, mis: np.ndarray) -> None:
    if self.norms is None:
      self.norms = (np.zeros(NORM_BINS, np.int64), np.zeros(3),
                    np.zeros(2), np.zeros(2))
    hist, sums, mis_sums, well_sums = self.norms
    hist += norm_histogram(norm)
    sums += [len(norm), norm.sum(), norm @ norm]
    mis_sums += [mis.sum(), norm[mis].sum()]
    well_sums += [(~mis).sum(), norm[~mis].sum()]

  def _norm_record(self) -> dict:
    """The norm keys of a record; none when no batch gave norms."""
    if self.norms is None:
      return {}
    hist, (n, total, squares), mis, well = self.norms
    mean = lambda sums: float(sums[1] / sums[0]) if sums[0] else None  # noqa: E731
    std = (float(np.sqrt(max(squares / n - (total / n) ** 2, 0.0)))
           if n else None)
    return {'mean_norm': mean((n, total)), 'std_norm': std,
            'mean_norm_misclassified': mean(mis),
            'mean_norm_well': mean(well),
            'norm_bins': [NORM_LOW, NORM_HIGH, NORM_BINS],
            'norm_hist': hist.tolist()}

  def record(self, step: int, epoch: float, margin: float) -> dict:
    """The window as one stats.jsonl record."""
    mis = int(self.angle_sums[0])
    means = {f'mean_cos_{k}': (self.cos_sums[k] / self.hist[k].sum()
                               if self.hist[k].sum() else None)
             for k in HISTOGRAMS}
    return {
        'step': step, 'epoch': epoch, 'first_step': self.first_step,
        'margin': margin, 'samples': self.samples, 'misclassified': mis,
        'misclassified_share': mis / self.samples if self.samples else None,
        'dropped': self.dropped, 'pearson': pearson(self.angle_sums),
        'overlap': overlap_rate(self.hist['target_well'],
                                self.hist['target_misclassified']),
        **means, 'bins': [-1.0, 1.0, NUM_BINS],
        'hist': {k: v.tolist() for k, v in self.hist.items()},
        'scatter_degrees': np.round(self.scatter, 3).tolist(),
        **self._norm_record()}


def tensorboard(record: dict) -> tuple[dict, dict]:
  """(scalars, histogram values) of a record for clu's writer, named
  'analysis/...'; a histogram's values are its bin centres, repeated by
  their counts."""
  scalars = {f'analysis/{k}': record[k] for k in (
      'misclassified_share', 'pearson', 'overlap',
      *(f'mean_cos_{h}' for h in HISTOGRAMS), *NORM_MEANS)
      if record.get(k) is not None}
  centres = (EDGES[1:] + EDGES[:-1]) / 2
  values = {f'analysis/cos_{k}': np.repeat(centres, record['hist'][k])
            for k in HISTOGRAMS if sum(record['hist'][k])}
  return scalars, values


def _number(value, allow_none: bool = False) -> bool:
  if value is None:
    return allow_none
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and np.isfinite(value))


def _counts(value, size: int = NUM_BINS) -> bool:
  return (isinstance(value, list) and len(value) == size
          and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0
                  for c in value))


def check_stats(record: dict) -> str | None:
  """What makes ``record`` no stats.jsonl record of ours, or None."""
  if not all(_number(record.get(k)) for k in ('epoch', 'margin')):
    return '"epoch" and "margin" must be numbers'
  if not all(_number(record.get(k), allow_none=True) for k in (
      'pearson', 'overlap', 'misclassified_share',
      *(f'mean_cos_{h}' for h in HISTOGRAMS), *NORM_MEANS)):
    return 'a statistic is neither a number nor null'
  if 'norm_hist' in record or 'norm_bins' in record:
    edges = norm_edges(record.get('norm_bins'))
    if edges is None or not _counts(record.get('norm_hist'), len(edges) - 1):
      return ('"norm_hist" must hold the counts of the bins "norm_bins" '
              '[low, high, count] states')
  hist = record.get('hist')
  if not isinstance(hist, dict) or not all(_counts(hist.get(k))
                                           for k in HISTOGRAMS):
    return f'"hist" must hold {NUM_BINS} counts for each of {HISTOGRAMS}'
  scatter = record.get('scatter_degrees')
  if not isinstance(scatter, list) or len(scatter) > SCATTER or not all(
      isinstance(p, list) and len(p) == 2 and all(map(_number, p))
      for p in scatter):
    return f'"scatter_degrees" must be up to {SCATTER} pairs of numbers'
  return None


def check_metrics(record: dict) -> str | None:
  """What makes ``record`` no metrics.jsonl record of ours, or None."""
  if not all(_number(record.get(k), allow_none=True)
             for k in ('epoch', 'loss', 'accuracy')):
    return '"epoch", "loss" and "accuracy" must be numbers'
  return None


def read_records(file: str, check=None) -> tuple[list[dict], list[str]]:
  """(records of a stats.jsonl or metrics.jsonl in step order, what was left
  out: damaged lines, and records that ``check`` (check_stats,
  check_metrics) finds wrong). A run that resumed from an earlier
  checkpoint writes steps again: a record whose step is not past the one
  before it replaces every record from its step on, so the newest
  timeline wins."""
  if not os.path.exists(file):
    return [], []
  try:
    lines, left_out = jsonfile.read_lines(file)
  except ValueError as e:  # not text: none of it is read
    return [], [str(e)]
  kept: list[dict] = []
  for record in lines:
    step = record.get('step')
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
      left_out.append(f'{file}: a record without a step number')
      continue
    wrong = check(record) if check else None
    if wrong:
      left_out.append(f'{file}: the record of step {step} left out: {wrong}')
      continue
    while kept and kept[-1]['step'] >= step:
      kept.pop()
    kept.append(record)
  return kept, left_out
