"""npcface_logits against the float64 reference of the paper's eqs. 10-12."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import npcface_jax as nf
from tests import np_reference as ref
from tests.helpers import cosines, fresh_rng

CONFIGS = {
    'paper': nf.NPCFACE_PRESETS['paper'],
    'facex_zoo': nf.NPCFACE_PRESETS['facex_zoo'],
    'negative_only': nf.NPCFACE_PRESETS['negative_only'],
    'positive_only': nf.NPCFACE_PRESETS['positive_only'],
    'custom': dict(scale=30.0, m0=0.5, m1=0.3, t=1.3, alpha=0.1,
                   hard_margin=0.2, easy_margin=False),
}


def ref_kwargs(cfg):
  return dict(s=cfg['scale'], m0=cfg['m0'], m1=cfg['m1'], t=cfg['t'],
              alpha=cfg['alpha'], hard_margin=cfg['hard_margin'],
              easy_margin=cfg['easy_margin'])


def safe_case(rng, cfg, **kw):
  """Draws cosines whose every comparison (hard mask, fallback) is decided
  the same way in float32 and float64."""
  mh = cfg['hard_margin'] or cfg['m0']
  for _ in range(100):
    cos, labels = cosines(rng, **kw)
    cos = cos.astype(np.float32).astype(np.float64)
    idx = np.arange(len(labels))
    theta_y = np.arccos(cos[idx, labels])
    thr = np.cos(theta_y + mh)
    _, frozen, _ = ref.npcface(cos, labels, **ref_kwargs(cfg))
    ok_mask = np.all(np.abs(cos - thr[:, None]) > 1e-4)
    ok_fb = np.all(np.abs(theta_y + frozen['margin'] - np.pi) > 1e-3)
    ok_easy = np.all(np.abs(cos[idx, labels]) > 1e-4)
    if ok_mask and ok_fb and ok_easy:
      return cos, labels
  raise AssertionError('could not draw a well-separated case')


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_logits_and_diagnostics_match_reference(name):
  cfg = CONFIGS[name]
  rng, seed = fresh_rng()
  cos, labels = safe_case(rng, cfg)
  want, frozen, counts = ref.npcface(cos, labels, **ref_kwargs(cfg))
  got, diag = jax.jit(lambda c, y: nf.npcface_logits(
      c, y, **cfg, return_diagnostics=True))(jnp.float32(cos), labels)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-4,
                             err_msg=f'seed {seed}')
  np.testing.assert_array_equal(diag['num_hard'], counts,
                                err_msg=f'seed {seed}')
  np.testing.assert_allclose(diag['margin'], frozen['margin'], rtol=1e-5,
                             atol=1e-6, err_msg=f'seed {seed}')
  # The drawn cases really cover what they claim to.
  assert (counts == 0).any() and (counts > 0).any()
  idx = np.arange(len(labels))
  assert (np.arccos(cos[idx, labels]) + frozen['margin'] > np.pi).any()


@pytest.mark.parametrize('name', ['paper', 'facex_zoo', 'custom'])
def test_gradient_matches_finite_differences(name):
  cfg = CONFIGS[name]
  rng, seed = fresh_rng()
  cos, labels = safe_case(rng, cfg, batch=12, num_classes=16)
  weights = rng.normal(size=cos.shape)
  _, frozen, _ = ref.npcface(cos, labels, **ref_kwargs(cfg))
  ref_loss = lambda c: np.sum(  # noqa: E731
      weights * ref.npcface(c, labels, **ref_kwargs(cfg), frozen=frozen)[0])
  want = ref.central_difference(ref_loss, cos)
  got = jax.grad(lambda c: jnp.sum(jnp.float32(weights) * nf.npcface_logits(
      c, labels, **cfg)))(jnp.float32(cos))
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-3,
                             err_msg=f'seed {seed}')


def test_gradient_of_cross_entropy_matches_finite_differences():
  """The whole loss, as a trainer uses it."""
  rng, seed = fresh_rng()
  cfg = CONFIGS['paper']
  cos, labels = safe_case(rng, cfg, batch=12, num_classes=16)
  _, frozen, _ = ref.npcface(cos, labels, **ref_kwargs(cfg))
  ref_loss = lambda c: np.mean(ref.cross_entropy(  # noqa: E731
      ref.npcface(c, labels, **ref_kwargs(cfg), frozen=frozen)[0], labels))
  want = ref.central_difference(ref_loss, cos)
  got = jax.grad(lambda c: nf.softmax_cross_entropy(
      nf.npcface_logits(c, labels), labels))(jnp.float32(cos))
  np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-5,
                             err_msg=f'seed {seed}')


@pytest.mark.parametrize('preset', sorted(nf.NPCFACE_PRESETS))
def test_finite_at_exactly_plus_minus_one(preset):
  cfg = nf.NPCFACE_PRESETS[preset]
  cos = np.array([[1.0, -1.0, 0.3, 1.0],
                  [-1.0, 1.0, -1.0, 0.0],
                  [0.5, 1.0, -1.0, -1.0]], np.float32)
  labels = np.array([0, 0, 2])
  logits, grad = jax.value_and_grad(
      lambda c: jnp.sum(nf.npcface_logits(c, labels, **cfg)))(jnp.asarray(cos))
  assert np.isfinite(logits) and np.all(np.isfinite(grad))
  want, _, _ = ref.npcface(cos, labels, **ref_kwargs(cfg))
  np.testing.assert_allclose(nf.npcface_logits(cos, labels, **cfg), want,
                             atol=1e-3)
  # Positives at exactly +1: d/dc s*(c cos m - sqrt(1-c^2) sin m) -> the
  # clamped root contributes nothing, leaving s*cos(m_i).
  _, diag = nf.npcface_logits(cos, labels, **cfg, return_diagnostics=True)
  np.testing.assert_allclose(grad[0, 0],
                             cfg['scale'] * np.cos(diag['margin'][0]),
                             rtol=1e-5)
  ce_grad = jax.grad(lambda c: nf.softmax_cross_entropy(
      nf.npcface_logits(c, labels, **cfg), labels))(jnp.asarray(cos))
  assert np.all(np.isfinite(ce_grad))


def test_bfloat16_in_bfloat16_out():
  rng, seed = fresh_rng()
  cos, labels = cosines(rng)
  c16 = jnp.asarray(cos, jnp.bfloat16)
  got = nf.npcface_logits(c16, labels)
  assert got.dtype == jnp.bfloat16
  want = nf.npcface_logits(c16.astype(jnp.float32), labels).astype(jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(got, np.float32),
                                np.asarray(want, np.float32),
                                err_msg=f'seed {seed}')
  grad = jax.grad(lambda c: jnp.sum(nf.npcface_logits(c, labels)).astype(
      jnp.float32))(c16)
  assert grad.dtype == jnp.bfloat16 and np.all(
      np.isfinite(np.asarray(grad, np.float32)))


def test_reduces_to_arcface_with_m0():
  rng, seed = fresh_rng()
  cos, labels = cosines(rng)
  c = jnp.float32(cos)
  got = nf.npcface_logits(c, labels, m0=0.45, m1=0.0, t=1.0, alpha=0.0)
  want = nf.arcface_logits(c, labels, margin=0.45)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5,
                             err_msg=f'seed {seed}')


def test_sample_without_hard_negatives_gets_m0():
  cos = np.full((2, 6), -0.5, np.float32)
  cos[0, 2] = 0.95      # far above every negative: no hard one
  cos[1, 4] = -0.6      # below the negatives: all five are hard
  labels = np.array([2, 4])
  _, diag = nf.npcface_logits(cos, labels, m0=0.4, m1=0.2,
                              return_diagnostics=True)
  np.testing.assert_array_equal(diag['num_hard'], [0, 5])
  np.testing.assert_allclose(diag['margin'], [0.4, 0.4 + 0.2 * -0.5], rtol=1e-6)


def test_mask_and_margin_are_constant_for_the_gradient():
  """Moving a hard negative changes m_i, but no gradient flows through it:
  the negative's gradient is s*t alone."""
  cos = np.array([[0.2, 0.3, -0.3, 0.25]], np.float32)
  labels = np.array([0])
  grad = jax.grad(lambda c: jnp.sum(nf.npcface_logits(c, labels)))(cos)
  s, t = 64.0, 1.1
  # cos(theta_y + 0.4) = -0.197: columns 1 and 3 are hard, column 2 is not.
  np.testing.assert_allclose(grad[0, 1:], [s * t, s, s * t], rtol=1e-6)


@pytest.mark.slow
def test_vmap_matches_loop():
  rng, seed = fresh_rng()
  parts = [cosines(rng, batch=6, num_classes=10) for _ in range(3)]
  cos = jnp.float32(np.stack([p[0] for p in parts]))
  labels = np.stack([p[1] for p in parts])
  got = jax.vmap(lambda c, y: nf.npcface_logits(c, y, t=1.2))(cos, labels)
  for k in range(3):
    np.testing.assert_allclose(got[k],
                               nf.npcface_logits(cos[k], labels[k], t=1.2),
                               rtol=1e-6, err_msg=f'seed {seed}')
