"""1:N identification: rank-1 against a labelled gallery plus unlabelled
distractors (IJB-C 1:N, Trillion-Pairs style), and the MegaFace challenge-1
protocol (identification among a million distractors, and the verification
ROC whose impostors are probe x distractor pairs).

Pure NumPy on L2-normalised embeddings already computed, so the protocols
are exact and testable on their own. A score is the float32 dot product of
two rows (their cosine, for unit rows) through BLAS; norms are not checked.
Every comparison is strict, as in protocols.tar_at_far: a mate must score
*above* every competitor, so a tie counts as a miss.

The distractors (and the gallery) are never scored whole: ``_scan`` reads
them in chunks of ``chunk_size`` rows, scores every probe against each chunk
into one reused (P, chunk_size) float32 buffer and keeps per probe only the
running max (and, where asked, the mate max, a count, and the K largest
scores overall). A 1M x 512 float32 distractor set (2 GB; an np.memmap is
read chunk by chunk) thus costs O(P + chunk_size * P + K) memory beyond the
inputs rather than its P x 1M score matrix. The peak on top of the inputs
is at most about ``20 * chunk_size * P + 24 * K + 9 * chunk_size * D`` bytes
(tests check it), plus a float32 copy of the probes where they are not
float32 already, and megaface's within-identity scores (BLOCK_ROWS).
"""

from __future__ import annotations


import numpy as np

from npcface_jax.evaluation import protocols

# Rows per chunk: a 4096 x 3530 float32 score buffer is 58 MB, and BLAS is
# already at full speed on blocks this size.
CHUNK_SIZE = 4096
# Impostor scores megaface() may keep for TAR at FAR: 40 MB of float32
# (about 3x that while merging), enough for FAR 1e-3 of 1e10 impostors.
MAX_KEPT = 10_000_000
# Probes scored against each other at once within identities (megaface):
# 1024^2 float32 scores is 4 MB.
BLOCK_ROWS = 1024


# --- checks -------------------------------------------------------------------


def _positive_int(value, name: str) -> int:
  return protocols.check_integer(value, name, 1)


def _rows(x, name: str, dim: int | None = None) -> np.ndarray:
  """x as a 2-D floating array without copying it (a memmap stays on disk);
  finiteness is checked chunk by chunk as the rows are read."""
  x = np.asarray(x)
  what = f'{name} must be a 2-D float array (rows, dim) of L2-normalised ' \
         'features'
  if x.ndim != 2:
    raise ValueError(f'{what}, got shape {x.shape}')
  if not np.issubdtype(x.dtype, np.floating):
    raise ValueError(f'{what}, got dtype {x.dtype}')
  if dim is not None and x.shape[1] != dim:
    raise ValueError(f'{name} has feature dimension {x.shape[1]} but the '
                     f'probes have {dim}: embed both with the same model')
  if x.shape[1] == 0:
    raise ValueError(f'{what}, got feature dimension 0')
  return x


def _float32(x, name: str, start: int = 0) -> np.ndarray:
  """Rows as a C-contiguous float32 array, refused if any entry is NaN or
  infinite (one would poison every score it touches); x holds rows start,
  start + 1, ... of the caller's array."""
  x = np.ascontiguousarray(x, dtype=np.float32)
  if not np.isfinite(x).all():
    bad = start + int(np.flatnonzero(~np.isfinite(x).all(axis=1))[0])
    raise ValueError(f'{name} row {bad} contains NaN or infinity: features '
                     'must be finite, L2-normalised embeddings')
  return x


def _labels(labels, name: str, n: int) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.ndim != 1 or labels.shape[0] != n:
    raise ValueError(f'{name} must be 1-D with one label per row ({n}), got '
                     f'shape {labels.shape}')
  if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
    raise ValueError(f'{name} must be integer identity ids, got dtype '
                     f'{labels.dtype}: map names to ids with np.unique(names, '
                     'return_inverse=True)')
  return labels.astype(np.int64)


def _groups(labels: np.ndarray) -> list[np.ndarray]:
  """Row indices of each label, increasing within each group."""
  order = np.argsort(labels, kind='stable')
  cuts = np.flatnonzero(np.diff(labels[order])) + 1
  return np.split(order, cuts) if order.size else []


def _blocks(groups: list[np.ndarray], block_rows: int):
  """(rows, [(lo, hi)]): consecutive groups packed into blocks of at most
  block_rows rows (or one larger group), each group at rows[lo:hi]; so that
  scoring within identities is one BLAS call per block, not per identity
  (tiny calls cost milliseconds each when threads wait on a busy CPU)."""
  rows, spans, size = [], [], 0
  for g in groups:
    if size and size + g.size > block_rows:
      yield np.concatenate(rows), spans
      rows, spans, size = [], [], 0
    rows.append(g)
    spans.append((size, size + g.size))
    size += g.size
  if rows:
    yield np.concatenate(rows), spans


# --- the shared chunked scan --------------------------------------------------


class _Largest:
  """The k largest values of a stream of arrays, as a multiset: values at or
  below ``floor`` (the k-th largest so far) can never enter it, so callers
  drop them before adding; the rest are merged by np.partition once 2k are
  pending, so the kept values stay O(k) and the merging O(total) time."""

  def __init__(self, k: int):
    self.k, self.floor = k, -np.inf
    self.parts, self.size = [], 0

  def add(self, values: np.ndarray) -> None:
    if values.size:
      self.parts.append(values)
      self.size += values.size
      if self.size >= 2 * self.k:
        self._merge()

  def _merge(self) -> None:
    v = np.concatenate(self.parts) if len(self.parts) > 1 else self.parts[0]
    if v.size >= self.k:
      if v.size > self.k:
        v.partition(v.size - self.k)
        v = v[v.size - self.k:].copy()
      # Equal values are interchangeable, so dropping later ones equal to
      # the k-th largest leaves the multiset of the k largest unchanged.
      self.floor = float(v.min())
    self.parts, self.size = [v], v.size

  def result(self) -> np.ndarray:
    if not self.parts:
      return np.zeros(0, np.float32)
    self._merge()
    return self.parts[0]


def _scan(probes: np.ndarray, rows: np.ndarray, name: str, chunk_size: int, *,
          probe_labels=None, row_labels=None, at_least=None, top_k: int = 0):
  """One pass over ``rows`` in chunks, scoring every probe against each.

  Returns (best, mate, count, top): per probe the largest score over rows
  that are not its mates (-inf over none); where labels are given, per
  probe the largest score over its mates (rows with its label; -inf for
  none), else None; per probe how many non-mate scores are >= at_least[p]
  (None unless at_least is given); and the top_k largest non-mate scores
  of all probes x rows, unsorted (None unless top_k).
  """
  num_probes, num_rows = probes.shape[0], rows.shape[0]
  best = np.full(num_probes, -np.inf, np.float32)
  mate = None if row_labels is None else best.copy()
  count = None if at_least is None else np.zeros(num_probes, np.int64)
  top = _Largest(top_k) if top_k else None
  # Probe-major (P, n) scores: a probe's scores are one contiguous row, so
  # its max, its count and gathering the rows worth filtering are fast. One
  # flat buffer serves every chunk, the short last one included.
  buf = np.empty(num_probes * min(chunk_size, num_rows), np.float32)
  for start in range(0, num_rows, chunk_size):
    stop = min(start + chunk_size, num_rows)
    chunk = _float32(rows[start:stop], name, start)
    out = buf[:num_probes * (stop - start)].reshape(num_probes, stop - start)
    s = np.matmul(probes, chunk.T, out=out)
    if row_labels is not None:
      is_mate = probe_labels[:, None] == row_labels[None, start:stop]
      with_mate = np.flatnonzero(is_mate.any(axis=1))
      if with_mate.size:
        mate[with_mate] = np.maximum(mate[with_mate], np.where(
            is_mate[with_mate], s[with_mate], -np.inf).max(axis=1))
        s[is_mate] = -np.inf
    row_max = s.max(axis=1)
    np.maximum(best, row_max, out=best)
    if count is not None:
      count += np.count_nonzero(s >= at_least[:, None], axis=1)
    if top is not None:
      # Once the floor has risen most probes have nothing above it: filter
      # only the rows whose max beats it.
      hot = np.flatnonzero(row_max > top.floor)
      if hot.size:
        sub = s if hot.size == num_probes else s[hot]
        top.add(sub[sub > top.floor])
  return best, mate, count, (None if top is None else top.result())


# --- 1:N identification -------------------------------------------------------


def _ranks(ranks) -> list[int]:
  try:
    ranks = sorted({_positive_int(k, 'each rank') for k in ranks})
  except TypeError:
    raise ValueError(f'ranks must be a sequence of positive integers, got '
                     f'{ranks!r}') from None
  if not ranks:
    raise ValueError('ranks must name at least one rank, e.g. (1, 5, 10)')
  return ranks


def identify(probes, probe_labels, gallery, gallery_labels, distractors=None,
             *, ranks=(1,), chunk_size: int = CHUNK_SIZE) -> dict:
  """Closed-set 1:N identification of labelled probes against a labelled
  gallery, optionally grown by unlabelled distractors.

  A probe's mate score m is its largest score over gallery rows with its
  label; its competitors are every other gallery row and every distractor.
  Its rank is 1 + the number of competitors scoring >= m, so it is
  identified at rank 1 iff m > every competitor's score (a tie is a miss),
  and at rank k iff fewer than k competitors reach m.

  Probes whose label has no gallery row are excluded from the rates, and
  counted as 'num_unmated': open-set probe lists (IJB-C 1:N) hold such
  non-mated searches on purpose, and rank-1 is undefined for them.

  Returns a dict: 'rank1' (hits / num_mated), 'cmc' ([{'rank', 'hits',
  'rate'}] for each of ``ranks``, sorted), 'num_probes', 'num_mated',
  'num_unmated', 'num_gallery', 'num_distractors'. Ranks beyond 1 cost one
  comparison per score more than rank 1 alone, and a second gallery pass.
  """
  probes, probe_labels, gallery, gallery_labels, distractors = _search_inputs(
      probes, probe_labels, gallery, gallery_labels, distractors)
  chunk_size = _positive_int(chunk_size, 'chunk_size')
  ranks = _ranks(ranks)
  num_probes = probes.shape[0]

  # The gallery pass finds each probe's mate score and best non-mate; the
  # distractor pass then counts against the mate score, and ranks beyond 1
  # need a second gallery pass for the same count.
  g_best, mate, _, _ = _scan(probes, gallery, 'gallery', chunk_size,
                             probe_labels=probe_labels,
                             row_labels=gallery_labels)
  mated = _mated(mate, gallery.shape[0])
  num_mated = int(mated.sum())
  probes, probe_labels = probes[mated], probe_labels[mated]
  g_best, mate = g_best[mated], mate[mated]
  at_least = mate if ranks[-1] > 1 else None
  d_best, _, d_count, _ = _scan(probes, distractors, 'distractors',
                                chunk_size, at_least=at_least)
  g_count = None
  if at_least is not None:
    _, _, g_count, _ = _scan(probes, gallery, 'gallery', chunk_size,
                             probe_labels=probe_labels,
                             row_labels=gallery_labels, at_least=at_least)
  hit1 = mate > np.maximum(g_best, d_best)
  return {
      'rank1': int(hit1.sum()) / num_mated,
      'cmc': _cmc(ranks, hit1, g_count, d_count),
      'num_probes': num_probes,
      'num_mated': num_mated,
      'num_unmated': num_probes - num_mated,
      'num_gallery': int(gallery.shape[0]),
      'num_distractors': int(distractors.shape[0]),
  }


def _search_inputs(probes, probe_labels, gallery, gallery_labels,
                   distractors):
  """identify's arrays checked (in this order, so the first problem is the
  one reported), the probes as float32, no distractors as 0 rows."""
  probes = _rows(probes, 'probes')
  num_probes, dim = probes.shape
  if not num_probes:
    raise ValueError('identify needs at least one probe, got 0 rows')
  probes = _float32(probes, 'probes')
  probe_labels = _labels(probe_labels, 'probe_labels', num_probes)
  gallery = _rows(gallery, 'gallery', dim)
  gallery_labels = _labels(gallery_labels, 'gallery_labels', gallery.shape[0])
  if distractors is None:
    distractors = np.zeros((0, dim), np.float32)
  distractors = _rows(distractors, 'distractors', dim)
  return probes, probe_labels, gallery, gallery_labels, distractors


def _mated(mate: np.ndarray, num_gallery: int) -> np.ndarray:
  """Which probes have a mate in the gallery (a finite mate score); at
  least one must."""
  mated = np.isfinite(mate)
  if not mated.any():
    raise ValueError(f'none of the {mate.size} probes has a mate among the '
                     f'{num_gallery} gallery rows: give probe_labels and '
                     'gallery_labels the same identity ids')
  return mated


def _cmc(ranks, hit1, g_count, d_count) -> list[dict]:
  """[{'rank', 'hits', 'rate'}] per rank: rank 1 from the strict max, rank
  k from the competitors' counts at or above each mate score."""
  cmc = []
  for k in ranks:
    if k == 1:
      hits = int(hit1.sum())
    else:
      hits = int(np.sum(g_count + d_count < k))
    cmc.append({'rank': k, 'hits': hits, 'rate': hits / hit1.size})
  return cmc


# --- Open-set identification -------------------------------------------------


def open_set_far(fpir: float, gallery_size: int) -> float:
  """The pair false accept rate whose threshold keeps the false-positive
  identification rate (the share of probes of people not enrolled that are
  given a name) at about ``fpir`` or below with ``gallery_size`` templates:
  fpir / N. Such a probe is named when any of its N impostor scores clears
  the threshold, and P(any) <= N * FAR whatever their dependence (the
  union bound; 1 - (1 - FAR)^N when independent, N * FAR to first order).
  The 1:1 threshold lets a stranger through N times as often as a pair."""
  if not 0.0 < fpir < 1.0:
    raise ValueError(f'a false-positive identification rate must lie in '
                     f'(0, 1), got {fpir}')
  gallery_size = protocols.check_integer(gallery_size, 'gallery_size', 1)
  return fpir / gallery_size


# --- MegaFace challenge 1 -----------------------------------------------------


def megaface(probes, labels, distractors, *, fars=protocols.FARS,
             chunk_size: int = CHUNK_SIZE, max_kept: int = MAX_KEPT) -> dict:
  """The MegaFace challenge-1 protocol on a labelled probe set (FaceScrub)
  and an unlabelled distractor set (MegaFace's 1M).

  Identification: every ordered pair (i, j), i != j, of probes with one
  label is a trial, j put in the gallery among the distractors and i
  searching it: a success iff score(i, j) > max over distractors d of
  score(i, d). 'rank1' = successes / trials (1.0 with no distractors).

  Verification: genuine pairs are the same-label probe pairs i < j;
  impostor pairs are every probe x every distractor, the non-mate pairs of
  the identification trials above. Different-label probe pairs are not
  impostors (FaceScrub has ~6M of them against 3.5e9 probe x distractor
  pairs, and leaving them out keeps the FAR one of the distractor set).
  TAR at FAR is exactly protocols.tar_at_far on those scores: accept iff
  score > t, t the (k + 1)-th largest impostor score, k =
  protocols.impostors_accepted(far, P * N). Only the K largest impostor
  scores are kept while scanning, K = the largest k + 1 over ``fars``; a FAR
  needing more than ``max_kept`` raises ValueError before any scoring. FARs
  with k < 1 are unsupported: listed in 'unsupported_fars', not measured.

  Returns a dict: 'rank1', 'successes', 'trials', 'tar_at_far' ([{'far',
  'tar', 'threshold', 'false_accepts'}] as protocols.tar_at_far gives it),
  'unsupported_fars', 'num_probes', 'num_identities' (labels with two or
  more probes), 'num_distractors', 'num_genuine', 'num_impostors'.
  Memory beyond the inputs: the scan's (module docstring) with K, plus the
  scores within one block of identities, max(BLOCK_ROWS, the largest
  identity's probes) squared.
  """
  probes = _rows(probes, 'probes')
  num_probes, dim = probes.shape
  probes = _float32(probes, 'probes')
  labels = _labels(labels, 'labels', num_probes)
  distractors = _rows(distractors, 'distractors', dim)
  chunk_size = _positive_int(chunk_size, 'chunk_size')
  max_kept = _max_kept(max_kept)
  groups = _identities(labels)
  num_distractors = int(distractors.shape[0])
  num_impostors = num_probes * num_distractors
  supported, unsupported, keep = _impostors_to_keep(
      fars, num_probes, num_distractors, max_kept)

  d_best, _, _, top = _scan(probes, distractors, 'distractors', chunk_size,
                            top_k=keep)
  successes, trials, genuine = _within_identities(probes, groups, d_best)
  return {
      'rank1': successes / trials,
      'successes': successes,
      'trials': trials,
      'tar_at_far': _tar_at_fars(supported, top, num_impostors, genuine),
      'unsupported_fars': unsupported,
      'num_probes': num_probes,
      'num_identities': len(groups),
      'num_distractors': num_distractors,
      'num_genuine': int(genuine.size),
      'num_impostors': num_impostors,
  }


def _max_kept(value) -> int:
  if isinstance(value, (bool, np.bool_)) or not isinstance(
      value, (int, np.integer)) or value < 0:
    raise ValueError(f'max_kept must be a non-negative integer, got '
                     f'{value!r}')
  return value


def _identities(labels: np.ndarray) -> list[np.ndarray]:
  """The probe rows of each label with two or more probes; at least one."""
  groups = [g for g in _groups(labels) if g.size > 1]
  if not groups:
    raise ValueError(f'megaface needs an identity with at least two probes '
                     f'(no genuine pairs among {labels.size} probes with '
                     f'{np.unique(labels).size} distinct labels)')
  return groups


def _impostors_to_keep(fars, num_probes: int, num_distractors: int,
                       max_kept: int):
  """(supported FARs, unsupported FARs, K): the FARs that accept at least
  one impostor pair, and the largest impostor scores to keep for them."""
  num_impostors = num_probes * num_distractors
  supported, unsupported, keep = [], [], 0
  for far in fars:
    k = protocols.impostors_accepted(far, num_impostors)
    if k < 1:
      unsupported.append(float(far))
      continue
    supported.append(float(far))
    need = k + 1 if k < num_impostors else 0  # every impostor: t = -inf
    if need > max_kept:
      raise ValueError(
          f'FAR {far:g} of {num_impostors} impostor pairs ({num_probes} '
          f'probes x {num_distractors} distractors) needs the {need} largest '
          f'impostor scores, more than max_kept={max_kept}: leave {far:g} out '
          f'of fars (MegaFace reports 1e-6) or pass max_kept >= {need} '
          f'(about {12 * need / 2**20:.0f} MB while merging)')
    keep = max(keep, need)
  return supported, unsupported, keep


def _within_identities(probes, groups, d_best):
  """(successes, trials, genuine scores): every ordered same-identity pair
  (i, j), i != j, succeeds iff score(i, j) beats i's best distractor; the
  genuine scores are the pairs i < j, as float64."""
  successes, trials, genuine = 0, 0, []
  for rows, spans in _blocks(groups, BLOCK_ROWS):
    x = probes[rows]
    scores, d_max = x @ x.T, d_best[rows]
    for lo, hi in spans:
      s = scores[lo:hi, lo:hi]  # row i: probe i searching for its mate j
      beat = s > d_max[lo:hi, None]
      np.fill_diagonal(beat, False)
      successes += int(beat.sum())
      trials += (hi - lo) * (hi - lo - 1)
      genuine.append(s[np.triu_indices(hi - lo, 1)])
  return successes, trials, np.concatenate(genuine).astype(np.float64)


def _tar_at_fars(fars, top, num_impostors: int, genuine) -> list[dict]:
  """protocols.tar_at_far's rows from the K largest impostor scores."""
  tars = []
  for far in fars:
    t = protocols.far_threshold(top, num_impostors, far)
    accepted = (num_impostors if t == -np.inf
                else int(np.count_nonzero(top > t)))
    tars.append({'far': far, 'tar': float(np.mean(genuine > t)),
                 'threshold': t, 'false_accepts': accepted})
  return tars
