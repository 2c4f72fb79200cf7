"""Face quality from the raw embedding norm (MagFace, AdaFace): the
embedder's norms against the backbone's raw output, the norms embed
writes, IJB and gallery templates weighted by norm against NumPy
references written here, the accuracy of the lowest-quality tenth of
pairs on constructed sets whose answer is known, --quality=none leaving
every result as it was, identify's cache format, and the norm output of
the export."""

import io
import json
import logging
import os

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from npcface_jax import embed as embed_command, evaluate, identify, models
from npcface_jax.common import arrays
from npcface_jax.evaluation import bin_format, embedding_step, ijb, protocols
from npcface_jax.faces import alignment
from npcface_jax.faces.images import normalize
from npcface_jax.serving import export_formats, trained_run
from tests import tiny_backbone
from tests.helpers import fresh_rng, random_variables
from tests.test_commands import write_run


# --- The embedder -------------------------------------------------------------

@pytest.fixture(scope='module')
def tiny():
  """TinyNet at 24 x 24 with variables drawn in NumPy, and 11 faces (a
  padded last batch)."""
  model = tiny_backbone.TinyNet(16)
  variables = random_variables(model, (1, 24, 24, 3))
  faces = np.random.default_rng(0).integers(0, 256, (11, 24, 24, 3),
                                            np.uint8)
  return model, variables, faces


def _raw(model, variables, faces):
  x = normalize(jnp.asarray(faces, jnp.float32), None)
  return np.asarray(model.apply(variables, x, train=False), np.float64)


@pytest.mark.parametrize('flip', [False, True])
def test_embedder_norms_are_the_raw_outputs_norms(tiny, flip):
  model, variables, faces = tiny
  embedder = embedding_step.Embedder(model, arrays.make_mesh(1), 16, flip)
  unit, norms = embedder(variables, faces, with_norms=True)
  assert norms.shape == (11,) and norms.dtype == np.float32
  raw = _raw(model, variables, faces)
  want = np.linalg.norm(raw, axis=1)
  if flip:  # the mean of the face's and its mirror's raw norms
    want = 0.5 * (want + np.linalg.norm(
        _raw(model, variables, faces[:, :, ::-1]), axis=1))
    raw = raw + _raw(model, variables, faces[:, :, ::-1])
  np.testing.assert_allclose(norms, want, rtol=1e-5)
  assert np.ptp(want) > 0.1 * want.mean()  # the faces' norms differ
  np.testing.assert_allclose(
      unit, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-5)
  # The default call is as before: the same embeddings, bit for bit.
  np.testing.assert_array_equal(embedder(variables, faces), unit)
  batches = [faces[:3], faces[3:3], faces[3:]]
  got = embedding_step.embed_batches(embedder, variables, batches, True)
  each = [embedder(variables, b, with_norms=True) for b in batches[::2]]
  np.testing.assert_array_equal(got[0], np.concatenate([e for e, _ in each]))
  np.testing.assert_array_equal(got[1], np.concatenate([n for _, n in each]))
  empty = embedder(variables, faces[:0], with_norms=True)
  assert empty[0].shape == (0, 0) and empty[1].shape == (0,)


def test_onnx_export_returns_the_norm(tiny):
  """The serving function with its norm output, through our ONNX
  translation, against the embedder (flip: the mean rule)."""
  ort = pytest.importorskip('onnxruntime', reason='the [export] extra')
  from npcface_jax.serving import onnx_graph  # noqa: PLC0415 (the extra)
  model, variables, faces = tiny
  embedder = embedding_step.Embedder(model, arrays.make_mesh(1), 16, True)
  unit, norms = embedder(variables, faces, with_norms=True)
  fn = export_formats.serving_function(model, variables, True,
                                       with_norm=True)
  graph = onnx_graph.to_onnx(fn, (24, 24, 3), jnp.uint8,
                             output_name=('embeddings', 'norm'))
  assert [o.name for o in graph.graph.output] == ['embeddings', 'norm']
  session = ort.InferenceSession(graph.SerializeToString(),
                                 providers=['CPUExecutionProvider'])
  for batch in (faces[:1], faces):
    e, n = session.run(['embeddings', 'norm'], {'images': batch})
    assert n.shape == (len(batch),)
    np.testing.assert_allclose(n, norms[:len(batch)], rtol=1e-5)
    assert np.sum(e * unit[:len(batch)], axis=1).min() > 0.9999
  with pytest.raises(ValueError, match='returns 2 arrays but 1 output'):
    onnx_graph.to_onnx(fn, (24, 24, 3), jnp.uint8)


# --- IJB templates ------------------------------------------------------------

def _reference_templates(raw, tids, mids, scores=None, valid=None):
  """Templates as MagFace's evaluation pools them, loop by loop: each
  image's raw embedding (its unit one times its norm), times its detector
  score when given; averaged per media of a template, summed over the
  template's media, normalised."""
  out = {}
  for t in sorted(set(tids.tolist())):
    total = np.zeros(raw.shape[1])
    for m in sorted(set(mids[tids == t].tolist())):
      rows = [i for i in range(len(raw)) if tids[i] == t and mids[i] == m
              and (valid is None or valid[i])]
      if rows:
        w = np.ones(len(rows)) if scores is None else scores[rows]
        total += np.mean(raw[rows] * w[:, None], axis=0)
    length = np.linalg.norm(total)
    out[t] = total / length if length > 0 else total
  return out


def test_ijb_norm_pooling_matches_a_numpy_reference():
  rng, seed = fresh_rng()
  for trial in range(10):
    n, dim = int(rng.integers(1, 60)), int(rng.integers(1, 9))
    raw = rng.normal(size=(n, dim)) * rng.uniform(0.1, 30, (n, 1))
    norms = np.linalg.norm(raw, axis=1)
    unit = raw / norms[:, None]
    tids = rng.integers(0, 6, n)
    mids = rng.integers(0, 4, n)
    scores = rng.uniform(0.1, 1, n)
    valid = rng.random(n) < 0.8
    msg = f'seed {seed}, trial {trial}'
    for face_scores in (None, scores):  # both: the product of the weights
      templates, pooled = ijb.template_features(
          unit, tids, mids, face_scores, valid, norms)
      want = _reference_templates(raw, tids, mids, face_scores, valid)
      assert templates.tolist() == sorted(want), msg
      np.testing.assert_allclose(pooled, np.stack([want[t] for t in
                                                   templates]),
                                 atol=2e-5, err_msg=msg)
    # Norms of one are no weighting: exactly the unweighted pooling.
    none = ijb.template_features(unit, tids, mids, scores, valid)[1]
    ones = ijb.template_features(unit, tids, mids, scores, valid,
                                 np.ones(n))[1]
    np.testing.assert_array_equal(ones, none, err_msg=msg)


def test_ijb_evaluate_with_norms_and_bad_norms():
  """ijb.evaluate's norms are the read rows' (skipped images left out)."""
  rng = np.random.default_rng(3)
  n, dim = 12, 4
  raw = rng.normal(size=(n, dim)) * rng.uniform(0.5, 20, (n, 1))
  tids, mids = np.arange(n) // 3, np.arange(n) // 2
  meta = ijb.Meta('ijbc', np.array([f'{i}.jpg' for i in range(n)]), tids,
                  mids, np.zeros((n, 5, 2), np.float32),
                  rng.uniform(0.5, 1, n).astype(np.float32),
                  np.array([[0, 1], [0, 2], [1, 3], [2, 3], [0, 3]]),
                  np.array([True, False, True, False, False]))
  read = np.ones(n, bool)
  read[5] = False
  norms = np.linalg.norm(raw, axis=1)
  unit = raw / norms[:, None]
  got = ijb.evaluate(unit[read], meta, skipped=[5], norms=norms[read])
  want = _reference_templates(raw, tids, mids, valid=read)
  pairs = meta.pair_templates
  np.testing.assert_allclose(got['scores'], [want[a] @ want[b]
                                             for a, b in pairs], atol=1e-5)
  plain = ijb.evaluate(unit[read], meta, skipped=[5])
  assert not np.allclose(plain['scores'], got['scores'])
  with pytest.raises(ValueError, match=r'one entry per feature row, shape '
                     r'\(11,\)'):
    ijb.evaluate(unit[read], meta, skipped=[5], norms=norms)
  with pytest.raises(ValueError, match='finite numbers >= 0'):
    ijb.template_features(unit, tids, mids, norms=-norms)


# --- The lowest-quality tenth of pairs ----------------------------------------

def _constructed_set():
  """200 pairs laid out as LFW (each tenth 10 same then 10 different):
  genuine pairs score 0.8, impostors 0.2, except 10 of the 20 pairs of
  lowest quality (a genuine at 0.1, an impostor at 0.9: wrong at any
  threshold). Those 20 have one face of norm 1 + k / 100 and one of norm
  100, so their mean norm is the set's highest: only the smaller of the
  two, the pair's quality, finds them."""
  issame = np.tile(np.repeat([True, False], 10), 10)
  sim = np.where(issame, 0.8, 0.2)
  norms = np.random.default_rng(1).uniform(10, 20, 400)
  low = np.arange(5, 200, 10)  # two per fold, of both labels
  assert len(low) == 20 and issame[low].sum() == 10
  norms[2 * low] = 1 + np.arange(20) / 100
  norms[2 * low + 1] = 100
  wrong = low[::2]
  sim[wrong] = np.where(issame[wrong], 0.1, 0.9)
  return sim, issame, norms


def test_lowest_quality_tenth_on_a_set_with_a_known_answer():
  sim, issame, norms = _constructed_set()
  folds = protocols.fold_assignment(issame)
  whole = protocols.verification_accuracy(sim, issame, folds=folds)
  assert whole['accuracy'] == pytest.approx(190 / 200)
  got = evaluate.low_quality(sim, issame, norms, folds,
                             whole['fold_thresholds'])
  assert got['accuracy'] == 0.5 and got['pairs'] == 20
  assert got['genuine'] == 10
  assert got['norm_min'] == pytest.approx(1.0)
  assert got['norm_max'] == pytest.approx(1.19)
  assert got['fraction'] == 0.1 and 'fold' in got['threshold_rule']


def test_lowest_quality_tenth_matches_a_numpy_reference():
  """Random sets: the k = ceil(N / 10) pairs of smallest min-norm, each
  at the threshold of its own fold (chosen on the other folds' pairs,
  every quality), counted right or wrong by hand."""
  rng, seed = fresh_rng()
  for trial in range(20):
    n = int(rng.integers(10, 300))
    issame = rng.random(n) < 0.5
    issame[:2] = [True, False]
    sim = np.round(rng.normal(np.where(issame, 0.5, 0.1), 0.3), 2)
    norms = np.round(rng.uniform(1, 30, 2 * n), 1)  # ties too
    folds = protocols.fold_assignment(issame)
    whole = protocols.verification_accuracy(sim, issame, folds=folds)
    got = protocols.lowest_quality_accuracy(
        sim, issame, protocols.pair_quality(norms), folds,
        whole['fold_thresholds'])
    quality = [min(norms[2 * i], norms[2 * i + 1]) for i in range(n)]
    k = -(-n // 10)
    chosen = sorted(range(n), key=lambda i: (quality[i], i))[:k]
    right = 0
    for i in chosen:
      threshold, _ = protocols.best_threshold(sim[folds.index != folds.index[
          i]], issame[folds.index != folds.index[i]])
      right += (sim[i] > threshold) == issame[i]
    msg = f'seed {seed}, trial {trial}'
    assert got['pairs'] == k, msg
    assert got['accuracy'] == right / k, msg
    assert got['quality_max'] == max(quality[i] for i in chosen), msg
    assert got['quality_min'] == min(quality), msg
  with pytest.raises(ValueError, match='one value per pair'):
    protocols.lowest_quality_accuracy(sim, issame, norms, folds,
                                      whole['fold_thresholds'])
  with pytest.raises(ValueError, match='even length'):
    protocols.pair_quality(norms[:-1])


def test_the_table_says_the_lowest_quality_tenth():
  pair = {'accuracy': 0.95, 'accuracy_std': 0.01, 'auc': 0.99,
          'num_pairs': 200, 'tar_at_far': []}
  low = {'accuracy': 0.5, 'pairs': 20, 'norm_min': 1.0, 'norm_max': 1.19}
  lines = evaluate.format_table({'mine': dict(pair, low_quality=low),
                                 'old': pair}).splitlines()
  assert len(lines) == 4 and lines[-1].startswith('lowest-quality tenth')
  assert lines[-1].endswith(': mine 50.00% of 20 pairs, norm 1-1.19')
  assert 'MagFace' in lines[-1]


# --- The commands on a run ----------------------------------------------------

@pytest.fixture(scope='module')
def model(tmp_path_factory):
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(models, 'from_config', tiny_backbone.create_model)
    workdir = write_run(tmp_path_factory.mktemp('run'), calibrate=True)
    return trained_run.open_model(workdir)


def _png(pixels) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, 'PNG')
  return buffer.getvalue()


def _crops(folder, rng, count, size):
  """count random aligned crops as PNG files in folder."""
  folder.mkdir(parents=True, exist_ok=True)
  for k in range(count):
    (folder / f'{k}.png').write_bytes(_png(rng.integers(
        0, 256, (size, size, 3), np.uint8)))


@pytest.mark.slow
def test_embed_writes_each_faces_norm(model, tmp_path):
  rng = np.random.default_rng(0)
  _crops(tmp_path / 'src', rng, 5, model.image_size)
  (tmp_path / 'src' / 'bad.png').write_bytes(b'not an image')
  record = embed_command.embed(model, [str(tmp_path / 'src')],
                               str(tmp_path / 'out'), aligned=True,
                               progress=False)
  got = trained_run.embed_images(model, record['names'],
                                 root=str(tmp_path / 'src'), aligned=True,
                                 progress=False, with_norms=True)
  norms = np.load(tmp_path / 'out' / 'norms.npy')
  assert norms.shape == (5,) and norms.dtype == np.float32
  np.testing.assert_array_equal(norms, got.norms)
  np.testing.assert_array_equal(np.load(tmp_path / 'out' / 'embeddings.npy'),
                                got.embeddings)
  written = json.loads((tmp_path / 'out' / 'embed.json').read_text())
  assert written['norms'] == [float(x) for x in norms]
  assert len(written['names']) == 5 and len(written['skipped']) == 1


def _bin(path, rng, pairs, size):
  issame = np.tile([True, False], pairs // 2)
  bins = [_png(rng.integers(0, 256, (size, size, 3), np.uint8))
          for _ in range(2 * pairs)]
  bin_format.save_bin(path, bins, issame)


def _ijb_release(root, rng, size):
  """8 images in 4 templates of 2 media each; one image unreadable."""
  from tests.test_ijb import _write_meta  # noqa: PLC0415 (its writer)
  n = 8
  _crops(root / 'loose_crop', rng, n, size)
  (root / 'loose_crop' / '3.png').write_bytes(b'not an image')
  names = [f'{k}.png' for k in range(n)]
  template = np.tile(alignment.template(size), (n, 1, 1))
  pairs = ([(a, b) for a in range(4) for b in range(a)],
           [a % 2 == b % 2 for a in range(4) for b in range(a)])
  _write_meta(root, 'ijbc', names, np.arange(n) // 2, np.arange(n) % 2 + 10,
              template, rng.uniform(0.5, 1, n), pairs)


@pytest.mark.slow
def test_evaluate_reports_the_lowest_quality_tenth_and_weights_ijb(
    model, tmp_path, monkeypatch):
  """A .bin pair set and an IJB folder through evaluate_run: the pair
  set's low_quality recomputed from the features and norms it exports,
  quality none as it was, and norm weighting as ijb.evaluate does it."""
  monkeypatch.setattr(models, 'from_config', tiny_backbone.create_model)
  rng = np.random.default_rng(0)
  size = model.image_size
  _bin(tmp_path / 'mine.bin', rng, 40, size)
  _ijb_release(tmp_path / 'IJBC', rng, size)
  quiet = dict(log=lambda *a: None, export_features=True)
  record = evaluate.evaluate_run(
      model.workdir, targets=[str(tmp_path / 'mine.bin')],
      ijb=[str(tmp_path / 'IJBC')], face_scores=True, **quiet)
  features = os.path.join(model.workdir, 'eval', 'step_0', 'features')
  mine = record['targets']['mine']
  feats = np.load(os.path.join(features, 'mine.npy'))
  norms = np.load(os.path.join(features, 'mine_norms.npy'))
  issame = np.tile([True, False], 20)
  _, want_norms = model.embed(bin_format.load_pairs(
      tmp_path / 'mine.bin', size).images, with_norms=True)
  np.testing.assert_array_equal(norms, want_norms)
  scores = protocols.pair_similarities(feats)
  folds = protocols.fold_assignment(issame)
  whole = protocols.verification_accuracy(scores, issame, folds=folds)
  assert mine['accuracy'] == whole['accuracy']
  assert mine['low_quality'] == evaluate.low_quality(
      scores, issame, norms, folds, whole['fold_thresholds'])
  assert mine['low_quality']['pairs'] == 4
  assert 'lowest-quality tenth' in evaluate.format_table(record['targets'])

  meta = ijb.load_meta(tmp_path / 'IJBC')
  plain = record['targets']['ijbc']
  assert plain['quality'] == 'none'
  assert not os.path.exists(os.path.join(features, 'ijbc_norms.npy'))
  ijb_feats = np.load(os.path.join(features, 'ijbc.npy'))
  # quality none: the embeddings of a call without norms, pooled as before
  np.testing.assert_array_equal(ijb_feats, np.concatenate(
      list(model.embedder(model.variables, b) for b in
           ijb.aligned_batches(tmp_path / 'IJBC', meta, size, 64)
           if len(b))))
  assert plain['auc'] == ijb.evaluate(ijb_feats, meta, True,
                                      skipped=[3])['auc']
  weighted = evaluate.evaluate_run(
      model.workdir, ijb=[str(tmp_path / 'IJBC')], face_scores=True,
      quality='norm', **quiet)['targets']['ijbc']
  assert weighted['quality'] == 'norm'
  ijb_norms = np.load(os.path.join(features, 'ijbc_norms.npy'))
  want = ijb.evaluate(ijb_feats, meta, True, skipped=[3], norms=ijb_norms)
  assert weighted['tar_at_far'] == want['tar_at_far']
  assert weighted['auc'] == want['auc']


def test_quality_flag_errors_name_the_fix(model, tmp_path):
  with pytest.raises(ValueError, match="--quality='magface': choose from "
                     'none, norm'):
    evaluate.evaluate_run(model.workdir, targets=['x.bin'],
                          quality='magface')
  with pytest.raises(ValueError, match='give --ijb, or leave --quality out'):
    evaluate.evaluate_run(model.workdir, targets=['x.bin'], quality='norm')
  with pytest.raises(ValueError, match='choose from none, norm'):
    identify.enroll(model, str(tmp_path), quality='high')


# --- Gallery templates and their cache ---------------------------------------

def _gallery(tmp_path, size):
  rng = np.random.default_rng(5)
  gallery = tmp_path / 'gallery'
  for person, count in (('ann', 3), ('bob', 2), ('cy', 1)):
    _crops(gallery / person, rng, count, size)
  return gallery


def test_gallery_templates_by_norm_and_none_as_before(model, tmp_path):
  gallery = _gallery(tmp_path, model.image_size)
  read = dict(aligned=True, progress=False)
  plain = identify.enroll(model, str(gallery), **read)
  weighted = identify.enroll(model, str(gallery), quality='norm', **read)
  assert plain['quality'] == 'none' and weighted['quality'] == 'norm'
  assert weighted['embedded'] == 0  # the norms came from the cache
  for k, person in enumerate(plain['names']):
    files = sorted((gallery / person).iterdir())
    got = trained_run.embed_images(model, [str(f) for f in files],
                                   with_norms=True, **read)
    # none: the normalised mean of the unit embeddings, as it always was
    mean = np.mean(list(got.embeddings), axis=0)
    np.testing.assert_array_equal(
        plain['templates'][k], (mean[None] / np.linalg.norm(
            mean[None], axis=1, keepdims=True))[0].astype(np.float32))
    # norm: the normalised sum of the raw embeddings
    raw = got.embeddings.astype(np.float64) * got.norms[:, None]
    want = raw.sum(0) / np.linalg.norm(raw.sum(0))
    np.testing.assert_allclose(weighted['templates'][k], want, atol=1e-6)
  assert not np.allclose(plain['templates'][0], weighted['templates'][0],
                         atol=1e-6)
  assert 'weighted by raw norm' in identify.format_result({
      'gallery': weighted, 'threshold': 0.3, 'threshold_source': 'given',
      'probes': [], 'skipped': []})


def test_an_old_gallery_cache_is_embedded_afresh(model, tmp_path, caplog):
  """A cache written before the norms were kept (no format, no norms) is
  not read: every photo is embedded again, once, saying so."""
  gallery = _gallery(tmp_path, model.image_size)
  read = dict(aligned=True, progress=False)
  first = identify.enroll(model, str(gallery), quality='norm', **read)
  path = identify.cache_path(model, str(gallery), True, 0.9)
  with np.load(path) as z:
    assert int(z['format']) == identify.CACHE_FORMAT == 2
    assert z['norms'].shape == (6,)
    old = {k: z[k] for k in z.files if k not in ('format', 'norms')}
  buffer = io.BytesIO()
  np.savez(buffer, **old)  # as the earlier identify wrote it
  with open(path, 'wb') as f:
    f.write(buffer.getvalue())
  with caplog.at_level(logging.WARNING):
    again = identify.enroll(model, str(gallery), quality='norm', **read)
  assert again['embedded'] == 6
  assert 'format 1 (written before it kept the embeddings\' norms)' in (
      caplog.text)
  np.testing.assert_allclose(again['templates'], first['templates'],
                             atol=1e-6)
  with np.load(path) as z:
    assert int(z['format']) == 2
  assert identify.enroll(model, str(gallery), **read)['embedded'] == 0


# --- Export -------------------------------------------------------------------

@pytest.mark.slow
def test_export_with_norm_in_every_format(model, tmp_path, monkeypatch):
  """export --with_norm: each format returns the norm within NORM_RTOL of
  the JAX embedder's, the card says so, and --check re-verifies it."""
  pytest.importorskip('onnxruntime', reason='the [export] extra')
  from npcface_jax import export  # noqa: PLC0415 (TensorFlow)
  from npcface_jax.serving import model_card  # noqa: PLC0415
  monkeypatch.setattr(models, 'from_config', tiny_backbone.create_model)
  rng = np.random.default_rng(0)
  _crops(tmp_path / 'crops', rng, 9, model.image_size)
  card = export.export_run(model.workdir, out=str(tmp_path / 'export'),
                           image_paths=[str(tmp_path / 'crops')], flip=True,
                           with_norm=True, log=lambda *_: None)
  assert card['parity']['passed'], card['parity']
  for fmt in export_formats.FORMATS:
    r = card['parity']['formats'][fmt]
    assert r['max_norm_error'] <= model_card.NORM_RTOL, fmt
  assert card['norm_output']['shape'] == ['batch']
  assert 'mirror' in card['norm_output']['meaning']
  text = (tmp_path / 'export' / model_card.CARD_MD).read_text()
  assert 'Output `norm`' in text and 'norm within' in text
  assert export.check_export(card['path'], log=lambda *_: None) == []
  run = export_formats.load('tflite', str(tmp_path / 'export' /
                                          'model.tflite'), with_norm=True)
  faces = np.load(tmp_path / 'export' / export.SAMPLE)
  e, n = run(faces['images'][:3])
  assert e.shape == (3, model.config.embedding_dim) and n.shape == (3,)
  np.testing.assert_allclose(n, faces['norms'][:3], rtol=1e-3)
