"""The head protocol (loss/heads.py): a new head is one definition and one
entry in heads.HEADS. A toy head that needs every hook the protocol offers
(state, its chunked form and what follows it, diagnostics, each sample's
embedding norm and a random key) runs through the full, chunked and
class-sharded losses with the same values and gradients, against a
float64 NumPy reference, and trains through the trainer on each path."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from configs import default
from npcface_jax.common import arrays
from npcface_jax.loss import class_shards, classifier, heads, registry
from npcface_jax.training import data_source, setup, train_step
from tests.helpers import fresh_rng
from tests.tiny_backbone import TinyNet


@dataclasses.dataclass(frozen=True)
class NormJitter(heads.Head):
  """CosFace whose margin per sample is margin * tanh(norm) plus
  N(0, sigma) noise drawn from the step's key; its state counts the calls,
  and it reports its margins."""

  name: ClassVar[str] = 'norm_jitter'
  needs: ClassVar[frozenset[str]] = frozenset({'norms', 'key'})
  scale: float = 16.0
  margin: float = 0.3
  sigma: float = 0.05

  def init_state(self, num_classes):
    return {'calls': jnp.zeros((), jnp.int32)}

  def parts(self):
    def row(c_y, state, given):
      noise = jax.random.normal(given.key, c_y.shape)
      return lax.stop_gradient(self.margin * jnp.tanh(given.norms)
                               + self.sigma * noise)

    return heads.MarginParts(
        row, lambda c, m, is_negative: (self.scale * c, ()),
        lambda c_y, m, sums: self.scale * (c_y - m))

  def after(self, state, row, sums):
    return {'calls': state['calls'] + 1}, {'margin': row}

  def summarize(self, metrics):
    return {'margin': jnp.mean(metrics['margin'])}


@pytest.fixture
def toy(monkeypatch):
  monkeypatch.setitem(heads.HEADS, NormJitter.name, NormJitter)
  return registry.get_head('norm_jitter', margin=0.25)


def _reference(x, w, labels, key, scale=16.0, margin=0.25, sigma=0.05):
  """Per-sample cross-entropy in float64 from the toy's definition."""
  norms = np.linalg.norm(x, axis=1)
  cos = (x / norms[:, None]) @ (w / np.linalg.norm(w, axis=1)[:, None]).T
  noise = np.asarray(jax.random.normal(key, (len(x),)), np.float64)
  m = margin * np.tanh(norms) + sigma * noise
  z = scale * cos
  rows = np.arange(len(x))
  z[rows, labels] = scale * (cos[rows, labels] - m)
  top = z.max(axis=1)
  return np.log(np.exp(z - top[:, None]).sum(axis=1)) + top - z[rows, labels]


def _inputs(rng, batch=12, num_classes=21, dim=8):
  x = rng.normal(0, 1, (batch, dim)) * rng.uniform(0.3, 3.0, (batch, 1))
  return x, rng.normal(0, 1, (num_classes, dim)), rng.integers(
      0, num_classes, batch)


def test_a_toy_head_is_one_definition_on_every_path(toy):
  """Full, chunked and class-sharded (4 shards, 21 classes padded to 24)
  agree with the reference in value and gradient, and the state and the
  diagnostics come through each."""
  rng, seed = fresh_rng()
  x, w, labels = _inputs(rng)
  key = jax.random.key(seed)
  state = toy.init_state(21)
  want = _reference(x, w, labels, key)
  mesh = jax.make_mesh((4,), ('model',),
                       axis_types=(jax.sharding.AxisType.Auto,))
  padded = class_shards.padded_num_classes(21, 4)
  sharded = classifier.sharded_classifier_loss(mesh, toy, 21, chunk_size=4)
  paths = {
      'full': lambda x, w: classifier.classifier_loss(
          x, w, labels, toy, state, head_key=key),
      'chunked': lambda x, w: classifier.classifier_loss(
          x, w, labels, toy, state, chunk_size=5, head_key=key),
      'sharded': lambda x, w: sharded(
          x, jnp.pad(w, [(0, padded - 21), (0, 0)]), labels, state, {},
          head_key=key),
  }
  grads = {}
  for name, path in paths.items():
    def total(x, w, path=path):
      ce, out = path(x, w)
      return jnp.sum(ce), (ce, out.state['calls'],
                           toy.diagnostics(out)['norm_jitter/margin'])
    (_, (ce, calls, margin)), grads[name] = jax.jit(jax.value_and_grad(
        total, argnums=(0, 1), has_aux=True))(jnp.float32(x), jnp.float32(w))
    np.testing.assert_allclose(ce, want, rtol=2e-5, atol=2e-5,
                               err_msg=f'{name}, seed {seed}')
    assert int(calls) == 1 and margin > 0, name
  for name in ('chunked', 'sharded'):
    for got, ref in zip(grads[name], grads['full']):
      np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5,
                                 err_msg=f'{name}, seed {seed}')


def test_the_toy_is_given_its_norms_and_its_key(toy):
  """The margins move with the embeddings' norms (not just their
  directions) and with the key; a head that needs a key and gets none is
  refused, naming it."""
  rng, seed = fresh_rng()
  x, w, labels = _inputs(rng)
  key = jax.random.key(seed)

  def margins(x, key):
    return classifier.classifier_loss(jnp.float32(x), jnp.float32(w), labels,
                                      toy, toy.init_state(21),
                                      head_key=key)[1].metrics['margin']

  base = margins(x, key)
  assert not np.allclose(margins(2 * x, key), base)
  assert not np.allclose(margins(x, jax.random.fold_in(key, 1)), base)
  np.testing.assert_allclose(margins(x, key), base)
  with pytest.raises(ValueError, match="'norm_jitter' draws at random"):
    classifier.classifier_loss(jnp.float32(x), jnp.float32(w), labels, toy,
                               toy.init_state(21))


def _steps(config, mesh, steps):
  data = data_source.open_data(config, mesh)
  task = setup.make_task(config, mesh, data)
  task = dataclasses.replace(task, model=TinyNet(config.embedding_dim))
  state = setup.init_state(task)
  step = train_step.make_train_step(task, setup.state_shardings(task, state))
  stream, history = data.open(None), []
  for _ in range(steps):
    state, metrics = step(state, next(stream))
    history.append(jax.device_get(metrics))
  return state, history


@pytest.mark.slow
def test_the_toy_trains_on_every_path(toy):
  """The trainer names no head: the toy, registered in HEADS only, trains
  on one device (full and chunked: the same steps, its key drawn from the
  seed and the step) and class-sharded over 8 devices."""
  c = default.get_config()
  c.update_from_flattened_dict({
      'head': 'norm_jitter', 'dataset': 'synthetic',
      'synthetic.num_classes': 61, 'synthetic.image_size': 32,
      'synthetic.epoch_examples': 64, 'synthetic.heldout_identities': 0,
      'embedding_dim': 32, 'batch_size': 16, 'learning_rate': 0.01,
      'eval_every_steps': 0})
  one = arrays.make_mesh(1, jax.devices()[:1])
  full, h_full = _steps(c, one, 3)
  c.chunk_size = 16
  chunked, h_chunked = _steps(c, one, 3)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=2e-5),
               jax.device_get(chunked.params), jax.device_get(full.params))
  c.model_parallel = 2
  sharded, h_sharded = _steps(c, arrays.make_mesh(2), 3)
  for state, history in ((full, h_full), (chunked, h_chunked),
                         (sharded, h_sharded)):
    assert int(state.head_state['calls']) == 3
    assert all(np.isfinite(m['loss']) and m['norm_jitter/margin'] > 0
               for m in history)
