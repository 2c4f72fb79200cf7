"""1:N identification and the MegaFace protocol equal brute force: the full
score matrix in float64 and explicit loops over probes, pairs and
distractors, with TAR at FAR from protocols.tar_at_far on the listed
genuine and impostor scores; plus cases worked out by hand.

Most inputs are unit rows rounded to multiples of 2**-bits (``_dyadic``):
their dot products are exact in float32 whatever order BLAS sums in, so
the chunked float32 scan and the float64 brute force agree bit for bit and
ties (few bits) are real ties. Fresh random inputs each run, the seed in
every failure message.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from npcface_jax.evaluation import protocols, ranking
from tests.helpers import fresh_rng


def _unit(x):
  norm = np.linalg.norm(x, axis=1, keepdims=True)
  return x / np.where(norm > 0, norm, 1.0)


def _dyadic(x, bits):
  """Rows rounded to multiples of 2**-bits (bits <= 10, dim <= 16): every
  partial sum of a dot product is a multiple of 2**-20 below 2, exact in
  float32."""
  return (np.round(x * 2.0**bits) / 2.0**bits).astype(np.float32)


def _faces(rng, labels, dim, bits, spread):
  """Rows near their identity's centre (labels >= 0) or anywhere (-1)."""
  centres = _unit(rng.normal(size=(max(labels.max(initial=0), 0) + 1, dim)))
  x = rng.normal(size=(labels.size, dim)) * spread
  x[labels >= 0] += centres[labels[labels >= 0]]
  return _dyadic(_unit(x), bits)


def _random_case(rng):
  dim = int(rng.integers(2, 17))
  bits = int(rng.choice([1, 2, 3, 5, 10]))
  num_ids = int(rng.integers(1, 8))
  spread = float(rng.choice([0.2, 0.6, 1.5]))
  num_probes = int(rng.integers(2, 30))
  num_gallery = int(rng.integers(1, 25))
  num_distractors = int(rng.choice([0, int(rng.integers(1, 60))]))
  probe_labels = rng.integers(0, num_ids, num_probes)
  gallery_labels = rng.integers(0, num_ids + 1, num_gallery)
  gallery_labels[0] = probe_labels[0]  # at least one mated probe
  return {
      'probes': _faces(rng, probe_labels, dim, bits, spread),
      'probe_labels': probe_labels,
      'gallery': _faces(rng, gallery_labels, dim, bits, spread),
      'gallery_labels': gallery_labels,
      'distractors': _faces(rng, np.full(num_distractors, -1), dim, bits,
                            spread),
  }


def _chunk_sizes(rng, n):
  """1, chunks that do not divide n, exactly n, and more than n."""
  sizes = {1, n + 1, n + int(rng.integers(2, 50)), int(rng.integers(1, n + 2))}
  sizes |= {c for c in (2, 3, 7, n - 1, n) if c >= 1}
  return sorted(sizes)


def _msg(seed, trial, case, **extra):
  shapes = {k: np.shape(v) for k, v in case.items()}
  return f'seed {seed}, trial {trial}, {shapes}, {extra}'


# --- brute force -------------------------------------------------------------


def _brute_identify(probes, probe_labels, gallery, gallery_labels, distractors,
                    ranks):
  """Each probe's mate score and competitors listed one by one."""
  p64, g64, d64 = (a.astype(np.float64) for a in (probes, gallery, distractors))
  hits = {k: 0 for k in ranks}
  rank1, mated, unmated = 0, 0, 0
  ties = 0
  for p in range(len(p64)):
    mates = [p64[p] @ g64[g] for g in range(len(g64))
             if gallery_labels[g] == probe_labels[p]]
    if not mates:
      unmated += 1
      continue
    mated += 1
    m = max(mates)
    others = [p64[p] @ g64[g] for g in range(len(g64))
              if gallery_labels[g] != probe_labels[p]]
    others += [p64[p] @ d64[d] for d in range(len(d64))]
    rank1 += all(m > o for o in others)
    ties += any(m == o for o in others)
    rank = 1 + sum(o >= m for o in others)
    for k in hits:
      hits[k] += rank <= k
  return {'rank1': rank1, 'hits': hits, 'mated': mated, 'unmated': unmated,
          'ties': ties}


def _brute_megaface(probes, labels, distractors, fars):
  p64, d64 = probes.astype(np.float64), distractors.astype(np.float64)
  trials = successes = ties = 0
  genuine = []
  for i in range(len(p64)):
    impostor_i = [p64[i] @ d for d in d64]
    for j in range(len(p64)):
      if i != j and labels[i] == labels[j]:
        s = p64[i] @ p64[j]
        trials += 1
        successes += all(s > x for x in impostor_i)
        ties += any(s == x for x in impostor_i)
        if i < j:
          genuine.append(s)
  impostor = [p64[i] @ d for i in range(len(p64)) for d in d64]
  if impostor:
    tars = protocols.tar_at_far(
        genuine + impostor, [True] * len(genuine) + [False] * len(impostor),
        fars)
  else:
    tars = []
  unsupported = [float(f) for f in fars
                 if protocols.impostors_accepted(f, len(impostor)) < 1]
  return {'successes': successes, 'trials': trials, 'tar_at_far': tars,
          'unsupported_fars': unsupported, 'num_genuine': len(genuine),
          'num_impostors': len(impostor), 'ties': ties}


def _check_identify(case, ranks, chunk_size, msg):
  got = ranking.identify(**case, ranks=ranks, chunk_size=chunk_size)
  want = _brute_identify(**case, ranks=ranks)
  assert got['num_mated'] == want['mated'], msg
  assert got['num_unmated'] == want['unmated'], msg
  assert got['num_probes'] == len(case['probes']), msg
  assert got['rank1'] == want['rank1'] / want['mated'], msg
  assert [r['rank'] for r in got['cmc']] == sorted(set(ranks)), msg
  for row in got['cmc']:
    assert row['hits'] == want['hits'][row['rank']], (msg, row)
    assert row['rate'] == want['hits'][row['rank']] / want['mated'], msg
  return want


def _check_megaface(probes, labels, distractors, fars, chunk_size, msg):
  got = ranking.megaface(probes, labels, distractors, fars=fars,
                         chunk_size=chunk_size)
  want = _brute_megaface(probes, labels, distractors, fars)
  for key in ('successes', 'trials', 'tar_at_far', 'unsupported_fars',
              'num_genuine', 'num_impostors'):
    assert got[key] == want[key], (msg, key, got[key], want[key])
  assert got['rank1'] == want['successes'] / want['trials'], msg
  return want


# --- identify ----------------------------------------------------------------


def test_identify_matches_brute_force():
  rng, seed = fresh_rng()
  for trial in range(120):
    case = _random_case(rng)
    ranks = tuple(rng.choice([1, 2, 3, 5], int(rng.integers(1, 4))).tolist())
    chunk = int(rng.choice(_chunk_sizes(rng, len(case['distractors']))))
    _check_identify(case, ranks, chunk,
                    _msg(seed, trial, case, ranks=ranks, chunk=chunk))


def test_identify_every_chunk_size():
  rng, seed = fresh_rng()
  case = _random_case(rng)
  case['distractors'] = _faces(rng, np.full(37, -1), case['probes'].shape[1],
                               5, 1.5)
  for chunk in _chunk_sizes(rng, 37) + [10_000]:
    _check_identify(case, (1, 2, 5), chunk,
                    _msg(seed, 0, case, chunk=chunk))


def test_identify_ties_are_misses():
  # One bit: scores take a handful of values, so mates often tie a
  # competitor; brute force counts a tie as a miss, and so must identify.
  rng, seed = fresh_rng()
  ties = 0
  for trial in range(40):
    case = _random_case(rng)
    for name in ('probes', 'gallery', 'distractors'):
      case[name] = _dyadic(case[name], 1)
    want = _check_identify(case, (1, 2), int(rng.integers(1, 9)),
                           _msg(seed, trial, case))
    ties += want['ties']
  assert ties > 0, f'seed {seed}: no ties arose, the test tested nothing'


def test_identify_without_distractors():
  rng, seed = fresh_rng()
  for trial in range(20):
    case = _random_case(rng)
    case['distractors'] = np.zeros((0, case['probes'].shape[1]), np.float32)
    msg = _msg(seed, trial, case)
    got = _check_identify(case, (1, 3), 4, msg)
    del case['distractors']
    no_rows = ranking.identify(**case, ranks=(1, 3))
    assert no_rows['num_distractors'] == 0, msg
    assert no_rows['rank1'] == got['rank1'] / got['mated'], msg


def test_memmap_distractors_read_in_chunks(tmp_path):
  # A distractor set on disk (np.load(..., mmap_mode='r')), float64 there:
  # read and converted chunk by chunk, with the answers of the array.
  rng, seed = fresh_rng()
  case = _random_case(rng)
  case['distractors'] = _faces(rng, np.full(41, -1), case['probes'].shape[1],
                               5, 0.6)
  np.save(tmp_path / 'd.npy', case['distractors'].astype(np.float64))
  on_disk = np.load(tmp_path / 'd.npy', mmap_mode='r')
  msg = _msg(seed, 0, case)
  want = ranking.identify(**case, ranks=(1, 3), chunk_size=6)
  got = ranking.identify(**{**case, 'distractors': on_disk},
                         ranks=(1, 3), chunk_size=6)
  assert got == want, msg
  labels = case['probe_labels']
  labels[1] = labels[0]
  want = ranking.megaface(case['probes'], labels, case['distractors'],
                          chunk_size=6)
  got = ranking.megaface(case['probes'], labels, on_disk, chunk_size=6)
  assert got == want, msg


def test_identify_hand_case():
  # Mate scores are all 0.8. p0 loses to gallery row 2 (1.0, another
  # identity): rank 2. p1 ties the distractor (0.8 = 0.8): a miss, rank 2.
  # p2 has no mate in the gallery. p3 beats everything (others <= 0.6).
  a, b = 0.6, 0.8
  probes = np.float32([[1, 0], [0, 1], [a, b], [-1, 0]])
  probe_labels = [0, 1, 2, 3]
  gallery = np.float32([[b, a], [a, b], [1, 0], [-b, a]])
  gallery_labels = [0, 1, 5, 3]
  distractors = np.float32([[a, b]])
  for chunk in (1, 2):
    got = ranking.identify(probes, probe_labels, gallery,
                           gallery_labels, distractors,
                           ranks=(2, 1, 2), chunk_size=chunk)
    assert got == {
        'rank1': 1 / 3,
        'cmc': [{'rank': 1, 'hits': 1, 'rate': 1 / 3},
                {'rank': 2, 'hits': 3, 'rate': 1.0}],
        'num_probes': 4, 'num_mated': 3, 'num_unmated': 1,
        'num_gallery': 4, 'num_distractors': 1}
  # Without the distractor p1 wins outright.
  got = ranking.identify(probes, probe_labels, gallery, gallery_labels)
  assert got['rank1'] == 2 / 3 and got['cmc'][0]['hits'] == 2


def test_identify_float_features_match_float64():
  # Unrounded unit rows: float32 scores differ from float64 in the last
  # bits, so the answers agree wherever no competitor lies within 1e-5 of
  # the mate score (regenerated until none does).
  rng, seed = fresh_rng()
  for attempt in range(20):
    pl = rng.integers(0, 40, 60)
    gl = np.arange(40)
    centres = _unit(rng.normal(size=(40, 64)))
    probes = _unit(centres[pl] + 0.15 * rng.normal(size=(60, 64)))
    gallery = _unit(centres + 0.15 * rng.normal(size=(40, 64)))
    probes, gallery = probes.astype(np.float32), gallery.astype(np.float32)
    distractors = _unit(rng.normal(size=(500, 64))).astype(np.float32)
    s = probes.astype(np.float64) @ np.concatenate(
        [gallery, distractors]).astype(np.float64).T
    labels = np.concatenate([gl, np.full(500, -1)])
    mate = np.where(labels == pl[:, None], s, -np.inf).max(axis=1)
    other = np.where(labels == pl[:, None], -np.inf, s)
    if np.abs(other - mate[:, None]).min() > 1e-5:
      break
  else:
    pytest.skip(f'seed {seed}: no draw without near-ties')
  want = (mate > other.max(axis=1)).mean()
  rank5 = ((other >= mate[:, None]).sum(axis=1) < 5).mean()
  got = ranking.identify(probes, pl, gallery, gl, distractors,
                         ranks=(1, 5), chunk_size=77)
  msg = f'seed {seed}'
  assert 0 < want < 1, msg
  assert got['rank1'] == want, msg
  assert got['cmc'][1]['rate'] == rank5, msg


# --- megaface ----------------------------------------------------------------


def _random_fars(rng):
  fars = list(rng.choice(protocols.FARS, int(rng.integers(0, 6)),
                         replace=False))
  fars += rng.uniform(0, 1, int(rng.integers(0, 3))).tolist()
  if rng.random() < 0.3:
    fars.append(1.0)
  return tuple(fars)


def test_megaface_matches_brute_force(monkeypatch):
  rng, seed = fresh_rng()
  for trial in range(100):
    case = _random_case(rng)
    labels = case['probe_labels']
    labels[1] = labels[0]  # at least one genuine pair
    fars = _random_fars(rng)
    chunk = int(rng.choice(_chunk_sizes(rng, len(case['distractors']))))
    # Identities packed into blocks of a few rows, or all in one.
    block = int(rng.choice([1, 2, 5, 11, 1024]))
    monkeypatch.setattr(ranking, 'BLOCK_ROWS', block)
    _check_megaface(case['probes'], labels, case['distractors'], fars, chunk,
                    _msg(seed, trial, case, fars=fars, chunk=chunk,
                         block=block))


def test_megaface_every_chunk_size_and_many_kept():
  # FAR 0.5 of 20 x 53 impostors keeps 531 scores, more than one chunk of
  # small sizes holds: the top-K merge runs many times.
  rng, seed = fresh_rng()
  labels = rng.integers(0, 4, 20)
  probes = _faces(rng, labels, 8, 3, 0.6)
  distractors = _faces(rng, np.full(53, -1), 8, 3, 0.6)
  fars = (0.5, 0.1, 0.013, 1e-3, 1e-4, 1.0)
  for chunk in _chunk_sizes(rng, 53) + [10_000]:
    _check_megaface(probes, labels, distractors, fars, chunk,
                    f'seed {seed}, chunk {chunk}')


def test_megaface_ties_are_misses():
  rng, seed = fresh_rng()
  ties = 0
  for trial in range(40):
    case = _random_case(rng)
    labels = case['probe_labels']
    labels[1] = labels[0]
    probes, distractors = (_dyadic(case[k], 1)
                           for k in ('probes', 'distractors'))
    want = _check_megaface(probes, labels, distractors, (0.3, 0.1, 0.01),
                           int(rng.integers(1, 9)),
                           _msg(seed, trial, case))
    ties += want['ties']
  assert ties > 0, f'seed {seed}: no ties arose, the test tested nothing'


def test_megaface_without_distractors():
  rng, seed = fresh_rng()
  labels = rng.integers(0, 3, 12)
  labels[:2] = 0
  probes = _faces(rng, labels, 6, 5, 0.6)
  got = ranking.megaface(probes, labels, np.zeros((0, 6), np.float32))
  n = np.bincount(labels)
  msg = f'seed {seed}, labels {labels.tolist()}'
  assert got['trials'] == int(np.sum(n * (n - 1))), msg
  assert got['rank1'] == 1.0 and got['successes'] == got['trials'], msg
  assert got['tar_at_far'] == [] and got['num_impostors'] == 0, msg
  assert got['unsupported_fars'] == list(protocols.FARS), msg


def test_megaface_hand_case():
  # a0 . a1 = 0.8 and b0 . b1 = 0.6 (genuine). Scores with distractors
  # d0 = (a, b, 0), d1 = (0, 0, -1): a0 (0.6, 0), a1 (0.96, 0),
  # b0 (0, -1), b1 (0.64, -0.6). Trials: a0->a1 0.8 > 0.6 yes; a1->a0
  # 0.8 > 0.96 no; b0->b1 0.6 > 0 yes; b1->b0 0.6 > 0.64 no: rank-1 2/4.
  # Impostors sorted: 0.96 0.64 0.6 0 0 0 -0.6 -1 (8 pairs).
  a, b = 0.6, 0.8
  probes = np.float32([[1, 0, 0], [b, a, 0], [0, 0, 1], [0, b, a]])
  distractors = np.float32([[a, b, 0], [0, 0, -1]])
  fars = (0.1, 0.125, 0.25, 0.375, 1.0)
  got = ranking.megaface(probes, [7, 7, 3, 3], distractors, fars=fars,
                         chunk_size=1)
  assert (got['successes'], got['trials'], got['rank1']) == (2, 4, 0.5)
  assert got['unsupported_fars'] == [0.1]  # k = 0: not even one may pass
  assert got['num_genuine'] == 2 and got['num_impostors'] == 8
  assert got['num_identities'] == 2
  rows = got['tar_at_far']
  assert [r['far'] for r in rows] == [0.125, 0.25, 0.375, 1.0]
  # k = 1: t = 0.64, only 0.8 passes. k = 2: t = 0.6, and 0.6 > 0.6 fails.
  # k = 3: t = 0, both pass. k = 8: t = -inf.
  assert [r['tar'] for r in rows] == [0.5, 0.5, 1.0, 1.0]
  assert [r['false_accepts'] for r in rows] == [1, 2, 3, 8]
  np.testing.assert_allclose([r['threshold'] for r in rows[:3]],
                             [0.64, 0.6, 0.0], rtol=1e-6)
  assert rows[3]['threshold'] == -np.inf


def test_largest_keeps_the_k_largest_multiset():
  rng, seed = fresh_rng()
  for trial in range(50):
    k = int(rng.integers(1, 40))
    values = np.round(rng.normal(size=int(rng.integers(0, 400))), 1)
    top = ranking._Largest(k)  # noqa: SLF001
    for piece in np.array_split(values.astype(np.float32),
                                int(rng.integers(1, 30))):
      top.add(piece[piece > top.floor])
    want = np.sort(values.astype(np.float32))[::-1][:k]
    np.testing.assert_array_equal(np.sort(top.result())[::-1], want,
                                  err_msg=f'seed {seed}, trial {trial}')


def test_scan_memory_is_bounded():
  # 64 probes x 30,000 distractors: the score matrix would be 7.7 MB; the
  # scan stays within the module docstring's bound.
  rng, seed = fresh_rng()
  num_probes, num_rows, dim, chunk = 64, 30_000, 32, 300
  labels = rng.integers(0, 8, num_probes)
  probes = _unit(rng.normal(size=(num_probes, dim))).astype(np.float32)
  distractors = _unit(rng.normal(size=(num_rows, dim))).astype(np.float32)
  kept = protocols.impostors_accepted(1e-3, num_probes * num_rows) + 1
  tracemalloc.start()
  try:
    ranking.megaface(probes, labels, distractors, fars=(1e-3, 1e-5),
                     chunk_size=chunk)
    ranking.identify(probes, labels, probes, labels, distractors,
                     ranks=(1, 5), chunk_size=chunk)
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  bound = 20 * chunk * num_probes + 24 * kept + 9 * chunk * dim
  bound += 4 * num_probes * (dim + num_probes) + 64 * 1024  # small stuff
  msg = f'seed {seed}: peak {peak} bytes, bound {bound}'
  assert peak < bound, msg
  assert peak < num_probes * num_rows * 4 / 5, msg


# --- errors ------------------------------------------------------------------


def test_errors():
  rng, _ = fresh_rng()
  p = _unit(rng.normal(size=(6, 4))).astype(np.float32)
  labels = np.array([0, 0, 1, 1, 2, 2])
  d = _unit(rng.normal(size=(30, 4))).astype(np.float32)
  identify = ranking.identify
  megaface = ranking.megaface
  with pytest.raises(ValueError, match='probes must be a 2-D float array'):
    identify(p[0], labels[:1], p, labels)
  with pytest.raises(ValueError, match='dtype int64'):
    megaface(np.ones((6, 4), np.int64), labels, d)
  with pytest.raises(ValueError, match='distractors has feature dimension 3'):
    identify(p, labels, p, labels, d[:, :3])
  with pytest.raises(ValueError, match='gallery has feature dimension 5'):
    identify(p, labels, np.ones((2, 5), np.float32), [0, 1])
  with pytest.raises(ValueError, match='one label per row'):
    identify(p, labels[:5], p, labels)
  with pytest.raises(ValueError, match='gallery_labels must be 1-D'):
    identify(p, labels, p, labels[:, None])
  with pytest.raises(ValueError, match='integer identity ids'):
    megaface(p, labels.astype(float), d)
  bad = p.copy()
  bad[3, 1] = np.nan
  with pytest.raises(ValueError, match='probes row 3 contains NaN'):
    megaface(bad, labels, d)
  bad_d = d.copy()
  bad_d[17, 0] = np.inf
  with pytest.raises(ValueError, match='distractors row 17 contains NaN'):
    megaface(p, labels, bad_d, chunk_size=5)
  with pytest.raises(ValueError, match='gallery row 4 contains NaN'):
    identify(p, labels, bad[[0, 2, 4, 5, 3]], [0, 1, 2, 2, 1])
  for chunk in (0, 2.5, True):
    with pytest.raises(ValueError,
                       match='chunk_size must be (an integer|at least 1)'):
      identify(p, labels, p, labels, d, chunk_size=chunk)
  with pytest.raises(ValueError, match='ranks must name at least one'):
    identify(p, labels, p, labels, ranks=())
  with pytest.raises(ValueError,
                     match='each rank must be (an integer|at least 1)'):
    identify(p, labels, p, labels, ranks=(1, 0))
  with pytest.raises(ValueError, match='none of the 6 probes has a mate'):
    identify(p, labels, p, labels + 10)
  with pytest.raises(ValueError, match='at least two probes'):
    megaface(p, np.arange(6), d)
  with pytest.raises(ValueError, match='false accept rate must lie in'):
    megaface(p, labels, d, fars=(0.0,))
  # 6 x 30 = 180 impostors: FAR 0.1 lets 18 pass and needs the 19 largest.
  with pytest.raises(ValueError, match=r'FAR 0\.1 of 180 impostor pairs '
                     r'\(6 probes x 30 distractors\) needs the 19 largest.*'
                     r'max_kept=18'):
    megaface(p, labels, d, fars=(0.001, 0.1), max_kept=18)
  got = megaface(p, labels, d, fars=(0.001, 0.1), max_kept=19)
  assert [r['far'] for r in got['tar_at_far']] == [0.1]
  assert got['unsupported_fars'] == [0.001]
  # FAR 1 needs no scores kept (its threshold is -inf).
  assert megaface(p, labels, d, fars=(1.0,), max_kept=0)['tar_at_far'][0][
      'tar'] == 1.0


def test_open_set_far_is_fpir_over_the_gallery():
  """The union bound: N impostor scores each clearing t with probability
  FAR name a stranger with probability at most N * FAR (exactly
  1 - (1 - FAR)^N when independent, checked here by simulation)."""
  assert ranking.open_set_far(0.01, 300) == 0.01 / 300
  assert ranking.open_set_far(0.5, 1) == 0.5
  rng, seed = fresh_rng()
  scores = rng.normal(size=(20_000, 50))
  far = ranking.open_set_far(0.1, 50)
  t = np.quantile(rng.normal(size=1_000_000), 1 - far)
  fpir = np.mean(scores.max(1) > t)
  assert abs(fpir - (1 - (1 - far) ** 50)) < 0.01 and fpir < 0.11, seed
  for bad in (0.0, 1.0, -0.1):
    with pytest.raises(ValueError, match=r'\(0, 1\)'):
      ranking.open_set_far(bad, 10)
  with pytest.raises(ValueError, match='gallery_size must be at least 1'):
    ranking.open_set_far(0.1, 0)
