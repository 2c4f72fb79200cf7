"""The pair verification protocol equals brute force: every candidate
threshold tried in a loop, every fold's threshold chosen that way; plus
cases worked out by hand. Fresh random inputs each run, the seed in every
failure message."""

from __future__ import annotations

import numpy as np
import pytest

from npcface_jax.evaluation import bin_format, protocols
from tests.helpers import fresh_rng


def _brute_best_threshold(sim, same):
  """Try -inf and each distinct value in increasing order; keep the first
  with the most correct pairs."""
  best_t, best_correct = None, -1
  for t in [-np.inf] + sorted(set(float(s) for s in sim)):
    correct = sum(bool(s > t) == bool(y) for s, y in zip(sim, same))
    if correct > best_correct:
      best_t, best_correct = t, correct
  return best_t, best_correct / len(sim)


def _brute_verification(sim, same, num_folds, folds=None):
  """Folds from np.array_split (first n % k one larger), or the given
  lists of pair indices, each tested at the brute-force best threshold of
  the rest."""
  if folds is None:
    folds = np.array_split(np.arange(len(sim)), num_folds)
  accs, thresholds = [], []
  for test in folds:
    train = np.setdiff1d(np.arange(len(sim)), test)
    t, _ = _brute_best_threshold(sim[train], same[train])
    correct = sum(bool(sim[i] > t) == bool(same[i]) for i in test)
    accs.append(correct / len(test))
    thresholds.append(t)
  return accs, thresholds


def _random_pairs(rng, n):
  """Similarities, sometimes rounded to a few levels so that ties occur,
  and labels that lean toward high similarity being "same"."""
  sim = rng.uniform(-1.0, 1.0, n)
  if rng.random() < 0.6:
    sim = np.round(sim, int(rng.integers(0, 2)))
  same = rng.random(n) < 1 / (1 + np.exp(-4 * sim))
  kind = rng.integers(0, 6)
  if kind == 0:
    same[:] = True
  elif kind == 1:
    same[:] = False
  return sim, same


def test_best_threshold_matches_brute_force():
  rng, seed = fresh_rng()
  for trial in range(300):
    n = int(rng.integers(1, 25))
    sim, same = _random_pairs(rng, n)
    msg = (f'seed {seed}, trial {trial}, sim {sim.tolist()}, '
           f'same {same.tolist()}')
    got = protocols.best_threshold(sim, same)
    want = _brute_best_threshold(sim, same)
    assert got[0] == want[0], msg
    assert got[1] == want[1], msg


def test_best_threshold_all_same_and_all_different():
  rng, seed = fresh_rng()
  sim = np.round(rng.uniform(-1, 1, 17), 1)
  msg = f'seed {seed}'
  assert protocols.best_threshold(sim, np.ones(17, bool)) == (-np.inf, 1.0), msg
  # All "different": the largest value calls every pair different.
  assert protocols.best_threshold(sim, np.zeros(17, bool)) == (
      float(sim.max()), 1.0), msg


def test_best_threshold_hand_cases():
  # Equal values fall on one side together: 0.5 as the threshold calls all
  # three 0.5s different (4 of 6 right); 0.2 calls them same (5 of 6).
  sim = [0.2, 0.5, 0.5, 0.5, 0.9, 0.1]
  same = [0, 1, 1, 0, 1, 0]
  assert protocols.best_threshold(sim, same) == (0.2, 5 / 6)
  # 0.1 and 0.3 both get 3 of 4: the smaller one wins the tie.
  assert protocols.best_threshold([0.3, 0.1, 0.4, 0.2], [0, 0, 1, 1]) == (
      0.1, 0.75)
  assert protocols.best_threshold([0.3], [1]) == (-np.inf, 1.0)
  assert protocols.best_threshold([0.3], [0]) == (0.3, 1.0)


def test_verification_accuracy_matches_brute_force():
  rng, seed = fresh_rng()
  for trial in range(60):
    num_folds = int(rng.integers(2, 8))
    n = int(rng.integers(num_folds, 40))
    sim, same = _random_pairs(rng, n)
    msg = (f'seed {seed}, trial {trial}, folds {num_folds}, '
           f'sim {sim.tolist()}, same {same.tolist()}')
    got = protocols.verification_accuracy(
        sim, same, folds=protocols.file_order_folds(n, num_folds))
    accs, thresholds = _brute_verification(sim, same, num_folds)
    assert got['fold_rule'] == 'file order', msg
    assert got['fold_accuracies'] == accs, msg
    assert got['fold_thresholds'] == thresholds, msg
    np.testing.assert_allclose(got['accuracy'], np.mean(accs), rtol=1e-12,
                               err_msg=msg)
    np.testing.assert_allclose(got['accuracy_std'], np.std(accs), rtol=1e-12,
                               atol=1e-15, err_msg=msg)
    finite = [t for t in thresholds if np.isfinite(t)]
    want_t = np.mean(finite) if finite else -np.inf
    np.testing.assert_allclose(got['threshold'], want_t, rtol=1e-12,
                               err_msg=msg)


def test_verification_accuracy_hand_made_20_pairs():
  # sim_k = k / 20; "same" iff k >= 10, except pair 3 (same, low) and pair
  # 15 (different, high). On all 20 the best threshold is 0.45 (k = 9), 2
  # errors. With 10 folds of 2, each fold's training set still picks 0.45,
  # except fold 4 (pairs 8, 9 held out): nothing in training lies between
  # 0.35 and 0.5, so the smallest equally good threshold is 0.35 and both
  # held-out "different" pairs (0.40, 0.45) are called same. Folds 1 and 7
  # hold the two odd pairs, one error each.
  sim = np.arange(20) / 20
  same = np.arange(20) >= 10
  same[3], same[15] = True, False
  assert protocols.best_threshold(sim, same) == (0.45, 0.9)
  # Sorted by label (nearly), so the default would be label-balanced.
  assert protocols.fold_assignment(same).rule == 'label-balanced'
  got = protocols.verification_accuracy(
      sim, same, folds=protocols.file_order_folds(20, 10))
  assert got['fold_accuracies'] == [1, .5, 1, 1, 0, 1, 1, .5, 1, 1]
  assert got['fold_thresholds'] == [.45, .45, .45, .45, .35,
                                    .45, .45, .45, .45, .45]
  np.testing.assert_allclose(got['accuracy'], 0.8, rtol=1e-12)
  # Deviations 0.2 (x7), -0.3 (x2), -0.8: variance 1.1 / 10.
  np.testing.assert_allclose(got['accuracy_std'], np.sqrt(0.11), rtol=1e-12)
  np.testing.assert_allclose(got['threshold'], 0.44, rtol=1e-12)


def test_separable_pairs_score_one():
  # "Different" pairs are orthogonal (similarity exactly 0), "same" pairs
  # nearly parallel: every fold's threshold is 0 and every pair is right.
  rng, seed = fresh_rng()
  n, dim = 123, 16
  same = rng.random(n) < 0.5
  same[:2] = [True, False]
  emb = np.empty((2 * n, dim))
  for k in range(n):
    if same[k]:
      v = rng.normal(size=dim)
      emb[2 * k], emb[2 * k + 1] = v, 3 * v + 0.1 * rng.normal(size=dim)
    else:
      i, j = rng.choice(dim, 2, replace=False)
      emb[2 * k], emb[2 * k + 1] = 0, 0
      emb[2 * k, i], emb[2 * k + 1, j] = rng.uniform(0.1, 5, 2)
  sim = protocols.pair_similarities(emb)
  msg = f'seed {seed}'
  assert np.all(sim[~same] == 0) and np.all(sim[same] > 0.5), msg
  got = protocols.verification_accuracy(sim, same, 10)
  assert got['accuracy'] == 1.0 and got['accuracy_std'] == 0.0, msg
  assert got['threshold'] == 0.0, msg


def test_all_same_gives_minus_inf_threshold():
  got = protocols.verification_accuracy(np.linspace(-1, 1, 12), [1] * 12, 3)
  assert got['threshold'] == -np.inf and got['accuracy'] == 1.0


def test_pair_similarities_matches_loop():
  rng, seed = fresh_rng()
  n, dim = 37, 9
  emb = rng.normal(size=(2 * n, dim)) * rng.uniform(1e-3, 1e3, (2 * n, 1))
  emb[4] = 0           # a zero row against a nonzero one
  emb[10:12] = 0       # two zero rows
  emb[7] = -3 * emb[6]  # opposite directions
  want = []
  for k in range(n):
    a, b = emb[2 * k], emb[2 * k + 1]
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    want.append(0.0 if na == 0 or nb == 0 else a @ b / (na * nb))
  got = protocols.pair_similarities(emb)
  msg = f'seed {seed}'
  assert got.shape == (n,) and got.dtype == np.float64, msg
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12, err_msg=msg)
  assert got[2] == 0 and got[5] == 0, msg
  np.testing.assert_allclose(got[3], -1.0, rtol=1e-15, err_msg=msg)
  assert np.all(np.abs(got) <= 1), msg


def test_pair_similarities_extreme_scale_and_float32():
  emb = np.array([[1e300, 1e300], [2e300, 2e300], [1e-300, 0], [0, 1e-300]])
  np.testing.assert_allclose(protocols.pair_similarities(emb), [1.0, 0.0],
                             atol=1e-15)
  emb32 = np.float32([[1, 2, 3], [1, 2, 3]])
  np.testing.assert_allclose(protocols.pair_similarities(emb32), [1.0],
                             rtol=1e-12)


def test_pair_similarities_errors():
  with pytest.raises(ValueError, match='even number of rows'):
    protocols.pair_similarities(np.ones((5, 3)))
  with pytest.raises(ValueError, match='2-D'):
    protocols.pair_similarities(np.ones(6))
  with pytest.raises(ValueError, match='2-D'):
    protocols.pair_similarities(np.ones((2, 3, 4)))
  with pytest.raises(ValueError, match='NaN'):
    protocols.pair_similarities(np.array([[np.nan, 1.0], [1.0, 1.0]]))


def test_fold_sizes():
  bounds = protocols.kfold_bounds(298, 10)
  assert [b - a for a, b in bounds] == [30] * 8 + [29] * 2
  assert bounds[0][0] == 0 and bounds[-1][1] == 298
  assert all(b == c for (_, b), (c, _) in zip(bounds, bounds[1:]))
  assert protocols.kfold_bounds(6000, 10) == [
      (600 * i, 600 * (i + 1)) for i in range(10)]
  assert [b - a for a, b in protocols.kfold_bounds(7, 3)] == [3, 2, 2]


def test_verification_accuracy_errors():
  sim = np.linspace(-1, 1, 20)
  same = sim > 0
  with pytest.raises(ValueError, match='differ in length'):
    protocols.verification_accuracy(sim, same[:-1])
  with pytest.raises(ValueError, match='at least 10 pairs'):
    protocols.verification_accuracy(sim[:9], same[:9])
  with pytest.raises(ValueError, match='at least 2'):
    protocols.verification_accuracy(sim, same, 1)
  with pytest.raises(ValueError, match='integer'):
    protocols.verification_accuracy(sim, same, 2.5)
  with pytest.raises(ValueError, match='integer'):
    protocols.verification_accuracy(sim, same, True)
  with pytest.raises(ValueError, match='issame must be boolean'):
    protocols.verification_accuracy(sim, np.where(same, 2, 0))
  with pytest.raises(ValueError, match='issame must be boolean'):
    protocols.verification_accuracy(sim, np.where(same, 'y', 'n'))
  with pytest.raises(ValueError, match='NaN'):
    protocols.verification_accuracy(np.where(same, np.nan, 0), same)
  with pytest.raises(ValueError, match='at least one pair'):
    protocols.best_threshold([], [])
  # 0 / 1 numbers and plain lists are accepted as labels.
  a = protocols.verification_accuracy(sim, same.astype(np.float32), 4)
  b = protocols.verification_accuracy(list(sim), list(same), 4)
  assert a == b


# --- ROC, TAR at FAR, AUC ----------------------------------------------------

def _brute_tar_at_far(sim, same, far):
  """Try every threshold (-inf and each value); among those accepting at
  most far * #impostors impostors (accept iff sim > t), the highest TAR;
  None when not even one impostor may pass."""
  gen, imp = sim[same], sim[~same]
  allowed = np.floor(far * len(imp) * (1 + 1e-12))
  if allowed < 1:
    return None
  best = None
  for t in [-np.inf] + sorted(set(float(s) for s in sim)):
    if sum(i > t for i in imp) <= allowed:
      tar = sum(g > t for g in gen) / len(gen)
      best = tar if best is None else max(best, tar)
  return best


# --- Folds: declared, file order, label-balanced -----------------------------

def _reference_balanced_folds(same, k):
  """Label-balanced folds from their description, in plain loops: the same
  pairs in k contiguous groups in file order (the first S % k one larger),
  the different pairs likewise, their larger groups on the folds after the
  same pairs' larger ones (wrapping round); fold f = both groups f."""
  folds = [[] for _ in range(k)]
  offset = 0
  for label in (True, False):
    members = [i for i, s in enumerate(same) if bool(s) == label]
    base, extra = divmod(len(members), k)
    larger = {(offset + j) % k for j in range(extra)}
    start = 0
    for f in range(k):
      size = base + (f in larger)
      folds[f] += members[start:start + size]
      start += size
    offset = (offset + extra) % k
  return [sorted(f) for f in folds]


def _reference_accuracy(sim, same, folds):
  """k-fold accuracy in float64 NumPy from the protocol: per fold, of -inf
  and every training similarity the smallest threshold t maximising the
  training accuracy of "same iff sim > t", applied to the fold."""
  sim, same = np.asarray(sim, np.float64), np.asarray(same, bool)
  accs, thresholds = [], []
  for test in folds:
    train = np.setdiff1d(np.arange(len(sim)), test)
    candidates = np.concatenate([[-np.inf], np.unique(sim[train])])
    right = ((sim[train][None, :] > candidates[:, None])
             == same[train][None, :]).sum(axis=1)
    thresholds.append(float(candidates[np.argmax(right)]))
    accs.append(float(np.mean((sim[test] > thresholds[-1]) == same[test])))
  return float(np.mean(accs)), accs, thresholds


def _fold_lists(folds):
  return [np.flatnonzero(folds.index == f).tolist()
          for f in range(folds.count)]


def test_sorted_file_gets_label_balanced_folds():
  """All same pairs, then all different (LFW's pairsDevTest.txt: 500 +
  500): each file-order fold would hold one label; ours hold both, in the
  file's proportions, and score as the reference does."""
  rng, seed = fresh_rng()
  sizes = [(500, 500), (int(rng.integers(20, 300)),
                        int(rng.integers(20, 300)))]
  for num_same, num_diff in sizes:
    n = num_same + num_diff
    same = np.arange(n) < num_same
    sim = rng.normal(0.0, 0.2, n) + 0.3 * same
    msg = f'seed {seed}, {num_same} same then {num_diff} different'
    folds = protocols.fold_assignment(same)
    assert folds.rule == 'label-balanced' and folds.count == 10, msg
    want_folds = _reference_balanced_folds(same, 10)
    assert _fold_lists(folds) == want_folds, msg
    for f in want_folds:
      assert abs(same[f].sum() - num_same / 10) < 1, msg
      assert abs((~same[f]).sum() - num_diff / 10) < 1, msg
    got = protocols.verification_accuracy(sim, same)
    want, accs, _ = _reference_accuracy(sim, same, want_folds)
    assert got['fold_rule'] == 'label-balanced', msg
    assert got['num_folds'] == 10, msg
    np.testing.assert_allclose(got['fold_accuracies'], accs, rtol=1e-12,
                               err_msg=msg)
    np.testing.assert_allclose(got['accuracy'], want, rtol=1e-12,
                               err_msg=msg)
  # 500 + 500 in file order: every fold one label only.
  old = protocols.file_order_folds(1000)
  same = np.arange(1000) < 500
  assert all(len(set(same[f])) == 1 for f in _fold_lists(old))


def test_folds_of_any_labels_match_the_reference():
  """Random label orders and fold counts: the folds are the reference's
  (file order only where it gives the same folds), sizes differ by at most
  one, none is empty, and the accuracy is the reference's."""
  rng, seed = fresh_rng()
  for trial in range(60):
    k = int(rng.integers(2, 11))
    n = int(rng.integers(k, 60))
    sim, same = _random_pairs(rng, n)
    if trial % 4 == 0:
      same = np.sort(same)[::-1]  # sorted: all same first
    msg = f'seed {seed}, trial {trial}, k {k}, same {same.tolist()}'
    folds = protocols.fold_assignment(same, k)
    want_folds = _reference_balanced_folds(same, k)
    assert _fold_lists(folds) == want_folds, msg
    lengths = [len(f) for f in want_folds]
    assert min(lengths) >= 1 and max(lengths) - min(lengths) <= 1, msg
    if folds.rule == 'file order':
      assert _fold_lists(folds) == _fold_lists(
          protocols.file_order_folds(n, k)), msg
    got = protocols.verification_accuracy(sim, same, k)
    want, _, _ = _reference_accuracy(sim, same, want_folds)
    np.testing.assert_allclose(got['accuracy'], want, rtol=1e-12,
                               err_msg=msg)


def _lfw_labels(sets, per_set):
  """An LFW pairs.txt's layout: sets of per_set same then per_set
  different pairs."""
  return np.tile(np.repeat([True, False], per_set), sets)


def test_lfw_layout_keeps_file_order_and_its_accuracy():
  """A header "10 3" declares ten sets of 3 + 3: one fold each. Without
  the header (a .bin made from it) the tenths hold 3 + 3 each: file order.
  Both are the folds and the accuracy of before (np.array_split folds)."""
  rng, seed = fresh_rng()
  for per_set in (3, 300):
    same = _lfw_labels(10, per_set)
    sim = rng.normal(0.0, 0.2, same.size) + 0.3 * same
    msg = f'seed {seed}, 10 sets of {per_set} + {per_set}'
    declared = protocols.fold_assignment(same, declared=(10, per_set))
    assert declared.rule == 'declared', msg
    header_less = protocols.fold_assignment(same)
    assert header_less.rule == 'file order', msg
    blocks = (np.arange(same.size) // (2 * per_set)).tolist()
    assert declared.index.tolist() == header_less.index.tolist() == blocks
    _, accs, thresholds = _reference_accuracy(
        sim, same, np.array_split(np.arange(same.size), 10))
    for folds in (None, declared, header_less):
      got = protocols.verification_accuracy(sim, same, folds=folds)
      assert got['fold_accuracies'] == accs, msg
      assert got['fold_thresholds'] == thresholds, msg


def test_declared_sets_other_than_ten():
  """A header "4 3": four folds of 3 + 3, said so (num_folds 4); the same
  labels without the header are not in LFW's tenths: label-balanced."""
  rng, seed = fresh_rng()
  same = _lfw_labels(4, 3)
  sim = rng.uniform(-1, 1, 24)
  got = protocols.verification_accuracy(
      sim, same, folds=protocols.fold_assignment(same, declared=(4, 3)))
  accs, thresholds = _brute_verification(sim, same, 4)
  assert got['fold_rule'] == 'declared' and got['num_folds'] == 4
  assert got['fold_accuracies'] == accs, f'seed {seed}'
  assert got['fold_thresholds'] == thresholds, f'seed {seed}'
  assert protocols.fold_assignment(same).rule == 'label-balanced'


def test_bin_files_keep_file_order_where_laid_out_as_lfw(tmp_path):
  """A .bin has no header: one written in LFW's layout (10 sets of 3 + 3)
  reads back with file-order folds, one sorted by label with balanced
  ones."""
  lfw = _lfw_labels(10, 3)
  for name, same, rule in (('lfw', lfw, 'file order'),
                           ('sorted', np.sort(lfw)[::-1], 'label-balanced')):
    path = tmp_path / f'{name}.bin'
    bin_format.save_bin(path, [b'\xff\xd8'] * (2 * same.size), same)
    _, issame = bin_format.load_bin(path)
    assert protocols.fold_assignment(issame).rule == rule, name


def test_fold_errors():
  same = _lfw_labels(10, 3)
  with pytest.raises(ValueError, match='declares 10 sets of 2 .* but '
                     'there are 60; fix the header'):
    protocols.fold_assignment(same, declared=(10, 2))
  wrong = same.copy()
  wrong[4] = True
  with pytest.raises(ValueError, match='pair 5 is same; fix the header'):
    protocols.fold_assignment(wrong, declared=(10, 3))
  with pytest.raises(ValueError, match='declared sets must be at least 2'):
    protocols.fold_assignment(same[:6], declared=(1, 3))
  with pytest.raises(ValueError, match='at least 10 pairs'):
    protocols.label_balanced_folds(same[:9])
  sim = np.linspace(-1, 1, 60)
  for bad in (np.zeros(60, int), np.arange(60) % 3 * 2, np.arange(59) % 3,
              np.full(60, -1)):
    with pytest.raises(ValueError, match='folds must'):
      protocols.verification_accuracy(
          sim, same, folds=protocols.Folds(bad, 'file order'))
  with pytest.raises(ValueError, match='protocols.Folds'):
    protocols.verification_accuracy(sim, same, folds=np.arange(60) % 10)


def _both_kinds(rng, n):
  sim, same = _random_pairs(rng, n)
  same[0], same[-1] = True, False  # at least one of each
  return sim, same


def test_tar_at_far_matches_brute_force():
  rng, seed = fresh_rng()
  fars = (1.0, 0.5, 0.3, 0.1, 0.05, 1e-2, 1e-3)
  for trial in range(200):
    sim, same = _both_kinds(rng, int(rng.integers(2, 60)))
    msg = (f'seed {seed}, trial {trial}, sim {sim.tolist()}, '
           f'same {same.tolist()}')
    got = protocols.tar_at_far(sim, same, fars)
    want = {f: _brute_tar_at_far(sim, same, f) for f in fars}
    assert [g['far'] for g in got] == [f for f in fars
                                       if want[f] is not None], msg
    imp = sim[~same]
    for g in got:
      assert g['tar'] == want[g['far']], msg
      accepted = int(np.sum(imp > g['threshold']))
      assert g['false_accepts'] == accepted, msg
      assert accepted <= g['far'] * len(imp) * (1 + 1e-12), msg
      assert g['tar'] == np.mean(sim[same] > g['threshold']), msg


def test_tar_at_far_hand_case():
  # Impostors 0.1..0.9 plus 0.95 (10); genuine 0.5, 0.92, 0.97, 0.99.
  imp = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95]
  gen = [0.5, 0.92, 0.97, 0.99]
  sim = np.array(imp + gen)
  same = np.array([False] * 10 + [True] * 4)
  got = protocols.tar_at_far(sim, same, (0.1, 0.2, 0.5, 0.01))
  # FAR 0.1: one impostor may pass; threshold 0.9 (the 2nd largest).
  assert got[0] == {'far': 0.1, 'tar': 0.75, 'threshold': 0.9,
                    'false_accepts': 1}
  assert got[1]['threshold'] == 0.8 and got[1]['tar'] == 0.75
  # FAR 0.5: five pass; threshold 0.5 rejects the genuine 0.5 (not > 0.5).
  assert got[2]['threshold'] == 0.5 and got[2]['tar'] == 0.75
  assert len(got) == 3  # 0.01 of 10 impostors: unsupported, left out


def test_far_threshold_from_top_scores_only():
  rng, seed = fresh_rng()
  imp = rng.normal(size=10_000)
  for far in (1e-1, 1e-2, 1e-3, 1e-4):
    k = protocols.impostors_accepted(far, imp.size)
    top = np.sort(imp)[-(k + 1):]
    rng.shuffle(top)
    assert protocols.far_threshold(top, imp.size, far) == (
        protocols.far_threshold(imp, imp.size, far)), f'seed {seed}'
    with pytest.raises(ValueError, match=f'needs the {k + 1} largest'):
      protocols.far_threshold(top[1:], imp.size, far)
  assert protocols.far_threshold(imp, imp.size, 1e-5) is None
  assert protocols.far_threshold(imp, imp.size, 1.0) == -np.inf
  with pytest.raises(ValueError, match=r'\(0, 1\]'):
    protocols.far_threshold(imp, imp.size, 0.0)


def test_roc_curve_matches_brute_force():
  rng, seed = fresh_rng()
  for trial in range(100):
    sim, same = _both_kinds(rng, int(rng.integers(2, 40)))
    msg = (f'seed {seed}, trial {trial}, sim {sim.tolist()}, '
           f'same {same.tolist()}')
    far, tar, thresholds = protocols.roc_curve(sim, same)
    values = sorted(set(float(s) for s in sim), reverse=True)
    np.testing.assert_array_equal(thresholds, values + [-np.inf], msg)
    for f, t, th in zip(far, tar, thresholds):
      assert f == np.mean(sim[~same] > th), msg
      assert t == np.mean(sim[same] > th), msg
    assert (far[0], tar[0], far[-1], tar[-1]) == (0, 0, 1, 1), msg


def test_roc_points_are_vertices_spread_over_log_far():
  """The stored ROC: exact vertices, both ends, at most max_points, and
  none of the log-FAR decades left empty."""
  rng, seed = fresh_rng()
  same = rng.random(20000) < 0.3
  sim = rng.normal(0.0, 0.3, 20000) + 0.8 * same
  far, tar, _ = protocols.roc_curve(sim, same)
  points = protocols.roc_points(sim, same, max_points=100)
  got = np.stack([points['far'], points['tar']], 1)
  assert 50 < len(got) <= 100, f'seed {seed}'
  vertices = {(f, t) for f, t in zip(far, tar)}
  assert all((f, t) in vertices for f, t in got), f'seed {seed}'
  assert tuple(got[0]) == (0, 0) and tuple(got[-1]) == (1, 1)
  assert np.all(np.diff(got[:, 0]) >= 0) and np.all(np.diff(got[:, 1]) >= 0)
  decades = np.floor(np.log10(got[got[:, 0] > 0, 0]))
  assert set(decades) == set(range(int(np.floor(np.log10(far[far > 0].min()))),
                                   1))
  small = protocols.roc_points(sim[:30], same[:30])
  np.testing.assert_array_equal(small['far'], protocols.roc_curve(
      sim[:30], same[:30])[0])


def test_threshold_at_far_is_the_numpy_impostor_quantile():
  """On the exact ROC, the threshold at FAR f is the (k + 1)-th largest
  impostor similarity, k = floor(f * impostors), computed here in NumPy
  (and far_threshold's); on the points results.json keeps, the nearest
  stored one at or below f: never more accepting, within one step of the
  log-FAR grid. Below the smallest FAR the pairs measure, the strictest
  point (the highest impostor), flagged unresolved."""
  rng, seed = fresh_rng()
  same = rng.random(30_000) < 0.2
  sim = rng.normal(0.0, 0.2, same.size) + 0.6 * same
  imp = np.sort(sim[~same])[::-1]
  far, tar, thresholds = protocols.roc_curve(sim, same)
  points = protocols.roc_points(sim, same, max_points=64)
  assert len(points['far']) <= 64 and points['threshold'][-1] == -np.inf
  # Every stored point is a vertex: its threshold gives its FAR and TAR.
  for f, t, th in zip(points['far'], points['tar'], points['threshold']):
    assert (np.mean(imp > th), np.mean(sim[same] > th)) == (f, t), seed
  ratio = (1 / far[far > 0].min()) ** (1 / (64 - 4))  # the grid's step
  for target in np.geomspace(1.5 / imp.size, 0.5, 25):
    msg = f'seed {seed}, FAR {target}'
    k = int(np.floor(target * imp.size))
    exact = protocols.threshold_at_far(far, tar, thresholds, target)
    assert exact.threshold == imp[k] == protocols.far_threshold(
        imp, imp.size, target), msg
    assert exact.far == np.mean(imp > imp[k]) <= target and exact.resolved
    assert exact.tar == np.mean(sim[same] > imp[k]), msg
    kept = protocols.threshold_at_far(points['far'], points['tar'],
                                      points['threshold'], target)
    assert kept.threshold >= exact.threshold and kept.resolved, msg
    assert target / ratio - 1 / imp.size <= kept.far <= target, msg
  for got in (protocols.threshold_at_far(far, tar, thresholds, 0.5 / imp.size),
              protocols.threshold_at_far(points['far'], points['tar'],
                                         points['threshold'], 1e-9)):
    assert (got.threshold, got.far, got.resolved) == (imp[0], 0.0, False)
    assert got.lowest_far == 1 / imp.size, seed


def test_threshold_at_far_on_tar_at_far_rows_and_errors():
  """Results written before the ROC kept its thresholds still have
  tar_at_far's rows: the row at the largest FAR at or below the target;
  below them all, the strictest row, unresolved."""
  rows = [{'far': 1e-1, 'tar': 0.9, 'threshold': 0.2},
          {'far': 1e-2, 'tar': 0.7, 'threshold': 0.4},
          {'far': 1e-3, 'tar': 0.5, 'threshold': 0.5}]
  far, tar, th = ([r[k] for r in rows] for k in ('far', 'tar', 'threshold'))
  got = protocols.threshold_at_far(far, tar, th, 5e-3)
  assert got == (0.5, 1e-3, 0.5, 1e-3, True)
  assert protocols.threshold_at_far(far, tar, th, 0.05).threshold == 0.4
  assert protocols.threshold_at_far(far, tar, th, 1e-4) == (
      0.5, 1e-3, 0.5, 1e-3, False)
  with pytest.raises(ValueError, match=r'\(0, 1\]'):
    protocols.threshold_at_far(far, tar, th, 0.0)
  with pytest.raises(ValueError, match='as many'):
    protocols.threshold_at_far(far, tar[:2], th, 0.1)
  with pytest.raises(ValueError, match='must lie in'):
    protocols.threshold_at_far([1.5], [1.0], [0.0], 0.1)


def test_auc_matches_brute_force():
  rng, seed = fresh_rng()
  for trial in range(100):
    sim, same = _both_kinds(rng, int(rng.integers(2, 40)))
    msg = (f'seed {seed}, trial {trial}, sim {sim.tolist()}, '
           f'same {same.tolist()}')
    gen, imp = sim[same], sim[~same]
    want = np.mean([(g > i) + 0.5 * (g == i) for g in gen for i in imp])
    np.testing.assert_allclose(protocols.auc(sim, same), want, rtol=1e-12,
                               err_msg=msg)
    # The trapezoid under the exact ROC is the same number.
    far, tar, _ = protocols.roc_curve(sim, same)
    np.testing.assert_allclose(np.trapezoid(tar, far), want, rtol=1e-12,
                               atol=1e-15, err_msg=msg)


def test_verification_report_and_errors():
  rng, seed = fresh_rng()
  sim, same = _both_kinds(rng, 300)
  report = protocols.verification_report(sim, same)
  assert report['auc'] == protocols.auc(sim, same), f'seed {seed}'
  assert report['tar_at_far'] == protocols.tar_at_far(sim, same)
  assert report['accuracy'] == protocols.verification_accuracy(
      sim, same)['accuracy']
  for fn in (protocols.tar_at_far, protocols.roc_curve, protocols.auc):
    with pytest.raises(ValueError, match='genuine and impostor'):
      fn(sim, np.ones(300, bool))


def test_roc_png_draws_every_curve(tmp_path):
  """roc_plot: a PNG of the figure's size, with each curve's colour on it,
  and the axis starting a decade below the smallest positive FAR."""
  from PIL import Image  # noqa: PLC0415 (only this test draws)

  from npcface_jax.evaluation import roc_plot  # noqa: PLC0415
  rng, seed = fresh_rng()
  curves = {}
  for name, gap in (('a', 0.5), ('b', 1.0)):
    same = rng.random(2000) < 0.5
    sim = rng.normal(0.0, 0.3, 2000) + gap * same
    far, tar, _ = protocols.roc_curve(sim, same)
    curves[name] = (far, tar)
  path = tmp_path / 'roc.png'
  roc_plot.save_roc_png(str(path), curves, 'two curves')
  image = Image.open(path)
  assert image.format == 'PNG' and image.size == (720, 540)
  colours = {c for _, c in image.convert('RGB').getcolors(1 << 20)}
  for hex_colour in ('#1f77b4', '#d62728'):
    rgb = tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))
    assert rgb in colours, (hex_colour, f'seed {seed}')
  smallest = min(f[f > 0].min() for f, _ in curves.values())
  assert roc_plot.lowest_far(curves) <= smallest
