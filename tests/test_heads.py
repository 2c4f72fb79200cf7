"""Every comparison head against its float64 reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import npcface_jax as nf
from npcface_jax.loss import heads
from tests import np_reference as ref
from tests.helpers import cosines, fresh_rng

STEP = 37          # SphereFace's step, lambda = max(5, 1000/(1 + 0.12*37))
S_PREV = 12.5      # AdaCos's previous scale
T_PREV = 0.31      # CurricularFace's previous t


def _margins(num_classes):
  return np.linspace(0.25, 0.45, num_classes)


# name -> (jax logits(c, y), reference(c, y, frozen) -> (logits, frozen))
HEADS = {
    'softmax': (lambda c, y: nf.softmax_logits(c, y, scale=30.0),
                lambda c, y, f: ref.softmax(c, y, s=30.0)),
    'cosface': (lambda c, y: nf.cosface_logits(c, y),
                lambda c, y, f: ref.cosface(c, y)),
    'arcface': (lambda c, y: nf.arcface_logits(c, y),
                lambda c, y, f: ref.arcface(c, y, frozen=f)),
    'arcface_easy': (lambda c, y: nf.arcface_logits(c, y, margin=0.3,
                                                    easy_margin=True),
                     lambda c, y, f: ref.arcface(c, y, m=0.3, easy_margin=True,
                                                 frozen=f)),
    'sphereface': (
        lambda c, y: nf.sphereface_logits(
            c, y, {'step': jnp.int32(STEP)})[0],
        lambda c, y, f: ref.sphereface(c, y, STEP, frozen=f)),
    'adacos': (
        lambda c, y: nf.adacos_logits(c, y, {'scale': jnp.float32(S_PREV)})[0],
        # The new scale is a batch statistic, constant for the gradient.
        lambda c, y, f: (ref.adacos(c, y, S_PREV)[0], None) if f is None else (
            f * np.asarray(c), f)),
    'adam_softmax': (
        lambda c, y: nf.adam_softmax_logits(
            c, y, jnp.float32(_margins(c.shape[1])))[0],
        lambda c, y, f: (ref.adam_softmax(c, y, _margins(c.shape[1]))[0], f)),
    'mv_am_softmax': (lambda c, y: nf.mv_am_softmax_logits(c, y),
                      lambda c, y, f: ref.mv_softmax(c, y, frozen=f)),
    'mv_arc_softmax': (lambda c, y: nf.mv_arc_softmax_logits(c, y),
                       lambda c, y, f: ref.mv_softmax(c, y, m=0.5, arc=True,
                                                      frozen=f)),
    'arcnegface': (lambda c, y: nf.arcnegface_logits(c, y),
                   lambda c, y, f: ref.arcnegface(c, y, frozen=f)),
    'curricularface': (
        lambda c, y: nf.curricularface_logits(
            c, y, {'t': jnp.float32(T_PREV)})[0],
        lambda c, y, f: ref.curricularface(c, y, T_PREV, frozen=f)),
}


def _frozen_of(name, cos, labels):
  """The pieces each reference holds constant, at this point."""
  if name == 'adacos':
    return ref.adacos(cos, labels, S_PREV)[1]
  return HEADS[name][1](cos, labels, None)[1]


def _decisions(name, cos, labels):
  f = _frozen_of(name, cos, labels)
  if not isinstance(f, dict):
    return []
  return [np.asarray(v) for k, v in sorted(f.items())
          if k not in ('g', 't') and v is not None]


def stable_case(rng, name, **kw):
  """Cosines where no mask, branch or region flips within +-1e-4, so that
  float32 and float64 agree and finite differences see one smooth piece."""
  for _ in range(200):
    cos, labels = cosines(rng, **kw)
    cos = cos.astype(np.float32).astype(np.float64)
    base = _decisions(name, cos, labels)
    stable = True
    for _ in range(4):
      noisy = cos + rng.choice([-1e-4, 1e-4], size=cos.shape)
      noisy = np.clip(noisy, -1 + 1e-6, 1 - 1e-6)
      if any(not np.array_equal(a, b) for a, b in
             zip(base, _decisions(name, noisy, labels))):
        stable = False
        break
    if stable:
      return cos, labels
  raise AssertionError(f'could not draw a stable case for {name}')


@pytest.mark.parametrize('name', sorted(HEADS))
def test_logits_match_reference(name):
  rng, seed = fresh_rng()
  cos, labels = stable_case(rng, name)
  got = jax.jit(HEADS[name][0])(jnp.float32(cos), labels)
  want = HEADS[name][1](cos, labels, None)[0]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=3e-4,
                             err_msg=f'{name}, seed {seed}')


@pytest.mark.parametrize('name', sorted(HEADS))
def test_gradient_matches_finite_differences(name):
  rng, seed = fresh_rng()
  cos, labels = stable_case(rng, name, batch=12, num_classes=16)
  weights = rng.normal(size=cos.shape)
  frozen = _frozen_of(name, cos, labels)
  want = ref.central_difference(
      lambda c: np.sum(weights * HEADS[name][1](c, labels, frozen)[0]), cos)
  got = jax.grad(lambda c: jnp.sum(jnp.float32(weights) * HEADS[name][0](
      c, labels)))(jnp.float32(cos))
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-3,
                             err_msg=f'{name}, seed {seed}')


@pytest.mark.parametrize('name', sorted(HEADS))
def test_finite_at_exactly_plus_minus_one(name):
  cos = np.array([[1.0, -1.0, 0.3, 1.0],
                  [-1.0, 1.0, -1.0, 0.0],
                  [0.5, 1.0, -1.0, -1.0]], np.float32)
  labels = np.array([0, 0, 2])
  value, grad = jax.value_and_grad(lambda c: nf.softmax_cross_entropy(
      HEADS[name][0](c, labels), labels))(jnp.asarray(cos))
  assert np.isfinite(value) and np.all(np.isfinite(grad)), name


@pytest.mark.parametrize('name', sorted(HEADS))
def test_bfloat16_in_bfloat16_out(name):
  rng, _ = fresh_rng()
  cos, labels = cosines(rng)
  out = HEADS[name][0](jnp.asarray(cos, jnp.bfloat16), labels)
  assert out.dtype == jnp.bfloat16
  assert np.all(np.isfinite(np.asarray(out, np.float32)))


def test_state_updates():
  rng, seed = fresh_rng()
  cos, labels = cosines(rng)
  c = jnp.float32(cos)
  _, st = nf.sphereface_logits(c, labels, {'step': jnp.int32(STEP)})
  assert int(st['step']) == STEP + 1
  _, st = nf.adacos_logits(c, labels, {'scale': jnp.float32(S_PREV)})
  np.testing.assert_allclose(st['scale'], ref.adacos(cos, labels, S_PREV)[1],
                             rtol=1e-5, err_msg=f'seed {seed}')
  _, st = nf.curricularface_logits(c, labels, {'t': jnp.float32(T_PREV)})
  want = ref.curricularface(cos, labels, T_PREV)[1]['t']
  np.testing.assert_allclose(st['t'], want, rtol=1e-5, err_msg=f'seed {seed}')


def test_initial_states():
  np.testing.assert_allclose(nf.adacos_init_state(1001)['scale'],
                             np.sqrt(2) * np.log(1000), rtol=1e-6)
  assert float(nf.curricularface_init_state()['t']) == 0.0
  assert int(nf.sphereface_init_state()['step']) == 0
  np.testing.assert_allclose(ref.sphereface_lambda(0), 1000.0)
  np.testing.assert_allclose(heads.sphereface_lambda(10 ** 6), 5.0)
  margins = nf.adam_init_margins(jax.random.key(0), 1000)
  assert (margins.shape == (1000,) and 0.3 <= margins.min()
          and margins.max() <= 0.4)
  np.testing.assert_array_equal(
      nf.adam_project_margins(jnp.array([-0.1, 0.5, 1.7])), [0.0, 0.5, 1.0])


def test_adacos_scale_stays_finite_for_large_scales():
  """log(B_avg) is a logsumexp: a previous scale that would overflow exp in
  float32 still gives the right new scale."""
  rng, seed = fresh_rng()
  cos, labels = cosines(rng, batch=8, num_classes=30, kinds=['real'])
  cos = np.minimum(0.4 + 0.5 * np.abs(cos), 0.99)
  _, st = nf.adacos_logits(jnp.float32(cos), labels,
                           {'scale': jnp.float32(200.0)})
  np.testing.assert_allclose(st['scale'], ref.adacos(cos, labels, 200.0)[1],
                             rtol=1e-4, err_msg=f'seed {seed}')


def test_adam_regulariser_and_margin_gradient():
  rng, seed = fresh_rng()
  cos, labels = cosines(rng, num_classes=16)
  margins = rng.uniform(0.2, 0.5, 16)
  weights = rng.normal(size=cos.shape)
  _, reg = nf.adam_softmax_logits(jnp.float32(cos), labels,
                                  jnp.float32(margins))
  np.testing.assert_allclose(reg, ref.adam_softmax(cos, labels, margins)[1],
                             rtol=1e-6)

  def ref_total(m):
    logits, r = ref.adam_softmax(cos, labels, m)
    return np.sum(weights * logits) + r

  def total(m):
    logits, r = nf.adam_softmax_logits(jnp.float32(cos), labels, m)
    return jnp.sum(jnp.float32(weights) * logits) + r

  np.testing.assert_allclose(jax.grad(total)(jnp.float32(margins)),
                             ref.central_difference(ref_total, margins),
                             rtol=1e-4, atol=1e-3, err_msg=f'seed {seed}')


def test_sphereface_psi_is_monotone_in_theta():
  """psi must decrease over all of [0, pi] (that is what the -2k is for)."""
  theta = np.linspace(0.0, np.pi, 2001)
  c = jnp.float32(np.cos(theta))[:, None]
  logits, _ = nf.sphereface_logits(c, np.zeros(len(theta), int),
                                   {'step': jnp.int32(10 ** 7)}, scale=1.0,
                                   lambda_min=0.0)
  assert np.all(np.diff(np.asarray(logits[:, 0])) <= 1e-5)


def test_sphereface_rejects_non_integer_margin():
  with pytest.raises(ValueError, match='positive integer'):
    nf.sphereface_logits(jnp.zeros((1, 3)), np.array([0]),
                         nf.sphereface_init_state(), margin=2.5)
