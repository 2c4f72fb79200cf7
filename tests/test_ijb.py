"""The IJB-B/C 1:1 protocol: template pooling and pair scores against brute
force written from the protocol's description (insightface's ijb_11.py),
a hand-made set whose scores are worked out by hand, the meta files' reader
and its errors, and the aligned image batches. Fresh random inputs each
run, the seed in every failure message."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
from PIL import Image

from npcface_jax.evaluation import ijb, protocols
from npcface_jax.faces import alignment, images
from tests.helpers import fresh_rng


# --- Brute force, from the description ----------------------------------------

def _brute_templates(features, template_ids, media_ids, face_scores=None):
  """({template id: float64 unit vector}, {template id: conditioning}):
  normalise each image (times its score), average each media's images, sum
  the media, normalise. The conditioning, sum |term| / |sum| over the
  images' terms, bounds how much float32 rounding can move the direction:
  near-cancelling templates get a looser tolerance."""
  out, cond = {}, {}
  for t in sorted(set(template_ids.tolist())):
    media = {}
    for i in range(len(features)):
      if template_ids[i] != t:
        continue
      f = np.asarray(features[i], np.float64)
      norm = np.sqrt(np.sum(f * f))
      f = f / norm if norm > 0 else f * 0
      if face_scores is not None:
        f = f * float(face_scores[i])
      media.setdefault(int(media_ids[i]), []).append(f)
    total = sum(np.mean(fs, axis=0) for fs in media.values())
    spread = sum(np.linalg.norm(f) / len(fs)
                 for fs in media.values() for f in fs)
    norm = np.sqrt(np.sum(total * total))
    out[t] = total / norm if norm > 0 else total
    cond[t] = spread / norm if norm > 0 else 1.0
  return out, cond


def _brute_cosine(a, b):
  na, nb = np.linalg.norm(a), np.linalg.norm(b)
  return 0.0 if na == 0 or nb == 0 else float(a @ b / (na * nb))


def _random_structure(rng, num_templates, dim, zero_rows=True):
  """(features, template ids, media ids, face scores) in a shuffled order:
  templates of one image, of one media with several images, of several
  media with one to four images each; media ids shared across templates."""
  tids, mids = [], []
  template_ids = rng.choice(10 * num_templates, num_templates, replace=False)
  for t in template_ids:
    kind = rng.integers(3)
    if kind == 0:
      sizes = [1]
    elif kind == 1:
      sizes = [int(rng.integers(2, 5))]
    else:
      sizes = rng.integers(1, 5, int(rng.integers(2, 5))).tolist()
    media = rng.choice(3 * num_templates + 4, len(sizes), replace=False)
    for m, size in zip(media, sizes):
      tids += [t] * size
      mids += [m] * size
  order = rng.permutation(len(tids))
  tids, mids = np.array(tids)[order], np.array(mids)[order]
  n = len(tids)
  features = rng.normal(size=(n, dim)) * rng.uniform(0.01, 100, (n, 1))
  if zero_rows:
    features[rng.random(n) < 0.05] = 0
  scores = rng.uniform(0.05, 1.0, n)
  return features.astype(np.float32), tids, mids, scores.astype(np.float32)


# --- Pooling ------------------------------------------------------------------

def test_template_features_match_brute_force():
  rng, seed = fresh_rng()
  for trial in range(20):
    # D >= 2: in one dimension media sums such as 2/3 + 1/3 - 1 cancel to
    # exactly 0 in float64 but not in float32.
    feats, tids, mids, scores = _random_structure(
        rng, int(rng.integers(1, 30)), int(rng.integers(2, 12)))
    for use_scores in (False, True):
      s = scores if use_scores else None
      msg = f'seed {seed}, trial {trial}, scores {use_scores}'
      ids, pooled = ijb.template_features(feats, tids, mids, s)
      want, cond = _brute_templates(feats, tids, mids, s)
      assert ids.tolist() == sorted(want), msg
      assert pooled.dtype == np.float32, msg
      assert pooled.shape == (len(want), feats.shape[1]), msg
      for row, t in enumerate(ids.tolist()):
        np.testing.assert_allclose(pooled[row], want[t], rtol=0,
                                   atol=1e-6 * max(2.0, cond[t]),
                                   err_msg=f'{msg}, template {t}')
      norms = np.linalg.norm(pooled, axis=1)
      assert np.all((np.abs(norms - 1) < 1e-5) | (norms == 0)), msg


def test_template_features_zero_template_and_errors():
  feats = np.float32([[0, 0], [3, 4], [0, 0]])
  ids, pooled = ijb.template_features(feats, [5, 2, 5], [1, 1, 2])
  assert ids.tolist() == [2, 5]
  np.testing.assert_allclose(pooled, [[0.6, 0.8], [0, 0]], rtol=1e-6)
  with pytest.raises(ValueError, match=r'template_ids must have shape \(3,\)'):
    ijb.template_features(feats, [1, 2], [1, 1, 2])
  with pytest.raises(ValueError, match='face_scores'):
    ijb.template_features(feats, [1, 2, 2], [1, 1, 2], [1.0, np.nan, 1.0])
  with pytest.raises(ValueError, match='NaN'):
    ijb.template_features(np.float32([[np.nan, 1]]), [1], [1])


def test_invalid_images_pool_as_if_absent():
  """Unreadable images (valid False) leave their templates as if they had
  never been listed; a template left with none is a zero vector."""
  rng, seed = fresh_rng()
  for trial in range(10):
    feats, tids, mids, scores = _random_structure(rng, 20, 6,
                                                  zero_rows=False)
    valid = rng.random(len(tids)) < 0.7
    msg = f'seed {seed}, trial {trial}'
    for s in (None, scores):
      ids, pooled = ijb.template_features(feats, tids, mids, s, valid=valid)
      kept_ids, kept = ijb.template_features(
          feats[valid], tids[valid], mids[valid],
          None if s is None else s[valid])
      rows = np.searchsorted(ids, kept_ids)
      np.testing.assert_allclose(pooled[rows], kept, atol=1e-6, err_msg=msg)
      empty = np.setdiff1d(np.arange(len(ids)), rows)
      assert np.all(pooled[empty] == 0), msg
  feats = np.float32([[3, 4], [1, 0], [0, 1]])
  ids, pooled = ijb.template_features(feats, [1, 1, 2], [7, 7, 8],
                                      valid=[False, True, False])
  np.testing.assert_allclose(pooled, [[1, 0], [0, 0]])


# --- Pairs --------------------------------------------------------------------

def test_score_pairs_matches_direct_over_chunk_boundaries():
  rng, seed = fresh_rng()
  t, dim, n = 37, 9, 1000
  feats = rng.normal(size=(t, dim)) * rng.uniform(0.1, 10, (t, 1))
  feats[3] = 0
  i1, i2 = rng.integers(0, t, n), rng.integers(0, t, n)
  i1[:5] = 3  # zero rows score 0
  want = [_brute_cosine(feats[a], feats[b]) for a, b in zip(i1, i2)]
  for chunk in (1, 7, 333, 999, 1000, 1001, 1 << 16):
    msg = f'seed {seed}, chunk {chunk}'
    got = ijb.score_pairs(feats.astype(np.float32), i1, i2, chunk_size=chunk)
    assert got.shape == (n,) and got.dtype == np.float32, msg
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6, err_msg=msg)
    assert np.all(got[:5] == 0), msg
  assert ijb.score_pairs(feats, [], []).shape == (0,)
  with pytest.raises(ValueError, match=r'\[0, 37\)'):
    ijb.score_pairs(feats, [0, 37], [1, 2])
  with pytest.raises(ValueError, match='one length'):
    ijb.score_pairs(feats, [0, 1], [1])


def test_pair_indices():
  rng, seed = fresh_rng()
  ids = np.unique(rng.integers(0, 10**6, 50))
  pairs = rng.choice(ids, (200, 2))
  i1, i2 = ijb.pair_indices(ids, pairs)
  assert np.array_equal(ids[i1], pairs[:, 0]), f'seed {seed}'
  assert np.array_equal(ids[i2], pairs[:, 1]), f'seed {seed}'
  unknown = int(ids.max()) + 1
  pairs[17, 1] = unknown
  with pytest.raises(ValueError, match=f'pair 17 names template {unknown}'):
    ijb.pair_indices(ids, pairs)
  with pytest.raises(ValueError, match='sorted and unique'):
    ijb.pair_indices(ids[::-1], pairs)


# --- Meta files ---------------------------------------------------------------

def _write_meta(root, name, names, tids, mids, landmarks, scores, pairs,
                order5=None):
  """ROOT/meta/<name>_*.txt as the IJB release writes them."""
  meta = pathlib.Path(root) / 'meta'
  meta.mkdir(parents=True, exist_ok=True)
  (meta / f'{name}_face_tid_mid.txt').write_text(''.join(
      f'{n} {t} {m}\n' for n, t, m in zip(names, tids, mids)))
  order5 = range(len(names)) if order5 is None else order5
  (meta / f'{name}_name_5pts_score.txt').write_text(''.join(
      f'{names[i]} ' + ' '.join(f'{v:.6f}' for v in np.ravel(landmarks[i]))
      + f' {scores[i]:.6f}\n' for i in order5))
  (meta / f'{name}_template_pair_label.txt').write_text(''.join(
      f'{a} {b} {int(y)}\n' for (a, b), y in zip(pairs[0], pairs[1])))
  return meta


def _random_meta_files(rng, root, name='ijbc', shuffle5=False):
  n = int(rng.integers(3, 40))
  names = [f'{k + 1}.jpg' for k in range(n)]
  tids = rng.integers(1, 8, n)
  mids = rng.integers(100, 120, n)
  landmarks = np.round(rng.uniform(0, 200, (n, 5, 2)), 3)
  scores = np.round(rng.uniform(0, 1, n), 4)
  present = np.unique(tids)
  pairs = (rng.choice(present, (25, 2)), rng.random(25) < 0.3)
  order5 = rng.permutation(n) if shuffle5 else None
  _write_meta(root, name, names, tids, mids, landmarks, scores, pairs, order5)
  return names, tids, mids, landmarks, scores, pairs


def test_load_meta_round_trip(tmp_path):
  rng, seed = fresh_rng()
  for k, shuffle5 in enumerate((False, True)):
    root = tmp_path / f'IJBC{k}'
    names, tids, mids, lmk, scores, pairs = _random_meta_files(
        rng, root, shuffle5=shuffle5)
    msg = f'seed {seed}, 5pts shuffled {shuffle5}'
    meta = ijb.load_meta(root)  # name inferred
    assert meta.name == 'ijbc', msg
    assert meta.image_names.tolist() == names, msg
    assert meta.template_ids.tolist() == tids.tolist(), msg
    assert meta.media_ids.tolist() == mids.tolist(), msg
    assert meta.landmarks.shape == (len(names), 5, 2), msg
    assert meta.landmarks.dtype == np.float32, msg
    np.testing.assert_allclose(meta.landmarks, lmk, rtol=1e-6, err_msg=msg)
    np.testing.assert_allclose(meta.face_scores, scores, rtol=1e-6,
                               err_msg=msg)
    assert meta.pair_templates.tolist() == pairs[0].tolist(), msg
    assert meta.pair_labels.dtype == bool, msg
    assert meta.pair_labels.tolist() == pairs[1].tolist(), msg
  # An explicit name, in any case.
  _random_meta_files(rng, tmp_path / 'IJBB', name='ijbb')
  assert ijb.load_meta(tmp_path / 'IJBB', 'IJBB').name == 'ijbb'


def test_load_meta_errors(tmp_path):
  rng, _ = fresh_rng()
  (tmp_path / 'IJBC' / 'meta').mkdir(parents=True)
  with pytest.raises(ValueError, match='no meta folder at .*found IJBC'):
    ijb.load_meta(tmp_path)
  root = tmp_path / 'IJBC'
  with pytest.raises(ValueError, match='cannot infer the set name'):
    ijb.load_meta(root)
  t0 = _random_meta_files(rng, root)[1][0]  # a template with an image
  meta = root / 'meta'
  pair_file = meta / 'ijbc_template_pair_label.txt'
  # Missing files name the path expected.
  with pytest.raises(ValueError, match='missing IJB meta file .*ijbb_face'):
    ijb.load_meta(root, 'ijbb')
  _random_meta_files(rng, root, name='ijbb')
  with pytest.raises(ValueError, match='cannot infer.*ijbb.*ijbc'):
    ijb.load_meta(root)
  pair_file.rename(meta / 'moved.txt')
  with pytest.raises(ValueError, match=f'missing IJB meta file {pair_file}'):
    ijb.load_meta(root, 'ijbc')
  (meta / 'moved.txt').rename(pair_file)

  def rewrite(path, line, text):
    lines = path.read_text().splitlines()
    lines[line - 1] = text
    path.write_text('\n'.join(lines) + '\n')

  good = {p: p.read_text() for p in meta.iterdir()}
  cases = [
      ('ijbc_face_tid_mid.txt', 2, '2.jpg 3', 'image_name template_id'),
      ('ijbc_face_tid_mid.txt', 3, '3.jpg 3 x', 'image_name template_id'),
      ('ijbc_name_5pts_score.txt', 2, '2.jpg 1 2 3 4 5 6 7 8 9 nan 0.9',
       'face_score'),
      ('ijbc_name_5pts_score.txt', 1, '1.jpg 1 2 3', 'face_score'),
      ('ijbc_template_pair_label.txt', 4, '1 2', 'template1 template2'),
      ('ijbc_template_pair_label.txt', 5, '1 a 0', 'template1 template2'),
      ('ijbc_template_pair_label.txt', 6, '1 2 2', 'got label 2'),
      ('ijbc_template_pair_label.txt', 7, f'{t0} 999 1',
       'template 999 has no'),
  ]
  for file, line, text, what in cases:
    for p, content in good.items():
      p.write_text(content)
    rewrite(meta / file, line, text)
    with pytest.raises(ValueError) as e:
      ijb.load_meta(root, 'ijbc')
    assert f'{meta / file}, line {line}: ' in str(e.value), (file, line, e)
    assert what in str(e.value), (file, line, e)
  # Line numbers count blank lines and comments.
  for p, content in good.items():
    p.write_text(content)
  pair_file.write_text('# t1 t2 label\n\n' + good[pair_file].replace(
      '\n', '\n\n', 1).replace('\n', ' \n'))
  rewrite(pair_file, 6, f'{t0} 12345 0')
  with pytest.raises(ValueError, match=r'pair_label.txt, line 6: template '
                     '12345 has no image'):
    ijb.load_meta(root, 'ijbc')
  # A 5pts file without one of the images.
  for p, content in good.items():
    p.write_text(content)
  five = meta / 'ijbc_name_5pts_score.txt'
  lines = five.read_text().splitlines()
  five.write_text('\n'.join(lines[:1] + lines[2:]) + '\n')
  with pytest.raises(ValueError, match="no landmarks for image '2.jpg'"):
    ijb.load_meta(root, 'ijbc')
  five.write_text(good[five])
  pair_file.write_text('\n')
  with pytest.raises(ValueError, match='lists no pairs'):
    ijb.load_meta(root, 'ijbc')


# --- A hand-made set ----------------------------------------------------------

def test_hand_made_set_scores(tmp_path):
  # D = 3, unit vectors e1, e2, e3. Template 10: media 7 holds three images
  # along e1 (scales 2, 5, 0.1), media 8 one along e2: media pooling gives
  # e1 + e2, cos 1/sqrt2 with e1, where plain image averaging would give
  # 3 e1 + e2 (cos 3/sqrt10). Template 30 reuses media id 7 for an image
  # along e2: media are per template. Template 40: media 11 holds e1 and
  # 2 e3 (mean (e1 + e3) / 2), media 12 holds e3: (e1 + 3 e3) / 2, cos
  # 1/sqrt10 with e1 (image averaging: 1/sqrt5). Template 50 is a zero
  # feature: cos 0. Template 60: e1 (score 0.5) and e2 (score 1) in two
  # media: e1 + e2 without scores, 0.5 e1 + e2 with. Template 20: 4 e1
  # with score 0.3 (a single image: the score cancels).
  e1, e2, e3 = np.eye(3)
  rows = [  # (template, media, feature, score)
      (10, 7, 2 * e1, 1.0), (10, 7, 5 * e1, 1.0), (20, 9, 4 * e1, 0.3),
      (10, 8, 3 * e2, 1.0), (30, 7, e2, 1.0), (10, 7, 0.1 * e1, 1.0),
      (40, 11, e1, 1.0), (40, 12, e3, 1.0), (40, 11, 2 * e3, 1.0),
      (50, 13, 0 * e1, 1.0), (60, 14, e1, 0.5), (60, 15, e2, 1.0)]
  r2, r5, r10 = np.sqrt(2), np.sqrt(5), np.sqrt(10)
  pairs = [  # (t1, t2, label, cos without scores, cos with scores)
      (10, 20, 1, 1 / r2, 1 / r2), (10, 30, 0, 1 / r2, 1 / r2),
      (40, 20, 1, 1 / r10, 1 / r10), (40, 30, 0, 0, 0), (50, 20, 0, 0, 0),
      (60, 20, 1, 1 / r2, 1 / r5), (60, 30, 0, 1 / r2, 2 / r5),
      (10, 60, 1, 1, 3 / r10), (10, 40, 0, 1 / (r2 * r10), 1 / (r2 * r10))]
  root = tmp_path / 'IJBB'
  names = [f'{k}.jpg' for k in range(len(rows))]
  _write_meta(root, 'ijbb', names, [r[0] for r in rows], [r[1] for r in rows],
              np.zeros((len(rows), 5, 2)), [r[3] for r in rows],
              ([p[:2] for p in pairs], [p[2] for p in pairs]))
  meta = ijb.load_meta(root)
  features = np.array([r[2] for r in rows], np.float32)
  for use_scores, col in ((False, 3), (True, 4)):
    got = ijb.evaluate(features, meta, use_face_scores=use_scores)
    np.testing.assert_allclose(got['scores'], [p[col] for p in pairs],
                               rtol=0, atol=1e-6, err_msg=f'{use_scores}')
    assert got['labels'].tolist() == [bool(p[2]) for p in pairs]
    assert (got['num_pairs'], got['num_genuine'], got['num_impostors'],
            got['num_templates']) == (9, 4, 5, 6)
    assert got['auc'] == protocols.auc([p[col] for p in pairs],
                                       [p[2] for p in pairs])
    # 5 impostors: FAR 0.2 lets one through (the second largest passes).
    assert got['tar_at_far'] == protocols.tar_at_far(
        got['scores'], got['labels'], protocols.FARS)
  got = ijb.evaluate(features, meta, fars=(0.2,))
  # Impostors 1/sqrt2 (twice), 0, 0, 1/sqrt20: the threshold is 1/sqrt2
  # and only the genuine score 1 (template 10 against 60) lies above it.
  (entry,) = got['tar_at_far']
  np.testing.assert_allclose(entry['threshold'], 1 / r2, rtol=1e-6)
  assert entry['tar'] == 0.25
  with pytest.raises(ValueError, match='11 feature rows for 12 images'):
    ijb.evaluate(features[:-1], meta)


# --- Evaluate -----------------------------------------------------------------

def test_evaluate_matches_brute_force():
  rng, seed = fresh_rng()
  dim, num_subjects = 16, 8
  for trial in range(3):
    feats, tids, mids, scores = _random_structure(rng, 40, dim,
                                                  zero_rows=False)
    templates = np.unique(tids)
    subject = dict(zip(templates.tolist(),
                       rng.integers(0, num_subjects, len(templates))))
    centres = rng.normal(size=(num_subjects, dim))
    feats += 1.5 * centres[[subject[t] for t in tids.tolist()]] * (
        np.linalg.norm(feats, axis=1, keepdims=True) / np.sqrt(dim))
    a, b = np.triu_indices(len(templates), 1)
    pair_t = np.stack([templates[a], templates[b]], 1)
    labels = np.array([subject[x] == subject[y] for x, y in pair_t.tolist()])
    meta = ijb.Meta('ijbc', np.array([f'{k}.jpg' for k in range(len(tids))]),
                    tids, mids, np.zeros((len(tids), 5, 2), np.float32),
                    scores, pair_t, labels)
    for use_scores in (False, True):
      msg = f'seed {seed}, trial {trial}, scores {use_scores}'
      got = ijb.evaluate(feats, meta, use_face_scores=use_scores)
      pooled, cond = _brute_templates(feats, tids, mids,
                                      scores if use_scores else None)
      want = np.array([_brute_cosine(pooled[x], pooled[y])
                       for x, y in pair_t.tolist()])
      tol = np.array([1e-6 * max(2.0, cond[x] + cond[y])
                      for x, y in pair_t.tolist()])
      assert np.all(np.abs(got['scores'] - want) <= tol), msg
      assert got['num_pairs'] == len(labels), msg
      assert got['num_genuine'] == labels.sum(), msg
      assert got['num_impostors'] == (~labels).sum(), msg
      assert got['num_templates'] == len(templates), msg
      want_tar = protocols.tar_at_far(want, labels)
      assert [e['far'] for e in got['tar_at_far']] == [
          e['far'] for e in want_tar], msg
      # float32 and float64 scores agree on which side of a threshold (or
      # of each other) they lie unless they are within rounding of it.
      err = tol.max()
      for g, w in zip(got['tar_at_far'], want_tar):
        np.testing.assert_allclose(g['threshold'], w['threshold'], rtol=0,
                                   atol=err, err_msg=msg)
        if np.min(np.abs(want[labels] - w['threshold'])) > 2 * err:
          assert g['tar'] == w['tar'], msg
      genuine, impostor = want[labels], want[~labels]
      near = np.sum(np.abs(genuine[:, None] - impostor[None]) <= 2 * err)
      assert abs(got['auc'] - protocols.auc(want, labels)) <= (
          near / (genuine.size * impostor.size) + 1e-12), msg


def test_unreadable_images_are_left_out_of_their_templates():
  """Features come for the readable images only; the skipped rows (ints or
  aligned_batches' Skipped records) are left out of their templates, and a
  template none of whose images could be read is a zero vector: each of its
  pairs scores 0 and still counts."""
  rng, seed = fresh_rng()
  tids = np.array([1, 1, 2, 2, 3, 3, 3])
  feats = rng.normal(size=(7, 5)).astype(np.float32)
  pairs = np.array([[1, 2], [2, 3], [1, 3], [3, 3]])
  meta = ijb.Meta('ijbb', np.array([f'{k}.jpg' for k in range(7)]), tids,
                  np.arange(7), np.zeros((7, 5, 2), np.float32),
                  np.ones(7, np.float32), pairs, np.array([0, 0, 0, 1], bool))
  bad = [0, 2, 3]  # half of template 1, all of template 2
  kept = [k for k in range(7) if k not in bad]
  skipped = [images.Skipped(k, f'{k}.jpg', 'not an image: ...') for k in bad]
  for how in (bad, skipped):
    got = ijb.evaluate(feats[kept], meta, skipped=how)
    ids, pooled = ijb.template_features(feats, tids, np.arange(7),
                                        valid=np.isin(np.arange(7), kept))
    t3 = feats[4:].astype(np.float64)
    t3 = (t3 / np.linalg.norm(t3, axis=1, keepdims=True)).sum(0)
    want = [0, 0, _brute_cosine(feats[1], t3), 1]
    np.testing.assert_allclose(got['scores'], want, atol=1e-6,
                               err_msg=f'seed {seed}')
    assert np.all(pooled[1] == 0)
    assert (got['num_pairs'], got['num_templates'],
            got['num_empty_templates']) == (4, 3, 1)
  with pytest.raises(ValueError, match=r'5 feature rows for 4 images \(7 '
                     r'less 3 unreadable\) of ijbb'):
    ijb.evaluate(feats[:5], meta, skipped=bad)
  with pytest.raises(ValueError, match='none of the 7 images of ijbb'):
    ijb.evaluate(feats[:0], meta, skipped=range(7))


# --- Aligned images -----------------------------------------------------------

def test_aligned_batches_keep_order_and_skip_bad_images(tmp_path):
  rng, seed = fresh_rng()
  root, size = tmp_path / 'IJBC', 48
  crops = root / 'loose_crop'
  crops.mkdir(parents=True)
  n, bad = 8, {2: 'not an image', 5: 'truncated image', 6: 'missing file'}
  names, landmarks = [], []
  for k in range(n):
    w, h = (int(x) for x in rng.integers(60, 120, 2))
    name = f'{k + 1}.jpg'
    names.append(name)
    pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(crops / name, quality=90)
    # The template, scaled into the image and shifted at random.
    lmk = alignment.template(min(w, h) * 0.8)
    landmarks.append(lmk + rng.uniform(0, 0.2 * min(w, h), 2))
  (crops / names[2]).write_bytes(b'\xff\xd8 not really a JPEG')
  data = (crops / names[5]).read_bytes()
  (crops / names[5]).write_bytes(data[:len(data) // 2])
  (crops / names[6]).unlink()
  meta = ijb.Meta('ijbc', np.array(names), np.arange(n), np.arange(n),
                  np.array(landmarks, np.float32), np.ones(n, np.float32),
                  np.zeros((0, 2), np.int64), np.zeros(0, bool))
  want = {}  # the readable images only: a bad one is left out of its batch
  for k in range(n):
    if k not in bad:
      image = Image.open(crops / names[k]).convert('RGB')
      want[k] = np.asarray(alignment.align(image, meta.landmarks[k], size))
  for workers in (0, 3):
    msg = f'seed {seed}, workers {workers}'
    batches = ijb.aligned_batches(root, meta, image_size=size, batch_size=3,
                                  workers=workers)
    assert len(batches) == 3, msg
    for _ in range(2):  # a second pass starts a fresh count
      got = list(batches)
      # Batches of rows 0-2, 3-5, 6-7 less the bad rows 2, 5 and 6.
      assert [b.shape for b in got] == [(2, size, size, 3)] * 2 + [
          (1, size, size, 3)], msg
      assert all(b.dtype == np.uint8 for b in got), msg
      np.testing.assert_array_equal(np.concatenate(got),
                                    np.array(list(want.values())), err_msg=msg)
      assert batches.kept == list(want), msg
      assert [(s.index, s.name) for s in batches.skipped] == [
          (k, names[k]) for k in sorted(bad)], msg
      for s in batches.skipped:
        assert s.reason.startswith(bad[s.index]), (msg, s)
  with pytest.raises(ValueError, match='no image folder at .*loose_crop'):
    ijb.aligned_batches(tmp_path, meta)
