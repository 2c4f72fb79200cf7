"""The heads after the NPCFace paper against float64 NumPy references
written from their own papers (tests/np_reference.py): AdaFace, MagFace,
ElasticFace (Arc, Cos, Arc+, Cos+), SphereFace2-C and UniFace.

Through the public objects only (registry.get_head, the head's call with
heads.Given, its per_sample_loss, classifier.classifier_loss): logits,
per-sample loss and gradients in the cosines; in the raw embeddings where
the norm matters (MagFace's has a gradient, AdaFace's has none), on the
full and the chunked path; in the learnt bias (SphereFace2, UniFace);
AdaFace's running statistics over successive calls, ElasticFace's draws,
the biases' initial values, padding classes and bfloat16 cosines.
Inputs are fresh each run; the seed is in every failure message.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from npcface_jax.loss import classifier, heads, registry
from tests import np_reference as ref
from tests.helpers import cosines, fresh_rng

# AdaFace's running statistics for the cosine-level cases: the drawn norms
# (1..10, with one below the 0.001 clip and one above 100) straddle them, so
# that z_i reaches both clips and the interior.
ADAFACE_STATE = (4.0, 1.5)
ADA_EPS, ADA_M = 1e-3, 0.4

# name -> (head, options)
CONFIGS = {
    'adaface': ('adaface', {}),
    'magface': ('magface', {}),
    'magface_easy': ('magface', {'easy_margin': True}),
    'elasticface_arc': ('elasticface_arc', {}),
    'elasticface_cos': ('elasticface_cos', {}),
    'elasticface_arc_plus': ('elasticface_arc_plus', {}),
    'elasticface_cos_plus': ('elasticface_cos_plus', {}),
    'sphereface2': ('sphereface2', {}),
    'sphereface2_exact': ('sphereface2', {'straight_through': False}),
    'uniface': ('uniface', {}),
}
ELASTIC = {  # name -> (mean, sigma, angular, plain variant of the same kind)
    'elasticface_arc': (0.5, 0.05, True, 'elasticface_arc'),
    'elasticface_cos': (0.35, 0.05, False, 'elasticface_cos'),
    'elasticface_arc_plus': (0.5, 0.0175, True, 'elasticface_arc'),
    'elasticface_cos_plus': (0.35, 0.02, False, 'elasticface_cos'),
}


class Case(NamedTuple):
  """One head with everything it is given besides the cosines, and its
  reference: ``reference(c, y, frozen) -> (logits, frozen)`` (frozen None:
  computed at c), ``loss(logits, y)`` per sample, ``decisions(c, y)``
  (masks and branches that must not flip between float32 and float64 or
  within a finite difference's step), and ``frozen(c, y)``, the pieces the
  head holds constant for the gradient, at c."""

  head: heads.Head
  state: dict
  params: dict
  given: heads.Given
  reference: Callable[..., Any]
  loss: Callable[..., Any]
  decisions: Callable[..., list]
  frozen: Callable[..., Any]
  bias: float | None = None


def _f32(a):
  """float64 values exactly representable in float32."""
  return np.asarray(a, np.float32).astype(np.float64)


def _adaface_norms(rng, batch):
  norms = rng.uniform(1.0, 10.0, batch)
  low, high = rng.choice(batch, 2, replace=False)
  norms[low], norms[high] = 4e-4, 130.0  # below / above the norm clip
  return _f32(norms)


def _magface_norms(rng, batch):
  """Norms across (and past) [10, 110], none within 0.05 of a kink."""
  norms = rng.uniform(4.0, 130.0, batch)
  for kink in (10.0, 110.0):
    near = np.abs(norms - kink) < 0.05
    norms[near] = kink + 0.5
  return _f32(norms)


def _case(name, rng, seed, batch, num_classes) -> Case:
  head_name, options = CONFIGS[name]
  head = registry.get_head(head_name, **options)
  state, params, given = head.init_state(num_classes), {}, heads.Given()
  loss = ref.cross_entropy
  bias = None

  def no_decisions(c, y):
    return []

  if head_name == 'adaface':
    norms = _adaface_norms(rng, batch)
    mean, std = ADAFACE_STATE
    state = {'norm_mean': jnp.float32(mean), 'norm_std': jnp.float32(std)}
    given = heads.Given(norms=jnp.float32(norms))

    def reference(c, y, f):
      return ref.adaface(c, y, norms, mean, std, frozen=f)

    def decisions(c, y):
      z = reference(c, y, None)[1]['z']
      c_y = c[np.arange(len(y)), y]
      angle = np.arccos(np.clip(c_y, -1 + ADA_EPS, 1 - ADA_EPS)) - ADA_M * z
      return [c_y > 1 - ADA_EPS, c_y < -1 + ADA_EPS, angle > ADA_EPS,
              angle < np.pi - ADA_EPS]

  elif head_name == 'magface':
    norms = _magface_norms(rng, batch)
    easy = options.get('easy_margin', False)
    given = heads.Given(norms=jnp.float32(norms))

    def reference(c, y, f):
      return ref.magface(c, y, norms, easy_margin=easy, frozen=f)

    def decisions(c, y):
      c_y = c[np.arange(len(y)), y]
      if easy:
        return [c_y > 0]
      return [reference(c, y, None)[1]['fallback']]

  elif head_name.startswith('elasticface'):
    given = heads.Given(key=jax.random.key(seed))
    angular = ELASTIC[head_name][2]

    margins = jax.jit(lambda c, y: head(c, y, state, params,
                                        given=given).metrics['margin'])

    def drawn(c, y):
      return np.asarray(margins(jnp.float32(c), y), np.float64)

    def reference(c, y, f):
      f = drawn(c, y) if f is None else f
      return ref.elasticface(c, y, f, angular=angular)[0], f

    decisions = no_decisions

  elif head_name == 'sphereface2':
    bias = float(np.float32(ref.sphereface2_bias(num_classes)
                            + rng.normal(0.0, 1.0)))
    params = {'bias': jnp.float32(bias)}
    st = head.straight_through

    def reference(c, y, f, b=None):
      return ref.sphereface2(c, y, bias if b is None else b,
                             straight_through=st, frozen=f)

    loss = ref.sphereface2_loss
    decisions = no_decisions

  elif head_name == 'uniface':
    bias = float(np.float32(ref.uniface_bias(num_classes)
                            + rng.normal(0.0, 1.0)))
    params = {'bias': jnp.float32(bias)}

    def reference(c, y, f, b=None):
      return ref.uniface(c, y, bias if b is None else b)

    loss = ref.uniface_loss
    decisions = no_decisions

  else:
    raise AssertionError(name)
  return Case(head, state, params, given, reference, loss, decisions,
              lambda c, y: reference(c, y, None)[1], bias)


def _stable_case(rng, seed, name, batch=12, num_classes=20):
  """A case and cosines where no decision flips within +-1e-4 (so float32
  and float64 agree, and finite differences see one smooth piece)."""
  for _ in range(200):
    case = _case(name, rng, seed, batch, num_classes)
    cos, labels = cosines(rng, batch=batch, num_classes=num_classes)
    cos = _f32(cos)
    base = case.decisions(cos, labels)
    stable = True
    for _ in range(4):
      noisy = cos + rng.choice([-1e-4, 1e-4], size=cos.shape)
      noisy = np.clip(noisy, -1 + 1e-6, 1 - 1e-6)
      if any(not np.array_equal(a, b) for a, b in
             zip(base, case.decisions(noisy, labels))):
        stable = False
        break
    if stable:
      return case, cos, labels
  raise AssertionError(f'could not draw a stable case for {name}')


def _call(case, cos, labels, **kw):
  return case.head(cos, labels, case.state, case.params, given=case.given,
                   **kw)


def _mean_loss(case, cos, labels, params, **kw):
  out = case.head(cos, labels, case.state, params, given=case.given, **kw)
  return jnp.mean(case.head.per_sample_loss(out.logits, labels)[0])


# --------------------------------------------------------------------------
# Every head: values, gradients, padding, bfloat16
# --------------------------------------------------------------------------


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_logits_and_loss_match_reference(name):
  """Logits, the head's own per-sample loss (softmax cross-entropy or its
  one-vs-all loss) and its top-1 where the target's lead is clear."""
  rng, seed = fresh_rng()
  case, cos, labels = _stable_case(rng, seed, name)

  def run(c):
    logits = _call(case, c, labels).logits
    return logits, case.head.per_sample_loss(logits, labels)

  logits, (loss, top1) = jax.jit(run)(jnp.float32(cos))
  want, _ = case.reference(cos, labels, None)
  msg = f'{name}, seed {seed}'
  assert logits.dtype == jnp.float32, msg
  np.testing.assert_allclose(logits, want, rtol=1e-5, atol=3e-4, err_msg=msg)
  np.testing.assert_allclose(loss, case.loss(want, labels), rtol=1e-5,
                             atol=2e-4, err_msg=msg)
  rows = np.arange(len(labels))
  others = np.where(ref.onehot(labels, cos.shape[1]), -np.inf, want)
  gap = want[rows, labels] - others.max(axis=1)
  clear = np.abs(gap) > 1e-2
  np.testing.assert_array_equal(np.asarray(top1)[clear], (gap > 0)[clear],
                                err_msg=msg)


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_gradients_match_finite_differences(name):
  """In the cosines, of weighted logits and of the mean per-sample loss,
  the head's frozen pieces passed back to the reference; and in the bias
  of a head that learns one."""
  rng, seed = fresh_rng()
  case, cos, labels = _stable_case(rng, seed, name, batch=10,
                                   num_classes=12)
  msg = f'{name}, seed {seed}'
  frozen = case.frozen(cos, labels)
  weights = rng.normal(size=cos.shape)
  want = ref.central_difference(
      lambda c: np.sum(weights * case.reference(c, labels, frozen)[0]), cos)

  def grads(c, p):
    of_logits = jax.grad(lambda c: jnp.sum(jnp.float32(weights) * _call(
        case, c, labels).logits))(c)
    return of_logits, jax.grad(lambda c, p: _mean_loss(case, c, labels, p),
                               argnums=(0, 1))(c, p)

  got, (got_c, got_p) = jax.jit(grads)(jnp.float32(cos), case.params)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-3, err_msg=msg)

  def ref_loss(c, b=None):
    kw = {} if b is None else {'b': b}
    return np.mean(case.loss(case.reference(c, labels, frozen, **kw)[0],
                             labels))

  want_c = ref.central_difference(ref_loss, cos)
  np.testing.assert_allclose(got_c, want_c, rtol=2e-4,
                             atol=1e-4 * np.max(np.abs(want_c)), err_msg=msg)
  if case.bias is None:
    assert not jax.tree.leaves(got_p), msg
  else:
    want_b = ref.central_difference(lambda b: ref_loss(cos, b[0]),
                                    np.array([case.bias]))[0]
    np.testing.assert_allclose(got_p['bias'], want_b, rtol=1e-4, atol=1e-5,
                               err_msg=msg)


@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_padding_classes(name):
  """Columns past num_classes (as the class-sharded classifier pads):
  logit -inf, no share of the loss, no gradient; the real columns, the
  loss, the bias's gradient and the metrics as without them."""
  rng, seed = fresh_rng()
  num_classes, pad = 13, 3
  case, cos, labels = _stable_case(rng, seed, name, batch=8,
                                   num_classes=num_classes)
  padded = np.concatenate([cos, rng.uniform(-1, 1, (len(labels), pad))], 1)
  msg = f'{name}, seed {seed}'

  def run(c, **kw):
    def f(c, p):
      out = case.head(c, labels, case.state, p, given=case.given, **kw)
      loss = case.head.per_sample_loss(out.logits, labels)[0]
      return jnp.mean(loss), (out, loss)
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(
        jnp.float32(c), case.params)

  (_, (out, loss)), (g_c, g_p) = run(cos)
  (_, (out_p, loss_p)), (g_cp, g_pp) = run(padded, num_classes=num_classes)
  logits_p = np.asarray(out_p.logits)
  assert np.all(np.isneginf(logits_p[:, num_classes:])), msg
  np.testing.assert_allclose(logits_p[:, :num_classes], out.logits,
                             rtol=1e-6, atol=1e-5, err_msg=msg)
  np.testing.assert_allclose(loss_p, loss, rtol=1e-6, atol=2e-5, err_msg=msg)
  np.testing.assert_allclose(
      loss_p, case.loss(case.reference(cos, labels, None)[0], labels),
      rtol=1e-5, atol=2e-4, err_msg=msg)
  g_cp = np.asarray(g_cp)
  assert np.all(np.isfinite(g_cp)), msg
  np.testing.assert_array_equal(g_cp[:, num_classes:], 0.0, err_msg=msg)
  np.testing.assert_allclose(g_cp[:, :num_classes], g_c, rtol=1e-5,
                             atol=1e-6 * np.max(np.abs(g_c)), err_msg=msg)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       err_msg=msg),
               (g_pp, out_p.metrics, out_p.state), (g_p, out.metrics,
                                                    out.state))


@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_bfloat16_in_bfloat16_out(name):
  """bfloat16 cosines: bfloat16 logits, equal to the float32 arithmetic
  on the same (rounded) cosines; finite loss and gradient."""
  rng, seed = fresh_rng()
  case = _case(name, rng, seed, 12, 20)
  cos, labels = cosines(rng)
  c16 = jnp.asarray(cos, jnp.bfloat16)

  def run(c16):
    got = _call(case, c16, labels).logits
    want = _call(case, c16.astype(jnp.float32), labels).logits
    return got, want.astype(jnp.bfloat16), jax.value_and_grad(
        lambda c: _mean_loss(case, c, labels, case.params))(c16)

  got, want, (value, grad) = jax.jit(run)(c16)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(got, np.float32),
                                np.asarray(want, np.float32),
                                err_msg=f'{name}, seed {seed}')
  assert np.isfinite(value) and grad.dtype == jnp.bfloat16
  assert np.all(np.isfinite(np.asarray(grad, np.float32)))


@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_finite_at_exactly_plus_minus_one(name):
  """Cosines of exactly +-1 (targets and negatives): finite loss and
  gradient in the cosines (and the bias)."""
  rng, seed = fresh_rng()
  cos = np.array([[1.0, -1.0, 0.3, 1.0],
                  [-1.0, 1.0, -1.0, 0.0],
                  [0.5, 1.0, -1.0, -1.0]], np.float32)
  labels = np.array([0, 0, 2])
  case = _case(name, rng, seed, 3, 4)
  value, grads = jax.jit(jax.value_and_grad(
      lambda c, p: _mean_loss(case, c, labels, p), argnums=(0, 1)))(
          jnp.asarray(cos), case.params)
  assert np.isfinite(value), f'{name}, seed {seed}'
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads)), (
      f'{name}, seed {seed}')


def test_registered_with_their_hooks():
  """Names, what each is given, which keep batch statistics, which are
  their own criterion (with the weights their papers give)."""
  for name in ('adaface', 'magface', 'elasticface_arc', 'elasticface_cos',
               'elasticface_arc_plus', 'elasticface_cos_plus', 'sphereface2',
               'uniface'):
    assert name in registry.head_names() and name in heads.HEADS
  get = registry.get_head
  assert get('adaface').needs == {'norms'}
  assert get('adaface').batch_statistics and not get('adaface').norm_gradient
  assert get('magface').needs == {'norms'} and get('magface').norm_gradient
  for name in ELASTIC:
    assert get(name).needs == {'key'}, name
    assert get(name).batch_statistics == name.endswith('_plus'), name
  w = 50.0 / 40.0
  np.testing.assert_allclose(get('sphereface2').one_vs_all, (w * 0.7,
                                                             w * 0.3))
  assert get('uniface').one_vs_all == heads.OneVsAll(1.0, 1.0)
  for name in ('adaface', 'magface', 'elasticface_arc'):
    assert get(name).one_vs_all is None
  assert get('sphereface2').needs == frozenset()
  assert set(get('adaface').init_state(10)) == {'norm_mean', 'norm_std'}
  np.testing.assert_allclose(
      [get('adaface').init_state(10)[k] for k in ('norm_mean', 'norm_std')],
      [20.0, 100.0])


# --------------------------------------------------------------------------
# From the raw embeddings: AdaFace's and MagFace's norms
# --------------------------------------------------------------------------


def _embeddings(rng, labels, cos_target, norms, num_classes, dim):
  """x (B, D), w (C, D), float32-exact: x_i at cosine cos_target[i] from
  its class's row, with norm norms[i]."""
  w = rng.normal(size=(num_classes, dim))
  wn = w / np.linalg.norm(w, axis=1, keepdims=True)
  x = np.empty((len(labels), dim))
  for i, (y, c, n) in enumerate(zip(labels, cos_target, norms)):
    v = rng.normal(size=dim)
    v -= (v @ wn[y]) * wn[y]
    v /= np.linalg.norm(v)
    x[i] = n * (c * wn[y] + math.sqrt(1.0 - c * c) * v)
  return _f32(x), _f32(w)


def _classifier_step(head, x, w, labels, state, params=None,
                     chunk_size=None):
  """classifier_loss's value, gradient in x (and params) and output:
  the train step's loss, mean per-sample loss plus aux_loss."""
  def total(x, p):
    ce, out = classifier.classifier_loss(x, jnp.float32(w), labels, head,
                                         state, p, chunk_size=chunk_size)
    return jnp.mean(ce) + out.aux_loss, out
  return jax.jit(jax.value_and_grad(total, argnums=(0, 1), has_aux=True))(
      jnp.float32(x), {} if params is None else params)


@pytest.mark.parametrize('chunk_size', [None, 4])
def test_magface_norm_gradient_in_embeddings(chunk_size):
  """The norm moves the margin and the regulariser: the gradient in the
  raw embeddings equals central differences of the float64 total loss
  (mean cross-entropy + lambda_g mean g(a)), on the full and the chunked
  path; norms past [10, 110] take the clipped values and no radial
  gradient."""
  rng, seed = fresh_rng()
  batch, num_classes, dim = 8, 10, 8
  msg = f'chunk_size={chunk_size}, seed {seed}'
  head = registry.get_head('magface')
  labels = rng.integers(0, num_classes, batch)
  norms = rng.uniform(12.0, 108.0, batch)
  norms[:2] = 5.0, 200.0  # clipped to 10 and 110
  cos_target = rng.uniform(-0.5, 0.9, batch)
  cos_target[2] = -0.97  # theta_y + m > pi: ArcFace's fallback
  order = rng.permutation(batch)
  norms, cos_target = norms[order], cos_target[order]
  clipped = (norms < 10) | (norms > 110)
  x, w = _embeddings(rng, labels, cos_target, norms, num_classes, dim)
  cos, got_norms = ref.embedding_cosines(x, w)
  a, margin = ref.magface_margin(got_norms)
  theta = np.arccos(cos[np.arange(batch), labels])
  assert np.all(np.abs(theta + margin - np.pi) > 1e-3), msg

  (value, out), (grad, _) = _classifier_step(head, x, w, labels, {},
                                             chunk_size=chunk_size)
  want, frozen = ref.magface_total(x, w, labels)
  assert frozen['fallback'].sum() == 1, msg
  np.testing.assert_allclose(value, want, rtol=1e-5, err_msg=msg)
  np.testing.assert_allclose(out.aux_loss, ref.magface_regulariser(got_norms),
                             rtol=1e-6, err_msg=msg)
  np.testing.assert_allclose(out.metrics['norm'], a, rtol=1e-6, err_msg=msg)
  np.testing.assert_allclose(out.metrics['margin'], margin, rtol=1e-6,
                             err_msg=msg)
  np.testing.assert_allclose(np.asarray(out.metrics['norm'])[clipped],
                             np.where(norms[clipped] < 10, 10.0, 110.0),
                             err_msg=msg)
  want_grad = ref.central_difference(
      lambda x: ref.magface_total(x, w, labels, frozen=frozen)[0], x)
  scale = np.max(np.abs(want_grad))
  np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-4 * scale,
                             err_msg=msg)
  # Along x_i itself only the norm acts (the cosines do not move).
  radial = np.sum(np.asarray(grad, np.float64) * x, axis=1)
  want_radial = np.sum(want_grad * x, axis=1)
  assert np.max(np.abs(want_radial[~clipped])) > 1e-2, msg  # the norm acts
  np.testing.assert_allclose(radial, want_radial, rtol=1e-3,
                             atol=1e-5 * np.max(np.abs(want_radial)),
                             err_msg=msg)


def _adaface_embedding_case(rng, batch, num_classes, dim, state):
  """Embeddings whose AdaFace decisions (cos_y clamps, the angle clip) lie
  clear of their thresholds."""
  for _ in range(100):
    labels = rng.integers(0, num_classes, batch)
    norms = rng.uniform(0.5, 12.0, batch)
    norms[rng.integers(batch)] = 130.0  # past the 100 clip
    cos_target = rng.uniform(-0.9, 0.95, batch)
    x, w = _embeddings(rng, labels, cos_target, norms, num_classes, dim)
    cos, n = ref.embedding_cosines(x, w)
    _, frozen = ref.adaface(cos, labels, n, *state)
    c_y = cos[np.arange(batch), labels]
    angle = np.arccos(c_y) - ADA_M * frozen['z']
    if np.all((np.abs(angle - ADA_EPS) > 1e-3)
              & (np.abs(angle - (np.pi - ADA_EPS)) > 1e-3)):
      return x, w, labels, n, frozen
  raise AssertionError('no clear AdaFace case')


@pytest.mark.parametrize('chunk_size', [None, 4])
def test_adaface_norms_carry_no_gradient(chunk_size):
  """From the raw embeddings: the norms set z (metrics 'norm', 'quality'),
  the new state is the statistics, and the gradient in x is that of the
  loss with z held constant (central differences): no radial part."""
  rng, seed = fresh_rng()
  batch, num_classes, dim = 8, 10, 8
  msg = f'chunk_size={chunk_size}, seed {seed}'
  head = registry.get_head('adaface')
  state = ADAFACE_STATE
  x, w, labels, norms, frozen = _adaface_embedding_case(
      rng, batch, num_classes, dim, state)
  jstate = {'norm_mean': jnp.float32(state[0]),
            'norm_std': jnp.float32(state[1])}
  (value, out), (grad, _) = _classifier_step(head, x, w, labels, jstate,
                                             chunk_size=chunk_size)

  def ref_total(x):
    cos, _ = ref.embedding_cosines(x, w)
    return np.mean(ref.cross_entropy(
        ref.adaface(cos, labels, None, None, None, frozen=frozen)[0], labels))

  np.testing.assert_allclose(value, ref_total(x), rtol=1e-5, err_msg=msg)
  assert float(out.aux_loss) == 0.0, msg
  np.testing.assert_allclose(out.metrics['norm'], np.clip(norms, 1e-3, 100),
                             rtol=1e-6, err_msg=msg)
  np.testing.assert_allclose(out.metrics['quality'], frozen['z'], rtol=1e-5,
                             atol=1e-6, err_msg=msg)
  assert -1 < frozen['z'].min() and frozen['z'].max() == 1.0, msg
  np.testing.assert_allclose(
      [out.state['norm_mean'], out.state['norm_std']],
      [frozen['mean'], frozen['std']], rtol=1e-6, err_msg=msg)
  want = ref.central_difference(ref_total, x)
  np.testing.assert_allclose(grad, want, rtol=1e-4,
                             atol=1e-4 * np.max(np.abs(want)), err_msg=msg)
  radial = np.sum(np.asarray(grad, np.float64) * x, axis=1)
  np.testing.assert_allclose(radial, 0.0,
                             atol=1e-5 * np.max(np.abs(want)) * np.max(norms),
                             err_msg=msg)


def test_adaface_running_statistics_over_calls():
  """k = 5 calls from the initial state {20, 100}, each new state fed
  back: the states equal a NumPy EMA loop (updated before use), and each
  call's 'norm' and 'quality' use the updated statistics."""
  rng, seed = fresh_rng()
  head = registry.get_head('adaface')
  batch, num_classes, dim = 16, 10, 8
  state = head.init_state(num_classes)
  mean, std = 20.0, 100.0
  step = jax.jit(lambda x, w, y, state: classifier.classifier_loss(
      x, w, y, head, state)[1])
  for k in range(5):
    msg = f'call {k}, seed {seed}'
    labels = rng.integers(0, num_classes, batch)
    norms = rng.uniform(1.0, 60.0, batch) * rng.uniform(0.5, 2.0)
    norms[0] = 5e-4 if k % 2 else 140.0  # past the clip, one end or the other
    x, w = _embeddings(rng, labels, rng.uniform(-0.5, 0.9, batch), norms,
                       num_classes, dim)
    _, n = ref.embedding_cosines(x, w)
    out = step(jnp.float32(x), jnp.float32(w), labels, state)
    clipped, mean, std = ref.adaface_statistics(n, mean, std)
    z = np.clip(0.333 * (clipped - mean) / (std + 1e-3), -1, 1)
    assert set(out.state) == {'norm_mean', 'norm_std'}, msg
    np.testing.assert_allclose(out.state['norm_mean'], mean, rtol=1e-5,
                               err_msg=msg)
    np.testing.assert_allclose(out.state['norm_std'], std, rtol=1e-5,
                               err_msg=msg)
    np.testing.assert_allclose(out.metrics['norm'], clipped, rtol=1e-5,
                               err_msg=msg)
    np.testing.assert_allclose(out.metrics['quality'], z, rtol=1e-4,
                               atol=1e-6, err_msg=msg)
    diag = head.diagnostics(out)
    np.testing.assert_allclose(
        [diag['adaface/norm'], diag['adaface/quality'], diag['head/norm_mean'],
         diag['head/norm_std']], [clipped.mean(), z.mean(), mean, std],
        rtol=1e-4, atol=1e-6, err_msg=msg)
    state = out.state


# --------------------------------------------------------------------------
# ElasticFace's draws
# --------------------------------------------------------------------------


def _margins(name, cos, labels, keys, **options):
  head = registry.get_head(name, **options)
  return np.asarray(jax.jit(jax.vmap(lambda k: head(
      cos, labels, {}, given=heads.Given(key=k)).metrics['margin']))(keys),
                    np.float64)


@pytest.mark.parametrize('name', sorted(ELASTIC))
def test_elastic_margins_are_drawn_from_the_normal(name):
  """20 keys x 512 samples: a KS test against N(m, sigma) and the
  moments; the head's summary is the draw's mean and std."""
  from scipy import stats  # noqa: PLC0415
  rng, seed = fresh_rng()
  mean, sigma = ELASTIC[name][:2]
  cos, labels = cosines(rng, batch=512, num_classes=4)
  keys = jax.random.split(jax.random.key(seed), 20)
  m = _margins(name, jnp.float32(cos), labels, keys)
  msg = f'{name}, seed {seed}'
  assert m.shape == (20, 512), msg
  flat = m.ravel()
  assert stats.kstest(flat, 'norm', args=(mean, sigma)).pvalue > 1e-4, msg
  assert abs(flat.mean() - mean) < 5 * sigma / math.sqrt(flat.size), msg
  assert abs(flat.std(ddof=1) / sigma - 1) < 0.03, msg
  summary = registry.get_head(name).summarize(
      {'margin': jnp.float32(m[0])})
  np.testing.assert_allclose([summary['margin'], summary['margin_std']],
                             [m[0].mean(), m[0].std()], rtol=1e-4,
                             err_msg=msg)


@pytest.mark.parametrize('name', sorted(ELASTIC))
def test_elastic_margins_follow_the_key(name):
  """Same key, same margins; another key, others. The "+" variants: the
  margins decrease as cos_y grows, and are the plain draw from the same
  key (with the same sigma) handed out by rank as the paper says."""
  rng, seed = fresh_rng()
  mean, sigma, _, plain = ELASTIC[name]
  cos, labels = cosines(rng, batch=64, num_classes=8)
  c = jnp.float32(cos)
  key = jax.random.key(seed)
  msg = f'{name}, seed {seed}'
  a, b, other = _margins(name, c, labels, jnp.stack(
      [key, key, jax.random.fold_in(key, 1)]))
  np.testing.assert_array_equal(a, b, err_msg=msg)
  assert np.all(a != other), msg
  if not name.endswith('_plus'):
    return
  c_y = _f32(cos)[np.arange(64), labels]
  order = np.argsort(-c_y)
  assert np.all(np.diff(a[order]) >= 0), msg  # larger cos_y, smaller margin
  drawn = _margins(plain, c, labels, jnp.stack([key]), sigma=sigma)[0]
  np.testing.assert_array_equal(np.sort(a), np.sort(drawn), err_msg=msg)
  np.testing.assert_array_equal(a, ref.elastic_by_difficulty(drawn, c_y),
                                err_msg=msg)


def test_elastic_heads_need_a_key():
  rng, _ = fresh_rng()
  head = registry.get_head('elasticface_arc_plus')
  with pytest.raises(ValueError, match='draws at random: pass head_key'):
    classifier.classifier_loss(jnp.float32(rng.normal(size=(4, 8))),
                               jnp.float32(rng.normal(size=(6, 8))),
                               np.array([0, 1, 2, 3]), head, {})


# --------------------------------------------------------------------------
# The one-vs-all heads: their bias, from the embeddings
# --------------------------------------------------------------------------


def test_sphereface2_and_uniface_initial_bias():
  """SphereFace2-C's bias is the official code's; it is where the loss's
  gradient in b vanishes for a sample at 90 degrees from every class
  (the reference's and the head's). UniFace's is log(10 r C)."""
  head = registry.get_head('sphereface2')
  for num_classes in (2, 16, 1000, 93431):
    got = head.init_params(jax.random.key(0), num_classes)['bias']
    np.testing.assert_allclose(got, ref.sphereface2_bias(num_classes),
                               rtol=1e-6, err_msg=str(num_classes))
  np.testing.assert_allclose(
      heads.sphereface2_bias(100, 30.0, 0.3, 5.0, 0.6),
      ref.sphereface2_bias(100, 30.0, 0.3, 5.0, 0.6), rtol=1e-12)
  with pytest.raises(ValueError, match='num_classes >= 2'):
    heads.sphereface2_bias(1, 40.0, 0.4, 3.0, 0.7)
  num_classes, batch = 16, 4
  labels = np.arange(batch)
  zero = np.zeros((batch, num_classes))
  b0 = ref.sphereface2_bias(num_classes)

  def ref_loss(b):
    return np.mean(ref.sphereface2_loss(
        ref.sphereface2(zero, labels, b[0])[0], labels))

  slope = ref.central_difference(ref_loss, np.array([b0]), h=1e-5)[0]
  pull = ref.central_difference(ref_loss, np.array([b0 + 1.0]), h=1e-5)[0]
  assert abs(slope) < 1e-6 * abs(pull), (slope, pull)
  params = head.init_params(jax.random.key(0), num_classes)
  got = jax.jit(jax.grad(lambda p: jnp.mean(head.per_sample_loss(head(
      jnp.zeros((batch, num_classes)), labels, {}, p).logits, labels)[0])))(
          params)['bias']
  assert abs(float(got)) < 1e-4 * abs(pull), (float(got), pull)
  for r in (1.0, 2.5):
    uni = registry.get_head('uniface', r=r)
    np.testing.assert_allclose(uni.init_params(jax.random.key(0), 1000)['bias'],
                               ref.uniface_bias(1000, r), rtol=1e-6)


@pytest.mark.parametrize('chunk_size', [None, 4])
@pytest.mark.parametrize('name', ['sphereface2', 'uniface'])
def test_one_vs_all_from_embeddings(name, chunk_size):
  """The binary loss from raw embeddings, full and chunked: value and the
  gradients in x and in the bias against central differences."""
  rng, seed = fresh_rng()
  batch, num_classes, dim = 8, 11, 8
  msg = f'{name}, chunk_size={chunk_size}, seed {seed}'
  head = registry.get_head(name)
  labels = rng.integers(0, num_classes, batch)
  x, w = _embeddings(rng, labels, rng.uniform(-0.6, 0.95, batch),
                     rng.uniform(0.5, 5.0, batch), num_classes, dim)
  b0 = (ref.sphereface2_bias(num_classes) if name == 'sphereface2'
        else ref.uniface_bias(num_classes))
  bias = float(np.float32(b0 + rng.normal(0.0, 1.0)))
  (value, out), (grad, g_params) = _classifier_step(
      head, x, w, labels, {}, {'bias': jnp.float32(bias)},
      chunk_size=chunk_size)
  cos0, _ = ref.embedding_cosines(x, w)
  if name == 'sphereface2':
    frozen = ref.sphereface2(cos0, labels, bias)[1]

    def ref_total(x, b=bias):
      cos, _ = ref.embedding_cosines(x, w)
      return np.mean(ref.sphereface2_loss(
          ref.sphereface2(cos, labels, b, frozen=frozen)[0], labels))
  else:
    def ref_total(x, b=bias):
      cos, _ = ref.embedding_cosines(x, w)
      return np.mean(ref.uniface_loss(ref.uniface(cos, labels, b)[0],
                                      labels))

  np.testing.assert_allclose(value, ref_total(x), rtol=1e-5, err_msg=msg)
  want = ref.central_difference(ref_total, x)
  np.testing.assert_allclose(grad, want, rtol=1e-4,
                             atol=1e-4 * np.max(np.abs(want)), err_msg=msg)
  want_b = ref.central_difference(lambda b: ref_total(x, b[0]),
                                  np.array([bias]))[0]
  np.testing.assert_allclose(g_params['bias'], want_b, rtol=1e-4, atol=1e-6,
                             err_msg=msg)
