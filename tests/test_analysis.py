"""Hard-sample statistics (the paper's Figs. 3, 5-7) against an independent
float64 NumPy computation: the per-sample values the loss computes (full,
chunked, class-sharded over eight fake devices, padding included), the
mis-classified test (and that it is NPCFace's mask), the embeddings'
norms the train step returns, and the host's summary (histograms, overlap
rate, Pearson's r, the norms' histogram and means); the records a run
writes, and that records written before norms were recorded still read."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import npcface_jax as nf
from npcface_jax.common import jsonfile
from npcface_jax.loss import class_shards, classifier
from npcface_jax.training import hard_samples
from tests.conftest import NUM_DEVICES
from tests.helpers import fresh_rng

B, D, C = 24, 16, 61  # 61 classes: 8 shards pad them to 64


def _problem(rng):
  labels = rng.integers(0, C, B)
  weights = rng.normal(size=(C, D))
  # Near their centre at different distances: some samples are
  # mis-classified, some not.
  x = weights[labels] + rng.normal(0.0, rng.uniform(0.3, 3.0, (B, 1)), (B, D))
  return x, weights, labels


def _reference(x, w, labels, margin):
  """(cos to target, largest cos to another class, mis-classified) in
  float64, one sample at a time, from the definitions."""
  xn = x / np.linalg.norm(x, axis=1, keepdims=True)
  wn = w / np.linalg.norm(w, axis=1, keepdims=True)
  cos = xn @ wn.T
  c_y = np.array([cos[i, y] for i, y in enumerate(labels)])
  near = np.array([max(cos[i, j] for j in range(len(w)) if j != y)
                   for i, y in enumerate(labels)])
  mis = near > np.cos(np.arccos(c_y) + margin)
  return c_y, near, mis


def _check(out, x, w, labels, seed, margin=0.4):
  c_y, near, mis = _reference(x, w, labels, margin)
  got_c_y = np.asarray(out.metrics['cos_target'])
  got_near = np.asarray(out.metrics['cos_nearest'])
  np.testing.assert_allclose(got_c_y, c_y, atol=2e-6, err_msg=f'seed {seed}')
  np.testing.assert_allclose(got_near, near, atol=2e-6,
                             err_msg=f'seed {seed}')
  got_mis = np.asarray(classifier.misclassified(got_c_y, got_near, margin))
  # float32 may decide a sample within rounding of the threshold otherwise
  close = np.abs(near - np.cos(np.arccos(c_y) + margin)) < 1e-5
  np.testing.assert_array_equal(got_mis[~close], mis[~close], f'seed {seed}')
  assert 0 < mis.sum() < B, f'want both kinds of sample, seed {seed}'


def _fresh_problem():
  rng, seed = fresh_rng()
  for _ in range(20):  # a draw with every sample alike tests less: redraw
    x, w, labels = _problem(rng)
    mis = _reference(x, w, labels, 0.4)[2]
    if 2 < mis.sum() < B - 2:
      break
  return x, w, labels, seed


@pytest.mark.parametrize('chunk_size', [None, 7])
def test_per_sample_values_on_one_device(chunk_size):
  x, w, labels, seed = _fresh_problem()
  _, out = classifier.classifier_loss(jnp.float32(x), jnp.float32(w), labels,
                                      nf.get_head('arcface'),
                                      chunk_size=chunk_size)
  _check(out, x, w, labels, seed)


@pytest.mark.parametrize('chunk_size', [None, 3])
@pytest.mark.parametrize('layout', ['model', 'data_and_model'])
def test_per_sample_values_class_sharded(chunk_size, layout):
  """The classifier's rows over the 'model' axis (all 8 devices, or 4 with
  the batch split over 'data' too), 61 classes padded to 64: the target
  through psum, the maximum through pmax."""
  assert jax.device_count() == NUM_DEVICES
  x, w, labels, seed = _fresh_problem()
  shape = (1, 8) if layout == 'model' else (2, 4)
  mesh = jax.make_mesh(shape, ('data', 'model'))
  loss = classifier.sharded_classifier_loss(
      mesh, nf.get_head('npcface'), C, chunk_size=chunk_size,
      batch_axis=None if layout == 'model' else 'data')
  padded = class_shards.padded_num_classes(C, shape[1])
  w_padded = jnp.pad(jnp.float32(w), [(0, padded - C), (0, 0)])
  _, out = jax.jit(loss)(jnp.float32(x), w_padded, labels, {}, {})
  _check(out, x, w, labels, seed)


@pytest.mark.parametrize('preset', ['paper', 'facex_zoo'])
def test_misclassified_is_npcfaces_mask(preset):
  """At NPCFace's hard margin, a sample is mis-classified exactly when the
  head found a hard negative for it (float32 both)."""
  x, w, labels, seed = _fresh_problem()
  head = nf.get_head('npcface', preset=preset)
  margin = head.options['hard_margin'] or head.options['m0']
  _, out = classifier.classifier_loss(jnp.float32(x), jnp.float32(w), labels,
                                      head)
  mis = classifier.misclassified(out.metrics['cos_target'],
                                 out.metrics['cos_nearest'], margin)
  np.testing.assert_array_equal(mis, out.metrics['num_hard'] > 0,
                                f'seed {seed}')


def _numpy_record(c_y, near, mis):
  """The summary written from the definitions, in float64."""
  edges = np.linspace(-1, 1, 201)
  hist = lambda v: np.histogram(v, edges)[0]  # noqa: E731
  well, bad = hist(c_y[~mis]), hist(c_y[mis])
  overlap = np.minimum(well / well.sum(), bad / bad.sum()).sum()
  angles = np.degrees(np.arccos(c_y[mis])), np.degrees(np.arccos(near[mis]))
  return {'target_well': well, 'target_misclassified': bad,
          'nearest_misclassified': hist(near[mis]), 'overlap': overlap,
          'pearson': np.corrcoef(*angles)[0, 1], 'mis': mis.sum(),
          'mean_near': near[mis].mean()}


def test_window_summary_against_numpy():
  """Batches added one by one equal the definitions on all of them at once;
  non-finite samples are dropped and counted."""
  rng, seed = fresh_rng()
  n = 3000
  c_y = np.tanh(rng.normal(0.3, 0.4, n))
  near = np.clip(c_y * -0.5 + rng.normal(0.3, 0.1, n), -1, 1)
  mis = near > np.cos(np.arccos(c_y) + 0.4)
  want = _numpy_record(c_y, near, mis)
  window = hard_samples.Window(first_step=11)
  for part in np.array_split(np.arange(n), 7):
    window.add(np.float32(c_y[part]), np.float32(near[part]), mis[part])
  window.add([np.nan, 0.5], [0.1, -np.inf], [True, False])
  got = window.record(step=17, epoch=2.0, margin=0.4)
  assert (got['samples'], got['dropped'], got['first_step']) == (n, 2, 11)
  assert got['misclassified'] == want['mis'], f'seed {seed}'
  for key in hard_samples.HISTOGRAMS:
    # float32 inputs may cross a bin edge: at most a few samples move
    diff = np.abs(np.array(got['hist'][key]) - want[key]).sum()
    assert diff <= 4 and sum(got['hist'][key]) == want[key].sum(), key
  np.testing.assert_allclose(got['pearson'], want['pearson'], atol=1e-5)
  np.testing.assert_allclose(got['overlap'], want['overlap'], atol=3e-3)
  np.testing.assert_allclose(got['mean_cos_nearest_misclassified'],
                             want['mean_near'], atol=1e-6)
  assert len(got['scatter_degrees']) == hard_samples.SCATTER
  json.dumps(got, allow_nan=False)  # a JSON line as it is


def test_norm_summary_against_numpy():
  """The norm histogram of a record is NumPy's over the edges the record
  states, of every kept sample; mean, std and the mis- and well-classified
  means are the definitions'; a window never given norms writes none."""
  rng, seed = fresh_rng()
  n = 1500
  c_y = np.tanh(rng.normal(0.3, 0.4, n))
  near = np.clip(c_y * -0.5 + rng.normal(0.3, 0.1, n), -1, 1)
  mis = near > np.cos(np.arccos(c_y) + 0.4)
  norms = np.exp(rng.normal(2.5, 0.8, n))  # spans decades
  norms[:3] = (0.0, 1e-5, 5e6)  # outside the bins: in the end bins
  window = hard_samples.Window(first_step=1)
  for part in np.array_split(np.arange(n), 5):
    window.add(c_y[part], near[part], mis[part], norm=norms[part])
  window.add([0.5, 0.2], [0.1, 0.0], [False, True], norm=[np.nan, np.inf])
  got = window.record(step=9, epoch=1.0, margin=0.4)
  assert (got['samples'], got['dropped']) == (n, 2), f'seed {seed}'
  edges = hard_samples.norm_edges(got['norm_bins'])
  want = np.histogram(np.clip(norms, edges[0], edges[-1]), edges)[0]
  np.testing.assert_array_equal(got['norm_hist'], want, f'seed {seed}')
  assert got['norm_hist'][0] == np.sum(norms <= edges[1]) >= 2
  assert got['norm_hist'][-1] >= 1
  np.testing.assert_allclose(
      [got['mean_norm'], got['std_norm'], got['mean_norm_misclassified'],
       got['mean_norm_well']],
      [norms.mean(), norms.std(), norms[mis].mean(), norms[~mis].mean()],
      rtol=1e-9, err_msg=f'seed {seed}')
  assert hard_samples.check_stats(json.loads(json.dumps(got))) is None
  scalars, _ = hard_samples.tensorboard(got)
  assert scalars['analysis/mean_norm'] == got['mean_norm']
  plain = hard_samples.Window(1)
  plain.add(c_y, near, mis)
  assert not {'norm_hist', 'mean_norm'} & set(plain.record(2, 1.0, 0.4))


def test_old_and_damaged_norm_records(tmp_path):
  """A record without norms (written before they were recorded) reads; one
  whose norm histogram does not fit its bins is left out, saying why."""
  window = hard_samples.Window(1)
  window.add([0.5, 0.1], [0.2, 0.3], [False, True], norm=[3.0, 4.0])
  new = window.record(2, 1.0, 0.4)
  old = {k: v for k, v in new.items()
         if 'norm' not in k} | {'step': 1}
  bad = dict(new, step=3, norm_hist=new['norm_hist'][:-1])
  file = str(tmp_path / 'stats.jsonl')
  for record in (old, new, bad):
    jsonfile.append_line(file, record)
  records, left_out = hard_samples.read_records(file,
                                                hard_samples.check_stats)
  assert [r['step'] for r in records] == [1, 2]
  assert len(left_out) == 1 and 'norm_hist' in left_out[0]


@pytest.mark.slow
def test_the_train_step_returns_the_embedding_norms():
  """With the analysis on, 'hard_samples' holds each sample's embedding
  norm, the backbone's output on that batch as the step ran it."""
  from tests.test_train import _config, _task  # noqa: PLC0415 (only here)
  from npcface_jax.common import arrays  # noqa: PLC0415
  from npcface_jax.training import setup, train_step  # noqa: PLC0415
  config = _config(head='magface')
  data, task = _task(config, arrays.make_mesh(1, jax.devices()[:1]), True)
  state = setup.init_state(task)
  batch = next(data.open(None))
  rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(task.seed), 1),
                           state.step)
  embeddings, _ = task.model.apply(
      {'params': state.params['backbone'], 'batch_stats': state.batch_stats},
      batch['image'], train=True, mutable=['batch_stats'],
      rngs={'dropout': rng})
  want = np.linalg.norm(np.asarray(embeddings, np.float64), axis=-1)
  step = train_step.make_train_step(task, setup.state_shardings(task, state),
                                    analysis_margin=0.4)
  _, metrics = step(state, batch)
  got = np.asarray(metrics['hard_samples']['norm'])
  assert got.shape == (config.batch_size,)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_summary_edge_cases():
  assert hard_samples.overlap_rate([1, 2, 0], [0, 0, 0]) is None
  assert hard_samples.overlap_rate([1, 1], [1, 1]) == pytest.approx(1.0)
  assert hard_samples.overlap_rate([1, 0], [0, 3]) == 0.0
  assert hard_samples.pearson([1, 1, 1, 1, 1, 1]) is None
  record = hard_samples.Window(1).record(5, 1.0, 0.4)
  assert record['pearson'] is None and record['overlap'] is None
  assert record['misclassified_share'] is None
  assert hard_samples.tensorboard(record) == ({}, {})


def test_records_rewind_after_a_resume_and_survive_a_torn_line(tmp_path):
  file = str(tmp_path / 'stats.jsonl')
  # resumed from step 10's checkpoint: 'line' tells the timelines apart
  for line, step in enumerate((10, 20, 30, 20, 30, 40)):
    jsonfile.append_line(file, {'step': step, 'line': line})
  with open(file, 'a') as f:
    f.write('{"step": 50, "cut sh')  # a crash while writing
  records, left_out = hard_samples.read_records(file)
  assert [r['step'] for r in records] == [10, 20, 30, 40]
  assert [r['line'] for r in records] == [0, 3, 4, 5]
  assert len(left_out) == 1 and 'line 7' in left_out[0]
  assert hard_samples.read_records(str(tmp_path / 'none.jsonl')) == ([], [])


@pytest.mark.slow
def test_a_class_sharded_run_writes_its_records(tmp_path, monkeypatch):
  """A short run with the classifier over 2 'model' devices: a record every
  4 steps and at the last, covering every sample of its steps; the training
  curve beside it; both in TensorBoard."""
  from tests import tiny_backbone  # noqa: PLC0415 (only this test)
  from tests.test_train import _config  # noqa: PLC0415 (only this test)
  from npcface_jax import models  # noqa: PLC0415
  from npcface_jax.training import loop  # noqa: PLC0415 (TF, clu)
  monkeypatch.setattr(models, 'from_config', tiny_backbone.create_model)
  config = _config(model_parallel=2, analysis_every_steps=4,
                   analysis_margin=0.3, checkpoint_every_steps=100)
  loop.train_and_evaluate(config, str(tmp_path))
  records, left_out = hard_samples.read_records(
      hard_samples.path(str(tmp_path)))
  assert not left_out
  assert [(r['step'], r['first_step'], r['samples'] + r['dropped'])
          for r in records] == [(4, 1, 64), (6, 5, 32)]
  for r in records:
    assert r['margin'] == 0.3 and r['dropped'] == 0
    assert sum(map(sum, (r['hist']['target_well'],
                         r['hist']['target_misclassified']))) == r['samples']
    assert sum(r['hist']['nearest_misclassified']) == r['misclassified']
  curve, _ = hard_samples.read_records(hard_samples.path(str(tmp_path),
                                                         hard_samples.METRICS))
  assert [m['step'] for m in curve] == [2, 4, 6]
  assert all(np.isfinite(m['loss']) for m in curve)
  tags = _tensorboard_tags(tmp_path)
  assert {'analysis/misclassified_share', 'analysis/cos_target_well',
          'loss'} <= tags, tags


def _tensorboard_tags(workdir) -> set[str]:
  import tensorflow as tf  # noqa: PLC0415 (only this test reads events)
  tags = set()
  for path in workdir.glob('events.out.tfevents.*'):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      tags.update(v.tag for v in event.summary.value)
  return tags
