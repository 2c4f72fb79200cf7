"""Partial FC's class sampling: which rows are drawn, the sampled NPCFace
loss and gradients against a float64 NumPy reference over the sampled
columns, on one device and class-sharded over eight, and the bounds that
keep shapes static. (The trainer's step with sampling is in
test_scale.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from npcface_jax.common import arrays
import npcface_jax as nf
from npcface_jax.loss import class_shards, classifier
from npcface_jax.training import config_checks, data_source, setup
from tests import np_reference as ref
from tests.conftest import NUM_DEVICES
from tests.helpers import away_from, fresh_rng
from tests.test_train import _config

B, D = 16, 16


def test_sample_classes_keeps_targets_and_draws_uniformly():
  rng, seed = fresh_rng()
  num_rows, num_sample, shards = 40, 12, 3
  labels = jnp.asarray(rng.integers(0, num_rows * shards, 10))
  key = jax.random.key(seed)
  for shard in range(shards):
    rows = np.asarray(classifier.sample_classes(key, labels, shard, num_rows,
                                                num_sample))
    local = np.asarray(labels) - shard * num_rows
    targets = set(local[(local >= 0) & (local < num_rows)])
    assert rows.shape == (num_sample,), seed
    assert np.all(np.diff(rows) > 0) and 0 <= rows[0] and rows[-1] < num_rows
    assert targets <= set(rows), f'a target was dropped, seed {seed}'
  # The last shard holds 30 real classes and 10 padding rows: never drawn.
  real = labels[labels < 110]
  rows = classifier.sample_classes(key, real, 2, num_rows, num_sample, 110)
  assert np.all(np.asarray(rows) < 30), (rows, seed)
  # Every non-target row is drawn with probability (k - t) / (n - t).
  draws = 4000
  rows = jax.vmap(lambda k: classifier.sample_classes(
      k, labels, 0, num_rows, num_sample))(jax.random.split(key, draws))
  counts = np.bincount(np.asarray(rows).ravel(), minlength=num_rows)
  local = np.asarray(labels)
  targets = np.unique(local[local < num_rows])
  others = np.setdiff1d(np.arange(num_rows), targets)
  np.testing.assert_array_equal(counts[targets], draws)
  p = (num_sample - len(targets)) / (num_rows - len(targets))
  sd = np.sqrt(draws * p * (1 - p))
  assert np.all(np.abs(counts[others] - draws * p) < 5 * sd), (counts, seed)


def _problem(rng, num_classes):
  """Embeddings near their class centres, so that some samples have hard
  negatives."""
  labels = rng.integers(0, num_classes, B)
  w = rng.normal(size=(num_classes, D))
  x = w[labels] + rng.normal(0.0, rng.uniform(0.3, 1.5, (B, 1)), (B, D))
  return x, w, labels


def _sampled_columns(key, labels, num_classes, shards, num_sample):
  """The global classes scored, in the order the shards hold them."""
  rows = class_shards.padded_num_classes(num_classes, shards) // shards
  return np.concatenate([
      k * rows + np.asarray(classifier.sample_classes(
          key, jnp.asarray(labels), k, rows, num_sample, num_classes))
      for k in range(shards)])


class _Reference:
  """Mean NPCFace cross-entropy over the sampled columns only, float64,
  written from eqs. 10-12 (tests/np_reference.py); the hard mask and the
  margins are frozen for differentiation, as the paper's code holds them."""

  def __init__(self, x, w, labels, columns, scale):
    self.w, self.columns, self.scale = w, columns, scale
    position = {c: j for j, c in enumerate(columns)}
    self.y = np.array([position[c] for c in labels])
    cos = self.cos(x, w[columns])
    _, self.frozen, self.counts = ref.npcface(cos, self.y, s=scale)
    c_y = cos[np.arange(len(labels)), self.y]
    # float32 and float64 agree on the mask only away from its threshold.
    self.clear = away_from(cos, np.cos(np.arccos(c_y) + 0.4))

  @staticmethod
  def cos(x, rows):
    return ((x / np.linalg.norm(x, axis=1, keepdims=True))
            @ (rows / np.linalg.norm(rows, axis=1, keepdims=True)).T)

  def loss(self, x, rows):
    logits = ref.npcface(self.cos(x, rows), self.y, s=self.scale,
                         frozen=self.frozen)[0]
    return ref.cross_entropy(logits, self.y).mean()

  def value_and_grads(self, x):
    rows = self.w[self.columns]
    gw = np.zeros_like(self.w)
    gw[self.columns] = ref.central_difference(lambda r: self.loss(x, r), rows)
    gx = ref.central_difference(lambda v: self.loss(v, rows), x)
    return self.loss(x, rows), gx, gw


@pytest.mark.slow
@pytest.mark.parametrize('shards,num_sample,chunk_size',
                         [(1, 40, None), (1, 40, 7), (8, 16, None), (8, 16, 5)])
def test_sampled_loss_equals_reference(shards, num_sample, chunk_size):
  """C = 190 (8 shards of 24 rows, the last with 22 real ones); one device
  scores 40 classes, eight score 16 each: the loss, its gradients (zero on
  every row not drawn, padding included) and NPCFace's hard-negative counts
  are the reference's over those classes."""
  rng, seed = fresh_rng()
  num_classes, scale = 190, 32.0
  head = nf.get_head('npcface', scale=scale)
  key = jax.random.key(seed)
  for _ in range(20):
    x, w, labels = _problem(rng, num_classes)
    columns = _sampled_columns(key, labels, num_classes, shards, num_sample)
    want = _Reference(x, w, labels, columns, scale)
    if want.clear:
      break
  padded = class_shards.padded_num_classes(num_classes, shards)
  w_padded = np.pad(w, [(0, padded - num_classes), (0, 0)])
  if shards == 1:
    def loss(x, w):
      ce, out = classifier.classifier_loss(
          x, w, labels, head, num_classes=num_classes, chunk_size=chunk_size,
          num_sample=num_sample, key=key)
      return jnp.mean(ce), out
  else:
    mesh = jax.make_mesh((NUM_DEVICES,), ('model',))
    sharded = classifier.sharded_classifier_loss(
        mesh, head, num_classes, chunk_size=chunk_size, num_sample=num_sample)

    def loss(x, w):
      ce, out = sharded(x, w, labels, {}, {}, key)
      return jnp.mean(ce), out
  (value, out), (gx, gw) = jax.jit(jax.value_and_grad(
      loss, (0, 1), has_aux=True))(np.float32(x), np.float32(w_padded))
  gw = np.asarray(gw)
  ref_value, ref_gx, ref_gw = want.value_and_grads(x)
  msg = f'{shards} shards, chunk {chunk_size}, seed {seed}'
  np.testing.assert_allclose(value, ref_value, rtol=2e-5, err_msg=msg)
  np.testing.assert_allclose(gx, ref_gx, rtol=1e-3,
                             atol=1e-4 * np.abs(ref_gx).max(), err_msg=msg)
  np.testing.assert_allclose(gw[:num_classes], ref_gw, rtol=1e-3,
                             atol=1e-4 * np.abs(ref_gw).max(), err_msg=msg)
  assert not np.any(gw[num_classes:]), msg
  np.testing.assert_array_equal(out.metrics['num_hard'], want.counts, msg)
  assert 0 < want.counts.sum(), f'no hard negatives drawn, {msg}'


def test_sampling_bounds_are_named():
  with pytest.raises(ValueError, match='cannot hold the targets of 16'):
    classifier.check_sampling(1000, 8, 10, 16)
  with pytest.raises(ValueError, match='last of the 8 shards holds only 5'):
    classifier.check_sampling(61, 8, 6, 4)
  classifier.check_sampling(1_000_000, 8, 12_500, 512)
  assert classifier.num_sampled(1.0, 100) is None
  assert classifier.num_sampled(0.1, 125_000) == 12_500
  with pytest.raises(ValueError, match='sample_rate'):
    classifier.num_sampled(0.0, 100)
  mesh = arrays.make_mesh(8)
  c = _config(sample_rate=0.05, model_parallel=8)
  data = data_source.Data(400, 32, 4, None)
  with pytest.raises(config_checks.ConfigError,
                     match=r'config.sample_rate = 0.05: 3 sampled'):
    setup.make_task(c, mesh, data)
  with pytest.raises(config_checks.ConfigError, match='config.sample_rate'):
    config_checks.check(_config(sample_rate=1.5), num_devices=NUM_DEVICES)
  head = nf.get_head('npcface')
  with pytest.raises(ValueError, match='pass a key'):
    classifier.classifier_loss(jnp.ones((2, 4)), jnp.ones((5, 4)),
                               jnp.array([0, 1]), head, num_sample=3)
  sharded = classifier.sharded_classifier_loss(
      jax.make_mesh((NUM_DEVICES,), ('model',)), head, 64)
  with pytest.raises(ValueError, match='a key is needed exactly when'):
    sharded(jnp.ones((2, 4)), jnp.ones((64, 4)), jnp.array([0, 1]), {}, {},
            jax.random.key(0))
