"""The class-sharded classifier on eight fake devices equals the unsharded
one: logits, loss and gradients (float32, rtol 1e-5), also for a class
count that 8 does not divide."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import npcface_jax as nf
from npcface_jax.loss import class_shards, classifier, registry
from tests.conftest import NUM_DEVICES
from tests.helpers import assert_same_step, fresh_rng

B, D = 16, 32


@pytest.fixture(scope='module')
def mesh():
  """jax.make_mesh's default: Explicit axes."""
  assert jax.device_count() == NUM_DEVICES, 'conftest should fake 8 devices'
  return jax.make_mesh((NUM_DEVICES,), ('model',))


@pytest.fixture(scope='module')
def auto_mesh():
  return jax.make_mesh((NUM_DEVICES,), ('model',),
                       axis_types=(jax.sharding.AxisType.Auto,))


def _problem(rng, num_classes):
  labels = rng.integers(0, num_classes, B)
  weights = rng.normal(size=(num_classes, D))
  # Embeddings near their class centre, so that some samples have hard
  # negatives and some do not.
  x = weights[labels] + rng.normal(0.0, rng.uniform(0.3, 3.0, (B, 1)), (B, D))
  return jnp.float32(x), jnp.float32(weights), labels


# The step's key for a head that draws at random (ElasticFace): the same on
# every class shard, so that sharded and unsharded draw alike.
HEAD_KEY = jax.random.key(7)


def _padded_params(head, params, pad):
  """The head's per-class parameters padded like the classifier's rows; the
  others (a learnt bias) as they are."""
  return {k: pad(v) if k in head.per_class_params else v
          for k, v in params.items()}


def _loss_fns(mesh, head, crit, num_classes):
  padded = class_shards.padded_num_classes(num_classes, NUM_DEVICES)
  sharded = classifier.sharded_classifier_loss(mesh, head, num_classes,
                                               return_logits=True)

  def pad(a):
    return jnp.pad(a, [(0, padded - num_classes)] + [(0, 0)] * (a.ndim - 1))

  def unsharded_loss(x, w, y, state, params):
    ce, out = classifier.classifier_loss(x, w, y, head, state, params,
                                         head_key=HEAD_KEY)
    return crit.reduce(ce) + out.aux_loss, out

  def sharded_loss(x, w, y, state, params):
    ce, out = sharded(x, pad(w), y, state, _padded_params(head, params, pad),
                      head_key=HEAD_KEY)
    return crit.reduce(ce) + out.aux_loss, out

  return unsharded_loss, sharded_loss


HEADS = [('npcface', {}), ('npcface', {'preset': 'facex_zoo'}),
         ('arcface', {}), ('cosface', {})] + [
             (n, {}) for n in registry.head_names()
             if n not in ('npcface', 'arcface', 'cosface', 'am_softmax')]


@pytest.mark.slow
@pytest.mark.parametrize('num_classes', [64, 61])
@pytest.mark.parametrize('name,options', HEADS,
                         ids=[n + ''.join(o.values()) for n, o in HEADS])
def test_sharded_equals_unsharded(mesh, name, options, num_classes):
  rng, seed = fresh_rng()
  x, w, y = _problem(rng, num_classes)
  head = nf.get_head(name, **options)
  state = head.init_state(num_classes)
  params = head.init_params(jax.random.key(seed), num_classes)
  crit = nf.get_criterion('softmax')
  results = []
  for fn in _loss_fns(mesh, head, crit, num_classes):
    grad_fn = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 4), has_aux=True))
    results.append(grad_fn(x, w, y, state, params))
  msg = f'{name} {options} C={num_classes} seed {seed}'
  assert_same_step(results[1], results[0], msg)
  out0, out1 = results[0][0][1], results[1][0][1]
  np.testing.assert_allclose(np.asarray(out1.logits)[:, :num_classes],
                             out0.logits, rtol=1e-5, atol=1e-4, err_msg=msg)
  assert np.all(np.isneginf(np.asarray(out1.logits)[:, num_classes:]))
  if name == 'npcface':
    hard = np.asarray(out0.metrics['num_hard'])
    assert (hard == 0).any() and (hard > 0).any(), msg


@pytest.mark.slow
def test_auto_axis_mesh(auto_mesh):
  rng, seed = fresh_rng()
  x, w, y = _problem(rng, 61)
  fns = _loss_fns(auto_mesh, nf.get_head('npcface'),
                  nf.get_criterion('softmax'), 61)
  (l0, _), g0 = jax.value_and_grad(fns[0], has_aux=True)(x, w, y, {}, {})
  (l1, _), g1 = jax.jit(jax.value_and_grad(fns[1], has_aux=True))(
      x, w, y, {}, {})
  np.testing.assert_allclose(l1, l0, rtol=1e-5, err_msg=str(seed))
  np.testing.assert_allclose(g1, g0, rtol=1e-5,
                             atol=1e-5 * float(jnp.max(abs(g0))))


@pytest.mark.slow
@pytest.mark.parametrize('criterion', ['focal', 'ohem'])
def test_sharded_criteria(mesh, criterion):
  rng, seed = fresh_rng()
  x, w, y = _problem(rng, 61)
  head = nf.get_head('npcface')
  crit = nf.get_criterion(criterion)
  values = [jax.jit(jax.value_and_grad(fn, argnums=(0, 1), has_aux=True))(
      x, w, y, {}, {}) for fn in _loss_fns(mesh, head, crit, 61)]
  np.testing.assert_allclose(values[1][0][0], values[0][0][0], rtol=1e-5,
                             err_msg=str(seed))
  for a, b in zip(values[1][1], values[0][1]):
    np.testing.assert_allclose(a, b, rtol=1e-5,
                               atol=1e-5 * float(jnp.max(abs(b))))


def test_npcface_logits_directly_in_shard_map(mesh):
  """The public function itself, on raw cosines split over the mesh."""
  rng, seed = fresh_rng()
  cos = jnp.float32(rng.uniform(-0.6, 0.9, (B, 40)))
  y = rng.integers(0, 37, B)
  cos = np.asarray(jnp.where(jnp.arange(40) < 37, cos, 0.0))  # 3 padding
  fn = jax.shard_map(
      lambda c, y: nf.npcface_logits(c, y, axis_name='model', num_classes=37),
      mesh=mesh, in_specs=(jax.P(None, 'model'), jax.P()),
      out_specs=jax.P(None, 'model'))
  sharded = jax.device_put(cos, jax.NamedSharding(mesh, jax.P(None, 'model')))
  got = np.asarray(jax.jit(fn)(sharded, y))
  np.testing.assert_allclose(got[:, :37], nf.npcface_logits(cos[:, :37], y),
                             rtol=1e-5, atol=1e-4, err_msg=str(seed))
  assert np.all(np.isneginf(got[:, 37:]))


def test_padded_num_classes():
  assert class_shards.padded_num_classes(61, 8) == 64
  assert class_shards.padded_num_classes(64, 8) == 64
  assert class_shards.padded_num_classes(1_000_000, 8) == 1_000_000


def test_l2_normalize_zero_row_is_finite():
  w = jnp.zeros((3, 4)).at[0].set(1.0)
  value, grad = jax.value_and_grad(
      lambda w: jnp.sum(classifier.l2_normalize(w)))(w)
  assert np.isfinite(value) and np.all(np.isfinite(grad))


CHUNKED_HEADS = [n for n in registry.head_names() if nf.get_head(n).has_parts]


@pytest.mark.slow
@pytest.mark.parametrize('name', CHUNKED_HEADS)
def test_sharded_chunked_equals_unsharded_full(mesh, name):
  """Each shard runs the chunked loss over its rows (7 per block here, so
  loop and remainder both run); C = 61 pads to 64."""
  rng, seed = fresh_rng()
  num_classes = 61
  x, w, y = _problem(rng, num_classes)
  head = nf.get_head(name)
  state = head.init_state(num_classes)
  params = head.init_params(jax.random.key(seed), num_classes)
  padded = class_shards.padded_num_classes(num_classes, NUM_DEVICES)
  sharded = classifier.sharded_classifier_loss(mesh, head, num_classes,
                                               chunk_size=3)

  def full(x, w, params, state):
    ce, out = classifier.classifier_loss(x, w, y, head, state, params,
                                         head_key=HEAD_KEY)
    return jnp.mean(ce) + out.aux_loss, out

  def chunked(x, w, params, state):
    ce, out = sharded(x, jnp.pad(w, [(0, padded - num_classes), (0, 0)]), y,
                      state, params, head_key=HEAD_KEY)
    return jnp.mean(ce) + out.aux_loss, out

  want, got = [
      jax.jit(jax.value_and_grad(fn, (0, 1, 2), has_aux=True))(
          x, w, params, state)
      for fn in (full, chunked)]
  assert_same_step(got, want, msg=f'{name} seed {seed}')


def test_sharded_chunked_refuses_logits(mesh):
  with pytest.raises(ValueError, match='never forms the logits'):
    classifier.sharded_classifier_loss(mesh, nf.get_head('npcface'), 61,
                                       chunk_size=4, return_logits=True)


@pytest.fixture(scope='module')
def mesh_2d():
  """4 'data' x 2 'model', as the trainer lays out a class-sharded run."""
  return jax.make_mesh((4, 2), ('data', 'model'),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)


@pytest.mark.slow
@pytest.mark.parametrize('name,chunk_size', [('npcface', None),
                                             ('npcface', 5), ('arcface', None),
                                             ('sphereface', 3)])
def test_batch_split_over_data_axis(mesh_2d, name, chunk_size):
  """Rows over 'data' and classes over 'model' at once (no device repeats
  another's work) equals the unsharded loss, gradients and metrics."""
  rng, seed = fresh_rng()
  num_classes = 61
  x, w, y = _problem(rng, num_classes)
  head = nf.get_head(name)
  state = head.init_state(num_classes)
  padded = class_shards.padded_num_classes(num_classes, 2)
  sharded = classifier.sharded_classifier_loss(
      mesh_2d, head, num_classes, batch_axis='data', chunk_size=chunk_size)

  def full(x, w, state):
    ce, out = classifier.classifier_loss(x, w, y, head, state, {})
    return jnp.mean(ce), out._replace(logits=jnp.zeros(()))

  def split(x, w, state):
    ce, out = sharded(x, jnp.pad(w, [(0, padded - num_classes), (0, 0)]), y,
                      state, {})
    return jnp.mean(ce), out

  want, got = [
      jax.jit(jax.value_and_grad(fn, (0, 1), has_aux=True))(x, w, state)
      for fn in (full, split)]
  assert_same_step(got, want, msg=f'{name} chunk {chunk_size} seed {seed}')


def test_batch_statistic_heads_refuse_a_split_batch(mesh_2d):
  for name in ('adacos', 'curricularface'):
    with pytest.raises(ValueError, match='statistic of the whole batch'):
      classifier.sharded_classifier_loss(mesh_2d, nf.get_head(name), 61,
                                         batch_axis='data')


@pytest.mark.parametrize('chunk_size', [None, 7])
def test_top1_is_target_logit_largest(mesh, chunk_size):
  """top1 against the full logits' argmax, on one device and sharded."""
  rng, seed = fresh_rng()
  num_classes = 61
  head = nf.get_head('npcface')
  for _ in range(20):  # a draw with all right or all wrong tests less: redraw
    x, w, y = _problem(rng, num_classes)
    logits = np.asarray(head(classifier.cosine(x, w), y).logits)
    want = logits.argmax(axis=1) == y
    if 0 < want.sum() < B:
      break
  assert 0 < want.sum() < B, f'want a mix of right and wrong, seed {seed}'
  _, out = classifier.classifier_loss(x, w, y, head, chunk_size=chunk_size)
  np.testing.assert_array_equal(out.metrics['top1'], want, f'seed {seed}')
  padded = class_shards.padded_num_classes(num_classes, NUM_DEVICES)
  sharded = classifier.sharded_classifier_loss(mesh, head, num_classes,
                                               chunk_size=chunk_size)
  _, out = jax.jit(sharded)(x, jnp.pad(w, [(0, padded - num_classes), (0, 0)]),
                            y, {}, {})
  np.testing.assert_array_equal(out.metrics['top1'], want, f'seed {seed}')
