"""The chunked fused cross-entropy equals autodiff through the full logits:
loss, gradients in the embeddings and the classifier, new state, metrics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import npcface_jax as nf
from npcface_jax.loss import classifier, heads, registry
from npcface_jax.loss.chunked import chunked_cross_entropy
from tests import np_reference as ref
from tests.helpers import assert_same_step, fresh_rng

B, D = 24, 16
PART_HEADS = [n for n in registry.head_names() if nf.get_head(n).has_parts]


def _problem(rng, num_classes):
  labels = rng.integers(0, num_classes, B)
  labels[:4] = labels[4]  # the target gradient must add up, not overwrite
  w = rng.normal(size=(num_classes, D))
  x = w[labels] + rng.normal(0.0, rng.uniform(0.3, 3.0, (B, 1)), (B, D))
  return jnp.float32(x), jnp.float32(w), labels


def _both(head, x, w, y, chunk_size, state, params=None, head_key=None):
  """Both paths under jit, the head's state traced like a train step's;
  gradients in the embeddings, the classifier and the head's parameters,
  the loss the train step's (with the head's aux_loss)."""
  params = {} if params is None else params

  def loss(chunk):
    def f(x, w, params, state):
      ce, out = classifier.classifier_loss(x, w, y, head, state, params,
                                           chunk_size=chunk,
                                           head_key=head_key)
      return jnp.mean(ce) + out.aux_loss, out
    grad_fn = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)
    return jax.jit(grad_fn)(x, w, params, state)
  return loss(None), loss(chunk_size)


def test_every_head_but_two_has_parts():
  assert sorted(set(registry.head_names()) - set(PART_HEADS)) == [
      'adacos', 'adam_softmax']


@pytest.mark.slow
@pytest.mark.parametrize('name', PART_HEADS)
@pytest.mark.parametrize('num_classes,chunk_size', [(96, 32), (101, 16),
                                                     (50, 4096)])
def test_equals_full_logits(name, num_classes, chunk_size):
  rng, seed = fresh_rng()
  x, w, y = _problem(rng, num_classes)
  head = nf.get_head(name)
  state = head.init_state(num_classes)
  if name == 'sphereface':
    state = {'step': jnp.int32(40)}
  if name == 'curricularface':
    state = {'t': jnp.float32(0.3)}
  if name == 'adaface':  # statistics the norms of x straddle
    state = {'norm_mean': jnp.float32(4.0), 'norm_std': jnp.float32(1.5)}
  params = head.init_params(jax.random.key(seed), num_classes)
  if name == 'magface':  # norms across MagFace's clipped range [10, 110]
    x = x * jnp.float32(rng.uniform(2.0, 30.0, (B, 1)))
  full, chunked = _both(head, x, w, y, chunk_size, state, params,
                        jax.random.key(seed))
  assert chunked[0][1].logits is None
  assert_same_step(chunked, full, loss_rtol=2e-6,
                   msg=f'{name} C={num_classes} chunk={chunk_size} seed {seed}')


def test_npcface_against_float64_reference():
  """Independent of the full-logits JAX path: the reference formulas."""
  rng, seed = fresh_rng()
  x, w, y = _problem(rng, 70)
  xn = np.asarray(x, np.float64)
  xn /= np.linalg.norm(xn, axis=1, keepdims=True)
  wn = np.asarray(w, np.float64)
  wn /= np.linalg.norm(wn, axis=1, keepdims=True)
  logits, frozen, counts = ref.npcface(xn @ wn.T, y)
  out = chunked_cross_entropy(x, w, y, heads.NPCFace().parts(),
                              chunk_size=16)
  np.testing.assert_allclose(out.ce, ref.cross_entropy(logits, y), rtol=1e-5,
                             atol=1e-4, err_msg=f'seed {seed}')
  np.testing.assert_array_equal(out.sums[1], counts, err_msg=f'seed {seed}')


@pytest.mark.slow
def test_bfloat16_embeddings():
  rng, seed = fresh_rng()
  x, w, y = _problem(rng, 64)
  parts = heads.NPCFace().parts()
  g16 = jax.grad(lambda x: jnp.mean(chunked_cross_entropy(
      x, w, y, parts, chunk_size=16)[0]))(x.astype(jnp.bfloat16))
  g32 = jax.grad(lambda x: jnp.mean(chunked_cross_entropy(
      x, w, y, parts, chunk_size=16)[0]))(
          x.astype(jnp.bfloat16).astype(jnp.float32))
  assert g16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(g16, np.float32), g32, rtol=2e-2,
                             atol=2e-2 * float(jnp.max(jnp.abs(g32))),
                             err_msg=f'seed {seed}')


def test_heads_without_parts_say_so():
  head = nf.get_head('adacos')
  with pytest.raises(ValueError, match="'adacos' has no chunked form"):
    classifier.classifier_loss(jnp.ones((2, 4)), jnp.ones((5, 4)),
                               np.array([0, 1]), head, head.init_state(5),
                               chunk_size=2)
  with pytest.raises(ValueError, match='chunk_size must be positive'):
    chunked_cross_entropy(jnp.ones((2, 4)), jnp.ones((5, 4)), np.array([0, 1]),
                          heads.ArcFace().parts(), chunk_size=0)
